"""CPU: a GGUF file kept in its quantized blocks (Numba kernels) against the same file dequantized to fp32 (NumPy and
BLAS, how tinyllm ran GGUF files before issue 28), timed in turns in one process.

    python benchmarks/cpu_quantized.py                        # SmolLM2-135M Q4_1 (fetched once), a 41-token prompt
    python benchmarks/cpu_quantized.py -m path/to/model.gguf --prompt 41 --new-tokens 32 --repeat 5 -t 1
    python benchmarks/cpu_quantized.py --llama-bench path/to/llama-bench      # llama.cpp in the same rounds

Prints uptime's line before and after (this machine is shared: read the load), then one row per form: the kinds
kept, MB of weights in RAM and read per token, the prompt's prefill (ms and tok/s, its first token included),
decode (ms per token and tok/s, the median step over --new-tokens), and the prompt's last logits against the
fp32 form's. Threads: the BLAS rule of `chat` (one per core other programs leave idle; Numba's kernels get as
many), or -t N. --llama-bench: llama.cpp's benchmark on the same file, the same prompt and token counts and
thread count, run once after each round (`-r 1 -o json`), so that the machine's changing load weighs on both
alike; its row shows the medians, and the ratios are medians of each round's own ratio.
"""
import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "18")     # before NumPy loads OpenBLAS: tinyllm/threads.py says why

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from numbattn.lab import bench  # noqa: E402
from tinyllm.threads import BlasThreads  # noqa: E402

COLUMNS = ["weights", "kinds", "weights_MB", "token_MB", "prompt", "prefill_ms", "prefill_tok_s", "decode_ms",
           "decode_tok_s", "logits_err"]


def uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="smollm2")
    parser.add_argument("--prompt", type=int, default=41, help="prompt tokens (the issue's prefill figure: 41)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds (each form once a round)")
    parser.add_argument("-t", "--threads", type=int, default=None)
    parser.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench, timed in the same rounds")
    args = parser.parse_args(argv)
    threads = BlasThreads(args.threads)
    print(f"before: {uptime()}", flush=True)
    n = threads.update()
    peer = [] if args.llama_bench else None

    def llama_cpp(_round):
        peer.append(run_llama_bench(args.llama_bench, args.model, n, args.prompt, args.new_tokens))
    rows = bench.bench_weights(args.model, ("fp32", "as-stored"), "numpy", args.prompt, args.new_tokens, args.repeat,
                               between=llama_cpp if peer is not None else None)
    print(f"after:  {uptime()}")
    print(f"{args.model}: {threads.describe(n)}, medians of {args.repeat} rounds\n")
    if peer:
        rows.append(dict(weights="llama.cpp", kinds="(its own)", prompt=args.prompt,
                         prefill_ms=statistics.median(1e3 * args.prompt / pp for pp, _ in peer),
                         prefill_tok_s=statistics.median(pp for pp, _ in peer),
                         decode_ms=statistics.median(1e3 / tg for _, tg in peer),
                         decode_tok_s=statistics.median(tg for _, tg in peer)))
    print(bench.format_table(rows, COLUMNS))
    fp32, kept = rows[:2]
    print(f"\nas stored / fp32: decode {kept['decode_tok_s'] / fp32['decode_tok_s']:.2f}x, prefill "
          f"{kept['prefill_tok_s'] / fp32['prefill_tok_s']:.2f}x")
    if peer:
        ours = kept["runs"]
        decode = statistics.median(1e3 / d / tg for (_, d), (_, tg) in zip(ours, peer, strict=True))
        prefill = statistics.median(1e3 * args.prompt / p / pp for (p, _), (pp, _) in zip(ours, peer, strict=True))
        print(f"as stored / llama.cpp (median of the rounds' ratios): decode {decode:.2f}x, prefill {prefill:.2f}x")


def run_llama_bench(binary, model, threads, prompt, new_tokens):
    """One llama-bench run on the model's file -> (prompt tok/s, decode tok/s)."""
    from tinyllm.hub import resolve_model
    path = resolve_model(model)
    out = subprocess.run([binary, "-m", str(path), "-t", str(threads), "-p", str(prompt), "-n", str(new_tokens),
                          "-r", "1", "-o", "json"], capture_output=True, text=True, check=True).stdout
    tests = json.loads(out)
    rate = {("pp" if t["n_prompt"] else "tg"): t["avg_ts"] for t in tests}
    return rate["pp"], rate["tg"]


if __name__ == "__main__":
    sys.exit(main())
