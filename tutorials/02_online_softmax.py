"""
Lesson 2: the online softmax, one pass with a running max and sum
=================================================================

What you will learn
-------------------
* Why the softmax of lesson 1 needs the whole row of scores before it can produce anything (three passes:
  max, sum, divide), and how to do it in ONE pass by keeping a running maximum m and a running sum l,
  rescaling l whenever m grows. You will check that it equals the usual softmax.
* How the same rescaling carries the output along: acc = sum_j exp(s_j - m) v_j, rescaled with l, divided
  by l once at the end. Keys can then be consumed a tile at a time and the score row is never stored: this
  is the core of FlashAttention.
* Who runs what on a GPU (kernel, thread, block, grid, warp, SM) and where the bytes live (HBM, L2, shared
  memory, registers): the words every later lesson uses.
* Your first CUDA kernel, ten lines of Numba: one thread per row computes the running max and sum. You
  write its body (exercise 2); it is scored on its answer and on its reads of the scores, counted.
* "Break it" switches (`--break no-rescale`, ...): each plants a mistake and predicts the failing check.
* How the real numbattn kernel (prefill v1) does exactly this: we run it in the simulator on a tiny input
  and print each query row's m_i and l_i after every key tile (`numbattn.lab.tracing.trace_v1`), next to the
  NumPy version, and draw them (tutorials/out/02_running_max_and_sum.png).
* Why the kernel's m_i is in base-2 units (it folds log2(e) into the scale and uses exp2) and why its l_i
  needs no conversion at all.

Run it: `python tutorials/02_online_softmax.py` (add `--exercise` to score your own code, `--break NAME`
to plant a mistake), or run the `# %%` cells in VS Code / Jupyter.
"""

# %%
import _setup  # noqa: F401  (must be the first import: GPU or simulator, see tutorials/README.md)

import math

import numpy as np
from numba import cuda

import _lesson
import numbattn
import solutions
from numbattn import prefill, reference
from numbattn.kernels import prefill_tiled
from numbattn.lab import bench, tracing

BACKEND = numbattn.available_backends()[0]
print(f"engine: {_setup.ENGINE}; numbattn backend: {BACKEND}")
assert BACKEND in ("cuda", "sim"), "this lesson runs the kernel: it needs a GPU or NUMBA_ENABLE_CUDASIM=1"
plt = _lesson.pyplot()

# %% [markdown]
# ## The softmax needs three passes
#
# softmax(x)_j = exp(x_j - m) / l with m = max_k x_k and l = sum_k exp(x_k - m). Written out:
#
#     pass 1: m = max over the row
#     pass 2: l = sum of exp(x_k - m) over the row         (needs m)
#     pass 3: p_j = exp(x_j - m) / l for every j             (needs m and l)
#
# In attention the row is the scores of one query against every key, and each pass re-reads it: the row has
# to be stored (or recomputed twice). That is the N×N matrix of lesson 1.

# %%
def softmax_three_pass(x):
    m = max(x)                                  # pass 1
    l = sum(math.exp(xj - m) for xj in x)       # pass 2
    return [math.exp(xj - m) / l for xj in x]   # pass 3


# %% [markdown]
# ## One pass: a running max and a running sum
#
# Read the row left to right and keep m (the largest score so far) and l (the sum so far, of exp(x_k - m)
# for the current m). When a new score x arrives:
#
#     m_new = max(m, x)
#     l     = l * exp(m - m_new) + exp(x - m_new)
#     m     = m_new
#
# The factor alpha = exp(m - m_new) is the correction: every term already in l was computed as
# exp(x_k - m), and exp(x_k - m) * exp(m - m_new) = exp(x_k - m_new). When the max does not change, alpha is 1.
# Start with m = -inf and l = 0: the first alpha is exp(-inf) = 0, which wipes the (empty) sum.
# At the end, m and l are exactly the m and l of the three-pass version.

# %%
def online_max_and_sum(x, show=False):
    m, l = -math.inf, 0.0
    for j, xj in enumerate(x):
        m_new = max(m, xj)
        alpha = math.exp(m - m_new)
        l = l * alpha + math.exp(xj - m_new)
        m = m_new
        if show:
            print(f"  after x[{j}] = {xj:5.2f}:  m = {m:5.2f}   alpha = {alpha:.3f}   l = {l:.4f}")
    return m, l


x = [0.5, 2.0, -1.0, 3.0, 1.0, 3.0]
print("one pass over", x)
m, l = online_max_and_sum(x, show=True)
p_online = [math.exp(xj - m) / l for xj in x]      # forming p still takes a pass (attention avoids it: below)
p_three = softmax_three_pass(x)
print("online   :", np.round(p_online, 4))
print("3 passes :", np.round(p_three, 4))
assert m == max(x), f"running max {m} != max(x) {max(x)}"
_lesson.close("one-pass softmax vs three passes", p_online, p_three, rtol=1e-14, got_label="online")

# %% [markdown]
# ## Carrying the output along: attention without the score row
#
# For softmax alone we still need a last pass to form p. Attention does not want p; it wants
# out = sum_j p_j v_j = (sum_j exp(s_j - m) v_j) / l. The sum in brackets can be rescaled exactly like l:
#
#     acc = acc * alpha + exp(s - m_new) * v          (a vector of head_dim numbers)
#
# and one division acc / l at the very end gives the output. Nothing of size n is kept per query row:
# just m, l and acc. A GPU does not take keys one at a time but in tiles (BLOCK_N keys at a time, copied
# into fast on-chip memory: below and lesson 3), so we write it per tile: the max of the tile first, then the
# same update with a sum over the tile's keys. That is the loop of numbattn's *prefill* kernels (attention over a
# whole prompt at once, every query row against the keys; lesson 5 sets it beside decoding), e.g.
# numbattn/kernels/prefill_tiled.py; here it is in NumPy,
# for one query row, in natural-log units, recording (m, l, alpha) after each tile.

# %%
def online_attention_row(q_row, k, v, scale, block_n):
    """q_row [d], k, v [n, d] -> (out [d], [(m, l, alpha) after each key tile]). Never holds more than block_n
    scores."""
    m, l = -np.inf, 0.0
    acc = np.zeros(v.shape[1])
    trace = []
    for j0 in range(0, k.shape[0], block_n):
        s = k[j0:j0 + block_n] @ q_row * scale      # [block_n] scores of this tile only
        m_new = max(m, s.max())
        alpha = np.exp(m - m_new)                   # rescale everything accumulated under the old max
        p = np.exp(s - m_new)                       # [block_n]
        l = l * alpha + p.sum()
        acc = acc * alpha + p @ v[j0:j0 + block_n]  # [block_n] @ [block_n, d] -> [d]
        m = m_new
        trace.append((m, l, alpha))
    return acc / l, trace


rng = np.random.default_rng(2)
d, n = 16, 10
scale = d ** -0.5
q1, k1, v1 = rng.standard_normal((1, d)), rng.standard_normal((n, d)), rng.standard_normal((n, d))
k1[5], k1[9] = 0.8 * q1[0], 1.5 * q1[0]     # better matches in tiles 1 and 2: the row max rises twice
out_online, row_trace = online_attention_row(q1[0], k1, v1, scale, block_n=4)
out_ref = reference.attention(q1[None, None], k1[None, None], v1[None, None], scale=scale)[0, 0, 0]
print("max after each tile:", [round(float(m), 3) for m, _, _ in row_trace],
      "  alpha:", [round(float(a), 3) for _, _, a in row_trace])
print("online, tiles of 4 :", np.round(out_online[:6], 4), "...")
print("reference          :", np.round(out_ref[:6], 4), "...")
# If the max never rose after the first tile, every later alpha would be 1 and a version that forgot to
# rescale would pass this check. The data is chosen so that it cannot:
assert any(a < 1 for _, _, a in row_trace[1:]), "test data: the row max must rise after tile 0 (some alpha < 1)"
_lesson.close("online attention row vs reference", out_online, out_ref, atol=1e-12, rtol=1e-12,
              got_label="online")

# %% [markdown]
# ## Who runs what, and where the bytes live
#
# Before the first kernel, the words. A *kernel* is a function that runs on the GPU once per *thread*, in
# thousands of threads at once; each thread finds its share of the work from its indices. Numba writes one
# as a Python function decorated with `@cuda.jit`, launched as `kernel[blocks, threads_per_block](args)`.
#
#     thread   one run of the kernel. Its local variables live in *registers*, private to it.
#              cuda.threadIdx.x = its number within its block.
#     block    up to 1024 threads that run together on one *SM* (below). They share a small *shared memory*
#              (`cuda.shared.array`) and can wait for each other at a *barrier*, `cuda.syncthreads()`:
#              no thread passes it until all threads of the block reached it.
#              cuda.blockIdx.x = the block's number, cuda.blockDim.x = threads per block.
#     *grid*   all the blocks of one launch. Blocks run in any order and cannot wait for each other.
#     *warp*   32 consecutive threads of a block, which the hardware runs in lockstep: one instruction at a
#              time for all 32. When they load 32 neighbouring addresses, it becomes one wide memory
#              transaction (a *coalesced* load); threads of a warp can also swap registers directly
#              (*warp shuffle*, lesson 3).
#     SM       streaming multiprocessor: one of the GPU's processors (an H100 has 132). Each runs several
#              blocks at once, as many as its registers and shared memory allow; how full it is, is its
#              *occupancy*.
#     *FMA*    fused multiply-add, a*b + c in one instruction, counted as 2 FLOPs. An H100's fp32 peak,
#              ~67 TFLOP/s (10^12 FLOPs per second), is all its cores doing one FMA per cycle.
#
# And where a kernel's bytes live, from big and slow to small and fast (H100):
#
#     HBM (global memory)  80 GB, ~3 TB/s, read and written by every thread: q, k, v, out live here
#     L2 cache             50 MB in front of HBM, shared by all SMs: recently read bytes come back faster
#     shared memory        up to 228 KB per SM, on the chip, ~10x HBM's bandwidth, one block's own
#     registers            per thread, the fastest; m, l and the accumulators of our kernels
#
# The gap between ~67 TFLOP/s and ~3 TB/s is the theme of lessons 3-5: a kernel that fetches each number
# from HBM for only a few FLOPs waits on memory, so the fast kernels fetch each K and V value once and use it
# many times from shared memory and registers.
#
# ## Your first kernel: one thread per row (exercise 2)
#
# The one-pass max and sum above, for many rows at once: thread i takes row i of a score matrix. The
# launch asks for enough blocks of THREADS threads to cover the rows; the last block has threads to spare,
# so each thread first checks that its row exists. Exercise 2 is the whole kernel body: find your row, run
# the one-pass loop over it, write m and l. `online_max_sum` below is yours to write (its stub does nothing;
# tutorials/solutions.py has an answer; the lesson runs that one unless you pass --exercise). It is scored
# twice: m and l against NumPy, and, in the simulator, the reads of `s` each thread makes, counted by
# numbattn/lab/tracing.py, against a budget of one read per score: the point of one pass is to read the row
# once (a three-pass loop gets the right numbers and fails the budget).

# %%
@cuda.jit
def online_max_sum(s, m_out, l_out):
    """EXERCISE 2. s [rows, n] scores. Thread i of the grid (i = blockIdx.x * blockDim.x + threadIdx.x) takes
    row i, if it exists: one pass over s[i, :] keeping the running max m and the running sum l of
    exp(s[i, j] - m), rescaled by math.exp(m_old - m_new) when the max grows; then m_out[i] = m, l_out[i] = l.
    Budget: each score read once."""
    pass    # <- replace this line with your kernel body, then run the lesson with --exercise


THREADS = 4
scores = rng.standard_normal((10, 12)) + np.linspace(0.0, 3.0, 12)        # 10 rows; maxima arrive late
assert (scores.argmax(axis=1) > 0).all(), "test data: every row's max must come after its first score"


def row_max_and_sum(kernel, s, threads=THREADS):
    """Launch the kernel over the rows of s -> (m, l) per row (NaN where it wrote nothing), and the most reads of
    s any thread made (counted in the simulator; None on a GPU)."""
    m_out, l_out = np.full(s.shape[0], np.nan), np.full(s.shape[0], np.nan)
    blocks = -(-s.shape[0] // threads)                              # ceil(rows / threads)
    if BACKEND != "sim":
        m_dev, l_dev = cuda.to_device(m_out), cuda.to_device(l_out)
        kernel[blocks, threads](cuda.to_device(s), m_dev, l_dev)
        return m_dev.copy_to_host(), l_dev.copy_to_host(), None
    tracer = tracing.Tracer()
    kernel[blocks, threads](*tracer.wrap(s=s, m=m_out, l=l_out))
    return m_out, l_out, max(tracer.per_thread("s").values(), default=0)


def score_row_kernel(kernel):
    m_rows, l_rows, reads = row_max_and_sum(kernel, scores)
    _lesson.check_exercise(2, "running max per row vs NumPy max", m_rows, scores.max(axis=1), rtol=1e-12)
    _lesson.check_exercise(2, "running sum per row vs sum exp(s - max)", l_rows,
                           np.exp(scores - scores.max(axis=1, keepdims=True)).sum(axis=1), rtol=1e-12)
    if reads is None:
        return "(reads are counted in the simulator only)"
    return _lesson.check_budget(2, "reads of s", reads, scores.shape[1],
                                "one pass reads each of the row's scores once: load s[i, j] into a local "
                                "variable, then use that")


print(f"{scores.shape[0]} rows, {THREADS} threads per block -> {-(-scores.shape[0] // THREADS)} blocks; "
      f"row i = blockIdx.x * {THREADS} + threadIdx.x, e.g. row 9 = block 2, thread 1 (threads 2, 3 of block 2 idle)")
_lesson.exercise(2, "a row kernel's one-pass loop", online_max_sum, solutions.online_max_sum, score_row_kernel)

# %% [markdown]
# ## Base 2: what the kernel actually stores
#
# GPUs compute exp2 in one special-function instruction; exp(x) costs exp2(x * log2 e), one multiply more,
# once per score. The kernels therefore fold log2(e) into the scale (q is multiplied by scale * log2 e once,
# when its tile is loaded) and use exp2 everywhere, as the FlashAttention kernels do. Every score s becomes
# s2 = s * log2(e), and
#
#     m2 = max s2 = m * log2(e)                       -> the kernel's m_i is the true max times log2(e)
#     exp2(s2 - m2) = exp2((s - m) * log2 e) = exp(s - m)
#
# so every exponential, and therefore l_i and acc, is *unchanged*. To print the kernel's m_i in the
# natural units of lesson 1, divide it by log2(e) (that is, multiply by ln 2). l_i needs no conversion.

# %%
LOG2E = prefill.LOG2E
s_demo = 1.7
print(f"exp(s) = {math.exp(s_demo):.6f}   exp2(s * log2 e) = {2 ** (s_demo * LOG2E):.6f}")
_lesson.close("exp(s) vs exp2(s log2 e)", math.exp(s_demo), 2 ** (s_demo * LOG2E), rtol=1e-12)

# %% [markdown]
# ## Stepping the real kernel
#
# `tracing.trace_v1` runs the v1 kernel (numbattn/kernels/prefill_tiled.py, the teaching version: one query row per
# thread, like yours, but with the keys taken in tiles) and makes every thread write its m_i and l_i into a
# trace array after each key tile. We give it 4 query rows and 10 keys with tiles of 4 rows x 4 keys: one
# block of 4 threads, three key tiles, and the last tile is ragged (2 real keys, 2 masked to -inf). Then we
# put the NumPy online softmax of the cell above, fed the same inputs and tiles, next to it.

# %%
q_len, kv_len = 4, 10
tiles = prefill.Tiles(block_m=4, block_n=4, threads=4)
q = rng.standard_normal((1, 1, q_len, d), dtype=np.float32)
k = rng.standard_normal((1, 1, kv_len, d), dtype=np.float32)
v = rng.standard_normal((1, 1, kv_len, d), dtype=np.float32)
k[0, 0, 8] = 2.5 * q[0, 0, 0]   # make key 8 (tile 2) the best match of row 0: its max jumps in the last tile

out_kernel, trace = tracing.trace_v1(q, k, v, causal=False, scale=scale, tiles=tiles)
m2, l_kernel = trace[0, 0, :, :, 0], trace[0, 0, :, :, 1]      # [q_len, n_tiles] each, base-2 m
n_tiles = trace.shape[3]

numpy_trace = np.array([online_attention_row(q[0, 0, i].astype(np.float64), k[0, 0].astype(np.float64),
                                             v[0, 0].astype(np.float64), scale, tiles.block_n)[1]
                        for i in range(q_len)])                 # [q_len, n_tiles, (m, l, alpha)]
m_numpy, l_numpy = numpy_trace[..., 0], numpy_trace[..., 1]
print(f"{q_len} query rows, {kv_len} keys, key tiles of {tiles.block_n}: {n_tiles} tiles "
      f"(keys 0-3, 4-7, 8-9)\n")
print("row tile | kernel m_i (base 2)  m_i / log2(e) | NumPy m (natural) | kernel l_i | NumPy l  | alpha")
for i in range(q_len):
    for t in range(n_tiles):
        alpha = 1.0 if t == 0 else 2.0 ** (m2[i, t - 1] - m2[i, t])   # the kernel's rescale factor for tile t
        print(f"{i:3d} {t:4d} | {m2[i, t]:19.4f}  {m2[i, t] / LOG2E:13.4f} | {m_numpy[i, t]:17.4f} | "
              f"{l_kernel[i, t]:10.4f} | {l_numpy[i, t]:8.4f} | {alpha:.3f}")
    print()


assert l_kernel[0, -1] < l_kernel[0, -2], "test data: row 0's running sum should drop in its last tile"


def check_trace(m_kernel_natural, l_kernel_):
    _lesson.close("kernel m_i / log2(e) vs NumPy running max [row, tile]", m_kernel_natural, m_numpy,
                  atol=1e-5, rtol=1e-5, got_label="kernel", want_label="NumPy")
    _lesson.close("kernel l_i vs NumPy running sum [row, tile]", l_kernel_, l_numpy, rtol=1e-5,
                  got_label="kernel", want_label="NumPy")


check_trace(m2 / LOG2E, l_kernel)

# %% [markdown]
# Read the table row by row: m_i only ever grows; when it grows (alpha < 1), l_i is first shrunk by alpha
# and then the tile's terms are added, so l_i can even decrease, as row 0's does in its last tile where key 8
# is a much better match than anything before it. In tile 0 alpha is exp2(-inf - m) = 0 (the kernel
# starts from m_i = -inf, l_i = 0); we print 1 there because nothing was accumulated yet. The picture shows
# the same numbers, one line per query row.

# %%
if plt:
    fig, (ax_m, ax_l) = plt.subplots(1, 2, figsize=(9, 3.2))
    for i in range(q_len):
        ax_m.plot(range(n_tiles), m2[i] / LOG2E, marker="o", label=f"row {i}")
        ax_l.plot(range(n_tiles), l_kernel[i], marker="o", label=f"row {i}")
    ax_m.set(title="running max m_i after each key tile", xlabel="key tile", ylabel="m_i / log2(e)")
    ax_l.set(title="running sum l_i (rescaled by alpha when m_i jumps)", xlabel="key tile", ylabel="l_i")
    for ax in (ax_m, ax_l):
        ax.set_xticks(range(n_tiles))
        ax.grid(alpha=0.3)
    ax_l.legend(fontsize=8)
    _lesson.save(fig, "02_running_max_and_sum.png")

# %% [markdown]
# ## acc / l is the softmax
#
# After the last tile, l_i must be the full softmax denominator: sum_j exp(s_j - m) over ALL keys, with m the
# row's true maximum. And the kernel's output, acc / l_i, must be softmax(q k^T * scale) v. Both are checked
# against plain NumPy on the whole score row (which is small here).

# %%
s_full = (q[0, 0].astype(np.float64) @ k[0, 0].T.astype(np.float64)) * scale     # [q_len, kv_len]
m_true = s_full.max(axis=1)
l_true = np.exp(s_full - m_true[:, None]).sum(axis=1)
print("final m_i / log2(e):", np.round(m2[:, -1] / LOG2E, 5), "   true row max:", np.round(m_true, 5))
print("final l_i          :", np.round(l_kernel[:, -1], 5), "   sum exp(s - max):", np.round(l_true, 5))
softmax_out = reference.softmax(s_full) @ v[0, 0].astype(np.float64)                 # [q_len, d]
err = _lesson.close("kernel output acc / l vs softmax(s) v", out_kernel[0, 0], softmax_out, atol=1e-5,
                    got_label="kernel")
print(f"max |kernel acc / l - softmax(s) v| = {err:.1e}")
_lesson.close("final m_i / log2(e) vs true row max", m2[:, -1] / LOG2E, m_true, atol=1e-5, rtol=1e-5)
_lesson.close("final l_i vs sum exp(s - max)", l_kernel[:, -1], l_true, rtol=1e-5)

# %% [markdown]
# ## A glimpse of causal attention
#
# With a causal mask a query row never looks at later keys, so the kernel stops its loop at the diagonal:
# tiles past it are never loaded. The trace shows it as NaN (the row never reached that tile). Lesson 4
# counts the tiles this saves.

# %%
qc = rng.standard_normal((1, 1, 8, d), dtype=np.float32)
kc = rng.standard_normal((1, 1, 8, d), dtype=np.float32)
vc = rng.standard_normal((1, 1, 8, d), dtype=np.float32)
out_c, trace_c = tracing.trace_v1(qc, kc, vc, causal=True, tiles=tiles)
visited = ~np.isnan(trace_c[0, 0, :, :, 1])                     # [row, tile]
print("causal, 8 queries x 8 keys, tiles of 4: l_i after each key tile (NaN = tile never visited)")
print(np.array2string(trace_c[0, 0, :, :, 1], precision=3))
_lesson.close("tiles visited by the causal kernel [row, tile] (1 = visited)", visited,
              [[1, 0]] * 4 + [[1, 1]] * 4, got_label="kernel", want_label="diagonal")
_lesson.close("causal kernel output vs reference", out_c, reference.attention(qc, kc, vc, causal=True), atol=1e-5)

# %% [markdown]
# ## Correctness check
#
# The kernel's per-tile m_i and l_i match the NumPy online softmax and its output matches the reference
# (checked above). Last, the online softmax is not a special case of tiny inputs: all the kernel versions,
# which all use it, agree with the reference at odd lengths and with grouped-query heads (causal, the harder
# case: the diagonal cuts through tiles; in the simulator only that one, to keep the lesson quick).

# %%
qa, ka, va = bench.random_qkv(1, 13, 13, n_heads=2, n_kv_heads=1, head_dim=16, seed=3)
for version in prefill.VERSIONS:
    for causal in (False, True) if BACKEND == "cuda" else (True,):
        o = prefill.flash_attention(qa, ka, va, causal=causal, version=version)
        e = _lesson.close(f"{version} causal={causal} vs fp64 reference", o,
                          reference.attention(*(x.astype(np.float64) for x in (qa, ka, va)), causal=causal),
                          atol=1e-5, got_label=version, want_label="reference")
        print(f"{version} causal={causal!s:5}: max error vs fp64 reference {e:.1e}")
print("lesson 2 checks passed")

# %% [markdown]
# ## Break it
#
# The checks above are there to catch real mistakes. Each switch below makes one on purpose, states what
# should happen, and confirms it with the message of the check that catches it. A plain run tries them all;
# `python tutorials/02_online_softmax.py --break no-rescale` runs the lesson up to that switch, prints the
# check's whole message, and stops:
#
#     --break no-rescale       the row kernel without alpha   -> the running sums are too large
#     --break three-pass       a row kernel reading its row twice -> right numbers, over the read budget
#     --break natural-max      base-2 m_i read as natural      -> m_i is log2(e) = 1.44x too large
#     --break first-tile-max   no running max                  -> wrong where the max comes later
#     --break exp-not-exp2     exp where the kernel needs exp2 (in a copy of prefill_tiled.py) -> wrong output

# %%
@cuda.jit
def max_sum_without_rescale(s, m_out, l_out):
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i < s.shape[0]:
        m, l = -math.inf, 0.0
        for j in range(s.shape[1]):
            m_new = max(m, s[i, j])
            l = l + math.exp(s[i, j] - m_new)       # alpha = 1: the old terms stay relative to the old max
            m = m_new
        m_out[i], l_out[i] = m, l


@cuda.jit
def max_sum_three_pass(s, m_out, l_out):
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i < s.shape[0]:
        m = -math.inf
        for j in range(s.shape[1]):                 # pass 1: the max
            m = max(m, s[i, j])
        l = 0.0
        for j in range(s.shape[1]):                 # pass 2: the sum
            l += math.exp(s[i, j] - m)
        m_out[i], l_out[i] = m, l


def exp_instead_of_exp2():
    broken = _lesson.edited(prefill_tiled, "p = math.exp2(s[jj] - m_ref)", "p = math.exp(s[jj] - m_ref)")
    out_broken, _ = tracing.trace_v1(q, k, v, causal=False, scale=scale, tiles=tiles, module=broken)
    _lesson.close("kernel output acc / l vs softmax(s) v", out_broken[0, 0], softmax_out, atol=1e-5,
                  got_label="kernel")


_lesson.break_it("no-rescale", "the row kernel forgets the rescale (alpha = 1)",
                 "the running sums are too large wherever a row's max rose after its first score: every row here",
                 "kernel running sum vs sum exp(s - max): 10 of 10 values differ", lambda: _lesson.close(
                     "kernel running sum vs sum exp(s - max)", row_max_and_sum(max_sum_without_rescale, scores)[1],
                     np.exp(scores - scores.max(axis=1, keepdims=True)).sum(axis=1), rtol=1e-12, got_label="kernel"))
_lesson.break_it("three-pass", "the row kernel reads its row twice (max, then sum)",
                 "right m and l, but 24 reads of s per thread where one pass needs 12: the budget check fails",
                 "reads of s: the kernel made 24 per thread, the budget is 12",
                 lambda: _lesson.check_budget(None, "reads of s", row_max_and_sum(max_sum_three_pass, scores)[2],
                                              scores.shape[1]), simulator_only=True)
_lesson.break_it("natural-max", "the kernel's base-2 max is read as if it were natural",
                 "m_i is log2(e) = 1.44 times the NumPy max in every row and tile", "kernel m_i / log2(e) vs NumPy "
                 "running max", lambda: check_trace(m2, l_kernel))
_lesson.break_it("first-tile-max", "the first tile's max is taken as the row max (no running max)",
                 "wrong for the rows whose max lies in a later tile", "final m_i vs true row max",
                 lambda: _lesson.close("final m_i vs true row max", m_numpy[:, 0], m_true, atol=1e-5))
_lesson.break_it("exp-not-exp2", "in numbattn/kernels/prefill_tiled.py (a copy), p = math.exp(s - m) where the "
                 "scores are in base 2",
                 "every weight is taken to the wrong base: the output differs from softmax(s) v",
                 "kernel output acc / l vs softmax(s) v", exp_instead_of_exp2)

# %% [markdown]
# ## Benchmark
#
# v0 is the online softmax in its purest form: one thread per query row, walking every key straight from
# global memory. v1 adds the tiles. On a GPU this prints their times and TFLOP/s at TinyLlama's attention
# shape (causal); lesson 3 explains the gap. The simulator's times would measure Python threads, not the
# algorithm, so without a GPU the lesson shows what was measured on an H100 instead.

# %%
if BACKEND == "cuda":
    print(bench.prefill_benchmark_text(BACKEND, versions=("v0", "v1"), seq_lens=(512, 1024, 2048)))
else:
    _lesson.measured("### Causal: milliseconds", ["batch", "n", "numbattn v0", "numbattn v1"],
                     where=lambda r: r["batch"] == "1" and r["numbattn v0"], plot="prefill_causal.png")
