"""What the families add to the kernels: numbattn/kernels/families.py (q/k/v biases and per-head q/k norms, row
scaling, the final soft cap), rowwise.rms_norm adding into x (Gemma's sandwich norm) and GeGLU's activation, against
numbattn/reference.py in fp64 (1e-5 relative, fp32 kernels), into NaN-filled outputs where there is one.

Shapes chosen to break wrong code: grouped-query heads (4 q heads on 1 or 2 KV heads, v never normalised), more
heads than a block has warps (the heads loop), head_dim not a multiple of the lanes, rows of different scales, and
|x| large enough that a naive exp (GeGLU) or tanh (the cap) overflows.
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


def test_rms_norm_adding_into_the_residual_stream():
    """Gemma's sandwich norm: rowwise.rms_norm with add, x += rms_norm(y) * g (rows of very different scales)."""
    from numbattn.kernels import rowwise
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 72)).astype(np.float32)
    y = (rng.standard_normal((3, 72)) * np.array([[0.01], [1.0], [300.0]])).astype(np.float32)
    g = (1 + 0.1 * rng.standard_normal(72)).astype(np.float32)
    d = cuda.to_device(x)
    rowwise.make_rms_norm(add=True)[3, rowwise.THREADS](cuda.to_device(y), cuda.to_device(g), np.float32(1e-6), d)
    want = x + reference.rms_norm(y.astype(np.float64), g.astype(np.float64), 1e-6)
    np.testing.assert_allclose(d.copy_to_host(), want, rtol=1e-5, atol=1e-6)


def test_gelu_tanh_has_the_right_limits():
    """The GeGLU epilogue's activation (common.gelu_tanh, tested in the GEMV/GEMM by tests/test_linear.py) where
    a naive exp overflows: 0 (not NaN) far below zero, x far above."""
    from numbattn.kernels.common import gelu_tanh
    x = np.array([-200.0, -30.0, -1.0, 0.0, 0.5, 3.0, 30.0, 200.0], np.float32)
    out = cuda.to_device(np.full(x.shape, np.nan, np.float32))

    @cuda.jit
    def apply(x, out):
        i = cuda.grid(1)
        if i < x.shape[0]:
            out[i] = gelu_tanh(x[i])
    apply[1, 8](cuda.to_device(x), out)
    got = out.copy_to_host()
    assert np.isfinite(got).all() and abs(got[0]) < 1e-30 and got[-1] == 200.0
    np.testing.assert_allclose(got, reference.gelu_tanh(x.astype(np.float64)), rtol=1e-5, atol=1e-30)


def test_final_soft_cap():
    x = np.array([[-1e4, -60.0, -3.0, 0.0, 1e-3, 2.5, 29.0, 1e4]] * 2, np.float32)
    d = cuda.to_device(x)
    families.make_row_map("soft cap")[2, families.THREADS](d, np.float32(30.0))
    np.testing.assert_allclose(d.copy_to_host(), reference.soft_cap(x.astype(np.float64), 30.0), rtol=1e-5, atol=1e-9)


def test_scale_rows():
    x = np.arange(2 * 50, dtype=np.float32).reshape(2, 50) - 40
    d = cuda.to_device(x)
    families.make_row_map("scale")[2, families.THREADS](d, np.float32(25.298221))
    np.testing.assert_array_equal(d.copy_to_host(), x * np.float32(25.298221))
