"""The online softmax, written once (numbattn.reference.softmax_rescale, compiled into every kernel by
numbattn/kernels/softmax.py): its rule, its empty-row case, and the tiled reference and log-sum-exp merge built on it,
against the plain softmax in float64."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from numba import cuda

from numbattn import reference
from numbattn.kernels import softmax
from numbattn.kernels.common import kernel, soft_cap, soft_cap_slope

INF = math.inf


def test_the_kernels_compile_the_reference_rule_itself():
    assert softmax.rescale.py_func is reference.softmax_rescale
    assert softmax.finish.py_func is reference.softmax_finish


@pytest.mark.parametrize("m_old, m_tile, want", [
    (-INF, -INF, (-INF, 0.0, 0.0)),      # a row that has seen only masked keys: no NaN, nothing summed
    (-INF, 3.0, (3.0, 3.0, 0.0)),        # the first visible key: the (zero) sums before it are cleared
    (5.0, 3.0, (5.0, 5.0, 1.0)),         # a tile below the max: nothing rescaled
    (3.0, 5.0, (5.0, 5.0, 0.25)),        # a new max: the old sums shrink by exp2(3 - 5)
    (5.0, -INF, (5.0, 5.0, 1.0)),        # an all-masked tile after visible keys
])
def test_rescale_rule(m_old, m_tile, want):
    got = reference.softmax_rescale(np.float32(m_old), np.float32(m_tile))
    assert tuple(float(x) for x in got) == want


def test_finish_of_an_empty_row_is_zero_not_nan():
    assert reference.softmax_finish(np.float32(0.0)) == 0.0
    assert reference.softmax_finish(np.float32(4.0)) == 0.25


def plain(q, k, v, causal, window=None, softcap=None):
    return reference.attention(*(x.astype(np.float64) for x in (q, k, v)), causal=causal, window=window,
                               softcap=softcap)


@settings(max_examples=25, deadline=None)
@given(q_len=st.integers(1, 9), extra=st.integers(0, 6), block_n=st.integers(1, 8), group=st.sampled_from([1, 2, 4]),
       causal=st.booleans(), window=st.sampled_from([None, 1, 2, 5]), softcap=st.sampled_from([None, 2.0]),
       seed=st.integers(0, 2**16))
def test_online_attention_equals_softmax(q_len, extra, block_n, group, causal, window, softcap, seed):
    """Tile by tile with the rule = the softmax at once, for tiles that do not divide the keys, GQA, causal, sliding
    windows (whole tiles of a row masked: the empty-row rule) and soft-capped scores."""
    window = window if causal else None
    rng = np.random.default_rng(seed)
    kv_len = q_len + extra
    q = rng.standard_normal((1, 2 * group, q_len, 8)) * 3
    k, v = rng.standard_normal((2, 1, 2, kv_len, 8))
    out, lse = reference.online_attention(q, k, v, block_n, causal=causal, window=window, softcap=softcap)
    np.testing.assert_allclose(out, plain(q, k, v, causal, window, softcap), rtol=1e-12, atol=1e-12)
    s = q @ np.repeat(k, group, axis=1).swapaxes(-1, -2) / np.sqrt(8)
    s = softcap * np.tanh(s / softcap) if softcap else s
    s = np.where(reference.visible(q_len, kv_len, causal, window), s, -np.inf)
    np.testing.assert_allclose(lse, np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1), rtol=1e-12)


def test_merge_partials_over_disjoint_keys_with_an_empty_part():
    """Split-K: partial (m, l, acc) over key ranges, one of them empty (m = -inf, l = 0), merge to the softmax."""
    rng = np.random.default_rng(0)
    s, v = rng.standard_normal(10) * 4, rng.standard_normal((10, 3))   # one row's scores (log2 domain), values
    bounds = [(0, 4), (4, 4), (4, 10)]                                  # the middle part holds no key
    m, l, acc = [], [], []
    for a, b in bounds:
        m_s = s[a:b].max() if b > a else -np.inf
        p = np.exp2(s[a:b] - m_s) if b > a else np.zeros(0)
        m.append(m_s), l.append(p.sum()), acc.append(p @ v[a:b])
    got = reference.merge_partials(np.array(m), np.array(l), np.array(acc))
    w = np.exp2(s - s.max())
    np.testing.assert_allclose(got, w @ v / w.sum(), rtol=1e-12)
    assert (reference.merge_partials(np.array([-np.inf]), np.array([0.0]), np.zeros((1, 3))) == 0).all()



@kernel
def _cap_all(s, cap, out):
    # s [n] -> out[i] = soft_cap(s[i], cap)
    for i in range(cuda.threadIdx.x, s.shape[0], cuda.blockDim.x):
        out[i] = soft_cap(s[i], cap)


def test_the_kernels_soft_cap_is_accurate():
    """common.soft_cap (tanh through expm1, compiled with fastmath) against np.tanh in float64, from |s| = 1e-6 of the
    cap (tanh's linear part, where exp-based forms lose digits) to 1e4 caps (saturated), both signs, and cap = 0 (off).
    On a GPU (NUMBATTN_TEST_GPU=1) this is the real instruction sequence; fastmath's tanh.approx would be off ~1e-3."""
    x = (np.concatenate([np.logspace(-6, 4, 400), -np.logspace(-6, 4, 400), [0.0]]) * 30).astype(np.float32)
    for cap in (30.0, 0.0):
        out = cuda.to_device(np.full(x.shape, np.nan, np.float32))
        _cap_all[1, 32](cuda.to_device(x), np.float32(cap), out)
        want = 30 * np.tanh(x.astype(np.float64) / 30) if cap else x
        np.testing.assert_allclose(out.copy_to_host(), want, rtol=2e-6, atol=0)


@kernel
def _slope_all(s, cap, out):
    # s [n] -> out[i] = soft_cap_slope(s[i], cap)
    for i in range(cuda.threadIdx.x, s.shape[0], cuda.blockDim.x):
        out[i] = soft_cap_slope(s[i], cap)


def test_the_kernels_soft_cap_slope_is_accurate():
    """common.soft_cap_slope, the backward's d soft_cap / ds = 1 - tanh^2(s / cap), against 1 / cosh^2 in float64
    relative to itself, from |s| = 1e-6 caps to 40 caps (slope ~1e-34, where 1 - (capped / cap)^2 in fp32 is 0 or
    all error), both signs; cap = 0: 1. Tolerance 2e-5: s / cap itself is rounded to fp32, and at 40 caps the slope's
    relative sensitivity to it is 80."""
    x = (np.concatenate([np.logspace(-6, np.log10(40), 300), -np.logspace(-6, np.log10(40), 300), [0.0]]) * 30
         ).astype(np.float32)
    for cap in (30.0, 0.0):
        out = cuda.to_device(np.full(x.shape, np.nan, np.float32))
        _slope_all[1, 32](cuda.to_device(x), np.float32(cap), out)
        want = 1 / np.cosh(x.astype(np.float64) / 30) ** 2 if cap else np.ones(x.shape)
        np.testing.assert_allclose(out.copy_to_host(), want, rtol=2e-5, atol=0)
