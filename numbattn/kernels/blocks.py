"""Weights in registers: reading a row of weight words (bf16, fp16, fp32, or GGUF blocks) one word at a time.

The layout is numbattn/blocks.py's (its docstring draws it; its `dequantize` is the NumPy statement every function
here is tested against): row n of a matrix is a run of uint64 words, [code words | high bits | scale records],
and code word i holds the VPW consecutive values VPW*i .. VPW*i + VPW-1 of the row. One group's factor a and offset
b serve a whole word, so a kernel turns a word into VPW small numbers and two floats:

    a, b = unpack(w, n, i, word, h0, s0, vals)      vals[j] = c_j - z (exact), value_j = a * vals[j] + b

and a dot product with x costs one FMA per value plus two per word: a * sum_j vals[j] x_j + b * sum_j x_j (b is
zero, and the second sum is skipped, for kinds whose offset is a whole number of steps: z below).

    make_unpack(kind)          the function above for one kind (float kinds: a = 1, b = 0, vals the values)
    make_factors(kind, ...)    (a, b) of group g from its block's scale record: the record's arithmetic (fp16 d and
                               m, Q4_K's 6-bit scales, Q6_K's int8 ones), written once and compiled twice, for the
                               GPU (reading 8-byte words) and for the CPU kernels (numbattn/cpu_linear.py, bytes)
    code_value(c, z)           the float c - z of a small integer code c: its bits put under the exponent of 2^23
                               (0x4B000000 | c is the float 2^23 + c) and 2^23 + z subtracted: one logic op and
                               one add, exact, instead of an int-to-float conversion (quarter rate on an H100)

Zero points z: a code's value is a * (c - z) + b. Q4_0 stores d * (c - 8), Q5_0 d * (c - 16), Q6_K d * sc * (c - 32),
Q8_0 d * c with c an int8 (its top bit flipped, c + 128 is an unsigned byte: z = 128): for these b = 0 and the
sum of x is never needed. Q4_1 and Q5_1 (d * c + m) and the K-quants with a min (d*sc * c - dmin*m) have b.
"""
import functools

from numba import cuda, float32, int32, uint32, uint64

from ..blocks import BLOCK_KINDS, FLOAT_KINDS, values_per_word
from .common import cpu_kernel, device, f32_from_bits, f32_from_half_bits, make_weight_unpack

ZERO = {"q8_0": 128, "q4_0": 8, "q4_1": 0, "q5_0": 16, "q5_1": 0, "q4_k": 0, "q5_k": 0, "q6_k": 32}
AFFINE = ("q4_1", "q5_1", "q4_k", "q5_k")      # kinds with an offset b (a sum of x per word)
TWO23 = float32(8388608.0)


def has_offset(kind):
    return kind in AFFINE


@device
def code_value(c, z):
    """c - z as float32, for a code 0 <= c < 2^23: 0x4B000000 | c is the float 2^23 + c."""
    return f32_from_bits(uint32(0x4B000000) | uint32(c)) - (TWO23 + float32(z))


# --------------------------------------------------------------------------------------------------------
# The scale records: (a, b) of a group, written once for both targets
# --------------------------------------------------------------------------------------------------------
def make_factors(kind, u16, byte, half, jit):
    """factors(w, n, s0, g) -> (a, b) of group g of row n, whose records start at byte s0 of the row; u16(w, n, o)
    and byte(w, n, o) read the row's bytes, half(bits) widens fp16 bits; jit compiles (cuda device or njit)."""
    k = BLOCK_KINDS[kind]
    R = k.record

    if kind in ("q8_0", "q4_0", "q5_0"):                     # record: d
        def factors(w, n, s0, g):
            return half(u16(w, n, s0 + R * g)), float32(0.0)
    elif kind in ("q4_1", "q5_1"):                           # record: d, m
        def factors(w, n, s0, g):
            o = s0 + R * g
            return half(u16(w, n, o)), half(u16(w, n, o + 2))
    elif kind in ("q4_k", "q5_k"):                           # record: d, dmin, 12 bytes of 6-bit sc and m
        def factors(w, n, s0, g):
            o, j = s0 + R * (g >> 3), g & 7
            if j < 4:
                sc = byte(w, n, o + 4 + j) & 63
                m = byte(w, n, o + 8 + j) & 63
            else:
                sc = (byte(w, n, o + 8 + j) & 15) | ((byte(w, n, o + j) >> 6) << 4)
                m = (byte(w, n, o + 8 + j) >> 4) | ((byte(w, n, o + 4 + j) >> 6) << 4)
            return half(u16(w, n, o)) * float32(sc), -half(u16(w, n, o + 2)) * float32(m)
    elif kind == "q6_k":                                     # record: 16 int8 sc, d
        def factors(w, n, s0, g):
            o = s0 + R * (g >> 4)
            sc = int32(byte(w, n, o + (g & 15)) ^ 0x80) - 128          # the int8 of the byte
            return half(u16(w, n, o + 16)) * float32(sc), float32(0.0)
    else:
        raise ValueError(f"no scale record for {kind!r}")
    return jit(factors)


@device
def _word_u16(w, n, o):
    """The 16 bits at even byte offset o of row n of a uint64 array (a field never straddles two words)."""
    return uint32(w[n, o >> 3] >> uint64((o & 7) << 3)) & uint32(0xFFFF)


@device
def _word_byte(w, n, o):
    return uint32(w[n, o >> 3] >> uint64((o & 7) << 3)) & uint32(0xFF)


@device
def _half(bits):
    return f32_from_half_bits(bits)


@functools.lru_cache(maxsize=None)
def gpu_factors(kind):
    return make_factors(kind, _word_u16, _word_byte, _half, cuda.jit(device=True, inline=True))


@functools.lru_cache(maxsize=None)
def cpu_factors(kind, half):
    """The CPU kernels' factors: rows as uint8 arrays, `half` an njit function of the 16 bits."""
    @cpu_kernel(inline="always")
    def u16(w, n, o):
        return uint32(w[n, o]) | (uint32(w[n, o + 1]) << uint32(8))

    @cpu_kernel(inline="always")
    def byte(w, n, o):
        return uint32(w[n, o])
    return make_factors(kind, u16, byte, half, cpu_kernel(inline="always"))


def make_row_offsets(kind):
    """offsets(n_in) -> (code words, first high-bit word, first record byte) of a row: numbattn.blocks.row_layout
    on the device, for kernels that learn n_in from their arguments."""
    VPW = values_per_word(kind)
    HB = 0 if kind in FLOAT_KINDS else BLOCK_KINDS[kind].high_bits

    @device
    def offsets(n_in):
        n_code = n_in // VPW
        return n_code, n_code, 8 * (n_code + (n_code * HB + 63) // 64)
    return offsets


# --------------------------------------------------------------------------------------------------------
# The code words (GPU): one 8-byte word -> VPW values
# --------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def make_unpack(kind):
    """unpack(w, n, i, word, h0, s0, vals) -> (a, b): word = w[n, i] (loaded by the caller, so that a chunk of
    loads is in flight together), h0 / s0 the word index of the row's high bits / byte offset of its records."""
    if kind in FLOAT_KINDS:
        widen = make_weight_unpack(kind)

        @device
        def unpack_float(w, n, i, word, h0, s0, vals):
            widen(word, vals)
            return float32(1.0), float32(0.0)
        return unpack_float
    k = BLOCK_KINDS[kind]
    codes = make_codes(kind)
    factors = gpu_factors(kind)
    WORDS_PER_GROUP = k.group // k.vpw

    @device
    def unpack(w, n, i, word, h0, s0, vals):
        codes(w, n, i, word, h0, vals)
        return factors(w, n, s0, i // WORDS_PER_GROUP)
    return unpack


@functools.lru_cache(maxsize=None)
def make_codes(kind):
    """codes(w, n, i, word, h0, vals): vals[j] = c_j - z for the VPW codes of code word i (module docstring)."""
    k = BLOCK_KINDS[kind]
    z = ZERO[kind]
    if k.bits == 8:
        @device
        def codes8(w, n, i, word, h0, vals):
            flipped = word ^ uint64(0x8080808080808080)      # int8 c -> the unsigned byte c + 128
            for j in range(8):
                vals[j] = code_value(uint32(flipped >> uint64(8 * j)) & uint32(0xFF), z)
        return codes8
    E = k.bits - 4                                           # high bits per code (0, 1 or 2)
    HB, MASK = k.high_bits, (1 << E) - 1                     # bits of a word's high-bit field
    FIELDS = 64 // max(HB, 1)                                # high-bit fields per 8-byte word

    @device
    def codes4(w, n, i, word, h0, vals):
        high = uint32(0)
        if E:
            f = uint32(w[n, h0 + i // FIELDS] >> uint64((i % FIELDS) * HB))
            high = f if E == 2 else f & uint32(0xFFFF)
        for j in range(8):                                   # byte j: value j (low nibble), value j + 8 (high)
            b = uint32(word >> uint64(8 * j))
            lo, hi = b & uint32(15), (b >> uint32(4)) & uint32(15)
            if E:
                lo |= ((high >> uint32(E * j)) & uint32(MASK)) << uint32(4)
                hi |= ((high >> uint32(E * (j + 8))) & uint32(MASK)) << uint32(4)
            vals[j] = code_value(lo, z)
            vals[j + 8] = code_value(hi, z)
    return codes4
