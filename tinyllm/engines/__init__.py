"""The two engines behind the forward: the arithmetic in NumPy, or every op a Numba kernel on the GPU.

tinyllm/model.py writes the forward once, against the small set of operations below (an "ops" object), so
the fast path can never drift from the readable one:

    embed(ids)                        token ids [b, s] -> x, the residual stream (Gemma: scaled by sqrt(dim))
    rms_norm(x, w)                    RMSNorm
    qkv(h, lw)                        -> q, k, v (split into heads; Qwen2: + their biases)
    head_norm(x, w)                   RMSNorm over each head of q or k (Qwen3, Gemma 3)
    rope(q, k, step, layer)           rotate q and k by their positions, with the layer's RoPE table
    attention(layer, q, k, v, step)   append k, v to the KV cache, attend from q to what it may see (the layer's
                                      window; the family's scale and soft cap)
    linear(a, w, residual=x, post_norm=None)   x + a W^T (the residual stream, updated); Gemma: x + norm(a W^T)
    glu(h, lw)                        act(h W_gate^T) * (h W_up^T): SwiGLU, or Gemma's GeGLU
    logits(h, step)                   the output head (on the last position only, if step.last_only; Gemma 2:
                                      soft-capped)
    run(forward, ids, start_pos, last_only)   forward(ids, Step(...)) -> host float32 logits [b, s|1, vocab]
    prepare(forward, progress)        compile every kernel a generation can launch, before the first reply

What a family changes is read from the model's Architecture (tinyllm/architecture.py), which both engines get.

`step` (a Step) carries everything about the call that an op needs: the batch and sequence sizes, the position
of the first new token, whether only the last position's logits are wanted, and the context bound the decode
grid is sized for. The ops keep nothing about the call in progress.

    host.py            NumpyEngine: the reference and the CPU path; every op a line of NumPy or a CPU kernel
                       tested against one (norms, RoPE, GGUF-block matmuls, decode attention)
    device.py          DeviceEngine: weights resident on the GPU, every op a numbattn kernel, decode steps
                       replayed as CUDA graphs
    device_weights.py  the checkpoint uploaded once, as the kernels read it (bf16 or fp32 words, fused matrices)
    paged.py           the two over a paged KV cache: each row its own sequence and position (the server)
    step.py            Step
"""
from .device import DeviceEngine
from .device_weights import DeviceWeights, upload_weights
from .host import NumpyEngine
from .paged import PagedDeviceEngine, PagedNumpyEngine
from .step import Step

__all__ = ["Step", "NumpyEngine", "DeviceEngine", "PagedNumpyEngine", "PagedDeviceEngine", "DeviceWeights",
           "upload_weights"]
