"""The backend chooser (numbattn/backend.py): what is available, what is logged, and the NumPy fallback."""
import logging

import numpy as np
import pytest
from numba import cuda, float32

import numbattn
from numbattn import backend, prefill, reference


def qkv(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 2, 5, 16)).astype(np.float32) for _ in range(3)]


def test_available_backends_end_with_numpy():
    got = numbattn.available_backends()
    assert got[-1] == "numpy"
    assert got[0] in ("cuda", "sim", "numpy")


def test_choice_is_logged_once_at_info(caplog):
    backend.default_backend.cache_clear()
    with caplog.at_level(logging.INFO, logger="numbattn"):
        first = backend.resolve("auto")
        backend.resolve("auto")
    lines = [r for r in caplog.records if "numbattn backend:" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert first in lines[0].getMessage()


def test_explicit_backend_overrides_and_unavailable_one_is_rejected():
    q, k, v = qkv()
    out = numbattn.attention(q, k, v, causal=True, backend="numpy")
    np.testing.assert_allclose(out, reference.attention(q, k, v, causal=True), rtol=1e-6)
    missing = [b for b in backend.BACKENDS if b not in numbattn.available_backends()]
    for name in missing:
        with pytest.raises(ValueError, match=f"backend='{name}' is not available"):
            numbattn.attention(q, k, v, backend=name)


def test_failing_kernel_falls_back_to_numpy_with_a_warning(monkeypatch, caplog):
    def broken_launch(*args, **kwargs):
        raise RuntimeError("simulated driver failure")

    monkeypatch.setattr(prefill, "launch", broken_launch)
    q, k, v = qkv(1)
    monkeypatch.setenv("NUMBATTN_STRICT", "1")  # strict (the test suite's default): the error surfaces
    with pytest.raises(RuntimeError, match="simulated driver failure"):
        numbattn.attention(q, k, v, causal=True)
    monkeypatch.delenv("NUMBATTN_STRICT")  # a user's default: fall back, warn, stay correct
    with caplog.at_level(logging.WARNING, logger="numbattn"):
        out = numbattn.attention(q, k, v, causal=True)
    np.testing.assert_allclose(out, reference.attention(q, k, v, causal=True), rtol=1e-6)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and "simulated driver failure" in warned[0].getMessage()
    assert "NumPy reference" in warned[0].getMessage()


def test_fallback_keeps_device_arrays_on_the_device(monkeypatch):
    monkeypatch.setattr(prefill, "launch", lambda *a, **k: 1 / 0)
    monkeypatch.delenv("NUMBATTN_STRICT")
    q, k, v = qkv(2)
    out = numbattn.attention(cuda.to_device(q), cuda.to_device(k), cuda.to_device(v))
    assert backend.is_device_array(out)
    np.testing.assert_allclose(out.copy_to_host(), reference.attention(q, k, v), rtol=1e-6)


def test_simulated_shared_arrays_are_one_array_per_block(monkeypatch, kernel_backend):
    """Numba's simulator creates a block's shared array on first use, unlocked: threads switching inside that step
    got different arrays (a rare, moving wrong answer). A slow allocation makes every thread switch there."""
    if kernel_backend != "sim":
        pytest.skip("a simulator bug; on a GPU shared memory is hardware")
    import time

    @cuda.jit
    def total_of_shared(out):
        t = cuda.threadIdx.x
        a = cuda.shared.array(32, float32)
        a[t] = t
        cuda.syncthreads()
        s = float32(0.0)
        for i in range(32):
            s += a[i]
        out[cuda.blockIdx.x, t] = s

    empty = np.empty
    monkeypatch.setattr(np, "empty", lambda *a, **k: (time.sleep(1e-3), empty(*a, **k))[1])
    out = cuda.to_device(np.zeros((4, 32), np.float32))
    for _ in range(3):
        total_of_shared[4, 32](out)
        got = out.copy_to_host()
        assert (got == 31 * 32 / 2).all(), f"threads of a block saw different shared arrays: {got}"



# --------------------------------------------------------------------------------------------------------
# Interrupts: never a kernel failure, never swallowed by the fallback
# --------------------------------------------------------------------------------------------------------
def test_an_error_raised_by_an_interrupt_is_an_interrupt_not_a_kernel_failure(monkeypatch, caplog):
    """Numba's simulator once turned ^C into "RuntimeError: release unlocked lock" (raised while the
    KeyboardInterrupt was being handled, in its thread bookkeeping); the fallback caught it and the reply went on."""
    monkeypatch.delenv("NUMBATTN_STRICT")                 # a user's default: kernel failures fall back to NumPy

    def interrupted_kernel():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("release unlocked lock") from None   # `from None` hides it; __context__ keeps it

    def numpy_path():
        pytest.fail("an interrupt fell back to NumPy")
    with caplog.at_level(logging.WARNING, logger="numbattn"):
        with pytest.raises(KeyboardInterrupt, match="prefill attention interrupted .*release unlocked lock"):
            backend.run("prefill attention", "sim", interrupted_kernel, numpy_path)
        with pytest.raises(KeyboardInterrupt):
            backend.run("decode attention", "sim", lambda: (_ for _ in ()).throw(KeyboardInterrupt), numpy_path)
    assert not caplog.records                             # no "kernel failed" warning either


INTERRUPTED_KERNEL = r"""
import os, sys, threading
import numpy as np
sys.setswitchinterval(1e-4)
import numbattn
from numbattn import reference
from numba.cuda.simulator.kernel import BlockThread
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 2, 40, 16)).astype(np.float32) for _ in range(3))
print("running", flush=True)
try:
    numbattn.attention(q, k, v, causal=True, backend="sim")       # ~2 s in the simulator
    print("finished: not interrupted", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
blocked = [t for t in threading.enumerate() if isinstance(t, BlockThread)]
for t in blocked:                                   # a thread may still be unwinding its abort: a bounded wait
    t.join(10)
print("simulated threads still alive:", sum(t.is_alive() for t in blocked), flush=True)
for shape in [(2, 4, 9, 32), (1, 1, 3, 64)]:           # new shapes: new kernels compiled in the simulator
    q2, k2, v2 = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    out = numbattn.attention(q2, k2, v2, causal=True, backend="sim")    # NUMBATTN_STRICT=1: no NumPy fallback
    print("after:", shape, np.allclose(out, reference.attention(q2, k2, v2, causal=True), atol=1e-5), flush=True)
"""


def test_sigint_in_the_middle_of_a_simulated_kernel_stops_it_and_the_simulator_stays_usable(kernel_backend):
    """A real SIGINT while the simulator runs a kernel: the call ends in KeyboardInterrupt, no simulated CUDA thread
    is left running (they stayed blocked in syncthreads() inside device functions, keeping the module's `cuda`
    swapped for the dead launch's fake one, so every later kernel failed and ran on NumPy), and later kernels
    run on the simulator and are right."""
    if kernel_backend != "sim":
        pytest.skip("the simulator's threads; on a GPU ^C arrives between launches")
    import os
    import signal
    import subprocess
    import sys
    import time
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", NUMBATTN_STRICT="1")
    child = subprocess.Popen([sys.executable, "-c", INTERRUPTED_KERNEL], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if we run in `&`
    try:
        assert child.stdout.readline() == "running\n"
        time.sleep(0.5)                                    # numba is imported, the kernel is under way
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=120)
    finally:
        child.kill()
    assert out.splitlines() == ["interrupted", "simulated threads still alive: 0",
                                "after: (2, 4, 9, 32) True", "after: (1, 1, 3, 64) True"], out
    assert child.returncode == 0
