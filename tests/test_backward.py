"""The attention backward (numbattn/backward.py, kernels/backward_*.py) and its NumPy reference.

The reference (numbattn.reference.attention_backward, the equations) is checked against finite differences in
fp64; the kernels against the reference in fp64, into NaN-filled gradient buffers, on shapes chosen to break wrong
code: lengths off the tile multiples (the simulator's tiles are 4 or 16 rows), one token, GQA 1/4/8 (dK and dV
summed over a group), causal with more keys than queries, rows that see no key. Tolerance: 1e-5 relative to the
largest reference value (fp32 over <= 64 keys lands near 1e-7; a missed mask, a wrong lse or D is off by >1e-3).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numbattn
from numbattn import reference
from numbattn.backend import available_backends

RTOL = 1e-5
KERNEL = available_backends()[0]  # "sim" in CI, "cuda" with NUMBATTN_TEST_GPU=1 (conftest.py checks which)


def rand_qkv(rng, batch, n_heads, n_kv_heads, q_len, kv_len, d, magnitude=1.0):
    q = rng.standard_normal((batch, n_heads, q_len, d)) * magnitude
    k = rng.standard_normal((batch, n_kv_heads, kv_len, d))
    v = rng.standard_normal((batch, n_kv_heads, kv_len, d))
    dout = rng.standard_normal((batch, n_heads, q_len, d))
    return tuple(x.astype(np.float32) for x in (q, k, v, dout))


# ---- the reference: the equations against finite differences --------------------------------------------
def numerical_gradient(f, x, eps=1e-6):
    """d f / d x by central differences, element by element (fp64, tiny arrays)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        up = f()
        x[i] = old - eps
        g[i] = (up - f()) / (2 * eps)
        x[i] = old
    return g


@pytest.mark.parametrize("n_heads,n_kv_heads,q_len,kv_len,causal", [
    (2, 2, 3, 3, True), (4, 1, 2, 5, True), (2, 1, 4, 3, False), (8, 1, 1, 2, False)])
def test_reference_equals_finite_differences(n_heads, n_kv_heads, q_len, kv_len, causal):
    """L = sum(dout * attention(q, k, v)): the reference's gradients are dL/dq, dL/dk, dL/dv (GQA: k and v feed
    several heads, so their gradients are sums), to 1e-7 in fp64."""
    rng = np.random.default_rng(n_heads + q_len * 10 + kv_len)
    q, k, v, dout = (x.astype(np.float64) for x in rand_qkv(rng, 1, n_heads, n_kv_heads, q_len, kv_len, 4))
    scale = 0.7

    def loss():
        return float((dout * reference.attention(q, k, v, causal=causal, scale=scale)).sum())
    got = reference.attention_backward(q, k, v, dout, causal=causal, scale=scale)
    for name, x, g in zip("qkv", (q, k, v), got):
        assert g.shape == x.shape and g.dtype == np.float64
        np.testing.assert_allclose(g, numerical_gradient(loss, x), rtol=1e-6, atol=1e-8, err_msg=f"d{name}")


def test_log_sum_exp_of_empty_rows_is_minus_infinity():
    s = np.array([[0.0, 1.0, -np.inf], [-np.inf, -np.inf, -np.inf]])
    np.testing.assert_allclose(reference.log_sum_exp(s), [np.log(1 + np.e), -np.inf])
    assert reference.softmax_lse(np.float32(-np.inf), np.float32(0)) == -np.inf
    assert reference.softmax_lse(np.float32(3.0), np.float32(2.0)) == np.float32(4.0 * reference.LN2)
