"""CPU decode at each BLAS thread count, on an idle machine and beside busy programs (issue 33).

    python benchmarks/cpu_threads.py                      # SmolLM2 (fetched once), loads 0, 1 and 2
    python benchmarks/cpu_threads.py -m path/to/model --loads 0,2 --repeat 2

For each load L, L background processes spin (`python -c "while 1: pass"`, what another user's job looks like
to the scheduler) while `cli.py bench --what model --backend numpy` runs, first with the default thread rule
(-t auto: what chat and generate do), then at 1 thread and at every core. Each row gives the machine's load
average (uptime's) before the runs, the thread count auto chose and why, and ms per decoded token (the
mean over the new tokens of one run). The numbers that matter (issue 33): idle, auto within 10% of the best count;
under load, auto within 2x of idle. Shared machines are never idle: read the load column.
"""
import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "18")     # before NumPy loads OpenBLAS: tinyllm/threads.py says why

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench(model, threads, seq_len, new_tokens):
    """One `cli.py bench --what model` run -> ({column: ms}, the title line)."""
    cmd = [sys.executable, str(ROOT / "cli.py"), "bench", "--what", "model", "-m", model, "--backend", "numpy",
           "--seq-lens", str(seq_len), "--new-tokens", str(new_tokens), "-t", threads]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout.splitlines()
    table = [line for line in out if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    values = [c.strip() for c in table[2].strip("|").split("|")]
    return {h: float(v.split()[0]) for h, v in zip(header, values) if "decode" in h}, out[0]


def spinners(n):
    return [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="smollm2")
    parser.add_argument("--loads", default="0,1,2", help="background spinning processes, comma-separated")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1, help="rows per load")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{args.model}, prompt {args.seq_len} tokens, {args.new_tokens} new: ms per decoded token "
          f"({cores} cores usable)")
    print("| spinners | load avg before | auto: threads (why) | auto ms | 1 thread ms | "
          f"{cores} threads ms |")
    print("|---|---|---|---|---|---|")
    for load in (int(x) for x in args.loads.split(",")):
        for _ in range(args.repeat):
            procs = spinners(load)
            try:
                time.sleep(2)                                  # let them start before measuring
                before = " ".join(f"{x:.2f}" for x in os.getloadavg())
                auto, title = bench(args.model, "auto", args.seq_len, args.new_tokens)
                fixed, _ = bench(args.model, f"1,{cores}", args.seq_len, args.new_tokens)
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
            why = re.search(r"by default here: (.*)$", title)
            one = next(v for k, v in fixed.items() if k.endswith(", 1 thread") or cores == 1)
            every = next(v for k, v in fixed.items() if k.endswith(f", {cores} threads") or cores == 1)
            print(f"| {load} | {before} | {why[1] if why else '?'} | {next(iter(auto.values())):.1f} | "
                  f"{one:.1f} | {every:.1f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
