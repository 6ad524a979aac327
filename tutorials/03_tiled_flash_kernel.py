"""
Lesson 3: the tiled FlashAttention kernel, tile by tile
=======================================================

What you will learn
-------------------
* Why a kernel's speed is mostly a question of how often it goes back to global memory (HBM), using the
  words of lesson 2 (thread, block, warp, SM, shared memory, registers).
* numbattn's prefill kernels, side by side (numbattn/kernels/prefill_naive.py, prefill_tiled.py,
  prefill_registers.py, prefill_mma.py):
    v0  one thread per query row, every key and value read from global memory by every row;
    v1  a block of threads shares each K/V tile through shared memory (one query row per thread);
    v2  each thread owns a TM×TN register tile of scores and a TM×TE tile of the output, with strided
        ownership for conflict-free shared-memory reads and small group reductions for the row max and sum;
    v3  the same tiles on the GPU's matrix-multiply units, at fp32 accuracy: lesson 3b takes it apart;
        this lesson runs and counts it beside the others.
* The real v1 kernel, printed from numbattn/kernels/prefill_tiled.py with each line tied to the step of the algorithm it
  implements, and a small tiled kernel of your own whose cooperative load you write (exercise 3), scored on
  its answer, on who loaded what, and on its counted reads and writes per thread.
* How many bytes each kernel moves: the formulas, and the same numbers *counted* on the real kernels in the
  simulator (numbattn/lab/tracing.py), with pictures of which keys each block reads, of the Q tile that stays
  while K/V tiles stream past, and of who loads and owns what (tutorials/out/03_*.png).
* The details that make or break a tiled kernel: coalesced cooperative loads, padding against shared-memory
  bank conflicts, barriers (`cuda.syncthreads()`), and the tile that crosses the end of the sequence.
* Finally we run all the kernels in the simulator (or on your GPU) and check them against the reference.

Run it: `python tutorials/03_tiled_flash_kernel.py` (add `--exercise` to score your own code, `--break NAME`
to plant a mistake), or run the `# %%` cells in VS Code / Jupyter.
"""

# %%
import _setup  # noqa: F401  (must be the first import: GPU or simulator, see tutorials/README.md)

import inspect

import numpy as np
from numba import cuda, float32

import _lesson
import numbattn
import solutions
from numbattn import prefill, reference
from numbattn.kernels import prefill_mma, prefill_registers, prefill_tiled, softmax
from numbattn.lab import bench, tracing

BACKEND = numbattn.available_backends()[0]
print(f"engine: {_setup.ENGINE}; numbattn backend: {BACKEND}")
assert BACKEND in ("cuda", "sim"), "this lesson runs the kernels: it needs a GPU or NUMBA_ENABLE_CUDASIM=1"
plt = _lesson.pyplot()
COUNTING = BACKEND == "sim"     # numbattn.tracing counts memory accesses in the simulator only

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
# ## Where the bytes live, and the ridge point
#
# Lesson 2 listed them: HBM (80 GB, ~3 TB/s), the L2 cache (50 MB), shared memory (up to 228 KB per SM,
# ~10x HBM's bandwidth, 48 KB per block for arrays declared with a fixed size) and registers (per thread).
# An H100 does ~67 TFLOP/s of fp32 math but reads only ~3 TB/s from HBM: to keep the arithmetic units busy
# a kernel must do at least 67e12 / 3e12 ≈ 22 FLOPs per byte it fetches from HBM. That ratio, peak FLOP/s
# over peak bytes/s, is the GPU's *ridge point*: below it the memory system sets the speed (memory-bound),
# above it the arithmetic does (compute-bound). Attention does 4·d FLOPs per (query, key) pair, so
# everything depends on how many times each K and V element is fetched.

# %% [markdown]
# ## v0: the online softmax, one thread per query row
#
# v0 (`make_v0` in numbattn/kernels/prefill_naive.py) is lesson 2's loop, key by key, in one thread per query row:
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
#          a. syncthreads                    (nobody still reads the previous tile)
#          b. all threads together copy K[j0:j0+BN] and V[j0:j0+BN] into shared memory
#          c. syncthreads                    (the tile is complete before anyone reads it)
#          d. each thread: BN scores from shared memory
#          e. the online softmax update of lesson 2 (new max, alpha, rescale l_i and acc)
#          f. acc += p·V_tile
#     3. each thread writes acc / l_i for its row
#
# Here is the real kernel, printed from numbattn/kernels/prefill_tiled.py, with the step of the list above in the
# margin of the lines that implement it:

# %%
V1_STEPS = [("load_q_tile(q", "1"), ("for j0 in range(kv_begin, kv_end, BN)", "2"), ("cuda.syncthreads()", "2a"),
            ("load_kv_tile(k", "2b"), ("cuda.syncthreads()", "2c"),
            ("x += Qs[t, d] * Ks[jj, d]", "2d"), ("m_ref = update_row(m, l, acc, 0, m_tile)", "2e"),
            ("p = math.exp2(s[jj] - m_ref)", "2f"), ("acc[0, d] += p * Vs[jj, d]", "2f"), ("store_row(", "3")]


_lesson.show_kernel(prefill_tiled._make_v1_body, "attention_v1", V1_STEPS)
print("\nthe online-softmax update of step 2e, written once for every kernel (numbattn/kernels/softmax.py), and the "
      "rule it applies (numbattn/reference.py):")
print(inspect.getsource(softmax.make_update_row))
print(inspect.getsource(reference.softmax_rescale))
print("and the two tile loads it calls (steps 1 and 2b), device functions inlined into the kernel:")
print(inspect.getsource(prefill_tiled._make_v1_loads))

# %% [markdown]
# Things to notice in it: `q`, `k`, `v` and `out` are global memory; `Qs`, `Ks`, `Vs` are shared arrays
# (one copy per block); `s` and `acc` are *local arrays* (`cuda.local.array`), each thread's own, kept in
# registers when the compiler can. `load_q_tile` and `load_kv_tile` are *device functions* (numbattn's
# `@device`, i.e. `@cuda.jit(device=True)`: called by kernels, never launched themselves), *inlined*: the
# compiler copies their code into the kernel, so a call costs nothing. `b, h = cuda.blockIdx.z,
# cuda.blockIdx.y`: the grid is (query tiles, heads, batch), so a block knows its head and batch row from its
# own index. And the `trace` argument is the hook that lesson 2 used to print m_i and l_i.
#
# ## The cooperative load, and exercise 3
#
# Each K/V element fetched from global memory now serves BLOCK_M query rows instead of one. The copy in
# step 2b is *cooperative*: the tile's BN·D elements are numbered idx = 0, 1, ... row by row, and thread t
# copies idx = t, t + BM, t + 2·BM, ...; so at any moment consecutive threads read consecutive addresses and
# the hardware combines a warp's 32 loads into a few wide transactions (coalesced). Here is who loads what,
# for a tile of 4 keys × 8 dims and 4 threads:

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
_lesson.close("loader map vs idx % threads", loader_map(4, 8, 4).ravel(), np.arange(32) % 4)

# %% [markdown]
# Now a small tiled kernel of your own: a block of BM threads, one query row each, computes the scores
# S = q k^T of its rows one K tile at a time, copying each tile into shared memory cooperatively, with the two
# barriers of the real kernel. Exercise 3 is that copy, the whole loop: `load_tile` below. It is scored three
# ways: the scores; who loaded each element of the first tile, counted in the simulator, against the loader
# map above (coalesced); and the traffic counted per thread against a budget: each element of the tile read
# from global memory once by the block, so BN·D / BM reads of k and as many shared writes per thread per tile.

# %%
BM_EX, BN_EX, D_EX = 4, 4, 16           # query rows (= threads) per block, keys per tile, head dim


@cuda.jit(device=True)
def load_tile(k, j0, t, Ks):
    """EXERCISE 3. Copy keys j0 .. j0 + BN_EX - 1 of k [n_keys, D_EX] into the shared tile Ks [BN_EX, D_EX],
    together with the block's other BM_EX threads (you are thread t): number the tile's elements idx = 0, 1, ...
    row by row, take idx = t, t + BM_EX, ..., and store 0.0 for keys past the end of k. Budget per thread and tile:
    BN_EX * D_EX / BM_EX reads of k and as many writes of Ks."""
    pass    # <- replace this line with your loop, then run the lesson with --exercise


def make_tiled_scores(load, barriers=2):
    @cuda.jit
    def tiled_scores(q, k, s):
        t = cuda.threadIdx.x
        i = cuda.blockIdx.x * BM_EX + t                     # this thread's query row
        Ks = cuda.shared.array((BN_EX, D_EX), float32)
        for j0 in range(0, k.shape[0], BN_EX):
            cuda.syncthreads()                              # everyone is done with the previous tile
            load(k, j0, t, Ks)                              # the block copies one K tile together
            if barriers == 2:
                cuda.syncthreads()                          # the tile is complete
            for jj in range(min(BN_EX, k.shape[0] - j0)):
                if i < q.shape[0]:
                    x = float32(0.0)
                    for d in range(D_EX):
                        x += q[i, d] * Ks[jj, d]
                    s[i, j0 + jj] = x
    return tiled_scores


def run_tiled_scores(load, q, k, barriers=2):
    """-> (scores [q_len, kv_len], tracer of k, s and the shared Ks, or None when not counting)."""
    s = np.full((q.shape[0], k.shape[0]), np.nan, np.float32)
    kernel, grid = make_tiled_scores(load, barriers), -(-q.shape[0] // BM_EX)
    if not COUNTING:
        s_dev = cuda.to_device(s)
        kernel[grid, BM_EX](cuda.to_device(q), cuda.to_device(k), s_dev)
        return s_dev.copy_to_host(), None
    tracer = tracing.Tracer()
    with tracer.shared():
        kernel[grid, BM_EX](*tracer.wrap(q=q, k=k, s=s))
    return s, tracer


def first_tile_owner(tracer):
    owner = np.full((BN_EX, D_EX), -1)                     # -1: nobody loaded it
    for (j, c), threads in tracer.threads("k", block=(0,)).items():
        if j < BN_EX:
            owner[j, c] = threads[0] if len(threads) == 1 else -2   # -2: loaded by several threads
    return owner


qe = np.random.default_rng(3).standard_normal((6, D_EX)).astype(np.float32)
ke = np.random.default_rng(4).standard_normal((10, D_EX)).astype(np.float32)
N_TILES_EX = -(-ke.shape[0] // BN_EX)


def score_load(load):
    s_ex, tracer = run_tiled_scores(load, qe, ke)
    _lesson.check_exercise(3, "scores q k^T from the tiled kernel", s_ex, qe @ ke.T, atol=1e-5)
    if tracer is None:
        return "(traffic is counted in the simulator only)"
    _lesson.check_exercise(3, "thread that loaded K_tile[r, c], counted", first_tile_owner(tracer),
                           loader_map(BN_EX, D_EX, BM_EX))
    budget = N_TILES_EX * BN_EX * D_EX // BM_EX
    return ", ".join([_lesson.check_budget(3, "reads of k", max(tracer.per_thread("k").values()), budget),
                      _lesson.check_budget(3, "writes of Ks", max(tracer.per_thread("Ks", "write").values()),
                                           budget),
                      _lesson.check_races("exercise 3", tracer)])


_lesson.exercise(3, "the cooperative tile load", load_tile, solutions.load_tile, score_load)

# %% [markdown]
# Shared memory is finite, and that bounds the tiles. v1's shared arrays are Q [BM, D+1], K [BN, D] and
# V [BN, D] (why D+1 comes below); v2 adds a P tile [BM, BN+1]. CUDA documents 48 KiB as the most a block
# may declare with a fixed size (`cuda.shared.array`); on the H100 larger static arrays compiled, ran and made
# v2 up to 1.8x faster, so numbattn picks tiles per *compute capability* (the GPU generation: 9.0 for an H100,
# 8.0 for an A100). Fewer bytes per block also means more blocks fit on an SM at once (occupancy), which is
# why the biggest tile is not automatically the fastest. When the big tiles are used, and the toolchain
# details behind that: BENCHMARKS.md.

# %%
def v1_shared_bytes(block_m, block_n, head_dim):
    return FP32 * (block_m * (head_dim + 1) + 2 * block_n * head_dim)


rows = []
for cc in ((8, 0), (9, 0)):
    for version in prefill.VERSIONS:
        for head_dim in (64, 128):
            t = prefill.gpu_tiles(version, head_dim, cc=cc)
            smem = {"v0": 0, "v1": v1_shared_bytes(t.block_m, t.block_n, head_dim),
                    "v2": prefill_registers.shared_bytes(t.block_m, t.block_n, head_dim),
                    "v3": prefill_mma.shared_bytes(t.block_m, t.block_n, head_dim)}[version]
            rows.append(dict(cc=f"{cc[0]}.{cc[1]}", version=version, head_dim=head_dim, block_m=t.block_m,
                             block_n=t.block_n, threads=t.threads, shared_bytes=smem,
                             over_48KiB="yes" if smem > SHARED_LIMIT else ""))
            assert cc >= (9, 0) or smem <= SHARED_LIMIT, \
                f"{version} d={head_dim} tiles on cc {cc} need {smem} bytes of shared memory > {SHARED_LIMIT}"
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
# ### Counted, not derived
#
# In the simulator every `k[b, hk, j, d]` a kernel executes is a Python call, so numbattn/lab/tracing.py can
# count them: it hands the kernel arrays that log each element read and write, by block and thread. Here are
# the real kernels at a tiny shape (one head, 16 queries and keys, d = 16, the simulator's 4-row tiles),
# counted, next to the formulas above. v0 even re-reads its own q row once per key: the formula "q read
# once" is what the tiled kernels achieve by keeping the Q tile in shared memory.

# %%
NT, DT = 16, 16                                 # tokens and head dim of the counted runs
qt, kt, vt = bench.random_qkv(1, NT, NT, n_heads=1, n_kv_heads=1, head_dim=DT, seed=5)
FORMULA = {  # element reads of q and of k (= of v), per head, non-causal
    "v0": dict(q=NT * NT * DT, k=NT * NT * DT),
    "v1": dict(q=NT * DT, k=-(-NT // prefill.SIM_TILES["v1"].block_m) * NT * DT),
    "v2": dict(q=NT * DT, k=-(-NT // prefill.SIM_TILES["v2"].block_m) * NT * DT),
    "v3": dict(q=NT * DT, k=-(-NT // prefill.SIM_TILES["v3"].block_m) * NT * DT),
}
tracers = {}
if COUNTING:
    counted = []
    for version in prefill.VERSIONS:
        out_t, tracers[version] = tracing.trace_prefill(qt, kt, vt, version=version, shared=version == "v1")
        tr = tracers[version]
        _lesson.check_races(f"{version} (numbattn/kernels/prefill_*.py)", tr)
        counted.append(dict(kernel=version, block_m=prefill.SIM_TILES[version].block_m,
                            q_reads=tr.reads("q"), q_formula=FORMULA[version]["q"],
                            k_reads=tr.reads("k"), v_reads=tr.reads("v"), kv_formula=FORMULA[version]["k"],
                            out_writes=tr.writes("out"), reads_per_k_element=tr.reads("k") / kt.size))
        for name, formula in (("q", FORMULA[version]["q"]), ("k", FORMULA[version]["k"]),
                              ("v", FORMULA[version]["k"])):
            assert tr.reads(name) == formula, \
                f"{version}: counted {tr.reads(name)} reads of {name}, the formula says {formula}"
        assert tr.writes("out") == NT * DT, f"{version} wrote {tr.writes('out')} output elements, not {NT * DT}"
        _lesson.close(f"traced {version} vs reference", out_t, reference.attention(qt, kt, vt), atol=1e-5)
    print(f"element reads and writes counted in the simulator, {NT} queries x {NT} keys, d = {DT}, one head:")
    print(bench.format_table(counted, ["kernel", "block_m", "q_reads", "q_formula", "k_reads", "v_reads",
                                       "kv_formula", "out_writes", "reads_per_k_element"]))
else:
    print("(counting memory accesses needs the simulator: NUMBA_ENABLE_CUDASIM=1 python tutorials/03_...)")

# %% [markdown]
# Two pictures of the same runs. First, per block, how many times each key row of K was read: v0's blocks
# read every key row once per thread (BLOCK_M·d element reads), v1's once per block (d). Second, the
# shape of v1's loop for one block: its Q tile (rows 0-3) is loaded once and stays in shared memory while
# the K/V tiles stream past, one per step; each step computes one BLOCK_M × BLOCK_N tile of scores.

# %%
if plt and COUNTING:
    fig, axes = plt.subplots(1, len(prefill.VERSIONS), figsize=(4.4 * len(prefill.VERSIONS), 2.6))
    reads = {}
    for version in prefill.VERSIONS:
        per_block = tracers[version].rows("k", axis=2)                      # {(x, y, z): {key row: reads}}
        reads[version] = np.array([[per_block[b][j] for j in range(NT)] for b in sorted(per_block)])
    for ax, version in zip(axes, prefill.VERSIONS):
        _lesson.grid(ax, reads[version], f"{version}: element reads of K row j, per block", cmap="Blues",
                     xlabel="key row j", ylabel="block (query tile)", vmin=0, vmax=2 * reads["v0"].max())
    _lesson.save(fig, "03_reads_per_block.png")

    bm, bn = prefill.SIM_TILES["v1"].block_m, prefill.SIM_TILES["v1"].block_n
    q_rows = sorted(tracers["v1"].rows("q", axis=2)[(0, 0, 0)])             # what block 0 loaded of q ...
    k_rows = sorted(tracers["v1"].rows("k", axis=2)[(0, 0, 0)])             # ... and of k
    steps = sorted({j // bn for j in k_rows})
    fig, axes = plt.subplots(1, len(steps), figsize=(3 * len(steps), 3))
    for ax, step in zip(axes, steps):
        picture = np.zeros((NT, NT))
        picture[np.ix_(q_rows, [j for j in k_rows if j // bn < step])] = 1          # score tiles done
        picture[np.ix_(q_rows, [j for j in k_rows if j // bn == step])] = 2         # this step's tile
        ax.imshow(picture, cmap="Greens", vmin=0, vmax=2)
        ax.axhspan(q_rows[0] - 0.5, q_rows[-1] + 0.5, color="tab:orange", alpha=0.15)   # the Q tile stays
        ax.set_title(f"step {step}: K/V rows {step * bn}-{step * bn + bn - 1}", fontsize=9)
        ax.set_xlabel("key", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
        ax.set_xticks(range(0, NT, bn))
        ax.set_yticks(range(0, NT, bm))
    fig.suptitle("v1, block 0: the Q tile (orange band) stays; K/V tiles stream past", fontsize=10)
    _lesson.save(fig, "03_q_tile_and_streaming_kv.png")

# %% [markdown]
# v2's taller query tile halves the K/V re-reads, but those come from L2 anyway: with v2 on v1's tiles
# (64 rows) it is still ~6x faster than v1 (the launch-shape sweep at the end of this lesson). The reason is
# what happens *inside* the block.
#
# ## v2: a register tile per thread
#
# In v1 each score costs two shared-memory loads (a Q element and a K element) for one FMA, and the output update
# one load (a V element) per FMA: the kernel is limited by shared-memory bandwidth, not arithmetic. v2
# (numbattn/kernels/prefill_registers.py) treats each tile as two small matrix products, S = Q·K^T and O += P·V, and
# tiles them over threads the way a GEMM (a general matrix multiply, C = A·B, the routine BLAS libraries spend their
# lives on) does. The threads form a TR × TC grid; thread (rg, cg) owns
#
#     query rows   rg + TR·i   for i < TM        (its rows of S and of O)
#     keys         cg + TC·j   for j < TN        (its columns of S)
#     output dims  cg + TC·e   for e < TE        (its columns of O)
#
# and keeps a TM×TN block of scores and a TM×TE block of the output in registers. For each of the d steps
# of S = Q·K^T it loads TM Q values and TN K values and does TM·TN FMAs. The layout of the GPU tiles:

# %%
t2 = prefill.gpu_tiles("v2", D, cc=H100)
TR, TC, TM, TN, TE = prefill_registers.layout(t2.block_m, t2.block_n, t2.threads, D)
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
owned = np.bincount(owner.ravel(), minlength=t2.threads)
_lesson.close("scores owned per thread", owned, TM * TN, got_label="owned")

# %% [markdown]
# ### Why strided ownership, and why D+1: shared-memory banks
#
# Shared memory is split into 32 banks, 4-byte word w lives in bank w % 32, and a warp's loads are served
# in one cycle only if no two threads hit *different* words of the same bank (the same word is a free
# broadcast). When they do, the loads are served one after the other: a *bank conflict*. In the S step the
# TC threads of a row group load K[key, d] for their keys cg + TC·j: rows of the K tile, one row length
# apart in memory. With rows of exactly d = 64 words (a multiple of 32) every one of them lands in the same
# bank; padding each row by one word (v2 declares its K tile as [BLOCK_N, D + 1], printed below) spreads them
# over consecutive banks. Which kernel pads what, and why:
#
#     v1  Q [BM, D + 1]: thread t reads Q[t, d], rows one row length apart -> padded. K and V [BN, D]: every
#         thread reads the same Ks[jj, d] at the same step, a broadcast, no conflict -> not padded
#     v2  Q, K [., D + 1] (threads read different rows), P [BM, BN + 1]; V unpadded (a row group reads one row)
#     v3  K and V [BN, D + 4]: thread 4g + t of a warp reads K[g][t] and V[2t][g] (lesson 3b says why) ->
#         banks 4g + t and 8t + g, all 32 different (kernels/prefill_mma.py's docstring)

# %%
def banks(keys, d, stride):
    return [(key * stride + d) % 32 for key in keys]


def check_conflict_free(stride):
    hit = banks(keys_of_group, 5, stride)
    assert len(set(hit)) == TC, f"rows of {stride} words: the {TC} threads hit banks {hit}, " \
                                f"{TC - len(set(hit)) + 1}-way conflict"


keys_of_group = [cg for cg in range(TC)]          # j = 0: the TC threads of a row group, at the same step d
print("\n".join(line.strip() for line in inspect.getsource(prefill_registers).splitlines()
                if "= cuda.shared.array(" in line))
print(f"banks hit by the {TC} threads of a row group reading K[cg, d=5]:")
print(f"  rows of {D} words (no padding): {banks(keys_of_group, 5, D)}  -> {TC}-way conflict")
print(f"  rows of {D + 1} words (padded)   : {banks(keys_of_group, 5, D + 1)}  -> conflict-free")
check_conflict_free(D + 1)

# %% [markdown]
# The three maps as coloured grids: who copies each element of a K tile in v1 (counted on the real kernel
# in the simulator), who owns each score of v2's tile, and the bank of each word of a K tile with and
# without the padding (one colour per bank: a column of one colour is a conflict).

# %%
if plt:
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    if COUNTING:
        v1_tiles = prefill.SIM_TILES["v1"]
        who = tracers["v1"].threads("k", block=(0, 0, 0))
        v1_owner = np.array([[who[(0, 0, r, c)][0] for c in range(DT)] for r in range(v1_tiles.block_n)])
        _lesson.close("v1 loader map counted on the real kernel", v1_owner,
                      loader_map(v1_tiles.block_n, DT, v1_tiles.threads), got_label="counted",
                      want_label="loader_map")
        _lesson.grid(axes[0], v1_owner, "v1: thread that loads K_tile[r, c] (counted)", xlabel="dim c",
                     ylabel="key r")
    else:
        _lesson.grid(axes[0], loader_map(4, 16, 4), "v1: thread that loads K_tile[r, c]", xlabel="dim c",
                     ylabel="key r")
    _lesson.grid(axes[1], owner[:8, :16], f"v2: thread owning S[r, c] ({t2.block_m}x{t2.block_n}, first 8x16)",
                 labels=True, xlabel="key c", ylabel="query row r")
    rows_shown = np.arange(TC)[:, None]         # a column: the TC threads' loads at one step d
    _lesson.grid(axes[2], (rows_shown * D + np.arange(16)) % 32, f"bank of Ks[key, d], rows of {D} words:\n"
                 "one colour per column = every thread on one bank", cmap="distinct", xlabel="d",
                 ylabel="key cg (thread cg of a row group)")
    _lesson.grid(axes[3], (rows_shown * (D + 1) + np.arange(16)) % 32, f"rows of {D + 1} words (padded):\n"
                 f"{TC} banks per column, no conflict", cmap="distinct", xlabel="d", ylabel="key cg")
    _lesson.save(fig, "03_owner_and_bank_maps.png")

# %% [markdown]
# ### Group reductions: a row's max and sum spread over TC threads
#
# The online softmax needs the max of each query row over the tile, but in v2 a row's BLOCK_N scores are
# spread over the TC threads of its row group (TN each). Each thread takes the max of its own TN scores, then
# the group combines TC partial maxima (`group_max`: on a GPU, log2(TC) warp-shuffle steps, each thread
# reading a register of another thread of its warp directly; in the simulator, which has no shuffles, a
# shared-memory twin). All TC threads then use the same m_new, so their alpha and exp2(s - m_new) agree. The
# row sum l_i needs no per-tile exchange at all: each thread keeps the partial sum over its own columns
# (rescaled by the same alpha), and the group adds the partials once, at the very end. In NumPy, for one
# tile:

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
_lesson.close("row maxima from group reductions vs S.max(axis=1)", row_max, S.max(axis=1))
_lesson.close("row sums from group reductions vs sum exp2(S - max)", row_sum,
              np.exp2(S - S.max(axis=1, keepdims=True)).sum(axis=1), rtol=1e-6)
print("row maxima and row sums from the group reductions equal S.max(axis=1) and sum exp2(S - max)")

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
          prefill_registers.layout(ts.block_m, ts.block_n, ts.threads, 16))

q, k, v = bench.random_qkv(1, 19, 19, n_heads=2, n_kv_heads=1, head_dim=16, seed=1)
q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
for version in prefill.VERSIONS:
    for causal in (False, True):
        out = cuda.to_device(np.full(q.shape, np.nan, np.float32))
        got = prefill.flash_attention(q, k, v, causal=causal, version=version, out=out)
        assert not np.isnan(got).any(), \
            f"{version} causal={causal} left {int(np.isnan(got).sum())} output elements unwritten (NaN), " \
            f"e.g. at {tuple(int(i) for i in np.argwhere(np.isnan(got))[0])}"
        err = _lesson.close(f"{version} causal={causal} vs fp64 reference", got,
                            reference.attention(q64, k64, v64, causal=causal), atol=1e-5, got_label=version)
        print(f"{version} causal={causal!s:5}: max |kernel - fp64 reference| = {err:.1e}")

# %% [markdown]
# ## Correctness check
#
# All the kernels agree with the fp64 reference to float32 rounding (checked above). Also at the
# production head dims 64 and 128 (the tiles change with d), with fp16 inputs (stored fp16, computed fp32),
# and with several query tiles per head:

# %%
for head_dim, dtype in ((64, np.float32), (128, np.float16)):
    q, k, v = bench.random_qkv(1, 9, 9, n_heads=2, n_kv_heads=1, head_dim=head_dim, seed=head_dim, dtype=dtype)
    want = reference.attention(*(x.astype(np.float64) for x in (q, k, v)), causal=True)
    for version in prefill.VERSIONS:
        err = _lesson.close(f"d={head_dim} {np.dtype(dtype).name} {version} vs fp64 reference",
                            prefill.flash_attention(q, k, v, causal=True, version=version), want, atol=1e-5,
                            got_label=version)
        print(f"d={head_dim:3d} {np.dtype(dtype).name}: {version} max error {err:.1e}")
print("lesson 3 checks passed")

# %% [markdown]
# ## Break it
#
# Mistakes this lesson's checks catch, each a switch with its prediction (a plain run tries them all;
# `python tutorials/03_tiled_flash_kernel.py --break missing-barrier` runs up to that one and stops there):
#
#     --break transposed-load     exercise 3's load as (idx % BN, idx // BN) -> scores right, owner map wrong
#     --break every-thread-loads  every thread copies the whole tile        -> scores right, over the read budget
#     --break missing-barrier     your kernel without the barrier after the load -> the check below names it
#     --break missing-barrier-v1  the same line deleted from the real v1 (a copy) -> the same, in Ks and Vs
#     --break v0-traffic          K once per query row                       -> counted reads vs the formula
#     --break no-padding          v2's K rows of D words                     -> the bank check's conflict
#
# A missing barrier is a *race* (two threads touch the same shared element, at least one of them writing, with
# no barrier between): whether the answer comes out wrong depends on how the threads happen to be scheduled,
# so comparing answers cannot be relied on, in the simulator or on a GPU. The race check can:
# numbattn/lab/tracing.py stamps every shared access with the number of barriers its thread has passed and
# reports an element written by one thread and read by another within the same interval, whatever order they
# ran in (CUDA's `compute-sanitizer --tool racecheck` does the same on a GPU). Edit
# numbattn/kernels/prefill_tiled.py yourself (delete the second `cuda.syncthreads()`) and this lesson's race
# check of the real kernels, below "Running the kernels", fails with the same message.

# %%
@cuda.jit(device=True)
def load_transposed(k, j0, t, Ks):
    for idx in range(t, BN_EX * D_EX, BM_EX):
        r, c = idx % BN_EX, idx // BN_EX                    # consecutive threads: consecutive keys, D apart
        Ks[r, c] = k[j0 + r, c] if j0 + r < k.shape[0] else 0.0


@cuda.jit(device=True)
def load_everything(k, j0, t, Ks):
    for idx in range(BN_EX * D_EX):                         # every thread copies the whole tile
        r, c = idx // D_EX, idx % D_EX
        Ks[r, c] = k[j0 + r, c] if j0 + r < k.shape[0] else 0.0


def score_without_barrier():
    s_race, tracer = run_tiled_scores(solutions.load_tile, qe, ke, barriers=1)
    _lesson.check_races("tiled scores without the second barrier", tracer)


def v1_without_barrier():
    """prefill_tiled.py with the second cuda.syncthreads() of the v1 loop deleted (in a copy), traced."""
    broken = _lesson.edited(prefill_tiled, "cuda.syncthreads()\n            if i < q_len:", "if i < q_len:")
    qb, kb, vb = bench.random_qkv(1, 8, 8, n_heads=1, n_kv_heads=1, head_dim=16, seed=2)
    tiles = prefill.SIM_TILES["v1"]
    tracer, out_b = tracing.Tracer(), np.zeros(qb.shape, np.float32)
    with tracer.shared():
        kernel = broken.make_v1(16, tiles.block_m, tiles.block_n)
        kernel[(2, 1, 1), tiles.threads](*tracer.wrap(q=qb, k=kb, v=vb, out=out_b), np.float32(0.25 * prefill.LOG2E),
                                         False, np.int64(8), np.int64(8), np.float32(0.0))
    _lesson.check_races("v1 without its second barrier", tracer)


_lesson.break_it("transposed-load", "the load takes (idx % BN, idx // BN): consecutive threads, consecutive keys",
                 "the scores are still right (every element is loaded by some thread), but the counted owner "
                 "map differs from the coalesced one: neighbouring threads read addresses D words apart",
                 "thread that loaded K_tile[r, c], counted", lambda: score_load(load_transposed), simulator_only=True)
_lesson.break_it("every-thread-loads", "every thread copies the whole tile",
                 "right scores, 4x the reads of k per thread: over the budget", "reads of k: the kernel made",
                 lambda: _lesson.check_budget(None, "reads of k", max(run_tiled_scores(
                     load_everything, qe, ke)[1].per_thread("k").values()), N_TILES_EX * BN_EX * D_EX // BM_EX),
                 simulator_only=True)
_lesson.break_it("missing-barrier", "your tiled kernel without the barrier after the load",
                 "the race check finds threads reading Ks elements that another thread writes between the same "
                 "two barriers, on every run (in the simulator the scores may still come out right)",
                 "shared-memory races", score_without_barrier, simulator_only=True)
_lesson.break_it("missing-barrier-v1", "numbattn/kernels/prefill_tiled.py (a copy) without the second "
                 "cuda.syncthreads() of the v1 loop", "the same race, named in Ks and Vs of the real kernel",
                 "v1 without its second barrier: ", v1_without_barrier, simulator_only=True)
_lesson.break_it("v0-traffic", "K read once per query row (v0) where once per query tile was promised",
                 "the counted reads of k are BLOCK_M times the tiled formula", "counted reads of k vs the tiled "
                 "formula", lambda: _lesson.close("counted reads of k vs the tiled formula",
                                                  tracers["v0"].reads("k"), FORMULA["v1"]["k"]), simulator_only=True)
_lesson.break_it("no-padding", "v2's shared rows of D words, not D + 1",
                 f"the {TC} threads of a row group hit one bank: the bank check names a {TC}-way conflict",
                 f"{TC}-way conflict", lambda: check_conflict_free(D))

# %% [markdown]
# ## Benchmark
#
# On a GPU: v0, v1 and v2 at TinyLlama's shape, causal, with the NumPy reference for scale and torch's
# attention when torch is installed. Watch v0 fall behind as n grows (it re-reads K and V per query row),
# and v2 beat v1 (more FMAs per shared-memory load). The simulator's times would measure Python threads, so
# without a GPU the lesson shows the H100 measurements, and the launch-shape sweep behind "v2 on v1's
# 64-row tiles is still ~6x faster".

# %%
if BACKEND == "cuda":
    print(bench.prefill_benchmark_text(BACKEND, versions=prefill.VERSIONS, seq_lens=(1024, 2048, 4096)))
else:
    batch1 = lambda r: r["batch"] == "1"                            # noqa: E731
    _lesson.measured("### Causal: milliseconds", ["n", "numbattn v0", "numbattn v1", "numbattn v2"], batch1)
    _lesson.measured("### Causal: TFLOP/s", ["n", "numbattn v0", "numbattn v1", "numbattn v2"], batch1,
                     plot="prefill_causal.png")
    _lesson.measured("### Launch-shape sweep", ["impl", "ms", "tflops", "smem_bytes"],
                     lambda r: r["impl"].startswith("v1") or r["impl"].startswith("v2 d64 64x"), plot="tiles.png")
