"""The attention backward (numbattn/backward.py, kernels/backward_*.py) and its NumPy reference.

The reference (numbattn.reference.attention_backward, the equations) is checked against finite differences in
fp64; the kernels against the reference in fp64, into NaN-filled gradient buffers, on shapes chosen to break wrong
code: lengths off the tile multiples (the simulator's tiles are 4 or 16 rows), one token, GQA 1/4/8 (dK and dV
summed over a group), causal with more keys than queries, rows that see no key; sliding windows of 1, smaller than
a tile and larger than the sequence, soft caps with saturated scores. Tolerance: 1e-5 relative to the largest
reference value (fp32 over <= 64 keys lands near 1e-7; a missed mask, a wrong lse or D is off by >1e-3).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numbattn
from gradients import numerical_gradient
from numbattn import backward, reference
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
@pytest.mark.parametrize("n_heads,n_kv_heads,q_len,kv_len,causal,window,softcap", [
    (2, 2, 3, 3, True, None, None), (4, 1, 2, 5, True, None, None), (2, 1, 4, 3, False, None, None),
    (8, 1, 1, 2, False, None, None),
    (4, 2, 4, 6, True, 2, None), (2, 1, 5, 5, True, 1, None),                 # sliding windows (1: itself only)
    (4, 2, 3, 5, False, None, 1.5), (2, 1, 4, 6, True, 3, 0.8)])              # soft caps, saturated (|s| >> cap)
def test_reference_equals_finite_differences(n_heads, n_kv_heads, q_len, kv_len, causal, window, softcap):
    """L = sum(dout * attention(q, k, v)): the reference's gradients are dL/dq, dL/dk, dL/dv (GQA: k and v feed
    several heads, so their gradients are sums), to 1e-7 in fp64; with windows and soft caps (the cap's derivative,
    and masked pairs contributing nothing)."""
    rng = np.random.default_rng(n_heads + q_len * 10 + kv_len)
    q, k, v, dout = (x.astype(np.float64) for x in rand_qkv(rng, 1, n_heads, n_kv_heads, q_len, kv_len, 4))
    q *= 1.0 if softcap is None else 3.0
    scale = 0.7

    def loss():
        return float((dout * reference.attention(q, k, v, causal=causal, scale=scale, window=window,
                                                 softcap=softcap)).sum())
    got = reference.attention_backward(q, k, v, dout, causal=causal, scale=scale, window=window, softcap=softcap)
    for name, x, g in zip("qkv", (q, k, v), got):
        assert g.shape == x.shape and g.dtype == np.float64
        np.testing.assert_allclose(g, numerical_gradient(loss, x), rtol=1e-6, atol=1e-8, err_msg=f"d{name}")


def test_log_sum_exp_of_empty_rows_is_minus_infinity():
    s = np.array([[0.0, 1.0, -np.inf], [-np.inf, -np.inf, -np.inf]])
    np.testing.assert_allclose(reference.log_sum_exp(s), [np.log(1 + np.e), -np.inf])
    assert reference.softmax_lse(np.float32(-np.inf), np.float32(0)) == -np.inf
    assert reference.softmax_lse(np.float32(3.0), np.float32(2.0)) == np.float32(4.0 * reference.LN2)


# ---- the kernels against the reference -------------------------------------------------------------------
def forward_fp64(q, k, v, causal, scale, window=None, softcap=None):
    """The forward's out and lse, from the fp64 reference rounded to float32: the backward's inputs, exact."""
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    out = reference.attention(q64, k64, v.astype(np.float64), causal=causal, scale=scale, window=window,
                              softcap=softcap)
    lse = reference.log_sum_exp(reference.scores(q64, k64, causal, scale, window, softcap))
    return out.astype(np.float32), lse.astype(np.float32)


def reference_fp64(q, k, v, dout, causal, scale, window=None, softcap=None):
    """The fp64 gradients; at GPU-test sizes one KV head's group at a time (the N×N matrices of 8 heads at 4096²
    are 1 GB in fp64)."""
    n_kv = k.shape[1]
    group = q.shape[1] // n_kv
    parts = [reference.attention_backward(*(x.astype(np.float64) for x in (q[:, i * group:(i + 1) * group],
                                                                          k[:, i:i + 1], v[:, i:i + 1],
                                                                          dout[:, i * group:(i + 1) * group])),
                                          causal=causal, scale=scale, window=window, softcap=softcap)
             for i in range(n_kv)]
    return tuple(np.concatenate([p[n] for p in parts], axis=1) for n in range(3))


def relative_error(got, want, floor=1.0):
    """max |got - want| over max |want|, floored at `floor`: a gradient that is ~0 (one key: P = 1 whatever q is) is
    compared absolutely."""
    return np.abs(got - want).max() / max(np.abs(want).max(), floor)


def check(q, k, v, dout, causal=False, scale=None, version="v3", tiles=None, rtol=RTOL, out_lse=None, window=None,
          softcap=None, floor=1.0):
    """Run the backward into NaN-filled gradient buffers and compare with the fp64 reference -> (dq, dk, dv) on the
    host."""
    from numba import cuda
    out, lse = out_lse or forward_fp64(q, k, v, causal, scale, window, softcap)
    grads = tuple(cuda.to_device(np.full(x.shape, np.nan, np.float32)) for x in (q, k, v))
    got = backward.attention_backward(*(cuda.to_device(x) for x in (q, k, v, out, lse, dout)), causal=causal,
                                      scale=scale, backend=KERNEL, version=version, tiles=tiles, grads=grads,
                                      window=window, softcap=softcap)
    want = reference_fp64(q, k, v, dout, causal, scale, window, softcap)
    got = tuple(g.copy_to_host() for g in got)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.dtype == np.float32 and g.shape == w.shape
        assert np.isfinite(g).all(), f"{name}: the kernels left unwritten (NaN) or non-finite gradients"
        err = relative_error(g, w, floor)
        assert err < rtol, f"{name}: relative error {err:.2e} >= {rtol:.0e}"
    return got


# The simulator's tiles: v1 4 rows and 4 keys; v3 dkdv 16 keys a block over query tiles of 8, dq 16 rows a block over
# key tiles of 8. A v3 case costs ~4x a v1 case in the simulator, so v3 gets the shapes that cross its tiles.
LENGTHS = [(1, 7, True),                            # one token over a cache
           (9, 20, True),                            # ragged last tiles; causal with more keys than queries
           (20, 9, False)]                           # non-causal, more queries than keys (two dq blocks in v3)
LENGTHS_V1 = [(1, 1, False), (7, 7, True), (5, 17, False)]   # one token, one key; square causal; a last key tile
                                                             # of one key


@pytest.mark.parametrize("version,q_len,kv_len,causal", [("v1", *s) for s in LENGTHS + LENGTHS_V1] +
                         [("v3", *s) for s in LENGTHS])
def test_matches_reference_lengths(version, q_len, kv_len, causal):
    rng = np.random.default_rng(q_len * 100 + kv_len)
    check(*rand_qkv(rng, 1, 2, 1, q_len, kv_len, 16), causal=causal, version=version)


@pytest.mark.parametrize("version,n_heads,n_kv_heads", [
    ("v1", 2, 2), ("v1", 8, 1), ("v1", 8, 2),                          # GQA ratios 1, 8, 4
    ("v3", 8, 2)])                                                      # (v3: slower in the simulator)
def test_grouped_query_heads_sum_into_their_kv_head(version, n_heads, n_kv_heads):
    """dK, dV of a KV head are the sums over its query heads; the KV heads differ a lot, so a head that reads (or
    adds into) the wrong one cannot pass."""
    rng = np.random.default_rng(n_heads * 10 + n_kv_heads)
    q, k, v, dout = rand_qkv(rng, 1, n_heads, n_kv_heads, 5, 7, 16)
    k += np.arange(n_kv_heads, dtype=np.float32)[None, :, None, None]
    v += np.arange(n_kv_heads, dtype=np.float32)[None, :, None, None] * 10
    check(q, k, v, dout, causal=True, version=version)


@pytest.mark.parametrize("version", backward.VERSIONS)
def test_batch_head_dim_32_custom_scale_and_large_logits(version):
    """Batches must not mix; scores of ±40 (exp overflows fp32 at 88: only a right lse keeps P finite)."""
    rng = np.random.default_rng(3)
    q, k, v, dout = rand_qkv(rng, 2, 1, 1, 6, 11 if version == "v1" else 7, 32)
    k[1] *= 3
    check(q, k, v, dout, causal=True, scale=0.3, version=version)
    q = (q / np.linalg.norm(q, axis=-1, keepdims=True) * 40).astype(np.float32)
    k = (k / np.linalg.norm(k, axis=-1, keepdims=True)).astype(np.float32)
    check(q, k, v, dout, causal=False, scale=1.0, version=version)


def test_float16_inputs_compute_in_fp32():
    """q, k, v, dout in fp16 (out and lse are the forward's, fp32): read as fp32, the reference sees the same values."""
    rng = np.random.default_rng(5)
    q, k, v, dout = (x.astype(np.float16) for x in rand_qkv(rng, 1, 2, 1, 6, 6, 16))
    check(q, k, v, dout, causal=True, version="v1")


def test_v3_tiles_of_two_warps_and_several_column_blocks():
    """v3 with two warps (the second owns rows/keys 16..31) and tiles of 16 (two 8-column blocks per fragment row)."""
    rng = np.random.default_rng(7)
    tiles = backward.BackwardTiles(backward.Tiles(16, 32, 64), backward.Tiles(32, 16, 64))
    check(*rand_qkv(rng, 1, 1, 1, 21, 37, 16), causal=True, version="v3", tiles=tiles)


# ---- sliding windows and soft caps -------------------------------------------------------------------------
@pytest.mark.parametrize("version", backward.VERSIONS)
def test_sliding_windows(version):
    """9 queries over 13 keys (a KV prefix of 4), 2 query heads on 1 KV head: windows of 1 (each query sees itself
    only: dQ = dK = 0, and key j's dV is the dO of the query at its position), 3 (smaller than a tile: masked inside
    tiles, tiles before a block's windows skipped) and 40 (larger than the sequence: the causal gradients). v3: the
    window of 1 here, one smaller than its tiles below (the window's clamp is common.visible_keys', v1 shows it)."""
    rng = np.random.default_rng(21)
    q, k, v, dout = rand_qkv(rng, 1, 2, 1, 9, 13, 16)
    for window in (1, 3, 40) if version == "v1" else (1,):
        check(q, k, v, dout, causal=True, version=version, window=window)


def test_sliding_window_across_v3_tiles():
    """v3 at 33 tokens, window 5: the simulator's v3 tiles (dkdv: 16 keys a block, query tiles of 8; dq: 16 rows,
    key tiles of 8) now lie wholly outside some windows (skipped), cross a window's start, or see every pair."""
    rng = np.random.default_rng(22)
    check(*rand_qkv(rng, 1, 1, 1, 33, 33, 16), causal=True, version="v3", window=5)


@pytest.mark.parametrize("version", backward.VERSIONS)
def test_soft_capped_scores_of_large_magnitude(version):
    """Scores of up to ~10 caps, GQA 2:1: p from the capped score, dS times the cap's slope (with a window: head_dim
    256 and the finite differences below). Then
    every pair saturated (q along the keys' common direction: |s| ~ 6 caps, slopes ~1e-5): dQ and dK come from the
    slopes alone and are compared against their own small maximum (not floored at 1). A slope taken as
    1 - (capped / cap)^2 in fp32 is 7e-3 off there (its absolute error ~1e-7 is all of it); common.soft_cap_slope's
    4 E / (1 + E)^2 is ~1e-6 off."""
    rng = np.random.default_rng(23)
    q, k, v, dout = rand_qkv(rng, 1, 2, 1, 9, 13, 16, magnitude=8.0)
    check(q, k, v, dout, causal=False, version=version, softcap=5.0)
    direction = rng.standard_normal(16)
    direction /= np.linalg.norm(direction)
    q = (direction * 24 + 0.3 * rng.standard_normal((1, 2, 9, 16))).astype(np.float32)
    k = (direction * 2 + 0.3 * rng.standard_normal((1, 1, 13, 16))).astype(np.float32)
    check(q, k, v, dout, causal=False, version=version, softcap=2.0, floor=0.0)


@pytest.mark.parametrize("version", backward.VERSIONS)
def test_head_dim_256_with_a_window_and_a_soft_cap(version):
    """Gemma 2's head_dim 256 with its window and cap (small), one head (GQA is checked at head_dim 16): 32
    output blocks a lane in v3's fragments, 256-dim rows in v1's registers."""
    rng = np.random.default_rng(25)
    check(*rand_qkv(rng, 1, 1, 1, 5, 7, 256, magnitude=2.0), causal=True, version=version, window=3, softcap=5.0)


@pytest.mark.skipif(KERNEL != "sim", reason="counting reads needs the simulator (numbattn.lab.tracing)")
def test_windowed_backward_skips_the_tiles_outside_every_window():
    """The window skips tiles in the backward as in the forward (common.visible_keys), counted in the simulator on
    the v1 kernels (tiles of 4, 32 tokens, window 2): dkdv reads Q only for the (key block, query tile) pairs in
    which some pair is visible, dq reads K only from the key tiles its rows' windows reach (from the first row's
    window start, which need not be a tile boundary); fewer than half as many as without the window."""
    from numbattn.lab import tracing
    rng = np.random.default_rng(24)
    n, d, window = 32, 16, 2
    q, k, v, dout = rand_qkv(rng, 1, 1, 1, n, n, d)
    out, lse = forward_fp64(q, k, v, True, None, window)
    delta = (out * dout).sum(-1).astype(np.float32)
    tiles = backward.SIM_TILES["v1"]
    BN, BM = tiles.dkdv.block_n, tiles.dq.block_m
    seen = reference.visible(n, n, True, window)                                # [q_len, kv_len]
    counted = {}
    for w in (window, n):
        dkdv, dq = backward.make_kernels("v1", d, tiles)
        scalars = (np.float32(0.25 * reference.LOG2E), np.float32(0.25), True, np.int64(w), np.float32(0))
        arrays = dict(q=q, k=k, v=v, dout=dout, lse=lse, delta=delta)
        t1, t2 = tracing.Tracer(), tracing.Tracer()
        dkdv[(n // BN, 1, 1), BN](*t1.wrap(**arrays, dk=np.zeros_like(k), dv=np.zeros_like(v)), *scalars)
        dq[(n // BM, 1, 1), BM](*t2.wrap(**arrays, dq=np.zeros_like(q)), *scalars)
        counted[w] = t1.reads("q"), t2.reads("k")
    pairs = [(j0, i0) for j0 in range(0, n, BN) for i0 in range(0, n, BM) if seen[i0:i0 + BM, j0:j0 + BN].any()]
    q_reads = len(pairs) * BM * d
    # dq: each block walks key tiles of BN from its first row's window start to its last row's diagonal
    ranges = [(int(np.argmax(seen[i0])), i0 + BM) for i0 in range(0, n, BM)]
    k_reads = d * sum(min(BN, n - j0) for first, end in ranges for j0 in range(first, end, BN))
    assert counted[window] == (q_reads, k_reads), (counted, q_reads, k_reads)
    assert counted[window][0] * 2 < counted[n][0] and counted[window][1] * 2 < counted[n][1], counted


@pytest.mark.parametrize("version,window,softcap", [("v1", None, None), ("v3", 3, 4.0)])
def test_forward_kernel_to_backward_kernel_and_finite_differences(version, window, softcap):
    """The whole path on the kernels (the forward's out and lse, then the backward), and the kernels' gradients
    against a finite difference of the fp64 loss along a random direction: L(x + e u) - L(x - e u) = 2 e <dL/dx, u>;
    plain, and with a sliding window and a soft cap (the forward's lse is then of the capped, windowed scores).
    (tests/test_train.py runs v3's plain path through both kernels too.)"""
    rng = np.random.default_rng(11)
    q, k, v, dout = rand_qkv(rng, 1, 2, 1, 9, 12, 16, magnitude=1.0 if softcap is None else 4.0)
    out, lse = numbattn.attention(q, k, v, causal=True, backend=KERNEL, return_lse=True, window=window,
                                  softcap=softcap)
    grads = check(q, k, v, dout, causal=True, version=version, out_lse=(out, lse), window=window, softcap=softcap)
    x64 = [x.astype(np.float64) for x in (q, k, v)]
    for i, g in enumerate(grads):
        u = rng.standard_normal(g.shape)

        def loss(e):
            xs = [x + e * u if n == i else x for n, x in enumerate(x64)]
            return (dout * reference.attention(*xs, causal=True, window=window, softcap=softcap)).sum()
        fd = (loss(1e-5) - loss(-1e-5)) / 2e-5
        assert abs(fd - (g * u).sum()) < 1e-5 * max(1.0, abs(fd)), ("qkv"[i], fd, (g * u).sum())


@settings(max_examples=5, deadline=None)
@given(q_len=st.integers(1, 12), extra=st.integers(0, 9), heads=st.sampled_from([(1, 1), (2, 1), (4, 1), (2, 2)]),
       causal=st.booleans(), seed=st.integers(0, 2**16), version=st.sampled_from(backward.VERSIONS),
       window=st.none() | st.integers(1, 12), softcap=st.sampled_from([None, 3.0]))
def test_property_sweep(q_len, extra, heads, causal, seed, version, window, softcap):
    rng = np.random.default_rng(seed)
    check(*rand_qkv(rng, 1, *heads, q_len, q_len + extra, 16), causal=causal, version=version,
          window=window if causal else None, softcap=softcap)


def test_host_arrays_and_the_numpy_backend():
    """Host arrays in, host float32 gradients out; the NumPy backend answers with the reference's equations (with
    the window and the soft cap passed through to them)."""
    rng, window, softcap = np.random.default_rng(6), 2, 3.0
    q, k, v, dout = rand_qkv(rng, 1, 2, 1, 5, 5, 16)
    out, lse = numbattn.attention(q, k, v, causal=True, backend="numpy", return_lse=True, window=window,
                                  softcap=softcap)
    want = reference.attention_backward(q, k, v, dout, causal=True, window=window, softcap=softcap)
    for be in ("numpy", KERNEL):
        got = numbattn.attention_backward(q, k, v, out, lse, dout, causal=True, backend=be, window=window,
                                          softcap=softcap)
        for g, w in zip(got, want):
            assert isinstance(g, np.ndarray) and g.dtype == np.float32
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (dict(q=np.zeros((1, 3, 5, 16), np.float32), k=np.zeros((1, 2, 5, 16), np.float32),
          v=np.zeros((1, 2, 5, 16), np.float32)), r"3 heads.*2.*multiple"),
    (dict(out=np.zeros((1, 2, 4, 16), np.float32)), r"out has shape \(1, 2, 4, 16\); expected q's shape"),
    (dict(dout=np.zeros((1, 2, 5, 16), np.float64)), r"dout has dtype float64"),
    (dict(dout=[1.0]), r"dout is a list; expected a NumPy array"),
    (dict(lse=np.zeros((1, 2, 5, 1), np.float32)), r"lse has shape \(1, 2, 5, 1\); expected 3 dimensions"),
    (dict(lse=np.zeros((1, 2, 4), np.float32)), r"lse has shape \(1, 2, 4\) and dtype float32; expected \(1, 2, 5\)"),
    (dict(lse=np.zeros((1, 2, 5), np.float16)), r"lse has shape \(1, 2, 5\) and dtype float16"),
    (dict(causal=True, q=np.zeros((1, 2, 6, 16), np.float32), out=np.zeros((1, 2, 6, 16), np.float32),
          dout=np.zeros((1, 2, 6, 16), np.float32), lse=np.zeros((1, 2, 6), np.float32)), r"causal.*q_len 6"),
    (dict(scale=float("inf")), r"scale=inf"),
    (dict(version="v2"), r"version='v2': expected one of \('v1', 'v3'\)"),
    (dict(grads=(np.zeros((1, 2, 5, 16), np.float32),) * 3), r"grads' dk has shape \(1, 2, 5, 16\)"),
    (dict(window=2), r"window=2 needs causal=True"),
    (dict(causal=True, window=0), r"window=0 must be >= 1"),
    (dict(causal=True, window=2.5), r"window=2.5 must be an integer"),
    (dict(softcap=-1.0), r"softcap=-1.0 must be a finite number > 0"),
    (dict(softcap=float("nan")), r"softcap=nan must be a finite number > 0"),
])
def test_validation_errors_name_the_argument(bad, match):
    z = np.zeros((1, 2, 5, 16), np.float32)
    args = dict(q=z, k=np.zeros((1, 1, 5, 16), np.float32), v=np.zeros((1, 1, 5, 16), np.float32), out=z,
                lse=np.zeros((1, 2, 5), np.float32), dout=z, causal=False, backend=KERNEL)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        numbattn.attention_backward(**args)


# ---- real GPU only: realistic sizes (run with NUMBATTN_TEST_GPU=1 on a CUDA machine) ----
@pytest.mark.gpu
@pytest.mark.parametrize("version", backward.VERSIONS)
@pytest.mark.parametrize("batch,n,d,causal", [(1, 2048, 64, True), (1, 2048, 64, False), (2, 1000, 128, True),
                                              (4, 513, 64, True), (1, 4096, 64, True)])
def test_gpu_realistic_shapes(version, batch, n, d, causal):
    """TinyLlama's 32 query / 4 KV heads; out and lse from the kernels' own forward (v3), as training runs it."""
    rng = np.random.default_rng(n + d)
    q, k, v, dout = rand_qkv(rng, batch, 32, 4, n, n, d)
    out, lse = numbattn.attention(q, k, v, causal=causal, backend=KERNEL, return_lse=True)
    check(q, k, v, dout, causal=causal, version=version, tiles=backward.gpu_tiles(version, d), out_lse=(out, lse))


@pytest.mark.gpu
@pytest.mark.parametrize("version", backward.VERSIONS)
@pytest.mark.parametrize("n,d,window,softcap", [(4096, 64, 1024, None), (2048, 64, None, 30.0),
                                                (2048, 128, 512, 50.0), (1024, 256, 256, 50.0)])
def test_gpu_windows_and_soft_caps(version, n, d, window, softcap):
    """Mistral-style windows and Gemma-style soft caps at realistic sizes, 32 / 4 heads, scores large enough that the
    cap bites (q scaled by 4); out and lse from the kernels' own windowed, capped forward. Head_dim 256 (Gemma 2):
    v3 where more than 48 KB of static shared memory is allowed, else v1 (backward.v3_runs_here)."""
    rng = np.random.default_rng(n + d + (window or 0))
    q, k, v, dout = rand_qkv(rng, 1, 32, 4, n, n, d, magnitude=4.0)
    out, lse = numbattn.attention(q, k, v, causal=True, backend=KERNEL, return_lse=True, window=window,
                                  softcap=softcap)
    check(q, k, v, dout, causal=True, version=version, tiles=backward.gpu_tiles(version, d), out_lse=(out, lse),
          window=window, softcap=softcap, rtol=3e-5)        # H100: dq 1.15e-5 (2048 x 128), 1.78e-5 (1024 x 256)
