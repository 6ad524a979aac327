"""
Lesson 3b: tensor cores, from one warp-level MMA to the default prefill kernel (v3)
=================================================================================

What you will learn
-------------------
* What a *tensor core* is, and the one instruction numbattn uses it through: an *MMA* (matrix
  multiply-accumulate), `mma.sync.m16n8k8`, in which the 32 threads of a warp together compute
  D [16x8] = A [16x8] · B [8x8] + C [16x8]. Each thread (a *lane* of the warp) holds a few elements of each
  matrix, its *fragments*; which ones is the fragment layout, drawn here (tutorials/out/03b_fragments.png).
* One MMA run by a kernel of your own warp, in the simulator or on a GPU, checked against A·B + C.
* Why tensor cores are not fp32 engines: their fp32 input format is *TF32* (fp32's range, a 10-bit mantissa),
  about three decimal digits lost per product; and how *3xTF32* gets fp32 accuracy back with three TF32
  products per multiplication. Measured here, in NumPy, on the same matrices.
* v3, the default prefill kernel (numbattn/kernels/prefill_mma.py): lesson 3's tiled loop with both products
  of a tile, S = Q·K^T and O += P·V, as 3xTF32 MMAs, and the online softmax done on the MMAs' fragments. Its
  loop is printed with each step labelled, run against the reference, and its reads counted.
* What it bought on an H100 (BENCHMARKS.md): 1.6-1.9x v2, level with or ahead of torch's fp32 attention.

Run it: `python tutorials/03b_tensor_cores.py`, or run the `# %%` cells in VS Code / Jupyter.
"""

# %%
import _setup  # noqa: F401  (must be the first import: GPU or simulator, see tutorials/README.md)

import inspect

import numpy as np
from numba import cuda, float32

import _lesson
import numbattn
from numbattn import prefill, reference
from numbattn.kernels import mma, prefill_mma
from numbattn.lab import bench, tracing

BACKEND = numbattn.available_backends()[0]
print(f"engine: {_setup.ENGINE}; numbattn backend: {BACKEND}")
assert BACKEND in ("cuda", "sim"), "this lesson runs the kernels: it needs a GPU or NUMBA_ENABLE_CUDASIM=1"
plt = _lesson.pyplot()
rng = np.random.default_rng(0)

# %% [markdown]
# ## Tensor cores and the MMA
#
# Besides its fp32 cores (the SIMT cores: each thread's own FMAs, ~67 TFLOP/s on an H100), every SM has
# *tensor cores*: units that multiply small matrices in one step, an order of magnitude faster. A kernel
# reaches them through one instruction that a whole warp issues together, an *MMA* (matrix
# multiply-accumulate). numbattn's is the *PTX* instruction (PTX: the assembly language of NVIDIA GPUs)
# `mma.sync.aligned.m16n8k8` with *TF32* inputs (fp32 with a shorter mantissa: below) and fp32 accumulation:
#
#     D [16 x 8] = A [16 x 8] · B [8 x 8] + C [16 x 8]        one instruction, 32 threads, 16·8·8 = 1024 FMAs
#
# Numba has no such operation; numbattn/kernels/mma.py emits the instruction as *inline PTX* (a Numba
# intrinsic that writes the assembly text into the compiled kernel) and, for the simulator, provides a twin
# written in Python. No thread holds a whole matrix: a thread's number in its warp, its *lane* (0-31), is
# written lane = 4·g + t (g = lane // 4, t = lane % 4), and lane (g, t) holds
#
#     A:  a0 = A[g][t]     a1 = A[g+8][t]     a2 = A[g][t+4]     a3 = A[g+8][t+4]
#     B:  b0 = B[t][g]     b1 = B[t+4][g]
#     C, D:  c0, c1 = C[g][2t], C[g][2t+1]     c2, c3 = C[g+8][2t], C[g+8][2t+1]
#
# its *fragments*. Drawn, each cell numbered by the lane that holds it (mma.LAYOUT, from the PTX manual):

# %%
for name in ("A", "B", "C"):
    operand, lane = mma.LAYOUT[name]
    print(f"{name} {lane.shape}: lane holding each element")
    print(lane)
_lesson.close("every lane holds 4 elements of A, 2 of B, 4 of C",
              [np.bincount(mma.LAYOUT[x][1].ravel(), minlength=32) for x in "ABC"], [[4] * 32, [2] * 32, [4] * 32])
if plt:
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), gridspec_kw=dict(width_ratios=[8, 8, 8]))
    for ax, name in zip(axes, "ABC"):
        _lesson.grid(ax, mma.LAYOUT[name][1], f"{name}{' and D' if name == 'C' else ''}: lane of each element",
                     labels=True, cmap="distinct", xlabel="column", ylabel="row")
    fig.tight_layout()
    _lesson.save(fig, "03b_fragments.png")

# %% [markdown]
# ## One MMA, run by one warp
#
# A kernel of 32 threads: each lane loads its fragments of A, B and C from global memory by the layout above,
# the warp issues one MMA (on a GPU the instruction itself; in the simulator the twin, which passes the
# fragments through the shared array `scratch`), and each lane stores its four elements of D. Inputs are
# rounded to TF32 first (below), so the GPU and the simulator compute the same thing. The check: D = A·B + C,
# and each lane read exactly its 4 + 2 + 4 elements.

# %%
SCRATCH = mma.mma_scratch_shape(32)


def make_one_mma(swap_a=False):
    @cuda.jit
    def one_mma(a, b, c, d):
        lane = cuda.threadIdx.x
        g, t = lane >> 2, lane & 3
        scratch = cuda.shared.array(SCRATCH, float32)
        a0, a1 = (a[g + 8, t], a[g, t]) if swap_a else (a[g, t], a[g + 8, t])
        d0, d1, d2, d3 = mma.mma_tf32(a0, a1, a[g, t + 4], a[g + 8, t + 4], b[t, g], b[t + 4, g],
                                      c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t], c[g + 8, 2 * t + 1], scratch)
        d[g, 2 * t], d[g, 2 * t + 1], d[g + 8, 2 * t], d[g + 8, 2 * t + 1] = d0, d1, d2, d3
    return one_mma


A = mma.tf32_round(rng.standard_normal((16, 8), dtype=np.float32))
B = mma.tf32_round(rng.standard_normal((8, 8), dtype=np.float32))
C = rng.standard_normal((16, 8), dtype=np.float32)


def run_one_mma(kernel):
    """-> (D, the most reads one lane made of a, b and c: None on a GPU)."""
    d = np.full((16, 8), np.nan, np.float32)
    if BACKEND != "sim":
        d_dev = cuda.to_device(d)
        kernel[1, 32](cuda.to_device(A), cuda.to_device(B), cuda.to_device(C), d_dev)
        return d_dev.copy_to_host(), None
    tracer = tracing.Tracer()
    kernel[1, 32](*tracer.wrap(a=A, b=B, c=C, d=d))
    return d, [max(tracer.per_thread(x).values()) for x in "abc"]


def check_one_mma(d):
    return _lesson.close("D of one MMA vs A B + C [row, column]", d, mma.mma_reference(A, B, C), atol=1e-5,
                         got_label="MMA", want_label="A B + C")


D_mma, reads = run_one_mma(make_one_mma())
print(f"one m16n8k8 MMA: max |D - (A B + C)| = {check_one_mma(D_mma):.1e}")
if reads:
    print(f"reads per lane of a, b, c: {reads}")
    _lesson.close("reads per lane of A, B, C", reads, [4, 2, 4])

# %% [markdown]
# ## TF32, and 3xTF32
#
# The tensor cores take fp32 numbers as *TF32*: fp32's sign and 8-bit exponent (the same range) but only 10
# of its 23 mantissa bits, so each input is rounded to about 3 decimal digits (relative error up to 2^-11 ≈
# 4.9e-4) before it is multiplied. Attention computed that way would be wrong in the fourth digit. *3xTF32*
# (what torch's memory-efficient fp32 kernel does, through CUTLASS) recovers fp32: split each number into a
# TF32 `big` part and a TF32 `small` part holding what big left out,
#
#     x = big + small,   big = tf32(x),   small = tf32(x - big)          (x - big is exact in fp32)
#
# and multiply with three TF32 products, accumulated in fp32:
#
#     A·B  ≈  A_small·B_big + A_big·B_small + A_big·B_big           (A_small·B_small, ~2^-22 relative, dropped)
#
# Measured here in NumPy on a 64x64 by 64x64 product against float64 (tf32 = mma.tf32_round, the same
# rounding the kernel's `tf32_split` does), next to plain fp32:

# %%
def product_errors(n=64, seed=1):
    r = np.random.default_rng(seed)
    a, b = r.standard_normal((n, n), dtype=np.float32), r.standard_normal((n, n), dtype=np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    ab, bb = mma.tf32_round(a), mma.tf32_round(b)
    as_, bs = mma.tf32_round(a - ab), mma.tf32_round(b - bb)
    f64 = lambda x: x.astype(np.float64)                             # noqa: E731  (each TF32 product is exact)
    products = {"fp32 (SIMT FMAs)": (a @ b).astype(np.float64),
                "TF32 (one MMA)": (f64(ab) @ f64(bb)).astype(np.float32),
                "3xTF32 (three MMAs)": (f64(as_) @ f64(bb) + f64(ab) @ f64(bs) + f64(ab) @ f64(bb)).astype(np.float32)}
    return {k: float(np.abs(p - exact).max() / np.abs(exact).max()) for k, p in products.items()}


errors = product_errors()
print(bench.format_table([dict(method=k, max_rel_error=v) for k, v in errors.items()], ["method", "max_rel_error"]))
assert errors["TF32 (one MMA)"] > 30 * errors["fp32 (SIMT FMAs)"] and \
    errors["3xTF32 (three MMAs)"] < 3 * errors["fp32 (SIMT FMAs)"], \
    f"TF32 should lose ~3 digits and 3xTF32 win them back: {errors}"
print("and at n = 4096 on the H100 (BENCHMARKS.md, round 4): v3 (3xTF32) max relative error 2.06e-6 non-causal, "
      "6.1e-7 causal; v2 (fp32 FMAs) 3.1e-6 and 3.3e-7; torch's memory-efficient fp32 1.96e-6")

# %% [markdown]
# ## v3: lesson 3's loop on tensor cores
#
# v3 (numbattn/kernels/prefill_mma.py) keeps v1's and v2's algorithm: a block of W warps owns 16·W query rows
# (one warp per 16 rows, the MMA's M), stages each K/V tile in shared memory for all its warps, and runs the
# online softmax. What changes is who holds what: a warp's scores S [16, BLOCK_N] live as MMA C fragments,
# lane (g, t) holding rows g and g + 8, keys 2t and 2t + 1 of each 8-key block. So the row max is a reduction
# over the 4 lanes of a quad (same g), and P, the exponentiated scores, goes into the next MMA straight from
# the registers: its A fragment wants keys t and t + 4, the C fragment has 2t and 2t + 1, and since a sum over
# keys may run in any order, v3 feeds the MMA its keys permuted (P's A fragment is (c0, c2, c1, c3)). The
# kernel, the steps labelled:
#
#     1. Q's A fragments -> registers, scaled by scale·log2(e) and split into big + small once
#     2. for each key tile: a. fetch K/V into registers  b. syncthreads  c. store into shared  d. syncthreads
#          e. S = Q K^T (3xTF32 MMAs)  f. soft cap and mask  g. online softmax on the fragments (S -> P)
#          h. O = O·alpha + P V (3xTF32 MMAs, summed per tile, added in fp32)
#     3. the row sums over each quad, then out = O / l

# %%
V3_STEPS = [("load_q_fragments(q", "1"), ("for j0 in range(kv_begin, kv_end, BN)", "2"), ("fetch_kv(k", "2a"),
            ("cuda.syncthreads()", "2b"), ("store_kv(", "2c"), ("cuda.syncthreads()", "2d"), ("scores(Ks", "2e"),
            ("cap_and_mask(", "2f"), ("softmax_step(", "2g"), ("pv(Vs", "2h"), ("group_sum(l_i", "3"),
            ("store_rows(", "3")]
_lesson.show_kernel(prefill_mma.make_v3, "attention_v3", V3_STEPS)
print("\nsteps 2e and 2h multiply through numbattn/kernels/mma.py's make_mma_3xtf32_n, whose GPU version issues the "
      "3 x N MMAs of a k-step phase by phase (small x big, big x small, big x big), so that none waits for the one "
      "before it:")
source = inspect.getsource(mma.make_mma_3xtf32_n)
print(source[source.index("    @cuda.jit(device=True, inline=True)"):])

# %% [markdown]
# ## Running v3, and its traffic
#
# In the simulator v3 runs on one warp (16 query rows, 8-key tiles: `prefill.SIM_TILES["v3"]`), at an odd
# length, causal and not, grouped heads, against the fp64 reference. Its global reads are lesson 3's
# formula (K and V once per query tile of BLOCK_M rows; Q once); counted, with its shared-memory races
# checked as in lesson 3.

# %%
q, k, v = bench.random_qkv(1, 13, 13, n_heads=2, n_kv_heads=1, head_dim=16, seed=3)   # 13: a ragged tile
want = {c: reference.attention(*(x.astype(np.float64) for x in (q, k, v)), causal=c) for c in (False, True)}
for causal in (False, True):
    got = prefill.flash_attention(q, k, v, causal=causal, version="v3")
    err = _lesson.close(f"v3 causal={causal} vs fp64 reference", got, want[causal], atol=1e-5, got_label="v3")
    print(f"v3 causal={causal!s:5}: max |v3 - fp64 reference| = {err:.1e}")
if BACKEND == "sim":
    qt, kt, vt = bench.random_qkv(1, 16, 16, n_heads=1, n_kv_heads=1, head_dim=16, seed=5)
    out_t, tr = tracing.trace_prefill(qt, kt, vt, version="v3", shared=True)
    _lesson.close("traced v3 vs reference", out_t, reference.attention(qt, kt, vt), atol=1e-5)
    bm = prefill.SIM_TILES["v3"].block_m
    formula = -(-16 // bm) * 16 * 16
    print(f"v3, 16 x 16, d = 16, BLOCK_M = {bm}: reads of q {tr.reads('q')} (formula {16 * 16}), of k "
          f"{tr.reads('k')} and v {tr.reads('v')} (formula {formula}), writes of out {tr.writes('out')}; "
          f"{_lesson.check_races('v3', tr)}")
    _lesson.close("counted reads of q, k, v vs the formula", [tr.reads(x) for x in "qkv"], [16 * 16, formula, formula])
print("lesson 3b checks passed")

# %% [markdown]
# ## Break it
#
# Each switch makes one mistake and predicts which check catches it (a plain run tries them all;
# `python tutorials/03b_tensor_cores.py --break tf32-only` runs up to that one and stops there):
#
#     --break swap-fragment   a0 and a1 swapped in your one-MMA kernel     -> D of one MMA: rows g and g + 8 of A
#                                                                            exchanged in the products
#     --break tf32-only       v3 with one TF32 product instead of three   -> "v3 ... vs fp64 reference", errors
#                             (prefill_mma.py and mma.py, copies)           ~5e-4: the digits TF32 loses

# %%
def v3_tf32_only():
    mma_copy = _lesson.edited(mma, "whole = lambda x, y: np.float64(x) + np.float64(y)",
                              "whole = lambda x, y: np.float64(x)") if BACKEND == "sim" else \
        _lesson.edited(mma, "        for n in range(N):              # the small products first",
                       "        for n in range(0):              # the small products first")
    if BACKEND != "sim":                                            # drop the big x small pass too
        mma_copy = _lesson.edited(mma_copy, "        for n in range(N):\n            c[n, 0], c[n, 1], c[n, 2], "
                                  "c[n, 3] = _mma_tf32(a[ia, 0]", "        for n in range(0):\n            c[n, 0], "
                                  "c[n, 1], c[n, 2], c[n, 3] = _mma_tf32(a[ia, 0]")
    broken = _lesson.edited(prefill_mma, "def make_v3(", "def make_v3_tf32_only(")
    broken.make_mma_3xtf32_n = mma_copy.make_mma_3xtf32_n
    tiles = prefill.default_tiles("v3", BACKEND, 16)
    kernel = broken.make_v3_tf32_only(16, tiles.block_m, tiles.block_n, tiles.threads)
    out = cuda.device_array(q.shape, np.float32)
    grid = (-(-q.shape[2] // tiles.block_m), q.shape[1], q.shape[0])
    kernel[grid, tiles.threads](cuda.to_device(q), cuda.to_device(k), cuda.to_device(v), out,
                                np.float32(16 ** -0.5 * prefill.LOG2E), False, np.int64(13), np.int64(13),
                                np.float32(0.0))
    _lesson.close("v3 (TF32 only) causal=False vs fp64 reference", out.copy_to_host(), want[False], atol=1e-5,
                  got_label="v3")


_lesson.break_it("swap-fragment", "lane (g, t) passes A[g+8][t] as a0 and A[g][t] as a1",
                 "D's rows g and g + 8 come from each other's row of A: every element of D is wrong",
                 "D of one MMA vs A B + C", lambda: check_one_mma(run_one_mma(make_one_mma(swap_a=True))[0]))
_lesson.break_it("tf32-only", "v3 multiplies with TF32 alone (the big parts; a copy of the kernel)",
                 "the attention output is off by up to ~5e-4 (TF32's lost digits): the fp64 reference check fails",
                 "v3 (TF32 only) causal=False vs fp64 reference", v3_tf32_only)

# %% [markdown]
# ## Benchmark
#
# On an H100 (BENCHMARKS.md): v3 against v2 (fp32 FMAs) and torch's memory-efficient fp32 kernel (*mem-efficient*
# in the tables: SDPA's fp32 backend, which also runs 3xTF32 on tensor cores), TinyLlama's shape, and by
# head_dim.

# %%
_lesson.measured("### Round 4: v3 on tensor cores", ["causal", "n", "v2 ms", "v3 ms", "SDPA mem-efficient fp32 ms",
                                                      "v3 TFLOP/s"])
_lesson.measured("### Prefill by head_dim", ["head_dim", "numbattn v3 ms", "SDPA mem-efficient fp32 ms",
                                             "v3 / mem-efficient", "v3 TFLOP/s"])
