"""
Lesson 1: naive attention, and why its N×N score matrix is the memory problem
=============================================================================

What you will learn
-------------------
* Scaled dot-product attention in three lines of NumPy: scores = q k^T / sqrt(d), p = softmax(scores),
  out = p v. You will see the shape of every intermediate array.
* Why softmax subtracts the row maximum first (exp overflows otherwise), and why that changes nothing.
* How to check an implementation: against the definition written as plain loops in float64, and against
  numbattn's NumPy reference (`numbattn.reference.attention`), which every kernel in this project is tested
  against.
* The memory problem that the rest of the course solves: the [n, n] score matrix grows with the *square* of
  the context. For TinyLlama's 32 heads in fp32 (4-byte floats) it is 512 MiB per layer at 2k tokens, 8 GiB at 8k and
  128 GiB at 32k, while q, k, v and the output together are a few hundred MiB at most. Measured: the peak
  memory of a call grows 4x per doubling of n.
* A first look at memory *traffic*, counted rather than derived: numbattn's simplest kernel never stores the
  score matrix but still reads K and V once per query row; its reads, counted in Numba's CUDA simulator
  (numbattn/lab/tracing.py), have the shape of the score matrix.
* Pictures (PNG files in tutorials/out/, when matplotlib is installed): the attention weights as a heatmap,
  and which keys each block of the kernels v0 and v1 reads.

Run it: `python tutorials/01_naive_attention.py`, or open it in VS Code / Jupyter and run the `# %%` cells.
No GPU needed: without one, the NumPy parts run as they are and the benchmark shrinks to a tiny timing.
"""

# %%
# Setup. `_setup` must come first: it decides, before numba.cuda is imported, whether numbattn's *kernels*
# (functions that run on the GPU, in thousands of *threads* at once, each thread on its own piece of the data;
# lesson 2 writes one) run on a GPU or in
# Numba's CUDA simulator (see tutorials/README.md).
import _setup  # noqa: F401  (must be the first import)

import os

# NumPy hands its matrix products to a *BLAS* library (Basic Linear Algebra Subprograms: OpenBLAS or MKL,
# tuned matmul routines), which may use several CPU threads. One thread, set before NumPy loads: the timings at
# the end compare sizes, and several threads on a shared machine make each point noisy. (In a notebook where
# NumPy is already loaded this has no effect.)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402

import _lesson  # noqa: E402
import numbattn  # noqa: E402
from numbattn import reference  # noqa: E402
from numbattn.lab import bench  # noqa: E402

BACKEND = numbattn.available_backends()[0]
print(f"engine: {_setup.ENGINE}; numbattn backend: {BACKEND}")
plt = _lesson.pyplot()

# %% [markdown]
# ## Attention in three lines
#
# Every token of a sequence produces three vectors of `head_dim` numbers: a query (what am I looking for?),
# a key (what do I contain?) and a value (what do I hand over?). The output for token i is a weighted
# average of all values, and the weights say how well query i matches each key:
#
#     scores[i, j] = q_i . k_j / sqrt(d)         how much token i attends to token j
#     p[i, :]      = softmax(scores[i, :])        weights that are positive and sum to 1
#     out[i]       = sum_j p[i, j] v_j
#
# The 1/sqrt(d) keeps the dot products of random d-dimensional vectors at a spread of about 1 whatever d is;
# without it, long heads would give huge scores and a softmax that is almost one-hot. A model has several
# heads that do this independently on their own slice of the hidden vector; we simply carry a head axis.

# %%
def softmax(x):
    x = x - x.max(axis=-1, keepdims=True)   # the row max: see the next cell for why
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def naive_attention(q, k, v):
    """q, k, v [n_heads, n, d] -> [n_heads, n, d], the textbook way: the whole score matrix at once."""
    scale = q.shape[-1] ** -0.5   # a Python float: float32 inputs stay float32 (an np.float64 would promote)
    scores = q @ k.swapaxes(-1, -2) * scale        # [h, n, d] @ [h, d, n] -> [h, n, n]   <- N×N per head
    p = softmax(scores)                            # [h, n, n]                              <- and again
    return p @ v                                   # [h, n, n] @ [h, n, d] -> [h, n, d]


rng = np.random.default_rng(0)
n_heads, n, d = 2, 6, 8
q, k, v = (rng.standard_normal((n_heads, n, d)) for _ in range(3))   # float64 here: exact checks below
out = naive_attention(q, k, v)
print("q, k, v:", q.shape, "-> scores and p:", (n_heads, n, n), "-> out:", out.shape)

p = softmax(q @ k.swapaxes(-1, -2) / np.sqrt(d))
print("attention weights of head 0 (row i = query i, column j = key j):")
print(np.array2string(p[0], precision=2, suppress_small=True))
_lesson.close("row sums of the attention weights [head, query]", p.sum(axis=-1), 1.0, rtol=1e-12)
assert (p > 0).all(), f"softmax weights are strictly positive (every token sees all the others); " \
                      f"smallest {p.min():.2e}"
if plt:
    fig, ax = plt.subplots(figsize=(4, 3.4))
    image = ax.imshow(p[0], cmap="viridis", vmin=0, vmax=1)
    for (i, j), w in np.ndenumerate(p[0]):
        ax.text(j, i, f"{w:.2f}", ha="center", va="center", fontsize=7, color="white" if w < 0.5 else "black")
    ax.set(xlabel="key j", ylabel="query i")
    ax.set_title("attention weights p, head 0 (rows sum to 1)", fontsize=9)
    fig.colorbar(image, ax=ax)
    _lesson.save(fig, "01_attention_weights.png")

# %% [markdown]
# ## Why the softmax subtracts the maximum
#
# *fp32* (float32, 4 bytes: 24 significant bits, ~7 decimal digits) is what GPUs compute in by default; fp64
# (float64) has 53 bits and is our exact-enough reference; 2-byte formats come later. exp(x) overflows
# fp32 above x ≈ 88 (fp64 above ≈ 709). Scores that large happen in trained models
# (some heads learn to put almost all their weight on one token, often the first, with scores far above the
# rest), and then exp gives inf and inf/inf gives NaN. Subtracting the row maximum m
# first changes nothing mathematically, because the factor exp(-m) appears in every term of the numerator
# and of the sum, and cancels:
#
#     exp(x_j - m) / sum_k exp(x_k - m) = exp(x_j) exp(-m) / (exp(-m) sum_k exp(x_k)) = softmax(x)_j
#
# After the shift the largest exponent is exactly 0, so nothing overflows, and the sum is at least 1.
# Remember this maximum: lesson 2 keeps it as a *running* maximum, and that is the whole FlashAttention trick.

# %%
big = np.array([1000.0, 1001.0, 1002.0], dtype=np.float32)
with np.errstate(over="ignore", invalid="ignore"):
    unsafe = np.exp(big) / np.exp(big).sum()
print("exp(x) / sum(exp(x))        :", unsafe)
print("exp(x - max) / sum(...)     :", softmax(big))
print("same shift on small scores  :", softmax(big - 1000), "(identical: the shift cancels)")
assert np.isnan(unsafe).all(), f"exp(1000) overflows float32, so the unsafe softmax should be NaN: {unsafe}"
_lesson.close("softmax(x) vs softmax(x - 1000)", softmax(big), softmax(big - 1000), rtol=1e-6)

# %% [markdown]
# ## Checking it twice
#
# A vectorised implementation can be wrong in ways that look plausible (a transposed k, the scale applied
# twice, the softmax over the wrong axis). So we compare it with the definition written as loops, one
# output element at a time in float64, and with numbattn's reference, which is the oracle for every kernel
# in the later lessons. The reference takes [batch, n_heads, n, d] and supports *grouped-query attention*
# (fewer k/v heads than q heads, each shared by a group of q heads; lesson 4); with as many k/v heads as q
# heads it is plain attention.

# %%
def loop_attention(q, k, v):
    """The definition, element by element: slow and obviously right."""
    h, n, d = q.shape
    out = np.zeros((h, n, d))
    for hh in range(h):
        for i in range(n):
            s = [sum(q[hh, i, c] * k[hh, j, c] for c in range(d)) / np.sqrt(d) for j in range(n)]
            w = np.exp(np.array(s) - max(s))
            w /= w.sum()
            for j in range(n):
                out[hh, i] += w[j] * v[hh, j]
    return out


err_loop = np.abs(naive_attention(q, k, v) - loop_attention(q, k, v)).max()
err_ref = np.abs(naive_attention(q, k, v) - reference.attention(q[None], k[None], v[None])[0]).max()
print(f"max |naive - loops| = {err_loop:.1e}    max |naive - numbattn.reference| = {err_ref:.1e}")
_lesson.close("naive attention vs the loop definition [head, query, dim]", naive_attention(q, k, v),
              loop_attention(q, k, v), atol=1e-12, got_label="naive", want_label="loops")
_lesson.close("naive attention vs numbattn.reference", naive_attention(q, k, v),
              reference.attention(q[None], k[None], v[None])[0], atol=1e-12, got_label="naive",
              want_label="reference")

# %% [markdown]
# ## The memory problem
#
# `scores` and `p` are [n_heads, n, n]. Everything else is [n_heads, n, d], and d is small (64 in TinyLlama).
# So at long context the score matrix dwarfs the inputs: n / d times bigger. The table below is for
# TinyLlama's attention shape (32 query heads; 4 key/value heads, because TinyLlama uses grouped-query
# attention), fp32, batch 1, ONE layer.
#
# And it is not only the size. The naive code writes the scores to memory, reads them back for the
# softmax, writes p, and reads p again for `p @ v`: four passes over n² numbers per head, while the useful
# arithmetic is only ~4·n²·d FLOPs per head. The table puts a time on those passes at an H100's ~3 TB/s
# of memory bandwidth, next to the time the matmuls need at its fp32 peak of 67 *TFLOP/s* (10^12
# floating-point operations per second; a multiply-add counts as 2).

# %%
N_HEADS, N_KV_HEADS, HEAD_DIM = bench.N_HEADS, bench.N_KV_HEADS, bench.HEAD_DIM   # TinyLlama: 32, 4, 64
FP32 = 4


def score_bytes(n, n_heads=N_HEADS):
    return n_heads * n * n * FP32


def qkvo_bytes(n):
    return (2 * N_HEADS + 2 * N_KV_HEADS) * n * HEAD_DIM * FP32   # q and out: 32 heads; k and v: 4 heads


def human(nbytes):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.4g} {unit}"
        nbytes /= 1024


rows = []
for n in (2048, 8192, 32768):
    traffic_ms = 4 * score_bytes(n) / (bench.HBM_GBPS * 1e9) * 1e3
    flops_ms = bench.attention_flops(1, N_HEADS, n, n, HEAD_DIM, causal=False) / (bench.FP32_PEAK_TFLOPS * 1e12) * 1e3
    rows.append(dict(n=n, scores=human(score_bytes(n)), q_k_v_out=human(qkvo_bytes(n)),
                     scores_over_qkvo=score_bytes(n) / qkvo_bytes(n), score_traffic_ms=traffic_ms, matmul_ms=flops_ms))
print("one layer of TinyLlama, fp32, batch 1:")
print(bench.format_table(rows, ["n", "scores", "q_k_v_out", "scores_over_qkvo", "score_traffic_ms", "matmul_ms"]))
print("(an H100 has 80 GB: at 32k tokens the score matrix of one layer does not even fit)")

# %% [markdown]
# The formula is not a hypothesis: Python's `tracemalloc` sees NumPy's allocations, so we can measure the
# peak memory of one naive attention call at 32 heads and a modest n, and find at least the score matrix.

# %%
n_meas = 512
qm, km, vm = (rng.standard_normal((N_HEADS, n_meas, HEAD_DIM), dtype=np.float32) for _ in range(3))
tracemalloc.start()
naive_attention(qm, km, vm)
_, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
print(f"n = {n_meas}: score matrix {human(score_bytes(n_meas))}, measured peak of naive_attention {human(peak)} "
      f"({peak / score_bytes(n_meas):.1f}x the score matrix: scores, the shifted copy, exp, p ...)")
assert peak >= score_bytes(n_meas), \
    f"the naive version must hold at least one full score matrix ({human(score_bytes(n_meas))}); peak {human(peak)}"

# %% [markdown]
# ## Traffic, counted: the simplest kernel
#
# Not storing the matrix is not the whole story: what matters on a GPU is also how often each byte is fetched from
# its main memory, the *global memory* (on an H100, 80 GB of *HBM*, high-bandwidth memory, that every thread can
# read and write; lesson 2 places it among the faster, smaller memories). numbattn's simplest kernel, v0 (lessons 2
# and 3), runs one thread per query row (lesson 2 says more about threads). Each walks all the keys with the running
# max of lesson 2: it never stores a score, but every row reads all of K and V itself. In Numba's CUDA simulator
# each of the kernel's memory reads is a Python call, so numbattn/lab/tracing.py can count them. Counted at a tiny
# size next to the formulas: v0 reads each K element once per query row (n·n·d reads of K per head, the shape of the
# score matrix times d), and numbattn's *tiled* kernel v1 (lesson 3: it works on tiles, runs of rows of Q, K and V
# loaded once and used many times) once per tile of *BLOCK_M* query rows (its tile height, 4 here), which a *block*
# of threads (threads that run together and share fast memory: lesson 2) works on together. Counted twice: over all
# keys, and *causal* (each token attends only to itself and the tokens before it, as a language model must: lesson
# 4), where row i reads only keys 0..i.

# %%
if BACKEND == "sim":
    from numbattn import prefill
    from numbattn.lab import tracing
    NC, DC = 16, 16
    qc, kc, vc = bench.random_qkv(1, NC, NC, n_heads=1, n_kv_heads=1, head_dim=DC, seed=1)
    counted, reads_by_row = [], {}
    for version, causal in (("v0", False), ("v0", True), ("v1", False), ("v1", True)):
        out_c, tr = tracing.trace_prefill(qc, kc, vc, causal=causal, version=version)
        _lesson.close(f"{version} causal={causal} vs reference", out_c, reference.attention(qc, kc, vc, causal=causal),
                      atol=1e-5, got_label=version)
        keys_seen = NC * (NC + 1) // 2 if causal else NC * NC               # (query, key) pairs
        bm = prefill.SIM_TILES[version].block_m
        tiles_seen = sum(min(NC, (b + 1) * bm) for b in range(-(-NC // bm))) if causal else -(-NC // bm) * NC
        formula = keys_seen * DC if version == "v0" else tiles_seen * DC
        counted.append(dict(kernel=version, causal=causal, k_reads=tr.reads("k"), formula=formula,
                            naive_numpy_score_traffic=4 * keys_seen))
        assert tr.reads("k") == formula, f"{version} causal={causal}: counted {tr.reads('k')} reads of K, " \
                                         f"formula {formula}"
        if causal:                          # per block of BLOCK_M query rows: element reads of each key row
            per_block = tr.rows("k", axis=2)
            reads_by_row[version] = np.array([[per_block.get((b, 0, 0), {}).get(j, 0) for j in range(NC)]
                                              for b in range(-(-NC // bm))])
    print(f"element reads of K, counted in the simulator: one head, n = {NC}, d = {DC} "
          f"(naive NumPy: 4 passes over the n² scores, for comparison)")
    print(bench.format_table(counted, ["kernel", "causal", "k_reads", "formula", "naive_numpy_score_traffic"]))
    if plt:
        fig, axes = plt.subplots(2, 1, figsize=(8, 4.2))
        for ax, version, who in zip(axes, ("v0", "v1"), ("each row's thread reads K[j] itself",
                                                         "the block reads K[j] once for its rows")):
            ax.imshow(reads_by_row[version], cmap="Blues", vmin=0, vmax=reads_by_row["v0"].max(), aspect="auto")
            for (b, j), n in np.ndenumerate(reads_by_row[version]):
                ax.text(j, b, str(n), ha="center", va="center", fontsize=7, color="white" if n > DC else "black")
            ax.set(xlabel="key j", ylabel=f"query block\n({bm} rows)", yticks=range(reads_by_row[version].shape[0]))
            ax.set_title(f"{version}, causal: element reads of K[j] per block ({who})", fontsize=9)
        fig.tight_layout()
        _lesson.save(fig, "01_kernel_reads.png")
else:
    print("(counting a kernel's memory reads needs Numba's CUDA simulator: NUMBA_ENABLE_CUDASIM=1)")

# %% [markdown]
# FlashAttention (lessons 2 and 3) computes exactly the same output without ever storing that matrix:
# memory O(n·d) instead of O(n²), and the four passes over n² numbers disappear from memory traffic.

# %% [markdown]
# ## Correctness check
#
# The functions above agree with the loop definition and with numbattn's reference (asserted). One more,
# at TinyLlama's real shape with grouped-query heads: numbattn's reference, fed k and v with 4 heads,
# equals our naive attention fed k and v repeated to all 32 heads (lesson 4 explains why that repetition
# is wasteful and how the kernels avoid it).

# %%
qg, kg, vg = bench.random_qkv(1, 64, 64)                    # [1, 32, 64, 64] and [1, 4, 64, 64]
ours = naive_attention(qg[0], np.repeat(kg[0], 8, axis=0), np.repeat(vg[0], 8, axis=0))
theirs = reference.attention(qg.astype(np.float64), kg.astype(np.float64), vg.astype(np.float64))[0]
err = np.abs(ours - theirs).max()
print(f"TinyLlama shape, GQA 32/4, n=64: max |naive - reference (fp64)| = {err:.1e}")
_lesson.close("naive attention on repeated K/V vs reference (GQA 32/4, fp64)", ours, theirs, atol=1e-5,
              got_label="naive")
print("lesson 1 checks passed")

# %% [markdown]
# ## Break it
#
# The checks above catch real mistakes. Each switch makes one on purpose and predicts which check fails
# (a plain run tries them all; `python tutorials/01_naive_attention.py --break no-max-shift` runs the lesson
# up to that one, prints the check's whole message, and stops):
#
#     --break no-max-shift    the softmax without subtracting the row max -> NaN at scores near 1000
#     --break scale-twice     scores divided by sqrt(d) twice            -> every output differs from the loops
#     --break wrong-axis      the softmax normalised over the queries    -> the rows no longer sum to 1

# %%
def softmax_unshifted(x):
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def attention_scaled_twice(q, k, v):
    scale = q.shape[-1] ** -0.5
    return softmax(q @ k.swapaxes(-1, -2) * scale * scale) @ v


def check_unshifted():
    with np.errstate(over="ignore", invalid="ignore"):
        _lesson.close("softmax(x) vs softmax(x - 1000)", softmax_unshifted(big), softmax(big - 1000), rtol=1e-6)


_lesson.break_it("no-max-shift", "the softmax forgets to subtract the row max",
                 "exp(1000) overflows fp32: inf / inf = NaN in all three weights",
                 "softmax(x) vs softmax(x - 1000): 3 of 3",
                 check_unshifted)
_lesson.break_it("scale-twice", "the scores are divided by sqrt(d) twice",
                 "flatter weights: every output element differs from the loop definition",
                 "naive attention vs the loop definition [head, query, dim]: 96 of 96",
                 lambda: _lesson.close("naive attention vs the loop definition [head, query, dim]",
                                       attention_scaled_twice(q, k, v), loop_attention(q, k, v), atol=1e-12,
                                       got_label="naive", want_label="loops"))
_lesson.break_it("wrong-axis", "the softmax normalises each key's column instead of each query's row",
                 "the columns sum to 1, the rows do not", "row sums of the attention weights",
                 lambda: _lesson.close("row sums of the attention weights [head, query]",
                                       (np.exp(p) / np.exp(p).sum(axis=-2, keepdims=True)).sum(axis=-1), 1.0,
                                       rtol=1e-12))

# %% [markdown]
# ## Benchmark
#
# On a GPU this times numbattn's FlashAttention kernel (v2) against the NumPy reference on the CPU (and
# torch's attention, *SDPA*: PyTorch's scaled_dot_product_attention, when torch is installed) at TinyLlama's
# shape. Without a GPU there is nothing fair to time for kernels, so we measure the naive NumPy attention at
# small n instead (8 heads, d = 64), two ways: its peak memory, which is deterministic, and its time, the
# fastest of 5 runs with one BLAS thread. Doubling n multiplies the score memory by four (the peak, to within
# the few KiB of the small arrays): that is checked. The time is printed but not checked: the n² work should
# make it x4 per doubling too, but at these sizes the ratio was anything from 2.2x to 11x across runs on the
# same machine (caches that hold the smaller sizes and not the larger, BLAS switching kernels, other programs):
# a timing of a few milliseconds on a shared machine measures the machine as much as the algorithm.

# %%
if BACKEND == "cuda":
    rows = bench.bench_prefill(seq_lens=(512, 1024, 2048, 4096), causal=(False,), versions=("v2",),
                               reference_max_n=1024)
    table, columns = bench.pivot(rows, ["n"], "ms")
    print("milliseconds per call, batch 1, 32 heads / 4 KV heads, head_dim 64, not causal:")
    print(bench.format_table(table, columns))
else:
    print("the kernel benchmark needs a CUDA GPU; the naive NumPy attention on this CPU instead (time: not checked):")
    heads, rows = 8, []
    for n in (128, 256, 512, 1024):
        qt, kt, vt = (rng.standard_normal((heads, n, HEAD_DIM), dtype=np.float32) for _ in range(3))
        tracemalloc.start()
        naive_attention(qt, kt, vt)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            naive_attention(qt, kt, vt)
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append(dict(n=n, score_MiB=score_bytes(n, heads) / 2**20, peak_MiB=peak / 2**20, min_ms=min(times)))
    for r, prev in zip(rows[1:], rows):
        r["peak_x_prev"], r["time_x_prev"] = r["peak_MiB"] / prev["peak_MiB"], r["min_ms"] / prev["min_ms"]
    print(bench.format_table(rows, ["n", "score_MiB", "peak_MiB", "peak_x_prev", "min_ms", "time_x_prev"]))
    _lesson.close("peak memory growth per doubling of n", [r["peak_x_prev"] for r in rows[1:]], 4.0, rtol=0.02,
                  got_label="measured", want_label="n² says")
