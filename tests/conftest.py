"""Fixtures for the tinyllm tests: one miniature checkpoint per session (tinyllm/tiny.py, ~0.2 s to write).

The root conftest.py (simulator on, strict kernels) applies too.
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
