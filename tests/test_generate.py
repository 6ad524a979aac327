"""tinyllm/generate.py: the sampler's rules, and the generation loop on the tiny model (NumPy backend).

Every generation here is checked against something computed another way: a greedy loop that recomputes
the whole sequence with no KV cache, or a fresh model that reuses nothing.
"""
import numpy as np
import pytest

from tinyllm import ContextOverflowError, GenerationInterrupted, load_model
from tinyllm.generate import (NonFiniteLogitsError, Sampler, apply_repetition_penalty, common_prefix_length,
                              generate, softmax, top_k_filter, top_p_filter)


# --------------------------------------------------------------------------------------------------------
# Sampling rules
# --------------------------------------------------------------------------------------------------------
def random_logits(seed, n=50):
    return np.random.default_rng(seed).standard_normal(n) * 3


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = random_logits(0)
    draw = lambda seed: [Sampler(temperature=1.0, seed=seed)(logits) for _ in range(30)]  # noqa: E731
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_greedy_and_top_k_1_are_the_argmax():
    for seed in range(10):
        logits = random_logits(seed)
        assert Sampler()(logits) == int(np.argmax(logits))
        assert Sampler(temperature=1.5, top_k=1, seed=seed)(logits) == int(np.argmax(logits))


def test_top_k_keeps_the_k_largest():
    logits = np.array([1.0, 5.0, 3.0, 4.0, 2.0])
    assert np.isfinite(top_k_filter(logits, 2)).tolist() == [False, True, False, True, False]
    assert np.array_equal(top_k_filter(logits, 0), logits)
    drawn = {Sampler(temperature=5.0, top_k=3, seed=s)(logits) for s in range(100)}
    assert drawn == {1, 2, 3}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    kept = lambda p: set(np.flatnonzero(top_p_filter(probs, p)).tolist())   # noqa: E731
    assert kept(0.5) == {1}               # 0.5 alone reaches 0.5
    assert kept(0.51) == {1, 3}           # 0.5 + 0.3 = 0.8
    assert kept(0.8) == {1, 3}
    assert kept(0.81) == {1, 3, 2}        # 0.95
    assert kept(1.0) == {0, 1, 2, 3}
    assert np.isclose(top_p_filter(probs, 0.6).sum(), 1.0)
    logits = np.log(probs)
    drawn = {Sampler(temperature=1.0, top_p=0.75, seed=s)(logits) for s in range(200)}
    assert drawn == {1, 3}


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([0.1, 0.6, 0.3]))
    s = Sampler(temperature=1.0, seed=0)
    counts = np.bincount([s(logits) for _ in range(3000)], minlength=3) / 3000
    assert np.allclose(counts, [0.1, 0.6, 0.3], atol=0.03)
    assert np.allclose(softmax(logits), [0.1, 0.6, 0.3])


def test_repetition_penalty_rule():
    logits = np.array([2.0, -2.0, 1.0, 0.5])
    got = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert got.tolist() == [1.0, -4.0, 1.0, 0.5]      # seen: positive / 2, negative * 2; unseen untouched
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5]   # the input is not modified
    assert Sampler()(logits, previous_ids=[0]) == 0
    assert Sampler(repetition_penalty=2.5)(logits, previous_ids=[0]) == 2   # 2 / 2.5 = 0.8 < 1.0


@pytest.mark.parametrize("kw, words", [({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"),
                                       ({"top_k": 1.5}, "top_k"), ({"top_p": 0.0}, "top_p"),
                                       ({"top_p": 1.2}, "top_p"), ({"repetition_penalty": 0}, "repetition")])
def test_sampler_rejects_bad_settings(kw, words):
    with pytest.raises(ValueError, match=words):
        Sampler(**kw)


# --------------------------------------------------------------------------------------------------------
# The loop on the tiny model
# --------------------------------------------------------------------------------------------------------
PROMPT = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture
def prompt_ids(tiny_model):
    return tiny_model.tokenizer.encode_chat(PROMPT)


def greedy_without_cache(model, prompt, n):
    """Greedy decoding the slow way: the whole sequence from position 0 at every step."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(model.forward(np.array([ids]))[0, -1])))
    return ids[len(prompt):]


def test_greedy_generation_equals_recomputing_everything(tiny_model, tiny_model_dir, prompt_ids):
    result = tiny_model.generate(prompt_ids, max_new_tokens=8)
    got = result.ids
    assert len(got) == 8 and result.stop_reason == "length"
    other = load_model(tiny_model_dir, backend="numpy")
    assert greedy_without_cache(other, prompt_ids, 8) == got
    s = result.stats
    assert (s.prompt_tokens, s.prefill_tokens, s.reused_tokens, s.new_tokens, s.decode_tokens) == \
        (len(prompt_ids), len(prompt_ids), 0, 8, 7)
    assert s.prefill_seconds > 0 and s.decode_seconds > 0 and s.decode_tokens_per_s > 0


def test_seeded_sampling_is_reproducible(tiny_model, tiny_model_dir, prompt_ids):
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=123)
    a = tiny_model.generate(prompt_ids, **kw).ids
    b = load_model(tiny_model_dir, backend="numpy").generate(prompt_ids, **kw).ids
    assert a == b
    assert tiny_model.generate(prompt_ids, **kw).ids == a      # again on the same model (cache reused)


def test_stops_at_eos_and_on_callback(tiny_model, prompt_ids):
    free = tiny_model.generate(prompt_ids, max_new_tokens=6).ids
    tiny_model.stop_ids = {free[2]}                         # pretend the third token is EOS
    result = tiny_model.generate(prompt_ids, max_new_tokens=6)
    assert result.ids == free[:3] and result.stop_reason == "eos"
    tiny_model.stop_ids = set()
    seen = []
    result = tiny_model.generate(prompt_ids, max_new_tokens=6, on_token=lambda t: seen.append(t) or len(seen) == 4)
    assert result.ids == seen == free[:4] and result.stop_reason == "callback"


def test_prompt_longer_than_context(tiny_model_dir):
    model = load_model(tiny_model_dir, backend="numpy", max_len=16)
    with pytest.raises(ContextOverflowError, match="prompt has 17 tokens but the context holds 16"):
        model.generate(list(range(3, 20)))
    with pytest.raises(ContextOverflowError, match="no room"):
        model.generate(list(range(3, 19)))                   # 16 tokens: full, nothing left to generate


def test_max_new_tokens_is_capped_so_the_cache_never_overflows(tiny_model_dir):
    model = load_model(tiny_model_dir, backend="numpy", max_len=16)
    result = model.generate(list(range(3, 16)), max_new_tokens=10)     # 13 prompt tokens, room for 3
    assert len(result.ids) == 3 and result.stop_reason == "context"
    assert model.cache.lengths.max() <= 16 and model.n_cached == 15  # the last token is returned, not fed
    assert model.generate([5], max_new_tokens=0).ids == []


def test_prefix_reuse_across_calls_equals_a_fresh_model(tiny_model, tiny_model_dir, prompt_ids):
    first = tiny_model.generate(prompt_ids, max_new_tokens=5).ids
    # the next chat turn: the previous prompt + reply + a new user message
    messages = PROMPT + [{"role": "assistant", "content": tiny_model.tokenizer.decode(first)},
                         {"role": "user", "content": "Tell me more."}]
    second_prompt = tiny_model.tokenizer.encode_chat(messages)
    result = tiny_model.generate(second_prompt, max_new_tokens=5)
    reused = result.stats.reused_tokens
    assert reused >= len(prompt_ids) and reused + result.stats.prefill_tokens == len(second_prompt)
    assert result.ids == load_model(tiny_model_dir, backend="numpy").generate(second_prompt, max_new_tokens=5).ids
    # a prompt that diverges early: the cache is truncated to the shared prefix, the rest recomputed
    third_prompt = prompt_ids[:3] + [300, 301, 302]
    third = tiny_model.generate(third_prompt, max_new_tokens=4)
    assert third.stats.reused_tokens == 3
    assert third.ids == load_model(tiny_model_dir, backend="numpy").generate(third_prompt, max_new_tokens=4).ids
    # the same prompt again: everything but the last prompt token is reused
    again = tiny_model.generate(third_prompt, max_new_tokens=4)
    assert again.ids == third.ids and again.stats.reused_tokens == len(third_prompt) - 1
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2


def test_chunked_prefill_equals_one_prefill(tiny_model, tiny_model_dir, prompt_ids, monkeypatch):
    """Llama.forward runs a prompt longer than the engine's prefill_chunk in chunks: the same tokens."""
    from tinyllm.engines import NumpyEngine
    want = tiny_model.generate(prompt_ids, max_new_tokens=4).ids
    monkeypatch.setattr(NumpyEngine, "prefill_chunk", 3)
    other = load_model(tiny_model_dir, backend="numpy")
    assert len(prompt_ids) > 3 and other.generate(prompt_ids, max_new_tokens=4).ids == want


def test_keyboard_interrupt_keeps_what_was_generated(tiny_model, tiny_model_dir, prompt_ids):
    free = load_model(tiny_model_dir, backend="numpy").generate(prompt_ids, max_new_tokens=6).ids
    seen = []

    def interrupt_at_third(token):
        seen.append(token)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(GenerationInterrupted) as caught:
        tiny_model.generate(prompt_ids, max_new_tokens=6, on_token=interrupt_at_third)
    assert isinstance(caught.value, KeyboardInterrupt)               # still stops whoever does not catch it
    result = caught.value.result
    assert result.ids == free[:3] and result.stop_reason == "interrupted"
    assert tiny_model.cached_ids == prompt_ids + free[:2]            # the third was chosen, not yet fed
    assert tiny_model.cache.lengths.tolist() == [len(prompt_ids) + 2]
    # carry on from where it stopped: the same tokens as an uninterrupted run
    again = tiny_model.generate(prompt_ids + free[:3], max_new_tokens=3)
    assert again.ids == free[3:] and again.stats.reused_tokens == len(prompt_ids) + 2


def test_chat_returns_the_decoded_reply(tiny_model, prompt_ids):
    text = tiny_model.chat(PROMPT, max_new_tokens=6)
    ids = load_model(tiny_model.tokenizer.source, backend="numpy").generate(prompt_ids, max_new_tokens=6).ids
    assert isinstance(text, str) and text == tiny_model.tokenizer.decode(ids)
    assert tiny_model.cached_ids[:len(prompt_ids)] == prompt_ids


def test_generate_on_the_kernel_backend(tiny_model_dir, tiny_model, prompt_ids, kernel_backend):
    """Greedy tokens through the prefill and decode attention kernels (simulator or GPU) equal the NumPy
    backend's (NumPy matmuls; the all-kernel device engine is tests/test_engines.py's)."""
    kernels = load_model(tiny_model_dir, backend=kernel_backend, engine="numpy")
    assert kernels.generate(prompt_ids, max_new_tokens=3).ids == tiny_model.generate(prompt_ids, max_new_tokens=3).ids


class LogitsTurnNaN:
    """A stand-in model: token 3 is always the most likely, until forward pass number `after` + 1, whose logits
    are NaN (what overflow in a forward pass produces)."""
    max_len = 64

    def __init__(self, after):
        self.after, self.calls, self.cached_ids = after, 0, []

    def reusable(self, n):
        return n

    def forward(self, ids, start_pos=0, last_only=False):
        self.calls += 1
        logits = np.zeros((1, ids.shape[1], 10), np.float32)
        logits[..., 3] = 1.0
        if self.calls > self.after:
            logits[..., 5] = np.nan
        return logits


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_logits_stop_generation_with_an_error_instead_of_a_token(temperature):
    shown = []
    with pytest.raises(NonFiniteLogitsError, match="logits after position 4 hold 1 NaN/inf values"):
        generate(LogitsTurnNaN(after=2), [1, 2, 3], max_new_tokens=10, sampler=Sampler(temperature, top_k=1, seed=0),
                 on_token=shown.append)
    assert shown == [3, 3]                       # prefill and one decode step were fine; nothing after
    with pytest.raises(NonFiniteLogitsError, match="after position 2"):
        generate(LogitsTurnNaN(after=0), [1, 2, 3], max_new_tokens=10)
