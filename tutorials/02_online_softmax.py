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
* How the real numbattn kernel (prefill v1) does exactly this: we run it in the simulator on a tiny input
  and print each query row's m_i and l_i after every key tile (`numbattn.prefill.trace_v1`), next to the
  NumPy version.
* Why the kernel's m_i is in base-2 units (it folds log2(e) into the scale and uses exp2) and why its l_i
  needs no conversion at all.

Run it: `python tutorials/02_online_softmax.py`, or run the `# %%` cells in VS Code / Jupyter.
"""

# %%
import _setup  # noqa: F401  (must be the first import: GPU or simulator, see tutorials/README.md)

import math

import numpy as np

import numbattn
from numbattn import bench, prefill, reference

BACKEND = numbattn.available_backends()[0]
print(f"engine: {_setup.ENGINE}; numbattn backend: {BACKEND}")
assert BACKEND in ("cuda", "sim"), "this lesson runs the kernel: it needs a GPU or NUMBA_ENABLE_CUDASIM=1"

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
assert m == max(x) and np.allclose(p_online, p_three, rtol=1e-14)

# %% [markdown]
# ## Carrying the output along: attention without the score row
#
# For softmax alone we still need a last pass to form p. Attention does not want p; it wants
# out = sum_j p_j v_j = (sum_j exp(s_j - m) v_j) / l. The sum in brackets can be rescaled exactly like l:
#
#     acc = acc * alpha + exp(s - m_new) * v          (a vector of head_dim numbers)
#
# and one division acc / l at the very end gives the output. Nothing of size n is kept per query row:
# just m, l and acc. A GPU does not take keys one at a time but in tiles (BLOCK_N keys, staged in fast
# shared memory, lesson 3), so we write it per tile: the max of the tile first, then the same update with
# a sum over the tile's keys. That is the loop in numbattn/prefill.py; here it is in NumPy, for one query
# row, in natural-log units, recording (m, l) after each tile.

# %%
def online_attention_row(q_row, k, v, scale, block_n):
    """q_row [d], k, v [n, d] -> (out [d], [(m, l) after each key tile]). Never holds more than block_n scores."""
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
        trace.append((m, l))
    return acc / l, trace


rng = np.random.default_rng(2)
d, n = 16, 10
q1, k1, v1 = rng.standard_normal((1, d)), rng.standard_normal((n, d)), rng.standard_normal((n, d))
scale = d ** -0.5
out_online, _ = online_attention_row(q1[0], k1, v1, scale, block_n=4)
out_ref = reference.attention(q1[None, None], k1[None, None], v1[None, None], scale=scale)[0, 0, 0]
print("online, tiles of 4 :", np.round(out_online[:6], 4), "...")
print("reference          :", np.round(out_ref[:6], 4), "...")
assert np.allclose(out_online, out_ref, rtol=1e-12, atol=1e-12)

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
assert math.isclose(math.exp(s_demo), 2 ** (s_demo * LOG2E), rel_tol=1e-12)

# %% [markdown]
# ## Stepping the real kernel
#
# `prefill.trace_v1` runs the v1 kernel (numbattn/prefill.py, the teaching version: one query row per
# thread) and makes every thread write its m_i and l_i into a trace array after each key tile. We give it
# 4 query rows and 10 keys with tiles of 4 rows x 4 keys: one block of 4 threads, three key tiles, and the
# last tile is ragged (2 real keys, 2 masked to -inf). Then we put the NumPy online softmax of the cell
# above, fed the same inputs and tiles, next to it.

# %%
q_len, kv_len = 4, 10
tiles = prefill.Tiles(block_m=4, block_n=4, threads=4)
q = rng.standard_normal((1, 1, q_len, d), dtype=np.float32)
k = rng.standard_normal((1, 1, kv_len, d), dtype=np.float32)
v = rng.standard_normal((1, 1, kv_len, d), dtype=np.float32)
k[0, 0, 8] = 2.5 * q[0, 0, 0]   # make key 8 (tile 2) the best match of row 0: its max jumps in the last tile

out_kernel, trace = prefill.trace_v1(q, k, v, causal=False, scale=scale, tiles=tiles)
m2, l_kernel = trace[0, 0, :, :, 0], trace[0, 0, :, :, 1]      # [q_len, n_tiles] each, base-2 m
n_tiles = trace.shape[3]

numpy_trace = [online_attention_row(q[0, 0, i].astype(np.float64), k[0, 0].astype(np.float64),
                                    v[0, 0].astype(np.float64), scale, tiles.block_n)[1] for i in range(q_len)]
print(f"{q_len} query rows, {kv_len} keys, key tiles of {tiles.block_n}: {n_tiles} tiles "
      f"(keys 0-3, 4-7, 8-9)\n")
print("row tile | kernel m_i (base 2)  m_i / log2(e) | NumPy m (natural) | kernel l_i | NumPy l  | alpha")
for i in range(q_len):
    for t in range(n_tiles):
        m_nat, l_np = numpy_trace[i][t]
        alpha = 1.0 if t == 0 else 2.0 ** (m2[i, t - 1] - m2[i, t])   # the kernel's rescale factor for tile t
        print(f"{i:3d} {t:4d} | {m2[i, t]:19.4f}  {m2[i, t] / LOG2E:13.4f} | {m_nat:17.4f} | "
              f"{l_kernel[i, t]:10.4f} | {l_np:8.4f} | {alpha:.3f}")
    print()

m_numpy = np.array([[mt for mt, _ in row] for row in numpy_trace])
l_numpy = np.array([[lt for _, lt in row] for row in numpy_trace])
assert np.allclose(m2 / LOG2E, m_numpy, rtol=1e-5, atol=1e-5), "kernel m_i (converted) != NumPy running max"
assert np.allclose(l_kernel, l_numpy, rtol=1e-5), "kernel l_i != NumPy running sum"

# %% [markdown]
# Read the table row by row: m_i only ever grows; when it grows (alpha < 1), l_i is first shrunk by alpha
# and then the tile's terms are added, so l_i can even decrease, as row 0's does in its last tile where key 8
# is a much better match than anything before it. In tile 0 alpha is exp2(-inf - m) = 0 (the kernel
# starts from m_i = -inf, l_i = 0); we print 1 there because nothing was accumulated yet.

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
err = np.abs(out_kernel[0, 0] - softmax_out).max()
print(f"max |kernel acc / l - softmax(s) v| = {err:.1e}")
assert np.allclose(m2[:, -1] / LOG2E, m_true, rtol=1e-5, atol=1e-5)
assert np.allclose(l_kernel[:, -1], l_true, rtol=1e-5)
assert err < 1e-5

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
out_c, trace_c = prefill.trace_v1(qc, kc, vc, causal=True, tiles=tiles)
print("causal, 8 queries x 8 keys, tiles of 4: l_i after each key tile (NaN = tile never visited)")
print(np.array2string(trace_c[0, 0, :, :, 1], precision=3))
assert np.isnan(trace_c[0, 0, :4, 1]).all() and not np.isnan(trace_c[0, 0, 4:, :]).any()
assert np.allclose(out_c, reference.attention(qc, kc, vc, causal=True), atol=1e-5)

# %% [markdown]
# ## Correctness check
#
# The kernel's per-tile m_i and l_i match the NumPy online softmax and its output matches the reference
# (asserted above). Last, the online softmax is not a special case of tiny inputs: all three kernel versions,
# which all use it, agree with the reference at odd lengths and with grouped-query heads.

# %%
qa, ka, va = bench.random_qkv(1, 13, 13, n_heads=4, n_kv_heads=2, head_dim=16, seed=3)
for version in prefill.VERSIONS:
    for causal in (False, True):
        o = prefill.flash_attention(qa, ka, va, causal=causal, version=version)
        e = np.abs(o - reference.attention(qa.astype(np.float64), ka.astype(np.float64), va.astype(np.float64),
                                           causal=causal)).max()
        print(f"{version} causal={causal!s:5}: max error vs fp64 reference {e:.1e}")
        assert e < 1e-5
print("lesson 2 checks passed")

# %% [markdown]
# ## Benchmark
#
# v0 is the online softmax in its purest form: one thread per query row, walking every key straight from
# global memory. v1 adds the tiles. On a GPU this prints their times and TFLOP/s at TinyLlama's attention
# shape (causal); lesson 3 explains the gap. Without a GPU, the simulator's times at a tiny shape are
# printed instead: they only show that the code runs (the simulator executes each CUDA thread as a Python
# thread, so its times measure Python, not the algorithm).

# %%
print(bench.prefill_benchmark_text(BACKEND, versions=("v0", "v1"), seq_lens=(512, 1024, 2048)))
