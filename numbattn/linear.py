"""The linear layers of a Llama on the GPU: y = x W^T for one token (GEMV) and for a prompt chunk (GEMM), host side.

What you will learn here
------------------------
A transformer spends nearly all of its arithmetic in linear layers, y[m, n] = sum_k x[m, k] W[n, k], with W
stored as Hugging Face stores it: [out_features, in_features], row n holding output n's weights (`reference.
linear` is the one-line NumPy version). How to compute it depends on M, the number of tokens:

    decode (M = 1)    every weight is used once per token: 2 FLOPs per weight read, so the time is
                      bytes / bandwidth. The kernel (kernels/gemv.py) streams W at full speed.
    prefill (M large) every weight serves M tokens: the time is FLOPs / FLOP rate. bf16 weights and GGUF
                      blocks go to the tensor cores (kernels/gemm_mma.py: bf16 mma.sync, the fp32 activations
                      split into GEMM_TERMS bf16 terms, fp32 accumulation; a block's integer codes are exact
                      in bf16, its scales applied per k16 step in fp32); fp16 and fp32 weights to the SIMT
                      kernel (kernels/gemm.py), which reuses each loaded value for many FMAs.

Weights arrive as raw bits in 8-byte words: `w` is a uint64 array [N, K / VPW] holding VPW = 4 bf16 values (as
stored in the checkpoint: half the bytes of fp32, exactly widened with a shift, kernels/common.py), 4 fp16 or 2
fp32 values per word; or a GGUF file's quantized blocks, kept as they are (numbattn/blocks.py: code words, high
bits, scale records per row, [N, row words]) and dequantized in registers by every kernel (kernels/blocks.py):
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K. One 8-byte load per lane makes a warp read 256 contiguous bytes
per instruction. The activations are float32 and every sum is accumulated in float32 (the tensor-core GEMM: x in
GEMM_TERMS bf16 terms, products summed in fp32).

Fused into the kernels: an RMSNorm prologue (GEMV), a residual-add epilogue, a SwiGLU or GeGLU epilogue (rows of
W interleave gate and up). The NumPy twins are in numbattn/reference.py; measured speeds are in BENCHMARKS.md.
This module packs weights into words, chooses the kernel and its launch shape (`plan_matmul`, also what
tinyllm's device engine launches), and checks the arguments.
"""
import numpy as np

from . import gpu
from .blocks import BLOCK_KINDS, row_step, row_words
from .gpu import SHARED_LIMIT
from .kernels.common import SIM, WEIGHT_KINDS
from .kernels.gemm import GEMM_TILES, make_gemm
from .kernels.gemm_mma import MmaTiles, make_gemm_mma
from .kernels.gemv import EPILOGUES, GATED, GEMV_THREADS, LANES, ROPE, gemv_rows_per_warp, make_gemv
from .launch import Launch

GEMV_MAX_TOKENS = 4                         # more tokens than this (or an x too big for shared memory): a GEMM
# smaller tiles where the big ones would leave SMs idle (a short chunk, a narrow matrix): more, smaller blocks
GEMM_TILE_CHOICES = (GEMM_TILES,) if SIM else (GEMM_TILES, (64, 64, 16, 256))
GEMM_TERMS = 2                              # bf16 terms per activation in the tensor-core GEMM (~1e-6 relative)
# The tensor-core GEMM's tiles by prompt length: (most tokens, tiles). Short prompts have one row block, so their
# blocks split K among 8 warps (and stay narrow: many blocks stream W at once); longer ones take 64 x 128 tiles
# (>= 128 blocks on TinyLlama's narrowest matrix from 512 tokens on; 169 registers, no spill: 128 x 128 tiles
# reach 255 registers and spill, ptxas says). Chosen without a GPU; benchmarks/tune.py's `gemm_mma` sweep
# measures them and the alternatives on the H100. The simulator runs small tiles of 2 warps.
GPU_MMA_TILE_CLASSES = ((16, MmaTiles(16, 16, 128, 1, 1, 8)), (64, MmaTiles(32, 32, 64, 1, 1, 4)),
                        (None, MmaTiles(64, 128, 32, 2, 4, 1)))
SIM_MMA_TILE_CLASSES = ((16, MmaTiles(16, 16, 32, 1, 1, 2)), (None, MmaTiles(32, 16, 16, 2, 1, 1)))
MMA_TILE_CLASSES = SIM_MMA_TILE_CLASSES if SIM else GPU_MMA_TILE_CLASSES


KINDS = tuple(WEIGHT_KINDS) + tuple(BLOCK_KINDS)
TENSOR_CORE_KINDS = ("bf16",) + tuple(BLOCK_KINDS)        # the GEMMs that run on tensor cores (sm_80 and newer)


def pack_weight(w):
    """A host weight [N, K] (float32, float16, or uint16 bf16 bits) -> (uint64 words [N, K / VPW], kind). GGUF
    blocks are packed by numbattn.blocks.pack."""
    w = np.ascontiguousarray(w)
    kind = {np.dtype(np.uint16): "bf16", np.dtype(np.float16): "f16", np.dtype(np.float32): "f32"}.get(w.dtype)
    if kind is None:
        raise ValueError(f"weight has dtype {w.dtype}; expected float32, float16 or uint16 (bf16 bits)")
    vpw = WEIGHT_KINDS[kind]
    if w.ndim != 2 or w.shape[1] % vpw:
        raise ValueError(f"weight has shape {w.shape}; expected [N, K] with K a multiple of {vpw} ({kind})")
    return w.view(np.uint64), kind


def gemv_grid(n_rows, epilogue):
    rows_per_block = GEMV_THREADS // LANES * gemv_rows_per_warp(epilogue)
    return -(-n_rows // rows_per_block)


def gemm_tiles(n_tokens, n_rows, n_sm=132):
    """The largest tiles whose grid covers (nearly) every SM; else the smallest tiles."""
    for tiles in GEMM_TILE_CHOICES:
        grid = gemm_grid(n_tokens, n_rows, tiles)
        if grid[0] * grid[1] >= 0.9 * n_sm:
            return tiles
    return GEMM_TILE_CHOICES[-1]


def gemm_grid(n_tokens, n_rows, tiles):
    BM, BN = (tiles.bm, tiles.bn) if isinstance(tiles, MmaTiles) else tiles[:2]
    return (-(-n_rows // BN), -(-n_tokens // BM))


def mma_tiles(n_tokens):
    """The tensor-core GEMM's tiles for a chunk of n_tokens (MMA_TILE_CLASSES)."""
    return next(tiles for most, tiles in MMA_TILE_CLASSES if most is None or n_tokens <= most)


def token_classes(max_tokens):
    """Chunk lengths <= max_tokens that between them use every matmul kernel a chunk of 1 .. max_tokens tokens can
    use (one per GEMV token count and per GEMM tile class): what a model compiles ahead of its first reply."""
    lengths, low = list(range(1, min(GEMV_MAX_TOKENS, max_tokens) + 1)), GEMV_MAX_TOKENS
    for most, _ in MMA_TILE_CLASSES:
        top = max_tokens if most is None else min(most, max_tokens)
        if top > low:
            lengths.append(top)
        low = max(low, top)
    return lengths


def use_gemv(n_tokens, n_in):
    """The GEMV for a few tokens whose x fits in its shared memory (fp32), else a GEMM."""
    return n_tokens <= GEMV_MAX_TOKENS and n_tokens * n_in * 4 <= SHARED_LIMIT


def tensor_cores():
    """bf16 mma.sync needs sm_80 or newer (the simulator runs the twins)."""
    return SIM or gpu.compute_capability() >= (8, 0)


def plan_matmul(n_tokens, n_in, n_rows, kind, epilogue, rmsnorm=False):
    """-> (kernel, grid, threads, gemv) for out (=, +=) x W^T with x [n_tokens, n_in], W [n_rows, n_in] of `kind`.
    The GEMV takes (x, w, out, norm_w, eps), a GEMM (x, w, out); the fused RMSNorm is the GEMV's only."""
    if use_gemv(n_tokens, n_in):
        kernel = make_gemv(n_in, kind, n_tokens, epilogue, rmsnorm)
        return kernel, gemv_grid(n_rows, epilogue), GEMV_THREADS, True
    if rmsnorm:
        raise ValueError(f"the RMSNorm prologue is fused into the GEMV only ({n_tokens} tokens of {n_in} inputs)")
    if kind in TENSOR_CORE_KINDS and tensor_cores():
        tiles = mma_tiles(n_tokens)
        kernel = make_gemm_mma(epilogue, tiles, GEMM_TERMS, True, kind)
        return kernel, gemm_grid(n_tokens, n_rows, tiles), tiles.threads, False
    tiles = gemm_tiles(n_tokens, n_rows)
    return make_gemm(kind, epilogue, tiles), gemm_grid(n_tokens, n_rows, tiles), tiles[3], False


# --------------------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------------------
def out_features(n_rows, epilogue):
    return n_rows // 2 if epilogue in GATED else n_rows


def check_linear(x, w, kind, out, epilogue, norm_w):
    """x [M, K] float32, w [N, row words] uint64 words, out [M, N] float32 ([M, N / 2] for swiglu and geglu)."""
    if kind not in KINDS or epilogue not in EPILOGUES:
        raise ValueError(f"kind={kind!r}, epilogue={epilogue!r}: expected one of {KINDS} and {EPILOGUES}")
    for name, a, dtype in (("x", x, np.float32), ("w", w, np.uint64), ("out", out, np.float32)):
        if len(a.shape) != 2 or np.dtype(a.dtype) != dtype:
            raise ValueError(f"{name} has shape {tuple(a.shape)} and dtype {np.dtype(a.dtype).name}; expected a "
                             f"2-D {np.dtype(dtype).name} array")
    (m, k), (n, words) = x.shape, w.shape
    if k % row_step(kind) or words != row_words(kind, k) or (epilogue in GATED and n % 2):
        raise ValueError(f"x has shape {tuple(x.shape)} but w has {n} rows of {words} words, not the "
                         f"{row_words(kind, k - k % row_step(kind))} of a row of {k} {kind} values"
                         f"{f'; {epilogue} needs an even row count' * (n % 2)}")
    if tuple(out.shape) != (m, out_features(n, epilogue)):
        raise ValueError(f"out has shape {tuple(out.shape)}; expected {(m, out_features(n, epilogue))}")
    if norm_w is not None and tuple(norm_w.shape) != (k,):
        raise ValueError(f"norm_w has shape {tuple(norm_w.shape)}; expected ({k},)")


def plan_qkv_rope(n_tokens, n_in, n_rows, kind, heads, rmsnorm):
    """-> (kernel, grid, threads) of the q/k/v GEMV with RoPE and the KV-cache append fused (kernels/gemv.py, epilogue
    "rope"; heads = (n_heads, n_kv_heads, head_dim)) for a few tokens, or None where x does not fit the GEMV (the
    caller then runs a GEMM and rowwise.rope_append). Its arguments: (x, w, out, norm_w, eps, cos, sin, k_cache,
    v_cache, lengths, counters)."""
    if not use_gemv(n_tokens, n_in):
        return None
    return make_gemv(n_in, kind, n_tokens, ROPE, rmsnorm, heads), gemv_grid(n_rows, ROPE), GEMV_THREADS


def linear_launch(x, w, kind, out, epilogue="none", norm_w=None, eps=1e-5, stream=0):
    """A prepared Launch computing out (=, +=) x W^T on device arrays (see the module docstring); the GEMV for
    a few tokens, else a GEMM (plan_matmul; norm_w, the fused RMSNorm, is GEMV-only)."""
    check_linear(x, w, kind, out, epilogue, norm_w)
    m, k = x.shape
    kernel, grid, threads, gemv = plan_matmul(m, k, w.shape[0], kind, epilogue, norm_w is not None)
    if gemv:
        nw = norm_w if norm_w is not None else x[0]        # an unused float32 [K] array
        return Launch(kernel, grid, threads, (x, w, out, nw, np.float32(eps)), stream)
    return Launch(kernel, grid, threads, (x, w, out), stream)


def linear(x, w, kind, out, epilogue="none", norm_w=None, eps=1e-5, stream=0):
    """out (=, +=) x W^T on device arrays, one launch; returns out."""
    linear_launch(x, w, kind, out, epilogue, norm_w, eps, stream)()
    return out
