"""numbattn/linear.py: the GEMV (one token) and the GEMM (a chunk) against reference.linear in float64.

Weights go in as raw words, bf16 (4 per uint64), fp16 (4) or fp32 (2 per uint64), as the GPU engine uploads them,
or as GGUF blocks in numbattn's layout (numbattn/blocks.py), whose NumPy dequantization is the weight the float64
reference multiplies. Sizes are chosen to break wrong code: K not a multiple of 32 lanes' words, N not a multiple of
the rows a block covers, M not a multiple of the GEMM's row tile, K-quant rows of two super-blocks, outputs
NaN-poisoned. Tolerance: 1e-5 relative to the largest value (fp32 sums over <= 512 terms land near 1e-7; the
tensor-core GEMM's x in two bf16 terms near 2e-6).
"""
import numpy as np
import pytest
from numba import cuda

from gguf_files import random_blocks

from numbattn import blocks
from numbattn import linear as L
from numbattn import reference
from numbattn.kernels.gemm import GEMM_TILES, make_gemm
from numbattn.kernels.gemm_mma import MmaTiles, make_gemm_mma, shared_bytes
from tinyllm.weights import bf16_to_f32, f32_to_bf16

RTOL = 1e-5


def weight(rng, n, k, kind):
    """-> (host weight as the kernel reads it: bf16 bits or fp32, its exact float64 value)."""
    w = rng.standard_normal((n, k)).astype(np.float32)
    if kind == "bf16":
        bits = f32_to_bf16(w)
        return bits, bf16_to_f32(bits).astype(np.float64)
    return w, w.astype(np.float64)


def block_weight(rng, n, k, kind):
    """-> (words in numbattn's block layout, their exact float64 value): random GGUF blocks (every code and packed
    scale pattern), their scales kept small."""
    words = blocks.pack(kind, random_blocks(rng, blocks.BLOCK_KINDS[kind].ggml, n, k), k)
    return words, blocks.dequantize(kind, words, k).astype(np.float64)


def run(x, w_host, kind, epilogue, out_init, norm=None, eps=1e-5):
    words, got_kind = (w_host, kind) if kind in blocks.BLOCK_KINDS else L.pack_weight(w_host)
    assert got_kind == kind
    out = cuda.to_device(out_init.astype(np.float32))
    L.linear(cuda.to_device(x), cuda.to_device(words), kind, out, epilogue,
             norm_w=None if norm is None else cuda.to_device(norm), eps=eps)
    return out.copy_to_host()


def want(x, w64, epilogue, out_init, norm=None, eps=1e-5):
    x = x.astype(np.float64)
    if norm is not None:
        x = reference.rms_norm(x, norm.astype(np.float64), eps)
    y = reference.linear(x, w64)
    if epilogue == "swiglu":
        return reference.swiglu_interleaved(y)
    if epilogue == "geglu":
        return reference.geglu_interleaved(y)
    return y + out_init if epilogue == "residual" else y


def close(got, expect):
    assert np.isfinite(got).all(), "unwritten (NaN) outputs"
    err = np.abs(got - expect).max() / np.abs(expect).max()
    assert err < RTOL, f"relative error {err:.2e} >= {RTOL:.0e}"


@pytest.mark.parametrize("kind", ["bf16", "f32"])
@pytest.mark.parametrize("epilogue", L.EPILOGUES)
@pytest.mark.parametrize("n_tokens,n_in,n_out", [(1, 40, 6), (2, 72, 10), (11, 20, 18), (20, 40, 26)])
# GEMV, GEMV, GEMM (bf16: on tensor cores, split-K tiles), GEMM (bf16: the other tiles, 2 row blocks, a partial one)
def test_linear_matches_reference(kind, epilogue, n_tokens, n_in, n_out):
    rng = np.random.default_rng(n_tokens * 1000 + n_in + n_out)
    x = rng.standard_normal((n_tokens, n_in)).astype(np.float32)
    w_host, w64 = weight(rng, n_out, n_in, kind)
    n_y = L.out_features(n_out, epilogue)
    out_init = rng.standard_normal((n_tokens, n_y)) if epilogue == "residual" else np.full((n_tokens, n_y), np.nan)
    close(run(x, w_host, kind, epilogue, out_init), want(x, w64, epilogue, out_init))


@pytest.mark.parametrize("kind", ["bf16", "f32"])
def test_gemv_with_fused_rmsnorm(kind):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((2, 72)) * 3).astype(np.float32)
    norm = (1 + 0.1 * rng.standard_normal(72)).astype(np.float32)
    w_host, w64 = weight(rng, 10, 72, kind)
    out_init = np.full((2, 10), np.nan)
    close(run(x, w_host, kind, "none", out_init, norm=norm), want(x, w64, "none", out_init, norm=norm))


@pytest.mark.parametrize("lengths,tokens", [([5], 3), ([5, 2], 2)])
def test_gemv_rope_epilogue_rotates_q_and_appends_k_and_v(lengths, tokens):
    """The decode path's q/k/v GEMV with RMSNorm, RoPE and the KV append fused: q rotated by each token's position
    (its row's length + its index) in out, k rotated and v in the cache there, nothing else written, the lengths
    advanced by the launch and its tickets left at zero. 2 query heads, 1 KV head, head_dim 8."""
    H, HKV, D, K, max_len = 2, 1, 8, 24, 12
    B = len(lengths)
    rng = np.random.default_rng(sum(lengths))
    x = rng.standard_normal((B * tokens, K)).astype(np.float32)
    norm = (1 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    bits, w64 = weight(rng, (H + 2 * HKV) * D, K, "bf16")
    cos, sin = reference.rope_tables(D, max_len, 10000.0)
    kernel, grid, threads = L.plan_qkv_rope(B * tokens, K, w64.shape[0], "bf16", (H, HKV, D), True)
    dev = {name: cuda.to_device(a) for name, a in dict(
        x=x, w=L.pack_weight(bits)[0], out=np.full((B * tokens, w64.shape[0]), np.nan, np.float32), norm=norm,
        cos=cos, sin=sin, k=np.full((B, HKV, max_len, D), np.nan, np.float32),
        v=np.full((B, HKV, max_len, D), np.nan, np.float32), lengths=np.array(lengths, np.int32),
        counters=np.zeros(B, np.int32)).items()}
    kernel[grid, threads](dev["x"], dev["w"], dev["out"], dev["norm"], np.float32(1e-5), dev["cos"], dev["sin"],
                          dev["k"], dev["v"], dev["lengths"], dev["counters"])
    y = reference.rms_norm(x.astype(np.float64), norm.astype(np.float64), 1e-5) @ w64.T     # [M, (H + 2 Hkv) D]
    y = y.reshape(B, tokens, H + 2 * HKV, D).transpose(0, 2, 1, 3)                            # [B, heads, t, D]
    out, k, v = (dev[n].copy_to_host() for n in ("out", "k", "v"))
    for b, start in enumerate(lengths):
        pos = slice(start, start + tokens)
        rotated = reference.rope(y[b:b + 1, :H + HKV], cos[pos], sin[pos])[0]                 # [H + Hkv, t, D]
        q = out[b * tokens:(b + 1) * tokens, :H * D].reshape(tokens, H, D).transpose(1, 0, 2)
        close(q, rotated[:H])
        close(k[b, :, pos], rotated[H:])
        close(v[b, :, pos], y[b, H + HKV:])
        assert np.isnan(np.delete(k[b], np.arange(start, start + tokens), axis=1)).all()
    assert np.isnan(out[:, H * D:]).all()                     # the k and v columns of out: never written
    assert dev["lengths"].copy_to_host().tolist() == [n + tokens for n in lengths]
    assert dev["counters"].copy_to_host().tolist() == [0] * B


# (M, K, N) per block size: K-quant rows of two super-blocks in the GEMV; the tensor-core GEMM's 2 column blocks (the
# second partial) at 32-value blocks, one partial one at 256 (the tile loads do not depend on the kind; the
# simulator's MMA twin costs ~1 s a block at K = 256)
BLOCK_SHAPES = {32: [(1, 96, 6), (2, 64, 10), (7, 96, 18)], 256: [(1, 512, 6), (2, 256, 10), (7, 256, 10)]}


@pytest.mark.parametrize("kind", list(blocks.BLOCK_KINDS))
def test_gguf_blocks_gemv_and_tensor_core_gemm(kind):
    """Every block kind: the GEMV at 1 token (with the RMSNorm prologue) and 2 (SwiGLU epilogue), and a 7-token
    chunk on the tensor cores (residual epilogue; a partial row block, partial column blocks)."""
    rng = np.random.default_rng(len(kind))
    for (m, k, n), (epilogue, norm) in zip(BLOCK_SHAPES[blocks.BLOCK_KINDS[kind].block],
                                           [("none", True), ("swiglu", False), ("residual", False)]):
        x = rng.standard_normal((m, k)).astype(np.float32)
        words, w64 = block_weight(rng, n, k, kind)
        g = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32) if norm else None
        n_y = L.out_features(n, epilogue)
        out_init = rng.standard_normal((m, n_y)) if epilogue == "residual" else np.full((m, n_y), np.nan)
        close(run(x, words, kind, epilogue, out_init, norm=g), want(x, w64, epilogue, out_init, norm=g))


@pytest.mark.parametrize("kind", ["f16", "q4_1", "q6_k"])
def test_the_simt_gemm_reads_fp16_words_and_gguf_blocks(kind):
    """The SIMT GEMM (GPUs without bf16 tensor cores, and fp16 weights): its W tile dequantized while staged."""
    rng = np.random.default_rng(11)
    k, m = 256 if kind == "q6_k" else 64, 5                # m: one partial row block; 34 rows: a partial column block
    x = rng.standard_normal((m, k)).astype(np.float32)
    if kind == "f16":
        half = rng.standard_normal((34, k)).astype(np.float16)
        words, w64 = half.view(np.uint64), half.astype(np.float64)
    else:
        words, w64 = block_weight(rng, 34, k, kind)
    out = cuda.to_device(np.full((m, 34), np.nan, np.float32))
    bm, bn, _, threads = GEMM_TILES
    make_gemm(kind)[L.gemm_grid(m, 34, GEMM_TILES), threads](cuda.to_device(x), cuda.to_device(words), out)
    close(out.copy_to_host(), x.astype(np.float64) @ w64.T)


def test_bf16_words_are_the_checkpoint_bits():
    """A weight of exact bf16 values gives the same product (up to fp32 summation order: 4 vs 2 values per word)
    whether it is sent as bf16 words or as fp32 words: the bf16 widening is exact."""
    rng = np.random.default_rng(8)
    bits, w64 = weight(rng, 6, 40, "bf16")
    x = rng.standard_normal((1, 40)).astype(np.float32)
    nan = np.full((1, 6), np.nan)
    np.testing.assert_allclose(run(x, bits, "bf16", "none", nan), run(x, bf16_to_f32(bits), "f32", "none", nan),
                               rtol=1e-6, atol=1e-6)


def test_bad_shapes_and_dtypes_are_refused():
    x = cuda.to_device(np.zeros((1, 40), np.float32))
    words, _ = L.pack_weight(np.zeros((6, 40), np.uint16))
    w = cuda.to_device(words)
    with pytest.raises(ValueError, match="out has shape"):
        L.linear(x, w, "bf16", cuda.to_device(np.zeros((1, 5), np.float32)))
    with pytest.raises(ValueError, match="x has shape"):
        L.linear(cuda.to_device(np.zeros((1, 44), np.float32)), w, "bf16", cuda.to_device(np.zeros((1, 6), np.float32)))
    with pytest.raises(ValueError, match="expected a 2-D float32"):
        L.linear(cuda.to_device(np.zeros((1, 40), np.float64)), w, "bf16", cuda.to_device(np.zeros((1, 6), np.float32)))
    with pytest.raises(ValueError, match="multiple of 4"):
        L.pack_weight(np.zeros((6, 42), np.uint16))
    q_words = cuda.to_device(np.zeros((6, blocks.row_words("q4_k", 256)), np.uint64))
    with pytest.raises(ValueError, match="not the 36 of a row of 512 q4_k values"):       # words of K = 256
        L.linear(cuda.to_device(np.zeros((1, 512), np.float32)), q_words, "q4_k",
                 cuda.to_device(np.zeros((1, 6), np.float32)))
    with pytest.raises(ValueError, match="kind='q3_k'"):
        L.linear(x, w, "q3_k", cuda.to_device(np.zeros((1, 6), np.float32)))


# ---- the tensor-core GEMM (kernels/gemm_mma.py) -----------------------------------------------------------------
def mma_run(x, bits, tiles, terms, epilogue="none", chunked=True):
    words, _ = L.pack_weight(bits)
    n_y = L.out_features(bits.shape[0], epilogue)
    out = cuda.to_device(np.full((x.shape[0], n_y), np.nan, np.float32))
    kernel = make_gemm_mma(epilogue, tiles, terms, chunked)
    kernel[L.gemm_grid(x.shape[0], bits.shape[0], tiles), tiles.threads](cuda.to_device(x), cuda.to_device(words), out)
    return out.copy_to_host()


def test_gemm_mma_terms_set_the_accuracy():
    """x split into T bf16 terms: one term is bf16 activations (~2^-9), two ~2^-17, three exact; the weights are
    exact (bf16 as stored). K = 72: a partial last K tile; M = 16 and N = 16: one block of 2 warps splitting K."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((16, 72)).astype(np.float32)
    bits, w64 = weight(rng, 16, 72, "bf16")
    want = x.astype(np.float64) @ w64.T
    errs = {}
    for terms in (1, 2, 3):
        got = mma_run(x, bits, MmaTiles(16, 16, 32, 1, 1, 2), terms)
        assert np.isfinite(got).all()
        errs[terms] = np.abs(got - want).max() / np.abs(want).max()
    assert 1e-4 < errs[1] < 1e-2 and errs[2] < 1e-5 and errs[3] < 1e-6, errs


def test_gemm_mma_accumulating_in_the_tensor_cores_throughout():
    """chunked=False (no per-K-tile fp32 sums), 2 warps over the rows, 2 row blocks: within 1e-5 (on a GPU the
    tensor cores' own accumulation rounds; test_gemm_mma_at_tinyllama_sizes holds the default to it at size)."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((17, 48)).astype(np.float32)
    bits, w64 = weight(rng, 24, 48, "bf16")
    out = mma_run(x, bits, MmaTiles(32, 16, 16, 2, 1, 1), 2, chunked=False)
    close(out, x.astype(np.float64) @ w64.T)


def test_tile_shapes_that_do_not_divide_are_refused():
    with pytest.raises(ValueError, match="gemm_mma tiles"):
        make_gemm_mma("none", MmaTiles(24, 16, 32, 1, 1, 1))
    with pytest.raises(ValueError, match="terms"):
        make_gemm_mma("none", MmaTiles(16, 16, 32, 1, 1, 2), terms=4)


def test_every_gpu_tile_class_fits_and_the_planned_lengths_cover_every_kernel(monkeypatch):
    """The GPU's tiles fit in 48 KB of static shared memory with up to 3 terms; and the lengths a model compiles
    ahead (token_classes) reach every kernel choice a chunk of 1 .. max tokens makes (GEMV counts, tile classes)."""
    for _, tiles in L.GPU_MMA_TILE_CLASSES:
        assert shared_bytes(tiles, 3) <= 48 * 1024, tiles
    monkeypatch.setattr(L, "MMA_TILE_CLASSES", L.GPU_MMA_TILE_CLASSES)
    for most in (3, 16, 200, 2048):
        planned = {choice(n, k) for n in L.token_classes(most) for k in (2048, 5632)}
        assert {choice(n, k) for n in range(1, most + 1) for k in (2048, 5632)} <= planned, most
    assert L.token_classes(2048) == [1, 2, 3, 4, 16, 64, 2048] and L.token_classes(3) == [1, 2, 3]


def choice(n_tokens, n_in):
    """What plan_matmul would launch for a chunk of n_tokens (without building kernels)."""
    return ("gemv", n_tokens) if L.use_gemv(n_tokens, n_in) else ("mma", L.mma_tiles(n_tokens))


def test_a_few_tokens_with_a_wide_x_take_the_gemm():
    """3 tokens of TinyLlama's down projection (K = 5632): x does not fit the GEMV's shared memory, so a GEMM."""
    assert not L.use_gemv(3, 5632) and L.use_gemv(2, 5632) and L.use_gemv(4, 2048)
    kernel, grid, threads, gemv = L.plan_matmul(3, 5632, 2048, "bf16", "residual")
    assert not gemv and threads == L.mma_tiles(3).threads


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1", "q4_k", "q6_k"])
@pytest.mark.parametrize("m,n,k,epilogue", [(1, 11264, 2048, "swiglu"), (4, 2048, 5632, "residual"),
                                            (16, 2560, 2048, "none"), (37, 2048, 5632, "residual"),
                                            (512, 11264, 2048, "swiglu")])
def test_gguf_blocks_at_tinyllama_sizes(kind, m, n, k, epilogue):
    """The block kinds of llama.cpp's common files in the GEMV (1 and 4 tokens) and every tensor-core tile class, at
    TinyLlama's matrices, against float64 on the blocks' NumPy dequantization at 1e-5."""
    rng = np.random.default_rng(m + n + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    words, w64 = block_weight(rng, n, k, kind)
    out_init = np.full((m, L.out_features(n, epilogue)), np.nan)
    if epilogue == "residual":
        out_init = rng.standard_normal(out_init.shape)
    close(run(x, words, kind, epilogue, out_init), want(x, w64, epilogue, out_init))


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,epilogue", [(512, 2560, 2048, "none"), (2048, 2048, 5632, "residual"),
                                            (16, 11264, 2048, "swiglu"), (37, 2048, 2048, "none"),
                                            (300, 2048, 5632, "residual")])
def test_gemm_mma_at_tinyllama_sizes(m, n, k, epilogue):
    """Every tile class at TinyLlama's matrices, against float64 at 1e-5 (the tensor cores' fp32 accumulation
    included)."""
    rng = np.random.default_rng(m + n + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bits, w64 = weight(rng, n, k, "bf16")
    out_init = np.full((m, L.out_features(n, epilogue)), np.nan)
    if epilogue == "residual":
        out_init = rng.standard_normal(out_init.shape)
    close(run(x, bits, "bf16", epilogue, out_init), want(x, w64, epilogue, out_init))
