"""The two engines behind Llama's forward: the arithmetic in NumPy, or every op a Numba kernel on the GPU.

tinyllm/model.py writes the forward once, against the small set of operations below (an "ops" object), so
the fast path can never drift from the readable one:

    embed(ids)                        token ids [b, s] -> x, the residual stream
    rms_norm(x, w)                    RMSNorm
    qkv(h, lw)                        -> q, k, v (split into heads)
    rope(q, k, step)                  rotate q and k by their positions
    attention(layer, q, k, v, step)   append k, v to the KV cache, attend from q to everything cached
    linear(a, w, residual=x)          x + a W^T (the residual stream, updated)
    swiglu(h, lw)                     silu(h W_gate^T) * (h W_up^T)
    logits(h, step)                   the output head (on the last position only, if step.last_only)
    run(forward, ids, start_pos, last_only)   forward(ids, Step(...)) -> host float32 logits [b, s|1, vocab]
    prepare(forward, progress)        compile every kernel a generation can launch, before the first reply

`step` (a Step) carries everything about the call that an op needs: the batch and sequence sizes, the position
of the first new token, whether only the last position's logits are wanted, and the context bound the decode
grid is sized for. The ops keep nothing about the call in progress.

    host.py            NumpyEngine: the reference and the CPU path; every op a line of NumPy
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
