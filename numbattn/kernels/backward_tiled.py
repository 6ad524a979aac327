"""Attention backward v1, tiled (the teaching kernels): FlashAttention-2's Algorithm 2 with one thread per row.

The gradients (numbattn.reference.attention_backward derives them), per (batch, query head):

    P = exp2(S * log2 e - lse * log2 e)       recomputed tile by tile from the forward's log-sum-exp: no N×N matrix
    dV = P^T dO        dP = dO V^T        dS = P ∘ (dP - D)        dQ = dS K * scale        dK = dS^T Q * scale

where D = rowsum(dO ∘ O) comes from kernels/backward_prep.py. Two kernels, each the mirror of a forward loop:

    dkdv_v1   K/V-stationary: a block owns BN keys (one thread per key j: its k_j, v_j, dk_j and dv_j in
              registers) and walks over every query tile of BM rows that sees any of them, staging Q, dO, the rows'
              P references and D in shared memory. For each visible query row i of the tile, thread j computes
                  s = q_i . k_j,  p = exp2(s * scale log2 e - ref_i),  dp = dO_i . v_j,  ds = p (dp - D_i)
                  (backward_prep.make_p_ds: with a soft cap, p from the capped score and ds times the cap's slope)
                  dv_j += p dO_i,  dk_j += ds q_i
              and at the end adds dk_j * scale and dv_j into dK, dV with atomics: the query heads of a KV head
              (grouped-query attention) run as different blocks and sum into the same rows.
    dq_v1     Q-stationary: a block owns BM query rows (one thread per row, q_i, dO_i, dq_i in registers) and walks
              over the key tiles its rows see, as the forward v1 does, staging K and V:
                  s, p, dp, ds as above;  dq_i += ds k_j;   at the end dq_i * scale is stored
              dQ by a second pass rather than atomics from dkdv: each query row is one thread's, so the sum over
              keys stays in registers, in a fixed order (kernels/backward_mma.py says why this scheme).

Which (query, key) pairs are visible is decided where the forward decides it (common.visible_keys, with the sliding
window): a query tile whose keys miss the block's keys entirely is skipped (for causal attention, every tile above
the diagonal; with a window, every tile whose windows end before the block's first key), and dq walks only the key
tiles its rows' windows reach, as the forward does.

Memory traffic per (batch, query head): dkdv reads K and V once and Q, dO once per key tile (halved for causal),
writes dK, dV once (atomically); dq reads Q, dO once and K, V once per query tile, writes dQ once. Nothing of
size q_len x kv_len is ever stored. Shared memory: 2 BM (D + 1) + 2 BM words (dkdv), 2 BN D words (dq).
# q, dout [B, H, Lq, D], k, v [B, Hkv, Lk, D], lse, delta [B, H, Lq], window, softcap -> dq [B, H, Lq, D],
# dk, dv [B, Hkv, Lk, D]
"""
import functools

from numba import cuda, float32

from .backward_prep import make_p_ds, p_reference
from .common import device, kernel, prefill_block, visible_keys
from .prefill_tiled import _make_v1_loads


@functools.lru_cache(maxsize=None)
def make_dkdv_v1(head_dim, block_m, block_n, capped=False):
    """capped: scores are soft-capped (a compile-time choice, as in the forward)."""
    D, BM, BN = head_dim, block_m, block_n
    DP = D + 1                                  # padded rows: thread t reading row t hits bank t (the Q load)
    load_rows = _make_load_rows(D, BM, BN)
    p_ds = make_p_ds(capped)

    @kernel
    def attention_backward_dkdv_v1(q, k, v, dout, lse, delta, dk, dv, scale_log2, scale, causal, window, softcap):
        # grid (key tiles, query heads, batch); one thread per key
        b, h, hk, q_len = prefill_block(q, k)
        kv_len = k.shape[2]
        t = cuda.threadIdx.x
        j0 = cuda.blockIdx.x * BN
        j = j0 + t                              # this thread's key
        Qs = cuda.shared.array((BM, DP), float32)
        dOs = cuda.shared.array((BM, DP), float32)
        refs = cuda.shared.array(BM, float32)   # the rows' P references (log2-domain lse)
        Ds = cuda.shared.array(BM, float32)
        kv = cuda.local.array((2, D), float32)  # k_j, v_j
        g = cuda.local.array((2, D), float32)   # dk_j, dv_j
        for d in range(D):
            kv[0, d] = float32(k[b, hk, j, d]) if j < kv_len else float32(0.0)
            kv[1, d] = float32(v[b, hk, j, d]) if j < kv_len else float32(0.0)
            g[0, d], g[1, d] = 0.0, 0.0
        for i0 in range(0, q_len, BM):
            first, end = visible_keys(i0, BM, q_len, kv_len, causal, window)     # the keys this query tile sees
            if end <= j0 or j0 + BN <= first:
                continue                        # none of this block's keys: skipped (the same for every thread)
            cuda.syncthreads()                  # everyone is done with the previous query tile
            load_rows(q, dout, lse, delta, b, h, i0, q_len, t, Qs, dOs, refs, Ds)
            cuda.syncthreads()
            for ii in range(BM):
                first, end = visible_keys(i0 + ii, 1, q_len, kv_len, causal, window)
                if i0 + ii < q_len and first <= j < end:
                    s, dp = float32(0.0), float32(0.0)
                    for d in range(D):
                        s += Qs[ii, d] * kv[0, d]
                        dp += dOs[ii, d] * kv[1, d]
                    p, ds = p_ds(s, dp, refs[ii], Ds[ii], scale_log2, softcap)
                    for d in range(D):
                        g[1, d] += p * dOs[ii, d]
                        g[0, d] += ds * Qs[ii, d]
        if j < kv_len:
            for d in range(D):
                cuda.atomic.add(dk, (b, hk, j, d), g[0, d] * scale)
                cuda.atomic.add(dv, (b, hk, j, d), g[1, d])

    return attention_backward_dkdv_v1


@functools.lru_cache(maxsize=None)
def make_dq_v1(head_dim, block_m, block_n, capped=False):
    D, BM, BN = head_dim, block_m, block_n
    _, load_kv, _ = _make_v1_loads(D, BM, BN, False)      # prefill v1's K/V tile load: BM threads stage BN keys
    p_ds = make_p_ds(capped)

    @kernel
    def attention_backward_dq_v1(q, k, v, dout, lse, delta, dq, scale_log2, scale, causal, window, softcap):
        # grid (query tiles, query heads, batch); one thread per query row
        b, h, hk, q_len = prefill_block(q, k)
        kv_len = k.shape[2]
        t = cuda.threadIdx.x
        i0 = cuda.blockIdx.x * BM
        i = i0 + t                              # this thread's query row
        Ks = cuda.shared.array((BN, D), float32)
        Vs = cuda.shared.array((BN, D), float32)
        r = cuda.local.array((3, D), float32)   # q_i, dO_i, dq_i
        inside = i < q_len
        for d in range(D):
            r[0, d] = float32(q[b, h, i, d]) if inside else float32(0.0)
            r[1, d] = float32(dout[b, h, i, d]) if inside else float32(0.0)
            r[2, d] = 0.0
        ref = p_reference(lse[b, h, i]) if inside else float32(0.0)
        D_i = delta[b, h, i] if inside else float32(0.0)
        kv_begin, kv_end = visible_keys(i0, BM, q_len, kv_len, causal, window)    # the block's rows, together
        for j0 in range(kv_begin, kv_end, BN):
            cuda.syncthreads()
            load_kv(k, v, b, hk, j0, kv_len, t, Ks, Vs)
            cuda.syncthreads()
            first, end = visible_keys(i, 1, q_len, kv_len, causal, window)          # this row's keys
            for jj in range(BN):
                if inside and first <= j0 + jj < end:
                    s, dp = float32(0.0), float32(0.0)
                    for d in range(D):
                        s += r[0, d] * Ks[jj, d]
                        dp += r[1, d] * Vs[jj, d]
                    _, ds = p_ds(s, dp, ref, D_i, scale_log2, softcap)
                    for d in range(D):
                        r[2, d] += ds * Ks[jj, d]
        if inside:
            for d in range(D):
                dq[b, h, i, d] = r[2, d] * scale

    return attention_backward_dq_v1


def _make_load_rows(D, BM, BN):
    @device
    def load_rows(q, dout, lse, delta, b, h, i0, q_len, t, Qs, dOs, refs, Ds):
        """The query tile at row i0 -> shared: Q and dO rows (coalesced), each row's P reference and D; rows past
        q_len are 0 (never visible)."""
        for idx in range(t, BM * D, BN):
            r, c = idx // D, idx % D
            inside = i0 + r < q_len
            Qs[r, c] = float32(q[b, h, i0 + r, c]) if inside else float32(0.0)
            dOs[r, c] = float32(dout[b, h, i0 + r, c]) if inside else float32(0.0)
        for r in range(t, BM, BN):
            inside = i0 + r < q_len
            refs[r] = p_reference(lse[b, h, i0 + r]) if inside else float32(0.0)
            Ds[r] = delta[b, h, i0 + r] if inside else float32(0.0)
    return load_rows
