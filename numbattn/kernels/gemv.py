"""GEMV: y = x W^T for a few tokens (decode), streaming W once at full bandwidth, with fused prologue/epilogues.

Every weight is used once per token: 2 FLOPs per weight read, so the time is bytes / bandwidth (TinyLlama's 2.2 GB
of bf16 weights: ~0.7 ms per token at the H100's ~3 TB/s). The kernel's only job: stream W at full speed.

One warp per R output rows. Lane l reads words l, l+32, l+64, ... of each of its rows (uint64 words of 4 bf16 or 2
fp32 values: a warp reads 256 contiguous bytes per instruction), with a fixed, fully unrolled trip count so that
all of a chunk's loads are in flight together, multiplies them by x (staged once per block in shared memory,
de-interleaved so that 32 lanes read 32 consecutive words: no bank conflicts), and the warp adds its 32 partial
sums with a shuffle butterfly (group_sum). Traffic: W once (N*K*2 bytes in bf16), x once per block from L2, y once.

Fused, because each saves a launch and a round trip of the activations through memory:
    prologue "rmsnorm"  x is normalised while it is staged: y = (x / rms(x) * g) W^T
    epilogue "residual" y is added to what `out` holds: out += x W^T (the residual stream, updated in place)
    epilogue "swiglu"   W's rows interleave gate and up (row 2f = gate_f, 2f+1 = up_f): out[m, f] = silu(gate) * up
    epilogue "geglu"    the same with Gemma's tanh GELU: out[m, f] = gelu_tanh(gate) * up
    epilogue "rope"     W is q/k/v stacked, its rows taken in RoPE's rotation pairs (i, i + D/2): q rotated in
                        place, k rotated and v written into the KV cache at each row's length (advanced by the
                        launch's last block): RoPE and the append without a launch of their own
# x [M, K] f32, w [N, K/VPW] u64, norm_w [K] f32 -> out [M, N] (swiglu, geglu: [M, N/2]); `out` += for residual
"""
import functools
import math

from numba import cuda, float32, int64, uint64

from ..blocks import row_layout, row_step, values_per_word
from ..gpu import SHARED_LIMIT
from .blocks import has_offset, make_unpack
from .common import SIM, WEIGHT_KINDS, device, gate_of, kernel, make_group_reduce, reduce_scratch_shape
from .kv_append import advance_length

EPILOGUES = ("none", "residual", "swiglu", "geglu")
GATED = ("swiglu", "geglu")                 # rows interleave gate and up: half as many outputs
ROPE = "rope"           # the q/k/v epilogue of the decode path (make_gemv(..., heads=...)): see make_gemv
# A GEMV block is GEMV_THREADS threads in groups of LANES, each group GEMV_ROWS rows (twice that for SwiGLU's
# gate/up pairs and RoPE's rotation pairs). On a GPU a group is a warp (its sum is a shuffle butterfly); the
# simulator runs a Python thread per CUDA thread, so there it uses few lanes and many rows per group.
GEMV_THREADS, LANES, GEMV_ROWS = (8, 2, 32) if SIM else (256, 32, 1)
GEMV_CHUNK = 4                              # words per lane loaded together (in flight at once; tuned, BENCHMARKS.md)


def gemv_rows_per_warp(epilogue):
    return 2 * GEMV_ROWS if epilogue in GATED + (ROPE,) else GEMV_ROWS


@functools.lru_cache(maxsize=None)
def make_gemv(n_in, kind, n_tokens, epilogue="none", rmsnorm=False, heads=None):
    """GEMV kernel for K = n_in inputs, `kind` weights, exactly n_tokens tokens, and the given fusions.

    # x [M, K] f32, w [N, K/VPW] u64, norm_w [K] f32 -> out [M, N] (swiglu, geglu: [M, N/2]); `out` += for residual
    Launch: gemv_grid(N, epilogue) blocks of GEMV_THREADS threads (a warp per R rows: 2 for the gated epilogues,
    else 1).

    epilogue "rope" (heads = (H, Hkv, D)): W is the stacked q/k/v projection, and its rows are taken in RoPE's
    rotation pairs (i, i + D/2) of a head, so one lane holds both members of a pair and rotates them: q in place
    in `out`, k rotated and v as they are written into the KV cache at each row's length, which the launch's
    last block advances (kv_append.advance_length): RoPE and the append fused into the projection, one launch
    for what was two. The kernel takes 6 more arguments: cos, sin [max_len, D/2], k_cache, v_cache
    [B, Hkv, max_len, D], lengths [B] i32 (+= M / B), counters [B] i32 (zero).
    """
    K, M = n_in, n_tokens
    R = gemv_rows_per_warp(epilogue)
    known = epilogue in EPILOGUES + (ROPE,) and (epilogue == ROPE) == (heads is not None)
    if not known or K % row_step(kind) or M * K * 4 > SHARED_LIMIT:
        raise ValueError(f"gemv: epilogue {epilogue!r} (heads {heads}), K={K}, {M} tokens: not supported (x must "
                         f"fit in shared memory; heads go with the rope epilogue only)")
    MR = M * R                                   # (shapes of local arrays must be constants, not expressions)
    accumulate = _make_accumulate(K, M, kind, R, rmsnorm, heads)
    if epilogue == ROPE:
        return _make_gemv_rope(M, R, heads, accumulate)
    store = _make_gemv_store(M, R, epilogue)

    @kernel
    def gemv(x, w, out, norm_w, eps):
        # x [M, K] f32, w [N, K/VPW] u64, norm_w [K] -> out [M, N] (swiglu, geglu: [M, N/2]); `out` += for residual
        acc = cuda.local.array(MR, float32)
        warp = accumulate(x, w, norm_w, eps, acc)
        if cuda.threadIdx.x % LANES == 0:
            store(out, acc, warp * R, w.shape[0])

    return gemv


def _make_accumulate(K, M, kind, R, rmsnorm, heads):
    """accumulate(x, w, norm_w, eps, acc) -> warp: acc[m * R + r] = x[m] . W[row r of this warp] for every lane of
    the warp (the rows: R consecutive ones, or with heads the R / 2 rotation pairs (i, i + D/2) it owns). A float
    word's values are summed straight into acc; a block word's (kernels/blocks.py) as a * sum(vals x) [+ b sum(x)]."""
    VPW = values_per_word(kind)
    WPR, WH, _ = row_layout(kind, K)             # code words per row, high-bit words
    H0, S0 = WPR, 8 * (WPR + WH)                 # where a row's high bits and scale records start
    FLOAT, OFFSET = kind in WEIGHT_KINDS, has_offset(kind)
    ITER = -(-WPR // LANES)                      # words per lane
    MR = M * R                                   # (shapes of local arrays must be constants, not expressions)
    unpack = make_unpack(kind)
    _, warp_sum = make_group_reduce(LANES, MR)
    _, warp_sum_x = make_group_reduce(LANES, M)
    RED = reduce_scratch_shape(MR, GEMV_THREADS)
    XSUM = (M, WPR) if OFFSET else (1, 1)
    stage = _make_stage_x(K, M, VPW, rmsnorm, warp_sum_x, OFFSET)
    row_of = _make_row_of(R, heads)

    @device
    def accumulate(x, w, norm_w, eps, acc):
        xs = cuda.shared.array((M, VPW, WPR), float32)      # xs[m, j, i] = x[m, i * VPW + j]
        xsum = cuda.shared.array(XSUM, float32)             # xsum[m, i] = sum_j xs[m, j, i] (kinds with offsets)
        red = cuda.shared.array(RED, float32)
        stage(x, norm_w, eps, xs, xsum, red)
        lane = cuda.threadIdx.x % LANES
        warp = cuda.blockIdx.x * (GEMV_THREADS // LANES) + cuda.threadIdx.x // LANES
        words = cuda.local.array(GEMV_CHUNK, uint64)
        vals = cuda.local.array(VPW, float32)
        for a in range(MR):
            acc[a] = float32(0.0)
        for r in range(R):
            row = row_of(warp, r)
            if row >= w.shape[0]:                           # past the end: the whole warp skips (no divergence)
                continue
            for c0 in range(0, ITER, GEMV_CHUNK):
                for c in range(GEMV_CHUNK):                 # issue the chunk's loads back to back
                    i = lane + LANES * (c0 + c)
                    words[c] = w[row, i] if c0 + c < ITER and i < WPR else uint64(0)
                for c in range(GEMV_CHUNK):
                    i = lane + LANES * (c0 + c)
                    if c0 + c < ITER and i < WPR:
                        a, b = unpack(w, row, i, words[c], H0, S0, vals)
                        for m in range(M):
                            s = acc[m * R + r] if FLOAT else float32(0.0)
                            for j in range(VPW):
                                s += vals[j] * xs[m, j, i]
                            if FLOAT:
                                acc[m * R + r] = s
                            elif OFFSET:
                                acc[m * R + r] += a * s + b * xsum[m, i]
                            else:
                                acc[m * R + r] += a * s
        warp_sum(acc, red)
        return warp
    return accumulate


def _make_row_of(R, heads):
    """row_of(warp, r): W's row for the warp's r-th slot: consecutive rows, or (heads) rotation pairs: pair p is the
    dims i, i + D/2 of head p // (D/2), i = p % (D/2)."""
    if heads is None:
        @device
        def row_of(warp, r):
            return warp * R + r
        return row_of
    HALF = heads[2] // 2

    @device
    def row_of(warp, r):
        p = warp * (R // 2) + r // 2
        return (p // HALF) * 2 * HALF + p % HALF + (r % 2) * HALF
    return row_of


def _make_gemv_rope(M, R, heads, accumulate):
    P, MR = R // 2, M * R
    rope_store = _make_rope_store(M, heads)

    @kernel
    def gemv_rope(x, w, out, norm_w, eps, cos, sin, k_cache, v_cache, lengths, counters):
        # x [M, K], w [(H + 2 Hkv) D, K/VPW] -> q rotated into out [M, (H + 2 Hkv) D]; k (rotated), v into the cache
        start = cuda.local.array(M, int64)                 # each batch row's length before this launch
        for b in range(k_cache.shape[0]):
            start[b] = lengths[b]
        acc = cuda.local.array(MR, float32)
        warp = accumulate(x, w, norm_w, eps, acc)
        if cuda.threadIdx.x % LANES == 0:
            for j in range(P):
                if (warp * P + j) * 2 < w.shape[0]:
                    rope_store(out, acc, j, warp * P + j, start, cos, sin, k_cache, v_cache)
        L = M // k_cache.shape[0]
        for b in range(k_cache.shape[0]):
            advance_length(lengths, counters, b, start[b], L, start[b] + L <= k_cache.shape[2], cuda.gridDim.x)

    return gemv_rope


def _make_rope_store(M, heads):
    """rope_store: pair p of the warp's slot j (rows i, i + D/2 of head h) for every token: q rotated into out, k
    rotated and v into the cache at the token's position (its row's start + its index in the row)."""
    H, HKV, D = heads
    HALF = D // 2
    R = gemv_rows_per_warp(ROPE)

    @device
    def rope_store(out, acc, j, p, start, cos, sin, k_cache, v_cache):
        h, i = p // HALF, p % HALF
        L = M // k_cache.shape[0]
        for m in range(M):
            b = m // L
            pos = start[b] + m - b * L
            if start[b] + L <= k_cache.shape[2]:          # the engine checked; a raw launch cannot write out
                x1, x2 = acc[m * R + 2 * j], acc[m * R + 2 * j + 1]
                if h < H + HKV:                            # q and k heads: rotate the pair by its position
                    c, s = cos[pos, i], sin[pos, i]
                    x1, x2 = x1 * c - x2 * s, x2 * c + x1 * s
                if h < H:
                    out[m, h * D + i] = x1
                    out[m, h * D + i + HALF] = x2
                elif h < H + HKV:
                    k_cache[b, h - H, pos, i] = x1
                    k_cache[b, h - H, pos, i + HALF] = x2
                else:
                    v_cache[b, h - H - HKV, pos, i] = x1
                    v_cache[b, h - H - HKV, pos, i + HALF] = x2
    return rope_store


def _make_stage_x(K, M, VPW, rmsnorm, warp_sum, word_sums):
    """Device function: x [M, K] (optionally RMS-normalised and scaled by norm_w) -> xs, de-interleaved by word, and
    (word_sums) each word's sum of x into xsum. warp_sum reduces M values over a warp (its `red` scratch: `red`)."""
    T, WARPS, WPR = GEMV_THREADS, GEMV_THREADS // LANES, K // VPW

    @device
    def stage(x, norm_w, eps, xs, xsum, red):
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
        if word_sums:
            for e in range(t, M * WPR, T):
                m, i = e // WPR, e % WPR
                s = float32(0.0)
                for j in range(VPW):
                    s += xs[m, j, i]
                xsum[m, i] = s
            cuda.syncthreads()
    return stage


def _make_gemv_store(M, R, epilogue):
    gate = gate_of(epilogue)

    @device
    def store(out, acc, row0, n_rows):
        if epilogue in GATED:                        # rows 2f, 2f + 1 are gate_f and up_f
            for p in range(R // 2):
                if row0 + 2 * p + 1 < n_rows:
                    for m in range(M):
                        out[m, row0 // 2 + p] = gate(acc[m * R + 2 * p]) * acc[m * R + 2 * p + 1]
            return
        for r in range(R):
            if row0 + r < n_rows:
                for m in range(M):
                    if epilogue == "residual":
                        out[m, row0 + r] += acc[m * R + r]
                    else:
                        out[m, row0 + r] = acc[m * R + r]
    return store
