"""Finding a model's files: a local directory, the Hugging Face cache, or (only if allowed) a download.

    resolve_model("path/to/dir")                               # a directory is used as is
    resolve_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0")         # cache first (works offline), else download
    resolve_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0", download=False)   # cache only, never the network
    download(MODEL_ID, local_dir=None)                          # what weights/download.py runs

This is the project's one network step, and it happens only here: loading, chatting and testing read local
files. Only the files tinyllm reads are fetched (allow_patterns): ~2.2 GB of bf16 safetensors for TinyLlama,
not the pickled .bin copies a repository may also hold.
"""
import logging
import re
from pathlib import Path

log = logging.getLogger("tinyllm")

MODEL_ID = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]
ALLOW_PATTERNS = FILES + ["model.safetensors.index.json", "model-*-of-*.safetensors"]
REQUIRED = ["config.json", "tokenizer.json", "tokenizer_config.json"]   # + the weights, one file or shards


class HubError(RuntimeError):
    """The model could not be found locally and could not (or may not) be downloaded."""


def missing_files(model_dir):
    """Names of the files tinyllm needs that model_dir lacks ([] when it is complete)."""
    model_dir = Path(model_dir)
    missing = [f for f in REQUIRED if not (model_dir / f).is_file()]
    if not (model_dir / "model.safetensors").is_file() and not (model_dir / "model.safetensors.index.json").is_file():
        missing.append("model.safetensors")
    return missing


def is_repo_id(name):
    return re.fullmatch(r"[\w.\-]+/[\w.\-]+", name) is not None and ".." not in name


def download(repo_id=MODEL_ID, local_dir=None, cache_dir=None, revision=None):
    """Download the model's files (with huggingface_hub's progress bars) -> the local directory.

    Into local_dir if given, else the Hugging Face cache (~/.cache/huggingface/hub, or $HF_HOME). Files
    already there are not fetched again. Offline or unreachable -> HubError with a one-line reason.
    """
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                 local_dir=None if local_dir is None else str(local_dir), cache_dir=cache_dir)
    except Exception as e:  # huggingface_hub and requests/httpx raise many types; the user needs one line
        raise HubError(f"could not download {repo_id} from the Hugging Face Hub: {_one_line(e)} "
                       f"(offline? check the network, or pass a local model directory)") from e
    path = Path(path)
    missing = missing_files(path)
    if missing:
        raise HubError(f"downloaded {repo_id} to {path}, but it lacks {', '.join(missing)}: not a Llama "
                       f"safetensors checkpoint?")
    return path


_download = download   # resolve_model's `download` argument shadows the function


def resolve_model(id_or_dir, download=True, cache_dir=None):
    """A model directory path or a Hub repo id -> a local directory holding every file tinyllm reads.

    1. an existing directory is returned as is (HubError naming what is missing, if anything);
    2. a repo id is looked up in the Hugging Face cache without touching the network (so a model downloaded
       once works offline from then on);
    3. only then, and only if download=True, it is downloaded.
    """
    name = str(id_or_dir)
    path = Path(name).expanduser()
    if path.is_dir():
        missing = missing_files(path)
        if missing:
            raise HubError(f"{path}: model directory lacks {', '.join(missing)}")
        return path
    if not is_repo_id(name) or path.exists():
        raise HubError(f"{name}: no such model directory (and not a Hugging Face repo id like {MODEL_ID})")

    cached = _cached_snapshot(name, cache_dir)
    if cached is not None:
        return cached
    if not download:
        raise HubError(f"{name} is not in the Hugging Face cache and downloading is off: run "
                       f"`python weights/download.py` first (or pass a local model directory)")
    log.info("tinyllm: %s not in the Hugging Face cache; downloading", name)
    return _download(name, cache_dir=cache_dir)


def _cached_snapshot(repo_id, cache_dir):
    """The cached snapshot directory of repo_id if it holds every file we need, else None. No network."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, local_files_only=True,
                                      cache_dir=cache_dir))
    except Exception as e:  # LocalEntryNotFoundError and friends: simply not cached
        log.debug("tinyllm: %s not cached (%s)", repo_id, _one_line(e))
        return None
    if missing_files(path):
        log.info("tinyllm: cached snapshot %s lacks %s", path, ", ".join(missing_files(path)))
        return None
    return path


def _one_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
