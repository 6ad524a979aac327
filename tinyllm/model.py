"""Llama in NumPy, with attention on numbattn: the whole forward pass in one screen.

    model = tinyllm.load_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    logits = model.forward(ids)                  # [batch, seq] -> [batch, seq, vocab]
    model.generate(prompt_ids, max_new_tokens=32).ids
    model.chat([{"role": "user", "content": "Hi!"}])

One transformer block (Llama 2 / TinyLlama, as in Hugging Face's LlamaForCausalLM):

    h = x + o_proj(attention(rope(q_proj(norm(x))), rope(k_proj(norm(x))), v_proj(norm(x))))
    x = h + down_proj(silu(gate_proj(norm(h))) * up_proj(norm(h)))

with RMSNorm before each half (pre-norm), rotary position embeddings on q and k, grouped-query attention
(4 KV heads serve 32 query heads in TinyLlama: the KV cache is 8x smaller) and a SwiGLU MLP.

Every matmul is NumPy float32 (`x @ W` with W stored [in, out] at load). Attention is numbattn: a prompt
(or a chunk of one) appends its K/V to the KV cache and runs the FlashAttention prefill kernel over the
whole cache with a bottom-right-aligned causal mask; a single new token runs the decode kernel.
"""
import logging

import numpy as np

import numbattn
from numbattn import backend as _backend

from .generate import ContextOverflowError, Sampler, generate as _generate

log = logging.getLogger("tinyllm")


# --------------------------------------------------------------------------------------------------------
# The math, one function per equation
# --------------------------------------------------------------------------------------------------------
def rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight: like LayerNorm without the mean subtraction and the bias."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x):
    """x * sigmoid(x), with sigmoid written through tanh so exp() cannot overflow for large |x|."""
    return x * (0.5 + 0.5 * np.tanh(0.5 * x))


def swiglu(x, w_gate, w_up, w_down):
    """The Llama MLP: a SiLU-gated linear unit. [.., dim] -> [.., ffn] -> [.., dim]."""
    return (silu(x @ w_gate) * (x @ w_up)) @ w_down


def rope_tables(head_dim, n_positions, theta, scaling_factor=1.0):
    """cos and sin of every position's rotation angles -> two [n_positions, head_dim / 2] float32 tables.

    Pair i of a head rotates by angle pos * theta^(-2i / head_dim): fast for the first pairs, slow for the
    last, so relative positions from 1 to thousands of tokens stay distinguishable. Computed in float64.
    Linear RoPE scaling stretches the context by dividing positions by the factor.
    """
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)   # [head_dim / 2]
    pos = np.arange(n_positions, dtype=np.float64) / scaling_factor                # [n_positions]
    angles = np.outer(pos, inv_freq)                                               # [n_positions, head_dim/2]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope(x, cos, sin):
    """Rotate each head's pairs (x[i], x[i + d/2]) by their position's angles (Hugging Face's rotate-half
    layout: the first half of a head pairs with its second half, not even with odd).

    x [batch, heads, seq, head_dim]; cos, sin [seq, head_dim / 2] -> same shape as x.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]                                  # [b, h, s, d/2] each
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def split_heads(x, n_heads):
    """[batch, seq, n_heads * head_dim] -> [batch, n_heads, seq, head_dim]."""
    b, s, _ = x.shape
    return np.ascontiguousarray(x.reshape(b, s, n_heads, -1).transpose(0, 2, 1, 3))


def merge_heads(x):
    """[batch, n_heads, seq, head_dim] -> [batch, seq, n_heads * head_dim]."""
    b, h, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, h * d)


# --------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------
class Llama:
    """A LlamaForCausalLM: config, fp32 weights, a tokenizer (optional) and a KV cache.

    State kept between calls (batch 1, which is what chat and generate use): the KV cache and
      cached_ids      the token ids whose K/V are in the cache, in order; forward() extends it and
                      generate() reuses its longest common prefix with a new prompt.
    Nothing about the last generate() is kept here: it returns a Generation (ids, stats, stop reason).
    """

    def __init__(self, config, weights, tokenizer=None, backend="auto", max_len=None, stop_ids=None):
        self.config, self.weights, self.tokenizer = config, weights, tokenizer
        self.backend = _backend.resolve(backend)
        self.max_len = int(max_len or config.max_position_embeddings)
        if not 1 <= self.max_len <= config.max_position_embeddings:
            raise ValueError(f"max_len={max_len}: must be between 1 and the model's max_position_embeddings "
                             f"({config.max_position_embeddings})")
        self.cos, self.sin = rope_tables(config.head_dim, self.max_len, config.rope_theta,
                                         config.rope_scaling_factor)         # [max_len, head_dim / 2] each
        eos = set(config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_id is not None:
            eos.add(tokenizer.eos_id)
        self.stop_ids = set(stop_ids) if stop_ids is not None else eos
        self.cache = None
        self.batch = 0
        self._new_cache(batch=1)

    def _new_cache(self, batch):
        c = self.config
        self.cache = numbattn.KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, self.max_len,
                                      c.head_dim, dtype=np.float32, backend=self.backend)
        self.batch, self.n_cached, self.cached_ids = batch, 0, []

    def reset(self):
        """Forget everything cached (the next forward must start at position 0)."""
        self.cache.reset()
        self.n_cached, self.cached_ids = 0, []

    def truncate(self, n):
        """Keep only the first n cached tokens."""
        n = max(0, min(int(n), self.n_cached))
        self.cache.truncate(n)
        self.n_cached, self.cached_ids = n, self.cached_ids[:n]

    # ----------------------------------------------------------------------------------------------------
    def forward(self, ids, start_pos=0):
        """Logits for every position of ids [batch, seq] -> float32 [batch, seq, vocab].

        start_pos = the number of tokens already in the KV cache that ids continue. start_pos=0 starts over;
        a start_pos below the cached count rewinds the cache to it first (re-running a suffix); above it
        is an error (those positions' K/V do not exist). On return the cache holds start_pos + seq tokens.
        If anything interrupts the pass (an error, ^C), the cache is rewound to start_pos, so it never holds
        half a token.
        """
        ids = self._check_ids(ids)
        batch, seq = ids.shape
        start_pos = int(start_pos)
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
        try:
            logits = self._forward(ids, start_pos)
        except BaseException:
            self.cache.truncate(start_pos)    # layers that already appended this pass's K/V drop it again
            raise
        self.n_cached = start_pos + seq
        self.cached_ids = self.cached_ids[:start_pos] + ids[0].tolist() if batch == 1 else []
        return logits

    def _forward(self, ids, start_pos):
        c, w = self.config, self.weights
        n_heads, n_kv_heads, eps = c.num_attention_heads, c.num_key_value_heads, c.rms_norm_eps
        seq = ids.shape[1]
        cos = self.cos[start_pos:start_pos + seq]                # [seq, head_dim / 2]
        sin = self.sin[start_pos:start_pos + seq]

        x = w.embed[ids]                                         # [b, seq] -> [b, seq, dim]
        for layer, lw in enumerate(w.layers):
            # attention: q, k, v for these positions; rotate q and k by their positions
            h = rms_norm(x, lw.attn_norm, eps)                   # [b, seq, dim]
            q = split_heads(h @ lw.wq, n_heads)                  # [b, seq, dim] -> [b, n_heads, seq, head_dim]
            k = split_heads(h @ lw.wk, n_kv_heads)               # [b, seq, dim] -> [b, n_kv_heads, seq, head_dim]
            v = split_heads(h @ lw.wv, n_kv_heads)               # [b, seq, dim] -> [b, n_kv_heads, seq, head_dim]
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            attn = self.attention(layer, q, k, v, start_pos)     # [b, n_heads, seq, head_dim]
            x = x + merge_heads(attn) @ lw.wo                    # [b, seq, n_heads*head_dim] -> [b, seq, dim]

            # feed-forward
            h = rms_norm(x, lw.ffn_norm, eps)                    # [b, seq, dim]
            x = x + swiglu(h, lw.w_gate, lw.w_up, lw.w_down)     # [b, seq, dim] -> [b, seq, ffn] -> [b, seq, dim]

        x = rms_norm(x, w.norm, eps)                             # [b, seq, dim]
        return x @ w.lm_head                                     # [b, seq, dim] -> [b, seq, vocab]

    def attention(self, layer, q, k, v, start_pos):
        """Append this chunk's k, v to the cache, then attend from q to everything cached.

        q [b, n_heads, seq, head_dim]; k, v [b, n_kv_heads, seq, head_dim] -> [b, n_heads, seq, head_dim].
        A single token uses the decode kernel (one query row per head, split over the cache); a chunk uses
        the prefill kernel over the cache so far: causal bottom-right alignment lets query i of the chunk
        (absolute position start_pos + i) see exactly keys 0 .. start_pos + i.
        """
        self.cache.append(layer, k, v)
        seq, n = q.shape[2], start_pos + q.shape[2]
        if seq == 1:
            out = numbattn.decode_attention(np.ascontiguousarray(q[:, :, 0]), self.cache, layer)  # [b, n_heads, d]
            return _backend.to_host(out)[:, :, None, :]                                           # [b, n_heads, 1, d]
        k_all = self.cache.k(layer)[:, :, :n]                    # [b, n_kv_heads, n, head_dim] (a view)
        v_all = self.cache.v(layer)[:, :, :n]
        out = numbattn.attention(q, k_all, v_all, causal=True, backend=self.backend)
        return _backend.to_host(out)

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
                 repetition_penalty=1.0, seed=None, on_token=None):
        """Continue prompt_ids (a list of ints, batch 1) -> Generation (.ids, .stats, .stop_reason); greedy at
        temperature 0.

        Stops at EOS (included in .ids), after max_new_tokens, or when on_token(id) returns True.
        Reuses the KV cache for the longest prefix shared with the previous call; see tinyllm/generate.py
        for the details, the context limit and what happens on ^C.
        """
        sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, seed=seed)
        if self.batch != 1:
            self._new_cache(batch=1)
        return _generate(self, prompt_ids, max_new_tokens, sampler, on_token=on_token, stop_ids=self.stop_ids)

    def chat(self, messages, **sampling):
        """Reply to a conversation [{"role": "system"|"user"|"assistant", "content": str}, ...] -> text.

        The prompt is the chat template rendered with add_generation_prompt; sampling takes generate()'s
        keyword arguments (max_new_tokens, temperature, ..., on_token). The returned text has no EOS.
        """
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: load it with tinyllm.load_model to chat")
        result = self.generate(self.tokenizer.encode_chat(messages), **sampling)
        return self.tokenizer.decode(result.ids)
