"""numbattn/kernels/rowwise.py: embedding lookup, RMSNorm, and RoPE fused with the KV-cache append, against NumPy.

RoPE + append is checked where it breaks: rows of a batch starting at different cache lengths (positions differ
per row), more tokens than one block handles (several blocks per row: the last one advances the length),
q rotated in place, k rotated into the cache, v copied, and every other cache slot left untouched (NaN).
"""
import numpy as np
import pytest
from numba import cuda

from gguf_files import random_blocks

from numbattn import blocks, linear, reference
from numbattn.kernels import rowwise
from tinyllm.weights import f32_to_bf16


@pytest.mark.parametrize("kind", ["bf16", "f16", "f32", "q8_0", "q4_k", "q6_k"])
def test_embed_gathers_rows(kind):
    """Float words widened exactly; GGUF blocks dequantized to exactly their NumPy statement (numbattn/blocks.py)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((11, 256)).astype(np.float32)
    if kind in blocks.BLOCK_KINDS:
        words = blocks.pack(kind, random_blocks(rng, blocks.BLOCK_KINDS[kind].ggml, 11, 256), 256)
        exact = blocks.dequantize(kind, words, 256)
    else:
        host = f32_to_bf16(table) if kind == "bf16" else table.astype(np.float16) if kind == "f16" else table
        exact = blocks.float_words(kind, host.view(np.uint64))
        words, _ = linear.pack_weight(host)
    ids = np.array([3, 0, 10, 3], np.int32)
    x = cuda.to_device(np.full((4, 256), np.nan, np.float32))
    rowwise.make_embed(kind)[len(ids), rowwise.THREADS](cuda.to_device(ids), cuda.to_device(words), x)
    np.testing.assert_array_equal(x.copy_to_host(), exact[ids])


def test_rms_norm():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 72)) * 5).astype(np.float32)
    g = (1 + 0.1 * rng.standard_normal(72)).astype(np.float32)
    y = cuda.to_device(np.full(x.shape, np.nan, np.float32))
    rowwise.make_rms_norm()[3, rowwise.THREADS](cuda.to_device(x), cuda.to_device(g), np.float32(1e-5), y)
    want = reference.rms_norm(x.astype(np.float64), g.astype(np.float64), 1e-5)
    np.testing.assert_allclose(y.copy_to_host(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rope_append(dtype):
    H, HKV, D, B = 4, 2, 16, 2
    L = 2 * rowwise.ROPE_TOKENS_PER_BLOCK - 2              # tokens per row: 2 blocks, the second ragged
    MAX = L + 10
    rng = np.random.default_rng(2)
    qkv = rng.standard_normal((B * L, (H + 2 * HKV) * D)).astype(np.float32)
    cos, sin = reference.rope_tables(D, MAX, 10000.0)
    start = np.array([3, 7], np.int32)                    # rows hold different numbers of tokens already
    k_cache = np.full((B, HKV, MAX, D), np.nan, dtype)
    v_cache = np.full((B, HKV, MAX, D), np.nan, dtype)
    d_qkv, dk, dv = cuda.to_device(qkv), cuda.to_device(k_cache), cuda.to_device(v_cache)
    lengths, counters = cuda.to_device(start), cuda.to_device(np.zeros(B, np.int32))
    grid = rowwise.rope_append_grid(L, B)
    assert grid[0] > 1, "the test must cover several blocks per row"
    rowwise.make_rope_append(H, HKV, D)[grid, rowwise.THREADS](d_qkv, cuda.to_device(cos), cuda.to_device(sin),
                                                               dk, dv, lengths, counters)
    assert lengths.copy_to_host().tolist() == (start + L).tolist()
    assert counters.copy_to_host().tolist() == [0, 0]     # reset by the last block: ready for the next launch
    got_q, got_k, got_v = d_qkv.copy_to_host(), dk.copy_to_host(), dv.copy_to_host()
    heads = qkv.reshape(B, L, H + 2 * HKV, D).transpose(0, 2, 1, 3)     # [B, heads, L, D]
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-3, atol=1e-3)
    for b in range(B):
        pos = slice(start[b], start[b] + L)
        q_want = reference.rope(heads[b, :H], cos[pos], sin[pos])
        k_want = reference.rope(heads[b, H:H + HKV], cos[pos], sin[pos])
        np.testing.assert_allclose(got_q.reshape(B, L, -1, D)[b, :, :H].transpose(1, 0, 2), q_want, **tol)
        np.testing.assert_allclose(got_k[b, :, pos], k_want, **tol)
        np.testing.assert_allclose(got_v[b, :, pos], heads[b, H + HKV:], **tol)
        untouched = np.ones(MAX, bool)
        untouched[pos] = False
        assert np.isnan(got_k[b, :, untouched]).all() and np.isnan(got_v[b, :, untouched]).all()
    np.testing.assert_array_equal(got_q[:, H * D:], qkv[:, H * D:])  # k and v columns are read, not written


def test_rope_append_into_a_ring_buffer_wraps():
    """A sliding-window layer's ring of 5 slots: a 2-token row at length 9 writes positions 9 and 10 into slots 4
    and 0 (rotated by their positions), nothing else; the length counts positions."""
    H, HKV, D, B, L, SLOTS = 2, 1, 16, 1, 2, 5
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((B * L, (H + 2 * HKV) * D)).astype(np.float32)
    cos, sin = reference.rope_tables(D, 20, 10000.0)
    k_cache = np.full((B, HKV, SLOTS, D), np.nan, np.float32)
    dk, dv = cuda.to_device(k_cache), cuda.to_device(k_cache.copy())
    lengths = cuda.to_device(np.array([9], np.int32))
    rowwise.make_rope_append(H, HKV, D)[rowwise.rope_append_grid(L, B), rowwise.THREADS](
        cuda.to_device(qkv), cuda.to_device(cos), cuda.to_device(sin), dk, dv, lengths, cuda.to_device(np.zeros(1, np.int32)))
    assert lengths.copy_to_host().tolist() == [11]
    heads = qkv.reshape(B, L, H + 2 * HKV, D).transpose(0, 2, 1, 3)
    got_k, got_v = dk.copy_to_host(), dv.copy_to_host()
    k_want = reference.rope(heads[0, H:H + HKV], cos[9:11], sin[9:11])        # [HKV, 2, D]
    np.testing.assert_allclose(got_k[0, :, [4, 0]].transpose(1, 0, 2), k_want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got_v[0, :, [4, 0]].transpose(1, 0, 2), heads[0, H + HKV:])
    assert np.isnan(got_k[0, :, 1:4]).all() and np.isnan(got_v[0, :, 1:4]).all()
