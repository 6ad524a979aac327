"""Decode attention (numbattn/decode.py: v0 simple; v1 and v2 split-K with a last-block merge, lanes across dims
or across keys) against the fp64 reference.

Without a GPU these run in Numba's CUDA simulator (conftest.py) with tiny splits (4 or 8 keys) and key slots
(2 to 4 per block), so lengths like 31 and 100 cross many splits, end in a ragged split, and leave slots empty.

Tolerance: 1e-5 relative to the largest reference value, for fp32 AND fp16 storage. The reference is fed
float64 copies of exactly what the kernel reads (the cache's storage copied back, q as given), so fp16 storage
adds no error to the comparison; what remains is fp32 arithmetic over <= 100 keys, near 1e-7. A wrong mask, a
lost split, a wrong merge weight or a wrong KV head is off by > 1e-2.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numbattn
from numbattn import decode, gpu, reference
from numbattn.backend import available_backends, to_host
from numbattn.decode import Config

RTOL = 1e-5
KERNEL = available_backends()[0]  # "sim" in CI, "cuda" with NUMBATTN_TEST_GPU=1
pytestmark = pytest.mark.skipif(KERNEL == "numpy", reason="numba.cuda unavailable: nothing to test")
TINY = Config(split=4, threads=8, dims_per_lane=4)      # head_dim 16: 4 lanes per key, 2 key slots, 4-key splits
LONG = Config(split=8, threads=8, dims_per_lane=8)      # 2 lanes per key, 4 slots; 100 keys: 13 splits, last of 4
STEPS = Config(split=11, threads=8, dims_per_lane=8, keys_per_step=3)  # 4 slots x 3 keys a step: 11 = 12 - 1
SPLIT_VERSIONS = ("v1", "v2")   # the split-K kernels, which take the same Config


host = to_host


def filled_cache(rng, lengths, n_heads=2, n_kv_heads=1, d=16, max_len=None, dtype=np.float32,
                 backend=KERNEL, n_layers=1):
    """A cache whose rows hold `lengths` tokens (append max(lengths), then a per-row truncate), and a query."""
    lengths = np.asarray(lengths)
    batch, top = len(lengths), int(lengths.max())
    cache = numbattn.KVCache(n_layers, batch, n_kv_heads, max_len or top + 3, d, dtype=dtype, backend=backend)
    if top:
        k = rng.standard_normal((batch, n_kv_heads, top, d)).astype(np.float32)
        v = rng.standard_normal((batch, n_kv_heads, top, d)).astype(np.float32)
        v += np.arange(n_kv_heads, dtype=np.float32)[None, :, None, None] * 10  # reading the wrong KV head fails
        for layer in range(n_layers):
            cache.append(layer, k, v)
        cache.truncate(lengths)
    q = rng.standard_normal((batch, n_heads, d)).astype(dtype)
    return cache, q


def reference_fp64(q, cache, layer=0, scale=None, window=None, softcap=None):
    """The oracle on float64 copies of exactly what the kernel reads (a full layer: token p in slot p)."""
    return reference.decode_attention(host(q).astype(np.float64), host(cache.k(layer)).astype(np.float64),
                                      host(cache.v(layer)).astype(np.float64), cache.layer_lengths(layer),
                                      scale=scale, window=window, softcap=softcap)


def check(q, cache, layer=0, scale=None, config=None, rtol=RTOL, version=decode.DEFAULT_VERSION, window=None,
          softcap=None, want=None):
    """Decode into a NaN-poisoned device buffer and compare with the fp64 reference (or `want`)."""
    from numba import cuda
    out = cuda.to_device(np.full(q.shape, np.nan, np.float32))  # an unwritten element stays NaN and fails
    got = numbattn.decode_attention(cuda.to_device(q), cache, layer, scale=scale, out=out, config=config,
                                    version=version, window=window, softcap=softcap)
    got = got.copy_to_host()
    want = reference_fp64(q, cache, layer, scale, window, softcap) if want is None else want
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.isfinite(got).all(), "kernel left unwritten (NaN) outputs or read a NaN-poisoned slot"
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err < rtol, f"relative error {err:.2e} >= {rtol:.0e}"
    return got


@pytest.mark.parametrize("length,config", [(1, TINY), (2, TINY), (31, TINY), (100, LONG), (100, STEPS)])
def test_matches_reference_lengths(length, config):
    rng = np.random.default_rng(length)
    cache, q = filled_cache(rng, [length], max_len=length + 5)   # unused NaN slots right after the last key
    for version in SPLIT_VERSIONS:
        check(q, cache, config=config, version=version)
    check(q, cache, version="v0")


@pytest.mark.parametrize("version", decode.VERSIONS)
@pytest.mark.parametrize("n_heads,n_kv_heads", [(2, 2), (4, 1), (8, 1), (8, 2)])  # GQA ratios 1, 4, 8, 4
def test_grouped_query_heads(version, n_heads, n_kv_heads):
    rng = np.random.default_rng(n_heads * 10 + n_kv_heads)
    cache, q = filled_cache(rng, [9], n_heads=n_heads, n_kv_heads=n_kv_heads)
    check(q, cache, config=TINY if version != "v0" else None, version=version)


@pytest.mark.parametrize("version", decode.VERSIONS)
def test_rows_of_different_lengths_and_an_empty_row(version):
    rng = np.random.default_rng(11)
    cache, q = filled_cache(rng, [0, 1, 6, 13], n_heads=4, n_kv_heads=2, max_len=16)
    got = check(q, cache, config=TINY if version != "v0" else None, version=version)
    assert (got[0] == 0).all()                   # a row holding no tokens returns zeros


def test_all_rows_empty_gives_zeros():
    cache, q = filled_cache(np.random.default_rng(12), [0, 0], max_len=4)
    got = numbattn.decode_attention(q, cache, 0, config=TINY)
    assert isinstance(got, np.ndarray) and (got == 0).all()


def test_float16_storage_and_query_compute_in_fp32():
    rng = np.random.default_rng(13)
    cache, q = filled_cache(rng, [3, 14], n_heads=4, n_kv_heads=1, d=32, dtype=np.float16)
    assert host(cache.k(0)).dtype == np.float16 and q.dtype == np.float16
    check(q, cache, config=TINY)   # same rounded values in the reference: fp32 math still lands near 1e-7


def test_large_logits_across_splits_are_stable():
    """Scores around ±80 with the maximum in a late split: only a correct log-sum-exp merge stays finite and right."""
    rng = np.random.default_rng(14)
    k = rng.standard_normal((1, 1, 11, 16)).astype(np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((1, 1, 11, 16)).astype(np.float32)
    q = np.concatenate([k[:, :, 9] * 80, -k[:, :, 2] * 80], axis=1)   # [1, 2, 16]: peaks in split 3, or spread
    cache = numbattn.KVCache(1, 1, 1, 16, 16, backend=KERNEL)
    cache.append(0, k, v)
    for version in SPLIT_VERSIONS:
        check(q.astype(np.float32), cache, scale=1.0, config=TINY, version=version)


def test_custom_scale_and_head_dim_64():
    rng = np.random.default_rng(15)
    cache, q = filled_cache(rng, [10, 5], n_heads=4, n_kv_heads=2, d=64)
    for version in SPLIT_VERSIONS:
        check(q, cache, scale=0.3, config=Config(split=4, threads=16, dims_per_lane=8), version=version)
    check(q, cache, scale=0.3, version="v0")


def test_the_unused_nan_slots_never_leak_with_the_default_config():
    """The shipped simulator config (and the automatic split, one split here) over a mostly empty cache."""
    rng = np.random.default_rng(16)
    cache, q = filled_cache(rng, [5, 2], n_heads=4, n_kv_heads=2, max_len=24)
    check(q, cache)
    check(q, cache, config=Config(split=None, threads=8, dims_per_lane=8))


def test_host_in_host_out_and_device_in_device_out():
    rng = np.random.default_rng(17)
    cache, q = filled_cache(rng, [7])
    got = numbattn.decode_attention(q, cache, 0)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_fp64(q, cache), rtol=1e-5, atol=1e-6)
    from numba import cuda
    got_dev = numbattn.decode_attention(cuda.to_device(q), cache, 0)
    assert hasattr(got_dev, "copy_to_host")
    np.testing.assert_array_equal(got_dev.copy_to_host(), got)


def test_repeated_host_calls_do_not_share_results():
    """Host q reuses the cache's device staging buffers: each call's result must still be its own."""
    rng = np.random.default_rng(22)
    cache, q1 = filled_cache(rng, [5, 3], n_heads=4, n_kv_heads=2)
    q2 = rng.standard_normal(q1.shape).astype(np.float32)
    a, b = numbattn.decode_attention(q1, cache, 0), numbattn.decode_attention(q2, cache, 0)
    np.testing.assert_allclose(a, reference_fp64(q1, cache), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b, reference_fp64(q2, cache), rtol=1e-5, atol=1e-6)
    cache.append(0, *(rng.standard_normal((2, 2, 1, 16)).astype(np.float32) for _ in range(2)))
    c = numbattn.decode_attention(q1, cache, 0)
    np.testing.assert_allclose(c, reference_fp64(q1, cache), rtol=1e-5, atol=1e-6)
    assert not np.allclose(a, c)    # the appended token changed the answer; a is untouched


def test_numpy_and_kernel_backends_agree():
    caches, outs = [], []
    for be in (KERNEL, "numpy"):
        rng = np.random.default_rng(18)                    # the same draws for both caches
        cache, q = filled_cache(rng, [4, 9, 0], n_heads=4, n_kv_heads=2, backend=be, n_layers=2)
        cache.append(1, *(rng.standard_normal((3, 2, 1, 16)).astype(np.float32) for _ in range(2)))
        caches.append(cache)
        outs.append([numbattn.decode_attention(q, cache, layer) for layer in (0, 1)])
    assert caches[0].layer_lengths(1).tolist() == caches[1].layer_lengths(1).tolist() == [5, 10, 1]
    for a, b in zip(*outs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_prefill_then_decode_equals_one_long_prefill():
    """n prompt tokens through the prefill kernel, then k decode steps, equal causal prefill of all n + k."""
    rng = np.random.default_rng(19)
    n, steps, b, h, h_kv, d = 7, 3, 2, 4, 2, 16
    q = rng.standard_normal((b, h, n + steps, d)).astype(np.float32)
    k = rng.standard_normal((b, h_kv, n + steps, d)).astype(np.float32)
    v = rng.standard_normal((b, h_kv, n + steps, d)).astype(np.float32)
    full = numbattn.attention(q, k, v, causal=True, backend=KERNEL)        # [b, h, n + steps, d]

    cache = numbattn.KVCache(1, b, h_kv, n + steps, d, backend=KERNEL)
    prompt = numbattn.attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], causal=True, backend=KERNEL)
    cache.append(0, k[:, :, :n], v[:, :, :n])
    np.testing.assert_allclose(prompt, full[:, :, :n], rtol=1e-5, atol=1e-6)
    for i in range(n, n + steps):
        cache.append(0, k[:, :, i:i + 1], v[:, :, i:i + 1])       # the new token's K/V, then its query
        out = numbattn.decode_attention(q[:, :, i], cache, 0)
        np.testing.assert_allclose(out, full[:, :, i], rtol=1e-5, atol=1e-6)
    assert cache.lengths.tolist() == [n + steps] * b


@pytest.mark.parametrize("version,dims_per_lane", [("v1", 1), ("v1", 2), ("v1", 4), ("v1", 16),   # K/V words:
                                                   ("v2", 1), ("v2", 2)])   # uint16/32/64 (v2: V's; K: rows)
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_every_word_width(version, dtype, dims_per_lane):
    rng = np.random.default_rng(dims_per_lane)
    cache, q = filled_cache(rng, [13, 5], n_heads=4, n_kv_heads=2, dtype=dtype)
    check(q, cache, config=Config(split=5, threads=16, dims_per_lane=dims_per_lane, keys_per_step=2), version=version)


@settings(max_examples=16, deadline=None)     # 8 or 16 threads: several slots or lane groups either way
@given(lengths=st.lists(st.integers(0, 19), min_size=1, max_size=3), group=st.sampled_from([1, 2, 4]),
       n_kv_heads=st.integers(1, 2), split=st.integers(1, 6), lanes=st.sampled_from([1, 2, 4, 8]),
       threads=st.sampled_from([8, 16]), keys_per_step=st.integers(1, 3),
       dtype=st.sampled_from([np.float32, np.float16]), seed=st.integers(0, 2**16),
       version=st.sampled_from(SPLIT_VERSIONS))
def test_property_sweep(lengths, group, n_kv_heads, split, lanes, threads, keys_per_step, dtype, seed, version):
    rng = np.random.default_rng(seed)
    cache, q = filled_cache(rng, lengths, n_heads=group * n_kv_heads, n_kv_heads=n_kv_heads, dtype=dtype)
    check(q, cache, config=Config(split=split, threads=threads, dims_per_lane=16 // lanes, keys_per_step=keys_per_step),
          version=version)


def test_split_grows_with_the_length_and_fills_the_gpu():
    """The GPU's automatic split: MIN_SPLIT to MAX_SPLIT keys, and a long context gives each SM BLOCKS_PER_SM blocks."""
    for length in (1, 100, 2048, 4096, 32768, 131072):
        split = decode.choose_split(length, 1, 4, n_sm=132)
        assert decode.MIN_SPLIT <= split <= decode.MAX_SPLIT and split % decode.MIN_SPLIT == 0
        if length >= 131072:
            assert 4 * decode.n_splits_for(length, split) >= 132 * decode.BLOCKS_PER_SM * 0.5
    assert decode.choose_split(131072, 1, 4, n_sm=132) > decode.choose_split(32768, 1, 4, n_sm=132)
    for head_dim in (16, 32, 64, 128, 256):
        for group in (1, 4, 8):
            for version in SPLIT_VERSIONS:
                cfg = decode.gpu_config(version, head_dim, group)
                assert decode.shared_bytes(version, head_dim, group, cfg) <= gpu.SHARED_LIMIT


def test_repeated_device_calls_take_the_prepared_path_and_follow_the_cache():
    """The same device q (the benchmark's and the engine's hot path): one prepared launch, re-planned as the
    context grows (longer splits), right after every append; without `out` the result lives in the cache's
    buffer for that layer."""
    from numba import cuda
    rng = np.random.default_rng(20)
    cache, q = filled_cache(rng, [6, 3], n_heads=4, n_kv_heads=2, max_len=40)
    dq = cuda.to_device(q)
    config = Config(split=None, threads=8, dims_per_lane=8)
    first = numbattn.decode_attention(dq, cache, 0, config=config)
    key = (0, None, config, decode.DEFAULT_VERSION, None, 0, None, None)
    prepared = cache.decode_workspace().calls[key]
    for step in range(3):
        got = numbattn.decode_attention(dq, cache, 0, config=config)
        assert got is first and cache.decode_workspace().calls[key] is prepared
        np.testing.assert_allclose(got.copy_to_host(), reference_fp64(q, cache), rtol=RTOL, atol=1e-6)
        cache.append(0, *(rng.standard_normal((2, 2, 1 + 10 * step, 16)).astype(np.float32) for _ in range(2)))


# ---- sliding windows, soft caps, ring-buffer layers, head_dim 256 ----
def config_for(version):
    return None if version == "v0" else TINY


@pytest.mark.parametrize("version", decode.VERSIONS)
def test_sliding_window_per_row(version):
    """Rows of 0, 1, 6 and 13 tokens in a full layer, window 4: each row sees its own last min(n, 4) tokens
    (across several 4-key splits for the 13-token row); the rest of the row is never read."""
    rng = np.random.default_rng(40)
    cache, q = filled_cache(rng, [0, 1, 6, 13], n_heads=4, n_kv_heads=2, max_len=16)
    got = check(q, cache, config=config_for(version), version=version, window=4)
    assert (got[0] == 0).all()
    check(q, cache, config=config_for(version), version=version, window=1)      # the newest token alone


@pytest.mark.parametrize("version", decode.VERSIONS)
def test_soft_capped_scores_of_large_magnitude(version):
    """Scores up to ~±800 capped at 30: the cap decides the weights (uncapped, one key would take them all)."""
    rng = np.random.default_rng(41)
    cache, q = filled_cache(rng, [11, 7], n_heads=2, n_kv_heads=1)
    check((q * 200).astype(np.float32), cache, config=config_for(version), version=version, softcap=30.0)
    check(q, cache, config=config_for(version), version=version, softcap=30.0, window=3, scale=0.01)


class History:
    """What a ring layer was given, kept on the host in float64: the oracle for decode and chunk attention over it
    (which never looks at the cache's own storage)."""

    def __init__(self, batch, n_kv_heads, d):
        self.k = np.zeros((batch, n_kv_heads, 0, d))
        self.v = np.zeros((batch, n_kv_heads, 0, d))

    def append(self, cache, k, v):
        cache.append(0, k, v)
        self.k = np.concatenate([self.k, k.astype(cache.dtype).astype(np.float64)], axis=2)
        self.v = np.concatenate([self.v, v.astype(cache.dtype).astype(np.float64)], axis=2)

    def truncate(self, cache, n):
        cache.truncate(n)
        self.k, self.v = self.k[:, :, :n], self.v[:, :, :n]

    def decode(self, q, window, softcap=None):
        n = self.k.shape[2]
        return reference.decode_attention(q.astype(np.float64), self.k, self.v, np.full(len(q), n), window=window,
                                          softcap=softcap)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_ring_buffer_wraps_during_decode(dtype):
    """A window-5 layer in a ring of 6 slots (max_chunk 2): a 2-token prompt, then 11 single tokens, the ring
    wrapping twice; every step decodes (v0, v1, v2 in turn) its last 5 tokens, against what was appended."""
    rng = np.random.default_rng(42)
    cache = numbattn.KVCache(1, 2, 1, 32, 16, dtype=dtype, backend=KERNEL, windows=5, max_chunk=2)
    assert cache.kind(0) == "ring" and cache.slots(0) == 6 and cache.k(0).shape == (2, 1, 6, 16)
    hist = History(2, 1, 16)
    hist.append(cache, *(rng.standard_normal((2, 1, 2, 16)).astype(np.float32) for _ in range(2)))
    for step in range(11):
        hist.append(cache, *(rng.standard_normal((2, 1, 1, 16)).astype(np.float32) for _ in range(2)))
        q = rng.standard_normal((2, 2, 16)).astype(np.float32)
        version = decode.VERSIONS[step % 3]
        check(q, cache, config=config_for(version), version=version, softcap=5.0 if step % 2 else None,
              want=hist.decode(q, 5, 5.0 if step % 2 else None))
    assert cache.lengths.tolist() == [13, 13]


def test_ring_rewind_into_the_ring_then_decode():
    """Rewinding a wrapped ring to a point whose window it still holds, then appending and decoding, is right."""
    rng = np.random.default_rng(43)
    cache = numbattn.KVCache(1, 1, 1, 32, 16, backend=KERNEL, windows=3, max_chunk=4)    # 6 slots
    hist = History(1, 1, 16)
    hist.append(cache, *(rng.standard_normal((1, 1, 4, 16)).astype(np.float32) for _ in range(2)))
    for _ in range(4):
        hist.append(cache, *(rng.standard_normal((1, 1, 1, 16)).astype(np.float32) for _ in range(2)))
    assert cache.min_rewind().tolist() == [4]             # holds tokens 2..7: a rewind to 4 keeps 2, 3 (window 3)
    hist.truncate(cache, 5)
    for _ in range(2):
        hist.append(cache, *(rng.standard_normal((1, 1, 1, 16)).astype(np.float32) for _ in range(2)))
        q = rng.standard_normal((1, 2, 16)).astype(np.float32)
        for version in decode.VERSIONS:
            check(q, cache, config=config_for(version), version=version, want=hist.decode(q, 3))


@pytest.mark.parametrize("version", decode.VERSIONS)
def test_head_dim_256_gqa_4_to_1_one_kv_head(version):
    """Gemma's head_dim 256, 4 query heads on one KV head; v1/v2 with 32 lanes a key (8 dims each, the GPU's)."""
    rng = np.random.default_rng(44)
    cache, q = filled_cache(rng, [5, 11], n_heads=4, n_kv_heads=1, d=256)
    config = None if version == "v0" else Config(split=8, threads=32, dims_per_lane=8)
    check(q, cache, config=config, version=version, window=6)
    if version == "v1":
        check(q, cache, version=version)                  # the simulator's default config at head_dim 256


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(0, 14), min_size=1, max_size=3), window=st.integers(1, 16),
       head_dim=st.sampled_from([16, 32, 128]), seed=st.integers(0, 2**16), version=st.sampled_from(decode.VERSIONS))
def test_property_sweep_windows(lengths, window, head_dim, seed, version):
    rng = np.random.default_rng(seed)
    cache, q = filled_cache(rng, lengths, n_heads=2, n_kv_heads=1, d=head_dim)
    check(q, cache, version=version, window=window)


def test_a_ring_layer_decodes_its_own_window_by_default():
    """Without window=, a ring layer attends over its own window; a larger one is refused, a smaller one is not."""
    rng = np.random.default_rng(45)
    cache = numbattn.KVCache(1, 1, 1, 16, 16, backend=KERNEL, windows=3)
    hist = History(1, 1, 16)
    for _ in range(4):
        hist.append(cache, *(rng.standard_normal((1, 1, 1, 16)).astype(np.float32) for _ in range(2)))
    q = rng.standard_normal((1, 1, 16)).astype(np.float32)
    np.testing.assert_allclose(numbattn.decode_attention(q, cache, 0), hist.decode(q, 3), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(numbattn.decode_attention(q, cache, 0, window=2), hist.decode(q, 2), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match=r"window=4: layer 0 keeps a sliding window of 3 tokens"):
        numbattn.decode_attention(q, cache, 0, window=4)


@pytest.mark.parametrize("bad,match", [
    (dict(q=np.zeros((2, 4, 1, 16), np.float32)), r"q has shape \(2, 4, 1, 16\); expected 3 dimensions"),
    (dict(q=np.zeros((2, 4, 16), np.float64)), r"q has dtype float64"),
    (dict(q=np.zeros((3, 4, 16), np.float32)), r"q has shape \(3, 4, 16\) but the cache holds batch 2"),
    (dict(q=np.zeros((2, 4, 32), np.float32)), r"head_dim 16"),
    (dict(q=np.zeros((2, 3, 16), np.float32)), r"q has 3 heads, the cache has 2.*multiple"),
    (dict(layer=1), r"layer=1 is out of range"),
    (dict(cache="cache"), r"cache must be a numbattn.KVCache; got str"),
    (dict(scale=float("inf")), r"scale=inf"),
    (dict(out=np.zeros((2, 4, 16), np.float32)), r"out has shape .* expected a device array"),
    (dict(config=Config(split=4, threads=6, dims_per_lane=4)), r"power of two <= 32 that divides threads"),
    (dict(config=Config(split=0, threads=8, dims_per_lane=4)), r"split None or >= 1"),
    (dict(config=Config(split=4, threads=8, dims_per_lane=4, keys_per_step=0)), r"keys_per_step >= 1"),
    (dict(version="v3"), r"version='v3': expected one of"),
    (dict(window=0), r"window=0 must be >= 1"),
    (dict(softcap=-1.0), r"softcap=-1.0 must be a finite number > 0"),
])
def test_validation_errors_name_the_argument(bad, match):
    cache, _ = filled_cache(np.random.default_rng(21), [2, 3], n_heads=4, n_kv_heads=2)
    args = dict(q=np.zeros((2, 4, 16), np.float32), cache=cache, layer=0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        numbattn.decode_attention(**args)


# ---- real GPU only: realistic sizes (run with NUMBATTN_TEST_GPU=1 on a CUDA machine) ----
@pytest.mark.gpu
@pytest.mark.parametrize("version", SPLIT_VERSIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("lengths", [[4096], [32768], [1, 777, 2048, 0], [100] * 8])
def test_gpu_realistic_shapes(version, dtype, lengths):
    rng = np.random.default_rng(len(lengths))
    cache, q = filled_cache(rng, lengths, n_heads=32, n_kv_heads=4, d=64, dtype=dtype,
                            max_len=max(lengths) + 17)    # TinyLlama's 32 query / 4 KV heads, automatic split
    check(q, cache, version=version)


@pytest.mark.gpu
@pytest.mark.parametrize("version", SPLIT_VERSIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("d,n_heads,n_kv_heads,window", [(128, 32, 8, 4096), (256, 4, 1, 512), (256, 8, 4, 4096)])
def test_gpu_windowed_rows(version, dtype, d, n_heads, n_kv_heads, window):
    """Mistral-, Gemma 3- and Gemma 2-shaped heads over rows of 1, 777, 9000 and 0 tokens in a full layer, with their
    windows and a soft cap of 50."""
    rng = np.random.default_rng(d + window)
    cache, q = filled_cache(rng, [1, 777, 9000, 0], n_heads=n_heads, n_kv_heads=n_kv_heads, d=d, dtype=dtype,
                            max_len=9017)
    check(q, cache, version=version, window=window, softcap=50.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gpu_ring_buffer_decode_at_long_context(dtype):
    """A window-4096 ring (4096 + 2047 slots) that has seen 40000 tokens, decoded step by step (v1 and v2), against
    the last 4096 tokens appended."""
    rng = np.random.default_rng(46)
    cache = numbattn.KVCache(1, 1, 4, 40010, 64, dtype=dtype, backend=KERNEL, windows=4096, max_chunk=2048)
    hist = History(1, 4, 64)
    for _ in range(20):
        hist.append(cache, *(rng.standard_normal((1, 4, 2000, 64)).astype(np.float32) for _ in range(2)))
        hist.k, hist.v = hist.k[:, :, -4096:], hist.v[:, :, -4096:]        # the oracle keeps what the window sees
    for step in range(4):
        hist.append(cache, *(rng.standard_normal((1, 4, 1, 64)).astype(np.float32) for _ in range(2)))
        q = rng.standard_normal((1, 32, 64)).astype(np.float32)
        check(q, cache, version=SPLIT_VERSIONS[step % 2], want=hist.decode(q, 4096))


# ---- the NumPy backend's decode: numbattn/cpu_attention.py (a Numba kernel) against the fp64 reference ----
@pytest.mark.parametrize("n_heads,n_kv_heads", [(2, 2), (4, 1), (8, 1), (8, 2)])
@pytest.mark.parametrize("window,softcap", [(None, None), (3, None), (100, 4.0), (1, 2.0)])
def test_the_cpu_decode_kernel_matches_the_reference(n_heads, n_kv_heads, window, softcap):
    """GQA 1/4/8, rows of 1, 31 and 0 tokens (zeros), windows smaller than a row and larger than every row, a
    soft cap; the slots past each row's length hold NaN (truncate poisons them): reading one fails."""
    rng = np.random.default_rng(n_heads * 10 + n_kv_heads)
    cache, q = filled_cache(rng, [1, 31, 0], n_heads=n_heads, n_kv_heads=n_kv_heads, backend="numpy")
    got = numbattn.decode_attention(q, cache, 0, window=window, softcap=softcap)
    want = reference_fp64(q, cache, 0, window=window, softcap=softcap)
    assert got.dtype == np.float32 and np.isfinite(got).all() and not got[2].any()
    assert np.abs(got - want).max() <= RTOL * np.abs(want).max()


def test_the_cpu_decode_kernel_reads_a_wrapped_ring_in_place():
    """A window-5 layer in a ring of 6 slots, wrapped twice: the kernel reads slot j mod 6 for token j."""
    rng = np.random.default_rng(44)
    cache = numbattn.KVCache(1, 2, 1, 32, 16, backend="numpy", windows=5, max_chunk=2)
    hist = History(2, 1, 16)
    for _ in range(13):
        hist.append(cache, *(rng.standard_normal((2, 1, 1, 16)).astype(np.float32) for _ in range(2)))
    q = rng.standard_normal((2, 4, 16)).astype(np.float32)
    for softcap in (None, 3.0):
        got, want = numbattn.decode_attention(q, cache, 0, softcap=softcap), hist.decode(q, 5, softcap)
        assert np.abs(got - want).max() <= RTOL * np.abs(want).max()


def test_a_host_query_checked_once_still_follows_the_cache_and_refuses_bad_arguments():
    """decode.host_key: a host cache keeps a host query's checked arguments per shape and argument set. A call of
    the same shape after an append sees the new token; a wrong layer, window, dtype or shape after good calls is
    still refused, and the cache is unchanged by the refusals."""
    rng = np.random.default_rng(47)
    cache, q = filled_cache(rng, [4, 2], n_heads=4, n_kv_heads=2, backend="numpy", n_layers=2)
    for _ in range(3):
        k, v = (rng.standard_normal((2, 2, 1, 16)).astype(np.float32) for _ in range(2))
        cache.append(0, k, v)
        got = numbattn.decode_attention(q, cache, 0)
        assert np.abs(got - reference_fp64(q, cache, 0)).max() <= RTOL * np.abs(got).max()
    assert len(cache.checked_calls) == 1
    before = cache.layer_lengths(0).copy()
    for bad in (dict(layer=2), dict(layer=0, window=0), dict(layer=0, window=[3]), dict(layer=0, scale=np.nan)):
        with pytest.raises(ValueError):
            numbattn.decode_attention(q, cache, **bad)
    for bad_q in (q.astype(np.float64), q[:, :3], q[:1]):
        with pytest.raises(ValueError):
            numbattn.decode_attention(bad_q, cache, 0)
    np.testing.assert_array_equal(cache.layer_lengths(0), before)
