"""numbattn/reference.py, pinned to definitions that share no code with it (the oracle must be right by itself)."""
import numpy as np

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
