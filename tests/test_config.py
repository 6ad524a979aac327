"""tinyllm/config.py: config.json -> LlamaConfig, and the refusal of models tinyllm does not implement."""
import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyllm.config import ConfigError, LlamaConfig, load_config

# TinyLlama/TinyLlama-1.1B-Chat-v1.0's config.json, verbatim.
TINYLLAMA = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632,
    "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 22,
    "num_key_value_heads": 4, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.35.0", "use_cache": True, "vocab_size": 32000,
}


def test_tinyllama_config():
    c = LlamaConfig.from_dict(TINYLLAMA)
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (2048, 5632, 22)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 4, 64)
    assert (c.vocab_size, c.max_position_embeddings, c.rope_theta, c.rms_norm_eps) == (32000, 2048, 10000.0, 1e-5)
    assert (c.bos_token_id, c.eos_token_id, c.eos_token_ids) == (1, 2, (2,))
    assert c.torch_dtype == "bfloat16" and c.tie_word_embeddings is False and c.rope_scaling_factor == 1.0


def test_load_config_from_directory(tiny_model_dir):
    c = load_config(tiny_model_dir)
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (64, 4, 2, 16)


def test_defaults_and_variants():
    d = dict(TINYLLAMA)
    del d["num_key_value_heads"], d["architectures"]       # model_type "llama" is enough; MHA by default
    d.update(eos_token_id=[2, 7], rope_scaling={"type": "linear", "factor": 2.0}, head_dim=128)
    c = LlamaConfig.from_dict(d)
    assert c.num_key_value_heads == 32 and c.eos_token_ids == (2, 7) and c.rope_scaling_factor == 2.0
    assert c.head_dim == 128   # an explicit head_dim wins over hidden_size // num_attention_heads


@pytest.mark.parametrize("change, words", [
    ({"architectures": ["FalconForCausalLM"]}, "architectures"),
    ({"architectures": ["LlamaForCausalLM", "MistralForCausalLM"]}, "architectures"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),      # llama3 needs all four
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_scaling": {"type": "linear", "factor": -1}}, "factor"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_size": 2048 + 32 * 8}, "head_dim"),          # head_dim 72: no kernel for it
    ({"hidden_size": 2050}, "divisible"),
    ({"num_key_value_heads": 5}, "multiple"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"vocab_size": "32000"}, "vocab_size"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
    ({"torch_dtype": "int8"}, "torch_dtype"),
    ({"eos_token_id": 32000}, "eos_token_id"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings"),
])
def test_rejects_unsupported(change, words):
    with pytest.raises(ConfigError, match=words) as e:
        LlamaConfig.from_dict(dict(TINYLLAMA, **change), source="my/config.json")
    assert "my/config.json" in str(e.value)


def test_rejects_missing_field():
    d = dict(TINYLLAMA)
    del d["intermediate_size"]
    with pytest.raises(ConfigError, match="missing field 'intermediate_size'"):
        LlamaConfig.from_dict(d)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json: file not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(TINYLLAMA, hidden_act="relu")))
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load_config(tmp_path)


@pytest.mark.parametrize("field, value", [
    ("rms_norm_eps", float("inf")), ("rms_norm_eps", float("nan")), ("rms_norm_eps", 0.0), ("rms_norm_eps", -1e-5),
    ("rms_norm_eps", 1e39),              # finite in Python, inf in the float32 the model computes in
    ("rms_norm_eps", 1e-50),             # rounds to 0 in float32
    ("rms_norm_eps", "1e-5"), ("rms_norm_eps", True),
    ("rope_theta", float("inf")), ("rope_theta", float("nan")), ("rope_theta", -10000.0),
    ("rope_scaling.factor", float("inf")), ("rope_scaling.factor", float("nan")),
    ("rope_parameters.rope_theta", float("inf")),
])
def test_float_hyper_parameters_must_be_finite_and_positive_and_are_named(field, value):
    """An rms_norm_eps of inf (JSON's Infinity) used to load and make every logit exactly 0.0."""
    d = dict(TINYLLAMA)
    if field == "rope_scaling.factor":
        d["rope_scaling"] = {"type": "linear", "factor": value}
    elif field == "rope_parameters.rope_theta":
        d = dict(d, rope_parameters={"rope_type": "default", "rope_theta": value}, rope_theta=None, rope_scaling=None)
    else:
        d[field] = value
    shown = field.replace("rope_parameters.", "")          # the value read is rope_theta, wherever it was written
    with pytest.raises(ConfigError, match=rf"my/config\.json: {shown}=.*: expected a positive, finite number"):
        LlamaConfig.from_dict(d, source="my/config.json")


def test_infinity_in_config_json_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(TINYLLAMA, rms_norm_eps=float("inf"))))
    assert "Infinity" in (tmp_path / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"rms_norm_eps=inf: expected a positive, finite number"):
        load_config(tmp_path)


def test_echoed_values_and_field_names_are_cut_to_200_characters():
    for change in ({"architectures": ["A" * 10**6]}, {"hidden_act": "g" * 10**6}, {"x_rope_" + "y" * 10**6: 1}):
        with pytest.raises(ConfigError) as e:
            LlamaConfig.from_dict(dict(TINYLLAMA, **change))
        assert len(str(e.value)) < 600 and "…" in str(e.value)


def test_head_counts_are_named_with_the_names_the_source_uses():
    with pytest.raises(ConfigError, match=r"hidden_size=2048 is not divisible by num_attention_heads=5$"):
        LlamaConfig.from_dict(dict(TINYLLAMA, num_attention_heads=5, num_key_value_heads=5))
    gguf_names = {"hidden_size": "llama.embedding_length", "num_attention_heads": "llama.attention.head_count"}
    with pytest.raises(ConfigError, match=r"llama\.embedding_length=2048 is not divisible by "
                                          r"llama\.attention\.head_count=5$"):
        LlamaConfig.from_dict(dict(TINYLLAMA, num_attention_heads=5, num_key_value_heads=5), names=gguf_names)


@pytest.mark.parametrize("name, size", [("config.json", 8 << 30), ("config.json", (16 << 20) + 1)])
def test_a_config_json_too_large_to_be_one_is_refused_unread(tmp_path, name, size):
    with open(tmp_path / name, "wb") as f:
        f.truncate(size)                                  # sparse: no disk, no time
    with pytest.raises(ConfigError, match=rf"config\.json: {size:,} bytes, more than the 16,777,216"):
        load_config(tmp_path)


def test_a_config_json_that_is_not_a_regular_file_is_refused_without_waiting(tmp_path):
    import os
    os.mkfifo(tmp_path / "config.json")                   # open() would wait for a writer forever
    with pytest.raises(ConfigError, match=r"config\.json: not a regular file"):
        load_config(tmp_path)


# --------------------------------------------------------------------------------------------------------
# transformers 5's layout, and fields that change the math
# --------------------------------------------------------------------------------------------------------
def transformers5(d):
    """d as transformers 5 saves it: rope_theta inside rope_parameters, dtype instead of torch_dtype."""
    d = dict(d)
    d["rope_parameters"] = {"rope_theta": d.pop("rope_theta"), "rope_type": "default"}
    d["dtype"] = d.pop("torch_dtype")
    del d["rope_scaling"]
    return dict(d, transformers_version="5.0.0", attention_dropout=0.0, pad_token_id=None, mlp_bias=False)


def test_transformers5_layout_reads_rope_theta_and_dtype():
    c = LlamaConfig.from_dict(transformers5(dict(TINYLLAMA, rope_theta=100000.0)))
    assert c.rope_theta == 100000.0 and c.torch_dtype == "bfloat16"      # not the 10000 default
    assert c == LlamaConfig.from_dict(dict(TINYLLAMA, rope_theta=100000.0))
    d = transformers5(TINYLLAMA)
    d["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}
    c = LlamaConfig.from_dict(d)
    assert (c.rope_theta, c.rope_scaling_factor) == (500000.0, 4.0)


def test_transformers5_layout_gives_the_same_logits(tmp_path, tiny_model_dir):
    import shutil

    import numpy as np

    from tinyllm import load_model
    d = shutil.copytree(tiny_model_dir, tmp_path / "v5")
    config = dict(json.loads((d / "config.json").read_text()), rope_theta=500.0)   # far from the default
    (d / "config.json").write_text(json.dumps(transformers5(config)))
    shutil.copytree(tiny_model_dir, tmp_path / "v4")
    (tmp_path / "v4" / "config.json").write_text(json.dumps(config))
    ids = np.array([[1, 300, 301, 302, 303, 304, 305, 306]])
    v4, v5 = (load_model(tmp_path / v, backend="numpy").forward(ids) for v in ("v4", "v5"))
    default = load_model(tiny_model_dir, backend="numpy").forward(ids)             # rope_theta 10000
    assert np.array_equal(v4, v5) and not np.allclose(v5, default, atol=1e-3)


@pytest.mark.parametrize("change, words", [
    ({"rope_parameters": {"rope_type": "longrope", "factor": 8.0, "rope_theta": 5e5}}, "rope_parameters"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "rope_parameters"),
    ({"rope_parameters": {"rope_theta": 500000.0}, "rope_theta": 10000.0}, "rope_theta=10000.0 but"),
    ({"rope_parameters": {"rope_type": "default"}, "rope_scaling": {"type": "linear", "factor": 2.0}}, "both"),
    ({"rope_parameters": [1, 2]}, "expected an object"),
    ({"dtype": "int4", "torch_dtype": None}, "dtype='int4'"),
    ({"sliding_window": 4096}, "sliding_window=4096"),
    ({"logit_scale": 0.5}, "logit_scale"),
    ({"final_logit_softcapping": 30.0}, "softcapping"),
    ({"embedding_multiplier": 12.0}, "embedding_multiplier"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"num_local_experts": 8}, "num_local_experts"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config"),
    ({"use_qk_norm": True}, "use_qk_norm"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
])
def test_refuses_fields_that_change_the_math(change, words):
    d = {k: v for k, v in dict(TINYLLAMA, **change).items() if v is not None or k != "torch_dtype"}
    with pytest.raises(ConfigError, match=words):
        LlamaConfig.from_dict(d, source="my/config.json")


def test_switched_off_and_harmless_fields_are_accepted():
    c = LlamaConfig.from_dict(dict(TINYLLAMA, sliding_window=None, use_sliding_window=False, layer_types=[
        "full_attention"] * 22, attention_dropout=0.0, pretraining_tp=1, _name_or_path="x", pad_token_id=None))
    assert c == LlamaConfig.from_dict(TINYLLAMA)


def test_deeply_nested_json_names_the_file(tmp_path):
    """json.loads of 100000 nested brackets raised "maximum recursion depth exceeded", naming no file."""
    for text in ("[" * 100000 + "]" * 100000, '{"a": ' * 100000 + "1" + "}" * 100000):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ConfigError, match=rf"{tmp_path / 'config.json'}: JSON nested too deeply to parse"):
            load_config(tmp_path)


# --------------------------------------------------------------------------------------------------------
# Fuzzing: whatever the file holds, a ConfigError or a valid config, nothing else
# --------------------------------------------------------------------------------------------------------
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=20)
# TinyLlama's fields with random values (and random extra fields), so the checks past the first are reached too
MUTATED = st.fixed_dictionaries({}, optional={k: st.just(v) | JSON for k, v in TINYLLAMA.items()}).flatmap(
    lambda d: st.dictionaries(st.text(max_size=8), JSON, max_size=3).map(lambda extra: {**extra, **d}))


@settings(max_examples=120, deadline=None)
@given(d=MUTATED | JSON)
def test_fuzz_config_random_json(d):
    with contextlib.suppress(ConfigError):
        LlamaConfig.from_dict(d)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=100))
def test_fuzz_config_random_bytes(tmp_path, data):
    (tmp_path / "config.json").write_bytes(data)
    with contextlib.suppress(ConfigError):
        load_config(tmp_path)
