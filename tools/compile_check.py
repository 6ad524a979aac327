"""Compile every numbattn kernel for a real GPU, on a machine without one.

Numba's CUDA simulator runs kernel code as Python, so it accepts code the CUDA compiler rejects (an
intrinsic given the wrong index types, an operation with no GPU lowering). This compiles each kernel, at
the launch shapes a GPU would use, through NVVM to PTX for sm_90 and sm_80: no GPU and no driver needed,
only the CUDA toolkit wheels (`pip install -e ".[cuda]"`). Run it before spending time on a GPU machine.
Where cuda.core's nvJitLink linker is installed too, each PTX also goes through ptxas, which reports the
registers, static shared memory and local-memory (spill) bytes per thread.

    python tools/compile_check.py          # one line per kernel; exit code 1 if any fails to compile

It only proves that the kernels compile; whether they are right is what the test suite checks. One known
difference: nvJitLink's ptxas rejects more than 48 KB of static shared memory even for sm_90, while the
H100's driver JIT accepted the big prefill tiles; numbattn checks at run time which is the case
(prefill._static_shared_over_48k), so those lines say "note", not "FAIL".
"""
import os
import sys
import time
import types as pytypes
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if os.environ.get("NUMBA_ENABLE_CUDASIM", "") not in ("", "0"):
    sys.exit("compile_check: unset NUMBA_ENABLE_CUDASIM (the simulator compiles nothing)")

import numba.cuda.api  # noqa: E402
import numba.cuda.dispatcher  # noqa: E402
from numba import cuda, types  # noqa: E402

# Numba asks the current device for its compute capability while compiling device functions; there is none
# here, so it is told the one being compiled for (an internal detail of numba-cuda 0.30, hence this script
# lives in tools/ and not in the package).
_device = pytypes.SimpleNamespace(compute_capability=(9, 0), id=0)
numba.cuda.api.get_current_device = numba.cuda.dispatcher.get_current_device = lambda: _device

from numbattn import decode, kvcache, prefill  # noqa: E402

f32, f16, i32 = types.float32, types.float16, types.int32


def arr(dtype, ndim):
    return types.Array(dtype, ndim, "C")


def kernels(cc):
    """(name, dispatcher, argument types) for every kernel and launch shape numbattn uses on a GPU of `cc`."""
    for d in (16, 32, 64, 128):
        for version in prefill.VERSIONS:
            t = prefill.gpu_tiles(version, d, cc=cc)
            kernel = prefill._make(version, d, t)
            for dt in (f32, f16):
                sig = [arr(dt, 4), arr(dt, 4), arr(dt, 4), arr(f32, 4), f32, types.boolean]
                if version == "v1":
                    sig.append(arr(f32, 5))         # the trace buffer of lesson 2
                yield f"prefill {version} d{d} {t.block_m}x{t.block_n}/{t.threads} {dt}", kernel, sig
        for group in (1, 4, 8):
            c = decode.gpu_config(d, group)
            for dt in (f32, f16):
                yield (f"decode split d{d} G{group} tile {c.block_n}/{c.threads} {dt} cache",
                       decode.make_split_kernel(d, group, c.block_n, c.threads),
                       [arr(f32, 3), arr(dt, 4), arr(dt, 4), arr(i32, 1), types.int64, f32, arr(f32, 4)])
            yield (f"decode merge d{d}", decode.make_merge_kernel(d, c.merge_threads),
                   [arr(i32, 1), types.int64, types.int64, types.int64, arr(f32, 4), arr(f32, 3)])
    for dt in (f32, f16):
        yield f"kvcache append_kv {dt}", kvcache.append_kv, [arr(dt, 4)] * 4 + [arr(i32, 1)] * 2
        yield f"kvcache fill_nan {dt}", kvcache.fill_nan, [arr(dt, 4)] * 2 + [arr(i32, 1)] * 2


def ptxas_report(ptx, cc):
    """Assemble the PTX with nvJitLink's ptxas -> its resource line, e.g. 'used 128 registers, ... 0 bytes lmem'."""
    try:
        from cuda.core import Linker, LinkerOptions, ObjectCode
    except ImportError:
        try:
            from cuda.core.experimental import Linker, LinkerOptions, ObjectCode
        except ImportError:
            return "ptxas not run (no cuda.core)"
    linker = Linker(ObjectCode.from_ptx(ptx.encode()), options=LinkerOptions(arch=f"sm_{cc[0]}{cc[1]}", verbose=True))
    try:
        linker.link("cubin")
    except Exception as e:
        if "too much shared" in str(e):
            return "note: ptxas (nvJitLink) rejects > 48 KB of static shared memory"
        raise
    used = [line for line in linker.get_info_log().splitlines() if "used" in line and "registers" in line]
    return used[-1].split(": ", 1)[-1].strip() if used else "assembled"


def main():
    failed = 0
    for cc in ((9, 0), (8, 0)):
        _device.compute_capability = cc
        seen = set()
        for name, kernel, sig in kernels(cc):
            if name in seen:
                continue
            seen.add(name)
            t0 = time.perf_counter()
            try:
                ptx, _ = cuda.compile_ptx(kernel.py_func, tuple(sig), cc=cc,
                                          fastmath=kernel.targetoptions.get("fastmath", False))
                print(f"ok    sm_{cc[0]}{cc[1]}  {name}: {ptxas_report(ptx, cc)} ({time.perf_counter() - t0:.1f} s)",
                      flush=True)
            except Exception as e:
                failed += 1
                print(f"FAIL  sm_{cc[0]}{cc[1]}  {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                      flush=True)
    print(f"{failed} kernel(s) failed to compile" if failed else "every kernel compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
