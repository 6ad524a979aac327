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
* A causal attention kernel of your own (one thread per query row, lesson 2's loop) whose key range you
  write: exercise 4, the bottom-right rule in one line.
* The skipped tiles counted on the real kernel: numbattn/lab/tracing.py counts every K/V element each block
  loads in the simulator, and a picture shows which key tiles each query block reads
  (tutorials/out/04_tiles_read_per_block.png).
* Grouped-query attention (GQA): TinyLlama has 32 query heads but only 4 key/value heads; query head h reads
  KV head h // 8. The kernels index K and V that way instead of copying them 8 times; we check the result
  against the reference with the copy made explicit (`reference.repeat_kv`).

Run it: `python tutorials/04_causal_and_gqa.py` (add `--exercise` to check your own line), or run the `# %%`
cells in VS Code / Jupyter.
"""

# %%
import _setup  # noqa: F401  (must be the first import: GPU or simulator, see tutorials/README.md)

import math
import warnings

import numpy as np
from numba import cuda

import _lesson
import numbattn
import solutions
from numbattn import prefill, reference
from numbattn.lab import bench, tracing

BACKEND = numbattn.available_backends()[0]
print(f"engine: {_setup.ENGINE}; numbattn backend: {BACKEND}")
assert BACKEND in ("cuda", "sim"), "this lesson runs the kernels: it needs a GPU or NUMBA_ENABLE_CUDASIM=1"
plt = _lesson.pyplot()


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
_lesson.close("bottom-right mask (3 queries, 8 keys) vs the last 3 rows of the 8x8 mask",
              reference.causal_mask(3, 8), reference.causal_mask(8, 8)[5:])

# %% [markdown]
# The kernel implements the same rule (`offset = kv_len - q_len`; row i sees keys j <= i + offset). Check:
# the last 3 queries attending to all 8 keys give exactly the last 3 rows of a full 8×8 causal attention.
# This is what makes chunked prefill and decoding with a KV cache correct.

# %%
q, k, v = bench.random_qkv(1, 8, 8, n_heads=2, n_kv_heads=1, head_dim=16, seed=4)
full = numbattn.attention(q, k, v, causal=True)                      # all 8 queries
last3 = numbattn.attention(q[:, :, 5:], k, v, causal=True)           # queries 5, 6, 7 only, same keys
err = _lesson.close("3 queries over 8 keys vs the last 3 rows of the full causal attention", last3,
                    full[:, :, 5:], atol=1e-6, got_label="3 queries", want_label="full")
print(f"max |last 3 rows of full - 3 queries over 8 keys| = {err:.1e}")
_lesson.close("3 queries over 8 keys vs fp64 reference", last3,
              reference.attention(*fp64(q[:, :, 5:], k, v), causal=True), atol=1e-5)

# %% [markdown]
# ## Exercise 4: a causal kernel
#
# Lesson 2's first kernel, grown into a whole (slow but complete) causal attention: one thread per query
# row, the online softmax over the keys the row may see, the output row accumulated in `out` itself. The one
# line that makes it causal, and bottom-right aligned, is how many keys row i sees: `n_keys` below is yours
# to write (the stub lets every row see every key, which is attention without a mask). The check compares
# the kernel with the reference on a square case and on 3 queries over 8 keys, the case that tells
# bottom-right from top-left.

# %%
@cuda.jit(device=True)
def n_keys(i, q_len, kv_len):
    """EXERCISE 4. How many keys (0, 1, ...) query row i may see, of kv_len, when the q_len queries are the
    LAST q_len tokens of the sequence. One line."""
    return kv_len   # <- replace this line with yours, then run the lesson with --exercise


def make_causal_kernel(keys_of_row):
    @cuda.jit
    def causal_rows(q, k, v, out, scale):
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x     # this thread's query row
        q_len, kv_len, D = q.shape[0], k.shape[0], q.shape[1]
        if i < q_len:
            m, l = -math.inf, 0.0
            for d in range(D):
                out[i, d] = 0.0
            for j in range(keys_of_row(i, q_len, kv_len)):          # keys 0 .. n_keys - 1
                s = 0.0
                for d in range(D):
                    s += q[i, d] * k[j, d]
                m_new = max(m, s * scale)
                alpha, p = math.exp(m - m_new), math.exp(s * scale - m_new)
                l = l * alpha + p
                for d in range(D):
                    out[i, d] = out[i, d] * alpha + p * v[j, d]
                m = m_new
            for d in range(D):
                out[i, d] /= l
    return causal_rows


def run_causal(keys_of_row, q_len, kv_len, seed=9):
    """-> (the kernel's output, the reference's) for one head of q_len queries over kv_len keys."""
    qh, kh, vh = (x[0, 0].astype(np.float64) for x in bench.random_qkv(1, q_len, kv_len, n_heads=1,
                                                                          n_kv_heads=1, head_dim=16, seed=seed))
    out = cuda.device_array(qh.shape)
    make_causal_kernel(keys_of_row)[-(-q_len // 4), 4](cuda.to_device(qh), cuda.to_device(kh),
                                                       cuda.to_device(vh), out, 16 ** -0.5)
    return out.copy_to_host(), reference.attention(qh[None, None], kh[None, None], vh[None, None], causal=True)[0, 0]


def check_causal(keys_of_row, check=_lesson.close):
    for q_len, kv_len in ((6, 6), (3, 8)):
        got, want = run_causal(keys_of_row, q_len, kv_len)
        check(f"causal kernel, {q_len} queries over {kv_len} keys [row, dim]", got, want, atol=1e-9)


yours_n_keys = _lesson.exercise(4, n_keys, solutions.n_keys)
if BACKEND == "sim":        # in the simulator a device function is plain Python: we can call it here
    print("keys seen per row, 3 queries over 8 keys:", [yours_n_keys(i, 3, 8) for i in range(3)],
          " expected:", reference.causal_mask(3, 8).sum(axis=1).tolist())
check_causal(yours_n_keys, check=lambda what, got, want, atol: _lesson.check_exercise(4, what, got, want, atol))

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
# The real v1 kernel confirms it twice. The trace of lesson 2: each thread records its m_i after every key
# tile it processed and leaves NaN in the tiles its block skipped, so counting the non-NaN tiles of each
# block's first row must give the visited tiles of the map. And, in the simulator, numbattn/lab/tracing.py
# counts the K elements each block actually loaded from global memory: BLOCK_N·d per visited tile (fewer in
# a ragged last tile), zero for a skipped one. Both must match the map, also for q_len < kv_len.

# %%
tiles = prefill.Tiles(block_m=4, block_n=4, threads=4)
counted_maps = {}
for q_len, kv_len in ((16, 16), (6, 14)):
    qt, kt, vt = bench.random_qkv(1, q_len, kv_len, n_heads=1, n_kv_heads=1, head_dim=16, seed=q_len)
    out, trace = tracing.trace_v1(qt, kt, vt, causal=True, tiles=tiles)
    visited_by_kernel = sum(int((~np.isnan(trace[0, 0, q0, :, 0])).sum()) for q0 in range(0, q_len, 4))
    tmap = tile_map(q_len, kv_len, 4, 4)
    print(f"q_len={q_len:2d} kv_len={kv_len:2d}: the kernel visited {visited_by_kernel} key tiles, the map says "
          f"{count(tmap)[0]} of {tmap.size}")
    print("\n".join("   " + " ".join(r) for r in tmap))
    assert visited_by_kernel == count(tmap)[0], \
        f"q_len={q_len} kv_len={kv_len}: the v1 trace shows {visited_by_kernel} visited tiles, the map {count(tmap)[0]}"
    _lesson.close(f"v1 causal q_len={q_len} kv_len={kv_len} vs fp64 reference", out,
                  reference.attention(*fp64(qt, kt, vt), causal=True), atol=1e-5)
    if BACKEND == "sim":
        _, tr = tracing.trace_prefill(qt, kt, vt, causal=True, version="v1", tiles=tiles)
        loaded = np.zeros(tmap.shape, int)                 # [query block, key tile]: K elements loaded
        for (bx, _, _), rows in tr.rows("k", axis=2).items():
            for j, n in rows.items():
                loaded[bx, j // tiles.block_n] += n
        tile_keys = np.minimum(tiles.block_n, kv_len - np.arange(tmap.shape[1]) * tiles.block_n)
        _lesson.close(f"K elements loaded per (query block, key tile), q_len={q_len} kv_len={kv_len}", loaded,
                      np.where(tmap != ".", tile_keys * 16, 0), got_label="counted", want_label="tile map")
        print(f"   counted K loads per (query block, key tile), in elements of d = 16:\n{loaded}")
        counted_maps[q_len, kv_len] = (tmap, loaded)

# %% [markdown]
# The same, as a picture: one panel per case, a cell per (query block, key tile), coloured by what the map
# says (F computed, D computed and masked, . skipped) and labelled with the K elements the real kernel
# loaded there.

# %%
if plt and counted_maps:
    fig, axes = plt.subplots(1, len(counted_maps), figsize=(10, 3.2))
    for ax, ((q_len, kv_len), (tmap, loaded)) in zip(axes, counted_maps.items()):
        kind = np.select([tmap == "F", tmap == "D"], [2, 1], 0)
        ax.imshow(kind, cmap="Greens", vmin=-0.5, vmax=2.5, aspect="auto")
        for (r, c), n in np.ndenumerate(loaded):
            ax.text(c, r, f"{tmap[r, c]}\n{n} loads" if n else "skipped", ha="center", va="center", fontsize=8,
                    color="white" if tmap[r, c] == "F" else "black")
        ax.set(title=f"q_len={q_len}, kv_len={kv_len}: K loads per tile", xlabel="key tile (4 keys)",
               ylabel="query block (4 rows)", xticks=range(tmap.shape[1]), yticks=range(tmap.shape[0]))
    _lesson.save(fig, "04_tiles_read_per_block.png")

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
_lesson.close("visited fraction vs (T + 1) / 2T", [r["visited_fraction"] for r in rows],
              [(r["n"] // t2.block_m + 1) / (2 * (r["n"] // t2.block_m)) for r in rows], rtol=1e-12)

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
def check_gqa(result):
    return _lesson.close("kernel with 2 KV heads vs MHA on repeated K/V [batch, head, row, dim]", result, explicit,
                         atol=1e-5, got_label="kernel", want_label="repeated")


print(f"max |kernel - MHA on repeated K/V| = {check_gqa(ours):.1e}")
print(f"max |kernel - wrong mapping h % n_kv_heads| = {np.abs(ours - interleaved).max():.2f}")

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
    errs = {ver: _lesson.close(f"{ver}, heads {n_h}/{n_kv}, q_len {q_len}, kv_len {kv_len} vs fp64 reference",
                               prefill.flash_attention(q, k, v, causal=True, version=ver), want, atol=1e-5,
                               got_label=ver)
            for ver in prefill.VERSIONS}
    print(f"heads {n_h}/{n_kv} q_len {q_len:2d} kv_len {kv_len:2d}: " +
          "  ".join(f"{ver} {e:.1e}" for ver, e in errs.items()))
print("lesson 4 checks passed")

# %% [markdown]
# ## Break it
#
# Mistakes this lesson's checks catch, made on purpose below:
#
#     n_keys = i + offset (one key short)          -> exercise 4's check, at every row
#     n_keys = i + 1 (top-left, np.tril)           -> only the 3-queries-over-8-keys case fails: a square
#                                                     test alone would never notice
#     query head h reads KV head h % n_kv_heads    -> the GQA check
#
# and in numbattn/kernels/prefill_tiled.py (make_v1), to try yourself:
#
#     kv_end = min(kv_len, q0 + BM) (no offset)    -> "the v1 trace shows N visited tiles" and "K elements
#                                                     loaded per (query block, key tile)" at q_len < kv_len
#     last_key = i + offset - 1 (mask off by one)  -> every causal "vs fp64 reference" check

# %%
@cuda.jit(device=True)
def one_key_short(i, q_len, kv_len):
    return min(kv_len, i + (kv_len - q_len))


@cuda.jit(device=True)
def top_left(i, q_len, kv_len):
    return min(kv_len, i + 1)


with warnings.catch_warnings():         # row 0 then sees no key at all: its output is 0 / 0 = NaN
    warnings.simplefilter("ignore", RuntimeWarning)
    _lesson.breaks("the causal key range is one key short", lambda: check_causal(one_key_short))
_lesson.breaks("the causal mask is top-left aligned", lambda: check_causal(top_left))
_lesson.breaks("query head h reads KV head h % n_kv_heads", lambda: check_gqa(interleaved))

# %% [markdown]
# ## Benchmark
#
# On a GPU: v2 causal against non-causal at TinyLlama's shape. Skipping the tiles above the diagonal should
# bring the causal time close to half (a little more: the diagonal tiles pay for their masks, and the blocks
# near the bottom do more work than those near the top). Below n ≈ 1024 both calls are too short for it to
# show: a launch costs ~0.1 ms of host time whatever the work. The simulator's times would measure Python
# threads, so without a GPU the lesson shows the same ratio from the H100 measurements in BENCHMARKS.md.

# %%
columns = ["impl", "n", "full_ms", "causal_ms", "causal_over_full"]
if BACKEND == "cuda":
    rows = bench.bench_prefill(seq_lens=(1024, 2048, 4096, 8192), causal=(False, True), versions=("v2",),
                               reference_max_n=0)
    ms = {(r["impl"], r["n"], r["causal"]): r["ms"] for r in rows}      # torch's SDPA too, if installed
    table = [dict(impl=impl, n=n, full_ms=ms[impl, n, False], causal_ms=ms[impl, n, True],
                  causal_over_full=ms[impl, n, True] / ms[impl, n, False])
             for impl, n, causal in ms if causal and (impl, n, False) in ms]
    print("batch 1, 32 heads / 4 KV heads, head_dim 64:")
    print(bench.format_table(table, columns))
else:
    full = {r["n"]: r for r in _lesson.benchmarks_table("### Non-causal: milliseconds") if r["batch"] == "1"}
    causal = {r["n"]: r for r in _lesson.benchmarks_table("### Causal: milliseconds") if r["batch"] == "1"}
    table = [dict(impl=impl, n=n, full_ms=float(full[n][impl]), causal_ms=float(causal[n][impl]),
                  causal_over_full=float(causal[n][impl]) / float(full[n][impl]))
             for impl in ("numbattn v2", "torch SDPA mem-efficient fp32") for n in causal if n in full]
    print("measured on an H100 (BENCHMARKS.md, batch 1, 32 heads / 4 KV heads, head_dim 64):")
    print(bench.format_table(table, columns))
    print(f"plots: {_lesson.ROOT / 'benchmarks' / 'plots' / 'prefill_causal.png'} and prefill_full.png beside it")
