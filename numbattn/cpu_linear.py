"""The linear layers on the CPU with the weights in GGUF blocks: y = x W^T, dequantized inside Numba kernels.

What you will learn here
------------------------
On a CPU, decode is bound by the bytes of weights read per token as on a GPU: SmolLM2-135M's matrices are 92 MB as
Q4_1/Q8_0 blocks and 540 MB as the fp32 they used to be dequantized into. So the weights stay in their blocks
(numbattn/blocks.py's layout, the file's bytes) and Numba kernels (@njit, compiled for this CPU) read them:

    int8 gemv  one token, every kind (Q8_KINDS, the default; q8_kernels; a 5- or 6-bit code's high bits merged
             into its nibble in the vector unpack, cpu_dot.dot_acc_high and dot_acc_q6): x is quantized
             per group of 32 to int8 (dx * q, llama.cpp's Q8 step; quantize), and each group's dot product c . q
             is an int32 sum of byte products (kernels/cpu_dot.py: vpdpbusd where the CPU has VNNI), scaled once
             per group:  W[n] . x~ = sum_g dx_g (a_ng (c_ng . q_g - z qsum_g) + b_ng qsum_g)
    int8 gemm  a prompt chunk (more than GEMV_TOKENS tokens), Q8_KINDS: the same arithmetic, each group's codes
             unpacked once for TOKENS tokens and x once for ROWS rows (kernels/cpu_dot.py dot_rows_tokens,
             dot_rows_tokens_high, dot_rows_tokens_q6).
    gemv     one token with ACTIVATIONS = "fp32": each group's codes turned into floats in registers and
             multiplied into 16 (or 32) running sums, a * (c x), the group's offset added once as
             b' sum(x); x staged once per call in the codes' order (low nibbles, then high). 5- and 6-bit codes:
             each row dequantized first (the panels' pass), then one float dot product (their high bits, read
             inside that loop, kept LLVM from vectorising it: Q5_0 2048 x 768, 1.64 -> 0.74 ms; the int8 gemv
             on the same matrix: 0.08-0.11 ms, Q6_K's 0.13 against 0.80).
    panel    a prompt chunk with ACTIVATIONS = "fp32": PANEL_ROWS rows at a time dequantized into an fp32
             buffer, in the order x is staged, and multiplied by x with BLAS (x @ panel^T): every weight decoded
             once per chunk, BLAS doing the O(M N K) work, x in fp32.
             SmolLM2's 41-token prompt took about as long this way as by the int8 gemm on 2026-12-07 (180 ms both
             at 2 threads); the int8 gemm has been made faster since (BENCHMARKS.md).

Every kernel is kept compiled on disk (Numba's cache; closures made per kind are keyed by the kind, keyed_cache):
compiling them takes 10-15 s, loading them ~0.2 s.

The GEMVs split the rows over the threads (prange), take DOT_ROWS rows together (each load of x serves four rows'
codes) and ask for the rows PREFETCH_ROWS ahead. On this CPU (2 cores, AVX512-VNNI) the int8 GEMV runs ~15 G
weights/s a thread on a matrix in cache, ~2.3x the float one; from memory, both threads together read ~16 GB/s,
near what the machine streams. Measured end to end: BENCHMARKS.md. RowStack serves several matrices that read the
same x (q/k/v, gate/up) with one call.

Precision: the int8 kernels round x to 8 bits per group of 32 (a relative error of ~1/254 of the group's largest
value; SmolLM2's logits move by ~4% of their largest: what llama.cpp does); the float GEMV and the panels keep x in
fp32. Sums are float32 (int32 inside a group). The record arithmetic (a group's factor a and offset b) is the GPU's,
written once (kernels/blocks.py make_factors); the NumPy statements the kernels are tested against are
blocks.dequantize and quantize_q8.

    W = BlockMatrix("q4_1", words, n_in)      # W [N, K] as stored: W.shape == (N, K)
    y = x @ W.T                               # x [..., K] -> [..., N]: the NumPy engine's `h @ lw.wq`, unchanged
    rows = W[ids]                             # dequantized rows (the embedding lookup) [..., K]
"""
import functools

import numpy as np
from numba import float32, prange

from . import blocks
from .kernels import blocks as blocks_kernels
from .kernels import common, cpu_dot
from .kernels.blocks import ZERO, cpu_factors
from .kernels.common import cpu_kernel, keyed_cache, stamp_cache
from .kernels.cpu_dot import (ROWS, TOKENS, code_bytes, dequantize, dot_acc, dot_acc_high, dot_acc_q6, dot_rows_tokens,
                               dot_rows_tokens_high, dot_rows_tokens_q6, f32_of_half, prefetch)

FEW_TOKENS = 3              # a prompt's last block of at most this many tokens: GEMV steps, not a TOKENS block
GEMV_TOKENS = 2             # more tokens than this: the chunk kernels (the int8 gemm, or panels and BLAS)
PANEL_ROWS = 1024           # rows per dequantized panel (SmolLM2's 41-token prompt: 140 ms, 256 rows: 161 ms)
# A panel is dequantized on the calling thread alone, between matmuls that OpenBLAS runs on all of them. On Numba's
# OpenMP threads, which spin after each parallel region (so that the next GEMV starts at once), it held the cores
# OpenBLAS's threads needed next, ~8 ms a switch on 2 cores: SmolLM2's 41-token prompt took 5.7 s at 2 threads.
# Letting OpenMP's threads sleep instead (OMP_WAIT_POLICY=PASSIVE) fixed the prompt but slowed decode from 41 to
# 61 ms a token (each GEMV waking them). On one thread: 205 ms for the prompt, decode 41 ms.
ROW_BLOCK = 32              # rows per parallel task of the GEMV
PREFETCH_ROWS = 8           # the int8 GEMV asks for the rows this far ahead while it works on 4
DOT_ROWS = 4                # rows the GEMV takes together: each load of x serves 4 (1.8x faster than 1; 8: slower)
assert DOT_ROWS % ROWS == 0 and ROW_BLOCK % DOT_ROWS == 0   # the int8 gemm steps ROWS rows through padded rows
CPU_KINDS = tuple(blocks.BLOCK_KINDS)
# Codes in groups of 32 (Q6_K: two scales a group): int8 dot products (see ACTIVATIONS), for a token and a prompt
Q8_KINDS = ("q8_0", "q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k")
Q8_GROUP = 32
# How a GEMV on Q8_KINDS weights takes x: "q8", quantized per group of 32 to int8 (llama.cpp's way: byte dot
# products, kernels/cpu_dot.py; SmolLM2 Q4_1 decodes ~1.6x faster), or "fp32" (the float kernels every kind has).
ACTIVATIONS = "q8"


@cpu_kernel(inline="always")
def half(bits):
    """fp16 bits -> float32, exactly (kernels/cpu_dot.py's f32_of_half: one vcvtph2ps where the CPU has F16C)."""
    return f32_of_half(bits)


def staged_order(kind, n_in):
    """The staged order of a row's columns: position p of the staged row holds column order[p]. 4- to 6-bit codes:
    the low nibbles of the row's code bytes, then their high nibbles (byte i of code word w = i // 8 holds columns
    16 w + i % 8 and 16 w + 8 + i % 8); 8-bit codes in place. x is staged alike, once per call."""
    if blocks.BLOCK_KINDS[kind].bits == 8:
        return np.arange(n_in)
    i = np.arange(n_in // 2)
    low = 16 * (i // 8) + i % 8
    return np.concatenate([low, low + 8])


def q8_order(kind, n_in):
    """The order x is quantized in for the int8 dot products: each group's 32 columns as kernels/cpu_dot.py pairs
    them with the codes (4-bit: the low nibbles' 16 columns of the group's 16 bytes, then the high nibbles')."""
    if blocks.BLOCK_KINDS[kind].bits == 8:
        return np.arange(n_in)
    staged, half = staged_order(kind, n_in), n_in // 2
    return np.stack([staged[:half].reshape(-1, 16), staged[half:].reshape(-1, 16)], axis=1).reshape(-1)


def quantize_q8(x):
    """The NumPy statement of x's int8 quantization (kernels' `quantize`): x [K] -> q [K] int8, dx [K/32]; each
    group g of 32 values x_g ~ dx_g q_g with dx_g = max|x_g| / 127 (0 for a zero group, NaN if x_g is not
    finite)."""
    g = np.asarray(x, np.float32).reshape(-1, Q8_GROUP)
    amax, finite = np.abs(g).max(axis=1), np.isfinite(g).all(axis=1)
    ok = finite & (amax > 0)
    inv = np.where(ok, np.float32(127) / np.where(ok, amax, 1), 0).astype(np.float32)
    q = np.rint(np.where(finite[:, None], g, 0) * inv[:, None]).astype(np.int8).reshape(-1)
    return q, np.where(finite, amax / np.float32(127), np.nan).astype(np.float32)


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
        pad = -words.shape[0] % DOT_ROWS                # zero rows to a multiple of the GEMV's row step (not read out)
        self.kind, self.n_in = kind, n_in
        self.use_words(np.ascontiguousarray(np.pad(words, ((0, pad), (0, 0)))))
        self.shape, self.nbytes, self.dtype = (words.shape[0], n_in), self.words.nbytes, np.dtype(np.float32)
        self.order, self.q8_order = staged_order(kind, n_in), q8_order(kind, n_in)
        self.kernels, self.group_bytes = make_cpu_kernels(kind), group_bytes(kind)
        self.q8 = q8_kernels(kind) if kind in Q8_KINDS else None     # (gemv, gemm, panel); 5-, 6-bit: no panel

    def use_words(self, words):
        """Keep the padded rows `words` (uint64), and the byte views the kernels read: the rows as uint8 (the scale
        records are read from them) and the codes (the same bytes, int8 for Q8_0: their dtype picks the codes'
        width)."""
        self.words, self.bytes = words, words.view(np.uint8)
        self.codes = self.bytes.view(np.int8) if self.kind == "q8_0" else self.bytes

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
        (gemv, panel), w, gb, q8 = self.kernels, self.bytes, self.group_bytes, self.q8
        int8 = q8 is not None and ACTIVATIONS == "q8"
        if int8 and x.size == k:                        # one token (decode): one kernel call and two views
            out = np.empty(w.shape[0], np.float32)      # (every NumPy call here costs ~0.5 us; a layer makes 4)
            q8[0](w, self.codes, x.reshape(k), self.q8_order, out)
            return out[:n].reshape(*lead, n)
        x2 = np.ascontiguousarray(x.reshape(-1, k))
        if int8 and q8[1] is not None or x2.shape[0] <= GEMV_TOKENS:
            out = np.empty((x2.shape[0], w.shape[0]), np.float32)              # (the padding rows' too)
            if x2.shape[0] > GEMV_TOKENS:
                q8[1](w, self.codes, x2, self.q8_order, out)                         # a chunk
            else:
                for m in range(x2.shape[0]):                                    # the GEMVs: a token at a time
                    if int8:
                        q8[0](w, self.codes, x2[m], self.q8_order, out[m])
                    else:
                        gemv(w, x2[m], self.order, out[m], gb)
            return out[:, :n].reshape(*lead, n)
        q8_panel = q8 is not None and q8[2] is not None
        xs = x2[:, self.q8_order if q8_panel else self.order]                # [M, K], staged as the panels are
        out = np.empty((xs.shape[0], n), np.float32)
        buf = np.empty((min(PANEL_ROWS, n), k), np.float32)
        for r0 in range(0, n, PANEL_ROWS):
            r1 = min(n, r0 + PANEL_ROWS)
            if q8_panel:                                # on the calling thread: see PANEL_ROWS
                q8[2](w, self.codes, r0, r1, buf)           # (x in fp32: ACTIVATIONS; the int8 kinds' panels)
            else:
                panel(w, r0, r1, buf, gb)
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


class RowStack:
    """Matrices of one kind and input length kept as one, their rows stacked ([Wq; Wk; Wv], [W_gate; W_up]): one
    kernel call (one quantization of x, one split over the threads) gives every part's product. The parts keep
    working alone: their words become views of the stack's (no second copy).

        qkv = RowStack([wq, wk, wv])          # BlockMatrix parts (or their .T)
        q, k, v = qkv.times(x)                # x [..., K] -> [..., N_q], [..., N_k], [..., N_v]
    """

    def __init__(self, parts):
        if not RowStack.fits(parts):
            raise ValueError(f"RowStack: parts of one kind and input length only, kept as blocks; not "
                             f"{[(getattr(p, 'kind', type(p).__name__), getattr(p, 'n_in', None)) for p in parts]}")
        parts = [p.T if isinstance(p, Transposed) else p for p in parts]
        self.matrix = BlockMatrix(parts[0].kind, np.concatenate([p.words for p in parts]), parts[0].n_in)
        self.spans, row = [], 0
        for p in parts:                                 # each part's words are padded to DOT_ROWS rows already
            p.use_words(self.matrix.words[row:row + p.words.shape[0]])
            self.spans.append((row, row + p.shape[0]))
            row += p.words.shape[0]

    @staticmethod
    def fits(parts):
        """True if the parts can be stacked: all kept in blocks, one kind, one input length."""
        parts = [p.T if isinstance(p, Transposed) else p for p in parts]
        return all(isinstance(p, BlockMatrix) for p in parts) and len({(p.kind, p.n_in) for p in parts}) == 1

    def times(self, x):
        y = self.matrix.times(x)
        return tuple(y[..., a:b] for a, b in self.spans)


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
    """(gemv(w_bytes, x, order, out, gb), panel(w_bytes, r0, r1, buf, gb)) for `kind`: w_bytes the words as uint8
    [N, 8 W] (N a multiple of DOT_ROWS); gemv: out[n] = x . W[n] for every row (x one token [K], staged in the
    kernel by `order`); panel: rows r0 .. r1 - 1 dequantized (staged) into buf [>= r1 - r0, K]. gb: code bytes per
    group (group_bytes(kind)), passed at run time on purpose: a loop of a constant 16 is unrolled and LLVM then
    vectorises the loop around it, across groups, with gathers and scatters (2-6x slower); a loop of unknown length
    is vectorised itself. The GEMV's rows are split over Numba's threads (numba.set_num_threads), ROW_BLOCK rows to
    a task, whose loops are compiled apart (in a prange body LLVM left them scalar); a panel runs on the calling
    thread (see PANEL_ROWS)."""
    eight, HIGH_BITS = blocks.BLOCK_KINDS[kind].bits == 8, blocks.BLOCK_KINDS[kind].bits in (5, 6)
    dequantize_row, dot_rows = (_make_q8 if eight else _make_q4)(kind)
    offsets = _make_offsets(kind)

    @cpu_kernel
    def dot_task(w, r0, r1, xs, xsum, out, gb):
        K = xs.shape[0]
        lay = offsets(K)
        if HIGH_BITS:                   # 5- and 6-bit codes: a row dequantized, then a float dot product
            row, scratch = np.empty(K, np.float32), np.empty((4, K // 2), np.float32)
            for n in range(r0, r1):
                dequantize_row(w, n, lay, scratch, row, gb)
                s = float32(0.0)
                for i in range(K):
                    s += row[i] * xs[i]
                out[n] = s
            return
        v, a, b = np.empty((DOT_ROWS, gb), np.float32), np.empty(DOT_ROWS, np.float32), np.empty(DOT_ROWS, np.float32)
        for n0 in range(r0, r1, DOT_ROWS):
            dot_rows(w, n0, lay, xs, xsum, v, a, b, out, gb)

    @cpu_kernel
    def panel(w, r0, r1, buf, gb):
        K = buf.shape[1]
        lay, scratch = offsets(K), np.empty((4, K // 2), np.float32)
        for n in range(r0, r1):
            dequantize_row(w, n, lay, scratch, buf[n - r0], gb)

    @cpu_kernel(parallel=True)
    def gemv(w, x, order, out, gb):
        """out[n] = x . W[n] for every row: x [K] staged here, its groups' sums taken (one kernel call a token:
        Python's part of a GEMV was ~50 us, a quarter of a small one's time)."""
        K, n_rows = x.shape[0], w.shape[0]
        xs, H = np.empty(K, np.float32), K // 2
        for i in range(K):
            xs[i] = x[order[i]]
        xsum = np.zeros(max(H // gb, 1), np.float32)                 # (Q8_0: no offsets, unread)
        if not eight:
            for g in range(H // gb):
                for t in range(g * gb, g * gb + gb):
                    xsum[g] += xs[t] + xs[H + t]
        for b in prange((n_rows + ROW_BLOCK - 1) // ROW_BLOCK):
            lo = b * ROW_BLOCK
            dot_task(w, lo, min(n_rows, lo + ROW_BLOCK), xs, xsum, out, gb)
    keyed_cache((gemv, panel), ("float kernels", kind), DEPENDENCIES, CODE_CHOICES)    # once per machine
    return gemv, panel


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
#   dot_rows(w, n0, lay, xs, xsum, v, a, b, out, gb) -> out[n0 + r] = xs . W[n0 + r], r < DOT_ROWS (4- and 8-bit
#       codes): for each group, v[r, t] += a (lo_t x_lo,t + hi_t x_hi,t) over its gb bytes (v: gb running sums a row,
#       added up at the end), and the group's offset once, b' sum(x) (b' = b - a z, xsum the group's sum of x): one
#       FMA a weight and nothing stored.
def _make_q4(kind):
    """4- to 6-bit codes (dot_rows: 4-bit only). scratch [4, K/2]: each byte's factor a, offset b (the zero point
    folded in: a c + b), and the high bits of its low and high code."""
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
    def dot_rows(w, n0, lay, xs, xsum, v, a, b, out, gb):
        H = xs.shape[0] // 2            # (4-bit codes only: make_cpu_kernels dequantizes 5- and 6-bit rows first)
        b[:] = float32(0.0)
        v[:, :] = float32(0.0)
        for g in range(H // gb):
            base = g * gb
            for r in range(DOT_ROWS):
                a[r], br = factors(w, n0 + r, lay[1], g)
                b[r] += (br - a[r] * z) * xsum[g]
            for t in range(gb):
                xl, xh = xs[base + t], xs[H + base + t]
                for r in range(DOT_ROWS):
                    c = float32(w[n0 + r, base + t])
                    hi = np.floor(c * float32(0.0625))
                    lo = c - float32(16.0) * hi
                    v[r, t] += a[r] * (lo * xl + hi * xh)
        for r in range(DOT_ROWS):
            s = b[r]
            for t in range(gb):
                s += v[r, t]
            out[n0 + r] = s
    return dequantize_row, dot_rows


def _make_high_bits(kind):
    """high_bits(wn, h0, H, high_lo, high_hi): bits 4 (and 5) of each byte's two codes (5- and 6-bit codes), as floats
    times 16, from the row's high-bit stream at byte h0."""
    k = blocks.BLOCK_KINDS[kind]
    E = k.bits - 4
    MASK, FIELD = (1 << max(E, 0)) - 1, k.high_bits // 8            # high bits per code, bytes per word's field

    @cpu_kernel(inline="always")
    def high_bits(wn, h0, H, high_lo, high_hi):
        for w in range(H // 8):                 # code word w: one field for its 16 codes (bytes 8 w .. 8 w + 7,
            f = 0                               # columns 16 w + t and 16 w + 8 + t), read once
            for e in range(FIELD):
                f |= int(wn[h0 + FIELD * w + e]) << (8 * e)
            for t in range(8):
                high_lo[8 * w + t] = float32(((f >> (E * t)) & MASK) << 4)
                high_hi[8 * w + t] = float32(((f >> (E * (t + 8))) & MASK) << 4)
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
    def dot_rows(w, n0, lay, xs, xsum, v, a, b, out, gb):
        v[:, :] = float32(0.0)
        for g in range(xs.shape[0] // gb):
            base = g * gb
            for r in range(DOT_ROWS):
                a[r], _ = factors(w, n0 + r, lay[1], g)
            for t in range(gb):
                x = xs[base + t]
                for r in range(DOT_ROWS):
                    c = float32(w[n0 + r, base + t])
                    v[r, t] += a[r] * ((c - float32(256.0) * np.floor(c * float32(1 / 128))) * x)
        for r in range(DOT_ROWS):
            s = float32(0.0)
            for t in range(gb):
                s += v[r, t]
            out[n0 + r] = s
    return dequantize_row, dot_rows


# --------------------------------------------------------------------------------------------------------
# The int8 kernels (ACTIVATIONS = "q8"): x quantized per group, byte dot products (kernels/cpu_dot.py)
# --------------------------------------------------------------------------------------------------------
@cpu_kernel(exact=True, cache=True)
def quantize(x, order, q, dx, qsum):
    """x [K] -> q [K] int8 in `order`, per group g of 32: dx[g] = max|x_g| / 127, q_g = rint(x_g 127 / max|x_g|),
    qsum[g] = sum(q_g). A group holding a NaN or an infinity gets dx = NaN (its rows' sums become NaN, visibly).
    quantize_q8 is the NumPy statement, equal bit for bit (so no fastmath here: a/127 may not become a*(1/127))."""
    for g in range(dx.shape[0]):
        amax, finite = float32(0.0), True
        for t in range(g * Q8_GROUP, g * Q8_GROUP + Q8_GROUP):
            v = abs(x[order[t]])
            finite &= v < np.inf
            amax = max(amax, v)
        inv = float32(127.0) / amax if finite and amax > 0 else float32(0.0)
        s = 0
        for t in range(g * Q8_GROUP, g * Q8_GROUP + Q8_GROUP):
            c = np.int8(np.rint(x[order[t]] * inv)) if finite else np.int8(0)
            q[t] = c
            s += c
        dx[g], qsum[g] = (amax / float32(127.0) if finite else np.nan), s


@functools.lru_cache(maxsize=None)
def q8_kernels(kind):
    """(gemv, gemm, panel) of a kind in Q8_KINDS ((gemv, gemm, None) for 5- and 6-bit codes), all in
    q8_order, on its rows w (uint8, the scale records and high bits read from them) and their codes c (the same
    bytes: int8 for Q8_0, whose dtype picks the codes' unpacking):
    gemv(w, c, x, order, out): out[n] = W[n] . x~ for every row, x~ = dx q the int8 quantization of x (quantize):
        per group, (a dx) (c . q) by dot_acc (int32 sums of byte products, scaled into 8 float lanes) and
        dx qsum (b - a z) once; the lanes added at the row's end. Rows split over Numba's threads, ROW_BLOCK to a
        task, DOT_ROWS together, PREFETCH_ROWS ahead asked for.
    gemm(w, c, x, order, out): out [M, N] = x~ W^T for a chunk x [M, K]: each row's factors once, then TOKENS
        tokens and ROWS rows a dot_rows_tokens call (the tokens padded to a multiple of TOKENS with zeros), except
        a last block of at most FEW_TOKENS tokens: dot_acc a token at a time (41 tokens: 5 blocks and 1, not 6
        blocks; a whole block costs about what 4 single tokens do: SmolLM2's 1536 x 576 matrix, 41 tokens 0.78 ->
        0.71 ms).
    panel(w, c, r0, r1, buf): rows r0 .. r1 - 1 dequantized into buf (x in fp32: ACTIVATIONS), a group a
        dequantize call: one vector FMA.
    Kept compiled on disk under the kind (keyed_cache): a process loads them in ~0.2 s, compiling takes ~15 s."""
    factors, Z = cpu_factors(kind, half), float32(ZERO[kind])

    @cpu_kernel(inline="always")
    def affine(w, n, s0, g):
        """(a, b - a z) of group g of row n, records from byte s0: value = a c + (b - a z)."""
        a, b = factors(w, n, s0, g)
        return a, b - a * Z

    @cpu_kernel
    def panel(w, c, r0, r1, buf):
        K, CB = buf.shape[1], code_bytes(c)
        for n in range(r0, r1):
            for g in range(K // Q8_GROUP):
                a, b = affine(w, n, CB * (K // Q8_GROUP), g)
                dequantize(c[n], CB * g, a, b, buf[n - r0], Q8_GROUP * g)
    bits, offsets = blocks.BLOCK_KINDS[kind].bits, _make_offsets(kind)
    gemv = _make_int8_gemv(affine, offsets, bits)
    gemm = _make_int8_gemm(affine, offsets, bits)
    if bits in (5, 6):                                  # (dequantize takes 4 or 8 bits: the float panels' instead)
        keyed_cache((gemv, gemm), ("int8 kernels", kind), DEPENDENCIES, CODE_CHOICES)
        return gemv, gemm, None
    keyed_cache((gemv, gemm, panel), ("int8 kernels", kind), DEPENDENCIES, CODE_CHOICES)
    return gemv, gemm, panel


@cpu_kernel(inline="always")
def u32(w, n, o):
    """The little-endian 32-bit word at byte o of row n (a high-bit field)."""
    return int(w[n, o]) | int(w[n, o + 1]) << 8 | int(w[n, o + 2]) << 16 | int(w[n, o + 3]) << 24


def _make_int8_gemv(affine, offsets, bits):
    """q8_kernels' gemv for codes of `bits` bits: 4 and 8 (dot_acc), 5 (bit 4 of each from the row's high-bit
    stream: dot_acc_high) or 6 (Q6_K: bits 4, 5 from it, a scale per 16 values and the zero point inside
    dot_acc_q6)."""
    dot_group = _make_dot_group(bits)

    @cpu_kernel(inline="always")
    def group(w, c, n, h0, s0, g, q, qs, d, acc):
        """Group g of row n: acc += (a d) (c . q) (8 lanes) -> d qs (b - a z), the offset's part (a scalar)."""
        if bits == 6:                                   # two 16-value halves, each its scale; no offset
            a0, _ = affine(w, n, s0, 2 * g)
            a1, _ = affine(w, n, s0, 2 * g + 1)
            dot_group(c, n, h0, g, q, Q8_GROUP * g, a0 * d, a1 * d, acc)
            return float32(0.0)
        a, b = affine(w, n, s0, g)
        dot_group(c, n, h0, g, q, Q8_GROUP * g, a * d, float32(0.0), acc)
        return d * float32(qs) * b

    @cpu_kernel
    def task(w, c, r0, r1, q, dx, qsum, out):
        G = dx.shape[0]
        (h0, s0), acc, flat = offsets(G * Q8_GROUP), np.empty((DOT_ROWS, 8), np.float32), w.reshape(-1)
        for n in range(r0, r1, DOT_ROWS):               # DOT_ROWS = 4 rows at a time, each group's q read once
            ahead = min(n + PREFETCH_ROWS, w.shape[0] - DOT_ROWS) * w.shape[1]
            for o in range(ahead, ahead + DOT_ROWS * w.shape[1], 64):
                prefetch(flat, o)
            acc[:, :] = float32(0.0)
            y0 = y1 = y2 = y3 = float32(0.0)
            for g in range(G):
                qs, d = qsum[g], dx[g]
                y0 += group(w, c, n, h0, s0, g, q, qs, d, acc[0])
                y1 += group(w, c, n + 1, h0, s0, g, q, qs, d, acc[1])
                y2 += group(w, c, n + 2, h0, s0, g, q, qs, d, acc[2])
                y3 += group(w, c, n + 3, h0, s0, g, q, qs, d, acc[3])
            out[n], out[n + 1], out[n + 2], out[n + 3] = y0 + acc[0].sum(), y1 + acc[1].sum(), y2 + acc[2].sum(), \
                y3 + acc[3].sum()

    @cpu_kernel(parallel=True)
    def gemv(w, c, x, order, out):
        K, n_rows = x.shape[0], w.shape[0]
        q, dx, qsum = np.empty(K, np.int8), np.empty(K // Q8_GROUP, np.float32), np.empty(K // Q8_GROUP, np.int32)
        quantize(x, order, q, dx, qsum)
        for b in prange((n_rows + ROW_BLOCK - 1) // ROW_BLOCK):
            lo = b * ROW_BLOCK
            task(w, c, lo, min(n_rows, lo + ROW_BLOCK), q, dx, qsum, out)
    return gemv


def _make_dot_group(bits):
    """dot_group(c, n, h0, g, q, j, s0, s1, lanes): lanes += group g of row n of the codes c (uint8 or int8 rows, the
    high-bit stream at byte h0) . q[j : j+32], scaled by s0 (Q6_K: s0 its first 16 values, s1 the other 16), by
    the dot products for `bits`-bit codes: the GEMV's step, and the GEMM's for its last few tokens."""
    @cpu_kernel(inline="always")
    def dot_group(c, n, h0, g, q, j, s0, s1, lanes):
        CB = code_bytes(c)
        if bits == 6:                                   # each code word its 32-bit field
            dot_acc_q6(c[n], CB * g, u32(c, n, h0 + 8 * g), u32(c, n, h0 + 8 * g + 4), q, j, s0, s1, lanes)
        elif bits == 5:                                 # the group's two 16-bit fields, as one 32-bit one
            dot_acc_high(c[n], CB * g, u32(c, n, h0 + 4 * g), q, j, s0, lanes)
        else:
            dot_acc(c[n], CB * g, q, j, s0, lanes)
    return dot_group


def _make_int8_gemm(affine, offsets, bits):
    """q8_kernels' gemm for codes of `bits` bits: 4 and 8, 5 (bit 4 of each from the rows' high-bit stream:
    dot_rows_tokens_high, dot_acc_high) or 6 (Q6_K: a scale per 16 values, the zero point inside the dot products:
    dot_rows_tokens_q6, dot_acc_q6)."""
    H, dot_group = (2 if bits == 6 else 1), _make_dot_group(bits)     # H: scales a row keeps per group of 32

    @cpu_kernel
    def task(w, c, r0, r1, q, dxT, dxqT, out):
        G, Mp = dxT.shape
        K, M = G * Q8_GROUP, out.shape[0]
        h0, s0 = offsets(K)
        A, y = np.empty((ROWS, H * G), np.float32), np.empty((ROWS, Mp), np.float32)
        acc = np.empty(ROWS * TOKENS * 8, np.float32)
        lanes = acc.reshape(ROWS, TOKENS, 8)            # row r's token t: lanes[r, t] = acc[(r TOKENS + t) 8 : +8]
        for n in range(r0, r1, ROWS):                   # (the rows are padded to a multiple of DOT_ROWS)
            y[:, :] = float32(0.0)
            for r in range(ROWS):
                for g in range(H * G):                  # the row's factors, and its offsets' part for every token
                    a, b = affine(w, n + r, s0, g)
                    A[r, g] = a
                    if H == 1:                          # (Q6_K: no offset; its zero point is in the dot products)
                        for m in range(Mp):
                            y[r, m] += b * dxqT[g, m]
            for m0 in range(0, Mp, TOKENS):
                u = min(TOKENS, M - m0)
                if u > FEW_TOKENS:                      # TOKENS tokens a call: the group's codes unpacked once
                    if bits == 6:                                                   # (sets every lane)
                        dot_rows_tokens_q6(c, n, h0, q, m0 * K, K, A, dxT, m0, acc)
                    elif bits == 5:
                        dot_rows_tokens_high(c, n, h0, q, m0 * K, K, A, dxT, m0, acc)
                    else:
                        dot_rows_tokens(c, n, q, m0 * K, K, A, dxT, m0, acc)
                else:                                   # the last few: a token at a time, no work for the padding
                    acc[:] = float32(0.0)
                    for r in range(ROWS):
                        for t in range(u):
                            for g in range(G):
                                s = dxT[g, m0 + t]
                                dot_group(c, n + r, h0, g, q, (m0 + t) * K + Q8_GROUP * g, A[r, H * g] * s,
                                          A[r, H * g + H - 1] * s, lanes[r, t])
                for r in range(ROWS):
                    for t in range(u):
                        out[m0 + t, n + r] = y[r, m0 + t] + lanes[r, t].sum()

    @cpu_kernel(parallel=True)
    def gemm(w, c, x, order, out):
        (M, K), n_rows = x.shape, w.shape[0]
        G, Mp = K // Q8_GROUP, (M + TOKENS - 1) // TOKENS * TOKENS
        q, dx, qsum = np.zeros(Mp * K, np.int8), np.zeros((Mp, G), np.float32), np.zeros((Mp, G), np.int32)
        for m in range(M):
            quantize(x[m], order, q[m * K:(m + 1) * K], dx[m], qsum[m])
        dxT, dxqT = np.ascontiguousarray(dx.T), np.ascontiguousarray((dx * qsum).T)       # [G, Mp]
        for b in prange((n_rows + ROW_BLOCK - 1) // ROW_BLOCK):
            lo = b * ROW_BLOCK
            task(w, c, lo, min(n_rows, lo + ROW_BLOCK), q, dxT, dxqT, out)
    return gemm


# What the CPU kernels' disk cache depends on besides this file: the files whose code they compile in (the dot
# products, the scale records, the compile policy, the layout) and the dot products' choice of code.
DEPENDENCIES = (cpu_dot.__file__, blocks_kernels.__file__, common.__file__, blocks.__file__)
CODE_CHOICES = (("vnni", cpu_dot.VNNI),)
stamp_cache((quantize,), DEPENDENCIES, CODE_CHOICES)
