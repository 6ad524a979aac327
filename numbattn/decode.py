"""Decode attention: one new query token per row against the KV cache (flash-decoding), in one launch.

What you will learn here
------------------------
Each generation step brings ONE new query token per sequence (row of the batch). Its attention reads every
cached key and value once and does ~4 FLOPs per cached element per query head sharing it: decode streams the
cache, so the goal is to read it once, with the whole GPU, and to pay as little as possible around that.

Three kernels, side by side (llm.c style), all tested by the same suite:

  v0  simple: one block per (row, query head). Its threads split the keys among themselves; each runs the
      online softmax of numbattn/prefill.py over its own keys, keeping
          m   = max_j s_j                    (scores in the log2 domain: s = q.k * scale * log2 e)
          l   = sum_j exp2(s_j - m)
          acc = sum_j exp2(s_j - m) v_j
      and at the end the block merges its threads' partial states by the log-sum-exp rule
          M = max_t m_t,   L = sum_t l_t exp2(m_t - M),   out = sum_t acc_t exp2(m_t - M) / L
      — the same rescaling the online softmax does between tiles, so the result is the exact softmax.
      Only batch * n_heads blocks (32 for TinyLlama at batch 1, a quarter of an H100), each reading its KV head
      alone: the G query heads of a group read the same K/V G times.
      # q [B, H, D], k/v [B, Hkv, max_len, D], lengths [B] -> out [B, H, D]

  v1  split-K (Dao, Haziza, Massa, Sizov 2023): grid (n_splits, n_kv_heads, batch). Block
      (s, hk, b) takes the keys [s*split, (s+1)*split) of row b, clipped to the row's length (blocks past it
      exit at once), for ALL G query heads sharing KV head hk, so each K/V element is read once, not G times.
      Inside, threads form "key slots" of DL = D / DPL lanes; lane dl of a slot holds the DPL consecutive head
      dimensions [dl*DPL, (dl+1)*DPL) of q (all G heads) and of its accumulators, and reads them from a K or V
      row as raw words (one 8-byte load brings 4 fp16 values: the DL lanes of a slot read a 128-byte row with one
      instruction each). Per key, each lane multiplies its DPL dims for G heads, the slot adds its DL partial
      dot products (group_sum: shuffles on a GPU), and every lane updates its own m, l, acc — with the rescale
      done only when the maximum grows (rare after the first keys), and the next keys' words already on their
      way (software prefetch). The block then merges its slots (log-sum-exp, through shared memory) into one
      partial (m, l, acc) per query head, written to a small float32 buffer part [B, H, n_splits, D + 2]; and
      the LAST split block of the group to finish (one atomic ticket per block, numbattn/device.arrive_last)
      merges all the splits' partials into out, in one online pass with several splits' loads in flight. One
      launch: nothing to synchronise between a split and a merge kernel, no second launch to pay for.
      # q [B, H, D], k/v [B, Hkv, max_len, D] (read as words), lengths [B], part [B, H, S, D+2], counters [B*Hkv]
      #   -> out [B, H, D]

  v2  v1's split-K and merge, with the work inside a block laid out the other way round for the scores. v1's
      lanes split a key's head dims, so every key costs each lane G partial dot products, a group reduction of
      G values (log2 DL shuffles each) and G exp2 — the same softmax work repeated in all DL lanes of a slot: on the
      H100 that was ~165 warp instructions per key and head, against 32 for the FMAs. In v2 a lane group (one warp
      on a GPU) takes a tile of DL keys, ONE KEY PER LANE for the scores: each lane reads its whole K row (as words)
      and computes its key's G scores against q, which sits in shared memory (every lane needs all of it; one
      16-byte load, broadcast to the warp, brings 4 values). The tile's max per head needs one group reduction per
      TILE, and each lane takes the exp2 of its own key only. Then the layout flips for P V, as in the prefill
      kernels: p goes through shared memory (p_s[slot, key, head]) and each lane owns DPL dims of acc again, reading
      its dims of every V row of the tile (the group reads a row together: one coalesced load each). K rows and V
      rows are loaded a chunk ahead of their use, and the next tile's first chunks during this one's tail.
      On the H100 this cut the GPU time at 131072 tokens from 116 to 103 us, but not below 32768 tokens, and an
      fp32 cache runs slower than in v1 (its registers spill under v2's launch bounds): what limits both kernels
      is how many loads are in flight, not instructions (BENCHMARKS.md). v1 stays the default.
      # q [B, H, D], k [B, Hkv, max_len, D * itemsize / word bytes], v [..., words], lengths [B],
      #   part [B, H, S, D+2], counters [B*Hkv] -> out [B, H, D]

Slots past a row's length are never read: the cache keeps them NaN-poisoned (numbattn/kvcache.py) and 0 * NaN
is NaN, so loads there are skipped, not multiplied by zero. A row holding 0 tokens gets zeros.

How many splits: about BLOCKS_PER_SM split blocks per SM over the whole batch, never fewer than MIN_SPLIT keys
per split (so the partials, written and read once, stay small next to the K/V bytes) and never more than
MAX_SPLIT (so that no block walks too long a stretch alone). Memory traffic per step
and row: K and V once, 2 * n_kv_heads * len * head_dim * itemsize bytes, plus n_heads * (D + 2) * 4 bytes of
partials per split, twice. Measured speeds and the host cost of a call are in BENCHMARKS.md.

The API call itself is kept cheap: what is fixed per cache (its buffers, the validated shapes) is prepared
once in a Workspace the cache owns, the launch is a prepared one (numbattn/launch.py: one driver call), the
lengths are already on the device, and nothing is allocated, uploaded or re-validated per call.
"""
import functools
import math
from dataclasses import dataclass

import numpy as np
from numba import cuda, float32, int32, int64, uint16, uint32, uint64

from . import backend as _backend
from . import reference
from .device import (FASTMATH, LOG2E, NEG_INF, SIM, arrive_last, f32_from_bits, f32_from_half_bits, group_barrier,
                     make_group_reduce, reduce_scratch_shape)
from .launch import Launch
from .validate import as_count, check_dtype, check_head_dim, check_heads, check_rank, check_scale

VERSIONS = ("v0", "v1", "v2")
DEFAULT_VERSION = "v1"   # v2 is faster only past ~32K tokens with an fp16 cache (BENCHMARKS.md)
SHARED_LIMIT = 48 * 1024   # static shared memory per block
K_CHUNK, V_CHUNK = 4, 16      # v2: K words (of <= 8 bytes) and V rows a lane loads at once (4 x 8 bytes: the compiler
                              # still unrolls the loop over them; V rows swept: BENCHMARKS.md)
ALIGN = None if SIM else 16   # bytes, of v2's shared arrays: 16-byte loads (the simulator takes no alignment)
H100_SMS = 132
BLOCKS_PER_SM = 1          # split blocks per SM that the automatic split aims for (swept on the H100: BENCHMARKS.md)
MIN_SPLIT = 256            # keys; shorter splits make the partials and each block's merge a large share
MAX_SPLIT = 2048           # keys; longer ones make a block's serial walk the limit (131072 tokens: 2048 beat 4096)


@dataclass(frozen=True)
class Config:
    """Launch shape. split: keys per split block (v1, v2; None: chosen from the length); threads per block;
    dims_per_lane: head dims of each head's accumulator a v1/v2 thread holds (head_dim / dims_per_lane lanes form
    a key slot, v1, or a lane group, v2); keys_per_step: keys each v1 slot, or each v2 lane, takes per step;
    min_blocks_per_sm: blocks that must fit on an SM at once (CUDA launch bounds: the compiler caps the registers
    per thread to make it so; 0: no cap)."""
    split: int | None
    threads: int
    dims_per_lane: int = 8
    keys_per_step: int = 1
    min_blocks_per_sm: int = 0


# The simulator runs a Python thread per CUDA thread: few threads, tiny splits (several splits and slots).
SIM_CONFIG = Config(split=4, threads=8, dims_per_lane=8, keys_per_step=2)


def gpu_config(version, head_dim, group):
    """v0: 32 threads (one warp: each keeps a whole acc row). v1: 256 threads (16 key slots: twice the keys in
    flight of 128, at the same register count), 4 dims per lane (head_dim / 4 lanes per key: fewer registers than
    8, so no spill at a group of 8 heads), one key per step. v2: 256 threads, lane groups of one warp (head_dim / 32
    dims per lane), and launch bounds that keep 2 blocks (16 warps) on an SM: more loads in flight (131072 tokens:
    115 -> 100 us). Fewer threads where the shared arrays would not fit. Swept on the H100: BENCHMARKS.md."""
    if version == "v0":
        return Config(split=None, threads=32)
    lanes = (4, 2, 1) if version == "v1" else (max(1, head_dim // 32),)
    for threads in (256, 128, 64, 32):
        for dpl in lanes:
            bound = 512 // threads if version == "v2" else 0
            config = Config(split=None, threads=threads, dims_per_lane=dpl, min_blocks_per_sm=bound)
            if head_dim // dpl <= 32 and shared_bytes(version, head_dim, group, config) <= SHARED_LIMIT:
                return config
    raise ValueError(f"a group of {group} query heads per KV head at head_dim {head_dim} does not fit in "
                     f"{SHARED_LIMIT} bytes of shared memory: use version='v0'")


def default_config(version, backend, head_dim, group):
    return SIM_CONFIG if backend == "sim" and version != "v0" else (
        Config(None, 8) if backend == "sim" else gpu_config(version, head_dim, group))


def split_layout(head_dim, threads, dims_per_lane):
    """(DL lanes per key slot or lane group, KS slots or groups) of a v1/v2 block."""
    DL = head_dim // dims_per_lane
    if head_dim % dims_per_lane or DL > 32 or DL & (DL - 1) or threads % DL:
        raise ValueError(f"dims_per_lane={dims_per_lane}, threads={threads}: head_dim {head_dim} / dims_per_lane "
                         f"must be a power of two <= 32 that divides threads")
    return DL, threads // DL


def shared_bytes(version, head_dim, group, config):
    """Static shared memory of a v1/v2 block: the slots' states for the merge; v2 also q and a tile of p per group."""
    DL, KS = split_layout(head_dim, config.threads, config.dims_per_lane)
    merge = 4 * KS * group * (head_dim + 2)
    return merge if version == "v1" else merge + 4 * group * (head_dim + KS * DL * config.keys_per_step)


@functools.lru_cache(maxsize=None)
def sm_count():
    """SMs of the current GPU; the simulator has none to ask, so it plans as an H100 (132) would."""
    return getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", H100_SMS)


def choose_split(max_length, batch, n_kv_heads, n_sm=None):
    """Keys per split: about BLOCKS_PER_SM split blocks per SM, at least MIN_SPLIT and at most MAX_SPLIT keys (more
    blocks than that past ~64K tokens), a multiple of MIN_SPLIT (so that a growing context changes it rarely)."""
    n_sm = sm_count() if n_sm is None else n_sm
    want_splits = -(-BLOCKS_PER_SM * n_sm // (batch * n_kv_heads))
    split = -(-max(max_length, 1) // want_splits)
    return min(-(-split // MIN_SPLIT) * MIN_SPLIT, MAX_SPLIT)


def n_splits_for(max_length, split):
    return max(1, -(-max_length // split))


def plan(batch, n_kv_heads, max_length, config):
    """-> (keys per split, number of splits) for one launch over rows holding at most max_length tokens."""
    split = config.split or choose_split(max_length, batch, n_kv_heads)
    return split, n_splits_for(max_length, split)


# --------------------------------------------------------------------------------------------------------
# v0: one block per (row, query head), its threads splitting the keys
# --------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def make_decode_v0(head_dim, threads):
    D, T = head_dim, threads

    @cuda.jit(fastmath=FASTMATH)
    def decode_v0(q, k, v, lengths, scale_log2, out):
        # q [B, H, D], k/v [B, Hkv, max_len, D], lengths [B] -> out [B, H, D]
        h, b, t = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
        hk = h // (q.shape[1] // k.shape[1])
        n = min(int64(lengths[b]), int64(k.shape[2]))
        qr = cuda.local.array(D, float32)
        acc = cuda.local.array(D, float32)
        for d in range(D):
            qr[d] = float32(q[b, h, d]) * scale_log2
            acc[d] = float32(0.0)
        m, l = NEG_INF, float32(0.0)
        for j in range(t, n, T):                    # this thread's keys: t, t + T, ...
            s = float32(0.0)
            for d in range(D):
                s += qr[d] * float32(k[b, hk, j, d])
            m_new = max(m, s)
            alpha = math.exp2(m - m_new)            # 0 on the first key: acc and l start at 0
            p = math.exp2(s - m_new)
            l = l * alpha + p
            for d in range(D):
                acc[d] = acc[d] * alpha + p * float32(v[b, hk, j, d])
            m = m_new
        merge_threads(m, l, acc, out, b, h, t)

    @cuda.jit(device=True, inline=True)
    def merge_threads(m, l, acc, out, b, h, t):
        """The block's T partial states (m, l, acc) -> out[b, h], by the log-sum-exp rule; zeros if no keys."""
        Ms = cuda.shared.array(T, float32)
        Ls = cuda.shared.array(T, float32)
        As = cuda.shared.array((T, D), float32)
        Ms[t], Ls[t] = m, l
        for d in range(D):
            As[t, d] = acc[d]
        cuda.syncthreads()
        M = NEG_INF
        for i in range(T):
            M = max(M, Ms[i])
        for d in range(t, D, T):
            L, A = float32(0.0), float32(0.0)
            for i in range(T):
                w = math.exp2(Ms[i] - M) if Ms[i] != NEG_INF else float32(0.0)   # a thread with no keys: 0
                L += Ls[i] * w
                A += As[i, d] * w
            out[b, h, d] = A / L if L > 0 else float32(0.0)

    return decode_v0


# --------------------------------------------------------------------------------------------------------
# v1 and v2: split-K over blocks, all query heads of a group per block, the last block merges
# --------------------------------------------------------------------------------------------------------
def word_type(dims_per_lane, itemsize):
    """The unsigned word a lane reads `dims_per_lane` consecutive values of a K or V row in: as wide as their
    bytes allow, up to 8. -> (word type, values per word)"""
    nbytes = math.gcd(dims_per_lane * itemsize, 8)
    return {2: uint16, 4: uint32, 8: uint64}[nbytes], nbytes // itemsize


def kv_word_types(version, head_dim, dims_per_lane, itemsize):
    """-> ((K word, values per word), (V word, values per word)) of a v1/v2 kernel: the words its lanes read K and
    V rows in, and so the dtypes the cache's arrays are viewed as when it is launched. A v1 lane reads its
    dims_per_lane dims of both; a v2 lane reads whole K rows (scores: one key per lane) and its dims of V."""
    return word_type(dims_per_lane if version == "v1" else head_dim, itemsize), word_type(dims_per_lane, itemsize)


def _make_split_kernel(name, D, G, T, DPL, DL, KS, scan_split, bounds):
    """The kernel v1 and v2 share: block (s, hk, b) runs `scan_split` over its keys, which leaves every thread with
    the online-softmax state (m, l, acc) of its key slot (acc: its DPL dims of each head); the slots merge into the
    split's partial, and the last split block of the group merges the splits into out. Only scan_split differs."""
    merge_slots = _make_merge_slots(D, G, T, DPL, DL, KS)
    merge_splits = _make_merge_splits(D, G, T)

    def decode_split(q, k, v, lengths, split, scale_log2, part, counters, out):
        # q [B, H, D], k/v [B, Hkv, max_len, words] (each row as raw words), lengths [B], part [B, H, S, D+2],
        # counters [B*Hkv] -> out [B, H, D]
        s_idx, hk, b, t = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z, cuda.threadIdx.x
        h0 = hk * G
        n = min(int64(lengths[b]), int64(k.shape[2]))  # a bad length from a raw launch cannot read past max_len
        j_begin = int64(s_idx) * split
        if j_begin >= n:                            # the whole block leaves together (no barrier half-attended)
            if n == 0 and s_idx == 0:
                for e in range(t, G * D, T):        # a row holding no tokens: zeros
                    out[b, h0 + e // D, e % D] = float32(0.0)
            return
        j_end = min(j_begin + split, n)
        flag = cuda.shared.array(1, int32)
        acc = cuda.local.array((G, DPL), float32)
        m = cuda.local.array(G, float32)
        l = cuda.local.array(G, float32)
        for g in range(G):
            m[g], l[g] = NEG_INF, float32(0.0)
            for e in range(DPL):
                acc[g, e] = float32(0.0)
        scan_split(q, k[b, hk], v[b, hk], b, h0, j_begin, j_end, scale_log2, t, m, l, acc)
        merge_slots(m, l, acc, part, b, h0, s_idx, t)
        if arrive_last(counters, b * k.shape[1] + hk, (n + split - 1) // split, flag):
            merge_splits(part, (n + split - 1) // split, b, h0, out, t)

    decode_split.__name__ = decode_split.__qualname__ = name     # the kernel's name in profilers
    return cuda.jit(fastmath=FASTMATH, **bounds)(decode_split)


def _launch_bounds(T, min_blocks_per_sm):
    return dict(launch_bounds=(T, min_blocks_per_sm)) if min_blocks_per_sm and not SIM else {}


@functools.lru_cache(maxsize=None)
def make_decode_v1(head_dim, group, threads, dims_per_lane, keys_per_step=1, itemsize=4, min_blocks_per_sm=0):
    D, G, T, DPL, KU = head_dim, group, threads, dims_per_lane, keys_per_step
    DL, KS = split_layout(D, T, DPL)
    _, slot_sum = make_group_reduce(DL, KU * G)
    RED = reduce_scratch_shape(KU * G, T)
    scan_keys = _make_scan_keys(G, DPL, DL, KS, KU, itemsize, slot_sum)

    @cuda.jit(device=True, inline=True)
    def scan_split(q, k_row, v_row, b, h0, j_begin, j_end, scale_log2, t, m, l, acc):
        """v1: key slot ks takes keys j_begin + ks, + KS, ...; lane dl holds q's dims [dl*DPL, (dl+1)*DPL)."""
        dl, ks = t % DL, t // DL
        red = cuda.shared.array(RED, float32)
        q_reg = cuda.local.array((G, DPL), float32)   # q of the group, this lane's dims, scaled for exp2
        for g in range(G):
            for e in range(DPL):
                q_reg[g, e] = float32(q[b, h0 + g, dl * DPL + e]) * scale_log2
        n_iter = (j_end - j_begin + KS * KU - 1) // (KS * KU)   # the same for every slot: barriers stay uniform
        scan_keys(k_row, v_row, j_begin + ks, j_end, n_iter, dl, q_reg, m, l, acc, red)

    return _make_split_kernel("decode_v1", D, G, T, DPL, DL, KS, scan_split, _launch_bounds(T, min_blocks_per_sm))


def _make_unpack(WORD, itemsize):
    """unpack(word, i): value i of a word of fp16 or fp32 values, as float32 (exact)."""
    SHIFT = 8 * itemsize
    if itemsize == 2:
        @cuda.jit(device=True, inline=True)
        def unpack(word, i):
            return f32_from_half_bits(word >> WORD(SHIFT * i))
    else:
        @cuda.jit(device=True, inline=True)
        def unpack(word, i):
            return f32_from_bits(uint32(word >> WORD(SHIFT * i)))
    return unpack


def _make_word_loads(DPL, DL, KS, KU, itemsize):
    """(WORD, WPL, load_words, unpack_step) of a v1 key slot: the word type and words per lane, a row's words ->
    registers, words -> float32 values."""
    (WORD, VPW), _ = kv_word_types("v1", None, DPL, itemsize)      # the same word for K and V
    WPL = DPL // VPW            # words per lane per row: lane dl holds dims [dl * DPL, (dl + 1) * DPL)
    unpack = _make_unpack(WORD, itemsize)

    @cuda.jit(device=True, inline=True)
    def load_words(k_row, v_row, j, j_end, dl, kw, vw):
        """This lane's words of K and V for the step's KU keys j, j + KS, ... (zero past the split's end: never
        used). The DL lanes of a slot read a whole row with one load each: DL * WPL consecutive words."""
        for u in range(KU):
            jj = j + KS * u
            valid = jj < j_end
            for w in range(WPL):
                kw[u, w] = k_row[jj, dl * WPL + w] if valid else WORD(0)
                vw[u, w] = v_row[jj, dl * WPL + w] if valid else WORD(0)

    @cuda.jit(device=True, inline=True)
    def unpack_step(kw, vw, kf, vf):
        """Words -> float32 values, kf[u, e] = K[key u, dim dl * DPL + e]."""
        for u in range(KU):
            for w in range(WPL):
                for i in range(VPW):
                    kf[u, w * VPW + i] = unpack(kw[u, w], i)
                    vf[u, w * VPW + i] = unpack(vw[u, w], i)
    return WORD, WPL, load_words, unpack_step


def _make_scan_keys(G, DPL, DL, KS, KU, itemsize, slot_sum):
    KG = KU * G                 # a compile-time constant (an expression inside the kernel would not size an array)
    WORD, WPL, load_words, unpack_step = _make_word_loads(DPL, DL, KS, KU, itemsize)

    @cuda.jit(device=True, inline=True)
    def scan_keys(k_row, v_row, j0, j_end, n_iter, dl, q_reg, m, l, acc, red):
        """The online softmax of one key slot over keys j0, j0 + KS, ... < j_end, for the G heads, KU keys a step.
        The next step's K and V words are loaded while this one is computed (software prefetch: 2 * KU keys in
        flight per slot, kept as raw words, half the registers of float32 for an fp16 cache), and the KU * G dot
        products of a step reduce together (independent shuffles, no waiting on each other)."""
        kw = cuda.local.array((KU, WPL), WORD)
        vw = cuda.local.array((KU, WPL), WORD)
        kc = cuda.local.array((KU, WPL), WORD)
        vc = cuda.local.array((KU, WPL), WORD)
        kf = cuda.local.array((KU, DPL), float32)
        vf = cuda.local.array((KU, DPL), float32)
        s = cuda.local.array(KG, float32)          # s[u * G + g]: key u of the step, head g
        load_words(k_row, v_row, j0, j_end, dl, kw, vw)
        for it in range(n_iter):
            j = j0 + KS * KU * it
            # copy the words, issue the next loads, then unpack: unpacking first (no copy) made the next loads wait
            # for this step's to arrive, and was measured 1.2-1.5x slower on the H100 (BENCHMARKS.md)
            for u in range(KU):
                for w in range(WPL):
                    kc[u, w], vc[u, w] = kw[u, w], vw[u, w]
            load_words(k_row, v_row, j + KS * KU, j_end, dl, kw, vw)
            unpack_step(kc, vc, kf, vf)
            for u in range(KU):
                for g in range(G):
                    x = float32(0.0)
                    for e in range(DPL):
                        x += q_reg[g, e] * kf[u, e]
                    s[u * G + g] = x
            slot_sum(s, red)                       # the slot's DL partial dot products -> the scores
            for u in range(KU):
                if j + KS * u < j_end:
                    for g in range(G):
                        sg = s[u * G + g]
                        if sg > m[g]:              # a new maximum: rescale what was accumulated (rarely)
                            alpha = math.exp2(m[g] - sg)
                            m[g] = sg
                            l[g] *= alpha
                            for e in range(DPL):
                                acc[g, e] *= alpha
                        p = math.exp2(sg - m[g])
                        l[g] += p
                        for e in range(DPL):
                            acc[g, e] += p * vf[u, e]
    return scan_keys


@functools.lru_cache(maxsize=None)
def make_decode_v2(head_dim, group, threads, dims_per_lane, keys_per_step=1, itemsize=4, min_blocks_per_sm=0):
    D, G, T, DPL, KU = head_dim, group, threads, dims_per_lane, keys_per_step
    DL, KS = split_layout(D, T, DPL)
    TILE = DL * KU              # keys a lane group takes per step
    group_max, group_sum = make_group_reduce(DL, G)
    RED = reduce_scratch_shape(G, T)
    scan_tiles = _make_scan_tiles(D, G, DPL, DL, KS, KU, itemsize, group_max)

    @cuda.jit(device=True, inline=True)
    def scan_split(q, k_row, v_row, b, h0, j_begin, j_end, scale_log2, t, m, l, acc):
        """v2: lane group ks takes the tiles of TILE keys starting at j_begin + ks*TILE, + KS*TILE, ...; q of the whole
        group sits in shared memory (every lane needs all of it for its own keys)."""
        dl, ks = t % DL, t // DL
        red = cuda.shared.array(RED, float32)
        q_s = cuda.shared.array((G, D), float32, alignment=ALIGN)     # q * scale * log2 e, for exp2
        p_s = cuda.shared.array((KS, TILE, G), float32, alignment=ALIGN)
        for e in range(t, G * D, T):
            q_s[e // D, e % D] = float32(q[b, h0 + e // D, e % D]) * scale_log2
        cuda.syncthreads()
        n_iter = (j_end - j_begin + KS * TILE - 1) // (KS * TILE)   # the same for every group: barriers stay uniform
        scan_tiles(k_row, v_row, j_begin + ks * TILE, j_end, n_iter, dl, ks, q_s, p_s, m, l, acc, red)
        group_sum(l, red)       # each lane summed the p of its own keys (all rescaled alike: m is the group's)

    return _make_split_kernel("decode_v2", D, G, T, DPL, DL, KS, scan_split, _launch_bounds(T, min_blocks_per_sm))


def _make_scan_tiles(D, G, DPL, DL, KS, KU, itemsize, group_max):
    TILE = DL * KU
    (KWORD, KVPW), (VWORD, VVPW) = kv_word_types("v2", D, DPL, itemsize)
    KWPR = D // KVPW            # a lane reads whole K rows ...
    VWPL = DPL // VVPW          # ... and its DPL dims of every V row of the tile
    # Rows and tiles go in chunks, the next chunk's loads issued before this one's FMAs. (Whole tiles in registers
    # would need loops too long for the compiler to unroll, and a local array indexed in a rolled loop lives in
    # local memory.)
    KCH = min(KWPR, K_CHUNK)    # K words per chunk
    VCH = min(TILE, V_CHUNK)    # V rows per chunk
    unpack_k, unpack_v = _make_unpack(KWORD, itemsize), _make_unpack(VWORD, itemsize)

    @cuda.jit(device=True, inline=True)
    def load_k(k_row, jt, j_end, dl, c, kw):
        """kw[u] = words c*KCH .. of K row jt + u*DL + dl (this lane's keys); zero past the split's end."""
        for u in range(KU):
            j = jt + u * DL + dl
            for w in range(KCH):
                kw[u, w] = k_row[j, c * KCH + w] if j < j_end else KWORD(0)

    @cuda.jit(device=True, inline=True)
    def load_v(v_row, jt, j_end, dl, c, vw):
        """vw[i] = this lane's words of V row jt + c*VCH + i (the DL lanes read a row together: one coalesced load
        each). Zero past the split's end: those keys have p = 0, and 0 * 0 adds nothing (the slots there are NaN)."""
        for i in range(VCH):
            j = jt + c * VCH + i
            for w in range(VWPL):
                vw[i, w] = v_row[j, dl * VWPL + w] if j < j_end else VWORD(0)

    next_k = _make_next_chunk(load_k, KU, KCH, KWPR // KCH, KS * TILE)
    next_v = _make_next_chunk(load_v, VCH, VWPL, TILE // VCH, KS * TILE)

    @cuda.jit(device=True, inline=True)
    def scores(k_row, jt, j_end, dl, q_s, s, kw, kc):
        """s[u, g] = q_g . k_u for this lane's KU keys: each q value read from shared memory (one broadcast to all
        lanes) serves KU keys. kw holds the first chunk's words already."""
        for u in range(KU):
            for g in range(G):
                s[u, g] = float32(0.0)
        for c in range(KWPR // KCH):
            next_k(k_row, jt, j_end, dl, c, kw, kc)
            for w in range(KCH):
                for i in range(KVPW):
                    d = (c * KCH + w) * KVPW + i
                    for g in range(G):
                        q_gd = q_s[g, d]
                        for u in range(KU):
                            s[u, g] += q_gd * unpack_k(kc[u, w], i)

    @cuda.jit(device=True, inline=True)
    def softmax_step(s, jt, j_end, dl, ks, m, l, acc, p_s, t_max, red):
        """The online-softmax update of the group by one tile: the tile's max per head over the group's lanes, the
        rescale if it grew, and p = exp2(s - m) into p_s[ks, key, head] for the product with V."""
        for g in range(G):
            t_max[g] = NEG_INF
            for u in range(KU):
                if jt + u * DL + dl >= j_end:       # past the split: masked
                    s[u, g] = NEG_INF
                t_max[g] = max(t_max[g], s[u, g])
        group_max(t_max, red)
        for g in range(G):
            if t_max[g] > m[g]:                     # the same in every lane of the group: no divergence
                alpha = math.exp2(m[g] - t_max[g])  # 0 for the first tile: acc and l are still 0
                m[g] = t_max[g]
                l[g] *= alpha
                for e in range(DPL):
                    acc[g, e] *= alpha
            m_g = m[g] if m[g] != NEG_INF else float32(0.0)    # no key yet: every p is exp2(-inf) = 0
            for u in range(KU):
                p = math.exp2(s[u, g] - m_g)
                l[g] += p
                p_s[ks, u * DL + dl, g] = p

    @cuda.jit(device=True, inline=True)
    def accumulate(v_row, jt, j_end, dl, p_s, ks, acc, vw, vc):
        """acc[g, dims] += sum_i p[i, g] v_i[dims] over the tile's keys: this lane's DPL dims of every head.
        vw holds the first chunk's words already (loaded during the previous tile, or before the first)."""
        for c in range(TILE // VCH):
            next_v(v_row, jt, j_end, dl, c, vw, vc)
            for i in range(VCH):
                for w in range(VWPL):
                    for e in range(VVPW):
                        x = unpack_v(vc[i, w], e)
                        for g in range(G):
                            acc[g, w * VVPW + e] += p_s[ks, c * VCH + i, g] * x

    @cuda.jit(device=True, inline=True)
    def scan_tiles(k_row, v_row, j0, j_end, n_iter, dl, ks, q_s, p_s, m, l, acc, red):
        """The online softmax of one lane group over its tiles: scores with lanes across keys, the product with V
        with lanes across dims, p handed from one layout to the other through shared memory."""
        kw = cuda.local.array((KU, KCH), KWORD)
        kc = cuda.local.array((KU, KCH), KWORD)
        vw = cuda.local.array((VCH, VWPL), VWORD)
        vc = cuda.local.array((VCH, VWPL), VWORD)
        s = cuda.local.array((KU, G), float32)
        t_max = cuda.local.array(G, float32)
        load_k(k_row, j0, j_end, dl, 0, kw)         # the first chunks; each later one is loaded a chunk ahead
        load_v(v_row, j0, j_end, dl, 0, vw)
        for it in range(n_iter):
            jt = j0 + it * (KS * TILE)
            scores(k_row, jt, j_end, dl, q_s, s, kw, kc)
            softmax_step(s, jt, j_end, dl, ks, m, l, acc, p_s, t_max, red)
            group_barrier()                         # the group's p are in p_s
            accumulate(v_row, jt, j_end, dl, p_s, ks, acc, vw, vc)
            group_barrier()                         # ... and read, before the next tile's overwrite them
    return scan_tiles


def _make_next_chunk(load, A, B, N, STEP):
    """next_chunk(row, jt, j_end, dl, c, buf, cur) for a stream of N chunks per tile, tiles STEP keys apart: cur =
    chunk c (in buf, loaded a chunk ago), and buf = the next chunk's words (after the last chunk: the next tile's
    first, in flight during the rest of this tile). Copying first lets the loads go out before the FMAs."""
    @cuda.jit(device=True, inline=True)
    def next_chunk(row, jt, j_end, dl, c, buf, cur):
        for a in range(A):
            for b in range(B):
                cur[a, b] = buf[a, b]
        if c + 1 < N:
            load(row, jt, j_end, dl, c + 1, buf)
        else:
            load(row, jt + STEP, j_end, dl, 0, buf)
    return next_chunk


def _make_merge_slots(D, G, T, DPL, DL, KS):
    @cuda.jit(device=True, inline=True)
    def merge_slots(m, l, acc, part, b, h0, s_idx, t):
        """The KS slots' states -> this split's partial part[b, h0 + g, s_idx] = (acc, m, l) per head g."""
        Ms = cuda.shared.array((KS, G), float32)
        Ls = cuda.shared.array((KS, G), float32)
        As = cuda.shared.array((KS, G, D), float32)
        dl, ks = t % DL, t // DL
        for g in range(G):
            if dl == 0:
                Ms[ks, g], Ls[ks, g] = m[g], l[g]
            for e in range(DPL):
                As[ks, g, dl * DPL + e] = acc[g, e]
        cuda.syncthreads()
        for idx in range(t, G * D, T):
            g = idx // D
            d = idx - g * D
            M = NEG_INF
            for i in range(KS):
                M = max(M, Ms[i, g])
            L, A = float32(0.0), float32(0.0)
            for i in range(KS):
                w = math.exp2(Ms[i, g] - M)        # a slot that saw no key has m = -inf: weight 0
                L += Ls[i, g] * w
                A += As[i, g, d] * w
            part[b, h0 + g, s_idx, d] = A
            if d == 0:
                part[b, h0 + g, s_idx, D] = M
                part[b, h0 + g, s_idx, D + 1] = L
    return merge_slots


def _make_merge_splits(D, G, T):
    R = -(-G * D // T)          # outputs (head, dim) per thread
    U = max(1, min(8, 16 // R))  # splits whose partials are loaded together (in flight at once; registers allowing)

    @cuda.jit(device=True, inline=True)
    def merge_splits(part, n_splits, b, h0, out, t):
        """All splits' partials of the group -> out[b, h0 + g] = sum_s acc_s w_s / sum_s l_s w_s,
        w_s = exp2(m_s - max m): the log-sum-exp merge, done online (one pass: the running max M and the sums
        are rescaled when M grows, as in the softmax itself). Each thread merges its R outputs side by side and
        loads U splits' partials before using any, so the last block pays ~n_splits / U memory latencies."""
        M = cuda.local.array(R, float32)
        L = cuda.local.array(R, float32)
        A = cuda.local.array(R, float32)
        ms = cuda.local.array((U, R), float32)
        ls = cuda.local.array((U, R), float32)
        accs = cuda.local.array((U, R), float32)
        for r in range(R):
            M[r], L[r], A[r] = NEG_INF, float32(0.0), float32(0.0)
        for s0 in range(0, n_splits, U):
            for u in range(U):
                s = min(s0 + u, n_splits - 1)
                for r in range(R):
                    idx = t + T * r
                    g, d = min(idx // D, G - 1), idx % D
                    ms[u, r] = part[b, h0 + g, s, D] if s0 + u < n_splits else NEG_INF   # past the end: weight 0
                    ls[u, r] = part[b, h0 + g, s, D + 1]
                    accs[u, r] = part[b, h0 + g, s, d]
            for u in range(U):
                for r in range(R):
                    if ms[u, r] > M[r]:
                        alpha = math.exp2(M[r] - ms[u, r])
                        M[r] = ms[u, r]
                        L[r] *= alpha
                        A[r] *= alpha
                    w = math.exp2(ms[u, r] - M[r])
                    L[r] += ls[u, r] * w
                    A[r] += accs[u, r] * w
        for r in range(R):
            idx = t + T * r
            if idx < G * D:
                out[b, h0 + idx // D, idx % D] = A[r] / L[r]
    return merge_splits


# --------------------------------------------------------------------------------------------------------
# The per-cache workspace and the public call
# --------------------------------------------------------------------------------------------------------
def check_config(config, version, head_dim):
    ok = (isinstance(config, Config) and (config.split is None or config.split >= 1) and config.threads >= 1
          and config.dims_per_lane >= 1 and config.keys_per_step >= 1 and config.min_blocks_per_sm >= 0)
    if not ok:
        raise ValueError(f"config={config!r}: expected a decode.Config with split None or >= 1, threads >= 1, "
                         f"dims_per_lane >= 1, keys_per_step >= 1 and min_blocks_per_sm >= 0")
    if version != "v0":
        split_layout(head_dim, config.threads, config.dims_per_lane)


class Workspace:
    """What decode_attention keeps per KVCache (cache.decode_workspace): the split partials and tickets, device
    buffers for host queries, and one prepared launch per (layer, arguments), so a repeated call does no
    allocation, no upload and no re-validation."""

    def __init__(self, cache):
        self.cache = cache
        self._partials = None
        self.counters = cuda.to_device(np.zeros(cache.batch * cache.n_kv_heads, np.int32))
        self._io = {}
        self.calls = {}

    def partials(self, n_heads, n_splits):
        """part [batch, n_heads, >= n_splits, head_dim + 2] float32, grown (doubled) for longer contexts."""
        have = self._partials
        if have is None or have.shape[1] != n_heads or have.shape[2] < n_splits:
            room = max(n_splits, 2 * have.shape[2]) if have is not None else n_splits
            self._partials = cuda.device_array((self.cache.batch, n_heads, room, self.cache.head_dim + 2),
                                               np.float32)
        return self._partials

    def host_io(self, q):
        """Device buffers (q, out) for a host query of q's shape and dtype, reused across calls."""
        key = (tuple(q.shape), np.dtype(q.dtype).str)
        if key not in self._io:
            self._io[key] = (cuda.device_array(q.shape, q.dtype), self.out_buffer(q.shape, ("host", key)))
        return self._io[key]

    def out_buffer(self, shape, key):
        """A float32 device result buffer of this shape kept under `key` (a layer, or host staging)."""
        if key not in self._io:
            self._io[key] = cuda.device_array(shape, np.float32)
        return self._io[key]


class _PreparedCall:
    """One (layer, q, out, scale, config, version) of decode_attention: validated once, launched many times.
    owns_out: out is the workspace's buffer (decode_attention was given no `out`)."""

    def __init__(self, cache, layer, q, out, owns_out, scale, config, version, max_length, stream):
        self.q, self.out, self.owns_out, self.version = q, out, owns_out, version
        self.max_length = max_length
        self.layer_lengths = cache._lengths[layer]            # the host mirror (a view): max -> the grid
        batch, n_heads, head_dim = q.shape
        self.batch, self.n_kv_heads, self.n_heads = batch, cache.n_kv_heads, n_heads
        self.config = config
        k, v, lengths = cache.k(layer), cache.v(layer), cache.device_lengths(layer)
        scale_log2 = np.float32(scale * LOG2E)
        if version == "v0":
            kernel = make_decode_v0(head_dim, config.threads)
            self.launch = Launch(kernel, (n_heads, batch), config.threads, (q, k, v, lengths, scale_log2, out),
                                 stream)
            return
        group = n_heads // cache.n_kv_heads
        itemsize = np.dtype(k.dtype).itemsize
        make = make_decode_v1 if version == "v1" else make_decode_v2
        kernel = make(head_dim, group, config.threads, config.dims_per_lane, config.keys_per_step, itemsize,
                      config.min_blocks_per_sm)
        (k_word, _), (v_word, _) = kv_word_types(version, head_dim, config.dims_per_lane, itemsize)
        k, v = k.view(np.dtype(k_word.name)), v.view(np.dtype(v_word.name))   # the rows as words: wide loads
        self.split, _ = plan(batch, cache.n_kv_heads, 1, config)
        most_splits = n_splits_for(cache.max_len, config.split or MIN_SPLIT)
        part = cache.decode_workspace.partials(n_heads, most_splits)
        self.launch = Launch(kernel, (1, cache.n_kv_heads, batch), config.threads,
                             (q, k, v, lengths, np.int64(self.split), scale_log2, part, cache.decode_workspace.counters,
                              out), stream)

    def __call__(self):
        max_length = self.max_length or int(self.layer_lengths.max())
        if self.version == "v0":
            self.launch()
            return
        split, n_splits = plan(self.batch, self.n_kv_heads, max_length, self.config)
        if split != self.split:                                 # a longer context: longer splits
            self.split = split
            self.launch.set_arg(4, np.int64(split))
        self.launch(grid=(n_splits, self.n_kv_heads, self.batch))


def check_decode_args(q, cache, layer, scale, out, config, version):
    """Everything decode_attention checks, once per (cache, layer, q, out): -> (layer, scale, config)."""
    from .kvcache import KVCache
    if not isinstance(cache, KVCache):
        raise ValueError(f"cache must be a numbattn.KVCache; got {type(cache).__name__}")
    layer = cache.check_layer(layer)
    check_rank("q", q, 3, "[batch, n_heads, head_dim]")
    check_dtype("q", q)
    batch, n_heads, head_dim = q.shape
    if batch != cache.batch or head_dim != cache.head_dim:
        raise ValueError(f"q has shape {tuple(q.shape)} but the cache holds batch {cache.batch}, head_dim "
                         f"{cache.head_dim}")
    check_heads("q", n_heads, "the cache", cache.n_kv_heads)
    check_head_dim("q", head_dim)
    scale = check_scale(scale, head_dim)
    if out is not None and (tuple(out.shape) != tuple(q.shape) or np.dtype(out.dtype) != np.float32
                            or not _backend.is_device_array(out)):
        raise ValueError(f"out has shape {tuple(out.shape)} and dtype {np.dtype(out.dtype).name}; expected a "
                         f"device array of shape {tuple(q.shape)}, float32")
    if version not in VERSIONS:
        raise ValueError(f"version={version!r}: expected one of {VERSIONS}")
    if config is not None:
        check_config(config, version, head_dim)
    return layer, scale, config or default_config(version, cache.backend, head_dim, n_heads // cache.n_kv_heads)


def decode_attention(q, cache, layer, scale=None, out=None, config=None, version=DEFAULT_VERSION, max_length=None,
                     stream=0):
    """One query token per row over the cached keys/values of `layer`: softmax(q k^T * scale) v per row.

    q [batch, n_heads, head_dim] float32/float16, host (-> host result) or device (-> device result).
    Row b attends to its first cache.layer_lengths(layer)[b] tokens; a row holding none gets zeros.
    Returns float32 [batch, n_heads, head_dim]. `out` (device float32, q's shape) receives the result if given;
    without it, a device q's result lands in a buffer the cache keeps per layer: valid until the next call for
    that layer (pass `out` to keep results apart). `config` overrides the launch shape and `version` the kernel
    (tests use tiny splits and both kernels). A device q seen before (the same object, and the same out) skips
    every check and goes straight to one launch. max_length: a bound on every row's length that fixes the grid
    (so a launch captured into a CUDA graph stays right while the context grows up to it; default: the
    cache's current longest row). stream: a Numba stream for the launch (device q only).
    """
    ws = getattr(cache, "decode_workspace", None)
    key = (layer, scale, config, version, max_length, stream)
    call = ws.calls.get(key) if ws is not None else None
    if call is not None and call.q is q and (call.out is out or (out is None and call.owns_out)):
        call()                                           # the hot path: a device q (and out) seen before
        return call.out
    layer, scale, config = check_decode_args(q, cache, layer, scale, out, config, version)
    if max_length is not None and not 1 <= as_count("max_length", max_length) <= cache.max_len:
        raise ValueError(f"max_length={max_length} must lie in [1, {cache.max_len}] (the cache's max_len)")
    on_device = _backend.is_device_array(q)

    def numpy_path():
        o = reference.decode_attention(_backend.to_host(q), _backend.to_host(cache.k(layer)),
                                       _backend.to_host(cache.v(layer)), cache.layer_lengths(layer), scale=scale)
        return _backend.deliver(o, out, on_device)

    def kernel_path():
        if cache.decode_workspace is None:
            cache.decode_workspace = Workspace(cache)
        ws = cache.decode_workspace
        if on_device:
            dq, o = q, out if out is not None else ws.out_buffer(q.shape, (layer, tuple(q.shape)))
        else:               # host in, host out: the device copies of q and out never escape, so reuse them
            dq, o = ws.host_io(q)
            dq.copy_to_device(np.ascontiguousarray(q))
            o = out if out is not None else o
        prepared = ws.calls.get(key)
        if prepared is None or prepared.q is not dq or prepared.out is not o:
            prepared = ws.calls[key] = _PreparedCall(cache, layer, dq, o, out is None, scale, config, version,
                                                     max_length, stream if on_device else 0)
        prepared()
        return o if on_device else o.copy_to_host()

    return _backend.run("decode attention", cache.backend, kernel_path, numpy_path)
