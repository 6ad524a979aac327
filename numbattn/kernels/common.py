"""Device-side building blocks shared by the kernels: the compile policy, constants, group reductions, bit casts,
the last block.

Each one exists twice where Numba's CUDA simulator cannot run the GPU's version (see shared/SIMULATOR.md): the
kernel factories pick the twin once, at compile time, with `SIM = numba.config.ENABLE_CUDASIM`, so the rest of
every kernel is one code path and the tests run both (the simulator twin in CI, the GPU one with
NUMBATTN_TEST_GPU=1).

    kernel(**options)              how every numbattn kernel is compiled: cuda.jit with FASTMATH (decided here only)
    device                         how every device function is compiled: cuda.jit(device=True, inline=True)
    cpu_kernel(**options)          how the CPU kernels are compiled: numba.njit with the same FASTMATH
    stamp_cache, keyed_cache       the CPU kernels kept compiled on disk (Numba's cache), stale when what they
                                   compile in changes; closures keyed by what they were made for
    NEG_INF, FULL_MASK, SIM        the running max starts at NEG_INF; SIM: the simulator is on
    kv_head(h, n_heads, n_kv_heads)  grouped-query attention: the KV head query head h reads
    visible_keys, tile_is_whole    which keys a block of query rows sees (causal, sliding window): decided here once
    ring_slot(base, r, slots)      where a key lives in a ring-buffer cache (a window layer's; plain arrays: j)
    soft_cap(s, cap)               Gemma 2's logit soft cap, cap * tanh(s / cap), with an accurate tanh
    soft_cap_slope(s, cap)         its derivative at s, 1 - tanh^2(s / cap), accurate where tanh saturates (the
                                   backward's chain rule)
    make_slot_of, make_cap         the kernels' compile-time choices: ring buffer or not, soft cap or not
    make_cap_slope                 the backward's: soft_cap_slope with a soft cap, 1 without
    make_group_reduce(...)         max / sum of TM values over the `width` consecutive threads of a group:
                                   warp shuffles on a GPU, shared memory + barriers in the simulator
    group_barrier()                the lanes of a warp wait for each other (a block barrier in the simulator)
    make_outer_product(...)        one rank-1 update of a thread's register tile from two shared tiles
    bf16_pair / f32_from_bits      weights arrive as raw bits: bf16 is the top half of an fp32, so a shift
                                   and a bit cast (free on the GPU) widen it exactly
    f32_from_half_bits             the same for fp16 bits (the KV cache read as words): one cvt.f32.f16
    arrive_last(...)               "am I the last block of this group to finish?": one atomic per block, so a
                                   launch can end with a reduction over its own blocks (no second launch)
"""
import hashlib
import logging
import math
import os
import struct

import numpy as np
from llvmlite import ir
from numba import config, cuda, float32, int32, uint32, uint64
from numba.core.caching import FunctionCache
from numba.cuda.extending import intrinsic

from .. import kernel_cache
from ..blocks import FLOAT_KINDS

# the simulator's bit casts, in plain Python (NumPy's per-call cost made them a large part of simulated kernels)
_U32, _F32, _U16, _F16 = struct.Struct("<I"), struct.Struct("<f"), struct.Struct("<H"), struct.Struct("<e")

NEG_INF = float32(-np.inf)
FULL_MASK = 0xFFFFFFFF
SIM = bool(config.ENABLE_CUDASIM)   # read once: Numba decides GPU or simulator when numba.cuda is first imported

# --------------------------------------------------------------------------------------------------------
# The compile policy: the one place that decides fastmath
# --------------------------------------------------------------------------------------------------------
# fastmath without 'ninf'/'nnan': running maxima start at -inf (masked keys, rows that have seen no key yet) and
# NaN-poisoned cache slots must stay visible if a bug ever reads them, so the compiler may not assume either away.
# 'afn' gives the fast exp2; 'contract' the FMAs.
FASTMATH = {"contract", "afn", "arcp", "nsz", "reassoc"}


def kernel(fn=None, **options):
    """@kernel or @kernel(launch_bounds=...): compile a numbattn kernel (cuda.jit with FASTMATH), its compiled
    code kept on disk (numbattn/kernel_cache.py: a later process loads it instead of compiling)."""
    def make(f):
        compiled = cuda.jit(fastmath=FASTMATH, **options)(f)
        return compiled if SIM else kernel_cache.attach(compiled)
    return make if fn is None else make(fn)


device = cuda.jit(device=True, inline=True)


def cpu_kernel(fn=None, exact=False, **options):
    """@cpu_kernel or @cpu_kernel(parallel=True, inline="always"): compile a CPU kernel (numba.njit with FASTMATH:
    'reassoc' lets LLVM vectorise the sums; numbattn/cpu_linear.py). exact=True: IEEE arithmetic, no fastmath, for
    a function a NumPy statement must equal bit for bit (not inlined by Numba: LLVM keeps its instructions' flags
    where it inlines it into a fastmath caller)."""
    from numba import njit
    make = njit(fastmath=False if exact else FASTMATH, **options)
    return make if fn is None else make(fn)


log = logging.getLogger("numbattn")


def stamp_cache(kernels, files, choices=()):
    """Make Numba's disk cache of CPU `kernels` stale when any of `files` changes, not only their own file, or
    `choices` do (values their code depends on): Numba compares one source stamp, (mtime, size) of the function's
    file; here it also covers `files`' and `choices`. (Numba's internals: where they differ, the cache keeps its
    own stamp, and a log line says so.)"""
    extra = (tuple((os.stat(f).st_mtime, os.stat(f).st_size) for f in files), tuple(choices))
    for k in kernels:
        cache_file = getattr(getattr(k, "_cache", None), "_cache_file", None)
        if cache_file is None or not hasattr(cache_file, "_source_stamp"):
            log.info("numbattn: Numba's cache has no source stamp to extend; %s follows its own file only",
                     k.__name__)
            continue
        cache_file._source_stamp = (cache_file._source_stamp, extra)


class _KeyedCache(FunctionCache):
    """Numba's disk cache for a closure whose cells hold compiled functions: Numba keys an entry by the pickled
    cells, and a compiled function pickles differently in every process (each would add an entry, none be found
    again); this keys it by `key` (what the cells were made from: the kind) instead."""

    def __init__(self, py_func, key):
        super().__init__(py_func)
        self._key = repr(key).encode()

    def _index_key(self, sig, codegen):
        code = hashlib.sha256(self._py_func.__code__.co_code).hexdigest()
        return sig, codegen.magic_tuple(), (code, hashlib.sha256(self._key).hexdigest())


def keyed_cache(kernels, key, files, choices=()):
    """Keep closures `kernels`, made for `key`, compiled on disk (_KeyedCache), stale as stamp_cache says."""
    for k in kernels:
        k._cache = _KeyedCache(k.py_func, key)
    stamp_cache(kernels, files, choices)


@device
def kv_head(h, n_heads, n_kv_heads):
    """Grouped-query attention: query head h reads KV head h // (n_heads / n_kv_heads); K/V are never repeated."""
    return h // (n_heads // n_kv_heads)


@device
def prefill_block(q, k):
    """-> (b, h, hk, q_len) of a prefill block: grid (query tiles, query heads, batch), so blockIdx.z is the batch
    row, blockIdx.y the query head, and hk the KV head it reads. # q [B, H, Lq, D], k [B, Hkv, S, D]"""
    b, h = cuda.blockIdx.z, cuda.blockIdx.y
    return b, h, kv_head(h, q.shape[1], k.shape[1]), q.shape[2]


@device
def visible_keys(q0, rows, q_len, kv_len, causal, window):
    """-> (j_begin, j_end): the keys that query rows q0 .. q0 + rows - 1 may see, together. Causal masking is
    bottom-right aligned (FlashAttention-2): query i sits at absolute position p = i + kv_len - q_len and sees keys
    p - window < j <= p (a sliding window; window >= kv_len: none). So the rows' first key is the first row's
    window start and their last key the last row's diagonal: a block's key tiles outside [j_begin, j_end) are
    never loaded (skipped, not masked: a windowed prefill costs O(q_len * window)). Not causal: every key."""
    if not causal:
        return 0, kv_len
    p = q0 + kv_len - q_len
    return max(p - window + 1, 0), min(kv_len, p + rows)


@device
def tile_is_whole(j0, n_keys, q0, rows, q_len, kv_len, causal, window):
    """Whether every query row q0 .. q0 + rows - 1 sees every key j0 .. j0 + n_keys - 1: a tile that needs no mask."""
    _, end = visible_keys(q0, 1, q_len, kv_len, causal, window)              # the first row's diagonal
    first, _ = visible_keys(q0 + rows - 1, 1, q_len, kv_len, causal, window)  # the last row's window start
    return first <= j0 and j0 + n_keys <= end


@device
def ring_slot(base, r, slots):
    """The slot of the key r positions after the one in slot `base` (< slots), in a K/V array of `slots` slots
    that holds key position j in slot j mod slots: the KV cache's ring buffer of a sliding-window layer
    (numbattn/kvcache.py). base = j0 mod slots is taken once per tile, so a key costs a compare, not a division;
    r < slots. An array that holds every key (slots >= kv_len) never wraps: slot = j."""
    s = base + r
    return s - slots if s >= slots else s


def make_slot_of(ring):
    """slot_of(base, r, slots) for a kernel compiled for a ring buffer (ring_slot) or not: an array that holds every
    key (a plain K/V, a full cache layer, a ring that has not wrapped yet) never wraps, so its kernels are compiled
    without the compare and its address arithmetic (base = j0 there). A compile-time choice: the kernels that read
    K/V in a loop kept their registers (compile_check: decode v1 takes 24 more a thread with the wrap and the cap).
    The slot comes back unsigned: Numba wraps a negative index around (a compare and select per load unless it can
    prove the index >= 0), and a slot is >= 0 by construction (decode v2, head_dim 64: 48-176 bytes of spill -> 0)."""
    if ring:
        @device
        def slot_of(base, r, slots):
            return uint64(ring_slot(base, r, slots))
        return slot_of

    @device
    def slot_of(base, r, slots):
        return uint64(base + r)
    return slot_of


def make_cap(capped):
    """cap(s, softcap): soft_cap for kernels compiled with a soft cap, else s itself (a compile-time choice, as
    make_slot_of: even never taken, the branch's expm1 cost the decode loops registers and spills)."""
    if capped:
        return soft_cap

    @device
    def cap(s, softcap):
        return s
    return cap


@device
def soft_cap(s, cap):
    """s -> cap * tanh(s / cap), Gemma 2's logit soft cap, for cap > 0 (cap = 0: s unchanged). The kernels' scores
    are in the log2 domain, so their cap is softcap * log2 e (the same squeeze: log2 e * cap * tanh(x / cap)).
    tanh through expm1, not math.tanh: under fastmath Numba emits tanh.approx.f32 (off by ~1e-3), and exp-based
    forms lose the small arguments; tanh(a) = -e / (2 + e) with e = expm1(-2 a), a = |x|, is accurate to a few
    ulp everywhere (libdevice's expm1f; infinite a gives e = -1, tanh = 1)."""
    if cap > 0:
        x = s / cap
        e = math.expm1(float32(-2.0) * abs(x))
        t = -e / (float32(2.0) + e)
        return cap * (t if x >= 0 else -t)
    return s


@device
def soft_cap_slope(s, cap):
    """d soft_cap(s) / d s = 1 - tanh^2(s / cap) for cap > 0 (cap = 0: 1), at the uncapped score s, in the kernels'
    log2 units as soft_cap's (s and cap both times log2 e: the ratio is the same). As 4 E / (1 + E)^2 with
    E = exp(-2 |s / cap|), not 1 - (capped / cap)^2: in fp32 the capped score near +-cap carries an absolute error
    of ~1e-7, which is all of the slope once |s| > ~4 cap (tests/test_backward.py measured dq 7e-3 off at |s| ~ 6 cap
    that way, 1e-6 this way); E is relative-accurate, and underflows to a slope of 0 only below ~1e-37."""
    if cap > 0:
        e = math.exp(float32(-2.0) * abs(s / cap))
        return float32(4.0) * e / ((float32(1.0) + e) * (float32(1.0) + e))
    return float32(1.0)


def make_cap_slope(capped):
    """slope(s, softcap): soft_cap_slope for kernels compiled with a soft cap, else 1 (the choice of make_cap)."""
    if capped:
        return soft_cap_slope

    @device
    def slope(s, softcap):
        return float32(1.0)
    return slope


# --------------------------------------------------------------------------------------------------------
# Reductions over the `width` consecutive threads of a group (a row group of prefill v2, a warp of a GEMV)
# --------------------------------------------------------------------------------------------------------
@cuda.jit(device=True, inline=True)
def _max2(a, b):
    return max(a, b)


@cuda.jit(device=True, inline=True)
def _add2(a, b):
    return a + b


def make_group_reduce(width, n, use_shuffle=None):
    """(group_max, group_sum): reduce x[0:n] in place across the `width` consecutive threads of a group, so that
    every thread of the group ends with the result. `red` is a float32 shared array of shape (n, threads) used by
    the simulator twin (pass a (1, 1) dummy on the GPU). width: a power of two <= 32.

    GPU: a butterfly of log2(width) shfl_xor_sync steps (the group lies inside one warp). Simulator: every thread
    posts its values to shared memory, waits at a barrier, and reads its group's; all threads of the block must
    call it together (as with any syncthreads)."""
    use_shuffle = not SIM if use_shuffle is None else use_shuffle
    steps = int(math.log2(width))
    if 1 << steps != width or width > 32:
        raise ValueError(f"group width {width} must be a power of two <= 32")

    def make(combine):
        if use_shuffle:
            @cuda.jit(device=True, inline=True)
            def group_reduce(x, red):
                for i in range(n):
                    v = x[i]
                    for s in range(steps):
                        v = combine(v, cuda.shfl_xor_sync(FULL_MASK, v, width >> (s + 1)))
                    x[i] = v
            return group_reduce

        @cuda.jit(device=True, inline=True)
        def group_reduce(x, red):
            t = cuda.threadIdx.x
            g0 = t - t % width
            for i in range(n):
                red[i, t] = x[i]
            cuda.syncthreads()
            for i in range(n):
                v = red[i, g0]
                for c in range(1, width):
                    v = combine(v, red[i, g0 + c])
                x[i] = v
            cuda.syncthreads()
        return group_reduce

    return make(_max2), make(_add2)


def reduce_scratch_shape(n, threads, use_shuffle=None):
    """Shape of the shared `red` array a group reduction needs: (n, threads) in the simulator, (1, 1) on a GPU."""
    use_shuffle = not SIM if use_shuffle is None else use_shuffle
    return (1, 1) if use_shuffle else (n, threads)


if SIM:
    @cuda.jit(device=True)
    def group_barrier():
        """Simulator twin of the warp barrier: a block barrier (every thread of the block must call it together)."""
        cuda.syncthreads()
else:
    @cuda.jit(device=True, inline=True)
    def group_barrier():
        """Wait for the other lanes of this warp, and see their shared-memory writes (__syncwarp): enough for a
        group that lies inside one warp (lanes of a warp are not in lockstep since Volta)."""
        cuda.syncwarp(FULL_MASK)


# --------------------------------------------------------------------------------------------------------
# Register-tiled matrix products
# --------------------------------------------------------------------------------------------------------
# One step of a tile product (prefill v2's Q K^T and P V, the GEMM's x W^T). Callers call it four times per
# iteration of their loop over the shared dimension: an unroll by hand, because Numba's loops over d stayed rolled and every step then recomputed all its
# shared-memory addresses (2 integer instructions per load in the SASS). Unrolled, the offsets d+1..d+3
# become immediate operands of the loads.
# Indices are unsigned (uint32) in these: Numba wraps negative indices around Python-style, and for a signed
# index it emits a compare-and-select per load unless the compiler can prove the index >= 0.
def make_outer_product(TM, TN, b_is_k_major):
    """c[i, j] += A[row i, kk] * B[kk, col j] (b_is_k_major, P V) or A[row i, kk] * B[col j, kk] (Q K^T)."""
    if b_is_k_major:
        @cuda.jit(device=True, inline=True)
        def b_at(B, kk, col):
            return B[kk, col]
    else:
        @cuda.jit(device=True, inline=True)
        def b_at(B, kk, col):
            return B[col, kk]

    @cuda.jit(device=True, inline=True)
    def outer_product(A, B, a_rows, b_cols, kk, a, bvec, c):
        ku = uint32(kk)
        for i in range(TM):
            a[i] = A[a_rows[i], ku]
        for j in range(TN):
            bvec[j] = b_at(B, ku, b_cols[j])
        for i in range(TM):
            for j in range(TN):
                c[i, j] += a[i] * bvec[j]
    return outer_product


# --------------------------------------------------------------------------------------------------------
# Raw bits -> float32 (bf16 and fp32 weights, fp16 and fp32 K/V, are read as words: one 8-byte load brings 4 bf16
# or fp16 values, or 2 fp32)
# --------------------------------------------------------------------------------------------------------
if SIM:
    @cuda.jit(device=True)
    def f32_from_bits(bits):
        """The float32 whose bit pattern is the uint32 `bits` (simulator: struct's bytes; libdevice is absent)."""
        bits = int(bits) & 0xFFFFFFFF
        if bits & 0x7F800000 == 0x7F800000 and bits & 0x7FFFFF:       # a NaN: through NumPy, payload kept
            return np.array([bits], np.uint32).view(np.float32)[0]
        return np.float32(_F32.unpack(_U32.pack(bits))[0])
else:
    @cuda.jit(device=True, inline=True)
    def f32_from_bits(bits):
        """The float32 whose bit pattern is the uint32 `bits` (a register reinterpretation on the GPU)."""
        return cuda.libdevice.int_as_float(int32(bits))


if SIM:
    @cuda.jit(device=True)
    def f32_from_half_bits(bits):
        """The fp16 value whose bit pattern is the low 16 bits of the integer `bits`, as a float32 (exact)."""
        bits = int(bits) & 0xFFFF
        if bits & 0x7C00 == 0x7C00 and bits & 0x3FF:                  # a NaN: through NumPy, payload kept
            return np.float32(np.array([bits], np.uint16).view(np.float16)[0])
        return np.float32(_F16.unpack(_U16.pack(bits))[0])
else:
    @intrinsic
    def f32_from_half_bits(typingctx, bits):
        """The fp16 value whose bit pattern is the low 16 bits of the integer `bits`, as a float32 (exact): the
        bits become an LLVM half, widened by one cvt.f32.f16 (Numba has no bit cast to float16 of its own)."""
        def codegen(context, builder, signature, args):
            x, width = args[0], signature.args[0].bitwidth
            x = builder.trunc(x, ir.IntType(16)) if width > 16 else builder.zext(x, ir.IntType(16)) if width < 16 else x
            return builder.fpext(builder.bitcast(x, ir.HalfType()), ir.FloatType())
        return float32(bits), codegen


@cuda.jit(device=True, inline=True)
def bf16_pair(word):
    """A uint32 holding two bf16 (element 0 in the low half, little-endian) -> (float32, float32), exactly."""
    w = uint32(word)
    return f32_from_bits(w << uint32(16)), f32_from_bits(w & uint32(0xFFFF0000))


WEIGHT_KINDS = FLOAT_KINDS      # float matrices arrive as uint64 words of this many values (GGUF blocks: kernels/blocks.py)


def make_weight_unpack(kind):
    """unpack(word, vals): a uint64 word of weights -> the VPW = WEIGHT_KINDS[kind] float32 values it holds, written
    into vals[0:VPW] (bf16: 4 values, widened exactly by a shift; f16: 4, one cvt each; f32: 2)."""
    if kind == "bf16":
        @device
        def unpack(word, vals):
            vals[0], vals[1] = bf16_pair(uint32(word & uint64(0xFFFFFFFF)))
            vals[2], vals[3] = bf16_pair(uint32(word >> uint64(32)))
    elif kind == "f16":
        @device
        def unpack(word, vals):
            for j in range(4):
                vals[j] = f32_from_half_bits(uint32(word >> uint64(16 * j)) & uint32(0xFFFF))
    else:
        @device
        def unpack(word, vals):
            vals[0] = f32_from_bits(uint32(word & uint64(0xFFFFFFFF)))
            vals[1] = f32_from_bits(uint32(word >> uint64(32)))
    return unpack


@device
def silu(x):
    """x * sigmoid(x) = x / (1 + exp(-x)): for x << 0, exp(-x) overflows to inf and the quotient is -0, the
    right limit. (Not through tanh as reference.silu: fastmath's approximate tanh is off by ~1e-3.)"""
    return x / (float32(1.0) + math.exp(-x))


@device
def gelu_tanh(x):
    """GELU with tanh's approximation (Gemma's), 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3),
    written as x * sigmoid(2u): no tanh, as silu. For x << 0 the exponent is clamped at 80 (the simulator's exp,
    Python's, raises where float32's would give inf): x / (1 + e^80) is below 1e-30, zero to any tolerance."""
    u = float32(0.7978845608028654) * (x + float32(0.044715) * x * x * x)
    return x / (float32(1.0) + math.exp(min(float32(-2.0) * u, float32(80.0))))


def gate_of(epilogue):
    """The activation of a gated epilogue: "swiglu" -> silu, "geglu" -> gelu_tanh (None: not gated)."""
    return {"swiglu": silu, "geglu": gelu_tanh}.get(epilogue)


# --------------------------------------------------------------------------------------------------------
# The last block to finish
# --------------------------------------------------------------------------------------------------------
@cuda.jit(device=True, inline=True)
def arrive_last(counters, i, n_arrivals, flag):
    """Called by every thread of a block once its results are written: True in the block that arrives last among
    the n_arrivals blocks counting on counters[i] (an int32 device array, zero before the launch), which then
    sees every other block's writes and may combine them. The last block resets counters[i] to 0, so the next
    launch (or CUDA-graph replay) starts clean. flag: an int32 shared array of length >= 1.

    The pattern of CUDA's threadFenceReduction sample: each thread fences its own writes device-wide, the block
    takes one ticket with an atomic add, and the ticket numbered n_arrivals - 1 is the last."""
    cuda.threadfence()
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        ticket = cuda.atomic.add(counters, i, 1)
        last = ticket == n_arrivals - 1
        if last:
            counters[i] = 0
        flag[0] = 1 if last else 0
    cuda.syncthreads()
    return flag[0] == 1


@kernel
def shared_64k_probe(out):
    # out [32] -> out[t] = t, through 64 KB of static shared memory (numbattn/gpu.py asks whether that works)
    buf = cuda.shared.array(16384, float32)
    t = cuda.threadIdx.x
    buf[16383 - t] = float32(t)
    cuda.syncthreads()
    out[t] = buf[16383 - t]
