"""numbattn/kernels/families.py: q/k/v biases and per-head q/k norms, the sandwich norm, GeGLU and row scaling,
against numbattn/reference.py in fp64 (1e-5 relative, fp32 kernels), into NaN-filled outputs where there is one.

Shapes chosen to break wrong code: grouped-query heads (4 q heads on 1 or 2 KV heads, v never normalised), more
heads than a block has warps (the heads loop), head_dim not a multiple of the lanes, rows of different scales, and
GeGLU at |x| large enough that a naive exp overflows.
"""
import numpy as np
import pytest
from numba import cuda

from numbattn import reference
from numbattn.kernels import families


def split(qkv, H, HKV, D):
    return qkv[:, :H * D], qkv[:, H * D:(H + HKV) * D], qkv[:, (H + HKV) * D:]


@pytest.mark.parametrize("H, HKV, D, bias, norm", [(4, 2, 16, True, False), (4, 1, 24, False, True),
                                                   (6, 2, 32, True, True), (2, 2, 8, True, True)])
def test_qkv_finish(H, HKV, D, bias, norm):
    rng = np.random.default_rng(H * D)
    M = 3
    qkv = (rng.standard_normal((M, (H + 2 * HKV) * D)) * rng.uniform(0.1, 10, (M, 1))).astype(np.float32)
    b = rng.standard_normal((H + 2 * HKV) * D).astype(np.float32)
    gq, gk = (1 + 0.2 * rng.standard_normal((2, D))).astype(np.float32)
    d = cuda.to_device(qkv)
    families.make_qkv_finish(H, HKV, D, bias, norm)[M, families.THREADS](
        d, cuda.to_device(b), cuda.to_device(gq), cuda.to_device(gk), np.float32(1e-6))
    want = qkv.astype(np.float64) + (b if bias else 0)
    q, k, v = split(want, H, HKV, D)
    if norm:
        q = reference.rms_norm(q.reshape(M, H, D), gq.astype(np.float64), 1e-6).reshape(M, -1)
        k = reference.rms_norm(k.reshape(M, HKV, D), gk.astype(np.float64), 1e-6).reshape(M, -1)
    np.testing.assert_allclose(d.copy_to_host(), np.concatenate([q, k, v], axis=1), rtol=1e-5, atol=1e-5)


def test_add_rms_norm():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 72)).astype(np.float32)
    y = (rng.standard_normal((3, 72)) * np.array([[0.01], [1.0], [300.0]])).astype(np.float32)
    g = (1 + 0.1 * rng.standard_normal(72)).astype(np.float32)
    d = cuda.to_device(x)
    families.make_add_rms_norm()[3, families.THREADS](d, cuda.to_device(y), cuda.to_device(g), np.float32(1e-6))
    want = x + reference.rms_norm(y.astype(np.float64), g.astype(np.float64), 1e-6)
    np.testing.assert_allclose(d.copy_to_host(), want, rtol=1e-5, atol=1e-6)


def test_geglu():
    rng = np.random.default_rng(2)
    gu = (rng.standard_normal((2, 2 * 40)) * 4).astype(np.float32)
    gu[0, :8] = [-200.0, 1.0, -30.0, 2.0, 30.0, -1.0, 0.0, 5.0]      # exp(-2u) overflows for the first gate
    out = cuda.to_device(np.full((2, 40), np.nan, np.float32))
    families.make_geglu()[2, families.THREADS](cuda.to_device(gu), out)
    want = reference.geglu(gu[:, 0::2].astype(np.float64), gu[:, 1::2].astype(np.float64))
    got = out.copy_to_host()
    assert np.isfinite(got).all() and abs(got[0, 0]) < 1e-30
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_scale_rows():
    x = np.arange(2 * 50, dtype=np.float32).reshape(2, 50) - 40
    d = cuda.to_device(x)
    families.make_scale_rows()[2, families.THREADS](d, np.float32(25.298221))
    np.testing.assert_array_equal(d.copy_to_host(), x * np.float32(25.298221))
