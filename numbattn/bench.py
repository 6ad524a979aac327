"""Benchmarks: time numbattn's kernels next to the NumPy reference and torch's scaled_dot_product_attention.

Used by `python cli.py bench` and benchmarks/gpu_report.py. Speed is shown here, in printed tables and plots,
never asserted in tests.

Method (see BENCHMARKS.md): on a GPU every number is the median of `repeat` calls, each timed with CUDA
events around the call on the default stream after `warmup` untimed calls; inputs are random normal, never
zeros. On the simulator or NumPy backends a host clock is used (those numbers only show the harness works).
Causal FLOPs are counted as half of the full q_len×kv_len work (the diagonal tiles' extra is ignored), so
TFLOP/s of causal and non-causal runs are comparable.
"""
import logging
import statistics
import time

import numpy as np

from . import backend as _backend
from . import prefill, reference

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


def timed(fn, be, warmup=3, repeat=20):
    """Median milliseconds of fn() on backend `be` ("cuda": CUDA events; otherwise a host clock)."""
    for _ in range(warmup):
        fn()
    times = []
    if be == "cuda":
        from numba import cuda
        for _ in range(repeat):
            start, end = cuda.event(), cuda.event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(cuda.event_elapsed_time(start, end))
    elif be == "torch":
        torch = torch_cuda()
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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
                  reference_max_n=1024, naive_max_work=2**22, repeat=20, progress=None):
    """Rows of {what, impl, batch, n, causal, ms, tflops, frac_fp32_peak} for every combination."""
    be = _backend.resolve(backend)
    rows = []
    combos = [(b, n, c) for b in batches for n in seq_lens for c in causal]
    for b, n, c in combos:
        q, k, v = random_qkv(b, n, n)
        # v0 (naive) re-reads K/V from global memory per query: only worth timing at small sizes
        vers = [x for x in versions if x != "v0" or b * n * n <= naive_max_work * N_KV_HEADS]
        impls = prefill_impls(be, vers, q, k, v, c, with_reference=n <= reference_max_n)
        flops = attention_flops(b, N_HEADS, n, n, HEAD_DIM, c)
        for name, fn in impls.items():
            clock = "torch" if name.startswith("torch") else ("cuda" if be == "cuda" else "host")
            try:
                ms = timed(fn, clock, warmup=1 if be != "cuda" else 3, repeat=repeat if be == "cuda" else 1)
            except Exception as e:  # e.g. an SDPA backend that refuses this shape: record, keep going
                log.warning("bench: %s failed at batch %d n %d: %s", name, b, n, e)
                continue
            tflops = flops / ms / 1e9
            rows.append(dict(what="prefill", impl=name, batch=b, n=n, causal=c, ms=ms, tflops=tflops,
                             frac_fp32_peak=tflops / FP32_PEAK_TFLOPS))
        if progress:
            progress(1)
    return rows


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
