"""Solutions to the exercises of lessons 2-6: what the lessons run unless you pass --exercise.

Try each exercise before reading its solution. Each is one line; the lesson's EXERCISE function has the same
signature, and `python tutorials/0N_*.py --exercise` checks yours against the expected result.
"""
import math

import numpy as np
from numba import cuda


@cuda.jit(device=True)
def rescaled_sum(l, m_old, m_new, x):
    """Lesson 2: l = sum_k exp(x_k - m_old) so far; return the sum over the same terms and x, relative to m_new.
    Every old term exp(x_k - m_old) becomes exp(x_k - m_new) when multiplied by alpha = exp(m_old - m_new)."""
    return l * math.exp(m_old - m_new) + math.exp(x - m_new)


@cuda.jit(device=True)
def tile_slot(idx, width):
    """Lesson 3: element idx of a row-major tile with `width` columns -> (row, column). Consecutive idx, which
    consecutive threads take, are consecutive columns of one row: consecutive addresses (a coalesced load)."""
    return idx // width, idx % width


@cuda.jit(device=True)
def n_keys(i, q_len, kv_len):
    """Lesson 4: how many keys query row i sees under a bottom-right aligned causal mask. Row i is token
    i + (kv_len - q_len) of the sequence, and sees itself and every token before it."""
    return min(kv_len, i + (kv_len - q_len) + 1)


def merged_lse(lse):
    """Lesson 5: log(sum_s exp(lse_s)), the log-sum-exp of the splits' LSEs, computed without overflow by
    factoring out the largest: M + log(sum_s exp(lse_s - M))."""
    return lse.max() + np.log(np.exp(lse - lse.max()).sum())


def dequantize_q4_k(d, dmin, sc, m, codes):
    """Lesson 6: a Q4_K super-block's weights, group g's 32 codes [g, :] scaled by d * sc_g and shifted by the
    group's min, dmin * m_g: w = (d * sc_g) * c - dmin * m_g."""
    return d * sc[:, None] * codes - dmin * m[:, None]
