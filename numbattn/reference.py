"""NumPy oracle: the equation every kernel is tested against, and the lesson every kernel implements.

Each function is one equation (picoGPT style). Everything is computed in float64 when any input is float64,
else in float32, so tests can ask for an fp64 answer by passing fp64 inputs. The Llama pieces at the end
(rms_norm, rope, silu, swiglu, linear) are also what tinyllm's NumPy engine runs: one definition of the math.

Shapes: q [batch, n_heads, q_len, head_dim]; k, v [batch, n_kv_heads, kv_len, head_dim].
"""
import numpy as np


def _compute_dtype(*xs):
    return np.float64 if any(np.asarray(x).dtype == np.float64 for x in xs) else np.float32


def softmax(x):
    x = x - x.max(axis=-1, keepdims=True)  # subtract the row max: exp() never overflows, result unchanged
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def causal_mask(q_len, kv_len):
    """[q_len, kv_len] bool, True where query i may see key j.

    Bottom-right aligned (FlashAttention-2): the last query is the newest token and sees every key, so
    query i sees keys j <= i + (kv_len - q_len). With q_len == kv_len this is the usual lower triangle.
    """
    return np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None] + (kv_len - q_len)


def repeat_kv(x, n_heads):
    """Grouped-query attention, the slow way: [b, n_kv_heads, s, d] -> [b, n_heads, s, d].

    Query head h uses KV head h // (n_heads // n_kv_heads). The kernels never materialise this copy.
    """
    return np.repeat(x, n_heads // x.shape[1], axis=1)


def attention(q, k, v, causal=False, scale=None):
    """softmax(q @ k^T * scale [+ causal mask]) @ v  ->  [batch, n_heads, q_len, head_dim]."""
    dt = _compute_dtype(q, k, v)
    q, k, v = (np.asarray(x, dtype=dt) for x in (q, k, v))
    n_heads, q_len, head_dim = q.shape[1], q.shape[2], q.shape[3]
    kv_len = k.shape[2]
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    k, v = repeat_kv(k, n_heads), repeat_kv(v, n_heads)  # [b, n_heads, kv_len, d]
    scores = q @ k.swapaxes(-1, -2) * dt(scale)           # [b, n_heads, q_len, kv_len]  <- the N×N matrix
    if causal:
        scores = np.where(causal_mask(q_len, kv_len), scores, -np.inf)
    return softmax(scores) @ v                            # [b, n_heads, q_len, d]


def decode_attention(q, k_cache, v_cache, lengths, scale=None):
    """One new query token per row over a KV cache whose rows hold different numbers of tokens.

    q [batch, n_heads, d]; k_cache, v_cache [batch, n_kv_heads, max_len, d]; lengths [batch] -> [batch, n_heads, d].
    Row b attends to its first lengths[b] cached tokens (the new token's own K/V already appended); a row
    holding no tokens returns zeros. Slots past lengths[b] are never read, whatever they hold.
    """
    dt = _compute_dtype(q, k_cache, v_cache)
    q = np.asarray(q, dtype=dt)
    out = np.zeros(q.shape, dtype=dt)
    for b, n in enumerate(np.asarray(lengths)):
        if n > 0:
            k = np.asarray(k_cache[b:b + 1, :, :n], dtype=dt)  # [1, n_kv_heads, n, d]
            v = np.asarray(v_cache[b:b + 1, :, :n], dtype=dt)
            out[b] = attention(q[b:b + 1, :, None, :], k, v, scale=scale)[0, :, 0]  # [n_heads, d]
    return out


# --------------------------------------------------------------------------------------------------------
# The rest of a Llama block (numbattn/linear.py and numbattn/rowwise.py implement these on the GPU)
# --------------------------------------------------------------------------------------------------------
def rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight: like LayerNorm without the mean subtraction and the bias. [.., dim]"""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x):
    """x * sigmoid(x), with sigmoid written through tanh so exp() cannot overflow for large |x|."""
    return x * (0.5 + 0.5 * np.tanh(0.5 * x))


def linear(x, w):
    """y = x W^T with W in Hugging Face's [out_features, in_features] layout. [.., in] -> [.., out]"""
    return x @ np.asarray(w).T


def swiglu(gate, up):
    """The SwiGLU activation: silu(gate) * up, elementwise."""
    return silu(gate) * up


def swiglu_interleaved(y):
    """The fused gate/up matmul's output: [.., 2 * ffn] with gate and up interleaved (2f = gate_f, 2f+1 = up_f)
    -> silu(gate) * up, [.., ffn]."""
    return swiglu(y[..., 0::2], y[..., 1::2])


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
