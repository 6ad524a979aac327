"""
Lesson 4: causal masking by skipping tiles, and grouped-query heads
===================================================================

What you will learn
-------------------
* The causal mask (a token sees itself and the tokens before it), and how a tiled kernel gets it almost for
  free: key tiles entirely above the diagonal are never loaded, only the tiles that cross it are masked
  element by element. We count tiles visited against the total, and check the count on the real kernel.
* Bottom-right alignment: when there are fewer queries than keys (q_len < kv_len, the new tokens after a KV
  cache), the queries are the *last* q_len tokens, so query i sees keys j <= i + (kv_len - q_len). We print
  the mask and check that it reproduces the last rows of a full causal attention.
* Grouped-query attention (GQA): TinyLlama has 32 query heads but only 4 key/value heads; query head h reads
  KV head h // 8. The kernels index K and V that way instead of copying them 8 times; we check the result
  against the reference with the copy made explicit (`reference.repeat_kv`).

Run it: `python tutorials/04_causal_and_gqa.py`, or run the `# %%` cells in VS Code / Jupyter.
"""

# %%
import _setup  # noqa: F401  (must be the first import: GPU or simulator, see tutorials/README.md)

import numpy as np

import numbattn
from numbattn import bench, prefill, reference

BACKEND = numbattn.available_backends()[0]
print(f"engine: {_setup.ENGINE}; numbattn backend: {BACKEND}")
assert BACKEND in ("cuda", "sim"), "this lesson runs the kernels: it needs a GPU or NUMBA_ENABLE_CUDASIM=1"


def show_mask(mask):
    return "\n".join(" ".join("x" if ok else "." for ok in row) for row in mask)


def fp64(*xs):
    return [x.astype(np.float64) for x in xs]


# %% [markdown]
# ## The causal mask
#
# A language model is trained to predict token i+1 from tokens 0..i, so token i must not attend to anything
# after it. The mask sets those scores to -inf before the softmax (exp(-inf) = 0: they get zero weight).
# Row = query, column = key, x = allowed:

# %%
print(show_mask(reference.causal_mask(6, 6)))

# %% [markdown]
# ## Bottom-right alignment: fewer queries than keys
#
# After a prompt is processed, its keys and values sit in the KV cache (lesson 5), and new tokens arrive a
# few at a time (a chunk of a long prompt, a new chat message) or one at a time (decoding). Then the
# queries are the *last* q_len tokens of a kv_len-token sequence, and query i is really token
# i + (kv_len - q_len). So the diagonal is anchored at the bottom-right corner of the [q_len, kv_len] mask,
# not the top-left (FlashAttention-2's convention; `numpy.tril` would give the top-left one, which is
# wrong here: it would hide almost the whole cache from the new tokens).

# %%
print("bottom-right aligned, q_len=3, kv_len=8 (what numbattn uses):")
print(show_mask(reference.causal_mask(3, 8)))
print("top-left aligned (np.tril), for comparison, WRONG for new tokens after a cache:")
print(show_mask(np.tril(np.ones((3, 8), bool))))
assert (reference.causal_mask(3, 8) == reference.causal_mask(8, 8)[5:]).all()

# %% [markdown]
# The kernel implements the same rule (`offset = kv_len - q_len`; row i sees keys j <= i + offset). Check:
# the last 3 queries attending to all 8 keys give exactly the last 3 rows of a full 8×8 causal attention.
# This is what makes chunked prefill and decoding with a KV cache correct.

# %%
q, k, v = bench.random_qkv(1, 8, 8, n_heads=2, n_kv_heads=1, head_dim=16, seed=4)
full = numbattn.attention(q, k, v, causal=True)                      # all 8 queries
last3 = numbattn.attention(q[:, :, 5:], k, v, causal=True)           # queries 5, 6, 7 only, same keys
print(f"max |last 3 rows of full - 3 queries over 8 keys| = {np.abs(full[:, :, 5:] - last3).max():.1e}")
assert np.allclose(full[:, :, 5:], last3, atol=1e-6)
assert np.allclose(last3, reference.attention(*fp64(q[:, :, 5:], k, v), causal=True), atol=1e-5)

# %% [markdown]
# ## Skipping tiles
#
# A tiled kernel works on BLOCK_M query rows × BLOCK_N keys at a time. Relative to the diagonal a tile can be
#
#     F  fully visible    every key is <= every row's last key: computed, no mask needed
#     D  on the diagonal  some of its scores are masked: computed, then masked element by element
#     .  above it         every score would be masked: never loaded, never computed
#
# The kernel's loop over key tiles simply stops early: block q0 (rows q0 .. q0+BM-1) needs keys up to
# q0 + BM - 1 + offset, so it runs `for j0 in range(0, min(kv_len, q0 + BM + offset), BLOCK_N)`.

# %%
def tile_map(q_len, kv_len, block_m, block_n):
    """[n_query_blocks, n_key_tiles] of 'F', 'D', '.' for a causal, bottom-right aligned attention."""
    offset = kv_len - q_len
    rows = []
    for q0 in range(0, q_len, block_m):
        first_row_last_key = q0 + offset                                  # the block's most restricted row
        kv_end = min(kv_len, q0 + block_m + offset)                       # the kernel's loop bound
        row = []
        for j0 in range(0, kv_len, block_n):
            if j0 >= kv_end:
                row.append(".")
            elif j0 + block_n - 1 <= first_row_last_key and j0 + block_n <= kv_len:
                row.append("F")
            else:
                row.append("D")
        rows.append(row)
    return np.array(rows)


def count(tmap):
    visited = int((tmap != ".").sum())
    return visited, int((tmap == "D").sum()), tmap.size


tm = tile_map(16, 16, 4, 4)
print("16 queries x 16 keys in 4x4 tiles (rows = query blocks, columns = key tiles):")
print("\n".join(" ".join(r) for r in tm))
print("visited %d of %d tiles, %d of them masked element-wise" % (count(tm)[0], tm.size, count(tm)[1]))

# %% [markdown]
# The trace of lesson 2 confirms it on the real v1 kernel: each thread records its m_i after every key tile
# it processed and leaves NaN in the tiles its block skipped. Counting the non-NaN tiles of each block's
# first row must give the visited tiles of the map, also for q_len < kv_len.

# %%
tiles = prefill.Tiles(block_m=4, block_n=4, threads=4)
for q_len, kv_len in ((16, 16), (6, 14)):
    qt, kt, vt = bench.random_qkv(1, q_len, kv_len, n_heads=1, n_kv_heads=1, head_dim=16, seed=q_len)
    out, trace = prefill.trace_v1(qt, kt, vt, causal=True, tiles=tiles)
    visited_by_kernel = sum(int((~np.isnan(trace[0, 0, q0, :, 0])).sum()) for q0 in range(0, q_len, 4))
    tmap = tile_map(q_len, kv_len, 4, 4)
    print(f"q_len={q_len:2d} kv_len={kv_len:2d}: the kernel visited {visited_by_kernel} key tiles, the map says "
          f"{count(tmap)[0]} of {tmap.size}")
    print("\n".join("   " + " ".join(r) for r in tmap))
    assert visited_by_kernel == count(tmap)[0]
    assert np.allclose(out, reference.attention(*fp64(qt, kt, vt), causal=True), atol=1e-5)

# %% [markdown]
# At real sizes and the H100 tiles of v2 (128 query rows × 32 keys), causal attention visits just over half
# of the tiles, and only a thin band of them needs the element-wise mask:

# %%
t2 = prefill.gpu_tiles("v2", 64, cc=(9, 0))
rows = []
for n in (512, 2048, 8192):
    visited, diagonal, total = count(tile_map(n, n, t2.block_m, t2.block_n))
    rows.append(dict(n=n, tiles_total=total, visited=visited, masked_elementwise=diagonal,
                     visited_fraction=visited / total))
print(f"causal prefill, {t2.block_m}x{t2.block_n} tiles:")
print(bench.format_table(rows, ["n", "tiles_total", "visited", "masked_elementwise", "visited_fraction"]))
# query tile i (of T = n / BLOCK_M) visits (i + 1) * BLOCK_M / BLOCK_N key tiles: (T + 1) / 2T of them all
assert all(r["visited_fraction"] == (r["n"] // t2.block_m + 1) / (2 * (r["n"] // t2.block_m)) for r in rows)

# %% [markdown]
# ## Grouped-query attention: fewer K/V heads than query heads
#
# Multi-head attention gives every query head its own key and value head. Grouped-query attention (GQA)
# lets a group of query heads share one: TinyLlama has 32 query heads and 4 KV heads, so 8 query heads
# share each KV head, and query head h uses KV head h // 8 (consecutive query heads form a group; the
# checkpoint's weights are laid out that way). What GQA buys is memory: the KV cache, which every decoding
# step reads in full, is 8x smaller.

# %%
n_heads, n_kv_heads, head_dim, n_layers = 32, 4, 64, 22                   # TinyLlama
group = n_heads // n_kv_heads
print("query head -> KV head:", {h: h // group for h in range(0, n_heads, 4)}, "...")


def per_token(kv_heads):
    return 2 * kv_heads * head_dim * 4 * n_layers                        # K and V, fp32, all layers


print(f"KV cache per token: {per_token(n_kv_heads) / 1024:.0f} KiB with 4 KV heads, "
      f"{per_token(n_heads) / 1024:.0f} KiB if every query head had its own; at 2048 tokens "
      f"{2048 * per_token(n_kv_heads) / 2**20:.0f} MiB vs {2048 * per_token(n_heads) / 2**20:.0f} MiB")

# %% [markdown]
# The simple way to compute GQA is to repeat each KV head `group` times and run ordinary attention; that is
# what the reference does (`reference.repeat_kv`), and it materialises a group-times larger copy of K and V.
# The kernels instead compute, per block, `hk = h // (n_heads // n_kv_heads)` and read K[b, hk] directly:
# nothing is copied, and the query heads of a group read the same K/V bytes (which then tend to hit cache).
# Check that both give the same answer, and that the obvious wrong mapping (h % n_kv_heads) does not:

# %%
q, k, v = bench.random_qkv(1, 10, 10, n_heads=4, n_kv_heads=2, head_dim=16, seed=5)
k_rep, v_rep = reference.repeat_kv(k, 4), reference.repeat_kv(v, 4)        # [1, 4, 10, 16]: copies
print(f"k: {k.shape} {k.nbytes} bytes; repeated for 4 query heads: {k_rep.shape} {k_rep.nbytes} bytes")
ours = numbattn.attention(q, k, v, causal=True)                            # the kernel, k with 2 heads
explicit = reference.attention(*fp64(q, k_rep, v_rep), causal=True)        # plain MHA on the copies
interleaved = reference.attention(*fp64(q, k[:, [0, 1, 0, 1]], v[:, [0, 1, 0, 1]]), causal=True)  # h % 2
print(f"max |kernel - MHA on repeated K/V| = {np.abs(ours - explicit).max():.1e}")
print(f"max |kernel - wrong mapping h % n_kv_heads| = {np.abs(ours - interleaved).max():.2f}")
assert np.abs(ours - explicit).max() < 1e-5
assert np.abs(ours - interleaved).max() > 0.1

# %% [markdown]
# ## Correctness check
#
# Every kernel version against the fp64 reference, causal, over shapes built to catch mistakes: square and
# bottom-right (q_len < kv_len, including a single query), GQA groups of 1, 2 and 4, lengths that are not
# multiples of the tiles.

# %%
cases = [(4, 4, 5, 5), (4, 2, 3, 9), (4, 1, 1, 7), (2, 1, 6, 11)]     # (n_heads, n_kv_heads, q_len, kv_len)
for n_h, n_kv, q_len, kv_len in cases:
    q, k, v = bench.random_qkv(1, q_len, kv_len, n_heads=n_h, n_kv_heads=n_kv, head_dim=16, seed=q_len + kv_len)
    want = reference.attention(*fp64(q, k, v), causal=True)
    errs = {ver: np.abs(prefill.flash_attention(q, k, v, causal=True, version=ver) - want).max()
            for ver in prefill.VERSIONS}
    print(f"heads {n_h}/{n_kv} q_len {q_len:2d} kv_len {kv_len:2d}: " +
          "  ".join(f"{ver} {e:.1e}" for ver, e in errs.items()))
    assert max(errs.values()) < 1e-5
print("lesson 4 checks passed")

# %% [markdown]
# ## Benchmark
#
# On a GPU: v2 causal against non-causal at TinyLlama's shape. Skipping the tiles above the diagonal should
# bring the causal time close to half (a little more: the diagonal tiles pay for their masks, and the blocks
# near the bottom do more work than those near the top). Without a GPU: simulator times at a tiny shape.

# %%
if BACKEND == "cuda":
    rows = bench.bench_prefill(seq_lens=(1024, 2048, 4096, 8192), causal=(False, True), versions=("v2",),
                               reference_max_n=0)
    ms = {(r["impl"], r["n"], r["causal"]): r["ms"] for r in rows}      # torch's SDPA too, if installed
    table = [dict(impl=impl, n=n, full_ms=ms[impl, n, False], causal_ms=ms[impl, n, True],
                  causal_over_full=ms[impl, n, True] / ms[impl, n, False])
             for impl, n, causal in ms if causal and (impl, n, False) in ms]
    print("batch 1, 32 heads / 4 KV heads, head_dim 64:")
    print(bench.format_table(table, ["impl", "n", "full_ms", "causal_ms", "causal_over_full"]))
else:
    print("the benchmark needs a CUDA GPU; tiny-size timing in the simulator instead:")
    qt, kt, vt = bench.random_qkv(1, 16, 16, n_heads=2, n_kv_heads=1, head_dim=16)
    rows = []
    for causal in (False, True):
        impls = bench.prefill_impls(BACKEND, ("v2",), qt, kt, vt, causal=causal, with_reference=False)
        for name, fn in impls.items():
            rows.append(dict(impl=name, n=16, causal=causal, ms=bench.timed(fn, "host", warmup=0, repeat=1)))
    print(bench.format_table(rows, ["impl", "n", "causal", "ms"]))
