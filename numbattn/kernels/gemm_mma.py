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

from .common import device, gate_of, kernel
from .mma import make_bf16_split, make_mma_bf16_n, mma_scratch_shape


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


def layout(tiles):
    """-> (MI, NI, KS, SW, XL, WL): MMA row and column blocks per warp, k16 steps per warp per K tile, words per
    shared row, x pairs and W words each thread stages per K tile."""
    t = tiles
    nt = t.threads
    ok = (min(t.bm, t.bn, t.bk, t.wm, t.wn, t.wk) >= 1 and t.bm % (16 * t.wm) == 0 and t.bn % (8 * t.wn) == 0
          and t.bk % (16 * t.wk) == 0 and (t.bm * t.bk // 2) % nt == 0 and (t.bn * t.bk // 4) % nt == 0)
    if not ok:
        raise ValueError(f"gemm_mma tiles {t}: need BM a multiple of 16 WM, BN of 8 WN, BK of 16 WK, and the "
                         f"tile's x pairs (BM BK / 2) and W words (BN BK / 4) a multiple of the {nt} threads")
    mi, ni, ks = t.bm // (16 * t.wm), t.bn // (8 * t.wn), t.bk // (16 * t.wk)
    return mi, ni, ks, t.bk // 2 + 4, t.bm * t.bk // 2 // nt, t.bn * t.bk // 4 // nt


def shared_bytes(tiles, terms):
    """Static shared memory of one block on a GPU: T x planes, the W tile, the WK - 1 partial tiles."""
    _, _, _, SW, _, _ = layout(tiles)
    return 4 * (SW * (terms * tiles.bm + tiles.bn) + (tiles.wk - 1) * tiles.bm * (tiles.bn + 1))


@functools.lru_cache(maxsize=None)
def make_gemm_mma(epilogue, tiles, terms=2, chunked=True):
    """GEMM on tensor cores for bf16 weights: tiles an MmaTiles, x split into `terms` bf16 terms (1-3), each K tile's
    products summed from zero and added in fp32 (`chunked`) or accumulated in the tensor cores throughout.

    # x [M, K] f32, w [N, K/4] u64 (bf16 words) -> out [M, N] (swiglu, geglu: [M, N/2]); `out` += for residual
    Launch: grid (ceil(N / BN), ceil(M / BM)), tiles.threads threads.
    """
    MI, NI, KS, SW, XL, WL = layout(tiles)
    if terms not in (1, 2, 3):
        raise ValueError(f"gemm_mma: terms={terms}; expected 1, 2 or 3 bf16 terms per activation")
    T, BM, BN, BK, WK, NT = terms, tiles.bm, tiles.bn, tiles.bk, tiles.wk, tiles.threads
    ACC, XR = (MI * NI, 4), (XL, 2)
    PART = (WK - 1, BM, BN + 1) if WK > 1 else (1, 1, 1)
    SCRATCH = mma_scratch_shape(NT, NI, bf16=True)
    fetch, stage = _make_staging(tiles, T)
    mma_tile = _make_mma_tile(tiles, T, chunked)
    add_partials = _make_reduce_k(tiles)
    store = _make_store(tiles, epilogue)

    @kernel
    def gemm_mma(x, w, out):
        # x [M, K] f32, w [N, K/4] u64 (bf16 words) -> out [M, N] (swiglu, geglu: [M, N/2]); `out` += for residual
        xs = cuda.shared.array((T, BM, SW), uint32)          # x tile: T planes of bf16 pairs
        ws = cuda.shared.array((BN, SW), uint32)             # W tile: bf16 pairs as stored
        part = cuda.shared.array(PART, float32)              # the WK - 1 other groups' partial tiles
        scratch = cuda.shared.array(SCRATCH, float32)        # the simulator twin's exchange (a dummy on a GPU)
        acc = cuda.local.array(ACC, float32)                 # [MI * NI, 4]: this lane's accumulators
        tile_acc = cuda.local.array(ACC, float32)            # the current K tile's products (chunked)
        xr = cuda.local.array(XR, float32)                   # the next K tile, in registers
        wr = cuda.local.array(WL, uint64)
        m0, n0 = cuda.blockIdx.y * BM, cuda.blockIdx.x * BN
        for i in range(MI * NI):
            for e in range(4):
                acc[i, e] = float32(0.0)
        fetch(x, w, m0, n0, 0, xr, wr)
        for k0 in range(0, x.shape[1], BK):
            cuda.syncthreads()                               # the previous tile is consumed
            stage(xr, wr, xs, ws)
            cuda.syncthreads()
            if k0 + BK < x.shape[1]:                         # the same for every thread: the next tile in flight
                fetch(x, w, m0, n0, k0 + BK, xr, wr)
            mma_tile(xs, ws, acc, tile_acc, scratch)
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


def _make_staging(tiles, T):
    """fetch: the K tile at k0 from global memory into registers (x pairs, W words; zeros past M, N, K); stage:
    registers -> shared, x split into its T bf16 terms."""
    _, _, _, _, XL, WL = layout(tiles)
    NT, BKH, BKW = tiles.threads, tiles.bk // 2, tiles.bk // 4
    split = make_bf16_split(T)

    @device
    def fetch(x, w, m0, n0, k0, xr, wr):
        t = cuda.threadIdx.x
        for e in range(XL):                                  # consecutive threads: consecutive pairs of a row
            idx = t + e * NT
            r = idx // BKH
            m, k = m0 + r, k0 + 2 * (idx - r * BKH)
            xr[e, 0] = x[m, k] if m < x.shape[0] and k < x.shape[1] else float32(0.0)
            xr[e, 1] = x[m, k + 1] if m < x.shape[0] and k + 1 < x.shape[1] else float32(0.0)
        for e in range(WL):
            idx = t + e * NT
            r = idx // BKW
            n, kw = n0 + r, k0 // 4 + idx - r * BKW
            wr[e] = w[n, kw] if n < w.shape[0] and kw < w.shape[1] else uint64(0)

    @device
    def stage(xr, wr, xs, ws):
        t = cuda.threadIdx.x
        words = cuda.local.array(T, uint32)
        for e in range(XL):
            idx = t + e * NT
            r = idx // BKH
            split(xr[e, 0], xr[e, 1], words)
            for term in range(T):
                xs[term, r, idx - r * BKH] = words[term]
        for e in range(WL):
            idx = t + e * NT
            r = idx // BKW
            c = 2 * (idx - r * BKW)
            ws[r, c] = uint32(wr[e] & uint64(0xFFFFFFFF))
            ws[r, c + 1] = uint32(wr[e] >> uint64(32))
    return fetch, stage


def _make_mma_tile(tiles, T, chunked):
    """mma_tile: this warp's share of one K tile (its group's KS k16 steps), all T terms, into acc."""
    MI, NI, KS, _, _, _ = layout(tiles)
    mma_n = make_mma_bf16_n(NI)
    place = _make_place(tiles)

    @device
    def mma_tile(xs, ws, acc, tile_acc, scratch):
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
        if chunked:
            for i in range(MI * NI):
                for e in range(4):
                    acc[i, e] += tile_acc[i, e]
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
