"""Download TinyLlama-1.1B-Chat-v1.0 (safetensors, tokenizer, configs: ~2.2 GB) from the Hugging Face Hub.

    python weights/download.py                 # into the Hugging Face cache (~/.cache/huggingface/hub)
    python weights/download.py --dir models/tinyllama
    python weights/download.py --repo OTHER/LlamaModel

Once it is in the cache, `tinyllm.load_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0")` and the CLI find it
offline. The logic lives in tinyllm/hub.py; this is its command line.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from tinyllm.hub import MODEL_ID, HubError, download  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=MODEL_ID, help=f"Hub repo id (default {MODEL_ID})")
    parser.add_argument("--dir", default=None, help="download into this directory instead of the HF cache")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    args = parser.parse_args(argv)
    try:
        path = download(args.repo, local_dir=args.dir, revision=args.revision)
    except HubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
