"""numbattn/kernels/mma.py: TF32 rounding and the warp MMA, against NumPy, through real kernels.

In CI the kernels run in the simulator, so these check the simulator twins: the rounding rule and the fragment
layout that prefill v3 is written against. With NUMBATTN_TEST_GPU=1 the same kernels run the inline PTX
(cvt.rna.tf32.f32, mma.sync m16n8k8): the twins and the hardware must agree.
"""
import numpy as np
from numba import cuda, float32

from numbattn.kernels import mma
from numbattn.backend import available_backends

KERNEL = available_backends()[0]


def tf32_reference(x):
    """Round float32 to a 10-bit mantissa, to nearest, ties away from zero, in float64 arithmetic (no bit tricks)."""
    x = np.asarray(x, np.float64)
    _, e = np.frexp(x)                                   # x = f * 2^e, 0.5 <= |f| < 1
    ulp = np.ldexp(1.0, e - 11)                          # TF32 keeps 11 significant bits (1 + 10)
    return (np.sign(x) * np.floor(np.abs(x) / ulp + 0.5) * ulp).astype(np.float32)


def test_tf32_round_matches_the_arithmetic_definition():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(4096) * 10.0 ** rng.integers(-30, 30, 4096),
                        [0.0, -0.0, 1.0, -1.0, 1 + 2 ** -11, 1 + 3 * 2 ** -11, -(1 + 2 ** -11), 1 + 2 ** -12]])
    x = x.astype(np.float32)
    got, want = mma.tf32_round(x), tf32_reference(x)
    assert (got.view(np.uint32) & 0x1FFF == 0).all(), "low 13 bits must be zero"
    np.testing.assert_array_equal(got, want)
    assert mma.tf32_round(np.float32(1 + 2 ** -11)) == np.float32(1 + 2 ** -10)      # a tie goes away from zero
    assert np.isinf(mma.tf32_round(np.float32(np.inf))) and np.isnan(mma.tf32_round(np.float32(np.nan)))


def _run_split(x, cvt=False):
    @cuda.jit
    def split_kernel(x, big, small, cvt):
        i = cuda.grid(1)
        if i < x.shape[0]:
            if cvt:
                big[i], small[i] = mma.tf32_split_cvt(x[i])
            else:
                big[i], small[i] = mma.tf32_split(x[i])

    big, small = cuda.device_array(x.shape, np.float32), cuda.device_array(x.shape, np.float32)
    split_kernel[(x.size + 63) // 64, 64](cuda.to_device(x), big, small, cvt)
    return big.copy_to_host(), small.copy_to_host()


def test_tf32_split_big_plus_small_keeps_fp32_accuracy():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(256) * 100).astype(np.float32)
    big, small = _run_split(x)
    np.testing.assert_array_equal(big, tf32_reference(x))
    np.testing.assert_array_equal(small, tf32_reference(x - big))
    rel = np.abs((big.astype(np.float64) + small) - x) / np.abs(x)
    assert rel.max() < 2.0 ** -21, rel.max()             # TF32's 2^-11, squared (about)


def test_tf32_split_by_integer_rounding_is_the_cvt_instruction():
    """On a GPU: the two-integer-instruction rounding gives cvt.rna.tf32.f32's bits, ties and carries included."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(4096) * 10.0 ** rng.integers(-20, 20, 4096)).astype(np.float32)
    ties = (0x3F800000 | np.arange(1024, dtype=np.uint32) << 13 | 0x1000).view(np.float32)   # halfway, in [1, 2)
    x = np.concatenate([x, ties, -ties, [0.0, -0.0, 3.4e38, -3.4e38]]).astype(np.float32)
    if KERNEL == "sim":         # the twins are one function there: a few values show the kernel runs
        x = np.ascontiguousarray(x[::32])
    by_int, by_cvt = _run_split(x), _run_split(x, cvt=True)
    np.testing.assert_array_equal(by_int[0].view(np.uint32), by_cvt[0].view(np.uint32))
    np.testing.assert_array_equal(by_int[1].view(np.uint32), by_cvt[1].view(np.uint32))
    np.testing.assert_array_equal(by_int[0], tf32_reference(x))


MMA_3X = mma.make_mma_3xtf32_n(1)      # prefill v3's 3xTF32 product, for one B fragment


def _run_mma(a, b, c, three=False):
    """One warp: lanes load their fragments of A [16, 8], B [8, 8], C [16, 8] by the PTX layout, run the MMA,
    and store D by the C layout. three: the 3xTF32 product of prefill v3 on split operands instead of one TF32
    MMA."""
    scratch_shape = mma.mma_scratch_shape(32)

    @cuda.jit
    def mma_kernel(a, b, c, d, three):
        scratch = cuda.shared.array(scratch_shape, float32)
        lane = cuda.threadIdx.x
        g, t = lane >> 2, lane & 3
        a0, a1, a2, a3 = a[g, t], a[g + 8, t], a[g, t + 4], a[g + 8, t + 4]
        b0, b1 = b[t, g], b[t + 4, g]
        c0, c1, c2, c3 = c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t], c[g + 8, 2 * t + 1]
        if three:
            ab = cuda.local.array((1, 4), float32)      # the fragments split into big and small, as v3 keeps them
            a_s = cuda.local.array((1, 4), float32)
            bb = cuda.local.array((1, 2), float32)
            b_s = cuda.local.array((1, 2), float32)
            cd = cuda.local.array((1, 4), float32)
            ab[0, 0], a_s[0, 0] = mma.tf32_split(a0)
            ab[0, 1], a_s[0, 1] = mma.tf32_split(a1)
            ab[0, 2], a_s[0, 2] = mma.tf32_split(a2)
            ab[0, 3], a_s[0, 3] = mma.tf32_split(a3)
            bb[0, 0], b_s[0, 0] = mma.tf32_split(b0)
            bb[0, 1], b_s[0, 1] = mma.tf32_split(b1)
            cd[0, 0], cd[0, 1], cd[0, 2], cd[0, 3] = c0, c1, c2, c3
            MMA_3X(ab, a_s, 0, bb, b_s, cd, scratch)
            d0, d1, d2, d3 = cd[0, 0], cd[0, 1], cd[0, 2], cd[0, 3]
        else:
            d0, d1, d2, d3 = mma.mma_tf32(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, scratch)
        d[g, 2 * t], d[g, 2 * t + 1], d[g + 8, 2 * t], d[g + 8, 2 * t + 1] = d0, d1, d2, d3

    d = cuda.to_device(np.full((16, 8), np.nan, np.float32))
    mma_kernel[1, 32](*(cuda.to_device(np.ascontiguousarray(x)) for x in (a, b, c)), d, three)
    return d.copy_to_host()


def test_mma_tf32_is_a_times_b_plus_c_in_the_ptx_layout():
    """A distinct value in every cell: a lane reading or writing the wrong element cannot pass."""
    rng = np.random.default_rng(2)
    a = mma.tf32_round(rng.standard_normal((16, 8)).astype(np.float32))    # TF32 inputs: exact products
    b = mma.tf32_round(rng.standard_normal((8, 8)).astype(np.float32))
    c = rng.standard_normal((16, 8)).astype(np.float32)
    got = _run_mma(a, b, c)
    np.testing.assert_allclose(got, mma.mma_reference(a, b, c), rtol=1e-6, atol=1e-6)
    # and not the transpose or another permutation of the layout
    assert np.abs(got - mma.mma_reference(a, b.T.copy(), c)).max() > 0.1


def test_mma_3xtf32_keeps_fp32_accuracy_where_one_tf32_mma_does_not():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal((8, 8)).astype(np.float32)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    want = a.astype(np.float64) @ b + c
    err3 = np.abs(_run_mma(a, b, c, three=True) - want).max() / np.abs(want).max()
    assert err3 < 1e-6, err3
    if KERNEL == "cuda":        # the hardware reads only the TF32 bits of unrounded fp32: ~1e-3 error
        err1 = np.abs(_run_mma(a, b, c) - want).max() / np.abs(want).max()
        assert err1 > 10 * err3, (err1, err3)


def test_the_layout_gives_every_cell_one_owner():
    """Every cell of A, B and C has exactly one (operand, lane) owner."""
    for name, shape in (("A", (16, 8)), ("B", (8, 8)), ("C", (16, 8))):
        op, lane = mma.LAYOUT[name]
        assert len(set(zip(op.ravel(), lane.ravel()))) == np.prod(shape)


# ---- bf16 (m16n8k16), the prefill GEMM's MMA ------------------------------------------------------------------
def bf16_reference(x):
    """Round float32 to bf16 (8 significant bits), to nearest, ties to even, in float64 arithmetic."""
    x = np.asarray(x, np.float64)
    _, e = np.frexp(x)
    ulp = np.ldexp(1.0, e - 8)
    return (np.sign(x) * np.round(np.abs(x) / ulp) * ulp).astype(np.float32)     # np.round: ties to even


def test_bf16_rounding_matches_the_arithmetic_definition():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal(4096) * 10.0 ** rng.integers(-30, 30, 4096),
                        [0.0, -0.0, 1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -9]]).astype(np.float32)
    got = (mma.bf16_bits(x).astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(got, bf16_reference(x))
    assert got[-4] == np.float32(1.0) and got[-3] == np.float32(1 + 2 ** -6)      # ties go to the even neighbour
    assert np.isinf((mma.bf16_bits(np.float32(np.inf)).astype(np.uint32) << 16).view(np.float32))
    assert np.isnan((mma.bf16_bits(np.float32(np.nan)).astype(np.uint32) << 16).view(np.float32))


def _run_bf16_split(x, terms):
    split = mma.make_bf16_split(terms)

    @cuda.jit
    def split_kernel(x, out):
        i = cuda.grid(1)
        words = cuda.local.array(3, np.uint32)
        if i < x.shape[0] // 2:
            split(x[2 * i], x[2 * i + 1], words)
            for e in range(terms):
                out[e, i] = words[e]

    out = cuda.to_device(np.zeros((terms, x.size // 2), np.uint32))
    split_kernel[(x.size // 2 + 31) // 32, 32](cuda.to_device(x), out)
    w = out.copy_to_host()
    return np.stack([(w << 16).view(np.float32), (w & 0xFFFF0000).view(np.float32)], axis=2).reshape(terms, -1)


def test_bf16_split_terms_add_up_to_x():
    """Each word holds the pair (x[2i], x[2i+1]) low half first; term e rounds what the terms before left: the
    kernel's terms equal bf16_terms' (the NumPy statement of the rule), and T terms keep 8 T bits."""
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(64 if KERNEL == "sim" else 4096) * 10.0).astype(np.float32)
    terms = _run_bf16_split(x, 3)
    np.testing.assert_array_equal(terms, mma.bf16_terms(x, 3))
    for t, bound in ((1, 2.0 ** -8), (2, 2.0 ** -16), (3, 0.0)):
        rel = np.abs(terms[:t].astype(np.float64).sum(axis=0) - x) / np.abs(x)
        assert rel.max() <= bound, (t, rel.max())


def test_mma_bf16_is_a_times_b_plus_c_in_the_ptx_layout():
    """A [16, 16] and B [16, 8] of distinct bf16 values, packed into the lanes' words by the m16n8k16 layout: D
    equals A B + C (exact products, fp32 sums), and not with B transposed."""
    rng = np.random.default_rng(7)
    a = mma.bf16_terms(rng.standard_normal((16, 16)).astype(np.float32), 1)[0]
    b = mma.bf16_terms(rng.standard_normal((16, 8)).astype(np.float32), 1)[0]
    c = rng.standard_normal((16, 8)).astype(np.float32)
    bits = lambda m: mma.bf16_bits(m).astype(np.uint32)                   # noqa: E731
    a_words = bits(a)[:, 0::2] | bits(a)[:, 1::2] << 16                  # [16, 8]: (k 2j, 2j + 1) of a row
    bt_words = bits(b.T)[:, 0::2] | bits(b.T)[:, 1::2] << 16             # [8, 8]: W = B^T as stored, by words
    mma_1 = mma.make_mma_bf16_n(1)
    scratch_shape = mma.mma_scratch_shape(32, 1, bf16=True)

    @cuda.jit
    def mma_kernel(aw, bw, c, d):
        scratch = cuda.shared.array(scratch_shape, float32)
        lane = cuda.threadIdx.x
        g, t = lane >> 2, lane & 3
        af = cuda.local.array((1, 4), np.uint32)
        bf = cuda.local.array((1, 2), np.uint32)
        acc = cuda.local.array((1, 4), float32)
        af[0, 0], af[0, 1], af[0, 2], af[0, 3] = aw[g, t], aw[g + 8, t], aw[g, t + 4], aw[g + 8, t + 4]
        bf[0, 0], bf[0, 1] = bw[g, t], bw[g, t + 4]
        acc[0, 0], acc[0, 1], acc[0, 2], acc[0, 3] = c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t], c[g + 8, 2 * t + 1]
        mma_1(af, 0, bf, acc, 0, scratch)
        d[g, 2 * t], d[g, 2 * t + 1], d[g + 8, 2 * t], d[g + 8, 2 * t + 1] = acc[0, 0], acc[0, 1], acc[0, 2], acc[0, 3]

    d = cuda.to_device(np.full((16, 8), np.nan, np.float32))
    mma_kernel[1, 32](cuda.to_device(np.ascontiguousarray(a_words)), cuda.to_device(np.ascontiguousarray(bt_words)),
                      cuda.to_device(c), d)
    got = d.copy_to_host()
    np.testing.assert_allclose(got, a.astype(np.float64) @ b + c, rtol=1e-6, atol=1e-6)
    assert np.abs(got - (a.astype(np.float64) @ np.roll(b, 1, axis=0) + c)).max() > 0.1
