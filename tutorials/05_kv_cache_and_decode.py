"""
Lesson 5: the KV cache, and decoding one token at a time
========================================================

What you will learn
-------------------
* Why generating text has two phases: prefill (the whole prompt at once, lessons 1-4) and decode (one new
  token per step), and why decode is bound by memory bandwidth: each step reads the whole KV cache for a
  few FLOPs per byte. We compute bytes and FLOPs per token at TinyLlama's shape (arithmetic intensity).
* The KV cache (numbattn/kvcache.py): keys and values of every earlier token, allocated once, appended to
  by a small copy kernel, with unused slots poisoned with NaN so that a kernel reading them cannot hide.
* Split-K decode, a.k.a. flash-decoding (numbattn/decode.py): one query token has too little work to fill a
  GPU, so the *keys* are split across blocks; each block returns a partial softmax (m, l, acc), and the
  partials are merged with the log-sum-exp rule. What log-sum-exp is (LSE = m + log l), why the merged LSE
  is the log-sum-exp of the blocks' LSEs, and a picture of it all (tutorials/out/05_split_k.png). You write
  that merge (exercise 5, one line of NumPy), then we read the real kernel's partials and check them.
* The invariant everything rests on: prefill of a prompt followed by decode steps gives exactly the rows of
  one long causal prefill over the whole sequence.

Run it: `python tutorials/05_kv_cache_and_decode.py` (add `--exercise` to check your own line), or run the
`# %%` cells in VS Code / Jupyter.
"""

# %%
import _setup  # noqa: F401  (must be the first import: GPU or simulator, see tutorials/README.md)

import inspect

import numpy as np
from numba import cuda

import _lesson
import numbattn
import solutions
from numbattn import decode, reference
from numbattn.kernels import decode_naive
from numbattn.lab import bench
from numbattn.backend import to_host

BACKEND = numbattn.available_backends()[0]
print(f"engine: {_setup.ENGINE}; numbattn backend: {BACKEND}")
assert BACKEND in ("cuda", "sim"), "this lesson runs the kernels: it needs a GPU or NUMBA_ENABLE_CUDASIM=1"
plt = _lesson.pyplot()
LOG2E = decode.LOG2E

# %% [markdown]
# ## Prefill and decode
#
# A model generates text one token at a time: run the prompt through the model, take the logits of the last
# position, pick a token, append it, run again. Token n's attention needs the keys and values of tokens
# 0..n, and those of 0..n-1 have not changed since the previous step, so they are kept: the KV cache.
# With it, a step processes only the new token: one query row per head against the whole cache.
#
# That changes the arithmetic. Prefill of n tokens does ~4·n²·d FLOPs per head on ~n·d numbers of q, k, v
# (hundreds of FLOPs per byte: compute-bound). Decode does 4·n·d FLOPs per query head on the 2·n·d cached
# numbers (K and V) it must read: a handful of FLOPs per byte. The GPU's ridge point (lesson 3: peak FLOP/s
# over peak bytes/s) is ~67 TFLOP/s / 3 TB/s ≈ 22 FLOPs per byte; below it, the memory system sets the
# speed. At TinyLlama's shape, per generated token:

# %%
N_HEADS, N_KV_HEADS, D, N_LAYERS = 32, 4, 64, 22          # TinyLlama-1.1B
RIDGE = bench.FP32_PEAK_TFLOPS * 1e12 / (bench.HBM_GBPS * 1e9)
rows = []
for n in (512, 2048, 8192, 32768):
    kv_bytes = 2 * N_KV_HEADS * n * D * 4 * N_LAYERS        # read every cached K and V (fp32), all layers
    flops = 4 * N_HEADS * n * D * N_LAYERS                   # q.k and p.v for 32 query heads
    rows.append(dict(context=n, kv_MiB=kv_bytes / 2**20, attn_MFLOP=flops / 1e6, flop_per_byte=flops / kv_bytes,
                     us_at_3TBps=kv_bytes / (bench.HBM_GBPS * 1e9) * 1e6,
                     us_at_67TFLOPs=flops / (bench.FP32_PEAK_TFLOPS * 1e12) * 1e6))
print(f"decode attention per generated token, all {N_LAYERS} layers, fp32 cache (GPU ridge point: "
      f"{RIDGE:.0f} FLOP/byte):")
print(bench.format_table(rows, ["context", "kv_MiB", "attn_MFLOP", "flop_per_byte", "us_at_3TBps", "us_at_67TFLOPs"]))
prefill_intensity = 4 * N_HEADS * 2048**2 * D / ((2 * N_HEADS + 2 * N_KV_HEADS) * 2048 * D * 4)
print(f"(prefill of 2048 tokens: {prefill_intensity:.0f} FLOP/byte at minimum traffic; the model's weights, "
      f"read once per decode step: 0.5 FLOP/byte in fp32)")
assert all(r["flop_per_byte"] < RIDGE for r in rows), \
    f"decode must be memory-bound: FLOP/byte {[round(r['flop_per_byte'], 2) for r in rows]} vs ridge point {RIDGE:.1f}"

# %% [markdown]
# 4 FLOPs per byte, whatever the context: the memory system, not the arithmetic, sets the speed of decode
# (without GQA it would be 0.5: 8 query heads share each cached byte). So a decode kernel has one job:
# stream the cache once, with all of the GPU's bandwidth.
#
# ## The KV cache
#
# `numbattn.KVCache(n_layers, batch, n_kv_heads, max_len, head_dim)` allocates K and V for every layer up
# front ([batch, n_kv_heads, max_len, head_dim], on the GPU), like llama2.c: no allocation while generating.
# Each row of the batch has its own length. `append(layer, k, v)` writes t new tokens at each row's length
# with one launch of a copy kernel (grid: blocks × KV heads × rows; consecutive threads copy consecutive
# elements, which are contiguous on both sides, so both the read and the write are coalesced). The write
# position is read on the device from a lengths array that the kernel also advances, so an append needs no
# host-to-device copy. Slots never written hold NaN: a decode kernel that read past a row's length would
# produce NaN, not a plausible wrong number.

# %%
rng = np.random.default_rng(0)
cache = numbattn.KVCache(n_layers=1, batch=2, n_kv_heads=2, max_len=12, head_dim=16)
print(cache)
assert np.isnan(to_host(cache.k(0))).all(), \
    f"a new cache must be NaN everywhere; {int((~np.isnan(to_host(cache.k(0)))).sum())} slots are not"

prompt_k = rng.standard_normal((2, 2, 5, 16), dtype=np.float32)    # a 5-token prompt in both rows
prompt_v = rng.standard_normal((2, 2, 5, 16), dtype=np.float32)
cache.append(0, prompt_k, prompt_v)
step_k = rng.standard_normal((2, 2, 1, 16), dtype=np.float32)      # then one decoded token
step_v = rng.standard_normal((2, 2, 1, 16), dtype=np.float32)
cache.append(0, step_k, step_v)
K = to_host(cache.k(0))
print("lengths after a 5-token prompt and 1 decode step:", cache.lengths)
print("row 0, KV head 0, first value of each slot:", np.round(K[0, 0, :, 0], 2))
assert (cache.lengths == 6).all(), f"lengths after 5 + 1 tokens: {cache.lengths}, expected [6 6]"
_lesson.close("cache slots 0-4 vs the prompt's K", K[:, :, :5], prompt_k, got_label="cache", want_label="prompt")
_lesson.close("cache slot 5 vs the decoded token's K", K[:, :, 5:6], step_k, got_label="cache", want_label="step")
assert np.isnan(K[:, :, 6:]).all(), f"slots 6+ were never written but {int((~np.isnan(K[:, :, 6:])).sum())} " \
                                    f"of them are not NaN"

# %% [markdown]
# Rows can diverge: `truncate` rewinds rows (a chat that edits its last message, a batch of sequences of
# different lengths) and re-poisons the freed slots. The next append writes each row at its own length.

# %%
cache.truncate(np.array([6, 3], dtype=np.int32))                   # row 1 forgets its last 3 tokens
cache.append(0, step_k, step_v)
K = to_host(cache.k(0))
print("lengths:", cache.lengths, "  row 1 first values:", np.round(K[1, 0, :, 0], 2))
assert list(cache.lengths) == [7, 4], f"lengths after truncate([6, 3]) and one append: {cache.lengths}, expected [7 4]"
_lesson.close("row 0 slot 6 vs the appended K", K[0, :, 6], step_k[0, :, 0], got_label="cache")
_lesson.close("row 1 slot 3 vs the appended K", K[1, :, 3], step_k[1, :, 0], got_label="cache")
assert np.isnan(K[1, :, 4:]).all(), "row 1's slots 4+ must be NaN again after truncate"

# %% [markdown]
# ## Split-K decode: the merge, in NumPy first
#
# One decode step at batch 1 has 32 query heads but only 4 KV heads to read. A prefill-style grid (a block
# per query head, walking all keys) launches 32 blocks, or 4 if the query heads of a group share a block (as
# they should, to read the cache once), on a GPU with 132 SMs: most of the GPU idles while each block
# streams a long context alone. Flash-decoding splits the *keys* into chunks of `split` keys and gives each
# chunk its own block. Block s computes, for its keys only, the online-softmax state of lesson 2:
#
#     m_s = max_j s_j,   l_s = sum_j exp(s_j - m_s),   acc_s = sum_j exp(s_j - m_s) v_j     (j in chunk s)
#
# A second, tiny kernel merges the partials. Rescale every partial to the global max M, then add:
#
#     M = max_s m_s,   L = sum_s l_s exp(m_s - M),   out = sum_s acc_s exp(m_s - M) / L
#
# which is lesson 2's alpha-rescaling applied between chunks instead of between tiles: the result is the
# exact softmax over all keys, in any order of chunks.

# %%
def partials(q_row, k, v, split, scale):
    """q_row [d], k, v [n, d] -> m [S], l [S], acc [S, d] for chunks of `split` keys (natural-log units)."""
    m, l, acc = [], [], []
    for j0 in range(0, k.shape[0], split):
        s = k[j0:j0 + split] @ q_row * scale
        m.append(s.max())
        p = np.exp(s - s.max())
        l.append(p.sum())
        acc.append(p @ v[j0:j0 + split])
    return np.array(m), np.array(l), np.array(acc)


def merge(m, l, acc):
    M = m.max()
    w = np.exp(m - M)                                   # each partial's rescale factor
    return (w[:, None] * acc).sum(axis=0) / (w * l).sum()


d, n, split = 16, 11, 4
scale = d ** -0.5
q1, k1, v1 = (rng.standard_normal(shape) for shape in ((d,), (n, d), (n, d)))
m_np, l_np, acc_np = partials(q1, k1, v1, split, scale)
print(f"{n} keys in splits of {split}: {len(m_np)} partials (the last one ragged)")
print("  m_s:", np.round(m_np, 4), "  l_s:", np.round(l_np, 4))
exact = reference.softmax(k1 @ q1 * scale) @ v1


def check_merge(merged, what="merge(partials) vs softmax(s) v"):
    return _lesson.close(what, merged, exact, atol=1e-12, rtol=1e-12, got_label="merged", want_label="exact")


print(f"max |merge(partials) - softmax(s) v| = {check_merge(merge(m_np, l_np, acc_np)):.1e}")
check_merge(merge(m_np[::-1], l_np[::-1], acc_np[::-1]), "merge of the partials in reverse order")

# %% [markdown]
# ## Log-sum-exp: what a partial really carries
#
# The *log-sum-exp* of some scores is LSE = log(sum_j exp(s_j)): the log of the softmax denominator, so that
# softmax(s)_j = exp(s_j - LSE). Computed as written it overflows just like lesson 1's softmax, so it is
# computed with the max taken out, and then it is exactly the two numbers the online softmax keeps:
#
#     LSE = log sum_j exp(s_j) = m + log sum_j exp(s_j - m) = m + log l
#
# So a split's (m_s, l_s) is one number in disguise: LSE_s = m_s + log l_s, the log-sum-exp of its own keys.
# Sums over all keys are sums over the splits, so exp(LSE) = sum_s exp(LSE_s), that is
#
#     LSE = logsumexp_s(LSE_s)          the merged LSE is the log-sum-exp of the splits' LSEs
#     out = sum_s exp(LSE_s - LSE) · (acc_s / l_s)
#
# Each split's own normalised output acc_s / l_s counts with its share of the softmax mass, exp(LSE_s -
# LSE), and those weights add up to 1. Expanding exp(LSE_s - LSE) / l_s = exp(m_s) / exp(LSE) = exp(m_s - M) / L
# gives back the merge formula above: "the log-sum-exp rule" is that formula. (FlashAttention's kernels
# keep exactly this LSE per query row for the backward pass.) Exercise 5 is its one line: `merged_lse`.

# %%
def merged_lse(lse):
    """EXERCISE 5. lse [S]: the log-sum-exp of each split's scores. Return the log-sum-exp of all the scores,
    log(sum_s exp(lse_s)), without overflow for lse_s of any size (take the max out first). One line."""
    return lse.max()    # <- replace this line with yours (a first guess: the max dominates), then --exercise


lse_split = m_np + np.log(l_np)                                      # [S]: LSE_s = m_s + log l_s
scores1 = k1 @ q1 * scale
lse_all = scores1.max() + np.log(np.exp(scores1 - scores1.max()).sum())   # the LSE of all the scores, directly
merged_lse_to_run = _lesson.exercise(5, merged_lse, solutions.merged_lse)
yours_lse = merged_lse_to_run(lse_split)
_lesson.check_exercise(5, "merged LSE vs the LSE of all the scores", yours_lse, lse_all, rtol=1e-12)
weights = np.exp(lse_split - yours_lse)                              # each split's share of the softmax mass
print("  LSE_s:", np.round(lse_split, 4), "  merged LSE:", round(float(yours_lse), 4),
      "  weights exp(LSE_s - LSE):", np.round(weights, 4), "sum", round(float(weights.sum()), 6))
check_merge((weights[:, None] * acc_np / l_np[:, None]).sum(axis=0), "sum_s exp(LSE_s - LSE) acc_s / l_s vs exact")
_lesson.check_exercise(5, "merged LSE of two splits of LSE 1000 (no overflow)",
                       merged_lse_to_run(np.array([1000.0, 1000.0])), 1000 + np.log(2), rtol=1e-12)

# %% [markdown]
# The picture: the 11 scores coloured by the block (split) that handles them, each block's partial as its
# LSE_s, the weights exp(LSE_s - LSE) the merge gives them, and the merged output next to the exact one.

# %%
if plt:
    fig, axes = plt.subplots(1, 4, figsize=(15, 3))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    block_of = np.arange(n) // split
    axes[0].bar(range(n), scores1, color=[colours[b] for b in block_of])
    axes[0].set(title="1. keys -> blocks: score of each key", xlabel="key j (colour = block s)", ylabel="s_j")
    axes[1].bar(range(len(lse_split)), lse_split, color=colours[:len(lse_split)], label="LSE_s = m_s + log l_s")
    axes[1].scatter(range(len(m_np)), m_np, color="black", zorder=3, label="m_s")
    axes[1].axhline(lse_all, color="grey", ls="--", label="merged LSE")
    axes[1].set(title="2. each block's partial", xlabel="block s")
    axes[1].legend(fontsize=7)
    axes[2].bar(range(len(weights)), weights, color=colours[:len(weights)])
    axes[2].set(title="3. merge: weights exp(LSE_s - LSE), sum 1", xlabel="block s", ylim=(0, 1))
    merged = (weights[:, None] * acc_np / l_np[:, None]).sum(axis=0)
    axes[3].plot(exact, "o", label="exact softmax(s) v")
    axes[3].plot(merged, "x", label="merged")
    axes[3].set(title="4. merged output = exact", xlabel="output dim")
    axes[3].legend(fontsize=7)
    for ax in axes:
        ax.title.set_fontsize(9)
    _lesson.save(fig, "05_split_k.png")

# %% [markdown]
# ## The kernels
#
# numbattn/kernels/ has the decode kernels, side by side like the prefill ones (decode_*.py). The first rung, v0, is the
# merge above inside ONE block: a block per (row, query head), its threads splitting the keys among themselves
# (thread t takes keys t, t + T, ...), each running lesson 2's online softmax over its own keys, and at the
# end the block merges its threads' (m, l, acc) exactly as `merge` did:

# %%
v0_source = inspect.getsource(inspect.unwrap(decode_naive.make_decode_v0))
print(v0_source[v0_source.index("    @kernel"):v0_source.index("    return decode_v0")])

# %% [markdown]
# v0 leaves most of the GPU idle at batch 1 (32 blocks for TinyLlama's 32 query heads) and reads each KV head
# once per query head of its group. v1, the one `numbattn.decode_attention` uses by default (and v2, which
# differs only in how a block's threads share its keys: numbattn/kernels/decode_lanes.py), splits the keys
# over BLOCKS (grid (n_splits, n_kv_heads, batch)): block (s, hk, b) streams keys [s·split, (s+1)·split) of KV
# head hk once and computes the partials of *every* query head that shares hk (GQA: the cache is read once,
# not 8 times). Each block writes its partial to a buffer part[b, h, s, :] = (acc_s [d], m_s, l_s), in base-2
# units like the prefill kernel (m_s is multiplied by log2 e; l_s and acc_s are unchanged), and the last block
# of the group to finish (it counts the others with one atomic ticket each) merges them: one launch. The
# buffer lives in the cache's decode workspace, so we can read the partials back after a call. We pick a tiny
# launch shape (4 keys per split, 8 threads) so that an 11-token cache gives 3 splits on the simulator and
# on a GPU alike.

# %%
cache1 = numbattn.KVCache(n_layers=1, batch=1, n_kv_heads=1, max_len=16, head_dim=d)
cache1.append(0, k1[None, None].astype(np.float32), v1[None, None].astype(np.float32))
config = decode.Config(split=4, threads=8, dims_per_lane=8)
n_splits = decode.n_splits_for(n, config.split)
q_dev = cuda.to_device(q1[None, None].astype(np.float32))
out = numbattn.decode_attention(q_dev, cache1, 0, scale=scale, config=config)

part = cache1.decode_workspace().partials(1, n_splits).copy_to_host()[0, 0, :n_splits]   # [n_splits, d + 2]
acc_k, m_k, l_k = part[:, :d], part[:, d], part[:, d + 1]
print("kernel m_s / log2(e):", np.round(m_k / LOG2E, 4), "  kernel l_s:", np.round(l_k, 4))
print("NumPy  m_s          :", np.round(m_np, 4), "  NumPy  l_s:", np.round(l_np, 4))
_lesson.close("kernel m_s / log2(e) vs NumPy m_s", m_k / LOG2E, m_np, atol=1e-5, got_label="kernel")
_lesson.close("kernel l_s vs NumPy l_s", l_k, l_np, rtol=1e-5, got_label="kernel")
_lesson.close("kernel acc_s vs NumPy acc_s [split, dim]", acc_k, acc_np, atol=1e-5, got_label="kernel")
err = _lesson.close("decode kernel output vs softmax(s) v", out.copy_to_host()[0, 0], exact, atol=1e-5,
                    got_label="kernel")
print(f"max |merged kernel output - softmax(s) v| = {err:.1e}")
v0_out = numbattn.decode_attention(q_dev, cache1, 0, scale=scale, version="v0").copy_to_host()
_lesson.close("decode v0 output vs softmax(s) v", v0_out[0, 0], exact, atol=1e-5, got_label="v0")

# %% [markdown]
# Day to day you call `numbattn.decode_attention(q, cache, layer)`, which picks the split (on a GPU: enough
# blocks to cover every SM a few times, but at least 256 keys per split so that the partials stay a small
# fraction of the traffic), reuses the buffers kept in the cache, and handles rows of different
# lengths, including empty rows (zeros). Against the reference, on the 2-row cache from above (lengths 7, 4):

# %%
q2 = rng.standard_normal((2, 4, 16), dtype=np.float32)               # 4 query heads over 2 KV heads
got = numbattn.decode_attention(q2, cache, 0)
want = reference.decode_attention(q2.astype(np.float64), to_host(cache.k(0)), to_host(cache.v(0)), cache.lengths)
err = _lesson.close(f"decode kernel vs reference, rows of lengths {cache.lengths.tolist()} [row, head, dim]", got,
                    want, atol=1e-5, got_label="kernel")
print(f"rows of lengths {cache.lengths.tolist()}: max |decode kernel - reference| = {err:.1e}")

# %% [markdown]
# ## Prefill + decode = one long prefill
#
# The contract of the whole KV-cache machinery: run a 7-token prompt through the prefill kernel (its K/V
# appended to the cache), then 4 decode steps (each appends its token's K/V and attends from its one query),
# and the outputs must be exactly the rows of a single causal prefill over all 11 tokens. Bottom-right
# alignment (lesson 4) is what makes the prompt's rows line up, the split-K merge what makes the decode
# rows exact.

# %%
P, T, H, H_KV = 7, 4, 4, 2
q, k, v = bench.random_qkv(1, P + T, P + T, n_heads=H, n_kv_heads=H_KV, head_dim=16, seed=7)
kv = numbattn.KVCache(n_layers=1, batch=1, n_kv_heads=H_KV, max_len=16, head_dim=16)

kv.append(0, k[:, :, :P], v[:, :, :P])                                # prefill: the prompt
outs = [numbattn.attention(q[:, :, :P], kv.k(0)[:, :, :P], kv.v(0)[:, :, :P], causal=True)]   # cache views
for t in range(P, P + T):                                             # decode: one token at a time
    kv.append(0, k[:, :, t:t + 1], v[:, :, t:t + 1])
    outs.append(numbattn.decode_attention(q[:, :, t], kv, 0)[:, :, None, :])
stepwise = np.concatenate(outs, axis=2)                               # [1, H, P + T, 16]

one_long = numbattn.attention(q, k, v, causal=True)
ref = reference.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), causal=True)
err_long = _lesson.close("prefill + decode vs one long prefill [batch, head, token, dim]", stepwise, one_long,
                         atol=1e-5, got_label="stepwise", want_label="one long")
err_ref = _lesson.close("prefill + decode vs fp64 reference", stepwise, ref, atol=1e-5, got_label="stepwise")
print(f"max |prefill+decode - one long prefill| = {err_long:.1e}, vs fp64 reference {err_ref:.1e}")

# %% [markdown]
# ## Correctness check
#
# Checked above: the append kernel writes exactly the right slots and keeps the rest NaN, the kernel's split
# partials equal the NumPy partials, the merge equals the softmax, rows of different lengths match the
# reference, and prefill + decode equals one long prefill. One more: fp16 cache storage (half the bytes to
# stream; arithmetic stays fp32) against the reference on the same fp16 values.

# %%
kv16 = numbattn.KVCache(n_layers=1, batch=1, n_kv_heads=H_KV, max_len=16, head_dim=16, dtype=np.float16)
kv16.append(0, k.astype(np.float16), v.astype(np.float16))
got16 = numbattn.decode_attention(q[:, :, -1], kv16, 0)
want16 = reference.decode_attention(q[:, :, -1].astype(np.float64), to_host(kv16.k(0)).astype(np.float64),
                                    to_host(kv16.v(0)).astype(np.float64), kv16.lengths)
err = _lesson.close("fp16 cache: decode vs reference on the fp16 values", got16, want16, atol=1e-5,
                    got_label="kernel")
print(f"fp16 cache: max |decode - reference on the fp16 values| = {err:.1e}")
print("lesson 5 checks passed")

# %% [markdown]
# ## Break it
#
# Mistakes this lesson's checks catch, made on purpose below:
#
#     merge the partials without rescaling them        -> "merge(partials) vs softmax(s) v"
#     take the largest LSE_s as the merged LSE         -> exercise 5's check
#     read the cache past a row's length               -> NaN (the poisoned slots), caught by the reference
#                                                         comparison: here the oracle itself is made to read
#                                                         one slot too many
#
# and in numbattn/kernels/decode_slots.py and kv_append.py, to try yourself:
#
#     load K/V without `if valid` in scan_keys         -> "decode kernel vs reference" (NaN from the cache)
#     append at lengths[b] - 1                         -> "cache slot 5 vs the decoded token's K"
#     merge with exp2(m_s - M) replaced by 1           -> "decode kernel output vs softmax(s) v"

# %%
_lesson.breaks("the partials are merged without rescaling", lambda: check_merge(
    (acc_np.sum(axis=0)) / l_np.sum()))
_lesson.breaks("the merged LSE is taken to be the largest LSE_s", lambda: _lesson.close(
    "merged LSE vs the LSE of all the scores", lse_split.max(), lse_all, rtol=1e-12))
_lesson.breaks("a row of the cache is read one slot past its length", lambda: _lesson.close(
    "decode over lengths + 1 vs decode over lengths", reference.decode_attention(
        q2.astype(np.float64), to_host(cache.k(0)), to_host(cache.v(0)), cache.lengths + 1), want, atol=1e-5))

# %% [markdown]
# ## Benchmark
#
# Decode is memory-bound, so the figure of merit is bandwidth: bytes of K and V streamed per second, against
# the ~3 TB/s an H100 moves. On a GPU this times the split and merge kernels (with a scratch buffer made
# once) at TinyLlama's shape, batch 1, fp32 cache. Without a GPU, the same code runs in the simulator at
# tiny lengths: the numbers only show that it works.

# %%
def time_decode(lengths, version, clock, repeat):
    rows = []
    for n in lengths:
        qd, kd, vd = bench.random_qkv(1, 1, n)                        # TinyLlama heads: 32 / 4, d = 64
        kv = numbattn.KVCache(1, 1, bench.N_KV_HEADS, n, bench.HEAD_DIM)
        kv.append(0, kd, vd)
        dq = cuda.to_device(qd[:, :, 0])
        ms = bench.timed(lambda: numbattn.decode_attention(dq, kv, 0, version=version), clock, warmup=1,
                         repeat=repeat)
        got = numbattn.decode_attention(dq, kv, 0, version=version).copy_to_host()
        _lesson.close(f"timed decode {version} at {n} tokens vs reference", got,
                      reference.decode_attention(qd[:, :, 0], kd, vd, [n]), atol=1e-4)
        kv_bytes = kd.nbytes + vd.nbytes
        rows.append(dict(version=version, context=n, us=ms * 1e3, GB_per_s=kv_bytes / (ms * 1e-3) / 1e9,
                         frac_of_3TBps=kv_bytes / (ms * 1e-3) / 1e9 / bench.HBM_GBPS))
    return rows


columns = ["version", "context", "us", "GB_per_s", "frac_of_3TBps"]
if BACKEND == "cuda":
    rows = [r for ver in decode.VERSIONS for r in time_decode((512, 2048, 8192, 32768), ver, "cuda", repeat=50)]
    print("decode attention, batch 1, 32 heads / 4 KV heads, head_dim 64, fp32 cache:")
    print(bench.format_table(rows, columns))
else:
    print("the simulator's times measure Python threads; the same step on an H100 (milliseconds):")
    _lesson.measured("### Decode: milliseconds per call", ["batch", "n", "numbattn decode v1 float32",
                                                           "numbattn decode v1 float16", "torch SDPA flash fp16"],
                     plot="decode.png")
    print("the simulator runs the same code at tiny lengths (this checks it, the time means nothing):")
    print(bench.format_table(time_decode((16,), decode.DEFAULT_VERSION, "host", repeat=1), ["version", "context"]))
