"""The model's hyper-parameters, read from a Hugging Face `config.json` (LlamaForCausalLM).

    config = load_config("path/to/TinyLlama")      # or LlamaConfig.from_dict(json.load(...))
    config.head_dim                                 # hidden_size // num_attention_heads unless given

TinyLlama-1.1B-Chat-v1.0: hidden 2048, 22 layers, 32 query heads sharing 4 KV heads (head_dim 64),
intermediate 5632, vocab 32000, rope_theta 10000, rms_norm_eps 1e-5, 2048 positions, bf16, BOS 1, EOS 2.

Only what tinyllm/model.py implements is accepted; anything else (another architecture, another activation,
a RoPE scaling we do not compute, biases in the projections, a head_dim the numbattn kernels were not built
for) is refused here with a ConfigError naming the file and the field, instead of producing a model that
loads fine and then talks nonsense.
"""
import json
from dataclasses import dataclass, fields
from pathlib import Path

from numbattn.validate import SUPPORTED_HEAD_DIMS


class ConfigError(ValueError):
    """config.json is missing, unreadable, or describes a model tinyllm does not implement."""


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
    def from_dict(cls, d, source="config.json"):
        """Build and validate a config from the parsed JSON; errors name `source`."""
        return _parse(d, source)


def load_config(model_dir):
    """Read and validate `model_dir/config.json`."""
    path = Path(model_dir) / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (every Hugging Face model directory has a config.json)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from e
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply to parse (a config.json is two levels deep)") from None
    return _parse(d, str(path))


# --------------------------------------------------------------------------------------------------------
# Parsing and validation
# --------------------------------------------------------------------------------------------------------
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "vocab_size")


def _parse(d, source):
    def fail(msg):
        raise ConfigError(f"{source}: {msg}")

    if not isinstance(d, dict):
        fail(f"expected a JSON object, got {type(d).__name__}")

    archs = d.get("architectures")
    if archs is not None and archs != ["LlamaForCausalLM"]:
        fail(f"architectures={archs!r}: only ['LlamaForCausalLM'] is implemented")
    if archs is None and d.get("model_type") != "llama":
        fail(f"neither architectures nor model_type says this is a Llama model (model_type={d.get('model_type')!r})")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        fail(f"hidden_act={act!r}: only 'silu' (SwiGLU MLP) is implemented")
    for bias in ("attention_bias", "mlp_bias"):
        if d.get(bias, False):
            fail(f"{bias}=true: projections with biases are not implemented")

    for name in REQUIRED:
        if name not in d:
            fail(f"missing field {name!r}")
    ints = {}
    for name in REQUIRED + ("num_key_value_heads", "head_dim"):
        value = d.get(name)
        if name == "num_key_value_heads" and value is None:
            value = d["num_attention_heads"]            # HF's default: plain multi-head attention
        if name == "head_dim" and value is None:
            value = 0
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "head_dim" else 1):
            fail(f"{name}={value!r}: expected a positive integer")
        ints[name] = value

    n_heads, n_kv_heads = ints["num_attention_heads"], ints["num_key_value_heads"]
    if n_heads % n_kv_heads:
        fail(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv_heads}")
    head_dim = ints["head_dim"]
    if not head_dim:
        if ints["hidden_size"] % n_heads:
            fail(f"hidden_size={ints['hidden_size']} is not divisible by num_attention_heads={n_heads}")
        head_dim = ints["hidden_size"] // n_heads
    if head_dim not in SUPPORTED_HEAD_DIMS:
        fail(f"head_dim={head_dim}: the numbattn kernels support head_dim in {SUPPORTED_HEAD_DIMS}")

    floats = {}
    for name, default in (("rms_norm_eps", 1e-6), ("rope_theta", 10000.0)):
        value = d.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            fail(f"{name}={value!r}: expected a positive number")
        floats[name] = float(value)

    factor = 1.0
    scaling = d.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
        if kind == "default":
            pass
        elif kind == "linear":
            factor = scaling.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
                fail(f"rope_scaling.factor={factor!r}: expected a positive number")
            factor = float(factor)
        else:
            fail(f"rope_scaling={scaling!r}: only no scaling or type 'linear' is implemented")

    dtype = d.get("torch_dtype", d.get("dtype", "float32"))
    if dtype not in SUPPORTED_DTYPES:
        fail(f"torch_dtype={dtype!r}: expected one of {SUPPORTED_DTYPES}")

    def token_id(name, default):
        value = d.get(name, default)
        if value is None:
            return None
        values = value if isinstance(value, list) else [value]
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < ints["vocab_size"]
                             for v in values):
            fail(f"{name}={value!r}: expected token id(s) in [0, vocab_size={ints['vocab_size']})")
        return tuple(values) if isinstance(value, list) else value

    tie = d.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        fail(f"tie_word_embeddings={tie!r}: expected true or false")

    known = {f.name for f in fields(LlamaConfig)}
    values = dict(ints, **floats, head_dim=head_dim, num_key_value_heads=n_kv_heads, tie_word_embeddings=tie,
                  bos_token_id=token_id("bos_token_id", 1), eos_token_id=token_id("eos_token_id", 2),
                  torch_dtype=dtype, rope_scaling_factor=factor)
    return LlamaConfig(**{k: v for k, v in values.items() if k in known})
