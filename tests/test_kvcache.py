"""The KV cache (numbattn/kvcache.py): appends land where they should, failures change nothing, NaN stays unread.

Without a GPU these run in Numba's CUDA simulator (conftest.py). Storage is compared exactly: an append is a
copy (plus an fp32 -> fp16 rounding that NumPy's astype reproduces bit for bit), and unused slots must still
hold the NaN they were poisoned with.
"""

import numpy as np
import pytest

import numbattn
from numbattn import kvcache
from numbattn.backend import available_backends, to_host

KERNEL = available_backends()[0]  # "sim" in CI, "cuda" with NUMBATTN_TEST_GPU=1
pytestmark = pytest.mark.skipif(KERNEL == "numpy", reason="numba.cuda unavailable: nothing to test")


def host(x):
    """A host copy (never a view: snapshots of a NumPy-backed cache must not change with it)."""
    return np.array(to_host(x))


def rand_kv(rng, batch, n_kv_heads, t, d, dtype=np.float32):
    return (rng.standard_normal((batch, n_kv_heads, t, d)).astype(dtype),
            rng.standard_normal((batch, n_kv_heads, t, d)).astype(dtype))


def snapshot(cache):
    """Everything a failed call must leave untouched: storage of every layer and all lengths."""
    return ([host(cache.k(i)) for i in range(cache.n_layers)], [host(cache.v(i)) for i in range(cache.n_layers)],
            [cache.layer_lengths(i) for i in range(cache.n_layers)])


def assert_same(a, b):
    for xs, ys in zip(a, b, strict=True):
        for x, y in zip(xs, ys, strict=True):
            assert np.array_equal(x, y, equal_nan=True)


@pytest.mark.parametrize("backend", [KERNEL, "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_bulk_then_single_token_appends_land_in_order(backend, dtype):
    rng = np.random.default_rng(0)
    cache = numbattn.KVCache(2, 2, 2, 12, 16, dtype=dtype, backend=backend)
    assert all(np.isnan(host(cache.k(i))).all() and np.isnan(host(cache.v(i))).all() for i in range(2))
    chunks = [rand_kv(rng, 2, 2, 5, 16)] + [rand_kv(rng, 2, 2, 1, 16) for _ in range(3)]
    for n, (k, v) in enumerate(chunks):
        for layer in range(2):
            # layer 1 gets device arrays (no host round trip), in fp16 when the cache stores fp16
            if layer == 1 and backend != "numpy":
                from numba import cuda
                k_in, v_in = cuda.to_device(k.astype(dtype)), cuda.to_device(v.astype(dtype))
            else:
                k_in, v_in = k, v
            cache.append(layer, k_in, v_in)
        assert cache.lengths.tolist() == [5 + n] * 2 and cache.lengths.dtype == np.int32
    want_k = np.concatenate([k for k, _ in chunks], axis=2).astype(dtype)
    want_v = np.concatenate([v for _, v in chunks], axis=2).astype(dtype)
    for layer in range(2):
        K, V = host(cache.k(layer)), host(cache.v(layer))
        assert K.dtype == dtype and K.shape == (2, 2, 12, 16)
        assert np.array_equal(K[:, :, :8], want_k) and np.array_equal(V[:, :, :8], want_v)
        assert np.isnan(K[:, :, 8:]).all() and np.isnan(V[:, :, 8:]).all()


@pytest.mark.parametrize("backend", [KERNEL, "numpy"])
def test_rows_append_at_their_own_lengths_after_per_row_truncate(backend):
    rng = np.random.default_rng(1)
    cache = numbattn.KVCache(1, 3, 1, 10, 16, backend=backend)
    k0, v0 = rand_kv(rng, 3, 1, 6, 16)
    cache.append(0, k0, v0)
    cache.truncate(np.array([2, 6, 0]))
    assert cache.lengths.tolist() == [2, 6, 0]
    K = host(cache.k(0))
    assert np.array_equal(K[0, :, :2], k0[0, :, :2]) and np.isnan(K[0, :, 2:]).all()  # rewound: NaN again
    assert np.isnan(K[2]).all()
    k1, v1 = rand_kv(rng, 3, 1, 2, 16)
    cache.append(0, k1, v1)
    K, V = host(cache.k(0)), host(cache.v(0))
    for b, start in enumerate([2, 6, 0]):
        assert np.array_equal(K[b, :, start:start + 2], k1[b]) and np.array_equal(V[b, :, start:start + 2], v1[b])
        assert np.isnan(K[b, :, start + 2:]).all()
    assert cache.lengths.tolist() == [4, 8, 2]


@pytest.mark.parametrize("backend", [KERNEL, "numpy"])
def test_single_tokens_with_mixed_input_dtypes(backend):
    """One-token host appends go through a reused staging buffer: mixed fp16/fp32 k, v, repeated steps."""
    rng = np.random.default_rng(8)
    cache = numbattn.KVCache(1, 2, 1, 6, 16, dtype=np.float16, backend=backend)
    steps = [rand_kv(rng, 2, 1, 1, 16) for _ in range(3)]
    for k, v in steps:
        cache.append(0, k.astype(np.float16), v)            # k fp16, v fp32
    K, V = host(cache.k(0)), host(cache.v(0))
    assert np.array_equal(K[:, :, :3], np.concatenate([k for k, _ in steps], axis=2).astype(np.float16))
    assert np.array_equal(V[:, :, :3], np.concatenate([v for _, v in steps], axis=2).astype(np.float16))
    assert np.isnan(K[:, :, 3:]).all() and cache.lengths.tolist() == [3, 3]


def test_truncate_int_keeps_the_common_prefix_and_never_grows():
    rng = np.random.default_rng(2)
    cache = numbattn.KVCache(2, 2, 1, 8, 16, backend=KERNEL)
    k, v = rand_kv(rng, 2, 1, 5, 16)
    for layer in range(2):
        cache.append(layer, k, v)
    cache.truncate(7)                       # more than held: nothing changes
    assert cache.lengths.tolist() == [5, 5]
    cache.truncate(3)
    assert cache.lengths.tolist() == [3, 3]
    for layer in range(2):
        K = host(cache.k(layer))
        assert np.array_equal(K[:, :, :3], k[:, :, :3]) and np.isnan(K[:, :, 3:]).all()
    cache.reset()
    assert cache.lengths.tolist() == [0, 0] and np.isnan(host(cache.k(1))).all()


def test_lengths_is_what_every_layer_holds():
    rng = np.random.default_rng(3)
    cache = numbattn.KVCache(3, 1, 1, 8, 16, backend=KERNEL)
    k, v = rand_kv(rng, 1, 1, 2, 16)
    cache.append(0, k, v)                   # mid-step: only layer 0 has the new tokens
    assert cache.lengths.tolist() == [0]
    assert cache.layer_lengths(0).tolist() == [2] and cache.layer_lengths(2).tolist() == [0]
    cache.append(1, k, v)
    cache.append(2, k, v)
    assert cache.lengths.tolist() == [2]
    assert host(cache.device_lengths(2)).tolist() == [2]   # the device copy decode reads


def test_overflow_is_rejected_and_nothing_is_written():
    rng = np.random.default_rng(4)
    cache = numbattn.KVCache(2, 2, 1, 8, 16, backend=KERNEL)
    k, v = rand_kv(rng, 2, 1, 6, 16)
    cache.append(0, k, v)
    cache.truncate(np.array([6, 3]))
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"append of 3 tokens to layer 0 overflows max_len 8: rows \[0\] hold \[6\]"):
        cache.append(0, *rand_kv(rng, 2, 1, 3, 16))       # row 1 would fit: still nothing is written
    with pytest.raises(ValueError, match="overflows max_len 8"):
        cache.append(1, *rand_kv(rng, 2, 1, 9, 16))
    assert_same(snapshot(cache), before)
    cache.append(0, *rand_kv(rng, 2, 1, 2, 16))          # exactly full is fine
    assert cache.layer_lengths(0).tolist() == [8, 5]


@pytest.mark.parametrize("bad,match", [
    (dict(layer=2), r"layer=2 is out of range: the cache has 2 layers"),
    (dict(layer=-1), r"layer=-1 is out of range"),
    (dict(layer=1.0), r"layer=1.0 must be an integer"),
    (dict(k=np.zeros((2, 2, 1, 16), np.float64)), r"k has dtype float64"),
    (dict(v=np.zeros((2, 2, 1, 16), np.int32)), r"v has dtype int32"),
    (dict(k=np.zeros((2, 2, 16), np.float32)), r"k has shape \(2, 2, 16\); expected 4 dimensions"),
    (dict(k=np.zeros((2, 2, 2, 16), np.float32)), r"k has shape \(2, 2, 2, 16\) but v has \(2, 2, 1, 16\)"),
    (dict(k=np.zeros((2, 1, 1, 16), np.float32), v=np.zeros((2, 1, 1, 16), np.float32)),
     r"k has shape \(2, 1, 1, 16\); expected \(2, 2, t, 16\)"),
    (dict(k=np.zeros((2, 2, 1, 32), np.float32), v=np.zeros((2, 2, 1, 32), np.float32)), r"expected \(2, 2, t, 16\)"),
    (dict(k=np.zeros((2, 2, 0, 16), np.float32), v=np.zeros((2, 2, 0, 16), np.float32)), r"t >= 1"),
    (dict(k=[[1.0]]), r"k is a list; expected a NumPy array or a Numba device array"),
])
def test_bad_append_arguments_are_named_and_change_nothing(bad, match):
    rng = np.random.default_rng(5)
    cache = numbattn.KVCache(2, 2, 2, 4, 16, backend=KERNEL)
    cache.append(0, *rand_kv(rng, 2, 2, 2, 16))
    before = snapshot(cache)
    args = dict(layer=0, k=np.ones((2, 2, 1, 16), np.float32), v=np.ones((2, 2, 1, 16), np.float32))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        cache.append(args["layer"], args["k"], args["v"])
    assert_same(snapshot(cache), before)


@pytest.mark.parametrize("args,match", [
    (dict(head_dim=24), r"head_dim=24"),
    (dict(dtype=np.float64), r"dtype=float64"),
    (dict(n_layers=0), r"n_layers=0 must be >= 1"),
    (dict(max_len=2.5), r"max_len=2.5 must be an integer"),
    (dict(backend="tpu"), r"backend='tpu'"),
])
def test_bad_constructor_arguments_are_named(args, match):
    kw = dict(n_layers=1, batch=1, n_kv_heads=1, max_len=4, head_dim=16)
    kw.update(args)
    with pytest.raises(ValueError, match=match):
        numbattn.KVCache(**kw)


@pytest.mark.parametrize("n,match", [(-1, r"must be >= 0"), (np.array([1, 2, 3]), r"n has shape \(3,\)"),
                                     (1.5, r"dtype float64"), (True, r"n=True must be an integer"),
                                     (np.array([2, -1]), r"n=\[2, -1\] must be >= 0")])
def test_bad_truncate_is_rejected(n, match):
    cache = numbattn.KVCache(1, 2, 1, 4, 16, backend=KERNEL)
    with pytest.raises(ValueError, match=match):
        cache.truncate(n)


@pytest.mark.parametrize("n", [np.uint64(2**63 + 5), np.uint64(2**64 - 1), 2**70, np.array([2**63, 7], np.uint64)])
def test_huge_truncate_counts_keep_everything(n):
    """Counts beyond int64 are taken exactly as Python ints (no wrap-around to a negative or a small length):
    truncating to more than the cache holds keeps every token, and decode still reads only written slots."""
    cache = numbattn.KVCache(1, 2, 1, 8, 16, backend=KERNEL)
    rng = np.random.default_rng(9)
    cache.append(0, *rand_kv(rng, 2, 1, 4, 16))
    before = snapshot(cache)
    cache.truncate(n)
    assert cache.lengths.tolist() == [4, 4] and host(cache.device_lengths(0)).tolist() == [4, 4]
    assert_same(before, snapshot(cache))
    out = numbattn.decode_attention(rng.standard_normal((2, 1, 16)).astype(np.float32), cache, 0)
    assert np.isfinite(out).all()


def test_advance_records_kernel_appends_and_refuses_overflow():
    cache = numbattn.KVCache(2, 1, 1, 4, 16, backend=KERNEL)
    cache.advance(3)
    assert cache.lengths.tolist() == [3] and cache.layer_lengths(1).tolist() == [3]
    with pytest.raises(ValueError, match=r"advance\(2\): the cache holds 3 of 4"):
        cache.advance(2)
    with pytest.raises(ValueError, match=r"t=1.0 must be an integer"):
        cache.advance(1.0)


def test_device_launcher_is_idempotent_for_timing():
    """launch_append with fixed lengths_in/lengths_out writes the same slots each call (how the bench times it),
    with several blocks per row (the last one writes the length) and the tickets reset after every launch."""
    from numba import cuda
    rng = np.random.default_rng(6)
    cache = numbattn.KVCache(1, 2, 2, 8, 16, backend=KERNEL)
    k, v = rand_kv(rng, 2, 2, 3, 16)
    dk, dv = cuda.to_device(k), cuda.to_device(v)
    lengths_in, lengths_out = cuda.to_device(np.array([1, 4], np.int32)), cuda.device_array(2, np.int32)
    counters = cuda.to_device(np.zeros(2, np.int32))
    copy = (16, 3) if KERNEL == "sim" else kvcache.GPU_COPY     # 48 elements per (row, head): 3 blocks each
    for _ in range(2):
        kvcache.launch_append(dk, dv, cache.k(0), cache.v(0), lengths_in, lengths_out, counters, copy)
    assert lengths_out.copy_to_host().tolist() == [4, 7] and counters.copy_to_host().tolist() == [0, 0]
    K = cache.k(0).copy_to_host()
    assert np.array_equal(K[0, :, 1:4], k[0]) and np.array_equal(K[1, :, 4:7], k[1])
    assert np.isnan(K[0, :, 4:]).all() and np.isnan(K[1, :, :4]).all() and np.isnan(K[1, :, 7:]).all()
    with pytest.raises(ValueError, match=r"lengths_in has shape \(3,\)"):
        kvcache.launch_append(dk, dv, cache.k(0), cache.v(0), cuda.to_device(np.zeros(3, np.int32)), lengths_out,
                              counters)


def test_append_falls_back_to_numpy_when_the_kernel_fails(monkeypatch):
    """NUMBATTN_STRICT unset: a failing append kernel is replaced by host copies, with the same result."""
    def broken(*args, **kwargs):
        raise RuntimeError("simulated launch failure")

    monkeypatch.setenv("NUMBATTN_STRICT", "0")
    monkeypatch.setattr(kvcache, "launch_append", broken)
    rng = np.random.default_rng(7)
    cache = numbattn.KVCache(1, 2, 1, 6, 16, backend=KERNEL)
    k, v = rand_kv(rng, 2, 1, 2, 16)
    cache.append(0, k, v)
    cache.append(0, k, v)
    assert cache.lengths.tolist() == [4, 4]
    assert host(cache.device_lengths(0)).tolist() == [4, 4]
    K = host(cache.k(0))
    assert np.array_equal(K[:, :, 2:4], k) and np.isnan(K[:, :, 4:]).all()


def test_the_cache_owns_its_lengths_and_its_decode_workspace():
    """Readers get a read-only view of the host lengths; the decode workspace is made by the cache, once."""
    cache = numbattn.KVCache(2, 1, 1, 8, 16)
    view = cache.host_lengths_view(1)
    cache.append(1, np.zeros((1, 1, 3, 16), np.float32), np.zeros((1, 1, 3, 16), np.float32))
    assert view.tolist() == [3]                              # follows the cache
    with pytest.raises(ValueError, match="read-only"):
        view[0] = 0
    assert cache.decode_workspace() is cache.decode_workspace()
    assert cache.nbytes == 2 * 2 * 8 * 16 * 4 == 8 * cache.bytes_per_token(2, 1, 16)


# ---- sliding-window layers: ring buffers ----
@pytest.mark.parametrize("backend", [KERNEL, "numpy"])
def test_ring_layers_next_to_full_ones(backend):
    """Gemma 3's pattern in miniature: window layers keep window + max_chunk - 1 slots, full ones max_len; a window
    >= max_len hides nothing (a full layer); the cache says which is which and counts its bytes by slots."""
    cache = numbattn.KVCache(3, 2, 1, 20, 16, backend=backend, windows=[4, None, 25], max_chunk=3)
    assert [cache.kind(i) for i in range(3)] == ["ring", "full", "full"]
    assert [cache.window(i) for i in range(3)] == [4, None, None] and [cache.slots(i) for i in range(3)] == [6, 20, 20]
    assert host(cache.k(0)).shape == (2, 1, 6, 16) and np.isnan(host(cache.k(0))).all()
    assert cache.nbytes == 2 * (6 + 20 + 20) * cache.bytes_per_token(1, 1, 16)
    assert "ring layers (window, slots)={0: (4, 6)}" in repr(cache)
    assert numbattn.KVCache(1, 1, 1, 100, 16, backend=backend, windows=8).slots(0) == 15     # max_chunk = window


@pytest.mark.parametrize("backend", [KERNEL, "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_ring_appends_wrap_around(backend, dtype):
    """Token p of a row lands in slot p mod slots: a 3-token chunk, then single tokens, rows at different lengths
    (a per-row truncate), the ring wrapping; slots never written stay NaN, and the lengths count every token."""
    rng = np.random.default_rng(10)
    cache = numbattn.KVCache(1, 2, 2, 30, 16, dtype=dtype, backend=backend, windows=3, max_chunk=3)   # 5 slots
    tokens = []
    k, v = rand_kv(rng, 2, 2, 3, 16)
    cache.append(0, k, v)
    tokens.append((k, v))
    K = host(cache.k(0))
    assert np.array_equal(K[:, :, :3], k.astype(dtype)) and np.isnan(K[:, :, 3:]).all()
    for _ in range(6):
        k, v = rand_kv(rng, 2, 2, 1, 16)
        cache.append(0, k, v)
        tokens.append((k, v))
    all_k = np.concatenate([k for k, _ in tokens], axis=2).astype(dtype)       # [2, 2, 9, 16]
    all_v = np.concatenate([v for _, v in tokens], axis=2).astype(dtype)
    K, V = host(cache.k(0)), host(cache.v(0))
    for p in range(4, 9):                                                      # the ring holds tokens 4..8
        assert np.array_equal(K[:, :, p % 5], all_k[:, :, p]) and np.array_equal(V[:, :, p % 5], all_v[:, :, p])
    assert cache.lengths.tolist() == [9, 9]
    got_k, got_v, held = cache.last_tokens(0, 3)
    assert held.tolist() == [3, 3] and np.array_equal(got_k, all_k[:, :, 6:]) and np.array_equal(got_v, all_v[:, :, 6:])


@pytest.mark.parametrize("backend", [KERNEL, "numpy"])
def test_a_chunk_that_wraps_the_ring_lands_in_both_ends(backend):
    """3 tokens then 3 more into a ring of 5 slots: tokens 3, 4 go to slots 3, 4 and token 5 to slot 0 (the
    NumPy path writes a slice when the chunk fits before the end, the slots one by one when it wraps)."""
    rng = np.random.default_rng(11)
    cache = numbattn.KVCache(1, 1, 2, 30, 16, backend=backend, windows=3, max_chunk=3)      # 5 slots
    (k1, v1), (k2, v2) = rand_kv(rng, 1, 2, 3, 16), rand_kv(rng, 1, 2, 3, 16)
    cache.append(0, k1, v1)
    cache.append(0, k2, v2)
    K, V = host(cache.k(0)), host(cache.v(0))
    assert np.array_equal(K[:, :, 1:3], k1[:, :, 1:]) and np.array_equal(K[:, :, 3:], k2[:, :, :2])
    assert np.array_equal(K[:, :, 0], k2[:, :, 2]) and np.array_equal(V[:, :, 0], v2[:, :, 2])
    assert np.array_equal(V[:, :, 3:], v2[:, :, :2]) and cache.lengths.tolist() == [6]


@pytest.mark.parametrize("backend", [KERNEL, "numpy"])
def test_ring_append_longer_than_max_chunk_is_refused(backend):
    rng = np.random.default_rng(11)
    cache = numbattn.KVCache(2, 1, 1, 30, 16, backend=backend, windows=[3, None], max_chunk=2)   # 4 slots
    cache.append(0, *rand_kv(rng, 1, 1, 3, 16))            # the ring has not wrapped yet: 3 tokens fit whole
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"ring of 4 slots \(window 3\) takes at most 2 tokens at once \(max_chunk\)"):
        cache.append(0, *rand_kv(rng, 1, 1, 3, 16))
    assert_same(snapshot(cache), before)
    cache.append(1, *rand_kv(rng, 1, 1, 9, 16))            # the full layer takes any chunk


@pytest.mark.parametrize("backend", [KERNEL, "numpy"])
def test_rewind_into_the_ring_poisons_the_rewound_slots(backend):
    rng = np.random.default_rng(12)
    cache = numbattn.KVCache(1, 1, 1, 30, 16, backend=backend, windows=3, max_chunk=3)   # 5 slots
    for _ in range(3):
        cache.append(0, *rand_kv(rng, 1, 1, 3, 16))        # 9 tokens: the ring holds 4..8
    assert cache.min_rewind().tolist() == [6]              # token 6 still sees 4 and 5
    kept = host(cache.k(0))
    cache.truncate(7)
    K = host(cache.k(0))
    assert np.isnan(K[:, :, [7 % 5, 8 % 5]]).all()         # tokens 7, 8 rewound: NaN
    assert np.array_equal(K[:, :, [4 % 5, 5 % 5, 6 % 5]], kept[:, :, [4 % 5, 5 % 5, 6 % 5]])
    assert cache.lengths.tolist() == [7] and cache.min_rewind().tolist() == [4]


@pytest.mark.parametrize("backend", [KERNEL, "numpy"])
def test_rewind_past_the_ring_is_refused_and_changes_nothing(backend):
    """A ring that wrapped has overwritten its oldest tokens: a rewind that would need them is refused with the
    way out (a rewind to min_rewind or later, or reset and recompute); a rewind to 0 is always allowed."""
    rng = np.random.default_rng(13)
    cache = numbattn.KVCache(2, 2, 1, 30, 16, backend=backend, windows=[3, None], max_chunk=3)
    for layer in range(2):
        for _ in range(3):
            cache.append(layer, *rand_kv(rng, 2, 1, 3, 16))
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"truncate to 5 tokens in row 0: a sliding-window layer's ring has already "
                                         r"overwritten .* rewind to 6 tokens or more, or to 0\); reset\(\)"):
        cache.truncate(5)
    with pytest.raises(ValueError, match=r"row 1"):
        cache.truncate(np.array([6, 2]))
    assert_same(snapshot(cache), before)
    cache.truncate(0)
    assert cache.lengths.tolist() == [0, 0] and np.isnan(host(cache.k(0))).all()


@pytest.mark.parametrize("args,match", [
    (dict(windows=[3]), r"one entry \(None or an int\) per layer \(2\)"),
    (dict(windows=[0, None]), r"windows\[0\]=0 must be >= 1"),
    (dict(windows=[2.5, None]), r"windows\[0\]=2.5 must be an integer"),
    (dict(windows="3"), r"windows='3'"),
    (dict(windows=3, max_chunk=0), r"max_chunk=0 must be >= 1"),
])
def test_bad_windows_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        numbattn.KVCache(2, 1, 1, 8, 16, **args)
