"""numbattn: FlashAttention-style attention and KV-cache kernels written in Numba CUDA.

    out = numbattn.attention(q, k, v, causal=True)      # prefill, tiled online softmax (window=, softcap=)
    out = numbattn.decode_attention(q_tok, cache, layer) # one token per row over a KVCache
    out = numbattn.chunk_attention(q, cache, layer)      # a prompt chunk's queries over a KVCache
    out, lse = numbattn.attention(q, k, v, causal=True, return_lse=True)
    dq, dk, dv = numbattn.attention_backward(q, k, v, out, lse, dout, causal=True)   # the gradients
    numbattn.available_backends()                        # e.g. ["sim", "numpy"]
    numbattn.reference.attention(q, k, v, causal=True)   # the NumPy oracle, same signature

See numbattn/backend.py for how the engine (GPU, simulator, NumPy) is chosen.
"""
from . import reference
from .backend import available_backends
from .backward import attention_backward
from .decode import decode_attention
from .kvcache import KVCache
from .paged import PagedKVCache, paged_decode_attention
from .prefill import attention, chunk_attention, flash_attention

__all__ = ["attention", "flash_attention", "chunk_attention", "attention_backward", "available_backends", "reference",
           "KVCache", "decode_attention", "PagedKVCache", "paged_decode_attention"]
