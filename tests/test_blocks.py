"""numbattn/blocks.py: GGUF's quantized blocks in numbattn's layout. pack() must keep every value (its NumPy statement,
dequantize(), equals gguf.quants.dequantize bit for bit on the file's blocks) in the file's bytes (a row rounded up
to a word); bad rows and non-finite scales are refused. The blocks are quantized by gguf where it can, else by the
writer's own K-quant quantizers (tests/gguf_files.py), and random bytes cover every bit pattern of the codes and
the packed 6-bit scales.
"""
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from gguf_files import K_QUANTIZERS, random_blocks

from numbattn import blocks as B

KINDS = list(B.BLOCK_KINDS)


def file_blocks(rng, kind, n_rows, n_in, random=False):
    """Rows of blocks as a GGUF file holds them: quantized from normal values, or random bytes."""
    ggml = B.BLOCK_KINDS[kind].ggml
    if random:
        return random_blocks(rng, ggml, n_rows, n_in)
    x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
    return K_QUANTIZERS[ggml](x) if ggml in K_QUANTIZERS else quantize(x, GGMLQuantizationType[ggml])


QUANTIZABLE = [k for k in KINDS if k != "q5_k"]          # (neither gguf nor tests/gguf_files.py quantizes to Q5_K)


@pytest.mark.parametrize("kind,random", [(k, False) for k in QUANTIZABLE] + [(k, True) for k in KINDS])
def test_the_layout_keeps_every_value_in_the_files_bytes(kind, random):
    """Three blocks per row (a row that is not a whole number of words for most kinds), 5 rows."""
    k = B.BLOCK_KINDS[kind]
    rng = np.random.default_rng(len(kind) + random)
    n_in = 3 * k.block
    raw = file_blocks(rng, kind, 5, n_in, random=random)
    words = B.pack(kind, raw, n_in)
    assert words.dtype == np.uint64 and words.shape == (5, B.row_words(kind, n_in))
    assert raw.shape[1] <= words.shape[1] * 8 < raw.shape[1] + 3 * 8         # the file's bytes, rounded per stream
    got = B.dequantize(kind, words, n_in)
    want = dequantize(raw, GGMLQuantizationType[k.ggml])
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert B.finite_scales(kind, words, n_in)


def test_a_word_is_one_groups_run_of_consecutive_values():
    """Q4_K as drawn in the module docstring: code word i holds values 16 i .. 16 i + 15, byte t the values t (low
    nibble) and t + 8 (high); the scale records are the blocks' first 16 bytes."""
    rng = np.random.default_rng(3)
    raw = file_blocks(rng, "q4_k", 2, 256, random=True)
    words = B.pack("q4_k", raw, 256)
    codes, records = B.codes_of("q4_k", words, 256)
    byte = words.view(np.uint8)[:, 8 * 5 + 3]                    # row's code word 5, byte 3
    assert np.array_equal(byte & 0xF, codes[:, 16 * 5 + 3]) and np.array_equal(byte >> 4, codes[:, 16 * 5 + 11])
    assert np.array_equal(records[:, 0], raw[:, :16])
    low = raw[:, 16 + 32 + 3] & 0xF                              # GGUF: group pair 1, byte 3, low nibble = value 67
    assert np.array_equal(codes[:, 67], low)


@pytest.mark.parametrize("kind,n_in", [("q8_0", 40), ("q4_k", 128)])
def test_rows_that_are_not_whole_blocks_are_refused(kind, n_in):
    with pytest.raises(ValueError, match="multiple of"):
        B.pack(kind, np.zeros((2, 64), np.uint8), n_in)
    with pytest.raises(ValueError, match="take"):
        B.pack("q8_0", np.zeros((2, 33), np.uint8), 32)


@pytest.mark.parametrize("kind", ["q8_0", "q4_1", "q4_k", "q6_k"])
def test_a_non_finite_scale_is_found(kind):
    k = B.BLOCK_KINDS[kind]
    rng = np.random.default_rng(4)
    raw = file_blocks(rng, kind, 3, k.block, random=True)
    d = {"q6_k": 208}.get(kind, 0)                               # where the block's d sits
    raw[1, d:d + 2] = np.array([np.inf], np.float16).view(np.uint8)
    assert not B.finite_scales(kind, B.pack(kind, raw, k.block), k.block)


def test_bytes_per_weight_are_the_formats():
    assert [B.bytes_per_weight(k, 4096) * 8 for k in ("q8_0", "q4_0", "q4_k", "q6_k", "bf16", "f32")] == \
        [8.5, 4.5, 4.5, 6.5625, 16, 32]
