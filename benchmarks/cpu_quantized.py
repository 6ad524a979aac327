"""CPU: a GGUF file kept in its quantized blocks (Numba kernels) against the same file dequantized to fp32 (NumPy and
BLAS, how tinyllm ran GGUF files before issue 28), timed in turns in one process.

    python benchmarks/cpu_quantized.py                        # SmolLM2-135M Q4_1 (fetched once), a 41-token prompt
    python benchmarks/cpu_quantized.py -m path/to/model.gguf --prompt 41 --new-tokens 32 --repeat 5 -t 1

Prints uptime's line before and after (this machine is shared: read the load), then one row per form: the kinds
kept, MB of weights in RAM and read per token, the prompt's prefill (ms and tok/s, its first token included),
decode (ms per token and tok/s, the median step over --new-tokens), and the prompt's last logits against the
fp32 form's. Threads: the BLAS rule of `chat` (one per core other programs leave idle; Numba's kernels get as
many), or -t N.
"""
import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "18")     # before NumPy loads OpenBLAS: tinyllm/threads.py says why

import argparse
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
    args = parser.parse_args(argv)
    threads = BlasThreads(args.threads)
    print(f"before: {uptime()}", flush=True)
    n = threads.update()
    rows = bench.bench_weights(args.model, ("fp32", "as-stored"), "numpy", args.prompt, args.new_tokens, args.repeat)
    print(f"after:  {uptime()}")
    print(f"{args.model}: {threads.describe(n)}, medians of {args.repeat} rounds\n")
    print(bench.format_table(rows, COLUMNS))
    fp32, kept = rows
    print(f"\nas stored / fp32: decode {kept['decode_tok_s'] / fp32['decode_tok_s']:.2f}x, prefill "
          f"{kept['prefill_tok_s'] / fp32['prefill_tok_s']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
