"""The GPU report: every kernel timed next to torch SDPA in one run, tables printed and written, one plot each.

    python benchmarks/gpu_report.py --out bench-out            # everything (about 5 minutes on an H100)
    python benchmarks/gpu_report.py --out bench-out --sections prefill,tiles

Needs a CUDA GPU (numba-cuda) and, for the comparisons, torch. Writes <out>/report.md (the tables that go into
BENCHMARKS.md), <out>/*.png (one plot per table) and <out>/rows.json (every measurement).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from numbattn import bench, prefill  # noqa: E402
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
    """Causal and non-causal prefill at TinyLlama's head shape, every implementation side by side."""
    rows = []
    for b in args.batches:
        lens = [n for n in args.seq_lens if b * n <= 16 * 2048 or n <= 1024 or b == 1]
        rows += bench.bench_prefill(lens, batches=(b,), causal=(True, False), versions=("v0", "v1", "v2"),
                                    reference_max_n=0, repeat=args.repeat)
    for causal in (True, False):
        sub = [r for r in rows if r["causal"] == causal]
        for value, unit in (("ms", "milliseconds"), ("tflops", "TFLOP/s")):
            table, cols = bench.pivot(sub, ("batch", "n"), value)
            emit(report, f"Prefill, {'causal' if causal else 'non-causal'}: {unit} (32 q / 4 kv heads, d 64)",
                 table, cols)
        bench.plot([r for r in sub if r["batch"] == 1], os.path.join(out, f"prefill_{'causal' if causal else 'full'}.png"),
                   y="ms", title=f"prefill {'causal' if causal else 'non-causal'}, batch 1, 32/4 heads, d 64")
    return rows


@section
def tiles(report, out, args):
    """Launch-configuration sweep of v2 (and v1) at n = 4096 causal: time, registers, spills, shared memory."""
    from numba import cuda
    q, k, v = bench.random_qkv(1, 4096, 4096)
    dq, dk, dv = (cuda.to_device(x) for x in (q, k, v))
    o = cuda.device_array(q.shape, np.float32)
    flops = bench.attention_flops(1, 32, 4096, 4096, 64, True)
    configs = [("v1", Tiles(64, 64, 64)), ("v1", Tiles(128, 32, 128))]
    configs += [("v2", t) for t in (Tiles(64, 32, 128), Tiles(64, 32, 64), Tiles(32, 32, 64), Tiles(64, 16, 128),
                                    Tiles(32, 32, 128), Tiles(64, 32, 256), Tiles(64, 16, 64), Tiles(32, 16, 64))]
    rows = []
    for ver, t in configs:
        try:
            fn = lambda: prefill.launch(dq, dk, dv, o, True, 0.125, ver, t)
            ms = bench.timed(fn, "cuda", repeat=args.repeat)
            kern = prefill._make(ver, 64, t)
            one = lambda d: list(d.values())[0]  # per-signature dicts; the sweep compiled one signature
            rows.append(dict(impl=f"{ver} {t.block_m}x{t.block_n}/{t.threads}thr", ms=ms, tflops=flops / ms / 1e9,
                             regs=one(kern.get_regs_per_thread()), local_bytes=one(kern.get_local_mem_per_thread()),
                             smem_bytes=one(kern.get_shared_mem_per_block())))
        except Exception as e:
            rows.append(dict(impl=f"{ver} {t.block_m}x{t.block_n}/{t.threads}thr", ms=float("nan"),
                             error=f"{type(e).__name__}: {e}"[:100]))
    emit(report, "Tile sweep, causal prefill n = 4096, batch 1", rows,
         ["impl", "ms", "tflops", "regs", "local_bytes", "smem_bytes", "error"])
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
        for ver in ("v1", "v2"):
            got = prefill.flash_attention(q, k, v, causal=causal, version=ver, backend="cuda")
            rows.append(dict(impl=f"numbattn {ver}", causal=causal,
                             max_rel_err=float(np.abs(got - ref).max() / np.abs(ref).max())))
    emit(report, "Accuracy at n = 4096 (batch 1, 32/4 heads, d 64) vs fp64", rows, ["impl", "causal", "max_rel_err"])
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
    rows = [dict(impl="numbattn v2", extra_MiB=(free0 - free1) / 2**20, qkvo_MiB=qkvo / 2**20,
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
         "output included; torch: peak allocated minus allocated before). nxn_fp32_MiB: what one fp32 score "
         "matrix per head would take.")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--seq-lens", default="128,512,1024,2048,4096,8192")
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    args.seq_lens = [int(x) for x in args.seq_lens.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]
    os.makedirs(args.out, exist_ok=True)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    report = [f"device: {smi}\ndate: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
              f"command: python benchmarks/gpu_report.py {' '.join(sys.argv[1:])}\n"]
    print(report[0], flush=True)
    all_rows = {}
    for name in args.sections.split(","):
        t0 = time.time()
        all_rows[name] = SECTIONS[name](report, args.out, args)
        print(f"[{name}: {time.time() - t0:.0f} s]", flush=True)
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write("\n".join(report))
        with open(os.path.join(args.out, "rows.json"), "w") as f:
            json.dump(all_rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
