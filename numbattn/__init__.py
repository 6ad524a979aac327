"""numbattn: FlashAttention-style attention and KV-cache kernels written in Numba CUDA.

    out = numbattn.attention(q, k, v, causal=True)      # prefill, tiled online softmax
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
from .prefill import attention, flash_attention

__all__ = ["attention", "flash_attention", "attention_backward", "available_backends", "reference", "KVCache",
           "decode_attention"]
