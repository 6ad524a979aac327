"""A multi-turn chat session: the conversation as chat-template messages, fitted to the context, replies streamed.

    session = ChatSession(model, system="You are terse.", write=print_piece, max_new_tokens=128, temperature=0.7)
    reply, result = session.send("Why is the sky blue?")     # result: the Generation (ids, stats, stop reason)
    session.reset()                                          # a new conversation (the system prompt stays)
    session.save("chat.json"); session.load("chat.json")     # the conversation as JSON messages, and back

The CLI's `chat` command is this class plus a prompt loop; a notebook can use it the same way. It prints
nothing itself: reply text goes to `write(piece)` as it is generated, remarks (context trimmed, reply
interrupted) to `note(text)` (default: logged at INFO).
"""
import json
import logging
import os
from pathlib import Path

from .generate import GenerationInterrupted
from .tokenizer import StreamDecoder, check_messages

log = logging.getLogger("tinyllm")


class ChatSession:
    """A multi-turn chat: the history as chat-template messages, fitted to the context, replies streamed.

    KV-cache reuse. Each turn renders the whole history with the model's chat template and tokenizes it;
    tinyllm's generate() keeps the K/V of the longest prefix this shares with model.cached_ids (the previous
    prompt and reply) and prefills only the rest. The reply enters the history as its decoded text (EOS
    dropped; the template closes the turn with "</s>" as the generated EOS did), so the next render
    re-tokenizes it:
      * when the reply's ids are the tokenization of its text (what a trained model nearly always emits),
        the next prompt starts with every cached id and only the new user turn is prefilled (tests/test_cli.py
        checks this on the miniature checkpoint: TinyLlama's template, a Llama-style tokenizer);
      * when they are not (a leading "▁" the decoder drops, an unusual split, byte tokens that are not
        valid UTF-8: the random miniature model does all of these), reuse stops at the first differing id
        and the rest of the reply is prefilled again with the new message: one reply's worth of tokens,
        never the whole conversation. --verbose prints the reused and prefilled counts of every turn.
    Feeding the generated ids back unchanged would always reuse them, but the prompt would then depend on
    how the conversation was produced, not only on what was said; the template stays the one truth.

    Context. Before each reply the oldest exchanges (user + assistant) are dropped, never the system
    prompt, until the prompt leaves room for a reply of min(max_new_tokens, ctx/2) tokens; dropping
    changes the prompt right after the system prompt, so that turn re-prefills everything after it. If
    the new message alone leaves no room at all, it is refused and the history kept.
    """

    def __init__(self, llm, system=None, write=None, note=None, **sampling):
        self.llm, self.tok, self.system = llm, llm.tokenizer, system
        self.write = write or (lambda piece: None)
        self.note = note or log.info
        self.sampling = sampling
        self.turns = 0
        self.reset()

    def reset(self):
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def save(self, path):
        """Write the conversation to path as JSON: the list of {"role", "content"} messages that Llama.chat()
        takes (system prompt first, if any). Written whole or not at all (a temporary file, then renamed)."""
        path = Path(path).expanduser()
        part = path.with_name(f".{path.name}.part")
        try:
            part.write_text(json.dumps(self.history, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)
        return path

    def load(self, path):
        """Replace the conversation with the one saved in path (as save() writes it, or {"messages": [...]}, a
        chat API's request body); its system prompt, or none, replaces ours. A file that is not such a
        conversation is a ValueError naming what is wrong, and the conversation stays as it was."""
        path = Path(path).expanduser()
        with open(path, encoding="utf-8") as f:
            try:
                messages = json.load(f)
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{path}: not JSON ({e})") from None
        if isinstance(messages, dict) and "messages" in messages:
            messages = messages["messages"]
        self.history = conversation(messages, path)
        has_system = bool(self.history) and self.history[0]["role"] == "system"
        self.system = self.history[0]["content"] if has_system else None
        return len(self.history)

    def fit(self, messages):
        """Drop the oldest exchanges until the prompt leaves room for a reply -> (messages, prompt_ids,
        exchanges dropped); prompt_ids is None when even the last message alone leaves no room."""
        first = 1 if messages[0]["role"] == "system" else 0
        room = min(self.sampling.get("max_new_tokens", 256), self.llm.max_len // 2)
        dropped = 0
        while True:
            ids = self.tok.encode_chat(messages)
            if len(ids) + room <= self.llm.max_len:
                return messages, ids, dropped
            if len(messages) - first <= 1:                 # only the new user message is left
                return messages, (ids if len(ids) < self.llm.max_len else None), dropped
            messages = messages[:first] + messages[first + 2:]
            dropped += 1

    def send(self, text):
        """Answer one user message, streaming the reply through self.write -> (reply text, Generation); (None,
        None) when the message leaves no room for a reply.

        Ctrl-C (KeyboardInterrupt) during the reply stops it: the part already shown becomes the assistant
        turn (stop_reason "interrupted"), and the model's KV cache stays consistent (tinyllm rewinds a
        half-done forward pass). Any other error (a TokenizerError when the chat template refuses or fails
        on the conversation, a NonFiniteLogitsError...) leaves the history as it was: the caller can report
        it and go on, or reset().
        """
        messages, prompt, dropped = self.fit(self.history + [{"role": "user", "content": text}])
        ctx = describe_context(self.llm)
        if prompt is None:
            n = len(self.tok.encode_chat(messages))
            larger = ", or use a larger -c/--ctx-size" if can_grow_context(self.llm) else ""
            self.note(f"context: this message needs {n} prompt tokens"
                      f"{' with the system prompt' if self.system else ''}, but the context holds {ctx}: "
                      f"no room for a reply. Send something shorter{larger}.")
            return None, None
        if dropped:
            self.note(f"context: dropped the oldest {dropped} exchange{'s' * (dropped > 1)} to stay within the "
                      f"context ({ctx}){'; the system prompt is kept' if self.system else ''}")

        stream = self._stream_decoder()
        shown = []                                         # ids whose text has been written

        def on_token(token):
            if token not in self.llm.stop_ids:
                self.write(stream.feed(token))
                shown.append(token)

        seed = self.sampling.get("seed")
        sampling = dict(self.sampling, seed=None if seed is None else seed + self.turns)
        self.turns += 1
        try:
            result = self.llm.generate(prompt, on_token=on_token, **sampling)
            self.write(stream.flush() + "\n")
        except GenerationInterrupted as e:
            result = e.result
            self.write("\n")
        stop = result.stop_reason
        reply = self.tok.decode(shown[:len(shown) - stream.dropped])     # as shown: no unfinished character
        self.history = messages + [{"role": "assistant", "content": reply}]
        if stop == "interrupted":
            self.note("[reply interrupted: the part shown stays in the conversation]")
        elif stop == "context":
            self.note(f"context: the reply reached the end of the context ({ctx}); the oldest exchanges will be "
                      f"dropped next turn")
        return reply, result

    def _stream_decoder(self):
        return StreamDecoder(self.tok)


def conversation(messages, source):
    """messages checked as a conversation -> a clean copy; ValueError naming source and the bad message."""
    if messages == []:
        return []
    try:
        check_messages(messages)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    for i, m in enumerate(messages):
        if m["role"] not in ("system", "user", "assistant") or (m["role"] == "system" and i > 0):
            raise ValueError(f"{source}: messages[{i}] has role {m['role']!r}: expected a system prompt first, "
                             f"then 'user' and 'assistant' turns")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def can_grow_context(llm):
    """Whether the model allows a longer context than llm has (a larger --ctx-size would help)."""
    return llm.max_len < llm.config.max_position_embeddings


def describe_context(llm):
    """The context size for a note: "64 tokens, -c/--ctx-size; the model allows 2048" or "2048 tokens, the
    model's maximum" (suggesting a larger --ctx-size there would send the user in a circle)."""
    if can_grow_context(llm):
        return f"{llm.max_len} tokens, -c/--ctx-size; the model allows {llm.config.max_position_embeddings}"
    return f"{llm.max_len} tokens, the model's maximum"
