"""The row-wise steps of a Llama block on the GPU: embedding lookup, RMSNorm, and RoPE fused with the KV-cache append.

What you will learn here
------------------------
Beside attention and the matmuls, a Llama forward has three small steps. Each reads and writes one row of
activations per token, so each is bound by memory traffic (a few KB per token) and, at batch 1, by the launch
itself: their kernels are one block per token row, simple loops, no tiling.

    embed        x[m] = E[ids[m]]: a row gather from the embedding table, bf16 (fp16, fp32) words widened to
                 fp32, or GGUF blocks dequantized (kernels/blocks.py). The token ids come from device memory, so a decode step needs no kernel argument that
                 changes between tokens (it can be replayed as a CUDA graph, numbattn/launch.py).
                 # ids [M] i32, E [vocab, dim/VPW] u64 -> x [M, dim]
    rms_norm     y[m] = x[m] / sqrt(mean(x[m]^2) + eps) * g: a block-wide sum of squares, then a scaled copy.
                 (For one token the GEMV normalises x itself while staging it: kernels/gemv.py.) With add, y +=
                 instead: Gemma's norm of a block's output on its way into the residual stream.
                 # x [M, dim], g [dim] -> y [M, dim]
    rope_append  the new tokens' q and k rotated by their positions (rotate-half pairs (i, i + d/2), angles from
                 precomputed cos/sin tables), q in place, k and v written into the KV cache at each row's
                 length (position p in slot p mod S: a sliding-window layer's ring buffer wraps, a full layer,
                 S = max_len, never does), and the row lengths advanced, all in one launch. The positions are read
                 from the cache
                 lengths on the device (token i of row b sits at lengths[b] + i), so again nothing per-step is
                 a kernel argument. Several blocks share a row; the last to finish advances lengths[b]
                 (kv_append.advance_length, the same as the cache's own append), so no block can read a
                 half-updated length.
                 # qkv [B*L, (H + 2 Hkv) * D] (q rotated in place), cos/sin [max_len, D/2],
                 # k/v cache [B, Hkv, S, D], lengths [B] i32 (+= L), counters [B] i32 (zero)
The NumPy twins are reference.rms_norm and reference.rope (and a plain slice for the embedding).
"""
import functools
import math

from numba import cuda, float32, int64

from ..blocks import values_per_word
from .blocks import make_row_offsets, make_unpack
from .common import SIM, device, kernel, make_group_reduce, reduce_scratch_shape, ring_slot
from .kv_append import advance_length

THREADS = 8 if SIM else 256               # the simulator runs a Python thread per CUDA thread
WARP = min(32, THREADS)
ROPE_TOKENS_PER_BLOCK = 4 if SIM else 16


@functools.lru_cache(maxsize=None)
def make_embed(kind):
    VPW = values_per_word(kind)
    unpack = make_unpack(kind)
    offsets = make_row_offsets(kind)

    @kernel
    def embed(ids, table, x):
        # ids [M] i32, table [vocab, row words] u64 (numbattn/blocks.py) -> x [M, dim] f32
        """x[m, :] = table[ids[m], :] widened (or dequantized) to float32 (one block per token)."""
        m = cuda.blockIdx.x
        row = ids[m]
        vals = cuda.local.array(VPW, float32)
        n_code, h0, s0 = offsets(x.shape[1])
        for i in range(cuda.threadIdx.x, n_code, cuda.blockDim.x):
            a, b = unpack(table, row, i, table[row, i], h0, s0, vals)
            for j in range(VPW):
                x[m, i * VPW + j] = a * vals[j] + b

    return embed


@functools.lru_cache(maxsize=None)
def make_rms_norm(add=False):
    """add: y[m] += the normalised row (Gemma's sandwich norm of a block's output, added to the residual stream)."""
    _, warp_sum = make_group_reduce(WARP, 1)
    RED = reduce_scratch_shape(1, THREADS)
    WARPS = THREADS // WARP

    @kernel
    def rms_norm(x, g, eps, y):
        # x [M, dim], g [dim] -> y [M, dim] (add: y +=)
        """y[m] = x[m] / sqrt(mean(x[m]^2) + eps) * g (one block of THREADS threads per token)."""
        m, t = cuda.blockIdx.x, cuda.threadIdx.x
        red = cuda.shared.array(RED, float32)
        per_warp = cuda.shared.array(WARPS, float32)
        ss = cuda.local.array(1, float32)
        s = float32(0.0)
        for k in range(t, x.shape[1], THREADS):
            s += x[m, k] * x[m, k]
        ss[0] = s
        warp_sum(ss, red)
        if t % WARP == 0:
            per_warp[t // WARP] = ss[0]
        cuda.syncthreads()
        total = float32(0.0)
        for i in range(WARPS):
            total += per_warp[i]
        inv = float32(1.0) / math.sqrt(total / x.shape[1] + eps)
        for k in range(t, x.shape[1], THREADS):
            if add:
                y[m, k] += x[m, k] * inv * g[k]
            else:
                y[m, k] = x[m, k] * inv * g[k]

    return rms_norm


@functools.lru_cache(maxsize=None)
def make_rotate_token(n_heads, n_kv_heads, head_dim):
    """rotate_token(qkv, cos, sin, k_cache, v_cache, m, b, pos, slot, t): token m at position pos, q pairs rotated
    in place, k pairs rotated into k_cache[b, :, slot], v copied to v_cache[b, :, slot]. (A contiguous cache: b the
    row, slot = pos mod S, the ring buffer's; a paged one, kernels/paged_append.py: b the page, slot the offset in
    it.)"""
    H, HKV, D = n_heads, n_kv_heads, head_dim
    HALF = D // 2
    PAIRS = (H + HKV) * HALF                  # rotations per token: every q and k head's pairs
    VALUES = HKV * D                          # v elements per token

    @device
    def rotate_token(qkv, cos, sin, k_cache, v_cache, m, b, pos, slot, t):
        """Token m (row b, position pos, cache slot `slot`): q pairs rotated in place, k pairs rotated into the
        cache, v copied."""
        for e in range(t, PAIRS + VALUES, cuda.blockDim.x):
            if e < PAIRS:
                h = e // HALF                 # heads 0..H-1 are q, H..H+HKV-1 are k
                i = e - h * HALF
                c, s = cos[pos, i], sin[pos, i]
                x1, x2 = qkv[m, h * D + i], qkv[m, h * D + i + HALF]
                r1, r2 = x1 * c - x2 * s, x2 * c + x1 * s
                if h < H:
                    qkv[m, h * D + i] = r1
                    qkv[m, h * D + i + HALF] = r2
                else:
                    k_cache[b, h - H, slot, i] = r1
                    k_cache[b, h - H, slot, i + HALF] = r2
            else:
                j = e - PAIRS
                hv = j // D
                v_cache[b, hv, slot, j - hv * D] = qkv[m, (H + HKV) * D + j]
    return rotate_token


@functools.lru_cache(maxsize=None)
def make_rope_append(n_heads, n_kv_heads, head_dim):
    rotate_token = make_rotate_token(n_heads, n_kv_heads, head_dim)

    @kernel
    def rope_append(qkv, cos, sin, k_cache, v_cache, lengths, counters):
        # qkv [B*L, (H+2Hkv)*D] (q rotated in place), cos/sin [max_len, D/2] -> k/v cache [B, Hkv, S, D]
        blk, b, t = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
        L = qkv.shape[0] // k_cache.shape[0]  # new tokens per row
        start, slots = int64(lengths[b]), k_cache.shape[2]
        fits = start >= 0 and start + L <= cos.shape[0] and L <= slots    # the launcher checked; a raw launch too
        base = start % slots if fits else 0
        i0 = blk * ROPE_TOKENS_PER_BLOCK
        for i in range(i0, min(i0 + ROPE_TOKENS_PER_BLOCK, L)):
            if fits:
                rotate_token(qkv, cos, sin, k_cache, v_cache, b * L + i, b, start + i, ring_slot(base, i, slots), t)
        advance_length(lengths, counters, b, start, L, fits, cuda.gridDim.x)

    return rope_append


def rope_append_grid(tokens_per_row, batch):
    return (-(-tokens_per_row // ROPE_TOKENS_PER_BLOCK), batch)
