"""Benchmark the whole model: prefill time for an N-token prompt, then decode speed over M new tokens.

    gpu = tinyllm.load_model("path/to/model", backend="cuda")       # the device engine
    cpu = tinyllm.load_model("path/to/model", backend="numpy")      # the NumPy engine
    rows = bench_model([gpu, cpu], seq_lens=(128, 512), new_tokens=32)
    python cli.py bench --what model [-m DIR] --seq-lens 128,512      # the same, as a table

numbattn/bench.py times one kernel; this times what a user waits for. Both halves run through tinyllm's
generate() (chunked prefill, then one token per forward pass), so every cost is in: the matmuls, attention, the
KV-cache appends, sampling, the host<->device copies.

Rows have numbattn.bench's format, so its pivot / format_table / plot show them:

    {what: "model", impl: "<engine> prefill", batch: 1, n: N, ms: whole prompt,   tokens_per_s: N / s}
    {what: "model", impl: "<engine> decode",  batch: 1, n: N, ms: per new token,  tokens_per_s: ...}
    (<engine>: the backend's name for the device engine and pure NumPy; "numpy+cuda attention" for the mix)

"decode" at n = N is the mean step while the cache grows from N to N + M tokens. The prompt is random token
ids (the content does not change the work) and EOS does not stop the run. One untimed warm-up generation per
model comes first (on a GPU it compiles the kernels); each number is the median of `repeat` runs, timed
with the host clock, which waits for the GPU anyway: every step copies its logits back.
"""
import logging
import statistics

import numpy as np

from .generate import Sampler, generate

log = logging.getLogger("tinyllm")


def default_prompt_lengths(model, backend, new_tokens):
    """Powers of two from 16 up to min(1024, half the context) that leave room for new_tokens; (8, 16) on
    the simulator, where every CUDA thread is a Python thread."""
    if backend == "sim":
        lengths = (8, 16)
    else:
        top = min(1024, model.max_len // 2)
        lengths = tuple(n for n in (16, 32, 64, 128, 256, 512, 1024) if n <= top)
    return tuple(n for n in lengths if n + new_tokens <= model.max_len) or (max(1, model.max_len - new_tokens),)


def bench_model(models, seq_lens, new_tokens=32, repeat=1, seed=0, progress=None):
    """Prefill and decode timings of each model (a Llama, or several: e.g. the device engine and the NumPy
    engine on the same checkpoint) for each prompt length -> rows. progress(1) after each (model, length)."""
    models = models if isinstance(models, (list, tuple)) else [models]
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens}: must be >= 2 (one prefill token, then decode steps)")
    too_long = [n for n in seq_lens if n + new_tokens > min(m.max_len for m in models)]
    if too_long:
        raise ValueError(f"prompt lengths {too_long} + {new_tokens} new tokens exceed the context of "
                         f"{min(m.max_len for m in models)} tokens")
    rng = np.random.default_rng(seed)
    rows = []
    for m in models:
        label = m.backend if m.engine == "device" or m.backend == "numpy" else f"numpy+{m.backend} attention"
        run(m, rng.integers(0, m.config.vocab_size, 4).tolist(), 2)        # warm-up: compile, page weights in
        for n in seq_lens:
            prompt = rng.integers(0, m.config.vocab_size, n).tolist()
            stats = [run(m, prompt, new_tokens) for _ in range(repeat)]
            prefill_s = statistics.median(s.prefill_seconds for s in stats)
            step_s = statistics.median(s.decode_seconds / s.decode_tokens for s in stats)
            log.info("tinyllm bench: %s n=%d prefill %.1f ms, decode %.2f ms/token", label, n, prefill_s * 1e3,
                     step_s * 1e3)
            rows.append(dict(what="model", impl=f"{label} prefill", batch=1, n=n, ms=prefill_s * 1e3,
                             tokens_per_s=n / prefill_s))
            rows.append(dict(what="model", impl=f"{label} decode", batch=1, n=n, ms=step_s * 1e3,
                             tokens_per_s=1 / step_s))
            if progress:
                progress(1)
    return rows


def run(model, prompt, new_tokens):
    """One timed generation from an empty cache, exactly new_tokens long -> GenerationStats."""
    model.reset()
    return generate(model, prompt, new_tokens, Sampler(), stop_ids=()).stats
