"""The model's hyper-parameters, read from a Hugging Face `config.json`, for every family tinyllm runs.

    config = load_config("path/to/TinyLlama")      # or LlamaConfig.from_dict(json.load(...))
    config.family                                   # "llama", "mistral", "qwen2", "qwen3", "gemma2" or "gemma3"
    config.head_dim                                 # hidden_size // num_attention_heads unless given

TinyLlama-1.1B-Chat-v1.0: hidden 2048, 22 layers, 32 query heads sharing 4 KV heads (head_dim 64),
intermediate 5632, vocab 32000, rope_theta 10000, rms_norm_eps 1e-5, 2048 positions, bf16, BOS 1, EOS 2.

The families (FAMILIES below) are the Llama block with a few named differences, each a field here: Llama 3's
RoPE frequency scaling (rope_llama3), Mistral's sliding window, Qwen2's q/k/v biases, Qwen3's per-head q/k
norms, Gemma's GeGLU, query_pre_attn_scalar, windows on some layers (layer_types), a local RoPE base and soft
caps. tinyllm/architecture.py turns them into the one description the forward reads.

Only what the forward implements is accepted; anything else (another architecture, another activation, a RoPE
scaling we do not compute, biases a family does not have, a head_dim the numbattn kernels were not built for)
is refused here with a ConfigError naming the file and the field, instead of producing a model that loads fine
and then talks nonsense. That includes fields we do not read at all: a config field whose name says it changes
the computation (a RoPE variant, a sliding window, a logit scale, an expert count...) is refused when it is set
and its family does not read it, never silently defaulted.

Both layouts transformers writes are read: version 4 keeps `rope_theta` (and `rope_scaling`) at the top and
writes `torch_dtype`; version 5 nests them in `rope_parameters` ({"rope_type": "default", "rope_theta": ...},
per layer type for Gemma 3: {"full_attention": {...}, "sliding_attention": {...}}) and writes `dtype`.
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
    family: str = "llama"                           # a key of FAMILIES
    rope_llama3: tuple | None = None                # Llama 3.1's scaling: (factor, low_freq_factor, high_freq_factor,
                                                    #   original_max_position_embeddings)
    rope_freq_factors: tuple | None = None          # the same as llama.cpp stores it (rope_freqs): a divisor per pair
    sliding_window: int | None = None               # tokens a window layer sees (itself and window - 1 before)
    layer_types: tuple = ()                         # per layer "full_attention" / "sliding_attention"; () all full
    rope_local_base_freq: float | None = None       # Gemma 3: the RoPE base of window layers
    query_pre_attn_scalar: float | None = None      # Gemma: scores scaled by query_pre_attn_scalar ** -0.5
    attn_logit_softcapping: float | None = None     # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None    # Gemma 2: logits -> cap * tanh(logits / cap)

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
# The families: which architecture, and which fields beyond the common ones each reads
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    architecture: str     # transformers' class
    model_types: tuple    # config.json's model_type
    activation: str       # the gated MLP's activation, as transformers names it
    reads: frozenset      # fields this family reads (and may therefore be set) beyond the common ones


_WINDOWS = {"sliding_window", "layer_types"}
_QWEN_WINDOWS = _WINDOWS | {"use_sliding_window", "max_window_layers"}
_GEMMA = _WINDOWS | {"hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                     "cache_implementation"}
FAMILIES = {
    "llama": Family("LlamaForCausalLM", ("llama",), "silu", frozenset()),
    "mistral": Family("MistralForCausalLM", ("mistral",), "silu", frozenset({"sliding_window"})),
    "qwen2": Family("Qwen2ForCausalLM", ("qwen2",), "silu", frozenset(_QWEN_WINDOWS)),
    "qwen3": Family("Qwen3ForCausalLM", ("qwen3",), "silu", frozenset(_QWEN_WINDOWS)),
    "gemma2": Family("Gemma2ForCausalLM", ("gemma2",), "gelu_pytorch_tanh",
                     frozenset(_GEMMA | {"sliding_window_size"})),
    "gemma3": Family("Gemma3ForCausalLM", ("gemma3_text",), "gelu_pytorch_tanh", frozenset(
        _GEMMA | {"rope_local_base_freq", "sliding_window_pattern", "_sliding_window_pattern",
                  "use_bidirectional_attention"})),
}
GEMMA = ("gemma2", "gemma3")
QKV_BIAS = ("qwen2",)            # transformers' Qwen2Attention has q/k/v biases whatever the config says
QK_NORM = ("qwen3", "gemma3")
LAYER_TYPES = ("full_attention", "sliding_attention")


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
    family = _check_family(d, fail)
    ints = _sizes(d, fail, field)
    rms_norm_eps = positive_number(d.get("rms_norm_eps", 1e-6), field("rms_norm_eps"), fail)
    rope = _rope(d, fail, field, family)

    dtype_field = "torch_dtype" if "torch_dtype" in d else "dtype"      # transformers 5 writes "dtype"
    dtype = d.get(dtype_field, "float32")
    if dtype not in SUPPORTED_DTYPES:
        fail(f"{dtype_field}={shown(dtype)}: expected one of {SUPPORTED_DTYPES}")
    _refuse_unread_math(d, fail, family)

    def token_id(name, default):
        value = d.get(name, default)
        if value is None:
            return None
        values = value if isinstance(value, list) else [value]
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < ints["vocab_size"]
                             for v in values):
            fail(f"{field(name)}={shown(value)}: expected token id(s) in [0, vocab_size={ints['vocab_size']})")
        return tuple(values) if isinstance(value, list) else value

    tie = d.get("tie_word_embeddings", family in GEMMA)            # Gemma's configs tie by default
    if not isinstance(tie, bool):
        fail(f"tie_word_embeddings={shown(tie)}: expected true or false")

    known = {f.name for f in fields(LlamaConfig)}
    values = dict(ints, rms_norm_eps=rms_norm_eps, tie_word_embeddings=tie, family=family,
                  bos_token_id=token_id("bos_token_id", 1), eos_token_id=token_id("eos_token_id", 2),
                  torch_dtype=dtype, **rope, **_windows(d, fail, field, family, ints["num_hidden_layers"]),
                  **_gemma(d, fail, field, family))
    return LlamaConfig(**{k: v for k, v in values.items() if k in known})


def _check_family(d, fail):
    """The architecture (or model_type) -> the family's name; its activation, and no biases it does not have."""
    archs = d.get("architectures")
    by_arch = {f.architecture: name for name, f in FAMILIES.items()}
    by_type = {t: name for name, f in FAMILIES.items() for t in f.model_types}
    if archs is not None:
        if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str) or archs[0] not in by_arch:
            fail(f"architectures={shown(archs)}: only one of {sorted(by_arch)} is implemented")
        family = by_arch[archs[0]]
    elif isinstance(d.get("model_type"), str) and d["model_type"] in by_type:
        family = by_type[d["model_type"]]
    else:
        fail(f"neither architectures nor model_type names a family tinyllm implements "
             f"(model_type={shown(d.get('model_type'))}; known: {sorted(by_type)})")
    want = FAMILIES[family].activation
    for name in ("hidden_act", "hidden_activation"):
        act = d.get(name, want)
        if not isinstance(act, str) or act != want:
            fail(f"{name}={shown(act)}: {family} models with {want!r} are implemented, not another activation")
    for bias in ("attention_bias", "mlp_bias"):
        if d.get(bias, False):
            fail(f"{bias}=true: projections with biases are not implemented "
                 f"(only Qwen2's q/k/v biases, which its config does not set)")
    return family


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


def positive_int(value, name, fail):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        fail(f"{name}={shown(value)}: expected a positive integer")
    return value


# --------------------------------------------------------------------------------------------------------
# RoPE: the base, and the scalings we compute
# --------------------------------------------------------------------------------------------------------
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(d, fail, field, family):
    """{rope_theta, rope_scaling_factor, rope_llama3, rope_local_base_freq} from either layout of config.json:

        transformers 4:  "rope_theta": 10000.0, "rope_scaling": null | {"type" or "rope_type": ..., "factor": ...}
        transformers 5:  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}   (+ "factor" ...)
                         Gemma 3: {"full_attention": {...}, "sliding_attention": {...}}

    Computed: no scaling ("default"), "linear" (positions divided by factor) and "llama3" (Llama 3.1's
    frequency-dependent factors). Any other type, or any other key next to them (YaRN's attention factor, a
    partial rotary factor...), is refused, never dropped. Gemma 3's window layers have their own base
    (rope_local_base_freq, 10000 by default) and never a scaling.
    """
    params, scaling = d.get("rope_parameters"), d.get("rope_scaling")
    if params is not None and scaling is not None:
        fail("both rope_parameters and rope_scaling are set: which one applies is unclear")
    name, settings = ("rope_parameters", params) if params is not None else ("rope_scaling", scaling)
    settings = {} if settings is None else settings
    if not isinstance(settings, dict):
        fail(f"{name}={shown(settings)}: expected an object")
    local = {"rope_theta": d.get("rope_local_base_freq", 10000.0)} if family == "gemma3" else None
    if set(settings) & set(LAYER_TYPES):                    # transformers 5, per layer type
        if family != "gemma3" or not set(settings) <= set(LAYER_TYPES):
            fail(f"{name}={shown(settings)}: RoPE parameters per layer type are read for Gemma 3 only")
        local = settings.get("sliding_attention", local)
        name, settings = f"{name}.full_attention", settings.get("full_attention", {})
    out = _rope_settings(settings, d.get("rope_theta"), name, fail, field)
    if local is not None:
        local_name = "rope_local_base_freq" if "rope_local_base_freq" in d else f"{name}.sliding_attention"
        local_rope = _rope_settings(local, None, local_name, fail, field)
        if local_rope["rope_scaling_factor"] != 1.0 or local_rope["rope_llama3"]:
            fail(f"{local_name}: a RoPE scaling on window layers is not implemented")
        out["rope_local_base_freq"] = local_rope["rope_theta"]
    return out


def _rope_settings(settings, theta, name, fail, field):
    """One RoPE settings object (and a rope_theta from the top level, if any) -> the config's RoPE fields."""
    if not isinstance(settings, dict):
        fail(f"{name}={shown(settings)}: expected an object")
    if "rope_theta" in settings:
        if theta is not None and theta != settings["rope_theta"]:
            fail(f"rope_theta={shown(theta)} but {name}.rope_theta={shown(settings['rope_theta'])}")
        theta = settings["rope_theta"]
    theta = positive_number(10000.0 if theta is None else theta, field("rope_theta"), fail)
    kind = settings.get("rope_type", settings.get("type", "default"))
    keys = {"linear": ("factor",), "llama3": LLAMA3_KEYS}.get(kind, ()) if isinstance(kind, str) else ()
    if kind not in ("default", "linear", "llama3") or set(settings) - {"rope_type", "type", "rope_theta", *keys}:
        fail(f"{name}={shown(settings)}: only no scaling (rope_type 'default'), 'linear' or 'llama3' is "
             f"implemented")
    out = {"rope_theta": theta, "rope_scaling_factor": 1.0, "rope_llama3": None}
    if kind == "linear":
        out["rope_scaling_factor"] = positive_number(settings.get("factor"), field(f"{name}.factor"), fail)
    if kind == "llama3":
        factor, low, high = (positive_number(settings.get(k), f"{name}.{k}", fail) for k in LLAMA3_KEYS[:3])
        original = positive_int(settings.get(LLAMA3_KEYS[3]), f"{name}.{LLAMA3_KEYS[3]}", fail)
        if not low < high:
            fail(f"{name}: low_freq_factor={low:g} must be below high_freq_factor={high:g}")
        out["rope_llama3"] = (factor, low, high, original)
    return out


# --------------------------------------------------------------------------------------------------------
# Sliding windows and Gemma's fields
# --------------------------------------------------------------------------------------------------------
def _windows(d, fail, field, family, n_layers):
    """{sliding_window, layer_types}: which layers see only the last `sliding_window` tokens, as transformers
    decides it per family: Mistral every layer; Qwen2/3 (only with use_sliding_window) the layers from
    max_window_layers on; Gemma 2 every other layer, from the first; Gemma 3 five of every six
    (sliding_window_pattern 6); an explicit layer_types list wins."""
    window = d.get("sliding_window")
    if family in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
        window = None                                       # transformers ignores it then
    if family == "gemma2" and d.get("sliding_window_size", window) != window:
        fail(f"sliding_window_size={shown(d['sliding_window_size'])} differs from sliding_window={shown(window)}")
    types = d.get("layer_types")
    if types is None and (window is None or family == "llama"):
        return {"sliding_window": None, "layer_types": ()}         # (without building a list of n_layers)
    if types is None:
        types = [_default_layer_type(d, fail, family, i) for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers or any(t not in LAYER_TYPES for t in types):
        fail(f"layer_types={shown(types)}: expected {n_layers} entries, each one of {LAYER_TYPES}")
    if "sliding_attention" not in types:
        return {"sliding_window": None, "layer_types": ()}
    window = positive_int(window, field("sliding_window"), fail)
    if window >= d["max_position_embeddings"]:
        return {"sliding_window": None, "layer_types": ()}  # a window as long as the context hides nothing
    return {"sliding_window": window, "layer_types": tuple(types)}


def _default_layer_type(d, fail, family, i):
    if family == "mistral":
        return "sliding_attention" if d.get("sliding_window") is not None else "full_attention"
    if family in ("qwen2", "qwen3"):
        first = d.get("max_window_layers", 0)
        if isinstance(first, bool) or not isinstance(first, int):
            fail(f"max_window_layers={shown(first)}: expected an integer")
        slides = d.get("use_sliding_window", False) and i >= first
        return "sliding_attention" if slides else "full_attention"
    if family == "gemma2":
        return "sliding_attention" if (i + 1) % 2 else "full_attention"
    if family == "gemma3":
        name = "_sliding_window_pattern" if "_sliding_window_pattern" in d else "sliding_window_pattern"
        pattern = positive_int(d.get(name, 6), name, fail)
        return "sliding_attention" if (i + 1) % pattern else "full_attention"
    return "full_attention"


def _gemma(d, fail, field, family):
    """Gemma's scalars: query_pre_attn_scalar (default head_dim) and the two soft caps (None: none)."""
    if family not in GEMMA:
        return {}
    if d.get("use_bidirectional_attention"):
        fail("use_bidirectional_attention=true: only causal attention is implemented")
    out = {"query_pre_attn_scalar": positive_number(d.get("query_pre_attn_scalar", 256), "query_pre_attn_scalar",
                                                    fail)}
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = d.get(cap)
        out[cap] = None if value is None else positive_number(value, field(cap), fail)
    return out


# Fields _parse reads for every family, and fields that do not change the forward pass (bookkeeping, training,
# generation).
READ_FIELDS = set(REQUIRED) | {
    "architectures", "model_type", "hidden_act", "hidden_activation", "attention_bias", "mlp_bias",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "torch_dtype", "dtype", "bos_token_id", "eos_token_id", "tie_word_embeddings"}
# A field whose name says it changes the computation: RoPE variants, sliding windows, logit scales and caps,
# multipliers, extra norms, experts, quantized weights. If the family does not read it and it is set, we refuse
# the model.
CHANGES_THE_MATH = re.compile(r"rope|rotary|window|logit|softcap|multiplier|scal|norm|expert|moe|alibi|clip|quant|"
                              r"bidirectional")


def _refuse_unread_math(d, fail, family):
    reads = READ_FIELDS | FAMILIES[family].reads
    for name, value in d.items():
        if name in reads or value is None or value is False:           # null / false: the feature is off
            continue
        if name == "layer_types" and isinstance(value, list) and set(value) <= {"full_attention"}:
            continue                                                    # every layer plain causal attention
        if name == "layer_types" or CHANGES_THE_MATH.search(name):
            fail(f"{clip(name)}={shown(value)}: changes the model's computation and tinyllm does not implement it"
                 f"{'' if family == 'llama' else f' for {family}'}")
