"""NumpyEngine: the forward's arithmetic in NumPy float32, the reference and the CPU path (tinyllm/engines/__init__.py
lists the ops). Every op is a line of NumPy from numbattn/reference.py or one of numbattn's CPU kernels tested
against it: RMSNorm and RoPE (numbattn/cpu_rowwise.py: a few NumPy calls each cost more than their arithmetic, ~1
ms of SmolLM2's ~10 ms token), matmuls on GGUF blocks (cpu_linear.py), and attention through numbattn (its CPU
decode kernel or NumPy reference, or its kernels on the GPU or in the simulator: that mix keeps the matmuls on the
host)."""
import numpy as np

import numbattn
from numbattn import backend as _backend
from numbattn import cpu_rowwise, reference
from numbattn.cpu_linear import BlockMatrix, RowStack, Transposed, compile_cpu_kernels
from numbattn.prefill import chunk_attention

from ..units import human_bytes
from .step import Step


class NumpyEngine:
    """The forward's arithmetic in NumPy float32 (weights: LlamaWeights, matrices [in, out] for x @ W)."""
    name = "numpy"
    prefill_chunk = 256

    def __init__(self, config, arch, weights, cache, rope, attention_backend):
        self.config, self.arch, self.weights, self.cache = config, arch, weights, cache
        self.layers, self.norm = weights.layers, weights.norm
        self.rope_tables, self.backend = rope, attention_backend            # {"global" / "local": (cos, sin)}
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.eps = config.rms_norm_eps
        self.stacks = {id(lw): _stacks(lw) for lw in self.layers}       # GGUF blocks: q/k/v and gate/up as one

    def describe(self):
        where = "the NumPy reference" if self.backend == "numpy" else f"numbattn's kernels ({self.backend})"
        kinds = block_kinds(self.weights)
        blocks = f" and {'/'.join(kinds)} blocks (GGUF, as stored)" if kinds else ""
        matmuls = "in NumPy, quantized ones by Numba kernels" if kinds else "in NumPy"
        return (f"NumPy engine: weights in host memory ({human_bytes(_host_bytes(self.weights))}: fp32{blocks}; "
                f"{human_bytes(token_bytes(self.weights))} read per token), matmuls {matmuls}, attention on {where}")

    def embed(self, ids):
        x = self.weights.embed[ids]                                      # [b, s] -> [b, s, dim]
        return x * np.float32(self.arch.embed_scale) if self.arch.embed_scale != 1.0 else x

    def rms_norm(self, x, w):
        return cpu_rowwise.rms_norm(x, w, self.eps)                      # reference.rms_norm

    def qkv(self, h, lw):
        qkv = self.stacks[id(lw)]["qkv"]
        q, k, v = qkv.times(h) if qkv else (h @ lw.wq, h @ lw.wk, h @ lw.wv)     # [b, s, dim] -> [b, s, heads * d]
        if self.arch.qkv_bias:
            q, k, v = q + lw.bq, k + lw.bk, v + lw.bv
        return split_heads(q, self.n_heads), split_heads(k, self.n_kv_heads), split_heads(v, self.n_kv_heads)

    def head_norm(self, x, w):
        return cpu_rowwise.rms_norm(x, w, self.eps)                      # over each head's head_dim values

    def rope(self, q, k, step, layer):
        cos, sin = self.rope_tables[self.arch.layers[layer].rope]
        positions = slice(step.start_pos, step.start_pos + step.seq)
        cos, sin = cos[positions], sin[positions]                       # [seq, head_dim / 2] each
        return cpu_rowwise.rope(q, cos, sin), cpu_rowwise.rope(k, cos, sin)   # reference.rope

    def attention(self, layer, q, k, v, step):
        """Append k, v; a single token uses the decode kernel, a chunk the prefill kernel over the cache so far
        (bottom-right causal alignment: query i of the chunk sees keys 0 .. start_pos + i; a window layer's ring
        holds its window), with the family's scale and soft cap. -> [b, s, H*D]"""
        self.cache.append(layer, k, v)
        scale, softcap = self.arch.attn_scale, self.arch.attn_softcap
        if step.seq == 1:
            out = numbattn.decode_attention(np.ascontiguousarray(q[:, :, 0]), self.cache, layer, scale=scale,
                                            softcap=softcap)
            out = _backend.to_host(out)[:, :, None, :]                   # [b, n_heads, 1, d]
        else:
            out = _backend.to_host(chunk_attention(q, self.cache, layer, scale=scale, softcap=softcap))
        return merge_heads(out)

    def linear(self, a, w, residual=None, post_norm=None):
        """residual + a @ w, or with post_norm (Gemma) residual + rms_norm(a @ w)."""
        y = a @ w
        if post_norm is not None:
            y = cpu_rowwise.rms_norm(y, post_norm, self.eps)
        return y if residual is None else residual + y

    def glu(self, h, lw):
        act = reference.swiglu if self.arch.activation == "silu" else reference.geglu
        glu = self.stacks[id(lw)]["glu"]
        return act(*(glu.times(h) if glu else (h @ lw.w_gate, h @ lw.w_up)))

    def logits(self, h, step):
        logits = (h[:, -1:] if step.last_only else h) @ self.weights.lm_head          # [b, s or 1, vocab]
        return reference.soft_cap(logits, self.arch.final_softcap)

    def run(self, forward, ids, start_pos, last_only):
        return forward(ids, Step(ids.shape[0], ids.shape[1], start_pos, last_only))

    def prepare(self, forward, progress=None):
        """The Numba kernels of the weights kept in GGUF blocks, compiled now rather than at the first reply (a few
        seconds; NumPy needs nothing, attention kernels compile at their first call) -> (0, kernels compiled)."""
        kinds = block_kinds(self.weights)
        for i, kind in enumerate(kinds):
            if progress is not None:
                progress(i, len(kinds), kind)
            compile_cpu_kernels(kind)
        return 0, len(kinds)


def _stacks(lw):
    """A layer's matrices that one kernel call can serve together (numbattn.cpu_linear.RowStack): q/k/v and
    gate/up, when all are kept in GGUF blocks of one kind (None otherwise: a matmul each)."""
    groups = {"qkv": [lw.wq, lw.wk, lw.wv], "glu": [lw.w_gate, lw.w_up]}
    return {name: RowStack(parts) if RowStack.fits(parts) else None for name, parts in groups.items()}


def split_heads(x, n_heads):
    """[batch, seq, n_heads * head_dim] -> [batch, n_heads, seq, head_dim]."""
    b, s, _ = x.shape
    return np.ascontiguousarray(x.reshape(b, s, n_heads, -1).transpose(0, 2, 1, 3))


def merge_heads(x):
    """[batch, n_heads, seq, head_dim] -> [batch, seq, n_heads * head_dim]."""
    b, h, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, h * d)


def _matrices(weights):
    """Every weight array once (a tied output head is the embedding's memory): ndarrays and BlockMatrix objects."""
    arrays = [weights.embed, weights.norm, weights.lm_head] + [a for lw in weights.layers for a in vars(lw).values()]
    return list({_memory(a): a for a in arrays if a is not None}.values())


def _memory(a):
    """What holds a weight's bytes: a BlockMatrix (W or W.T), an ndarray's buffer (a transposed view: the same)."""
    if isinstance(a, (BlockMatrix, Transposed)):
        return id(a.T if isinstance(a, Transposed) else a)
    return a.__array_interface__["data"][0], a.nbytes


def _host_bytes(weights):
    return sum(a.nbytes for a in _matrices(weights))


def block_kinds(weights):
    """The GGUF block kinds among the weights (sorted), [] if all are fp32."""
    return sorted({a.kind for a in _matrices(weights) if isinstance(a, (BlockMatrix, Transposed))})


def token_bytes(weights):
    """Bytes of weights read per token: every matrix, one row of the embedding table (all of it if it is tied to the
    output head)."""
    table = weights.embed.nbytes
    tied = _memory(weights.lm_head) == _memory(weights.embed)
    return _host_bytes(weights) - (0 if tied else table) + table // weights.embed.shape[0]
