"""Decode attention on the CPU: one query token per row over its KV cache layer, a Numba kernel (the NumPy engine's
decode step; reference.decode_attention is the statement it is tested against).

What you will learn here
------------------------
At decode a row's query meets its n cached keys once: n dot products of head_dim, a softmax over n scores, and a
weighted sum of n value rows, per query head. That is little arithmetic (SmolLM2 at 100 tokens: ~115K multiply-adds
a layer) and NumPy spends most of its time around it: repeating K and V for grouped-query heads, masks, temporary
arrays, ~100 us a layer. Here it is one compiled loop, two passes over the keys as the equation reads (scores and
their maximum, then exp and the weighted sum), no online softmax needed: the n scores fit in a small buffer.

Keys are read where the cache keeps them: token j of a row in slot j mod S (S = the layer's slots; a full layer
has S >= n, so slot j), which is also a ring-buffer layer's layout, so a sliding window reads its last
min(n, window) tokens in place. Grouped-query attention reads KV head h // (H / Hkv) and never copies K or V.

Memory traffic per row and query head: its n keys and values (2 n head_dim floats), once each.

    out = decode(q, K, V, lengths, scale, window, softcap)     q [B, H, D] f32; K, V [B, Hkv, S, D] f32;
                                                              window 0: every token; softcap 0: none -> [B, H, D]
"""
import numpy as np
from numba import float32

from .kernels.common import cpu_kernel


@cpu_kernel(cache=True)                 # module-level, no closures: Numba keeps it compiled on disk
def _decode(q, K, V, lengths, scale, window, softcap, out):
    B, H, D = q.shape
    S, group = K.shape[2], H // K.shape[1]
    scores = np.empty(max(S, 1), np.float32)
    for b in range(B):
        n = lengths[b]
        first = max(0, n - window) if window > 0 else 0
        for h in range(H):
            hk = h // group
            m = -np.inf
            for j in range(first, n):                       # s_j = soft_cap(q . k_j * scale), and their maximum
                s = float32(0.0)
                for d in range(D):
                    s += q[b, h, d] * K[b, hk, j % S, d]
                s *= scale
                if softcap > 0:
                    s = softcap * np.tanh(s / softcap)
                scores[j - first] = s
                m = max(m, s)
            for d in range(D):
                out[b, h, d] = 0.0
            total = float32(0.0)
            for j in range(first, n):                       # out = sum_j exp(s_j - m) v_j / sum_j exp(s_j - m)
                p = np.exp(scores[j - first] - m)
                total += p
                for d in range(D):
                    out[b, h, d] += p * V[b, hk, j % S, d]
            if n > first:
                for d in range(D):
                    out[b, h, d] /= total


def decode(q, K, V, lengths, scale, window=None, softcap=None):
    """softmax(soft_cap(q k^T * scale)) v over each row's last min(n, window) cached tokens -> float32 [B, H, D]
    (a row holding no token: zeros). The caller (numbattn.decode_attention) has checked the arguments."""
    out = np.empty(q.shape, np.float32)
    _decode(np.ascontiguousarray(q, np.float32), K, V, np.asarray(lengths, np.int64), np.float32(scale),
            int(window or 0), np.float32(softcap or 0), out)
    return out
