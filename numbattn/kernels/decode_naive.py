"""Decode attention v0, simple: one block per (row, query head), its threads splitting the keys.

One new query token per row attends over that row's cached keys (numbattn/decode.py has the whole story). Here
each thread takes the keys t, t + T, t + 2T, ... and runs the online softmax over them (kernels/softmax.py),
keeping its own (m, l, acc); at the end the block merges its T partial states by the log-sum-exp rule

    M = max_t m_t,   L = sum_t l_t exp2(m_t - M),   out = sum_t acc_t exp2(m_t - M) / L

the same rescaling the online softmax does between tiles (merge_row), so the result is the exact softmax.
Only batch * n_heads blocks (32 for TinyLlama at batch 1, a quarter of an H100), each reading its KV head alone:
the G query heads of a group read the same K/V G times. v1 (decode_slots.py) fixes both.
Memory traffic per step and row: K and V of every cached token (of its window), G times; q and out once.
Row b sees its last min(n, window) tokens, token p in slot p mod S (a ring buffer's layout, decode_splitk.py).
# q [B, H, D], k/v [B, Hkv, S, D], lengths [B], window, softcap -> out [B, H, D]
"""
import functools
import math

from numba import cuda, float32, int64

from .common import NEG_INF, device, kernel, kv_head, make_cap, make_slot_of
from .softmax import finish, make_merge_row, make_update_row


@functools.lru_cache(maxsize=None)
def make_decode_v0(head_dim, threads, ring=False, capped=False):
    """ring: the cache layer is a ring buffer; capped: scores are soft-capped (both compile-time choices)."""
    D, T = head_dim, threads
    update_row = make_update_row(D)
    slot_of, soft_cap = make_slot_of(ring), make_cap(capped)
    merge_threads = _make_merge_threads(D, T)

    @kernel
    def decode_v0(q, k, v, lengths, scale_log2, window, softcap, out):
        # q [B, H, D], k/v [B, Hkv, S, D], lengths [B] -> out [B, H, D]
        h, b, t = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
        hk, slots = kv_head(h, q.shape[1], k.shape[1]), int64(k.shape[2])
        n = max(int64(lengths[b]), int64(0)) if ring else min(int64(lengths[b]), slots)
        first = max(n - min(int64(window), slots), int64(0))  # the window, never more than the slots hold
        base = first % slots if ring else first             # the first key's slot
        qr = cuda.local.array(D, float32)
        m = cuda.local.array(1, float32)            # this thread's online-softmax state
        l = cuda.local.array(1, float32)
        acc = cuda.local.array((1, D), float32)
        m[0], l[0] = NEG_INF, 0.0
        for d in range(D):
            qr[d] = float32(q[b, h, d]) * scale_log2
            acc[0, d] = 0.0
        for j in range(first + t, n, T):            # this thread's keys: first + t, + T, ...
            slot = slot_of(base, j - first, slots)
            s = float32(0.0)
            for d in range(D):
                s += qr[d] * float32(k[b, hk, slot, d])
            s = soft_cap(s, softcap)
            p = math.exp2(s - update_row(m, l, acc, 0, s))
            l[0] += p
            for d in range(D):
                acc[0, d] += p * float32(v[b, hk, slot, d])
        merge_threads(m[0], l[0], acc, out, b, h, t)

    return decode_v0


def _make_merge_threads(D, T):
    merge_row = make_merge_row(1)

    @device
    def merge_threads(m, l, acc, out, b, h, t):
        """The block's T partial states (m, l, acc) -> out[b, h], by the log-sum-exp merge; zeros if no keys."""
        Ms = cuda.shared.array(T, float32)
        Ls = cuda.shared.array(T, float32)
        As = cuda.shared.array((T, D), float32)
        Ms[t], Ls[t] = m, l
        for d in range(D):
            As[t, d] = acc[0, d]
        cuda.syncthreads()
        M = cuda.local.array(1, float32)
        L = cuda.local.array(1, float32)
        A = cuda.local.array((1, 1), float32)
        for d in range(t, D, T):
            M[0], L[0], A[0, 0] = NEG_INF, 0.0, 0.0
            for i in range(T):
                w = merge_row(M, L, A, 0, Ms[i], Ls[i])     # rescales A first; a thread with no keys: w = 0
                A[0, 0] += As[i, d] * w
            out[b, h, d] = A[0, 0] * finish(L[0])
    return merge_threads
