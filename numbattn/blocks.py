"""GGUF's quantized blocks as numbattn keeps them: one layout for the GPU's kernels and the CPU's, in NumPy.

What you will learn here
------------------------
A GGUF file (llama.cpp's) stores a weight matrix row by row, each row cut into blocks of 32 values (Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1) or super-blocks of 256 (the K-quants). A block holds a few fp16 scales and one small integer
code per value; the value is an affine function of its code, with the factor a and offset b of its group:

    Q8_0   block 32: d (fp16), 32 int8 codes                 w = d * c                     8.5 bits per weight
    Q4_0   block 32: d, 32 4-bit codes                        w = d * (c - 8)               4.5
    Q4_1   block 32: d, m, 32 4-bit codes                     w = d * c + m                 5
    Q5_0   block 32: d, 32 5-bit codes                        w = d * (c - 16)              5.5
    Q5_1   block 32: d, m, 32 5-bit codes                     w = d * c + m                 6
    Q4_K   256: d, dmin, 8 x (6-bit sc, 6-bit m), 4-bit c     w = d*sc_g * c - dmin*m_g     4.5  (group g: 32 values)
    Q5_K   256: as Q4_K with 5-bit codes                      w = d*sc_g * c - dmin*m_g     5.5
    Q6_K   256: d, 16 int8 sc, 6-bit codes                    w = d*sc_g * (c - 32)         6.56 (group g: 16 values)

Decode reads every weight once per token, so its time is bytes / bandwidth: a Q4_K matrix is 3.6x fewer bytes
than bf16, 7.1x fewer than the fp32 it used to be dequantized into. Keeping the blocks and dequantizing inside the
matmul (in registers, where a value is used) is how llama.cpp runs them, and what numbattn's kernels do.

The layout we keep them in. GGUF interleaves a block's fields (Q8_0: 2 bytes of d, 32 bytes of codes: 34-byte
blocks, so most 8-byte loads would straddle two blocks) and orders codes for its own SIMD code (Q4_K's byte l of
a 64-value group holds value l in its low nibble and value l + 32 in its high one). Each row is stored instead as
three streams of 8-byte words, the same bits in the same number of bytes (plus a few bytes to round the row to a
word), ordered so that one word is one group's run of consecutive values:

    row n:  | code words: word i holds values VPW*i .. VPW*i + VPW-1 | high bits | scale records, as GGUF's bytes |

    code word, 4-bit codes (VPW = 16):   byte t = c[16i + t] | c[16i + 8 + t] << 4        (t = 0 .. 7)
    code word, 8-bit codes (VPW = 8):    byte t = c[8i + t]  (int8)
    high bits (5- and 6-bit codes): 16 or 32 bits per code word: bit t (5-bit) or bits 2t, 2t+1 (6-bit) are bit 4
        (and 5) of c[16i + t]; a 16-bit (32-bit) field per code word, 4 (2) to an 8-byte word
    scale records: each block's scale bytes exactly as GGUF stores them (Q8_0: d; Q4_1: d, m; Q4_K: d, dmin,
        12 bytes of packed 6-bit sc and m; Q6_K: 16 int8 sc, d): every fp16 field at an even offset, so none
        straddles two words

So a kernel that reads code word i knows its group (one scale factor a and offset b for all its values), finds
the group's record with one division, and computes its VPW values as a * c + b, or better, for a dot product with
x, a * sum(c x) + b * sum(x): one multiply per value. `dequantize` below is that statement in NumPy (the oracle
the GPU kernels, numbattn/kernels/blocks.py, and the CPU ones, numbattn/cpu_linear.py, are tested against), and
`pack` turns GGUF's bytes into it; tests/test_blocks.py checks dequantize(pack(b)) == gguf.quants.dequantize(b).

Float matrices use the same row-of-words form (VPW values per 8-byte word, no scales): "bf16" (4 per word, the
checkpoint's bits), "f16" (4), "f32" (2).
"""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockKind:
    """A GGUF block type as numbattn keeps it (see the module docstring)."""
    name: str           # numbattn's kind: "q4_k"
    ggml: str           # GGUF's type name: "Q4_K"
    block: int          # values per block (32) or super-block (256)
    group: int          # values sharing one factor a and offset b
    bits: int           # bits per code: 4, 5, 6 or 8
    type_size: int      # bytes per block in the file
    record: int         # bytes per block in the scale stream (GGUF's scale fields, verbatim)

    @property
    def vpw(self):
        """Values per code word."""
        return 8 if self.bits == 8 else 16

    @property
    def high_bits(self):
        """Bits of the high-bit stream per code word (0: none)."""
        return 16 * (self.bits - 4) if self.bits in (5, 6) else 0


BLOCK_KINDS = {k.name: k for k in (
    BlockKind("q8_0", "Q8_0", 32, 32, 8, 34, 2),
    BlockKind("q4_0", "Q4_0", 32, 32, 4, 18, 2),
    BlockKind("q4_1", "Q4_1", 32, 32, 4, 20, 4),
    BlockKind("q5_0", "Q5_0", 32, 32, 5, 22, 2),
    BlockKind("q5_1", "Q5_1", 32, 32, 5, 24, 4),
    BlockKind("q4_k", "Q4_K", 256, 32, 4, 144, 16),
    BlockKind("q5_k", "Q5_K", 256, 32, 5, 176, 16),
    BlockKind("q6_k", "Q6_K", 256, 16, 6, 210, 18),
)}
FLOAT_KINDS = {"bf16": 4, "f16": 4, "f32": 2}          # values per 8-byte word
KIND_OF_GGML = {k.ggml: k.name for k in BLOCK_KINDS.values()} | {"BF16": "bf16", "F16": "f16", "F32": "f32"}


def values_per_word(kind):
    return FLOAT_KINDS[kind] if kind in FLOAT_KINDS else BLOCK_KINDS[kind].vpw


def row_layout(kind, n_in):
    """-> (code words, high-bit words, scale words) of one row of n_in values: the three streams' lengths."""
    if kind in FLOAT_KINDS:
        return n_in // FLOAT_KINDS[kind], 0, 0
    k = BLOCK_KINDS[kind]
    n_words = n_in // k.vpw
    return n_words, -(-n_words * k.high_bits // 64), -(-(n_in // k.block) * k.record // 8)


def row_words(kind, n_in):
    return sum(row_layout(kind, n_in))


def row_step(kind):
    """A row's length must be a multiple of this: a word's values (float kinds) or a block's."""
    return FLOAT_KINDS[kind] if kind in FLOAT_KINDS else BLOCK_KINDS[kind].block


def check_row_length(kind, n_in):
    step = row_step(kind)
    if n_in % step:
        raise ValueError(f"a {kind} row of {n_in} values: the length must be a multiple of {step}")


def bytes_per_weight(kind, n_in):
    """Bytes read per weight of a row of n_in values stored as `kind` (the row's padding included)."""
    return row_words(kind, n_in) * 8 / n_in


# --------------------------------------------------------------------------------------------------------
# GGUF's bytes -> codes and scale records (the file's layout, written once as NumPy)
# --------------------------------------------------------------------------------------------------------
def _nibbles(qs):
    """[..., n] bytes -> [..., 2, n]: low nibbles, then high nibbles."""
    return np.stack([qs & 0xF, qs >> 4], axis=-2)


def gguf_codes(kind, blocks):
    """A kind's GGUF blocks [..., n_blocks, type_size] uint8 -> (codes [..., n_blocks, block] uint8 in value order,
    records [..., n_blocks, record] uint8): llama.cpp's dequantize_row_* read as integers (ggml-quants.c)."""
    k = BLOCK_KINDS[kind]
    lead = blocks.shape[:-1]
    if kind == "q8_0":                                           # d, qs[32] (int8)
        return blocks[..., 2:], blocks[..., :2]
    if kind in ("q4_0", "q4_1"):                                 # d, [m,] qs[16]: byte j = c[j] | c[j + 16] << 4
        r = k.record
        return _nibbles(blocks[..., r:]).reshape(*lead, 32), blocks[..., :r]
    if kind in ("q5_0", "q5_1"):                                 # d, [m,] qh (u32: bit j of c[j]), qs[16]
        r = k.record
        high = np.unpackbits(blocks[..., r:r + 4], axis=-1, bitorder="little")     # [..., 32]
        return _nibbles(blocks[..., r + 4:]).reshape(*lead, 32) | (high << 4), blocks[..., :r]
    if kind in ("q4_k", "q5_k"):       # d, dmin, scales[12], [qh[32],] qs[128]: group 2j low nibbles, 2j+1 high
        qs = blocks[..., -128:].reshape(*lead, 4, 32)
        codes = _nibbles(qs).reshape(*lead, 256)                 # [group pair j][low, high][l]
        if kind == "q5_k":             # qh[l] bit 2j: value 64j + l, bit 2j + 1: value 64j + 32 + l
            qh = np.unpackbits(blocks[..., 16:48], axis=-1, bitorder="little").reshape(*lead, 32, 8)
            codes = codes | (qh.swapaxes(-1, -2).reshape(*lead, 256) << 4)
        return codes, blocks[..., :16]
    if kind == "q6_k":                 # ql[128], qh[64], scales[16] (int8), d
        ql = blocks[..., :128].reshape(*lead, 2, 2, 32)          # [half n][ql[l], ql[l + 32]][l]
        qh = blocks[..., 128:192].reshape(*lead, 2, 1, 32)       # [half n][qh[l]]
        low = _nibbles(ql).swapaxes(-2, -3)                      # [n][nibble][l or l + 32][l]: values 32 * (2 nib + s)
        high = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-2).reshape(*lead, 2, 2, 2, 32)
        return (low | (high << 4)).reshape(*lead, 256), blocks[..., 192:]
    raise ValueError(f"no block layout for {kind!r}")


def group_factors(kind, records):
    """Scale records [..., n_blocks, record] -> (a, b) [..., n_blocks, block / group] float32: each group's
    factor and offset, w = a * c + b."""
    k = BLOCK_KINDS[kind]
    half = records.view(np.float16).astype(np.float32) if k.record % 2 == 0 else None     # (fp16 fields)
    if kind in ("q8_0", "q4_0", "q5_0"):
        d = half[..., :1]
        return d, d * {"q8_0": 0, "q4_0": -8, "q5_0": -16}[kind]
    if kind in ("q4_1", "q5_1"):
        return half[..., :1], half[..., 1:2]
    if kind in ("q4_k", "q5_k"):
        sc, m = k4_scales(records[..., 4:16])
        return half[..., :1] * sc, -half[..., 1:2] * m
    if kind == "q6_k":
        a = half[..., 8:9] * records[..., :16].view(np.int8).astype(np.float32)
        return a, -32 * a
    raise ValueError(f"no block layout for {kind!r}")


def k4_scales(q):
    """Q4_K's and Q5_K's 12 bytes -> (sc, m) [..., 8] float32, 6 bits each: groups 0-3 in the low 6 bits of bytes
    0-3 and 4-7, groups 4-7 split: low 4 bits in bytes 8-11, top 2 bits in the spare top bits of bytes 0-7
    (llama.cpp's get_scale_min_k4)."""
    q = q.astype(np.int32)
    sc = np.concatenate([q[..., 0:4] & 63, (q[..., 8:12] & 0xF) | ((q[..., 0:4] >> 6) << 4)], axis=-1)
    m = np.concatenate([q[..., 4:8] & 63, (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), m.astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# Our layout: pack (from GGUF's bytes) and dequantize (the statement the kernels are tested against)
# --------------------------------------------------------------------------------------------------------
def pack(kind, blocks, n_in):
    """GGUF rows of blocks [N, n_in / block * type_size] uint8 -> our rows of words [N, row_words] uint64."""
    k = BLOCK_KINDS[kind]
    check_row_length(kind, n_in)
    n = blocks.shape[0]
    if blocks.shape[1] != n_in // k.block * k.type_size:
        raise ValueError(f"{kind} rows of {n_in} values take {n_in // k.block * k.type_size} bytes, not "
                         f"{blocks.shape[1]}")
    codes, records = gguf_codes(kind, np.asarray(blocks).reshape(n, n_in // k.block, k.type_size))
    codes = codes.reshape(n, n_in // k.vpw, k.vpw)
    if k.bits == 8:
        words = codes
    else:                                       # byte t = c[t] | c[t + 8] << 4 (the low 4 bits of each)
        words = (codes[..., :8] & 0xF) | ((codes[..., 8:] & 0xF) << 4)
    streams = [words.reshape(n, -1)]
    if k.high_bits:                             # bits 4 (and 5) of the 16 codes: one 16- or 32-bit field per word
        top = (codes >> 4).astype(np.uint32)
        fields = (top << (np.arange(16, dtype=np.uint32) * (k.bits - 4))).sum(axis=-1, dtype=np.uint32)
        streams.append(fields.astype(np.uint16 if k.bits == 5 else np.uint32).view(np.uint8).reshape(n, -1))
    streams.append(records.reshape(n, -1))
    return np.concatenate([_pad_to_words(s) for s in streams], axis=1).view(np.uint64)


def _pad_to_words(stream):
    pad = -stream.shape[1] % 8
    return np.pad(stream, ((0, 0), (0, pad))) if pad else stream


def codes_of(kind, words, n_in):
    """Our rows of words [N, row_words] -> (codes [N, n_in] int32, records [N, n_blocks, record] uint8)."""
    k = BLOCK_KINDS[kind]
    n = words.shape[0]
    n_code, n_high, _ = row_layout(kind, n_in)
    raw = np.ascontiguousarray(words).view(np.uint8).reshape(n, -1)
    code_bytes = raw[:, :8 * n_code].reshape(n, n_code, 8)
    if k.bits == 8:
        codes = code_bytes.view(np.int8).astype(np.int32)
    else:
        codes = np.concatenate([code_bytes & 0xF, code_bytes >> 4], axis=-1).astype(np.int32)
    if k.high_bits:
        fields = raw[:, 8 * n_code:8 * (n_code + n_high)].view(np.uint16 if k.bits == 5 else np.uint32)
        fields = fields[:, :n_code].astype(np.int64)[..., None]
        codes |= (((fields >> (np.arange(16) * (k.bits - 4))) & ((1 << (k.bits - 4)) - 1)) << 4).astype(np.int32)
    return codes.reshape(n, n_in), records_of(kind, words, n_in)


def records_of(kind, words, n_in):
    """Our rows of words [N, row_words] -> their scale records [N, n_blocks, record] uint8 (a view where it can)."""
    k = BLOCK_KINDS[kind]
    n_code, n_high, _ = row_layout(kind, n_in)
    raw = np.ascontiguousarray(words).view(np.uint8).reshape(words.shape[0], -1)
    start, n_blocks = 8 * (n_code + n_high), n_in // k.block
    return raw[:, start:start + n_blocks * k.record].reshape(words.shape[0], n_blocks, k.record)


def dequantize(kind, words, n_in):
    """Our rows of words [N, row_words] -> float32 [N, n_in]: w = a * c + b, with each group's a and b from its
    block's scale record. The NumPy statement of the layout, vectorised."""
    if kind in FLOAT_KINDS:
        return float_words(kind, words)
    k = BLOCK_KINDS[kind]
    codes, records = codes_of(kind, words, n_in)
    a, b = group_factors(kind, records)                              # [N, n_blocks, groups per block]
    n = words.shape[0]
    c = codes.reshape(n, n_in // k.block, k.block // k.group, k.group).astype(np.float32)
    return (a[..., None] * c + b[..., None]).reshape(n, n_in)


def float_words(kind, words):
    """bf16, f16 or f32 words [N, W] -> float32 [N, W * VPW]."""
    words = np.ascontiguousarray(words)
    if kind == "bf16":
        return (words.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return words.view(np.float16 if kind == "f16" else np.float32).astype(np.float32)


def finite_scales(kind, words, n_in):
    """Whether every fp16 field of the scale records is finite (then every value a * c + b is)."""
    k = BLOCK_KINDS[kind]
    records = records_of(kind, words, n_in)                # (not the codes: unpacking them took most of a load)
    fields = {"q6_k": records[..., 16:18], "q4_k": records[..., :4], "q5_k": records[..., :4]}.get(kind, records)
    return bool(np.isfinite(np.ascontiguousarray(fields).view(np.float16)).all()) if k.record else True
