"""tinyllm/train.py: each op's hand-written backward against finite differences (fp64), the whole backward against a
finite difference of the loss, the training forward against the model's own forward, and a loss that decreases."""
import dataclasses

import numpy as np
import pytest

from gradients import numerical_gradient
from numbattn import reference
from tinyllm import train
from tinyllm.model import Llama


def test_op_backwards_equal_finite_differences():
    """L = sum(dy * op(x)) for each op, in fp64: the hand-written backward is dL/dx (and dL/dweight)."""
    rng = np.random.default_rng(0)
    x, w, dy = rng.standard_normal((3, 8)), rng.standard_normal(8), rng.standard_normal((3, 8))
    dx, dw = train.rms_norm_backward(dy, x, w, 1e-5)
    loss = lambda: (dy * train.rms_norm(x, w, 1e-5)).sum()      # noqa: E731
    np.testing.assert_allclose(dx, numerical_gradient(loss, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dw, numerical_gradient(loss, w), rtol=1e-6, atol=1e-8)
    gate, up = rng.standard_normal((2, 3, 8)) * 3
    dgate, dup = train.swiglu_backward(dy, gate, up)
    loss = lambda: (dy * train.swiglu(gate, up)).sum()          # noqa: E731
    np.testing.assert_allclose(dgate, numerical_gradient(loss, gate), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dup, numerical_gradient(loss, up), rtol=1e-6, atol=1e-8)
    cos, sin = (x.astype(np.float64) for x in train.rope_tables(8, 3, 10000.0))
    xr, dyr = rng.standard_normal((1, 2, 3, 8)), rng.standard_normal((1, 2, 3, 8))
    loss = lambda: (dyr * train.rope(xr, cos, sin)).sum()       # noqa: E731
    np.testing.assert_allclose(train.rope_backward(dyr, cos, sin), numerical_gradient(loss, xr), rtol=1e-6, atol=1e-8)
    logits, targets = rng.standard_normal((2, 3, 5)), rng.integers(0, 5, (2, 3))
    _, dlogits = train.cross_entropy(logits, targets)
    loss = lambda: train.cross_entropy(logits, targets)[0]      # noqa: E731
    np.testing.assert_allclose(dlogits, numerical_gradient(loss, logits), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("change,named", [(dict(family="qwen2"), "q/k/v biases"),
                                          (dict(attn_logit_softcapping=50.0), "score soft cap 50.0"),
                                          (dict(tie_word_embeddings=True), "tied embeddings")])
def test_a_family_switch_is_refused(change, named):
    """train.py has the Llama 2 block's backward only: a config using more is refused in one line, not trained wrong."""
    config, w = tiny()
    with pytest.raises(ValueError, match=f"Llama 2 block only; this config also uses: {named}"):
        train.forward(w, dataclasses.replace(config, **change), np.zeros((1, 3), np.int64))


def tiny(seed=0):
    config = train.tiny_train_config(vocab_size=32, max_len=16)
    return config, train.init_weights(config, np.random.default_rng(seed))


def test_training_forward_is_the_models_forward():
    """The forward that keeps activations computes tinyllm's Llama on the NumPy engine, to float32 rounding (the
    engine's RMSNorm and RoPE are numbattn's CPU kernels, the training forward's the NumPy lines: the sums round
    in another order)."""
    config, w = tiny()
    ids = np.random.default_rng(1).integers(0, 32, (2, 7))
    logits, _ = train.forward(w, config, ids)
    want = Llama(config, w, backend="numpy").forward(ids)
    assert np.abs(logits - want).max() <= 1e-5 * np.abs(want).max()


def as_fp64(w):
    g = train.zeros_like(w)
    for dst, src in zip(train.tensors(g), train.tensors(w)):
        dst[...] = src
    out = train.LlamaWeights(embed=g.embed.astype(np.float64), layers=[train.LayerWeights(
        **{f: getattr(lw, f).astype(np.float64) for f in train.layer_fields(lw)}) for lw in g.layers],
        norm=g.norm.astype(np.float64), lm_head=g.lm_head.astype(np.float64))
    return out


class Fp64Attention:
    """numbattn's two calls as train.py makes them, on the reference in the inputs' dtype (numbattn refuses fp64
    inputs; its own gradients are checked in tests/test_backward.py)."""
    @staticmethod
    def attention(q, k, v, causal, backend, return_lse):
        return reference.attention(q, k, v, causal=causal), reference.log_sum_exp(reference.scores(q, k, causal))

    @staticmethod
    def attention_backward(q, k, v, out, lse, dout, causal, backend):
        return reference.attention_backward(q, k, v, dout, causal=causal)


def test_backward_equals_a_finite_difference_of_the_loss(monkeypatch):
    """Every weight's gradient, along a random direction u: L(w + e u) - L(w - e u) = 2 e <dL/dw, u> (fp64)."""
    monkeypatch.setattr(train, "numbattn", Fp64Attention)
    config, w = tiny()
    w = as_fp64(w)
    rng = np.random.default_rng(2)
    for x in train.tensors(w):
        x += rng.standard_normal(x.shape) * 0.05        # norms off 1, so their gradients matter
    ids, targets = rng.integers(0, 32, (2, 6)), rng.integers(0, 32, (2, 6))
    logits, acts = train.forward(w, config, ids)
    _, dlogits = train.cross_entropy(logits, targets)
    grads = train.backward(w, config, acts, dlogits)
    for i, (x, g) in enumerate(zip(train.tensors(w), train.tensors(grads))):
        u = rng.standard_normal(x.shape)
        old = x.copy()
        x[...] = old + 1e-6 * u
        up = train.cross_entropy(train.forward(w, config, ids)[0], targets)[0]
        x[...] = old - 1e-6 * u
        down = train.cross_entropy(train.forward(w, config, ids)[0], targets)[0]
        x[...] = old
        fd = (up - down) / 2e-6
        assert abs(fd - (g * u).sum()) < 1e-6 * max(1.0, abs(fd)), (i, fd, (g * u).sum())


def test_loss_decreases_on_a_fixed_seed():
    """30 steps on the bundled text (NumPy attention): the loss falls by more than half a nat."""
    config = train.tiny_train_config(vocab_size=256, max_len=16)
    w = train.init_weights(config, np.random.default_rng(0))
    batches = train.Batches(train.read_text(), seq=12, batch=4, rng=np.random.default_rng(1))
    losses = train.train(w, config, batches, steps=30, lr=1e-2, every=0)
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < losses[0] - 0.5, losses


def test_gradients_through_the_kernels_equal_the_numpy_path(kernel_backend):
    """One step's loss and gradients with attention on the kernels (forward v3 with lse, backward v3) equal those
    with attention on NumPy; one layer (4 query heads on 2 KV heads), 6 tokens: the simulator's time."""
    config = dataclasses.replace(train.tiny_train_config(vocab_size=32, max_len=16), num_hidden_layers=1)
    w = train.init_weights(config, np.random.default_rng(0))
    rng = np.random.default_rng(3)
    ids, targets = rng.integers(0, 32, (1, 6)), rng.integers(0, 32, (1, 6))
    results = []
    for backend in ("numpy", kernel_backend):
        logits, acts = train.forward(w, config, ids, backend)
        loss, dlogits = train.cross_entropy(logits, targets)
        results.append((loss, train.tensors(train.backward(w, config, acts, dlogits, backend))))
    (loss_np, grads_np), (loss_k, grads_k) = results
    assert abs(loss_np - loss_k) < 1e-5
    for g_np, g_k in zip(grads_np, grads_k):
        assert np.abs(g_k - g_np).max() <= 1e-5 * max(np.abs(g_np).max(), 1e-3)
