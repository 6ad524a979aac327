"""numbattn/cpu_rowwise.py: the NumPy engine's RMSNorm and RoPE kernels against fp64 NumPy (reference.rms_norm and
reference.rope evaluated in float64), at 1e-5 of the largest value.

Shapes that break wrong code: a row length off every vector width (7, 72), one row and many, head_dim 16..256,
one position and several (each its own angles), several head counts, strided inputs (transposed views), an
all-zero row."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from numbattn import cpu_rowwise, reference

RTOL = 1e-5


def close(got, want):
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() <= RTOL * np.abs(want).max()


@pytest.mark.parametrize("shape", [(1, 1, 576), (7,), (3, 5, 72), (1, 9, 1, 64), (2, 256)])
def test_rms_norm_matches_the_reference(shape):
    rng = np.random.default_rng(len(shape) * 100 + shape[-1])
    x = (rng.standard_normal(shape) * 5).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
    close(cpu_rowwise.rms_norm(x, w, 1e-6), reference.rms_norm(x.astype(np.float64), w.astype(np.float64), 1e-6))


def test_rms_norm_reads_strided_rows_and_keeps_eps():
    """A transposed view (rows not contiguous) and all-zero rows (the result is 0, not NaN: eps keeps it finite)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((72, 4)).astype(np.float32).T
    x[1] = 0
    w = rng.standard_normal(72).astype(np.float32)
    got = cpu_rowwise.rms_norm(x, w, 1e-5)
    close(got, reference.rms_norm(x.astype(np.float64), w.astype(np.float64), 1e-5))
    assert np.isfinite(got).all() and not got[1].any()


@pytest.mark.parametrize("heads,seq,head_dim", [(9, 1, 64), (3, 5, 16), (1, 2, 256), (4, 7, 128)])
def test_rope_matches_the_reference(heads, seq, head_dim):
    rng = np.random.default_rng(heads * seq + head_dim)
    x = rng.standard_normal((2, heads, seq, head_dim)).astype(np.float32)
    cos, sin = reference.rope_tables(head_dim, seq + 40, 10000.0)
    cos, sin = cos[40:], sin[40:]                          # positions 40 .. 40 + seq - 1, as a later chunk's
    close(cpu_rowwise.rope(x, cos, sin), reference.rope(x.astype(np.float64), cos.astype(np.float64),
                                                        sin.astype(np.float64)))


def test_rope_reads_a_strided_query():
    """q as split from a fused projection without a copy: [b, s, h, d] transposed to [b, h, s, d]."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 3, 4, 32)).astype(np.float32).transpose(0, 2, 1, 3)
    cos, sin = reference.rope_tables(32, 3, 500.0)
    close(cpu_rowwise.rope(x, cos, sin), reference.rope(x.astype(np.float64), cos.astype(np.float64),
                                                        sin.astype(np.float64)))


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 4), n=st.integers(1, 40), heads=st.integers(1, 3), seq=st.integers(1, 4),
       half=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_both_kernels_on_tiny_shapes(rows, n, heads, seq, half, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, n)) * 3).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    close(cpu_rowwise.rms_norm(x, w, 1e-5), reference.rms_norm(x.astype(np.float64), w.astype(np.float64), 1e-5))
    q = rng.standard_normal((1, heads, seq, 2 * half)).astype(np.float32)
    cos, sin = reference.rope_tables(2 * half, seq, 10000.0)
    close(cpu_rowwise.rope(q, cos, sin), reference.rope(q.astype(np.float64), cos.astype(np.float64),
                                                        sin.astype(np.float64)))
