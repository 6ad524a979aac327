"""Write a miniature random TinyLlama checkpoint (same files and layout, ~150k parameters) for offline use.

    python weights/make_tiny.py OUTDIR [--seed 0]
    python cli.py chat --model OUTDIR            # talks deterministic nonsense, instantly

The logic lives in tinyllm/tiny.py (make_tiny), which the tests call directly.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from tinyllm.tiny import make_tiny  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", help="directory to write (created if needed)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (the tokenizer is always the same)")
    args = parser.parse_args(argv)
    print(make_tiny(args.outdir, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
