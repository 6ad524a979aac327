"""NumPy oracle: the equation every kernel is tested against, and the lesson every kernel implements.

Each function is one equation (picoGPT style). Everything is computed in float64 when any input is float64,
else in float32, so tests can ask for an fp64 answer by passing fp64 inputs. The Llama pieces at the end
(rms_norm, rope, silu, swiglu, linear) are also what tinyllm's NumPy engine runs: one definition of the math.

Shapes: q [batch, n_heads, q_len, head_dim]; k, v [batch, n_kv_heads, kv_len, head_dim].

The online softmax (FlashAttention's loop) is here too, as the kernels run it: `softmax_rescale` is the one rule
for a running maximum meeting a new tile, and every kernel compiles this very function as a device function
(numbattn/kernels/softmax.py), so the rule (and its treatment of rows that have seen no key) cannot drift.
"""
import math

import numpy as np

LOG2E = 1.4426950408889634      # exp(x) = exp2(x * LOG2E): the kernels fold it into the scale and use exp2
LN2 = 0.6931471805599453        # = 1 / LOG2E: log-sum-exps leave the kernels in natural log


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


def visible(q_len, kv_len, causal, window=None):
    """[q_len, kv_len] bool, True where query i may see key j: causal_mask, and with a sliding window
    (Mistral's and Gemma's, as transformers writes it) query i, at absolute position p = i + kv_len - q_len,
    sees key j iff p - window < j <= p: itself and the window - 1 keys before it. A window needs causal."""
    if window is None:
        return causal_mask(q_len, kv_len) if causal else np.ones((q_len, kv_len), bool)
    if not causal:
        raise ValueError("a sliding window needs causal=True")
    p = np.arange(q_len)[:, None] + (kv_len - q_len)                     # [q_len, 1]: absolute positions
    return causal_mask(q_len, kv_len) & (np.arange(kv_len)[None, :] > p - window)


def soft_cap(scores, cap):
    """cap * tanh(scores / cap) (Gemma 2's logit soft-capping: every score squeezed into (-cap, cap), smoothly);
    cap None: the scores unchanged."""
    return scores if cap is None else cap * np.tanh(scores / cap)


def soft_cap_slope(capped, cap):
    """d soft_cap(s) / d s = 1 - tanh²(s / cap) = 1 - (capped / cap)², from the capped score itself; 1 without a cap.
    A masked score (-inf) gets 0: the pair is not part of the function, and 0 keeps 0 * inf out of the sums."""
    if cap is None:
        return np.ones_like(capped)
    return np.where(np.isfinite(capped), 1 - (capped / cap) ** 2, 0)


def repeat_kv(x, n_heads):
    """Grouped-query attention, the slow way: [b, n_kv_heads, s, d] -> [b, n_heads, s, d].

    Query head h uses KV head h // (n_heads // n_kv_heads). The kernels never materialise this copy.
    """
    return np.repeat(x, n_heads // x.shape[1], axis=1)


def scores(q, k, causal=False, scale=None, window=None, softcap=None):
    """soft_cap(q @ k^T * scale), -inf where the causal mask or the window hides a key  ->  [batch, n_heads, q_len,
    kv_len] (the N×N matrix). In the dtype attention() computes in (q and k decide it here)."""
    dt = _compute_dtype(q, k)
    q, k = np.asarray(q, dtype=dt), np.asarray(k, dtype=dt)
    n_heads, q_len, head_dim = q.shape[1], q.shape[2], q.shape[3]
    kv_len = k.shape[2]
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    s = soft_cap(q @ repeat_kv(k, n_heads).swapaxes(-1, -2) * dt(scale), softcap)   # [b, n_heads, q_len, kv_len]
    if causal or window is not None:
        s = np.where(visible(q_len, kv_len, causal, window), s, -np.inf)
    return s


def attention(q, k, v, causal=False, scale=None, window=None, softcap=None):
    """softmax(soft_cap(q @ k^T * scale) [+ causal / window mask]) @ v  ->  [batch, n_heads, q_len, head_dim]."""
    dt = _compute_dtype(q, k, v)
    q, k, v = (np.asarray(x, dtype=dt) for x in (q, k, v))
    s = scores(q, k, causal, scale, window, softcap)                      # [b, n_heads, q_len, kv_len]  <- N×N
    return softmax(s) @ repeat_kv(v, q.shape[1])                          # [b, n_heads, q_len, d]


def log_sum_exp(s):
    """log sum_j exp(s_j) over the last axis (natural log; -inf for a row of -inf: a row that sees no key).
    What the forward kernels return beside the output, and what the backward recomputes P from: P = exp(s - lse)."""
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)                   # an empty row: exp(-inf - 0) = 0, log 0 = -inf
    with np.errstate(divide="ignore"):
        return (m + np.log(np.exp(s - m).sum(axis=-1, keepdims=True)))[..., 0]


def attention_backward(q, k, v, dout, causal=False, scale=None, window=None, softcap=None):
    """The gradients of out = attention(q, k, v, causal, scale, window, softcap) for a loss L whose gradient dL/d out
    is dout -> (dq, dk, dv), the shapes of q, k and v. The equations (S, P, dS are [b, h, q_len, kv_len]; K and V
    repeated per query head):

        S = soft_cap(q K^T * scale),   -inf where the mask hides a key,   P = softmax(S),   out = P V
        dV = P^T dout                          (then summed over the query heads that share each KV head)
        dP = dout V^T
        dS = P ∘ (dP - D),   D = rowsum(P ∘ dP) = rowsum(dout ∘ out)     (the softmax's Jacobian, row by row)
        dS <- dS ∘ soft_cap'(S)                (the cap's chain rule: 1 - tanh², from the capped score itself)
        dq = dS K * scale,   dK = dS^T q * scale                          (summed over the group, as dV)

    D is one number per query row: rowsum(P ∘ dP) = rowsum(P (dout V^T)) = rowsum(dout ∘ (P V)). The kernels
    take it from out, which the forward already wrote, instead of from the N×N P. A masked pair has P = 0, so it
    adds nothing to any gradient."""
    dt = _compute_dtype(q, k, v, dout)
    q, k, v, dout = (np.asarray(x, dtype=dt) for x in (q, k, v, dout))
    b, n_heads, _, d = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    s = scores(q, k, causal, scale, window, softcap)                       # [b, h, q_len, kv_len]
    p = softmax(s)
    k_rep, v_rep = repeat_kv(k, n_heads), repeat_kv(v, n_heads)            # [b, h, kv_len, d]
    out = p @ v_rep                                                        # [b, h, q_len, d]
    dp = dout @ v_rep.swapaxes(-1, -2)                                     # [b, h, q_len, kv_len]
    ds = p * (dp - (dout * out).sum(axis=-1, keepdims=True))               # [b, h, q_len, kv_len]
    ds = ds * soft_cap_slope(s, softcap)
    dq = ds @ k_rep * dt(scale)                                            # [b, h, q_len, d]
    per_head = (ds.swapaxes(-1, -2) @ q * dt(scale), p.swapaxes(-1, -2) @ dout)   # dK, dV [b, h, kv_len, d]
    dk, dv = (x.reshape(b, n_kv_heads, n_heads // n_kv_heads, kv_len, d).sum(axis=2) for x in per_head)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------------
# The online softmax, one tile of keys at a time (FlashAttention-2, Algorithm 1)
# --------------------------------------------------------------------------------------------------------
NEG_INF, ZERO, ONE = np.float32(-np.inf), np.float32(0.0), np.float32(1.0)   # float32: the kernels compile these


def softmax_rescale(m_old, m_tile):
    """The online-softmax rule for one row: its running max m_old meets a tile (or another partial result) whose
    max is m_tile. Scores are in the log2 domain (s = q.k * scale * log2 e). -> (m_new, m_ref, alpha):

        m_new = max(m_old, m_tile)               the running max from now on
        m_ref = m_new, or 0 while m_new = -inf   what this tile's terms are taken against: p = exp2(s - m_ref)
        alpha = exp2(m_old - m_ref)              the factor that rescales everything summed under m_old

    The empty-row rule: a row that has seen only masked keys (scores -inf) keeps m = -inf, and because m_ref is 0
    then, every p and alpha is exp2(-inf) = 0, never exp2(-inf - (-inf)) = NaN: its l stays 0 and its output is 0
    (softmax_finish). Once a visible key arrives, alpha = exp2(-inf) = 0 clears the (zero) sums before it."""
    m_new = max(m_old, m_tile)
    m_ref = m_new if m_new != NEG_INF else ZERO
    return m_new, m_ref, math.exp2(m_old - m_ref)


def softmax_finish(l):
    """1 / l, the factor that turns acc into the softmax-weighted sum; 0 for a row that saw no key (l = 0)."""
    return ONE / l if l > 0 else ZERO


def softmax_lse(m, l):
    """A finished row's log-sum-exp of its scores, in natural log (what the forward returns for the backward):
    m + log2(l) in the log2 domain, times ln 2; -inf for a row that saw no key (l = 0)."""
    return (m + math.log2(l)) * LN2 if l > 0 else NEG_INF


def online_attention(q, k, v, block_n, causal=False, scale=None, window=None, softcap=None):
    """attention(), computed the way the kernels compute it: over key tiles of block_n keys, each row keeping
    m (running max), l (running sum) and acc (unnormalised output), rescaled by softmax_rescale; scores in the
    log2 domain (soft-capped first: a cap in natural-log units is cap * log2 e there). Returns
    (out [b, h, q_len, d], lse [b, h, q_len]: the natural-log log-sum-exp of each row's scores, -inf if empty)."""
    dt = _compute_dtype(q, k, v)
    q, k, v = (np.asarray(x, dtype=dt) for x in (q, k, v))
    b, n_heads, q_len, d = q.shape
    kv_len = k.shape[2]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    k, v = repeat_kv(k, n_heads), repeat_kv(v, n_heads)                      # [b, h, kv_len, d]
    seen = visible(q_len, kv_len, causal, window)                           # [q_len, kv_len]
    m = np.full((b, n_heads, q_len), -np.inf, dt)                           # [b, h, q_len]
    l = np.zeros((b, n_heads, q_len), dt)
    acc = np.zeros(q.shape, dt)                                             # [b, h, q_len, d]
    for j0 in range(0, kv_len, block_n):
        s = q @ k[:, :, j0:j0 + block_n].swapaxes(-1, -2) * dt(scale * LOG2E)   # [b, h, q_len, tile]
        s = soft_cap(s, None if softcap is None else dt(softcap * LOG2E))
        s = np.where(seen[:, j0:j0 + block_n], s, -np.inf)
        m, m_ref, alpha = elementwise(softmax_rescale, m, s.max(axis=-1))   # [b, h, q_len] each
        p = np.exp2(s - m_ref[..., None])                                   # [b, h, q_len, tile]
        l = l * alpha + p.sum(axis=-1)
        acc = acc * alpha[..., None] + p @ v[:, :, j0:j0 + block_n]
    out = acc * elementwise(softmax_finish, l)[..., None]
    lse = np.where(l > 0, (m + np.log2(np.where(l > 0, l, 1))) / LOG2E, -np.inf)
    return out, lse


def merge_partials(m, l, acc):
    """The log-sum-exp merge of partial results over disjoint key ranges (what split-K decode does): m, l
    [n_parts, ...], acc [n_parts, ..., d], in the log2 domain -> out [..., d] = the softmax over all their keys.
    Folded one part at a time with softmax_rescale, as the kernels fold them."""
    M, L, A = np.full(m.shape[1:], -np.inf, acc.dtype), np.zeros(l.shape[1:], acc.dtype), np.zeros(acc.shape[1:], acc.dtype)
    for m_s, l_s, a_s in zip(m, l, acc):
        M, M_ref, alpha = elementwise(softmax_rescale, M, m_s)
        w = np.exp2(m_s - M_ref)                                             # this part's weight
        L, A = L * alpha + l_s * w, A * alpha[..., None] + a_s * w[..., None]
    return A * elementwise(softmax_finish, L)[..., None]


def elementwise(rule, *arrays):
    """Apply a scalar rule (softmax_rescale, softmax_finish) to every element of equally shaped arrays, as the
    kernels apply it to every row -> one array per result, in the arrays' dtype. (NumPy scalars go in, so a float32
    constant of the rule does not pull a float64 computation down to float32.)"""
    arrays = np.broadcast_arrays(*(np.asarray(a) for a in arrays))
    dt = np.result_type(*arrays)
    results = [rule(*(dt.type(x) for x in xs)) for xs in zip(*(a.ravel() for a in arrays))]
    if not isinstance(results[0], tuple):
        return np.array(results, dt).reshape(arrays[0].shape)
    return tuple(np.array(r, dt).reshape(arrays[0].shape) for r in zip(*results))


def decode_attention(q, k_cache, v_cache, lengths, scale=None, window=None, softcap=None):
    """One new query token per row over a KV cache whose rows hold different numbers of tokens.

    q [batch, n_heads, d]; k_cache, v_cache [batch, n_kv_heads, max_len, d], token j of a row in slot j;
    lengths [batch] -> [batch, n_heads, d]. Row b attends to its first lengths[b] cached tokens (the new token's
    own K/V already appended), with a window to its last min(lengths[b], window); a row holding no tokens
    returns zeros. Slots outside those are never read, whatever they hold.
    """
    dt = _compute_dtype(q, k_cache, v_cache)
    q = np.asarray(q, dtype=dt)
    out = np.zeros(q.shape, dtype=dt)
    for b, n in enumerate(np.asarray(lengths)):
        if n > 0:
            first = 0 if window is None else max(0, n - window)
            k = np.asarray(k_cache[b:b + 1, :, first:n], dtype=dt)  # [1, n_kv_heads, n - first, d]
            v = np.asarray(v_cache[b:b + 1, :, first:n], dtype=dt)
            out[b] = attention(q[b:b + 1, :, None, :], k, v, scale=scale, softcap=softcap)[0, :, 0]  # [n_heads, d]
    return out


def gather_pages(pool, block_table, n):
    """A paged cache's sequence made contiguous again: its first n tokens, page after page.

    pool [n_blocks, n_kv_heads, block_size, d]; block_table [>= ceil(n / block_size)] (the sequence's pages, in
    order) -> [n_kv_heads, n, d]. Token j lives in page block_table[j // block_size], at offset j % block_size."""
    block_size = pool.shape[2]
    pages = np.asarray(block_table[:-(-n // block_size)], np.int64)          # [n_pages]
    seq = pool[pages].transpose(1, 0, 2, 3)                                 # [n_kv_heads, n_pages, block_size, d]
    return seq.reshape(pool.shape[1], -1, pool.shape[3])[:, :n]            # [n_kv_heads, n, d]


def paged_decode_attention(q, k_pool, v_pool, block_tables, rows, lengths, scale=None, softcap=None):
    """decode_attention over a paged KV cache (vLLM's PagedAttention layout): row b of the batch continues the
    sequence rows[b], whose lengths[rows[b]] tokens live in the pages its block table lists.

    q [batch, n_heads, d]; k_pool, v_pool [n_blocks, n_kv_heads, block_size, d]; block_tables [n_seqs, max_pages];
    rows [batch] (a negative row is padding: zeros); lengths [n_seqs] -> [batch, n_heads, d]. softcap: as in
    decode_attention."""
    dt = _compute_dtype(q, k_pool, v_pool)
    out = np.zeros(np.shape(q), dtype=dt)
    for b, seq in enumerate(np.asarray(rows)):
        n = int(lengths[seq]) if seq >= 0 else 0
        if n > 0:
            k = gather_pages(k_pool, block_tables[seq], n)[None]              # [1, n_kv_heads, n, d]
            v = gather_pages(v_pool, block_tables[seq], n)[None]
            out[b] = decode_attention(np.asarray(q[b:b + 1], dt), k, v, [n], scale=scale, softcap=softcap)[0]
    return out


# --------------------------------------------------------------------------------------------------------
# The rest of a Llama block (numbattn/kernels/gemv.py, gemm.py and rowwise.py implement these on the GPU)
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


def gelu_tanh(x):
    """GELU with tanh's approximation of the normal CDF (transformers' "gelu_pytorch_tanh", Gemma's):
    0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def geglu(gate, up):
    """The GeGLU activation (Gemma's MLP): gelu_tanh(gate) * up, elementwise."""
    return gelu_tanh(gate) * up


def swiglu_interleaved(y):
    """The fused gate/up matmul's output: [.., 2 * ffn] with gate and up interleaved (2f = gate_f, 2f+1 = up_f)
    -> silu(gate) * up, [.., ffn]."""
    return swiglu(y[..., 0::2], y[..., 1::2])


def geglu_interleaved(y):
    """The same with GeGLU: gelu_tanh(gate) * up, [.., ffn]."""
    return geglu(y[..., 0::2], y[..., 1::2])


def rope_tables(head_dim, n_positions, theta, scaling_factor=1.0, inv_freq=None):
    """cos and sin of every position's rotation angles -> two [n_positions, head_dim / 2] float32 tables.

    Pair i of a head rotates by angle pos * theta^(-2i / head_dim): fast for the first pairs, slow for the
    last, so relative positions from 1 to thousands of tokens stay distinguishable. Computed in float64.
    Linear RoPE scaling stretches the context by dividing positions by the factor; inv_freq [head_dim / 2], if
    given, replaces theta's frequencies (Llama 3.1 scales each pair's by its own factor: tinyllm/architecture.py).
    """
    if inv_freq is None:
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
