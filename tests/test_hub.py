"""tinyllm/hub.py and load_model's entry: finding model files without ever touching the network.

Nothing here downloads: the Hugging Face cache is a temporary directory laid out as huggingface_hub lays it
out, and the one "download" is a snapshot_download replaced by a function that fails like a dead network.
"""
import shutil

import huggingface_hub
import pytest

import tinyllm
from tinyllm import ConfigError, HubError, load_model, resolve_model
from tinyllm.hub import MODEL_ID, download, missing_files

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
