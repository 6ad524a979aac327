"""numbattn/reference.py, pinned to definitions that share no code with it (the oracle must be right by itself)."""
import numpy as np
import pytest

from numbattn import reference


def test_causal_mask_square_is_the_lower_triangle():
    for n in (1, 2, 7):
        np.testing.assert_array_equal(reference.causal_mask(n, n), np.tril(np.ones((n, n), bool)))


def test_causal_mask_with_more_keys_is_bottom_right_aligned():
    """3 new queries over 5 keys (2 cached): the last query is the newest token and sees every key."""
    want = np.array([[1, 1, 1, 0, 0],
                     [1, 1, 1, 1, 0],
                     [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(reference.causal_mask(3, 5), want)
    np.testing.assert_array_equal(reference.causal_mask(1, 4), np.ones((1, 4), bool))


def test_silu_and_swiglu_interleaved_match_their_definitions():
    x = np.linspace(-30, 30, 13)
    np.testing.assert_allclose(reference.silu(x), x / (1 + np.exp(-x)), rtol=1e-9, atol=1e-15)
    gate, up = np.arange(4.0), np.arange(4.0) + 10
    fused = np.empty(8)
    fused[0::2], fused[1::2] = gate, up
    np.testing.assert_allclose(reference.swiglu_interleaved(fused), reference.silu(gate) * up)


def test_window_mask_is_transformers_sliding_window():
    """Query i at absolute position p = i + kv_len - q_len sees key j iff p - window < j <= p, written as loops."""
    for q_len, kv_len, window in ((5, 5, 1), (5, 5, 2), (3, 8, 3), (4, 9, 20), (1, 6, 4)):
        want = np.array([[i + kv_len - q_len - window < j <= i + kv_len - q_len for j in range(kv_len)]
                         for i in range(q_len)])
        np.testing.assert_array_equal(reference.visible(q_len, kv_len, True, window), want)
    np.testing.assert_array_equal(reference.visible(3, 5, True, None), reference.causal_mask(3, 5))
    np.testing.assert_array_equal(reference.visible(3, 5, False, None), np.ones((3, 5), bool))


def test_a_window_needs_causal():
    with pytest.raises(ValueError, match="needs causal=True"):
        reference.visible(2, 2, False, 1)


def test_windowed_attention_is_attention_over_the_window_only():
    """Each query row, alone, over exactly the keys its window holds: the same as the masked attention."""
    rng = np.random.default_rng(1)
    q, (k, v) = rng.standard_normal((1, 2, 6, 8)), rng.standard_normal((2, 1, 1, 9, 8))
    got = reference.attention(q, k, v, causal=True, window=3)
    for i in range(6):
        p = i + 3
        want = reference.attention(q[:, :, i:i + 1], k[:, :, p - 2:p + 1], v[:, :, p - 2:p + 1])
        np.testing.assert_allclose(got[:, :, i:i + 1], want, rtol=1e-12)


def test_soft_cap_squeezes_scores_into_the_cap():
    s = np.array([-1e4, -50.0, -1.0, 0.0, 1e-3, 30.0, 1e4])
    np.testing.assert_allclose(reference.soft_cap(s, 50.0), 50 * np.tanh(s / 50), rtol=1e-15)
    assert np.abs(reference.soft_cap(s, 50.0)).max() <= 50 and reference.soft_cap(s, None) is s
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((1, 1, 4, 8)) * 30, rng.standard_normal((1, 1, 4, 8)), rng.standard_normal((1, 1, 4, 8))
    w = np.exp(reference.soft_cap(q[0, 0] @ k[0, 0].T / np.sqrt(8), 5.0))
    np.testing.assert_allclose(reference.attention(q, k, v, softcap=5.0)[0, 0], w @ v[0, 0] / w.sum(-1, keepdims=True),
                               rtol=1e-12)


def test_decode_window_sees_each_rows_last_tokens():
    rng = np.random.default_rng(3)
    q, (k, v) = rng.standard_normal((2, 2, 8)), rng.standard_normal((2, 2, 1, 7, 8))
    lengths = np.array([7, 2])
    got = reference.decode_attention(q, k, v, lengths, window=3, softcap=4.0)
    for b, n in enumerate(lengths):
        first = max(0, n - 3)
        want = reference.attention(q[b:b + 1, :, None], k[b:b + 1, :, first:n], v[b:b + 1, :, first:n], softcap=4.0)
        np.testing.assert_allclose(got[b], want[0, :, 0], rtol=1e-12)
