"""GEMM on tensor cores: y = x W^T for a prompt chunk (prefill), bf16 mma.sync (m16n8k16, fp32 accumulation).

What this changes over gemm.py (the SIMT kernel), and why
----------------------------------------------------------
gemm.py multiplies on the fp32 SIMT cores: 10-17 TFLOP/s on an H100, so a 512-token prompt of TinyLlama spent
~70 of its 82 ms in matmuls. The weights are bf16 already, and the tensor cores multiply bf16 at ~15x that rate:
a bf16 MMA's B operand is W^T, and its fragment b0,b1 = W[n][2t], W[n][2t+1] is one 32-bit word of the stored
row (kernels/mma.py), so the weights go from memory to the tensor cores as the checkpoint stores them. The
activations x are fp32: rounding them to bf16 (what bf16 frameworks do) would cost ~3 decimal digits. Instead
each x is split into T bf16 terms (kernels/mma.py make_bf16_split: x ~ x_0 + x_1 [+ x_2]) and x W^T is the sum of
T MMAs per k step, W exact: T = 2 keeps 16 bits of every x (~1e-6 relative, like fp32 sums), T = 3 all 24.
The split is done once per element, while the tile is staged, not per warp that reads it.

Work split. A block computes a BM x BN tile of y; its warps form a WM x WN grid over that tile (each warp MI = BM
/ (16 WM) row blocks by NI = BN / (8 WN) column blocks of MMA tiles, MI NI accumulators of 4 floats per lane)
times WK groups that split each K tile between them (a prompt of 16 tokens has one row block: its blocks get
their parallelism from K instead; the WK partial tiles are summed through shared memory at the end). Per K tile
of BK: x [BM, BK] is split into T planes of bf16 words and W [BN, BK] copied as words into shared memory, rows
padded to BK/2 + 4 words so that a warp's fragment reads (lane g, t reads row g, word t) hit 32 banks. The next
K tile's global loads are issued before this one's MMAs (kept in registers: a software pipeline of depth 2), so
memory and tensor cores work at the same time, and their counts are fixed (unrolled: all in flight together).
Each K tile's products are summed from zero and added to the fp32 accumulators (`chunked`), so no sum runs more
than BK/16 T MMAs deep in the tensor cores' own accumulation, which rounds less carefully than an FMA (prefill
v3 measured 3.6e-5 over 4096-deep sums).

The accumulator layout gives lane (g, t) the columns 2t, 2t+1 of rows g and g+8: adjacent column pairs, so the
SwiGLU and GeGLU epilogues (gate and up interleaved in W's rows) see each pair in one lane, as in gemm.py.
Traffic: W read ceil(M / BM) times, x read ceil(N / BN) times (from L2), y once.
# x [M, K] f32, w [N, K/4] u64 (bf16 words) -> out [M, N] (swiglu, geglu: [M, N/2]); `out` += for residual

Control flow is the same for every thread of a block around every MMA (the simulator twin is a block-wide
exchange, kernels/mma.py).
"""
import functools
from dataclasses import dataclass

from numba import cuda, float32, uint32, uint64

from ..blocks import BLOCK_KINDS, values_per_word
from .blocks import gpu_factors, has_offset, make_codes, make_row_offsets
from .common import bf16_pair, device, gate_of, kernel
from .mma import bf16x2, make_bf16_split, make_mma_bf16_n, mma_scratch_shape


@dataclass(frozen=True)
class MmaTiles:
    """Launch shape: the block's tile BM x BN, its K tile BK, and its warps: WM x WN over the tile, WK over K."""
    bm: int
    bn: int
    bk: int
    wm: int
    wn: int
    wk: int = 1

    @property
    def threads(self):
        return 32 * self.wm * self.wn * self.wk


def layout(tiles, kind="bf16"):
    """-> (MI, NI, KS, SW, XL, WL): MMA row and column blocks per warp, k16 steps per warp per K tile, words per
    shared row, x pairs and W words each thread stages per K tile (GGUF blocks: code words, the last ones of a
    tile possibly staged by fewer threads)."""
    t = tiles
    nt = t.threads
    bf16 = kind == "bf16"
    ok = (min(t.bm, t.bn, t.bk, t.wm, t.wn, t.wk) >= 1 and t.bm % (16 * t.wm) == 0 and t.bn % (8 * t.wn) == 0
          and t.bk % (16 * t.wk) == 0 and (t.bm * t.bk // 2) % nt == 0 and (not bf16 or (t.bn * t.bk // 4) % nt == 0))
    if not ok:
        raise ValueError(f"gemm_mma tiles {t}: need BM a multiple of 16 WM, BN of 8 WN, BK of 16 WK, and the "
                         f"tile's x pairs (BM BK / 2) and W words (BN BK / 4) a multiple of the {nt} threads")
    mi, ni, ks = t.bm // (16 * t.wm), t.bn // (8 * t.wn), t.bk // (16 * t.wk)
    wl = t.bn * t.bk // 4 // nt if bf16 else -(-t.bn * t.bk // values_per_word(kind) // nt)
    return mi, ni, ks, t.bk // 2 + 4, t.bm * t.bk // 2 // nt, wl


def shared_bytes(tiles, terms, kind="bf16"):
    """Static shared memory of one block on a GPU: T x planes, the W tile, the WK - 1 partial tiles (and for GGUF
    blocks, each k16 step's factors and sums of x)."""
    _, _, _, SW, _, _ = layout(tiles, kind)
    factors = 0 if kind == "bf16" else 3 * max(tiles.bm, tiles.bn) * (tiles.bk // 16)
    return 4 * (SW * (terms * tiles.bm + tiles.bn) + (tiles.wk - 1) * tiles.bm * (tiles.bn + 1) + factors)


@functools.lru_cache(maxsize=None)
def make_gemm_mma(epilogue, tiles, terms=2, chunked=True, kind="bf16"):
    """GEMM on tensor cores: tiles an MmaTiles, x split into `terms` bf16 terms (1-3). bf16 weights: each K tile's
    products summed from zero and added in fp32 (`chunked`) or accumulated in the tensor cores throughout. GGUF
    blocks (`kind`, numbattn/blocks.py): the integer codes go to the tensor cores as bf16 (exact), each k16 step's
    products are summed from zero and scaled by their group's factor in fp32 (the offset's term added from the
    step's sum of x): y = sum over steps of a * (x . c) [+ b * sum(x)], the weights exact.

    # x [M, K] f32, w [N, row words] u64 (bf16 words or blocks) -> out [M, N] (swiglu, geglu: [M, N/2]); `out` +=
    Launch: grid (ceil(N / BN), ceil(M / BM)), tiles.threads threads.
    """
    MI, NI, KS, SW, XL, WL = layout(tiles, kind)
    if terms not in (1, 2, 3):
        raise ValueError(f"gemm_mma: terms={terms}; expected 1, 2 or 3 bf16 terms per activation")
    T, BM, BN, BK, WK, NT = terms, tiles.bm, tiles.bn, tiles.bk, tiles.wk, tiles.threads
    ACC, XR = (MI * NI, 4), (XL, 2)
    PART = (WK - 1, BM, BN + 1) if WK > 1 else (1, 1, 1)
    FS, FR = ((3, max(BM, BN), BK // 16), (WL, 2)) if kind != "bf16" else ((1, 1, 1), (1, 2))
    SCRATCH = mma_scratch_shape(NT, NI, bf16=True)
    fetch, stage = _make_staging(tiles, T) if kind == "bf16" else _make_block_staging(tiles, T, kind)
    mma_tile = _make_mma_tile(tiles, T, chunked) if kind == "bf16" else _make_block_mma_tile(tiles, T, kind)
    offsets = make_row_offsets(kind)
    add_partials = _make_reduce_k(tiles)
    store = _make_store(tiles, epilogue)

    @kernel
    def gemm_mma(x, w, out):
        # x [M, K] f32, w [N, row words] u64 (bf16 words or blocks) -> out [M, N] (swiglu, geglu: [M, N/2]); `out` +=
        xs = cuda.shared.array((T, BM, SW), uint32)          # x tile: T planes of bf16 pairs
        ws = cuda.shared.array((BN, SW), uint32)             # W tile: bf16 pairs (as stored, or the codes)
        fs = cuda.shared.array(FS, float32)                  # blocks: a, b per (row, k16 step), sums of x
        part = cuda.shared.array(PART, float32)              # the WK - 1 other groups' partial tiles
        scratch = cuda.shared.array(SCRATCH, float32)        # the simulator twin's exchange (a dummy on a GPU)
        acc = cuda.local.array(ACC, float32)                 # [MI * NI, 4]: this lane's accumulators
        tile_acc = cuda.local.array(ACC, float32)            # the current K tile's (k16 step's) products
        xr = cuda.local.array(XR, float32)                   # the next K tile, in registers
        wr = cuda.local.array(WL, uint64)
        fr = cuda.local.array(FR, float32)                   # blocks: the next tile's words' factors a, b
        m0, n0 = cuda.blockIdx.y * BM, cuda.blockIdx.x * BN
        rows = offsets(x.shape[1])                           # (code words, high bits, records) of a row
        for i in range(MI * NI):
            for e in range(4):
                acc[i, e] = float32(0.0)
        fetch(x, w, m0, n0, 0, xr, wr, fr, rows)
        for k0 in range(0, x.shape[1], BK):
            cuda.syncthreads()                               # the previous tile is consumed
            stage(w, n0, k0, xr, wr, fr, xs, ws, fs, rows)
            cuda.syncthreads()
            if k0 + BK < x.shape[1]:                         # the same for every thread: the next tile in flight
                fetch(x, w, m0, n0, k0 + BK, xr, wr, fr, rows)
            mma_tile(xs, ws, fs, acc, tile_acc, scratch)
        add_partials(acc, part)
        store(out, acc, m0, n0, x.shape[0], w.shape[0])

    return gemm_mma


def _make_place(tiles):
    WM, WN, BMW, BNW = tiles.wm, tiles.wn, tiles.bm // tiles.wm, tiles.bn // tiles.wn

    @device
    def place():
        """-> (r0, c0, wk, g, t): this warp's first row and column in the block tile, its K group, and the lane's
        fragment coordinates (lane = 4 g + t)."""
        tid = cuda.threadIdx.x
        warp, lane = tid // 32, tid % 32
        wk, wmn = warp // (WM * WN), warp % (WM * WN)
        return (wmn // WN) * BMW, (wmn % WN) * BNW, wk, lane >> 2, lane & 3
    return place


def _make_x_staging(tiles, T):
    """fetch_x: x's K tile at k0 into registers (pairs; zeros past M and K); stage_x: registers -> shared, split
    into T bf16 terms."""
    NT, BKH = tiles.threads, tiles.bk // 2
    XL = tiles.bm * BKH // NT
    split = make_bf16_split(T)

    @device
    def fetch_x(x, m0, k0, xr):
        t = cuda.threadIdx.x
        for e in range(XL):                                  # consecutive threads: consecutive pairs of a row
            idx = t + e * NT
            r = idx // BKH
            m, k = m0 + r, k0 + 2 * (idx - r * BKH)
            xr[e, 0] = x[m, k] if m < x.shape[0] and k < x.shape[1] else float32(0.0)
            xr[e, 1] = x[m, k + 1] if m < x.shape[0] and k + 1 < x.shape[1] else float32(0.0)

    @device
    def stage_x(xr, xs):
        t = cuda.threadIdx.x
        words = cuda.local.array(T, uint32)
        for e in range(XL):
            idx = t + e * NT
            r = idx // BKH
            split(xr[e, 0], xr[e, 1], words)
            for term in range(T):
                xs[term, r, idx - r * BKH] = words[term]
    return fetch_x, stage_x


def _make_fetch(tiles, T, WL, BKW, fetch_word):
    """(fetch, stage_x): fetch brings x's K tile at k0 into registers (fetch_x) and W's WL words per thread,
    consecutive threads on consecutive words of a tile row (BKW words a row): fetch_word(w, n, c, idx, k0, e, wr,
    fr, rows) loads word c of row n into wr[e] (and its factors into fr[e], for blocks)."""
    NT = tiles.threads
    fetch_x, stage_x = _make_x_staging(tiles, T)

    @device
    def fetch(x, w, m0, n0, k0, xr, wr, fr, rows):
        fetch_x(x, m0, k0, xr)
        t = cuda.threadIdx.x
        for e in range(WL):
            idx = t + e * NT
            r = idx // BKW
            fetch_word(w, n0 + r, idx - r * BKW, idx, k0, e, wr, fr, rows)
    return fetch, stage_x


def _make_staging(tiles, T):
    """bf16 weights. fetch: the K tile at k0 from global memory into registers (x pairs, W words; zeros past M, N,
    K); stage: registers -> shared, x split into its T bf16 terms, W's words as they are."""
    _, _, _, _, _, WL = layout(tiles)
    NT, BKW = tiles.threads, tiles.bk // 4

    @device
    def fetch_word(w, n, c, idx, k0, e, wr, fr, rows):
        kw = k0 // 4 + c
        wr[e] = w[n, kw] if n < w.shape[0] and kw < w.shape[1] else uint64(0)
    fetch, stage_x = _make_fetch(tiles, T, WL, BKW, fetch_word)

    @device
    def stage(w, n0, k0, xr, wr, fr, xs, ws, fs, rows):
        stage_x(xr, xs)
        t = cuda.threadIdx.x
        for e in range(WL):
            idx = t + e * NT
            r = idx // BKW
            c = 2 * (idx - r * BKW)
            ws[r, c] = uint32(wr[e] & uint64(0xFFFFFFFF))
            ws[r, c + 1] = uint32(wr[e] >> uint64(32))
    return fetch, stage


def _make_block_staging(tiles, T, kind):
    """GGUF blocks. fetch: x pairs and W's code words of the K tile at k0, with each word's factors (a, b) from
    its scale record; stage: x split into T bf16 terms, each word's codes c - z as bf16 pairs (small integers:
    exact), the factors per (row, k16 step), and (kinds with an offset) each k16 step's sum of the staged x."""
    _, _, _, _, _, WL = layout(tiles, kind)
    NT, BK, BM = tiles.threads, tiles.bk, tiles.bm
    VPW, STEPS = values_per_word(kind), tiles.bk // 16
    BKW, WORDS = BK // VPW, tiles.bn * BK // VPW                # code words per tile row, per tile
    WPG = BLOCK_KINDS[kind].group // VPW                        # code words per group
    factors, codes = gpu_factors(kind), make_codes(kind)
    OFFSET = has_offset(kind)

    @device
    def fetch_word(w, n, c, idx, k0, e, wr, fr, rows):
        i = k0 // VPW + c
        fr[e, 0], fr[e, 1], wr[e] = float32(0.0), float32(0.0), uint64(0)
        if idx < WORDS and n < w.shape[0] and i < rows[0]:
            wr[e] = w[n, i]
            fr[e, 0], fr[e, 1] = factors(w, n, rows[2], i // WPG)
    fetch, stage_x = _make_fetch(tiles, T, WL, BKW, fetch_word)

    @device
    def stage(w, n0, k0, xr, wr, fr, xs, ws, fs, rows):
        stage_x(xr, xs)
        t = cuda.threadIdx.x
        vals = cuda.local.array(VPW, float32)
        for e in range(WL):
            idx = t + e * NT
            r = idx // BKW
            c = idx - r * BKW
            if idx < WORDS:
                n, i = n0 + r, k0 // VPW + c
                if n < w.shape[0] and i < rows[0]:
                    codes(w, n, i, wr[e], rows[1], vals)
                else:
                    for j in range(VPW):
                        vals[j] = float32(0.0)
                for p in range(VPW // 2):
                    ws[r, c * (VPW // 2) + p] = bf16x2(vals[2 * p], vals[2 * p + 1])
                fs[0, r, c * VPW // 16] = fr[e, 0]
                fs[1, r, c * VPW // 16] = fr[e, 1]
        if OFFSET:
            cuda.syncthreads()
            for idx in range(t, BM * STEPS, NT):
                r, s = idx // STEPS, idx % STEPS
                total = float32(0.0)
                for q in range(8):
                    for term in range(T):
                        lo, hi = bf16_pair(xs[term, r, 8 * s + q])
                        total += lo + hi
                fs[2, r, s] = total
    return fetch, stage


def _make_k16_step(MI, NI, T):
    """k16_step: one k16 step of this warp's tile (word column kw of this lane), all T terms, added into sums:
    B's fragments (rows c0 + 8 j + g of ws) loaded once, then A's of each term (rows r0 + 16 i + g, + 8 of xs)."""
    mma_n = make_mma_bf16_n(NI)

    @device
    def k16_step(xs, ws, a, b, r0, c0, g, kw, sums, scratch):
        for j in range(NI):
            b[j, 0] = ws[c0 + 8 * j + g, kw]
            b[j, 1] = ws[c0 + 8 * j + g, kw + 4]
        for e in range(T):                                # the small terms first, while the sums are small
            for i in range(MI):
                row = uint32(r0 + 16 * i + g)
                a[i, 0] = xs[T - 1 - e, row, kw]
                a[i, 1] = xs[T - 1 - e, row + 8, kw]
                a[i, 2] = xs[T - 1 - e, row, kw + 4]
                a[i, 3] = xs[T - 1 - e, row + 8, kw + 4]
                mma_n(a, i, b, sums, i * NI, scratch)
    return k16_step


def _make_mma_tile(tiles, T, chunked):
    """mma_tile: this warp's share of one K tile (its group's KS k16 steps), all T terms, into acc."""
    MI, NI, KS, _, _, _ = layout(tiles)
    k16_step = _make_k16_step(MI, NI, T)
    place = _make_place(tiles)

    @device
    def mma_tile(xs, ws, fs, acc, tile_acc, scratch):
        r0, c0, wk, g, t = place()
        sums = tile_acc if chunked else acc
        if chunked:
            for i in range(MI * NI):
                for e in range(4):
                    tile_acc[i, e] = float32(0.0)
        a = cuda.local.array((MI, 4), uint32)
        b = cuda.local.array((NI, 2), uint32)
        for ks in range(KS):
            kw = uint32((wk * KS + ks) * 8 + t)               # word column of this k16 step, this lane
            k16_step(xs, ws, a, b, r0, c0, g, kw, sums, scratch)
        if chunked:
            for i in range(MI * NI):
                for e in range(4):
                    acc[i, e] += tile_acc[i, e]
    return mma_tile


def _make_block_mma_tile(tiles, T, kind):
    """mma_tile for GGUF blocks: each of this warp's k16 steps summed from zero over all T terms (tile_acc), then
    scaled into acc column by column: acc[m, n] += a[n, s] * step[m, n] (+ b[n, s] * sum_x[m, s])."""
    MI, NI, KS, _, _, _ = layout(tiles, kind)
    k16_step = _make_k16_step(MI, NI, T)
    place = _make_place(tiles)
    OFFSET = has_offset(kind)

    @device
    def mma_tile(xs, ws, fs, acc, tile_acc, scratch):
        r0, c0, wk, g, t = place()
        a = cuda.local.array((MI, 4), uint32)
        b = cuda.local.array((NI, 2), uint32)
        for ks in range(KS):
            s = wk * KS + ks                                  # the k16 step within the tile
            kw = uint32(s * 8 + t)
            for i in range(MI * NI):
                for e in range(4):
                    tile_acc[i, e] = float32(0.0)
            k16_step(xs, ws, a, b, r0, c0, g, kw, tile_acc, scratch)
            for j in range(NI):
                for h in range(2):                            # this lane's columns 2t, 2t + 1 of block j
                    col = c0 + 8 * j + 2 * t + h
                    fa, fb = fs[0, col, s], fs[1, col, s]
                    for i in range(MI):
                        for v in range(2):                    # rows g, g + 8
                            step = tile_acc[i * NI + j, 2 * v + h]
                            if OFFSET:
                                step = fa * step + fb * fs[2, r0 + 16 * i + g + 8 * v, s]
                            else:
                                step = fa * step
                            acc[i * NI + j, 2 * v + h] += step
    return mma_tile


def _make_reduce_k(tiles):
    """add_partials: the WK groups' partial tiles summed into group 0's accumulators, through shared memory."""
    MI, NI, WK = layout(tiles)[0], layout(tiles)[1], tiles.wk
    place = _make_place(tiles)

    @device
    def add_partials(acc, part):
        if WK == 1:
            return
        r0, c0, wk, g, t = place()
        if wk > 0:
            for i in range(MI):
                for j in range(NI):
                    for e in range(4):
                        part[wk - 1, r0 + 16 * i + g + 8 * (e // 2), c0 + 8 * j + 2 * t + e % 2] = acc[i * NI + j, e]
        cuda.syncthreads()
        if wk == 0:
            for s in range(WK - 1):
                for i in range(MI):
                    for j in range(NI):
                        for e in range(4):
                            acc[i * NI + j, e] += part[s, r0 + 16 * i + g + 8 * (e // 2), c0 + 8 * j + 2 * t + e % 2]
    return add_partials


def _make_store(tiles, epilogue):
    """store: group 0's accumulators -> out, through the epilogue (lane g, t holds columns 2t, 2t + 1: a pair)."""
    gate = gate_of(epilogue)
    MI, NI = layout(tiles)[0], layout(tiles)[1]
    place = _make_place(tiles)

    @device
    def store(out, acc, m0, n0, n_tokens, n_rows):
        r0, c0, wk, g, t = place()
        if wk != 0:
            return
        for i in range(MI):
            for h in range(2):                                # rows g and g + 8 of the 16-row block
                m = m0 + r0 + 16 * i + g + 8 * h
                if m < n_tokens:
                    for j in range(NI):
                        n = n0 + c0 + 8 * j + 2 * t
                        v0, v1 = acc[i * NI + j, 2 * h], acc[i * NI + j, 2 * h + 1]
                        if gate is not None:                  # swiglu, geglu: gate and up side by side
                            if n + 1 < n_rows:
                                out[m, n // 2] = gate(v0) * v1
                        elif epilogue == "residual":
                            if n < n_rows:
                                out[m, n] += v0
                            if n + 1 < n_rows:
                                out[m, n + 1] += v1
                        else:
                            if n < n_rows:
                                out[m, n] = v0
                            if n + 1 < n_rows:
                                out[m, n + 1] = v1
    return store
