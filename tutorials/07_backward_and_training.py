"""
Lesson 7: the backward pass, and training a miniature Llama with it
====================================================================

What you will learn
-------------------
* The gradients of attention, derived on the page: dV = Pᵀ dO, dP = dO Vᵀ, and the softmax's Jacobian folded
  into one line, dS = P ∘ (dP − D) with D = rowsum(dO ∘ O). Checked in fp64 against finite differences.
* Why FlashAttention's backward needs only one extra number per row from the forward, the log-sum-exp of its
  scores: P = exp(S − lse) recomputes any tile of the N×N matrix exactly, so nothing N×N is ever stored.
* The backward kernels (FlashAttention-2's Algorithm 2): a K/V-stationary kernel for dK and dV, a Q-stationary one
  for dQ, grouped-query heads summed into their KV head. The teaching kernel's code, run and checked (and the
  tensor-core one beside it); their memory traffic and working memory, counted.
* Training: a 2-layer Llama with a byte vocabulary learns Shakespeare's Sonnets and Macbeth (tutorials/data/) in a
  few hundred steps of AdamW on the CPU. Every op's backward is written by hand in NumPy (tinyllm/train.py, in the
  shape of llm.c's train_gpt2.c); attention goes through numbattn both ways. A loss curve
  (tutorials/out/07_loss_curve.png), and text sampled from the model before and after.

Run it: `python tutorials/07_backward_and_training.py`, or run the `# %%` cells in VS Code / Jupyter.
"""

# %%
import _setup  # noqa: F401  (must be the first import: GPU or simulator, see tutorials/README.md)

import os

# The training below multiplies small matrices (512 x 64): one BLAS thread does it faster than several waiting for
# each other, and on a shared machine far faster. (Set before NumPy loads its BLAS; your own setting wins.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import inspect  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

import _lesson  # noqa: E402
import numbattn  # noqa: E402
from numbattn import backward, reference  # noqa: E402
from numbattn.kernels import backward_tiled  # noqa: E402
from numbattn.lab import bench  # noqa: E402
from tinyllm import train  # noqa: E402
from tinyllm.model import Llama  # noqa: E402

BACKEND = numbattn.available_backends()[0]
print(f"engine: {_setup.ENGINE}; numbattn backend: {BACKEND}")
assert BACKEND in ("cuda", "sim"), "this lesson runs the kernels: it needs a GPU or NUMBA_ENABLE_CUDASIM=1"
plt = _lesson.pyplot()
rng = np.random.default_rng(0)

# %% [markdown]
# ## The gradients of attention
#
# Per head, with S = Q Kᵀ · scale (masked keys at −∞), P = softmax(S) row by row and O = P V, a loss L (the number
# training makes smaller) gives us dO = ∂L/∂O, its *gradient* with respect to O (how much L changes per unit change
# of each element), and asks for dQ, dK, dV. Two of the three steps are matrix products, whose gradients are the
# products with the other factor transposed:
#
#     O = P V          →   dV = Pᵀ dO            dP = dO Vᵀ
#     S = Q Kᵀ · scale →   dQ = dS K · scale     dK = dSᵀ Q · scale
#
# The middle step, P = softmax(S), mixes a whole row: p_j = e^{s_j} / Σ_k e^{s_k}, so ∂p_j/∂s_i = p_j (δ_ij − p_i)
# and
#
#     dS_i = Σ_j dP_j ∂p_j/∂s_i = p_i dP_i − p_i Σ_j p_j dP_j = p_i (dP_i − D),    D = Σ_j p_j dP_j.
#
# D is one number per query row, and it needs no N×N matrix: Σ_j p_j dP_j = Σ_j p_j (dO · v_j) = dO · (Σ_j p_j v_j)
# = dO · O. So D = rowsum(dO ∘ O), from two arrays we already have. With grouped-query attention several query
# heads read one K/V head, so that head's dK and dV are the sums of theirs. All of it, as NumPy:

# %%
print(inspect.getsource(reference.attention_backward))

# %% [markdown]
# A check that does not trust the derivation, *finite differences*: nudge each input by ±ε, recompute
# L = Σ dO ∘ attention(q, k, v) in fp64, and compare (L(x + ε) − L(x − ε)) / 2ε with the gradient, element by element (4 query heads sharing 2 KV
# heads, causal, more keys than queries).

# %%
def finite_differences(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        up = f()
        x[i] = old - eps
        g[i] = (up - f()) / (2 * eps)
        x[i] = old
    return g


q64, k64, v64, do64 = (rng.standard_normal(s) for s in ((1, 4, 3, 8), (1, 2, 5, 8), (1, 2, 5, 8), (1, 4, 3, 8)))
grads64 = reference.attention_backward(q64, k64, v64, do64, causal=True)
loss64 = lambda: (do64 * reference.attention(q64, k64, v64, causal=True)).sum()   # noqa: E731
for name, x, g in zip(("dq", "dk", "dv"), (q64, k64, v64), grads64):
    worst = _lesson.close(f"{name}: the equations vs finite differences", g, finite_differences(loss64, x),
                          atol=1e-8, rtol=1e-6)
    print(f"{name} {tuple(g.shape)}: equations = finite differences (largest |diff| {worst:.1e})")

# %% [markdown]
# Today's models add two things to S (lesson 4's masks, numbattn.attention's `window=` and `softcap=`). A sliding
# window is more masked keys: their p is 0, so nothing flows back to them. A soft cap (Gemma 2) squeezes each score
# through s → c·tanh(s/c) before the softmax: one more link in the chain rule, so dS is multiplied by its slope,
# 1 − tanh²(s/c), which the reference takes from the capped score itself. The same finite differences, with both:

# %%
loss_wc = lambda: (do64 * reference.attention(q64, k64, v64, causal=True, window=2, softcap=1.5)).sum()  # noqa: E731
grads_wc = reference.attention_backward(q64, k64, v64, do64, causal=True, window=2, softcap=1.5)
for name, x, g in zip(("dq", "dk", "dv"), (q64, k64, v64), grads_wc):
    _lesson.close(f"{name} (window 2, soft cap 1.5) vs finite differences", g, finite_differences(loss_wc, x),
                  atol=1e-8, rtol=1e-6)
print("window 2 and soft cap 1.5: equations = finite differences")

# %% [markdown]
# ## P again, from one number per row
#
# The backward needs P, which the forward never wrote down (lesson 2: that is the point of the online softmax).
# But the forward ends with each row's running max m and sum l, and log-sum-exp lse = m + log l is exactly the
# normaliser: p_j = e^{s_j − lse}. So the forward returns lse (one float per row: `return_lse=True`, written by
# the kernel's last step, `softmax_lse`), and the backward recomputes any tile of P from its scores, with no
# running max and no rescaling. (The kernels work in base 2, as in lesson 2: they multiply lse by log₂e on load.)

# %%
q, k, v, dout = (x.astype(np.float32) for x in (rng.standard_normal((1, 4, 9, 16)), rng.standard_normal((1, 2, 12, 16)),
                                                rng.standard_normal((1, 2, 12, 16)), rng.standard_normal((1, 4, 9, 16))))
out, lse = numbattn.flash_attention(q, k, v, causal=True, return_lse=True, version="v1")      # the kernel
s = reference.scores(q.astype(np.float64), k.astype(np.float64), causal=True)                  # [1, 4, 9, 12]
_lesson.close("kernel lse vs log-sum-exp of the scores", lse, reference.log_sum_exp(s), atol=1e-5)
_lesson.close("exp(S - lse) vs softmax(S)", np.exp(s - lse[..., None]), reference.softmax(s), atol=1e-6)
print("row 0 of head 0: lse =", round(float(lse[0, 0, 0]), 4), " P =", np.round(np.exp(s - lse[..., None])[0, 0, 0, :5], 3),
      "... (causal: the rest is 0)")

# %% [markdown]
# ## The backward kernels
#
# FlashAttention-2's backward (Algorithm 2) turns the forward's loop inside out. dK_j and dV_j are sums over the
# query rows that see key j, so a block owns a tile of keys, keeps their k, v and the running dk, dv in registers,
# and streams the query tiles past them (K/V-stationary), recomputing each tile's S, P, dP and dS on the way. dQ_i
# is a sum over keys: a second kernel owns query rows and streams key tiles, exactly like the forward. (dQ could be
# added from the first kernel with atomics instead, FlashAttention-2's choice; kernels/backward_mma.py says why
# this one runs a second pass.) Each query head is its own block; its dK, dV rows are added into the KV head's
# with atomic adds, which is the sum over the group. Here is the teaching kernel for dK and dV, one thread per key:

# %%
print(inspect.getsource(backward_tiled.make_dkdv_v1))

# %% [markdown]
# Both versions, v1 (that code, and its dQ twin) and v3 (the same algorithm on tensor cores, 3xTF32 as the
# forward v3), on this machine's engine, into gradient buffers filled with NaN (a gradient the kernels forget to
# write stays NaN and fails the check), against the fp64 equations. The forward that produced `out` and `lse`
# was the kernel too.

# %%
want = reference.attention_backward(*(x.astype(np.float64) for x in (q, k, v, dout)), causal=True)
for version in backward.VERSIONS:
    grads = tuple(cuda.to_device(np.full(x.shape, np.nan, np.float32)) for x in (q, k, v))
    t0 = time.perf_counter()
    got = backward.attention_backward(q, k, v, out, lse, dout, causal=True, version=version,
                                      grads=grads if BACKEND == "sim" else None)
    ms = (time.perf_counter() - t0) * 1e3
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        _lesson.close(f"backward {version} {name} vs fp64", g, w, atol=1e-5 * max(1.0, np.abs(w).max()))
    print(f"backward {version} on {BACKEND}: dq, dk, dv match the fp64 equations to 1e-5 ({ms:.0f} ms)")

# %% [markdown]
# ## Memory: what the backward reads, and what it keeps
#
# Working memory first. A backward written like the reference above materialises P, dP and dS: three N×N fp32
# matrices per head. FlashAttention's keeps lse and D (one float per query row) and the gradients themselves.
# Traffic, per (batch, query head) with BN keys per dK/dV block and BM query rows per dQ block: the dK/dV kernel
# reads K and V once and Q, dO (and lse, D) once per key block, N/BN times; the dQ kernel reads Q, dO once and K, V
# once per query block. Causal halves the re-reads. At TinyLlama's shape (32 query heads, 4 KV heads, d 64), fp32:

# %%
H, HKV, D = 32, 4, 64
BN, BM = backward.gpu_tiles("v3", D).dkdv.block_n, backward.gpu_tiles("v3", D).dq.block_m
rows = []
for n in (1024, 4096, 16384):
    nxn = 3 * H * n * n * 4                                            # P, dP, dS in fp32
    flash = 2 * H * n * 4 + (H + 2 * HKV) * n * D * 4                  # lse, D; dQ, dK, dV
    reads = H * (4 * n * D + (2 * n * D * n / BN + 2 * n * D * n / BM) / 2) * 4     # once + re-reads (causal: half)
    rows.append(dict(n=n, naive_extra_MiB=nxn / 2**20, flash_extra_MiB=flash / 2**20, reads_GiB=reads / 2**30,
                     backward_GFLOP=2.5 * bench.attention_flops(1, H, n, n, D, True) / 1e9,
                     flop_per_byte=2.5 * bench.attention_flops(1, H, n, n, D, True) / reads))
print(f"one causal backward, batch 1, 32/4 heads, d 64 (dK/dV blocks of {BN} keys, dQ blocks of {BM} rows):")
print(bench.format_table(rows, ["n", "naive_extra_MiB", "flash_extra_MiB", "reads_GiB", "backward_GFLOP",
                                "flop_per_byte"]))
assert all(r["flash_extra_MiB"] * 100 < r["naive_extra_MiB"] for r in rows[1:]), "the flash backward must be O(n)"

# %% [markdown]
# Those re-reads, counted rather than derived: in the simulator every element a kernel reads is a Python call,
# which numbattn's tracer logs (lessons 1, 3, 4). The v1 kernels at a small causal shape (2 query heads sharing 1 KV
# head, 16 tokens, blocks of 4): dK/dV reads K once per query head and Q once per visible (key block, query tile)
# pair, H·D·N·(N/BN + 1)/2 elements; dQ the other way round.

# %%
if BACKEND == "sim":
    from numbattn.lab import tracing
    Ht, Nt, Dt = 2, 16, 16
    qt, kt, vt, dot = (rng.standard_normal(sh).astype(np.float32) for sh in ((1, Ht, Nt, Dt), (1, 1, Nt, Dt),
                                                                              (1, 1, Nt, Dt), (1, Ht, Nt, Dt)))
    ot, lt = numbattn.attention(qt, kt, vt, causal=True, backend="numpy", return_lse=True)
    delta_t = (ot * dot).sum(-1).astype(np.float32)                     # D, as backward_prep.row_dot computes it
    tiles = backward.SIM_TILES["v1"]
    dkdv_v1, dq_v1 = backward.make_kernels("v1", Dt, tiles)
    scalars = (np.float32(0.25 * reference.LOG2E), np.float32(0.25), True,     # scale log2 e, scale, causal,
               np.int64(Nt), np.float32(0.0))                                  # window (Nt: none), softcap (0: none)
    counted = {}
    for name, kern, grads, blocks, threads in (
            ("dkdv", dkdv_v1, dict(dk=np.zeros_like(kt), dv=np.zeros_like(vt)), Nt // tiles.dkdv.block_n, tiles.dkdv.threads),
            ("dq", dq_v1, dict(dq=np.zeros_like(qt)), Nt // tiles.dq.block_m, tiles.dq.threads)):
        tracer = tracing.Tracer()
        kern[(blocks, Ht, 1), threads](*tracer.wrap(q=qt, k=kt, v=vt, dout=dot, lse=lt, delta=delta_t, **grads), *scalars)
        counted[name] = {x: tracer.reads(x) for x in ("q", "k", "dout", "v")}
    BNt, BMt = tiles.dkdv.block_n, tiles.dq.block_m
    formula = {"dkdv": dict(q=Ht * Dt * Nt * (Nt // BNt + 1) // 2, k=Ht * Nt * Dt),
               "dq": dict(q=Ht * Nt * Dt, k=Ht * Dt * Nt * (Nt // BMt + 1) // 2)}
    for name in counted:
        print(f"{name} v1 reads (counted): {counted[name]}; formula: {formula[name]}")
        for x in ("q", "k"):
            assert counted[name][x] == formula[name][x], (name, x, counted[name][x], formula[name][x])
else:
    print("counting each read needs the simulator (on a GPU the kernels are machine code)")

# %% [markdown]
# About 40 FLOPs per byte requested from memory, above the H100's ridge point of ~22 (lesson 5), and more in practice
# (the L2 cache serves many of the re-reads): the backward is compute-bound, so its speed is the speed of its five
# matrix products (2.5x the forward's two), which is why v3 runs them on tensor cores.
#
# ## Break it
#
# Three mistakes a first backward makes, in NumPy, each a switch with its prediction (a plain run tries them all;
# `python tutorials/07_backward_and_training.py --break no-row-term` runs up to that one and stops there):
#
#     --break no-row-term      dS = P ∘ dP, the softmax's row term D forgotten -> dK vs finite differences
#     --break first-of-group   dK of a KV head from its first query head only  -> the same check, about half off
#     --break lse-natural      P = exp2(S log2 e - lse) with lse in natural log  -> "P": the recomputed weights
#                                                                                 are wrong wherever lse != 0

# %%
def broken_backward(mistake):
    p = reference.softmax(reference.scores(q64, k64, causal=True))           # [1, 4, 3, 5]
    vr = reference.repeat_kv(v64, 4)                                          # [1, 4, 5, 8]
    dp = do64 @ vr.swapaxes(-1, -2)
    D = 0 if mistake == "D" else (do64 * (p @ vr)).sum(-1, keepdims=True)
    ds = p * (dp - D)
    dk = ds.swapaxes(-1, -2) @ q64 / np.sqrt(8)                               # [1, 4, 5, 8]: per query head
    return dk[:, ::2] if mistake == "group" else dk.reshape(1, 2, 2, 5, 8).sum(2)


def check_dk(dk):
    _lesson.close("dk vs finite differences", dk, finite_differences(loss64, k64), atol=1e-6, rtol=1e-5)


check_dk(broken_backward("none"))
_lesson.break_it("no-row-term", "dS = P ∘ dP, the softmax's row term D forgotten",
                 "dK differs from the finite differences: the gradient no longer sums to zero over each row",
                 "dk vs finite differences", lambda: check_dk(broken_backward("D")))
_lesson.break_it("first-of-group", "dK of a KV head taken from its first query head, not summed over the group",
                 "dK differs from the finite differences (the other query head's share is missing)",
                 "dk vs finite differences", lambda: check_dk(broken_backward("group")))
lse_nat = reference.log_sum_exp(reference.scores(q, k, causal=True))
_lesson.break_it("lse-natural", "P recomputed as exp2(S log2 e - lse): lse left in natural log, not times log2 e",
                 "the recomputed P is wrong wherever a row's lse is not 0", "P: ",
                 lambda: _lesson.close("P", np.exp2(s * reference.LOG2E - lse_nat[..., None]),
                                       np.exp(s - lse_nat[..., None]), atol=1e-6))

# %% [markdown]
# ## Training a miniature Llama
#
# Now the gradients of everything else. tinyllm/train.py is the Llama of lesson 6 written for training, in the
# shape of llm.c's train_gpt2.c: a forward that keeps each layer's activations, and one backward function per op,
# called in reverse. Its module docstring has each op's backward equation. The model: 2 layers, hidden size 64, 4
# query heads sharing 2 KV heads, an MLP of 172, and bytes as tokens (a vocabulary of 256: no vocabulary to learn).
# The data: 199 KB of Shakespeare (tutorials/data/README.md names the source). Here is the whole backward:

# %%
print(inspect.getsource(train.backward))
config = train.tiny_train_config()
weights = train.init_weights(config, np.random.default_rng(0))
text = train.read_text()
batches = train.Batches(text, seq=64, batch=8, rng=np.random.default_rng(1))
n_params = sum(x.size for x in train.tensors(weights))
print(f"{n_params:,} parameters; {len(text):,} bytes of text; batches of 8 x 64 bytes")

# The training forward is tinyllm's model: the same logits as Llama.forward on the same weights.
ids, targets = batches.next()
logits, _ = train.forward(weights, config, ids)
_lesson.close("training forward vs tinyllm's Llama.forward", logits, Llama(config, weights, backend="numpy").forward(ids),
              atol=1e-5)
PROMPT = "Shall I compare thee"


def sample(w, n=44):
    """The prompt and n sampled bytes (temperature 0.8), within the 64 positions the model is trained on."""
    model = Llama(config, w, backend="numpy")
    result = model.generate(list(PROMPT.encode()), max_new_tokens=n, temperature=0.8, seed=0)
    return PROMPT + train.decode(result.ids)


print("before training:", repr(sample(weights)))

# %% [markdown]
# Three hundred steps of *AdamW* (the optimiser: a step per weight scaled by running averages of its gradient and
# of the gradient's square, plus weight decay; lr 3e-3). Attention goes through numbattn both ways: on its NumPy
# path here on a laptop (the simulator would take minutes per step), on the kernels when there is a GPU.

# %%
TRAIN_BACKEND = "cuda" if BACKEND == "cuda" else "numpy"
STEPS = 300
t0 = time.perf_counter()
losses = train.train(weights, config, batches, steps=STEPS, lr=3e-3, attention_backend=TRAIN_BACKEND, every=0)
seconds = time.perf_counter() - t0
for step in range(0, STEPS, 50):
    print(f"step {step:3d}: loss {np.mean(losses[step:step + 10]):.3f}")
print(f"{STEPS} steps in {seconds:.1f} s ({TRAIN_BACKEND} attention); loss {losses[0]:.2f} -> "
      f"{np.mean(losses[-20:]):.2f} nats per byte (ln 256 = {np.log(256):.2f}: a uniform guess)")
print("after training: ", repr(sample(weights)))
if plt is not None:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(losses, lw=0.8, label="loss of each step")
    ax.plot(np.arange(19, STEPS), np.convolve(losses, np.ones(20) / 20, mode="valid"), lw=2,
            label="mean of the last 20 steps")
    ax.axhline(np.log(256), color="grey", ls=":", label="uniform over 256 bytes")
    ax.set(xlabel="step", ylabel="cross-entropy (nats per byte)", title="a 2-layer byte Llama on Shakespeare")
    ax.legend(fontsize=8)
    _lesson.save(fig, "07_loss_curve.png")
assert np.mean(losses[-20:]) < 2.7 < losses[0] - 2.5, \
    f"training did not learn: loss {losses[0]:.2f} -> {np.mean(losses[-20:]):.2f} (expected below 2.7)"

# %% [markdown]
# The same training step with attention on the kernels (the simulator here, the GPU there): forward v3 keeping
# lse, backward v3. One step's loss and every weight's gradient must match the NumPy path's, and then AdamW takes
# the step with the kernels' gradients: the loss of that batch falls.

# %%
small = train.Batches(text, seq=8, batch=1, rng=np.random.default_rng(2))
ids, targets = small.next()
result = {}
for be in ("numpy", BACKEND):
    logits, acts = train.forward(weights, config, ids, be)
    loss, dlogits = train.cross_entropy(logits, targets)
    result[be] = loss, train.backward(weights, config, acts, dlogits, be)
assert abs(result["numpy"][0] - result[BACKEND][0]) < 1e-5, (result["numpy"][0], result[BACKEND][0])
for g_np, g_k in zip(train.tensors(result["numpy"][1]), train.tensors(result[BACKEND][1])):
    _lesson.close(f"a weight's gradient, attention on {BACKEND} vs numpy", g_k, g_np,
                  atol=1e-5 * max(1e-3, np.abs(g_np).max()))
train.AdamW(weights, lr=3e-3).step(result[BACKEND][1])
after = train.cross_entropy(train.forward(weights, config, ids)[0], targets)[0]
print(f"attention on {BACKEND}: loss {result[BACKEND][0]:.4f} (numpy {result['numpy'][0]:.4f}), every gradient "
      f"equal to 1e-5; after a step with the kernels' gradients: {after:.4f}")
assert after < result[BACKEND][0], f"the step with the kernels' gradients did not lower the batch's loss: {after}"
print("lesson 7 checks passed")

# %% [markdown]
# ## Benchmark
#
# On a GPU: the backward against torch's memory-efficient fp32 SDPA backward (what a PyTorch user trains with in
# fp32) at TinyLlama's head shape. Without one the simulator's times would measure Python threads, so the numbers
# measured on the GPU machine are printed instead (BENCHMARKS.md), if they have been.

# %%
if BACKEND == "cuda":
    rows = bench.bench_backward((1024, 4096), versions=("v3", "v1"), repeat=5)
    print(bench.format_table(rows, ["impl", "n", "causal", "ms", "tflops"]))
else:
    try:
        _lesson.measured("## Attention backward", ["n", "numbattn v3", "torch SDPA mem-efficient fp32",
                                                    "v3 / mem-efficient"])
    except (LookupError, IndexError):
        print("not measured on a GPU yet: `python benchmarks/gpu_report.py --sections backward` writes the table")
