"""Decode attention on the CPU: one query token per row over its KV cache layer, a Numba kernel (the NumPy engine's
decode step; reference.decode_attention is the statement it is tested against).

What you will learn here
------------------------
A query row meets its visible keys once: n dot products of head_dim, a softmax over n scores, and a weighted sum
of n value rows. At decode that is little arithmetic (SmolLM2 at 100 tokens: ~115K multiply-adds a layer) and
NumPy spends most of its time around it: repeating K and V for grouped-query heads, masks, temporary arrays, ~100
us a layer. Here it is one compiled loop per row and KV head, two passes over its keys as the equation reads
(scores and their maxima, then exp and the weighted sum), no online softmax needed: a row's scores fit in a small
buffer.

Keys are read where the cache keeps them: token j of a row in slot j mod S (S = the layer's slots; a full layer
has S >= n, so slot j), which is also a ring-buffer layer's layout, so a sliding window reads its last tokens in
place. Grouped-query attention takes the G query heads of a KV head together (each key and value row loaded once
for all G) and never copies K or V. It runs on the calling thread: a step's rows are too little work to share.
SmolLM2's shapes (9 heads, 3 KV heads, head_dim 64) at 81 tokens: 12.7 us a layer (27 us a query head at a time).

Prompt chunks stay with the NumPy reference (numbattn.chunk_attention): its BLAS matmuls on the materialised
scores beat this loop past a few hundred keys (256 queries over 1024 keys: 16 ms against 31 ms on both threads).

Memory traffic per row and KV head: its visible keys and values (2 n head_dim floats), once each.

    decode_q = prepare(K, V, lengths, scale, window, softcap)   K, V [B, Hkv, S, D] float32, lengths [B]
    out = decode_q(q)                                         q [B, H, D] -> [B, H, D] (a row holding no token:
                                                              zeros); lengths read at each call
    window None: every token held; softcap None: none.
"""
import numpy as np
from numba import float32

from .kernels import common
from .kernels.common import cpu_kernel, stamp_cache


@cpu_kernel(cache=True, inline="always")       # module-level, no closures: Numba keeps them compiled on disk
def _attend(q, K, V, b, hk, first, n, scale, softcap, scores, m, total, out):
    """out[g] = softmax(soft_cap(q[g] . k_j * scale)) . v_j over the keys first <= j < n (slot j mod S) of KV head hk
    of row b, for the G query heads that share it: q, out [G, D]; scratch scores [G, >= n - first], m, total [G].
    Each key and value row is loaded once for the G heads. No key: zeros. (Every value float32: a float64 -inf
    here would carry the whole weighted sum into float64, 2x slower.)"""
    S, G, D = K.shape[2], q.shape[0], q.shape[1]
    Kb, Vb = K[b, hk], V[b, hk]                         # [S, D] each
    m[:] = -np.inf
    for j in range(first, n):                           # s_gj and their maxima
        kj = Kb[j % S]
        for g in range(G):
            s = float32(0.0)
            for d in range(D):
                s += q[g, d] * kj[d]
            s *= scale
            if softcap > 0:
                s = softcap * np.tanh(s / softcap)
            scores[g, j - first] = s
            m[g] = max(m[g], s)
    out[:, :] = 0.0
    total[:] = 0.0
    for j in range(first, n):                           # sum_j exp(s_gj - m_g) v_j, and its weight
        vj = Vb[j % S]
        for g in range(G):
            p = np.exp(scores[g, j - first] - m[g])
            total[g] += p
            for d in range(D):
                out[g, d] += p * vj[d]
    if n > first:
        for g in range(G):
            inv = float32(1.0) / total[g]
            for d in range(D):
                out[g, d] *= inv


@cpu_kernel(cache=True)
def _decode(q, K, V, lengths, scale, window, softcap, out):
    B, H, _ = q.shape
    Hk = K.shape[1]
    G = H // Hk                                         # query heads per KV head
    scores = np.empty((G, max(K.shape[2], 1)), np.float32)
    m, total = np.empty(G, np.float32), np.empty(G, np.float32)
    for b in range(B):
        n = lengths[b]
        first = max(0, n - window) if window > 0 else 0
        for hk in range(Hk):
            heads = slice(hk * G, (hk + 1) * G)
            _attend(q[b, heads], K, V, b, hk, first, n, scale, softcap, scores, m, total, out[b, heads])


def prepare(K, V, lengths, scale, window=None, softcap=None):
    """The decode step with everything but q fixed -> decode_q(q) -> out (numbattn.decode_attention keeps one per
    layer and argument set; lengths: the layer's host lengths, read at each call)."""
    args = (K, V, np.asarray(lengths), np.float32(scale), int(window or 0), np.float32(softcap or 0))

    def decode_q(q):
        out = np.empty(q.shape, np.float32)
        _decode(np.ascontiguousarray(q, np.float32), *args, out)
        return out
    return decode_q


stamp_cache((_decode,), (common.__file__,))           # its compile policy (fastmath) lives there
