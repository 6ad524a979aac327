"""Prefill attention v0, naive: one thread per query row, every key and value straight from global memory.

The starting point of the ladder (numbattn/kernels/__init__.py lists the versions). Thread i walks the keys
j = 0 .. its last visible key one at a time, keeping the online-softmax state of its row (kernels/softmax.py):

    for each key j:   s = q_i . k_j * scale * log2 e
                      m_ref = update_row(m, l, acc, s)        m grows, l and acc are rescaled
                      p = exp2(s - m_ref);  l += p;  acc += p v_j
    out_i = acc / l

Memory traffic per (batch, head): every one of the q_len threads reads all of K and V itself, so
q_len * kv_len * head_dim * 2 loads from global memory, nothing reused. v1 (prefill_tiled.py) stages tiles of
K and V in shared memory so that one load serves a whole block of query rows.
# q [B, H, Lq, D], k/v [B, Hkv, Lk, D] -> out [B, H, Lq, D]
"""
import functools
import math

from numba import cuda, float32

from .common import NEG_INF, kernel, prefill_block, visible_keys
from .softmax import finish, make_update_row


@functools.lru_cache(maxsize=None)
def make_v0(head_dim, block_m):
    D = head_dim
    update_row = make_update_row(D)

    @kernel
    def attention_v0(q, k, v, out, scale_log2, causal):
        # q [B, H, Lq, D], k/v [B, Hkv, Lk, D] -> out [B, H, Lq, D]
        b, h, hk, q_len, kv_len = prefill_block(q, k)
        i = cuda.blockIdx.x * block_m + cuda.threadIdx.x    # this thread's query row
        if i >= q_len:
            return
        m = cuda.local.array(1, float32)                    # the row's online-softmax state
        l = cuda.local.array(1, float32)
        acc = cuda.local.array((1, D), float32)
        m[0], l[0] = NEG_INF, 0.0
        for d in range(D):
            acc[0, d] = 0.0
        j_begin, j_end = visible_keys(i, 1, q_len, kv_len, causal)
        for j in range(j_begin, j_end):
            s = float32(0.0)
            for d in range(D):
                s += float32(q[b, h, i, d]) * float32(k[b, hk, j, d])
            s *= scale_log2
            p = math.exp2(s - update_row(m, l, acc, 0, s))
            l[0] += p
            for d in range(D):
                acc[0, d] += p * float32(v[b, hk, j, d])
        inv_l = finish(l[0])
        for d in range(D):
            out[b, h, i, d] = acc[0, d] * inv_l

    return attention_v0
