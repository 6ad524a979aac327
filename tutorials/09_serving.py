"""
Lesson 9: serving many requests at once: a paged KV cache and continuous batching
=================================================================================

What you will learn
-------------------
* Why a server does not give each request a contiguous max_len cache (lesson 5's KVCache): 32 requests of 50 to
  2000 tokens would each reserve the longest. A paged cache (vLLM's PagedAttention) keeps K and V in pages of a
  few tokens from one shared pool, a block table per sequence, a free list: memory is what the sequences hold.
  We draw it (tutorials/out/09_paged_cache.png).
* How a kernel reads through a block table: the paged decode kernel (numbattn/kernels/decode_paged.py) is
  lesson 5's split-K decode v1 frame, scanning a page at a time; three sequences of different lengths decode in
  ONE launch, checked against the NumPy reference.
* Continuous batching: requests join and leave the running batch between decode steps (tinyllm/server/). A
  decode step reads every weight once whatever the batch, so batch 32 costs about what batch 1 does: we measure
  the model's decode throughput at batch 1, 8 and 32 (Llama.forward_rows, the same forward as ever).
* What `tinyllm serve` adds around it: the OpenAI API, chunked prefill, pages freed when a client leaves.

Run it: `python tutorials/09_serving.py`, or run the `# %%` cells in VS Code / Jupyter.
"""

# %%
import _setup  # noqa: F401  (must be the first import: GPU or simulator, see tutorials/README.md)

import tempfile
import time

import numpy as np

import _lesson
import numbattn
from numbattn import reference
from numbattn.backend import to_host
from numbattn.lab import bench

BACKEND = numbattn.available_backends()[0]
print(f"engine: {_setup.ENGINE}; numbattn backend: {BACKEND}")
assert BACKEND in ("cuda", "sim"), "this lesson runs the kernels: it needs a GPU or NUMBA_ENABLE_CUDASIM=1"
plt = _lesson.pyplot()

# %% [markdown]
# ## The paged cache
#
# One layer, 2 KV heads of head_dim 16, pages of BS = 4 tokens, a pool of 12 pages, room for 4 sequences. Three
# sequences arrive with 6, 1 and 9 tokens. `allocate(seq, n)` hands a sequence enough pages for n tokens from the
# free list; `append` writes K and V through the *block table* (the sequence's pages, in order): token p of
# sequence s goes to page
# `block_tables[s, p // BS]` at offset `p % BS`. Every page no one holds is NaN (a kernel that read one would
# poison its output).

# %%
BS, D, HKV = 4, 16, 2
rng = np.random.default_rng(0)
cache = numbattn.PagedKVCache(1, 12, HKV, D, 4, 16, block_size=BS)
cache._free = [11, 3, 8, 0, 5, 9, 2, 7, 4, 10, 1, 6]        # a pool that has seen traffic: pages out of order
lengths = [6, 1, 9]
kv = {}
for s, n in enumerate(lengths):
    k, v = (rng.standard_normal((1, HKV, n, D)).astype(np.float32) for _ in range(2))
    cache.allocate(s, n)
    cache.append(0, [s], k, v)
    kv[s] = (k, v)
for s in range(3):
    print(f"sequence {s}: {lengths[s]} tokens in pages {cache.pages(s).tolist()}")
print(f"free list: {cache._free[::-1]} ({cache.free_blocks} of {cache.n_blocks} pages free)")
print(f"a contiguous cache for 4 sequences of max_len 16 holds 64 token slots; this pool holds "
      f"{cache.n_blocks * BS}, of which the sequences use {sum(len(cache.pages(s)) for s in range(3)) * BS}")

# %%
def draw(cache, lengths):
    """Block tables on the left, the pool's pages on the right (which sequence holds each, tokens filled)."""
    owner = np.full((cache.n_blocks, BS), -1)
    for s, n in enumerate(lengths):
        for p in range(n):
            owner[cache.pages(s)[p // BS], p % BS] = s
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [1, 1.2]})
    tables = cache.host_tables()[:len(lengths), :cache.pages_for(max(lengths))]
    _lesson.grid(a, tables, "block tables: row = sequence, entry = page (-1: none)", cmap="Pastel1",
                 xlabel="p // BS", ylabel="sequence")
    _lesson.grid(b, owner, "the pool: which sequence wrote each slot (-1: free, NaN)", cmap="Pastel2",
                 xlabel="offset p % BS", ylabel="page")
    return fig


if plt is not None:
    _lesson.save(draw(cache, lengths), "09_paged_cache.png")

# %% [markdown]
# ## Three sequences, one launch
#
# A decode step brings one query token per sequence. Batch row b names its sequence (`rows[b]`, here in another
# order than the sequences, plus a padding row -1 as a CUDA-graph bucket would add). The kernel's grid is (split,
# KV head, row); each block walks its split page by page, looking each page up in the row's block table, and
# carries the online-softmax state from page to page. Lesson 5's split merge finishes the job.

# %%
from numba import cuda  # noqa: E402  (after _setup chose GPU or simulator)

from numbattn.decode import Config  # noqa: E402

rows = np.array([2, -1, 0, 1], np.int32)
q = rng.standard_normal((len(rows), 4, D)).astype(np.float32)            # 4 query heads: 2 per KV head
config = Config(split=8, threads=8, dims_per_lane=8, keys_per_step=2) if BACKEND == "sim" else None
out = to_host(numbattn.paged_decode_attention(cuda.to_device(q), cache, 0, cuda.to_device(rows), config=config))
for b, s in enumerate(rows):
    if s < 0:
        _lesson.close("padding row: zeros", out[b], np.zeros_like(out[b]))
        continue
    k, v = kv[s]
    want = reference.decode_attention(q[b:b + 1].astype(np.float64), k, v, [lengths[s]])[0]
    _lesson.close(f"row {b} (sequence {s}, {lengths[s]} tokens) vs fp64 reference", out[b], want, rtol=1e-5,
                  atol=1e-6)

# %%
def consecutive_pages():
    """The mistake: take a sequence's pages as consecutive in the pool, from its first page on."""
    pool_k, pool_v = to_host(cache.k(0)), to_host(cache.v(0))
    table = cache.pages(2)[0] + np.arange(3)
    k, v = (reference.gather_pages(pool, table, lengths[2])[None] for pool in (pool_k, pool_v))
    got = reference.decode_attention(q[:1].astype(np.float64), k, v, [lengths[2]])[0]
    _lesson.close("sequence 2 read through its block table", got, out[0], rtol=1e-5, atol=1e-6)


_lesson.break_it("consecutive-pages", "read a sequence's pages as if they were consecutive in the pool",
                 "sequence 2's pages [4, 7, 2] read as [4, 5, 6]: another sequence's keys, or poisoned NaN",
                 "sequence 2 read through its block table", consecutive_pages)

# %% [markdown]
# When a request ends (or its client disconnects) its pages go back to the free list, poisoned again, and the next
# request takes them: no compaction, no copy.

# %%
freed = cache.pages(0)
cache.free(0)
print(f"sequence 0 freed pages {freed.tolist()}: {cache.free_blocks} free; they hold NaN again: "
      f"{bool(np.isnan(to_host(cache.k(0))[freed]).all())}")
cache.allocate(3, 10)
print(f"a new sequence of 10 tokens gets pages {cache.pages(3).tolist()}")

# %% [markdown]
# ## Batch 1 vs 8 vs 32
#
# A server decodes many requests' tokens in one step, and lets requests join and leave that batch between
# steps: *continuous batching* (tinyllm/server/scheduler.py).
#
# Llama.forward_rows runs the model's one forward over a paged cache, row b continuing sequence rows[b] at its own
# position (tinyllm/engines/paged.py). A decode step reads every weight once, for however many rows: at batch 32
# the weights' bytes are shared by 32 tokens. Here: the miniature checkpoint (on the GPU its device engine; in the
# simulator its NumPy engine, since simulated kernels would time Python threads), aggregate tokens per second of
# decode steps over sequences that hold 32 tokens each.

# %%
from tinyllm import load_model, make_tiny  # noqa: E402

tiny = make_tiny(tempfile.mkdtemp(prefix="lesson8-") + "/tiny")
llm = load_model(tiny, backend="cuda" if BACKEND == "cuda" else "numpy", max_len=64)


def decode_throughput(batch, steps=8):
    ops = llm.paged_engine(max_seqs=batch, n_blocks=batch * 64 // 16)
    seqs = list(range(batch))
    for s in seqs:
        ops.cache.allocate(s, 32 + steps + 2)
        llm.forward_rows(ops, rng.integers(3, 500, (1, 32)), [s])           # prefill 32 tokens
    ids = rng.integers(3, 500, (batch, 1))
    llm.forward_rows(ops, ids, seqs)                                         # warm-up (GPU: compiles, captures)
    llm.forward_rows(ops, ids, seqs)
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.forward_rows(ops, ids, seqs)
    seconds = (time.perf_counter() - t0) / steps
    return dict(batch=batch, ms_per_step=seconds * 1e3, tokens_per_s=batch / seconds)


table = [decode_throughput(b) for b in (1, 8, 32)]
for row in table:
    row["x_batch_1"] = row["tokens_per_s"] / table[0]["tokens_per_s"]
print(f"decode steps, miniature model, {llm.describe()}:")
print(bench.format_table(table, ["batch", "ms_per_step", "tokens_per_s", "x_batch_1"]))
assert table[-1]["tokens_per_s"] > table[0]["tokens_per_s"], "batching should raise the throughput"
print("TinyLlama-1.1B shapes on an H100 behind `tinyllm serve`: BENCHMARKS.md, 'Serving'.")

# %% [markdown]
# ## The server
#
# `python cli.py serve --model checkpoints/tiny` puts this behind OpenAI's API (tinyllm/server/): each request
# is validated and tokenized (chat template), queued (a bounded queue: past it, 503 with Retry-After), admitted
# when a seat and its pages are free, its prompt prefilled in chunks between the others' decode steps, and its
# tokens streamed back as server-sent events. Any OpenAI client talks to it:
#
#     from openai import OpenAI
#     client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="none")
#     client.chat.completions.create(model="checkpoints/tiny", messages=[{"role": "user", "content": "Hi!"}])

# %%
print("lesson 9 checks passed")
