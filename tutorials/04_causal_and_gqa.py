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
* A tiled causal kernel of your own (lesson 3's tiles, lesson 2's loop) whose loop over the key tiles you
  write: exercise 4, the causal tile skip, scored on its answer and on its counted reads of K against the
  tiles up to the diagonal.
* The skipped tiles counted on the real kernel: numbattn/lab/tracing.py counts every K/V element each block
  loads in the simulator, and a picture shows which key tiles each query block reads
  (tutorials/out/04_tiles_read_per_block.png).
* Grouped-query attention (*GQA*): TinyLlama has 32 query heads but only 4 key/value heads; query head h reads
  KV head h // 8. The kernels index K and V that way instead of copying them 8 times; we check the result
  against the reference with the copy made explicit (`reference.repeat_kv`).

Run it: `python tutorials/04_causal_and_gqa.py` (add `--exercise` to score your own code, `--break NAME`
to plant a mistake), or run the `# %%`
cells in VS Code / Jupyter.
"""

# %%
import _setup  # noqa: F401  (must be the first import: GPU or simulator, see tutorials/README.md)

import math
import warnings

import numpy as np
from numba import cuda, float64

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
# After a prompt is processed, its keys and values sit in the *KV cache* (kept for the tokens that follow: lesson
# 5), and new tokens arrive a few at a time (a chunk of a long prompt, a new chat message) or one at a time
# (decoding). Then the queries are the *last* q_len tokens of a kv_len-token sequence, and query i is really token i
# + (kv_len - q_len). So the diagonal is anchored at the *bottom-right* corner of the [q_len, kv_len] mask, not the
# top-left (FlashAttention-2's convention; `numpy.tril` would give the top-left one, which is wrong here: it would
# hide almost the whole cache from the new tokens).

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
# ## Exercise 4: the causal tile skip
#
# Lesson 3's tiled kernel, made causal: a block of BM threads owns BM query rows (one each), loads K and V a
# tile of BN keys at a time into shared memory together (`load_kv`), and each thread folds the tile into its
# row's online softmax (`attend_tile`, which masks the keys its row may not see, element by element). What is
# left to you is the loop over the key tiles: which tiles this block needs, and the two barriers around each
# load. `causal_tiles` below is yours (its stub visits no tile). The score: the outputs against the reference on
# a square case and on 6 queries over 14 keys (the case that tells bottom-right from top-left alignment), and
# the reads of k each thread makes, counted, against its block's budget: the tiles up to the diagonal, BN·D / BM
# reads per thread each. Looping over every tile gives the right answer (the mask hides the extra keys) and
# fails the budget: the skip is the point.

# %%
BM4, BN4, D4 = 4, 4, 16                 # rows (= threads) per block, keys per tile, head dim


@cuda.jit(device=True)
def load_kv(k, v, j0, t, Ks, Vs):
    """The block's threads copy keys j0 .. j0 + BN4 - 1 of k and v into Ks, Vs (lesson 3's load; 0 past the end)."""
    for idx in range(t, BN4 * D4, BM4):
        r, c = idx // D4, idx % D4
        inside = j0 + r < k.shape[0]
        Ks[r, c] = k[j0 + r, c] if inside else 0.0
        Vs[r, c] = v[j0 + r, c] if inside else 0.0


def make_attend_tile(shift=0):
    """attend_tile(q, Ks, Vs, j0, i, state, out): row i's online softmax over the keys of this tile it may see,
    j <= i + (kv_len - q_len) + shift (shift = -1: a mask one key short, for a switch below)."""
    @cuda.jit(device=True)
    def attend_tile(q, Ks, Vs, j0, i, kv_len, state, out):
        if i < q.shape[0]:
            last = i + kv_len - q.shape[0] + shift                  # bottom-right: row i is token i + offset
            for jj in range(BN4):
                if j0 + jj <= last and j0 + jj < kv_len:
                    s = 0.0
                    for d in range(D4):
                        s += q[i, d] * Ks[jj, d]
                    s *= D4 ** -0.5
                    m_new = max(state[0], s)
                    alpha, p = math.exp(state[0] - m_new), math.exp(s - m_new)
                    state[1] = state[1] * alpha + p
                    for d in range(D4):
                        out[i, d] = out[i, d] * alpha + p * Vs[jj, d]
                    state[0] = m_new
    return attend_tile


attend_tile = make_attend_tile()


@cuda.jit(device=True)
def causal_tiles(q, k, v, q0, t, Ks, Vs, state, out):
    """EXERCISE 4. The loop over the key tiles this block needs, in steps of BN4 keys from key 0: for each, a
    barrier (everyone is done with the previous tile), load_kv(k, v, j0, t, Ks, Vs), a barrier (the tile is
    complete), attend_tile(q, Ks, Vs, j0, q0 + t, k.shape[0], state, out). The block's rows are q0 .. q0 + BM4 - 1
    of q.shape[0] queries, the LAST queries of k.shape[0] keys: stop after the tile holding the last key its last
    row sees. Budget: no tile past that one."""
    pass    # <- replace this line with your loop, then run the lesson with --exercise


def make_causal_kernel(tiles_loop):
    @cuda.jit
    def causal_rows(q, k, v, out):
        t = cuda.threadIdx.x
        q0 = cuda.blockIdx.x * BM4
        i = q0 + t                                          # this thread's query row
        Ks = cuda.shared.array((BN4, D4), float64)
        Vs = cuda.shared.array((BN4, D4), float64)
        state = cuda.local.array(2, float64)                # m, l of row i
        state[0], state[1] = -math.inf, 0.0
        if i < q.shape[0]:
            for d in range(D4):
                out[i, d] = 0.0
        tiles_loop(q, k, v, q0, t, Ks, Vs, state, out)
        if i < q.shape[0]:
            for d in range(D4):
                out[i, d] = out[i, d] / state[1] if state[1] > 0 else math.nan
    return causal_rows


def run_causal(tiles_loop, q_len, kv_len, seed=9):
    """-> (the kernel's output, the reference's, {query block: most reads of k by one of its threads} or None)."""
    qh, kh, vh = (x[0, 0].astype(np.float64) for x in bench.random_qkv(1, q_len, kv_len, n_heads=1,
                                                                          n_kv_heads=1, head_dim=D4, seed=seed))
    want = reference.attention(qh[None, None], kh[None, None], vh[None, None], causal=True)[0, 0]
    out, kernel, grid = np.full(qh.shape, np.nan), make_causal_kernel(tiles_loop), -(-q_len // BM4)
    if BACKEND != "sim":
        out_dev = cuda.to_device(out)
        kernel[grid, BM4](cuda.to_device(qh), cuda.to_device(kh), cuda.to_device(vh), out_dev)
        return out_dev.copy_to_host(), want, None
    tracer = tracing.Tracer()
    kernel[grid, BM4](*tracer.wrap(q=qh, k=kh, v=vh, out=out))
    reads = {}
    for (blk, _), n in tracer.per_thread("k").items():
        reads[blk[0]] = max(reads.get(blk[0], 0), n)
    return out, want, reads


CAUSAL_CASES = ((8, 8), (6, 14))


def score_causal(tiles_loop, check=None):
    report = []
    for q_len, kv_len in CAUSAL_CASES:
        got, want, reads = run_causal(tiles_loop, q_len, kv_len)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            (check or _lesson.check_exercise)(4, f"causal kernel, {q_len} queries over {kv_len} keys [row, dim]",
                                              got, want, atol=1e-9)
        if reads is None:
            continue
        tmap = tile_map(q_len, kv_len, BM4, BN4)
        for block, n in sorted(reads.items()):
            visited = int((tmap[block] != ".").sum())
            report.append(_lesson.check_budget(4, f"reads of k in query block {block} ({q_len}x{kv_len})", n,
                                               visited * BN4 * D4 // BM4,
                                               f"its rows see {visited} of {tmap.shape[1]} key tiles"))
    return "; ".join(report) or "(reads are counted in the simulator only)"


solutions.load_kv, solutions.attend_tile = load_kv, attend_tile     # the solution calls the lesson's helpers
_lesson.exercise(4, "the causal tile skip", causal_tiles, solutions.causal_tiles, score_causal)

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
# Multi-head attention gives every query head its own key and value head. Grouped-query attention (*GQA*)
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
# Every kernel version (in the simulator v1, the teaching kernel, and v3, the default: tests/test_prefill.py
# checks them all) against the fp64 reference, causal, over shapes built to catch mistakes: square and
# bottom-right (q_len < kv_len, including a single query), GQA groups of 1, 2 and 4, lengths that are not
# multiples of the tiles.

# %%
cases = [(4, 4, 5, 5), (4, 2, 3, 9), (4, 1, 1, 7), (2, 1, 6, 11)]     # (n_heads, n_kv_heads, q_len, kv_len)
CHECKED = prefill.VERSIONS if BACKEND == "cuda" else ("v1", "v3")   # the simulator: the teaching one, the default
for n_h, n_kv, q_len, kv_len in cases:
    q, k, v = bench.random_qkv(1, q_len, kv_len, n_heads=n_h, n_kv_heads=n_kv, head_dim=16, seed=q_len + kv_len)
    want = reference.attention(*fp64(q, k, v), causal=True)
    errs = {ver: _lesson.close(f"{ver}, heads {n_h}/{n_kv}, q_len {q_len}, kv_len {kv_len} vs fp64 reference",
                               prefill.flash_attention(q, k, v, causal=True, version=ver), want, atol=1e-5,
                               got_label=ver)
            for ver in CHECKED}
    print(f"heads {n_h}/{n_kv} q_len {q_len:2d} kv_len {kv_len:2d}: " +
          "  ".join(f"{ver} {e:.1e}" for ver, e in errs.items()))
print("lesson 4 checks passed")

# %% [markdown]
# ## Break it
#
# Mistakes this lesson's checks catch, each a switch with its prediction (a plain run tries them all;
# `python tutorials/04_causal_and_gqa.py --break top-left` runs up to that one and stops there):
#
#     --break no-skip          every key tile loaded, the mask alone causal -> right answer, over the budget
#     --break top-left         the loop ends at q0 + BM (no offset)          -> only q_len < kv_len fails: a
#                                                                             square test alone would never notice
#     --break mask-one-short   the mask one key short                        -> every row, NaN in the first
#     --break gqa-modulo       query head h reads KV head h % n_kv_heads     -> the GQA check

# %%
def make_loop(stop):
    """A tile loop like exercise 4's, its end given by stop(q0, q_len, kv_len) (a Python function, compiled here as a
    device function: the simulator calls a plain one, the GPU's compiler rejects it)."""
    stop = cuda.jit(device=True)(stop)

    @cuda.jit(device=True)
    def loop(q, k, v, q0, t, Ks, Vs, state, out):
        for j0 in range(0, stop(q0, q.shape[0], k.shape[0]), BN4):
            cuda.syncthreads()
            load_kv(k, v, j0, t, Ks, Vs)
            cuda.syncthreads()
            attend_tile(q, Ks, Vs, j0, q0 + t, k.shape[0], state, out)
    return loop


@cuda.jit(device=True)
def short_mask_loop(q, k, v, q0, t, Ks, Vs, state, out):
    for j0 in range(0, k.shape[0], BN4):
        cuda.syncthreads()
        load_kv(k, v, j0, t, Ks, Vs)
        cuda.syncthreads()
        attend_tile_short(q, Ks, Vs, j0, q0 + t, k.shape[0], state, out)


def plain(number, what, got, want, atol):
    return _lesson.close(what, got, want, atol=atol, got_label="kernel")


attend_tile_short = make_attend_tile(shift=-1)
every_tile = make_loop(lambda q0, q_len, kv_len: kv_len)
top_left = make_loop(lambda q0, q_len, kv_len: min(kv_len, q0 + BM4))

_lesson.break_it("no-skip", "the tile loop runs over every key tile (the mask alone keeps it causal)",
                 "right outputs, but block 0 reads every tile: over its budget",
                 "reads of k in query block 0 (8x8)): the kernel made 32 per thread, the budget is 16",
                 lambda: score_causal(every_tile), simulator_only=True)
_lesson.break_it("top-left", "the tile loop ends at q0 + BM (top-left alignment, no offset)",
                 "the square case passes; 6 queries over 14 keys fails: those rows never see their last keys",
                 "causal kernel, 6 queries over 14 keys", lambda: score_causal(top_left, check=plain))
_lesson.break_it("mask-one-short", "attend_tile masks one key too many (j <= i + offset - 1)",
                 "every row misses its own key: the first row of the square case sees none (NaN)",
                 "causal kernel, 8 queries over 8 keys", lambda: score_causal(short_mask_loop, check=plain))
_lesson.break_it("gqa-modulo", "query head h reads KV head h % n_kv_heads",
                 "the GQA check fails at the heads whose group the modulo gets wrong (heads 1 and 2)",
                 "kernel with 2 KV heads vs MHA on repeated K/V", lambda: check_gqa(interleaved))

# %% [markdown]
# ## Benchmark
#
# On a GPU: v2 causal against non-causal at TinyLlama's shape. Skipping the tiles above the diagonal should
# bring the causal time close to half (a little more: the diagonal tiles pay for their masks). Measured on the
# H100, it does not at first: up to n = 1024 the causal call takes 0.98x the full one, the saving first shows
# at 2048 (0.80x) and nears half at 8192 (0.55x). With few query tiles the GPU is not full, and the time is
# that of the longest blocks, the last query tiles, which see every key in both cases. The simulator's times
# would measure Python threads, so without a GPU the lesson shows that ratio from BENCHMARKS.md (and checks
# the sentence above against it).

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
    ratio = {r["n"]: r["causal_over_full"] for r in table if r["impl"] == "numbattn v2"}
    assert ratio["1024"] > 0.95 and ratio["2048"] < 0.85 and ratio["8192"] < 0.6, \
        f"the text above says the causal saving first shows at 2048 and nears half at 8192; measured: {ratio}"
