"""Training a miniature Llama: the forward that keeps what the backward needs, the backward by hand, AdamW.

    config = tiny_train_config()                          # 2 layers, dim 64, 4 query / 2 KV heads, bytes as tokens
    weights = init_weights(config, np.random.default_rng(0))
    batches = Batches(read_text(), seq=64, batch=16, rng=np.random.default_rng(1))
    losses = train(weights, config, batches, steps=300)  # -> the loss of every step
    Llama(config, weights).generate(...)                  # the trained weights are an ordinary tinyllm model

llm.c's train_gpt2.c is the model for its shape: each operation of the forward (tinyllm/model.py; the math is
numbattn/reference.py) has a backward written as plainly, one function each, and `backward` calls them in the
forward's order reversed, adding into one gradient per weight (LlamaWeights of gradients). Everything is NumPy
except attention, which goes through numbattn both ways: `numbattn.attention(..., return_lse=True)` forward, and
`numbattn.attention_backward` with the output and the log-sum-exp it kept (on its NumPy path on a laptop, its
kernels in the simulator or on a GPU: the `attention_backend` argument).

The backward of each op, with x its input and dy the gradient of the loss with respect to its output:

    y = x W                      dx = dy W^T,  dW = x^T dy                 (x: every position a row)
    y = rms_norm(x, w)           r = 1 / sqrt(mean(x²) + eps),  dw = sum(dy ∘ x r),
                                 dx = r (dy∘w - x r² mean(dy∘w ∘ x))       (the norm's Jacobian, row by row)
    y = rope(x)                  a rotation of each pair by the position's angle: dx = rope(dy) by the opposite angle
    y = silu(g) ∘ u              du = dy ∘ silu(g),  dg = dy ∘ u ∘ σ(g)(1 + g(1 - σ(g)))
    y = embed[ids]               d embed[id] += dy for every position holding id
    loss = mean(-log softmax(logits)[target])     d logits = (softmax(logits) - onehot(target)) / positions
"""
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

import numbattn
from numbattn.reference import rms_norm, rope, rope_tables, silu, swiglu

from .architecture import describe
from .config import LlamaConfig
from .engines.host import merge_heads, split_heads
from .weights import LayerWeights, LlamaWeights

log = logging.getLogger("tinyllm")
TEXT = Path(__file__).resolve().parent.parent / "tutorials" / "data" / "shakespeare.txt"


# --------------------------------------------------------------------------------------------------------
# Data: bytes as tokens
# --------------------------------------------------------------------------------------------------------
def read_text(path=TEXT):
    """The training text as token ids: its UTF-8 bytes (a vocabulary of 256, nothing to train)."""
    return np.frombuffer(Path(path).read_bytes(), np.uint8).astype(np.int64)


def decode(ids):
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@dataclass
class Batches:
    """Random windows of the text: inputs [batch, seq] and the targets, the same windows one byte later."""
    ids: np.ndarray
    seq: int
    batch: int
    rng: np.random.Generator

    def next(self):
        starts = self.rng.integers(0, len(self.ids) - self.seq - 1, self.batch)
        window = np.stack([self.ids[s:s + self.seq + 1] for s in starts])     # [batch, seq + 1]
        return window[:, :-1], window[:, 1:]


def tiny_train_config(vocab_size=256, max_len=256):
    """A Llama small enough to train in NumPy in seconds: 2 layers, dim 64, 4 query heads sharing 2 KV heads."""
    return LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=max_len, rms_norm_eps=1e-5,
                       rope_theta=10000.0, vocab_size=vocab_size, bos_token_id=None, eos_token_id=None)


def init_weights(config, rng):
    """Random weights (GPT-2's recipe): N(0, 0.02) matrices, the projections into the residual stream scaled by
    1 / sqrt(2 layers), norms at 1. Matrices [in, out], as tinyllm keeps them."""
    c, std = config, 0.02
    dim, hd, ffn = c.hidden_size, c.head_dim, c.intermediate_size

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * std * scale).astype(np.float32)
    down = 1 / np.sqrt(2 * c.num_hidden_layers)
    layers = [LayerWeights(attn_norm=np.ones(dim, np.float32), wq=normal(dim, c.num_attention_heads * hd),
                           wk=normal(dim, c.num_key_value_heads * hd), wv=normal(dim, c.num_key_value_heads * hd),
                           wo=normal(c.num_attention_heads * hd, dim, scale=down), ffn_norm=np.ones(dim, np.float32),
                           w_gate=normal(dim, ffn), w_up=normal(dim, ffn), w_down=normal(ffn, dim, scale=down))
              for _ in range(c.num_hidden_layers)]
    return LlamaWeights(embed=normal(c.vocab_size, dim), layers=layers, norm=np.ones(dim, np.float32),
                        lm_head=normal(dim, c.vocab_size))


# --------------------------------------------------------------------------------------------------------
# The forward, keeping its activations
# --------------------------------------------------------------------------------------------------------
def check_llama_block(config):
    """This file writes the backward of the Llama 2 block only: a config that uses any family's switch (biases, head
    norms, GeGLU, windows, soft caps, RoPE scaling, tied embeddings: tinyllm/architecture.py) is refused."""
    extra = describe(config).summary().replace("SwiGLU MLP", "").strip(", ")
    if extra:
        raise ValueError(f"tinyllm.train trains the Llama 2 block only; this config also uses: {extra}")


def forward(w, config, ids, attention_backend="numpy"):
    """logits [b, s, vocab] for ids [b, s] (positions 0 .. s-1, causal), and `acts`: what the backward needs.
    Activations are kept as [b * s, features] (one row per position: the matmuls are 2-D), split into heads
    [b, heads, s, head_dim] only around attention."""
    check_llama_block(config)
    c, (b, s) = config, ids.shape
    cos, sin = rope_tables(c.head_dim, s, c.rope_theta)                     # [s, head_dim / 2] each
    x = w.embed[ids.reshape(-1)]                                            # [b s, dim]: the residual stream
    acts = {"ids": ids, "cos": cos, "sin": sin, "layers": []}
    for lw in w.layers:
        a = {"x": x}
        a["h"] = h = rms_norm(x, lw.attn_norm, c.rms_norm_eps)              # [b s, dim]
        q = rope(heads(h @ lw.wq, b, c.num_attention_heads), cos, sin)      # [b, H, s, hd]
        k = rope(heads(h @ lw.wk, b, c.num_key_value_heads), cos, sin)      # [b, Hkv, s, hd]
        v = heads(h @ lw.wv, b, c.num_key_value_heads)
        out, lse = numbattn.attention(q, k, v, causal=True, backend=attention_backend, return_lse=True)
        a.update(q=q, k=k, v=v, out=out, lse=lse, attn=rows(out))           # attn [b s, H hd]
        a["x_mid"] = x = x + a["attn"] @ lw.wo
        a["h2"] = h2 = rms_norm(x, lw.ffn_norm, c.rms_norm_eps)
        a["gate"], a["up"] = h2 @ lw.w_gate, h2 @ lw.w_up                  # [b s, ffn] each
        a["mlp"] = swiglu(a["gate"], a["up"])
        x = x + a["mlp"] @ lw.w_down
        acts["layers"].append(a)
    acts["x_final"] = x
    acts["h_final"] = rms_norm(x, w.norm, c.rms_norm_eps)
    return (acts["h_final"] @ w.lm_head).reshape(b, s, -1), acts            # [b, s, vocab]


def heads(x, b, n_heads):
    """[b s, n_heads hd] -> [b, n_heads, s, hd]"""
    return split_heads(x.reshape(b, -1, x.shape[-1]), n_heads)


def rows(x):
    """[b, heads, s, hd] -> [b s, heads hd]"""
    y = merge_heads(x)
    return y.reshape(-1, y.shape[-1])


def cross_entropy(logits, targets):
    """-> (mean loss, d loss / d logits): -log softmax(logits)[target], averaged over every position."""
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))                # [b, s, vocab]
    n = targets.size
    loss = -np.take_along_axis(logp, targets[..., None], axis=-1).mean()
    dlogits = np.exp(logp)
    np.put_along_axis(dlogits, targets[..., None], np.take_along_axis(dlogits, targets[..., None], -1) - 1, -1)
    return float(loss), (dlogits / n).astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# The backward of each op
# --------------------------------------------------------------------------------------------------------
def linear_backward(dy, x, w):
    """y = x W -> (dx, dW); x [n, in], W [in, out], dy [n, out]."""
    return dy @ w.T, x.T @ dy


def rms_norm_backward(dy, x, weight, eps):
    """y = x r w with r = 1 / sqrt(mean(x²) + eps) -> (dx, dweight); x, dy [n, dim]."""
    r = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)           # [.., 1]
    dweight = (dy * x * r).sum(axis=0)
    dxhat = dy * weight
    return r * (dxhat - x * r * r * np.mean(dxhat * x, axis=-1, keepdims=True)), dweight


def rope_backward(dy, cos, sin):
    """rope rotates each pair by +angle; the transpose of a rotation is the rotation by -angle."""
    return rope(dy, cos, -sin)


def swiglu_backward(dy, gate, up):
    """y = silu(gate) * up -> (dgate, dup)."""
    sig = 0.5 + 0.5 * np.tanh(0.5 * gate)                                    # sigmoid, as reference.silu writes it
    return dy * up * sig * (1 + gate * (1 - sig)), dy * silu(gate)


def attention_block_backward(dattn, a, lw, gl, cos, sin, config, attention_backend):
    """From d attn [b s, H hd] back to dh [b s, dim] through v, rope(k), rope(q) and their projections, writing
    the projections' gradients into gl. The attention itself: numbattn.attention_backward, with the forward's out
    and lse (a: the layer's activations)."""
    c, b = config, a["q"].shape[0]
    dout = heads(dattn, b, c.num_attention_heads)                           # [b, H, s, hd]
    dq, dk, dv = numbattn.attention_backward(a["q"], a["k"], a["v"], a["out"], a["lse"], dout, causal=True,
                                             backend=attention_backend)
    dh = np.zeros_like(a["h"])
    for dx_heads, wname, rotated in ((dq, "wq", True), (dk, "wk", True), (dv, "wv", False)):
        dx = rows(rope_backward(dx_heads, cos, sin) if rotated else dx_heads)   # [b s, heads hd]
        dh_part, dw = linear_backward(dx, a["h"], getattr(lw, wname))
        dh += dh_part
        getattr(gl, wname)[...] = dw
    return dh


def backward(w, config, acts, dlogits, attention_backend="numpy"):
    """The gradients of the loss with respect to every weight (LlamaWeights of the same shapes), from dlogits."""
    c, g = config, zeros_like(w)
    dh, g.lm_head[...] = linear_backward(dlogits.reshape(-1, dlogits.shape[-1]), acts["h_final"], w.lm_head)
    dx, g.norm[...] = rms_norm_backward(dh, acts["x_final"], w.norm, c.rms_norm_eps)
    for lw, gl, a in reversed(list(zip(w.layers, g.layers, acts["layers"]))):
        # feed-forward: x = x_mid + swiglu(h2 W_gate, h2 W_up) W_down, h2 = rms_norm(x_mid)
        dmlp, gl.w_down[...] = linear_backward(dx, a["mlp"], lw.w_down)
        dgate, dup = swiglu_backward(dmlp, a["gate"], a["up"])
        dh2_gate, gl.w_gate[...] = linear_backward(dgate, a["h2"], lw.w_gate)
        dh2_up, gl.w_up[...] = linear_backward(dup, a["h2"], lw.w_up)
        dx_norm, gl.ffn_norm[...] = rms_norm_backward(dh2_gate + dh2_up, a["x_mid"], lw.ffn_norm, c.rms_norm_eps)
        dx = dx + dx_norm                                                   # the residual passes dx through
        # attention: x_mid = x + attention(rope(h W_q), rope(h W_k), h W_v) W_o, h = rms_norm(x)
        dattn, gl.wo[...] = linear_backward(dx, a["attn"], lw.wo)
        dh = attention_block_backward(dattn, a, lw, gl, acts["cos"], acts["sin"], c, attention_backend)
        dx_norm, gl.attn_norm[...] = rms_norm_backward(dh, a["x"], lw.attn_norm, c.rms_norm_eps)
        dx = dx + dx_norm
    np.add.at(g.embed, acts["ids"].reshape(-1), dx)                         # each position's row of the table
    return g


# --------------------------------------------------------------------------------------------------------
# The optimiser and the loop
# --------------------------------------------------------------------------------------------------------
def layer_fields(lw):
    """The LayerWeights fields a layer has: a Llama's nine (the families' biases and extra norms stay None)."""
    return [f.name for f in fields(LayerWeights) if getattr(lw, f.name) is not None]


def tensors(w):
    """Every array of a LlamaWeights, in a fixed order (for the optimiser)."""
    return [w.embed, w.norm, w.lm_head] + [getattr(lw, name) for lw in w.layers for name in layer_fields(lw)]


def zeros_like(w):
    layers = [LayerWeights(**{name: np.zeros_like(getattr(lw, name)) for name in layer_fields(lw)})
              for lw in w.layers]
    return LlamaWeights(embed=np.zeros_like(w.embed), layers=layers, norm=np.zeros_like(w.norm),
                        lm_head=np.zeros_like(w.lm_head))


class AdamW:
    """Adam with decoupled weight decay (on matrices only), updating the weights in place."""

    def __init__(self, weights, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01):
        self.params, self.lr, self.betas, self.eps, self.wd = tensors(weights), lr, betas, eps, weight_decay
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        for p, g, m, v in zip(self.params, tensors(grads), self.m, self.v):
            m[...] = b1 * m + (1 - b1) * g
            v[...] = b2 * v + (1 - b2) * g * g
            update = (m / (1 - b1 ** self.t)) / (np.sqrt(v / (1 - b2 ** self.t)) + self.eps)
            p -= self.lr * (update + (self.wd * p if p.ndim == 2 else 0))


def train_step(w, config, optimizer, inputs, targets, attention_backend="numpy"):
    """One step: forward, loss, backward, update -> the loss before the update."""
    logits, acts = forward(w, config, inputs, attention_backend)
    loss, dlogits = cross_entropy(logits, targets)
    optimizer.step(backward(w, config, acts, dlogits, attention_backend))
    return loss


def train(w, config, batches, steps, lr=3e-3, attention_backend="numpy", every=50):
    """`steps` steps of AdamW on batches.next() -> the loss of every step (logged every `every` steps)."""
    optimizer, losses = AdamW(w, lr=lr), []
    for step in range(steps):
        losses.append(train_step(w, config, optimizer, *batches.next(), attention_backend))
        if every and (step % every == 0 or step == steps - 1):
            log.info("tinyllm train: step %d, loss %.3f", step, losses[-1])
    return losses
