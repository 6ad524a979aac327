"""Compile every numbattn kernel for a real GPU, on a machine without one.

Numba's CUDA simulator runs kernel code as Python, so it accepts code the CUDA compiler rejects (an
intrinsic given the wrong index types, an operation with no GPU lowering). This compiles each kernel, at
the launch shapes a GPU would use, through NVVM to PTX for sm_90 and sm_80: no GPU and no driver needed,
only the CUDA toolkit wheels (`pip install -e ".[cuda]"`). Run it before spending time on a GPU machine.
Where cuda.core's nvJitLink linker is installed too, each PTX also goes through ptxas, which reports the
registers, static shared memory and local-memory (spill) bytes per thread.

    python tools/compile_check.py          # one line per kernel; exit code 1 if any fails to compile
    python tools/compile_check.py --ptx-dir DIR --only "prefill v2"   # also write each kernel's PTX to DIR
    python tools/compile_check.py --ptx-dir NEW --compare-with OLD     # ... and say which kernels' PTX changed
                                           # (symbol names aside): a refactor that changes no kernel keeps it equal

It only proves that the kernels compile; whether they are right is what the test suite checks. One known
difference: nvJitLink's ptxas rejects more than 48 KB of static shared memory even for sm_90, while the
H100's driver JIT accepted the big prefill tiles; numbattn checks at run time which is the case
(gpu.static_shared_over_48k), so those lines say "note", not "FAIL".
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

from numbattn import backward, decode, linear, prefill  # noqa: E402
from numbattn.kernels import backward_prep, decode_lanes, decode_naive, decode_slots, kv_append, rowwise  # noqa: E402
from numbattn.kernels.prefill_tiled import make_v1  # noqa: E402

f32, f16, i32 = types.float32, types.float16, types.int32


def arr(dtype, ndim):
    return types.Array(dtype, ndim, "C")


def kernels(cc):
    """(name, dispatcher, argument types) for every kernel and launch shape numbattn uses on a GPU of `cc`."""
    for d in (16, 32, 64, 128):
        for version in prefill.VERSIONS:
            t = prefill.gpu_tiles(version, d, cc=cc)
            kernel = prefill.make_kernel(version, d, t)
            for dt in (f32, f16):
                sig = [arr(dt, 4), arr(dt, 4), arr(dt, 4), arr(f32, 4), f32, types.boolean]
                yield f"prefill {version} d{d} {t.block_m}x{t.block_n}/{t.threads} {dt}", kernel, sig
                if version == "v1":                 # the traced variant of the lessons: one more argument
                    yield (f"prefill v1 traced d{d} {t.block_m}x{t.block_n}/{t.threads} {dt}",
                           make_v1(d, t.block_m, t.block_n, traced=True), sig + [arr(f32, 5)])
        for group in (1, 4, 8):
            for dt in (f32, f16):
                for version, make in (("v1", decode_slots.make_decode_v1), ("v2", decode_lanes.make_decode_v2)):
                    c, size = decode.gpu_config(version, d, group), dt.bitwidth // 8
                    k_word, v_word = (getattr(types, word.name)
                                      for word, _ in decode.kv_word_types(version, d, c.dims_per_lane, size))
                    yield (f"decode {version} d{d} G{group} {c.threads}thr {c.dims_per_lane}dpl {c.keys_per_step}kps "
                           f"{dt} cache", make(d, group, c.threads, c.dims_per_lane, c.keys_per_step, size,
                                               c.min_blocks_per_sm),
                           [arr(f32, 3), arr(k_word, 4), arr(v_word, 4), arr(i32, 1), types.int64, f32, arr(f32, 4),
                            arr(i32, 1), arr(f32, 3)])
        for dt in (f32, f16):
            yield (f"decode v0 d{d} {dt} cache", decode_naive.make_decode_v0(d, 32),
                   [arr(f32, 3), arr(dt, 4), arr(dt, 4), arr(i32, 1), f32, arr(f32, 3)])
    for dt in (f32, f16):
        yield f"kvcache append_kv {dt}", kv_append.append_kv, [arr(dt, 4)] * 4 + [arr(i32, 1)] * 3
        yield f"kvcache fill_nan {dt}", kv_append.fill_nan, [arr(dt, 4)] * 2 + [arr(i32, 1)] * 2
    yield from backward_kernels(cc)
    yield from model_kernels()


def backward_kernels(cc):
    """The attention backward (numbattn/backward.py) at its GPU launch shapes, and the forwards that keep lse."""
    for d in (16, 32, 64, 128):
        for version in prefill.LSE_VERSIONS:
            t = prefill.gpu_tiles(version, d, cc=cc)
            yield (f"prefill {version} lse d{d} {t.block_m}x{t.block_n}/{t.threads} {f32}",
                   prefill.make_kernel(version, d, t, with_lse=True),
                   [arr(f32, 4)] * 4 + [f32, types.boolean, arr(f32, 3)])
        for version in backward.VERSIONS:
            tiles = backward.gpu_tiles(version, d)
            for name, kernel, t in zip(("dkdv", "dq"), backward.make_kernels(version, d, tiles), (tiles.dkdv, tiles.dq)):
                grads = [arr(f32, 4)] * (2 if name == "dkdv" else 1)
                yield (f"backward {version} {name} d{d} {t.block_m}x{t.block_n}/{t.threads} {f32}", kernel,
                       [arr(f32, 4)] * 4 + [arr(f32, 3)] * 2 + grads + [f32, f32, types.boolean])
    yield "backward row_dot", backward_prep.row_dot, [arr(f32, 4), arr(f32, 4), arr(f32, 3)]
    yield "backward zero_fill", backward_prep.zero_fill, [arr(f32, 1)]


def model_kernels():
    """The GPU engine's kernels (numbattn/kernels/gemv.py, gemm.py, rowwise.py) at TinyLlama's and SmolLM2's sizes."""
    u64 = types.uint64
    for kind in ("bf16", "f32"):
        for k_in in (2048, 5632, 576, 1536):
            for epilogue in linear.EPILOGUES:
                for norm in (False, True):
                    yield (f"gemv K{k_in} {kind} {epilogue}{' rmsnorm' if norm else ''}",
                           linear.make_gemv(k_in, kind, 1, epilogue, norm),
                           [arr(f32, 2), arr(u64, 2), arr(f32, 2), arr(f32, 1), f32])
        for epilogue in linear.EPILOGUES:
            for tiles in linear.GEMM_TILE_CHOICES:
                yield (f"gemm {kind} {epilogue} {tiles}", linear.make_gemm(kind, epilogue, tiles),
                       [arr(f32, 2), arr(u64, 2), arr(f32, 2)])
        yield f"embed {kind}", rowwise.make_embed(kind), [arr(i32, 1), arr(u64, 2), arr(f32, 2)]
    yield "rms_norm", rowwise.make_rms_norm(), [arr(f32, 2), arr(f32, 1), f32, arr(f32, 2)]
    for dt in (f32, f16):
        yield (f"rope_append 32/4 d64 {dt} cache", rowwise.make_rope_append(32, 4, 64),
               [arr(f32, 2), arr(f32, 2), arr(f32, 2), arr(dt, 4), arr(dt, 4), arr(i32, 1), arr(i32, 1)])


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
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ptx-dir", type=Path, help="write each kernel's PTX here (one file per kernel and GPU)")
    ap.add_argument("--only", default="", help="only kernels whose name contains this text")
    ap.add_argument("--cc", default="90,80", help="compute capabilities, e.g. 90 or 90,80")
    ap.add_argument("--compare-with", type=Path, help="a --ptx-dir of an earlier run: report same / changed")
    args = ap.parse_args()
    if args.ptx_dir:
        args.ptx_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for cc in [(int(c[0]), int(c[1:])) for c in args.cc.split(",")]:
        _device.compute_capability = cc
        seen = set()
        for name, kernel, sig in kernels(cc):
            if name in seen or args.only not in name:
                continue
            seen.add(name)
            t0 = time.perf_counter()
            try:
                ptx, _ = cuda.compile_ptx(kernel.py_func, tuple(sig), cc=cc,
                                          fastmath=kernel.targetoptions.get("fastmath", False),
                                          launch_bounds=kernel.targetoptions.get("launch_bounds"))
                if args.ptx_dir:
                    (args.ptx_dir / f"sm{cc[0]}{cc[1]} {name}.ptx".replace("/", "_")).write_text(ptx)
                print(f"ok    sm_{cc[0]}{cc[1]}  {name}: {ptxas_report(ptx, cc)} ({time.perf_counter() - t0:.1f} s)",
                      flush=True)
            except Exception as e:
                failed += 1
                print(f"FAIL  sm_{cc[0]}{cc[1]}  {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                      flush=True)
    print(f"{failed} kernel(s) failed to compile" if failed else "every kernel compiled")
    if args.compare_with and args.ptx_dir:
        compare_ptx(args.compare_with, args.ptx_dir)
    return 1 if failed else 0


def compare_ptx(old_dir, new_dir):
    """Per kernel in both dirs: is the PTX the same, once Numba's generated symbol names are taken out?"""
    import re

    def normalized(path):
        text = re.sub(r"_Z[\w$]+", "SYM", path.read_text())            # mangled function names
        text = re.sub(r"_cudapy_smem_\d+", "SMEM", text)               # numbered shared arrays
        return re.sub(r"//.*", "", text)
    for old in sorted(old_dir.glob("*.ptx")):
        new = new_dir / old.name
        if new.exists():
            print(f"{'same   ' if normalized(old) == normalized(new) else 'CHANGED'}  {old.stem}")


if __name__ == "__main__":
    sys.exit(main())
