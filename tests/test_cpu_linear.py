"""numbattn/cpu_linear.py: the CPU's Numba kernels on GGUF blocks against reference.linear in float64 on the blocks'
NumPy dequantization (numbattn/blocks.py), and the NumPy engine keeping a GGUF file's blocks against the same file
dequantized to fp32 (its reference arithmetic).

Shapes break wrong code: K-quant rows of two super-blocks, rows that are not a multiple of the kernels' row
blocks, one token (the GEMV) and more than GEMV_TOKENS (dequantized panels and BLAS), a panel count that does not
divide the rows, outputs never pre-filled. Tolerance 1e-5 relative to the largest value (fp32 sums of <= 512 terms).
"""
import numpy as np
import pytest
from gguf_files import random_blocks, write_gguf

from numbattn import blocks, cpu_linear
from numbattn.cpu_linear import BlockMatrix
from tinyllm import load_model, make_tiny

RTOL = 1e-5


def block_matrix(rng, kind, n, k):
    words = blocks.pack(kind, random_blocks(rng, blocks.BLOCK_KINDS[kind].ggml, n, k), k)
    return BlockMatrix(kind, words, k), blocks.dequantize(kind, words, k).astype(np.float64)


@pytest.mark.parametrize("kind", list(blocks.BLOCK_KINDS))
def test_x_times_w_transposed_on_blocks(kind, monkeypatch):
    """1 and 2 tokens (the GEMV), 5 tokens (panels of 16 rows: 70 rows = 4 panels, the last partial), [b, s, K]."""
    monkeypatch.setattr(cpu_linear, "PANEL_ROWS", 16)
    rng = np.random.default_rng(len(kind))
    k = 512 if blocks.BLOCK_KINDS[kind].block == 256 else 96
    w, w64 = block_matrix(rng, kind, 70, k)
    assert w.shape == (70, k) and w.T.shape == (k, 70) and w.T.T is w
    for shape in ((1, k), (2, k), (5, k), (2, 3, k)):
        x = rng.standard_normal(shape).astype(np.float32)
        got = x @ w.T
        want = x.astype(np.float64) @ w64.T
        assert got.shape == shape[:-1] + (70,) and got.dtype == np.float32
        assert np.abs(got - want).max() <= RTOL * np.abs(want).max(), shape


def test_rows_are_the_numpy_statement():
    rng = np.random.default_rng(1)
    w, w64 = block_matrix(rng, "q4_k", 9, 256)
    ids = np.array([[3, 0], [8, 3]])
    assert np.array_equal(w[ids], w64[ids].astype(np.float32))


def test_bad_matrices_and_operands_are_refused():
    rng = np.random.default_rng(2)
    w, _ = block_matrix(rng, "q8_0", 4, 64)
    with pytest.raises(ValueError, match=r"x has shape \(1, 32\); expected \[..., 64\]"):
        np.zeros((1, 32), np.float32) @ w.T
    with pytest.raises(ValueError, match="expected uint64 rows of 9 words"):
        BlockMatrix("q8_0", np.zeros((4, 16), np.uint64), 64)
    with pytest.raises(ValueError, match="the CPU kernels read"):
        BlockMatrix("bf16", np.zeros((4, 16), np.uint64), 64)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """A miniature whose rows split into K-quant super-blocks (256), one layer."""
    return make_tiny(tmp_path_factory.mktemp("wide"), hidden_size=256, intermediate_size=512, num_hidden_layers=1)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0", "Q4_K_M"])
def test_the_numpy_engine_on_blocks_equals_it_on_fp32(tmp_path, wide_dir, qtype):
    """The same GGUF file, kept as blocks (the default) or dequantized to fp32 (the oracle): a prompt's logits, the
    tied output head (Q8_0 here: the embedding's blocks), and a decode step. Q4_K_M mixes Q4_K and Q6_K."""
    path = write_gguf(tmp_path / f"m.{qtype}.gguf", wide_dir, qtype)
    kept, oracle = load_model(path, backend="numpy"), load_model(path, backend="numpy", weights="fp32")
    assert "blocks (GGUF, as stored)" in kept.describe() and "blocks" not in oracle.describe()
    ids = np.random.default_rng(0).integers(3, 500, (1, 9))
    for start in (0, 9):
        step = ids if start == 0 else ids[:, :1]
        got, want = kept.forward(step, start_pos=start), oracle.forward(step, start_pos=start)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_the_numpy_engine_refuses_bf16_weights(tmp_path, wide_dir):
    with pytest.raises(ValueError, match="the NumPy engine keeps 'as-stored'"):
        load_model(write_gguf(tmp_path / "m.gguf", wide_dir, "Q8_0"), backend="numpy", weights="bf16")
