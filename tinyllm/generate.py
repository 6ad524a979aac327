"""Sampling and the generation loop, kept apart from the model (as in llama2.c).

    sampler = Sampler(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=0)
    result = generate(model, prompt_ids, max_new_tokens=64, sampler=sampler, on_token=print)
    result.ids, result.stop_reason, result.stats.decode_tokens_per_s

The model only maps token ids to next-token logits (Llama.forward); everything about choosing a token lives
here, in the order transformers applies it:

    logits -> repetition penalty -> / temperature -> top-k -> softmax -> top-p -> draw
    temperature 0 (the default) is greedy: the argmax after the repetition penalty.

The loop: prefill the prompt (only the part not already in the KV cache, see below), then one token at a
time: sample, report, feed it back. It stops at a stop token (EOS), after max_new_tokens, or when
on_token returns True.

KV-cache reuse: the model remembers which ids its cache holds (model.cached_ids). In a chat, each turn's
prompt is the previous prompt plus the reply plus the new user message, so the longest common prefix of the
new prompt and cached_ids is already computed: the cache is truncated to that prefix and only the rest is
prefilled. The last prompt token is always recomputed, because its logits (not kept) choose the first new
token.

Context limit: the cache holds model.max_len tokens. A prompt that leaves no room for a single new token
raises ContextOverflowError; otherwise max_new_tokens is capped at max_len - len(prompt), so the cache
never overflows mid-reply (the reply is just shorter, and stats.stop_reason says "context").
"""
import logging
import time
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("tinyllm")


class ContextOverflowError(ValueError):
    """The prompt (plus the tokens already cached) does not fit in the model's context window."""


class NonFiniteLogitsError(RuntimeError):
    """The model's logits hold NaN or inf: generation stops instead of sampling from them (argmax and the
    softmax of NaN pick an arbitrary token, and a reply of garbage is worse than an error)."""


# --------------------------------------------------------------------------------------------------------
# Sampling: logits [vocab] -> one token id. Each step is one small function.
# --------------------------------------------------------------------------------------------------------
def softmax(x):
    e = np.exp(x - x.max())  # subtract the max: exp() never overflows, result unchanged
    return e / e.sum()


def apply_repetition_penalty(logits, previous_ids, penalty):
    """CTRL's rule (as in transformers): make every token seen before less likely. A positive logit is
    divided by the penalty, a negative one multiplied (dividing a negative logit would raise it)."""
    if penalty == 1.0 or len(previous_ids) == 0:
        return logits
    seen = np.unique(np.asarray(previous_ids, dtype=np.int64))
    logits = logits.copy()
    x = logits[seen]
    logits[seen] = np.where(x > 0, x / penalty, x * penalty)
    return logits


def top_k_filter(logits, k):
    """Keep the k largest logits (and any tied with the k-th), set the rest to -inf. k=0: keep all."""
    if k <= 0 or k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, -np.inf)


def top_p_filter(probs, p):
    """Nucleus: keep the smallest set of most likely tokens whose probabilities sum to >= p, renormalise.
    p=1: keep all."""
    if p >= 1.0:
        return probs
    order = np.argsort(-probs, kind="stable")              # most likely first
    cumulative = np.cumsum(probs[order])
    n_keep = min(int(np.searchsorted(cumulative, p)) + 1, probs.size)  # first prefix reaching p
    kept = np.zeros_like(probs)
    kept[order[:n_keep]] = probs[order[:n_keep]]
    return kept / kept.sum()


def sample_from(probs, r):
    """Inverse CDF: the first token whose cumulative probability exceeds r in [0, 1)."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, r * cdf[-1], side="right"), probs.size - 1))


@dataclass
class Sampler:
    """Turns next-token logits into a token id. Reproducible: the same seed draws the same tokens."""
    temperature: float = 0.0        # 0: greedy
    top_k: int = 0                  # 0: no top-k
    top_p: float = 1.0              # 1: no nucleus filtering
    repetition_penalty: float = 1.0  # 1: none; >1 discourages repeats
    seed: int | None = None

    def __post_init__(self):
        if not 0 <= self.temperature < np.inf:
            raise ValueError(f"temperature={self.temperature}: must be a finite number >= 0 (0 means greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 0 (0 means no top-k)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 means no nucleus filtering)")
        if not 0 < self.repetition_penalty < np.inf:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be a finite number > 0 (1 means "
                             f"none)")
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits, previous_ids=()):
        logits = np.asarray(logits, dtype=np.float64)             # [vocab]
        logits = apply_repetition_penalty(logits, previous_ids, self.repetition_penalty)
        if self.temperature == 0:
            return int(np.argmax(logits))
        logits = top_k_filter(logits / self.temperature, self.top_k)
        probs = top_p_filter(softmax(logits), self.top_p)
        return sample_from(probs, self.rng.random())


# --------------------------------------------------------------------------------------------------------
# The generation loop
# --------------------------------------------------------------------------------------------------------
@dataclass
class GenerationStats:
    """Timing of one generate() call, for the CLI's --verbose."""
    prompt_tokens: int = 0          # length of the prompt
    reused_tokens: int = 0          # prompt tokens whose K/V were already cached (not recomputed)
    prefill_tokens: int = 0         # prompt tokens run through the model
    prefill_seconds: float = 0.0    # prefill + choosing the first new token
    new_tokens: int = 0             # tokens generated (including a final EOS)
    decode_tokens: int = 0          # single-token forward passes after the prefill
    decode_seconds: float = 0.0
    stop_reason: str = ""           # "eos", "length", "context", "callback", or "interrupted"

    @property
    def prefill_tokens_per_s(self):
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self):
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class Generation:
    """What one generate() call made (llama2.c's generate writes nothing into the model; neither does ours)."""
    ids: list = field(default_factory=list)                       # the new token ids, a final stop token included
    stats: GenerationStats = field(default_factory=GenerationStats)

    @property
    def stop_reason(self):
        return self.stats.stop_reason


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during generate(). Still a KeyboardInterrupt (it stops the caller as ^C should); `.result` is the
    Generation so far, every token chosen before the interrupt, stop_reason "interrupted"."""

    def __init__(self, result):
        super().__init__(f"generation interrupted after {len(result.ids)} new tokens")
        self.result = result


def finite(logits, position):
    """logits [vocab], or NonFiniteLogitsError naming the position they predict from."""
    if np.isfinite(logits).all():
        return logits
    bad = logits.size - int(np.isfinite(logits).sum())
    raise NonFiniteLogitsError(f"the model's logits after position {position} hold {bad} NaN/inf values (of "
                               f"{logits.size}): numerical overflow in the forward pass, or a broken kernel; "
                               f"stopping rather than sampling from them")


def common_prefix_length(a, b):
    n = 0
    for x, y in zip(a, b, strict=False):   # stops at the shorter one
        if x != y:
            break
        n += 1
    return n


def generate(model, prompt_ids, max_new_tokens=32, sampler=None, on_token=None, stop_ids=()):
    """Continue prompt_ids (batch 1) -> Generation (the new ids, a final stop token included, and stats).

    on_token(token_id) is called once per new token, right after it is chosen (the stop token too); return
    True from it to stop after that token. An exception it raises propagates out of generate; Ctrl-C
    (KeyboardInterrupt) comes out as GenerationInterrupted, whose .result holds every token chosen so far. Either
    way the model is left consistent: model.cached_ids are the ids whose K/V are in the cache, and the next
    generate() reuses them.

    The prompt is one model.forward (which runs it in chunks of the engine's size).
    """
    sampler = sampler if sampler is not None else Sampler()
    prompt = [int(i) for i in prompt_ids]
    n_prompt = len(prompt)
    if n_prompt == 0:
        raise ValueError("prompt_ids is empty: give at least one token (e.g. BOS)")
    if n_prompt >= model.max_len:
        raise ContextOverflowError(f"prompt has {n_prompt} tokens but the context holds {model.max_len} "
                                   f"(max_len), leaving no room for a reply: shorten the prompt or the chat "
                                   f"history")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 0")
    budget = min(max_new_tokens, model.max_len - n_prompt)
    if budget < max_new_tokens:
        log.info("tinyllm: max_new_tokens %d capped to %d: the prompt has %d of %d context tokens",
                 max_new_tokens, budget, n_prompt, model.max_len)
    stop_ids = set(int(i) for i in stop_ids)

    result = Generation(stats=GenerationStats(prompt_tokens=n_prompt, stop_reason="interrupted"))
    if budget == 0:
        result.stats.stop_reason = "length"
        return result
    try:
        _prefill_and_decode(model, prompt, budget, max_new_tokens, sampler, on_token, stop_ids, result)
    except GenerationInterrupted:
        raise
    except KeyboardInterrupt as e:
        raise GenerationInterrupted(result) from e
    return result


def _prefill_and_decode(model, prompt, budget, max_new_tokens, sampler, on_token, stop_ids, result):
    """The loop of generate(), filling result (ids and stats) as it goes."""
    stats, generated, n_prompt = result.stats, result.ids, len(prompt)
    # Prefill: skip what the cache already holds, but always recompute the last prompt token's logits.
    reused = model.reusable(min(common_prefix_length(prompt, model.cached_ids), n_prompt - 1))
    stats.reused_tokens, stats.prefill_tokens = reused, n_prompt - reused
    t0 = time.perf_counter()
    try:
        todo = np.array([prompt[reused:]], dtype=np.int64)                             # [1, n_prompt - reused]
        logits = model.forward(todo, start_pos=reused, last_only=True)[0, -1]          # [vocab]
        history = list(prompt)
        token = sampler(finite(logits, n_prompt - 1), history)
    finally:
        stats.prefill_seconds = time.perf_counter() - t0

    # Decode: report the token, stop or feed it back for the next one.
    t0 = time.perf_counter()
    try:
        while True:
            generated.append(token)
            history.append(token)
            stats.new_tokens = len(generated)
            if on_token is not None and on_token(token):
                stats.stop_reason = "callback"
                break
            if token in stop_ids:
                stats.stop_reason = "eos"
                break
            if len(generated) == budget:
                stats.stop_reason = "length" if budget == max_new_tokens else "context"
                break
            ids = np.array([[token]], dtype=np.int64)                                    # [1, 1]
            logits = model.forward(ids, start_pos=n_prompt + len(generated) - 1, last_only=True)[0, -1]
            stats.decode_tokens += 1
            token = sampler(finite(logits, len(history) - 1), history)
    finally:
        stats.decode_seconds = time.perf_counter() - t0
