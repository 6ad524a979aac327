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

from numbattn import backward, blocks, decode, linear, prefill  # noqa: E402
from numbattn.kernels import (backward_prep, decode_lanes, decode_naive, decode_paged, decode_slots,  # noqa: E402
                              families, gemm_mma, kv_append, paged_append, rowwise)
from numbattn.kernels.prefill_tiled import make_v1  # noqa: E402

f32, f16, i32, i64 = types.float32, types.float16, types.int32, types.int64
# prefill's arguments after q, k, v, out: scale_log2, causal, kv_len, window, softcap (a sliding window, a soft cap and
# a ring-buffer cache's slots are run-time values of the same kernels)
PREFILL_SCALARS = [f32, types.boolean, i64, i64, f32]
# the backward's after the gradients: scale_log2, scale, causal, window, softcap
BACKWARD_SCALARS = [f32, f32, types.boolean, i64, f32]
# v3 launch shapes beside the defaults, for head_dim 128 and 256 (benchmarks/gpu_report.py's tile sweep times them)
V3_CANDIDATES = {128: [prefill.Tiles(128, 8, 256), prefill.Tiles(64, 16, 256, 2), prefill.Tiles(64, 32, 256, 2)],
                 256: [prefill.Tiles(32, 16, 256, 4), prefill.Tiles(32, 32, 256, 4), prefill.Tiles(64, 16, 256, 2)]}


def arr(dtype, ndim):
    return types.Array(dtype, ndim, "C")


def kernels(cc):
    """(name, dispatcher, argument types) for every kernel and launch shape numbattn uses on a GPU of `cc`."""
    for d in (16, 32, 64, 128, 256):
        yield from prefill_kernels(cc, d)
        yield from decode_kernels(d)
    for dt in (f32, f16):
        yield f"kvcache append_kv {dt}", kv_append.append_kv, [arr(dt, 4)] * 4 + [arr(i32, 1)] * 3 + [i64]
        yield f"kvcache fill_nan {dt}", kv_append.fill_nan, [arr(dt, 4)] * 2 + [arr(i32, 1)] * 2
    yield from paged_kernels()
    yield from backward_kernels(cc)
    yield from model_kernels()


# The kernels compiled for a ring buffer (a sliding-window cache layer whose tokens wrap) and with a logit soft cap
# are variants of the same factories: checked at the head dims the model families use, named "... ring capped".
VARIANTS = {16: [(False, False)], 32: [(False, False)], 64: [(False, False), (True, True)],
            128: [(False, False), (True, True)], 256: [(False, False), (True, True)]}


def variant_name(ring, capped):
    return " ring" * ring + " capped" * capped


def prefill_kernels(cc, d):
    """Every prefill version at its GPU tiles for head_dim d (v3 also at the candidate tiles of V3_CANDIDATES), plain,
    and v3 at its tiles for a ring buffer with a soft cap."""
    shapes = [(version, prefill.gpu_tiles(version, d, cc=cc), (False, False)) for version in prefill.VERSIONS]
    shapes += [("v3", t, (False, False)) for t in V3_CANDIDATES.get(d, [])]
    shapes += [("v3", prefill.gpu_tiles("v3", d, cc=cc), v) for v in VARIANTS[d][1:]]
    for version, t, variant in shapes:
        kernel = prefill.make_kernel(version, d, t, *variant)
        split = f" split{t.dim_split}" if t.dim_split > 1 else ""
        for dt in (f32, f16):
            sig = [arr(dt, 4), arr(dt, 4), arr(dt, 4), arr(f32, 4)] + PREFILL_SCALARS
            yield (f"prefill {version} d{d} {t.block_m}x{t.block_n}/{t.threads}{split}{variant_name(*variant)} {dt}",
                   kernel, sig)
            if version == "v1":                 # the traced variant of the lessons: one more argument
                yield (f"prefill v1 traced d{d} {t.block_m}x{t.block_n}/{t.threads} {dt}",
                       make_v1(d, t.block_m, t.block_n, traced=True), sig + [arr(f32, 5)])


def decode_kernels(d):
    """Decode v1 and v2 at their GPU configs for groups of 1, 4 and 8 query heads, v0; ring and capped variants."""
    for group in (1, 4, 8):
        for dt in (f32, f16):
            for version, make in (("v1", decode_slots.make_decode_v1), ("v2", decode_lanes.make_decode_v2)):
                c, size = decode.gpu_config(version, d, group), dt.bitwidth // 8
                k_word, v_word = (getattr(types, word.name)
                                  for word, _ in decode.kv_word_types(version, d, c.dims_per_lane, size))
                for variant in VARIANTS[d] if group == 4 else VARIANTS[d][:1]:
                    yield (f"decode {version} d{d} G{group} {c.threads}thr {c.dims_per_lane}dpl {c.keys_per_step}kps"
                           f"{variant_name(*variant)} {dt} cache",
                           make(d, group, c.threads, c.dims_per_lane, c.keys_per_step, size, c.min_blocks_per_sm,
                                *variant),
                           [arr(f32, 3), arr(k_word, 4), arr(v_word, 4), arr(i32, 1), i64, f32, i64, f32,
                            arr(f32, 4), arr(i32, 1), arr(f32, 3)])
    for dt in (f32, f16):
        for variant in VARIANTS[d]:
            yield (f"decode v0 d{d}{variant_name(*variant)} {dt} cache", decode_naive.make_decode_v0(d, 32, *variant),
                   [arr(f32, 3), arr(dt, 4), arr(dt, 4), arr(i32, 1), f32, i64, f32, arr(f32, 3)])


def paged_kernels():
    """The paged cache's kernels (numbattn/paged.py): decode through block tables (and its soft-capped variant),
    append, gather, poison."""
    for d in (64, 128, 256):
        for group in (1, 4, 8):
            for dt in (f32, f16):
                c, size = decode.gpu_config("v1", d, group), dt.bitwidth // 8
                k_word, v_word = (getattr(types, word.name)
                                  for word, _ in decode.kv_word_types("v1", d, c.dims_per_lane, size))
                for capped in (False, True) if group == 4 else (False,):
                    yield (f"paged decode d{d} G{group} {c.threads}thr {c.dims_per_lane}dpl"
                           f"{variant_name(False, capped)} {dt} cache",
                           decode_paged.make_decode_paged(d, group, c.threads, c.dims_per_lane, c.keys_per_step, size,
                                                          c.min_blocks_per_sm, capped),
                           [arr(f32, 3), arr(k_word, 4), arr(v_word, 4), arr(i32, 2), arr(i32, 1), arr(i32, 1), i64,
                            f32, f32, arr(f32, 4), arr(i32, 1), arr(f32, 3)])
    for dt in (f32, f16):
        yield (f"paged append {dt}", paged_append.append_paged,
               [arr(dt, 4)] * 4 + [arr(i32, 2)] + [arr(i32, 1)] * 3)
        yield f"paged gather {dt}", paged_append.gather_pages, [arr(dt, 4)] * 2 + [arr(i32, 1)] + [arr(dt, 4)] * 2
        yield f"paged fill_nan {dt}", paged_append.fill_pages_nan, [arr(dt, 4)] * 2 + [arr(i32, 1)]
        yield (f"paged rope_append 32/4 d64 {dt} cache", paged_append.make_rope_append_paged(32, 4, 64),
               [arr(f32, 2), arr(f32, 2), arr(f32, 2), arr(dt, 4), arr(dt, 4), arr(i32, 2), arr(i32, 1),
                arr(i32, 1), arr(i32, 1)])


def backward_kernels(cc):
    """The attention backward (numbattn/backward.py) at its GPU launch shapes, plain and compiled with a soft cap
    ("capped"), and the forwards that keep lse."""
    for d in (16, 32, 64, 128, 256):
        for version in prefill.LSE_VERSIONS:
            t = prefill.gpu_tiles(version, d, cc=cc)
            split = f" split{t.dim_split}" if t.dim_split > 1 else ""
            yield (f"prefill {version} lse d{d} {t.block_m}x{t.block_n}/{t.threads}{split} {f32}",
                   prefill.make_kernel(version, d, t, with_lse=True),
                   [arr(f32, 4)] * 4 + PREFILL_SCALARS + [arr(f32, 3)])
        for version in backward.VERSIONS:
            tiles = backward.gpu_tiles(version, d)
            for capped in (False, True) if d in (64, 128, 256) else (False,):
                kernels_ = backward.make_kernels(version, d, tiles, capped)
                for name, kernel, t in zip(("dkdv", "dq"), kernels_, (tiles.dkdv, tiles.dq)):
                    grads = [arr(f32, 4)] * (2 if name == "dkdv" else 1)
                    yield (f"backward {version} {name} d{d} {t.block_m}x{t.block_n}/{t.threads}"
                           f"{variant_name(False, capped)} {f32}", kernel,
                           [arr(f32, 4)] * 4 + [arr(f32, 3)] * 2 + grads + BACKWARD_SCALARS)
    yield "backward row_dot", backward_prep.row_dot, [arr(f32, 4), arr(f32, 4), arr(f32, 3)]
    yield "backward zero_fill", backward_prep.zero_fill, [arr(f32, 1)]


def model_kernels():
    """The GPU engine's kernels (numbattn/kernels/gemv.py, gemm.py, rowwise.py, families.py) at TinyLlama's and
    SmolLM2's sizes, and the families' heads."""
    u64 = types.uint64
    for kind in ("bf16", "f16", "f32"):
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
        for k_in, heads in ((2048, (32, 4, 64)), (576, (9, 3, 64))):
            for tokens in (1, 4):
                for dt in (f16, f32):
                    yield (f"gemv rope K{k_in} {kind} heads {heads} M{tokens} {dt} cache",
                           linear.make_gemv(k_in, kind, tokens, "rope", True, heads),
                           [arr(f32, 2), arr(u64, 2), arr(f32, 2), arr(f32, 1), f32, arr(f32, 2), arr(f32, 2),
                            arr(dt, 4), arr(dt, 4), arr(i32, 1), arr(i32, 1)])
    yield from block_kernels()
    for _, tiles in linear.MMA_TILE_CLASSES:
        for epilogue in linear.EPILOGUES:
            for terms in sorted({linear.GEMM_TERMS, 1, 3} if epilogue == "none" else {linear.GEMM_TERMS}):
                yield (f"gemm_mma {epilogue} {tiles.bm}x{tiles.bn}x{tiles.bk} w{tiles.wm}x{tiles.wn}x{tiles.wk} "
                       f"T{terms}", gemm_mma.make_gemm_mma(epilogue, tiles, terms),
                       [arr(f32, 2), arr(u64, 2), arr(f32, 2)])
    for add in (False, True):                                       # add: Gemma's norm of a block's output into x
        yield f"rms_norm{' add' if add else ''}", rowwise.make_rms_norm(add), [arr(f32, 2), arr(f32, 1), f32,
                                                                              arr(f32, 2)]
    for h, hkv, d, bias, norm in ((14, 2, 64, True, False), (16, 8, 128, False, True), (4, 1, 256, False, True)):
        yield (f"qkv_finish {h}/{hkv} d{d}{' bias' * bias}{' head norm' * norm}",     # Qwen2.5, Qwen3, Gemma 3
               families.make_qkv_finish(h, hkv, d, bias, norm), [arr(f32, 2)] + [arr(f32, 1)] * 3 + [f32])
    yield "scale_rows", families.make_row_map("scale"), [arr(f32, 2), f32]
    yield "soft_cap", families.make_row_map("soft cap"), [arr(f32, 2), f32]
    for dt in (f32, f16):
        for h, hkv, d in ((32, 4, 64), (16, 8, 128), (8, 4, 256)):      # TinyLlama's, Qwen3's and Gemma 2's heads
            yield (f"rope_append {h}/{hkv} d{d} {dt} cache", rowwise.make_rope_append(h, hkv, d),
                   [arr(f32, 2), arr(f32, 2), arr(f32, 2), arr(dt, 4), arr(dt, 4), arr(i32, 1), arr(i32, 1)])


def block_kernels():
    """The GGUF block kinds (numbattn/blocks.py) in every kernel that reads them, at TinyLlama's and SmolLM2's sizes:
    the GEMVs as the device engine fuses them, the q/k/v GEMV with RoPE, the tensor-core GEMM's tile classes, the
    SIMT GEMM, the embedding. Names start with the kind: --only q4_k."""
    u64 = types.uint64
    gemv_sig = [arr(f32, 2), arr(u64, 2), arr(f32, 2), arr(f32, 1), f32]
    for kind in blocks.BLOCK_KINDS:
        for k_in in (2048, 5632, 576, 1536):
            if k_in % blocks.BLOCK_KINDS[kind].block:
                continue
            for epilogue, norm in (("none", True), ("residual", False), ("swiglu", True), ("geglu", True)):
                yield (f"{kind} gemv K{k_in} {epilogue}{' rmsnorm' if norm else ''}",
                       linear.make_gemv(k_in, kind, 1, epilogue, norm), gemv_sig)
        for k_in, heads in ((2048, (32, 4, 64)), (576, (9, 3, 64))):
            if k_in % blocks.BLOCK_KINDS[kind].block == 0:
                for tokens in (1, 4):
                    yield (f"{kind} gemv rope K{k_in} heads {heads} M{tokens} f16 cache",
                           linear.make_gemv(k_in, kind, tokens, "rope", True, heads),
                           gemv_sig + [arr(f32, 2), arr(f32, 2), arr(f16, 4), arr(f16, 4), arr(i32, 1), arr(i32, 1)])
        for _, tiles in linear.MMA_TILE_CLASSES:
            for epilogue in linear.EPILOGUES:
                yield (f"{kind} gemm_mma {epilogue} {tiles.bm}x{tiles.bn}x{tiles.bk} w{tiles.wm}x{tiles.wn}x{tiles.wk}",
                       gemm_mma.make_gemm_mma(epilogue, tiles, linear.GEMM_TERMS, True, kind),
                       [arr(f32, 2), arr(u64, 2), arr(f32, 2)])
        yield f"{kind} gemm simt none", linear.make_gemm(kind, "none"), [arr(f32, 2), arr(u64, 2), arr(f32, 2)]
        yield f"{kind} embed", rowwise.make_embed(kind), [arr(i32, 1), arr(u64, 2), arr(f32, 2)]


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
