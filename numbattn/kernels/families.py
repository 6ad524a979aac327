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
    add_rms_norm x[m] += y[m] / sqrt(mean(y[m]^2) + eps) * g: Gemma's "sandwich" norm of the attention's and the
                 MLP's output before it joins the residual stream (Llama adds y unnormalised: the matmul's residual
                 epilogue). # x [M, dim] (+=), y [M, dim], g [dim]
    geglu        gelu_tanh(gate) * up from the fused gate/up matmul's interleaved output (row 2f = gate_f,
                 2f+1 = up_f): Gemma's MLP activation. gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x * sigmoid(2u), with
                 u = sqrt(2 / pi) (x + 0.044715 x^3), so it is computed as x / (1 + exp(-2u)): no tanh (fastmath's
                 approximate tanh is off by ~1e-3), the right limits at both ends. # gu [M, 2F] -> out [M, F]
    scale_rows   x *= s: Gemma's embeddings, scaled by sqrt(hidden). # x [M, dim]

The NumPy twins are reference.rms_norm, reference.geglu and a multiplication.
"""
import functools
import math

from numba import cuda, float32

from .common import SIM, device, kernel, make_group_reduce, reduce_scratch_shape

THREADS = 8 if SIM else 256               # the simulator runs a Python thread per CUDA thread
WARP = min(32, THREADS)
WARPS = THREADS // WARP
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


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


@functools.lru_cache(maxsize=None)
def make_add_rms_norm():
    _, warp_sum = make_group_reduce(WARP, 1)
    RED = reduce_scratch_shape(1, THREADS)

    @kernel
    def add_rms_norm(x, y, g, eps):
        # x [M, dim] (+=), y [M, dim], g [dim]
        """x[m] += y[m] / sqrt(mean(y[m]^2) + eps) * g (one block of THREADS threads per token)."""
        m, t = cuda.blockIdx.x, cuda.threadIdx.x
        red = cuda.shared.array(RED, float32)
        per_warp = cuda.shared.array(WARPS, float32)
        ss = cuda.local.array(1, float32)
        s = float32(0.0)
        for k in range(t, y.shape[1], THREADS):
            s += y[m, k] * y[m, k]
        ss[0] = s
        warp_sum(ss, red)
        if t % WARP == 0:
            per_warp[t // WARP] = ss[0]
        cuda.syncthreads()
        total = float32(0.0)
        for i in range(WARPS):
            total += per_warp[i]
        inv = float32(1.0) / math.sqrt(total / y.shape[1] + eps)
        for k in range(t, y.shape[1], THREADS):
            x[m, k] += y[m, k] * inv * g[k]

    return add_rms_norm


@device
def gelu_tanh(x):
    """0.5 x (1 + tanh(u)) written as x * sigmoid(2u). For x << 0 the exponent is clamped at 80 (the simulator's
    exp, Python's, raises where float32's would give inf): x / (1 + e^80) is below 1e-30, zero to any tolerance."""
    u = float32(SQRT_2_OVER_PI) * (x + float32(0.044715) * x * x * x)
    return x / (float32(1.0) + math.exp(min(float32(-2.0) * u, float32(80.0))))


@functools.lru_cache(maxsize=None)
def make_geglu():
    @kernel
    def geglu(gu, out):
        # gu [M, 2F] (gate_f, up_f interleaved) -> out [M, F]
        m = cuda.blockIdx.x
        for f in range(cuda.threadIdx.x, out.shape[1], THREADS):
            out[m, f] = gelu_tanh(gu[m, 2 * f]) * gu[m, 2 * f + 1]

    return geglu


@functools.lru_cache(maxsize=None)
def make_scale_rows():
    @kernel
    def scale_rows(x, s):
        # x [M, dim] *= s
        m = cuda.blockIdx.x
        for k in range(cuda.threadIdx.x, x.shape[1], THREADS):
            x[m, k] *= s

    return scale_rows
