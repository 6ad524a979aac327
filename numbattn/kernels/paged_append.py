"""The paged KV cache's own kernels: append through the block table (alone, or fused with RoPE), gather a sequence's
pages into a contiguous buffer, and poison freed pages with NaN.

The layout is numbattn/paged.py's: k_pool, v_pool [n_blocks, n_kv_heads, BS, head_dim] per layer; sequence s owns
the pages block_tables[s, 0..] in order (-1: not allocated), so its token p sits in page block_tables[s, p // BS]
at offset p % BS. Batch row b of a launch continues sequence rows[b] (a row below 0 is padding and is skipped).

append_paged    K and V of t new tokens per row written at each sequence's length through its table, the
                sequence's length advanced by the last block to finish (kv_append.advance_length, the same
                rule as the contiguous cache's append), so a step can be replayed as a CUDA graph. A row whose
                pages do not cover the new tokens writes nothing and keeps its length (the host allocates
                pages first; a raw launch cannot write out of bounds).
                # k_new, v_new [B, Hkv, t, D] -> pools [n_blocks, Hkv, BS, D]; lengths [S] (+t); counters [S]
rope_append     rowwise.rope_append for a paged cache: q rotated in place, k rotated and v copied into the pages
                (rowwise.make_rotate_token, the one rotation), positions read from the sequences' lengths.
                # qkv [B*L, (H+2Hkv)*D], cos/sin [max_len, D/2] -> pools; lengths [S] (+L); counters [S]
gather_pages    one sequence's first n tokens, page after page -> k_out, v_out [1, Hkv, n, D] (chunked
                prefill attends over them with the contiguous prefill kernel). Traffic: 2 n D per KV head, read
                and written once.
fill_pages_nan  NaN into whole pages (a freed page is poisoned, as unused cache slots are everywhere).
Consecutive threads take consecutive head dims: coalesced on both sides (a page's token row is contiguous).
"""
import functools

import numpy as np
from numba import cuda, float32, int64

from .common import kernel
from .kv_append import advance_length
from .rowwise import ROPE_TOKENS_PER_BLOCK, make_rotate_token

NAN = float32(np.nan)


@cuda.jit(device=True, inline=True)
def covered(block_tables, seq, start, t_new, BS):
    """Whether sequence seq's pages hold positions start .. start + t_new - 1 (pages are allocated in order)."""
    last = (start + t_new - 1) // BS
    return start >= 0 and last < block_tables.shape[1] and block_tables[seq, last] >= 0


@kernel
def append_paged(k_new, v_new, k_pool, v_pool, block_tables, rows, lengths, counters):
    # k_new, v_new [B, Hkv, t, D] -> k_pool, v_pool [n_blocks, Hkv, BS, D]; lengths [S] (+t); counters [S]
    """Token j of row b goes to position lengths[rows[b]] + j of its sequence, through the block table."""
    hk, b = cuda.blockIdx.y, cuda.blockIdx.z
    seq = rows[b]
    if seq < 0:                                   # a padding row: the whole block leaves
        return
    t_new, head_dim, BS = k_new.shape[2], k_new.shape[3], int64(k_pool.shape[2])
    start = int64(lengths[seq])
    fits = covered(block_tables, seq, start, t_new, BS)
    stride = cuda.gridDim.x * cuda.blockDim.x
    for idx in range(cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x, t_new * head_dim if fits else 0, stride):
        j = idx // head_dim
        d = idx - j * head_dim
        p = start + j
        page = block_tables[seq, p // BS]
        k_pool[page, hk, p % BS, d] = k_new[b, hk, j, d]
        v_pool[page, hk, p % BS, d] = v_new[b, hk, j, d]
    advance_length(lengths, counters, seq, start, t_new, fits, cuda.gridDim.x * cuda.gridDim.y)


@functools.lru_cache(maxsize=None)
def make_rope_append_paged(n_heads, n_kv_heads, head_dim):
    rotate_token = make_rotate_token(n_heads, n_kv_heads, head_dim)

    @kernel
    def rope_append_paged(qkv, cos, sin, k_pool, v_pool, block_tables, rows, lengths, counters):
        # qkv [B*L, (H+2Hkv)*D] (q rotated in place), cos/sin [max_len, D/2] -> pools [n_blocks, Hkv, BS, D]
        blk, b, t = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
        seq = rows[b]
        if seq < 0:
            return
        L, BS = qkv.shape[0] // rows.shape[0], int64(k_pool.shape[2])      # new tokens per row, page size
        start = int64(lengths[seq])
        fits = covered(block_tables, seq, start, L, BS) and start + L <= cos.shape[0]
        i0 = blk * ROPE_TOKENS_PER_BLOCK
        for i in range(i0, min(i0 + ROPE_TOKENS_PER_BLOCK, L)):
            if fits:
                p = start + i
                rotate_token(qkv, cos, sin, k_pool, v_pool, b * L + i, block_tables[seq, p // BS], p, p % BS, t)
        advance_length(lengths, counters, seq, start, L, fits, cuda.gridDim.x)

    return rope_append_paged


@kernel
def gather_pages(k_pool, v_pool, table, k_out, v_out):
    # k/v pool [n_blocks, Hkv, BS, D], table [n_pages] (one sequence's) -> k_out, v_out [1, Hkv, n, D]
    hk = cuda.blockIdx.y
    n, head_dim, BS = k_out.shape[2], k_out.shape[3], k_pool.shape[2]
    stride = cuda.gridDim.x * cuda.blockDim.x
    for idx in range(cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x, n * head_dim, stride):
        j = idx // head_dim
        d = idx - j * head_dim
        page = table[j // BS]
        k_out[0, hk, j, d] = k_pool[page, hk, j % BS, d]
        v_out[0, hk, j, d] = v_pool[page, hk, j % BS, d]


@kernel
def fill_pages_nan(k_pool, v_pool, pages):
    # k/v pool [n_blocks, Hkv, BS, D], pages [n] -> NaN in every slot of those pages
    hk, i = cuda.blockIdx.y, cuda.blockIdx.z
    page, span = pages[i], k_pool.shape[2] * k_pool.shape[3]
    stride = cuda.gridDim.x * cuda.blockDim.x
    for idx in range(cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x, span, stride):
        k_pool[page, hk, idx // k_pool.shape[3], idx % k_pool.shape[3]] = NAN
        v_pool[page, hk, idx // k_pool.shape[3], idx % k_pool.shape[3]] = NAN
