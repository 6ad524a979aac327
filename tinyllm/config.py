"""The model's hyper-parameters, read from a Hugging Face `config.json` (LlamaForCausalLM).

    config = load_config("path/to/TinyLlama")      # or LlamaConfig.from_dict(json.load(...))
    config.head_dim                                 # hidden_size // num_attention_heads unless given

TinyLlama-1.1B-Chat-v1.0: hidden 2048, 22 layers, 32 query heads sharing 4 KV heads (head_dim 64),
intermediate 5632, vocab 32000, rope_theta 10000, rms_norm_eps 1e-5, 2048 positions, bf16, BOS 1, EOS 2.

Only what tinyllm/model.py implements is accepted; anything else (another architecture, another activation,
a RoPE scaling we do not compute, biases in the projections, a head_dim the numbattn kernels were not built
for) is refused here with a ConfigError naming the file and the field, instead of producing a model that
loads fine and then talks nonsense. That includes fields we do not read at all: a config field whose name
says it changes the computation (a RoPE variant, a sliding window, a logit scale, an expert count...) is
refused when it is set, never silently defaulted.

Both layouts transformers writes are read: version 4 keeps `rope_theta` (and `rope_scaling`) at the top and
writes `torch_dtype`; version 5 nests them in `rope_parameters` ({"rope_type": "default", "rope_theta": ...})
and writes `dtype`.
"""
import re
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from numbattn.validate import SUPPORTED_HEAD_DIMS

from .errors import ConfigError, clip, read_json, shown


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2   # some configs list several stop tokens
    torch_dtype: str = "float32"                    # how the checkpoint stores weights; we compute in fp32
    head_dim: int = 0                               # 0 -> hidden_size // num_attention_heads
    rope_scaling_factor: float = 1.0                # "linear" RoPE scaling: positions are divided by this

    def __post_init__(self):
        if not self.head_dim and self.num_attention_heads > 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @property
    def eos_token_ids(self):
        """All stop-token ids as a tuple (eos_token_id may be one id, a list, or absent)."""
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @classmethod
    def from_dict(cls, d, source="config.json", names=None):
        """Build and validate a config from the parsed JSON; errors name `source`, and each field as `names`
        ({field: name}, e.g. GGUF's metadata keys) calls it."""
        return _parse(d, source, names)


def load_config(model_dir):
    """Read and validate `model_dir/config.json`."""
    path = Path(model_dir) / "config.json"
    d = read_json(path, ConfigError, missing="file not found (every Hugging Face model directory has a config.json)")
    return _parse(d, str(path))


# --------------------------------------------------------------------------------------------------------
# Parsing and validation
# --------------------------------------------------------------------------------------------------------
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
FLOAT32_TINY, FLOAT32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "vocab_size")


def _parse(d, source, names=None):
    """names: {config.json field: what the source calls it} for the messages (GGUF metadata keys)."""
    def fail(msg):
        raise ConfigError(f"{source}: {msg}")

    def field(name):
        return (names or {}).get(name, name)

    if not isinstance(d, dict):
        fail(f"expected a JSON object, got {type(d).__name__}")
    _check_family(d, fail)
    ints = _sizes(d, fail, field)
    rms_norm_eps = positive_number(d.get("rms_norm_eps", 1e-6), field("rms_norm_eps"), fail)
    rope_theta, factor = _rope(d, fail, field)

    dtype_field = "torch_dtype" if "torch_dtype" in d else "dtype"      # transformers 5 writes "dtype"
    dtype = d.get(dtype_field, "float32")
    if dtype not in SUPPORTED_DTYPES:
        fail(f"{dtype_field}={shown(dtype)}: expected one of {SUPPORTED_DTYPES}")
    _refuse_unread_math(d, fail)

    def token_id(name, default):
        value = d.get(name, default)
        if value is None:
            return None
        values = value if isinstance(value, list) else [value]
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < ints["vocab_size"]
                             for v in values):
            fail(f"{field(name)}={shown(value)}: expected token id(s) in [0, vocab_size={ints['vocab_size']})")
        return tuple(values) if isinstance(value, list) else value

    tie = d.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        fail(f"tie_word_embeddings={shown(tie)}: expected true or false")

    known = {f.name for f in fields(LlamaConfig)}
    values = dict(ints, rms_norm_eps=rms_norm_eps, rope_theta=rope_theta, tie_word_embeddings=tie,
                  bos_token_id=token_id("bos_token_id", 1), eos_token_id=token_id("eos_token_id", 2),
                  torch_dtype=dtype, rope_scaling_factor=factor)
    return LlamaConfig(**{k: v for k, v in values.items() if k in known})


def _check_family(d, fail):
    """A Llama: the architecture, the activation, no biases."""
    archs = d.get("architectures")
    if archs is not None and archs != ["LlamaForCausalLM"]:
        fail(f"architectures={shown(archs)}: only ['LlamaForCausalLM'] is implemented")
    if archs is None and d.get("model_type") != "llama":
        fail(f"neither architectures nor model_type says this is a Llama model "
             f"(model_type={shown(d.get('model_type'))})")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        fail(f"hidden_act={shown(act)}: only 'silu' (SwiGLU MLP) is implemented")
    for bias in ("attention_bias", "mlp_bias"):
        if d.get(bias, False):
            fail(f"{bias}=true: projections with biases are not implemented")


def _sizes(d, fail, field):
    """The integer sizes, checked: positive, the heads dividing what they share -> {name: value} (head_dim
    worked out when not given)."""
    for name in REQUIRED:
        if name not in d:
            fail(f"missing field '{field(name)}'")
    ints = {}
    for name in REQUIRED + ("num_key_value_heads", "head_dim"):
        value = d.get(name)
        if name == "num_key_value_heads" and value is None:
            value = d["num_attention_heads"]            # HF's default: plain multi-head attention
        if name == "head_dim" and value is None:
            value = 0
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "head_dim" else 1):
            fail(f"{field(name)}={shown(value)}: expected a positive integer")
        ints[name] = value

    n_heads, n_kv_heads = ints["num_attention_heads"], ints["num_key_value_heads"]
    if n_heads % n_kv_heads:
        fail(f"{field('num_attention_heads')}={n_heads} is not a multiple of "
             f"{field('num_key_value_heads')}={n_kv_heads}")
    if not ints["head_dim"]:
        if ints["hidden_size"] % n_heads:
            fail(f"{field('hidden_size')}={ints['hidden_size']} is not divisible by "
                 f"{field('num_attention_heads')}={n_heads}")
        ints["head_dim"] = ints["hidden_size"] // n_heads
    if ints["head_dim"] not in SUPPORTED_HEAD_DIMS:
        fail(f"head_dim={ints['head_dim']}: the numbattn kernels support head_dim in {SUPPORTED_HEAD_DIMS}")
    return ints


def positive_number(value, name, fail):
    """A positive hyper-parameter (an epsilon, a RoPE base, a scaling factor) -> float. The model computes in
    float32, so the value must be one float32 holds, neither inf nor rounded to 0 or to a subnormal: an
    rms_norm_eps of inf (JSON's Infinity, or 1e39) would load and make every logit exactly 0.0. NaN fails
    every comparison, so it is refused too."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not FLOAT32_TINY <= value <= FLOAT32_MAX:
        fail(f"{name}={shown(value)}: expected a positive, finite number (float32 holds {FLOAT32_TINY:.3g} to "
             f"{FLOAT32_MAX:.3g})")
    return float(value)


def _rope(d, fail, field):
    """(rope_theta, linear scaling factor) from either layout of config.json:

        transformers 4:  "rope_theta": 10000.0, "rope_scaling": null | {"type" or "rope_type": ..., "factor": ...}
        transformers 5:  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}   (+ "factor")

    Only no scaling ("default") and "linear" are computed by tinyllm/model.py; any other type, or any other
    key next to them (llama3's frequency factors, YaRN's attention factor, a partial rotary factor...), is
    refused, never dropped.
    """
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    if params is not None and scaling is not None:
        fail("both rope_parameters and rope_scaling are set: which one applies is unclear")
    name, settings = ("rope_parameters", params) if params is not None else ("rope_scaling", scaling)
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        fail(f"{name}={shown(settings)}: expected an object")
    theta = d.get("rope_theta")
    if "rope_theta" in settings:
        if theta is not None and theta != settings["rope_theta"]:
            fail(f"rope_theta={shown(theta)} but {name}.rope_theta={shown(settings['rope_theta'])}")
        theta = settings["rope_theta"]
    theta = positive_number(10000.0 if theta is None else theta, field("rope_theta"), fail)

    kind = settings.get("rope_type", settings.get("type", "default"))
    allowed = {"rope_type", "type", "rope_theta"} | ({"factor"} if kind == "linear" else set())
    if kind not in ("default", "linear") or set(settings) - allowed:
        fail(f"{name}={shown(settings)}: only no scaling (rope_type 'default') or 'linear' is implemented")
    factor = positive_number(settings.get("factor"), field(f"{name}.factor"), fail) if kind == "linear" else 1.0
    return theta, factor


# Fields _parse reads, and fields that do not change the forward pass (bookkeeping, training, generation).
READ_FIELDS = set(REQUIRED) | {
    "architectures", "model_type", "hidden_act", "attention_bias", "mlp_bias", "num_key_value_heads", "head_dim",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "torch_dtype", "dtype", "bos_token_id",
    "eos_token_id", "tie_word_embeddings"}
# A field whose name says it changes the computation: RoPE variants, sliding windows, logit scales and caps,
# multipliers, extra norms, experts, quantized weights. If we do not read it and it is set, we refuse the model.
CHANGES_THE_MATH = re.compile(r"rope|rotary|window|logit|softcap|multiplier|scal|norm|expert|moe|alibi|clip|quant")


def _refuse_unread_math(d, fail):
    for name, value in d.items():
        if name in READ_FIELDS or value is None or value is False:   # null / false: the feature is off
            continue
        if name == "layer_types" and isinstance(value, list) and set(value) <= {"full_attention"}:
            continue                                                  # every layer plain causal attention
        if name == "layer_types" or CHANGES_THE_MATH.search(name):
            fail(f"{clip(name)}={shown(value)}: changes the model's computation and tinyllm does not implement it")
