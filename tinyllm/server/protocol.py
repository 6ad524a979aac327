"""The OpenAI API's requests and responses, as tinyllm serves them: validation, errors, JSON bodies, streamed text.

Requests are checked field by field before anything is queued; what is wrong comes back as OpenAI's error object
with the status the API uses:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

400 for a malformed body or a bad field, 404 for a model that is not served (code "model_not_found"), 400 with code
"context_length_exceeded" for a prompt that does not fit. Unknown fields are refused as the API refuses them
("Unrecognized request argument supplied"); fields the API has and tinyllm does not implement (n > 1, logprobs,
penalties, tools...) are accepted only at their do-nothing values, since silently ignoring them would change the
answer. Beyond the API, as vLLM and llama.cpp's server accept them: top_k, repetition_penalty, ignore_eos.
"""
import json
import time
import uuid
from dataclasses import dataclass

from ..generate import Sampler

COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "user",
          "top_k", "repetition_penalty", "ignore_eos"}
# fields of the API that change the output in ways tinyllm does not implement: allowed only at these values
INERT = {"n": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},),
         "logprobs": (False, None), "top_logprobs": (0, None), "tools": ([],), "tool_choice": ("none",),
         "functions": ([],), "parallel_tool_calls": (True, False), "response_format": ({"type": "text"},),
         "best_of": (1,), "echo": (False,), "suffix": ("",), "store": (False,), "metadata": ({},)}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = COMMON | {"prompt"}
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """A request the API refuses: status, OpenAI error type, the parameter at fault, and a code."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind, self.headers = status, param, code, kind, headers or {}

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def bad(param, message):
    return ApiError(400, message, param=param)


@dataclass
class GenRequest:
    """A validated request: what to generate and how."""
    kind: str                   # "chat" or "completion"
    messages: list | None       # chat: [{"role", "content": str}]
    prompt: str | list | None   # completion: text, or token ids
    max_tokens: int | None      # None: as many as the context leaves
    sampler: Sampler
    stop: list
    stream: bool
    include_usage: bool
    ignore_eos: bool


def parse_json(raw):
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(None, f"the request body is not valid JSON ({str(e)[:100]})") from None
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    return body


def parse_request(body, kind, served):
    """A decoded JSON body of /v1/chat/completions (kind "chat") or /v1/completions -> GenRequest, or ApiError."""
    fields = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    for name, value in body.items():
        if name in INERT:
            if value is not None and value not in INERT[name]:
                raise bad(name, f"{name}={json.dumps(value)[:60]} is not supported by this server")
        elif name not in fields:
            raise bad(name, f"Unrecognized request argument supplied: {name}")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("model", "you must provide a model parameter (a string)")
    if model != served:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{served}`", param="model",
                       code="model_not_found")
    limit = body.get("max_completion_tokens") if body.get("max_completion_tokens") is not None else \
        body.get("max_tokens")
    return GenRequest(kind=kind, messages=chat_messages(body.get("messages")) if kind == "chat" else None,
                      prompt=completion_prompt(body.get("prompt")) if kind != "chat" else None,
                      max_tokens=None if limit is None else integer("max_tokens", limit, 1),
                      sampler=sampler(body), stop=stops(body.get("stop")), stream=boolean("stream", body, False),
                      include_usage=stream_usage(body.get("stream_options")),
                      ignore_eos=boolean("ignore_eos", body, False))


def integer(name, value, lowest):
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise bad(name, f"{name}={json.dumps(value)[:40]}: expected an integer >= {lowest}")
    return value


def number(name, value, lo, hi, lo_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (lo < value if lo_open else lo <= value)
    if not ok or not value <= hi:
        raise bad(name, f"{name}={json.dumps(value)[:40]}: expected a number in {'(' if lo_open else '['}{lo}, {hi}]")
    return float(value)


def boolean(name, body, default):
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"{name}={json.dumps(value)[:40]}: expected true or false")
    return value


def sampler(body):
    """The sampling fields -> a Sampler (the API's defaults: temperature 1, top_p 1)."""
    get = lambda name, default: default if body.get(name) is None else body[name]     # noqa: E731
    seed = get("seed", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed", f"seed={json.dumps(seed)[:40]}: expected an integer")
    return Sampler(temperature=number("temperature", get("temperature", 1.0), 0, 2),
                   top_p=number("top_p", get("top_p", 1.0), 0, 1, lo_open=True),
                   top_k=integer("top_k", get("top_k", 0), 0),
                   repetition_penalty=number("repetition_penalty", get("repetition_penalty", 1.0), 0, 100, True),
                   seed=None if seed is None else seed % 2**63)


def stops(value):
    """stop: a string or a list of up to 4 non-empty strings -> list."""
    value = [value] if isinstance(value, str) else [] if value is None else value
    if not isinstance(value, list) or len(value) > 4 or not all(isinstance(s, str) and s for s in value):
        raise bad("stop", "stop must be a non-empty string or a list of up to 4 non-empty strings")
    return value


def stream_usage(options):
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"include_usage"} or \
            not isinstance(options.get("include_usage", False), bool):
        raise bad("stream_options", "stream_options must be {\"include_usage\": true|false}")
    return options.get("include_usage", False)


def chat_messages(messages):
    """messages: a non-empty list of {"role": system|user|assistant, "content": text or [{"type": "text", ...}]}."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty array of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or set(m) - {"role", "content", "name"}:
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object with a role in {ROLES} and a content")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string or text parts")
        out.append({"role": m["role"], "content": content})
    return out


def completion_prompt(prompt):
    """prompt: a string, a list holding one string, or a list of token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    ids = isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt)
    if not (isinstance(prompt, str) and prompt) and not ids:
        raise bad("prompt", "prompt must be a non-empty string (or one string in a list, or a list of token ids)")
    return prompt


def context_error(n_prompt, max_tokens, max_len):
    """A prompt that does not fit -> the ApiError the API gives (None if it fits)."""
    if n_prompt >= max_len:
        return ApiError(400, f"This model's maximum context length is {max_len} tokens. However, your prompt has "
                             f"{n_prompt} tokens, leaving none for the reply.", param="messages",
                        code="context_length_exceeded")
    if max_tokens is not None and n_prompt + max_tokens > max_len:
        return ApiError(400, f"This model's maximum context length is {max_len} tokens. However, you requested "
                             f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
                             f"completion).", param="max_tokens", code="context_length_exceeded")
    return None


# --------------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------------
def new_id(kind):
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(n_prompt, n_completion):
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def response(kind, rid, model, text, finish, n_prompt, n_completion):
    """The whole answer (stream false)."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice], "usage": usage(n_prompt, n_completion),
            "system_fingerprint": None}


def chunk(kind, rid, model, text=None, finish=None, first=False, usage_of=None):
    """One server-sent event's data: a piece of text, the finish reason, or (usage_of) the usage."""
    if usage_of is not None:
        choices = []
    elif kind == "chat":
        delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
           "created": int(time.time()), "model": model, "choices": choices, "system_fingerprint": None}
    if usage_of is not None:
        out["usage"] = usage(*usage_of)
    return out


class TextAssembler:
    """Tokens -> the text a client receives, with stop strings: text that could still turn out to begin a stop
    string is held back (at most the longest stop's length - 1 characters), so a stop string never reaches the
    client, even when it arrives split over tokens."""

    def __init__(self, stream_decoder, stop):
        self.decoder, self.stop, self.pending, self.stopped = stream_decoder, stop, "", False
        self.hold = max((len(s) for s in stop), default=1) - 1

    def feed(self, token):
        """-> the text that can go out now ("" while held back); sets .stopped when a stop string appeared."""
        return self._release(self.decoder.feed(token), final=False)

    def finish(self):
        """-> whatever was held back, once generation ended."""
        return "" if self.stopped else self._release(self.decoder.flush(), final=True)

    def _release(self, piece, final):
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        cut = len(self.pending) if final else max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out
