"""The GPU report: every kernel timed next to torch SDPA in one run, tables printed and written, one plot each.

    python benchmarks/gpu_report.py --out bench-out            # everything (about 5 minutes on an H100)
    python benchmarks/gpu_report.py --out bench-out --sections prefill_sweep,tiles
    python benchmarks/gpu_report.py --out plots --replot bench-out/rows.json   # redraw plots, no GPU needed

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
# A kernel that fails must stop the report, not fall back to NumPy and be timed (or checked) in its place.
os.environ.setdefault("NUMBATTN_STRICT", "1")

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
    return rows


@section
def tiles(report, out, args):
    """Launch-configuration sweep of v2 (and v1) at n = 4096 causal: time, registers, spills, shared memory."""
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
    rows = []
    for ver, d, t in configs:
        name = f"{ver} d{d} {t.block_m}x{t.block_n}/{t.threads}thr"
        try:
            q, k, v = bench.random_qkv(1, 4096, 4096, head_dim=d)
            dq, dk, dv = (cuda.to_device(x) for x in (q, k, v))
            o = cuda.device_array(q.shape, np.float32)
            flops = bench.attention_flops(1, 32, 4096, 4096, d, True)
            ms = bench.timed(lambda: prefill.launch(dq, dk, dv, o, True, d ** -0.5, ver, t), "cuda",
                             repeat=args.repeat)
            ref = prefill.flash_attention(q[:, :, -256:], k, v, causal=True, version="v1", backend="cuda")
            kern = prefill._make(ver, d, t)
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
        for ver in ("v1", "v2"):
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
         "output included; torch: peak allocated minus allocated before). nxn_fp32_MiB: what the fp32 score "
         "matrices of all 32 heads would take.")
    return rows


@section
def decode(report, out, args):
    """One decode step over cache lengths 512..32768 (131072 with fp16 storage), next to torch SDPA."""
    lens = [n for n in (512, 2048, 8192, 32768, 131072) if n <= args.max_cache]
    rows = bench.bench_decode([n for n in lens if n <= 32768], dtypes=("float32", "float16"), repeat=args.repeat * 5,
                              reference_max_n=0)
    rows += bench.bench_decode([n for n in lens if n > 32768], dtypes=("float16",), repeat=args.repeat * 5,
                               reference_max_n=0)
    for value, unit in (("ms", "milliseconds per step"), ("gbps", "effective GB/s of K/V read")):
        table, cols = bench.pivot(rows, ("batch", "n"), value)
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
    """End to end: a TinyLlama-shaped random checkpoint, tinyllm (NumPy matmuls + numbattn on the GPU) next to
    Hugging Face transformers' eager LlamaForCausalLM fp32 (on the GPU and on the CPU) on the same weights."""
    import tempfile
    from tinyllm import load_model, make_tiny
    from tinyllm.bench import bench_model
    t0 = time.time()
    d = make_tiny(os.path.join(tempfile.mkdtemp(), "tinyllama-random"), seed=0, hidden_size=2048,
                  intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                  vocab_size=32000, max_position_embeddings=2048)
    print(f"[model: random TinyLlama-shaped checkpoint written in {time.time() - t0:.0f} s]", flush=True)
    new = args.new_tokens
    m = load_model(str(d), backend="cuda", max_len=2048)
    timings = {}  # (impl, n) -> {"prefill_ms": .., "decode_ms": ..}
    for r in bench_model(m, args.prompts, new_tokens=new, backends=["cuda", "numpy"]):
        be, phase = r["impl"].split()
        timings.setdefault((f"tinyllm, attention on numbattn {be}", r["n"]), {})[f"{phase}_ms"] = r["ms"]
    del m
    rng = np.random.default_rng(0)
    for dev in ("cuda", "cpu"):
        impl = f"HF transformers eager fp32 ({dev})"
        try:
            import torch
            import transformers
            torch.set_num_threads(os.cpu_count())
            hf = transformers.LlamaForCausalLM.from_pretrained(str(d), torch_dtype=torch.float32,
                                                               attn_implementation="eager").to(dev).eval()
            for n in args.prompts:
                ids = torch.tensor([rng.integers(3, 500, n).tolist()], device=dev)

                def gen(k):  # wall time of a greedy generate() of exactly k new tokens
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                                    do_sample=False, pad_token_id=0)
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    return time.perf_counter() - t0
                gen(2)  # warm-up
                t1, tn = gen(1), gen(new)
                timings[(impl, n)] = dict(prefill_ms=t1 * 1e3, decode_ms=(tn - t1) / (new - 1) * 1e3)
            del hf
        except Exception as e:
            timings[(impl, 0)] = dict(error=f"{type(e).__name__}: {e}"[:100])
    rows = [dict(impl=impl, prompt=n, **t, decode_tok_s=1e3 / t["decode_ms"] if "decode_ms" in t else None)
            for (impl, n), t in timings.items()]
    emit(report, "End to end, TinyLlama-1.1B shapes (22 layers, random weights), batch 1, greedy", rows,
         ["impl", "prompt", "prefill_ms", "decode_ms", "decode_tok_s", "error"],
         f"tinyllm keeps every matmul in NumPy fp32 on the host CPU ({os.cpu_count()} cores here) by design; only "
         f"attention runs on the GPU (or, for the numpy rows, in NumPy too). prefill_ms: the prompt and the first "
         f"new token; decode_ms: each of the next {new - 1} tokens.")
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
    if "model" in all_rows:
        rows = [r for r in all_rows["model"] if r.get("decode_tok_s")]
        bench.bars([f"{r['impl']}, prompt {r['prompt']}" for r in rows], [r["decode_tok_s"] for r in rows],
                   path("model"), "decode tokens/s", "TinyLlama-1.1B shapes, random weights, batch 1")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--seq-lens", default="128,512,1024,2048,4096,8192")
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--max-cache", type=int, default=131072)
    ap.add_argument("--prompts", default="128,512")
    ap.add_argument("--new-tokens", type=int, default=32)
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
        all_rows[name] = SECTIONS[name](report, args.out, args)
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
