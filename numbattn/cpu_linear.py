"""The linear layers on the CPU with the weights in GGUF blocks: y = x W^T, dequantized inside Numba kernels.

What you will learn here
------------------------
On a CPU, decode is bound by the bytes of weights read per token as on a GPU: SmolLM2-135M's matrices are 92 MB as
Q4_1/Q8_0 blocks and 540 MB as the fp32 they used to be dequantized into. So the weights stay in their blocks
(numbattn/blocks.py's layout, the file's bytes) and two Numba kernels (@njit, compiled for this CPU, vectorised by
LLVM) read them:

    gemv   one token: each group's codes (16 bytes of 4-bit codes, or 32 of 8-bit) are turned into floats in
           registers and multiplied into 16 (or 32) running sums, a * (c x), the group's offset added once as
           b' sum(x): x is staged once per call in the codes' order (low nibbles, then high), so the loop is a
           plain vectorisable run. Rows are split over the threads (prange) when there is more than one.
    panel  a prompt chunk (more than GEMV_TOKENS tokens): PANEL_ROWS rows at a time dequantized into an fp32
           buffer that stays in cache, in the same staged order, and multiplied by x (staged alike) with BLAS
           (x @ panel^T): every weight is decoded once per chunk and BLAS does the O(M N K) work.

Where it stands (SmolLM2-135M Q4_1 on this 2-core machine, BENCHMARKS.md): the GEMV decodes ~3.3 G weights/s a
thread, about what BLAS streams as fp32, so decode is no faster than the fp32 weights yet (the bytes are 5.5x fewer;
the arithmetic per weight is now the limit: llama.cpp's int8 dot products run ~2.5x faster a thread) and a prompt
is slower (the dequantization is added to BLAS's time); the RAM is 5.5x smaller.

Activations and sums are float32. The record arithmetic (a group's factor a and offset b) is the GPU's, written
once (kernels/blocks.py make_factors); the NumPy statement the kernels are tested against is blocks.dequantize.

    W = BlockMatrix("q4_1", words, n_in)      # W [N, K] as stored: W.shape == (N, K)
    y = x @ W.T                               # x [..., K] -> [..., N]: the NumPy engine's `h @ lw.wq`, unchanged
    rows = W[ids]                             # dequantized rows (the embedding lookup) [..., K]
"""
import functools

import numpy as np
from numba import float32, prange

from . import blocks
from .kernels.blocks import ZERO, cpu_factors
from .kernels.common import cpu_kernel

GEMV_TOKENS = 2             # more tokens than this: dequantized panels and BLAS
PANEL_ROWS = 256            # rows per dequantized panel: 256 x 2048 fp32 = 2 MB, this machine's L2 per core
# A panel is dequantized on the calling thread alone, between matmuls that OpenBLAS runs on all of them. On Numba's
# OpenMP threads, which spin after each parallel region (so that the next GEMV starts at once), it held the cores
# OpenBLAS's threads needed next, ~8 ms a switch on 2 cores: SmolLM2's 41-token prompt took 5.7 s at 2 threads.
# Letting OpenMP's threads sleep instead (OMP_WAIT_POLICY=PASSIVE) fixed the prompt but slowed decode from 41 to
# 61 ms a token (each GEMV waking them). On one thread: 205 ms for the prompt, decode 41 ms.
ROW_BLOCK = 32              # rows per parallel task of the GEMV
CPU_KINDS = tuple(blocks.BLOCK_KINDS)
HALF_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@cpu_kernel(inline="always")
def half(bits):
    """fp16 bits -> float32, exactly: a table of the 65536 halves, decoded once by NumPy (256 KB, cache resident)."""
    return HALF_TO_F32[bits]


def staged_order(kind, n_in):
    """The staged order of a row's columns: position p of the staged row holds column order[p]. 4- to 6-bit codes:
    the low nibbles of the row's code bytes, then their high nibbles (byte i of code word w = i // 8 holds columns
    16 w + i % 8 and 16 w + 8 + i % 8); 8-bit codes in place. x is staged alike, once per call."""
    if blocks.BLOCK_KINDS[kind].bits == 8:
        return np.arange(n_in)
    i = np.arange(n_in // 2)
    low = 16 * (i // 8) + i % 8
    return np.concatenate([low, low + 8])


class BlockMatrix:
    """A weight matrix W [N, K] kept in numbattn's block layout (rows of uint64 words), multiplied by Numba kernels.
    `W.T` is the [K, N] matrix of the NumPy engine's `x @ W` (an operand NumPy defers to); `W[ids]` dequantized
    rows."""

    def __init__(self, kind, words, n_in):
        if kind not in CPU_KINDS:
            raise ValueError(f"kind={kind!r}: the CPU kernels read {', '.join(CPU_KINDS)}")
        blocks.check_row_length(kind, n_in)
        if words.dtype != np.uint64 or words.ndim != 2 or words.shape[1] != blocks.row_words(kind, n_in):
            raise ValueError(f"words {words.dtype} {words.shape}: expected uint64 rows of "
                             f"{blocks.row_words(kind, n_in)} words ({kind}, {n_in} values)")
        self.kind, self.words, self.n_in = kind, np.ascontiguousarray(words), n_in
        self.shape, self.nbytes, self.dtype = (words.shape[0], n_in), self.words.nbytes, np.dtype(np.float32)
        self.order = staged_order(kind, n_in)

    @property
    def T(self):
        return Transposed(self)

    def __getitem__(self, ids):
        """W[ids]: rows dequantized (the NumPy statement: an embedding lookup reads a few rows)."""
        ids = np.asarray(ids)
        return blocks.dequantize(self.kind, self.words[ids.reshape(-1)], self.n_in).reshape(*ids.shape, self.n_in)

    def times(self, x):
        """x [..., K] float32 -> x W^T [..., N]."""
        x = np.asarray(x, np.float32)
        lead, (n, k) = x.shape[:-1], self.shape
        if x.shape[-1] != k:
            raise ValueError(f"x has shape {x.shape}; expected [..., {k}] for a {self.kind} matrix {self.shape}")
        xs = np.ascontiguousarray(x.reshape(-1, k)[:, self.order])          # [M, K], staged as the chunks are
        out = np.empty((xs.shape[0], n), np.float32)
        (rows, task), w, gb = make_cpu_kernels(self.kind), self.words.view(np.uint8), group_bytes(self.kind)
        if xs.shape[0] <= GEMV_TOKENS:
            shape = np.empty((1, k), np.float32)                                # (buf: only its width is read)
            xsum = group_sums(self.kind, xs)
            for m in range(xs.shape[0]):
                rows(w, 0, n, shape, xs[m], xsum[m], out[m], True, gb)
        else:
            buf = np.empty((min(PANEL_ROWS, n), k), np.float32)
            for r0 in range(0, n, PANEL_ROWS):
                r1 = min(n, r0 + PANEL_ROWS)
                task(w, r0, r1, buf, xs[0], xs[0], out[0], False, gb)      # the calling thread: see PANEL_ROWS
                np.matmul(xs, buf[:r1 - r0].T, out=out[:, r0:r1])
        return out.reshape(*lead, n)


class Transposed:
    """W^T [K, N] of a BlockMatrix: `x @ W.T` calls W.times(x); `W.T.T` is W."""
    __array_ufunc__ = None                  # ndarray @ Transposed -> Transposed.__rmatmul__

    def __init__(self, matrix):
        self.T, self.shape = matrix, matrix.shape[::-1]
        self.nbytes, self.dtype, self.kind = matrix.nbytes, matrix.dtype, matrix.kind

    def __rmatmul__(self, x):
        return self.T.times(x)


# --------------------------------------------------------------------------------------------------------
# The kernels
# --------------------------------------------------------------------------------------------------------
def compile_cpu_kernels(kind):
    """Compile `kind`'s kernels now (Numba compiles at the first call: a few seconds), on a one-block matrix."""
    k = blocks.BLOCK_KINDS[kind]
    matrix = BlockMatrix(kind, np.zeros((1, blocks.row_words(kind, k.block)), np.uint64), k.block)
    for tokens in (1, GEMV_TOKENS + 1):
        np.zeros((tokens, k.block), np.float32) @ matrix.T



@functools.lru_cache(maxsize=None)
def make_cpu_kernels(kind):
    """rows(w_bytes, r0, r1, buf, xs, xsum, out, dot, gb) for `kind`: w_bytes the words as uint8 [N, 8 W]; with dot,
    out[n] = xs . W[n] for rows r0 .. r1 - 1 (the GEMV: xs one staged token [K], xsum [K / group] the sums of its
    groups' values), else those rows dequantized (staged) into buf [>= r1 - r0, K] (a panel). gb: code bytes per
    group (group_bytes(kind)), passed at run time on purpose: a loop of a constant 16 is unrolled and LLVM then
    vectorises the loop around it, across groups, with gathers and scatters (2-6x slower); a loop of unknown length
    is vectorised itself. One function for both, compiled once a kind; its rows are split over Numba's threads
    (numba.set_num_threads), ROW_BLOCK rows to a task, whose loops are compiled apart (in a prange body LLVM left
    them scalar)."""
    eight = blocks.BLOCK_KINDS[kind].bits == 8
    dequantize_row, dot_row = (_make_q8 if eight else _make_q4)(kind)
    offsets = _make_offsets(kind)

    @cpu_kernel
    def task(w, r0, r1, buf, xs, xsum, out, dot, gb):
        K = buf.shape[1]
        lay, scratch, v = offsets(K), np.empty((4, K // 2), np.float32), np.empty(gb, np.float32)
        for n in range(r0, r1):
            if dot:
                out[n] = dot_row(w, n, lay, scratch, xs, xsum, v, gb)
            else:
                dequantize_row(w, n, lay, scratch, buf[n - r0], gb)

    @cpu_kernel(parallel=True)
    def rows(w, r0, r1, buf, xs, xsum, out, dot, gb):
        for b in prange((r1 - r0 + ROW_BLOCK - 1) // ROW_BLOCK):
            lo = r0 + b * ROW_BLOCK
            task(w, lo, min(r1, lo + ROW_BLOCK), buf[lo - r0:] if not dot else buf, xs, xsum, out, dot, gb)
    return rows, task


def group_sums(kind, xs):
    """Staged tokens xs [M, K] -> [M, groups]: the sum of each group's values of x, sum(x) in b' sum(x) (Q8_0 has
    no offset: xs itself, unread)."""
    if blocks.BLOCK_KINDS[kind].bits == 8:
        return xs
    halves = xs.reshape(xs.shape[0], 2, -1, group_bytes(kind))          # low codes' x, high codes' x; groups
    return np.ascontiguousarray(halves.sum(axis=(1, 3)))


def group_bytes(kind):
    """Code bytes per group of one factor a and offset b: 16 (32 4- to 6-bit codes) or 8 (Q6_K's 16); Q8_0: 32."""
    k = blocks.BLOCK_KINDS[kind]
    return k.group if k.bits == 8 else k.group // 2


def _make_offsets(kind):
    """offsets(n_in) -> (first high-bit byte, first record byte) of a row (numbattn.blocks.row_layout, in bytes)."""
    VPW, HB = blocks.BLOCK_KINDS[kind].vpw, blocks.BLOCK_KINDS[kind].high_bits

    @cpu_kernel(inline="always")
    def offsets(n_in):
        n_code = n_in // VPW
        return 8 * n_code, 8 * (n_code + (n_code * HB + 63) // 64)
    return offsets


# The codes become floats before any arithmetic: Numba computes on integers narrower than 64 bits in 64 bits, whose
# conversion to float is half as wide and slow, so a byte c is widened to a float (exact) and split there:
# hi = floor(c / 16), lo = c - 16 hi; an int8 is c - 256 floor(c / 128). Both kernels below were checked in the
# assembly (vpmovzxbd, vcvtdq2ps, vroundps, FMAs on 8 lanes):
#   dequantize_row(w, n, lay, scratch, row, gb): row [K] = W[n] dequantized, staged: each group's factors spread
#       first into per-byte arrays (scratch), then plain loops over the row's bytes with one stream of stores each;
#   dot_row(w, n, lay, scratch, xs, xsum, v, gb) -> xs . W[n]: for each group, v[t] += a (lo_t x_lo,t + hi_t x_hi,t)
#       over its gb bytes (v: gb running sums, added up at the end), and the group's offset once, b' sum(x) (b' = b - a z,
#       xsum the group's sum of x): one FMA a weight and nothing stored.
def _make_q4(kind):
    """4- to 6-bit codes. scratch [4, K/2]: each byte's factor a, offset b (the zero point folded in: a c + b), and
    the high bits of its low and high code."""
    factors = cpu_factors(kind, half)
    z, E, high_bits = float32(ZERO[kind]), blocks.BLOCK_KINDS[kind].bits - 4, _make_high_bits(kind)

    @cpu_kernel(inline="always")
    def dequantize_row(w, n, lay, scratch, row, gb):
        wn, H = w[n], row.shape[0] // 2
        a, b, high_lo, high_hi = scratch[0], scratch[1], scratch[2], scratch[3]
        for g in range(H // gb):
            ag, bg = factors(w, n, lay[1], g)
            base = g * gb
            for t in range(gb):
                a[base + t] = ag
                b[base + t] = bg - ag * z
        if E:
            high_bits(wn, lay[0], H, high_lo, high_hi)
        for i in range(H):
            c = float32(wn[i])
            hi = np.floor(c * float32(0.0625))
            lo = c - float32(16.0) * hi
            if E:
                lo, hi = lo + high_lo[i], hi + high_hi[i]
            row[i] = a[i] * lo + b[i]
            row[H + i] = a[i] * hi + b[i]

    @cpu_kernel(inline="always")
    def dot_row(w, n, lay, scratch, xs, xsum, v, gb):
        wn, H = w[n], xs.shape[0] // 2
        high_lo, high_hi = scratch[2], scratch[3]
        if E:
            high_bits(wn, lay[0], H, high_lo, high_hi)
        for t in range(gb):
            v[t] = float32(0.0)
        s = float32(0.0)
        for g in range(H // gb):
            a, b = factors(w, n, lay[1], g)
            s += (b - a * z) * xsum[g]
            base = g * gb
            for t in range(gb):
                c = float32(wn[base + t])
                hi = np.floor(c * float32(0.0625))
                lo = c - float32(16.0) * hi
                if E:
                    lo, hi = lo + high_lo[base + t], hi + high_hi[base + t]
                v[t] += a * (lo * xs[base + t] + hi * xs[H + base + t])
        for t in range(gb):
            s += v[t]
        return s
    return dequantize_row, dot_row


def _make_high_bits(kind):
    """high_bits(wn, h0, H, high_lo, high_hi): bits 4 (and 5) of each byte's two codes (5- and 6-bit codes), as floats
    times 16, from the row's high-bit stream at byte h0."""
    k = blocks.BLOCK_KINDS[kind]
    E = k.bits - 4
    MASK, FIELD = (1 << max(E, 0)) - 1, k.high_bits // 8            # high bits per code, bytes per word's field

    @cpu_kernel(inline="always")
    def high_bits(wn, h0, H, high_lo, high_hi):
        for i in range(H):                                           # byte i: code word i // 8, columns t and t + 8
            f, t = 0, i & 7
            for e in range(FIELD):
                f |= int(wn[h0 + FIELD * (i >> 3) + e]) << (8 * e)
            high_lo[i] = float32(((f >> (E * t)) & MASK) << 4)
            high_hi[i] = float32(((f >> (E * (t + 8))) & MASK) << 4)
    return high_bits


def _make_q8(kind):
    """8-bit codes (Q8_0): 32 int8 codes a block, in place; scratch [4, K/2] holds each value's factor."""
    factors = cpu_factors(kind, half)

    @cpu_kernel(inline="always")
    def dequantize_row(w, n, lay, scratch, row, gb):
        wn, a = w[n], scratch.reshape(-1)
        for g in range(row.shape[0] // gb):
            ag, _ = factors(w, n, lay[1], g)
            base = g * gb
            for t in range(gb):
                a[base + t] = ag
        for i in range(row.shape[0]):
            c = float32(wn[i])
            row[i] = a[i] * (c - float32(256.0) * np.floor(c * float32(1 / 128)))     # the byte's int8

    @cpu_kernel(inline="always")
    def dot_row(w, n, lay, scratch, xs, xsum, v, gb):
        wn = w[n]
        for t in range(gb):
            v[t] = float32(0.0)
        for g in range(xs.shape[0] // gb):
            a, _ = factors(w, n, lay[1], g)
            base = g * gb
            for t in range(gb):
                c = float32(wn[base + t])
                v[t] += a * ((c - float32(256.0) * np.floor(c * float32(1 / 128))) * xs[base + t])
        s = float32(0.0)
        for t in range(gb):
            s += v[t]
        return s
    return dequantize_row, dot_row
