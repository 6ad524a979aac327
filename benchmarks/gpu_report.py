"""The GPU report: every kernel timed next to torch SDPA in one run, tables printed and written, one plot each.

    python benchmarks/gpu_report.py --out bench-out            # everything (about 5 minutes on an H100)
    python benchmarks/gpu_report.py --out bench-out --sections prefill_sweep,tiles
    python benchmarks/gpu_report.py --out plots --replot bench-out/rows.json   # redraw plots, no GPU needed

Needs a CUDA GPU (numba-cuda) and, for the comparisons, torch. Writes <out>/report.md (the tables that go into
BENCHMARKS.md), <out>/*.png (one plot per table) and <out>/rows.json (every measurement).
"""
import argparse
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# A kernel that fails must stop the report, not fall back to NumPy and be timed (or checked) in its place.
os.environ.setdefault("NUMBATTN_STRICT", "1")

from numbattn import prefill  # noqa: E402
from numbattn.lab import bench  # noqa: E402
from numbattn.prefill import Tiles  # noqa: E402

SECTIONS = {}


def section(fn):
    SECTIONS[fn.__name__] = fn
    return fn


def emit(report, title, rows, columns, note=""):
    text = f"\n### {title}\n\n{note}\n\n{bench.format_table(rows, columns)}\n" if rows else f"\n### {title}\n\n(no rows)\n"
    print(text, flush=True)
    report.append(text)


@section
def prefill_sweep(report, out, args):
    """Causal and non-causal prefill at TinyLlama's head shape, every implementation side by side; each time by
    CUDA events around the call (ms) and with a synchronize per call on the host clock (sync_ms)."""
    rows = []
    for b in args.batches:
        lens = [n for n in args.seq_lens if b * n <= 16 * 2048 or n <= 1024 or b == 1]
        rows += bench.bench_prefill(lens, batches=(b,), causal=(True, False), versions=args.prefill_versions,
                                    reference_max_n=0, repeat=args.repeat, methods=("ms", "sync_ms"))
    for causal in (True, False):
        sub = [r for r in rows if r["causal"] == causal]
        for value, unit in (("ms", "milliseconds (events)"), ("sync_ms", "milliseconds (sync per call)"),
                            ("tflops", "TFLOP/s")):
            table, cols = bench.pivot(sub, ("batch", "n"), value)
            if value in ("ms", "sync_ms"):     # speed relative to torch's fp32 kernel: > 1 is faster
                for ver in ("v2", "v3"):
                    ratio = f"{ver} / mem-efficient"
                    for r in table:
                        if r.get(f"numbattn {ver}") and r.get("torch SDPA mem-efficient fp32"):
                            r[ratio] = r["torch SDPA mem-efficient fp32"] / r[f"numbattn {ver}"]
                    if any(ratio in r for r in table):
                        cols = cols + [ratio]
            emit(report, f"Prefill, {'causal' if causal else 'non-causal'}: {unit} (32 q / 4 kv heads, d 64)",
                 table, cols)
    return rows


@section
def head_dims(report, out, args):
    """Causal prefill at n = 4096 for head_dim 64, 128 and 256 (32 q / 4 kv heads), v3 next to torch SDPA's
    memory-efficient fp32 kernel in the same run (the target: >= 1.0x at 128 and 256, as at 64)."""
    rows = bench.bench_head_dims(args.head_dims, n=4096, causal=True, versions=("v3",), repeat=args.repeat)
    for value, unit in (("sync_ms", "milliseconds (sync per call)"), ("ms", "milliseconds (events)"),
                        ("tflops", "TFLOP/s")):
        table, cols = bench.pivot(rows, ("head_dim", "n"), value)
        if value != "tflops":
            for r in table:
                if r.get("numbattn v3") and r.get("torch SDPA mem-efficient fp32"):
                    r["v3 / mem-efficient"] = r["torch SDPA mem-efficient fp32"] / r["numbattn v3"]
            cols = cols + ["v3 / mem-efficient"]
        emit(report, f"Prefill by head_dim, causal n = 4096, batch 1, 32 q / 4 kv heads: {unit}", table, cols,
             "v3's tiles per head_dim: numbattn.prefill.GPU_TILES (at 128 and 256 each head's dims split over 2 and "
             "4 warps); `tiles --tile-versions v3` sweeps the alternatives.")
    return rows


@section
def windows(report, out, args):
    """Sliding windows: prefill at n = 32768 with window 4096 against full causal at 4096 (TFLOP/s over the pairs
    each computes; target >= 0.8x), and against SDPA with the window as an explicit mask; decode at 131072 cached
    tokens with window 4096 (a ring-buffer layer, and a full layer with window=) against decode at 4096 tokens
    (target: within 1.2x), and SDPA on the same step."""
    rows = bench.bench_window_prefill(n=args.window_n, window=args.window, full_n=4096, repeat=args.repeat)
    emit(report, f"Sliding-window prefill, n = {args.window_n}, window {args.window}, batch 1, 32 q / 4 kv heads, d 64",
         rows, ["impl", "n", "window", "ms", "sync_ms", "tflops"],
         "tflops counts only the (query, key) pairs each run must compute: sum over queries of min(p + 1, window) "
         "for the window, n (n + 1) / 2 for full causal. SDPA computes all n^2 pairs and masks (it has no window).")
    drows = []
    for dt in ("float16", "float32"):
        drows += bench.bench_window_decode(cache_len=args.max_cache, window=args.window, full_len=4096, dtype=dt,
                                           repeat=args.repeat * 5)
    emit(report, f"Sliding-window decode, {args.max_cache} cached tokens, window {args.window}, batch 1, 32 q / 4 kv "
         "heads, d 64", drows, ["impl", "cache", "n", "window", "sync_ms", "gpu_ms", "kv_MB"],
         "sync_ms: a call and a synchronize (what a decode loop pays); gpu_ms: the GPU's own time. The ring layer "
         "holds window + 4096 slots; kv_MB: the K/V bytes the step must read.")
    return rows + drows


@section
def call_overhead(report, out, args):
    """The host cost of one numbattn.attention() call on device arrays at chat-prompt sizes (and torch's)."""
    from numba import cuda
    rows = []
    for n in (16, 128, 512, 1024):
        q, k, v = bench.random_qkv(1, n, n)
        dq, dk, dv = (cuda.to_device(x) for x in (q, k, v))
        out = cuda.device_array(q.shape, np.float32)
        impls = {f"numbattn.attention ({prefill.DEFAULT_VERSION})": lambda: prefill.flash_attention(dq, dk, dv,
                                                                                                    causal=True),
                 "numbattn flash_attention(out=)": lambda: prefill.flash_attention(dq, dk, dv, causal=True, out=out)}
        impls.update({k_: f for k_, f in bench.prefill_impls("cuda", (), q, k, v, True, False).items()
                      if "mem-efficient" in k_ or "flash" in k_})
        bench._time_impls(impls, "cuda", args.repeat, rows, lambda ms: {}, methods=("host_ms", "sync_ms", "gpu_ms"),
                          n=n)
    emit(report, "Per-call cost of causal attention on device arrays, batch 1, 32/4 heads, d 64", rows,
         ["n", "impl", "host_ms", "sync_ms", "gpu_ms"],
         "host_ms: the call alone (launch); sync_ms: the call and a synchronize; gpu_ms: CUDA events with the GPU "
         "kept busy while the host launches (the GPU's own time).")
    return rows


@section
def tiles(report, out, args):
    """Launch-configuration sweep of v2, v3 (and v1) at n = 4096 causal: time, registers, spills, shared memory."""
    from numba import cuda
    v2_64 = [Tiles(64, 32, 128), Tiles(64, 32, 64), Tiles(32, 32, 64), Tiles(64, 16, 128), Tiles(32, 32, 128),
             Tiles(64, 32, 256), Tiles(64, 16, 64), Tiles(32, 16, 64),
             # above 48 KB of static shared memory: Numba/ptxas on sm_90 accept these and they launch
             Tiles(64, 64, 128), Tiles(128, 32, 128), Tiles(128, 32, 256), Tiles(128, 64, 256),
             Tiles(128, 64, 128), Tiles(128, 32, 512), Tiles(256, 32, 512), Tiles(256, 32, 256),
             Tiles(128, 16, 256)]
    v2_128 = [Tiles(32, 16, 64), Tiles(64, 16, 128), Tiles(64, 32, 128), Tiles(128, 16, 256), Tiles(128, 32, 256),
              Tiles(64, 32, 256)]
    configs = [("v1", 64, Tiles(64, 64, 64)), ("v1", 64, Tiles(128, 32, 128))]
    configs += [("v2", 64, t) for t in v2_64] + [("v2", 128, t) for t in v2_128]
    # v3: 16 query rows per warp (block_m = 16 x warps)
    v3_64 = [Tiles(128, 32, 256), Tiles(128, 16, 256), Tiles(64, 16, 128), Tiles(64, 32, 128), Tiles(128, 64, 256)]
    v3_128 = [Tiles(128, 8, 256), Tiles(64, 8, 128), Tiles(128, 16, 256), Tiles(64, 16, 128),
              Tiles(64, 16, 256, 2), Tiles(64, 8, 256, 2), Tiles(64, 32, 256, 2), Tiles(32, 16, 128, 2)]
    v3_256 = [Tiles(32, 8, 256, 4), Tiles(32, 16, 256, 4), Tiles(32, 32, 256, 4), Tiles(64, 16, 256, 2),
              Tiles(16, 8, 128, 4)]
    configs += [("v3", 64, t) for t in v3_64] + [("v3", 128, t) for t in v3_128] + [("v3", 256, t) for t in v3_256]
    if args.tile_versions:
        configs = [c for c in configs if c[0] in args.tile_versions]
    rows = []
    for ver, d, t in configs:
        name = f"{ver} d{d} {t.block_m}x{t.block_n}/{t.threads}thr" + (f" split{t.dim_split}" if t.dim_split > 1 else "")
        try:
            q, k, v = bench.random_qkv(1, 4096, 4096, head_dim=d)
            dq, dk, dv = (cuda.to_device(x) for x in (q, k, v))
            o = cuda.device_array(q.shape, np.float32)
            flops = bench.attention_flops(1, 32, 4096, 4096, d, True)
            ms = bench.timed(lambda: prefill.launch(dq, dk, dv, o, True, d ** -0.5, ver, t), "cuda",
                             repeat=args.repeat)
            ref = prefill.flash_attention(q[:, :, -256:], k, v, causal=True, version="v1", backend="cuda")
            kern = prefill.make_kernel(ver, d, t)
            one = lambda x: list(x.values())[0]  # per-signature dicts; the sweep compiled one signature
            rows.append(dict(impl=name, ms=ms, tflops=flops / ms / 1e9, regs=one(kern.get_regs_per_thread()),
                             local_bytes=one(kern.get_local_mem_per_thread()),
                             smem_bytes=one(kern.get_shared_mem_per_block()),
                             err_vs_v1=float(np.abs(o.copy_to_host()[:, :, -256:] - ref).max())))
        except Exception as e:
            rows.append(dict(impl=name, ms=float("nan"), error=f"{type(e).__name__}: {e}"[:100]))
    emit(report, "Tile sweep, causal prefill n = 4096, batch 1, 32 q / 4 kv heads", rows,
         ["impl", "ms", "tflops", "regs", "local_bytes", "smem_bytes", "err_vs_v1", "error"],
         "err_vs_v1: max |difference| from the v1 kernel over the last 256 query rows (a cheap sanity check "
         "that a launch shape is correct, not only fast).")
    return rows


@section
def accuracy(report, out, args):
    """Max relative error of each kernel against an fp64 reference (torch float64 on the GPU) at n = 4096."""
    import torch
    q, k, v = bench.random_qkv(1, 4096, 4096)
    t = [torch.from_numpy(x).cuda().double() for x in (q, k, v)]
    rows = []
    for causal in (True, False):
        ref = torch.nn.functional.scaled_dot_product_attention(*t, is_causal=causal, enable_gqa=True).cpu().numpy()
        for ver in ("v1", "v2", "v3"):
            got = prefill.flash_attention(q, k, v, causal=causal, version=ver, backend="cuda")
            rows.append(dict(impl=f"numbattn {ver}", causal=causal,
                             max_rel_err=float(np.abs(got - ref).max() / np.abs(ref).max())))
    import numbattn
    from numbattn import reference
    qd = q[:, :, -1]                                            # one decode step: the last query token
    for dt in (np.float32, np.float16):
        cache = numbattn.KVCache(1, 1, 4, 4096, 64, dtype=dt, backend="cuda")
        cache.append(0, k, v)                                   # the append kernel, then decode over it
        kept_k, kept_v = cache.k(0).copy_to_host(), cache.v(0).copy_to_host()
        assert (kept_k == k.astype(dt)).all() and (kept_v == v.astype(dt)).all(), "append changed a value"
        got = numbattn.decode_attention(qd, cache, 0)
        # the reference sees the same rounded cache values (fp16 storage), computed in fp64
        want = reference.decode_attention(qd.astype(np.float64), kept_k.astype(np.float64),
                                          kept_v.astype(np.float64), np.array([4096]))
        rows.append(dict(impl=f"numbattn decode ({np.dtype(dt).name} cache)", causal="-",
                         max_rel_err=float(np.abs(got - want).max() / np.abs(want).max())))
    emit(report, "Accuracy at n = 4096 (batch 1, 32/4 heads, d 64) vs fp64", rows, ["impl", "causal", "max_rel_err"],
         "prefill: against torch's float64 SDPA on the GPU; decode: one query token over a cache filled by the "
         "append kernel (checked bit-exact), against numbattn.reference in float64 on the same stored values.")
    return rows


@section
def memory(report, out, args):
    """Device memory the attention call needs at n = 8192, against the size of Q, K, V and O themselves."""
    from numba import cuda
    import torch
    n = 8192
    q, k, v = bench.random_qkv(1, n, n)
    ctx = cuda.current_context()
    dq, dk, dv = (cuda.to_device(x) for x in (q, k, v))
    cuda.synchronize()
    free0 = ctx.get_memory_info().free
    o = prefill.flash_attention(dq, dk, dv, causal=True, backend="cuda")
    cuda.synchronize()
    free1 = ctx.get_memory_info().free
    qkvo = q.nbytes + k.nbytes + v.nbytes + q.nbytes
    rows = [dict(impl=f"numbattn {prefill.DEFAULT_VERSION}", extra_MiB=(free0 - free1) / 2**20, qkvo_MiB=qkvo / 2**20,
                 nxn_fp32_MiB=32 * n * n * 4 / 2**20)]
    del o
    t = [torch.from_numpy(x).cuda().repeat_interleave(8 if i else 1, dim=1) for i, x in enumerate((q, k, v))]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for label, sdp in (("torch SDPA mem-efficient fp32", SDPBackend.EFFICIENT_ATTENTION),
                       ("torch SDPA math fp32", SDPBackend.MATH)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            with sdpa_kernel(sdp):
                r = torch.nn.functional.scaled_dot_product_attention(*t, is_causal=True)
            torch.cuda.synchronize()
            rows.append(dict(impl=label, extra_MiB=(torch.cuda.max_memory_allocated() - base) / 2**20,
                             qkvo_MiB=qkvo / 2**20, nxn_fp32_MiB=32 * n * n * 4 / 2**20))
            del r
        except Exception as e:
            rows.append(dict(impl=label, error=str(e)[:80]))
    emit(report, "Device memory for one causal prefill at n = 8192 (batch 1, 32/4 heads, d 64)", rows,
         ["impl", "extra_MiB", "qkvo_MiB", "nxn_fp32_MiB", "error"],
         "extra_MiB: device memory the call allocated beyond its inputs (numbattn: free memory before/after, "
         "output included; torch: peak allocated minus allocated before). nxn_fp32_MiB: what the fp32 score "
         "matrices of all 32 heads would take.")
    return rows


@section
def backward(report, out, args):
    """The attention backward (dQ, dK, dV) at n = 4096 and 8192, causal and not, next to torch SDPA's memory-efficient
    fp32 backward in the same run; the device memory each needs beyond its inputs; each gradient's error vs fp64."""
    from numba import cuda
    import torch
    rows = bench.bench_backward((4096, 8192), versions=args.backward_versions, repeat=args.repeat)
    for causal in (True, False):
        table, cols = bench.pivot([r for r in rows if r["causal"] == causal], ("n",), "ms")
        for ver in args.backward_versions:
            for r in table:
                if r.get(f"numbattn {ver}") and r.get("torch SDPA mem-efficient fp32"):
                    r[f"{ver} / mem-efficient"] = r["torch SDPA mem-efficient fp32"] / r[f"numbattn {ver}"]
        cols += [c for c in (f"{v} / mem-efficient" for v in args.backward_versions) if any(c in r for r in table)]
        emit(report, f"Attention backward, {'causal' if causal else 'non-causal'}: milliseconds (events), batch 1, "
                     f"32 q / 4 kv heads, d 64", table, cols, "ratio > 1: numbattn is faster. FLOPs counted as 2.5x "
                     "the forward's; TFLOP/s in rows.json.")
    n = 8192
    q, k, v = bench.random_qkv(1, n, n)
    dout = np.random.default_rng(1).standard_normal(q.shape, dtype=np.float32)
    dev = [cuda.to_device(x) for x in (q, k, v, dout)]
    o, lse = prefill.flash_attention(dev[0], dev[1], dev[2], causal=True, backend="cuda", return_lse=True)
    cuda.synchronize()
    ctx = cuda.current_context()
    free0 = ctx.get_memory_info().free
    grads = numbattn_backward(dev, o, lse)
    cuda.synchronize()
    inputs = 3 * q.nbytes + 2 * k.nbytes + lse.nbytes     # q, out, dout; k, v; lse
    mem = [dict(impl="numbattn v3", extra_MiB=(ctx.get_memory_info().free - free0) / -2**20,
                grads_MiB=(q.nbytes + 2 * k.nbytes) / 2**20, inputs_MiB=inputs / 2**20)]
    del grads
    fn = bench._torch_backward(torch, q, k, v, dout, True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    g = fn()
    torch.cuda.synchronize()
    mem.append(dict(impl="torch SDPA mem-efficient fp32", extra_MiB=(torch.cuda.max_memory_allocated() - base) / 2**20,
                    grads_MiB=(q.nbytes + 2 * k.nbytes) / 2**20, inputs_MiB=inputs / 2**20))
    del g, fn
    emit(report, f"Device memory of one causal backward at n = {n}", mem, ["impl", "extra_MiB", "grads_MiB", "inputs_MiB"],
         "extra_MiB: memory the backward call took beyond its inputs (numbattn: free memory before/after, its gradients "
         "and D included; torch: peak allocated minus allocated before, the graph's saved tensors not counted). The "
         "fp32 score matrices of 32 heads would be 8192 MiB.")
    acc = [r for n_ in (4096,) for c in (True, False) for r in bench.backward_accuracy(n_, c, args.backward_versions)]
    emit(report, "Attention backward: max |error| / max |fp64| per gradient (n = 4096)", acc,
         ["impl", "n", "causal", "err_dq", "err_dk", "err_dv"], "fp64: torch's math backward in float64 on the GPU.")
    return rows + mem + acc


@section
def backward_tiles(report, out, args):
    """The backward v3's launch shapes at n = 4096 causal (its GPU tiles were chosen by ptxas's registers only)."""
    from numba import cuda
    from numbattn import backward as bwd
    from numbattn.kernels import backward_mma
    n = 4096
    q, k, v = bench.random_qkv(1, n, n)
    dout = np.random.default_rng(1).standard_normal(q.shape, dtype=np.float32)
    dev = [cuda.to_device(x) for x in (q, k, v, dout)]
    o, lse = prefill.flash_attention(dev[0], dev[1], dev[2], causal=True, backend="cuda", return_lse=True)
    grads = tuple(cuda.device_array(x.shape, np.float32) for x in (q, k, v))
    rows = []
    for a, c in (((16, 64, 128), (64, 16, 128)), ((32, 32, 64), (32, 32, 64)), ((16, 32, 64), (32, 16, 64)),
                 ((32, 64, 128), (64, 32, 128)), ((16, 128, 256), (128, 16, 256)), ((8, 64, 128), (64, 8, 128))):
        tiles = bwd.BackwardTiles(Tiles(*a), Tiles(*c))
        smem = max(backward_mma.shared_bytes(a[1], a[0], 64), backward_mma.shared_bytes(c[0], c[1], 64))
        try:
            ms = bench.timed(lambda: bwd.launch(dev[0], dev[1], dev[2], o, lse, dev[3], grads, True, 0.125, "v3", tiles),
                             "cuda", repeat=args.repeat)
            rows.append(dict(dkdv=str(a), dq=str(c), smem_KB=smem / 1024, ms=ms,
                             tflops=2.5 * bench.attention_flops(1, 32, n, n, 64, True) / ms / 1e9))
        except Exception as e:
            rows.append(dict(dkdv=str(a), dq=str(c), smem_KB=smem / 1024, error=str(e)[:80]))
    emit(report, "Backward v3 launch shapes (n = 4096, causal, batch 1, 32/4 heads, d 64)", rows,
         ["dkdv", "dq", "smem_KB", "ms", "tflops", "error"], "Tiles(block_m, block_n, threads): dkdv owns block_n "
         "keys and streams query tiles of block_m rows; dq owns block_m rows and streams key tiles of block_n keys.")
    return rows


def numbattn_backward(dev, o, lse):
    from numbattn import backward as bwd
    return bwd.attention_backward(dev[0], dev[1], dev[2], o, lse, dev[3], causal=True, backend="cuda")


@section
def decode(report, out, args):
    """One decode step through numbattn.decode_attention(q_dev, cache, 0) over cache lengths 512..131072, next to
    torch SDPA, with the host and GPU time of a call apart."""
    lens = [n for n in (512, 2048, 8192, 32768, 131072) if n <= args.max_cache]
    rows = bench.bench_decode([n for n in lens if n <= 32768], dtypes=("float32", "float16"), repeat=args.repeat * 5,
                              reference_max_n=0)
    rows += bench.bench_decode([n for n in lens if n > 32768], dtypes=("float16",), repeat=args.repeat * 5,
                               reference_max_n=0)
    for value, unit in (("sync_ms", "milliseconds per call with a synchronize (what a decode loop pays)"),
                        ("host_ms", "host milliseconds per call (launch only)"),
                        ("gpu_ms", "GPU milliseconds per call"), ("ms", "milliseconds (events around the call)")):
        table, cols = bench.pivot(rows, ("batch", "n", "cache"), value)
        if value == "sync_ms":
            for r in table:
                for ver in ("v1", "v2"):
                    mine = r.get(f"numbattn decode {ver} {r['cache']}")
                    if mine and r.get("torch SDPA flash fp16"):
                        r[f"{ver} / SDPA flash"] = r["torch SDPA flash fp16"] / mine
            cols = cols + ["v1 / SDPA flash", "v2 / SDPA flash"]
        emit(report, f"Decode, batch 1, 32 q / 4 kv heads, d 64: {unit}", table, cols)
    return rows


@section
def append(report, out, args):
    """KV-cache append (K and V of one layer, one launch) for 1 token up to a whole prompt."""
    rows = bench.bench_append((1, 16, 512, 2048), batches=(1, 8), repeat=args.repeat * 5)
    emit(report, "KV append, one layer (K and V in one launch), TinyLlama's 4 KV heads, d 64", rows,
         ["batch", "n", "impl", "ms", "gbps", "frac_hbm"], "n = tokens appended per row; GB/s counts K and V "
         "read once and written once. A decode step of TinyLlama appends 1 token in each of 22 layers: 22 launches.")
    return rows


@section
def model(report, out, args):
    """End to end on a TinyLlama-shaped random checkpoint (22 layers, bf16, 4096 positions): tinyllm's device engine, its NumPy
    engine, and Hugging Face transformers (fp32 eager, fp16 sdpa) on the same weights, batch 1, greedy."""
    import tempfile

    import torch
    import transformers

    from tinyllm import load_model, make_tiny
    t0 = time.time()
    d = make_tiny(os.path.join(tempfile.mkdtemp(), "tinyllama-random"), seed=0, hidden_size=2048,
                  intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                  vocab_size=32000, max_position_embeddings=4096)     # 4096: room for a 2048-token prompt's reply
    print(f"[model: random TinyLlama-shaped checkpoint written in {time.time() - t0:.0f} s]", flush=True)
    rng = np.random.default_rng(0)
    prompts = {n: rng.integers(3, 32000, n).tolist() for n in args.prompts}
    rows = []

    def tinyllm_rows(engine, new):
        m = load_model(str(d), backend="cuda" if engine == "device" else "numpy")
        m.generate(prompts[args.prompts[0]][:16], max_new_tokens=4)              # compile (device), page weights in
        for n, prompt in prompts.items():
            best = None
            for _ in range(2 if engine == "device" else 1):
                m.reset()
                r = m.generate(prompt, max_new_tokens=new)
                best = r if best is None or r.stats.prefill_seconds < best.stats.prefill_seconds else best
            s_ = best.stats
            rows.append(dict(impl=f"tinyllm {engine} engine", prompt=n, prefill_ms=s_.prefill_seconds * 1e3,
                             decode_ms=s_.decode_seconds / s_.decode_tokens * 1e3, decode_tok_s=s_.decode_tokens_per_s))
        return m
    m = tinyllm_rows("device", args.new_tokens)
    step = engine_step(m)
    tinyllm_rows("numpy", 16)
    for label, dtype, attn in (("HF transformers fp32 eager", torch.float32, "eager"),
                               ("HF transformers fp16 sdpa", torch.float16, "sdpa")):
        hf = transformers.LlamaForCausalLM.from_pretrained(str(d), dtype=dtype, attn_implementation=attn).cuda().eval()
        for n, prompt in prompts.items():
            rows.append(dict(impl=label, prompt=n, **hf_generate_times(hf, prompt, args.new_tokens, warm=(2,))))
        del hf
        torch.cuda.empty_cache()
    hf32 = {r["prompt"]: r["decode_tok_s"] for r in rows if r["impl"] == "HF transformers fp32 eager"}
    for r in rows:
        r["x_HF_fp32_decode"] = r["decode_tok_s"] / hf32[r["prompt"]] if r["prompt"] in hf32 else None
    emit(report, "End to end, TinyLlama-1.1B shapes (22 layers, random bf16 weights), batch 1, greedy", rows,
         ["impl", "prompt", "prefill_ms", "decode_ms", "decode_tok_s", "x_HF_fp32_decode"],
         f"prefill_ms: the whole prompt and the first new token; decode_ms: each later token (of "
         f"{args.new_tokens}), i.e. at a context of prompt + ~{args.new_tokens // 2}. The NumPy engine runs every "
         f"matmul on the host ({os.cpu_count()} cores). HF: generate() with min = max new tokens.")
    emit(report, "One decode step of the device engine (TinyLlama shapes)", step, list(step[0]),
         "launches: kernel launches of one step run without the graph; replay_host_us: the host time of the "
         "CUDA-graph replay call; graph_gpu_us: GPU time of one replayed step; weights read per token: the bf16 "
         "weights once (the KV cache on top, in the engine's default fp16).")
    return rows + step


def hf_generate_times(hf, prompt, new_tokens, warm=()):
    """A transformers model's greedy generate() after `prompt`, timed with a synchronize: the prompt and one token
    (prefill_ms), then each later token of new_tokens (decode_ms, decode_tok_s). warm: lengths generated first
    (compilation, allocations) and not timed."""
    import torch
    ids = torch.tensor([prompt], device="cuda")

    def gen(k):
        torch.cuda.synchronize()
        t_ = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                        do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t_
    for k in warm:
        gen(k)
    t1, tn = gen(1), gen(new_tokens)
    return dict(prefill_ms=t1 * 1e3, decode_ms=(tn - t1) / (new_tokens - 1) * 1e3,
                decode_tok_s=(new_tokens - 1) / (tn - t1))


PHASES = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import tinyllm
from tinyllm import Llama, open_model_files, upload_weights
t1 = time.perf_counter()
files = open_model_files(sys.argv[1], download=False)
weights = upload_weights(files.checkpoint, files.config)
llm = Llama(files.config, weights, files.tokenizer, backend=sys.argv[2])
from numba import cuda
cuda.synchronize()
t2 = time.perf_counter()
loaded, compiled = llm.prepare_kernels()
t3 = time.perf_counter()
llm.generate([1] + list(range(100, 116)), max_new_tokens=16, stop_ids=())
t4 = time.perf_counter()
print(json.dumps(dict(import_s=t1 - t0, weights_s=t2 - t1, kernels_s=t3 - t2, kernels_compiled=compiled,
                      kernels_loaded=loaded, generate16_s=t4 - t3)))
"""

HF_COLD = """
import sys, time
import torch, transformers
hf = transformers.LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16,
                                                   attn_implementation="sdpa").cuda().eval()
ids = torch.tensor([[1] + list(range(100, 116))], device="cuda")
with torch.no_grad():
    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                pad_token_id=0)
torch.cuda.synchronize()
"""


@section
def end_to_end(report, out, args):
    """BENCHMARKS.md's end-to-end table: pp16, pp512, pp2048, tg128 (and tg128 after 512 tokens) for tinyllm and HF
    transformers (bf16, sdpa) on the same random TinyLlama-shaped checkpoint, and the cold start of a fresh
    process, first and second run (the second finds the compiled kernels on disk). --gguf PATH also writes the
    checkpoint as an F16 GGUF (vocabulary padded to 32000) for llama-bench: the llama.cpp column."""
    import tempfile

    from tinyllm import load_model
    d = tinyllama_checkpoint(tempfile.mkdtemp())
    pp = tuple(args.pp)
    rows = [dict(r, impl="tinyllm") for r in bench.pp_tg_tinyllm(load_model(str(d), backend="cuda"), pp,
                                                                 args.tg, repeat=args.e2e_repeat)]
    try:
        rows += [dict(r, impl="HF transformers") for r in bench.pp_tg_hf(d, pp, args.tg, repeat=args.e2e_repeat)]
    except ImportError as e:
        print(f"[end_to_end: no HF rows ({e})]", flush=True)
    table, cols = bench.pivot(rows, ("test",), "tokens_per_s")
    for r in table:
        if r.get("tinyllm") and r.get("HF transformers"):
            r["tinyllm / HF"] = r["tinyllm"] / r["HF transformers"]
    emit(report, "End to end, TinyLlama shapes (random bf16 weights), batch 1: tokens/s", table,
         cols + ["tinyllm / HF"] * any("tinyllm / HF" in r for r in table),
         "pp N: N prompt tokens from an empty cache to the last one's logits (synchronised); tg 128: 128 greedy "
         "tokens after a 1-token prompt (@ 512: after 512 tokens). tinyllm: the device engine (bf16 weights, fp16 "
         "KV cache, CUDA graphs); HF: transformers bf16 with sdpa attention, eager. Medians of "
         f"{args.e2e_repeat}. The llama.cpp column: llama-bench on the GGUF of the same weights (--gguf).")
    rows += cold_start_rows(report, d)
    if args.gguf:
        write_padded_gguf(args.gguf, d)
    return rows


def tinyllama_checkpoint(folder):
    """A random checkpoint with TinyLlama-1.1B's shapes and files (4096 positions: room for pp2048 and a reply)."""
    from tinyllm import make_tiny
    t0 = time.time()
    d = make_tiny(os.path.join(folder, "tinyllama-random"), seed=0, hidden_size=2048, intermediate_size=5632,
                  num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                  max_position_embeddings=4096)
    print(f"[random TinyLlama-shaped checkpoint written in {time.time() - t0:.0f} s]", flush=True)
    return d


def cold_start_rows(report, d):
    """Fresh processes, first and second run: `cli.py generate -n 16` (an empty kernel cache before the first),
    the same load and 16 tokens phase by phase, and HF transformers loading and generating 16 tokens."""
    import tempfile
    cache = {"NUMBATTN_KERNEL_CACHE": tempfile.mkdtemp(prefix="kernels-")}
    cli = [sys.executable, os.path.join(os.path.dirname(__file__), "..", "cli.py"), "generate", "Hello", "-m",
           str(d), "-n", "16", "--temp", "0"]
    rows = [dict(r, impl="tinyllm cli.py generate -n 16") for r in bench.cold_start(cli, cache)]
    phases = bench.cold_start([sys.executable, "-c", PHASES, str(d), "cuda"], cache)
    for r in phases:
        r.update(json.loads(r["stdout"].strip().splitlines()[-1]) if r["returncode"] == 0 else {})
        r["impl"] = "tinyllm phases (kernel cache warm)"
    rows += phases
    rows += [dict(r, impl="HF transformers load + 16 tokens") for r in bench.cold_start(
        [sys.executable, "-c", HF_COLD, str(d)])]
    emit(report, "Cold start: a fresh process, first and second run (seconds, wall clock)", rows,
         ["impl", "run", "seconds", "returncode", "import_s", "weights_s", "kernels_s", "kernels_compiled",
          "kernels_loaded", "generate16_s"],
         "tinyllm's first run compiles every kernel (the kernel cache starts empty) and keeps them on disk; the "
         "second loads them. The phases rows run after those (kernels on disk): import, weights read and uploaded, "
         "kernels loaded (or compiled), 16 tokens generated after a 17-token prompt.")
    return rows


def write_padded_gguf(path, d, qtype="F16"):
    """The checkpoint as a GGUF that llama.cpp loads (F16, or quantized: Q8_0, Q4_K_M...): its vocabulary (the
    miniature's tokens) padded with unused tokens to the model's 32000 rows, as llama.cpp sizes the embedding by
    the token list."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from gguf import TokenType

    from tests.gguf_files import write_gguf
    config = json.loads((d / "config.json").read_text())
    vocab = json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    pad = [f"<unused{i}>" for i in range(config["vocab_size"] - len(tokens))]
    merges = json.loads((d / "tokenizer.json").read_text())["model"]["merges"]
    score = {"".join(m.split(" ") if isinstance(m, str) else m): -float(r) for r, m in enumerate(merges)}
    types = [int(TokenType.CONTROL if t in ("<s>", "</s>") else TokenType.UNKNOWN if t == "<unk>" else
                 TokenType.BYTE if t.startswith("<0x") and len(t) == 6 else TokenType.NORMAL) for t in tokens]
    logging.getLogger("gguf.gguf_writer").setLevel(logging.ERROR)    # (it warns of each key it overwrites, in full)
    write_gguf(path, d, qtype=qtype, metadata={
        "tokenizer.ggml.tokens": tokens + pad,
        "tokenizer.ggml.scores": [score.get(t, -1e6) for t in tokens] + [-1e6] * len(pad),
        "tokenizer.ggml.token_type": types + [int(TokenType.UNUSED)] * len(pad)})
    print(f"[GGUF for llama-bench: {path}; e.g. llama-bench -m {path} -p 16,512,2048 -n 128 -fa 1 -ngl 99 -o md]",
          flush=True)
    return path


@section
def quantized(report, out, args):
    """GGUF blocks kept as stored on the GPU (issue 28): TinyLlama's shapes (random weights) written as llama.cpp would
    write them as Q8_0 and Q4_K_M (tests/gguf_files.py, vocabulary padded to 32000), loaded by the device engine as
    stored, and the same weights as bf16 safetensors: pp and tg as llama-bench reports them, device memory used
    against the file plus the KV cache, and the prompt's last logits against the NumPy engine on the same file
    (fp32, its reference arithmetic) and against the bf16 checkpoint (the quantization's own error). --gguf-dir
    keeps the files for llama-bench (the llama.cpp column)."""
    import gc
    import tempfile

    from numba import cuda

    from tinyllm import load_model
    folder = args.gguf_dir or tempfile.mkdtemp()
    os.makedirs(folder, exist_ok=True)
    d = tinyllama_checkpoint(tempfile.mkdtemp())
    prompt = np.random.default_rng(0).integers(3, 32000, (1, 64))
    bf16_logits = None
    rows = []
    for qtype in ("bf16 safetensors", "Q8_0", "Q4_K_M"):
        path = d if qtype.startswith("bf16") else write_padded_gguf(os.path.join(folder, f"tinyllama.{qtype}.gguf"),
                                                                    d, qtype)
        size = sum(f.stat().st_size for f in d.glob("*.safetensors")) if qtype.startswith("bf16") else \
            os.path.getsize(path)
        ctx = cuda.current_context()
        gc.collect()
        ctx.deallocations.clear()                   # the previous model's memory really freed before measuring
        free0 = ctx.get_memory_info().free
        m = load_model(str(path), backend="cuda")
        used = free0 - ctx.get_memory_info().free
        logits = np.array(m.forward(prompt, last_only=True))     # (a copy: the engine's host buffer is reused)
        row = dict(file=qtype, kinds="/".join(m.weights.kinds), file_GB=size / 1e9, weights_GB=m.weights.nbytes / 1e9,
                   token_GB=m.weights.token_bytes / 1e9, cache_GB=m.cache.nbytes / 1e9, used_GB=used / 1e9,
                   used_over_file_cache=used / (size + m.cache.nbytes))
        row |= {r["test"]: r["tokens_per_s"] for r in bench.pp_tg_tinyllm(m, tuple(args.pp), args.tg, depths=(1,),
                                                                            repeat=args.e2e_repeat)}
        del m
        host = load_model(str(path), backend="numpy", weights="fp32", kv_dtype=np.float16)
        want = host.forward(prompt, last_only=True)
        del host
        row["err_vs_numpy"] = float(np.abs(logits - want).max() / np.abs(want).max())
        bf16_logits = want if bf16_logits is None else bf16_logits
        row["err_vs_bf16"] = float(np.abs(want - bf16_logits).max() / np.abs(bf16_logits).max())
        rows.append(row)
        print(row, flush=True)
    tests = [f"pp{n}" for n in args.pp] + [f"tg{args.tg}"]
    emit(report, "GGUF blocks on the GPU: TinyLlama shapes, random weights, batch 1 (tokens/s)", rows,
         ["file", "kinds", "file_GB", "weights_GB", "token_GB", "cache_GB", "used_GB", "used_over_file_cache"] + tests
         + ["err_vs_numpy", "err_vs_bf16"],
         "The device engine keeps each file's tensors as stored: bf16 words, or the GGUF blocks, dequantized inside "
         "the GEMVs and the tensor-core GEMMs (numbattn/blocks.py). used_GB: device memory taken by load_model (weights, "
         "KV cache, buffers); token_GB: weights read per decoded token. err_vs_numpy: the prompt's last logits against "
         "the NumPy engine on the same file in fp32 (what the kernels add); err_vs_bf16: that engine's against the bf16 "
         f"checkpoint's (what quantizing costs). Medians of {args.e2e_repeat}. llama.cpp: llama-bench -m FILE -p "
         f"{','.join(map(str, args.pp))} -n {args.tg} -fa 1 -ngl 99 on the files kept in --gguf-dir.")
    return rows


def engine_step(m):
    """Launches per token, host and GPU time of one step, and device memory over 1000 steps."""
    from numba import cuda

    import numbattn.launch as L
    ops = m.ops
    m.reset()
    m.generate(list(range(3, 515)), max_new_tokens=8)
    graph = next(iter(ops._graphs.values()))
    cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(100):
        graph.replay()
    host_us = (time.perf_counter() - t0) / 100 * 1e6
    cuda.synchronize()
    start, end = cuda.event(), cuda.event()
    start.record()
    for _ in range(100):
        graph.replay()
    end.record()
    end.synchronize()
    gpu_us = cuda.event_elapsed_time(start, end) / 100 * 1e3
    calls, real = [0], L.Launch.__call__
    L.Launch.__call__ = lambda self, grid=None: (calls.__setitem__(0, calls[0] + 1), real(self, grid))[1]
    ops.use_graphs = False
    m.reset()
    m.forward([[5] * 8])
    calls[0] = 0
    m.forward([[7]], start_pos=8, last_only=True)
    L.Launch.__call__, ops.use_graphs = real, True
    ctx = cuda.current_context()
    m.reset()
    m.generate(list(range(3, 11)), max_new_tokens=4)
    free0 = ctx.get_memory_info().free
    m.reset()
    r = m.generate(list(range(3, 11)), max_new_tokens=1000)
    free1 = ctx.get_memory_info().free
    cache_bytes = m.cache.nbytes
    return [dict(launches=calls[0], replay_host_us=host_us, graph_gpu_us=gpu_us, weights_GB=m.weights.nbytes / 1e9,
                 kv_cache_GB=cache_bytes / 1e9, steps=r.stats.decode_tokens,
                 free_memory_change_MB=(free0 - free1) / 1e6, tok_s_over_1000=r.stats.decode_tokens_per_s)]


@section
def linear_layers(report, out, args):
    """The device engine's matmul kernels at TinyLlama's matrices: GEMV GB/s (one token) and GEMM TFLOP/s."""
    from numba import cuda

    from numbattn import linear
    from tinyllm.weights import f32_to_bf16
    shapes = {"qkv": (2560, 2048, "none"), "o": (2048, 2048, "residual"), "gate_up": (11264, 2048, "swiglu"),
              "down": (2048, 5632, "residual"), "lm_head": (32000, 2048, "none")}
    rows = []
    for m_tokens in (1, 128, 512, 2048):
        for name, (n, k, epi) in shapes.items():
            if m_tokens > 1 and name == "lm_head":
                continue
            rng = np.random.default_rng(n + k)
            words, kind = linear.pack_weight(f32_to_bf16(rng.standard_normal((n, k), dtype=np.float32)))
            w = cuda.to_device(words)
            x = cuda.to_device(rng.standard_normal((m_tokens, k), dtype=np.float32))
            o = cuda.device_array((m_tokens, linear.out_features(n, epi)), np.float32)
            step = linear.linear_launch(x, w, kind, o, epi)
            ms = bench.measure(step, "cuda", 3, args.repeat, methods=("gpu_ms",))["gpu_ms"]
            rows.append(dict(tokens=m_tokens, matrix=name, shape=f"{n}x{k}", gpu_us=ms * 1e3,
                             GBps=n * k * 2 / ms / 1e6, TFLOPs=2 * m_tokens * n * k / ms / 1e9))
    emit(report, "Linear layers on bf16 weights (GEMV for 1 token, GEMM for more)", rows,
         ["tokens", "matrix", "shape", "gpu_us", "GBps", "TFLOPs"],
         "GB/s counts the bf16 weights read once; the GPU kept busy while the host launched (gpu_ms).")
    return rows


# The families at a real size (tinyllm/tiny.py's miniatures with these sizes: random weights, bf16), as their
# config.json has them: (family, overrides)
FAMILY_SHAPES = {
    "Llama-3.2-1B": ("llama3", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                    max_position_embeddings=131072, rms_norm_eps=1e-05, rope_theta=500000.0,
                                    rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192, "rope_type": "llama3"})),
    "Qwen2.5-0.5B": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=32768, sliding_window=32768, max_window_layers=24)),
    "Qwen3-0.6B": ("qwen3", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                 max_position_embeddings=40960, max_window_layers=28)),
    "Gemma-3-1B": ("gemma3", dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                                  vocab_size=262144, max_position_embeddings=32768, sliding_window=512,
                                  layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention"
                                               for i in range(26)])),
}


@section
def families(report, out, args):
    """Decode tokens/s per family at a real size (random bf16 weights), batch 1, greedy, after a prompt of
    args.prompts[0] tokens: tinyllm's device engine next to transformers in fp32 eager and in bf16 with a static
    cache and torch.compile (mode reduce-overhead: CUDA graphs), on the same weights."""
    import tempfile

    import torch
    import transformers

    from tinyllm import load_model, make_tiny
    n, new = args.prompts[0], args.new_tokens
    prompt = np.random.default_rng(0).integers(3, 512, n).tolist()
    rows = []
    for name, (family, shape) in FAMILY_SHAPES.items():
        d = make_tiny(os.path.join(tempfile.mkdtemp(), name), seed=0, family=family, **shape)
        try:
            m = load_model(str(d), backend="cuda", max_len=n + new + 8)
        except ValueError as e:                 # an engine that does not run this family yet says so
            rows.append(dict(model=name, impl="tinyllm device engine", note=str(e)[:120]))
        else:
            m.generate(prompt[:16], max_new_tokens=4)                            # compile the kernels
            m.reset()
            r = m.generate(prompt, max_new_tokens=new, stop_ids=())
            rows.append(dict(model=name, impl="tinyllm device engine", prefill_ms=r.stats.prefill_seconds * 1e3,
                             decode_ms=r.stats.decode_seconds / r.stats.decode_tokens * 1e3,
                             decode_tok_s=r.stats.decode_tokens_per_s))
            del m
        rows += hf_family_rows(name, d, prompt, new, torch, transformers)
    base = {(r["model"], r["impl"]): r.get("decode_tok_s") for r in rows}
    for r in rows:
        for key, impl in (("x_HF_fp32", "HF fp32 eager"), ("x_HF_compiled", "HF bf16 static compiled")):
            theirs = base.get((r["model"], impl))
            r[key] = r["decode_tok_s"] / theirs if r.get("decode_tok_s") and theirs else None
    emit(report, f"Families at a real size (random bf16 weights), batch 1, greedy, prompt {n}, {new} new tokens", rows,
         ["model", "impl", "prefill_ms", "decode_ms", "decode_tok_s", "x_HF_fp32", "x_HF_compiled", "note"],
         "HF bf16 static compiled: transformers with cache_implementation='static' and torch.compile(forward, "
         "mode='reduce-overhead'), warmed up at both lengths timed; decode_ms: each token after the first.")
    return rows


def hf_family_rows(name, d, prompt, new, torch, transformers):
    rows = []
    for impl, dtype, compiled in (("HF fp32 eager", torch.float32, False), ("HF bf16 static compiled", torch.bfloat16,
                                                                            True)):
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype, attn_implementation=(
            "sdpa" if compiled else "eager")).cuda().eval()
        if compiled:
            hf.generation_config.cache_implementation = "static"
            hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
        rows.append(dict(model=name, impl=impl, **hf_generate_times(hf, prompt, new, warm=(1, new) if compiled
                                                                    else (2,))))
        del hf
        torch.cuda.empty_cache()

@section
def serving(report, out, args):
    """`tinyllm serve` under load (tinyllm/server/loadgen.py): aggregate decode throughput and each request's token
    latency at 1, 8 and 32 concurrent streams, on a TinyLlama-shaped random checkpoint (or --serve-model), plus the
    same load against any other OpenAI-compatible server given by --other-server (llama.cpp's llama-server)."""
    import re
    import subprocess
    import tempfile

    from tinyllm import make_tiny
    from tinyllm.server.loadgen import COLUMNS, run_load
    model = args.serve_model or str(make_tiny(os.path.join(tempfile.mkdtemp(), "tinyllama-random"), seed=0,
                                              hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                              num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                              max_position_embeddings=2048))
    levels = [int(c) for c in args.serve_concurrency.split(",")]
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "..", "cli.py"), "serve", "-m",
                             model, "--port", "0", "--parallel", str(max(levels))], stderr=subprocess.PIPE, text=True)
    try:
        url = None
        while url is None:
            line = proc.stderr.readline()
            if not line:
                raise RuntimeError("tinyllm serve did not start")
            print(line, end="", flush=True)
            found = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
            url = found.group(1) if found else None
        load = dict(concurrencies=levels, requests=args.serve_requests, max_tokens=args.serve_tokens,
                    prompt_words=args.serve_prompt_words)
        rows = run_load(url, label="tinyllm serve", **load)
        for other in filter(None, args.other_server.split(",")):
            rows += run_load(other, label=other, **load)
    finally:
        proc.send_signal(2)
        proc.wait(30)
    emit(report, "Serving: continuous batching, TinyLlama shapes (random weights), streaming completions", rows,
         COLUMNS, f"Each of C clients sends {args.serve_requests} requests in turn: a {args.serve_prompt_words}-word "
         f"prompt, {args.serve_tokens} new tokens (greedy, ignore_eos). throughput: completion tokens / wall time; "
         f"token_ms: per request (last token - first) / (tokens - 1), median (p90 beside it); x_: against C = "
         f"{levels[0]}. Targets at C = 32: x_throughput >= 8, x_token_ms <= 2. Model: {model}.")
    return rows


def plot_all(all_rows, out):
    """One PNG per table, from the rows alone (so --replot can redraw a finished run without a GPU)."""
    path = lambda name: os.path.join(out, name + ".png")  # noqa: E731
    if "prefill_sweep" in all_rows:
        for causal, name in ((True, "causal"), (False, "non-causal")):
            rows = [r for r in all_rows["prefill_sweep"] if r["causal"] == causal and r["batch"] == 1]
            bench.plot(rows, path(f"prefill_{'causal' if causal else 'full'}"), y="ms",
                       title=f"prefill {name}, batch 1, 32/4 heads, d 64")
    if "tiles" in all_rows:
        rows = [r for r in all_rows["tiles"] if r.get("tflops")]
        bench.bars([r["impl"] for r in rows], [r["tflops"] for r in rows], path("tiles"), "TFLOP/s",
                   "launch shapes, causal prefill n = 4096, batch 1")
    if "accuracy" in all_rows:
        rows = all_rows["accuracy"]
        bench.bars([f"{r['impl']} causal={r['causal']}" for r in rows], [r["max_rel_err"] for r in rows],
                   path("accuracy"), "max relative error vs fp64", "accuracy at n = 4096", log=True)
    if "memory" in all_rows:
        rows = [r for r in all_rows["memory"] if "extra_MiB" in r]
        bench.bars([r["impl"] for r in rows] + ["(Q+K+V+O themselves)"],
                   [r["extra_MiB"] for r in rows] + [rows[0]["qkvo_MiB"]], path("memory"),
                   "MiB allocated by the call", "device memory, causal prefill n = 8192", log=True)
    if "decode" in all_rows:
        bench.plot(all_rows["decode"], path("decode"), y="ms", title="decode step, batch 1, 32/4 heads, d 64")
    if "append" in all_rows:
        bench.plot([r for r in all_rows["append"] if r["batch"] == 1], path("append"), y="ms",
                   title="KV append, one layer, batch 1, 4 kv heads, d 64 (n = tokens appended)")
    if "head_dims" in all_rows:
        rows = [r for r in all_rows["head_dims"] if r.get("tflops")]
        bench.bars([f"{r['impl']}, d {r['head_dim']}" for r in rows], [r["tflops"] for r in rows], path("head_dims"),
                   "TFLOP/s", "causal prefill n = 4096 by head_dim, batch 1, 32/4 heads")
    if "windows" in all_rows:
        rows = [r for r in all_rows["windows"] if r.get("what") == "window decode" and r.get("sync_ms")]
        bench.bars([f"{r['impl']} ({r['cache']})" for r in rows], [r["sync_ms"] * 1e3 for r in rows],
                   path("window_decode"), "us per call (sync)", "decode step, sliding window vs full")
    if "model" in all_rows:
        rows = [r for r in all_rows["model"] if r.get("decode_tok_s") and "impl" in r]
        bench.bars([f"{r['impl']}, prompt {r['prompt']}" for r in rows], [r["decode_tok_s"] for r in rows],
                   path("model"), "decode tokens/s", "TinyLlama-1.1B shapes, random weights, batch 1")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--seq-lens", default="128,512,1024,2048,4096,8192")
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--prefill-versions", default="v0,v1,v2,v3", type=lambda x: tuple(x.split(",")),
                    help="prefill_sweep: the numbattn kernels to time")
    ap.add_argument("--backward-versions", default="v3,v1", type=lambda x: tuple(x.split(",")),
                    help="backward: the numbattn backward kernels to time")
    ap.add_argument("--tile-versions", default="", type=lambda x: tuple(x.split(",")) if x else (),
                    help="tiles: only these versions' launch shapes (default: all)")
    ap.add_argument("--max-cache", type=int, default=131072)
    ap.add_argument("--head-dims", default="64,128,256", type=lambda x: tuple(int(d) for d in x.split(",")),
                    help="head_dims: the head dims to time")
    ap.add_argument("--window", type=int, default=4096, help="windows: the sliding window")
    ap.add_argument("--window-n", type=int, default=32768, help="windows: the windowed prefill's length")
    ap.add_argument("--prompts", default="512,2048")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--pp", default="16,512,2048", type=lambda x: [int(v) for v in x.split(",")],
                    help="end_to_end: prompt lengths")
    ap.add_argument("--tg", type=int, default=128, help="end_to_end: new tokens")
    ap.add_argument("--e2e-repeat", type=int, default=5, help="end_to_end: timed runs per number")
    ap.add_argument("--gguf", default="", help="end_to_end: also write the checkpoint here as an F16 GGUF")
    ap.add_argument("--serve-model", default="", help="serving: the model to serve (default: TinyLlama-shaped random)")
    ap.add_argument("--serve-concurrency", default="1,8,32")
    ap.add_argument("--serve-requests", type=int, default=2, help="serving: requests per client at each level")
    ap.add_argument("--serve-tokens", type=int, default=128)
    ap.add_argument("--serve-prompt-words", type=int, default=64)
    ap.add_argument("--other-server", default="", help="serving: also load these OpenAI-compatible URLs (comma-"
                                                        "separated), e.g. llama-server's http://127.0.0.1:8081")
    ap.add_argument("--gguf-dir", default="", help="quantized: keep the Q8_0 and Q4_K_M files here (for llama-bench)")
    ap.add_argument("--replot", nargs="+", metavar="ROWS_JSON",
                    help="no measuring: redraw the plots of finished runs (their rows.json files) into --out")
    args = ap.parse_args()
    if args.replot:
        os.makedirs(args.out, exist_ok=True)
        all_rows = {}
        for f in args.replot:
            with open(f) as fh:
                all_rows.update(json.load(fh))
        return plot_all(all_rows, args.out)
    args.seq_lens = [int(x) for x in args.seq_lens.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]
    args.prompts = [int(x) for x in args.prompts.split(",")]
    os.makedirs(args.out, exist_ok=True)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    report = [f"device: {smi}\ndate: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
              f"command: python benchmarks/gpu_report.py {' '.join(sys.argv[1:])}\n"]
    print(report[0], flush=True)
    all_rows = {}
    for name in args.sections.split(","):
        t0 = time.time()
        try:
            all_rows[name] = SECTIONS[name](report, args.out, args)
        except Exception as e:          # one failing section must not lose the others' measurements
            import traceback
            traceback.print_exc()
            report.append(f"\n### {name}: failed ({type(e).__name__}: {str(e)[:200]})\n")
        print(f"[{name}: {time.time() - t0:.0f} s]", flush=True)
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write("\n".join(report))
        with open(os.path.join(args.out, "rows.json"), "w") as f:
            json.dump(all_rows, f, indent=1, default=str)
    try:
        plot_all(all_rows, args.out)
    except ImportError as e:
        print(f"no plots ({e}): pip install matplotlib, then --replot {args.out}/rows.json", flush=True)


if __name__ == "__main__":
    main()
