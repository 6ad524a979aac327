"""Prefill attention v1, tiled (the teaching kernel): Q, K and V tiles in shared memory, one thread per query row.

What v1 changes over v0 (prefill_naive.py): a block of BLOCK_M threads, one per query row, stages its Q tile
once and then each BLOCK_N-key tile of K and V in shared memory, cooperatively (consecutive threads read
consecutive addresses: coalesced). Every K/V element fetched from global memory now serves BLOCK_M query rows:
K/V traffic drops by BLOCK_M (64x on the GPU). Per key tile, each thread runs the online-softmax step of its row
(kernels/softmax.py):

    s_jj = q_i . k_jj (pre-scaled by scale * log2 e, soft-capped), -inf where row i may not see key jj
    m_ref = update_row(m, l, acc, max_jj s_jj)           m grows to the tile's max; l and acc rescaled
    p_jj = exp2(s_jj - m_ref);  l += sum p;  acc += sum p_jj v_jj
    after the last tile: out_i = acc / l                  (the one division)

Causal: key tiles past the block's last visible key are never loaded (the loop stops early), and with a sliding
window neither are those before its first (the loop starts late); only the tiles that cross the diagonal or a
window's start are masked element by element. Key j is read from slot j mod S (common.ring_slot: a ring-buffer
cache's layout; the identity for a plain array), argument conventions as in prefill_naive.py.

Memory traffic per (batch, head): Q and O once; K and V once per query tile (ceil(q_len / BLOCK_M) times),
halved for causal. Shared memory: (BM * (D + 1) + 2 * BN * D) * 4 bytes (Q rows padded by one word, so the
threads of a warp reading Qs[t, d] hit 32 different banks).

For the lessons, `make_v1(..., traced=True)` compiles the same kernel with one more argument, a trace buffer
[B, H, Lq, tiles, 2] that receives each row's m and l after every key tile (numbattn/lab/tracing.py).
For training, `make_v1(..., with_lse=True)` compiles it with one more argument, lse [B, H, Lq], that receives each
row's log-sum-exp m + log l (natural log): the backward (kernels/backward_tiled.py) recomputes P from it.
# q [B, H, Lq, D], k/v [B, Hkv, S, D], kv_len, window, softcap -> out [B, H, Lq, D]
"""
import functools
import math

from numba import cuda, float32

from .common import NEG_INF, device, kernel, make_cap, make_slot_of, prefill_block, visible_keys
from .softmax import finish, lse, make_update_row


@functools.lru_cache(maxsize=None)
def make_v1(head_dim, block_m, block_n, traced=False, ring=False, capped=False, with_lse=False):
    """The v1 kernel (q, k, v, out, scale_log2, causal, kv_len, window, softcap), or with traced=True (..., trace),
    or with with_lse=True (..., lse_out): lse_out [B, H, Lq] float32 receives each row's log-sum-exp (the backward's
    input). ring: K/V may wrap (kv_len > their slots); capped: scores are soft-capped (both compile-time choices)."""
    body = _make_v1_body(head_dim, block_m, block_n, _record if traced else _no_record, ring, make_cap(capped),
                         _store_lse if with_lse else _no_lse)
    if traced:
        @kernel
        def attention_v1_traced(q, k, v, out, scale_log2, causal, kv_len, window, softcap, trace):
            body(q, k, v, out, scale_log2, causal, kv_len, window, softcap, trace, 0)
        return attention_v1_traced
    if with_lse:
        @kernel
        def attention_v1_lse(q, k, v, out, scale_log2, causal, kv_len, window, softcap, lse_out):
            body(q, k, v, out, scale_log2, causal, kv_len, window, softcap, 0, lse_out)
        return attention_v1_lse

    @kernel
    def attention_v1(q, k, v, out, scale_log2, causal, kv_len, window, softcap):
        body(q, k, v, out, scale_log2, causal, kv_len, window, softcap, 0, 0)
    return attention_v1


def _make_v1_body(D, BM, BN, record, ring, soft_cap, store_lse):
    DP = D + 1  # pad Q rows by a word: with a row stride of D (32 banks' multiple) a warp reads one bank
    load_q_tile, load_kv_tile, store_row = _make_v1_loads(D, BM, BN, ring)
    update_row = make_update_row(D)

    @device
    def attention_v1(q, k, v, out, scale_log2, causal, kv_len, window, softcap, trace, lse_out):
        # q [B, H, Lq, D], k/v [B, Hkv, S, D] (key j in slot j mod S) -> out [B, H, Lq, D] (and lse_out [B, H, Lq])
        b, h, hk, q_len = prefill_block(q, k)
        t = cuda.threadIdx.x
        q0 = cuda.blockIdx.x * BM           # first query row of this block's tile
        i = q0 + t                          # this thread's query row

        Qs = cuda.shared.array((BM, DP), float32)
        Ks = cuda.shared.array((BN, D), float32)
        Vs = cuda.shared.array((BN, D), float32)
        s = cuda.local.array(BN, float32)   # this row's scores for the current key tile
        m = cuda.local.array(1, float32)    # the row's online-softmax state
        l = cuda.local.array(1, float32)
        acc = cuda.local.array((1, D), float32)
        load_q_tile(q, b, h, q0, q_len, scale_log2, t, Qs)   # pre-scaled: the loop below can use exp2 directly
        m[0], l[0] = NEG_INF, 0.0
        for d in range(D):
            acc[0, d] = 0.0
        kv_begin, kv_end = visible_keys(q0, BM, q_len, kv_len, causal, window)  # the block's rows, together
        for j0 in range(kv_begin, kv_end, BN):
            cuda.syncthreads()              # everyone is done with the previous K/V tile
            load_kv_tile(k, v, b, hk, j0, kv_len, t, Ks, Vs)
            cuda.syncthreads()
            if i < q_len:
                first, end = visible_keys(i, 1, q_len, kv_len, causal, window)  # this row's keys
                m_tile = NEG_INF
                for jj in range(BN):        # scores; keys this row may not see get -inf
                    x = NEG_INF
                    if first <= j0 + jj < end:
                        x = float32(0.0)
                        for d in range(D):
                            x += Qs[t, d] * Ks[jj, d]   # every thread reads the same Ks word: a broadcast
                        x = soft_cap(x, softcap)
                    s[jj] = x
                    m_tile = max(m_tile, x)
                m_ref = update_row(m, l, acc, 0, m_tile)
                for jj in range(BN):
                    p = math.exp2(s[jj] - m_ref)        # exp2(-inf) = 0 for masked keys
                    l[0] += p
                    for d in range(D):
                        acc[0, d] += p * Vs[jj, d]
                record(trace, b, h, i, j0 // BN, m[0], l[0])
        store_row(out, acc, l[0], b, h, i, q_len)       # out = acc / l: the one division, at the very end
        store_lse(lse_out, b, h, i, q_len, m[0], l[0])

    return attention_v1


def _make_v1_loads(D, BM, BN, ring):
    slot_of = make_slot_of(ring)

    @device
    def load_q_tile(q, b, h, q0, q_len, scale_log2, t, Qs):
        """Q tile -> shared memory, pre-multiplied by scale * log2(e); rows past q_len become 0."""
        for idx in range(t, BM * D, BM):
            r, c = idx // D, idx % D
            Qs[r, c] = float32(q[b, h, q0 + r, c]) * scale_log2 if q0 + r < q_len else 0.0

    @device
    def load_kv_tile(k, v, b, hk, j0, kv_len, t, Ks, Vs):
        """K and V tiles at key j0 -> shared memory; consecutive threads read consecutive addresses (coalesced)."""
        base = j0 % k.shape[2] if ring else j0     # key j0's slot (a ring buffer wraps; a plain array: j0)
        for idx in range(t, BN * D, BM):
            r, c = idx // D, idx % D
            inside = j0 + r < kv_len
            slot = slot_of(base, r, k.shape[2])
            Ks[r, c] = float32(k[b, hk, slot, c]) if inside else 0.0
            Vs[r, c] = float32(v[b, hk, slot, c]) if inside else 0.0

    @device
    def store_row(out, acc, l_i, b, h, i, q_len):
        """out[b, h, i] = acc / l_i (rows past q_len store nothing)."""
        if i < q_len:
            inv_l = finish(l_i)
            for d in range(D):
                out[b, h, i, d] = acc[0, d] * inv_l
    return load_q_tile, load_kv_tile, store_row


@device
def _record(trace, b, h, i, tile, m_i, l_i):
    """The traced variant: m_i and l_i of row i after key tile `tile` (lessons: numbattn/lab/tracing.py)."""
    trace[b, h, i, tile, 0] = m_i
    trace[b, h, i, tile, 1] = l_i


@device
def _no_record(trace, b, h, i, tile, m_i, l_i):
    pass


@device
def _store_lse(lse_out, b, h, i, q_len, m_i, l_i):
    """The with_lse variant: row i's log-sum-exp (natural log), what the backward recomputes P from."""
    if i < q_len:
        lse_out[b, h, i] = lse(m_i, l_i)


@device
def _no_lse(lse_out, b, h, i, q_len, m_i, l_i):
    pass
