"""tinyllm/chat.py: a multi-turn ChatSession on the miniature checkpoint (NumPy backend): Ctrl-C mid-reply keeps
the shown part and a consistent cache, and a well-tokenized reply's K/V are reused by the next turn."""
import pytest

from tinyllm import load_model
from tinyllm.chat import ChatSession


def test_chat_session_ctrl_c_keeps_the_partial_reply_and_a_consistent_cache(tiny_model_dir):
    llm = load_model(tiny_model_dir, backend="numpy")
    written, interrupt = [], [True]

    def write(piece):
        if len(written) == 3 and interrupt and interrupt.pop():  # ^C once, while the fourth reply token is being shown
            raise KeyboardInterrupt
        written.append(piece)
    notes = []
    session = ChatSession(llm, "You are a pirate.", write=write, note=notes.append, max_new_tokens=20,
                              temperature=0.0)
    reply, result = session.send("Tell me a story about a small robot.")
    assert result.stop_reason == "interrupted" and "interrupted" in notes[-1]
    assert len(result.ids) == 4                        # the fourth was chosen; its text was never shown
    assert reply == llm.tokenizer.decode(result.ids[:3]) and reply == "".join(written[:3])
    assert [m["role"] for m in session.history] == ["system", "user", "assistant"]
    assert session.history[-1]["content"] == reply

    # the next turn reuses the cache and answers exactly as a fresh model given the same conversation
    second, result = session.send("What is the capital of France?")
    assert result.stop_reason == "length" and result.stats.reused_tokens > 0
    fresh = load_model(tiny_model_dir, backend="numpy")
    assert second == fresh.chat(session.history[:-1], max_new_tokens=20)


def test_chat_history_keeps_the_cached_prefix_of_a_well_tokenized_reply(tiny_model_dir, monkeypatch):
    """A trained model's reply is the tokenization of its own text; then the next turn's prompt starts with
    every cached id (previous prompt + reply) and only the new user turn is prefilled."""
    llm = load_model(tiny_model_dir, backend="numpy")
    tok = llm.tokenizer
    system, question, answer = "You are a friendly chatbot.", "What is the capital of France?", "It is Paris."
    first = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    prompt = tok.encode_chat(first)
    full = tok.encode_chat(first + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
    assert full[:len(prompt)] == prompt
    reply_ids = full[len(prompt):full.index(tok.eos_id, len(prompt)) + 1]          # "It is Paris." + EOS

    class Scripted:                                  # a "model" that says reply_ids, whatever the logits
        def __init__(self, **sampling):
            self.ids = iter(reply_ids)

        def __call__(self, logits, previous_ids=()):
            return next(self.ids)
    monkeypatch.setattr("tinyllm.model.Sampler", Scripted)

    session = ChatSession(llm, system, write=lambda piece: None, note=pytest.fail, max_new_tokens=32)
    reply, result = session.send(question)
    assert (reply, result.stop_reason) == (answer, "eos")
    _, result = session.send("And of Spain?")
    cached = len(prompt) + len(reply_ids) - 1        # the EOS was chosen, never fed
    assert result.stats.reused_tokens == cached
    assert result.stats.prefill_tokens == len(tok.encode_chat(session.history[:-1])) - cached


def test_context_notes_suggest_only_what_would_help(tiny_model_dir):
    """At the model's maximum context a larger --ctx-size does not exist; without a system prompt none is kept."""
    llm = load_model(tiny_model_dir, backend="numpy")             # max_len = max_position_embeddings = 256
    notes = []
    session = ChatSession(llm, write=lambda piece: None, note=notes.append, max_new_tokens=100, temperature=0.0)
    for i in range(8):
        session.send(f"Tell me a story about a small robot, part {i}.")
    assert session.send("The quick brown fox jumps over the lazy dog. " * 30) == (None, None)   # alone too long
    dropped = [n for n in notes if "dropped the oldest" in n]
    no_room = [n for n in notes if "no room for a reply" in n]
    assert dropped and no_room
    assert all("(256 tokens, the model's maximum)" in n for n in dropped)
    assert "the context holds 256 tokens, the model's maximum" in no_room[0]
    assert not any("system prompt" in n or "--ctx-size" in n for n in notes), notes

    llm = load_model(tiny_model_dir, backend="numpy", max_len=64)  # below the maximum: worth suggesting
    notes.clear()
    session = ChatSession(llm, "You are a pirate.", write=lambda piece: None, note=notes.append, max_new_tokens=8,
                          temperature=0.0)
    for i in range(4):
        session.send(f"Tell me a story about a small robot, part {i}.")
    session.send("The quick brown fox jumps over the lazy dog. " * 6)
    assert any("dropped the oldest" in n and "(64 tokens, -c/--ctx-size; the model allows 256); the system prompt "
               "is kept" in n for n in notes), notes
    assert any("no room for a reply. Send something shorter, or use a larger -c/--ctx-size." in n for n in notes)


def test_save_and_load_a_conversation(tiny_model_dir, tmp_path):
    """The file is the API's messages (what Llama.chat() takes); loading it continues that conversation, its
    system prompt included; a file that is not a conversation changes nothing."""
    import json
    llm = load_model(tiny_model_dir, backend="numpy")
    session = ChatSession(llm, "You are a pirate.", max_new_tokens=3, temperature=0.0)
    session.send("Caf\u00e9 or tea?")
    path = session.save(tmp_path / "chat.json")
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved == session.history and saved[0] == {"role": "system", "content": "You are a pirate."}
    assert "Caf\u00e9" in path.read_text(encoding="utf-8") and list(tmp_path.iterdir()) == [path]   # no part file

    other = ChatSession(llm, "You are terse.", max_new_tokens=3, temperature=0.0)
    assert other.load(path) == 3 and other.history == saved and other.system == "You are a pirate."
    other.reset()
    assert other.history == saved[:1]                                  # /reset keeps the loaded system prompt
    (tmp_path / "api.json").write_text(json.dumps({"model": "x", "messages": saved[1:]}))
    assert other.load(tmp_path / "api.json") == 2 and other.system is None   # a chat API request body

    for content, says in (("{", "not JSON"), ('{"messages": 3}', "must be a non-empty list"),
                          ('[{"role": "user", "content": 1}]', "expected a dict with string 'role' and 'content'"),
                          ('[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]',
                           r"messages\[1\] has role 'system'"),
                          ('[{"role": "tool", "content": "a"}]', r"messages\[0\] has role 'tool'"),
                          ("\udcff".encode("utf-8", "surrogateescape").decode("latin-1"), "not JSON")):
        (tmp_path / "bad.json").write_text(content, encoding="latin-1")
        before = list(other.history)
        with pytest.raises(ValueError, match=says):
            other.load(tmp_path / "bad.json")
        assert other.history == before
    with pytest.raises(FileNotFoundError):
        other.load(tmp_path / "missing.json")


def test_a_reply_cut_inside_a_character_enters_the_history_as_shown(tiny_model_dir, monkeypatch):
    llm = load_model(tiny_model_dir, backend="numpy")
    tok = llm.tokenizer
    reply_ids = tok.encode("ok \U0001f642", add_bos=False)[:-1]       # the emoji's last byte never came

    class Scripted:
        def __init__(self, **sampling):
            self.ids = iter(reply_ids)

        def __call__(self, logits, previous_ids=()):
            return next(self.ids)
    monkeypatch.setattr("tinyllm.model.Sampler", Scripted)
    written = []
    session = ChatSession(llm, write=written.append, max_new_tokens=len(reply_ids))
    reply, result = session.send("Hi")
    assert result.stop_reason == "length" and reply == "ok " == "".join(written).rstrip("\n")
    assert session.history[-1] == {"role": "assistant", "content": "ok "}
