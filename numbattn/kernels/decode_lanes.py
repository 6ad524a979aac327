"""Decode attention v2, split-K with a key per lane: v1's frame, the work inside a block laid out the other way round.

v1's lanes (decode_slots.py) split a key's head dims, so every key costs each lane G partial dot products, a group
reduction of G values (log2 LANES shuffles each) and G exp2 -- the same softmax work repeated in all LANES lanes of
a slot: on the H100 that was ~165 warp instructions per key and head, against 32 for the FMAs. In v2 a lane group
(one warp on a GPU) takes a tile of LANES keys, ONE KEY PER LANE for the scores: each lane reads its whole K row (as
words) and computes its key's G scores against q, which sits in shared memory (every lane needs all of it; one
16-byte load, broadcast to the warp, brings 4 values). The tile's max per head needs one group reduction per TILE,
and each lane takes the exp2 of its own key only. Then the layout flips for P V, as in the prefill kernels: p goes
through shared memory (p_s[group, key, head]) and each lane owns DIMS_PER_LANE dims of acc again, reading its dims
of every V row of the tile (the group reads a row together: one coalesced load each). K rows and V rows are loaded
a chunk ahead of their use, and the next tile's first chunks during this one's tail.
On the H100 this cut the GPU time at 131072 tokens from 116 to 103 us, but not below 32768 tokens, and an fp32
cache runs slower than in v1 (its registers spill under v2's launch bounds): what limits both kernels is how many
loads are in flight, not instructions (BENCHMARKS.md). v1 stays the default.
Windows, soft caps and ring-buffer slots: decode_splitk.py.
# q [B, H, D], k [B, Hkv, S, D * itemsize / word bytes], v [..., words], lengths [B], split, window, softcap,
#   part [B, H, splits, D+2], counters [B*Hkv] -> out [B, H, D]
"""
import functools
import math
from dataclasses import dataclass

from numba import cuda, float32

from .common import NEG_INF, SIM, device, group_barrier, make_cap, make_group_reduce, make_slot_of, reduce_scratch_shape
from .decode_splitk import kv_word_types, launch_bounds, make_split_kernel, make_unpack, split_layout
from .softmax import make_update_row

K_CHUNK, V_CHUNK = 4, 16      # K words (of <= 8 bytes) and V rows a lane loads at once (4 x 8 bytes: the compiler
                              # still unrolls the loop over them; V rows swept: BENCHMARKS.md)
ALIGN = None if SIM else 16   # bytes, of the shared arrays: 16-byte loads (the simulator takes no alignment)


@functools.lru_cache(maxsize=None)
def make_decode_v2(head_dim, group, threads, dims_per_lane, keys_per_step=1, itemsize=4, min_blocks_per_sm=0, ring=False,
                   capped=False):
    """ring: the cache layer is a ring buffer; capped: scores are soft-capped (both compile-time choices)."""
    D, G, THREADS, DIMS_PER_LANE, KEYS_PER_STEP = head_dim, group, threads, dims_per_lane, keys_per_step
    LANES, GROUPS = split_layout(D, THREADS, DIMS_PER_LANE)
    TILE = LANES * KEYS_PER_STEP              # keys a lane group takes per step
    group_max, group_sum = make_group_reduce(LANES, G)
    RED = reduce_scratch_shape(G, THREADS)
    scan_tiles = _make_scan_tiles(D, G, DIMS_PER_LANE, LANES, GROUPS, KEYS_PER_STEP, itemsize, group_max, ring, capped)

    @device
    def scan_split(q, k_row, v_row, b, h0, j_begin, j_end, scale_log2, softcap, t, m, l, acc):
        """Lane group `lane_group` takes the tiles of TILE keys starting at cache slot j_begin + lane_group * TILE,
        then + GROUPS * TILE, ... (< j_end, wrapped past the cache's end); q of the whole group sits in shared
        memory (every lane needs all of it)."""
        lane, lane_group = t % LANES, t // LANES
        red = cuda.shared.array(RED, float32)
        q_s = cuda.shared.array((G, D), float32, alignment=ALIGN)     # q * scale * log2 e, for exp2
        p_s = cuda.shared.array((GROUPS, TILE, G), float32, alignment=ALIGN)
        for e in range(t, G * D, THREADS):
            q_s[e // D, e % D] = float32(q[b, h0 + e // D, e % D]) * scale_log2
        cuda.syncthreads()
        n_iter = (j_end - j_begin + GROUPS * TILE - 1) // (GROUPS * TILE)   # the same for every group: uniform barriers
        scan_tiles(k_row, v_row, j_begin + lane_group * TILE, j_end, n_iter, lane, lane_group, q_s, p_s, softcap, m,
                   l, acc, red)
        group_sum(l, red)       # each lane summed the p of its own keys (all rescaled alike: m is the group's)

    return make_split_kernel("decode_v2", D, G, THREADS, DIMS_PER_LANE, LANES, GROUPS, scan_split,
                             launch_bounds(THREADS, min_blocks_per_sm), ring)


@dataclass(frozen=True)
class _Tiles:
    """The compile-time shape of v2's scan: G heads, LANES lanes a group, GROUPS groups, KEYS_PER_STEP keys a lane;
    K rows read whole (K_ROW_WORDS words, K_WORDS per chunk), V rows DIMS_PER_LANE dims a lane (V_WORDS words),
    V_ROWS rows per chunk."""
    G: int
    DIMS_PER_LANE: int
    LANES: int
    GROUPS: int
    KEYS_PER_STEP: int
    TILE: int
    KWORD: object
    K_PER_WORD: int
    K_ROW_WORDS: int
    K_WORDS: int
    VWORD: object
    V_PER_WORD: int
    V_WORDS: int
    V_ROWS: int


def _make_scan_tiles(D, G, DIMS_PER_LANE, LANES, GROUPS, KEYS_PER_STEP, itemsize, group_max, ring, capped):
    TILE = LANES * KEYS_PER_STEP
    (KWORD, K_PER_WORD), (VWORD, V_PER_WORD) = kv_word_types("v2", D, DIMS_PER_LANE, itemsize)
    # Rows and tiles go in chunks, the next chunk's loads issued before this one's FMAs. (Whole tiles in registers
    # would need loops too long for the compiler to unroll, and a local array indexed in a rolled loop lives in
    # local memory.) A lane reads whole K rows, and its DIMS_PER_LANE dims of every V row of the tile.
    T = _Tiles(G, DIMS_PER_LANE, LANES, GROUPS, KEYS_PER_STEP, TILE, KWORD, K_PER_WORD, D // K_PER_WORD,
               min(D // K_PER_WORD, K_CHUNK), VWORD, V_PER_WORD, DIMS_PER_LANE // V_PER_WORD, min(TILE, V_CHUNK))
    load_k, load_v, next_k, next_v = _make_chunk_loads(T, make_slot_of(ring))
    scores = _make_scores(T, next_k, make_unpack(KWORD, itemsize))
    softmax_step = _make_softmax_step(T, group_max, make_cap(capped))
    accumulate = _make_accumulate(T, next_v, make_unpack(VWORD, itemsize))
    K_WORDS, V_ROWS, V_WORDS = T.K_WORDS, T.V_ROWS, T.V_WORDS

    @device
    def scan_tiles(k_row, v_row, j0, j_end, n_iter, lane, lane_group, q_s, p_s, softcap, m, l, acc, red):
        """The online softmax of one lane group over its tiles: scores with lanes across keys, the product with V
        with lanes across dims, p handed from one layout to the other through shared memory."""
        kw = cuda.local.array((KEYS_PER_STEP, K_WORDS), KWORD)
        kc = cuda.local.array((KEYS_PER_STEP, K_WORDS), KWORD)
        vw = cuda.local.array((V_ROWS, V_WORDS), VWORD)
        vc = cuda.local.array((V_ROWS, V_WORDS), VWORD)
        s = cuda.local.array((KEYS_PER_STEP, G), float32)
        t_max = cuda.local.array(G, float32)
        load_k(k_row, j0, j_end, lane, 0, kw)       # the first chunks; each later one is loaded a chunk ahead
        load_v(v_row, j0, j_end, lane, 0, vw)
        for it in range(n_iter):
            jt = j0 + it * (GROUPS * TILE)
            scores(k_row, jt, j_end, lane, q_s, s, kw, kc)
            softmax_step(s, jt, j_end, lane, lane_group, softcap, m, l, acc, p_s, t_max, red)
            group_barrier()                         # the group's p are in p_s
            accumulate(v_row, jt, j_end, lane, p_s, lane_group, acc, vw, vc)
            group_barrier()                         # ... and read, before the next tile's overwrite them
    return scan_tiles


def _make_chunk_loads(T, slot_of):
    """(load_k, load_v, next_k, next_v): the streams of K words and V rows, each chunk loaded a chunk ahead of its
    use (load: one chunk; next: hand over the loaded chunk and load the one after it)."""
    KEYS_PER_STEP, LANES, K_WORDS, V_ROWS, V_WORDS = T.KEYS_PER_STEP, T.LANES, T.K_WORDS, T.V_ROWS, T.V_WORDS
    KWORD, VWORD = T.KWORD, T.VWORD

    @device
    def load_k(k_row, jt, j_end, lane, c, kw):
        """kw[u] = words c*K_WORDS .. of the K row in slot jt + u*LANES + lane (this lane's keys; wrapped past the
        cache's end); zero past the split's end."""
        for u in range(KEYS_PER_STEP):
            j = jt + u * LANES + lane
            row = slot_of(j, 0, k_row.shape[0])
            for w in range(K_WORDS):
                kw[u, w] = k_row[row, c * K_WORDS + w] if j < j_end else KWORD(0)

    @device
    def load_v(v_row, jt, j_end, lane, c, vw):
        """vw[i] = this lane's words of V row jt + c*V_ROWS + i (the LANES lanes read a row together: one coalesced
        load each). Zero past the split's end: those keys have p = 0, and 0 * 0 adds nothing (the slots there are
        NaN)."""
        for i in range(V_ROWS):
            j = jt + c * V_ROWS + i
            row = slot_of(j, 0, v_row.shape[0])
            for w in range(V_WORDS):
                vw[i, w] = v_row[row, lane * V_WORDS + w] if j < j_end else VWORD(0)

    step = T.GROUPS * T.TILE
    return (load_k, load_v, _make_next_chunk(load_k, KEYS_PER_STEP, K_WORDS, T.K_ROW_WORDS // K_WORDS, step),
            _make_next_chunk(load_v, V_ROWS, V_WORDS, T.TILE // V_ROWS, step))


def _make_scores(T, next_k, unpack_k):
    G, KEYS_PER_STEP, K_WORDS, K_PER_WORD, K_ROW_WORDS = T.G, T.KEYS_PER_STEP, T.K_WORDS, T.K_PER_WORD, T.K_ROW_WORDS

    @device
    def scores(k_row, jt, j_end, lane, q_s, s, kw, kc):
        """s[u, g] = q_g . k_u for this lane's KEYS_PER_STEP keys: each q value read from shared memory (one broadcast
        to all lanes) serves KEYS_PER_STEP keys. kw holds the first chunk's words already."""
        for u in range(KEYS_PER_STEP):
            for g in range(G):
                s[u, g] = float32(0.0)
        for c in range(K_ROW_WORDS // K_WORDS):
            next_k(k_row, jt, j_end, lane, c, kw, kc)
            for w in range(K_WORDS):
                for i in range(K_PER_WORD):
                    d = (c * K_WORDS + w) * K_PER_WORD + i
                    for g in range(G):
                        q_gd = q_s[g, d]
                        for u in range(KEYS_PER_STEP):
                            s[u, g] += q_gd * unpack_k(kc[u, w], i)
    return scores


def _make_softmax_step(T, group_max, soft_cap):
    G, KEYS_PER_STEP, LANES = T.G, T.KEYS_PER_STEP, T.LANES
    update_row = make_update_row(T.DIMS_PER_LANE)

    @device
    def softmax_step(s, jt, j_end, lane, lane_group, softcap, m, l, acc, p_s, t_max, red):
        """The online-softmax update of the group by one tile: the tile's max per head over the group's lanes, the
        update of the state (kernels/softmax.py), and p = exp2(s - m_ref) into p_s[lane_group, key, head] for the
        product with V. Scores soft-capped first (softcap > 0)."""
        for g in range(G):
            t_max[g] = NEG_INF
            for u in range(KEYS_PER_STEP):
                s[u, g] = soft_cap(s[u, g], softcap)
                if jt + u * LANES + lane >= j_end:       # past the split: masked
                    s[u, g] = NEG_INF
                t_max[g] = max(t_max[g], s[u, g])
        group_max(t_max, red)
        for g in range(G):
            m_ref = update_row(m, l, acc, g, t_max[g])     # the same in every lane of the group: no divergence
            for u in range(KEYS_PER_STEP):
                p = math.exp2(s[u, g] - m_ref)
                l[g] += p
                p_s[lane_group, u * LANES + lane, g] = p
    return softmax_step


def _make_accumulate(T, next_v, unpack_v):
    G, TILE, V_ROWS, V_WORDS, V_PER_WORD = T.G, T.TILE, T.V_ROWS, T.V_WORDS, T.V_PER_WORD

    @device
    def accumulate(v_row, jt, j_end, lane, p_s, lane_group, acc, vw, vc):
        """acc[g, dims] += sum_i p[i, g] v_i[dims] over the tile's keys: this lane's DIMS_PER_LANE dims of every head.
        vw holds the first chunk's words already (loaded during the previous tile, or before the first)."""
        for c in range(TILE // V_ROWS):
            next_v(v_row, jt, j_end, lane, c, vw, vc)
            for i in range(V_ROWS):
                for w in range(V_WORDS):
                    for e in range(V_PER_WORD):
                        x = unpack_v(vc[i, w], e)
                        for g in range(G):
                            acc[g, w * V_PER_WORD + e] += p_s[lane_group, c * V_ROWS + i, g] * x
    return accumulate


def _make_next_chunk(load, A, B, N, STEP):
    """next_chunk(row, jt, j_end, lane, c, buf, cur) for a stream of N chunks per tile, tiles STEP keys apart:
    cur = chunk c (in buf, loaded a chunk ago), and buf = the next chunk's words (after the last chunk: the next
    tile's first, in flight during the rest of this tile). Copying first lets the loads go out before the FMAs."""
    @device
    def next_chunk(row, jt, j_end, lane, c, buf, cur):
        for a in range(A):
            for b in range(B):
                cur[a, b] = buf[a, b]
        if c + 1 < N:
            load(row, jt, j_end, lane, c + 1, buf)
        else:
            load(row, jt + STEP, j_end, lane, 0, buf)
    return next_chunk
