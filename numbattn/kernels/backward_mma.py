"""Attention backward v3: FlashAttention-2's Algorithm 2 on tensor cores, at fp32 accuracy (3xTF32).

The same two kernels as v1 (kernels/backward_tiled.py: the equations, and which tiles are visited), with every
product a warp-wide m16n8k8 TF32 MMA split three ways as in prefill v3 (kernels/mma.py, kernels/prefill_mma.py:
A_small B_big + A_big B_small + A_big B_big, relative error ~1e-6). A warp owns 16 rows of the stationary side:

    dkdv_v3   a block of W warps owns BN = 16 W keys; per query tile of BM rows (Q, dO, the rows' P references and
              D staged in shared memory), warp w computes for its 16 keys, all as C fragments [16 keys, BM]:
                  S^T  = K_w Q^T          dP^T = V_w dO^T          (A: K, V rows from shared; B: Q, dO rows)
                  P^T  = exp2(S^T * scale log2 e - ref[query]),   dS^T = P^T ∘ (dP^T - D[query])
                  dV_w += P^T dO          dK_w += dS^T Q           (A: P^T, dS^T straight from the C fragments)
    dq_v3     a block of W warps owns BM = 16 W query rows; per key tile of BN keys (K, V staged), warp w computes
                  S = Q_w K^T,  dP = dO_w V^T,  P, dS as above,  dQ_w += dS K

P and dS per element are v1's (backward_prep.make_p_ds: the forward's soft cap, and its slope in dS), and which
pairs are visible is the forward's rule (common.visible_keys / tile_is_whole with the sliding window): query tiles
(dkdv) and key tiles (dq) outside every window are skipped, and only tiles that cross a boundary are masked.

The layout is the forward's, transposed where the stationary side is the keys: lane (g, t) = (lane >> 2, lane & 3)
holds rows g and g + 8 of each C fragment and columns 2t, 2t + 1 of each 8-column block. In the products with P
(or dS) as the A operand, the k index of each 8-block runs permuted (k = t <-> column 2t, k = t + 4 <-> 2t + 1), so
the C fragment is the A fragment reordered in registers (c0, c2, c1, c3) and P never goes through shared memory
(kernels/mma.py's make_fragments_times_rows, the product prefill v3's P V runs too). Each tile's dV, dK (dQ)
product is summed from zero in the MMAs and added to the fp32 accumulators in SIMT arithmetic, as prefill v3 does
for O: the tensor cores' accumulation over thousands of query rows would round less carefully.

dQ: a separate pass (dq_v3), not atomics from dkdv. Both are FlashAttention-2's options (the paper adds dQ with
atomics; Triton's fused-attention tutorial runs a second loop). Atomics would need dS^T transposed through shared
memory (a warp holds dS^T by keys, dQ needs it by queries) and BM x D atomic adds per (key block, query tile):
5.4e8 at n = 4096 with 32 heads and blocks of 64 keys, non-causal; the second pass recomputes S and dP (7 products
instead of 5) and needs none, and its sums run in a fixed order (deterministic). This choice was made by that
count, not measured: only the second pass is built, and the measured comparison the issue asks for (an atomic
variant beside it on the H100) is still to do. What is measured is this backward next to torch's
(numbattn/lab/bench.py `bench_backward`, BENCHMARKS.md "Attention backward" once run).

dK, dV: the query heads sharing a KV head run as different blocks (the grid is key tiles x query heads x batch, so
there are enough blocks at TinyLlama's 4 KV heads, and causal's uneven work per key tile evens out over them); each
block adds its 16 W x D rows into fp32 dK, dV with one atomic per element, once, at the end (zeroed before by
kernels/backward_prep.py). With one query head per KV head that sum has one term: deterministic.

Memory traffic per (batch, query head): dkdv reads K, V once and Q, dO (with lse, D) once per key block of BN keys
(halved for causal); dq reads Q, dO once and K, V once per query block of BM rows; nothing N x N is stored.
Shared memory: (2 BN (D + 4) + 2 BM (D + 4) + 2 BM) * 4 bytes (rows padded by 4 words: conflict-free fragment reads,
as in prefill v3).
# q, dout [B, H, Lq, D], k, v [B, Hkv, Lk, D], lse, delta [B, H, Lq], window, softcap -> dq [B, H, Lq, D],
# dk, dv [B, Hkv, Lk, D]
"""
import functools

from numba import cuda, float32

from .backward_prep import make_p_ds, p_reference
from .common import device, kernel, prefill_block, tile_is_whole, visible_keys
from .mma import make_fragments_times_rows, make_mma_3xtf32_n, mma_scratch_shape, tf32_split


def layout(stationary_rows, tile_rows, threads, head_dim):
    """(warps, KD = head_dim / 8 k-steps, NT = tile_rows / 8 column blocks, NO = head_dim / 8 output blocks, NL =
    elements each thread stages per tile) for a kernel whose block owns `stationary_rows` rows (16 per warp) and walks
    over tiles of `tile_rows` rows of the other side."""
    warps = threads // 32
    if (threads % 32 or not warps or stationary_rows != 16 * warps or tile_rows % 8 or head_dim % 8
            or tile_rows * head_dim % threads or tile_rows > threads):
        raise ValueError(f"backward v3: {stationary_rows} stationary rows, tiles of {tile_rows} rows, {threads} "
                         f"threads: expected whole warps of 32 threads with 16 stationary rows each, tiles a multiple "
                         f"of 8 rows and at most one row per thread, and tile_rows * head_dim ({head_dim}) a "
                         f"multiple of threads")
    return warps, head_dim // 8, tile_rows // 8, head_dim // 8, tile_rows * head_dim // threads


def shared_bytes(stationary_rows, tile_rows, head_dim):
    """Static shared memory of one block on a GPU (the simulator's scratch not counted)."""
    return 4 * (2 * (stationary_rows + tile_rows) * (head_dim + 4) + 2 * tile_rows)


def _parts(stationary_rows, tile_rows, head_dim, threads, keys_stationary, capped):
    """What both kernels are compiled from, for a block owning `stationary_rows` rows (keys in dkdv, queries in dq)
    that walks over tiles of `tile_rows` rows of the other side -> (NC: the tile's 8-column blocks, NO: the output's,
    DP: a padded shared row, SCRATCH, FB: B fragments of a k-step, NS: elements staged per thread, stage_rows (the
    block's own rows), stage_pair (a tile's), abt, pb, probs)."""
    _, KD, NC, NO, NL = layout(stationary_rows, tile_rows, threads, head_dim)
    FB = max(NC, NO)
    return (NC, NO, head_dim + 4, mma_scratch_shape(threads, FB), FB, max(NL, stationary_rows * head_dim // threads),
            _make_stage(stationary_rows, head_dim, threads), _make_stage(tile_rows, head_dim, threads),
            _make_abt(KD, NC), _make_pb(NC, NO), _make_probs(NC, keys_stationary, capped))


@functools.lru_cache(maxsize=None)
def make_dkdv_v3(head_dim, block_m, block_n, threads, capped=False):
    """block_n keys per block (16 per warp), query tiles of block_m rows; capped: soft-capped scores (compile time)."""
    D, BM, BN = head_dim, block_m, block_n
    NQ, NO, DP, SCRATCH, FB, NS, stage_rows, stage_pair, abt, pb, probs = _parts(BN, BM, D, threads, True, capped)
    store_kv = _make_store_dkdv(NO)

    @kernel
    def attention_backward_dkdv_v3(q, k, v, dout, lse, delta, dk, dv, scale_log2, scale, causal, window, softcap):
        # grid (key blocks, query heads, batch)
        b, h, hk, q_len = prefill_block(q, k)
        kv_len = k.shape[2]
        tid = cuda.threadIdx.x
        g, t, kw = (tid % 32) >> 2, tid & 3, (tid // 32) * 16     # fragment coordinates; the warp's first key
        j0 = cuda.blockIdx.x * BN
        Ks = cuda.shared.array((BN, DP), float32)
        Vs = cuda.shared.array((BN, DP), float32)
        Qs = cuda.shared.array((BM, DP), float32)
        dOs = cuda.shared.array((BM, DP), float32)
        rows = cuda.shared.array((2, BM), float32)  # the query rows' P references and D
        scratch = cuda.shared.array(SCRATCH, float32)
        s = cuda.local.array((NQ, 4), float32)      # S^T, then P^T: [16 keys, BM queries] as C fragments
        dp = cuda.local.array((NQ, 4), float32)     # dP^T, then dS^T
        acc = cuda.local.array((NO, 4), float32)    # one tile's product
        dk_w = cuda.local.array((NO, 4), float32)   # dK_w, dV_w [16 keys, D]
        dv_w = cuda.local.array((NO, 4), float32)
        fa = cuda.local.array((1, 4), float32)      # one A fragment, split: big ...
        fa_s = cuda.local.array((1, 4), float32)    # ... and small
        fb = cuda.local.array((FB, 2), float32)     # the B fragments of one k-step, split
        fb_s = cuda.local.array((FB, 2), float32)
        staged = cuda.local.array((2, NS), float32)
        stage_rows(k, v, b, hk, j0, kv_len, tid, staged, Ks, Vs)
        _zero(dk_w, NO)
        _zero(dv_w, NO)
        for i0 in range(0, q_len, BM):
            first, end = visible_keys(i0, BM, q_len, kv_len, causal, window)
            if end <= j0 or j0 + BN <= first:
                continue                            # no key of this block is visible to the tile: skipped
            cuda.syncthreads()                      # every warp is done with the previous query tile
            stage_pair(q, dout, b, h, i0, q_len, tid, staged, Qs, dOs)
            _stage_row_refs(lse, delta, b, h, i0, q_len, tid, BM, rows)
            cuda.syncthreads()
            abt(Ks, kw, Qs, s, fa, fa_s, fb, fb_s, g, t, scratch)       # S^T
            abt(Vs, kw, dOs, dp, fa, fa_s, fb, fb_s, g, t, scratch)     # dP^T
            whole = tile_is_whole(j0, BN, i0, BM, q_len, kv_len, causal, window)
            probs(s, dp, rows, kw, i0, j0, whole, q_len, kv_len, causal, window, scale_log2, softcap, g, t)
            pb(dOs, s, acc, dv_w, fa, fa_s, fb, fb_s, g, t, scratch)    # dV_w += P^T dO
            pb(Qs, dp, acc, dk_w, fa, fa_s, fb, fb_s, g, t, scratch)    # dK_w += dS^T Q
        store_kv(dk, dv, dk_w, dv_w, b, hk, j0 + kw, kv_len, scale, g, t)

    return attention_backward_dkdv_v3


@functools.lru_cache(maxsize=None)
def make_dq_v3(head_dim, block_m, block_n, threads, capped=False):
    """block_m query rows per block (16 per warp), key tiles of block_n keys; capped: as make_dkdv_v3."""
    D, BM, BN = head_dim, block_m, block_n
    NK, NO, DP, SCRATCH, FB, NS, stage_rows, stage_pair, abt, pb, probs = _parts(BM, BN, D, threads, False, capped)
    store_q = _make_store_dq(NO)

    @kernel
    def attention_backward_dq_v3(q, k, v, dout, lse, delta, dq, scale_log2, scale, causal, window, softcap):
        # grid (query blocks, query heads, batch)
        b, h, hk, q_len = prefill_block(q, k)
        kv_len = k.shape[2]
        tid = cuda.threadIdx.x
        g, t, qw = (tid % 32) >> 2, tid & 3, (tid // 32) * 16     # fragment coordinates; the warp's first row
        i0 = cuda.blockIdx.x * BM
        Qs = cuda.shared.array((BM, DP), float32)
        dOs = cuda.shared.array((BM, DP), float32)
        Ks = cuda.shared.array((BN, DP), float32)
        Vs = cuda.shared.array((BN, DP), float32)
        rows = cuda.shared.array((2, BM), float32)  # the block's rows' P references and D
        scratch = cuda.shared.array(SCRATCH, float32)
        s = cuda.local.array((NK, 4), float32)      # S, then P: [16 rows, BN keys] as C fragments
        dp = cuda.local.array((NK, 4), float32)     # dP, then dS
        acc = cuda.local.array((NO, 4), float32)    # one tile's dS K
        dq_w = cuda.local.array((NO, 4), float32)   # dQ_w [16 rows, D]
        fa = cuda.local.array((1, 4), float32)
        fa_s = cuda.local.array((1, 4), float32)
        fb = cuda.local.array((FB, 2), float32)
        fb_s = cuda.local.array((FB, 2), float32)
        staged = cuda.local.array((2, NS), float32)
        stage_rows(q, dout, b, h, i0, q_len, tid, staged, Qs, dOs)
        _stage_row_refs(lse, delta, b, h, i0, q_len, tid, BM, rows)
        _zero(dq_w, NO)
        kv_begin, kv_end = visible_keys(i0, BM, q_len, kv_len, causal, window)
        for j0 in range(kv_begin, kv_end, BN):
            cuda.syncthreads()                      # every warp is done with the previous key tile
            stage_pair(k, v, b, hk, j0, kv_len, tid, staged, Ks, Vs)
            cuda.syncthreads()
            abt(Qs, qw, Ks, s, fa, fa_s, fb, fb_s, g, t, scratch)       # S
            abt(dOs, qw, Vs, dp, fa, fa_s, fb, fb_s, g, t, scratch)     # dP
            whole = tile_is_whole(j0, BN, i0, BM, q_len, kv_len, causal, window)
            probs(s, dp, rows, qw, i0, j0, whole, q_len, kv_len, causal, window, scale_log2, softcap, g, t)
            pb(Ks, dp, acc, dq_w, fa, fa_s, fb, fb_s, g, t, scratch)    # dQ_w += dS K
        store_q(dq, dq_w, b, h, i0 + qw, q_len, scale, g, t)

    return attention_backward_dq_v3


# --------------------------------------------------------------------------------------------------------
# Staging tiles in shared memory
# --------------------------------------------------------------------------------------------------------
def _make_stage(R, D, NT):
    NL = R * D // NT

    @device
    def stage(x, y, b, hh, r0, n_rows, tid, staged, Xs, Ys):
        """Rows r0 .. r0 + R - 1 of x[b, hh] and y[b, hh] -> Xs, Ys (0 past n_rows). A fixed count per thread
        (consecutive threads, consecutive addresses): every global load is issued before the first shared store."""
        for i in range(NL):
            idx = tid + i * NT
            r, c = idx // D, idx % D
            inside = r0 + r < n_rows
            staged[0, i] = float32(x[b, hh, r0 + r, c]) if inside else float32(0.0)
            staged[1, i] = float32(y[b, hh, r0 + r, c]) if inside else float32(0.0)
        for i in range(NL):
            idx = tid + i * NT
            Xs[idx // D, idx % D] = staged[0, i]
            Ys[idx // D, idx % D] = staged[1, i]
    return stage


@device
def _stage_row_refs(lse, delta, b, h, i0, q_len, tid, R, rows):
    """rows[0, r], rows[1, r] = the P reference and D of query row i0 + r (0 past q_len: a row of zeros in Q and dO
    then adds exactly 0 to every gradient)."""
    if tid < R:
        inside = i0 + tid < q_len
        rows[0, tid] = p_reference(lse[b, h, i0 + tid]) if inside else float32(0.0)
        rows[1, tid] = delta[b, h, i0 + tid] if inside else float32(0.0)


@device
def _zero(x, NO):
    for c in range(NO):
        for e in range(4):
            x[c, e] = 0.0


# --------------------------------------------------------------------------------------------------------
# The products, on the warp's C fragments
# --------------------------------------------------------------------------------------------------------
def _make_abt(KD, NS):
    mma_n = make_mma_3xtf32_n(NS)

    @device
    def abt(As, a0, Bs, c, fa, fa_s, fb, fb_s, g, t, scratch):
        """c [NS, 4] = A B^T as C fragments: A = rows a0 .. a0 + 15 of As, B = rows 0 .. 8 NS - 1 of Bs, both
        [rows, D] in shared memory (the sum runs over D). a0..a3 = A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4];
        b0, b1 = B^T[t][n], B^T[t+4][n] = Bs[8n + g][t], Bs[8n + g][t + 4] (per k-step of 8 columns)."""
        for n in range(NS):
            for e in range(4):
                c[n, e] = 0.0
        for kk in range(KD):
            for e in range(4):
                fa[0, e], fa_s[0, e] = tf32_split(As[a0 + g + 8 * (e & 1), kk * 8 + t + 4 * (e >> 1)])
            for n in range(NS):
                fb[n, 0], fb_s[n, 0] = tf32_split(Bs[n * 8 + g, kk * 8 + t])
                fb[n, 1], fb_s[n, 1] = tf32_split(Bs[n * 8 + g, kk * 8 + t + 4])
            mma_n(fa, fa_s, 0, fb, fb_s, c, scratch)
    return abt


def _make_pb(NS, NO):
    product = make_fragments_times_rows(NS, NO)

    @device
    def pb(Bs, p, acc, into, fa, fa_s, fb, fb_s, g, t, scratch):
        """into [NO, 4] += P B: P [16, 8 NS] the warp's C fragments p [NS, 4], B = rows 0 .. 8 NS - 1 of Bs [rows, D]
        (kernels/mma.py's make_fragments_times_rows, prefill v3's P V): summed from zero in acc by the MMAs, added to
        `into` in fp32."""
        product(Bs, p, 0, acc, fa, fa_s, fb, fb_s, g, t, scratch)
        for c in range(NO):
            for e in range(4):
                into[c, e] += acc[c, e]
    return pb


def _make_probs(NS, KEYS_ARE_ROWS, capped):
    p_ds = make_p_ds(capped)

    @device
    def probs(s, dp, rows, r0, i0, j0, whole, q_len, kv_len, causal, window, scale_log2, softcap, g, t):
        """s <- P, dp <- dS (backward_prep.make_p_ds: the soft cap and its slope too), 0 where the key is not
        visible to the query. Element e of block n is row r0 + g + 8 (e >> 1), column 8 n + 2 t + (e & 1) of the
        tile; the rows are keys and the columns queries (dkdv: KEYS_ARE_ROWS) or the other way round (dq); rows[0, .],
        rows[1, .]: the tile's query rows' references and D. whole: every key of the tile is visible to every row."""
        for n in range(NS):
            for e in range(4):
                r, c = r0 + g + 8 * (e >> 1), n * 8 + 2 * t + (e & 1)
                iq, jk = (c, r) if KEYS_ARE_ROWS else (r, c)
                p, ds = p_ds(s[n, e], dp[n, e], rows[0, iq], rows[1, iq], scale_log2, softcap)
                if not whole:
                    first, end = visible_keys(i0 + iq, 1, q_len, kv_len, causal, window)
                    if not first <= j0 + jk < end:
                        p, ds = float32(0.0), float32(0.0)
                s[n, e] = p
                dp[n, e] = ds
    return probs


# --------------------------------------------------------------------------------------------------------
# Storing the gradients
# --------------------------------------------------------------------------------------------------------
def _make_store_dkdv(NO):
    @device
    def store_dkdv(dk, dv, dk_w, dv_w, b, hk, key0, kv_len, scale, g, t):
        """dK[key] += dk_w * scale, dV[key] += dv_w for the warp's keys key0 + g, key0 + g + 8 (atomics: the
        query heads of a KV head add into the same rows)."""
        for c in range(NO):
            for e in range(4):
                key, dim = key0 + g + 8 * (e >> 1), c * 8 + 2 * t + (e & 1)
                if key < kv_len:
                    cuda.atomic.add(dk, (b, hk, key, dim), dk_w[c, e] * scale)
                    cuda.atomic.add(dv, (b, hk, key, dim), dv_w[c, e])
    return store_dkdv


def _make_store_dq(NO):
    @device
    def store_dq(dq, dq_w, b, h, row0, q_len, scale, g, t):
        """dQ[row] = dq_w * scale for the warp's rows row0 + g, row0 + g + 8."""
        for c in range(NO):
            for e in range(4):
                row, dim = row0 + g + 8 * (e >> 1), c * 8 + 2 * t + (e & 1)
                if row < q_len:
                    dq[b, h, row, dim] = dq_w[c, e] * scale
    return store_dq
