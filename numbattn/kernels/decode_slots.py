"""Decode attention v1, split-K with key slots (the default): LANES lanes share a key, each holding a few head dims.

The frame (split blocks, merges, the last block) is decode_splitk.py's. Inside a block, the threads form SLOTS key
slots of LANES = head_dim / DIMS_PER_LANE lanes: slot ks takes keys j_begin + ks, + SLOTS, ...; lane `lane` of a
slot holds the DIMS_PER_LANE consecutive head dims [lane * DIMS_PER_LANE, ...) of q (all G heads of the group) and
of its accumulators, and reads them from a K or V row as raw words (one 8-byte load brings 4 fp16 values: the
LANES lanes of a slot read a 128-byte row with one instruction each). Per key, each lane multiplies its dims for
the G heads, the slot adds its LANES partial dot products (group_sum: shuffles on a GPU), and every lane updates
its own m, l, acc (kernels/softmax.py's update_row) -- only when the maximum grows, since otherwise the update
rescales by exactly 1 (rare after the first keys) -- with the next keys' words already on their way (software
prefetch). Windows, soft caps and ring-buffer slots: decode_splitk.py.
Memory traffic: K and V once per step (decode_splitk.py). Measured speeds: BENCHMARKS.md.
# q [B, H, D], k/v [B, Hkv, S, words], lengths [B], split, window, softcap, part [B, H, splits, D+2], counters [B*Hkv]
#   -> out [B, H, D]
"""
import functools
import math

from numba import cuda, float32

from .common import device, make_cap, make_group_reduce, make_slot_of, reduce_scratch_shape
from .decode_splitk import kv_word_types, launch_bounds, make_split_kernel, make_unpack, split_layout
from .softmax import make_update_row


@functools.lru_cache(maxsize=None)
def make_decode_v1(head_dim, group, threads, dims_per_lane, keys_per_step=1, itemsize=4, min_blocks_per_sm=0, ring=False,
                   capped=False):
    """ring: the cache layer is a ring buffer; capped: scores are soft-capped (both compile-time choices)."""
    scan_split = make_scan_split_v1(head_dim, group, threads, dims_per_lane, keys_per_step, itemsize, ring, capped)
    LANES, SLOTS = split_layout(head_dim, threads, dims_per_lane)
    return make_split_kernel("decode_v1", head_dim, group, threads, dims_per_lane, LANES, SLOTS, scan_split,
                             launch_bounds(threads, min_blocks_per_sm), ring)


@functools.lru_cache(maxsize=None)
def make_scan_split_v1(head_dim, group, threads, dims_per_lane, keys_per_step=1, itemsize=4, ring=False, capped=False):
    """v1's scan of one stretch of keys (the split-K frames call it: decode_splitk.py, and once per page,
    decode_paged.py); ring: its loads wrap a slot past the cache's end, capped: its scores are soft-capped."""
    D, G, THREADS, DIMS_PER_LANE, KEYS_PER_STEP = head_dim, group, threads, dims_per_lane, keys_per_step
    LANES, SLOTS = split_layout(D, THREADS, DIMS_PER_LANE)
    _, slot_sum = make_group_reduce(LANES, KEYS_PER_STEP * G)
    RED = reduce_scratch_shape(KEYS_PER_STEP * G, THREADS)
    scan_keys = _make_scan_keys(G, DIMS_PER_LANE, LANES, SLOTS, KEYS_PER_STEP, itemsize, slot_sum, ring, capped)

    @device
    def scan_split(q, k_row, v_row, b, h0, j_begin, j_end, scale_log2, softcap, t, m, l, acc):
        """Key slot `slot` takes the keys in cache slots j_begin + slot, + SLOTS, ... (< j_end, wrapped past the
        cache's end); lane `lane` holds q's dims [lane * DIMS_PER_LANE, (lane + 1) * DIMS_PER_LANE)."""
        lane, slot = t % LANES, t // LANES
        red = cuda.shared.array(RED, float32)
        q_reg = cuda.local.array((G, DIMS_PER_LANE), float32)   # q of the group, this lane's dims, scaled for exp2
        for g in range(G):
            for e in range(DIMS_PER_LANE):
                q_reg[g, e] = float32(q[b, h0 + g, lane * DIMS_PER_LANE + e]) * scale_log2
        # the same for every slot: barriers stay uniform
        n_iter = (j_end - j_begin + SLOTS * KEYS_PER_STEP - 1) // (SLOTS * KEYS_PER_STEP)
        scan_keys(k_row, v_row, j_begin + slot, j_end, n_iter, lane, q_reg, softcap, m, l, acc, red)

    return scan_split


def _make_word_loads(DIMS_PER_LANE, SLOTS, KEYS_PER_STEP, itemsize, ring):
    """(WORD, WORDS, load_words, unpack_step) of a v1 key slot: the word type and words per lane, a row's words ->
    registers, words -> float32 values."""
    (WORD, PER_WORD), _ = kv_word_types("v1", None, DIMS_PER_LANE, itemsize)      # the same word for K and V
    WORDS = DIMS_PER_LANE // PER_WORD     # words per lane per row: lane holds dims [lane * DIMS_PER_LANE, ...)
    unpack = make_unpack(WORD, itemsize)
    slot_of = make_slot_of(ring)

    @device
    def load_words(k_row, v_row, j, j_end, lane, kw, vw):
        """This lane's words of K and V for the step's KEYS_PER_STEP keys in slots j, j + SLOTS, ... (wrapped past
        the cache's end; zero past the split's end: never used). The LANES lanes of a slot read a whole row with
        one load each: consecutive words."""
        for u in range(KEYS_PER_STEP):
            jj = j + SLOTS * u
            valid = jj < j_end
            row = slot_of(jj, 0, k_row.shape[0])
            for w in range(WORDS):
                kw[u, w] = k_row[row, lane * WORDS + w] if valid else WORD(0)
                vw[u, w] = v_row[row, lane * WORDS + w] if valid else WORD(0)

    @device
    def unpack_step(kw, vw, kf, vf):
        """Words -> float32 values, kf[u, e] = K[key u, dim lane * DIMS_PER_LANE + e]."""
        for u in range(KEYS_PER_STEP):
            for w in range(WORDS):
                for i in range(PER_WORD):
                    kf[u, w * PER_WORD + i] = unpack(kw[u, w], i)
                    vf[u, w * PER_WORD + i] = unpack(vw[u, w], i)
    return WORD, WORDS, load_words, unpack_step


def _make_scan_keys(G, DIMS_PER_LANE, LANES, SLOTS, KEYS_PER_STEP, itemsize, slot_sum, ring, capped):
    SCORES = KEYS_PER_STEP * G      # a compile-time constant (an expression inside the kernel would not size an array)
    WORD, WORDS, load_words, unpack_step = _make_word_loads(DIMS_PER_LANE, SLOTS, KEYS_PER_STEP, itemsize, ring)
    update_row = make_update_row(DIMS_PER_LANE)
    soft_cap = make_cap(capped)

    @device
    def scan_keys(k_row, v_row, j0, j_end, n_iter, lane, q_reg, softcap, m, l, acc, red):
        """The online softmax of one key slot over keys j0, j0 + SLOTS, ... < j_end, for the G heads, KEYS_PER_STEP
        keys a step. The next step's K and V words are loaded while this one is computed (software prefetch:
        2 * KEYS_PER_STEP keys in flight per slot, kept as raw words, half the registers of float32 for an fp16
        cache), and the step's dot products reduce together (independent shuffles, no waiting on each other)."""
        kw = cuda.local.array((KEYS_PER_STEP, WORDS), WORD)
        vw = cuda.local.array((KEYS_PER_STEP, WORDS), WORD)
        kc = cuda.local.array((KEYS_PER_STEP, WORDS), WORD)
        vc = cuda.local.array((KEYS_PER_STEP, WORDS), WORD)
        kf = cuda.local.array((KEYS_PER_STEP, DIMS_PER_LANE), float32)
        vf = cuda.local.array((KEYS_PER_STEP, DIMS_PER_LANE), float32)
        s = cuda.local.array(SCORES, float32)       # s[u * G + g]: key u of the step, head g
        load_words(k_row, v_row, j0, j_end, lane, kw, vw)
        for it in range(n_iter):
            j = j0 + SLOTS * KEYS_PER_STEP * it
            # copy the words, issue the next loads, then unpack: unpacking first (no copy) made the next loads wait
            # for this step's to arrive, and was measured 1.2-1.5x slower on the H100 (BENCHMARKS.md)
            for u in range(KEYS_PER_STEP):
                for w in range(WORDS):
                    kc[u, w], vc[u, w] = kw[u, w], vw[u, w]
            load_words(k_row, v_row, j + SLOTS * KEYS_PER_STEP, j_end, lane, kw, vw)
            unpack_step(kc, vc, kf, vf)
            for u in range(KEYS_PER_STEP):
                for g in range(G):
                    x = float32(0.0)
                    for e in range(DIMS_PER_LANE):
                        x += q_reg[g, e] * kf[u, e]
                    s[u * G + g] = x
            slot_sum(s, red)                        # the slot's LANES partial dot products -> the scores
            for u in range(KEYS_PER_STEP):
                if j + SLOTS * u < j_end:
                    for g in range(G):
                        sg = soft_cap(s[u * G + g], softcap)
                        if sg > m[g]:               # a new maximum: the update (otherwise it rescales by 1)
                            update_row(m, l, acc, g, sg)
                        p = math.exp2(sg - m[g])    # m[g] is finite here: decode masks no key inside the split
                        l[g] += p
                        for e in range(DIMS_PER_LANE):
                            acc[g, e] += p * vf[u, e]
    return scan_keys
