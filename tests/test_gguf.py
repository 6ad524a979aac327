"""tinyllm/gguf.py: GGUF files written by the tests (tests/gguf_files.py, llama.cpp's converter in miniature)
from the miniature checkpoint must give the safetensors model's logits and tokenizer.json's token ids, and
every malformed or unsupported file must be refused with one clear error.
"""
import dataclasses
import json
import os
import re
import shutil
import struct
import time

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize
from gguf_files import (CHATML, byte_level_tokenizer, gguf_name, hf_tensors, llama_cpp_permute,
                        llama_tokenizer_json, round_trip, storage_type, write_gguf)

import tinyllm.gguf
from tinyllm import ConfigError, TokenizerError, WeightsError, load_model
from tinyllm.gguf import GGUFCheckpoint, merges_from_scores, read_header
from tinyllm.tiny import CORPUS, make_tiny
from tinyllm.tokenizer import Tokenizer
from tinyllm.weights import Checkpoint, save_file

PROMPT = "The quick brown fox jumps over the lazy dog. Attention is all you need!"
TEXTS = CORPUS + [
    "", " ", "  two leading spaces", "trailing  ", "Hello world!\n\nNew paragraph.\tTab.", "€100 and 😀 emoji",
    "naïve café, déjà vu", "1234567890 and 3.14159", "<s>starts with BOS</s> and </s> inside",
    "<|user|>\nHi</s>\n<|assistant|>\n", "don't, won't, they'll, I'm", "x" * 40,
]


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)


def logits(model, text=PROMPT):
    ids = model.tokenizer.encode(text)
    model.reset()
    return model.forward(np.array([ids]))[0]


@pytest.fixture(autouse=True)
def exact_activations(monkeypatch):
    """These tests hold the file reading to the weights it stores (1e-4 against the same weights as safetensors), so
    the CPU kernels take x in fp32 here; their int8 activations (the default) are tests/test_cpu_linear.py's."""
    from numbattn import cpu_linear
    monkeypatch.setattr(cpu_linear, "ACTIVATIONS", "fp32")


def reference_dir(tmp_path, model_dir, tensors):
    """model_dir with its weights replaced by `tensors`, stored as F32 safetensors."""
    d = shutil.copytree(model_dir, tmp_path / "reference")
    save_file(d / "model.safetensors", tensors, dtype="F32")
    return d


# --------------------------------------------------------------------------------------------------------
# Weights: every supported type, the q/k permutation, tied and untied heads
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_equal_the_safetensors_model_within_the_quantization_error(tmp_path, tiny_model_dir, tied_dir,
                                                                           qtype, tied):
    model_dir = tied_dir if tied else tiny_model_dir
    path = write_gguf(tmp_path / f"m.{qtype}.gguf", model_dir, qtype)
    got = load_model(path, backend="numpy")
    original = load_model(model_dir, backend="numpy")
    # the same model with each tensor replaced by what its GGUF type keeps of it, stored as safetensors
    kept = {name: round_trip(x, storage_type(name, x, qtype)) for name, x in hf_tensors(model_dir).items()}
    quantized = load_model(reference_dir(tmp_path, model_dir, kept), backend="numpy")

    want, err = logits(quantized), np.abs(logits(quantized) - logits(original)).max()
    assert np.abs(logits(got) - want).max() <= 1e-4 * np.abs(want).max()        # the GGUF path adds nothing
    assert np.abs(logits(got) - logits(original)).max() <= err + 1e-4 * np.abs(want).max()
    if qtype in ("F32", "BF16"):                      # the miniature is bf16: these keep it exactly
        assert err == 0
    else:                                             # measured: Q8_0 ~1%, 4-5 bits ~5-20% of the logit range
        assert 0 < err < 0.25 * np.abs(want).max()
    assert got.config.tie_word_embeddings == tied
    assert dataclasses.replace(got.config, torch_dtype="bfloat16") == original.config   # GGUF: no torch_dtype
    assert got.tokenizer.encode(PROMPT) == original.tokenizer.encode(PROMPT)


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_a_big_endian_file_gives_the_same_model(tmp_path, tiny_model_dir, qtype):
    """Every number of the header and of F32/F16 tensors swapped: our header reader and tensor views must
    follow the byte order (GGUFWriter writes it; llama.cpp converts for s390x this way)."""
    little = load_model(write_gguf(tmp_path / "le.gguf", tiny_model_dir, qtype), backend="numpy")
    big = load_model(write_gguf(tmp_path / "be.gguf", tiny_model_dir, qtype, big_endian=True), backend="numpy")
    assert big.config == little.config and np.array_equal(logits(big), logits(little))
    name = "model.layers.0.self_attn.q_proj.weight"
    if qtype != "Q8_0":
        assert np.array_equal(GGUFCheckpoint(tmp_path / "be.gguf").raw(name),
                              GGUFCheckpoint(tmp_path / "le.gguf").raw(name))


def test_a_wrong_qk_permutation_runs_but_changes_the_logits(tmp_path, tiny_model_dir, monkeypatch):
    path = write_gguf(tmp_path / "m.gguf", tiny_model_dir, "F32")
    want = logits(load_model(tiny_model_dir, backend="numpy"))
    assert np.abs(logits(load_model(path, backend="numpy")) - want).max() < 1e-4
    monkeypatch.setattr(tinyllm.gguf, "unpermute_rows", lambda w, n_heads: w)     # forget to undo llama.cpp's
    wrong = logits(load_model(path, backend="numpy"))
    assert np.isfinite(wrong).all() and np.abs(wrong - want).max() > 0.1 * np.abs(want).max()


def test_unpermute_undoes_llama_cpps_permutation_per_head():
    w = np.arange(4 * 8 * 3).reshape(32, 3)          # 4 heads of head_dim 8, 3 inputs
    assert np.array_equal(tinyllm.gguf.unpermute_rows(llama_cpp_permute(w, 4), 4), w)
    # GGUF row 2i + j of a head is Hugging Face's row j * head_dim/2 + i: the pair (x_i, x_i+4) sits together
    assert llama_cpp_permute(w, 4)[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]


K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_k_quants(tmp_path, qtype):
    """K-quants (what most llama.cpp downloads use) need rows of 256: a wider miniature. gguf cannot quantize
    to them, so the blocks are random bytes below 0x30 (every fp16 scale then finite and < 0.125)."""
    model_dir = make_tiny(tmp_path / "wide", hidden_size=256, intermediate_size=512)
    rng = np.random.default_rng(0)
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    weights, raw = {}, {}
    for name, x in hf_tensors(model_dir).items():
        if x.ndim == 1:
            weights[name] = x
            continue
        blocks = rng.integers(0, 0x30, (x.shape[0], x.shape[1] // block * size), dtype=np.uint8)
        weights[name] = dequantize(blocks, GGMLQuantizationType[qtype])
        if name.endswith(("q_proj.weight", "k_proj.weight")):    # rows of blocks permute like rows of values
            blocks = llama_cpp_permute(blocks, 4 if "q_proj" in name else 2)
        raw[gguf_name(name)] = (blocks, qtype)
    norms = {n: x for n, x in weights.items() if x.ndim == 1}
    path = write_gguf(tmp_path / "k.gguf", model_dir, tensors=norms, raw_tensors=raw)
    ckpt = GGUFCheckpoint(path)
    assert ckpt.stored_dtype("model.layers.0.self_attn.q_proj.weight") == qtype
    want = logits(load_model(reference_dir(tmp_path, model_dir, weights), backend="numpy"))
    got = logits(load_model(path, backend="numpy"))
    assert np.isfinite(want).all() and np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_checkpoint_interface_raw_and_stored_dtype(tmp_path, tiny_model_dir):
    q = "model.layers.0.self_attn.q_proj.weight"
    st = Checkpoint(tiny_model_dir)
    assert st.stored_dtype(q) == "BF16" and st.raw(q).dtype == np.uint16 and st.raw(q).shape == (64, 64)
    for kind, dtype in (("BF16", np.uint16), ("F16", np.float16), ("F32", np.float32)):
        ckpt = GGUFCheckpoint(write_gguf(tmp_path / f"{kind}.gguf", tiny_model_dir, kind))
        assert ckpt.stored_dtype(q) == kind and ckpt.stored_dtype("model.norm.weight") == "F32"
        assert ckpt.shapes == st.shapes and ckpt.file_of(q) == tmp_path / f"{kind}.gguf"
        raw = ckpt.raw(q)                                    # HF layout, q rows back in HF order
        assert raw.dtype == dtype and raw.shape == (64, 64)
        assert np.array_equal(raw, st.get(q).astype(dtype) if kind != "BF16" else st.raw(q))
        assert np.array_equal(ckpt.get(q), st.get(q)) and ckpt.get(q).flags.writeable
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "q.gguf", tiny_model_dir, "Q4_0"))
    with pytest.raises(WeightsError, match="stored as Q4_0: only F32/F16/BF16 have a raw form"):
        ckpt.raw(q)


# --------------------------------------------------------------------------------------------------------
# The tokenizer: both kinds give the ids of the model's tokenizer.json
# --------------------------------------------------------------------------------------------------------
def test_llama_vocabulary_gives_the_ids_of_llamas_tokenizer_json(tmp_path, tiny_model_dir):
    tok = Tokenizer.from_gguf(write_gguf(tmp_path / "m.gguf", tiny_model_dir))
    reference = llama_tokenizer_json(tiny_model_dir)
    for text in TEXTS:
        ids = tok.encode(text, add_bos=False)
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)
    hello = tok.encode("Hello world", add_bos=False)
    assert tok.decode([1] + hello + [2]) == "Hello world"               # <s> and </s> are left out    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, 512)
    assert tok.chat_template == Tokenizer(tiny_model_dir).chat_template
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.encode_chat(chat) == [1] + reference.encode(tok.render_chat(chat), add_special_tokens=False).ids


def test_merges_from_scores_follow_the_scores():
    tokens = ["<unk>", "a", "b", "c", "ab", "bc", "abc"]
    scores = [0.0, -10, -10, -10, -1.0, -2.0, -3.0]
    types = [2, 1, 1, 1, 1, 1, 1]
    assert merges_from_scores(tokens, scores, types) == [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]


@pytest.fixture(scope="module")
def byte_level():
    return byte_level_tokenizer()


def test_byte_level_vocabulary_gives_the_ids_of_its_tokenizer_json(tmp_path, tiny_model_dir, byte_level):
    path = write_gguf(tmp_path / "m.gguf", tiny_model_dir, tokenizer=byte_level)
    tok = Tokenizer.from_gguf(path)
    for text in TEXTS + ["<|im_start|>user\nHi<|im_end|>\n", "a<|endoftext|>b"]:
        assert tok.encode(text) == byte_level.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert (tok.bos_token, tok.eos_token, tok.add_bos) == ("<|im_start|>", "<|im_end|>", False)
    assert tok.chat_template == CHATML
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.encode_chat(chat)
    assert ids == byte_level.encode(tok.render_chat(chat), add_special_tokens=False).ids
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 2          # <|im_start|> is BOS and the template's
    model = load_model(path, backend="numpy")                           # the whole model runs on it
    assert model.stop_ids == {0, 2} and len(model.generate(ids, max_new_tokens=3).ids) >= 1   # + <|endoftext|>


# --------------------------------------------------------------------------------------------------------
# Refused: corrupt and truncated files, other architectures, unsupported types and metadata
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory, tiny_model_dir):
    return write_gguf(tmp_path_factory.mktemp("good") / "m.gguf", tiny_model_dir, "Q8_0")


def header(*kv, tensors=(), version=3, magic=b"GGUF"):
    """A hand-made GGUF header: kv = (key, type, payload bytes); tensors = (name, dims, type, offset)."""
    out = magic + struct.pack("<IQQ", version, len(tensors), len(kv))
    for key, vtype, payload in kv:
        out += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + payload
    for name, dims, ttype, offset in tensors:
        out += struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", len(dims))
        out += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ttype, offset)
    return out


@pytest.mark.parametrize("data, problem", [
    (b"", "too short to be a GGUF file"),
    (b"PK\x03\x04" + b"\0" * 40, "not a GGUF file"),
    (header(version=1), "GGUF version 1"),
    (header(("general.architecture", 8, struct.pack("<Q", 10**9) + b"llama")) + b"\0" * 8, "truncated file"),
    (header(("x", 9, struct.pack("<IQ", 0, 2**40))), "claims 1,099,511,627,776 items"),      # a loop of 10^12
    (header(("x", 9, struct.pack("<IQ", 0, 2**20))), "truncated file"),
    (header(("x", 77, b"")) + b"\0" * 8, "unknown value type 77"),
    (header(("x", 9, struct.pack("<IQ", 9, 1))) + b"\0" * 8, "nested or unknown arrays"),
    (header(tensors=[("t", (64,), 0, 0)]) + b"\0" * 8, "truncated file: tensor 't' ends at byte"),
    (header(tensors=[("t", (64,), 99, 0)]) + b"\0" * 8, "unknown ggml type 99"),
    (header(tensors=[("t", (7, 2), 2, 0)]) + b"\0" * 8, "not a multiple of Q4_0's block of 32"),
    (header(tensors=[("t", (1,) * 5, 0, 0)]) + b"\0" * 8, "5 dimensions"),
    (header(tensors=[("a", (8,), 0, 0), ("b", (8,), 0, 0)]) + b"\0" * 64, "overlap"),
    (header(("general.alignment", 4, struct.pack("<I", 3))) + b"\0" * 8, "power of two"),
])
def test_malformed_headers_are_refused_quickly(tmp_path, data, problem):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match=problem) as e:
        GGUFCheckpoint(path)
    assert time.perf_counter() - t0 < 5 and str(path) in str(e.value)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    os.mkfifo(tmp_path / "m.gguf")
    with pytest.raises(WeightsError, match="m.gguf: not a regular file"):
        GGUFCheckpoint(tmp_path / "m.gguf")
    (tmp_path / "m.gguf").rename(tmp_path / "m")                  # no suffix: is_gguf would read the magic
    assert not tinyllm.gguf.is_gguf(tmp_path / "m")


def test_a_truncated_download_is_refused(tmp_path, good_gguf):
    for cut in (100, good_gguf.stat().st_size // 2, good_gguf.stat().st_size - 1000):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(good_gguf.read_bytes()[:cut])
        with pytest.raises(WeightsError, match="truncated"):
            read_header(path)


def test_duplicate_keys_and_tensor_names_are_refused(tmp_path):
    """As llama.cpp refuses them: which of the two would count is anyone's guess."""
    kv = ("general.architecture", 8, struct.pack("<Q", 5) + b"llama")
    path = tmp_path / "dup.gguf"
    path.write_bytes(header(kv, kv) + b"\0" * 8)
    with pytest.raises(WeightsError, match="metadata key 'general.architecture' appears twice"):
        GGUFCheckpoint(path)
    path.write_bytes(header(kv, tensors=[("t", (8,), 0, 0), ("t", (8,), 0, 32)]) + b"\0" * 96)
    with pytest.raises(WeightsError, match="two tensors are named 't'"):
        GGUFCheckpoint(path)


@pytest.mark.parametrize("change, error, problem", [
    (dict(arch="phi3"), ConfigError, "general.architecture='phi3': only llama, qwen2, qwen3, gemma2, gemma3"),
    (dict(metadata={"llama.expert_count": 8}), ConfigError, "llama.expert_count changes the model"),
    (dict(metadata={"llama.attention.sliding_window": 4096}), ConfigError, "sliding_window"),
    (dict(metadata={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}), ConfigError,
     "rope.scaling.type='yarn'"),
    (dict(metadata={"llama.rope.dimension_count": 8}), ConfigError, "partial RoPE"),
    (dict(metadata={"llama.feed_forward_length": 256}), WeightsError,
     r"has shape \(172, 64\) but .*GGUF metadata\) implies \(256, 64\)"),
    (dict(raw_tensors={"blk.0.attn_q.bias": (np.zeros(64, np.float32), "F32")}), WeightsError,
     "'blk.0.attn_q.bias' has no place"),
    (dict(raw_tensors={"rope_freqs.weight": (np.ones(5, np.float32), "F32")}), ConfigError,
     "rope_freqs.weight must hold head_dim / 2 = 8"),
    (dict(raw_tensors={"rope_freqs.weight": (-np.ones(8, np.float32), "F32")}), ConfigError, "positive, finite"),
    (dict(raw_tensors={"blk.2.attn_norm.weight": (np.ones(64, np.float32), "F32")}), WeightsError,
     "'blk.2.attn_norm.weight' has no place"),                                # a third block in a 2-layer model
])
def test_models_tinyllm_does_not_implement_are_refused(tmp_path, tiny_model_dir, change, error, problem):
    path = write_gguf(tmp_path / "m.gguf", tiny_model_dir, **change)
    with pytest.raises(error, match=problem) as e:
        load_model(path, backend="numpy")
    assert str(path) in str(e.value)


def test_an_unsupported_quant_type_is_named(tmp_path, tiny_model_dir):
    tensors = hf_tensors(tiny_model_dir)
    blocks = np.zeros((64, 64 // 32 * 18), np.uint8)                          # IQ4_NL: 32 values in 18 bytes
    q = "model.layers.1.self_attn.q_proj.weight"
    path = write_gguf(tmp_path / "m.gguf", tiny_model_dir, tensors={n: x for n, x in tensors.items() if n != q},
                      raw_tensors={"blk.1.attn_q.weight": (blocks, "IQ4_NL")})
    with pytest.raises(WeightsError, match="'blk.1.attn_q.weight' is stored as IQ4_NL, which tinyllm does not "
                                           "read"):
        load_model(path, backend="numpy")


def test_a_missing_tensor_is_named(tmp_path, tiny_model_dir):
    tensors = {n: x for n, x in hf_tensors(tiny_model_dir).items() if n != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(WeightsError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_model(write_gguf(tmp_path / "m.gguf", tiny_model_dir, tensors=tensors), backend="numpy")


@pytest.mark.parametrize("metadata, problem", [
    ({"llama.attention.head_count": 5, "llama.attention.head_count_kv": None},
     r"llama\.embedding_length=64 is not divisible by llama\.attention\.head_count=5$"),
    ({"llama.attention.head_count": 3, "llama.attention.head_count_kv": None}, r"llama\.attention\.head_count=3$"),
    ({"llama.attention.head_count": 2**32 - 1, "llama.attention.head_count_kv": None},
     r"llama\.attention\.head_count=4294967295$"),
    ({"llama.attention.head_count": 0}, r"llama\.attention\.head_count=0: expected a positive integer"),
    ({"llama.attention.head_count_kv": 3},
     r"llama\.attention\.head_count=4 is not a multiple of llama\.attention\.head_count_kv=3"),
    ({"llama.attention.head_count_kv": 0}, r"llama\.attention\.head_count_kv=0: expected a positive integer"),
])
def test_head_count_errors_name_the_head_count_not_partial_rope(tmp_path, tiny_model_dir, metadata, problem):
    """llama.cpp writes rope.dimension_count = head_dim; a head count that does not divide the hidden size
    used to be reported as partial RoPE."""
    path = write_gguf(tmp_path / "m.gguf", tiny_model_dir, metadata=metadata)
    with pytest.raises(ConfigError, match=problem) as e:
        GGUFCheckpoint(path)
    assert "RoPE" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("key", ["llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 0.0, -1.0])
def test_float_hyper_parameters_must_be_finite_and_positive(tmp_path, tiny_model_dir, key, value):
    path = write_gguf(tmp_path / "m.gguf", tiny_model_dir, metadata={key: value})
    with pytest.raises(ConfigError, match=rf"GGUF metadata\): {re.escape(key)}=\S+: expected a positive, finite"):
        GGUFCheckpoint(path)


def test_a_rope_scaling_factor_must_be_finite(tmp_path, tiny_model_dir):
    path = write_gguf(tmp_path / "m.gguf", tiny_model_dir, metadata={"llama.rope.scaling.type": "linear",
                                                                     "llama.rope.scaling.factor": float("nan")})
    with pytest.raises(ConfigError, match=r"llama\.rope\.scaling\.factor=nan: expected a positive, finite"):
        GGUFCheckpoint(path)


def test_values_and_keys_from_the_file_are_cut_in_errors(tmp_path, tiny_model_dir, byte_level):
    for metadata in ({"general.architecture": "A" * 10**6}, {"llama." + "k" * 60000: 1},
                     {"tokenizer.ggml.pre": "p" * 10**6}):
        path = write_gguf(tmp_path / "m.gguf", tiny_model_dir, tokenizer=byte_level, metadata=metadata)
        with pytest.raises((ConfigError, TokenizerError)) as e:
            load_model(path, backend="numpy")
        assert len(str(e.value)) < 600 and "…" in str(e.value), str(e.value)[:600]


def test_bounds_on_counts_names_and_keys(tmp_path, monkeypatch):
    """The bounds of tinyllm/gguf.py, each hit by a small file (the per-file totals with the bound lowered)."""
    def refused(data, problem):
        path = tmp_path / "bad.gguf"
        path.write_bytes(data + b"\0" * 64)
        with pytest.raises(WeightsError, match=problem):
            GGUFCheckpoint(path)
    strings = struct.pack("<IQ", 8, 2) + (struct.pack("<Q", 1) + b"x") * 2        # an array of 2 strings
    three = header(("a", 9, strings), ("b", 9, strings), ("c", 9, strings))
    (tmp_path / "ok.gguf").write_bytes(three)
    assert read_header(tmp_path / "ok.gguf").metadata["c"] == [b"x", b"x"]
    monkeypatch.setattr(tinyllm.gguf, "MAX_ARRAY_ITEMS", 5)
    refused(three, r"metadata 'c' claims 2 items \(at most 1,048,576 in one array and 5 in all")
    refused(header(tensors=[("t" * 64, (8,), 0, 0)]), "a tensor name of 64 bytes \\(at most 63")
    key = "k" * 65536
    refused(struct.pack("<4sIQQQ", b"GGUF", 3, 0, 1, len(key)) + key.encode(), "a metadata key of 65,536 bytes")


@pytest.mark.parametrize("metadata, error, problem", [
    ({"tokenizer.ggml.model": "bert"}, TokenizerError, "tokenizer.ggml.model='bert': only 'gpt2'"),
    ({"tokenizer.ggml.scores": None}, TokenizerError, "metadata has no tokenizer.ggml.scores"),
    ({"tokenizer.ggml.token_type": [1, 2]}, TokenizerError, "tokens and token_type do not match"),
    ({"tokenizer.ggml.unknown_token_id": 100000}, TokenizerError, "unknown_token_id=100000 is outside"),
    ({"tokenizer.ggml.bos_token_id": 100000}, ConfigError, "bos_token_id=100000"),
    ({"tokenizer.ggml.add_bos_token": "yes"}, TokenizerError, "add_bos_token='yes': expected a bool"),
    ({"tokenizer.ggml.scores": ["a"] * 512}, TokenizerError, "tokenizer.ggml.scores holds items that are not of "
                                                             "type float"),
    ({"tokenizer.ggml.tokens": list(range(512))}, TokenizerError, "tokenizer.ggml.tokens holds items that are not "
                                                                  "of type str"),
])
def test_unusable_tokenizers_are_refused(tmp_path, tiny_model_dir, metadata, error, problem):
    path = write_gguf(tmp_path / "m.gguf", tiny_model_dir, metadata=metadata)
    with pytest.raises(error, match=problem) as e:
        Tokenizer.from_gguf(path)
    assert str(path) in str(e.value)


def test_a_sentencepiece_vocabulary_too_costly_to_split_is_refused(tmp_path, tiny_model_dir):
    """merges_from_scores slices every piece at every position: one piece of 10^4 characters would cost 10^8
    steps (and one of 10^6, 10^12). Real vocabularies cost 1 to 11 million."""
    tokens = [t for t, _ in sorted(json.loads((tiny_model_dir / "tokenizer.json").read_text())["model"]["vocab"]
                                   .items(), key=lambda kv: kv[1])]
    long = tokens[:-1] + ["a" * 10**4]
    path = write_gguf(tmp_path / "m.gguf", tiny_model_dir, metadata={"tokenizer.ggml.tokens": long})
    with pytest.raises(TokenizerError, match=r"pieces too long to find their merges \(the splits would cost "
                                             r"100,\d{3},\d{3} steps, at most 67,108,864"):
        Tokenizer.from_gguf(path)


@pytest.mark.parametrize("metadata, problem", [
    ({"tokenizer.ggml.pre": "deepseek-llm"},
     "tokenizer.ggml.pre='deepseek-llm': tinyllm knows the splitting rules of gpt-2"),
    ({"tokenizer.ggml.merges": None}, "metadata has no tokenizer.ggml.merges"),
    ({"tokenizer.ggml.merges": ["a b c"]}, "not 'left right'"),
    ({"tokenizer.ggml.merges": ["zz qq"]}, r"the vocabulary cannot be built \(.*out of vocabulary"),  # Rust's error
])
def test_unusable_byte_level_tokenizers_are_refused(tmp_path, tiny_model_dir, byte_level, metadata, problem):
    path = write_gguf(tmp_path / "m.gguf", tiny_model_dir, tokenizer=byte_level, metadata=metadata)
    with pytest.raises(TokenizerError, match=problem) as e:
        Tokenizer.from_gguf(path)
    assert str(e.value).startswith(f"{path}: ")
