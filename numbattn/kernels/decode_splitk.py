"""Decode split-K, the frame decode v1 and v2 share: split blocks over the keys, the slots' merge, the last block's
merge of the splits (flash-decoding: Dao, Haziza, Massa, Sizov 2023).

Grid (n_splits, n_kv_heads, batch). Row b holding n tokens sees its keys [first, n), first = max(0, n - window)
(a sliding window; window = the cache's slots: every token a full layer holds). Block (s, hk, b) takes the keys
[first + s * split, first + (s + 1) * split), clipped to n (blocks past it exit at once), for ALL G query heads
sharing KV head hk, so each K/V element is read once, not G times: decode costs O(window), not O(n). Key p sits
in slot p mod S of the cache's S slots (a window layer's ring buffer wraps; a full layer never does): the block
hands its scan the slots [p0 mod S, p0 mod S + its keys), and the loads wrap a slot past S (common.ring_slot;
kernels for a full layer are compiled without the wrap). Scores may be soft-capped (common.soft_cap, log2 units;
likewise compiled in only where asked for). Inside, the block's threads form SLOTS groups of LANES lanes;
`scan_split` (v1: decode_slots.py, v2: decode_lanes.py) leaves every lane with the online-softmax state
(m, l, acc) of its slot, acc holding DIMS_PER_LANE dims of each of the G heads. Then:

    merge_slots    the block's slots -> one partial (acc, m, l) per head, written to part[b, h, s, :D + 2]
    arrive_last    one atomic ticket per block (common.arrive_last): the LAST split block of the group to finish...
    merge_splits   ...merges all the splits' partials into out, in one online pass with several splits' loads in
                   flight. One launch: nothing to synchronise between a split kernel and a merge kernel.

Both merges are kernels/softmax.py's merge_row: the log-sum-exp rule, the same rescaling the online softmax does
between tiles. A row holding no tokens gets zeros (block 0 writes them). Memory traffic per step and row: K and V
once, 2 * n_kv_heads * len * head_dim * itemsize bytes, plus n_heads * (D + 2) * 4 bytes of partials per split,
written once and read once.
# q [B, H, D], k/v [B, Hkv, S, words] (each row as raw words), lengths [B], split (keys per block), window,
#   softcap, part [B, H, splits, D+2], counters [B*Hkv] -> out [B, H, D]
"""
import math

from numba import cuda, float32, int32, int64, uint16, uint32, uint64

from .common import NEG_INF, SIM, arrive_last, device, f32_from_bits, f32_from_half_bits, kernel
from .softmax import finish, make_merge_row


def split_layout(head_dim, threads, dims_per_lane):
    """(LANES per key slot or lane group, SLOTS per block) of a v1/v2 block: LANES = head_dim / dims_per_lane."""
    lanes = head_dim // dims_per_lane
    if head_dim % dims_per_lane or lanes > 32 or lanes & (lanes - 1) or threads % lanes:
        raise ValueError(f"dims_per_lane={dims_per_lane}, threads={threads}: head_dim {head_dim} / dims_per_lane "
                         f"must be a power of two <= 32 that divides threads")
    return lanes, threads // lanes


def word_type(n_values, itemsize):
    """The unsigned word a lane reads `n_values` consecutive values of a K or V row in: as wide as their bytes
    allow, up to 8. -> (word type, values per word)"""
    nbytes = math.gcd(n_values * itemsize, 8)
    return {2: uint16, 4: uint32, 8: uint64}[nbytes], nbytes // itemsize


def kv_word_types(version, head_dim, dims_per_lane, itemsize):
    """-> ((K word, values per word), (V word, values per word)) of a v1/v2 kernel: the words its lanes read K and
    V rows in, and so the dtypes the cache's arrays are viewed as when it is launched. A v1 lane reads its
    dims_per_lane dims of both; a v2 lane reads whole K rows (scores: one key per lane) and its dims of V."""
    return word_type(dims_per_lane if version == "v1" else head_dim, itemsize), word_type(dims_per_lane, itemsize)


def make_unpack(WORD, itemsize):
    """unpack(word, i): value i of a word of fp16 or fp32 values, as float32 (exact)."""
    SHIFT = 8 * itemsize
    if itemsize == 2:
        @device
        def unpack(word, i):
            return f32_from_half_bits(word >> WORD(SHIFT * i))
    else:
        @device
        def unpack(word, i):
            return f32_from_bits(uint32(word >> WORD(SHIFT * i)))
    return unpack


def launch_bounds(threads, min_blocks_per_sm):
    """CUDA launch bounds (the compiler caps registers per thread so that this many blocks fit on an SM)."""
    return dict(launch_bounds=(threads, min_blocks_per_sm)) if min_blocks_per_sm and not SIM else {}


def make_split_kernel(name, D, G, THREADS, DIMS_PER_LANE, LANES, SLOTS, scan_split, bounds, ring):
    """The kernel v1 and v2 share: block (s, hk, b) runs `scan_split` over its keys, which leaves every thread with
    the online-softmax state (m, l, acc) of its key slot (acc: its DIMS_PER_LANE dims of each head); the slots merge
    into the split's partial, and the last split block of the group merges the splits into out. ring: compiled
    for a ring buffer (token p in slot p mod S); else a full layer (token p in slot p, p < S)."""
    reset, merge_slots, merge_splits = make_split_frame(D, G, THREADS, DIMS_PER_LANE, LANES, SLOTS)

    def decode_split(q, k, v, lengths, split, scale_log2, window, softcap, part, counters, out):
        # q [B, H, D], k/v [B, Hkv, S, words] (each row as raw words), lengths [B], part [B, H, splits, D+2],
        # counters [B*Hkv] -> out [B, H, D]
        s_idx, hk, b, t = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z, cuda.threadIdx.x
        h0, slots = hk * G, int64(k.shape[2])
        n = max(int64(lengths[b]), int64(0)) if ring else min(int64(lengths[b]), slots)   # a bad length from a raw
        first = max(n - min(int64(window), slots), int64(0))   # launch cannot read out of bounds: at most S keys
        j_begin = first + int64(s_idx) * split
        if j_begin >= n:                            # the whole block leaves together (no barrier half-attended)
            if n == first and s_idx == 0:
                for e in range(t, G * D, THREADS):  # a row holding no tokens: zeros
                    out[b, h0 + e // D, e % D] = float32(0.0)
            return
        s_begin = j_begin % slots if ring else j_begin  # the split's first slot; its keys in slots s_begin, +1, ...
        s_end = s_begin + min(split, n - j_begin)   # (unwrapped: < 2 S, wrapped by the loads)
        flag = cuda.shared.array(1, int32)
        acc = cuda.local.array((G, DIMS_PER_LANE), float32)
        m = cuda.local.array(G, float32)
        l = cuda.local.array(G, float32)
        reset(m, l, acc)
        scan_split(q, k[b, hk], v[b, hk], b, h0, s_begin, s_end, scale_log2, softcap, t, m, l, acc)
        merge_slots(m, l, acc, part, b, h0, s_idx, t)
        n_splits = (min(n, min(int64(window), slots)) + split - 1) // split    # = n - first: only n kept live
        if arrive_last(counters, b * k.shape[1] + hk, n_splits, flag):
            merge_splits(part, n_splits, b, h0, out, t)

    decode_split.__name__ = decode_split.__qualname__ = name     # the kernel's name in profilers
    return kernel(decode_split, **bounds)


def _make_merge_slots(D, G, THREADS, DIMS_PER_LANE, LANES, SLOTS):
    merge_row = make_merge_row(1)

    @device
    def merge_slots(m, l, acc, part, b, h0, s_idx, t):
        """The SLOTS slots' states -> this split's partial part[b, h0 + g, s_idx] = (acc, m, l) per head g."""
        Ms = cuda.shared.array((SLOTS, G), float32)
        Ls = cuda.shared.array((SLOTS, G), float32)
        As = cuda.shared.array((SLOTS, G, D), float32)
        lane, slot = t % LANES, t // LANES
        for g in range(G):
            if lane == 0:
                Ms[slot, g], Ls[slot, g] = m[g], l[g]
            for e in range(DIMS_PER_LANE):
                As[slot, g, lane * DIMS_PER_LANE + e] = acc[g, e]
        cuda.syncthreads()
        M = cuda.local.array(1, float32)
        L = cuda.local.array(1, float32)
        A = cuda.local.array((1, 1), float32)
        for idx in range(t, G * D, THREADS):
            g = idx // D
            d = idx - g * D
            M[0], L[0], A[0, 0] = NEG_INF, float32(0.0), float32(0.0)
            for i in range(SLOTS):
                w = merge_row(M, L, A, 0, Ms[i, g], Ls[i, g])    # a slot that saw no key has m = -inf: w = 0
                A[0, 0] += As[i, g, d] * w
            part[b, h0 + g, s_idx, d] = A[0, 0]
            if d == 0:
                part[b, h0 + g, s_idx, D] = M[0]
                part[b, h0 + g, s_idx, D + 1] = L[0]
    return merge_slots


def _make_merge_splits(D, G, THREADS):
    OUTS = -(-G * D // THREADS)             # outputs (head, dim) per thread
    IN_FLIGHT = max(1, min(8, 16 // OUTS))  # splits whose partials are loaded together (registers allowing)
    merge_row = make_merge_row(1)

    @device
    def merge_splits(part, n_splits, b, h0, out, t):
        """All splits' partials of the group -> out[b, h0 + g] = sum_s acc_s w_s / sum_s l_s w_s,
        w_s = exp2(m_s - max m): the log-sum-exp merge, done online (merge_row: one pass, the running max M and the
        sums rescaled when M grows, as in the softmax itself). Each thread merges its OUTS outputs side by side
        and loads IN_FLIGHT splits' partials before using any, so the last block pays ~n_splits / IN_FLIGHT memory
        latencies."""
        M = cuda.local.array(OUTS, float32)
        L = cuda.local.array(OUTS, float32)
        A = cuda.local.array((OUTS, 1), float32)
        ms = cuda.local.array((IN_FLIGHT, OUTS), float32)
        ls = cuda.local.array((IN_FLIGHT, OUTS), float32)
        accs = cuda.local.array((IN_FLIGHT, OUTS), float32)
        for r in range(OUTS):
            M[r], L[r], A[r, 0] = NEG_INF, float32(0.0), float32(0.0)
        for s0 in range(0, n_splits, IN_FLIGHT):
            for u in range(IN_FLIGHT):
                s = min(s0 + u, n_splits - 1)
                for r in range(OUTS):
                    idx = t + THREADS * r
                    g, d = min(idx // D, G - 1), idx % D
                    ms[u, r] = part[b, h0 + g, s, D] if s0 + u < n_splits else NEG_INF   # past the end: w = 0
                    ls[u, r] = part[b, h0 + g, s, D + 1]
                    accs[u, r] = part[b, h0 + g, s, d]
            for u in range(IN_FLIGHT):
                for r in range(OUTS):
                    w = merge_row(M, L, A, r, ms[u, r], ls[u, r])
                    A[r, 0] += accs[u, r] * w
        for r in range(OUTS):
            idx = t + THREADS * r
            if idx < G * D:
                out[b, h0 + idx // D, idx % D] = A[r, 0] * finish(L[r])
    return merge_splits


def _make_reset(G, DIMS_PER_LANE):
    @device
    def reset(m, l, acc):
        """A thread's online-softmax state before its first key: m = -inf, l = 0, acc = 0 for each of G heads."""
        for g in range(G):
            m[g], l[g] = NEG_INF, float32(0.0)
            for e in range(DIMS_PER_LANE):
                acc[g, e] = float32(0.0)
    return reset


def make_split_frame(D, G, THREADS, DIMS_PER_LANE, LANES, SLOTS):
    """(reset, merge_slots, merge_splits): what a split-K kernel does around its scan (here and decode_paged.py)."""
    return (_make_reset(G, DIMS_PER_LANE), _make_merge_slots(D, G, THREADS, DIMS_PER_LANE, LANES, SLOTS),
            _make_merge_splits(D, G, THREADS))
