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
  partials are merged with the log-sum-exp rule. We do the merge on NumPy partials first, then read the
  real kernel's partials and check them.
* The invariant everything rests on: prefill of a prompt followed by decode steps gives exactly the rows of
  one long causal prefill over the whole sequence.

Run it: `python tutorials/05_kv_cache_and_decode.py`, or run the `# %%` cells in VS Code / Jupyter.
"""

# %%
import _setup  # noqa: F401  (must be the first import: GPU or simulator, see tutorials/README.md)

import numpy as np
from numba import cuda

import numbattn
from numbattn import bench, decode, reference
from numbattn.backend import to_host

BACKEND = numbattn.available_backends()[0]
print(f"engine: {_setup.ENGINE}; numbattn backend: {BACKEND}")
assert BACKEND in ("cuda", "sim"), "this lesson runs the kernels: it needs a GPU or NUMBA_ENABLE_CUDASIM=1"
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
# numbers (K and V) it must read: a handful of FLOPs per byte. The GPU's balance point is ~67 TFLOP/s / 3 TB/s ≈ 22 FLOPs per
# byte; below it, the memory system sets the speed. At TinyLlama's shape, per generated token:

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
assert all(r["flop_per_byte"] < RIDGE for r in rows)      # memory-bound at every context length

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
assert np.isnan(to_host(cache.k(0))).all()                       # every slot poisoned at the start

prompt_k = rng.standard_normal((2, 2, 5, 16), dtype=np.float32)    # a 5-token prompt in both rows
prompt_v = rng.standard_normal((2, 2, 5, 16), dtype=np.float32)
cache.append(0, prompt_k, prompt_v)
step_k = rng.standard_normal((2, 2, 1, 16), dtype=np.float32)      # then one decoded token
step_v = rng.standard_normal((2, 2, 1, 16), dtype=np.float32)
cache.append(0, step_k, step_v)
K = to_host(cache.k(0))
print("lengths after a 5-token prompt and 1 decode step:", cache.lengths)
print("row 0, KV head 0, first value of each slot:", np.round(K[0, 0, :, 0], 2))
assert (cache.lengths == 6).all()
assert np.array_equal(K[:, :, :5], prompt_k) and np.array_equal(K[:, :, 5:6], step_k)
assert np.isnan(K[:, :, 6:]).all()

# %% [markdown]
# Rows can diverge: `truncate` rewinds rows (a chat that edits its last message, a batch of sequences of
# different lengths) and re-poisons the freed slots. The next append writes each row at its own length.

# %%
cache.truncate(np.array([6, 3], dtype=np.int32))                   # row 1 forgets its last 3 tokens
cache.append(0, step_k, step_v)
K = to_host(cache.k(0))
print("lengths:", cache.lengths, "  row 1 first values:", np.round(K[1, 0, :, 0], 2))
assert list(cache.lengths) == [7, 4]
assert np.array_equal(K[0, :, 6], step_k[0, :, 0]) and np.array_equal(K[1, :, 3], step_k[1, :, 0])
assert np.isnan(K[1, :, 4:]).all()

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
print(f"max |merge(partials) - softmax(s) v| = {np.abs(merge(m_np, l_np, acc_np) - exact).max():.1e}")
assert np.allclose(merge(m_np, l_np, acc_np), exact, rtol=1e-12, atol=1e-12)
assert np.allclose(merge(m_np[::-1], l_np[::-1], acc_np[::-1]), exact)       # order does not matter

# %% [markdown]
# ## The kernel's partials
#
# Now the same on the real kernels. `decode.launch` runs the split kernel, grid (n_splits, n_kv_heads,
# batch): block (s, hk, b) streams keys [s·split, (s+1)·split) of KV head hk through shared memory once and
# computes the partials of *every* query head that shares hk (GQA: the cache is read once, not 8 times).
# The partials go to a scratch buffer, part[b, h, s, :] = (acc_s [d], m_s, l_s), in base-2 units like the
# prefill kernel (m_s is multiplied by log2 e; l_s and acc_s are unchanged). The merge kernel (grid
# n_heads × batch) then combines them. We pass our own scratch buffer so we can read the partials back, and
# a tiny launch shape (`decode.SIM_CONFIG`: 4 keys per split, key tiles of 2, 8 threads) so that an
# 11-token cache gives 3 splits on the simulator and on a GPU alike.

# %%
cache1 = numbattn.KVCache(n_layers=1, batch=1, n_kv_heads=1, max_len=16, head_dim=d)
cache1.append(0, k1[None, None].astype(np.float32), v1[None, None].astype(np.float32))
config = decode.SIM_CONFIG
n_splits = decode.n_splits_for(n, config.split)
scratch = decode.make_scratch(1, 1, d, n_splits)
out = cuda.device_array((1, 1, d), np.float32)
q_dev = cuda.to_device(q1[None, None].astype(np.float32))
decode.launch(q_dev, cache1.k(0), cache1.v(0), cache1.device_lengths(0), out, scale, n, config, scratch)

part = scratch.copy_to_host()[0, 0]                                   # [n_splits, d + 2]
assert part.shape == (n_splits, d + 2), "scratch layout changed: see numbattn/decode.py make_scratch"
acc_k, m_k, l_k = part[:, :d], part[:, d], part[:, d + 1]
print("kernel m_s / log2(e):", np.round(m_k / LOG2E, 4), "  kernel l_s:", np.round(l_k, 4))
print("NumPy  m_s          :", np.round(m_np, 4), "  NumPy  l_s:", np.round(l_np, 4))
assert np.allclose(m_k / LOG2E, m_np, atol=1e-5) and np.allclose(l_k, l_np, rtol=1e-5)
assert np.allclose(acc_k, acc_np, atol=1e-5)
print(f"max |merge kernel output - softmax(s) v| = {np.abs(out.copy_to_host()[0, 0] - exact).max():.1e}")
assert np.allclose(out.copy_to_host()[0, 0], exact, atol=1e-5)

# %% [markdown]
# Day to day you call `numbattn.decode_attention(q, cache, layer)`, which picks the split (on a GPU: enough
# blocks to cover every SM a few times, but at least 128 keys per split so that the partials stay a small
# fraction of the traffic), reuses a scratch buffer kept in the cache, and handles rows of different
# lengths, including empty rows (zeros). Against the reference, on the 2-row cache from above (lengths 7, 4):

# %%
q2 = rng.standard_normal((2, 4, 16), dtype=np.float32)               # 4 query heads over 2 KV heads
got = numbattn.decode_attention(q2, cache, 0)
want = reference.decode_attention(q2.astype(np.float64), to_host(cache.k(0)), to_host(cache.v(0)), cache.lengths)
print(f"rows of lengths {cache.lengths.tolist()}: max |decode kernel - reference| = {np.abs(got - want).max():.1e}")
assert np.allclose(got, want, atol=1e-5)

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
print(f"max |prefill+decode - one long prefill| = {np.abs(stepwise - one_long).max():.1e}, "
      f"vs fp64 reference {np.abs(stepwise - ref).max():.1e}")
assert np.allclose(stepwise, one_long, atol=1e-5) and np.allclose(stepwise, ref, atol=1e-5)

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
print(f"fp16 cache: max |decode - reference on the fp16 values| = {np.abs(got16 - want16).max():.1e}")
assert np.allclose(got16, want16, atol=1e-5)
print("lesson 5 checks passed")

# %% [markdown]
# ## Benchmark
#
# Decode is memory-bound, so the figure of merit is bandwidth: bytes of K and V streamed per second, against
# the ~3 TB/s an H100 moves. On a GPU this times the split and merge kernels (with a scratch buffer made
# once) at TinyLlama's shape, batch 1, fp32 cache. Without a GPU, the same code runs in the simulator at
# tiny lengths: the numbers only show that it works.

# %%
def time_decode(lengths, config, clock, repeat):
    rows = []
    for n in lengths:
        qd, kd, vd = bench.random_qkv(1, 1, n)                        # TinyLlama heads: 32 / 4, d = 64
        dq, dk, dv = cuda.to_device(qd[:, :, 0]), cuda.to_device(kd), cuda.to_device(vd)
        lens = cuda.to_device(np.array([n], np.int32))
        o = cuda.device_array((1, bench.N_HEADS, bench.HEAD_DIM), np.float32)
        split = config.split or decode.choose_split(n, 1, bench.N_KV_HEADS, config.block_n)
        cfg = decode.Config(split, config.block_n, config.threads, config.merge_threads)
        part = decode.make_scratch(1, bench.N_HEADS, bench.HEAD_DIM, decode.n_splits_for(n, split))
        ms = bench.timed(lambda: decode.launch(dq, dk, dv, lens, o, None, n, cfg, part), clock, warmup=1,
                         repeat=repeat)
        got = o.copy_to_host()
        assert np.allclose(got, reference.decode_attention(qd[:, :, 0], kd, vd, [n]), atol=1e-4)
        kv_bytes = kd.nbytes + vd.nbytes
        rows.append(dict(context=n, split=split, blocks=decode.n_splits_for(n, split) * bench.N_KV_HEADS,
                         us=ms * 1e3, GB_per_s=kv_bytes / (ms * 1e-3) / 1e9,
                         frac_of_3TBps=kv_bytes / (ms * 1e-3) / 1e9 / bench.HBM_GBPS))
    return rows


columns = ["context", "split", "blocks", "us", "GB_per_s", "frac_of_3TBps"]
if BACKEND == "cuda":
    rows = time_decode((512, 2048, 8192, 32768), decode.gpu_config(bench.HEAD_DIM, 8), "cuda", repeat=50)
    print("decode attention (split + merge kernels), batch 1, 32 heads / 4 KV heads, head_dim 64, fp32 cache:")
    print(bench.format_table(rows, columns))
else:
    print("the benchmark needs a CUDA GPU; tiny-size timing in the simulator instead (TinyLlama heads, "
          "simulator launch shape):")
    print(bench.format_table(time_decode((16,), decode.SIM_CONFIG, "host", repeat=1), columns))
