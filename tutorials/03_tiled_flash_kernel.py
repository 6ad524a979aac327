"""
Lesson 3: the tiled FlashAttention kernel, tile by tile
=======================================================

What you will learn
-------------------
* Where the bytes live on a GPU (global memory, shared memory, registers) and why a kernel's speed is
  mostly a question of how often it goes back to global memory.
* numbattn's three prefill kernels, side by side (numbattn/prefill.py, numbattn/prefill_v2.py):
    v0  one thread per query row, every key and value read from global memory by every row;
    v1  a block of threads shares each K/V tile through shared memory (one query row per thread);
    v2  each thread owns a TM×TN register tile of scores and a TM×TE tile of the output, with strided
        ownership for conflict-free shared-memory reads and small group reductions for the row max and sum.
* How many bytes each one moves, in a printed table (against the naive attention of lesson 1), and why the
  bytes are not the whole story (caches, shared-memory loads per FMA).
* The details that make or break a tiled kernel: coalesced cooperative loads, padding against shared-memory
  bank conflicts, barriers (`cuda.syncthreads()`), and the tile that crosses the end of the sequence.
* Finally we run all three kernels in the simulator (or on your GPU) and check them against the reference.

Run it: `python tutorials/03_tiled_flash_kernel.py`, or run the `# %%` cells in VS Code / Jupyter.
"""

# %%
import _setup  # noqa: F401  (must be the first import: GPU or simulator, see tutorials/README.md)

import numpy as np
from numba import cuda

import numbattn
from numbattn import bench, prefill, prefill_v2, reference

BACKEND = numbattn.available_backends()[0]
print(f"engine: {_setup.ENGINE}; numbattn backend: {BACKEND}")
assert BACKEND in ("cuda", "sim"), "this lesson runs the kernels: it needs a GPU or NUMBA_ENABLE_CUDASIM=1"

N_HEADS, N_KV_HEADS, D = bench.N_HEADS, bench.N_KV_HEADS, bench.HEAD_DIM    # TinyLlama: 32, 4, 64
FP32 = 4
SHARED_LIMIT = 48 * 1024        # static shared memory per block (bytes)
L2_BYTES = 50 * 2**20           # an H100's L2 cache


def human(nbytes):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1024


# %% [markdown]
# ## Where the bytes live
#
# A GPU kernel is a grid of *blocks*; each block is a group of threads (up to 1024) that run on one
# streaming multiprocessor (SM) and can cooperate. Three kinds of memory matter here:
#
#     global memory (HBM)  80 GB, every thread can read it, ~3 TB/s in total       <- q, k, v, out live here
#     shared memory        up to 228 KB per SM, shared by the threads of a block,    <- a tile of K and V
#                          ~10x the bandwidth; 48 KB per block for static arrays
#     registers            per thread, the fastest. A `cuda.local.array` of fixed    <- m_i, l_i, acc, scores
#                          size lives there when the compiler can unroll every loop
#                          over it; otherwise it goes to "local memory", which is
#                          really global memory behind a cache
#
# An H100 does ~67 TFLOP/s of fp32 math but reads only ~3 TB/s from HBM: to keep the arithmetic units
# busy a kernel must do ~22 FLOPs per byte it fetches from global memory. Attention does 4·d FLOPs per
# (query, key) pair, so everything depends on how many times each K and V element is fetched.

# %% [markdown]
# ## v0: the online softmax, one thread per query row
#
# v0 (`make_v0` in numbattn/prefill.py) is lesson 2's loop, key by key, in one thread per query row:
#
#     for j in range(n_keys):
#         s = sum_d q[i, d] * k[j, d]          <- d loads from global memory
#         ... online softmax update ...
#         acc[d] = acc[d] * alpha + p * v[j, d]  <- d more loads from global memory
#
# It never builds the score matrix, but every query row fetches *all* of K and V itself: q_len times
# 2·kv_len·d values per head. (The 32 threads of a warp read the same key at the same moment, which the
# hardware merges into one broadcast, so the real cost is closer to 1/32 of that, still q_len/32 passes
# over K and V.)
#
# ## v1: share each K/V tile across a block
#
# v1 (`make_v1`) gives a block BLOCK_M query rows (one per thread) and walks the keys in tiles of BLOCK_N:
#
#     1. the block loads its Q tile into shared memory once, pre-scaled by scale * log2(e) (lesson 2)
#     2. for each key tile:
#          syncthreads                       (nobody still reads the previous tile)
#          all threads together copy K[j0:j0+BN] and V[j0:j0+BN] into shared memory
#          syncthreads                       (the tile is complete before anyone reads it)
#          each thread: BN scores from shared memory, online softmax update, acc += p·V_tile
#     3. each thread writes acc / l_i for its row
#
# Each K/V element fetched from global memory now serves BLOCK_M query rows instead of one. The copy in
# step 2 is *cooperative*: element idx of the tile goes to thread idx % BLOCK_M, so at any moment
# consecutive threads read consecutive addresses and the hardware combines a warp's 32 loads into a few
# wide transactions (a "coalesced" load). Here is who loads what, for a tile of 4 keys × 8 dims and
# 4 threads:

# %%
def loader_map(block_n, head_dim, threads):
    """owner[r, c] = the thread that copies element (r, c) of a K/V tile: `for idx in range(t, BN*D, threads)`."""
    owner = np.empty((block_n, head_dim), dtype=int)
    for t in range(threads):
        for idx in range(t, block_n * head_dim, threads):
            owner[idx // head_dim, idx % head_dim] = t
    return owner


print("thread that loads K_tile[r, c] (rows r = keys, columns c = head dims):")
print(loader_map(4, 8, 4))
assert (loader_map(4, 8, 4).ravel() == np.arange(32) % 4).all()   # consecutive threads, consecutive addresses

# %% [markdown]
# Shared memory is finite, and that bounds the tiles. v1's shared arrays are Q [BM, D+1], K [BN, D] and
# V [BN, D] (why D+1 comes below); v2 adds a P tile [BM, BN+1]. CUDA documents 48 KiB as the most a block
# may declare *statically* (`cuda.shared.array`), and on GPUs before Hopper ptxas rejects more ("uses too
# much shared data (..., 0xc000 max)"). On the H100 (compute capability 9.0) Numba's kernels with 65-115 KB
# of static shared memory compiled, ran and matched the reference, and the bigger v2 tiles were up to 1.8x
# faster (the launch-shape sweep in BENCHMARKS.md), so numbattn picks tiles per compute capability (and,
# on sm_90, only after a one-time probe kernel with 64 KB of static shared memory has run: ptxas inside
# nvJitLink, which some installs link through, rejects it even there):

# %%
def v1_shared_bytes(block_m, block_n, head_dim):
    return FP32 * (block_m * (head_dim + 1) + 2 * block_n * head_dim)


rows = []
for cc in ((8, 0), (9, 0)):
    for version in prefill.VERSIONS:
        for head_dim in (64, 128):
            t = prefill.gpu_tiles(version, head_dim, cc=cc)
            smem = {"v0": 0, "v1": v1_shared_bytes(t.block_m, t.block_n, head_dim),
                    "v2": prefill_v2.shared_bytes(t.block_m, t.block_n, head_dim)}[version]
            rows.append(dict(cc=f"{cc[0]}.{cc[1]}", version=version, head_dim=head_dim, block_m=t.block_m,
                             block_n=t.block_n, threads=t.threads, shared_bytes=smem,
                             over_48KiB="yes" if smem > SHARED_LIMIT else ""))
            assert cc >= (9, 0) or smem <= SHARED_LIMIT   # pre-Hopper tiles must fit the static limit
print(bench.format_table(rows, ["cc", "version", "head_dim", "block_m", "block_n", "threads", "shared_bytes",
                                "over_48KiB"]))

# %% [markdown]
# ## How many bytes move
#
# Global-memory bytes per attention call at TinyLlama's shape (32 query heads, 4 KV heads, d = 64), batch 1,
# not causal, fp32, counting what the threads request:
#
#     naive    lesson 1's NumPy: write S, read S, write P, read P: 4·n² numbers per head (+ q, k, v, out)
#     v0       every query row reads all of K and V: n · 2·n·d per head (/32 with the warp broadcast)
#     v1, v2   K and V once per query tile: ceil(n / BLOCK_M) · 2·n·d per head, plus q and out once
#     minimum  q, k, v and out read or written once
#
# With BLOCK_M = 64 = d, v1 requests only ~2x fewer bytes than the naive four passes: a tiled kernel is not
# magic. What differs is *where* they come from. The tiled kernels re-read the same K and V of one KV
# head (2·n·d·4 bytes: 1 MiB at n = 2048), which 8 query heads share too, and that stays in the GPU's
# 50 MB L2 cache; the naive score matrix (16 MiB per head at n = 2048, 512 MiB per layer) cannot, so all
# of its traffic goes to HBM. And the tiled kernels need O(n) memory instead of O(n²).

# %%
def traffic(n, block_m_v1, block_m_v2):
    q_o = 2 * N_HEADS * n * D * FP32                 # q read once, out written once
    kv_once = 2 * N_KV_HEADS * n * D * FP32          # k and v read once
    kv_per_pass = 2 * n * D * FP32                   # one pass over k and v of one head
    return dict(
        n=n,
        naive=human(4 * N_HEADS * n * n * FP32 + q_o + kv_once),
        v0=human(N_HEADS * n * kv_per_pass + q_o),
        v0_warp=human(N_HEADS * -(-n // 32) * kv_per_pass + q_o),
        v1=human(N_HEADS * -(-n // block_m_v1) * kv_per_pass + q_o),
        v2=human(N_HEADS * -(-n // block_m_v2) * kv_per_pass + q_o),
        minimum=human(q_o + kv_once),
        kv_of_one_head=human(kv_per_pass),
        s_of_one_head=human(n * n * FP32))


H100 = (9, 0)                   # compute capability whose tiles these tables show
bm1, bm2 = prefill.gpu_tiles("v1", D, cc=H100).block_m, prefill.gpu_tiles("v2", D, cc=H100).block_m
table = [traffic(n, bm1, bm2) for n in (512, 2048, 8192)]
print(f"global-memory bytes requested per call (BLOCK_M: v1 {bm1}, v2 {bm2}); L2 cache = {human(L2_BYTES)}")
print(bench.format_table(table, ["n", "naive", "v0", "v0_warp", "v1", "v2", "minimum", "kv_of_one_head",
                                 "s_of_one_head"]))

# %% [markdown]
# v2's taller query tile halves the K/V re-reads, but those come from L2 anyway: with v2 on v1's tiles
# (64 rows) it is still ~6x faster than v1 (BENCHMARKS.md). The reason is what happens *inside* the block.
#
# ## v2: a register tile per thread
#
# In v1 each score costs two shared-memory loads (a Q element and a K element) for one FMA, and the output
# update one load (a V element) per FMA: the kernel is limited by shared-memory bandwidth, not arithmetic.
# v2 (numbattn/prefill_v2.py) treats each tile as two small matrix products, S = Q·K^T and O += P·V, and
# tiles them over threads the way a GEMM does. The threads form a TR × TC grid; thread (rg, cg) owns
#
#     query rows   rg + TR·i   for i < TM        (its rows of S and of O)
#     keys         cg + TC·j   for j < TN        (its columns of S)
#     output dims  cg + TC·e   for e < TE        (its columns of O)
#
# and keeps a TM×TN block of scores and a TM×TE block of the output in registers. For each of the d steps
# of S = Q·K^T it loads TM Q values and TN K values and does TM·TN FMAs. The layout of the GPU tiles:

# %%
t2 = prefill.gpu_tiles("v2", D, cc=H100)
TR, TC, TM, TN, TE = prefill_v2.layout(t2.block_m, t2.block_n, t2.threads, D)
print(f"v2 at d={D}: BLOCK_M={t2.block_m} x BLOCK_N={t2.block_n}, {t2.threads} threads as TR={TR} x TC={TC}; "
      f"each thread: TM={TM} rows, TN={TN} keys, TE={TE} output dims")
print(f"  S = Q K^T : per d step {TM}+{TN} = {TM + TN} shared loads feed {TM * TN} FMAs "
      f"({TM * TN / (TM + TN):.2f} FMAs per load; v1: 0.5)")
print(f"  O += P V  : per key {TM}+{TE} = {TM + TE} shared loads feed {TM * TE} FMAs "
      f"({TM * TE / (TM + TE):.2f} FMAs per load; v1: 1)")

owner = np.empty((t2.block_m, t2.block_n), dtype=int)          # which thread owns score S[r, c]
for t in range(t2.threads):
    rg, cg = t // TC, t % TC
    for i in range(TM):
        for j in range(TN):
            owner[rg + TR * i, cg + TC * j] = t
print(f"\nowner thread of each score in the first 4 rows x 16 keys of the {t2.block_m}x{t2.block_n} tile:")
print(owner[:4, :16])
print(f"rows {TR} apart belong to the same thread, e.g. thread 0 owns rows {[TR * i for i in range(TM)]} and "
      f"keys {[TC * j for j in range(TN)]}")
assert sorted(np.bincount(owner.ravel())) == [TM * TN] * t2.threads   # every thread owns TM*TN scores

# %% [markdown]
# ### Why strided ownership, and why D+1: shared-memory banks
#
# Shared memory is split into 32 banks, 4-byte word w lives in bank w % 32, and a warp's loads are served
# in one cycle only if no two threads hit *different* words of the same bank (the same word is a free
# broadcast). In the S step the TC threads of a row group load K[key, d] for their keys cg + TC·j: rows
# of the K tile, one row length apart in memory. With rows of exactly d = 64 words (a multiple of 32) every
# one of them lands in the same bank and the loads are served one after the other; padding each row by one
# word (the `D + 1` in the shared arrays) spreads them over consecutive banks. The same padding fixes v1's Q
# reads, where thread t reads Q[t, d].

# %%
def banks(keys, d, stride):
    return [(key * stride + d) % 32 for key in keys]


keys_of_group = [cg for cg in range(TC)]          # j = 0: the TC threads of a row group, at the same step d
print(f"banks hit by the {TC} threads of a row group reading K[cg, d=5]:")
print(f"  rows of {D} words (no padding): {banks(keys_of_group, 5, D)}  -> {TC}-way conflict")
print(f"  rows of {D + 1} words (padded)   : {banks(keys_of_group, 5, D + 1)}  -> conflict-free")
assert len(set(banks(keys_of_group, 5, D))) == 1 and len(set(banks(keys_of_group, 5, D + 1))) == TC

# %% [markdown]
# ### Group reductions: a row's max and sum spread over TC threads
#
# The online softmax needs the max of each query row over the tile, but in v2 a row's BLOCK_N scores are
# spread over the TC threads of its row group (TN each). Each thread takes the max of its own TN scores, then
# the group combines TC partial maxima (`group_max`: on a GPU, log2(TC) warp-shuffle steps; in the
# simulator, which has no shuffles, a shared-memory twin). All TC threads then use the same m_new, so their
# alpha and exp2(s - m_new) agree. The row sum l_i needs no per-tile exchange at all: each thread keeps the
# partial sum over its own columns (rescaled by the same alpha), and the group adds the partials once, at
# the very end. In NumPy, for one tile:

# %%
rng = np.random.default_rng(0)
S = rng.standard_normal((t2.block_m, t2.block_n)).astype(np.float32)   # one score tile
partial_max = np.full((t2.threads, TM), -np.inf, np.float32)             # per thread, per owned row
partial_sum = np.zeros((t2.threads, TM), np.float32)
for t in range(t2.threads):
    rg, cg = t // TC, t % TC
    mine = S[np.ix_([rg + TR * i for i in range(TM)], [cg + TC * j for j in range(TN)])]   # [TM, TN]
    partial_max[t] = mine.max(axis=1)
group_of = np.arange(t2.threads) // TC                                  # threads of a row group: t // TC
group_max = np.stack([partial_max[group_of == g].max(axis=0) for g in range(TR)])   # [TR, TM]
for t in range(t2.threads):                                             # exp with the SHARED max, own columns
    rg, cg = t // TC, t % TC
    mine = S[np.ix_([rg + TR * i for i in range(TM)], [cg + TC * j for j in range(TN)])]
    partial_sum[t] = np.exp2(mine - group_max[rg][:, None]).sum(axis=1)
group_sum = np.stack([partial_sum[group_of == g].sum(axis=0) for g in range(TR)])   # [TR, TM]
row_max = np.array([group_max[r % TR, r // TR] for r in range(t2.block_m)])
row_sum = np.array([group_sum[r % TR, r // TR] for r in range(t2.block_m)])
print("row maxima from group reductions == S.max(axis=1):", np.allclose(row_max, S.max(axis=1)))
print("row sums   from group reductions == sum exp2(S - max):",
      np.allclose(row_sum, np.exp2(S - S.max(axis=1, keepdims=True)).sum(axis=1), rtol=1e-6))
assert np.allclose(row_max, S.max(axis=1))
assert np.allclose(row_sum, np.exp2(S - S.max(axis=1, keepdims=True)).sum(axis=1), rtol=1e-6)

# %% [markdown]
# One more piece of v2: P (the exponentiated score tile) goes through shared memory between the two
# products, because thread (rg, cg) needs *every* key of the tile for its output columns, but computed
# only TN of them. That costs a barrier per tile, and BLOCK_M·(BLOCK_N+1) words of shared memory.
#
# ## Edges: the last tile
#
# A sequence length is rarely a multiple of the tile. Rows past q_len are loaded as zeros and never written;
# keys past kv_len are loaded as zeros and their scores set to -inf, so exp2 gives exactly 0 and they drop
# out of l_i and acc. v2 applies that mask only in the tile that needs it (it costs a compare per score).
#
# ## Running the kernels
#
# In the simulator every CUDA thread is a Python thread, so the tiles are tiny (`prefill.SIM_TILES`), but
# the code is exactly the GPU code. We use an odd length (19: ragged last tiles), grouped-query heads,
# causal and not, and an output buffer poisoned with NaN: a single element the kernel forgets to write
# would show up as NaN.

# %%
if BACKEND == "sim":
    for version, t in prefill.SIM_TILES.items():
        print(f"simulator tiles for {version}: {t}")
    ts = prefill.SIM_TILES["v2"]
    print("v2 simulator layout (TR, TC, TM, TN, TE) at d=16:",
          prefill_v2.layout(ts.block_m, ts.block_n, ts.threads, 16))

q, k, v = bench.random_qkv(1, 19, 19, n_heads=4, n_kv_heads=2, head_dim=16, seed=1)
q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
for version in prefill.VERSIONS:
    for causal in (False, True):
        out = cuda.to_device(np.full(q.shape, np.nan, np.float32))
        got = prefill.flash_attention(q, k, v, causal=causal, version=version, out=out)
        err = np.abs(got - reference.attention(q64, k64, v64, causal=causal)).max()
        print(f"{version} causal={causal!s:5}: max |kernel - fp64 reference| = {err:.1e}")
        assert not np.isnan(got).any(), f"{version} left output elements unwritten"
        assert err < 1e-5

# %% [markdown]
# ## Correctness check
#
# All three kernels agree with the fp64 reference to float32 rounding (asserted above). Also at the
# production head dims 64 and 128 (the tiles change with d), with fp16 inputs (stored fp16, computed fp32),
# and with several query tiles per head:

# %%
for head_dim, dtype in ((64, np.float32), (128, np.float16)):
    q, k, v = bench.random_qkv(1, 9, 9, n_heads=2, n_kv_heads=1, head_dim=head_dim, seed=head_dim, dtype=dtype)
    want = reference.attention(*(x.astype(np.float64) for x in (q, k, v)), causal=True)
    for version in prefill.VERSIONS:
        err = np.abs(prefill.flash_attention(q, k, v, causal=True, version=version) - want).max()
        print(f"d={head_dim:3d} {np.dtype(dtype).name}: {version} max error {err:.1e}")
        assert err < 1e-5
print("lesson 3 checks passed")

# %% [markdown]
# ## Benchmark
#
# On a GPU: v0, v1 and v2 at TinyLlama's shape, causal, with the NumPy reference for scale and torch's
# attention when torch is installed. Watch v0 fall behind as n grows (it re-reads K and V per query row),
# and v2 beat v1 (more FMAs per shared-memory load). Without a GPU: simulator times at a tiny shape, which
# only show that the code runs (they measure Python threads, not the algorithm).

# %%
print(bench.prefill_benchmark_text(BACKEND, versions=prefill.VERSIONS, seq_lens=(1024, 2048, 4096)))
