"""Decode attention over a PAGED KV cache: decode v1's split-K frame, reading each sequence through its block table.

The paged layout (vLLM's PagedAttention: Kwon et al. 2023; numbattn/paged.py keeps it): every layer's K and V live
in a pool of fixed-size pages (blocks of BS tokens), k_pool[page, kv_head, offset, :]; sequence s owns the pages
block_tables[s, 0], block_tables[s, 1], ... in order, so its token j sits in page block_tables[s, j // BS] at
offset j % BS. Sequences of any lengths share the pool without reserving max_len each, and a sequence that ends
gives its pages back to the free list.

One launch serves a batch of sequences at different lengths: batch row b continues sequence rows[b] (a row below 0
is padding: a CUDA-graph bucket larger than the batch) holding lengths[rows[b]] tokens. The frame is
decode_splitk.py's, block (split, kv head, row): a split of `split` keys (a multiple of BS) walks its pages in
order, calling v1's scan (decode_slots.py) once per page with the page's rows as the K/V views, the online-softmax
state (m, l, acc) carried from page to page in registers; then the same slot merge, last-block ticket and split
merge (kernels/softmax.py's log-sum-exp rule, written once). Only the addressing differs from decode v1: one
block-table read per page. The scan is v1's variant for a full layer (a page never wraps: no ring), soft-capped
(Gemma 2's cap, common.soft_cap) where the kernel is compiled with capped=True, as v1's are.

Memory traffic per step and row: K and V once (2 * n_kv_heads * len * head_dim * itemsize bytes), one int32 per
page, plus the partials per split as in v1. The price of paging: each page is one scan, so the scan's prefetch of
the next keys stops at a page's end (one memory latency per page per block); larger pages (32) halve it.
# q [B, H, D], k/v pool [n_blocks, Hkv, BS, words], block_tables [S, max_pages] i32, rows [B] i32, lengths [S] i32,
#   split, scale_log2, softcap, part [B, H, n_splits, D+2], counters [B*Hkv] -> out [B, H, D]
"""
import functools

from numba import cuda, float32, int32, int64

from .common import arrive_last, kernel
from .decode_slots import make_scan_split_v1
from .decode_splitk import launch_bounds, make_split_frame, split_layout


@functools.lru_cache(maxsize=None)
def make_decode_paged(head_dim, group, threads, dims_per_lane, keys_per_step=1, itemsize=4, min_blocks_per_sm=0,
                      capped=False):
    """capped: scores soft-capped (compiled in only where asked for, as in decode v1)."""
    D, G, THREADS, DIMS_PER_LANE = head_dim, group, threads, dims_per_lane
    LANES, SLOTS = split_layout(D, THREADS, DIMS_PER_LANE)
    # v1's scan, never the ring variant: a page's keys sit at offsets 0 .. BS - 1 and never wrap
    scan_split = make_scan_split_v1(D, G, THREADS, DIMS_PER_LANE, keys_per_step, itemsize, False, capped)
    reset, merge_slots, merge_splits = make_split_frame(D, G, THREADS, DIMS_PER_LANE, LANES, SLOTS)

    def decode_paged(q, k_pool, v_pool, block_tables, rows, lengths, split, scale_log2, softcap, part, counters, out):
        # q [B, H, D], k/v pool [n_blocks, Hkv, BS, words], block_tables [S, max_pages], rows [B], lengths [S],
        # softcap (log2 units), part [B, H, n_splits, D+2], counters [B*Hkv] -> out [B, H, D]
        s_idx, hk, b, t = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z, cuda.threadIdx.x
        h0, BS = hk * G, int64(k_pool.shape[2])
        seq = rows[b]
        n = min(int64(lengths[seq]), block_tables.shape[1] * BS) if seq >= 0 else int64(0)   # never past its table
        j_begin = int64(s_idx) * split
        if j_begin >= n:                            # the whole block leaves together (no barrier half-attended)
            if n == 0 and s_idx == 0:
                for e in range(t, G * D, THREADS):  # an empty sequence, or a padding row: zeros
                    out[b, h0 + e // D, e % D] = float32(0.0)
            return
        j_end = min(j_begin + split, n)
        flag = cuda.shared.array(1, int32)
        acc = cuda.local.array((G, DIMS_PER_LANE), float32)
        m = cuda.local.array(G, float32)
        l = cuda.local.array(G, float32)
        reset(m, l, acc)
        for p0 in range(j_begin, j_end, BS):        # split is a multiple of BS: whole pages, in order
            page = block_tables[seq, p0 // BS]
            scan_split(q, k_pool[page, hk], v_pool[page, hk], b, h0, 0, min(BS, j_end - p0), scale_log2, softcap, t,
                       m, l, acc)
        merge_slots(m, l, acc, part, b, h0, s_idx, t)
        if arrive_last(counters, b * k_pool.shape[1] + hk, (n + split - 1) // split, flag):
            merge_splits(part, (n + split - 1) // split, b, h0, out, t)

    return kernel(decode_paged, **launch_bounds(THREADS, min_blocks_per_sm))
