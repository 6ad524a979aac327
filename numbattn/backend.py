"""Which engine runs the kernels: a real GPU, Numba's CUDA simulator, or plain NumPy.

    cuda   a CUDA GPU is usable through numba-cuda: the @cuda.jit kernels compile to PTX and run there.
    sim    Numba's CUDA simulator is on: the *same* kernel code runs on the CPU, one Python thread per
           CUDA thread. Slow (keep shapes tiny) but it lets every kernel be tested on a laptop.
    numpy  no kernels at all: the NumPy reference in numbattn/reference.py computes the answer.

Turning the simulator on: set NUMBA_ENABLE_CUDASIM=1 in the environment *before* anything imports
numba.cuda (Numba reads it once, at import). `pytest` does this for you (tests/conftest.py) unless you set
NUMBATTN_TEST_GPU=1 on a machine with a GPU.

The choice is made once, logged once at INFO with the reason, and may be overridden per call with
backend="cuda" | "sim" | "numpy". A kernel that raises is retried on NumPy with a WARNING (like nanoGPT's
"flash attention not available" path): a failing kernel costs speed, never a wrong answer or a crash.
An interrupt (Ctrl-C) is never a kernel failure: it stops the call, always (see run()).
Set NUMBATTN_STRICT=1 to make kernel errors raise instead (the test suite does, so a broken kernel
cannot hide behind its fallback).
"""
import functools
import logging
import os

import numpy as np

log = logging.getLogger("numbattn")

BACKENDS = ("cuda", "sim", "numpy")


@functools.lru_cache(maxsize=None)
def probe():
    """-> (list of usable backends, best first; the reason for the first). Imports numba.cuda once."""
    try:
        import numba
        from numba import cuda
    except Exception as e:  # numba missing or broken: NumPy still answers correctly
        return ["numpy"], f"numba.cuda could not be imported ({type(e).__name__}: {e})"
    if numba.config.ENABLE_CUDASIM:
        from numbattn import simulator
        simulator.repair()
        return ["sim", "numpy"], "NUMBA_ENABLE_CUDASIM=1: kernels run in Numba's CUDA simulator"
    try:
        if cuda.is_available():
            name = cuda.get_current_device().name
            name = name.decode() if isinstance(name, bytes) else name
            return ["cuda", "numpy"], f"CUDA GPU found: {name}"
        reason = "no usable CUDA GPU (numba.cuda.is_available() is False)"
    except Exception as e:
        reason = f"CUDA driver probe failed ({type(e).__name__}: {e})"
    return ["numpy"], reason + "; set NUMBA_ENABLE_CUDASIM=1 to run the kernels in the simulator"


def available_backends():
    """Backends usable in this process, best first, e.g. ["sim", "numpy"]."""
    return list(probe()[0])


@functools.lru_cache(maxsize=None)
def default_backend():
    backends, reason = probe()
    log.info("numbattn backend: %s (%s)", backends[0], reason)
    return backends[0]


def resolve(backend="auto"):
    """"auto" -> the best available backend; an explicit name is checked against what is available."""
    if backend in (None, "auto"):
        return default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected 'auto' or one of {BACKENDS}")
    if backend not in available_backends():
        raise ValueError(f"backend={backend!r} is not available here ({probe()[1]}); "
                         f"available: {available_backends()}")
    return backend


def is_device_array(x):
    """Numba device arrays (real or simulated) have copy_to_host; host NumPy arrays do not."""
    return hasattr(x, "copy_to_host")


def to_host(x):
    return x.copy_to_host() if is_device_array(x) else np.asarray(x)


def deliver(o, out, on_device):
    """A host result o (the NumPy path) returned the way the kernel path would: in `out` if given (a device
    array), on the device if the inputs were, else as is."""
    from numba import cuda
    o = np.ascontiguousarray(o, dtype=np.float32)
    if out is not None:
        out.copy_to_device(o)
        return out if on_device else o
    return cuda.to_device(o) if on_device else o


def run(name, backend, kernel_fn, numpy_fn):
    """Run kernel_fn() on a kernel backend, numpy_fn() on "numpy"; fall back to NumPy if the kernel raises.

    Input validation happens before this, so an exception here is the kernel's (compiler, driver, launch).
    An interrupt is never a kernel failure: Ctrl-C (KeyboardInterrupt), or an error raised while one was
    being handled (Numba's simulator can turn ^C into e.g. "RuntimeError: release unlocked lock" inside
    its thread bookkeeping), propagates as a KeyboardInterrupt; the simulator's threads are stopped first.
    """
    if backend == "numpy":
        return numpy_fn()
    try:
        return kernel_fn()
    except KeyboardInterrupt:
        _stop_simulated_threads(backend)
        raise
    except Exception as e:
        if _caused_by_interrupt(e):
            _stop_simulated_threads(backend)
            raise KeyboardInterrupt(f"{name} interrupted ({type(e).__name__}: {e})") from e
        if os.environ.get("NUMBATTN_STRICT", "") not in ("", "0"):
            raise
        log.warning("numbattn: %s kernel failed on backend %r (%s: %s); using the NumPy reference instead",
                    name, backend, type(e).__name__, e)
        return numpy_fn()


def _caused_by_interrupt(e):
    """Whether a KeyboardInterrupt is in e's chain (raised while handling one, or from one)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _stop_simulated_threads(backend):
    if backend == "sim":
        from numbattn import simulator
        simulator.stop_threads()
