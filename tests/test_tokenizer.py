"""tinyllm/tokenizer.py: encoding with one BOS, TinyLlama's chat template, streaming detokenisation."""
import json
import shutil

import pytest

from tinyllm.tiny import CHAT_TEMPLATE
from tinyllm.tokenizer import StreamDecoder, Tokenizer, TokenizerError

CONVERSATION = [
    {"role": "system", "content": "You are a friendly chatbot."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello, how are you?"},
    {"role": "user", "content": "Fine, thanks."},
]
# What transformers' apply_chat_template(tokenize=False, add_generation_prompt=True) returns for TinyLlama.
EXPECTED = ("<|system|>\nYou are a friendly chatbot.</s>\n<|user|>\nHi!</s>\n"
            "<|assistant|>\nHello, how are you?</s>\n<|user|>\nFine, thanks.</s>\n<|assistant|>\n")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return Tokenizer(tiny_model_dir)


def with_config(tmp_path, tiny_model_dir, **changes):
    """A copy of the tiny model's tokenizer files with tokenizer_config.json fields changed (None deletes)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer(tmp_path)


def test_template_is_tinyllamas():
    assert CHAT_TEMPLATE == (  # the JSON string from TinyLlama-1.1B-Chat-v1.0's tokenizer_config.json
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] "
        "+ eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + "
        "eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + "
        "eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n"
        "{% endif %}\n{% endfor %}")


def test_chat_template_exact_string(tok):
    assert tok.render_chat(CONVERSATION) == EXPECTED
    assert tok.render_chat(CONVERSATION[:2], add_generation_prompt=False) == \
        "<|system|>\nYou are a friendly chatbot.</s>\n<|user|>\nHi!</s>\n"


def test_chat_ids_have_exactly_one_bos(tok):
    ids = tok.encode_chat(CONVERSATION)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids.count(tok.eos_id) == 4                      # each message's </s> is the special token
    assert tok.decode(ids, skip_special_tokens=False).replace("<s> ", "<s>") == "<s>" + EXPECTED
    assert tok.decode(ids) == EXPECTED.replace("</s>", "")


def test_template_that_writes_bos_still_gives_one(tmp_path, tiny_model_dir):
    llama2_style = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
    t = with_config(tmp_path, tiny_model_dir, chat_template=llama2_style)
    ids = t.encode_chat(CONVERSATION[1:2])
    assert ids[0] == t.bos_id and ids.count(t.bos_id) == 1


def test_encode_bos_rules(tok):
    assert tok.encode("Hello world")[0] == tok.bos_id
    assert tok.encode("Hello world", add_bos=False)[0] != tok.bos_id
    assert tok.encode("<s>Hello").count(tok.bos_id) == 1
    assert tok.decode(tok.encode("Hello world")) == "Hello world"


def test_special_tokens_as_added_token_dicts(tmp_path, tiny_model_dir):
    t = with_config(tmp_path, tiny_model_dir, bos_token={"__type": "AddedToken", "content": "<s>"},
                    eos_token={"content": "</s>", "lstrip": False})
    assert (t.bos_token, t.bos_id, t.eos_token, t.eos_id) == ("<s>", 1, "</s>", 2)


def test_template_helpers_and_sandbox(tmp_path, tiny_model_dir):
    t = with_config(tmp_path, tiny_model_dir, chat_template=(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with the user') }}"
        "{% endif %}{{ messages | tojson }}"))
    assert json.loads(t.render_chat(CONVERSATION[1:2])) == CONVERSATION[1:2]
    with pytest.raises(TokenizerError, match="Conversations must start with the user"):
        t.render_chat(CONVERSATION)
    t = with_config(tmp_path, tiny_model_dir, chat_template="{{ messages.append(1) }}")
    with pytest.raises(TokenizerError, match="chat template refused"):   # immutable sandbox: no mutation
        t.render_chat(CONVERSATION)


def test_bad_messages_and_missing_template(tmp_path, tiny_model_dir, tok):
    with pytest.raises(ValueError, match="messages\\[1\\]"):
        tok.render_chat([{"role": "user", "content": "hi"}, {"role": "user"}])
    with pytest.raises(ValueError, match="non-empty list"):
        tok.render_chat([])
    t = with_config(tmp_path, tiny_model_dir, chat_template=None)
    with pytest.raises(TokenizerError, match="no chat_template"):
        t.render_chat(CONVERSATION)


def test_missing_files_are_named(tmp_path, tiny_model_dir):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: file not found"):
        Tokenizer(tmp_path)
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: file not found"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(TokenizerError, match="'<nope>' is not in the vocabulary"):
        Tokenizer(tmp_path)


def copy_tokenizer(tmp_path, tiny_model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    return json.loads((tmp_path / "tokenizer.json").read_text())


def test_a_tokenizer_json_the_library_cannot_build_is_one_error_naming_it(tmp_path, tiny_model_dir):
    """Merges naming tokens the vocabulary lacks: the Rust library raises a bare Exception of its own."""
    d = copy_tokenizer(tmp_path, tiny_model_dir)
    merge = ["zz" + "q" * 10**5, "y"]                      # written as the file writes its merges
    d["model"]["merges"].append(merge if isinstance(d["model"]["merges"][0], list) else " ".join(merge))
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: cannot load \(Token `zzq+…\)$") as e:   # clipped
        Tokenizer(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'tokenizer.json'}: ") and len(str(e.value)) < 600


def test_a_vocabulary_with_no_tokens_is_refused_at_load(tmp_path, tiny_model_dir):
    d = copy_tokenizer(tmp_path, tiny_model_dir)
    d["model"]["vocab"], d["model"]["merges"], d["added_tokens"] = {}, [], []
    d["model"]["unk_token"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": None}))
    with pytest.raises(TokenizerError, match=rf"{tmp_path / 'tokenizer.json'}: the vocabulary has no tokens"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("name, size, limit", [("tokenizer.json", (256 << 20) + 1, 256 << 20),
                                               ("tokenizer_config.json", 2 << 30, 16 << 20),
                                               ("chat_template.jinja", (16 << 20) + 1, 16 << 20)])
def test_files_too_large_to_be_what_they_say_are_refused_unread(tmp_path, tiny_model_dir, name, size, limit):
    copy_tokenizer(tmp_path, tiny_model_dir)
    if name == "chat_template.jinja":                     # read only when tokenizer_config.json has no template
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    with open(tmp_path / name, "wb") as f:
        f.truncate(size)                                  # sparse: no disk, no time
    with pytest.raises(TokenizerError, match=rf"{tmp_path / name}: {size:,} bytes, more than the {limit:,}"):
        Tokenizer(tmp_path)


def test_a_template_error_echoing_a_megabyte_is_cut(tmp_path, tiny_model_dir):
    t = with_config(tmp_path, tiny_model_dir, chat_template="{{ raise_exception('A' * 1000000) }}")
    with pytest.raises(TokenizerError, match=r"the chat template refused the conversation: A+…$") as e:
        t.render_chat(CONVERSATION)
    assert len(str(e.value)) < 600


# --------------------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------------------
def stream(tok, ids, **kw):
    s = StreamDecoder(tok, **kw)
    pieces = [s.feed(i) for i in ids]
    return pieces, s.flush()


def test_stream_multibyte_characters_split_over_byte_tokens(tok):
    ids = tok.encode("Price: 5€ or 🙂, café", add_bos=False)
    tokens = [tok.id_to_token(i) for i in ids]
    euro = tokens.index("<0xE2>")
    assert tokens[euro:euro + 3] == ["<0xE2>", "<0x82>", "<0xAC>"]     # the euro sign is 3 byte tokens
    pieces, rest = stream(tok, ids)
    assert pieces[euro:euro + 3] == ["", "", "€"]                      # held back until the character is whole
    assert "🙂" in pieces and not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + rest == tok.decode(ids) == "Price: 5€ or 🙂, café"


def test_stream_keeps_spaces_between_words(tok):
    ids = tok.encode("Hello world, how are you today?", add_bos=False)
    assert tok.decode(ids[1:2]) == tok.decode(ids[1:2]).lstrip()     # alone, a token loses its space...
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) + rest == "Hello world, how are you today?"   # ...in the stream it keeps it
    assert any(p.startswith(" ") for p in pieces)


def test_stream_equals_full_decode_for_a_chat(tok):
    ids = tok.encode_chat(CONVERSATION)
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) + rest == tok.decode(ids)
    assert tok.eos_id in ids and "" in pieces                          # </s> is skipped, emits nothing


def test_stream_context_keeps_the_first_space(tok):
    prompt = tok.encode("The quick brown")
    new = tok.encode(" fox jumps", add_bos=False)
    pieces, rest = stream(tok, new, context_ids=prompt)
    assert "".join(pieces) + rest == " fox jumps"


TEXT = "Hi \U0001f642, \u4f60\u597d caf\u00e9 \u20ac5"              # 4-, 3- and 2-byte characters


def test_flush_holds_back_an_unfinished_character_and_shows_invalid_bytes(tok):
    """A reply cut off by its length limit between the bytes of a character ends before that character (the
    issue: `generate -n 1` on an emoji printed U+FFFD); a byte that can never be a character still shows."""
    ids = tok.encode(TEXT, add_bos=False)
    for n in range(len(ids) + 1):
        s = StreamDecoder(tok)
        text = "".join(s.feed(i) for i in ids[:n]) + s.flush()
        whole = max(m for m in range(n + 1) if "\ufffd" not in tok.decode(ids[:m]))   # the last whole character
        assert text == tok.decode(ids[:whole]) and s.dropped == n - whole, n
    emoji = tok.encode("ok \U0001f642", add_bos=False)
    s = StreamDecoder(tok)
    assert "".join(s.feed(i) for i in emoji[:-2]) + s.flush() == "ok " and s.dropped == 2
    stray = tok.encode("ok", add_bos=False) + [tok._tok.token_to_id("<0x80>")]     # a lone continuation byte
    pieces, rest = stream(tok, stray)
    assert "".join(pieces) + rest == "ok\ufffd"


class Raw:
    """A `tokenizers` Tokenizer as StreamDecoder uses a tinyllm Tokenizer."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(ids)

    def id_to_token(self, i):
        return self.tok.id_to_token(i)


def test_flush_holds_back_an_unfinished_character_of_a_byte_level_bpe():
    """SmolLM2's kind of tokenizer (GPT-2's byte-level BPE): a byte is a printable character ("\u00f0" for F0),
    and one token can end a word and start a character: "\u0120\u00f0" is " " and the emoji's first byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab["\u0120\u00f0"] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("\u0120", "\u00f0")]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    ids = bpe.encode(TEXT).ids
    assert bpe.id_to_token(ids[2]) == "\u0120\u00f0"                 # " " + F0 in one token
    tok = Raw(bpe)
    for n in range(len(ids) + 1):
        s = StreamDecoder(tok)
        text = "".join(s.feed(i) for i in ids[:n]) + s.flush()
        assert text == bpe.decode(ids[:n]).rstrip("\ufffd") and TEXT.startswith(text), n   # lossy: one U+FFFD
    s = StreamDecoder(tok)
    assert "".join(s.feed(i) for i in ids[:3]) + s.flush() == "Hi " and s.dropped == 0    # the space is kept


# --------------------------------------------------------------------------------------------------------
# Hostile input: text that is not Unicode, templates that fail or never end
# --------------------------------------------------------------------------------------------------------
def test_encode_refuses_text_that_is_not_valid_unicode(tok):
    """b"hi \xff" decoded with surrogateescape (how Python decodes sys.argv) holds a lone surrogate: the Rust
    tokenizer raised "TypeError: TextInputSequence must be str"."""
    with pytest.raises(TokenizerError, match=r"not valid Unicode: lone surrogate '\\udcff' at character 3"):
        tok.encode(b"hi \xff".decode("utf-8", "surrogateescape"))
    with pytest.raises(TokenizerError, match="not valid Unicode"):
        tok.encode_chat([{"role": "user", "content": "\ud800"}])
    assert tok.decode(tok.encode("hi \ufffd")) == "hi \ufffd"          # U+FFFD itself is fine


@pytest.mark.parametrize("template, says", [
    ("{{ 1/0 }}", "failed: ZeroDivisionError: division by zero"),
    ("{{ 'a' + 1 }}", "failed: TypeError: can only concatenate str"),
    ("{{ range(10**9)|length }}", "failed: OverflowError: Range too big"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "failed: RecursionError"),
    ("{{ 'x' * 10**10 }}", "needed more than 512 MB of memory"),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "produced more than 4,194,304 characters"),
    ("{% for m in messages %}", "does not compile"),
    ("{{ lipsum(10**6) }}", "refused the conversation: 'lipsum' is undefined"),
])
def test_any_template_failure_is_one_tokenizer_error_naming_the_file(tmp_path, tiny_model_dir, template, says):
    t = with_config(tmp_path, tiny_model_dir, chat_template=template)
    with pytest.raises(TokenizerError) as e:
        t.render_chat(CONVERSATION)
    line = str(e.value)
    assert line.startswith(f"{tmp_path / 'tokenizer_config.json'}: the chat template ") and says in line, line
    assert "\n" not in line


def test_a_template_that_never_ends_is_stopped_and_the_next_render_works(tmp_path, tiny_model_dir, monkeypatch):
    import time

    from tinyllm import chat_template
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 1.0)
    t = with_config(tmp_path, tiny_model_dir, chat_template=(
        "{% if messages|length > 1 %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
        "{% endfor %}{% endif %}{{ messages[0]['content'] }}"))
    assert t.render_chat(CONVERSATION[:1]) == CONVERSATION[0]["content"]
    t0 = time.perf_counter()
    with pytest.raises(TokenizerError, match="did not finish rendering within 1 s: stopped"):
        t.render_chat(CONVERSATION)                                    # 10**10 iterations
    assert time.perf_counter() - t0 < 10
    assert t.render_chat(CONVERSATION[:1]) == CONVERSATION[0]["content"]    # a fresh worker
    t._template.close()


def test_template_from_chat_template_jinja_is_named(tmp_path, tiny_model_dir):
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['nope'] + 1 }}")
    t = with_config(tmp_path, tiny_model_dir, chat_template=None)
    with pytest.raises(TokenizerError, match=r"chat_template\.jinja: the chat template refused the conversation"):
        t.render_chat(CONVERSATION)


def test_a_renderer_that_died_between_renders_is_replaced(tok):
    import os
    import signal
    assert tok.render_chat(CONVERSATION) == EXPECTED
    proc = tok._template._worker[0]
    os.kill(proc.pid, signal.SIGKILL)                  # e.g. the OOM killer, or a user's kill
    proc.wait()
    assert tok.render_chat(CONVERSATION) == EXPECTED
