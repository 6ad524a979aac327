"""RMSNorm and RoPE on the CPU: Numba kernels for the NumPy engine (reference.rms_norm and reference.rope are the
statements they are tested against).

What you will learn here
------------------------
A decode step of a small model spends as long around its matmuls as in them when every op is a few lines of
NumPy: each line is a call into NumPy (~0.5-1 us of Python and dispatch) on a vector of a few hundred floats
(under 0.1 us of arithmetic). RMSNorm is six such calls and RoPE seven; SmolLM2 makes 61 norms and 60 rotations
a token, ~1 ms of its ~10. Here each is one compiled loop (one call, ~1 us), on the calling thread (too little
work to share), for a decode token and a prompt chunk alike:

    rms_norm   y = x / sqrt(mean(x^2) + eps) * w, per row: one pass for the sum of squares, one to scale
    rope       each head's pairs (x_i, x_{i + D/2}) rotated by their position's angle (rotate-half layout)

Memory traffic: x read twice (rms_norm; the second time from L1) or once (rope), the result written once.

    y = rms_norm(x, w, eps)            x [..., N] float32, w [N] -> [..., N]
    q = rope(q, cos, sin)              q [B, H, S, D] float32; cos, sin [S, D/2] -> [B, H, S, D]
"""
import numpy as np
from numba import float32

from .kernels import common
from .kernels.common import cpu_kernel, stamp_cache


@cpu_kernel(cache=True)
def _rms_norm(x, w, eps, out):
    """x, out [M, N]: out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * w."""
    M, N = x.shape
    for m in range(M):
        s = float32(0.0)
        for i in range(N):
            s += x[m, i] * x[m, i]
        r = float32(1.0) / np.sqrt(s / float32(N) + eps)
        for i in range(N):
            out[m, i] = x[m, i] * r * w[i]


@cpu_kernel(cache=True)
def _rope(x, cos, sin, out):
    """x, out [B, H, S, D]; cos, sin [S, D/2]: (x_i, x_{i + D/2}) -> (x_i c - x_{i + D/2} s, x_{i + D/2} c + x_i s)."""
    B, H, S, D = x.shape
    half = D // 2
    for b in range(B):
        for h in range(H):
            for p in range(S):
                for i in range(half):
                    x1, x2, c, s = x[b, h, p, i], x[b, h, p, half + i], cos[p, i], sin[p, i]
                    out[b, h, p, i] = x1 * c - x2 * s
                    out[b, h, p, half + i] = x2 * c + x1 * s


def rms_norm(x, w, eps):
    """reference.rms_norm(x, w, eps) for float32 x [..., N] (w [N]) by the kernel -> float32 [..., N]."""
    x2 = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])
    out = np.empty_like(x2)
    _rms_norm(x2, np.ascontiguousarray(w, np.float32), np.float32(eps), out)
    return out.reshape(x.shape)


def rope(x, cos, sin):
    """reference.rope(x, cos, sin) for float32 x [B, H, S, D] and tables cos, sin [S, D/2] by the kernel."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty_like(x)
    _rope(x, np.ascontiguousarray(cos, np.float32), np.ascontiguousarray(sin, np.float32), out)
    return out


stamp_cache((_rms_norm, _rope), (common.__file__,))           # its compile policy (fastmath) lives there
