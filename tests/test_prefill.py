"""Prefill kernels (numbattn/kernels/prefill_*.py, through numbattn/prefill.py) against the fp64 NumPy reference.

Without a GPU these run in Numba's CUDA simulator (conftest.py) with tiny tiles, so lengths like 7, 17 and 33
cross several tiles and end in a ragged one. Tolerance: 1e-5 relative to the largest reference value (fp32
arithmetic over <= 64 keys lands near 1e-7; a wrong mask, a missed rescale or a lost tile is off by >1e-2).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numbattn
from numbattn import gpu, prefill, reference
from numbattn.backend import available_backends

RTOL = 1e-5
KERNEL = available_backends()[0]  # "sim" in CI, "cuda" with NUMBATTN_TEST_GPU=1 (conftest.py checks which)
VERSIONS = prefill.VERSIONS


def rand_qkv(rng, batch, n_heads, n_kv_heads, q_len, kv_len, d, dtype=np.float32, magnitude=1.0):
    q = rng.standard_normal((batch, n_heads, q_len, d)) * magnitude
    k = rng.standard_normal((batch, n_kv_heads, kv_len, d))
    v = rng.standard_normal((batch, n_kv_heads, kv_len, d))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def reference_fp64(q, k, v, causal, scale, window=None, softcap=None):
    """The fp64 oracle; at GPU-test sizes (32 heads × 8192²) it runs through torch on the GPU if present."""
    if causal and (window is not None or softcap is not None):
        return reference_fp64_blocks(q, k, v, scale, window, softcap)
    if softcap is not None:
        return reference.attention(*(x.astype(np.float64) for x in (q, k, v)), causal=causal, scale=scale,
                                   softcap=softcap)
    if q.shape[2] * k.shape[2] * q.shape[1] * q.shape[0] > 2**26:
        try:
            import torch
            t = [torch.from_numpy(x).to("cuda", torch.float64) for x in (q, k, v)]
            return torch.nn.functional.scaled_dot_product_attention(
                t[0], t[1], t[2], is_causal=False, scale=scale, enable_gqa=True,
                attn_mask=torch.from_numpy(reference.causal_mask(q.shape[2], k.shape[2])).cuda()
                if causal else None).cpu().numpy()
        except ImportError:
            pass
    return reference.attention(*(x.astype(np.float64) for x in (q, k, v)), causal=causal, scale=scale)


def reference_fp64_blocks(q, k, v, scale, window, softcap, rows=512):
    """The windowed / soft-capped causal oracle in blocks of query rows (each over the keys its window reaches),
    so that GPU-test sizes (32768 queries, window 4096) stay within memory."""
    q_len, kv_len = q.shape[2], k.shape[2]
    out = np.empty(q.shape, np.float64)
    for i0 in range(0, q_len, rows):
        i1 = min(q_len, i0 + rows)
        j1 = i1 + kv_len - q_len                               # keys up to the last row's diagonal
        j0 = 0 if window is None else max(0, i0 + kv_len - q_len - window + 1)
        out[:, :, i0:i1] = reference.attention(*(x.astype(np.float64) for x in (q[:, :, i0:i1], k[:, :, j0:j1],
                                                                                 v[:, :, j0:j1])),
                                               causal=True, scale=scale, window=window, softcap=softcap)
    return out


def check(q, k, v, causal=False, scale=None, version="v1", tiles=None, rtol=RTOL, window=None, softcap=None):
    """Run the kernel into a NaN-poisoned device buffer and compare with the fp64 reference."""
    from numba import cuda
    out = cuda.to_device(np.full(q.shape, np.nan, np.float32))  # an unwritten element stays NaN and fails
    got = prefill.flash_attention(cuda.to_device(q), cuda.to_device(k), cuda.to_device(v), causal=causal,
                                  scale=scale, backend=KERNEL, out=out, version=version, tiles=tiles, window=window,
                                  softcap=softcap)
    got = got.copy_to_host()
    want = reference_fp64(q, k, v, causal, scale, window, softcap)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.isfinite(got).all(), "kernel left unwritten (NaN) or non-finite outputs"
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < rtol, f"relative error {err:.2e} >= {rtol:.0e}"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("q_len,kv_len,causal", [
    (1, 1, False), (1, 7, True),                     # one token; one token over a cache (decode through prefill)
    (7, 7, True), (17, 17, True), (17, 33, True),    # ragged last tiles; causal with more keys than queries
    (33, 17, False), (7, 17, False),                 # non-causal, more queries than keys and fewer
])
def test_matches_reference_lengths(version, q_len, kv_len, causal):
    rng = np.random.default_rng(q_len * 100 + kv_len)
    check(*rand_qkv(rng, 1, 2, 1, q_len, kv_len, 16), causal=causal, version=version)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("n_heads,n_kv_heads", [(2, 2), (4, 1), (8, 1), (8, 2)])  # GQA ratios 1, 4, 8, 4
def test_grouped_query_heads(version, n_heads, n_kv_heads):
    rng = np.random.default_rng(n_heads * 10 + n_kv_heads)
    # the kv heads get very different values so reading the wrong one cannot pass
    q, k, v = rand_qkv(rng, 1, n_heads, n_kv_heads, 5, 9, 16)
    v += np.arange(n_kv_heads, dtype=np.float32)[None, :, None, None] * 10
    check(q, k, v, causal=True, version=version)


@pytest.mark.parametrize("version", VERSIONS)
def test_batch_head_dim_32_and_custom_scale(version):
    rng = np.random.default_rng(3)
    q, k, v = rand_qkv(rng, 2, 4, 2, 6, 11, 32)
    if version == "v3":     # 32 simulated threads a block: fewer heads keep it quick (GQA is tested above)
        q, k, v = (np.ascontiguousarray(x[:, :n]) for x, n in ((q, 2), (k, 1), (v, 1)))
    k[1] *= 3  # batches must not mix
    check(q, k, v, causal=True, scale=0.3, version=version)
    check(q, k, v, causal=False, scale=0.3, version=version)


@pytest.mark.parametrize("version", VERSIONS)
def test_large_logits_are_stable(version):
    """Scores around ±80: exp() overflows fp32 at 88, so only a correct running max keeps this finite."""
    rng = np.random.default_rng(4)
    q, k, v = rand_qkv(rng, 1, 2, 2, 9, 13, 16)
    q = (q / np.linalg.norm(q, axis=-1, keepdims=True) * 80).astype(np.float32)
    k = (k / np.linalg.norm(k, axis=-1, keepdims=True)).astype(np.float32)
    check(q, k, v, causal=True, scale=1.0, version=version)
    check(q, k, v, causal=False, scale=1.0, version=version)


@pytest.mark.parametrize("version", VERSIONS)
def test_float16_inputs_compute_in_fp32(version):
    rng = np.random.default_rng(5)
    q, k, v = rand_qkv(rng, 1, 2, 1, 6, 6, 16, dtype=np.float16)
    check(q, k, v, causal=True, version=version)  # the reference sees the same fp16-rounded values


@pytest.mark.parametrize("version,q_len,kv_len,causal", [("v1", 1, 1, False), ("v1", 17, 19, True), ("v1", 7, 17, False),
                                                        ("v3", 1, 1, False), ("v3", 17, 19, True)])
def test_log_sum_exp_of_each_row(version, q_len, kv_len, causal):
    """return_lse: the natural-log log-sum-exp of each row's scores (the backward's input), into a NaN-filled
    buffer, with the output unchanged; GQA 2:1 so a row reading the wrong KV head is off."""
    from numba import cuda
    rng = np.random.default_rng(q_len + kv_len)
    q, k, v = rand_qkv(rng, 1, 4, 2, q_len, kv_len, 16, magnitude=3.0)
    lse_out = cuda.to_device(np.full(q.shape[:3], np.nan, np.float32))
    out, lse = prefill.flash_attention(q, k, v, causal=causal, backend=KERNEL, version=version, return_lse=True,
                                       lse_out=lse_out)
    want = reference.log_sum_exp(reference.scores(q.astype(np.float64), k.astype(np.float64), causal))
    np.testing.assert_allclose(lse, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lse_out.copy_to_host(), lse)
    np.testing.assert_allclose(out, reference_fp64(q, k, v, causal, None), rtol=RTOL, atol=RTOL)
    out_np, lse_np = numbattn.attention(q, k, v, causal=causal, backend="numpy", return_lse=True)
    np.testing.assert_allclose(lse_np, want, rtol=1e-6)


@pytest.mark.parametrize("version,head_dim,tiles,variants", [
    ("v1", 16, None, ((3, None), (None, 2.0))), ("v3", 16, None, ((3, None), (5, 2.0))),
    ("v3", 32, prefill.Tiles(16, 8, 64, dim_split=2), ((5, 2.0),))])
def test_log_sum_exp_with_windows_soft_caps_and_split_heads(version, head_dim, tiles, variants):
    """The lse of the soft-capped, windowed scores (the backward of such a forward recomputes P from it), GQA 2:1:
    (window, softcap) variants, each kernel (plain and capped) once; v3 also with a head's dims split over 2 warps,
    where one warp of each row group writes it (a NaN-filled buffer shows a row nobody wrote, a wrong warp's partial l
    shows as a wrong value)."""
    from numba import cuda
    rng = np.random.default_rng(head_dim)
    q, k, v = rand_qkv(rng, 1, 2, 1, 19, 23, head_dim, magnitude=3.0)
    for window, softcap in variants:
        lse_out = cuda.to_device(np.full(q.shape[:3], np.nan, np.float32))
        out, lse = prefill.flash_attention(q, k, v, causal=True, backend=KERNEL, version=version, tiles=tiles,
                                           return_lse=True, lse_out=lse_out, window=window, softcap=softcap)
        s = reference.scores(q.astype(np.float64), k.astype(np.float64), True, None, window, softcap)
        np.testing.assert_allclose(lse, reference.log_sum_exp(s), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out, reference_fp64(q, k, v, True, None, window, softcap), rtol=RTOL, atol=RTOL)


def test_log_sum_exp_only_from_the_versions_that_write_it():
    q = np.zeros((1, 1, 2, 16), np.float32)
    with pytest.raises(ValueError, match=r"return_lse needs version in \('v1', 'v3'\), not 'v2'"):
        prefill.flash_attention(q, q, q, version="v2", return_lse=True)
    with pytest.raises(ValueError, match=r"lse_out has shape \(1, 1\) and dtype float32; expected \(1, 1, 2\)"):
        prefill.flash_attention(q, q, q, return_lse=True, lse_out=np.zeros((1, 1), np.float32))


def test_host_arrays_in_host_array_out():
    rng = np.random.default_rng(6)
    q, k, v = rand_qkv(rng, 1, 2, 1, 5, 5, 16)
    out = numbattn.attention(q, k, v, causal=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference.attention(q, k, v, causal=True), rtol=1e-5, atol=1e-6)


def test_tile_sizes_do_not_change_the_answer():
    rng = np.random.default_rng(7)
    q, k, v = rand_qkv(rng, 1, 1, 1, 11, 11, 16)
    for tiles in (prefill.Tiles(2, 8, 2), prefill.Tiles(8, 2, 8), prefill.Tiles(16, 16, 16)):
        check(q, k, v, causal=True, version="v1", tiles=tiles)
    # v2: several rows per thread (TM), several keys per thread (TN), row groups of 2, 4 and 8 threads
    for tiles in (prefill.Tiles(4, 8, 4), prefill.Tiles(8, 4, 8), prefill.Tiles(8, 8, 4), prefill.Tiles(2, 16, 16)):
        check(q, k, v, causal=True, version="v2", tiles=tiles)
    # v3: two warps (the second warp's rows start at 16), keys in two 8-key MMA blocks per tile
    check(q, k, v, causal=True, version="v3", tiles=prefill.Tiles(32, 16, 64))


@settings(max_examples=12, deadline=None)
@given(q_len=st.integers(1, 12), extra=st.integers(0, 9), group=st.sampled_from([1, 2, 4]),
       n_kv_heads=st.integers(1, 2), causal=st.booleans(), seed=st.integers(0, 2**16),
       version=st.sampled_from(VERSIONS))
def test_property_sweep(q_len, extra, group, n_kv_heads, causal, seed, version):
    rng = np.random.default_rng(seed)
    check(*rand_qkv(rng, 1, group * n_kv_heads, n_kv_heads, q_len, q_len + extra, 16), causal=causal,
          version=version)


# ---- sliding windows, soft caps, head_dim 128 and 256 ----
@pytest.mark.parametrize("version", VERSIONS)
def test_sliding_windows(version):
    """9 queries over 13 keys (a KV prefix of 4), windows of 1 (each query sees itself only), 3 (smaller than a key
    tile), a whole key tile (4 keys in v0-v2, 8 in v3), and 20 (longer than the sequence: plain causal)."""
    rng = np.random.default_rng(30)
    q, k, v = rand_qkv(rng, 1, 2, 1, 9, 13, 16)
    for window in (1, 3, SIM_TILES_N[version]):
        check(q, k, v, causal=True, version=version, window=window)
    out = cuda_out(q)
    prefill.flash_attention(q, k, v, causal=True, backend=KERNEL, version=version, window=20, out=out)
    np.testing.assert_allclose(out.copy_to_host(), reference_fp64(q, k, v, True, None), rtol=0, atol=RTOL)


SIM_TILES_N = {version: t.block_n for version, t in prefill.SIM_TILES.items()}


def cuda_out(q):
    from numba import cuda
    return cuda.to_device(np.full(q.shape, np.nan, np.float32))


@pytest.mark.parametrize("version", VERSIONS)
def test_soft_capped_scores_of_large_magnitude(version):
    """Scores up to ~±800 capped at 30 (Gemma 2 caps at 50): without the cap the softmax is one-hot, with it the
    weights spread, and a wrong cap (a slope, a sign, a missing log2 e) is off by far more than 1e-5."""
    rng = np.random.default_rng(31)
    q, k, v = rand_qkv(rng, 1, 2, 1, 7, 11, 16, magnitude=200.0)
    check(q, k, v, causal=True, version=version, softcap=30.0)
    check(q, k, v, causal=False, version=version, softcap=30.0, scale=0.01)     # small scores: tanh's linear part
    check(q, k, v, causal=True, version=version, softcap=30.0, window=3)


@pytest.mark.parametrize("version,tiles", [("v0", None), ("v1", None), ("v2", None),
                                           ("v3", prefill.Tiles(16, 8, 128, dim_split=4))])
def test_head_dim_256_gqa_4_to_1_one_kv_head(version, tiles):
    """Gemma's head_dim 256, 4 query heads on 1 KV head; v3 with the GPU's layout: 4 warps share 16 query rows, each
    holding 64 of their dims and summing the row group's partial scores through shared memory."""
    rng = np.random.default_rng(32)
    q, k, v = rand_qkv(rng, 1, 4, 1, 5, 11, 256)
    check(q, k, v, causal=True, version=version, tiles=tiles, window=4 if version == "v3" else None)


def test_head_dim_128_dims_split_over_two_warps():
    """v3 at head_dim 128 as the GPU runs it (2 warps a row group), with rows of two row groups in one block."""
    rng = np.random.default_rng(33)
    q, k, v = rand_qkv(rng, 1, 2, 1, 19, 23, 128)
    check(q, k, v, causal=True, version="v3", tiles=prefill.Tiles(32, 8, 128, dim_split=2), softcap=20.0)


@settings(max_examples=10, deadline=None)
@given(window=st.integers(1, 12), q_len=st.integers(1, 12), extra=st.integers(0, 6),
       head_dim=st.sampled_from([16, 32, 128]), seed=st.integers(0, 2**16), version=st.sampled_from(VERSIONS))
def test_property_sweep_windows(window, q_len, extra, head_dim, seed, version):
    rng = np.random.default_rng(seed)
    check(*rand_qkv(rng, 1, 2, 1, q_len, q_len + extra, head_dim), causal=True, version=version, window=window)


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_chunks_over_a_ring_buffer_that_wraps(version):
    """A window-3 layer in a ring of 6 slots (max_chunk 4): prompt chunks of 4, 3, 4 and 2 tokens, each appended and
    then attended over the cache (chunk_attention), the ring wrapping inside chunks; against the windowed causal
    attention over everything appended (never the cache's storage), into NaN-filled outputs."""
    from numba import cuda
    rng = np.random.default_rng(34)
    cache = numbattn.KVCache(1, 2, 1, 40, 16, backend=KERNEL, windows=3, max_chunk=4)
    q_all, k_all, v_all = rand_qkv(rng, 2, 2, 1, 13, 13, 16)
    n = 0
    for t in (4, 3, 4, 2):
        cache.append(0, k_all[:, :, n:n + t], v_all[:, :, n:n + t])
        n += t
        out = cuda.to_device(np.full((2, 2, t, 16), np.nan, np.float32))
        got = prefill.chunk_attention(cuda.to_device(q_all[:, :, n - t:n].copy()), cache, 0, out=out, version=version,
                                      softcap=8.0).copy_to_host()
        want = reference.attention(*(x.astype(np.float64) for x in (q_all[:, :, n - t:n], k_all[:, :, :n],
                                                                     v_all[:, :, :n])), causal=True, window=3,
                                   softcap=8.0)
        assert np.isfinite(got).all() and np.abs(got - want).max() / np.abs(want).max() < RTOL, (version, n)


def test_chunk_attention_over_full_and_host_layers():
    """A full layer's chunk equals attention over its prefix; the NumPy backend's ring gives the same answer."""
    rng = np.random.default_rng(35)
    q, k, v = rand_qkv(rng, 1, 2, 1, 9, 9, 16)
    for backend, windows in ((KERNEL, None), ("numpy", 4)):
        cache = numbattn.KVCache(1, 1, 1, 12, 16, backend=backend, windows=windows, max_chunk=5)
        cache.append(0, k[:, :, :4], v[:, :, :4])
        cache.append(0, k[:, :, 4:], v[:, :, 4:])
        got = prefill.chunk_attention(q[:, :, 4:], cache, 0)
        want = reference.attention(q[:, :, 4:], k, v, causal=True, window=windows)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"6 queries with a window of 4 need the last 9 tokens, more than layer 0's "
                                         r"ring holds \(8 slots\)"):
        prefill.chunk_attention(q[:, :, 3:], cache, 0)
    cache = numbattn.KVCache(1, 1, 1, 12, 16, backend="numpy")
    cache.append(0, k[:, :, :4], v[:, :, :4])
    with pytest.raises(ValueError, match=r"every row of layer 0 must hold the same number of tokens, at least q's 5"):
        prefill.chunk_attention(q[:, :, 4:], cache, 0)


def test_bad_dim_split_is_named():
    q = np.zeros((1, 1, 4, 128), np.float32)
    with pytest.raises(ValueError, match=r"dim_split=3: expected whole warps"):
        prefill.flash_attention(q, q, q, version="v3", tiles=prefill.Tiles(16, 8, 96, dim_split=3))
    with pytest.raises(ValueError, match=r"only v3 splits"):
        prefill.flash_attention(q, q, q, version="v2", tiles=prefill.Tiles(4, 4, 4, dim_split=2))


@pytest.mark.parametrize("bad,match", [
    (dict(q=np.zeros((2, 4, 16), np.float32)), r"q has shape \(2, 4, 16\); expected 4 dimensions"),
    (dict(k=np.zeros((1, 2, 5, 32), np.float32), v=np.zeros((1, 2, 5, 32), np.float32)),
     r"q has head_dim 16 .* k has head_dim 32"),
    (dict(q=np.zeros((1, 3, 5, 16), np.float32)), r"3 heads.*2.*multiple"),
    (dict(k=np.zeros((2, 2, 5, 16), np.float32), v=np.zeros((2, 2, 5, 16), np.float32)), r"batch 1 .* batch 2"),
    (dict(q=np.zeros((1, 2, 6, 16), np.float32)), r"causal.*q_len 6.*kv_len 5"),
    (dict(q=np.zeros((1, 2, 5, 16), np.float64)), r"q has dtype float64"),
    (dict(q=np.zeros((1, 2, 5, 24), np.float32), k=np.zeros((1, 2, 5, 24), np.float32),
          v=np.zeros((1, 2, 5, 24), np.float32)), r"head_dim 24"),
    (dict(v=np.zeros((1, 2, 4, 16), np.float32)), r"k has shape .* but v has"),
    (dict(scale=float("nan")), r"scale=nan"),
    (dict(scale=1e300), r"scale=1e\+300 must be a finite number of magnitude <= 2\.359e\+38"),  # inf in float32
    (dict(scale=1e39), r"scale=1e\+39 must be a finite number"),         # inf in float32 already
    (dict(scale=-2.4e38), r"scale=-2\.4e\+38 must be a finite number"),  # finite in float32, inf times log2(e)
    (dict(scale="big"), r"scale='big' must be a number"),
    (dict(q=np.zeros((1, 2, 5, 16)).tolist()), r"q is a list; expected a NumPy array or a Numba device array"),
    (dict(k=(1, 2)), r"k is a tuple; expected a NumPy array"),
    (dict(window=0), r"window=0 must be >= 1"),
    (dict(window=2.5), r"window=2.5 must be an integer"),
    (dict(window=3, causal=False), r"window=3 needs causal=True"),
    (dict(softcap=0.0), r"softcap=0.0 must be a finite number > 0"),
    (dict(softcap=float("nan")), r"softcap=nan must be a finite number > 0"),
    (dict(softcap="x"), r"softcap='x' must be a number"),
])
def test_validation_errors_name_the_argument(bad, match):
    args = dict(q=np.zeros((1, 2, 5, 16), np.float32), k=np.zeros((1, 2, 5, 16), np.float32),
                v=np.zeros((1, 2, 5, 16), np.float32), causal=True)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        numbattn.attention(**args)


def test_scale_is_checked_as_the_kernels_use_it():
    """The kernels multiply scores by float32(scale * log2(e)): the largest scale allowed stays finite there.
    (A scale that large still makes q.k * scale overflow for |q.k| > 1: NaN rows, as in the NumPy reference.)"""
    from numbattn.validate import LOG2E, MAX_SCALE, check_scale
    assert np.isfinite(np.float32(MAX_SCALE * LOG2E)) and check_scale(-MAX_SCALE, 16) == -MAX_SCALE
    assert check_scale(None, 64) == 0.125 and check_scale(np.float32(0.5), 16) == 0.5
    q = np.full((1, 1, 3, 16), 0.01, np.float32)
    out = numbattn.attention(q, q, q, scale=MAX_SCALE, backend=KERNEL)
    np.testing.assert_allclose(out, reference.attention(q, q, q, scale=MAX_SCALE), rtol=1e-6)


def test_unknown_backend_and_version_rejected():
    q = np.zeros((1, 1, 2, 16), np.float32)
    with pytest.raises(ValueError, match="backend='tpu'"):
        numbattn.attention(q, q, q, backend="tpu")
    with pytest.raises(ValueError, match="version='v9'"):
        prefill.flash_attention(q, q, q, version="v9")


def test_big_tiles_only_where_the_static_shared_memory_probe_passes(monkeypatch):
    """gpu_tiles: the > 48 KB tiles need sm_90+ AND a probe kernel that really ran; else the <= 48 KB ones."""
    from numbattn.kernels import prefill_registers
    small = prefill.gpu_tiles("v2", 64, cc=(8, 0))
    big = prefill.gpu_tiles("v2", 64, cc=(9, 0))
    assert prefill_registers.shared_bytes(small.block_m, small.block_n, 64) <= 48 * 1024 < \
        prefill_registers.shared_bytes(big.block_m, big.block_n, 64)
    for cc, probe_ok, want in [((9, 0), True, big), ((9, 0), False, small), ((8, 6), True, small)]:
        monkeypatch.setattr(gpu, "compute_capability", lambda cc=cc: cc)
        monkeypatch.setattr(gpu, "static_shared_over_48k", lambda ok=probe_ok: ok)
        assert prefill.gpu_tiles("v2", 64) == want, (cc, probe_ok)


def test_v3_tiles_fit_every_gpu_and_need_tf32_tensor_cores(monkeypatch):
    """v3's GPU tiles stay under 48 KB of static shared memory (no probe needed); before sm_80 (no TF32 MMA) a v3
    launch runs v2 instead."""
    from numbattn.kernels import prefill_mma
    for cc in ((8, 0), (9, 0)):
        for d in (64, 128):
            t = prefill.gpu_tiles("v3", d, cc=cc)
            assert prefill_mma.shared_bytes(t.block_m, t.block_n, d) <= 48 * 1024, (cc, d, t)
    for cc, ok in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(gpu, "compute_capability", lambda cc=cc: cc)
        assert gpu.has_tf32_mma.__wrapped__() is ok


def test_static_shared_memory_probe_kernel_runs():
    """The probe is a real kernel (here in the simulator, which has no 48 KB limit): it must report success."""
    assert gpu.static_shared_over_48k.__wrapped__() is (KERNEL == "sim" or gpu.compute_capability() >= (9, 0))


# ---- real GPU only: realistic sizes (run with NUMBATTN_TEST_GPU=1 on a CUDA machine) ----
@pytest.mark.gpu
@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
@pytest.mark.parametrize("batch,n,d", [(1, 4096, 64), (1, 8192, 64), (4, 1000, 128), (8, 513, 64),
                                       (16, 257, 64), (2, 777, 256)])
def test_gpu_realistic_shapes(version, batch, n, d):
    rng = np.random.default_rng(n + d)
    q, k, v = rand_qkv(rng, batch, 32, 4, n, n, d)  # TinyLlama's 32 query / 4 KV heads
    check(q, k, v, causal=True, version=version, tiles=prefill.gpu_tiles(version, d), rtol=1e-4 if n > 4096 else RTOL)
    if n <= 1024:
        check(q, k, v, causal=False, version=version, tiles=prefill.gpu_tiles(version, d))


@pytest.mark.gpu
@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_pre_hopper_tiles(version, d):
    """The tiles chosen for GPUs older than sm_90 (48 KB of static shared memory) are correct too."""
    rng = np.random.default_rng(d)
    q, k, v = rand_qkv(rng, 2, 32, 4, 300, 777, d)
    check(q, k, v, causal=True, version=version, tiles=prefill.gpu_tiles(version, d, cc=(8, 0)))


@pytest.mark.gpu
def test_gpu_v2_shared_memory_reduction_twin():
    """On the GPU v2 reduces rows with warp shuffles; its shared-memory twin (the simulator's) must agree."""
    from numba import cuda
    from numbattn.kernels.prefill_registers import make_v2
    rng = np.random.default_rng(11)
    q, k, v = rand_qkv(rng, 2, 32, 4, 777, 1000, 64)
    t = prefill.gpu_tiles("v2", 64)
    kernel = make_v2(64, t.block_m, t.block_n, t.threads, reduce="shared")
    out = cuda.to_device(np.full(q.shape, np.nan, np.float32))
    grid = ((q.shape[2] + t.block_m - 1) // t.block_m, 32, 2)
    kernel[grid, t.threads](cuda.to_device(q), cuda.to_device(k), cuda.to_device(v), out,
                            np.float32(0.125 * prefill.LOG2E), True, np.int64(1000), np.int64(1000), np.float32(0))
    want = reference_fp64(q, k, v, True, 0.125)
    got = out.copy_to_host()
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() / np.abs(want).max() < RTOL


@pytest.mark.gpu
@pytest.mark.parametrize("d,n_heads,n_kv_heads,n,window,softcap", [
    (128, 16, 8, 2048, None, None),       # Qwen3's head_dim 128
    (256, 8, 4, 2048, None, 50.0),        # Gemma 2: head_dim 256, logits capped at 50
    (256, 4, 1, 4096, 512, None),         # Gemma 3 1B: 4 heads on 1 KV head, window 512
    (64, 32, 4, 8192, 4096, None),        # window 4096 over twice its length
    (128, 32, 8, 4096, 4096, None),       # Mistral's window = n: plain causal
])
def test_gpu_model_family_shapes(d, n_heads, n_kv_heads, n, window, softcap):
    rng = np.random.default_rng(d + n)
    q, k, v = rand_qkv(rng, 1, n_heads, n_kv_heads, n, n, d, magnitude=4.0 if softcap else 1.0)
    check(q, k, v, causal=True, version="v3", tiles=prefill.gpu_tiles("v3", d), window=window, softcap=softcap,
          rtol=1e-4 if n > 4096 else RTOL)


@pytest.mark.gpu
def test_gpu_chunks_over_a_ring_buffer():
    """Gemma 3's window layer on the GPU: window 512, prompt chunks of 2048 (the device engine's), a ring of 2559
    slots wrapping inside every chunk, fp16 cache, head_dim 256, 4 heads on 1 KV head; then decode steps."""
    from numba import cuda
    rng = np.random.default_rng(36)
    cache = numbattn.KVCache(1, 1, 1, 8192, 256, dtype=np.float16, backend=KERNEL, windows=512, max_chunk=2048)
    q, k, v = rand_qkv(rng, 1, 4, 1, 6244, 6244, 256)
    k16, v16 = (x.astype(np.float16) for x in (k, v))
    n = 0
    for t in (2048, 2048, 2048, 100):
        cache.append(0, k16[:, :, n:n + t], v16[:, :, n:n + t])
        n += t
        got = prefill.chunk_attention(cuda.to_device(q[:, :, n - t:n].copy()), cache, 0).copy_to_host()
        want = reference_fp64_blocks(q[:, :, n - t:n], k16[:, :, :n], v16[:, :, :n], None, 512, None)
        assert np.abs(got - want).max() / np.abs(want).max() < RTOL, n
