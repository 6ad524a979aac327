"""A miniature TinyLlama (or Llama 3, Mistral, Qwen2/3, Gemma 2/3): same files, same layout, same code paths, 150
thousand random parameters.

    make_tiny("tests/tiny")            # or: python weights/make_tiny.py OUTDIR [--seed N]
    model = tinyllm.load_model("tests/tiny", backend="numpy")

Tests, tutorials and the CLI's offline demo need a checkpoint that loads in milliseconds and never touches
the network. This writes one in exactly the Hugging Face layout of TinyLlama-1.1B-Chat-v1.0:

    config.json               LlamaForCausalLM, hidden 64, 2 layers, 4 query heads / 2 KV heads (head_dim 16)
    generation_config.json    bos / eos ids
    model.safetensors         bf16, HF tensor names, [out, in] linear layout
    tokenizer.json            a byte-fallback BPE with a Metaspace pre-tokenizer and Llama's decoder, trained
                              here with `tokenizers` on the text below: <unk> <s> </s> are ids 0, 1, 2, then
                              the 256 byte tokens <0x00>..<0xFF> (as in Llama's vocabulary), then merges
    tokenizer_config.json     bos/eos strings and TinyLlama's chat template, verbatim

Weights are random: the model talks nonsense, but deterministic nonsense. Projections have std
1/sqrt(fan_in) so attention scores are O(1) (a RoPE or mask bug changes the logits visibly), and the output
head is scaled so logits spread over several units: the greedy argmax is far from ties and does not flip
between the NumPy and kernel backends.
"""
import json
from pathlib import Path

import numpy as np

from .weights import save_file

# TinyLlama-1.1B-Chat-v1.0's chat template, verbatim (the model was fine-tuned on exactly this format).
CHAT_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 172,
    "max_position_embeddings": 256,
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.35.0",
    "use_cache": True,
    "vocab_size": 512,
}

# Miniatures of the other families (make_tiny(d, family=...)): TINY_CONFIG's sizes with the fields each family's
# config.json has, as transformers writes them. Windows of 4 tokens, so that a prompt of a dozen overruns them;
# Gemma 2's caps are small enough (2 on scores of O(1), 5 on logits of O(8)) to change every output visibly.
_COMMON = {k: v for k, v in TINY_CONFIG.items() if k not in ("architectures", "model_type", "attention_bias",
                                                             "pretraining_tp", "hidden_act")}
_GEMMA = {"hidden_activation": "gelu_pytorch_tanh", "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 4,
          "rms_norm_eps": 1e-06, "tie_word_embeddings": True, "attention_bias": False, "attention_dropout": 0.0,
          "cache_implementation": "hybrid"}
FAMILY_CONFIGS = {
    "llama": TINY_CONFIG,
    "llama3": dict(TINY_CONFIG, rope_theta=500000.0, tie_word_embeddings=True, head_dim=16, mlp_bias=False,
                   rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64, "rope_type": "llama3"}),
    "mistral": dict(_COMMON, architectures=["MistralForCausalLM"], model_type="mistral", hidden_act="silu",
                    sliding_window=4, head_dim=None, attention_dropout=0.0),
    "qwen2": dict(_COMMON, architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
                  rope_theta=1000000.0, rms_norm_eps=1e-06, tie_word_embeddings=True, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=2, attention_dropout=0.0),
    "qwen3": dict(_COMMON, architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu", head_dim=32,
                  rope_theta=1000000.0, rms_norm_eps=1e-06, tie_word_embeddings=True, attention_bias=False,
                  use_sliding_window=False, sliding_window=None, max_window_layers=2, attention_dropout=0.0),
    "gemma2": dict(_COMMON, **_GEMMA, architectures=["Gemma2ForCausalLM"], model_type="gemma2",
                   hidden_act="gelu_pytorch_tanh", attn_logit_softcapping=2.0, final_logit_softcapping=5.0),
    "gemma3": dict(_COMMON, **_GEMMA, architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
                   num_hidden_layers=6, num_key_value_heads=1, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                   _sliding_window_pattern=6, layer_types=["sliding_attention"] * 5 + ["full_attention"],
                   rope_scaling=None, attn_logit_softcapping=None, final_logit_softcapping=None,
                   use_bidirectional_attention=False),
}

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

# Training text for the tokenizer: the chat markup, everyday words, a few accented letters (which become
# single tokens). No euro sign or emoji on purpose: those must go through the byte-fallback tokens.
CORPUS = [
    "<|system|>\nYou are a friendly chatbot who always responds in the style of a pirate.</s>",
    "<|user|>\nHow many helicopters can a human eat in one sitting?</s>",
    "<|assistant|>\nNone, my friend! A human cannot eat a helicopter.</s>",
    "<|user|>\nWhat is the capital of France?</s>\n<|assistant|>\nThe capital of France is Paris.</s>",
    "<|user|>\nTell me a story about a small robot.</s>\n<|assistant|>\nOnce upon a time there was a robot.",
    "The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran into the woods.",
    "Attention is all you need: queries, keys and values, a softmax over the scores, and a weighted sum.",
    "A language model predicts the next token from the tokens before it, one step at a time.",
    "Hello world! Hello there, how are you today? I am fine, thank you, and you?",
    "Numbers like 1, 2, 3, 10, 42 and 2048 appear in text; so do dates like 2024-01-31.",
    "Café, naïve, résumé and déjà vu are words with accents; the tokenizer learns them as pieces.",
    "The model reads the prompt, fills its cache with keys and values, and then writes one word after another.",
    "Good morning, good evening, good night. Please and thank you. Yes, no, maybe.",
    "def forward(x): return x @ w  # code appears in chats too, with (parentheses) and [brackets] and {braces}",
    "Water boils at one hundred degrees. Ice melts at zero. The sun is a star; the moon is not.",
    "She said that they would come back tomorrow, but nobody knew where they had gone or why.",
]


def build_tokenizer(vocab_size):
    """Train a Llama-style byte-fallback BPE on CORPUS -> tokenizers.Tokenizer with exactly vocab_size ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    # 1. learn merges; split=True keeps merges inside words, as SentencePiece does for Llama
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    n_learned = vocab_size - len(BYTE_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=n_learned, special_tokens=SPECIAL_TOKENS, show_progress=False)
    trainer_tok.train_from_iterator(CORPUS, trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    if len(learned["vocab"]) != n_learned:
        raise RuntimeError(f"tokenizer training produced {len(learned['vocab'])} tokens, wanted {n_learned}: "
                           f"add text to tinyllm/tiny.py CORPUS")

    # 2. lay the vocabulary out like Llama's: specials, the 256 byte tokens, then the learned pieces
    pieces = [p for p, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if p not in SPECIAL_TOKENS]
    vocab = {p: i for i, p in enumerate(SPECIAL_TOKENS + BYTE_TOKENS + pieces)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def random_weights(config, rng):
    """{HF tensor name: fp32 array} for a config dict of any family tinyllm runs, reproducible from rng."""
    dim, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    n_heads, n_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or dim // n_heads
    arch = config["architectures"][0]
    gemma, biases, head_norms = arch.startswith("Gemma"), arch == "Qwen2ForCausalLM", arch in ("Qwen3ForCausalLM",
                                                                                                  "Gemma3ForCausalLM")

    def linear(n_out, n_in):
        return rng.standard_normal((n_out, n_in), dtype=np.float32) / np.sqrt(n_in)

    def norm(n=dim):  # near 1 as applied (Gemma applies 1 + w), but not 1: a forgotten norm weight must show
        return (0.0 if gemma else 1.0) + 0.1 * rng.standard_normal(n, dtype=np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((vocab, dim), dtype=np.float32)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        for name, n_out in (("q", n_heads * hd), ("k", n_kv_heads * hd), ("v", n_kv_heads * hd)):
            w[p + f"self_attn.{name}_proj.weight"] = linear(n_out, dim)
            if biases:
                w[p + f"self_attn.{name}_proj.bias"] = 0.5 * rng.standard_normal(n_out, dtype=np.float32)
        if head_norms:
            w[p + "self_attn.q_norm.weight"], w[p + "self_attn.k_norm.weight"] = norm(hd), norm(hd)
        w[p + "self_attn.o_proj.weight"] = linear(dim, n_heads * hd) * 0.5   # keep the residual stream O(1)
        w[p + "post_attention_layernorm.weight"] = norm()                    # Gemma: after attention
        if gemma:
            w[p + "pre_feedforward_layernorm.weight"] = norm()
            w[p + "post_feedforward_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = linear(ffn, dim)
        w[p + "mlp.up_proj.weight"] = linear(ffn, dim)
        w[p + "mlp.down_proj.weight"] = linear(dim, ffn) * 0.5
    w["model.norm.weight"] = norm()
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = linear(vocab, dim) * 4.0   # logits with a std of ~4: no near-ties at the argmax
    return w


def make_tiny(outdir, seed=0, family="llama", **overrides):
    """Write the miniature checkpoint to outdir (created if needed) -> Path(outdir).

    family: a key of FAMILY_CONFIGS (TinyLlama's layout by default; "llama3", "mistral", "qwen2", "qwen3",
    "gemma2", "gemma3"). overrides replace config.json fields, e.g. make_tiny(d, tie_word_embeddings=True,
    num_hidden_layers=1). The tokenizer always has TINY_CONFIG["vocab_size"] (512) tokens; a larger vocab_size
    pads the embedding table with rows no token uses, as real checkpoints often do.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    config = dict(FAMILY_CONFIGS[family], **overrides)
    tok = build_tokenizer(TINY_CONFIG["vocab_size"])

    (outdir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (outdir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "max_length": config["max_position_embeddings"],
         "pad_token_id": 0}, indent=2) + "\n", encoding="utf-8")
    tok.save(str(outdir / "tokenizer.json"))
    (outdir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": config["max_position_embeddings"],
        "pad_token": "</s>",
        "padding_side": "right",
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    }, indent=2) + "\n", encoding="utf-8")

    rng = np.random.default_rng(seed)
    save_file(outdir / "model.safetensors", random_weights(config, rng), dtype="BF16", metadata={"format": "pt"})
    return outdir
