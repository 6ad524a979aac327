"""The KV cache's own kernels: append new tokens' K and V at each row's length, and poison rewound slots with NaN.

Token position p of a row lives in slot p mod S of a cache array of S slots: a full layer (S = max_len) never
wraps, a sliding-window layer's ring buffer (S = window + the longest append - 1, numbattn/kvcache.py) does, and
overwrites the tokens that have left every later query's window. Each kernel takes p0 mod S once per row and
then steps slot by slot (common.ring_slot), so a token costs no division.

append_kv: one launch per append writes K and V together: grid (x_blocks, n_kv_heads, batch), each block copies
the t * head_dim elements of its (row, KV head) with a grid-stride loop, consecutive threads on consecutive
elements, which are contiguous both in the new [.., t, head_dim] block and in the cache (coalesced on both
sides). The same kernel serves a whole prompt (t = prompt length) and one decode token (t = 1); storage
conversion fp32 -> fp16 is a plain conversion on store. Traffic: read t*D*2 elements, write the same.
# k_new, v_new [B, Hkv, t, D] -> k_cache, v_cache [B, Hkv, S, D] at slots (lengths[b] + j) mod S; lengths[b] += t

Where does the kernel learn each row's write position without a host->device copy per append (a pageable copy
would also synchronise the stream)? The device keeps the lengths table itself, int32 [n_layers, batch], and the
kernels that append advance it, through one device function, advance_length: every block reads row b's start,
and the LAST block of the row to finish (one atomic ticket per block, common.arrive_last) writes start + t, after
every other block has read it. The host never uploads anything per append, and a launch sequence can be captured
as a CUDA graph and replayed (tinyllm's GPU engine does). rowwise.rope_append (RoPE fused with the append) uses the
same advance_length.

fill_nan: NaN into the slots of positions [start[b], stop[b]) of row b (the cache poisons what truncate rewinds).
append_kv and fill_nan are plain kernels (no compile-time sizes, so no factory: Numba compiles one per argument
dtype on first use).
"""
import numpy as np
from numba import cuda, float32, int32, int64

from .common import arrive_last, device, kernel, ring_slot

NAN = float32(np.nan)


@device
def advance_length(lengths, counters, b, start, t_new, fits, n_blocks):
    """Called by every thread of each of the n_blocks blocks appending to row b once its writes are done: the last
    of them sets lengths[b] = start + t_new (if the append fit). counters: int32 [batch], zero (left zero)."""
    flag = cuda.shared.array(1, int32)
    if arrive_last(counters, b, n_blocks, flag) and cuda.threadIdx.x == 0 and fits:
        lengths[b] = start + t_new


@kernel
def append_kv(k_new, v_new, k_cache, v_cache, lengths_in, lengths_out, counters, max_pos):
    # k_new, v_new [B, Hkv, t, D] -> k_cache, v_cache [B, Hkv, S, D]; lengths [B] (+t); counters [B]
    """k_cache[b, h, (lengths_in[b] + j) mod S] = k_new[b, h, j] (and v); lengths_out[b] = lengths_in[b] + t.

    lengths_in and lengths_out may be the same array (the cache's table, advanced in place): the last block of
    row b to finish writes it, after every block has read it. counters: int32 [batch], zero (left zero).
    max_pos: the most tokens a row may hold (a full layer: S); a row it would overflow is left alone."""
    hk, b = cuda.blockIdx.y, cuda.blockIdx.z
    t_new, head_dim, slots = k_new.shape[2], k_new.shape[3], k_cache.shape[2]
    start = int64(lengths_in[b])
    fits = start >= 0 and start + t_new <= max_pos and t_new <= slots    # the launchers check; a raw launch too
    base = start % slots if fits else 0
    stride = cuda.gridDim.x * cuda.blockDim.x
    for idx in range(cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x, t_new * head_dim if fits else 0, stride):
        j = idx // head_dim
        d = idx - j * head_dim
        slot = ring_slot(base, j, slots)
        k_cache[b, hk, slot, d] = k_new[b, hk, j, d]
        v_cache[b, hk, slot, d] = v_new[b, hk, j, d]
    advance_length(lengths_out, counters, b, start, t_new, fits, cuda.gridDim.x * cuda.gridDim.y)


@kernel
def fill_nan(k_cache, v_cache, start, stop):
    # k_cache, v_cache [B, Hkv, S, D]; start, stop [B] -> NaN in the slots of positions start[b]..stop[b] of row b
    """NaN into the slots of positions [start[b], stop[b]) of every KV head of row b, position p in slot p mod S
    (truncate: poison the rewound tokens; more than S positions: every slot)."""
    hk, b = cuda.blockIdx.y, cuda.blockIdx.z
    head_dim, slots = k_cache.shape[3], int64(k_cache.shape[2])
    lo = max(int64(start[b]), int64(0))
    n = max(min(int64(stop[b]) - lo, slots), int64(0)) * head_dim
    base = lo % slots
    stride = cuda.gridDim.x * cuda.blockDim.x
    for idx in range(cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x, n, stride):
        j = idx // head_dim
        d = idx - j * head_dim
        slot = ring_slot(base, j, slots)
        k_cache[b, hk, slot, d] = NAN
        v_cache[b, hk, slot, d] = NAN
