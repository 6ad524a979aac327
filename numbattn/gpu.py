"""What the GPU in this process can do, asked once: compute capability, SM count, shared memory per block.

    compute_capability()      (major, minor) of the current device
    sm_count()                its streaming multiprocessors (the simulator plans as an H100 would: 132)
    has_tf32_mma()            TF32 tensor-core MMAs (sm_80+): prefill v3 runs v2 in its place without them
    static_shared_over_48k()  whether a kernel may declare more than 48 KB of static shared memory (a probe)
    SHARED_LIMIT              the 48 KB of static shared memory per block that every CUDA GPU allows
"""
import functools

import numpy as np
from numba import cuda

from . import backend as _backend

SHARED_LIMIT = 48 * 1024
H100_SMS = 132


@functools.lru_cache(maxsize=None)
def compute_capability():
    return tuple(cuda.get_current_device().compute_capability)


@functools.lru_cache(maxsize=None)
def sm_count():
    """SMs of the current GPU; the simulator has none to ask, so it plans as an H100 (132) would."""
    return getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", H100_SMS)


@functools.lru_cache(maxsize=None)
def has_tf32_mma():
    """Prefill v3's TF32 MMAs need sm_80 or newer; on an older GPU v3 launches run v2 instead (said once)."""
    ok = compute_capability() >= (8, 0)
    if not ok:
        _backend.log.info("numbattn: prefill v3 needs TF32 tensor cores (compute capability 8.0+); this GPU has "
                          "%s: running v2", compute_capability())
    return ok


@functools.lru_cache(maxsize=None)
def static_shared_over_48k():
    """Does this GPU + toolchain compile and run a kernel with 64 KB of static shared memory? (asked once)"""
    from .kernels.common import shared_64k_probe
    try:
        out = cuda.to_device(np.zeros(32, np.float32))
        shared_64k_probe[1, 32](out)
        ok = bool((out.copy_to_host() == np.arange(32)).all())
    except Exception as e:      # a compile or launch error: the small tiles it is
        _backend.log.info("numbattn: more than 48 KB of static shared memory per block is not available here "
                          "(%s: %s); using the smaller prefill tiles", type(e).__name__, str(e).splitlines()[0])
        return False
    _backend.log.info("numbattn: static shared memory above 48 KB per block %s: %s prefill tiles",
                      "works" if ok else "gave a wrong result", "big" if ok else "small")
    return ok
