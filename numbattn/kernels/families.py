"""The row-wise steps other model families add to the Llama block (tinyllm/architecture.py has the table).

What you will learn here
------------------------
Qwen and Gemma change a Llama block in a few places, each a small row-wise step on activations that are already
in memory: like rowwise.py's, these kernels are bound by memory traffic (a few KB per token) and, at batch 1,
by the launch itself, so they are one block per token row, simple loops, no tiling.

    qkv_finish   the fused q/k/v matmul's output, finished in place before RoPE: + the q/k/v biases (Qwen2), then
                 an RMSNorm over each head of q and of k (Qwen3, Gemma 3; one warp per head, its sum of squares a
                 warp reduction). One launch, whichever of the two the family has.
                 # qkv [M, (H + 2 Hkv) * D], bias [(H + 2 Hkv) * D], q_norm / k_norm [D] -> qkv
    row_map      one elementwise step over rows, in place (make_row_map(op)):
                   "scale"     x * s: Gemma's embeddings, scaled by sqrt(hidden). # x [M, dim]
                   "soft cap"  cap * tanh(x / cap): Gemma 2's final logits (common.soft_cap, an accurate tanh).
                               # x [M, vocab]

The rest of what the families change is elsewhere: Gemma's sandwich norms are rowwise.rms_norm with add, GeGLU an
epilogue of the gate/up matmul (gemv.py, gemm.py). The NumPy twins are reference.rms_norm, a multiplication and
reference.soft_cap.
"""
import functools
import math

from numba import cuda, float32

from .common import SIM, kernel, make_group_reduce, reduce_scratch_shape, soft_cap

THREADS = 8 if SIM else 256               # the simulator runs a Python thread per CUDA thread
WARP = min(32, THREADS)
WARPS = THREADS // WARP


@functools.lru_cache(maxsize=None)
def make_qkv_finish(n_heads, n_kv_heads, head_dim, bias, head_norm):
    """In-place q/k/v biases (bias) and per-head q/k RMSNorm (head_norm), one block of THREADS per token."""
    H, HKV, D = n_heads, n_kv_heads, head_dim
    NORMED = H + HKV                          # heads 0..H-1 are q, H..H+HKV-1 are k (v is not normalised)
    _, warp_sum = make_group_reduce(WARP, 1)
    RED = reduce_scratch_shape(1, THREADS)

    @kernel
    def qkv_finish(qkv, b, q_norm, k_norm, eps):
        # qkv [M, (H + 2 Hkv) * D] (in place), b [(H + 2 Hkv) * D], q_norm / k_norm [D]
        m, t = cuda.blockIdx.x, cuda.threadIdx.x
        if bias:
            for i in range(t, qkv.shape[1], THREADS):
                qkv[m, i] += b[i]
            cuda.syncthreads()
        if head_norm:
            red = cuda.shared.array(RED, float32)
            ss = cuda.local.array(1, float32)
            warp, lane = t // WARP, t % WARP
            for h0 in range(0, NORMED, WARPS):          # every warp takes part in every reduction (the simulator's
                h = h0 + warp                           # twin synchronises the block)
                s = float32(0.0)
                if h < NORMED:
                    for i in range(lane, D, WARP):
                        s += qkv[m, h * D + i] * qkv[m, h * D + i]
                ss[0] = s
                warp_sum(ss, red)
                if h < NORMED:
                    inv = float32(1.0) / math.sqrt(ss[0] / D + eps)
                    for i in range(lane, D, WARP):
                        g = q_norm[i] if h < H else k_norm[i]
                        qkv[m, h * D + i] = qkv[m, h * D + i] * inv * g

    return qkv_finish


ROW_MAPS = ("scale", "soft cap")


@functools.lru_cache(maxsize=None)
def make_row_map(op):
    """One elementwise step over rows, in place: "scale" x * c (Gemma's embeddings, c = sqrt(hidden)) or
    "soft cap" c * tanh(x / c) (Gemma 2's final logits, c the cap)."""
    if op not in ROW_MAPS:
        raise ValueError(f"op must be one of {ROW_MAPS}; got {op!r}")
    CAP = op == "soft cap"                  # a compile-time choice: each op its own kernel

    @kernel
    def row_map(x, c):
        # x [M, n] -> f(x, c), in place; one block per row
        m = cuda.blockIdx.x
        for k in range(cuda.threadIdx.x, x.shape[1], THREADS):
            x[m, k] = soft_cap(x[m, k], c) if CAP else x[m, k] * c

    return row_map
