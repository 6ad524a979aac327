"""GGUF, llama.cpp's one-file model format, read with the `gguf` package and presented as a Hugging Face checkpoint.

    ckpt = GGUFCheckpoint("SmolLM2-135M-Instruct.Q4_1.gguf")
    ckpt.config                                               # LlamaConfig, from the metadata
    ckpt.shapes["model.layers.0.self_attn.q_proj.weight"]     # (576, 576): HF names, HF layout [out, in]
    ckpt.get("model.layers.0.self_attn.q_proj.weight")        # float32, dequantized, rows in HF order
    ckpt.stored_dtype("model.layers.0.self_attn.q_proj.weight")   # "Q4_1"
    tok = Tokenizer.from_gguf(ckpt)                           # tinyllm/tokenizer.py, from tokenizer.ggml.*

A GGUF file is plain data, like safetensors: a header, then tensor bytes. Nothing in it is executed (unlike a
pickle). The layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian:

    "GGUF", version (u32: 2 or 3), tensor count (u64), metadata count (u64)
    metadata      key (u64 length + UTF-8), value type (u32), value: a number, a bool, a string, or an array
                  (item type u32, count u64, items). e.g. llama.block_count = 30, tokenizer.ggml.tokens = [...]
    tensor infos  name, n_dims (u32), dims (u64 each, innermost first), ggml type (u32), offset (u64)
    padding       up to general.alignment (32 by default)
    data          tensor i's bytes start at data + offset_i

Dims are innermost first, so a linear layer that Hugging Face stores [out, in] is ne = [in, out] here: the
same bytes, rows of `in` values. A quantized type cuts every row into blocks of 32 values (Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0) or 256 (the K-quants), each block a few fp16 scales plus small integers:

    Q8_0:  x = d * q        q int8, one fp16 d per 32 values (8.5 bits per weight)
    Q4_0:  x = d * (q - 8)  q 4 bits (4.5 bits per weight)
    Q4_1:  x = d * q + m    q 4 bits, fp16 d and m per block (5 bits per weight)

`gguf.quants.dequantize` turns every supported type back into float32 in NumPy; we compute in fp32 as for
safetensors. llama.cpp also renames the tensors (token_embd, blk.N.attn_q, ffn_gate, output_norm, output;
LAYER_NAMES maps them back) and keeps the model's hyper-parameters in metadata (llama.embedding_length, ...),
which `gguf_config` turns into the config.json a Hugging Face directory would have.

Why q and k are permuted, and why we undo it. RoPE rotates pairs of a head's dimensions. Meta's original Llama
code pairs neighbours (x0, x1), (x2, x3), ...; Hugging Face's rotate-half code (ours, tinyllm/model.py) pairs
the two halves (x0, x32), (x1, x33), ... for head_dim 64. Hugging Face's converter therefore permuted the rows
of q_proj and k_proj once, so that the halves layout computes what Meta's computed; llama.cpp uses
the neighbour layout and its converter applies the inverse permutation when it writes attn_q / attn_k. Within
each head (n_heads of q, n_kv_heads of k), row 2i + j of the GGUF tensor is row j * head_dim/2 + i of Hugging
Face's. `unpermute_rows` puts them back. Forgetting it still runs and still produces text-shaped output:
every head just rotates the wrong pairs, which is why the tests compare logits with the same weights stored
as safetensors.

The header is untrusted input, so `read_header` reads it itself, with every length, count and tensor extent
checked against the file's size and every count against a bound no real model approaches (MAX_TENSORS,
MAX_METADATA, MAX_ARRAY, MAX_ARRAY_ITEMS below), before anything it counts is read. (The gguf package's
GGUFReader believes every length and count, and makes several NumPy objects per array item: one array of a
million empty strings, an 8 MB file, took it 33 s and 1.9 GB.) Tensors are then read-only views of a memory
map of the file; the gguf package gives the ggml types and dequantizes them. Every problem is a WeightsError
(the file), a ConfigError (the model it describes) or a TokenizerError (its vocabulary), naming the file, with
any value it echoes cut to 200 characters.
"""
import math
import mmap
import re
import stat
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .architecture import describe
from .config import FAMILIES, FLOAT32_MAX, GEMMA, LlamaConfig
from .errors import ConfigError, TokenizerError, WeightsError, clip, library_errors, shown
from .weights import bf16_to_f32, layer_tensors

# ggml types we read; gguf.quants dequantizes each of them in NumPy
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
UNQUANTIZED = {"F32": "f4", "F16": "f2", "BF16": "u2"}    # and how their values are stored

# llama.cpp's tensor names -> Hugging Face's: the global ones, and within a block the LayerWeights field
# (tinyllm/weights.py layer_tensors gives that field's Hugging Face name for the model's family)
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
               "ffn_norm": "ffn_norm", "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down",
               "attn_q_norm": "q_norm", "attn_k_norm": "k_norm", "post_attention_norm": "post_attn_norm",
               "post_ffw_norm": "post_ffn_norm"}
LAYER_BIASES = {"attn_q": "bq", "attn_k": "bk", "attn_v": "bv"}
ROPE_FREQS = "rope_freqs.weight"      # Llama 3.1's RoPE scaling as llama.cpp stores it: a divisor per pair

# general.architecture -> the family (tinyllm/config.py FAMILIES). llama.cpp writes Mistral as "llama" (without its
# window: llama.cpp runs it on full attention, and so do we).
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3"}
# {arch}.* metadata: the keys gguf_config reads, and those that describe but do not change the computation. Any
# other {arch}.* key (an expert count, a window the family does not have, a logit scale, another RoPE scaling...)
# is refused.
READ_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base",
             "rope.dimension_count", "attention.key_length", "attention.value_length", "vocab_size",
             "rope.scaling.type", "rope.scaling.factor")
GEMMA_KEYS = ("attention.sliding_window", "attn_logit_softcapping", "final_logit_softcapping")
FAMILY_KEYS = {"gemma2": GEMMA_KEYS,
               "gemma3": GEMMA_KEYS + ("rope.freq_base_swa", "attention.sliding_window_pattern")}
DESCRIPTIVE_KEYS = ("rope.scaling.original_context_length", "rope.scaling.finetuned", "tensor_data_layout")
# config.json's fields as the metadata calls them ({arch}.<key>), for LlamaConfig's messages
CONFIG_KEYS = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
               "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
               "num_key_value_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
               "max_position_embeddings": "context_length", "vocab_size": "vocab_size",
               "rms_norm_eps": "attention.layer_norm_rms_epsilon", "rope_theta": "rope.freq_base",
               "rope_scaling.factor": "rope.scaling.factor", "sliding_window": "attention.sliding_window",
               "attn_logit_softcapping": "attn_logit_softcapping",
               "final_logit_softcapping": "final_logit_softcapping"}
TOKEN_KEYS = {"bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_id": "tokenizer.ggml.eos_token_id"}


# --------------------------------------------------------------------------------------------------------
# The header, read with every length, count and extent checked
# --------------------------------------------------------------------------------------------------------
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9                     # GGUFValueType
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                 # ggml tensors have at most four dimensions
MAX_NAME_BYTES = 63          # ggml's GGML_MAX_NAME (64 with the final zero): llama.cpp refuses longer tensor names
MAX_KEY_BYTES = (1 << 16) - 1    # the GGUF specification's limit on a metadata key
# Counts no real model file approaches, checked as soon as they are read, before anything they count is.
# The file's size alone bounds them loosely: 40 MB hold a million empty tensors, 22 MB a million keys, 8 MB
# a million empty strings, and each costs Python objects (the gguf package's GGUFReader took 8 s for 65
# thousand tensors, and 33 s and 1.9 GB for one array of a million strings: why we read the header ourselves).
# For scale, counted in llama.cpp's vocabulary files (models/ggml-vocab-*.gguf) and SmolLM2: 16 to 42 keys,
# at most 262,144 tokens (Gemma 4) and 280,147 merges (Llama 3) in one array, 1.3 million array items in all.
MAX_TENSORS = 1 << 14        # a Llama has 9 per layer + 3: 1,137 for Llama 3.1 405B; the largest GGUF files (MoE
                             # models converted expert by expert) have ~13 thousand
MAX_METADATA = 1 << 12       # keys: 100x the most a real file has
MAX_ARRAY = 1 << 20          # items in one array: 4x the largest vocabulary
MAX_ARRAY_ITEMS = 1 << 22    # items in all arrays together: 3x the largest (tokens, scores, types, merges)


class _Cursor:
    """Reads the header's numbers, strings and arrays in order, refusing any that would run past the end of the
    file or past the bounds above."""

    def __init__(self, buf, path):
        self.buf, self.path, self.pos, self.order, self.array_items = buf, path, 0, "<", 0

    def fail(self, msg):
        raise WeightsError(f"{self.path}: {msg}")

    def skip(self, n, what):
        if n > len(self.buf) - self.pos:
            self.fail(f"truncated file: {what} at byte {self.pos} needs {n} bytes, but the file ends at byte "
                      f"{len(self.buf)}")
        self.pos += n
        return self.pos - n

    def number(self, fmt, what):
        start = self.skip(struct.calcsize(fmt), what)
        return struct.unpack_from(self.order + fmt, self.buf, start)[0]

    def string(self, what, max_bytes=None):
        """-> bytes (decoded by whoever reads them: a value nobody reads may be any bytes)."""
        n = self.number("Q", what)
        if max_bytes is not None and n > max_bytes:
            self.fail(f"{what} of {n:,} bytes (at most {max_bytes:,} are allowed)")
        start = self.skip(n, what)
        return self.buf[start:self.pos]

    def strings(self, count, what):
        """count strings in a row -> [bytes]; the loop of string(), inlined (vocabularies hold 10^5 of them)."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        length = struct.Struct(self.order + "Q").unpack_from
        for _ in range(count):
            n = length(buf, pos)[0] if end - pos >= 8 else None
            if n is None or n > end - pos - 8:      # cut off: skip() says where, and fails
                self.pos = pos if n is None else pos + 8
                self.skip(8 if n is None else n, what)
            out.append(buf[pos + 8:pos + 8 + n])
            pos += 8 + n
        self.pos = pos
        return out

    def value(self, vtype, key):
        """One metadata value of type vtype -> an int, float, bool, bytes (a string), an ndarray (an array of
        numbers) or a list of bytes (an array of strings). key: the key as messages show it."""
        if vtype in SCALAR_FORMATS:
            return self.number(SCALAR_FORMATS[vtype], key)
        if vtype == STRING:
            return self.string(key)
        if vtype != ARRAY:
            self.fail(f"metadata {key} has unknown value type {vtype}")
        itype, count = self.number("I", key), self.number("Q", key)
        self.array_items += count
        if count > MAX_ARRAY or self.array_items > MAX_ARRAY_ITEMS:
            self.fail(f"metadata {key} claims {count:,} items (at most {MAX_ARRAY:,} in one array and "
                      f"{MAX_ARRAY_ITEMS:,} in all are read): corrupt file?")
        if itype == STRING:
            return self.strings(count, key)
        if itype not in SCALAR_FORMATS:
            self.fail(f"metadata {key} is an array of type {itype}: nested or unknown arrays are not read")
        dtype = np.dtype(self.order + SCALAR_FORMATS[itype])
        start = self.skip(count * dtype.itemsize, key)
        return np.frombuffer(self.buf[start:self.pos], dtype)

    def header(self, size):
        """Magic, version, and the two counts -> (n_tensors, n_kv); sets the byte order."""
        if self.buf[:4] != b"GGUF":
            self.fail(f"not a GGUF file (it starts with {bytes(self.buf[:4])!r}, not b'GGUF')")
        self.pos = 4
        version = self.number("I", "the version")
        if version & 0xFFFF == 0:            # written on a big-endian machine: every number is swapped
            self.order, version = ">", int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in (2, 3):
            self.fail(f"GGUF version {version}: only versions 2 and 3 are read")
        n_tensors, n_kv = self.number("Q", "the tensor count"), self.number("Q", "the metadata count")
        if n_tensors > MAX_TENSORS:
            self.fail(f"header claims {n_tensors:,} tensors (at most {MAX_TENSORS:,} are read; a Llama has 9 per "
                      f"layer): corrupt file?")
        if n_kv > MAX_METADATA:
            self.fail(f"header claims {n_kv:,} metadata entries (at most {MAX_METADATA:,} are read; real files "
                      f"have a few dozen): corrupt file?")
        if max(n_tensors, n_kv) > size // 8:
            self.fail(f"header claims {n_tensors} tensors and {n_kv} metadata entries, more than a file of "
                      f"{size} bytes can hold: truncated or corrupt file")
        return n_tensors, n_kv


@dataclass(frozen=True)
class TensorExtent:
    name: str
    ggml_type: str      # "Q4_1", ...
    dims: tuple         # innermost first, as in the file
    begin: int          # absolute byte offsets in the file
    end: int

    @property
    def hf_shape(self):
        """Outermost first, as NumPy and Hugging Face write shapes: [out, in] for a linear layer."""
        return tuple(reversed(self.dims))


@dataclass
class GGUFHeader:
    metadata: dict      # key -> value as _Cursor.value reads it (strings still bytes)
    tensors: list       # [TensorExtent], in file order
    order: str          # "<" little-endian, ">" big-endian


def read_header(path):
    """Read a GGUF header with every length checked against the file and the bounds above -> GGUFHeader.

    Raises WeightsError for anything that is not a well-formed GGUF file: a wrong magic or version, a count
    above its bound, a length or count past the end of the file, a duplicate key or tensor name, an unknown
    value or tensor type, a tensor whose data is cut off or overlaps another one.
    """
    path = Path(path)
    try:
        st = path.stat()
        size = st.st_size
        if not stat.S_ISREG(st.st_mode):         # (opening a FIFO would wait for a writer forever)
            raise WeightsError(f"{path}: not a regular file")
        if size < 24:
            raise WeightsError(f"{path}: {size} bytes, too short to be a GGUF file (truncated?)")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            h = _Cursor(buf, path)
            n_tensors, n_kv = h.header(size)
            metadata = {}
            for _ in range(n_kv):
                key = h.string("a metadata key", MAX_KEY_BYTES).decode("utf-8", errors="replace")
                if key in metadata:
                    h.fail(f"metadata key {shown(key)} appears twice")
                metadata[key] = h.value(h.number("I", f"the type of {shown(key)}"), shown(key))
            infos = [_tensor_info(h) for _ in range(n_tensors)]
            alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
            if type(alignment) is not int or not alignment or alignment & (alignment - 1):
                h.fail(f"general.alignment={shown(alignment)}: expected a power of two")
            data_start = -(-h.pos // alignment) * alignment
            order = h.order
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({clip(e)})") from e
    return GGUFHeader(metadata, _extents(path, infos, data_start, alignment, size), order)


def _tensor_info(h):
    """One tensor info: name, dims, ggml type, offset."""
    name = h.string("a tensor name", MAX_NAME_BYTES).decode("utf-8", errors="replace")
    n_dims = h.number("I", f"tensor {name!r}'s dimension count")
    if not 1 <= n_dims <= MAX_DIMS:
        h.fail(f"tensor {name!r} has {n_dims} dimensions (ggml allows 1 to {MAX_DIMS})")
    dims = tuple(h.number("Q", f"tensor {name!r}'s shape") for _ in range(n_dims))
    return name, dims, h.number("I", f"tensor {name!r}'s type"), h.number("Q", f"tensor {name!r}'s offset")


def _extents(path, infos, data_start, alignment, size):
    """Tensor infos -> [TensorExtent], each inside the file, aligned, and apart from the others."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    extents = []
    for name, dims, type_id, offset in infos:
        if type_id not in GGMLQuantizationType._value2member_map_:
            raise WeightsError(f"{path}: tensor {name!r} has unknown ggml type {type_id}")
        ggml_type = GGMLQuantizationType(type_id)
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        if dims[0] % block:
            raise WeightsError(f"{path}: tensor {name!r} has rows of {dims[0]} values, not a multiple of "
                               f"{ggml_type.name}'s block of {block}")
        begin = data_start + offset
        end = begin + math.prod(dims) // block * type_size
        if offset % alignment:
            raise WeightsError(f"{path}: tensor {name!r} starts at offset {offset}, not a multiple of the "
                               f"alignment {alignment}")
        if end > size:
            raise WeightsError(f"{path}: truncated file: tensor {name!r} ends at byte {end} but the file has "
                               f"{size} bytes")
        extents.append(TensorExtent(name, ggml_type.name, dims, begin, end))
    if len({t.name for t in extents}) < len(extents):
        seen = set()
        dup = next(t.name for t in extents if t.name in seen or seen.add(t.name))
        raise WeightsError(f"{path}: two tensors are named {dup!r}")
    previous = None
    for t in sorted(extents, key=lambda t: (t.begin, t.end)):
        if previous is not None and t.begin < previous.end:
            raise WeightsError(f"{path}: tensors {previous.name!r} and {t.name!r} overlap in the data section")
        previous = t
    return extents


class Metadata:
    """A GGUF file's key/value metadata, read with a type check: a wrong type raises `error` naming the key."""

    KINDS = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
             float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
             str: lambda v: isinstance(v, str), bool: lambda v: isinstance(v, bool),
             list: lambda v: isinstance(v, list)}

    def __init__(self, values, source, error=ConfigError):
        self.values, self.source, self.error = values, source, error

    def keys(self):
        return list(self.values)

    def __contains__(self, key):
        return key in self.values

    def count(self, key):
        """How many items the array `key` holds (0 if absent or not an array), without decoding them."""
        value = self.values.get(key)
        return len(value) if isinstance(value, (list, np.ndarray)) else 0

    def get(self, key, kind, default=None):
        """The value of key, which must be of `kind` (int, float, str, bool, list); default if absent."""
        value = self.values.get(key)
        if value is None:
            return default
        try:
            if isinstance(value, bytes):
                value = value.decode("utf-8")
            elif isinstance(value, list):
                value = [v.decode("utf-8") for v in value]
            elif isinstance(value, np.ndarray):
                value = value.tolist()
        except UnicodeDecodeError as e:
            raise self.error(f"{self.source}: metadata {key} is not UTF-8 text ({clip(e)})") from e
        if not self.KINDS[kind](value):
            raise self.error(f"{self.source}: metadata {key}={shown(value)}: expected a {kind.__name__}")
        return value

    def require(self, key, kind):
        value = self.get(key, kind)
        if value is None:
            raise self.error(f"{self.source}: metadata has no {key} (needed to build the model)")
        return value

    def raising(self, error):
        """The same metadata, raising `error` instead (TokenizerError for tokenizer.ggml.*)."""
        return Metadata(self.values, self.source, error)


# --------------------------------------------------------------------------------------------------------
# Metadata -> LlamaConfig
# --------------------------------------------------------------------------------------------------------
def float32_value(x):
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06). A value
    float32 cannot hold (inf, NaN, 1e300 written as f64) is kept as it is, for LlamaConfig to refuse by name."""
    return float(str(np.float32(x))) if abs(x) <= FLOAT32_MAX else x


def gguf_config(meta, shapes, source, rope_freqs=None):
    """The config.json a Hugging Face directory of this model would have, built from {arch}.* metadata and
    validated by LlamaConfig (its errors name the metadata keys) -> LlamaConfig. shapes: {HF tensor name: HF
    shape} (tied head, vocab size); rope_freqs: the rope_freqs tensor's values (Llama 3.1), if the file has one."""
    arch = meta.require("general.architecture", str)
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{source}: general.architecture={shown(arch)}: only {', '.join(ARCHITECTURES)} are "
                          f"implemented")
    family, p = ARCHITECTURES[arch], arch + "."
    known = {p + k for k in READ_KEYS + DESCRIPTIVE_KEYS + FAMILY_KEYS.get(family, ())}
    unknown = [key for key in meta.keys() if key.startswith(p) and key not in known]
    if unknown:    # an expert count, a sliding window, a logit scale... never silently left out
        raise ConfigError(f"{source}: metadata {clip(unknown[0])} changes the model in a way tinyllm does not "
                          f"implement")
    n_heads = meta.require(p + "attention.head_count", int)
    hidden = meta.require(p + "embedding_length", int)
    head_dim = _head_dim(meta, p, n_heads, hidden, source)
    d = {
        "architectures": [FAMILIES[family].architecture],
        "hidden_size": hidden,
        "intermediate_size": meta.require(p + "feed_forward_length", int),
        "num_hidden_layers": meta.require(p + "block_count", int),
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta.get(p + "attention.head_count_kv", int, n_heads),
        "head_dim": head_dim or None,
        "max_position_embeddings": meta.require(p + "context_length", int),
        "rms_norm_eps": float32_value(meta.require(p + "attention.layer_norm_rms_epsilon", float)),
        "rope_theta": float32_value(meta.get(p + "rope.freq_base", float, 10000.0)),
        "rope_scaling": _rope_scaling(meta, p, source),
        "vocab_size": _vocab_size(meta, p, shapes, source),
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id", int),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id", int),
        "torch_dtype": "float32",
    }
    if family in GEMMA:
        d.update(_gemma_config(meta, p, family, hidden, n_heads, head_dim))
    names = {field: p + key for field, key in CONFIG_KEYS.items()} | TOKEN_KEYS
    config = LlamaConfig.from_dict(d, source=source, names=names)
    return config if rope_freqs is None else replace(config, rope_freq_factors=_rope_freq_factors(rope_freqs, config,
                                                                                                  source))


def _head_dim(meta, p, n_heads, hidden, source):
    """{arch}.attention.key_length (0 if absent), checked against value_length and the rotated dimensions."""
    head_dim = meta.get(p + "attention.key_length", int, 0)
    if meta.get(p + "attention.value_length", int, head_dim) != head_dim:
        raise ConfigError(f"{source}: {p}attention.key_length and value_length differ: not implemented")
    if head_dim or (n_heads > 0 and hidden % n_heads == 0):     # (else LlamaConfig names the head count)
        rope_dims = meta.get(p + "rope.dimension_count", int, head_dim or hidden // n_heads)
        if rope_dims != (head_dim or hidden // n_heads):
            raise ConfigError(f"{source}: {p}rope.dimension_count={rope_dims} rotates part of each head only "
                              f"(partial RoPE): not implemented")
    return head_dim


# llama.cpp's Gemma: layer counts of the 27B models, the only ones whose scores are scaled by hidden / heads (their
# query_pre_attn_scalar), not by head_dim, which GGUF does not store (llama.cpp's llama-model.cpp decides it so)
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma_config(meta, p, family, hidden, n_heads, head_dim):
    """Gemma's config.json fields from the metadata, with llama.cpp's defaults where the file is silent: a window
    of 4096 (Gemma 2), five window layers of six with a local RoPE base of 10000 (Gemma 3)."""
    big = meta.get(p + "block_count", int) == GEMMA_27B_LAYERS[family]
    d = {"hidden_activation": "gelu_pytorch_tanh",
         "query_pre_attn_scalar": hidden // max(n_heads, 1) if big else head_dim or hidden // max(n_heads, 1),
         "sliding_window": meta.get(p + "attention.sliding_window", int, 4096 if family == "gemma2" else None),
         "attn_logit_softcapping": _float(meta, p + "attn_logit_softcapping"),
         "final_logit_softcapping": _float(meta, p + "final_logit_softcapping")}
    if family == "gemma3":
        d["rope_local_base_freq"] = float32_value(meta.get(p + "rope.freq_base_swa", float, 10000.0))
        d["sliding_window_pattern"] = meta.get(p + "attention.sliding_window_pattern", int, 6)
    return d


def _float(meta, key):
    value = meta.get(key, float)
    return None if value is None else float32_value(value)


def _rope_freq_factors(x, config, source):
    """The rope_freqs tensor -> a tuple of head_dim / 2 positive, finite divisors."""
    x = np.asarray(x, np.float64).ravel()
    if x.shape != (config.head_dim // 2,) or not np.all(np.isfinite(x)) or not np.all(x > 0):
        raise ConfigError(f"{source}: tensor {ROPE_FREQS} must hold head_dim / 2 = {config.head_dim // 2} positive, "
                          f"finite factors (it has {x.size}: {shown(x[:4].tolist())}...)")
    if config.rope_scaling_factor != 1.0:
        raise ConfigError(f"{source}: both a linear RoPE scaling and {ROPE_FREQS}: which one applies is unclear")
    return tuple(float(v) for v in x)


def _rope_scaling(meta, p, source):
    kind = meta.get(p + "rope.scaling.type", str, "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": meta.require(p + "rope.scaling.factor", float)}
    raise ConfigError(f"{source}: {p}rope.scaling.type={shown(kind)}: only no scaling or 'linear' is "
                      f"implemented")


def _vocab_size(meta, p, shapes, source):
    """{arch}.vocab_size if written, else the number of tokens, else the embedding's rows."""
    n = meta.get(p + "vocab_size", int) or meta.count("tokenizer.ggml.tokens") or None
    if n is None and "model.embed_tokens.weight" in shapes:
        n = shapes["model.embed_tokens.weight"][0]
    if n is None:
        raise ConfigError(f"{source}: cannot tell the vocabulary size (no {p}vocab_size, tokens or token_embd)")
    return n


# --------------------------------------------------------------------------------------------------------
# Tensors: llama.cpp's names and layout -> Hugging Face's
# --------------------------------------------------------------------------------------------------------
def hf_name(gguf_name, config):
    """llama.cpp's tensor name -> Hugging Face's, or None if it has no place in the model we implement."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m is None or int(m[1]) >= config.num_hidden_layers:
        return None
    field = (LAYER_NAMES if m[3] == "weight" else LAYER_BIASES).get(m[2])
    tensors = layer_tensors(config)
    return f"model.layers.{int(m[1])}.{tensors[field][0]}" if field in tensors else None


def unpermute_rows(w, n_heads):
    """Undo llama.cpp's q/k row permutation: [n_heads * head_dim, ...] with each head's rows in neighbour-pair
    order (row 2i + j = pair i, member j) -> Hugging Face's halves order (row j * head_dim/2 + i)."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    """A .gguf file with the interface of weights.Checkpoint: Hugging Face names, Hugging Face layouts.

        ckpt.shapes          {HF name: HF shape}                  (checked against the config by load_weights)
        ckpt.get(name)       float32 ndarray, dequantized, q/k rows in HF order
        ckpt.raw(name)       F32/F16/BF16 tensors as stored (bf16 as uint16 bits), q/k rows in HF order
        ckpt.blocks(name)    a quantized tensor's blocks as stored: uint8 rows [out, bytes per row], HF row order
        ckpt.stored_dtype(name)   "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", ...
        ckpt.config          LlamaConfig from the metadata;  ckpt.metadata: the metadata (Metadata)
    """

    def __init__(self, path):
        self.path = Path(path)
        self.config_source = f"{self.path} (GGUF metadata)"
        header = read_header(self.path)
        self.metadata, self._order = Metadata(header.metadata, self.path), header.order
        self._file = None       # np.memmap of the whole file, made on the first tensor read
        # the config needs the tied head, the vocabulary size and Llama 3's RoPE factors from the tensors, the names
        # need the config
        globals_ = {GLOBAL_NAMES[t.name]: t.hf_shape for t in header.tensors if t.name in GLOBAL_NAMES}
        freqs = next((t for t in header.tensors if t.name == ROPE_FREQS), None)
        self.config = gguf_config(self.metadata, globals_, self.config_source,
                                  None if freqs is None else self._rope_freqs(freqs))
        # llama.cpp's "llama" rotates neighbour pairs (its converter permuted q and k); qwen and gemma rotate halves
        self._permuted = self.metadata.get("general.architecture", str) == "llama"
        self._norm_offset = describe(self.config).norm_offset   # Gemma's converter stored 1 + w: undone by get()
        self._tensors, self.shapes = {}, {}     # HF name -> TensorExtent, its HF shape
        for t in header.tensors:
            if t is freqs:
                continue
            name = hf_name(t.name, self.config)
            if name is None:
                raise WeightsError(f"{self.path}: tensor {t.name!r} has no place in the {self.config.family} model "
                                   f"tinyllm implements (a bias, an extra norm...): refusing to ignore it")
            if t.ggml_type not in SUPPORTED_TYPES:
                raise WeightsError(f"{self.path}: tensor {t.name!r} is stored as {t.ggml_type}, which tinyllm "
                                   f"does not read (supported: {', '.join(SUPPORTED_TYPES)})")
            self._tensors[name], self.shapes[name] = t, t.hf_shape

    def _rope_freqs(self, t):
        """The rope_freqs tensor's values (it must be F32, as llama.cpp writes it)."""
        if t.ggml_type != "F32" or len(t.dims) != 1:
            raise WeightsError(f"{self.path}: tensor {ROPE_FREQS} is {t.ggml_type} {t.dims}: expected a 1-D F32 "
                               f"tensor of RoPE frequency factors")
        self._file = np.memmap(self.path, dtype=np.uint8, mode="r")
        return np.array(self._file[t.begin:t.end].view(np.dtype("f4").newbyteorder(self._order)), np.float64)

    def _tensor(self, name):
        if name not in self._tensors:
            raise WeightsError(f"{self.path}: no tensor {shown(name)}")
        return self._tensors[name]

    def _stored(self, name):
        """The tensor's bytes as a read-only view of the file: F32 and F16 as floats and BF16 as uint16 bits,
        shaped as Hugging Face's tensor; a quantized type as uint8 rows of blocks [..., bytes per row] (what
        gguf.quants.dequantize takes)."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        t = self._tensor(name)
        if self._file is None:
            self._file = np.memmap(self.path, dtype=np.uint8, mode="r")
        data = self._file[t.begin:t.end]
        if t.ggml_type in UNQUANTIZED:
            return data.view(np.dtype(UNQUANTIZED[t.ggml_type]).newbyteorder(self._order)).reshape(t.hf_shape)
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[t.ggml_type]]
        return data.reshape(*t.hf_shape[:-1], t.dims[0] // block * type_size)

    def _hf_rows(self, name, x):
        """q_proj / k_proj rows back in Hugging Face's order (llama.cpp's "llama" only: see the module docstring);
        others unchanged."""
        c = self.config
        if self._permuted and name.endswith("self_attn.q_proj.weight"):
            return unpermute_rows(x, c.num_attention_heads)
        if self._permuted and name.endswith("self_attn.k_proj.weight"):
            return unpermute_rows(x, c.num_key_value_heads)
        return x

    def _shifted_norm(self, name):
        """Gemma's norm weights: llama.cpp's converter stored 1 + w (its RMSNorm multiplies by the weight); get()
        gives Hugging Face's w."""
        return self._norm_offset and name.endswith("norm.weight")

    def stored_dtype(self, name):
        return self._tensor(name).ggml_type

    def raw(self, name):
        """An F32, F16 or BF16 tensor as stored (float32, float16, or uint16 bf16 bits) in HF layout; q/k are
        a permuted copy, everything else a read-only view of the file (a copy in native byte order, if the
        file was written big-endian)."""
        kind = self.stored_dtype(name)
        if kind not in UNQUANTIZED:
            raise WeightsError(f"{self.path}: tensor {shown(name)} is stored as {kind}: only F32/F16/BF16 have a "
                               f"raw form, use get() to dequantize")
        if self._shifted_norm(name):
            raise WeightsError(f"{self.path}: tensor {shown(name)} holds 1 + w (Gemma's norm as llama.cpp stores it): "
                               f"use get() for w")
        x = self._stored(name)
        return self._hf_rows(name, x if x.dtype.isnative else x.astype(x.dtype.newbyteorder("=")))

    def blocks(self, name):
        """A quantized tensor's blocks as stored: uint8 [out, bytes per row] (a read-only view of the file, or a
        permuted copy for q/k, whose rows go back to Hugging Face's order like any rows)."""
        kind = self.stored_dtype(name)
        if kind in UNQUANTIZED:
            raise WeightsError(f"{self.path}: tensor {shown(name)} is stored as {kind}, not in quantized blocks: use "
                               f"raw()")
        return self._hf_rows(name, self._stored(name))

    def get(self, name):
        """The tensor as a new float32 array in Hugging Face's layout (quantized types dequantized with
        gguf.quants)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        kind, x = self.stored_dtype(name), self._stored(name)
        if kind == "BF16":
            x = bf16_to_f32(x)
        elif kind in UNQUANTIZED:
            x = np.array(x, dtype=np.float32)
        else:
            x = dequantize(x, GGMLQuantizationType[kind]).reshape(self.shapes[name])
        if self._shifted_norm(name):
            return (x.astype(np.float64) - self._norm_offset).astype(np.float32)
        return self._hf_rows(name, x)

    def file_of(self, name):
        return self.path


def is_gguf(path):
    """A .gguf name, or a file that starts with GGUF's magic (ollama keeps its models as sha256-named blobs)."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return True
    if not path.is_file():    # a directory, nothing there, or a FIFO (opening one would wait for a writer)
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------------
# The tokenizer: tokenizer.ggml.* -> a `tokenizers` Tokenizer equal to the model's tokenizer.json
# --------------------------------------------------------------------------------------------------------
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6     # tokenizer.ggml.token_type


@dataclass
class GGUFTokenizer:
    """What tinyllm.Tokenizer needs, read from GGUF metadata."""
    tokenizer: object          # tokenizers.Tokenizer
    bos_token: str | None
    eos_token: str | None
    add_bos: bool
    chat_template: str | None


# The splitting rules of the byte-level BPEs, as their tokenizer.json writes them (a Split on a regex, then
# ByteLevel without its own regex) and llama.cpp names them (tokenizer.ggml.pre). Llama 3's groups digits by up
# to three, Qwen2's (Qwen2, 2.5 and 3) takes them one by one.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
BYTE_LEVEL_PRES = ("gpt-2", "smollm", "starcoder", "llama-bpe", "qwen2")


def _byte_level_pre_tokenizer(pre):
    """llama.cpp's tokenizer.ggml.pre name -> the pre-tokenizer of the tokenizer.json it was converted from."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)   # GPT-2's split regex
    if pre == "gpt-2":
        return byte_level
    if pre in ("smollm", "starcoder"):        # every digit on its own, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "qwen2"):
        split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT if pre == "llama-bpe" else QWEN2_SPLIT), "isolated")
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return None


# merges_from_scores slices every piece at every position: its cost is the sum of the squared lengths of the
# normal pieces. Counted: 1.0 million for Llama 2's, Phi-3's and Baichuan's SentencePiece vocabularies (pieces
# of at most 16 characters), 11 million for Gemma 4's 262,144 pieces; a few long pieces would cost anything
# (one piece of a million characters: 10^12). At most 6x Gemma's is taken: a few seconds.
MAX_SPLIT_COST = 1 << 26


def merges_from_scores(tokens, scores, types):
    """SentencePiece BPE vocabularies store a score per piece instead of merges: SentencePiece joins the
    adjacent pair whose joined piece scores highest. As a merge list (what transformers' converter writes into
    tokenizer.json): every split of every normal piece into two pieces of the vocabulary, best score first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []                             # (-score of the joined piece, left id, right id): sorted as they stand
    for piece, score, kind in zip(tokens, scores, types):
        if kind != NORMAL:
            continue
        for k in range(1, len(piece)):
            left = vocab.get(piece[:k])
            if left is not None:
                right = vocab.get(piece[k:])
                if right is not None:
                    merges.append((-score, left, right))
    merges.sort()
    return [(tokens[left], tokens[right]) for _, left, right in merges]


def gguf_tokenizer(meta):
    """tokenizer.ggml.* -> GGUFTokenizer. "gpt2": byte-level BPE from tokens and merges; "llama": SentencePiece
    BPE from tokens and scores, laid out as Llama's tokenizer.json (so the ids equal transformers')."""
    from tokenizers import AddedToken

    meta = meta.raising(TokenizerError)
    kind = meta.require("tokenizer.ggml.model", str)
    tokens = _items(meta, "tokenizer.ggml.tokens", str)
    if not tokens:
        raise TokenizerError(f"{meta.source}: tokenizer.ggml.tokens is empty: a vocabulary with no tokens")
    types = _items(meta, "tokenizer.ggml.token_type", int, [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise TokenizerError(f"{meta.source}: tokenizer.ggml.tokens and token_type do not match")

    def token_of(key, default=None):
        i = meta.get(key, int)
        if i is None:
            return default
        if not 0 <= i < len(tokens):
            raise TokenizerError(f"{meta.source}: {key}={i} is outside the {len(tokens)} tokens")
        return tokens[i]

    if kind == "gpt2":      # Llama 3 adds BOS by default (llama.cpp's rule for its "llama-bpe"), the others do not
        tok, specials_normalized = _byte_level_bpe(meta, tokens), False
        add_bos_default = meta.get("tokenizer.ggml.pre", str, "gpt-2") == "llama-bpe"
    elif kind == "llama":
        unk = token_of("tokenizer.ggml.unknown_token_id", next((t for t, k in zip(tokens, types) if k == UNKNOWN),
                                                               None))
        tok = _sentencepiece_bpe(meta, tokens, types, unk)
        specials_normalized, add_bos_default = True, True     # as in Llama's tokenizer.json; llama.cpp's default
    else:
        raise TokenizerError(f"{meta.source}: tokenizer.ggml.model={shown(kind)}: only 'gpt2' (byte-level BPE) and "
                             f"'llama' (SentencePiece BPE) are implemented")
    with library_errors(TokenizerError, f"{meta.source}: the vocabulary cannot be built"):
        tok.add_special_tokens([AddedToken(t, special=True, normalized=specials_normalized)
                                for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == USER_DEFINED])
    return GGUFTokenizer(tokenizer=tok, bos_token=token_of("tokenizer.ggml.bos_token_id"),
                         eos_token=token_of("tokenizer.ggml.eos_token_id"),
                         add_bos=meta.get("tokenizer.ggml.add_bos_token", bool, add_bos_default),
                         chat_template=meta.get("tokenizer.chat_template", str))


def _items(meta, key, kind, default=None):
    """The array `key`, every item a `kind` (str, int, or float: any number) -> list."""
    values = meta.require(key, list) if default is None else meta.get(key, list, default)
    ok = {int, float} if kind is float else {kind}
    if not set(map(type, values)) <= ok:                # exact types: a bool is not an int here
        raise TokenizerError(f"{meta.source}: {key} holds items that are not of type {kind.__name__}")
    return values


def _byte_level_bpe(meta, tokens):
    """tokens and "left right" merges -> a byte-level BPE tokenizers.Tokenizer (GPT-2's, SmolLM2's, Llama 3's,
    Qwen's)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    pre = meta.get("tokenizer.ggml.pre", str, "gpt-2")
    pre_tokenizer = _byte_level_pre_tokenizer(pre)
    if pre_tokenizer is None:
        raise TokenizerError(f"{meta.source}: tokenizer.ggml.pre={shown(pre)}: tinyllm knows the splitting rules "
                             f"of {', '.join(BYTE_LEVEL_PRES)} only")
    if meta.get("tokenizer.ggml.add_space_prefix", bool, False):
        raise TokenizerError(f"{meta.source}: add_space_prefix with a byte-level BPE is not implemented")
    merges = [tuple(m.split(" ")) for m in _items(meta, "tokenizer.ggml.merges", str)]
    if any(len(m) != 2 for m in merges):
        raise TokenizerError(f"{meta.source}: tokenizer.ggml.merges holds an entry that is not 'left right'")
    with library_errors(TokenizerError, f"{meta.source}: the vocabulary cannot be built"):
        # Llama 3 takes a whole pre-token that is in the vocabulary as it is (its tokenizer.json's ignore_merges);
        # Qwen2's tokenizer.json normalises text to NFC first
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                   ignore_merges=pre == "llama-bpe"))
        if pre == "qwen2":
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizer
        tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta, tokens, types, unk):
    """tokens and scores -> a SentencePiece BPE tokenizers.Tokenizer laid out as Llama's tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = _items(meta, "tokenizer.ggml.scores", float)
    if len(scores) != len(tokens):
        raise TokenizerError(f"{meta.source}: {len(scores)} scores for {len(tokens)} tokens")
    space_prefix = meta.get("tokenizer.ggml.add_space_prefix", bool, True)
    cost = sum(len(t) ** 2 for t, k in zip(tokens, types) if k == NORMAL)
    if cost > MAX_SPLIT_COST:
        raise TokenizerError(f"{meta.source}: tokenizer.ggml.tokens holds pieces too long to find their merges "
                             f"(the splits would cost {cost:,} steps, at most {MAX_SPLIT_COST:,} are taken)")
    merges = merges_from_scores(tokens, scores, types)
    with library_errors(TokenizerError, f"{meta.source}: the vocabulary cannot be built"):
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=unk,
                                   fuse_unk=True, byte_fallback=BYTE in types))
        replace = normalizers.Replace(" ", "▁")
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if space_prefix else replace
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    return tok


def gguf_stop_ids(meta, config):
    """End-of-sequence ids: EOS, and the end-of-turn / end-of-message tokens some chat models add."""
    ids = set(config.eos_token_ids)
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        i = meta.get(key, int)
        if i is not None and 0 <= i < config.vocab_size:
            ids.add(i)
    return ids
