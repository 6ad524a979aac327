"""The linear layers of a Llama on the GPU: y = x W^T for one token (GEMV) and for a prompt chunk (GEMM).

What you will learn here
------------------------
A transformer spends nearly all of its arithmetic in linear layers, y[m, n] = sum_k x[m, k] W[n, k], with W
stored as Hugging Face stores it: [out_features, in_features], row n holding output n's weights (`reference.
linear` is the one-line NumPy version). How to compute it depends on M, the number of tokens:

    decode (M = 1)    every weight is used once per token: 2 FLOPs per weight read, so the time is
                      bytes / bandwidth. TinyLlama's 1.1 B bf16 weights are 2.2 GB: ~0.7 ms per token at the
                      H100's ~3 TB/s, whatever the arithmetic does. The kernel's only job: stream W at full speed.
    prefill (M large) every weight serves M tokens: the time is FLOPs / FLOP rate, and the kernel's job is to
                      reuse each loaded value for many FMAs (a tiled GEMM, like prefill attention's S = Q K^T).

Weights arrive as raw bits in 8-byte words: `w` is a uint64 array [N, K / VPW] holding VPW = 4 bf16 values (as
stored in the checkpoint: half the bytes of fp32, exactly widened with a shift, numbattn/device.py) or VPW = 2
fp32 values (weights that are not bf16, e.g. dequantized GGUF) per word. One 8-byte load per lane makes a warp
read 256 contiguous bytes per instruction. Everything is computed in float32.

GEMV (`make_gemv`): one warp per R output rows. Lane l reads words l, l+32, l+64, ... of each of its rows, with
a fixed, fully unrolled trip count so that all of a chunk's loads are in flight together, multiplies them by
x (staged once per block in shared memory, de-interleaved so that 32 lanes read 32 consecutive words: no bank
conflicts), and the warp adds its 32 partial sums with a shuffle butterfly (group_sum). Traffic: W once (N*K*2
bytes in bf16), x once per block from L2, y once.

GEMM (`make_gemm`): a BM x BN tile of y per block, K walked in steps of BK: A [BM, BK] and W [BN, BK] tiles go
through shared memory (k-major, one word of padding), and each thread accumulates a TM x TN register tile with
outer products, TM + TN shared loads feeding TM * TN FMAs, indices unsigned and the k loop unrolled by four
(device.make_outer_product: v2 of prefill attention does the same for Q K^T).
Columns are owned in adjacent pairs (2p, 2p+1), so the SwiGLU epilogue below sees gate and up side by side.
Traffic: W read ceil(M / BM) times, A read ceil(N / BN) times, y once.

Fused into both, because each saves a launch and a round trip of the activations through memory:
    prologue "rmsnorm"  (GEMV) x is normalised while it is staged: y = (x / rms(x) * g) W^T
    epilogue "residual" y is added to what `out` holds: out += x W^T (the residual stream, updated in place)
    epilogue "swiglu"   W's rows interleave gate and up (row 2f = gate_f, 2f+1 = up_f): out[m, f] =
                        silu(gate) * up, half as many outputs as rows
The NumPy twins of all three are in numbattn/reference.py; measured speeds are in BENCHMARKS.md.
"""
import functools
import math

import numpy as np
from numba import cuda, float32, uint32, uint64

from .device import FASTMATH, SIM, bf16_pair, f32_from_bits, make_group_reduce, make_outer_product, reduce_scratch_shape
from .launch import Launch

EPILOGUES = ("none", "residual", "swiglu")
WEIGHT_KINDS = {"bf16": 4, "f32": 2}        # values per uint64 word
# A GEMV block is GEMV_THREADS threads in groups of LANES, each group GEMV_ROWS rows (twice that for SwiGLU's
# gate/up pairs). On a GPU a group is a warp (its sum is a shuffle butterfly); the simulator runs a Python thread
# per CUDA thread, so there it uses few lanes and many rows per group.
GEMV_THREADS, LANES, GEMV_ROWS = (8, 2, 32) if SIM else (256, 32, 1)
GEMV_CHUNK = 4                              # words per lane loaded together (in flight at once; tuned, BENCHMARKS.md)
GEMV_MAX_TOKENS = 4                         # more tokens than this: the GEMM
SHARED_LIMIT = 48 * 1024


# --------------------------------------------------------------------------------------------------------
# Weights as words, and back
# --------------------------------------------------------------------------------------------------------
def pack_weight(w):
    """A host weight [N, K] (float32, or uint16 bf16 bits) -> (uint64 words [N, K / VPW], kind)."""
    w = np.ascontiguousarray(w)
    kind = "bf16" if w.dtype == np.uint16 else "f32"
    if kind == "f32" and w.dtype != np.float32:
        raise ValueError(f"weight has dtype {w.dtype}; expected float32 or uint16 (bf16 bits)")
    vpw = WEIGHT_KINDS[kind]
    if w.ndim != 2 or w.shape[1] % vpw:
        raise ValueError(f"weight has shape {w.shape}; expected [N, K] with K a multiple of {vpw} ({kind})")
    return w.view(np.uint64), kind


def _unpack(kind):
    """Device function word -> the VPW float32 values it holds, written into vals[0:VPW]."""
    if kind == "bf16":
        @cuda.jit(device=True, inline=True)
        def unpack(word, vals):
            vals[0], vals[1] = bf16_pair(uint32(word & uint64(0xFFFFFFFF)))
            vals[2], vals[3] = bf16_pair(uint32(word >> uint64(32)))
    else:
        @cuda.jit(device=True, inline=True)
        def unpack(word, vals):
            vals[0] = f32_from_bits(uint32(word & uint64(0xFFFFFFFF)))
            vals[1] = f32_from_bits(uint32(word >> uint64(32)))
    return unpack


@cuda.jit(device=True, inline=True)
def silu(x):
    """x * sigmoid(x) = x / (1 + exp(-x)): for x << 0, exp(-x) overflows to inf and the quotient is -0, the
    right limit. (Not through tanh as reference.silu: fastmath's approximate tanh is off by ~1e-3.)"""
    return x / (float32(1.0) + math.exp(-x))


# --------------------------------------------------------------------------------------------------------
# GEMV: M <= a few tokens
# --------------------------------------------------------------------------------------------------------
def gemv_rows_per_warp(epilogue):
    return 2 * GEMV_ROWS if epilogue == "swiglu" else GEMV_ROWS


@functools.lru_cache(maxsize=None)
def make_gemv(n_in, kind, n_tokens, epilogue="none", rmsnorm=False):
    """GEMV kernel for K = n_in inputs, `kind` weights, exactly n_tokens tokens, and the given fusions.

    # x [M, K] f32, w [N, K/VPW] u64, norm_w [K] f32 -> out [M, N] (swiglu: [M, N/2]); `out` += for residual
    Launch: gemv_grid(N, epilogue) blocks of GEMV_THREADS threads (a warp per R rows: 2 for swiglu, else 1).
    """
    K, M, VPW = n_in, n_tokens, WEIGHT_KINDS[kind]
    WPR = K // VPW                               # words per row
    ITER = -(-WPR // LANES)                      # words per lane
    R = gemv_rows_per_warp(epilogue)
    MR = M * R                                   # (shapes of local arrays must be constants, not expressions)
    if epilogue not in EPILOGUES or K % VPW or M * K * 4 > SHARED_LIMIT:
        raise ValueError(f"gemv: epilogue {epilogue!r}, K={K}, {M} tokens: not supported (x must fit in shared memory)")
    unpack = _unpack(kind)
    _, warp_sum = make_group_reduce(LANES, MR)
    _, warp_sum_x = make_group_reduce(LANES, M)
    RED = reduce_scratch_shape(M * R, GEMV_THREADS)
    stage = _make_stage_x(K, M, VPW, rmsnorm, warp_sum_x)
    store = _make_gemv_store(M, R, epilogue)

    @cuda.jit(fastmath=FASTMATH)
    def gemv(x, w, out, norm_w, eps):
        # x [M, K] f32, w [N, K/VPW] u64, norm_w [K] -> out [M, N] (swiglu: [M, N/2]); `out` += for residual
        xs = cuda.shared.array((M, VPW, WPR), float32)      # xs[m, j, i] = x[m, i * VPW + j]
        red = cuda.shared.array(RED, float32)
        stage(x, norm_w, eps, xs, red)
        lane = cuda.threadIdx.x % LANES
        row0 = (cuda.blockIdx.x * (GEMV_THREADS // LANES) + cuda.threadIdx.x // LANES) * R
        acc = cuda.local.array(MR, float32)
        words = cuda.local.array(GEMV_CHUNK, uint64)
        vals = cuda.local.array(VPW, float32)
        for a in range(MR):
            acc[a] = float32(0.0)
        for r in range(R):
            row = min(row0 + r, w.shape[0] - 1)             # a warp past the end reads a valid row, stores nothing
            for c0 in range(0, ITER, GEMV_CHUNK):
                for c in range(GEMV_CHUNK):                 # issue the chunk's loads back to back
                    i = lane + LANES * (c0 + c)
                    words[c] = w[row, i] if c0 + c < ITER and i < WPR else uint64(0)
                for c in range(GEMV_CHUNK):
                    i = lane + LANES * (c0 + c)
                    if c0 + c < ITER and i < WPR:
                        unpack(words[c], vals)
                        for m in range(M):
                            s = acc[m * R + r]
                            for j in range(VPW):
                                s += vals[j] * xs[m, j, i]
                            acc[m * R + r] = s
        warp_sum(acc, red)
        if lane == 0:
            store(out, acc, row0, w.shape[0])

    return gemv


def _make_stage_x(K, M, VPW, rmsnorm, warp_sum):
    """Device function: x [M, K] (optionally RMS-normalised and scaled by norm_w) -> xs, de-interleaved by word.
    warp_sum reduces M values over a warp (its `red` scratch: `red`)."""
    T, WARPS = GEMV_THREADS, GEMV_THREADS // LANES

    @cuda.jit(device=True, inline=True)
    def stage(x, norm_w, eps, xs, red):
        t = cuda.threadIdx.x
        inv = cuda.shared.array(M, float32)         # 1 / rms of each token (1 without the norm)
        if rmsnorm:
            per_warp = cuda.shared.array((WARPS, M), float32)
            ss = cuda.local.array(M, float32)
            for m in range(M):
                s = float32(0.0)
                for k in range(t, K, T):
                    s += x[m, k] * x[m, k]
                ss[m] = s
            warp_sum(ss, red)                       # every lane: its warp's sum of squares
            if t % LANES == 0:
                for m in range(M):
                    per_warp[t // LANES, m] = ss[m]
            cuda.syncthreads()
            if t < M:
                total = float32(0.0)
                for i in range(WARPS):
                    total += per_warp[i, t]
                inv[t] = float32(1.0) / math.sqrt(total / K + eps)
        elif t < M:
            inv[t] = float32(1.0)
        cuda.syncthreads()
        for m in range(M):
            for k in range(t, K, T):
                scaled = x[m, k] * inv[m] * norm_w[k] if rmsnorm else x[m, k]
                xs[m, k % VPW, k // VPW] = scaled
        cuda.syncthreads()
    return stage


def _make_gemv_store(M, R, epilogue):
    @cuda.jit(device=True, inline=True)
    def store(out, acc, row0, n_rows):
        if epilogue == "swiglu":                     # rows 2f, 2f + 1 are gate_f and up_f
            for p in range(R // 2):
                if row0 + 2 * p + 1 < n_rows:
                    for m in range(M):
                        out[m, row0 // 2 + p] = silu(acc[m * R + 2 * p]) * acc[m * R + 2 * p + 1]
            return
        for r in range(R):
            if row0 + r < n_rows:
                for m in range(M):
                    if epilogue == "residual":
                        out[m, row0 + r] += acc[m * R + r]
                    else:
                        out[m, row0 + r] = acc[m * R + r]
    return store


def gemv_grid(n_rows, epilogue):
    rows_per_block = GEMV_THREADS // LANES * gemv_rows_per_warp(epilogue)
    return -(-n_rows // rows_per_block)


# --------------------------------------------------------------------------------------------------------
# GEMM: a prompt chunk
# --------------------------------------------------------------------------------------------------------
GEMM_TILES = (8, 32, 8, 4) if SIM else (64, 128, 16, 256)     # BM, BN, BK, threads (the H100 sweep's best)
# smaller tiles where those would leave SMs idle (a short chunk, a narrow matrix): more, smaller blocks
GEMM_TILE_CHOICES = (GEMM_TILES,) if SIM else (GEMM_TILES, (64, 64, 16, 256))


def gemm_tiles(n_tokens, n_rows, n_sm=132):
    """The largest tiles whose grid covers (nearly) every SM; else the smallest tiles."""
    for tiles in GEMM_TILE_CHOICES:
        grid = gemm_grid(n_tokens, n_rows, tiles)
        if grid[0] * grid[1] >= 0.9 * n_sm:
            return tiles
    return GEMM_TILE_CHOICES[-1]


def gemm_layout(BM, BN, BK, threads, VPW):
    """Thread grid TR x TC and register tile TM x TN (TN even: columns come in pairs) for one tile shape."""
    TC = int(math.sqrt(threads))
    TR = threads // TC
    ok = (TR * TC == threads and BM % TR == 0 and BN % (2 * TC) == 0 and BK % VPW == 0
          and (BM * BK) % threads == 0 and (BN * BK // VPW) % threads == 0)
    if not ok:
        raise ValueError(f"gemm tiles BM={BM}, BN={BN}, BK={BK}, threads={threads} do not divide for VPW={VPW}")
    return TR, TC, BM // TR, BN // TC


@functools.lru_cache(maxsize=None)
def make_gemm(kind, epilogue="none", tiles=GEMM_TILES):
    """GEMM kernel for `kind` weights and an epilogue, tiles (BM, BN, BK, threads).

    # x [M, K] f32, w [N, K/VPW] u64 -> out [M, N] (swiglu: [M, N/2]); `out` += for residual
    Launch: grid (ceil(N / BN), ceil(M / BM)), `threads` threads.
    """
    BM, BN, BK, NT = tiles
    VPW = WEIGHT_KINDS[kind]
    TR, TC, TM, TN = gemm_layout(BM, BN, BK, NT, VPW)
    BKP, BNP = BK + 1, BN + 1                        # one word of padding per row (constants for the shapes)
    if BK % 4:
        raise ValueError(f"gemm tiles: BK={BK} must be a multiple of 4 (the unrolled k loop)")
    outer_product = make_outer_product(TM, TN, True)
    unpack = _unpack(kind)
    load_tiles = _make_gemm_loads(BM, BN, BK, NT, VPW, unpack)
    store = _make_gemm_store(TR, TC, TM, TN, epilogue)

    @cuda.jit(fastmath=FASTMATH)
    def gemm(x, w, out):
        # x [M, K] f32, w [N, K/VPW] u64 -> out [M, N] (swiglu: [M, N/2]); `out` += for residual
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


def _make_gemm_loads(BM, BN, BK, NT, VPW, unpack):
    BKW = BK // VPW

    @cuda.jit(device=True, inline=True)
    def load_tiles(x, w, m0, n0, k0, As, Ws, vals):
        """A [BM, BK] (row-major) and W [BN, BK] (k-major) tiles -> shared; rows past M or N and columns past K
        read as 0."""
        t = cuda.threadIdx.x
        for idx in range(t, BM * BK, NT):                    # consecutive threads: consecutive k (coalesced)
            r = idx // BK
            c = idx - r * BK
            inside = m0 + r < x.shape[0] and k0 + c < x.shape[1]
            As[r, c] = x[m0 + r, k0 + c] if inside else float32(0.0)
        for idx in range(t, BN * BKW, NT):
            r = idx // BKW
            c = idx - r * BKW
            if n0 + r < w.shape[0] and k0 // VPW + c < w.shape[1]:
                unpack(w[n0 + r, k0 // VPW + c], vals)
                for j in range(VPW):
                    Ws[c * VPW + j, r] = vals[j]
            else:
                for j in range(VPW):
                    Ws[c * VPW + j, r] = float32(0.0)
    return load_tiles


def _make_gemm_store(TR, TC, TM, TN, epilogue):
    @cuda.jit(device=True, inline=True)
    def store(out, acc, m0, n0, n_tokens, n_rows, rg, cg):
        for i in range(TM):
            m = m0 + rg + TR * i
            if m < n_tokens:
                for p in range(TN // 2):
                    n = n0 + 2 * (cg + TC * p)               # this thread's column pair n, n + 1
                    if epilogue == "swiglu":
                        if n + 1 < n_rows:
                            out[m, n // 2] = silu(acc[i, 2 * p]) * acc[i, 2 * p + 1]
                    else:
                        for j in range(2):
                            if n + j < n_rows:
                                if epilogue == "residual":
                                    out[m, n + j] += acc[i, 2 * p + j]
                                else:
                                    out[m, n + j] = acc[i, 2 * p + j]
    return store


def gemm_grid(n_tokens, n_rows, tiles):
    BM, BN = tiles[0], tiles[1]
    return (-(-n_rows // BN), -(-n_tokens // BM))


# --------------------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------------------
def out_features(n_rows, epilogue):
    return n_rows // 2 if epilogue == "swiglu" else n_rows


def check_linear(x, w, kind, out, epilogue, norm_w):
    """x [M, K] float32, w [N, K / VPW] uint64 words, out [M, N] float32 ([M, N / 2] for swiglu)."""
    if kind not in WEIGHT_KINDS or epilogue not in EPILOGUES:
        raise ValueError(f"kind={kind!r}, epilogue={epilogue!r}: expected one of {tuple(WEIGHT_KINDS)} and "
                         f"{EPILOGUES}")
    for name, a, dtype in (("x", x, np.float32), ("w", w, np.uint64), ("out", out, np.float32)):
        if len(a.shape) != 2 or np.dtype(a.dtype) != dtype:
            raise ValueError(f"{name} has shape {tuple(a.shape)} and dtype {np.dtype(a.dtype).name}; expected a "
                             f"2-D {np.dtype(dtype).name} array")
    (m, k), (n, words) = x.shape, w.shape
    if words * WEIGHT_KINDS[kind] != k or (epilogue == "swiglu" and n % 2):
        raise ValueError(f"x has shape {tuple(x.shape)} but w has {n} rows of {words} {kind} words "
                         f"({words * WEIGHT_KINDS[kind]} inputs){'; swiglu needs an even row count' * (n % 2)}")
    if tuple(out.shape) != (m, out_features(n, epilogue)):
        raise ValueError(f"out has shape {tuple(out.shape)}; expected {(m, out_features(n, epilogue))}")
    if norm_w is not None and tuple(norm_w.shape) != (k,):
        raise ValueError(f"norm_w has shape {tuple(norm_w.shape)}; expected ({k},)")


def linear_launch(x, w, kind, out, epilogue="none", norm_w=None, eps=1e-5, stream=0):
    """A prepared Launch computing out (=, +=) x W^T on device arrays (see the module docstring); GEMV for
    M <= GEMV_MAX_TOKENS tokens, else the GEMM (norm_w, the fused RMSNorm, is GEMV-only)."""
    check_linear(x, w, kind, out, epilogue, norm_w)
    m, k = x.shape
    if m <= GEMV_MAX_TOKENS:
        kernel = make_gemv(k, kind, m, epilogue, norm_w is not None)
        nw = norm_w if norm_w is not None else x[0]        # an unused float32 [K] array
        return Launch(kernel, gemv_grid(w.shape[0], epilogue), GEMV_THREADS, (x, w, out, nw, np.float32(eps)),
                      stream)
    if norm_w is not None:
        raise ValueError(f"the RMSNorm prologue is fused into the GEMV only ({m} tokens > {GEMV_MAX_TOKENS})")
    tiles = gemm_tiles(m, w.shape[0])
    return Launch(make_gemm(kind, epilogue, tiles), gemm_grid(m, w.shape[0], tiles), tiles[3], (x, w, out), stream)


def linear(x, w, kind, out, epilogue="none", norm_w=None, eps=1e-5, stream=0):
    """out (=, +=) x W^T on device arrays, one launch; returns out."""
    linear_launch(x, w, kind, out, epilogue, norm_w, eps, stream)()
    return out
