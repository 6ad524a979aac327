"""GEMM: y = x W^T for a prompt chunk (prefill), a register-tiled SIMT matrix product with fused epilogues.

Every weight serves M tokens: the time is FLOPs / FLOP rate, and the kernel's job is to reuse each loaded value for
many FMAs. A BM x BN tile of y per block, K walked in steps of BK: A [BM, BK] and W [BN, BK] tiles go through shared
memory (k-major, one word of padding), and each thread accumulates a TM x TN register tile with outer products,
TM + TN shared loads feeding TM * TN FMAs, indices unsigned and the k loop unrolled by four
(common.make_outer_product: prefill attention v2 does the same for Q K^T). Columns are owned in adjacent pairs
(2p, 2p+1), so the SwiGLU and GeGLU epilogues see gate and up side by side (epilogues as in gemv.py).
Traffic: W read ceil(M / BM) times, A read ceil(N / BN) times, y once.
# x [M, K] f32, w [N, K/VPW] u64 -> out [M, N] (swiglu, geglu: [M, N/2]); `out` += for residual
"""
import functools
import math

from numba import cuda, float32, uint32

from ..blocks import values_per_word
from .blocks import make_row_offsets, make_unpack
from .common import SIM, device, gate_of, kernel, make_outer_product

GEMM_TILES = (8, 32, 16, 4) if SIM else (64, 128, 16, 256)    # BM, BN, BK, threads (the H100 sweep's best)


def gemm_layout(BM, BN, BK, threads, VPW):
    """Thread grid TR x TC and register tile TM x TN (TN even: columns come in pairs) for one tile shape."""
    TC = int(math.sqrt(threads))
    TR = threads // TC
    ok = (TR * TC == threads and BM % TR == 0 and BN % (2 * TC) == 0 and BK % VPW == 0
          and (BM * BK) % threads == 0)
    if not ok:
        raise ValueError(f"gemm tiles BM={BM}, BN={BN}, BK={BK}, threads={threads} do not divide for VPW={VPW}")
    return TR, TC, BM // TR, BN // TC


@functools.lru_cache(maxsize=None)
def make_gemm(kind, epilogue="none", tiles=GEMM_TILES):
    """GEMM kernel for `kind` weights (float words or GGUF blocks, dequantized as W's tile is staged) and an
    epilogue, tiles (BM, BN, BK, threads).

    # x [M, K] f32, w [N, K/VPW] u64 -> out [M, N] (swiglu, geglu: [M, N/2]); `out` += for residual
    Launch: grid (ceil(N / BN), ceil(M / BM)), `threads` threads.
    """
    BM, BN, BK, NT = tiles
    VPW = values_per_word(kind)
    TR, TC, TM, TN = gemm_layout(BM, BN, BK, NT, VPW)
    BKP, BNP = BK + 1, BN + 1                        # one word of padding per row (constants for the shapes)
    if BK % 4:
        raise ValueError(f"gemm tiles: BK={BK} must be a multiple of 4 (the unrolled k loop)")
    outer_product = make_outer_product(TM, TN, True)
    load_tiles = _make_gemm_loads(BM, BN, BK, NT, kind)
    store = _make_gemm_store(TR, TC, TM, TN, epilogue)

    @kernel
    def gemm(x, w, out):
        # x [M, K] f32, w [N, K/VPW] u64 -> out [M, N] (swiglu, geglu: [M, N/2]); `out` += for residual
        As = cuda.shared.array((BM, BKP), float32)           # row-major, one word of padding per row
        Ws = cuda.shared.array((BK, BNP), float32)           # k-major: a thread's columns are one word apart
        t = cuda.threadIdx.x
        rg, cg = t // TC, t % TC
        m0, n0 = cuda.blockIdx.y * BM, cuda.blockIdx.x * BN
        acc = cuda.local.array((TM, TN), float32)
        a = cuda.local.array(TM, float32)
        b = cuda.local.array(TN, float32)
        vals = cuda.local.array(VPW, float32)
        rows = cuda.local.array(TM, uint32)                  # this thread's rows and columns within the tile
        cols = cuda.local.array(TN, uint32)
        for i in range(TM):
            rows[i] = rg + TR * i
            for j in range(TN):
                acc[i, j] = float32(0.0)
        for j in range(TN):
            cols[j] = 2 * (cg + TC * (j // 2)) + j % 2       # column pairs 2q, 2q + 1 (SwiGLU's gate, up)
        for k0 in range(0, x.shape[1], BK):
            cuda.syncthreads()                               # the previous tiles are consumed
            load_tiles(x, w, m0, n0, k0, As, Ws, vals)
            cuda.syncthreads()
            for kk in range(0, BK, 4):                       # four explicit steps: unrolled by hand
                outer_product(As, Ws, rows, cols, kk, a, b, acc)
                outer_product(As, Ws, rows, cols, kk + 1, a, b, acc)
                outer_product(As, Ws, rows, cols, kk + 2, a, b, acc)
                outer_product(As, Ws, rows, cols, kk + 3, a, b, acc)
        store(out, acc, m0, n0, x.shape[0], w.shape[0], rg, cg)

    return gemm


def _make_gemm_loads(BM, BN, BK, NT, kind):
    VPW = values_per_word(kind)
    BKW = BK // VPW
    unpack = make_unpack(kind)
    offsets = make_row_offsets(kind)

    @device
    def load_tiles(x, w, m0, n0, k0, As, Ws, vals):
        """A [BM, BK] (row-major) and W [BN, BK] (k-major, dequantized) tiles -> shared; rows past M or N and columns
        past K read as 0."""
        t = cuda.threadIdx.x
        for idx in range(t, BM * BK, NT):                    # consecutive threads: consecutive k (coalesced)
            r = idx // BK
            c = idx - r * BK
            inside = m0 + r < x.shape[0] and k0 + c < x.shape[1]
            As[r, c] = x[m0 + r, k0 + c] if inside else float32(0.0)
        n_code, h0, s0 = offsets(x.shape[1])
        for idx in range(t, BN * BKW, NT):
            r = idx // BKW
            c = idx - r * BKW
            i = k0 // VPW + c
            if n0 + r < w.shape[0] and i < n_code:
                a, b = unpack(w, n0 + r, i, w[n0 + r, i], h0, s0, vals)
                for j in range(VPW):
                    Ws[c * VPW + j, r] = a * vals[j] + b
            else:
                for j in range(VPW):
                    Ws[c * VPW + j, r] = float32(0.0)
    return load_tiles


def _make_gemm_store(TR, TC, TM, TN, epilogue):
    gate = gate_of(epilogue)

    @device
    def store(out, acc, m0, n0, n_tokens, n_rows, rg, cg):
        for i in range(TM):
            m = m0 + rg + TR * i
            if m < n_tokens:
                for p in range(TN // 2):
                    n = n0 + 2 * (cg + TC * p)               # this thread's column pair n, n + 1
                    if gate is not None:                     # swiglu, geglu: gate and up side by side
                        if n + 1 < n_rows:
                            out[m, n // 2] = gate(acc[i, 2 * p]) * acc[i, 2 * p + 1]
                    else:
                        for j in range(2):
                            if n + j < n_rows:
                                if epilogue == "residual":
                                    out[m, n + j] += acc[i, 2 * p + j]
                                else:
                                    out[m, n + j] = acc[i, 2 * p + j]
    return store
