"""Tuning runs on the GPU: the measurements behind the launch shapes and defaults chosen in numbattn/ and tinyllm/.

    python benchmarks/tune.py --out DIR [--sections launch,gemv,gemm,gemm_mma,decode,decode_shapes,engine]

Each section prints a table as it goes and writes DIR/tune.json. These are the sweeps (several variants of one
kernel, side by side in one process); benchmarks/gpu_report.py is the report that goes into BENCHMARKS.md.
GPU times are CUDA events around many back-to-back launches (the GPU kept busy); host times are the host clock.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("NUMBATTN_STRICT", "1")

from numba import cuda  # noqa: E402

from numbattn import decode, linear  # noqa: E402
from numbattn.kernels import decode_lanes  # noqa: E402
from numbattn.kernels import gemv as gemv_kernels  # noqa: E402
from numbattn.kernels.gemm_mma import MmaTiles  # noqa: E402
from numbattn.lab import bench  # noqa: E402
from numbattn.launch import Launch  # noqa: E402

RESULTS = {}


def table(name, rows, columns):
    print(f"\n### {name}\n" + bench.format_table(rows, columns), flush=True)
    RESULTS[name] = rows


def gpu_ms(fn, n=100):
    """Milliseconds per call of fn, GPU time: events around n back-to-back calls after a warm-up."""
    fn()
    cuda.synchronize()
    start, end = cuda.event(), cuda.event()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return cuda.event_elapsed_time(start, end) / n


def host_us(fn, n=2000):
    fn()
    cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e6
    cuda.synchronize()
    return t


# --------------------------------------------------------------------------------------------------------
def section_launch():
    @cuda.jit
    def empty1(a):
        pass

    @cuda.jit
    def empty8(a, b, c, d, e, f, g, h, x, y, z):
        pass
    arrs = [cuda.device_array(16, np.float32) for _ in range(8)]
    scal = (np.float32(1.0), np.int64(2), np.float32(3.0))
    rows = [dict(kernel="1 array", numba_us=host_us(lambda: empty1[1, 32](arrs[0])),
                 prepared_us=host_us(Launch(empty1, 1, 32, (arrs[0],))))]
    rows.append(dict(kernel="8 arrays + 3 scalars", numba_us=host_us(lambda: empty8[1, 32](*arrs, *scal)),
                     prepared_us=host_us(Launch(empty8, 1, 32, (*arrs, *scal)))))
    table("host time per launch (us)", rows, ["kernel", "numba_us", "prepared_us"])


SHAPES = {"qkv": (2560, 2048, "none"), "o": (2048, 2048, "residual"), "gate_up": (11264, 2048, "swiglu"),
          "down": (2048, 5632, "residual"), "lm_head": (32000, 2048, "none")}


def weights(n, k):
    rng = np.random.default_rng(n + k)
    from tinyllm.weights import f32_to_bf16
    words, kind = linear.pack_weight(f32_to_bf16(rng.standard_normal((n, k), dtype=np.float32)))
    return cuda.to_device(words), kind


def section_gemv():
    rows = []
    for rows_per_warp in (1, 2, 4):
        for chunk in (4, 8, 16):
            gemv_kernels.GEMV_ROWS, gemv_kernels.GEMV_CHUNK = rows_per_warp, chunk
            linear.make_gemv.cache_clear()
            total_ms, total_bytes = 0.0, 0
            row = dict(rows_per_warp=rows_per_warp, chunk=chunk)
            for name, (n, k, epi) in SHAPES.items():
                w, kind = weights(n, k)
                x = cuda.to_device(np.random.default_rng(1).standard_normal((1, k), dtype=np.float32))
                out = cuda.device_array((1, linear.out_features(n, epi)), np.float32)
                norm = cuda.to_device(np.ones(k, np.float32))
                step = linear.linear_launch(x, w, kind, out, epi, norm_w=norm if name != "down" else None)
                ms = gpu_ms(step)
                row[f"{name}_GBps"] = n * k * 2 / ms / 1e6
                total_ms += ms
                total_bytes += n * k * 2
            row["all_GBps"] = total_bytes / total_ms / 1e6
            rows.append(row)
    gemv_kernels.GEMV_ROWS, gemv_kernels.GEMV_CHUNK = 1, 4
    linear.make_gemv.cache_clear()
    table("GEMV bf16, one token, GB/s of weights (TinyLlama's matrices)", rows,
          ["rows_per_warp", "chunk"] + [f"{n}_GBps" for n in SHAPES] + ["all_GBps"])


def section_gemm():
    rows = []
    for tiles in ((64, 128, 16, 256), (64, 128, 32, 256), (64, 256, 16, 256), (32, 128, 16, 256),
                  (64, 64, 32, 256)):
        for m in (512,):
            rows.append(dict(tiles=str(tiles), M=m, **time_matrices(
                m, lambda kind, epi, n: (linear.make_gemm(kind, epi, tiles), linear.gemm_grid(m, n, tiles), tiles[3]))))
    table("GEMM bf16 weights, fp32 math: TFLOP/s", rows,
          ["tiles", "M", "qkv_TFLOPs", "o_TFLOPs", "gate_up_TFLOPs", "down_TFLOPs", "all_TFLOPs", "regs", "error"])


# The tensor-core GEMM (kernels/gemm_mma.py): candidate tiles per prompt length, 2 terms (the default) and 1 and 3
MMA_CANDIDATES = {16: [MmaTiles(16, 16, 128, 1, 1, 8), MmaTiles(16, 32, 128, 1, 1, 8), MmaTiles(16, 16, 64, 1, 1, 4),
                       MmaTiles(16, 32, 64, 1, 2, 2), MmaTiles(16, 64, 64, 1, 2, 4)],
                  64: [MmaTiles(32, 32, 64, 1, 1, 4), MmaTiles(64, 32, 64, 2, 1, 2), MmaTiles(32, 64, 64, 1, 2, 2),
                       MmaTiles(64, 64, 32, 2, 2, 1), MmaTiles(16, 32, 128, 1, 1, 8)],
                  512: [MmaTiles(64, 128, 32, 2, 4, 1), MmaTiles(128, 128, 32, 4, 2, 1), MmaTiles(64, 64, 32, 2, 2, 1),
                        MmaTiles(128, 64, 32, 4, 1, 1), MmaTiles(64, 128, 64, 2, 4, 1)],
                  2048: [MmaTiles(128, 128, 32, 4, 2, 1), MmaTiles(64, 128, 32, 2, 4, 1), MmaTiles(128, 256, 32, 4, 4, 1),
                         MmaTiles(128, 128, 64, 4, 2, 1)]}


def section_gemm_mma():
    """Per prompt length: each candidate tile shape over TinyLlama's four matrices (TFLOP/s of the useful product,
    registers, spills), with the default 2 bf16 terms; then 1 and 3 terms and accumulation in the tensor cores
    throughout at the default tiles. The classes in linear.GPU_MMA_TILE_CLASSES come from this table."""
    rows = []
    for m, candidates in MMA_CANDIDATES.items():
        default = linear.mma_tiles(m)
        variants = [(t, linear.GEMM_TERMS, True) for t in candidates]
        variants += [(default, 1, True), (default, 3, True), (default, linear.GEMM_TERMS, False)]
        for tiles, terms, chunked in variants:
            rows.append(gemm_mma_row(m, tiles, terms, chunked, tiles == default))
    table("GEMM on tensor cores (bf16 mma.sync), TinyLlama's matrices: TFLOP/s", rows,
          ["M", "tiles", "terms", "chunked", "default", "qkv_TFLOPs", "o_TFLOPs", "gate_up_TFLOPs", "down_TFLOPs",
           "all_TFLOPs", "all_us", "regs", "local_bytes", "error"])


def gemm_mma_row(m, tiles, terms, chunked, is_default):
    from numbattn.kernels.gemm_mma import make_gemm_mma
    return dict(M=m, tiles=f"{tiles.bm}x{tiles.bn}x{tiles.bk} w{tiles.wm}x{tiles.wn}x{tiles.wk}", terms=terms,
                chunked=chunked, default=is_default, **time_matrices(
                    m, lambda kind, epi, n: (make_gemm_mma(epi, tiles, terms, chunked), linear.gemm_grid(m, n, tiles),
                                             tiles.threads)))


def time_matrices(m, plan):
    """GPU time of a GEMM of m tokens on each of TinyLlama's four matrices; plan(kind, epilogue, n_rows) ->
    (kernel, grid, threads). -> {matrix_TFLOPs, all_TFLOPs, all_us, regs, local_bytes} (or {error})."""
    row, flops, ms_all = {}, 0.0, 0.0
    try:
        for name in ("qkv", "o", "gate_up", "down"):
            n, k, epi = SHAPES[name]
            w, kind = weights(n, k)
            x = cuda.to_device(np.random.default_rng(2).standard_normal((m, k), dtype=np.float32))
            out = cuda.device_array((m, linear.out_features(n, epi)), np.float32)
            kern, grid, threads = plan(kind, epi, n)
            ms = gpu_ms(Launch(kern, grid, threads, (x, w, out)), 20)
            row[f"{name}_TFLOPs"] = 2 * m * n * k / ms / 1e9
            flops += 2 * m * n * k
            ms_all += ms
        one = lambda d: list(d.values())[0]  # noqa: E731
        row.update(all_TFLOPs=flops / ms_all / 1e9, all_us=ms_all * 1e3, regs=one(kern.get_regs_per_thread()),
                   local_bytes=one(kern.get_local_mem_per_thread()))
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:80]
    return row


def section_decode():
    rows = bench.bench_decode((512, 8192, 32768), dtypes=("float16", "float32"), repeat=100, reference_max_n=0)
    rows += bench.bench_decode((131072,), dtypes=("float16",), repeat=50, reference_max_n=0)
    table("decode through the public API (ms; sync_ms = with a synchronize per call)", rows,
          ["n", "cache", "impl", "ms", "sync_ms", "host_ms", "gpu_ms", "gbps"])
    section_decode_shapes()


def section_decode_shapes():
    """Launch-shape sweep of decode v1 (4 dims per lane) and v2 (one warp per lane group; and the V rows it loads at
    once) at 512 to 131072 tokens, fp16 cache: GPU time, error vs v0."""
    from numbattn import KVCache
    sweep, defaults = [], (decode.BLOCKS_PER_SM, decode_lanes.V_CHUNK)
    shapes = [("v1", threads, 4, ku, mb, bps, None) for threads in (128, 256) for ku in (1, 2, 4)
              for mb in (0, 512 // threads) for bps in (1, 2, 4)]
    shapes += [("v2", threads, 2, 1, mb, bps, vch) for vch in (8, 16) for threads in (128, 256)
               for mb in (0, 512 // threads) for bps in (1, 2)]
    points = []
    for n in (512, 8192, 32768, 131072):
        rng = np.random.default_rng(n)
        cache = KVCache(1, 1, 4, n, 64, dtype=np.float16, backend="cuda")
        cache.append(0, *(rng.standard_normal((1, 4, n, 64), dtype=np.float32).astype(np.float16) for _ in range(2)))
        q = cuda.to_device(rng.standard_normal((1, 32, 64), dtype=np.float32))
        points.append((n, cache, q, decode.decode_attention(q, cache, 0, version="v0").copy_to_host()))
    for version, threads, dpl, ku, mb, bps, vch in shapes:
        decode.BLOCKS_PER_SM = bps
        if (vch or defaults[1]) != decode_lanes.V_CHUNK:
            decode_lanes.V_CHUNK = vch or defaults[1]
            decode_lanes.make_decode_v2.cache_clear()   # the chunk sizes are read when a kernel is made
        cfg = decode.Config(None, threads, dpl, ku, mb)
        for n, cache, q, expect in points:
            cache.decode_workspace().calls.clear()      # prepared launches hold the kernel made before
            row = dict(n=n, version=version, threads=threads, keys_per_step=ku, min_blocks_per_sm=mb,
                       blocks_per_sm=bps, v_chunk=vch)
            try:
                got = decode.decode_attention(q, cache, 0, config=cfg, version=version).copy_to_host()
                ms = gpu_ms(lambda: decode.decode_attention(q, cache, 0, config=cfg, version=version), 100)
                split, n_splits = decode.plan(1, 4, n, cfg)
                row.update(split=split, blocks=n_splits * 4, gpu_us=ms * 1e3, GBps=2 * 4 * n * 64 * 2 / ms / 1e6,
                           max_err=float(np.abs(got - expect).max()))
            except Exception as e:
                row.update(error=str(e)[:60])
            sweep.append(row)
    decode.BLOCKS_PER_SM, decode_lanes.V_CHUNK = defaults
    decode_lanes.make_decode_v2.cache_clear()
    table("decode v1 and v2 launch shapes, fp16 cache (GPU time)", sweep,
          ["n", "version", "threads", "keys_per_step", "min_blocks_per_sm", "blocks_per_sm", "v_chunk", "split",
           "blocks", "gpu_us", "GBps", "max_err", "error"])


def section_engine():
    import tempfile

    from tinyllm import load_model, make_tiny
    t0 = time.time()
    d = make_tiny(os.path.join(tempfile.mkdtemp(), "tinyllama-random"), seed=0, hidden_size=2048,
                  intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                  vocab_size=32000, max_position_embeddings=2048)
    print(f"[checkpoint written in {time.time() - t0:.0f} s]", flush=True)
    t0 = time.time()
    m = load_model(str(d), backend="cuda")
    print(f"[device engine loaded in {time.time() - t0:.1f} s: {m.describe()}]", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for chunk in (512, 2048):
        for n in (128, 512, 2048):
            ids = rng.integers(3, 32000, (1, n))
            times = []
            for _ in range(3):
                m.reset()
                t0 = time.perf_counter()
                for s in range(0, n, chunk):
                    m.forward(ids[:, s:s + chunk], start_pos=s, last_only=True)
                times.append(time.perf_counter() - t0)
            rows.append(dict(what=f"prefill {n} (chunks of {chunk})", ms=min(times) * 1e3, tok_s=n / min(times)))
    for n in (16, 512):
        prompt = rng.integers(3, 32000, n).tolist()
        m.reset()
        r = m.generate(prompt, max_new_tokens=129)
        rows.append(dict(what=f"decode after {n}", ms=r.stats.decode_seconds / r.stats.decode_tokens * 1e3,
                         tok_s=r.stats.decode_tokens_per_s))
    table("device engine, TinyLlama shapes (random weights)", rows, ["what", "ms", "tok_s"])
    # one decode step: host time of the replay call, GPU time of the graph, launches without the graph
    ops = m.ops
    graph = next(iter(ops._graphs.values()))
    host = host_us(graph.replay, 200)
    gpu = gpu_ms(graph.replay, 200)
    import numbattn.launch as L
    calls = [0]
    real_call = L.Launch.__call__

    def counting(self, grid=None):
        calls[0] += 1
        return real_call(self, grid)
    L.Launch.__call__ = counting
    ops.use_graphs = False
    pos = m.n_cached
    t0 = time.perf_counter()
    m.forward(np.array([[5]]), start_pos=pos, last_only=True)
    no_graph_ms = (time.perf_counter() - t0) * 1e3
    L.Launch.__call__ = real_call
    ops.use_graphs = True
    step = [dict(launches_per_token=calls[0], graph_replay_host_us=host, graph_gpu_us=gpu * 1e3,
                 step_without_graph_ms=no_graph_ms, weights_GB=m.weights.nbytes / 1e9)]
    table("one decode step", step, list(step[0]))
    # memory over 1000 decode steps
    ctx = cuda.current_context()
    m.reset()
    m.generate(rng.integers(3, 32000, 8).tolist(), max_new_tokens=4)
    free0 = ctx.get_memory_info().free
    m.reset()
    r = m.generate(rng.integers(3, 32000, 8).tolist(), max_new_tokens=1000)
    free1 = ctx.get_memory_info().free
    mem = [dict(steps=r.stats.decode_tokens, free_before_MB=free0 / 1e6, free_after_MB=free1 / 1e6,
                growth_MB=(free0 - free1) / 1e6, tok_s=r.stats.decode_tokens_per_s)]
    table("device memory over 1000 decode steps", mem, list(mem[0]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tune-out")
    ap.add_argument("--sections", default="launch,gemv,gemm,decode,engine")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in args.sections.split(","):
        t0 = time.time()
        try:
            globals()[f"section_{name}"]()
        except Exception as e:
            import traceback
            traceback.print_exc()
            RESULTS[f"{name} error"] = repr(e)
        print(f"[{name}: {time.time() - t0:.0f} s]", flush=True)
        with open(os.path.join(args.out, "tune.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)



def section_profile_engine():
    """Where a 512-token prefill of the device engine spends its time: GPU (events) vs host (cProfile)."""
    import cProfile
    import pstats
    import tempfile

    from tinyllm import load_model, make_tiny
    d = make_tiny(os.path.join(tempfile.mkdtemp(), "wide4"), seed=0, hidden_size=2048, intermediate_size=5632,
                  num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                  max_position_embeddings=4096)
    m = load_model(str(d), backend="cuda")
    ids = np.random.default_rng(0).integers(3, 32000, (1, 512))
    for _ in range(2):
        m.reset()
        m.forward(ids, last_only=True)
    m.reset()
    cuda.synchronize()
    start, end = cuda.event(), cuda.event()
    t0 = time.perf_counter()
    start.record()
    m.forward(ids, last_only=True)
    end.record()
    end.synchronize()
    rows = [dict(layers=4, host_ms=(time.perf_counter() - t0) * 1e3, events_ms=cuda.event_elapsed_time(start, end))]
    m.reset()
    prof = cProfile.Profile()
    prof.enable()
    m.forward(ids, last_only=True)
    prof.disable()
    table("prefill 512, 4 layers at TinyLlama width", rows, list(rows[0]))
    pstats.Stats(prof).sort_stats("cumtime").print_stats(25)


if __name__ == "__main__":
    main()
