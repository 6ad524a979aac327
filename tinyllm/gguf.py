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

The header is untrusted input, and the gguf reader trusts it: it believes every length and count (an array
count that points past the end of a truncated file makes it loop for a very long time). So `check_layout`
first walks the header itself with every length, count and tensor extent checked against the file size, and
only then hands the file to the reader. Every problem is a WeightsError (the file), a ConfigError (the
model it describes) or a TokenizerError (its vocabulary), naming the file.
"""
import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError, LlamaConfig
from .tokenizer import TokenizerError
from .weights import WeightsError, layer_tensors

# ggml types we read; gguf.quants dequantizes each of them in NumPy
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
UNQUANTIZED = ("F32", "F16", "BF16")

# llama.cpp's tensor names -> Hugging Face's: the global ones, and within a block the LayerWeights field
# (tinyllm/weights.py layer_tensors gives that field's Hugging Face name)
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
               "ffn_norm": "ffn_norm", "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down"}

# llama.* metadata: the keys gguf_config reads, and those that describe but do not change the computation.
# Any other llama.* key (an expert count, a sliding window, a logit scale, another RoPE scaling...) is refused.
READ_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base",
             "rope.dimension_count", "attention.key_length", "attention.value_length", "vocab_size",
             "rope.scaling.type", "rope.scaling.factor")
DESCRIPTIVE_KEYS = ("rope.scaling.original_context_length", "rope.scaling.finetuned", "tensor_data_layout")


# --------------------------------------------------------------------------------------------------------
# The header, checked before the gguf reader sees it
# --------------------------------------------------------------------------------------------------------
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}   # GGUFValueType -> bytes
STRING, ARRAY = 8, 9
MAX_ARRAY = 1 << 24          # items in one metadata array; the largest vocabularies have ~260 thousand
MAX_DIMS = 4                 # ggml tensors have at most four dimensions
DEFAULT_ALIGNMENT = 32


class _Cursor:
    """Reads the header's numbers and strings in order, refusing any that would run past the end of the file."""

    def __init__(self, buf, path):
        self.buf, self.path, self.pos, self.order = buf, path, 0, "<"

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

    def string(self, what):
        n = self.number("Q", what)
        start = self.skip(n, what)
        return bytes(self.buf[start:self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype, key):
        """Step over one metadata value of type vtype -> the value if it is a u32 (general.alignment), else None."""
        if vtype == 4:
            return self.number("I", key)
        if vtype in SCALAR_SIZES:
            self.skip(SCALAR_SIZES[vtype], key)
        elif vtype == STRING:
            self.skip(self.number("Q", key), key)
        elif vtype == ARRAY:
            itype, count = self.number("I", key), self.number("Q", key)
            if count > MAX_ARRAY:
                self.fail(f"metadata {key!r} claims {count} items (more than {MAX_ARRAY}): corrupt file?")
            if itype in SCALAR_SIZES:
                self.skip(count * SCALAR_SIZES[itype], key)
            elif itype == STRING:
                for _ in range(count):
                    self.skip(self.number("Q", key), key)
            else:
                self.fail(f"metadata {key!r} is an array of type {itype}: nested or unknown arrays are not read")
        else:
            self.fail(f"metadata {key!r} has unknown value type {vtype}")
        return None


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


def check_layout(path):
    """Walk a GGUF header with every length checked against the file -> [TensorExtent] (file order).

    Raises WeightsError for anything the gguf reader would misread: a wrong magic or version, a length or
    count past the end of the file, an unknown value or tensor type, a tensor whose data is cut off or overlaps
    another one.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    try:
        size = path.stat().st_size
        if size < 24:
            raise WeightsError(f"{path}: {size} bytes, too short to be a GGUF file (truncated?)")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            h = _Cursor(buf, path)
            if buf[:4] != b"GGUF":
                h.fail(f"not a GGUF file (it starts with {bytes(buf[:4])!r}, not b'GGUF')")
            h.pos = 4
            version = h.number("I", "the version")
            if version & 0xFFFF == 0:            # written on a big-endian machine: every number is swapped
                h.order, version = ">", int.from_bytes(version.to_bytes(4, "little"), "big")
            if version not in (2, 3):
                h.fail(f"GGUF version {version}: only versions 2 and 3 are read")
            n_tensors, n_kv = h.number("Q", "the tensor count"), h.number("Q", "the metadata count")
            if max(n_tensors, n_kv) > size // 8:
                h.fail(f"header claims {n_tensors} tensors and {n_kv} metadata entries, more than a file of "
                       f"{size} bytes can hold: truncated or corrupt file")
            alignment = DEFAULT_ALIGNMENT
            for _ in range(n_kv):
                key = h.string("a metadata key")
                value = h.value(h.number("I", f"the type of {key!r}"), key)
                if key == "general.alignment":
                    alignment = value
            if not alignment or alignment & (alignment - 1):
                h.fail(f"general.alignment={alignment!r}: expected a power of two (as a u32)")
            infos = []
            for _ in range(n_tensors):
                name = h.string("a tensor name")
                n_dims = h.number("I", f"tensor {name!r}'s dimension count")
                if not 1 <= n_dims <= MAX_DIMS:
                    h.fail(f"tensor {name!r} has {n_dims} dimensions (ggml allows 1 to {MAX_DIMS})")
                dims = tuple(h.number("Q", f"tensor {name!r}'s shape") for _ in range(n_dims))
                infos.append((name, dims, h.number("I", f"tensor {name!r}'s type"),
                              h.number("Q", f"tensor {name!r}'s offset")))
            data_start = -(-h.pos // alignment) * alignment
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e})") from e

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
    previous = None
    for t in sorted(extents, key=lambda t: (t.begin, t.end)):
        if previous is not None and t.begin < previous.end:
            raise WeightsError(f"{path}: tensors {previous.name!r} and {t.name!r} overlap in the data section")
        previous = t
    return extents


def open_reader(path):
    """check_layout, then the gguf package's memory-mapped reader -> (GGUFReader, [TensorExtent])."""
    from gguf import GGUFReader

    extents = check_layout(path)
    try:
        return GGUFReader(path, "r"), extents
    except (ValueError, KeyError, IndexError, TypeError, OverflowError) as e:  # what a malformed header raises
        raise WeightsError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


class Metadata:
    """A GGUF file's key/value metadata, read with a type check: a wrong type raises `error` naming the key."""

    KINDS = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
             float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
             str: lambda v: isinstance(v, str), bool: lambda v: isinstance(v, bool),
             list: lambda v: isinstance(v, list)}

    def __init__(self, fields, source, error=ConfigError):
        self.fields, self.source, self.error = fields, source, error

    def keys(self):
        return [k for k in self.fields if not k.startswith("GGUF.")]   # the reader's own header entries

    def __contains__(self, key):
        return key in self.fields

    def count(self, key):
        """How many items the array `key` holds (0 if absent), without decoding them."""
        field = self.fields.get(key)
        return 0 if field is None else len(field.data)

    def get(self, key, kind, default=None):
        """The value of key, which must be of `kind` (int, float, str, bool, list); default if absent."""
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            value = field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise self.error(f"{self.source}: metadata {key} cannot be read ({e})") from e
        if not self.KINDS[kind](value):
            raise self.error(f"{self.source}: metadata {key}={value!r:.80}: expected a {kind.__name__}")
        return value

    def require(self, key, kind):
        value = self.get(key, kind)
        if value is None:
            raise self.error(f"{self.source}: metadata has no {key} (needed to build the model)")
        return value

    def raising(self, error):
        """The same metadata, raising `error` instead (TokenizerError for tokenizer.ggml.*)."""
        return Metadata(self.fields, self.source, error)


# --------------------------------------------------------------------------------------------------------
# Metadata -> LlamaConfig
# --------------------------------------------------------------------------------------------------------
def float32_value(x):
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def gguf_config(meta, shapes, source):
    """The config.json a Hugging Face directory of this model would have, built from llama.* metadata and
    validated by LlamaConfig -> LlamaConfig. shapes: {HF tensor name: HF shape} (tied head, vocab size)."""
    arch = meta.require("general.architecture", str)
    if arch != "llama":
        raise ConfigError(f"{source}: general.architecture={arch!r}: only 'llama' is implemented")
    p = "llama."
    known = {p + k for k in READ_KEYS + DESCRIPTIVE_KEYS}
    unknown = [key for key in meta.keys() if key.startswith(p) and key not in known]
    if unknown:    # an expert count, a sliding window, a logit scale... never silently left out
        raise ConfigError(f"{source}: metadata {unknown[0]} changes the model in a way tinyllm does not "
                          f"implement")

    n_heads = meta.require(p + "attention.head_count", int)
    hidden = meta.require(p + "embedding_length", int)
    head_dim = meta.get(p + "attention.key_length", int, 0)
    if meta.get(p + "attention.value_length", int, head_dim) != head_dim:
        raise ConfigError(f"{source}: llama.attention.key_length and value_length differ: not implemented")
    full = head_dim or hidden // max(n_heads, 1)          # (LlamaConfig refuses 0 heads with a clear message)
    rope_dims = meta.get(p + "rope.dimension_count", int, full)
    if rope_dims != full:
        raise ConfigError(f"{source}: llama.rope.dimension_count={rope_dims} rotates part of each head only "
                          f"(partial RoPE): not implemented")
    d = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": meta.require(p + "feed_forward_length", int),
        "num_hidden_layers": meta.require(p + "block_count", int),
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta.get(p + "attention.head_count_kv", int, n_heads),
        "head_dim": head_dim or None,
        "max_position_embeddings": meta.require(p + "context_length", int),
        "rms_norm_eps": float32_value(meta.require(p + "attention.layer_norm_rms_epsilon", float)),
        "rope_theta": float32_value(meta.get(p + "rope.freq_base", float, 10000.0)),
        "rope_scaling": _rope_scaling(meta, source),
        "vocab_size": _vocab_size(meta, shapes, source),
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id", int),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id", int),
        "torch_dtype": "float32",
    }
    return LlamaConfig.from_dict(d, source=source)


def _rope_scaling(meta, source):
    kind = meta.get("llama.rope.scaling.type", str, "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": meta.require("llama.rope.scaling.factor", float)}
    raise ConfigError(f"{source}: llama.rope.scaling.type={kind!r}: only no scaling or 'linear' is implemented")


def _vocab_size(meta, shapes, source):
    """llama.vocab_size if written, else the number of tokens, else the embedding's rows."""
    n = meta.get("llama.vocab_size", int) or meta.count("tokenizer.ggml.tokens") or None
    if n is None and "model.embed_tokens.weight" in shapes:
        n = shapes["model.embed_tokens.weight"][0]
    if n is None:
        raise ConfigError(f"{source}: cannot tell the vocabulary size (no llama.vocab_size, tokens or token_embd)")
    return n


# --------------------------------------------------------------------------------------------------------
# Tensors: llama.cpp's names and layout -> Hugging Face's
# --------------------------------------------------------------------------------------------------------
def hf_name(gguf_name, config):
    """llama.cpp's tensor name -> Hugging Face's, or None if it has no place in the Llama we implement."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m is None or m[2] not in LAYER_NAMES or int(m[1]) >= config.num_hidden_layers:
        return None
    return f"model.layers.{int(m[1])}.{layer_tensors(config)[LAYER_NAMES[m[2]]][0]}"


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
        ckpt.stored_dtype(name)   "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", ...
        ckpt.config          LlamaConfig from the metadata;  ckpt.metadata: the metadata (Metadata)
    """

    def __init__(self, path):
        self.path = Path(path)
        self.config_source = f"{self.path} (GGUF metadata)"
        self.reader, extents = open_reader(self.path)
        self.metadata = Metadata(self.reader.fields, self.path)
        by_name = {t.name: t for t in self.reader.tensors}
        # the config needs the tied head and the vocabulary size from shapes, the names need the config
        globals_ = {GLOBAL_NAMES[t.name]: t.hf_shape for t in extents if t.name in GLOBAL_NAMES}
        self.config = gguf_config(self.metadata, globals_, self.config_source)
        self._tensors, self.shapes = {}, {}     # HF name -> the reader's tensor, its HF shape
        for t in extents:
            name = hf_name(t.name, self.config)
            if name is None:
                raise WeightsError(f"{self.path}: tensor {t.name!r} has no place in the Llama tinyllm implements "
                                   f"(a bias, an extra norm, RoPE frequency factors...): refusing to ignore it")
            if t.ggml_type not in SUPPORTED_TYPES:
                raise WeightsError(f"{self.path}: tensor {t.name!r} is stored as {t.ggml_type}, which tinyllm "
                                   f"does not read (supported: {', '.join(SUPPORTED_TYPES)})")
            self._tensors[name], self.shapes[name] = by_name[t.name], t.hf_shape

    def _tensor(self, name):
        if name not in self._tensors:
            raise WeightsError(f"{self.path}: no tensor {name!r}")
        return self._tensors[name]

    def _hf_rows(self, name, x):
        """q_proj / k_proj rows back in Hugging Face's order (see the module docstring); others unchanged."""
        c = self.config
        if name.endswith("self_attn.q_proj.weight"):
            return unpermute_rows(x, c.num_attention_heads)
        if name.endswith("self_attn.k_proj.weight"):
            return unpermute_rows(x, c.num_key_value_heads)
        return x

    def stored_dtype(self, name):
        return self._tensor(name).tensor_type.name

    def raw(self, name):
        """An F32, F16 or BF16 tensor as stored (float32, float16, or uint16 bf16 bits) in HF layout; q/k are
        a permuted copy, everything else a read-only view of the file."""
        t, kind = self._tensor(name), self.stored_dtype(name)
        if kind not in UNQUANTIZED:
            raise WeightsError(f"{self.path}: tensor {name!r} is stored as {kind}: only F32/F16/BF16 have a raw "
                               f"form, use get() to dequantize")
        x = t.data.view(np.uint16) if kind == "BF16" else t.data
        return self._hf_rows(name, x.reshape(self.shapes[name]))

    def get(self, name):
        """The tensor as a new float32 array in Hugging Face's layout (dequantized with gguf.quants)."""
        from gguf.quants import dequantize

        t = self._tensor(name)
        x = dequantize(t.data, t.tensor_type).reshape(self.shapes[name])
        x = self._hf_rows(name, x)
        return x if x.flags.writeable else np.array(x)     # F32 comes back as a read-only view of the file

    def file_of(self, name):
        return self.path


def is_gguf(path):
    """A .gguf name, or a file that starts with GGUF's magic (ollama keeps its models as sha256-named blobs)."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:           # a directory, or nothing there
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


def _byte_level_pre_tokenizer(pre):
    """llama.cpp's tokenizer.ggml.pre name -> the pre-tokenizer of the tokenizer.json it was converted from."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)   # GPT-2's split regex
    if pre == "gpt-2":
        return byte_level
    if pre in ("smollm", "starcoder"):        # every digit on its own, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return None


BYTE_LEVEL_PRES = ("gpt-2", "smollm", "starcoder")


def merges_from_scores(tokens, scores, types):
    """SentencePiece BPE vocabularies store a score per piece instead of merges: SentencePiece joins the
    adjacent pair whose joined piece scores highest. As a merge list (what transformers' converter writes into
    tokenizer.json): every split of every normal piece into two pieces of the vocabulary, best score first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score, kind in zip(tokens, scores, types):
        if kind != NORMAL:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(-score, vocab[a], vocab[b], a, b) for a, b in splits]
    merges.sort(key=lambda m: m[:3])
    return [(a, b) for _, _, _, a, b in merges]


def gguf_tokenizer(meta):
    """tokenizer.ggml.* -> GGUFTokenizer. "gpt2": byte-level BPE from tokens and merges; "llama": SentencePiece
    BPE from tokens and scores, laid out as Llama's tokenizer.json (so the ids equal transformers')."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    meta = meta.raising(TokenizerError)
    kind = meta.require("tokenizer.ggml.model", str)
    tokens = meta.require("tokenizer.ggml.tokens", list)
    types = meta.get("tokenizer.ggml.token_type", list, [NORMAL] * len(tokens))
    if len(types) != len(tokens) or not all(isinstance(t, str) for t in tokens):
        raise TokenizerError(f"{meta.source}: tokenizer.ggml.tokens and token_type do not match")

    def token_of(key, default=None):
        i = meta.get(key, int)
        if i is None:
            return default
        if not 0 <= i < len(tokens):
            raise TokenizerError(f"{meta.source}: {key}={i} is outside the {len(tokens)} tokens")
        return tokens[i]

    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", str, "gpt-2")
        pre_tokenizer = _byte_level_pre_tokenizer(pre)
        if pre_tokenizer is None:
            raise TokenizerError(f"{meta.source}: tokenizer.ggml.pre={pre!r}: tinyllm knows the splitting rules "
                                 f"of {', '.join(BYTE_LEVEL_PRES)} only")
        if meta.get("tokenizer.ggml.add_space_prefix", bool, False):
            raise TokenizerError(f"{meta.source}: add_space_prefix with a byte-level BPE is not implemented")
        merges = [tuple(m.split(" ")) for m in meta.require("tokenizer.ggml.merges", list)]
        if any(len(m) != 2 for m in merges):
            raise TokenizerError(f"{meta.source}: tokenizer.ggml.merges holds an entry that is not 'left right'")
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        tok.pre_tokenizer = pre_tokenizer
        tok.decoder = decoders.ByteLevel()
        specials_normalized, add_bos_default = False, False
    elif kind == "llama":
        scores = meta.require("tokenizer.ggml.scores", list)
        if len(scores) != len(tokens):
            raise TokenizerError(f"{meta.source}: {len(scores)} scores for {len(tokens)} tokens")
        unk = token_of("tokenizer.ggml.unknown_token_id",
                       next((t for t, k in zip(tokens, types) if k == UNKNOWN), None))
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                   merges=merges_from_scores(tokens, scores, types), unk_token=unk,
                                   fuse_unk=True, byte_fallback=BYTE in types))
        space_prefix = meta.get("tokenizer.ggml.add_space_prefix", bool, True)
        replace = normalizers.Replace(" ", "▁")
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if space_prefix else replace
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
        specials_normalized, add_bos_default = True, True     # as in Llama's tokenizer.json; llama.cpp's default
    else:
        raise TokenizerError(f"{meta.source}: tokenizer.ggml.model={kind!r}: only 'gpt2' (byte-level BPE) and "
                             f"'llama' (SentencePiece BPE) are implemented")

    tok.add_special_tokens([AddedToken(t, special=True, normalized=specials_normalized)
                            for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED])
    return GGUFTokenizer(tokenizer=tok, bos_token=token_of("tokenizer.ggml.bos_token_id"),
                         eos_token=token_of("tokenizer.ggml.eos_token_id"),
                         add_bos=meta.get("tokenizer.ggml.add_bos_token", bool, add_bos_default),
                         chat_template=meta.get("tokenizer.chat_template", str))


def gguf_stop_ids(meta, config):
    """End-of-sequence ids: EOS, and the end-of-turn / end-of-message tokens some chat models add."""
    ids = set(config.eos_token_ids)
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        i = meta.get(key, int)
        if i is not None and 0 <= i < config.vocab_size:
            ids.add(i)
    return ids
