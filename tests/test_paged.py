"""The paged KV cache (numbattn/paged.py) and the kernels that read and write through its block tables.

The paged decode kernel is compared with the fp64 NumPy reference (reference.paged_decode_attention, itself checked
against the contiguous decode reference) on batches built to break wrong addressing: sequences of length 1, ending
exactly on a page boundary and one past it, a padding row, pages handed out in a scrambled order, every unused page
NaN (a read of one poisons the output), GQA groups 1 and 4, into NaN-filled output buffers. Shapes are tiny: these
run in Numba's simulator.
"""
import numpy as np
import pytest

import numbattn
from numbattn import reference
from numbattn.backend import available_backends, to_host
from numbattn.decode import Config

KERNEL = available_backends()[0]
pytestmark = pytest.mark.skipif(KERNEL == "numpy", reason="numba.cuda unavailable: nothing to test")
BS, D = 4, 16


def filled_cache(rng, lengths, backend, n_kv_heads=2, dtype=np.float32, n_blocks=12, scramble=True):
    """A cache whose sequences hold `lengths` tokens of random K/V (one layer), pages handed out scrambled ->
    (cache, the same K/V contiguous per sequence [Hkv, n, D] as fp64)."""
    cache = numbattn.PagedKVCache(1, n_blocks, n_kv_heads, D, len(lengths), 16, block_size=BS, dtype=dtype,
                                  backend=backend)
    if scramble:                    # a sequence's pages are not consecutive in the pool
        cache._free = list(rng.permutation(cache._free))
    seqs = []
    for s, n in enumerate(lengths):
        k, v = (rng.standard_normal((1, n_kv_heads, n, D)).astype(dtype) for _ in range(2))
        if n:
            cache.allocate(s, n)
            cache.append(0, [s], k, v)
        seqs.append((k[0].astype(np.float64), v[0].astype(np.float64)))
    return cache, seqs


def test_reference_pages_equal_the_contiguous_reference():
    rng = np.random.default_rng(0)
    pool_k, pool_v = (rng.standard_normal((6, 2, BS, D)) for _ in range(2))
    tables = np.array([[5, 0, 3, -1], [2, -1, -1, -1]], np.int32)
    lengths = np.array([9, 4], np.int32)
    q = rng.standard_normal((3, 4, D))
    got = reference.paged_decode_attention(q, pool_k, pool_v, tables, [1, 0, -1], lengths)
    for b, s in enumerate((1, 0)):
        k = reference.gather_pages(pool_k, tables[s], lengths[s])
        assert np.array_equal(k[:, :4], pool_k[tables[s, 0]]) and k.shape == (2, lengths[s], D)
        v = reference.gather_pages(pool_v, tables[s], lengths[s])
        want = reference.decode_attention(q[b:b + 1], k[None], v[None], [lengths[s]])
        np.testing.assert_array_equal(got[b], want[0])
    assert not got[2].any()                             # padding row: zeros


@pytest.mark.parametrize("backend", [KERNEL, "numpy"])
def test_allocate_append_free_keep_pages_and_lengths_right(backend):
    rng = np.random.default_rng(1)
    cache, seqs = filled_cache(rng, [5, 1, 8], backend)
    assert cache.seq_lengths().tolist() == [5, 1, 8]
    assert [len(cache.pages(s)) for s in range(3)] == [2, 1, 2] and cache.free_blocks == 12 - 5
    for s, (k, v) in enumerate(seqs):
        gk, gv = (to_host(x) for x in cache.gather(0, s))
        np.testing.assert_array_equal(gk[0], k)
        np.testing.assert_array_equal(gv[0], v)
    k_pool = to_host(cache.k(0))
    used = np.concatenate([cache.pages(s) for s in range(3)])
    unused = np.setdiff1d(np.arange(12), used)
    assert np.isnan(k_pool[unused]).all()                # pages no sequence holds stay NaN
    assert np.isnan(k_pool[cache.pages(0)[1], :, 1:]).all()   # and the unwritten tail of a sequence's last page
    pages = cache.pages(2)
    cache.free(2)
    assert cache.free_blocks == 12 - 3 and cache.seq_lengths().tolist() == [5, 1, 0]
    assert np.isnan(to_host(cache.k(0))[pages]).all() and np.isnan(to_host(cache.v(0))[pages]).all()


@pytest.mark.parametrize("backend", [KERNEL, "numpy"])
def test_failed_calls_change_nothing(backend):
    rng = np.random.default_rng(2)
    cache, _ = filled_cache(rng, [4, 2], backend, n_blocks=4)
    before = (to_host(cache.k(0)).copy(), cache.seq_lengths(), cache.host_tables().copy(), cache.free_blocks)
    k = np.ones((1, 2, 1, D), np.float32)
    with pytest.raises(ValueError, match="allocate first"):       # sequence 0's one page is full
        cache.append(0, [0], k, k)
    with pytest.raises(ValueError, match="more pages"):
        cache.allocate(1, 16)                                    # 4 pages wanted, 2 free
    with pytest.raises(ValueError, match="max_len"):
        cache.allocate(1, 17)
    with pytest.raises(ValueError, match="distinct"):
        cache.append(0, [1, 1], np.ones((2, 2, 1, D), np.float32), np.ones((2, 2, 1, D), np.float32))
    with pytest.raises(ValueError, match="rows"):
        cache.append(0, [0, 1], k, k)
    after = (to_host(cache.k(0)), cache.seq_lengths(), cache.host_tables(), cache.free_blocks)
    assert np.array_equal(before[0], after[0], equal_nan=True)
    assert [np.array_equal(a, b) for a, b in zip(before[1:3], after[1:3])] == [True, True] and before[3] == after[3]


@pytest.mark.parametrize("n_heads, dtype, split, softcap", [(2, np.float32, 4, None), (8, np.float32, 8, None),
                                                            (8, np.float16, 4, None), (8, np.float32, 4, 1.5)])
def test_paged_decode_kernel_matches_fp64_reference(n_heads, dtype, split, softcap):
    """Lengths 1, a page boundary (4, 8) and one past it (9), padding; GQA 1 and 4; splits of 1 and 2 pages; a
    soft cap (1.5: below most of these scores' magnitudes, so an uncapped kernel fails)."""
    rng = np.random.default_rng(3)
    lengths = [1, 9, 4, 8, 0, 0]
    cache, seqs = filled_cache(rng, lengths, KERNEL, dtype=dtype)
    rows = np.array([2, -1, 0, 4, 1, 3], np.int32)
    q = rng.standard_normal((len(rows), n_heads, D)).astype(np.float32)
    from numba import cuda
    out = cuda.to_device(np.full(q.shape, np.nan, np.float32))
    config = Config(split=split, threads=8, dims_per_lane=8, keys_per_step=2)
    got = to_host(numbattn.paged_decode_attention(cuda.to_device(q), cache, 0, cuda.to_device(rows), out=out,
                                                  config=config, softcap=softcap))
    for b, s in enumerate(rows):
        if s < 0 or lengths[s] == 0:
            assert not got[b].any()
            continue
        k, v = seqs[s]
        want = reference.decode_attention(q[b:b + 1].astype(np.float64), k[None], v[None], [lengths[s]],
                                          softcap=softcap)[0]
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-6)


def test_host_query_and_numpy_backend_agree():
    rng = np.random.default_rng(4)
    lengths = [3, 6]
    caches = {be: filled_cache(np.random.default_rng(5), lengths, be)[0] for be in (KERNEL, "numpy")}
    q = rng.standard_normal((2, 4, D)).astype(np.float32)
    got = {be: numbattn.paged_decode_attention(q, c, 0, np.array([1, 0])) for be, c in caches.items()}
    assert isinstance(got[KERNEL], np.ndarray)
    np.testing.assert_allclose(got[KERNEL], got["numpy"], rtol=1e-5, atol=1e-6)
    capped = {be: numbattn.paged_decode_attention(q, c, 0, np.array([1, 0]), softcap=1.0) for be, c in caches.items()}
    np.testing.assert_allclose(capped[KERNEL], capped["numpy"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(capped["numpy"], got["numpy"], rtol=1e-3)          # the cap changed the result
    for bad in (0, -1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="softcap"):
            numbattn.paged_decode_attention(q, caches[KERNEL], 0, np.array([1, 0]), softcap=bad)


def test_an_out_buffer_of_the_wrong_shape_or_dtype_is_refused():
    """out must be a float32 device array shaped as q: a float16 one would hold the result rounded, silently."""
    from numba import cuda
    cache, _ = filled_cache(np.random.default_rng(6), [3, 6], KERNEL)
    q = np.ones((2, 4, D), np.float32)
    for out in (cuda.device_array((2, 4, D), np.float16), cuda.device_array((2, 2, D), np.float32),
                np.zeros((2, 4, D), np.float32)):
        with pytest.raises(ValueError, match="out has shape"):
            numbattn.paged_decode_attention(cuda.to_device(q), cache, 0, cuda.to_device(np.array([1, 0], np.int32)),
                                            out=out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_paged_decode_at_tinyllama_shapes(dtype):
    """32 sequences of 1 to 3000 tokens (page boundaries included), TinyLlama's heads (32 / 4, d 64), pages of 16
    in a scrambled pool, the GPU launch shape, plus padding rows: against the fp64 reference."""
    rng = np.random.default_rng(6)
    lengths = [1, 15, 16, 17, 2048, 3000] + rng.integers(1, 3000, 26).tolist()
    pages = sum(-(-n // 16) for n in lengths)
    cache = numbattn.PagedKVCache(1, pages + 7, 4, 64, 40, 3072, block_size=16, dtype=dtype, backend="cuda")
    cache._free = list(rng.permutation(cache._free))
    seqs = {}
    for s, n in enumerate(lengths):
        k, v = (rng.standard_normal((1, 4, n, 64)).astype(dtype) for _ in range(2))
        cache.allocate(s, n)
        cache.append(0, [s], k, v)
        seqs[s] = (k[0].astype(np.float64), v[0].astype(np.float64))
    rows = np.array(list(rng.permutation(len(lengths))) + [-1] * 8, np.int32)
    q = rng.standard_normal((len(rows), 32, 64)).astype(np.float32)
    got = numbattn.paged_decode_attention(q, cache, 0, rows)
    for b, s in enumerate(rows):
        if s < 0:
            assert not got[b].any()
            continue
        want = reference.decode_attention(q[b:b + 1].astype(np.float64), seqs[s][0][None], seqs[s][1][None],
                                          [lengths[s]])[0]
        np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-5)
