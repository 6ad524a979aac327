"""Text <-> token ids, chat prompts, and streaming detokenisation, from a Hugging Face model directory.

    tok = Tokenizer("path/to/TinyLlama")                           # or Tokenizer.from_gguf("model.gguf")
    ids = tok.encode_chat([{"role": "user", "content": "Hi!"}])   # one BOS, then the rendered template
    tok.decode(ids)
    stream = StreamDecoder(tok)
    for i in new_ids: print(stream.feed(i), end="")                # text pieces as tokens arrive
    print(stream.flush())

The vocabulary and splitting rules are `tokenizer.json`, run by the Rust `tokenizers` library (exactly what
transformers' fast tokenizer runs). The special-token strings and the chat template come from
`tokenizer_config.json`; the template is Jinja2, rendered the way transformers renders it: in an immutable
sandbox (a template is data from the internet and must not reach Python objects), with trim_blocks and
lstrip_blocks, given messages, bos_token, eos_token, add_generation_prompt and a raise_exception helper.
It renders in a worker process with limits on time, memory and output (tinyllm/chat_template.py), so a
hostile or broken template is one TokenizerError naming its file, never a hang or a crash.

Text must be valid Unicode: a str holding lone surrogates (bytes decoded with errors="surrogateescape", as
Python decodes invalid UTF-8 in sys.argv) is refused with a TokenizerError. Decode bytes with
errors="replace" first (the CLI does, and says so).

BOS: TinyLlama's template does not write "<s>"; its tokenizer's post-processor adds BOS when asked for
special tokens. Other templates (Llama 2's) write "{{ bos_token }}" themselves. We always encode the text
without the post-processor and then put BOS in front unless the text already produced it, so a prompt
starts with exactly one BOS either way.
"""
from pathlib import Path

from .chat_template import ChatTemplateError, TemplateRenderer
from .errors import MAX_JSON_BYTES, TokenizerError, clip, library_errors, read_file, read_json, shown
from .gguf import GGUFCheckpoint, gguf_tokenizer

# tokenizer.json holds the whole vocabulary and its merges: 2 MB for Llama 2, 9 MB for Llama 3, 33 MB for
# Gemma 3 (262 thousand tokens). 256 MiB is ~8x the largest; what is above it is not read at all.
MAX_TOKENIZER_BYTES = 256 << 20


class Tokenizer:
    def __init__(self, model_dir):
        from tokenizers import Tokenizer as _RustTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        text = read_file(path, TokenizerError, MAX_TOKENIZER_BYTES, missing="file not found (the fast-tokenizer "
                         "file; slow tokenizer.model files are not read)")
        with library_errors(TokenizerError, f"{path}: cannot load"):  # Rust raises a bare Exception on bad files
            self._tok = _RustTokenizer.from_str(text.decode("utf-8"))
        if self._tok.get_vocab_size(with_added_tokens=True) == 0:        # every prompt would encode to nothing
            raise TokenizerError(f"{path}: the vocabulary has no tokens")

        config_path = model_dir / "tokenizer_config.json"
        config = read_json(config_path, TokenizerError, missing="file not found (it names the BOS/EOS tokens and "
                           "holds the chat template)")
        if not isinstance(config, dict):
            raise TokenizerError(f"{config_path}: expected a JSON object")

        template, template_file = _chat_template(config, config_path)
        self._finish(_token_string(config.get("bos_token")), _token_string(config.get("eos_token")),
                     bool(config.get("add_bos_token", True)), template, template_file)
        self.source = model_dir

    @classmethod
    def from_gguf(cls, gguf):
        """The tokenizer a GGUF file carries in its metadata (tokenizer.ggml.*, tokenizer.chat_template), built
        with `tokenizers` to give the ids of the model's tokenizer.json. gguf: a path or a GGUFCheckpoint."""
        ckpt = gguf if isinstance(gguf, GGUFCheckpoint) else GGUFCheckpoint(gguf)
        parts = gguf_tokenizer(ckpt.metadata)
        tok = cls.__new__(cls)
        tok._tok = parts.tokenizer
        tok._finish(parts.bos_token, parts.eos_token, parts.add_bos, parts.chat_template, ckpt.path)
        tok.source = ckpt.path
        return tok

    def _finish(self, bos_token, eos_token, add_bos, chat_template, source):
        """Special tokens and the chat template; `source` (the file they came from) names them in errors."""
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = self._id_of(bos_token, source, "bos_token")
        self.eos_id = self._id_of(eos_token, source, "eos_token")
        self.add_bos = add_bos and self.bos_id is not None
        self.chat_template = chat_template
        self.template_file = source          # where the template (and the special tokens) came from
        self._template = None
        self._special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def _id_of(self, token, source, field):
        if token is None:
            return None
        i = self._tok.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{source}: {field} {shown(token)} is not in the vocabulary of tokenizer.json")
        return i

    @property
    def vocab_size(self):
        return self._tok.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, i):
        return self._tok.id_to_token(int(i))

    # ----------------------------------------------------------------------------------------------------
    def encode(self, text, add_bos=None):
        """str -> list of ids, with exactly one BOS in front when add_bos (default: tokenizer_config's)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:           # the Rust side takes valid Unicode only
            bad = next((i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF), None)
            if bad is None:
                raise
            raise TokenizerError(f"text is not valid Unicode: lone surrogate {text[bad]!r} at character {bad} "
                                 f"(decode bytes with errors='replace')") from None
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens=True):
        """ids -> str. Special tokens (<s>, </s>) are dropped unless skip_special_tokens=False."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:   # by id: `tokenizers` keeps special tokens marked "normalized" (as Llama's
            ids = [i for i in ids if i not in self._special_ids]    # tokenizer.json has them) behind a normalizer
        return self._tok.decode(ids, skip_special_tokens=False)

    # ----------------------------------------------------------------------------------------------------
    def render_chat(self, messages, add_generation_prompt=True):
        """Render messages [{"role": "system"|"user"|"assistant", "content": str}, ...] with the model's chat
        template -> the prompt text (without BOS unless the template writes it).

        The template runs in a sandboxed worker process with time, memory and output limits (see
        tinyllm/chat_template.py); whatever goes wrong is a TokenizerError naming the template's file."""
        if self.chat_template is None:
            raise TokenizerError(f"{self.template_file}: no chat_template, so chat prompts "
                                 f"cannot be built for this model")
        check_messages(messages)
        if self._template is None:
            self._template = TemplateRenderer(self.chat_template)
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except ChatTemplateError as e:
            raise TokenizerError(f"{self.template_file}: the chat template {clip(e, 400)}") from e

    def encode_chat(self, messages, add_generation_prompt=True):
        """Messages -> prompt ids: the rendered template with exactly one BOS in front."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_bos=self.bos_id is not None)


# Tokens that end a turn in the chat formats of the families tinyllm runs (Llama 3, ChatML: Qwen and SmolLM2, Gemma,
# Phi): generation stops at them, as llama.cpp stops at the same list, whatever the file names as EOS.
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|end|>")


def end_of_turn_ids(tokenizer):
    """The ids of END_OF_TURN's tokens that this vocabulary has as special tokens."""
    ids = (tokenizer._tok.token_to_id(t) for t in END_OF_TURN)
    return {i for i in ids if i is not None and i in tokenizer._special_ids}


def _token_string(value):
    """tokenizer_config writes special tokens as a string or as {"content": "<s>", ...} (an AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(config, config_path):
    """-> (the chat template or None, the file it came from)."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja = config_path.with_name("chat_template.jinja")
    if template is None and jinja.is_file():       # newer transformers save it here
        with library_errors(TokenizerError, f"{jinja}: cannot read"):        # not UTF-8
            return read_file(jinja, TokenizerError, MAX_JSON_BYTES).decode("utf-8"), jinja
    return (template if isinstance(template, str) else None), config_path


def check_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, "
                         f"got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] = {m!r:.80}: expected a dict with string 'role' and 'content'")


# --------------------------------------------------------------------------------------------------------
# Streaming detokenisation
# --------------------------------------------------------------------------------------------------------
class StreamDecoder:
    """Feed token ids one at a time, get the text they add.

    Decoding token by token is wrong twice over for a Llama tokenizer:
      * a character outside the vocabulary is spelled as UTF-8 bytes, one byte-fallback token each
        ("€" = <0xE2><0x82><0xAC>); alone, a partial byte sequence decodes to U+FFFD;
      * the decoder drops the leading space of the *first* token it sees ("▁world" alone -> "world"),
        so pieces decoded separately lose the spaces between words.
    So we decode a short window of recent ids twice, with and without the new ones, and emit the difference,
    and only once the text no longer ends in U+FFFD (an unfinished character). The window starts at the
    tokens of the previous emitted piece, so the new token is never first in it and keeps its space.
    For valid UTF-8 byte runs, concatenating every piece (plus flush()) gives exactly decode(all ids); for
    byte runs that are not valid UTF-8 (random models produce them) the U+FFFD replacement characters can
    fall differently than in decode(all). Each step costs O(piece), not O(everything so far). (This is
    text-generation-inference's prefix/read offset scheme.)

    context_ids: ids that come before the stream (e.g. the end of the prompt); they are not emitted, but a
    first generated "▁word" then keeps its leading space, as in a continuation of the prompt.

    At the end, flush() holds back an unfinished character (a reply cut off by its length limit between the
    bytes of an emoji): those ids are dropped (counted in .dropped), never shown as U+FFFD. Bytes that can
    never become a character (an invalid sequence) still show as U+FFFD: they are what the model wrote.
    """

    def __init__(self, tokenizer, context_ids=(), skip_special_tokens=True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = [int(i) for i in list(context_ids)[-4:]]
        self.prefix_offset = 0              # window start: first id of the last emitted piece
        self.read_offset = len(self.ids)    # ids before this have been emitted
        self.dropped = 0                    # ids of an unfinished character flush() held back

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def feed(self, token_id):
        """Add one id -> the new text ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self):
        """Whatever is still held back, less an unfinished character at the very end (see the class)."""
        pending = [token_bytes(self.tokenizer, i) for i in self.ids[self.read_offset:]]
        unfinished = _unfinished_utf8(b"".join(pending))
        cut = len(self.ids)
        while unfinished > 0 and cut > self.read_offset:     # the trailing ids that hold the unfinished bytes
            cut -= 1
            unfinished -= len(pending[cut - self.read_offset])
        straddles = unfinished < 0                           # that id also holds whole characters: keep them
        cut += straddles
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        piece = self._decode(self.ids[self.prefix_offset:cut])[len(before):]
        if straddles:                                        # a lossy decode wrote the tail as one U+FFFD
            piece = piece.removesuffix("\ufffd")
        self.dropped, self.ids = len(self.ids) - cut, self.ids[:cut]
        if piece:
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return piece


def _unfinished_utf8(data):
    """How many bytes at the end of data begin a UTF-8 character they do not finish (0 to 3): Python's decoder
    calls exactly those "unexpected end of data" (a byte that can never be a character is "invalid")."""
    for k in range(1, min(3, len(data)) + 1):
        try:
            data[-k:].decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start == 0 and e.reason == "unexpected end of data":
                return k
    return 0


def _byte_level_alphabet():
    """GPT-2's byte-level BPE spells each byte as a printable character: {character: byte}."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_BYTE_LEVEL = _byte_level_alphabet()


def token_bytes(tokenizer, i):
    """The bytes token i stands for: a byte-fallback token ("<0xF0>"), a byte-level BPE token ("ðŁĺ"), else the
    UTF-8 of its text."""
    piece = tokenizer.id_to_token(i) or ""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">") and piece[3:5].isalnum():
        return bytes.fromhex(piece[3:5])
    text = tokenizer.decode([i])
    if "\ufffd" in text and all(c in _BYTE_LEVEL for c in piece):
        return bytes(_BYTE_LEVEL[c] for c in piece)
    return text.encode("utf-8")
