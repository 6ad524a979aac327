"""numbattn/cpu_linear.py: the CPU's Numba kernels on GGUF blocks against reference.linear in float64 on the blocks'
NumPy dequantization (numbattn/blocks.py), and the NumPy engine keeping a GGUF file's blocks against the same file
dequantized to fp32 (its reference arithmetic).

Shapes break wrong code: K-quant rows of two super-blocks, rows that are not a multiple of the kernels' row
blocks, one token (the GEMV) and more than GEMV_TOKENS (dequantized panels and BLAS), a panel count that does not
divide the rows, outputs never pre-filled. Tolerance 1e-5 relative to the largest value (fp32 sums of <= 512 terms).
The int8 GEMV (ACTIVATIONS "q8") is compared with the same float64 product of x rounded as it rounds it
(quantize_q8, itself checked bit for bit against the kernel's quantize).
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from gguf_files import random_blocks, write_gguf

from numbattn import blocks, cpu_linear
from numbattn.cpu_linear import BlockMatrix
from tinyllm import load_model, make_tiny

RTOL = 1e-5
ROOT = Path(__file__).resolve().parent.parent


def block_matrix(rng, kind, n, k):
    words = blocks.pack(kind, random_blocks(rng, blocks.BLOCK_KINDS[kind].ggml, n, k), k)
    return BlockMatrix(kind, words, k), blocks.dequantize(kind, words, k).astype(np.float64)


def q8_rounded(x):
    """x as the int8 GEMV sees it: each group of 32 values dx * q (quantize_q8, the NumPy statement), float64."""
    q, dx = cpu_linear.quantize_q8(x.reshape(-1))
    return (q.reshape(-1, 32) * dx[:, None].astype(np.float64)).reshape(x.shape)


@pytest.mark.parametrize("activations", ["fp32", "q8"])
@pytest.mark.parametrize("kind", list(blocks.BLOCK_KINDS))
def test_x_times_w_transposed_on_blocks(kind, activations, monkeypatch):
    """1 and 2 tokens (the GEMV), 3, 5, 6, 9 and 11 tokens (a chunk: with "q8", the int8 gemm, TOKENS tokens a call,
    the last call partial, and a last block of at most FEW_TOKENS (3 alone, 8 + 1, 8 + 3) a token at a time; with
    "fp32" panels of 16 rows: 70 rows = 4 panels, the last partial), [b, s, K]. With "q8", Q8_KINDS quantize x, and
    the reference takes x so quantized."""
    monkeypatch.setattr(cpu_linear, "PANEL_ROWS", 16)
    monkeypatch.setattr(cpu_linear, "ACTIVATIONS", activations)
    rng = np.random.default_rng(len(kind))
    k = 512 if blocks.BLOCK_KINDS[kind].block == 256 else 96
    w, w64 = block_matrix(rng, kind, 70, k)
    assert w.shape == (70, k) and w.T.shape == (k, 70) and w.T.T is w
    for shape in ((1, k), (2, k), (3, k), (5, k), (2, 3, k), (1, 9, k), (1, 11, k)):
        x = rng.standard_normal(shape).astype(np.float32)
        got = x @ w.T
        quantized = activations == "q8" and kind in cpu_linear.Q8_KINDS
        want = (q8_rounded(x) if quantized else x.astype(np.float64)) @ w64.T
        assert got.shape == shape[:-1] + (70,) and got.dtype == np.float32
        assert np.abs(got - want).max() <= RTOL * np.abs(want).max(), shape


def test_the_int8_gemv_quantizes_x_as_the_numpy_statement():
    """quantize (the int8 GEMV's first step) equals quantize_q8 bit for bit, in q8_order, on groups chosen to break
    it: ordinary, all zero, one nonzero, tiny (subnormal), huge, a NaN, an infinity (dx NaN, q 0: the row sums
    become NaN, never a silent number)."""
    rng = np.random.default_rng(7)
    groups = [rng.standard_normal(32), np.zeros(32), np.eye(32)[5] * -3, rng.standard_normal(32) * 1e-40,
              rng.uniform(-1, 1, 32) * 3e38, np.where(np.arange(32) == 9, np.nan, 1.0),
              np.where(np.arange(32) == 0, -np.inf, 2.0)]
    x = np.concatenate(groups).astype(np.float32)
    q_want, dx_want = cpu_linear.quantize_q8(x)
    order = cpu_linear.q8_order("q4_1", x.size)
    assert sorted(order[:32]) == list(range(32))               # a group's 32 columns, paired as the codes are
    q, dx, qsum = np.full(x.size, 99, np.int8), np.full(7, np.nan, np.float32), np.full(7, -1, np.int32)
    cpu_linear.quantize(x, order, q, dx, qsum)
    assert np.array_equal(q, q_want[order]) and np.array_equal(dx, dx_want, equal_nan=True)
    assert np.array_equal(qsum, q.reshape(-1, 32).sum(axis=1))
    assert list(np.isnan(dx)) == [False] * 5 + [True, True] and not q[160:].any()
    assert np.abs(q).max() == 127 and dx[1] == 0 and q[32:64].sum() == 0


def test_an_int8_gemv_row_of_a_nan_group_is_nan(monkeypatch):
    monkeypatch.setattr(cpu_linear, "ACTIVATIONS", "q8")
    w, _ = block_matrix(np.random.default_rng(3), "q4_1", 8, 64)
    x = np.ones((1, 64), np.float32)
    x[0, 40] = np.nan
    assert np.isnan(x @ w.T).all()


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


@pytest.mark.parametrize("activations", ["fp32", "q8"])
@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0", "Q4_K_M"])
def test_the_numpy_engine_on_blocks_equals_it_on_fp32(tmp_path, wide_dir, qtype, activations, monkeypatch):
    """The same GGUF file, kept as blocks (the default) or dequantized to fp32 (the oracle): a prompt's logits, the
    tied output head (Q8_0 here: the embedding's blocks), and a decode step. Q4_K_M mixes Q4_K and Q6_K. With
    int8 activations (the default) every matmul on Q8_KINDS rounds x to 8 bits per group of 32: measured 3e-3 to
    8e-3 of the largest logit on this miniature, so 2e-2 (a wrong kernel is off by the logits' own size), and the
    same top token."""
    monkeypatch.setattr(cpu_linear, "ACTIVATIONS", activations)
    path = write_gguf(tmp_path / f"m.{qtype}.gguf", wide_dir, qtype)
    kept, oracle = load_model(path, backend="numpy"), load_model(path, backend="numpy", weights="fp32")
    assert "blocks (GGUF, as stored)" in kept.describe() and "blocks" not in oracle.describe()
    ids = np.random.default_rng(0).integers(3, 500, (1, 9))
    rtol = 2e-2 if activations == "q8" else 1e-4
    for start in (0, 9):
        step = ids if start == 0 else ids[:, :1]
        got, want = kept.forward(step, start_pos=start), oracle.forward(step, start_pos=start)
        assert np.abs(got - want).max() <= rtol * np.abs(want).max()
        assert (got[0, -1].argmax() == want[0, -1].argmax())


def test_the_numpy_engine_refuses_bf16_weights(tmp_path, wide_dir):
    with pytest.raises(ValueError, match="the NumPy engine keeps 'as-stored'"):
        load_model(write_gguf(tmp_path / "m.gguf", wide_dir, "Q8_0"), backend="numpy", weights="bf16")


def test_the_int8_kernels_without_vnni_are_the_same_statement(tmp_path):
    """The portable IR (one int32 reduce per group and token), which CPUs without VNNI run, compiled on purpose in
    a child process (NUMBATTN_CPU_VNNI=0, its own Numba cache): the GEMV, and the GEMM on 9 tokens (a full call of
    TOKENS and one token alone) and 12 (a full call and a padded one), Q4_1, Q8_0, Q5_1 and Q6_K, against the same
    float64 statement."""
    script = tmp_path / "portable.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        import numpy as np
        from test_cpu_linear import block_matrix, q8_rounded
        from numbattn import cpu_linear
        from numbattn.kernels import cpu_dot
        assert not cpu_dot.VNNI
        for kind, token_counts in (("q4_1", (1, 9, 12)), ("q8_0", (1, 9, 12)), ("q5_1", (1, 9, 12)), ("q6_k", (1, 9, 12))):
            rng = np.random.default_rng(9)
            w, w64 = block_matrix(rng, kind, 12, 256 if kind == "q6_k" else 96)
            for tokens in token_counts:
                x = rng.standard_normal((tokens, w.shape[1])).astype(np.float32)
                want = q8_rounded(x) @ w64.T
                assert np.abs(x @ w.T - want).max() <= 1e-5 * np.abs(want).max(), (kind, tokens)
        print("ok")
    """))
    env = dict(os.environ, NUMBATTN_CPU_VNNI="0", NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_row_stack_gives_each_part_and_shares_its_memory(monkeypatch):
    """[Wq; Wk; Wv] of 70, 6 and 9 rows (not multiples of the GEMV's 4): one call gives the three products, for
    one token (the int8 GEMV) and five (the int8 GEMM); the parts still multiply alone, from the stack's memory."""
    monkeypatch.setattr(cpu_linear, "PANEL_ROWS", 16)
    rng = np.random.default_rng(11)
    parts = [block_matrix(rng, "q4_1", n, 64) for n in (70, 6, 9)]
    stack = cpu_linear.RowStack([w.T for w, _ in parts])
    for tokens in (1, 5):
        x = rng.standard_normal((1, tokens, 64)).astype(np.float32)
        for (w, w64), got in zip(parts, stack.times(x), strict=True):
            want = q8_rounded(x) @ w64.T
            assert got.shape == (1, tokens, w.shape[0])
            assert np.abs(got - want).max() <= RTOL * np.abs(want).max()
            assert np.array_equal(x @ w.T, got) and np.shares_memory(w.words, stack.matrix.words)
    with pytest.raises(ValueError, match="parts of one kind and input length only"):
        cpu_linear.RowStack([parts[0][0], block_matrix(rng, "q8_0", 4, 64)[0]])
    assert not cpu_linear.RowStack.fits([parts[0][0].T, np.zeros((64, 3), np.float32)])
