"""Reading (and writing) safetensors checkpoints with nothing but NumPy: no torch, no pickle.

The format (https://huggingface.co/docs/safetensors) is deliberately simple:

    [8 bytes]  N, the header length, unsigned little-endian
    [N bytes]  JSON: {"name": {"dtype": "BF16", "shape": [2048, 2048], "data_offsets": [begin, end]}, ...,
                      "__metadata__": {"format": "pt"}}              (optional string -> string map)
    [rest]     the data section; a tensor's bytes are data[begin:end], little-endian, row-major

So a tensor is just a view into the file: we np.memmap the file and slice it, and the OS pages bytes in
only when they are converted. A checkpoint is untrusted input, so the header is checked before any byte is
interpreted: the header size is bounded and inside the file, every entry's dtype is known, its byte count
equals prod(shape) * itemsize, and the tensors tile the data section exactly (no overlaps, no holes, nothing
past the end) -- the same rules as the reference Rust implementation. Every failure is a WeightsError
naming the file and the problem.

NumPy has no bfloat16. bf16 is simply the top half of an fp32 (same 8-bit exponent, mantissa cut from 23 to
7 bits), so the conversion is exact and vectorised: widen the uint16 to uint32, shift left by 16, reinterpret
the bits as float32. The reverse (for the writer) rounds to nearest even.

Big checkpoints come in shards: `model.safetensors.index.json` maps each tensor name to its shard file.
"""
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .architecture import describe
from .errors import WeightsError, clip, read_json, shown

log = logging.getLogger("tinyllm")

# Real headers are ~10-100 KB (a Llama file has at most a few thousand tensors); the Rust implementation allows
# 100 MB, but parsing and checking a 90 MB header of 1.5 million empty tensors takes 38 s and 1.8 GB here.
# 16 MiB (~250 thousand tensors) is far above any real checkpoint and stays under 0.5 GB.
MAX_HEADER_BYTES = 16 << 20
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype -> how its bytes are read (little-endian). BF16 is read as raw uint16 bits.
DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
# dtypes the format defines but a Llama checkpoint never needs: recognised, refused with a clear reason
OTHER_DTYPES = ("F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "F8_E4M3", "F8_E5M2")


# --------------------------------------------------------------------------------------------------------
# bf16 <-> fp32
# --------------------------------------------------------------------------------------------------------
def bf16_to_f32(bits):
    """uint16 bf16 bit patterns -> float32, exactly: the bf16 bits are the fp32's top 16 bits."""
    wide = np.asarray(bits, dtype=np.uint16).astype(np.uint32)
    wide <<= 16                                   # in place: one temporary per tensor, not two
    return wide.view(np.float32)


def f32_to_bf16(x):
    """float32 -> uint16 bf16 bit patterns, rounding to nearest, ties to even (as torch does).

    Adding 0x7FFF plus the lowest kept bit before truncating rounds up exactly when the dropped half is
    above 0x8000, or equal to it with an odd kept part. NaNs are kept NaN (quiet bit set) instead of being
    rounded into infinity.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return np.where(np.isnan(x), (u >> 16) | 0x40, rounded).astype(np.uint16)


# --------------------------------------------------------------------------------------------------------
# One .safetensors file
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    dtype: str          # "F32" | "F16" | "BF16"
    shape: tuple
    begin: int          # byte offsets into the data section
    end: int


class SafetensorsFile:
    """A validated, memory-mapped .safetensors file.

        f = SafetensorsFile("model.safetensors")
        f.tensors["lm_head.weight"].shape       # TensorInfo, straight from the header
        w = f.get("lm_head.weight")             # float32 ndarray (converted from bf16/f16)
    """

    def __init__(self, path):
        self.path = Path(path)
        self.tensors, self.metadata, self.data_start = read_header(self.path)
        self._mm = None

    def _map(self):
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm

    def raw(self, name):
        """The tensor as stored, a read-only view of the file: float32, float16, or uint16 bf16 bits."""
        if name not in self.tensors:
            raise WeightsError(f"{self.path}: no tensor named {shown(name)}")
        t = self.tensors[name]
        data = self._map()[self.data_start + t.begin:self.data_start + t.end]
        return data.view(DTYPES[t.dtype]).reshape(t.shape)

    def get(self, name):
        """The tensor as a new float32 array."""
        x = self.raw(name)
        if self.tensors[name].dtype == "BF16":
            return bf16_to_f32(x)
        return x.astype(np.float32)


def _reject_duplicates(pairs):
    d = dict(pairs)
    if len(d) < len(pairs):           # (linear: the header may hold a million keys)
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {shown(dup)}")
    return d


def read_header(path):
    """Parse and validate a safetensors header -> ({name: TensorInfo}, metadata dict, data_start offset)."""
    path = Path(path)

    def fail(msg):
        raise WeightsError(f"{path}: {msg}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                fail(f"truncated file: {size} bytes, too short for the 8-byte header length")
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES:
                fail(f"header length {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt file?)")
            if 8 + n > size:
                fail(f"header length {n} bytes reaches beyond the end of the file ({size} bytes): truncated?")
            raw = f.read(n)
    except FileNotFoundError:
        fail("file not found")
    except OSError as e:
        fail(f"cannot read ({clip(e)})")

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        fail(f"header is not valid UTF-8 JSON ({clip(e)})")
    except RecursionError:
        fail("header JSON is nested too deeply to parse (a safetensors header is two levels deep)")
    if not isinstance(header, dict):
        fail(f"header must be a JSON object, got {type(header).__name__}")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        fail("__metadata__ must map strings to strings")

    data_start = 8 + n
    tensors = {name: _tensor_info(name, entry, size - data_start, fail) for name, entry in header.items()}
    _check_tiling(tensors, size - data_start, fail)
    return tensors, metadata, data_start


def _tensor_info(name, entry, data_size, fail):
    """One header entry, checked: a known dtype, a shape, data_offsets inside the data section that hold
    exactly prod(shape) values -> TensorInfo."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        fail(f"tensor {shown(name)}: expected exactly the keys dtype, shape, data_offsets, got {shown(entry)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        why = "not supported for Llama weights" if dtype in OTHER_DTYPES else "unknown dtype"
        fail(f"tensor {shown(name)}: dtype {shown(dtype)} {why} (expected one of {sorted(DTYPES)})")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        fail(f"tensor {shown(name)}: shape {shown(shape)} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        fail(f"tensor {shown(name)}: data_offsets {shown(offsets)} must be [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end > data_size:
        fail(f"tensor {shown(name)}: data_offsets [{begin}, {end}] lie outside the data section "
             f"({data_size} bytes after the header): truncated file?")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes:
        fail(f"tensor {shown(name)}: shape {shown(shape)} in {dtype} needs {nbytes} bytes but data_offsets "
             f"[{begin}, {end}] hold {end - begin}")
    return TensorInfo(dtype, tuple(shape), begin, end)


def _check_tiling(tensors, data_size, fail):
    """The tensors must tile the data section: sorted by offset, each starts where the previous one ended."""
    pos, prev = 0, None
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin < pos:
            fail(f"tensors {shown(prev)} and {shown(name)} overlap (bytes {t.begin}..{pos} of the data section)")
        if t.begin > pos:
            fail(f"gap of {t.begin - pos} unused bytes before tensor {shown(name)} in the data section")
        pos, prev = t.end, name
    if pos != data_size:
        fail(f"data section has {data_size} bytes but the tensors cover {pos}: truncated or padded file")


# --------------------------------------------------------------------------------------------------------
# Writing (make_tiny, tests)
# --------------------------------------------------------------------------------------------------------
def save_file(path, tensors, dtype="BF16", metadata=None):
    """Write {name: array} as a .safetensors file, every tensor stored as `dtype` (F32, F16 or BF16).

    `dtype` may also be a {name: dtype} dict. The header is padded with spaces to a multiple of 8 bytes so
    the data section is aligned, as the reference writer does.
    """
    header, blobs, pos = {}, [], 0
    for name, x in tensors.items():
        kind = dtype[name] if isinstance(dtype, dict) else dtype
        x = np.asarray(x)
        if kind == "BF16":
            data = f32_to_bf16(x).astype("<u2")
        elif kind in ("F32", "F16"):
            data = np.ascontiguousarray(x, dtype=DTYPES[kind])
        else:
            raise ValueError(f"save_file: dtype {kind!r} for {name!r}; expected F32, F16 or BF16")
        blob = data.tobytes()
        header[name] = {"dtype": kind, "shape": list(x.shape), "data_offsets": [pos, pos + len(blob)]}
        blobs.append(blob)
        pos += len(blob)
    if metadata:
        header["__metadata__"] = dict(metadata)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for blob in blobs:
            f.write(blob)


# --------------------------------------------------------------------------------------------------------
# A checkpoint directory: one file, or shards listed in model.safetensors.index.json
# --------------------------------------------------------------------------------------------------------
class Checkpoint:
    """All tensors of a model directory, by name, whichever file holds them.

        ckpt = Checkpoint("path/to/TinyLlama")
        ckpt.shapes["model.norm.weight"]        # (2048,)
        ckpt.get("model.norm.weight")           # float32 ndarray
    """

    def __init__(self, model_dir):
        model_dir = Path(model_dir)
        self.config_source = str(model_dir / "config.json")     # what check_checkpoint's errors cite
        single, index = model_dir / SINGLE_FILE, model_dir / INDEX_FILE
        self.files = {}      # file name -> SafetensorsFile
        self.where = {}      # tensor name -> file name
        if single.is_file():
            self._add(single)
            self.where = {name: SINGLE_FILE for name in self.files[SINGLE_FILE].tensors}
        elif index.is_file():
            for name, shard in self._read_index(index).items():
                if shard not in self.files:
                    self._add(model_dir / shard)
                if name not in self.files[shard].tensors:
                    raise WeightsError(f"{index}: maps {shown(name)} to {shard}, but {model_dir / shard} has no "
                                       f"such tensor")
                self.where[name] = shard
        else:
            raise WeightsError(f"{model_dir}: no {SINGLE_FILE} and no {INDEX_FILE} (a safetensors checkpoint "
                               f"is needed; .bin/.pth pickles are not read)")
        self.shapes = {name: self.files[f].tensors[name].shape for name, f in self.where.items()}

    def _add(self, path):
        self.files[path.name] = SafetensorsFile(path)

    @staticmethod
    def _read_index(index):
        d = read_json(index, WeightsError)
        weight_map = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{index}: no 'weight_map' object mapping tensor names to shard files")
        for name, shard in weight_map.items():
            # shard names come from the file: never let them point outside the model directory
            if not isinstance(shard, str) or not re.fullmatch(r"[\w.\-]+\.safetensors", shard) or ".." in shard:
                raise WeightsError(f"{index}: tensor {shown(name)} maps to {shown(shard)}, not a .safetensors file "
                                   f"name in this directory")
        return weight_map

    def get(self, name):
        if name not in self.where:
            raise WeightsError(f"checkpoint has no tensor {shown(name)}")
        return self.files[self.where[name]].get(name)

    def file_of(self, name):
        return self.files[self.where[name]].path

    def stored_dtype(self, name):
        """How the file stores the tensor: "F32", "F16" or "BF16"."""
        return self.files[self.where[name]].tensors[name].dtype

    def raw(self, name):
        """The tensor as stored, a read-only view of its file (bf16 as uint16 bits): see SafetensorsFile.raw."""
        if name not in self.where:
            raise WeightsError(f"checkpoint has no tensor {shown(name)}")
        return self.files[self.where[name]].raw(name)


# --------------------------------------------------------------------------------------------------------
# The model: the tensors a config implies, checked, converted and laid out for x @ W
# --------------------------------------------------------------------------------------------------------
NORMS = ("attn_norm", "ffn_norm", "post_attn_norm", "post_ffn_norm", "q_norm", "k_norm")   # 1-D RMSNorm weights


def layer_tensors(config):
    """LayerWeights field -> (Hugging Face name within a layer, shape in the checkpoint), for one block of this
    config's family (tinyllm/architecture.py). Linear weights are stored [out_features, in_features] (torch's
    nn.Linear layout); norms and biases are 1-D. Gemma's names shift: its post_attention_layernorm is the norm
    after attention (Llama's is the one before the MLP, which Gemma calls pre_feedforward_layernorm)."""
    arch = describe(config)
    dim, hd, ffn = config.hidden_size, config.head_dim, config.intermediate_size
    q_dim, kv_dim = config.num_attention_heads * hd, config.num_key_value_heads * hd
    tensors = {
        "attn_norm": ("input_layernorm.weight", (dim,)),
        "wq": ("self_attn.q_proj.weight", (q_dim, dim)),
        "wk": ("self_attn.k_proj.weight", (kv_dim, dim)),
        "wv": ("self_attn.v_proj.weight", (kv_dim, dim)),
        "wo": ("self_attn.o_proj.weight", (dim, q_dim)),
        "ffn_norm": ("pre_feedforward_layernorm.weight" if arch.sandwich_norms else "post_attention_layernorm.weight",
                     (dim,)),
        "w_gate": ("mlp.gate_proj.weight", (ffn, dim)),
        "w_up": ("mlp.up_proj.weight", (ffn, dim)),
        "w_down": ("mlp.down_proj.weight", (dim, ffn)),
    }
    if arch.qkv_bias:
        tensors.update(bq=("self_attn.q_proj.bias", (q_dim,)), bk=("self_attn.k_proj.bias", (kv_dim,)),
                       bv=("self_attn.v_proj.bias", (kv_dim,)))
    if arch.qk_norm:
        tensors.update(q_norm=("self_attn.q_norm.weight", (hd,)), k_norm=("self_attn.k_norm.weight", (hd,)))
    if arch.sandwich_norms:
        tensors.update(post_attn_norm=("post_attention_layernorm.weight", (dim,)),
                       post_ffn_norm=("post_feedforward_layernorm.weight", (dim,)))
    return tensors


def expected_shapes(config):
    """{Hugging Face tensor name: shape} for a LlamaForCausalLM with this config, in file order."""
    return dict(iter_expected_shapes(config))


def iter_expected_shapes(config):
    """(name, shape) of every tensor the config implies, one at a time: checking them against a checkpoint
    needs no table, so a config claiming 10**7 layers fails at the first missing one, not after building
    9 * 10**7 names."""
    dim = config.hidden_size
    yield "model.embed_tokens.weight", (config.vocab_size, dim)
    for i in range(config.num_hidden_layers):
        for name, shape in layer_tensors(config).values():
            yield f"model.layers.{i}.{name}", shape
    yield "model.norm.weight", (dim,)
    if not config.tie_word_embeddings:
        yield "lm_head.weight", (config.vocab_size, dim)


def check_checkpoint(ckpt, config, source="config.json"):
    """Every tensor the config implies is present with the right shape, before anything is converted."""
    for name, shape in iter_expected_shapes(config):
        if name not in ckpt.shapes:
            layers = f"; {source} says num_hidden_layers={config.num_hidden_layers:,}" if ".layers." in name else ""
            raise WeightsError(f"checkpoint is missing tensor {shown(name)} (expected shape {shape} from {source}"
                               f"{layers})")
        if ckpt.shapes[name] != shape:
            raise WeightsError(f"{ckpt.file_of(name)}: tensor {shown(name)} has shape {shown(ckpt.shapes[name])} but "
                               f"{source} implies {shape}: config and weights do not match")
    extra = sorted(set(ckpt.shapes) - set(expected_shapes(config)))
    if extra:  # e.g. old checkpoints' rotary_emb.inv_freq buffers, or an lm_head next to tied embeddings
        log.info("tinyllm: ignoring %d unused tensor(s) in the checkpoint, e.g. %s", len(extra), extra[0])


def check_finite(x, name, ckpt):
    """Refuse a tensor holding NaN or inf (a corrupt or badly converted checkpoint would otherwise talk
    nonsense, or print nothing). min and max propagate NaN and show inf: two passes, no temporary array,
    ~0.5 ms per million values (5 ms for TinyLlama's 11.5M-value MLP matrices, whose transpose takes 90)."""
    if not x.size or (np.isfinite(x.min()) and np.isfinite(x.max())):
        return
    bad = ~np.isfinite(x)
    first = np.unravel_index(int(np.argmax(bad)), x.shape)
    raise WeightsError(f"{ckpt.file_of(name)}: tensor {shown(name)} holds {int(bad.sum()):,} non-finite values (NaN or "
                       f"inf), e.g. {x[first]} at index {tuple(map(int, first))}: the checkpoint is corrupt")


@dataclass
class LayerWeights:
    """One transformer block. Matrices are [in, out] so a layer is `x @ W` on contiguous memory; norms hold the
    factor RMSNorm applies (Gemma's 1 + w, folded in at load). What a family lacks is None."""
    attn_norm: np.ndarray   # [dim]
    wq: np.ndarray          # [dim, n_heads * head_dim]
    wk: np.ndarray          # [dim, n_kv_heads * head_dim]
    wv: np.ndarray          # [dim, n_kv_heads * head_dim]
    wo: np.ndarray          # [n_heads * head_dim, dim]
    ffn_norm: np.ndarray    # [dim]                   the norm before the MLP
    w_gate: np.ndarray      # [dim, ffn]
    w_up: np.ndarray        # [dim, ffn]
    w_down: np.ndarray      # [ffn, dim]
    bq: np.ndarray = None   # [n_heads * head_dim]    q/k/v biases (Qwen2)
    bk: np.ndarray = None   # [n_kv_heads * head_dim]
    bv: np.ndarray = None   # [n_kv_heads * head_dim]
    q_norm: np.ndarray = None          # [head_dim]   RMSNorm of each q head and k head (Qwen3, Gemma 3)
    k_norm: np.ndarray = None          # [head_dim]
    post_attn_norm: np.ndarray = None  # [dim]        norms of the attention's and the MLP's outputs (Gemma)
    post_ffn_norm: np.ndarray = None   # [dim]


@dataclass
class LlamaWeights:
    embed: np.ndarray       # [vocab, dim]   row i is token i's embedding
    layers: list            # [LayerWeights] * n_layers
    norm: np.ndarray        # [dim]
    lm_head: np.ndarray     # [dim, vocab]   (embed.T, a view, when the embeddings are tied)


def load_weights(source, config, progress=None, weights="fp32"):
    """Read, check and convert a checkpoint to fp32 -> LlamaWeights.

    source: a model directory (safetensors) or an already opened checkpoint with the same interface as
    Checkpoint (shapes, get, file_of), e.g. a GGUF file's. progress(i, n, name) is called before each tensor
    is converted (n = number of tensors), so a CLI can draw a bar: converting 1.1B bf16 parameters takes a
    few seconds. Norm weights come out as the factor RMSNorm applies: norm_offset + w (Gemma: 1 + w).
    weights="as-stored": a GGUF file's quantized matrices stay in their blocks, multiplied by Numba kernels
    (numbattn.cpu_linear.BlockMatrix: `x @ W` as for an array); "fp32": every matrix fp32.
    """
    if weights not in ("as-stored", "fp32"):
        raise ValueError(f"weights={weights!r}: the NumPy engine keeps 'as-stored' (GGUF blocks) or 'fp32' weights")
    if hasattr(source, "shapes"):        # an opened checkpoint: it may say where its config came from
        ckpt, config_source = source, getattr(source, "config_source", "the config")
    else:
        ckpt, config_source = Checkpoint(source), str(Path(source) / "config.json")
    check_checkpoint(ckpt, config, source=config_source)
    names, offset = list(expected_shapes(config)), np.float32(describe(config).norm_offset)
    done = iter(range(len(names)))

    def tensor(name, linear=True, norm=False):
        i = next(done)
        if progress is not None:
            progress(i, len(names), name)
        if weights == "as-stored" and blocks_kind(ckpt, name) is not None:
            return block_matrix(ckpt, name, linear)
        x = ckpt.get(name)
        check_finite(x, name, ckpt)
        if norm:
            return x + offset if offset else x
        return np.ascontiguousarray(x.T) if linear and x.ndim == 2 else x   # [out, in] -> [in, out], at load

    embed = tensor("model.embed_tokens.weight", linear=False)   # [vocab, dim]: rows are looked up, not multiplied
    layers = [LayerWeights(**{field: tensor(f"model.layers.{i}.{name}", norm=field in NORMS)
                              for field, (name, _) in layer_tensors(config).items()})
              for i in range(config.num_hidden_layers)]
    norm = tensor("model.norm.weight", norm=True)
    lm_head = embed.T if config.tie_word_embeddings else tensor("lm_head.weight")   # tied: a view, no second copy
    if progress is not None:
        progress(len(names), len(names), "")
    return LlamaWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)


def blocks_kind(ckpt, name):
    """numbattn's kind of a matrix stored in GGUF blocks that the CPU kernels read, else None."""
    from numbattn.blocks import KIND_OF_GGML
    from numbattn.cpu_linear import CPU_KINDS
    kind = KIND_OF_GGML.get(ckpt.stored_dtype(name))
    return kind if kind in CPU_KINDS and len(ckpt.shapes[name]) == 2 and hasattr(ckpt, "blocks") else None


def block_matrix(ckpt, name, linear=True):
    """A matrix kept in its GGUF blocks -> BlockMatrix [out, in] (its .T, [in, out], for a linear layer), its
    scales checked finite (then so is every value)."""
    from numbattn import blocks
    from numbattn.cpu_linear import BlockMatrix
    kind, n_in = blocks_kind(ckpt, name), ckpt.shapes[name][1]
    words = blocks.pack(kind, ckpt.blocks(name), n_in)
    if not blocks.finite_scales(kind, words, n_in):
        raise WeightsError(f"{ckpt.file_of(name)}: tensor {shown(name)} has non-finite scales (NaN or inf) in its "
                           f"{kind} blocks: the checkpoint is corrupt")
    matrix = BlockMatrix(kind, words, n_in)
    return matrix.T if linear else matrix
