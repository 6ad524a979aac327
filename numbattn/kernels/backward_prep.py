"""What both backward versions need before their main kernels: D = rowsum(dO ∘ O), zeroed dK/dV, P's reference.

    row_dot(out, dout, delta)      delta[b, h, i] = sum_d dout[b, h, i, d] * out[b, h, i, d]: FlashAttention-2's
                                   preprocessing. dS = P ∘ (dP - D) needs D_i = rowsum(P ∘ dP), which equals
                                   rowsum(dO ∘ O) (numbattn.reference.attention_backward derives it): one number
                                   per query row from two arrays the forward and the loss already wrote, instead of
                                   a pass over the N×N P. One thread per row; memory traffic 2 · rows · D · 4 bytes.
    zero_fill(x)                   x[:] = 0 for a 1-D view: dK and dV are sums over the query heads of a KV head
                                   (grouped-query attention), which the key kernels add into with atomics.
    p_reference(lse)               the number a row's probabilities are taken against, p = exp2(s - ref): its
                                   log-sum-exp in the log2 domain, or 0 for a row that saw no key (lse = -inf), the
                                   forward's empty-row rule (kernels/softmax.py `rescale`), so that such a row gets
                                   p = exp2(-inf) = 0 and never exp2(-inf - (-inf)) = NaN.
    make_p_ds(capped)              p_ds(s, dp, ref, D_i, ...) -> (p, ds) of one visible (query, key) pair, the
                                   equations every backward kernel recomputes, written once: the score scaled to
                                   log2 units and soft-capped as the forward caps it (common.soft_cap), p from the
                                   row's reference, ds = p (dp - D_i) times the cap's slope at the uncapped score
                                   (common.soft_cap_slope).
"""
import math

from numba import cuda, float32

from ..reference import LOG2E
from .common import NEG_INF, device, kernel, make_cap, make_cap_slope
from .softmax import rescale

_LOG2E = float32(LOG2E)


@kernel
def row_dot(out, dout, delta):
    # out, dout [B, H, Lq, D] -> delta [B, H, Lq]; grid (row blocks, H, B)
    b, h = cuda.blockIdx.z, cuda.blockIdx.y
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i < out.shape[2]:
        acc = float32(0.0)
        for d in range(out.shape[3]):
            acc += float32(dout[b, h, i, d]) * float32(out[b, h, i, d])
        delta[b, h, i] = acc


@kernel
def zero_fill(x):
    # x [n] -> 0 (a grid-stride loop: any grid covers it)
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        x[i] = 0.0


@device
def p_reference(lse):
    """A row's natural-log log-sum-exp -> what its p = exp2(s - ref) are taken against (0 for an empty row)."""
    _, ref, _ = rescale(float32(lse) * _LOG2E, NEG_INF)     # the forward's rule for a row that has seen no key
    return ref


def make_p_ds(capped):
    """p_ds(s, dp, ref, d_row, scale_log2, softcap) -> (p, ds) for a visible pair: s = q . k (unscaled), dp = dO . v,
    ref = p_reference(lse) of the row, d_row its D; softcap in log2 units (0: none). capped: compiled with the soft
    cap, else without it (the forward's compile-time choice, common.make_cap).

        x = s * scale log2 e                   the score in the forward's units ...
        p = exp2(soft_cap(x) - ref)            ... capped as the forward caps it: P, from the row's log-sum-exp
        ds = p (dp - D) * soft_cap'(x)         dS with respect to the uncapped score (the cap's chain rule)"""
    cap, slope = make_cap(capped), make_cap_slope(capped)

    @device
    def p_ds(s, dp, ref, d_row, scale_log2, softcap):
        x = s * scale_log2
        p = math.exp2(cap(x, softcap) - ref)
        return p, p * (dp - d_row) * slope(x, softcap)
    return p_ds
