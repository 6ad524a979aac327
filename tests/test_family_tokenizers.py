"""The tokenizers and chat formats of the families: Llama 3's and Qwen's byte-level BPEs from GGUF (gpt2 models with
their pre-tokenizers), Gemma's SentencePiece without a space prefix, their chat templates, BOS rules and stop tokens.

A GGUF vocabulary must give the ids of the model's own tokenizer.json: each tokenizer.json here is written the
way the real one is laid out (Llama 3's and Qwen2's Split regexes copied from them, Llama 3's ignore_merges,
Qwen's NFC normaliser, Gemma's normaliser without a prepended "▁"), trained on the miniature's corpus, and the
GGUF file is written from it as llama.cpp's converter writes it (tests/gguf_files.py).
"""
import json
import shutil

import pytest
from tokenizers import Regex, Tokenizer as RustTokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from gguf_files import write_gguf
from tinyllm import Tokenizer, load_model, make_tiny
from tinyllm.tiny import CORPUS

# The Split patterns of Llama 3's and Qwen2's tokenizer.json (digits in runs of up to three, or one by one)
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = ["Hello world!", "I'VE been there, don't you know? They'll see.", "12345678 and 3.14159, 2024-01-31",
         "  two spaces,\ttabs\n\nand\r\nnewlines   ", "Café naïve 日本語 😀 €", "x" * 40, "a\u0301 vs \u00e1",
         "<|eot_id|> inside text"]


def byte_level_bpe(regex, specials, nfc=False, ignore_merges=False, vocab_size=400):
    """A byte-level BPE trained on the corpus, laid out as Llama 3's / Qwen2's tokenizer.json."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    if nfc:
        tok.normalizer = normalizers.NFC()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    if ignore_merges:
        spec = json.loads(tok.to_str())
        spec["model"]["ignore_merges"] = True
        tok = RustTokenizer.from_str(json.dumps(spec))
    return tok


@pytest.fixture(scope="module")
def llama3_tok():
    return byte_level_bpe(LLAMA3_REGEX, LLAMA3_SPECIALS, ignore_merges=True)


@pytest.fixture(scope="module")
def qwen_tok():
    return byte_level_bpe(QWEN2_REGEX, QWEN_SPECIALS, nfc=True)


def test_llama3_vocabulary_from_gguf_gives_its_tokenizer_json_ids(tmp_path, tiny_model_dir, llama3_tok):
    path = write_gguf(tmp_path / "m.gguf", tiny_model_dir, tokenizer=(llama3_tok, dict(pre="llama-bpe", bos=0, eos=1)))
    tok = Tokenizer.from_gguf(path)
    for text in TEXTS:
        assert tok.encode(text, add_bos=False) == llama3_tok.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(tok.encode(text, add_bos=False), skip_special_tokens=False) == text
    assert tok.add_bos and tok.encode("Hi")[0] == 0          # Llama 3 starts every prompt with <|begin_of_text|>
    pieces = [p for p, _ in tok._tok.pre_tokenizer.pre_tokenize_str("1234567")]
    assert pieces == ["123", "456", "7"]                     # digits in runs of up to three


def test_llama3_takes_a_whole_word_that_is_in_its_vocabulary(tmp_path, tiny_model_dir):
    """ignore_merges: "abc" is in the vocabulary, but the merges (b c first) would never make it."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(LLAMA3_SPECIALS + sorted(alphabet) + ["bc", "ab", "abc"])}
    spec = {"version": "1.0", "added_tokens": [], "normalizer": None, "post_processor": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "vocab": vocab, "merges": [["b", "c"], ["a", "b"]], "ignore_merges": True}}
    reference = RustTokenizer.from_str(json.dumps(spec))
    reference.add_special_tokens(LLAMA3_SPECIALS)
    path = write_gguf(tmp_path / "m.gguf", tiny_model_dir, tokenizer=(reference, dict(pre="llama-bpe", bos=0, eos=1)))
    tok = Tokenizer.from_gguf(path)
    assert reference.encode("abc").tokens == ["abc"] and tok.encode("abc abc", add_bos=False) == \
        reference.encode("abc abc").ids
    assert [tok.id_to_token(i) for i in tok.encode("abcd", add_bos=False)] == ["a", "bc", "d"]   # not a word: merges


def test_qwen_vocabulary_from_gguf_normalises_and_splits_digits(tmp_path, tiny_model_dir, qwen_tok):
    path = write_gguf(tmp_path / "m.gguf", tiny_model_dir, tokenizer=(qwen_tok, dict(pre="qwen2", bos=0, eos=0)))
    tok = Tokenizer.from_gguf(path)
    for text in TEXTS:
        assert tok.encode(text) == qwen_tok.encode(text, add_special_tokens=False).ids, text
    assert not tok.add_bos and len(tok._tok.pre_tokenizer.pre_tokenize_str("1234567")) == 7   # no BOS; digit by digit
    assert tok.encode("a\u0301") == tok.encode("\u00e1")             # NFC: á decomposed is á


def gemma_layout(model_dir):
    """The miniature's vocabulary laid out as Gemma's tokenizer.json: spaces become "▁" but none is prepended, so
    a text's first word has no "▁" and decoding strips nothing; byte fallback for the rest."""
    model = json.loads((model_dir / "tokenizer.json").read_text())["model"]
    return RustTokenizer.from_str(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "pre_tokenizer": None, "post_processor": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(["<unk>", "<s>", "</s>"])],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                  "vocab": model["vocab"], "merges": model["merges"]},
    }))


def test_gemma_sentencepiece_without_a_space_prefix(tmp_path, tiny_model_dir):
    path = write_gguf(tmp_path / "m.gguf", tiny_model_dir, metadata={"tokenizer.ggml.add_space_prefix": False})
    tok, reference = Tokenizer.from_gguf(path), gemma_layout(tiny_model_dir)
    for text in ["The capital of France is", " leading space", "Hello  world\n\nagain", "Café € 😀"]:
        ids = tok.encode(text, add_bos=False)
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text
    assert tok.id_to_token(tok.encode("The", add_bos=False)[0]) != "▁The"


# --------------------------------------------------------------------------------------------------------
# Chat templates, BOS and stop tokens
# --------------------------------------------------------------------------------------------------------
# Llama 3's (Meta-Llama-3-8B-Instruct), Gemma 3's (its tokenizer_config.json, text only) and Qwen2.5's (without the
# tools branch), as their models ship them
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n")
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n    {{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}\n{%- else %}\n    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are "
    "a helpful assistant.<|im_end|>\\n' }}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == "
    "\"assistant\") %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")


def model_dir_with(tmp_path, tiny_model_dir, tokenizer, bos, eos, template, add_bos=True):
    """The miniature's weights with another tokenizer.json and tokenizer_config.json."""
    d = shutil.copytree(tiny_model_dir, tmp_path / "m")
    tokenizer.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos, "add_bos_token": add_bos,
                                                         "chat_template": template}))
    return d


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}]


def test_llama3_chat_format_bos_and_stop_token(tmp_path, tiny_model_dir, llama3_tok):
    d = model_dir_with(tmp_path, tiny_model_dir, llama3_tok, "<|begin_of_text|>", "<|end_of_text|>", LLAMA3_TEMPLATE)
    model = load_model(d, backend="numpy")
    tok = model.tokenizer
    assert tok.render_chat(CHAT[1:2]) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
                                          "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.encode_chat(CHAT)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id        # the template writes BOS: not twice
    assert ids.count(llama3_tok.token_to_id("<|eot_id|>")) == 4
    assert model.stop_ids == {2, llama3_tok.token_to_id("<|end_of_text|>"), llama3_tok.token_to_id("<|eot_id|>")}
                                                                      # (2: the miniature's config.json EOS)


def test_qwen_chat_format_has_no_bos_and_stops_at_im_end(tmp_path, tiny_model_dir, qwen_tok):
    d = model_dir_with(tmp_path, tiny_model_dir, qwen_tok, None, "<|im_end|>", QWEN25_TEMPLATE, add_bos=False)
    model = load_model(d, backend="numpy")
    text = model.tokenizer.render_chat(CHAT[1:2])
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    assert model.tokenizer.encode_chat(CHAT)[0] == qwen_tok.token_to_id("<|im_start|>")        # no BOS
    assert model.stop_ids == {2, qwen_tok.token_to_id("<|im_end|>"), qwen_tok.token_to_id("<|endoftext|>")}


def test_gemma3_chat_format(tmp_path, tiny_model_dir):
    from tinyllm import TokenizerError
    gemma = gemma_layout(tiny_model_dir)
    gemma.add_special_tokens(["<start_of_turn>", "<end_of_turn>"])                 # ids 512, 513
    wide = make_tiny(tmp_path / "wide", vocab_size=520)
    d = model_dir_with(tmp_path, wide, gemma, "<s>", "</s>", GEMMA3_TEMPLATE)
    model = load_model(d, backend="numpy")
    tok = model.tokenizer
    assert tok.render_chat(CHAT) == ("<s><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\n"
                                     "Hello.<end_of_turn>\n<start_of_turn>user\nCapital of France?<end_of_turn>\n"
                                     "<start_of_turn>model\n")
    assert tok.encode_chat(CHAT).count(tok.bos_id) == 1
    assert gemma.token_to_id("<end_of_turn>") in model.stop_ids
    with pytest.raises(TokenizerError, match="Conversation roles must alternate"):
        tok.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
