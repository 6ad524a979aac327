"""tinyllm/weights.py: the safetensors reader/writer, bf16 conversion, and checkpoint-vs-config checks.

A checkpoint is untrusted input: every malformed file below must be refused with a WeightsError that names
the file and the problem, before a byte of tensor data is interpreted.
"""
import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyllm.config import load_config
from tinyllm.tiny import make_tiny
from tinyllm.weights import (Checkpoint, SafetensorsFile, WeightsError, bf16_to_f32, expected_shapes, f32_to_bf16,
                             load_weights, read_header, save_file)

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------------
# bf16
# --------------------------------------------------------------------------------------------------------
def bits(x):
    return np.array(x, dtype=np.float32).view(np.uint32)


def test_bf16_round_to_nearest_even():
    cases = {  # fp32 bit pattern -> expected bf16 bits
        0x3F800000: 0x3F80,   # 1.0, exact
        0x3F808000: 0x3F80,   # exactly halfway, kept part even: stays
        0x3F818000: 0x3F82,   # exactly halfway, kept part odd: rounds up to even
        0x3F808001: 0x3F81,   # just above halfway: up
        0x3F807FFF: 0x3F80,   # just below halfway: down
        0xBF808001: 0xBF81,   # negative: magnitude rounds the same way
        0x7F800000: 0x7F80,   # +inf
        0x7F7FFFFF: 0x7F80,   # float32 max rounds to inf, as in torch
        0x00000001: 0x0000,   # smallest subnormal rounds to zero
    }
    x = np.array(list(cases), dtype=np.uint32).view(np.float32)
    assert f32_to_bf16(x).tolist() == list(cases.values())
    nan = f32_to_bf16(np.array([np.nan, -np.nan], np.float32))
    assert np.isnan(bf16_to_f32(nan)).all()


def test_bf16_to_f32_is_exact_and_roundtrips():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 5)).astype(np.float32) * 10.0 ** rng.integers(-30, 30, (37, 5))
    b = f32_to_bf16(x)
    y = bf16_to_f32(b)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.array_equal(f32_to_bf16(y), b)                          # bf16 -> f32 -> bf16 is the identity
    assert np.all(np.abs(y - x) <= np.abs(x) * 2.0 ** -8)            # half an ulp of a 7-bit mantissa
    assert np.array_equal(bits(y) & 0xFFFF, np.zeros_like(bits(y)))  # low half zero: exactly representable


# --------------------------------------------------------------------------------------------------------
# Reading and writing one file
# --------------------------------------------------------------------------------------------------------
def test_save_and_read_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32),
               "c": rng.standard_normal((2, 1, 3)).astype(np.float32), "empty": np.zeros((0, 4), np.float32)}
    path = tmp_path / "x.safetensors"
    save_file(path, tensors, dtype={"a": "F32", "b": "F16", "c": "BF16", "empty": "F32"}, metadata={"format": "pt"})
    f = SafetensorsFile(path)
    assert f.metadata == {"format": "pt"}
    assert {n: (t.dtype, t.shape) for n, t in f.tensors.items()} == {
        "a": ("F32", (3, 4)), "b": ("F16", (5,)), "c": ("BF16", (2, 1, 3)), "empty": ("F32", (0, 4))}
    assert f.data_start % 8 == 0                                     # header padded: aligned data section
    assert np.array_equal(f.get("a"), tensors["a"])
    assert np.array_equal(f.get("b"), tensors["b"].astype(np.float16).astype(np.float32))
    assert np.array_equal(f.get("c"), bf16_to_f32(f32_to_bf16(tensors["c"])))
    assert f.get("a").dtype == np.float32 and f.get("empty").shape == (0, 4)
    assert not f.raw("a").flags.writeable                          # a view of the file, never written through


def write_raw(path, header, data=b"", header_len=None):
    """A .safetensors file with any header (valid or not) and data section."""
    head = json.dumps(header).encode() if not isinstance(header, bytes) else header
    n = len(head) if header_len is None else header_len
    path.write_bytes(n.to_bytes(8, "little") + head + data)
    return path


def t(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize("header, data, header_len, problem", [
    (None, None, None, "truncated file"),
    ({"a": t("F32", [2], 0, 8)}, b"\0" * 8, 10**6, "beyond the end of the file"),
    ({"a": t("F32", [2], 0, 8)}, b"\0" * 8, 200 * 1024 * 1024, "exceeds the"),
    ({"a": t("F32", [2], 0, 8)}, b"\0" * 8, (16 << 20) + 1, "16777217 bytes exceeds the 16777216-byte limit"),
    ({"a": t("F32", [4], 0, 16)}, b"\0" * 8, None, "outside the data section"),
    ({"a": t("F32", [3], 0, 8)}, b"\0" * 8, None, "needs 12 bytes but data_offsets"),
    ({"a": t("Q4", [2], 0, 8)}, b"\0" * 8, None, "unknown dtype"),
    ({"a": t("I64", [1], 0, 8)}, b"\0" * 8, None, "not supported"),
    ({"a": t("F32", [2], 0, 8), "b": t("F32", [2], 4, 12)}, b"\0" * 12, None, "overlap"),
    ({"a": t("F32", [1], 4, 8)}, b"\0" * 8, None, "gap"),
    ({"a": t("F32", [1], 0, 4)}, b"\0" * 8, None, "truncated or padded"),
    ({"a": t("F32", [2], 8, 0)}, b"\0" * 8, None, "data_offsets"),
    ({"a": t("F32", [-2], 0, 0)}, b"", None, "shape"),
    ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, None, "expected exactly the keys"),
    ({"__metadata__": {"format": 1}}, b"", None, "__metadata__"),
    (b"{not json", b"", None, "not valid UTF-8 JSON"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', b"\0" * 4, None, "duplicate"),
    (b"[1, 2]", b"", None, "must be a JSON object"),
    (b"[" * 100000 + b"]" * 100000, b"", None, "nested too deeply"),
    ({"a": t(["F32"], [1], 0, 4)}, b"\0" * 4, None, "unknown dtype"),
])
def test_reader_rejects_malformed_files(tmp_path, header, data, header_len, problem):
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(b"\x10\0\0")                      # 3 bytes: not even a header length
    else:
        write_raw(path, header, data, header_len)
    with pytest.raises(WeightsError, match=problem) as e:
        SafetensorsFile(path).get("a")
    assert str(path) in str(e.value)


def test_many_tensors_and_a_duplicate_are_checked_in_linear_time(tmp_path):
    """The duplicate-key check compared every key with every other: 20 thousand tensors took 8 s, a million
    would never end. Linear, 20 thousand take ~0.1 s."""
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(20000))
    for extra in ("", ',"t7":{}'):
        head = ("{" + entries + extra + "}").encode()
        (tmp_path / "m.safetensors").write_bytes(len(head).to_bytes(8, "little") + head)
        t0 = time.perf_counter()
        if extra:
            with pytest.raises(WeightsError, match="duplicate key 't7'"):
                SafetensorsFile(tmp_path / "m.safetensors")
        else:
            assert len(SafetensorsFile(tmp_path / "m.safetensors").tensors) == 20000
        assert time.perf_counter() - t0 < 5


def test_a_shard_index_too_large_to_be_one_is_refused_unread(tmp_path):
    with open(tmp_path / "model.safetensors.index.json", "wb") as f:
        f.truncate(4 << 30)
    with pytest.raises(WeightsError, match=r"index\.json: 4,294,967,296 bytes, more than the 16,777,216"):
        Checkpoint(tmp_path)


def test_metadata_is_allowed_and_a_truncated_real_file_is_refused(tmp_path, tiny_model_dir):
    path = write_raw(tmp_path / "m.safetensors", {"__metadata__": {"format": "pt"}, "a": t("F16", [2], 0, 4)},
                     b"\0\x3c\0\x40")
    assert SafetensorsFile(path).get("a").tolist() == [1.0, 2.0]
    data = (tiny_model_dir / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])                           # a download that stopped early
    with pytest.raises(WeightsError, match="outside the data section"):
        SafetensorsFile(cut)


# --------------------------------------------------------------------------------------------------------
# Checkpoints: single file, shards, and the match with config.json
# --------------------------------------------------------------------------------------------------------
def copy_tiny(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(model_dir, edit):
    """Load the tiny checkpoint's tensors, let edit(dict) change them, write them back (bf16)."""
    f = SafetensorsFile(model_dir / "model.safetensors")
    tensors = {name: f.get(name) for name in f.tensors}
    edit(tensors)
    save_file(model_dir / "model.safetensors", tensors, dtype="BF16")


def test_load_weights_layout_and_values(tiny_model_dir):
    config = load_config(tiny_model_dir)
    calls = []
    w = load_weights(tiny_model_dir, config, progress=lambda i, n, name: calls.append((i, n, name)))
    n = len(expected_shapes(config))
    assert calls[0] == (0, n, "model.embed_tokens.weight") and calls[-1] == (n, n, "") and len(calls) == n + 1
    f = SafetensorsFile(tiny_model_dir / "model.safetensors")
    wq = f.get("model.layers.1.self_attn.q_proj.weight")               # [out, in] as stored
    assert np.array_equal(w.layers[1].wq, wq.T) and w.layers[1].wq.flags.c_contiguous
    assert w.layers[0].w_down.shape == (config.intermediate_size, config.hidden_size)
    assert w.lm_head.shape == (config.hidden_size, config.vocab_size) and w.lm_head.dtype == np.float32
    assert np.array_equal(w.embed, f.get("model.embed_tokens.weight"))


def test_tied_embeddings(tmp_path):
    d = make_tiny(tmp_path / "tied", tie_word_embeddings=True)
    config = load_config(d)
    assert "lm_head.weight" not in SafetensorsFile(d / "model.safetensors").tensors
    w = load_weights(d, config)
    assert np.array_equal(w.lm_head, w.embed.T) and np.shares_memory(w.lm_head, w.embed)   # a view: no second copy


def test_sharded_checkpoint(tmp_path, tiny_model_dir):
    d = copy_tiny(tiny_model_dir, tmp_path / "sharded")
    f = SafetensorsFile(d / "model.safetensors")
    names = list(f.tensors)
    shards = {"model-00001-of-00002.safetensors": names[:7], "model-00002-of-00002.safetensors": names[7:]}
    for shard, part in shards.items():
        save_file(d / shard, {n: f.get(n) for n in part}, dtype={n: "F32" if i % 2 else "BF16" for i, n in
                                                                  enumerate(part)})
    index = {"metadata": {"total_size": 0}, "weight_map": {n: s for s, part in shards.items() for n in part}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    want = load_weights(tiny_model_dir, load_config(d))
    (d / "model.safetensors").unlink()
    got = load_weights(d, load_config(d))
    assert np.array_equal(got.lm_head, want.lm_head) and np.array_equal(got.layers[1].w_up, want.layers[1].w_up)
    assert set(Checkpoint(d).files) == set(shards)

    index["weight_map"][names[0]] = "../../etc/passwd.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="not a .safetensors file name"):
        Checkpoint(d)
    index["weight_map"][names[0]] = "model-00002-of-00002.safetensors"   # the tensor is in the other shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=f"maps '{names[0]}' to model-00002-of-00002.safetensors"):
        Checkpoint(d)


def test_no_checkpoint(tmp_path):
    with pytest.raises(WeightsError, match="no model.safetensors"):
        Checkpoint(tmp_path)


def test_missing_tensor(tmp_path, tiny_model_dir):
    d = copy_tiny(tiny_model_dir, tmp_path / "m")
    rewrite_weights(d, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'.*\(172, 64\)"):
        load_weights(d, load_config(d))


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path, tiny_model_dir):
    d = copy_tiny(tiny_model_dir, tmp_path / "m")
    rewrite_weights(d, lambda w: w.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64))}))
    with pytest.raises(WeightsError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(16, 64\) "
                                           r"but .*config.json implies \(32, 64\)"):
        load_weights(d, load_config(d))


def test_config_not_matching_weights(tmp_path, tiny_model_dir):
    d = copy_tiny(tiny_model_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] = 256                     # weights were made for 172
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"mlp.gate_proj.weight' has shape \(172, 64\) .* \(256, 64\): "
                                           r"config and weights do not match"):
        load_weights(d, load_config(d))


def test_extra_tensors_are_ignored(tmp_path, tiny_model_dir):
    d = copy_tiny(tiny_model_dir, tmp_path / "m")
    rewrite_weights(d, lambda w: w.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8)}))
    load_weights(d, load_config(d))


def poke(name, index, value):
    """An edit for rewrite_weights: one value of one tensor."""
    def edit(tensors):
        tensors[name] = tensors[name].copy()
        tensors[name][index] = value
    return edit


def test_nan_or_inf_in_a_tensor_is_refused_at_load_naming_it(tmp_path, tiny_model_dir):
    """They made the model say "ning,ning,..." or nothing at all, with a NumPy RuntimeWarning."""
    d = copy_tiny(tiny_model_dir, tmp_path / "m")
    rewrite_weights(d, poke("model.layers.1.mlp.down_proj.weight", (3, 5), np.nan))
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.down_proj\.weight' "
                                           r"holds 1 non-finite values \(NaN or inf\), e\.g\. nan at index \(3, 5\)"):
        load_weights(d, load_config(d))
    rewrite_weights(d, poke("model.layers.1.mlp.down_proj.weight", (3, 5), 0.0))
    rewrite_weights(d, poke("model.norm.weight", 7, -np.inf))
    with pytest.raises(WeightsError, match=r"'model\.norm\.weight' holds 1 non-finite values .* -inf at index \(7,\)"):
        load_weights(d, load_config(d))

    class Opened:            # a checkpoint object (a GGUF file's, say) is checked the same way
        def __init__(self, ckpt):
            self.ckpt, self.shapes = ckpt, ckpt.shapes

        def get(self, name):
            x = self.ckpt.get(name)
            return np.full_like(x, np.inf) if name == "lm_head.weight" else x

        def file_of(self, name):
            return "model.gguf"
    rewrite_weights(d, poke("model.norm.weight", 7, 1.0))
    with pytest.raises(WeightsError, match=r"model\.gguf: tensor 'lm_head\.weight' holds 32,768 non-finite"):
        load_weights(Opened(Checkpoint(d)), load_config(d))


def test_a_config_claiming_ten_million_layers_fails_at_once(tmp_path, tiny_model_dir):
    """It took 35 s and 6 GB to build the table of 9 * 10**7 expected tensor names before failing."""
    d = copy_tiny(tiny_model_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["num_hidden_layers"] = 10 ** 7
    (d / "config.json").write_text(json.dumps(config))
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match=r"missing tensor 'model\.layers\.2\.input_layernorm\.weight' .*"
                                           r"config\.json says num_hidden_layers=10,000,000"):
        load_weights(d, load_config(d))
    assert time.perf_counter() - t0 < 1.0


# --------------------------------------------------------------------------------------------------------
# Fuzzing the header parser: whatever the bytes, a WeightsError or a valid header, nothing else
# --------------------------------------------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20)
ENTRY = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "Q4"]) | JSON,
                               "shape": st.lists(st.integers(-2, 5), max_size=3) | JSON,
                               "data_offsets": st.lists(st.integers(-2, 64), min_size=2, max_size=2) | JSON})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_fuzz_header_random_bytes(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    with contextlib.suppress(WeightsError):
        read_header(path)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(max_size=6), ENTRY | JSON, max_size=4), data=st.binary(max_size=64),
       slack=st.integers(-4, 4))
def test_fuzz_header_random_json(tmp_path, header, data, slack):
    path = tmp_path / "fuzz.safetensors"
    head = json.dumps(header).encode()
    path.write_bytes(max(0, len(head) + slack).to_bytes(8, "little") + head + data)
    with contextlib.suppress(WeightsError):
        read_header(path)


# --------------------------------------------------------------------------------------------------------
# The miniature checkpoint itself
# --------------------------------------------------------------------------------------------------------
def digest(d):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(d).iterdir())}


def test_make_tiny_is_deterministic_fast_and_in_hf_layout(tmp_path, tiny_model_dir):
    t0 = time.perf_counter()
    d = make_tiny(tmp_path / "again", seed=0)
    assert time.perf_counter() - t0 < 2.0
    assert digest(d) == digest(tiny_model_dir)
    assert set(digest(d)) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                              "tokenizer_config.json"}
    assert all(info.dtype == "BF16" for info in read_header(d / "model.safetensors")[0].values())
    assert digest(make_tiny(tmp_path / "seed1", seed=1))["model.safetensors"] != digest(d)["model.safetensors"]


def test_make_tiny_script(tmp_path, tiny_model_dir):
    out = subprocess.run([sys.executable, str(ROOT / "weights" / "make_tiny.py"), str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert digest(tmp_path / "s") == digest(tiny_model_dir)
