"""numbattn/linear.py: the GEMV (one token) and the GEMM (a chunk) against reference.linear in float64.

Weights go in as raw words, bf16 (4 per uint64) or fp32 (2 per uint64), as the GPU engine uploads them. Sizes
are chosen to break wrong code: K not a multiple of 32 lanes' words, N not a multiple of the rows a block
covers, M not a multiple of the GEMM's row tile, outputs NaN-poisoned. Tolerance: 1e-5 relative to the largest
value (fp32 sums over <= 100 terms land near 1e-7).
"""
import numpy as np
import pytest
from numba import cuda

from numbattn import linear as L
from numbattn import reference
from tinyllm.weights import bf16_to_f32, f32_to_bf16

RTOL = 1e-5


def weight(rng, n, k, kind):
    """-> (host weight as the kernel reads it: bf16 bits or fp32, its exact float64 value)."""
    w = rng.standard_normal((n, k)).astype(np.float32)
    if kind == "bf16":
        bits = f32_to_bf16(w)
        return bits, bf16_to_f32(bits).astype(np.float64)
    return w, w.astype(np.float64)


def run(x, w_host, kind, epilogue, out_init, norm=None, eps=1e-5):
    words, got_kind = L.pack_weight(w_host)
    assert got_kind == kind
    out = cuda.to_device(out_init.astype(np.float32))
    L.linear(cuda.to_device(x), cuda.to_device(words), kind, out, epilogue,
             norm_w=None if norm is None else cuda.to_device(norm), eps=eps)
    return out.copy_to_host()


def want(x, w64, epilogue, out_init, norm=None, eps=1e-5):
    x = x.astype(np.float64)
    if norm is not None:
        x = reference.rms_norm(x, norm.astype(np.float64), eps)
    y = reference.linear(x, w64)
    if epilogue == "swiglu":
        return reference.swiglu_interleaved(y)
    return y + out_init if epilogue == "residual" else y


def close(got, expect):
    assert np.isfinite(got).all(), "unwritten (NaN) outputs"
    err = np.abs(got - expect).max() / np.abs(expect).max()
    assert err < RTOL, f"relative error {err:.2e} >= {RTOL:.0e}"


@pytest.mark.parametrize("kind", ["bf16", "f32"])
@pytest.mark.parametrize("epilogue", L.EPILOGUES)
@pytest.mark.parametrize("n_tokens,n_in,n_out", [(1, 40, 6), (2, 72, 10), (11, 20, 18)])   # GEMV, GEMV, GEMM
def test_linear_matches_reference(kind, epilogue, n_tokens, n_in, n_out):
    rng = np.random.default_rng(n_tokens * 1000 + n_in + n_out)
    x = rng.standard_normal((n_tokens, n_in)).astype(np.float32)
    w_host, w64 = weight(rng, n_out, n_in, kind)
    n_y = L.out_features(n_out, epilogue)
    out_init = rng.standard_normal((n_tokens, n_y)) if epilogue == "residual" else np.full((n_tokens, n_y), np.nan)
    close(run(x, w_host, kind, epilogue, out_init), want(x, w64, epilogue, out_init))


@pytest.mark.parametrize("kind", ["bf16", "f32"])
def test_gemv_with_fused_rmsnorm(kind):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((2, 72)) * 3).astype(np.float32)
    norm = (1 + 0.1 * rng.standard_normal(72)).astype(np.float32)
    w_host, w64 = weight(rng, 10, 72, kind)
    out_init = np.full((2, 10), np.nan)
    close(run(x, w_host, kind, "none", out_init, norm=norm), want(x, w64, "none", out_init, norm=norm))


def test_bf16_words_are_the_checkpoint_bits():
    """A weight of exact bf16 values gives the same product (up to fp32 summation order: 4 vs 2 values per word)
    whether it is sent as bf16 words or as fp32 words: the bf16 widening is exact."""
    rng = np.random.default_rng(8)
    bits, w64 = weight(rng, 6, 40, "bf16")
    x = rng.standard_normal((1, 40)).astype(np.float32)
    nan = np.full((1, 6), np.nan)
    np.testing.assert_allclose(run(x, bits, "bf16", "none", nan), run(x, bf16_to_f32(bits), "f32", "none", nan),
                               rtol=1e-6, atol=1e-6)


def test_bad_shapes_and_dtypes_are_refused():
    x = cuda.to_device(np.zeros((1, 40), np.float32))
    words, _ = L.pack_weight(np.zeros((6, 40), np.uint16))
    w = cuda.to_device(words)
    with pytest.raises(ValueError, match="out has shape"):
        L.linear(x, w, "bf16", cuda.to_device(np.zeros((1, 5), np.float32)))
    with pytest.raises(ValueError, match="x has shape"):
        L.linear(cuda.to_device(np.zeros((1, 44), np.float32)), w, "bf16", cuda.to_device(np.zeros((1, 6), np.float32)))
    with pytest.raises(ValueError, match="expected a 2-D float32"):
        L.linear(cuda.to_device(np.zeros((1, 40), np.float64)), w, "bf16", cuda.to_device(np.zeros((1, 6), np.float32)))
    with pytest.raises(ValueError, match="multiple of 4"):
        L.pack_weight(np.zeros((6, 42), np.uint16))
