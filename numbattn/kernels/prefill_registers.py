"""Prefill attention v2: the register-tiled FlashAttention kernel (the fast one).

What v2 changes over v1 (kernels/prefill_tiled.py), and why
------------------------------------------------------
v1 gives each thread one whole query row. Every score then costs a shared-memory load of a K element
(broadcast to the warp) and a Q element for a single FMA, and the output update loads a V element per
FMA: the kernel is bound by shared-memory loads, not arithmetic, and a block has only BLOCK_M threads.

v2 treats each tile as two small matrix products and tiles them over threads the way a SIMT GEMM does.
The threads of a block form a TR × TC grid. Thread (rg, cg) owns

    rows    r = rg + TR*i,  i < TM = BLOCK_M / TR      (its query rows)
    keys    c = cg + TC*j,  j < TN = BLOCK_N / TC      (its columns of the score tile S = Q K^T)
    dims    e = cg + TC*j,  j < TE = D / TC            (its columns of the output tile O = P V)

and keeps its TM×TN scores and TM×TE accumulator in registers (local arrays with compile-time sizes,
fully unrolled, so no local-memory traffic). For each of the D (or BLOCK_N) steps of a product it loads TM
values of one operand and TN (or TE) of the other and does TM×TN FMAs: with TM=4, TN=TE=8 that is 32 FMAs
per 12 shared loads instead of 1 per 2. Strided ownership (cg + TC*j) puts the TC threads of a row group on
consecutive shared-memory words, so the loads are conflict-free; Q and K rows are padded by one word.

The softmax of a row is spread over the TC threads of its group: each takes the max of its TN scores, the
group combines them (`group_max`), and all apply the same update (kernels/softmax.py's update_row on their
TM rows), so alpha and exp2(s - m_ref) agree. The
row sums l_i need no per-tile exchange at all: every thread keeps the partial sum over its own columns,
rescaled by the same alpha, and the group adds the partials once at the very end.

P (the exponentiated tile) goes through shared memory between the two products, because the output
columns a thread owns need every key of the tile, while it computed only TN of them.

Warp shuffles and the simulator
-------------------------------
On a GPU the TC threads of a row group are consecutive lanes of one warp, so `group_max`/`group_sum` are
log2(TC) `shfl_xor_sync` steps. Numba's simulator has no warp shuffles, so the same functions have a
shared-memory twin (`reduce="shared"`), chosen automatically when the simulator is active; the GPU tests
run both. Everything else is one code path.

Memory traffic per (batch, head): Q and O once; K and V once per query tile, i.e. kv_len*D*2*4 bytes
times ceil(q_len / BLOCK_M) (halved again for causal, since tiles above the diagonal are skipped; with a
sliding window, (window + BLOCK_M) keys per query tile). Windows, soft caps and ring-buffer slots as in v1.
Shared memory: (BM*(D+1) + BN*(D+1) + BN*D + BM*(BN+1)) * 4 bytes. On an H100 the launch-shape sweep
(BENCHMARKS.md) picked BM=128, BN=32, 256 threads at D=64 (65 KB, 4 rows x 4 keys x 8 dims per thread) and
BM=64, BN=32, 256 threads at D=128 (73 KB); both are above the 48 KB that CUDA documents for static
shared memory, which ptxas accepts on sm_90 but not on older GPUs (they get BM=64, BN=32 / BM=32, BN=16).
"""
import functools
import math

from numba import config, cuda, float32, uint32

from .common import (NEG_INF, device, kernel, make_cap, make_group_reduce, make_outer_product, make_slot_of,
                     prefill_block, reduce_scratch_shape, tile_is_whole, visible_keys)
from .softmax import finish, make_update_row


def layout(block_m, block_n, threads, head_dim):
    """The thread grid (TR, TC) and per-thread register tile (TM, TN, TE) for one launch shape."""
    TC = min(8, block_n, threads)
    TR = threads // TC
    if threads % TC or block_m % TR or block_n % TC or head_dim % TC or block_n % 4:
        raise ValueError(f"v2 tiles block_m={block_m}, block_n={block_n}, threads={threads} do not divide "
                         f"into a thread grid for head_dim {head_dim}")
    return TR, TC, block_m // TR, block_n // TC, head_dim // TC


def shared_bytes(block_m, block_n, head_dim):
    return 4 * (block_m * (head_dim + 1) + block_n * (head_dim + 1) + block_n * head_dim
                + block_m * (block_n + 1))


@functools.lru_cache(maxsize=None)
def make_v2(head_dim, block_m, block_n, threads, reduce="auto", ring=False, capped=False):
    """ring: K/V may wrap (kv_len > their slots); capped: scores are soft-capped (both compile-time choices)."""
    D, BM, BN, NT = head_dim, block_m, block_n, threads
    TR, TC, TM, TN, TE = layout(BM, BN, NT, D)
    if reduce == "auto":
        reduce = "shared" if config.ENABLE_CUDASIM else "shuffle"
    group_max, group_sum = make_group_reduce(TC, TM, reduce == "shuffle")
    DP, BNP = D + 1, BN + 1                         # one word of padding per row: conflict-free columns
    RED = reduce_scratch_shape(TM, NT, reduce == "shuffle")
    load_q, load_kv = _make_loads(D, BM, BN, NT, ring)
    scores = _make_scores(D, BM, BN, TR, TC, TM, TN, capped)
    softmax_step = _make_softmax_step(TM, TN, TE, group_max)
    pv = _make_pv(BN, TM, TE)
    init_thread, store_rows = _make_thread_state(TR, TC, TM, TN, TE)

    @kernel
    def attention_v2(q, k, v, out, scale_log2, causal, kv_len, window, softcap):
        # q [B, H, Lq, D], k/v [B, Hkv, S, D] (key j in slot j mod S) -> out [B, H, Lq, D]
        b, h, hk, q_len = prefill_block(q, k)
        t = cuda.threadIdx.x
        rg, cg = t // TC, t % TC
        q0 = cuda.blockIdx.x * BM

        Qs = cuda.shared.array((BM, DP), float32)
        Ks = cuda.shared.array((BN, DP), float32)
        Vs = cuda.shared.array((BN, D), float32)
        Ps = cuda.shared.array((BM, BNP), float32)
        red = cuda.shared.array(RED, float32)

        s = cuda.local.array((TM, TN), float32)     # this thread's piece of S = Q K^T, then of P
        acc = cuda.local.array((TM, TE), float32)   # this thread's piece of the output
        m_i = cuda.local.array(TM, float32)
        l_i = cuda.local.array(TM, float32)         # partial row sums over this thread's columns only
        m_tile = cuda.local.array(TM, float32)
        a = cuda.local.array(TM, float32)
        bvec = cuda.local.array(TN if TN > TE else TE, float32)
        rows = cuda.local.array(TM, uint32)         # this thread's rows, keys and output dims within the tile
        keys = cuda.local.array(TN, uint32)
        dims = cuda.local.array(TE, uint32)
        init_thread(rows, keys, dims, m_i, l_i, acc, rg, cg)
        load_q(q, b, h, q0, q_len, scale_log2, t, Qs)

        kv_begin, kv_end = visible_keys(q0, BM, q_len, kv_len, causal, window)
        for j0 in range(kv_begin, kv_end, BN):
            cuda.syncthreads()                      # the previous tile's Ks, Vs and Ps are no longer read
            load_kv(k, v, b, hk, j0, kv_len, t, Ks, Vs)
            cuda.syncthreads()
            scores(Qs, Ks, rows, keys, a, bvec, s, j0, q0, q_len, kv_len, causal, window, softcap, rg, cg)
            softmax_step(s, m_i, l_i, m_tile, acc, rows, keys, Ps, red)
            cuda.syncthreads()
            pv(Ps, Vs, rows, dims, a, bvec, acc)

        group_sum(l_i, red)                         # the row sums, combined once
        store_rows(out, acc, l_i, b, h, q0, q_len, rg, cg)

    return attention_v2


def _make_thread_state(TR, TC, TM, TN, TE):
    @device
    def init_thread(rows, keys, dims, m_i, l_i, acc, rg, cg):
        """This thread's rows, keys and output dims within the tile (strided), and its softmax state at 0."""
        for i in range(TM):
            rows[i] = rg + TR * i
        for j in range(TN):
            keys[j] = cg + TC * j
        for e in range(TE):
            dims[e] = cg + TC * e
        for i in range(TM):
            m_i[i] = NEG_INF
            l_i[i] = 0.0
            for e in range(TE):
                acc[i, e] = 0.0

    @device
    def store_rows(out, acc, l_i, b, h, q0, q_len, rg, cg):
        """out = acc / l_i for this thread's rows (the one division, at the very end)."""
        for i in range(TM):
            r = q0 + rg + TR * i
            if r < q_len:
                inv_l = finish(l_i[i])
                for e in range(TE):
                    out[b, h, r, cg + TC * e] = acc[i, e] * inv_l
    return init_thread, store_rows


def _make_loads(D, BM, BN, NT, ring):
    slot_of = make_slot_of(ring)

    @device
    def load_q(q, b, h, q0, q_len, scale_log2, t, Qs):
        """Q tile -> shared, scaled by scale*log2(e) for exp2; rows past q_len become 0."""
        for idx in range(t, BM * D, NT):
            r, c = idx // D, idx % D
            Qs[r, c] = float32(q[b, h, q0 + r, c]) * scale_log2 if q0 + r < q_len else float32(0.0)

    @device
    def load_kv(k, v, b, hk, j0, kv_len, t, Ks, Vs):
        """K and V tiles at key j0 -> shared (consecutive threads, consecutive addresses); keys past kv_len: 0.
        Key j sits in slot j mod S (common.ring_slot)."""
        base = j0 % k.shape[2] if ring else j0
        for idx in range(t, BN * D, NT):
            r, c = idx // D, idx % D
            inside = j0 + r < kv_len
            slot = slot_of(base, r, k.shape[2])
            Ks[r, c] = float32(k[b, hk, slot, c]) if inside else float32(0.0)
            Vs[r, c] = float32(v[b, hk, slot, c]) if inside else float32(0.0)
    return load_q, load_kv


def _make_scores(D, BM, BN, TR, TC, TM, TN, capped):
    outer_product = make_outer_product(TM, TN, False)
    soft_cap = make_cap(capped)

    @device
    def scores(Qs, Ks, rows, keys, a, bvec, s, j0, q0, q_len, kv_len, causal, window, softcap, rg, cg):
        """s = this thread's TM x TN piece of Q K^T for the key tile at j0, soft-capped, masked (-inf) where the
        tile crosses kv_len, the causal diagonal or a row's window start."""
        for i in range(TM):
            for j in range(TN):
                s[i, j] = 0.0
        for d in range(0, D, 4):                # four explicit steps: unrolled by hand (see outer_product)
            outer_product(Qs, Ks, rows, keys, d, a, bvec, s)
            outer_product(Qs, Ks, rows, keys, d + 1, a, bvec, s)
            outer_product(Qs, Ks, rows, keys, d + 2, a, bvec, s)
            outer_product(Qs, Ks, rows, keys, d + 3, a, bvec, s)
        if capped:
            for i in range(TM):
                for j in range(TN):
                    s[i, j] = soft_cap(s[i, j], softcap)
        if not tile_is_whole(j0, BN, q0, BM, q_len, kv_len, causal, window):
            for i in range(TM):
                first, end = visible_keys(q0 + rg + TR * i, 1, q_len, kv_len, causal, window)
                for j in range(TN):
                    if not first <= j0 + cg + TC * j < end:
                        s[i, j] = NEG_INF
    return scores


def _make_softmax_step(TM, TN, TE, group_max):
    update_row = make_update_row(TE)

    @device
    def softmax_step(s, m_i, l_i, m_tile, acc, rows, keys, Ps, red):
        """The online-softmax update: new row max over the group, rescale acc and l_i, P = exp2(s - m) -> Ps."""
        for i in range(TM):
            mx = NEG_INF
            for j in range(TN):
                mx = max(mx, s[i, j])
            m_tile[i] = mx
        group_max(m_tile, red)
        for i in range(TM):
            m_ref = update_row(m_i, l_i, acc, i, m_tile[i])    # padding rows past q_len see only -inf: p = 0
            for j in range(TN):
                p = math.exp2(s[i, j] - m_ref)
                l_i[i] += p
                Ps[rows[i], keys[j]] = p
    return softmax_step


def _make_pv(BN, TM, TE):
    outer_product = make_outer_product(TM, TE, True)

    @device
    def pv(Ps, Vs, rows, dims, a, bvec, acc):
        """acc += P V on this thread's TM x TE piece of the output (outer products over the tile's keys)."""
        for jj in range(0, BN, 4):
            outer_product(Ps, Vs, rows, dims, jj, a, bvec, acc)
            outer_product(Ps, Vs, rows, dims, jj + 1, a, bvec, acc)
            outer_product(Ps, Vs, rows, dims, jj + 2, a, bvec, acc)
            outer_product(Ps, Vs, rows, dims, jj + 3, a, bvec, acc)
    return pv
