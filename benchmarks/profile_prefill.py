"""Profile helper for the GPU machine: one launch of a prefill kernel (for ncu) and its SASS.

    ncu --kernel-name regex:attention_v2 --launch-skip 1 --launch-count 1 python benchmarks/profile_prefill.py v2
    python benchmarks/profile_prefill.py v2 --sass OUT.sass
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from numba import cuda  # noqa: E402

from numbattn import prefill  # noqa: E402
from numbattn.lab import bench  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("version", default="v2")
ap.add_argument("--n", type=int, default=4096)
ap.add_argument("--tiles", default="", help="block_m,block_n,threads")
ap.add_argument("--sass", default="")
args = ap.parse_args()
q, k, v = bench.random_qkv(1, args.n, args.n)
dq, dk, dv = (cuda.to_device(x) for x in (q, k, v))
o = cuda.device_array(q.shape, np.float32)
tiles = prefill.Tiles(*map(int, args.tiles.split(","))) if args.tiles else prefill.gpu_tiles(args.version, 64)
for _ in range(2):
    prefill.launch(dq, dk, dv, o, True, 0.125, args.version, tiles)
cuda.synchronize()
if args.sass:
    kern = prefill.make_kernel(args.version, 64, tiles)
    with open(args.sass, "w") as f:
        f.write(list(kern.inspect_sass().values())[0])
