"""The online softmax, written once for every kernel: the rescale rule, the row-state update, the log-sum-exp merge.

Every attention kernel keeps, per query row (and head), the FlashAttention state

    m     the largest score seen so far (log2 domain: s = q.k * scale * log2 e)
    l     sum_j exp2(s_j - m)
    acc   sum_j exp2(s_j - m) v_j                      (a vector: the whole head, or a thread's share of its dims)

and folds in a tile of keys, or another partial state over other keys (split-K decode), by one rule:
numbattn.reference.softmax_rescale, which this module compiles as a device function (the reference and the
kernels run the same Python function, so the rule, and its treatment of a row that has seen no key, cannot
drift). From it:

    rescale(m_old, m_tile) -> (m_new, m_ref, alpha)       the rule itself (see the reference)
    finish(l) -> 1 / l, or 0 for a row that saw no key     the one division, at the end
    lse(m, l) -> the row's log-sum-exp (natural log)       what a forward returns for the backward (-inf: no key)
    update_row(m, l, acc, r, m_tile) -> m_ref              row r of a state kept as arrays m[R], l[R], acc[R, E]:
                                                           m[r] grows to include m_tile, l[r] and acc[r, :] are
                                                           rescaled; the caller then adds its tile's
                                                           p = exp2(s - m_ref) to l and p v to acc
    merge_row(m, l, acc, r, m_s, l_s) -> w                 the log-sum-exp merge of a partial (m_s, l_s, acc_s)
                                                           into row r: update_row, then l[r] += l_s w; the caller
                                                           adds acc_s * w to its acc (w = exp2(m_s - m_ref))

Two layouts of the state exist, and each has its update written once:
* arrays indexed by row (m[R], l[R], acc[R, E]): one thread or one lane holding whole rows, or E of a row's dims
  (prefill v0, v1, v2; decode v0, v1, v2), through update_row above;
* the tensor-core fragments of prefill v3 (two rows per lane, the output as MMA C fragments), through
  kernels/prefill_mma.py's softmax_step, which calls `rescale` for each of its two rows.

fastmath: these functions are inlined into kernels compiled with common.FASTMATH, which keeps -inf and NaN
(no 'ninf', no 'nnan'): the rule depends on -inf comparing and subtracting as IEEE says.
"""
import math

from ..reference import softmax_finish, softmax_lse, softmax_rescale
from .common import device

rescale = device(softmax_rescale)
finish = device(softmax_finish)
lse = device(softmax_lse)


def make_update_row(E):
    """update_row(m, l, acc, r, m_tile) for a state whose acc rows hold E values (a compile-time constant)."""
    @device
    def update_row(m, l, acc, r, m_tile):
        m_new, m_ref, alpha = rescale(m[r], m_tile)
        m[r] = m_new
        l[r] *= alpha
        for e in range(E):
            acc[r, e] *= alpha
        return m_ref
    return update_row


def make_merge_row(E):
    """merge_row(m, l, acc, r, m_s, l_s) -> w: fold a partial state (m_s, l_s, acc_s) into row r; the caller adds
    acc_s * w to acc[r, :]. A partial that saw no key (m_s = -inf) gets w = 0."""
    update_row = make_update_row(E)

    @device
    def merge_row(m, l, acc, r, m_s, l_s):
        m_ref = update_row(m, l, acc, r, m_s)
        w = math.exp2(m_s - m_ref)
        l[r] += l_s * w
        return w
    return merge_row

