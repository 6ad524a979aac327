"""The forward pass in one screen, for every family tinyllm runs and for two engines: NumPy (the reference) and the GPU.

    model = tinyllm.load_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    logits = model.forward(ids)                  # [batch, seq] -> [batch, seq, vocab]
    model.generate(prompt_ids, max_new_tokens=32).ids
    model.chat([{"role": "user", "content": "Hi!"}])

One transformer block (Llama 2 / TinyLlama, as in Hugging Face's LlamaForCausalLM):

    h = x + o_proj(attention(rope(q_proj(norm(x))), rope(k_proj(norm(x))), v_proj(norm(x))))
    x = h + down_proj(silu(gate_proj(norm(h))) * up_proj(norm(h)))

with RMSNorm before each half (pre-norm), rotary position embeddings on q and k, grouped-query attention
(4 KV heads serve 32 query heads in TinyLlama: the KV cache is 8x smaller) and a SwiGLU MLP. The other
families (Llama 3, Mistral, Qwen2/2.5, Qwen3, Gemma 2 and 3) change a few named things: biases on q/k/v,
an RMSNorm on each q and k head, a norm after attention and after the MLP too, GeGLU, a sliding window and
a RoPE table per layer, scaled embeddings, soft caps. tinyllm/architecture.py describes them, once per
model (self.arch); the forward below reads those switches, and the engines read the rest.

The arithmetic goes through an engine (tinyllm/engines/), so the forward below is the only one there is:
NumpyEngine (every op a line of NumPy or a CPU kernel tested against one; attention through numbattn) or,
with the weights uploaded to a GPU, DeviceEngine (every op a numbattn kernel, the weights resident, a decode
step replayed as a CUDA graph). The math itself, one function per equation, is in numbattn/reference.py.
A prompt (or a chunk of one) appends its K/V to the KV cache and attends over the whole cache with a
bottom-right-aligned causal mask; a single new token runs the decode kernel.
"""
import logging

import numpy as np

import numbattn
from numbattn import backend as _backend
from numbattn.validate import as_count

from .architecture import describe, rope_table
from .engines import DeviceEngine, DeviceWeights, NumpyEngine, PagedDeviceEngine, PagedNumpyEngine
from .generate import ContextOverflowError, Sampler, generate as _generate

log = logging.getLogger("tinyllm")
# The context when none is asked for, in tokens, as llama.cpp's default: a model's maximum (2048 for TinyLlama,
# 8192 for SmolLM2, 131072 for Llama 3.1) is what it was trained for, not what a chat needs, and a file can
# claim 2^40. The cache is allocated (and NaN-filled) whole, so it is sized by what will be used.
DEFAULT_CONTEXT = 4096


class Llama:
    """A model of the Llama family (LlamaForCausalLM, Mistral, Qwen2/3, Gemma 2/3): config, its architecture,
    weights (host fp32 for the NumPy engine, or DeviceWeights on a GPU), a tokenizer (optional) and a KV cache.

    State kept between calls (batch 1, which is what chat and generate use): the KV cache and
      cached_ids      the token ids whose K/V are in the cache, in order; forward() extends it and
                      generate() reuses its longest common prefix with a new prompt.
    Nothing about the last generate() is kept here: it returns a Generation (ids, stats, stop reason).
    """

    def __init__(self, config, weights, tokenizer=None, backend="auto", max_len=None, stop_ids=None, kv_dtype=None):
        self.config, self.weights, self.tokenizer = config, weights, tokenizer
        self.backend = _backend.resolve(backend)
        if isinstance(weights, DeviceWeights) and self.backend == "numpy":
            raise ValueError("these weights live on the GPU: backend 'numpy' needs host weights (engine='numpy')")
        self.kv_dtype = kv_cache_dtype(weights, kv_dtype)
        self.max_len = context_size(config, max_len, self.backend, self.kv_dtype)
        self.arch = describe(config)
        self.rope = {table: rope_table(config, self.max_len, table)          # cos, sin [max_len, head_dim / 2]
                     for table in sorted({spec.rope for spec in self.arch.layers})}
        eos = set(config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_id is not None:
            eos.add(tokenizer.eos_id)
        self.stop_ids = set(stop_ids) if stop_ids is not None else eos
        self.cache, self.ops, self.batch = None, None, 0
        self._new_cache(batch=1)

    @property
    def engine(self):
        return self.ops.name

    @property
    def prefill_chunk(self):
        return self.ops.prefill_chunk

    def describe(self):
        """One line: which engine runs, and where the weights and the cache live."""
        return self.ops.describe()

    def _new_cache(self, batch):
        """The KV cache: a full layer holds every token; a window layer (Mistral, Gemma) a ring buffer of its window
        and one prefill chunk (numbattn/kvcache.py)."""
        c = self.config
        engine = DeviceEngine if isinstance(self.weights, DeviceWeights) else NumpyEngine
        self.cache = numbattn.KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, self.max_len,
                                      c.head_dim, dtype=self.kv_dtype, backend=self.backend, windows=self.arch.windows,
                                      max_chunk=engine.prefill_chunk)
        self.ops = engine(c, self.arch, self.weights, self.cache, self.rope, self.backend)
        self.batch, self.n_cached, self.cached_ids = batch, 0, []

    def prepare_kernels(self, progress=None):
        """Compile (or load from numbattn's disk cache) every kernel generation will launch, now rather than at
        the first reply (the device engine on a GPU; otherwise nothing). progress(i, n, name) counts the kernels
        that must be compiled. Empties the KV cache. -> (loaded, compiled)."""
        result = self.ops.prepare(self._forward, progress)
        self.truncate(0)
        return result

    def reset(self):
        """Forget everything cached (the next forward must start at position 0)."""
        self.cache.reset()
        self.n_cached, self.cached_ids = 0, []

    def reusable(self, n):
        """How many of the first n cached tokens a new forward can keep: n, or 0 where a window layer's ring has
        already overwritten tokens that the next token after them would see (the prompt is recomputed then)."""
        if n == 0 or n >= self.n_cached:
            return min(n, self.n_cached)
        return n if n >= int(self.cache.min_rewind().max()) else 0

    def truncate(self, n):
        """Keep only the first n cached tokens (a ring that cannot go back that far raises ValueError: reusable)."""
        n = max(0, min(as_count("n", n), self.n_cached))
        self.cache.truncate(n)
        self.n_cached, self.cached_ids = n, self.cached_ids[:n]

    # ----------------------------------------------------------------------------------------------------
    def forward(self, ids, start_pos=0, last_only=False):
        """Logits for every position of ids [batch, seq] -> float32 [batch, seq, vocab] ([batch, 1, vocab], the
        last position only, with last_only: what generation needs, and on the GPU far less work).

        start_pos = the number of tokens already in the KV cache that ids continue. start_pos=0 starts over;
        a start_pos below the cached count rewinds the cache to it first (re-running a suffix); above it
        is an error (those positions' K/V do not exist). On return the cache holds start_pos + seq tokens.
        A long ids runs in chunks of the engine's prefill_chunk tokens, each attending to everything cached before
        it plus itself (bottom-right-aligned causal mask): the result equals one big pass while the activations
        stay small. If anything interrupts a chunk (an error, ^C), the cache is rewound to where that chunk began,
        so it never holds half a token.
        """
        ids = self._check_ids(ids)
        batch, seq = ids.shape
        start_pos = as_count("start_pos", start_pos)
        if batch != self.batch:
            if start_pos != 0:
                raise ValueError(f"ids has batch {batch} but the KV cache holds batch {self.batch}: a new batch "
                                 f"size must start at start_pos=0")
            self._new_cache(batch)
        if not 0 <= start_pos <= self.n_cached:
            raise ValueError(f"start_pos={start_pos}, but the KV cache holds {self.n_cached} tokens: start_pos "
                             f"must be between 0 and that")
        if start_pos + seq > self.max_len:
            raise ContextOverflowError(f"start_pos {start_pos} + {seq} new tokens > max_len {self.max_len}: "
                                       f"the KV cache would overflow")
        if start_pos < self.n_cached:
            self.truncate(start_pos)
        chunk = self.ops.prefill_chunk
        parts = [self._forward_chunk(ids[:, i:i + chunk], start_pos + i, bool(last_only)) for i in range(0, seq, chunk)]
        return parts[-1] if last_only else np.concatenate(parts, axis=1)

    def _forward_chunk(self, ids, start_pos, last_only):
        """One engine pass over ids [batch, <= prefill_chunk] at start_pos; the cache holds it all, or none of it."""
        try:
            logits = self.ops.run(self._forward, ids, start_pos, last_only)
        except BaseException:
            self.cache.truncate(start_pos)    # layers that already appended this pass's K/V drop it again
            raise
        self.n_cached = start_pos + ids.shape[1]
        self.cached_ids = self.cached_ids[:start_pos] + ids[0].tolist() if ids.shape[0] == 1 else []
        return logits

    def _forward(self, ids, step, ops=None):
        ops, arch = self.ops if ops is None else ops, self.arch   # another engine: forward_rows' paged one
        x = ops.embed(ids)                                       # [b, seq] -> [b, seq, dim]: the residual stream
        for layer, lw in enumerate(ops.layers):                  # (Gemma: embeddings scaled by sqrt(dim))
            # attention: q, k, v for these positions, rotated by their positions, then over the KV cache
            h = ops.rms_norm(x, lw.attn_norm)                    # [b, seq, dim]
            q, k, v = ops.qkv(h, lw)                             # [b, seq, dim] -> [b, heads, seq, head_dim] each
            if arch.qk_norm:                                     # Qwen3, Gemma 3: RMSNorm over each head
                q, k = ops.head_norm(q, lw.q_norm), ops.head_norm(k, lw.k_norm)
            q, k = ops.rope(q, k, step, layer)                   # positions step.start_pos ..., the layer's table
            attn = ops.attention(layer, q, k, v, step)           # appends k, v to the cache -> [b, seq, H * d]
            x = ops.linear(attn, lw.wo, residual=x,              # x + attn @ wo
                           post_norm=lw.post_attn_norm)          # (Gemma's sandwich: x + norm(attn @ wo))

            # feed-forward
            h = ops.rms_norm(x, lw.ffn_norm)                     # [b, seq, dim]
            x = ops.linear(ops.glu(h, lw), lw.w_down, residual=x,    # x + (act(h @ w_gate) * (h @ w_up)) @ w_down
                           post_norm=lw.post_ffn_norm)           # (act: silu, or Gemma's tanh GELU)

        return ops.logits(ops.rms_norm(x, ops.norm), step)       # [b, seq or 1, dim] -> [b, seq or 1, vocab]
                                                                 # (Gemma 2: soft-capped)

    # ----------------------------------------------------------------------------------------------------
    def paged_engine(self, max_seqs, n_blocks, block_size=numbattn.paged.BLOCK_SIZE):
        """An engine for continuous batching (the server): these weights over a new numbattn.PagedKVCache of
        n_blocks pages, for up to max_seqs sequences of up to max_len tokens each, stored as the contiguous
        cache is (kv_dtype) -> ops (ops.cache: the cache)."""
        c = self.config
        if any(self.arch.windows):
            raise ValueError(f"serving (a paged KV cache) does not run sliding windows yet ({c.family}): chat or "
                             f"generate with this model instead")
        cache = numbattn.PagedKVCache(c.num_hidden_layers, n_blocks, c.num_key_value_heads, c.head_dim, max_seqs,
                                      self.max_len, block_size=block_size, dtype=self.kv_dtype, backend=self.backend)
        engine = PagedDeviceEngine if isinstance(self.weights, DeviceWeights) else PagedNumpyEngine
        return engine(c, self.arch, self.weights, cache, self.rope, self.backend)

    def forward_rows(self, ops, ids, rows, last_only=True):
        """One step of continuous batching: row b of ids [batch, seq] continues sequence rows[b] of ops.cache (from
        paged_engine) at its own position, the tokens that sequence holds -> float32 [batch, seq or 1, vocab]. The
        same forward as forward(); the caller gives the sequences their pages first (ops.cache.allocate)."""
        return ops.run_rows(lambda x, step: self._forward(x, step, ops), self._check_ids(ids), rows, bool(last_only))

    def _check_ids(self, ids):
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids has shape {ids.shape} and dtype {ids.dtype}; expected integer token ids "
                             f"[batch, seq] with batch, seq >= 1")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"ids contain {ids.min() if ids.min() < 0 else ids.max()}, outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        return ids.astype(np.int64)

    # ----------------------------------------------------------------------------------------------------
    def generate(self, prompt_ids, max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0,
                 repetition_penalty=1.0, seed=None, on_token=None, stop_ids=None):
        """Continue prompt_ids (a list of ints, batch 1) -> Generation (.ids, .stats, .stop_reason); greedy at
        temperature 0.

        Stops at EOS (included in .ids), after max_new_tokens, or when on_token(id) returns True. stop_ids
        replaces the model's stop tokens (() runs to max_new_tokens: benchmarks, an --ignore-eos).
        Reuses the KV cache for the longest prefix shared with the previous call; see tinyllm/generate.py
        for the details, the context limit and what happens on ^C.
        """
        sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, seed=seed)
        if self.batch != 1:
            self._new_cache(batch=1)
        return _generate(self, prompt_ids, max_new_tokens, sampler, on_token=on_token,
                         stop_ids=self.stop_ids if stop_ids is None else stop_ids)

    def chat(self, messages, **sampling):
        """Reply to a conversation [{"role": "system"|"user"|"assistant", "content": str}, ...] -> text.

        The prompt is the chat template rendered with add_generation_prompt; sampling takes generate()'s
        keyword arguments (max_new_tokens, temperature, ..., on_token). The returned text has no EOS.
        """
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: load it with tinyllm.load_model to chat")
        result = self.generate(self.tokenizer.encode_chat(messages), **sampling)
        return self.tokenizer.decode(result.ids)


def kv_cache_dtype(weights, kv_dtype=None):
    """The KV cache's storage: kv_dtype if given (float16 or float32), else float16 for the device engine (half the
    cache bytes that every decode step reads; attention still computes in fp32) and float32 for the NumPy engine."""
    if kv_dtype is None:
        return np.dtype(np.float16 if isinstance(weights, DeviceWeights) else np.float32)
    try:
        dtype = np.dtype(kv_dtype)
    except TypeError as e:
        raise ValueError(f"kv_dtype={kv_dtype!r}: expected float16 or float32") from e
    if dtype not in (np.float16, np.float32):
        raise ValueError(f"kv_dtype={dtype.name}: the KV cache stores float16 or float32")
    return dtype


def context_size(config, max_len, backend="numpy", kv_dtype=np.float32):
    """The KV cache's length in tokens: max_len if given (1 .. max_position_embeddings), else the model's maximum
    up to DEFAULT_CONTEXT. Checked before anything is allocated: a cache of kv_dtype (and the NaN-filled layer its
    reset copies from) that needs more memory than is free where it would live (the GPU's under "cuda", else the
    host's) is refused, naming max_len / --ctx-size. backend None: no memory check (to describe a model)."""
    limit = config.max_position_embeddings
    if max_len is None:
        n = min(limit, DEFAULT_CONTEXT)
        if n < limit:
            log.info("tinyllm: context of %d tokens (the model allows %d; max_len / --ctx-size asks for more)",
                     n, limit)
    else:
        n = as_count("max_len", max_len)
    if not 1 <= n <= limit:
        raise ValueError(f"max_len={max_len}: must be between 1 and the model's max_position_embeddings ({limit})")
    need = kv_cache_bytes(config, n, kv_dtype) * (2 * config.num_hidden_layers + 1) // (2 * config.num_hidden_layers)
    free = None if backend is None else free_memory(backend)
    if free is not None and need > free:
        where = "GPU memory" if backend == "cuda" else "memory"
        raise ValueError(f"a KV cache of {n} tokens for this model needs {need / 2**30:.2f} GiB, but "
                         f"{free / 2**30:.2f} GiB of {where} is free: ask for a shorter context (max_len / "
                         f"--ctx-size)")
    return n


def kv_cache_bytes(config, n_tokens, kv_dtype=np.float32, max_chunk=DeviceEngine.prefill_chunk):
    """Bytes of a KV cache of n_tokens (batch 1) stored as kv_dtype: K and V of every layer and KV head, n_tokens
    slots in a full layer, at most window + max_chunk - 1 in a window layer's ring (the device engine's chunk: the
    larger)."""
    slots = sum(n_tokens if spec.window is None else min(n_tokens, spec.window + max_chunk - 1)
                for spec in describe(config).layers)
    return numbattn.KVCache.bytes_per_token(1, config.num_key_value_heads, config.head_dim, kv_dtype) * slots


def free_memory(backend):
    """Bytes that can still be allocated where the KV cache would live, or None if unknown. Host: the kernel's
    MemAvailable, and under an address-space limit (ulimit -v, RLIMIT_AS) the room left below it."""
    if backend == "cuda":
        try:
            from numba import cuda
            return cuda.current_context().get_memory_info().free
        except Exception:          # a driver that answered the backend probe but not this: do not guess
            return None
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None                # not Linux
    import resource
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        with open("/proc/self/status") as f:
            used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        free = min(free, limit - used)
    return free
