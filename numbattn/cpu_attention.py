"""Decode attention on the CPU: one query token per row over its KV cache layer, a Numba kernel (the NumPy engine's
decode step; reference.decode_attention is the statement it is tested against).

What you will learn here
------------------------
A query row meets its visible keys once: n dot products of head_dim, a softmax over n scores, and a weighted sum
of n value rows. At decode that is little arithmetic (SmolLM2 at 100 tokens: ~115K multiply-adds a layer) and
NumPy spends most of its time around it: repeating K and V for grouped-query heads, masks, temporary arrays, ~100
us a layer. Here it is one compiled loop per query row, two passes over its keys as the equation reads (scores
and their maximum, then exp and the weighted sum), no online softmax needed: a row's scores fit in a small buffer.

Keys are read where the cache keeps them: token j of a row in slot j mod S (S = the layer's slots; a full layer
has S >= n, so slot j), which is also a ring-buffer layer's layout, so a sliding window reads its last tokens in
place. Grouped-query attention reads KV head h // (H / Hkv) and never copies K or V. It runs on the calling
thread: a step's rows are too little work to share.

Prompt chunks stay with the NumPy reference (numbattn.chunk_attention): its BLAS matmuls on the materialised
scores beat this loop past a few hundred keys (256 queries over 1024 keys: 16 ms against 31 ms on both threads).

Memory traffic per query row and head: its visible keys and values (2 n head_dim floats), once each.

    out = decode(q, K, V, lengths, scale, window, softcap)     q [B, H, D]; K, V [B, Hkv, S, D] float32;
                                                              -> [B, H, D] (a row holding no token: zeros)
    window None: every token held; softcap None: none.
"""
import numpy as np
from numba import float32

from .kernels import common
from .kernels.common import cpu_kernel, stamp_cache


@cpu_kernel(cache=True, inline="always")       # module-level, no closures: Numba keeps them compiled on disk
def _attend(q, K, V, b, hk, first, n, scale, softcap, scores, out):
    """out = softmax(soft_cap(q . k_j * scale)) . v_j over the keys first <= j < n (slot j mod S) of KV head hk of
    row b: q [D], out [D], scores [>= n - first] scratch. No key: zeros."""
    S, D = K.shape[2], q.shape[0]
    m = -np.inf
    for j in range(first, n):                           # s_j and their maximum
        s = float32(0.0)
        for d in range(D):
            s += q[d] * K[b, hk, j % S, d]
        s *= scale
        if softcap > 0:
            s = softcap * np.tanh(s / softcap)
        scores[j - first] = s
        m = max(m, s)
    for d in range(D):
        out[d] = 0.0
    total = float32(0.0)
    for j in range(first, n):                           # sum_j exp(s_j - m) v_j, and its weight
        p = np.exp(scores[j - first] - m)
        total += p
        for d in range(D):
            out[d] += p * V[b, hk, j % S, d]
    if n > first:
        for d in range(D):
            out[d] /= total


@cpu_kernel(cache=True)
def _decode(q, K, V, lengths, scale, window, softcap, out):
    B, H, _ = q.shape
    scores = np.empty(max(K.shape[2], 1), np.float32)
    for b in range(B):
        n = lengths[b]
        for h in range(H):
            _attend(q[b, h], K, V, b, h // (H // K.shape[1]), max(0, n - window) if window > 0 else 0, n, scale,
                    softcap, scores, out[b, h])


def decode(q, K, V, lengths, scale, window=None, softcap=None):
    """The decode step (see the module docstring); the caller (numbattn.decode_attention) has checked it all."""
    out = np.empty(q.shape, np.float32)
    _decode(np.ascontiguousarray(q, np.float32), K, V, np.asarray(lengths, np.int64), np.float32(scale),
            int(window or 0), np.float32(softcap or 0), out)
    return out


stamp_cache((_decode,), (common.__file__,))           # its compile policy (fastmath) lives there
