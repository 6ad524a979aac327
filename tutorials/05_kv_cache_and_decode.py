"""
Lesson 5: the KV cache, and decoding one token at a time
========================================================

What you will learn
-------------------
* Why generating text has two phases: prefill (the whole prompt at once, lessons 1-4) and decode (one new
  token per step), and why decode does only a few FLOPs per byte it reads (we compute bytes and FLOPs per
  token at TinyLlama's shape); and, from the H100's measured times, where a decode call is bound by its
  launch (short contexts: the time does not grow with the cache) and where by memory (GB/s derived).
* The KV cache (numbattn/kvcache.py): keys and values of every earlier token, allocated once, appended to
  by a small copy kernel, with unused slots poisoned with NaN so that a kernel reading them cannot hide. You
  write an append kernel (exercise 5a), scored on the cache it leaves and its counted copies per thread.
* Split-K decode, a.k.a. flash-decoding (numbattn/decode.py): one query token has too little work to fill a
  GPU, so the *keys* are split across blocks; each block returns a partial softmax (m, l, acc), and the
  partials are merged with the log-sum-exp rule. What log-sum-exp is (LSE = m + log l), why the merged LSE
  is the log-sum-exp of the blocks' LSEs, and a picture of it all (tutorials/out/05_split_k.png).
* The default decode kernel, v1 (numbattn/kernels/decode_slots.py in the split-K frame of decode_splitk.py),
  on the page: its frame, the last block's merge through an atomic ticket, its partials read back, its
  global reads counted in the simulator. You write the merge of the real kernel's partials as a kernel
  (exercise 5b), scored on its output and its counted reads of the partials.
* The invariant everything rests on: prefill of a prompt followed by decode steps gives exactly the rows of
  one long causal prefill over the whole sequence.

Run it: `python tutorials/05_kv_cache_and_decode.py` (add `--exercise` to score your own code, `--break NAME`
to plant a mistake), or run the `# %%` cells in VS Code / Jupyter.
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
import math

from numbattn.kernels import common, decode_naive, decode_slots, decode_splitk, kv_append
from numbattn.lab import bench, tracing
from numbattn.backend import to_host

BACKEND = numbattn.available_backends()[0]
print(f"engine: {_setup.ENGINE}; numbattn backend: {BACKEND}")
assert BACKEND in ("cuda", "sim"), "this lesson runs the kernels: it needs a GPU or NUMBA_ENABLE_CUDASIM=1"
plt = _lesson.pyplot()
LOG2E = decode.LOG2E

# %% [markdown]
# ## Prefill and decode
#
# A model generates text one token at a time: run the prompt through the model, take the *logits* of the last
# position (its raw score for every token of the vocabulary; their softmax is the next token's probabilities),
# pick a token, append it, run again. Token n's attention needs the keys and values of tokens
# 0..n, and those of 0..n-1 have not changed since the previous step, so they are kept: the KV cache.
# With it, a step processes only the new token: one query row per head against the whole cache.
#
# That changes the arithmetic. Prefill of n tokens does ~4·n²·d FLOPs per head on ~n·d numbers of q, k, v (hundreds
# of FLOPs per byte: compute-bound). A *decode* step (one new token) does 4·n·d FLOPs per query head on the 2·n·d
# cached numbers (K and V) it must read: a handful of FLOPs per byte. The GPU's ridge point (lesson 3: peak FLOP/s
# over peak bytes/s) is ~67 TFLOP/s / 3 TB/s ≈ 22 FLOPs per byte; below it, the memory system sets the speed. At
# TinyLlama's shape, per generated token:

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
# 4 FLOPs per byte, whatever the context (without GQA it would be 0.5: 8 query heads share each cached
# byte): far below the ridge point, so the arithmetic never sets the speed of decode. A decode kernel has one
# job: stream the cache once, with as much of the GPU's bandwidth as it can. (Whether the bandwidth or the
# cost of launching the kernel at all sets the time depends on the context: the benchmark at the end shows
# both, measured.)
#
# ## The KV cache
#
# `numbattn.KVCache(n_layers, batch, n_kv_heads, max_len, head_dim)` allocates K and V for every layer up
# front ([batch, n_kv_heads, max_len, head_dim], on the GPU), like llama2.c: no allocation while generating.
# Each row of the batch has its own length. `append(layer, k, v)` writes t new tokens at each row's length
# with one launch of a copy kernel (grid: blocks × KV heads × rows; consecutive threads copy consecutive
# elements, which are contiguous on both sides, so both the read and the write are coalesced). The write
# position is read on the device from a lengths table that the kernel also advances, so an append needs no
# host-to-device copy; the host keeps a mirror of it (`cache.lengths`) and advances that itself, so we print
# both. Slots never written hold NaN: a decode kernel that read past a row's length would produce NaN, not a
# plausible wrong number.

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


def check_lengths(cache, want):
    """The device lengths table (what the kernels read and advance) and the host mirror, both = want."""
    _lesson.close("device lengths table [row]", to_host(cache.device_lengths(0)), want, got_label="device",
                  want_label="expected")
    _lesson.close("host mirror of the lengths [row]", cache.lengths, want, got_label="host", want_label="expected")


print("lengths after a 5-token prompt and 1 decode step: device", to_host(cache.device_lengths(0)),
      " host mirror", cache.lengths)
print("row 0, KV head 0, first value of each slot:", np.round(K[0, 0, :, 0], 2))
check_lengths(cache, [6, 6])
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
check_lengths(cache, [7, 4])
_lesson.close("row 0 slot 6 vs the appended K", K[0, :, 6], step_k[0, :, 0], got_label="cache")
_lesson.close("row 1 slot 3 vs the appended K", K[1, :, 3], step_k[1, :, 0], got_label="cache")
assert np.isnan(K[1, :, 4:]).all(), "row 1's slots 4+ must be NaN again after truncate"

# %% [markdown]
# ## Exercise 5a: an append kernel
#
# The copy at the heart of `append`, as a kernel of your own. Grid (X, n_kv_heads, batch): block (x, hk, b)
# and its threads share the copy of row b, KV head hk: the t new tokens' t·D elements, numbered e = 0, 1, ...
# (token e // D, dim e % D); the X·blockDim.x threads of a (row, head) take e = their number, + X·blockDim.x,
# ... (a grid-stride loop: consecutive threads, consecutive elements, on both sides). Element e goes to slot
# lengths[b] + e // D. The real kernel also advances the lengths (its last block does, found the way the
# decode section below finds it); here the host does that after the launch. Scored on the cache it leaves (the
# new tokens where they belong, every other slot as it was: NaN) and on the elements each thread copies,
# counted: t·D / (X·blockDim.x), rounded up.

# %%
@cuda.jit
def append_tokens(k_new, v_new, k_cache, v_cache, lengths):
    """EXERCISE 5a. k_new, v_new [B, Hkv, t, D] -> k_cache, v_cache [B, Hkv, S, D] at slots lengths[b] + j.
    Block (cuda.blockIdx.x, hk = cuda.blockIdx.y, b = cuda.blockIdx.z): a grid-stride loop over e = 0 .. t*D - 1
    of row b, head hk, starting at cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x, stepping by
    cuda.gridDim.x * cuda.blockDim.x. Budget: each element read and written once, by one thread."""
    pass    # <- replace this line with your kernel body, then run the lesson with --exercise


APPEND_GRID_X, APPEND_THREADS = 2, 16


def run_append(kernel, appends, slots=12):
    """Run kernel for each (k_new, v_new) of appends on a NaN cache of 2 rows x 2 KV heads (lengths advanced by
    the host) -> (k_cache, v_cache, lengths, most k_new reads and most k_cache writes of one thread, or None)."""
    k_cache, v_cache = (np.full((2, 2, slots, 16), np.nan, np.float32) for _ in range(2))
    lengths, most = np.zeros(2, np.int32), [0, 0]
    for k_new, v_new in appends:
        grid = (APPEND_GRID_X, 2, 2)
        if BACKEND == "sim":
            tracer = tracing.Tracer()
            kernel[grid, APPEND_THREADS](*tracer.wrap(k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache,
                                                      lengths=lengths))
            most = [max(most[0], max(tracer.per_thread("k_new").values(), default=0)),
                    max(most[1], max(tracer.per_thread("k_cache", "write").values(), default=0))]
        else:
            kc, vc = cuda.to_device(k_cache), cuda.to_device(v_cache)
            kernel[grid, APPEND_THREADS](cuda.to_device(k_new), cuda.to_device(v_new), kc, vc, cuda.to_device(lengths))
            k_cache, v_cache, most = kc.copy_to_host(), vc.copy_to_host(), None
        lengths = lengths + k_new.shape[2]
    return k_cache, v_cache, lengths, most


APPENDS = [tuple(rng.standard_normal((2, 2, t, 16), dtype=np.float32) for _ in range(2)) for t in (5, 1, 3)]


def score_append(kernel):
    k_cache, v_cache, lengths, most = run_append(kernel, APPENDS)
    want = np.full_like(k_cache, np.nan)
    want[:, :, :9] = np.concatenate([k for k, _ in APPENDS], axis=2)
    _lesson.check_exercise("5a", "K cache after appends of 5, 1 and 3 tokens [row, head, slot, dim] (NaN = unwritten)",
                           np.nan_to_num(k_cache, nan=-999.0), np.nan_to_num(want, nan=-999.0))
    _lesson.check_exercise("5a", "V cache, slots 0-8", v_cache[:, :, :9],
                           np.concatenate([v for _, v in APPENDS], axis=2))
    if most is None:
        return "(copies are counted in the simulator only)"
    budget = -(-5 * 16 // (APPEND_GRID_X * APPEND_THREADS))           # the largest append: 5 tokens
    return ", ".join([_lesson.check_budget("5a", "reads of k_new", most[0], budget),
                      _lesson.check_budget("5a", "writes of k_cache", most[1], budget)])


_lesson.exercise("5a", "an append kernel", append_tokens, solutions.append_tokens, score_append)

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
# exact softmax over all keys, in any order of chunks. Keys split over blocks: *split-K*, as it is called.

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
# keep exactly this LSE per query row for the backward pass.) Computing log(sum_s exp(LSE_s)) itself needs
# lesson 1's trick once more: take the largest out first, M + log(sum_s exp(LSE_s - M)).

# %%
def merged_lse(lse):
    """log(sum_s exp(lse_s)) without overflow: the max taken out first."""
    return lse.max() + np.log(np.exp(lse - lse.max()).sum())


lse_split = m_np + np.log(l_np)                                      # [S]: LSE_s = m_s + log l_s
scores1 = k1 @ q1 * scale
lse_all = scores1.max() + np.log(np.exp(scores1 - scores1.max()).sum())   # the LSE of all the scores, directly
merged = merged_lse(lse_split)
_lesson.close("merged LSE vs the LSE of all the scores", merged, lse_all, rtol=1e-12)
_lesson.close("merged LSE of two splits of LSE 1000 (no overflow)", merged_lse(np.array([1000.0, 1000.0])),
              1000 + np.log(2), rtol=1e-12)
weights = np.exp(lse_split - merged)                                 # each split's share of the softmax mass
print("  LSE_s:", np.round(lse_split, 4), "  merged LSE:", round(float(merged), 4),
      "  weights exp(LSE_s - LSE):", np.round(weights, 4), "sum", round(float(weights.sum()), 6))
check_merge((weights[:, None] * acc_np / l_np[:, None]).sum(axis=0), "sum_s exp(LSE_s - LSE) acc_s / l_s vs exact")

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
# of the group to finish merges them: one launch. Which block is last? Each takes an *atomic ticket*: one
# thread adds 1 to a counter in global memory with `cuda.atomic.add`, an addition the hardware performs
# indivisibly even when many blocks do it at once, and gets back the value before its addition; the block
# that draws n_splits - 1 knows every other block has written its partial. Here is the frame, the ticket and
# the merge, printed from numbattn/kernels/ (inside a block, v1's threads form key slots of LANES threads;
# the scan that fills each slot's m, l, acc is decode_slots.py's `scan_keys`, which lesson 2's loop would
# recognise):

# %%
def print_function(source, start, stop):
    """Print the lines of source from the one containing `start` up to (not including) the one containing stop."""
    lines = source.splitlines()
    first = next((i for i, line in enumerate(lines) if start in line), None)
    if first is None:
        print(f"(note: {start!r} is no longer in the source: the printout is skipped)")
        return
    last = next((i for i in range(first + 1, len(lines)) if stop in lines[i]), len(lines))
    print("\n".join(lines[first:last]))


frame = inspect.getsource(decode_splitk)
print("numbattn/kernels/decode_splitk.py, the frame of decode v1:")
print_function(frame, "    def decode_split(", "    decode_split.__name__")
print("\nnumbattn/kernels/common.py, the ticket:")
print_function(inspect.getsource(common), "def arrive_last", "@kernel")       # the module's text: on a GPU the
#                                                                               function is a compiled dispatcher
print("numbattn/kernels/decode_splitk.py, the last block's merge:")
print_function(frame, "    def merge_splits(", "    return merge_splits")
print("numbattn/kernels/decode_slots.py, v1's scan of a split (each key slot's online softmax, the next keys' words "
      "loaded while this step's are used):")
print_function(inspect.getsource(decode_slots), "    def scan_keys(", "    return scan_keys")

# %% [markdown]
# We run it on the 11-token example with a tiny launch shape: 4 keys per split, 8 threads, *dims_per_lane* = 8
# (each thread holds 8 of a head's dims: with d = 16, LANES = 2 threads share a key, so 8 threads are 4 key
# slots), so that the cache gives 3 splits on the simulator and on a GPU alike, and read the partials back
# from the cache's decode workspace.

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
# ## Exercise 5b: the split-K merge, as a kernel
#
# The last block's job, written by you: merge the kernel's own partials `part` (read back above, base 2) into
# the output. One block per query head, one thread per output dim d: fold the splits one at a time into a
# running (M, L, A), lesson 2's rule between splits instead of between keys, then out = A / L. Scored on the
# output (it must equal the kernel's, and the exact softmax) and on the reads of `part` per thread, counted:
# acc_s[d], m_s and l_s once per split, 3 per split. (A two-pass merge, the max first, reads every m_s twice.)

# %%
@cuda.jit
def merge_partials(part, n_splits, out):
    """EXERCISE 5b. part [H, S, D + 2]: part[h, s, :D] = acc_s, part[h, s, D] = m_s, part[h, s, D + 1] = l_s, in
    base 2 (weights exp2(m_s - M)). Thread d of block h: out[h, d] = sum_s acc_s[d] w_s / sum_s l_s w_s with
    w_s = exp2(m_s - M), M = max_s m_s, in ONE pass over s (math.exp2; a running M, and L and A rescaled when
    it grows). Budget: 3 reads of part per split."""
    pass    # <- replace this line with your kernel body, then run the lesson with --exercise


def run_merge(kernel, part_hsd, n_splits):
    """-> (out [H, D], most reads of part by one thread or None)."""
    out = np.full((part_hsd.shape[0], part_hsd.shape[2] - 2), np.nan, np.float32)
    if BACKEND != "sim":
        out_dev = cuda.to_device(out)
        kernel[part_hsd.shape[0], out.shape[1]](cuda.to_device(part_hsd), n_splits, out_dev)
        return out_dev.copy_to_host(), None
    tracer = tracing.Tracer()
    kernel[part_hsd.shape[0], out.shape[1]](tracer.wrap(part=part_hsd), n_splits, tracer.wrap(out=out))
    return out, max(tracer.per_thread("part").values(), default=0)


kernel_out = out.copy_to_host()[0]                                   # [1 head, d]: the decode kernel's own


def score_merge(kernel):
    merged_out, reads = run_merge(kernel, part[None], n_splits)
    _lesson.check_exercise("5b", "merge of the kernel's partials vs the kernel's output", merged_out, kernel_out,
                           atol=1e-5)
    _lesson.check_exercise("5b", "merge of the kernel's partials vs softmax(s) v", merged_out[0], exact, atol=1e-5)
    if reads is None:
        return "(reads are counted in the simulator only)"
    return _lesson.check_budget("5b", "reads of part", reads, 3 * n_splits,
                                "one pass: fold each split into the running (M, L, A) as you read it")


_lesson.exercise("5b", "the split-K merge", merge_partials, solutions.merge_partials, score_merge)

# %% [markdown]
# ## The default kernel's traffic, counted
#
# In the simulator numbattn/lab/tracing.py runs the real v1 kernel with every argument traced: two rows of 11
# and 5 tokens, 4 query heads over 2 KV heads, splits of 4 keys. The formula: every K and V element of the
# visible tokens read once (not once per query head: the group shares the block), the partials written once
# and read once by the merging block, d + 2 values per (head, split), a few words of lengths and tickets, and
# nothing past a row's length. K and V are read as raw words, 2 floats each here (one 8-byte load per lane).

# %%
if BACKEND == "sim":
    qt = rng.standard_normal((2, 4, 16), dtype=np.float32)
    kt, vt = (rng.standard_normal((2, 2, 12, 16), dtype=np.float32) for _ in range(2))
    out_t, tr = tracing.trace_decode(qt, kt, vt, [11, 5], shared=True)
    _lesson.close("traced decode v1 vs reference", out_t, reference.decode_attention(qt, kt, vt, [11, 5]), atol=1e-5)
    per_word, visible = tr.values_per_word, (11 + 5) * 2 * 16
    splits = -(-11 // 4) + -(-5 // 4)
    rows = [dict(array="k", counted=tr.reads("k"), formula=visible // per_word, note="words: visible tokens x d / 2"),
            dict(array="v", counted=tr.reads("v"), formula=visible // per_word, note="once, for all 4 query heads"),
            dict(array="part (written)", counted=tr.writes("part"), formula=splits * 2 * 2 * 18,
                 note="splits x 2 heads per group x 2 groups x (d + 2)"),
            dict(array="part (read)", counted=tr.reads("part"), formula="", note="the last block's merge"),
            dict(array="out (written)", counted=tr.writes("out"), formula=2 * 4 * 16, note="")]
    print("decode v1, counted in the simulator (element accesses; K and V as words of 2 floats):")
    print(bench.format_table(rows, ["array", "counted", "formula", "note"]))
    for r in rows:
        if r["formula"] != "":
            _lesson.close(f"counted {r['array']} vs formula", r["counted"], r["formula"])
    print("shared memory per block:", {n: tr.reads(n) for n in sorted(tr.shared_names)}, "reads;",
          _lesson.check_races("decode v1", tr))
else:
    print("(counting a kernel's memory accesses needs the simulator: NUMBA_ENABLE_CUDASIM=1)")

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
# Mistakes this lesson's checks catch, each a switch with its prediction (a plain run tries them all;
# `python tutorials/05_kv_cache_and_decode.py --break no-advance` runs up to that one and stops there). The
# kernel ones edit a copy of the real kernel's source (your files are not touched):
#
#     --break merge-no-rescale   the partials merged without exp(m_s - M)     -> "merge(partials) vs softmax(s) v"
#     --break lse-max            the merged LSE taken as the largest LSE_s   -> the merged LSE check
#     --break read-past-length   the oracle reads one slot past each row     -> NaN (the poisoned slots)
#     --break append-at-minus-1  kv_append.py writes at lengths[b] - 1       -> the first append (length 0) would
#                                                                               write slot -1, which the kernel's
#                                                                               fit check refuses: NOTHING is
#                                                                               written, the cache stays all NaN
#     --break no-advance         kv_append.py does not advance the lengths    -> the device table stays [0 0]
#                                                                               while the host mirror says [6 6],
#                                                                               and the step's token overwrites
#                                                                               the prompt's slot 0
#     --break no-valid-check     decode_slots.py loads without `if valid`     -> the answer is still right (the
#                                                                               extra words are never used), but
#                                                                               the counted reads of K exceed one
#                                                                               per cached element: the loads run
#                                                                               past each split's end (past the
#                                                                               array's end they would fault)
#     --break two-pass-merge     exercise 5b's merge reading m_s twice       -> right output, over its read budget

# %%
def append_with(module, slots=12):
    """The prompt (5 tokens) and one step appended by `module`'s append_kv (an edited copy of kv_append.py),
    on host arrays, the lengths table advanced (or not) by the kernel -> (K cache, device lengths)."""
    k_c, v_c = (np.full((2, 2, slots, 16), np.nan, np.float32) for _ in range(2))
    lengths, counters = np.zeros(2, np.int32), np.zeros(2, np.int32)
    for k_new, v_new in ((prompt_k, prompt_v), (step_k, step_v)):
        module.append_kv[(1, 2, 2), 32](k_new, v_new, k_c, v_c, lengths, lengths, counters, np.int64(slots))
    return k_c, lengths


def append_checks(module):
    k_c, lengths = append_with(module)
    print(f"    (device lengths after the two appends: {lengths})")
    _lesson.close("cache slots 0-4 vs the prompt's K", k_c[:, :, :5], prompt_k, got_label="cache", want_label="prompt")
    _lesson.close("device lengths table [row]", lengths, [6, 6], got_label="device", want_label="host mirror")
    _lesson.close("cache slot 5 vs the decoded token's K", k_c[:, :, 5:6], step_k, got_label="cache", want_label="step")


def decode_without_valid():
    broken = _lesson.edited(decode_slots, "valid = jj < j_end", "valid = True")
    k32, v32 = (np.full((2, 2, 32, 16), np.nan, np.float32) for _ in range(2))
    k32[:, :, :12], v32[:, :, :12] = kt, vt
    out_b, tr_b = tracing.trace_decode(qt, k32, v32, [11, 5], module=broken)
    _lesson.close("decode v1 without `if valid` vs reference", out_b, reference.decode_attention(qt, kt, vt, [11, 5]),
                  atol=1e-5)
    _lesson.close("counted reads of k vs one per visible element", tr_b.reads("k"), (11 + 5) * 2 * 16 // per_word,
                  got_label="counted", want_label="formula")


@cuda.jit
def merge_two_pass(part, n_splits, out):
    h, d = cuda.blockIdx.x, cuda.threadIdx.x
    D = part.shape[2] - 2
    M = -math.inf
    for s in range(n_splits):                       # pass 1: the max
        M = max(M, part[h, s, D])
    L, A = 0.0, 0.0
    for s in range(n_splits):                       # pass 2: the weights
        w = math.exp2(part[h, s, D] - M)
        L += part[h, s, D + 1] * w
        A += part[h, s, d] * w
    out[h, d] = A / L


_lesson.break_it("merge-no-rescale", "the partials are merged without rescaling them to the global max",
                 "the merged output differs from the exact softmax", "merge(partials) vs softmax(s) v",
                 lambda: check_merge(acc_np.sum(axis=0) / l_np.sum()))
_lesson.break_it("lse-max", "the merged LSE is taken to be the largest LSE_s", "too small by the log of the "
                 "other splits' share", "merged LSE vs the LSE of all the scores", lambda: _lesson.close(
                     "merged LSE vs the LSE of all the scores", lse_split.max(), lse_all, rtol=1e-12))
_lesson.break_it("read-past-length", "a row of the cache is read one slot past its length",
                 "NaN from the poisoned slot, in every head of both rows", "decode over lengths + 1 vs decode over "
                 "lengths", lambda: _lesson.close("decode over lengths + 1 vs decode over lengths",
                                                  reference.decode_attention(q2.astype(np.float64), to_host(cache.k(0)),
                                                                             to_host(cache.v(0)), cache.lengths + 1),
                                                  want, atol=1e-5))
_lesson.break_it("append-at-minus-1", "kv_append.py (a copy) appends at lengths[b] - 1",
                 "nothing is written at all (the first append would start at slot -1: refused by the fit "
                 "check), so the prompt's slots are NaN", "cache slots 0-4 vs the prompt's K: 320 of 320",
                 lambda: append_checks(_lesson.edited(kv_append, "start = int64(lengths_in[b])",
                                                      "start = int64(lengths_in[b]) - 1")), simulator_only=True)
_lesson.break_it("no-advance", "kv_append.py (a copy) never advances the lengths table",
                 "the device lengths stay [0 0] (the host mirror would say [6 6]), so the step's token is "
                 "written over the prompt's first: slot 0 differs, in both rows and heads (64 of 320 values)",
                 "cache slots 0-4 vs the prompt's K: 64 of 320", lambda: append_checks(_lesson.edited(
                     kv_append, "    advance_length(lengths_out, counters, b, start, t_new, fits,", "    (")),
                 simulator_only=True)
_lesson.break_it("no-valid-check", "decode_slots.py (a copy) loads K/V words without `if valid`",
                 "the answer is still right, but the counted reads of k exceed one per visible element",
                 "counted reads of k vs one per visible element", decode_without_valid, simulator_only=True)
_lesson.break_it("two-pass-merge", "exercise 5b's merge in two passes (the max first)",
                 "the right output, 4 reads of part per split: over the budget of 3",
                 "reads of part): the kernel made", lambda: score_merge(merge_two_pass), simulator_only=True)

# %% [markdown]
# ## Benchmark
#
# Decode reads the cache for 4 FLOPs per byte, so its figure of merit is bandwidth: bytes of K and V streamed
# per second, against the ~3.35 TB/s of an H100's HBM. But one call also pays a fixed cost: the host launches
# the kernel (10-16 us of host time in BENCHMARKS.md) and the GPU starts its blocks and finishes its last one
# (~14 us of GPU time even for a short cache). The H100's measurements (call time with a synchronize, the
# GPU's own time, and their difference, the overhead of the call itself), with GB/s derived as bytes of K and V
# read (2 · 4 KV heads · n · 64 dims · 2 or 4 bytes, batch 1) over the measured time, show both regimes: up to
# 8192 tokens the time is flat at 27-30 us whatever the bytes (*launch-bound*: the GB/s column only grows
# because the bytes do), and from 32768 tokens it grows with n (memory-bound, at 0.9-1.3 TB/s on the GPU's own
# clock: BENCHMARKS.md explains why not 3). On a GPU this cell also times the kernels itself at TinyLlama's
# shape (the simulator's times would measure Python threads, so it does not).

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
                         frac_of_HBM=kv_bytes / (ms * 1e-3) / 1e9 / bench.HBM_GBPS))
    return rows


def decode_bandwidth(table):
    """BENCHMARKS.md's round-4 decode rows (v1, sync per call and GPU time) -> rows with MB read and GB/s, and the
    regime: launch-bound where the call takes no longer than 1.2x its cache type's shortest (flat), else memory."""
    us = lambda x: float(x.split()[0])                               # noqa: E731  ("26.6 us" -> 26.6)
    rows = []
    for r in table:
        n, itemsize = int(r["n"]), 2 if r["cache"] == "float16" else 4
        mb = 2 * 4 * n * 64 * itemsize / 1e6
        rows.append(dict(n=n, cache=r["cache"], MB_read=mb, v1_sync_us=us(r["v1 sync"]), v1_gpu_us=us(r["v1 GPU"]),
                         overhead_us=us(r["v1 sync"]) - us(r["v1 GPU"]),
                         GB_s_sync=mb * 1e6 / (us(r["v1 sync"]) * 1e-6) / 1e9,
                         GB_s_gpu=mb * 1e6 / (us(r["v1 GPU"]) * 1e-6) / 1e9))
    for r in rows:
        flat = min(x["v1_sync_us"] for x in rows if x["cache"] == r["cache"])
        r["bound"] = "launch" if r["v1_sync_us"] <= 1.2 * flat else "memory"
    return rows


columns = ["version", "context", "us", "GB_per_s", "frac_of_HBM"]
if BACKEND == "cuda":
    rows = [r for ver in decode.VERSIONS for r in time_decode((512, 2048, 8192, 32768), ver, "cuda", repeat=50)]
    print("decode attention, batch 1, 32 heads / 4 KV heads, head_dim 64, fp32 cache (host clock with a sync):")
    print(bench.format_table(rows, columns))
bw = decode_bandwidth(_lesson.benchmarks_table("### Round 4: decode v2"))
print("measured on an H100 (BENCHMARKS.md, decode round 4; GB/s derived: bytes of K and V / time):")
print(bench.format_table(bw, ["n", "cache", "MB_read", "v1_sync_us", "v1_gpu_us", "overhead_us", "GB_s_sync",
                              "GB_s_gpu", "bound"]))
print("(overhead_us = sync - GPU time: launching the call and waiting for it, the same ~12 us at every length)")
assert all(10 < r["overhead_us"] < 14 for r in bw), f"the line above says ~12 us: {[r['overhead_us'] for r in bw]}"
launch = sorted({r["n"] for r in bw if r["bound"] == "launch"})
memory = sorted({r["n"] for r in bw if r["bound"] == "memory"})
assert launch and memory and max(launch) <= 8192 < min(memory), \
    f"the text says launch-bound up to 8192 tokens and memory-bound from 32768; measured: launch {launch}, " \
    f"memory {memory}"
if BACKEND != "cuda":
    print("plot:", _lesson.ROOT / "benchmarks" / "plots" / "decode.png")
