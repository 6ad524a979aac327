"""Benchmarks, all in one place: numbattn's kernels next to the NumPy reference and torch's
scaled_dot_product_attention, and the whole model (a tinyllm Llama: prefill, then decode).

Used by `python cli.py bench`, benchmarks/gpu_report.py and the lessons. Speed is shown in tables and plots (the
callers print them), never asserted in tests.

Method (see BENCHMARKS.md). Inputs are random normal, never zeros; `warmup` untimed calls come first (on a GPU
they compile the kernels). Every number is a median over `repeat` calls. On a GPU four times are taken:

    ms       CUDA events recorded around each call on the stream (the method of earlier reports)
    sync_ms  host clock around each call followed by a device synchronize: what a loop that needs the result
             pays per call, host overhead included (numbattn and torch alike)
    host_ms  host clock around the call alone: the time to launch it (Python, argument marshalling, driver)
    gpu_ms   CUDA events around the call with the GPU kept busy while the host launches it (a sleeping kernel
             first), so the events see only the GPU's work
On the simulator and NumPy backends only the host clock exists: ms is the median of 5 calls, and ms_min / ms_max
show the spread. Causal FLOPs are counted as half of the full q_len x kv_len work, so
TFLOP/s of causal and non-causal runs are comparable.
"""
import logging
import statistics
import time

import numpy as np

from .. import backend as _backend
from .. import prefill, reference

log = logging.getLogger("numbattn")

FP32_PEAK_TFLOPS = 67.0     # H100 SXM, non-tensor-core fp32 (datasheet); Numba offers no tensor-core op
HBM_GBPS = 3000.0           # measured device-to-device copy on the H100 machine (shared/gpu/README.md)

# TinyLlama's attention shape
N_HEADS, N_KV_HEADS, HEAD_DIM = 32, 4, 64


def torch_cuda():
    """torch with a usable GPU, or None (the comparisons are skipped without it)."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def timed(fn, clock, warmup=3, repeat=20):
    """Median milliseconds of fn() ("cuda"/"torch": CUDA events around each call; "host": the host clock)."""
    return measure(fn, clock, warmup, repeat, methods=("ms",))["ms"]


def measure(fn, clock, warmup=3, repeat=20, methods=("ms", "sync_ms", "host_ms", "gpu_ms")):
    """{method: median milliseconds} for fn() (see the module docstring), plus ms_min / ms_max on the host."""
    for _ in range(warmup):
        fn()
    if clock == "host":
        times = [_host_ms(fn) for _ in range(repeat)]
        return dict(ms=statistics.median(times), ms_min=min(times), ms_max=max(times))
    sync, events = _device_clock(clock)
    rows = {}
    for method in methods:
        times = []
        for _ in range(repeat):
            if method == "ms":
                times.append(events(fn, busy=False))
            elif method == "gpu_ms":
                times.append(events(fn, busy=True))
            elif method == "sync_ms":
                sync()
                times.append(_host_ms(lambda: (fn(), sync())))
            else:
                sync()
                times.append(_host_ms(fn))
        rows[method] = statistics.median(times)
    return rows


def _host_ms(fn):
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _device_clock(clock):
    """(synchronize(), events(fn, busy) -> ms) for numba ("cuda") or torch ("torch") launches."""
    from numba import cuda
    if clock == "torch":
        torch = torch_cuda()

        def events(fn, busy):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if busy:
                torch.cuda._sleep(2_000_000)     # ~1 ms of GPU time: the host enqueues while the GPU sleeps
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return torch.cuda.synchronize, events

    def events(fn, busy):
        start, end = cuda.event(), cuda.event()
        if busy:
            _sleep_kernel()[1, 1](1_000_000)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return cuda.event_elapsed_time(start, end)
    return cuda.synchronize, events


def _sleep_kernel():
    """A kernel that keeps the GPU busy for ~ns nanoseconds (numba's default stream, like the kernels timed)."""
    from numba import cuda
    global _SLEEP
    if "_SLEEP" not in globals():
        @cuda.jit
        def sleep(ns):
            for _ in range(ns // 500_000):
                cuda.nanosleep(500_000)
        _SLEEP = sleep
    return _SLEEP


def attention_flops(batch, n_heads, q_len, kv_len, head_dim, causal):
    full = 4.0 * batch * n_heads * q_len * kv_len * head_dim  # two matmuls, 2 FLOPs per multiply-add
    return full / 2 if causal and q_len == kv_len else full


def random_qkv(batch, q_len, kv_len, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, head_dim=HEAD_DIM, seed=0,
               dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, n_heads, q_len, head_dim), dtype=np.float32).astype(dtype)
    k = rng.standard_normal((batch, n_kv_heads, kv_len, head_dim), dtype=np.float32).astype(dtype)
    v = rng.standard_normal((batch, n_kv_heads, kv_len, head_dim), dtype=np.float32).astype(dtype)
    return q, k, v


def prefill_impls(be, versions, q, k, v, causal, with_reference):
    """name -> zero-argument callable running one prefill on inputs already resident where they belong."""
    impls = {}
    if be in ("cuda", "sim"):
        from numba import cuda
        dq, dk, dv = (cuda.to_device(x) for x in (q, k, v))
        out = cuda.device_array(q.shape, np.float32)
        for ver in versions:
            tiles = prefill.default_tiles(ver, be, q.shape[3])
            impls[f"numbattn {ver}"] = (lambda t=tiles, ver=ver:
                                        prefill.launch(dq, dk, dv, out, causal, 1 / np.sqrt(q.shape[3]), ver, t))
    if with_reference:
        impls["numpy reference"] = lambda: reference.attention(q, k, v, causal=causal)
    torch = torch_cuda() if be == "cuda" else None
    if torch is not None:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch.nn.functional as F
        # K/V repeated to all query heads up front (not timed): the memory-efficient kernel takes no GQA
        group = q.shape[1] // k.shape[1]
        t32 = [torch.from_numpy(x).cuda().repeat_interleave(group if i else 1, dim=1) for i, x in enumerate((q, k, v))]
        t16 = [x.half() for x in t32]
        for label, sdp, ts in (("torch SDPA flash fp16", SDPBackend.FLASH_ATTENTION, t16),
                               ("torch SDPA mem-efficient fp32", SDPBackend.EFFICIENT_ATTENTION, t32),
                               ("torch SDPA math fp32", SDPBackend.MATH, t32)):
            def run(sdp=sdp, ts=ts):
                with sdpa_kernel(sdp):
                    return F.scaled_dot_product_attention(*ts, is_causal=causal)
            impls[label] = run
    return impls


def bench_prefill(seq_lens, batches=(1,), causal=(True,), versions=("v1", "v2"), backend="auto",
                  reference_max_n=1024, naive_max_work=2**22, repeat=20, progress=None, methods=("ms",)):
    """Rows of {what, impl, batch, n, causal, ms (and the other methods' times), tflops, frac_fp32_peak}."""
    be = _backend.resolve(backend)
    rows = []
    combos = [(b, n, c) for b in batches for n in seq_lens for c in causal]
    for b, n, c in combos:
        q, k, v = random_qkv(b, n, n)
        # v0 (naive) re-reads K/V from global memory per query: only worth timing at small sizes
        vers = [x for x in versions if x != "v0" or b * n * n <= naive_max_work * N_KV_HEADS]
        impls = prefill_impls(be, vers, q, k, v, c, with_reference=n <= reference_max_n)
        flops = attention_flops(b, N_HEADS, n, n, HEAD_DIM, c)
        _time_impls(impls, be, repeat, rows, lambda ms: dict(
            tflops=flops / ms / 1e9, frac_fp32_peak=flops / ms / 1e9 / FP32_PEAK_TFLOPS),
            methods=methods, what="prefill", batch=b, n=n, causal=c)
        if progress:
            progress(1)
    return rows


# --------------------------------------------------------------------------------------------------------
# The attention backward
# --------------------------------------------------------------------------------------------------------
def backward_impls(be, versions, q, k, v, causal):
    """name -> zero-argument callable running one attention backward (dQ, dK, dV) on resident inputs: numbattn's
    (out and lse from its own forward, gradients into preallocated buffers), and, with torch on the GPU, SDPA's
    memory-efficient fp32 backward (K/V repeated to the 32 query heads inside the graph, so its backward also
    sums dK and dV over each group, as numbattn's does)."""
    from .. import backward
    impls = {}
    dout = np.random.default_rng(1).standard_normal(q.shape, dtype=np.float32)
    if be in ("cuda", "sim"):
        from numba import cuda
        dev = [cuda.to_device(x) for x in (q, k, v, dout)]
        out, lse = prefill.flash_attention(dev[0], dev[1], dev[2], causal=causal, backend=be, return_lse=True)
        grads = tuple(cuda.device_array(x.shape, np.float32) for x in (q, k, v))
        for ver in versions:
            tiles = backward.default_tiles(ver, be, q.shape[3])
            impls[f"numbattn {ver}"] = (lambda t=tiles, ver=ver: backward.launch(
                dev[0], dev[1], dev[2], out, lse, dev[3], grads, causal, 1 / np.sqrt(q.shape[3]), ver, t))
    torch = torch_cuda() if be == "cuda" else None
    if torch is not None:
        impls["torch SDPA mem-efficient fp32"] = _torch_backward(torch, q, k, v, dout, causal)
    return impls


def _torch_backward(torch, q, k, v, dout, causal, dtype=None, sdp="EFFICIENT_ATTENTION"):
    """A callable -> (dq, dk, dv) of torch's SDPA backward (the forward run once, outside)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    group = q.shape[1] // k.shape[1]
    leaves = [torch.from_numpy(x).cuda().to(dtype or torch.float32).requires_grad_() for x in (q, k, v)]
    qt, kt, vt = leaves[0], *(x.repeat_interleave(group, dim=1) for x in leaves[1:])
    with sdpa_kernel(getattr(SDPBackend, sdp)):
        o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    grad = torch.from_numpy(dout).cuda().to(o.dtype)
    return lambda: torch.autograd.grad(o, leaves, grad, retain_graph=True)


def bench_backward(seq_lens, causal=(True, False), versions=("v3",), backend="auto", repeat=10, methods=("ms",)):
    """Rows of {what, impl, n, causal, ms, tflops} for one backward at TinyLlama's head shape, batch 1. FLOPs: the
    five products of FlashAttention-2's backward, 2.5x the forward's two (its recomputation of S not counted)."""
    be = _backend.resolve(backend)
    rows = []
    for n in seq_lens:
        q, k, v = random_qkv(1, n, n)
        for c in causal:
            flops = 2.5 * attention_flops(1, N_HEADS, n, n, HEAD_DIM, c)
            _time_impls(backward_impls(be, versions, q, k, v, c), be, repeat, rows,
                        lambda ms: dict(tflops=flops / ms / 1e9), methods=methods, what="backward", n=n, causal=c)
    return rows


def backward_accuracy(n, causal, versions=("v3",)):
    """Rows of {impl, n, causal, err_dq, err_dk, err_dv}: max |error| / max |fp64| of each gradient, against torch's
    float64 math backward on the GPU, one KV head's group of query heads at a time (GPU only)."""
    import torch

    from .. import backward
    q, k, v = random_qkv(1, n, n)
    dout = np.random.default_rng(1).standard_normal(q.shape, dtype=np.float32)
    group = N_HEADS // N_KV_HEADS
    want = [[], [], []]
    for h in range(N_KV_HEADS):
        qs, ks = slice(h * group, (h + 1) * group), slice(h, h + 1)
        got = _torch_backward(torch, q[:, qs], k[:, ks], v[:, ks], dout[:, qs], causal, torch.float64, "MATH")()
        for w, g in zip(want, got):
            w.append(g.cpu().numpy())
        del got
        torch.cuda.empty_cache()
    want = [np.concatenate(w, axis=1) for w in want]
    rows = []
    for ver in versions:
        out, lse = prefill.flash_attention(q, k, v, causal=causal, backend="cuda", return_lse=True)
        got = backward.attention_backward(q, k, v, out, lse, dout, causal=causal, backend="cuda", version=ver)
        rows.append(dict(impl=f"numbattn {ver}", n=n, causal=causal, **{
            f"err_{name}": float(np.abs(g - w).max() / np.abs(w).max()) for name, g, w in zip(("dq", "dk", "dv"), got, want)}))
    grads = _torch_backward(torch, q, k, v, dout, causal)()
    rows.append(dict(impl="torch SDPA mem-efficient fp32", n=n, causal=causal, **{
        f"err_{name}": float(np.abs(g.cpu().numpy() - w).max() / np.abs(w).max())
        for name, g, w in zip(("dq", "dk", "dv"), grads, want)}))
    return rows


def _clock(name, be):
    return "torch" if name.startswith("torch") else ("cuda" if be == "cuda" else "host")


def _time_impls(impls, be, repeat, rows, derived, methods=("ms",), **fields):
    """Time each implementation and append one row per success: fields, impl, the methods' times and
    derived(ms) (rates from the first method). A refusal (e.g. SDPA shape) is logged, not fatal."""
    for name, fn in impls.items():
        try:
            times = measure(fn, _clock(name, be), warmup=3 if be == "cuda" else 1,
                            repeat=repeat if be == "cuda" else 5, methods=methods)
        except Exception as e:
            log.warning("bench: %s failed at %s: %s", name, fields, e)
            continue
        rows.append(dict(fields, impl=name, **times, **derived(times[methods[0]] if be == "cuda" else times["ms"])))
    return rows


def _bandwidth(nbytes, ms):
    """Rates for nbytes moved in ms: GB/s and the fraction of HBM bandwidth."""
    return dict(gbps=nbytes / ms / 1e6, frac_hbm=nbytes / ms / 1e6 / HBM_GBPS)


def _torch_kv(q, k, v):
    """q [b, h, d] and a cache k, v [b, h_kv, n, d] as torch tensors with K/V repeated to every query head."""
    torch = torch_cuda()
    group = q.shape[1] // k.shape[1]
    tq = torch.from_numpy(np.ascontiguousarray(q[:, :, None, :])).cuda()
    tk, tv = (torch.from_numpy(x).cuda().repeat_interleave(group, dim=1) for x in (k, v))
    return tq, tk, tv


def bench_decode(cache_lens, batches=(1,), dtypes=("float32", "float16"), backend="auto", repeat=50,
                 reference_max_n=4096, progress=None, methods=("ms", "sync_ms", "host_ms", "gpu_ms")):
    """One decode step (one query token per row, all rows holding n tokens) at TinyLlama's head shape, through
    the public API on device arrays: numbattn.decode_attention(q_dev, cache, 0), and torch SDPA on the same data.

    Rows carry the methods' times, the K/V bytes the step must read, and the effective GB/s and fraction of HBM
    bandwidth (from the first method).
    """
    from .. import decode
    from ..kvcache import KVCache
    be = _backend.resolve(backend)
    rows = []
    for b, n, dt, rng, k, v in _kv_points(batches, cache_lens, dtypes):
        q = rng.standard_normal((b, N_HEADS, HEAD_DIM), dtype=np.float32)
        impls = {}
        if be in ("cuda", "sim"):
            from numba import cuda
            cache = KVCache(1, b, N_KV_HEADS, n, HEAD_DIM, dtype=dt, backend=be)
            cache.append(0, k, v)
            dq = cuda.to_device(q)
            for ver in decode.VERSIONS:
                impls[f"numbattn decode {ver} {dt}"] = (
                    lambda ver=ver, cache=cache: decode.decode_attention(dq, cache, 0, version=ver))
        if n <= reference_max_n and dt == "float32":
            lengths = np.full(b, n, np.int32)
            impls["numpy reference"] = lambda: reference.decode_attention(q, k, v, lengths)
        if be == "cuda" and torch_cuda() is not None:
            impls.update(_torch_decode(q, k, v, dt, n))
        kv_bytes = 2 * b * N_KV_HEADS * n * HEAD_DIM * np.dtype(dt).itemsize
        _time_impls(impls, be, repeat, rows, lambda ms: dict(kv_MB=kv_bytes / 1e6, **_bandwidth(kv_bytes, ms)),
                    methods=methods, what="decode", batch=b, n=n, cache=dt)
        if progress:
            progress(1)
    return rows


def _kv_points(batches, lengths, dtypes):
    """(batch, n, dtype, rng, k, v) for every combination: random K and V [batch, 4, n, 64] stored as dtype."""
    for b in batches:
        for n in lengths:
            for dt in dtypes:
                rng = np.random.default_rng(n)
                k, v = (rng.standard_normal((b, N_KV_HEADS, n, HEAD_DIM), dtype=np.float32).astype(dt)
                        for _ in range(2))
                yield b, n, dt, rng, k, v


def _torch_decode(q, k, v, dt, n):
    """torch SDPA for one decode step: flash fp16 (GQA without repeating K/V) for an fp16 cache, the math
    kernel (K/V repeated to every query head, untimed) for fp32 up to 32768 tokens."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch = torch_cuda()
    tq = torch.from_numpy(np.ascontiguousarray(q[:, :, None, :])).cuda()
    if dt == "float16":
        ts = (tq.half(), torch.from_numpy(k).cuda(), torch.from_numpy(v).cuda())

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(*ts, enable_gqa=True)
        return {"torch SDPA flash fp16": flash}
    if n > 32768:
        return {}
    tk, tv = _torch_kv(q, k, v)[1:]

    def math_():
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(tq, tk, tv)
    return {"torch SDPA math fp32": math_}


def bench_append(token_counts=(1, 16, 512, 2048), batches=(1,), dtypes=("float32", "float16"), max_len=4096,
                 backend="auto", repeat=50, progress=None):
    """KV-cache append of t new tokens per row into one layer (one launch for K and V): ms and GB/s moved."""
    from .. import kvcache
    be = _backend.resolve(backend)
    rows = []
    for b, t, dt, _, k, v in _kv_points(batches, token_counts, dtypes):
        impls = {}
        if be in ("cuda", "sim"):
            from numba import cuda
            dk, dv = cuda.to_device(k), cuda.to_device(v)
            kc, vc = (cuda.device_array((b, N_KV_HEADS, max_len, HEAD_DIM), dt) for _ in range(2))
            l_in, l_out = cuda.to_device(np.zeros(b, np.int32)), cuda.device_array(b, np.int32)
            tickets = cuda.to_device(np.zeros(b, np.int32))
            copy = kvcache.SIM_COPY if be == "sim" else kvcache.GPU_COPY
            impls[f"numbattn append {dt}"] = lambda: kvcache.launch_append(dk, dv, kc, vc, l_in, l_out,
                                                                           tickets, copy)
        else:
            hk, hv = (np.empty((b, N_KV_HEADS, max_len, HEAD_DIM), dt) for _ in range(2))
            impls["numpy copy"] = lambda: (hk.__setitem__((slice(None), slice(None), slice(0, t)), k),
                                           hv.__setitem__((slice(None), slice(None), slice(0, t)), v))
        moved = 2 * 2 * k.nbytes  # K and V, each read once and written once
        _time_impls(impls, be, repeat, rows, lambda ms: _bandwidth(moved, ms),
                    what="append", batch=b, n=t, cache=dt)
        if progress:
            progress(1)
    return rows


# --------------------------------------------------------------------------------------------------------
# Today's model families: head_dim 128 and 256, sliding windows (numbattn.attention(window=), ring-buffer caches)
# --------------------------------------------------------------------------------------------------------
def visible_pairs(q_len, kv_len, window=None):
    """(query, key) pairs a causal attention computes, bottom-right aligned, with a sliding window: exact."""
    p = np.arange(q_len, dtype=np.float64) + (kv_len - q_len)              # each query's absolute position
    return float(np.minimum(p + 1, np.inf if window is None else window).sum())


def pair_rate(batch, n_heads, pairs, head_dim, ms):
    """TFLOP/s of attention over `pairs` visible pairs per head: two products of 2 FLOPs per multiply-add."""
    return 4.0 * batch * n_heads * pairs * head_dim / ms / 1e9


def bench_head_dims(head_dims=(64, 128, 256), n=4096, causal=True, versions=("v3",), batch=1, n_heads=N_HEADS,
                    n_kv_heads=N_KV_HEADS, repeat=20, methods=("ms", "sync_ms")):
    """Prefill at n for each head_dim, numbattn's versions next to torch SDPA's memory-efficient fp32 kernel (and
    flash fp16, which takes head_dim <= 256) in the same process -> rows {what, impl, head_dim, n, ms..., tflops}."""
    be = _backend.resolve("auto")
    rows = []
    for d in head_dims:
        q, k, v = random_qkv(batch, n, n, n_heads, n_kv_heads, d)
        impls = {name: fn for name, fn in prefill_impls(be, versions, q, k, v, causal, False).items()
                 if "math" not in name}
        pairs = visible_pairs(n, n) if causal else float(n) * n
        _time_impls(impls, be, repeat, rows, lambda ms: dict(tflops=pair_rate(batch, n_heads, pairs, d, ms)),
                    methods=methods, what="head_dim", head_dim=d, n=n, causal=causal)
    return rows


def bench_window_prefill(n=32768, window=4096, full_n=4096, head_dim=HEAD_DIM, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS,
                         repeat=10, methods=("ms", "sync_ms")):
    """Sliding-window prefill at n (numbattn.attention(window=)) against a full causal prefill at full_n, both as
    TFLOP/s over the pairs they must compute (the windowed one counts only its visible pairs), and against torch
    SDPA's memory-efficient fp32 kernel given the window as an explicit boolean mask (SDPA has no window of its
    own: it computes every pair and masks), on the same inputs -> rows {what, impl, n, window, ms..., tflops}."""
    from numba import cuda
    rows = []
    for label, length, win in ((f"numbattn v3 window {window}", n, window), ("numbattn v3 full causal", full_n, None)):
        q, k, v = random_qkv(1, length, length, n_heads, n_kv_heads, head_dim)
        dq, dk, dv = (cuda.to_device(x) for x in (q, k, v))
        out = cuda.device_array(q.shape, np.float32)
        tiles = prefill.default_tiles("v3", "cuda", head_dim)
        fn = (lambda dq=dq, dk=dk, dv=dv, out=out, win=win, tiles=tiles:
              prefill.launch(dq, dk, dv, out, True, head_dim ** -0.5, "v3", tiles, window=win))
        pairs = visible_pairs(length, length, win)
        _time_impls({label: fn}, "cuda", repeat, rows, lambda ms: dict(tflops=pair_rate(1, n_heads, pairs, head_dim, ms)),
                    methods=methods, what="window prefill", n=length, window=win or "-")
        if win is not None and torch_cuda() is not None:
            sdpa = _sdpa_window_prefill(q, k, v, win)
            _time_impls({"torch SDPA mem-efficient fp32 + window mask": sdpa}, "cuda", max(3, repeat // 3), rows,
                        lambda ms: dict(tflops=pair_rate(1, n_heads, pairs, head_dim, ms)), methods=methods,
                        what="window prefill", n=length, window=win)
    return rows


def _sdpa_window_prefill(q, k, v, window):
    """torch SDPA (memory-efficient fp32) with the sliding window as an explicit [n, n] boolean mask; K/V repeated to
    every query head up front (not timed)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch = torch_cuda()
    group = q.shape[1] // k.shape[1]
    t = [torch.from_numpy(x).cuda().repeat_interleave(group if i else 1, dim=1) for i, x in enumerate((q, k, v))]
    pos = torch.arange(q.shape[2], device="cuda")
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)        # [n, n]: p - w < j <= p

    def run():
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return F.scaled_dot_product_attention(*t, attn_mask=mask)
    return run


def bench_window_decode(cache_len=131072, window=4096, full_len=4096, dtype="float16", head_dim=HEAD_DIM,
                        n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, repeat=100, methods=("sync_ms", "gpu_ms")):
    """One decode step over a sliding-window layer holding cache_len tokens in a ring buffer (window + 4096 slots),
    and over a full layer of cache_len tokens with window=, against decode over a full layer of full_len tokens;
    and torch SDPA on the same step: memory-efficient with the window as a mask over every key, and flash fp16 on
    the window's keys alone (the best SDPA can do) -> rows {what, impl, n, window, ms..., kv_MB}."""
    from numba import cuda

    from ..decode import decode_attention
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, n_heads, head_dim), dtype=np.float32)
    dq = cuda.to_device(q)
    rows = []
    chunk = min(window, 4096)
    for label, n, windows, win in ((f"numbattn ring window {window}", cache_len, window, None),
                                   (f"numbattn full layer, window={window}", cache_len, None, window),
                                   ("numbattn full layer", full_len, None, None)):
        cache = _filled_cache(rng, n, dtype, head_dim, n_kv_heads, windows, chunk)
        fn = lambda cache=cache, win=win: decode_attention(dq, cache, 0, window=win)      # noqa: E731
        kv_bytes = 2 * n_kv_heads * min(n, win or windows or n) * head_dim * np.dtype(dtype).itemsize
        _time_impls({label: fn}, "cuda", repeat, rows, lambda ms: dict(kv_MB=kv_bytes / 1e6),
                    methods=methods, what="window decode", n=n, window=win or windows or "-", cache=dtype)
    if torch_cuda() is not None and cache_len <= 131072:
        _time_impls(_sdpa_window_decode(rng, q, cache_len, window, dtype, head_dim, n_kv_heads), "cuda", repeat, rows,
                    lambda ms: {}, methods=methods, what="window decode", n=cache_len, window=window, cache=dtype)
    return rows


def _filled_cache(rng, n, dtype, head_dim, n_kv_heads, windows, chunk):
    """A one-layer KVCache holding n random tokens (a ring buffer if windows), appended in chunks."""
    from ..kvcache import KVCache
    cache = KVCache(1, 1, n_kv_heads, n, head_dim, dtype=dtype, backend="cuda", windows=windows, max_chunk=chunk)
    for j in range(0, n, chunk):
        t = min(chunk, n - j)
        cache.append(0, *(rng.standard_normal((1, n_kv_heads, t, head_dim), dtype=np.float32).astype(dtype)
                          for _ in range(2)))
    return cache


def _sdpa_window_decode(rng, q, n, window, dtype, head_dim, n_kv_heads):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch = torch_cuda()
    tdt = torch.float16 if dtype == "float16" else torch.float32
    group = q.shape[1] // n_kv_heads
    k, v = (torch.randn((1, n_kv_heads, n, head_dim), device="cuda", dtype=tdt) for _ in range(2))
    tq = torch.from_numpy(np.ascontiguousarray(q[:, :, None, :])).cuda().to(tdt)
    mask = torch.arange(n, device="cuda")[None, :] >= n - window                            # [1, n]: the last window
    kr, vr = (x.repeat_interleave(group, dim=1) for x in (k, v))
    k_win, v_win = (x[:, :, n - window:].contiguous() for x in (k, v))

    def masked():
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return F.scaled_dot_product_attention(tq, kr, vr, attn_mask=mask)

    def sliced():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(tq.half(), k_win.half(), v_win.half(), enable_gqa=True)
    return {f"torch SDPA mem-efficient {dtype} + window mask": masked,
            "torch SDPA flash fp16 on the window's keys": sliced}


def prefill_benchmark_text(backend, versions, seq_lens):
    """The GPU benchmark cell of lessons 2 and 3, as text for the lesson to print: causal prefill of `versions`
    at TinyLlama's shape (batch 1) next to the NumPy reference (and torch SDPA if installed), ms and TFLOP/s.
    (Without a GPU the lessons show BENCHMARKS.md's H100 tables instead: the simulator times Python threads.)"""
    if backend != "cuda":
        raise ValueError(f"the prefill benchmark times kernels on a GPU; backend {backend!r} has none")
    rows = bench_prefill(seq_lens=seq_lens, causal=(True,), versions=versions, reference_max_n=1024)
    lines = [f"causal prefill, batch 1, {N_HEADS} heads / {N_KV_HEADS} KV heads, head_dim {HEAD_DIM}:"]
    for value in ("ms", "tflops"):
        table, columns = pivot(rows, ["n"], value)
        lines += ["", f"{value}:", format_table(table, columns)]
    return "\n".join(lines)


def format_table(rows, columns):
    """A plain-text table of the given columns, numbers rounded for reading."""
    def cell(x):
        if isinstance(x, float):
            return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"
        return str(x)
    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    line = lambda xs: "| " + " | ".join(x.rjust(w) for x, w in zip(xs, widths)) + " |"
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body])


def pivot(rows, key_cols, value="ms"):
    """One row per key (e.g. batch, n, causal) with one column per implementation: the side-by-side view."""
    table, impls = {}, []
    for r in rows:
        key = tuple(r[c] for c in key_cols)
        table.setdefault(key, dict(zip(key_cols, key)))[r["impl"]] = r[value]
        if r["impl"] not in impls:
            impls.append(r["impl"])
    return list(table.values()), list(key_cols) + impls


def bars(labels, values, path, xlabel, title="", log=False):
    """Horizontal bar chart, one bar per label. Needs matplotlib (the [bench] extra)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.28 * len(labels)))
    ax.barh(range(len(labels)), values)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot(rows, path, x="n", y="ms", title=""):
    """Log-log plot of y against x, one line per implementation. Needs matplotlib (the [bench] extra)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = sorted((r[x], r[y]) for r in rows if r["impl"] == impl)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------------------
# bench_model times what a user waits for: prefill time for an N-token prompt, then decode speed over M new
# tokens, through the model's own generate() (every cost is in: matmuls, attention, KV-cache appends, sampling,
# the host<->device copies). Rows:
#     {what: "model", impl: "<engine> prefill", batch: 1, n: N, ms: whole prompt,   tokens_per_s: N / s}
#     {what: "model", impl: "<engine> decode",  batch: 1, n: N, ms: per new token,  tokens_per_s: ...}
#     (<engine>: the backend's name for the device engine and pure NumPy; "numpy+cuda attention" for the mix)
# "decode" at n = N is the mean step while the cache grows from N to N + M tokens. The prompt is random token ids
# (the content does not change the work) and no stop token ends a run. One untimed warm-up generation per model
# comes first (on a GPU it compiles the kernels); each number is the median of `repeat` runs, timed with the
# host clock, which waits for the GPU anyway: every step copies its logits back.
def default_prompt_lengths(model, backend, new_tokens):
    """Powers of two from 16 up to min(1024, half the context) that leave room for new_tokens; (8, 16) on
    the simulator, where every CUDA thread is a Python thread."""
    if backend == "sim":
        lengths = (8, 16)
    else:
        top = min(1024, model.max_len // 2)
        lengths = tuple(n for n in (16, 32, 64, 128, 256, 512, 1024) if n <= top)
    return tuple(n for n in lengths if n + new_tokens <= model.max_len) or (max(1, model.max_len - new_tokens),)


def bench_model(models, seq_lens, new_tokens=32, repeat=1, seed=0, progress=None):
    """Prefill and decode timings of each model (a Llama, or several: e.g. the device engine and the NumPy
    engine on the same checkpoint) for each prompt length -> rows. progress(1) after each (model, length)."""
    models = models if isinstance(models, (list, tuple)) else [models]
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens}: must be >= 2 (one prefill token, then decode steps)")
    too_long = [n for n in seq_lens if n + new_tokens > min(m.max_len for m in models)]
    if too_long:
        raise ValueError(f"prompt lengths {too_long} + {new_tokens} new tokens exceed the context of "
                         f"{min(m.max_len for m in models)} tokens")
    rng = np.random.default_rng(seed)
    rows = []
    for m in models:
        label = m.backend if m.engine == "device" or m.backend == "numpy" else f"numpy+{m.backend} attention"
        _run_model(m, rng.integers(0, m.config.vocab_size, 4).tolist(), 2)        # warm-up: compile, page weights in
        for n in seq_lens:
            prompt = rng.integers(0, m.config.vocab_size, n).tolist()
            stats = [_run_model(m, prompt, new_tokens) for _ in range(repeat)]
            prefill_s = statistics.median(s.prefill_seconds for s in stats)
            step_s = statistics.median(s.decode_seconds / s.decode_tokens for s in stats)
            log.info("numbattn bench model: %s n=%d prefill %.1f ms, decode %.2f ms/token", label, n, prefill_s * 1e3,
                     step_s * 1e3)
            rows.append(dict(what="model", impl=f"{label} prefill", batch=1, n=n, ms=prefill_s * 1e3,
                             tokens_per_s=n / prefill_s))
            rows.append(dict(what="model", impl=f"{label} decode", batch=1, n=n, ms=step_s * 1e3,
                             tokens_per_s=1 / step_s))
            if progress:
                progress(1)
    return rows


def _run_model(model, prompt, new_tokens):
    """One timed generation from an empty cache, exactly new_tokens long (no stop token) -> GenerationStats."""
    model.reset()
    return model.generate(prompt, max_new_tokens=new_tokens, stop_ids=()).stats


# --------------------------------------------------------------------------------------------------------
# Weights as stored or dequantized (issue 28): the same file, each form, the same run
# --------------------------------------------------------------------------------------------------------
# bench_weights loads one model file once per form (load_model's weights=: "fp32" is how a GGUF file used to run,
# dequantized; "as-stored" keeps its blocks) and times them in turns, round by round, so that a machine whose load
# changes (a shared CPU) weighs on every form alike, each run after a pause of 0.5 s (OpenBLAS's and OpenMP's idle
# threads spin for a while after their last call: the other form's would compete with this one's). Rows: {weights,
# kinds, weights_MB, token_MB, prefill_ms (prompt_len tokens, the first token's logits included), prefill_tok_s,
# decode_ms (per token, over new_tokens), decode_tok_s, logits_err (the prompt's last logits against the first
# form's, relative to their largest), load_before / load_after (the 1-minute load average)}: medians of `repeat`
# rounds after one warm-up; `runs` the rounds' own (prefill_ms, decode_ms). between(r), if given, is called after
# each timed round r (a peer program timed in the same rounds).
def bench_weights(model, forms=("fp32", "as-stored"), backend="numpy", prompt_len=41, new_tokens=32, repeat=3,
                  seed=0, between=None):
    import os

    from tinyllm import load_model
    models = {form: load_model(model, backend=backend, weights=form) for form in forms}
    first = next(iter(models.values()))
    prompt = np.random.default_rng(seed).integers(3, first.config.vocab_size, prompt_len).tolist()
    reference = first.forward(np.array([prompt]), last_only=True)
    load_before = os.getloadavg()[0]
    runs = {form: [] for form in forms}
    for r in range(repeat + 1):                         # round 0 warms up (Numba and CUDA kernels, page-ins)
        for form, m in models.items():
            time.sleep(0.5)         # the other form's idle threads (OpenBLAS's, OpenMP's) stop spinning first
            stats = _run_model(m, prompt, new_tokens)
            if r:
                runs[form].append(stats)
        if r and between is not None:
            between(r)                  # a peer timed in the same round (benchmarks/cpu_quantized.py: llama.cpp)
    rows = []
    for form, m in models.items():
        logits = m.forward(np.array([prompt]), last_only=True)
        prefill = statistics.median(s.prefill_seconds for s in runs[form])
        step = statistics.median(s.decode_seconds / s.decode_tokens for s in runs[form])
        rows.append(dict(weights=form, engine=m.engine, kinds="/".join(_kinds(m)), weights_MB=_weight_bytes(m) / 1e6,
                         token_MB=_token_bytes(m) / 1e6, prompt=prompt_len, prefill_ms=prefill * 1e3,
                         prefill_tok_s=prompt_len / prefill, decode_ms=step * 1e3, decode_tok_s=1 / step,
                         logits_err=float(np.abs(logits - reference).max() / np.abs(reference).max()),
                         load_before=load_before, load_after=os.getloadavg()[0],
                         runs=[(s.prefill_seconds * 1e3, s.decode_seconds / s.decode_tokens * 1e3) for s in runs[form]]))
    return rows


def _kinds(m):
    from tinyllm.engines.host import block_kinds
    if m.engine == "device":
        return m.weights.kinds
    return block_kinds(m.weights) + ["f32"]


def _weight_bytes(m):
    from tinyllm.engines.host import _host_bytes
    return m.weights.nbytes if m.engine == "device" else _host_bytes(m.weights)


def _token_bytes(m):
    from tinyllm.engines.host import token_bytes
    return m.weights.token_bytes if m.engine == "device" else token_bytes(m.weights)


# --------------------------------------------------------------------------------------------------------
# End to end, as llama-bench reports it (benchmarks/gpu_report.py `end_to_end`)
# --------------------------------------------------------------------------------------------------------
# pp N: prompt tokens per second, N tokens from an empty KV cache to the logits of the last one, synchronised
# (what a reply waits for before its first token); tg N: new tokens per second over N greedy tokens after a
# one-token prompt (llama-bench's tg: an empty context), and after a 512-token prompt ("tg128 @ 512"). Medians of
# `repeat` runs, after two untimed ones (the first of a length compiles nothing, as kernels are compiled at load,
# but prepares its launches; the second records the CUDA graph a short prompt replays).
def pp_tg_tinyllm(model, prompt_lengths=(16, 512, 2048), tg=128, depths=(1, 512), repeat=5, seed=0):
    """pp and tg rows {test, ms, tokens_per_s} of a tinyllm model (ms: the whole prompt, or per new token)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in prompt_lengths:
        ids = rng.integers(3, model.config.vocab_size, (1, n))
        times = []
        for i in range(repeat + 2):
            model.reset()
            t0 = time.perf_counter()
            model.forward(ids, last_only=True)
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times[2:]) * 1e3
        rows.append(dict(test=f"pp{n}", ms=ms, tokens_per_s=n / ms * 1e3))
    for depth in depths:
        prompt = rng.integers(3, model.config.vocab_size, depth).tolist()
        _run_model(model, prompt, 4)
        stats = [_run_model(model, prompt, tg) for _ in range(repeat)]
        step_s = statistics.median(s.decode_seconds / s.decode_tokens for s in stats)
        rows.append(dict(test=f"tg{tg}" + (f" @ {depth}" if depth > 1 else ""), ms=step_s * 1e3,
                         tokens_per_s=1 / step_s))
    return rows


def pp_tg_hf(model_dir, prompt_lengths=(16, 512, 2048), tg=128, depths=(1, 512), repeat=5, seed=0,
             dtype="bfloat16", attn="sdpa"):
    """The same rows for Hugging Face transformers on the same checkpoint: pp through the model's forward (the
    last position's logits only), tg from generate() (the time of tg tokens minus that of one)."""
    import torch
    import transformers
    hf = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype),
                                                       attn_implementation=attn).cuda().eval()
    vocab = hf.config.vocab_size
    rng = np.random.default_rng(seed)
    rows = []

    def timed_s(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    for n in prompt_lengths:
        ids = torch.tensor(rng.integers(3, vocab, (1, n)), device="cuda")
        times = [timed_s(lambda: hf(ids, logits_to_keep=1)) for _ in range(repeat + 2)][2:]
        ms = statistics.median(times) * 1e3
        rows.append(dict(test=f"pp{n}", ms=ms, tokens_per_s=n / ms * 1e3))
    for depth in depths:
        ids = torch.tensor(rng.integers(3, vocab, (1, depth)), device="cuda")

        def gen(k):
            return timed_s(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                                               min_new_tokens=k, do_sample=False, pad_token_id=0))
        gen(2)
        step_s = statistics.median((gen(tg) - gen(1)) / (tg - 1) for _ in range(max(1, repeat // 2)))
        rows.append(dict(test=f"tg{tg}" + (f" @ {depth}" if depth > 1 else ""), ms=step_s * 1e3,
                         tokens_per_s=1 / step_s))
    hf = None           # the model's GPU memory goes back before the next benchmark
    torch.cuda.empty_cache()
    return rows


def cold_start(argv, env=None, runs=2, timeout=900):
    """Wall seconds of `argv` in `runs` fresh processes, one after the other (caches filled by the first stay for
    the next), and the last lines each wrote to stderr."""
    import os
    import subprocess
    rows = []
    for i in range(runs):
        t0 = time.perf_counter()
        done = subprocess.run(argv, env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                              timeout=timeout)
        rows.append(dict(run=i + 1, seconds=time.perf_counter() - t0, returncode=done.returncode,
                         stdout=done.stdout[-2000:], stderr=done.stderr[-2000:]))
    return rows
