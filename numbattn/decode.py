"""Decode attention: one new query token per row against the KV cache, split over the keys (flash-decoding).

What you will learn here
------------------------
Each generation step brings ONE new query token per sequence (row of the batch). Its attention reads every
cached key and value once and does about 4 FLOPs per element per query head sharing them: decode is bound by
memory bandwidth, not arithmetic. The goal is simply to stream the cache once, with the whole GPU.

A prefill-style grid (one block per query head walking all keys) gives batch * n_heads blocks — 32 for
TinyLlama at batch 1, a quarter of an H100's 132 SMs — each walking the whole context alone. Flash-decoding
(Dao, Haziza, Massa, Sizov 2023) also splits the *keys* across blocks and merges afterwards:

  1. split kernel, grid (n_splits, n_kv_heads, batch), `threads` per block. Block (s, hk, b) takes the keys
     [s*split, (s+1)*split) of row b and KV head hk, clipped to that row's own length (blocks past it exit at
     once), and runs the online softmax of numbattn/prefill.py over that slice only, for EVERY query head of
     the group sharing hk (grouped-query attention, G = n_heads / n_kv_heads). Per query head g it keeps
         m_g   = max_j s_gj                      (scores in the log2 domain: s = q.k * scale * log2 e)
         l_g   = sum_j exp2(s_gj - m_g)
         acc_g = sum_j exp2(s_gj - m_g) v_j
     and writes the partial (m, l, acc) to a small float32 scratch buffer part [batch, n_heads, n_splits,
     head_dim + 2]: acc in the first head_dim columns, then m, then l (one array: every array argument costs
     Numba several microseconds of host time per launch, and decode is short enough for that to show).
  2. merge kernel, grid (n_heads, batch). Partials combine by the log-sum-exp rule
         M = max_s m_s,   L = sum_s l_s exp2(m_s - M),   out = sum_s acc_s exp2(m_s - M) / L
     — the same rescaling the online softmax does between tiles, so the result is the exact softmax over all
     of the row's keys. A row holding 0 tokens has no partials and gets zeros.

Inside a split block, keys go through shared memory in tiles of `block_n`: threads load the K and V tile
with consecutive threads on consecutive head_dim elements (coalesced; fp16 or fp32 storage, converted to fp32
on load), then every query head of the group reads the tile from shared memory: each K/V element comes from
global memory once, not G times. Per tile:
    load    next tile -> registers           issued before this tile's math, so its loads are in flight
                                             while the block computes (software prefetch)
    scores  P[g, j] = Qs[g] . Ks[j]          one (g, j) pair per thread (strided), Ks rows padded by 1 word
    max     m_new[g], alpha[g]               one thread per query head, over the tile's keys
    exp     P[g, j] = exp2(P[g, j] - m_new)  one (g, j) pair per thread again
    update  l_g, acc[g, d]                   each thread owns fixed (g, d) outputs, consecutive d per thread
All cross-thread exchange is through shared memory and syncthreads (no warp shuffles: the same code runs in
Numba's simulator). Slots past a row's length are never read: tile entries past the slice are zero-filled
instead of loaded, because the cache keeps unused slots NaN-poisoned (numbattn/kvcache.py) and 0 * NaN = NaN.

How many splits: grid x = ceil(max_length / split). With `split=None` (the GPU default) the launcher picks
the split so that batch * n_kv_heads * n_splits is about BLOCKS_PER_SM blocks per SM (several resident
blocks per SM keep enough loads in flight), but never fewer than MIN_SPLIT keys per split, so that the
partials (written and read once: n_heads * (head_dim + 2) * 4 bytes per split, twice) stay a small fraction
of the K/V bytes. Long contexts thus get longer splits, short ones more splits (TinyLlama, batch 1: 128-key
splits up to ~34K tokens, i.e. 1056 blocks = 8 per SM at 33K; longer contexts grow the split instead).
The split size is a launch argument, not a compile-time one; the tests pass tiny splits (4 keys) so that
several splits and a ragged last split occur at lengths of a few dozen tokens.

Memory traffic per step, per row: K and V once, 2 * n_kv_heads * len * head_dim * itemsize bytes (TinyLlama,
fp32: 2 KiB per cached token; fp16 storage halves it), plus q, out, and the partials: per split
2 * n_heads * (head_dim + 2) * 4 bytes against split * 2 * n_kv_heads * head_dim * itemsize of K/V, i.e.
~6% (fp32) / ~13% (fp16) at TinyLlama's G = 8 and 128-key splits (the floor MIN_SPLIT sets).
Shared memory per split block: (G*(D+1) + block_n*(D+1) + block_n*D + G*block_n + 3*G) * 4 bytes
(G=8, D=64, block_n=16: 10.9 KB); 125 registers per thread at that shape (4 blocks of 128 threads per SM).

Where the time goes (H100, TinyLlama shape; tables in BENCHMARKS.md): the split kernel streams
~180 G cache elements/s whatever the storage dtype, about 0.7 TB/s for fp32 and 0.3 TB/s for fp16 (HBM does
3 TB/s), so it is bound by its shared-memory traffic and barriers, not by DRAM: every FMA reads both operands
from shared memory (2 loads per FMA). Register tiles that reuse each loaded Ks/Vs/P word for several FMAs
(as numbattn/prefill_v2.py does) are the next lever. Below ~8K cached tokens the GPU work is a few
microseconds and a call costs what Numba's launches cost on the host (~50 us per launch here, two launches).
"""
import functools
import math
from dataclasses import dataclass

import numpy as np
from numba import cuda, float32, int64

from . import backend as _backend
from . import reference
from .validate import check_dtype, check_head_dim, check_heads, check_rank, check_scale

LOG2E = 1.4426950408889634
NEG_INF = float32(-np.inf)
# fastmath without 'ninf'/'nnan': the running max starts at -inf and NaN-poisoned cache slots must stay
# visible if a bug ever reads them, so the compiler may not assume either away. 'afn' gives the fast exp2.
FASTMATH = {"contract", "afn", "arcp", "nsz", "reassoc"}
SHARED_LIMIT = 48 * 1024   # static shared memory per block
H100_SMS = 132
BLOCKS_PER_SM = 8          # split blocks per SM that the automatic split aims for (4 fit at once: 2 waves)
MIN_SPLIT = 128            # keys; shorter splits would make the partials' traffic a large share of the K/V bytes


@dataclass(frozen=True)
class Config:
    """Launch shape: keys per split (None: chosen from the length), keys per shared tile, threads per block."""
    split: int | None
    block_n: int
    threads: int
    merge_threads: int


# The simulator runs one Python thread per CUDA thread: tiny splits and tiles, few threads (2 tiles per split).
SIM_CONFIG = Config(split=4, block_n=2, threads=8, merge_threads=4)


def shared_bytes(head_dim, group, block_n):
    D, G, BN = head_dim, group, block_n
    return 4 * (G * (D + 1) + BN * (D + 1) + BN * D + G * BN + 3 * G)


def gpu_config(head_dim, group):
    """16-key tiles (fewer if the group's shared arrays would not fit), 128 threads per split block.

    Measured on an H100 at TinyLlama's shape (32 query / 4 KV heads, head_dim 64): 16-key tiles beat 32 and 64
    (fewer registers per thread -> more resident blocks), and 128 threads matched 256.
    """
    for block_n in (16, 8, 4, 2, 1):
        if shared_bytes(head_dim, group, block_n) <= SHARED_LIMIT:
            return Config(split=None, block_n=block_n, threads=128, merge_threads=min(head_dim, 128))
    raise ValueError(f"a group of {group} query heads per KV head at head_dim {head_dim} does not fit in "
                     f"{SHARED_LIMIT} bytes of shared memory")


def default_config(backend, head_dim, group):
    return SIM_CONFIG if backend == "sim" else gpu_config(head_dim, group)


@functools.lru_cache(maxsize=None)
def sm_count():
    """SMs of the current GPU; the simulator has none to ask, so it plans as an H100 (132) would."""
    return getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", H100_SMS)


def choose_split(max_length, batch, n_kv_heads, block_n, n_sm=None):
    """Keys per split: about BLOCKS_PER_SM split blocks per SM, at least MIN_SPLIT keys, a multiple of block_n."""
    n_sm = sm_count() if n_sm is None else n_sm
    want_splits = -(-BLOCKS_PER_SM * n_sm // (batch * n_kv_heads))
    split = max(MIN_SPLIT, -(-max(max_length, 1) // want_splits))
    return -(-split // block_n) * block_n


def n_splits_for(max_length, split):
    return max(1, -(-max_length // split))


def plan(batch, n_kv_heads, head_dim, group, max_length, config=None, backend="cuda"):
    """-> (config with its split fixed, n_splits) for one launch: what make_scratch needs to know."""
    config = config or default_config(backend, head_dim, group)
    split = config.split or choose_split(max_length, batch, n_kv_heads, config.block_n)
    return Config(split, config.block_n, config.threads, config.merge_threads), n_splits_for(max_length, split)


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def make_split_kernel(head_dim, group, block_n, threads):
    """Split kernel for one (head_dim, GQA group, key tile, threads): sizes of shared/local arrays are constants."""
    D, G, BN, T = head_dim, group, block_n, threads
    DP = D + 1                      # pad rows by one word: threads reading Ks[j, d] for consecutive j (same d)
    #                                 would otherwise all hit one bank, D being a multiple of 32 words
    N_LD = (BN * D + T - 1) // T    # K (and V) elements of a tile loaded per thread
    N_ACC = (G * D + T - 1) // T    # (g, d) outputs owned per thread
    N_SC = (G * BN + T - 1) // T    # (g, j) scores computed per thread

    # Which tile elements a thread loads: element r of thread t is idx = t + r*T, i.e. row idx // D, column
    # idx % D. Written out for the two cases below (T a multiple of D, or D a multiple of T; both hold for
    # powers of two), the row and column are a per-thread base plus compile-time constants, so the N_LD loads
    # share one address register instead of each carrying its own 64-bit address.
    ROWS_PER_PASS = T // D if T % D == 0 else 0      # T >= D: thread t always loads column t % D
    PASSES_PER_ROW = D // T if D % T == 0 else 0     # T <= D: a row takes D / T passes of the block
    if not (ROWS_PER_PASS or PASSES_PER_ROW):
        raise ValueError(f"threads={T} and head_dim={D}: one must divide the other")

    @cuda.jit(device=True, inline="always")
    def slot(r, t):
        """(key jj, dim d) of the r-th tile element that thread t loads (element t + r*T of the tile)."""
        if ROWS_PER_PASS:
            return t // D + r * ROWS_PER_PASS, t % D
        return r // PASSES_PER_ROW, t + (r % PASSES_PER_ROW) * T

    @cuda.jit(device=True, inline="always")
    def load_tile(k_row, v_row, j0, nk, t, k_reg, v_reg):
        """Tile j0.. of K and V into registers; slots past the split (or the row) become 0, never read.

        A fixed trip count lets the compiler issue all N_LD loads back to back, so they are in flight together
        (one load at a time would leave the kernel waiting on memory latency, not bandwidth)."""
        for r in range(N_LD):
            jj, d = slot(r, t)
            if jj < nk:
                k_reg[r] = float32(k_row[j0 + jj, d])
                v_reg[r] = float32(v_row[j0 + jj, d])
            else:                   # unused slots hold NaN, and 0 * NaN = NaN
                k_reg[r] = float32(0.0)
                v_reg[r] = float32(0.0)

    @cuda.jit(fastmath=FASTMATH)
    def decode_split(q, k, v, lengths, split, scale_log2, part):
        s, hk, b = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        t = cuda.threadIdx.x
        n = min(int64(lengths[b]), int64(k.shape[2]))   # a bad length from a raw launch cannot read past max_len
        j_begin = int64(s) * split
        if j_begin >= n:
            return                  # the whole block leaves together: no barrier below is left half-attended
        j_end = min(j_begin + split, n)
        h0 = hk * G                 # first query head of this KV head's group

        Qs = cuda.shared.array((G, DP), float32)
        Ks = cuda.shared.array((BN, DP), float32)
        Vs = cuda.shared.array((BN, D), float32)
        P = cuda.shared.array((G, BN), float32)     # scores, then probabilities, of the current tile
        m_sh = cuda.shared.array(G, float32)
        l_sh = cuda.shared.array(G, float32)
        alpha_sh = cuda.shared.array(G, float32)
        acc = cuda.local.array(N_ACC, float32)
        k_reg = cuda.local.array(N_LD, float32)
        v_reg = cuda.local.array(N_LD, float32)

        k_row, v_row = k[b, hk], v[b, hk]          # [max_len, D] views: less index arithmetic per load
        load_tile(k_row, v_row, j_begin, min(int64(BN), j_end - j_begin), t, k_reg, v_reg)
        # q of the whole group, pre-multiplied by scale * log2(e) so the softmax below is all exp2
        for idx in range(t, G * D, T):
            g = idx // D
            d = idx - g * D
            Qs[g, d] = float32(q[b, h0 + g, d]) * scale_log2
        for g in range(t, G, T):
            m_sh[g] = NEG_INF
            l_sh[g] = float32(0.0)
        for r in range(N_ACC):
            acc[r] = float32(0.0)

        for j0 in range(j_begin, j_end, BN):
            nk = min(int64(BN), j_end - j0)         # keys in this tile; the last tile of a split may be ragged
            cuda.syncthreads()      # the previous tile is consumed (and Qs, m_sh, l_sh are written)
            for r in range(N_LD):   # registers -> shared; consecutive threads hold consecutive d
                jj, d = slot(r, t)
                if jj < BN:
                    Ks[jj, d] = k_reg[r]
                    Vs[jj, d] = v_reg[r]
            cuda.syncthreads()
            if j0 + BN < j_end:     # prefetch the next tile: its loads fly while this one is computed
                load_tile(k_row, v_row, j0 + BN, min(int64(BN), j_end - j0 - BN), t, k_reg, v_reg)
            for r in range(N_SC):
                e = t + r * T
                if e < G * BN:
                    g = e // BN
                    jj = e - g * BN
                    x = float32(0.0)
                    for d in range(D):
                        x += Qs[g, d] * Ks[jj, d]
                    P[g, jj] = x
            cuda.syncthreads()
            for g in range(t, G, T):                # new running max per query head, and the rescale factor
                m_old = m_sh[g]
                m_new = m_old
                for jj in range(BN):    # a constant trip count unrolls: the loads overlap instead of queueing
                    m_new = max(m_new, P[g, jj] if jj < nk else NEG_INF)
                alpha_sh[g] = math.exp2(m_old - m_new)  # exp2(-inf) = 0 on the first tile: acc, l start at 0
                m_sh[g] = m_new
            cuda.syncthreads()
            for r in range(N_SC):
                e = t + r * T
                if e < G * BN:
                    g = e // BN
                    jj = e - g * BN
                    P[g, jj] = math.exp2(P[g, jj] - m_sh[g]) if jj < nk else float32(0.0)
            cuda.syncthreads()
            for g in range(t, G, T):                # same thread as in the max step: l_sh[g] is its own
                l_g = l_sh[g] * alpha_sh[g]
                for jj in range(BN):    # P is 0 past nk
                    l_g += P[g, jj]
                l_sh[g] = l_g
            for r in range(N_ACC):
                e = t + r * T
                if e < G * D:
                    g = e // D
                    d = e - g * D
                    a = acc[r] * alpha_sh[g]
                    for jj in range(BN):            # P is 0 past nk, and Vs is 0 there too
                        a += P[g, jj] * Vs[jj, d]
                    acc[r] = a

        # partials of this split: part[b, h, s, :D] = acc, [D] = m, [D + 1] = l (m_sh[g], l_sh[g] were last
        # written by this same thread)
        for g in range(t, G, T):
            part[b, h0 + g, s, D] = m_sh[g]
            part[b, h0 + g, s, D + 1] = l_sh[g]
        for r in range(N_ACC):
            e = t + r * T
            if e < G * D:
                g = e // D
                d = e - g * D
                part[b, h0 + g, s, d] = acc[r]

    return decode_split


@functools.lru_cache(maxsize=None)
def make_merge_kernel(head_dim, threads):
    D, T = head_dim, threads

    @cuda.jit(fastmath=FASTMATH)
    def decode_merge(lengths, max_len, split, n_splits, part, out):
        h, b = cuda.blockIdx.x, cuda.blockIdx.y
        t = cuda.threadIdx.x
        n = min(int64(lengths[b]), int64(max_len))
        n_s = min((n + split - 1) // split, int64(n_splits)) if n > 0 else int64(0)
        # every thread walks the (few) split maxima itself: reads of the same word are broadcasts, and no
        # barrier is needed
        m_all = NEG_INF
        for s in range(n_s):
            m_all = max(m_all, part[b, h, s, D])
        l_all = float32(0.0)
        for s in range(n_s):
            l_all += part[b, h, s, D + 1] * math.exp2(part[b, h, s, D] - m_all)
        inv_l = float32(1.0) / l_all if n_s > 0 else float32(0.0)  # a row with no tokens returns zeros
        for d in range(t, D, T):
            a = float32(0.0)
            for s in range(n_s):
                a += part[b, h, s, d] * math.exp2(part[b, h, s, D] - m_all)
            out[b, h, d] = a * inv_l

    return decode_merge


# --------------------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------------------
def make_scratch(batch, n_heads, head_dim, n_splits):
    """Device buffer for the split partials, part [batch, n_heads, n_splits, head_dim + 2] (acc, m, l)."""
    return cuda.device_array((batch, n_heads, n_splits, head_dim + 2), np.float32)


def check_config(config, head_dim):
    """Tile and thread counts the kernels can use: powers of two threads (so threads and head_dim divide)."""
    ok = (isinstance(config, Config) and (config.split is None or config.split >= 1) and config.block_n >= 1
          and config.merge_threads >= 1 and config.threads >= 1 and config.threads & (config.threads - 1) == 0)
    if not ok:
        raise ValueError(f"config={config!r}: expected a decode.Config with split None or >= 1, block_n >= 1, "
                         f"merge_threads >= 1 and threads a power of two (head_dim {head_dim})")


def check_decode(q, k, v, lengths, out):
    """Validate q [b, h, d], k, v [b, h_kv, max_len, d], lengths int32 [b], out float32 [b, h, d]."""
    check_rank("q", q, 3, "[batch, n_heads, head_dim]")
    check_dtype("q", q)
    for name, x in (("k", k), ("v", v)):
        check_rank(name, x, 4, "[batch, n_kv_heads, max_len, head_dim]")
        check_dtype(name, x)
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; they must match")
    b, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q has shape {tuple(q.shape)} but k has shape {tuple(k.shape)}: batch and head_dim "
                         f"must match")
    check_head_dim("q", d)
    check_heads("q", h, "k", k.shape[1])
    if tuple(lengths.shape) != (b,) or np.dtype(lengths.dtype) != np.int32:
        raise ValueError(f"lengths has shape {tuple(lengths.shape)} and dtype {np.dtype(lengths.dtype).name}; "
                         f"expected ({b},) int32")
    if tuple(out.shape) != (b, h, d) or np.dtype(out.dtype) != np.float32:
        raise ValueError(f"out has shape {tuple(out.shape)} and dtype {np.dtype(out.dtype).name}; "
                         f"expected {(b, h, d)} float32")


def launch(q, k, v, lengths, out, scale=None, max_length=None, config=None, scratch=None, stream=0):
    """Decode attention on device arrays: two launches (split, merge), no host copies. Returns out.

    q [batch, n_heads, head_dim] float32/float16; k, v [batch, n_kv_heads, max_len, head_dim] float32/float16
    (the cache's storage); lengths int32 [batch] (device); out float32 [batch, n_heads, head_dim] (device).
    max_length: a host int >= every lengths[b] (it sets the number of splits; default max_len).
    config: launch shape (default gpu_config: 16-key tiles, 128 threads, split chosen from max_length).
    scratch: make_scratch(batch, n_heads, head_dim, n) with n >= the n_splits that plan() returns for the same
    arguments; allocated here when None (pass one to keep allocation out of a timed loop).

    Timing it without host copies (what numbattn/bench.py does):
        cfg, n_splits = decode.plan(batch, n_kv_heads, head_dim, n_heads // n_kv_heads, max_length)
        scratch = decode.make_scratch(batch, n_heads, head_dim, n_splits)
        fn = lambda: decode.launch(q_dev, k_dev, v_dev, lengths_dev, out_dev, None, max_length, cfg, scratch)
    with k_dev, v_dev, lengths_dev = cache.k(layer), cache.v(layer), cache.device_lengths(layer).
    """
    check_decode(q, k, v, lengths, out)
    batch, n_heads, head_dim = q.shape
    n_kv_heads, max_len = k.shape[1], k.shape[2]
    scale = check_scale(scale, head_dim)
    max_length = max_len if max_length is None else int(max_length)
    if not 0 <= max_length <= max_len:
        raise ValueError(f"max_length={max_length} must lie in [0, {max_len}] (k has shape {tuple(k.shape)})")
    group = n_heads // n_kv_heads
    if config is not None:
        check_config(config, head_dim)
    config, n_splits = plan(batch, n_kv_heads, head_dim, group, max_length, config)
    split = config.split
    if scratch is None:
        scratch = make_scratch(batch, n_heads, head_dim, n_splits)
    if (len(scratch.shape) != 4 or tuple(scratch.shape[:2]) != (batch, n_heads) or scratch.shape[2] < n_splits
            or scratch.shape[3] != head_dim + 2 or np.dtype(scratch.dtype) != np.float32):
        raise ValueError(f"scratch has shape {tuple(scratch.shape)}; this call needs "
                         f"({batch}, {n_heads}, >= {n_splits}, {head_dim + 2}) float32: use make_scratch")
    split_kernel = make_split_kernel(head_dim, group, config.block_n, config.threads)
    merge_kernel = make_merge_kernel(head_dim, config.merge_threads)
    split_kernel[(n_splits, n_kv_heads, batch), config.threads, stream](
        q, k, v, lengths, split, float32(scale * LOG2E), scratch)
    merge_kernel[(n_heads, batch), config.merge_threads, stream](
        lengths, max_len, split, n_splits, scratch, out)
    return out


def _scratch_of(cache, batch, n_heads, head_dim, n_splits):
    """The cache's reusable partials buffer, grown (doubled) when a longer context needs more splits."""
    have = cache.scratch.get(n_heads)
    if have is None or have.shape[2] < n_splits:
        room = max(n_splits, 2 * have.shape[2]) if have is not None else n_splits
        have = cache.scratch[n_heads] = make_scratch(batch, n_heads, head_dim, room)
    return have


def _host_io_of(cache, q):
    """Device buffers for a host q and the result, reused across calls: cuda.to_device plus an output
    allocation cost 0.19-0.24 ms of host time per call on the H100 machine, a copy into a kept buffer 0.10-0.13."""
    key = ("decode_io", tuple(q.shape), np.dtype(q.dtype).str)
    if key not in cache.scratch:
        cache.scratch[key] = (cuda.device_array(q.shape, q.dtype), cuda.device_array(q.shape, np.float32))
    return cache.scratch[key]


def decode_attention(q, cache, layer, scale=None, out=None, config=None):
    """One query token per row over the cached keys/values of `layer`: softmax(q k^T * scale) v per row.

    q [batch, n_heads, head_dim] float32/float16, host (-> host result) or device (-> device result).
    Row b attends to its first cache.layer_lengths(layer)[b] tokens; a row holding none gets zeros.
    Returns float32 [batch, n_heads, head_dim]. `out` (device float32, q's shape) receives the result if given;
    `config` overrides the launch shape (tests use tiny splits).
    """
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
    scale = check_scale(scale, head_dim)
    if out is not None and (tuple(out.shape) != tuple(q.shape) or np.dtype(out.dtype) != np.float32
                            or not _backend.is_device_array(out)):
        raise ValueError(f"out has shape {tuple(out.shape)} and dtype {np.dtype(out.dtype).name}; expected a "
                         f"device array of shape {tuple(q.shape)}, float32")
    if config is not None:
        check_config(config, head_dim)
    on_device = _backend.is_device_array(q)
    lengths = cache.layer_lengths(layer)   # host copy: the number of splits needs no device->host transfer

    def numpy_path():
        o = reference.decode_attention(_backend.to_host(q), _backend.to_host(cache.k(layer)),
                                       _backend.to_host(cache.v(layer)), lengths, scale=scale)
        return _backend.deliver(o, out, on_device)

    def kernel_path():
        if on_device:
            dq = q
            o = out if out is not None else cuda.device_array(q.shape, dtype=np.float32)
        else:               # host in, host out: the device copies of q and out never escape, so reuse them
            dq, o = _host_io_of(cache, q)
            dq.copy_to_device(np.ascontiguousarray(q))
            o = out if out is not None else o
        max_length = int(lengths.max())
        cfg, n_splits = plan(batch, cache.n_kv_heads, head_dim, n_heads // cache.n_kv_heads, max_length, config,
                             cache.backend)
        scratch = _scratch_of(cache, batch, n_heads, head_dim, n_splits)
        launch(dq, cache.k(layer), cache.v(layer), cache.device_lengths(layer), o, scale, max_length, cfg,
               scratch)
        return o if on_device else o.copy_to_host()

    return _backend.run("decode attention", cache.backend, kernel_path, numpy_path)
