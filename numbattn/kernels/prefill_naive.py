"""Prefill attention v0, naive: one thread per query row, every key and value straight from global memory.

The starting point of the ladder (numbattn/kernels/__init__.py lists the versions). Thread i walks its visible
keys j (common.visible_keys: causal, sliding window) one at a time, keeping the online-softmax state of its row
(kernels/softmax.py):

    for each key j:   s = soft_cap(q_i . k_j * scale * log2 e)
                      m_ref = update_row(m, l, acc, s)        m grows, l and acc are rescaled
                      p = exp2(s - m_ref);  l += p;  acc += p v_j
    out_i = acc / l

Memory traffic per (batch, head): every one of the q_len threads reads all of K and V itself, so
q_len * kv_len * head_dim * 2 loads from global memory, nothing reused. v1 (prefill_tiled.py) stages tiles of
K and V in shared memory so that one load serves a whole block of query rows.

Every prefill kernel takes the same arguments: kv_len keys at absolute positions 0 .. kv_len - 1, position j
held in slot j mod S of k and v (S = k.shape[2] slots: kv_len for a plain array, a ring buffer's length for a
sliding-window layer of the KV cache); window (>= kv_len: unlimited); softcap (log2 units, 0: none).
# q [B, H, Lq, D], k/v [B, Hkv, S, D], kv_len, window, softcap -> out [B, H, Lq, D]
"""
import functools
import math

from numba import cuda, float32

from .common import NEG_INF, kernel, make_cap, make_slot_of, prefill_block, visible_keys
from .softmax import finish, make_update_row


@functools.lru_cache(maxsize=None)
def make_v0(head_dim, block_m, ring=False, capped=False):
    """ring: K/V may wrap (kv_len > their slots); capped: scores are soft-capped (both compile-time choices)."""
    D = head_dim
    update_row = make_update_row(D)
    slot_of, cap = make_slot_of(ring), make_cap(capped)

    @kernel
    def attention_v0(q, k, v, out, scale_log2, causal, kv_len, window, softcap):
        # q [B, H, Lq, D], k/v [B, Hkv, S, D] (key j in slot j mod S) -> out [B, H, Lq, D]
        b, h, hk, q_len = prefill_block(q, k)
        i = cuda.blockIdx.x * block_m + cuda.threadIdx.x    # this thread's query row
        if i >= q_len:
            return
        m = cuda.local.array(1, float32)                    # the row's online-softmax state
        l = cuda.local.array(1, float32)
        acc = cuda.local.array((1, D), float32)
        m[0], l[0] = NEG_INF, 0.0
        for d in range(D):
            acc[0, d] = 0.0
        j_begin, j_end = visible_keys(i, 1, q_len, kv_len, causal, window)
        base = j_begin % k.shape[2] if ring else j_begin    # the first key's slot
        for j in range(j_begin, j_end):
            slot = slot_of(base, j - j_begin, k.shape[2])
            s = float32(0.0)
            for d in range(D):
                s += float32(q[b, h, i, d]) * float32(k[b, hk, slot, d])
            s = cap(s * scale_log2, softcap)
            p = math.exp2(s - update_row(m, l, acc, 0, s))
            l[0] += p
            for d in range(D):
                acc[0, d] += p * float32(v[b, hk, slot, d])
        inv_l = finish(l[0])
        for d in range(D):
            out[b, h, i, d] = acc[0, d] * inv_l

    return attention_v0
