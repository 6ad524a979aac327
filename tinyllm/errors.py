"""What can be wrong with a model's files, and the two helpers that keep every such error one short line.

    ConfigError      config.json (or a GGUF file's metadata) is missing, unreadable, or describes a model
                     tinyllm does not implement
    WeightsError     a checkpoint file is missing, malformed, or does not match the config
    TokenizerError   the vocabulary or the chat template is missing or unusable

Every message starts with the file it is about. Model files are untrusted input: a value echoed from one goes
through shown() (a 1 MB architecture string must not become a 1 MB error line), and a JSON file goes through
read_json(), which checks its size before reading a byte (a sparse "config.json" of 8 GB costs nothing to make).

This module imports nothing of tinyllm's, so every other module can raise these errors without importing
another one's code (gguf.py raises TokenizerError, tokenizer.py reads GGUF vocabularies).
"""
import json
import os
import stat
from contextlib import contextmanager

MAX_SHOWN = 200          # characters of a value echoed in an error message
# config.json, tokenizer_config.json, generation_config.json and a shard index are a few KB (TinyLlama's
# tokenizer_config.json, the largest usual one, holds the chat template in ~1.3 KB; Llama 3's with its 256
# added tokens is 50 KB): 16 MiB is 300x that, and parsing 16 MiB of JSON stays well under 1 GB of memory.
MAX_JSON_BYTES = 16 << 20


class ConfigError(ValueError):
    """config.json is missing, unreadable, or describes a model tinyllm does not implement."""


class WeightsError(ValueError):
    """A checkpoint file is missing, malformed, or does not match the model's config."""


class TokenizerError(ValueError):
    """tokenizer.json / tokenizer_config.json / a GGUF vocabulary missing or unusable, or a chat that cannot be
    rendered."""


def clip(text, limit=MAX_SHOWN):
    """text cut to `limit` characters, the cut marked with "…"."""
    text = str(text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def shown(value, limit=MAX_SHOWN):
    """repr(value) as an error message echoes it, cut to `limit` characters."""
    return clip(repr(value), limit)


def read_file(path, error, max_bytes, missing="file not found"):
    """The bytes of a regular file of at most max_bytes -> bytes; anything else is `error` naming the file.

    The size is checked before reading (and the read stops at max_bytes + 1 bytes, should the file grow).
    A FIFO or a device is refused before it is opened: opening a FIFO waits for a writer forever."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: not a regular file")
        if st.st_size > max_bytes:
            raise error(f"{path}: {st.st_size:,} bytes, more than the {max_bytes:,} such a file can reasonably "
                        f"have: refusing to read it")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({clip(e)})") from e
    if len(data) > max_bytes:
        raise error(f"{path}: more than {max_bytes:,} bytes: refusing to read it")
    return data


def read_json(path, error, max_bytes=MAX_JSON_BYTES, missing="file not found"):
    """A JSON file of at most max_bytes, parsed -> its value; every failure is `error` naming the file."""
    data = read_file(path, error, max_bytes, missing)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({clip(e)})") from e
    except ValueError as e:
        raise error(f"{path}: not valid JSON ({clip(e)})") from e
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to parse (these files are a few levels deep)") from None


@contextmanager
def library_errors(error, what):
    """An exception a library raises inside the block -> one `error`: "what (its message, clipped)". The
    tokenizers library raises a bare Exception from Rust ("Error while initializing BPE: Token `zzqq` out of
    vocabulary"), which would otherwise end the program in a traceback naming no file."""
    try:
        yield
    except error:
        raise
    except Exception as e:
        raise error(f"{what} ({clip(e)})") from e
