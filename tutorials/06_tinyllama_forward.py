"""
Lesson 6: the whole TinyLlama forward pass
==========================================

What you will learn
-------------------
* What a Llama model does around attention, one equation at a time: token embedding, RMSNorm, rotary
  position embeddings (RoPE), grouped-query attention (the kernels of lessons 2-5), the SwiGLU MLP,
  residual connections, and the output head that turns the last hidden vector into next-token logits.
* How a checkpoint is stored: safetensors (a JSON header + raw little-endian bytes), bfloat16 weights
  (the top 16 bits of a float32), Hugging Face's tensor names and [out, in] layout.
* How to verify a model: we build TinyLlama's miniature sibling (same files and layout, random weights,
  `tinyllm.make_tiny`) and compute its logits twice, with tinyllm (its NumPy engine in fp32, attention on
  numbattn's kernels)
  and with an independent fp64 implementation written in this lesson from the raw bytes of the checkpoint.
* A picture of one Llama block and the residual stream it reads and adds to (tutorials/out/06_llama_block.png),
  and what the check says when RoPE pairs the wrong elements.
* What changes in the other families (Llama 3, Mistral, Qwen2/3, Gemma 2/3): a table of their switches, made
  from their miniatures, and what a sliding window changes.
* How a GGUF file stores weights quantized: a Q8_0 block and a Q4_K super-block drawn byte by byte
  (tutorials/out/06_gguf_blocks.png), dequantized by your own kernel (exercise 6) and inside a GEMV kernel, and what
  fewer bytes a weight buy in decode speed.

Run it: `python tutorials/06_tinyllama_forward.py` (add `--exercise` to score your own code, `--break NAME`
to plant a mistake), or run the `# %%` cells in VS Code / Jupyter.
"""

# %%
import _setup  # noqa: F401  (must be the first import: GPU or simulator, see tutorials/README.md)

import inspect
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as GGML
from gguf.quants import dequantize, quantize
from numba import cuda

import _lesson
import numbattn
import solutions
import tinyllm
from numbattn import blocks, linear
from numbattn.kernels import blocks as kernel_blocks
from numbattn.lab import bench, tracing
from tests.gguf_files import quantize_q4_k      # gguf cannot quantize to Q4_K: the test suite's quantizer
from tinyllm.weights import SafetensorsFile, f32_to_bf16

BACKEND = numbattn.available_backends()[0]
print(f"engine: {_setup.ENGINE}; numbattn backend: {BACKEND}")
assert BACKEND in ("cuda", "sim"), "this lesson runs the kernels: it needs a GPU or NUMBA_ENABLE_CUDASIM=1"
plt = _lesson.pyplot()

# %% [markdown]
# ## A miniature TinyLlama
#
# TinyLlama-1.1B-Chat has 22 layers of hidden size 2048: 2.2 GB of weights, too much for a lesson that must
# run in seconds on a laptop in the simulator. `tinyllm.make_tiny(dir)` writes a checkpoint with exactly the
# same files, tensor names, dtypes and chat template, but 2 layers of hidden size 64, 4 query heads and
# 2 KV heads (head_dim 16), random weights. Every code path is the real one; only the sizes shrink.

# %%
workdir = tempfile.TemporaryDirectory()
model_dir = tinyllm.make_tiny(Path(workdir.name) / "tiny-llama", seed=0)
print("files:", sorted(p.name for p in model_dir.iterdir()))
cfg = json.loads((model_dir / "config.json").read_text())
print({k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "num_key_value_heads", "vocab_size", "rope_theta", "rms_norm_eps", "torch_dtype")})

# tinyllm's NumPy engine (tinyllm/engines/host.py: every op a line of NumPy or a small CPU kernel tested against
# one), with attention on the best numbattn backend (the GPU or the simulator); lesson 8 checks the all-kernel
# device engine against it
model = tinyllm.load_model(model_dir, engine="numpy")
prompt = "Hello world! How are you?"
ids = model.tokenizer.encode(prompt)
print(f"{prompt!r} -> {len(ids)} tokens:", [model.tokenizer.id_to_token(i) for i in ids])

# %% [markdown]
# ## Reading the checkpoint ourselves
#
# A *safetensors* file (Hugging Face's weight format) is 8 bytes of header length, a JSON header ({name:
# dtype, shape, byte offsets}) and
# the raw tensor bytes. tinyllm's reader (`SafetensorsFile`) validates the header and memory-maps the file;
# `.raw(name)` gives the stored bytes as an array without converting anything. The weights are bfloat16,
# which NumPy lacks, but a *bf16* (bfloat16) number is just the top 16 bits of a float32 (same sign and 8-bit exponent,
# 7 instead of 23 mantissa bits), so we widen it ourselves: shift the 16 bits up, reinterpret as float32.
# From here on this lesson uses none of tinyllm's model code, only these bytes and NumPy in float64.

# %%
st = SafetensorsFile(model_dir / "model.safetensors")
print(f"{len(st.tensors)} tensors, e.g.", {n: (t.dtype, t.shape) for n, t in list(st.tensors.items())[:3]})


def W(name):
    """A checkpoint tensor as float64, decoded from its raw bf16 bits here (not by tinyllm)."""
    bits = st.raw(name)
    assert st.tensors[name].dtype == "BF16", f"{name} is stored as {st.tensors[name].dtype}, not BF16"
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


dim, n_heads, n_kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
hd, eps, theta = dim // n_heads, cfg["rms_norm_eps"], cfg["rope_theta"]

# %% [markdown]
# ## Quantized weights: GGUF blocks, dequantized inside the matmul
#
# This checkpoint spends 16 bits on every weight. Decode reads every weight once per token, so its time is
# bytes / bandwidth (lesson 5): fewer bits a weight, faster decode. llama.cpp's *GGUF* files (its one-file format
# for a model's weights, vocabulary and settings) store a matrix row by row
# in *blocks*: a few fp16 scales and one small integer code c per weight, and each weight is an affine function of
# its code, w = a * c + b, with the factor a and offset b of its group. Two of the formats, byte by byte:
#
#     Q8_0: 32 weights in 34 bytes (8.5 bits a weight)
#         | d (fp16, 2 bytes) | c_0 c_1 ... c_31 (int8, 32 bytes) |             w_i = d * c_i
#
#     Q4_K: a super-block of 256 weights in 144 bytes (4.5 bits a weight), 8 groups of 32
#         | d (fp16) | dmin (fp16) | 12 bytes: sc_g, m_g (6 bits each, g = 0..7) | 128 bytes: 256 4-bit codes |
#         weight i of group g:  w = (d * sc_g) * c_i - (dmin * m_g)
#         (the codes come in 4 stripes of 64 weights, 32 bytes each: byte l of stripe j holds weight 64j + l in its
#          low nibble and weight 64j + 32 + l in its high one)
#
# Two scales per block in Q8_0's case, two levels of scales in Q4_K's (the fp16 d and dmin scale the 6-bit
# per-group sc and m): that second level is how the K-quants get to 4.5 bits with a scale per 32 weights.
# We quantize rows of the miniature's embedding table both ways (gguf's quantizer for Q8_0; for Q4_K, which gguf
# cannot write, the test suite's round-to-nearest one, tests/gguf_files.py), read the fields back, and dequantize.

# %%
table = W("model.embed_tokens.weight").astype(np.float32)                  # [vocab, 64] from the bf16 bits
row32 = table[5, :32]
q8 = quantize(row32[None], GGML.Q8_0)[0]                                     # 34 bytes
d8, c8 = q8[:2].view(np.float16)[0], q8[2:].view(np.int8)
print(f"Q8_0 block: {q8.nbytes} bytes; d = {float(d8):.3e}, codes {c8[:8].tolist()} ...")
_lesson.close("Q8_0: d * c vs gguf's dequantize", np.float32(d8) * c8, dequantize(q8[None], GGML.Q8_0)[0])
print(f"  largest |w - d*c| = {np.abs(row32 - np.float32(d8) * c8).max():.1e} (d / 2 = {float(d8) / 2:.1e}: "
      f"rounding to the nearest code)")

row256 = table[5:9].reshape(-1)                                              # 256 weights: one super-block
q4k = quantize_q4_k(row256[None])[0]                                         # 144 bytes
d, dmin = q4k[:4].view(np.float16).astype(np.float32)
sc, m = blocks.k4_scales(q4k[4:16])                                          # [8] each, 6-bit integers
codes = blocks.gguf_codes("q4_k", q4k[None, None])[0][0, 0].reshape(8, 32).astype(np.float32)   # weight order
print(f"Q4_K super-block: {q4k.nbytes} bytes; d = {d:.3e}, dmin = {dmin:.3e}, sc = {sc.astype(int).tolist()}, "
      f"m = {m.astype(int).tolist()}")


@cuda.jit
def dequantize_q4_k(q, d, dmin, sc, m, out):
    """EXERCISE 6. One Q4_K super-block's 256 weights, by one block of 32 threads. q [128] uint8: the codes, in 4
    stripes of 32 bytes (byte l of stripe j holds weight 64j + l in its low nibble, weight 64j + 32 + l in its
    high one); group g = weight // 32 has the factor d * sc[g] and the offset dmin * m[g] (sc, m [8]: its 6-bit
    scale and min as numbers): w = d * sc[g] * c - dmin * m[g] -> out [256]. Thread t takes byte t of each
    stripe. Budget per thread: 4 reads of q (each byte read once, both its codes used)."""
    pass    # <- replace this line with your kernel body, then run the lesson with --exercise


def run_dequantize(kernel):
    """-> (the kernel's 256 weights, the most reads of q by one thread, or None on a GPU)."""
    out = np.full(256, np.nan, np.float32)
    args = (q4k[16:].copy(), np.float32(d), np.float32(dmin), sc.astype(np.float32), m.astype(np.float32))
    if BACKEND != "sim":
        out_dev = cuda.to_device(out)
        kernel[1, 32](cuda.to_device(args[0]), *args[1:3], cuda.to_device(args[3]), cuda.to_device(args[4]), out_dev)
        return out_dev.copy_to_host(), None
    tracer = tracing.Tracer()
    tq, tsc, tm, tout = tracer.wrap(q=args[0], sc=args[3], m=args[4], out=out)
    kernel[1, 32](tq, args[1], args[2], tsc, tm, tout)
    return out, max(tracer.per_thread("q").values(), default=0)


want_q4k = dequantize(q4k[None], GGML.Q4_K)[0]


def score_dequantize(kernel):
    got, reads = run_dequantize(kernel)
    _lesson.check_exercise(6, "Q4_K super-block vs gguf's dequantize [weight]", got, want_q4k, rtol=1e-6, atol=1e-7)
    if reads is None:
        return "(reads are counted in the simulator only)"
    return _lesson.check_budget(6, "reads of q", reads, 4, "each byte holds two codes: read it once, use both")


_lesson.exercise(6, "a Q4_K super-block, dequantized by a kernel", dequantize_q4_k, solutions.dequantize_q4_k,
                 score_dequantize)
print(f"  largest |w - dequantized| = {np.abs(row256 - want_q4k).max():.1e} "
      f"(the weights are ~{np.abs(row256).mean():.1e})")

if plt:
    fig, axes = plt.subplots(2, 1, figsize=(9, 3.2))
    q4k_codes = [(f"codes: groups {2 * j}, {2 * j + 1}", 32, "tab:blue") for j in range(4)]   # a 64-weight stripe
    for ax, (name, fields) in zip(axes, [
            ("Q8_0: 32 weights in 34 bytes (8.5 bits a weight)", [("d", 2, "tab:orange"),
                                                                  ("32 int8 codes", 32, "tab:blue")]),
            ("Q4_K: 256 weights in 144 bytes (4.5 bits a weight)", [("d", 2, "tab:orange"), ("dmin", 2, "tab:red"),
                                                                    ("sc, m", 12, "tab:olive")]
             + q4k_codes)]):
        x = 0
        for i, (label, size, colour) in enumerate(fields):
            ax.barh(0, size, left=x, color=colour, alpha=0.35 + 0.15 * (i % 2), edgecolor="black")
            small = size < 8                   # d and dmin: labelled above and below the bar
            ax.text(x + size / 2, (0.55 if i % 2 else -0.55) if small else 0, f"{label}\n{size} B", ha="center",
                    va="center", fontsize=7)
            x += size
        ax.set(xlim=(0, 146), ylim=(-1, 1), yticks=[], title=name)
        ax.title.set_fontsize(9)
    axes[1].set_xlabel("byte")
    fig.tight_layout()
    _lesson.save(fig, "06_gguf_blocks.png")

# %% [markdown]
# ### Dequantized in a kernel
#
# Dequantizing a whole matrix to fp32 before multiplying (what tinyllm did with GGUF files before) reads the small
# blocks once and then the fp32 matrix every token: 4 bytes a weight again. The kernels instead read the blocks
# themselves and dequantize in registers, where each value is used. numbattn keeps a row as 8-byte words
# (numbattn/blocks.py: GGUF's bits, reordered so that one word holds 16 consecutive 4-bit codes of one group), and
# a GEMV lane turns a word into 16 floats and sums a * sum(c_i x_i) + b * sum(x_i): one FMA a weight, the group's
# two scales applied once per word. A code becomes a float without an int-to-float conversion (numbattn/kernels/
# blocks.py): its bits go under the exponent of 2^23, which makes the float 2^23 + c exactly.

# %%
print(inspect.getsource(kernel_blocks.code_value))
w_rows = table[:32].reshape(8, 256)                                          # 8 rows of one super-block each
q4k_rows = quantize_q4_k(w_rows)
words = blocks.pack("q4_k", q4k_rows, 256)                                   # [8, 18] uint64: 144 bytes a row
x_tok = np.random.default_rng(2).standard_normal((1, 256)).astype(np.float32)
y = cuda.to_device(np.full((1, 8), np.nan, np.float32))
linear.linear(cuda.to_device(x_tok), cuda.to_device(words), "q4_k", y)        # the GEMV on the blocks
want_y = x_tok.astype(np.float64) @ dequantize(q4k_rows, GGML.Q4_K).astype(np.float64).T
_lesson.close("Q4_K GEMV kernel vs x @ dequantize(W).T in fp64", y.copy_to_host(), want_y,
              rtol=1e-5, atol=1e-5 * np.abs(want_y).max(), got_label="kernel", want_label="fp64")
print(f"Q4_K GEMV on {BACKEND}: {words.nbytes} bytes of weights for {w_rows.size} weights, matches fp64")

# %% [markdown]
# ### What it buys
#
# Bytes a weight (a row of 2048, as TinyLlama's, padding included), and what that means for decode, which reads
# all of TinyLlama's 1.1B weights every token: at the H100's ~3.35 TB/s the bound is bytes / bandwidth (a bound,
# computed here, not measured). The measured numbers follow. On a CPU the bytes are not the whole story: turning
# codes into floats costs arithmetic a weight, and a CPU has far less of it than a GPU. So the CPU kernels
# (numbattn/cpu_linear.py) do what llama.cpp does: they round x to int8 too (a scale per 32 values) and multiply
# codes by x as bytes, 64 products an instruction where the CPU has VNNI (numbattn/kernels/cpu_dot.py), with the
# scales applied once per group. The logits move by a few percent of their largest for it (SmolLM2: 4%), and
# decode runs ~3.3x the fp32 form's speed, ~0.8x llama.cpp's, on this machine.

# %%
n_weights = 1.1e9
rows = [dict(format=k, bits_per_weight=8 * blocks.bytes_per_weight(k, 2048),
             TinyLlama_GB=n_weights * blocks.bytes_per_weight(k, 2048) / 1e9,
             decode_bound_tok_s=3.35e12 / (n_weights * blocks.bytes_per_weight(k, 2048)))
        for k in ("f32", "bf16", "q8_0", "q6_k", "q4_k")]
print(bench.format_table(rows, list(rows[0])))
cpu_rows = _lesson.benchmarks_table("### CPU: GGUF blocks")
print("measured on a shared 2-core CPU machine (BENCHMARKS.md, CPU: GGUF blocks): SmolLM2-135M Q4_1, the same file "
      "dequantized to fp32 (how tinyllm ran it before), kept as blocks (int8 activations), and llama.cpp on it, "
      "decode and a 41-token prompt:")
print(bench.format_table(cpu_rows, ["weights", "token_MB", "prefill_tok_s", "decode_tok_s"]))
if BACKEND == "cuda":
    rng = np.random.default_rng(3)
    x_dev = cuda.to_device(rng.standard_normal((1, 2048)).astype(np.float32))
    out_dev = cuda.device_array((1, 5632), np.float32)
    big = rng.standard_normal((5632, 2048)).astype(np.float32)
    gemv_rows = []
    for fmt, (w_words, kind) in {"bf16": linear.pack_weight(f32_to_bf16(big)),
                                 "q8_0": (blocks.pack("q8_0", quantize(big, GGML.Q8_0), 2048), "q8_0"),
                                 "q4_k": (blocks.pack("q4_k", quantize_q4_k(big), 2048), "q4_k")}.items():
        w_dev = cuda.to_device(w_words)
        ms = bench.timed(lambda: linear.linear(x_dev, w_dev, kind, out_dev), "cuda")
        gemv_rows.append(dict(format=fmt, MB=w_words.nbytes / 1e6, ms=ms, GB_per_s=w_words.nbytes / ms / 1e6))
    print("one GEMV, 5632 x 2048 (TinyLlama's up projection), 1 token, on this GPU:")
    print(bench.format_table(gemv_rows, list(gemv_rows[0])))

# %% [markdown]
# ## The residual stream, and one block
#
# Each token's hidden vector x (hidden_size numbers, from the embedding table) travels up through the layers
# and is never replaced, only added to: every block reads it through a norm, computes something, and adds
# the result back, x = x + f(norm(x)). That running vector is the *residual stream*. A Llama block does this
# twice, once with attention (which mixes information between tokens) and once with an MLP (which works on
# each token alone); after the last block a final norm and the output head turn x into logits. The picture
# shows one block with the miniature's sizes.

# %%
if plt:
    from matplotlib.patches import FancyBboxPatch
    fig, ax = plt.subplots(figsize=(8.5, 6.5))
    ax.set(xlim=(0, 11.2), ylim=(0, 13))                # the dashed block and the widest label stay inside
    ax.axis("off")
    ax.annotate("", xy=(2, 12.6), xytext=(2, 0.4), arrowprops=dict(arrowstyle="->", lw=3, color="tab:blue"))
    ax.text(1.6, 6.5, f"residual stream x  [tokens, {dim}]", rotation=90, va="center", ha="center",
            color="tab:blue")
    boxes = [(1.0, "embedding lookup: token ids -> x", "tab:gray"),
             (3.0, f"RMSNorm -> q, k, v projections ({n_heads} / {n_kv} / {n_kv} heads of {hd})\n"
                   f"-> RoPE on q, k -> causal GQA attention (numbattn) -> o projection", "tab:orange"),
             (6.5, f"RMSNorm -> SwiGLU MLP ({dim} -> {cfg['intermediate_size']} -> {dim})", "tab:green"),
             (10.0, f"final RMSNorm -> output head -> logits [tokens, {cfg['vocab_size']}]", "tab:gray")]
    for y, label, colour in boxes:
        ax.add_patch(FancyBboxPatch((3.2, y - 0.6), 7.4, 1.2, boxstyle="round,pad=0.1", fc=colour, alpha=0.25))
        ax.text(6.9, y, label, ha="center", va="center", fontsize=8)
    for y_out, y_in in ((3.0, 5.0), (6.5, 8.5)):      # read x through a norm, add the result back at (+)
        ax.annotate("", xy=(3.2, y_out), xytext=(2.05, y_out - 0.9), arrowprops=dict(arrowstyle="->"))
        ax.annotate("", xy=(2.05, y_in), xytext=(6.45, y_out + 0.7), arrowprops=dict(arrowstyle="->"))
        ax.text(2, y_in, "+", ha="center", va="center", fontsize=16, fontweight="bold")
    ax.annotate("", xy=(2.05, 1.0), xytext=(3.2, 1.0), arrowprops=dict(arrowstyle="->"))    # x starts here
    ax.annotate("", xy=(3.2, 10.0), xytext=(2.05, 10.0), arrowprops=dict(arrowstyle="->"))  # and ends here
    ax.add_patch(FancyBboxPatch((2.6, 1.9), 8.3, 7.3, boxstyle="round,pad=0.1", fill=False, ls="--"))
    ax.text(10.8, 2.0, f"one block, x {cfg['num_hidden_layers']} here (22 in TinyLlama)", ha="right", fontsize=8)
    _lesson.save(fig, "06_llama_block.png")

# %% [markdown]
# ## RMSNorm
#
# Before each half of every block (and once at the end) the hidden vector is normalised by *RMSNorm*: divided by its
# root-mean-square, then multiplied by a learned per-channel weight. Unlike LayerNorm there is no mean
# subtraction and no bias; it only fixes the scale, which is what keeps the *residual stream* (the vector each
# layer reads and adds its result back to) stable through
# many layers of additions.
#
#     rmsnorm(x) = x / sqrt(mean(x²) + eps) * weight

# %%
def rmsnorm(x, weight):
    return x / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + eps) * weight


x_demo = np.random.default_rng(0).standard_normal((3, dim)) * [[0.1], [1.0], [30.0]]    # very different scales
print("RMS of 3 rows before:", np.round(np.sqrt((x_demo ** 2).mean(-1)), 3),
      " after (weight 1):", np.round(np.sqrt((rmsnorm(x_demo, 1.0) ** 2).mean(-1)), 3))
_lesson.close("RMS of each row after rmsnorm", np.sqrt((rmsnorm(x_demo, 1.0) ** 2).mean(-1)), 1.0, atol=1e-3)

# %% [markdown]
# ## RoPE: positions as rotations
#
# Attention itself ignores order (it is a weighted sum). Llama injects position by *rotating* each query
# (*RoPE*, rotary position embedding)
# and key: the head's d numbers are read as d/2 pairs, and pair i at position p is rotated by the angle
# p · theta^(-2i/d). Early pairs spin fast, late pairs slowly. Because a rotation by angle a of q and by
# angle b of k leaves a dot product that depends only on a - b, the score q_p · k_r depends on the content
# and on the *relative* position p - r. Hugging Face's layout pairs element i with element i + d/2 (the
# "rotate half" convention), not neighbours. Writing a pair as the complex number x_i + i·x_{i+d/2}, the
# rotation is one complex multiplication:

# %%
def rope(x, positions):
    """x [..., seq, hd] -> rotated, pair (i, i + hd/2) of position p by p * theta^(-2i/hd)."""
    half = x.shape[-1] // 2
    angles = np.outer(positions, theta ** (-np.arange(half) * 2 / x.shape[-1]))     # [seq, hd/2]
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angles)
    return np.concatenate([z.real, z.imag], axis=-1)


rng = np.random.default_rng(1)
qv, kv = rng.standard_normal(hd), rng.standard_normal(hd)


def score(p, r):
    """q at position p . k at position r, both rotated."""
    return rope(qv[None], [p])[0] @ rope(kv[None], [r])[0]


print(f"q at 5 . k at 3 = {score(5, 3):.6f};  q at 12 . k at 10 = {score(12, 10):.6f};  "
      f"q at 5 . k at 4 = {score(5, 4):.6f}")
_lesson.close("score(5, 3) vs score(12, 10): same distance, same score", score(5, 3), score(12, 10), rtol=1e-9)
assert not np.isclose(score(5, 3), score(5, 4)), f"distance 2 and 1 gave the same score {score(5, 3):.6f}"
_lesson.close("length of q after rotation vs before", np.linalg.norm(rope(qv[None], [7])), np.linalg.norm(qv),
              rtol=1e-12)

# %% [markdown]
# ## Attention with grouped-query heads, and the SwiGLU MLP
#
# The attention of lessons 1-4, written plainly: q has n_heads heads, k and v have n_kv (here 4 and 2), and
# query head h reads KV head h // (n_heads / n_kv). Causal mask, softmax in float64.
#
# The MLP is *SwiGLU*: two projections up to the intermediate size, one passed through SiLU (x·sigmoid(x)) and
# used as a gate on the other, then a projection back down:
#
#     mlp(x) = (silu(x W_gate^T) * (x W_up^T)) W_down^T
#
# Hugging Face stores a linear layer's weight as [out_features, in_features], hence the transposes.

# %%
def attention(q, k, v, causal=True, kv_head=lambda h, group, n_kv: h // group):
    """q [n_heads, s, hd], k, v [n_kv, s, hd] -> [n_heads, s, hd]; causal; query head h reads kv head h // group.
    (causal=False and kv_head are the break-it cell's mistakes.)"""
    group, s = q.shape[0] // k.shape[0], q.shape[1]
    out = np.empty_like(q)
    future = np.triu(np.ones((s, s), bool), k=1 if causal else s)
    for h in range(q.shape[0]):
        hk = kv_head(h, group, k.shape[0])
        scores = q[h] @ k[hk].T / np.sqrt(q.shape[-1])
        scores[future] = -np.inf
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out[h] = (p / p.sum(axis=-1, keepdims=True)) @ v[hk]
    return out


def swiglu(x, layer):
    gate = x @ W(f"{layer}mlp.gate_proj.weight").T
    up = x @ W(f"{layer}mlp.up_proj.weight").T
    return (gate / (1 + np.exp(-gate)) * up) @ W(f"{layer}mlp.down_proj.weight").T


# %% [markdown]
# ## The forward pass
#
# Embedding lookup, then for each layer a pre-norm attention half and a pre-norm MLP half, each added back
# to the residual stream; a final norm; the output head. The logits of position t score every vocabulary
# entry as the token at t + 1.

# %%
def forward_fp64(token_ids, rotate=rope, attend=attention, residual=True):
    """token ids [s] -> logits [s, vocab]; `rotate` is the position embedding (the break-it cell swaps it, and
    attend and residual)."""
    s = len(token_ids)
    x = W("model.embed_tokens.weight")[token_ids]                            # [s, dim]
    for i in range(cfg["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        h = rmsnorm(x, W(layer + "input_layernorm.weight"))
        q = (h @ W(layer + "self_attn.q_proj.weight").T).reshape(s, n_heads, hd).transpose(1, 0, 2)
        k = (h @ W(layer + "self_attn.k_proj.weight").T).reshape(s, n_kv, hd).transpose(1, 0, 2)
        v = (h @ W(layer + "self_attn.v_proj.weight").T).reshape(s, n_kv, hd).transpose(1, 0, 2)
        q, k = rotate(q, np.arange(s)), rotate(k, np.arange(s))
        a = attend(q, k, v).transpose(1, 0, 2).reshape(s, n_heads * hd)      # heads back side by side
        x = (x if residual else 0) + a @ W(layer + "self_attn.o_proj.weight").T
        x = x + swiglu(rmsnorm(x, W(layer + "post_attention_layernorm.weight")), layer)
    x = rmsnorm(x, W("model.norm.weight"))
    head = W("model.embed_tokens.weight") if cfg["tie_word_embeddings"] else W("lm_head.weight")
    return x @ head.T                                                        # [s, vocab]


t0 = time.perf_counter()
ours = forward_fp64(ids)
t1 = time.perf_counter()
theirs = model.forward(np.array([ids]))[0]                                   # tinyllm: fp32, numbattn kernels
t2 = time.perf_counter()
print(f"fp64 lesson forward: {t1 - t0:.2f} s;  tinyllm forward on {BACKEND}: {t2 - t1:.2f} s")
err = np.abs(ours - theirs).max()
print(f"logits: shape {theirs.shape}, spread (std) {ours.std():.2f}, max |tinyllm - fp64| = {err:.1e}")
print("next-token argmax per position, fp64   :", ours.argmax(-1).tolist())
print("next-token argmax per position, tinyllm:", theirs.argmax(-1).tolist())

# %% [markdown]
# ## Correctness check
#
# tinyllm (float32 matmuls, bf16 weights widened by its own reader, attention in numbattn's prefill kernel)
# must match the fp64 lesson implementation to float32 rounding, and agree on every position's most likely
# next token. Then decoding with the KV cache (lesson 5) at the model level: prefill all but the last
# token, feed the last one alone (decode kernel), and get the same last-position logits.

# %%
def likely_cause(fp64_logits):
    """Which positions differ says where to look: position 0 has no rotation (RoPE's angle is 0) and sees only
    itself (the mask changes nothing there)."""
    tol = 1e-3 * np.abs(fp64_logits).max()
    bad = [t for t in range(len(fp64_logits)) if np.abs(theirs[t] - fp64_logits[t]).max() > tol]
    if bad and bad[0] > 0:
        return f"positions {bad} differ, position 0 agrees: likely cause: something that depends on the position " \
               f"(RoPE's pairing or angles, the causal mask)"
    return f"positions {bad} differ, position 0 too: likely cause: something every position shares (a weight or " \
           f"its transpose, the residual, a norm, the GQA mapping)"


def check_logits(fp64_logits):
    try:
        _lesson.close("tinyllm logits vs the fp64 forward [position, vocab]", theirs, fp64_logits,
                      atol=1e-3 * np.abs(fp64_logits).max(), got_label="tinyllm", want_label="fp64")
    except AssertionError as e:
        raise AssertionError(f"{e}\n    {likely_cause(fp64_logits)}") from None
    _lesson.close("most likely next token per position", theirs.argmax(-1), fp64_logits.argmax(-1),
                  got_label="tinyllm", want_label="fp64")


check_logits(ours)

model.reset()
model.forward(np.array([ids[:-1]]))                                           # prefill, cache holds n-1 tokens
step = model.forward(np.array([ids[-1:]]), start_pos=len(ids) - 1)[0, -1]    # one token: the decode kernel
err = _lesson.close("decode step vs full forward, last position's logits", step, ours[-1],
                    atol=1e-3 * np.abs(ours).max(), got_label="decode step", want_label="fp64 forward")
print(f"decode step vs full forward, last position: max |diff| = {err:.1e}")
print("lesson 6 checks passed")

# %% [markdown]
# ## Break it
#
# RoPE has two conventions for which elements form a pair: Hugging Face's "rotate half" (i with i + d/2,
# used by this checkpoint) and the original paper's neighbours (2i with 2i + 1). Both are rotations, both
# keep lengths and relative positions, and a model trained with one gives garbage with the other. The check
# above catches the wrong one at once. Each switch plants one mistake in forward_fp64 (a plain run tries them
# all; `python tutorials/06_tinyllama_forward.py --break no-causal-mask` runs up to that one and stops):
#
#     --break rope-neighbours   RoPE pairs (2i, 2i + 1)                     -> "tinyllm logits vs the fp64 forward"
#     --break no-residual       x = a @ W_o (the residual stream dropped)   -> the same check
#     --break gqa-modulo        query head h reads KV head h % n_kv         -> the same check
#     --break nibbles-swapped   exercise 6 with a byte's nibbles swapped      -> the weights differ from gguf's
#     --break byte-twice        exercise 6 reading each byte twice          -> right weights, over the read budget
#     --break no-causal-mask    every position sees the future              -> EVERY position differs, the last
#                                                                              too: in layer 1 it saw everything
#                                                                              anyway, but from layer 2 on its keys
#                                                                              and values come from the earlier
#                                                                              positions, which did change

# %%
def rope_neighbours(x, positions):
    """RoPE with pairs (2i, 2i + 1): the other convention, wrong for this checkpoint."""
    half = x.shape[-1] // 2
    angles = np.outer(positions, theta ** (-np.arange(half) * 2 / x.shape[-1]))
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles)
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


def differing_positions(fp64_logits):
    """Check every position's logits on its own -> the failure names the positions that differ."""
    bad = [t for t in range(len(ids)) if np.abs(theirs[t] - fp64_logits[t]).max() > 1e-3 * np.abs(fp64_logits).max()]
    _lesson.close(f"positions whose logits differ (of {len(ids)}): {bad}", len(bad), 0)


_lesson.break_it("rope-neighbours", "RoPE pairs neighbours (2i, 2i + 1) instead of (i, i + d/2)",
                 "the logits differ everywhere but at position 0 (no rotation there): the check names RoPE",
                 "position 0 agrees: likely cause: something that depends on the position",
                 lambda: check_logits(forward_fp64(ids, rotate=rope_neighbours)))
_lesson.break_it("no-residual", "the attention half replaces the residual stream instead of adding to it",
                 "the logits differ at every position, position 0 too", "position 0 too: likely cause: something "
                 "every position shares", lambda: check_logits(forward_fp64(ids, residual=False)))
_lesson.break_it("gqa-modulo", "query head h reads KV head h % n_kv", "the logits differ",
                 "tinyllm logits vs the fp64 forward", lambda: check_logits(forward_fp64(
                     ids, attend=lambda q, k, v: attention(q, k, v, kv_head=lambda h, group, n_kv: h % n_kv))))
_lesson.break_it("no-causal-mask", "attention without the causal mask",
                 f"every one of the {len(ids)} positions differs, the last one too (it differs from layer 2 on)",
                 f"positions whose logits differ (of {len(ids)}): {list(range(len(ids)))}",
                 lambda: differing_positions(forward_fp64(
                     ids, attend=lambda q, k, v: attention(q, k, v, causal=False))))


@cuda.jit
def dequantize_nibbles_swapped(q, d, dmin, sc, m, out):
    t = cuda.threadIdx.x
    for j in range(4):
        byte = q[32 * j + t]
        out[64 * j + t] = d * sc[2 * j] * (byte >> 4) - dmin * m[2 * j]            # the high nibble first
        out[64 * j + 32 + t] = d * sc[2 * j + 1] * (byte & 15) - dmin * m[2 * j + 1]


@cuda.jit
def dequantize_byte_twice(q, d, dmin, sc, m, out):
    t = cuda.threadIdx.x
    for j in range(4):
        out[64 * j + t] = d * sc[2 * j] * (q[32 * j + t] & 15) - dmin * m[2 * j]
        out[64 * j + 32 + t] = d * sc[2 * j + 1] * (q[32 * j + t] >> 4) - dmin * m[2 * j + 1]


_lesson.break_it("nibbles-swapped", "exercise 6's kernel takes a byte's high nibble as weight 64j + t",
                 "every weight whose byte's two codes differ comes out wrong", "Q4_K super-block vs gguf's dequantize",
                 lambda: score_dequantize(dequantize_nibbles_swapped))
_lesson.break_it("byte-twice", "exercise 6's kernel reads each byte once per code",
                 "the right weights, 8 reads of q per thread: over the budget of 4",
                 "reads of q): the kernel made 8 per thread, the budget is 4",
                 lambda: score_dequantize(dequantize_byte_twice), simulator_only=True)

# %% [markdown]
# ## Other families: the same block, a few switches
#
# Llama 3, Mistral, Qwen2/2.5, Qwen3 and Gemma 2/3 are this block with a few named changes, which tinyllm keeps as
# data: `tinyllm/architecture.py` makes one description from each config (`model.arch`) and the forward above
# reads its switches. The table below is made from each family's miniature (`make_tiny(dir, family=...)`, their
# config.json as transformers writes it):
#
# * norm: Gemma's RMSNorm multiplies by (1 + w), and Gemma normalises the attention's and the MLP's outputs too
#   before adding them to x ("sandwich": four norms per block);
# * q/k: Qwen2 adds biases to q, k and v; Qwen3 and Gemma 3 RMS-normalise each head of q and k before RoPE;
# * MLP: Gemma's gate is GELU (tanh form), not SiLU; its embeddings are scaled by sqrt(hidden) and its scores by
#   query_pre_attn_scalar ** -0.5;
# * windows: Mistral, Gemma 2 (every other layer) and Gemma 3 (five layers of six) let a token see only itself
#   and the window - 1 tokens before it; Gemma 3's window layers have their own RoPE base;
# * RoPE: Llama 3.1/3.2 rescale each pair's frequency (slow pairs by 8 to 32x: a longer context);
# * caps: Gemma 2 squeezes scores and logits through cap * tanh(x / cap).

# %%
families = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
family_models = {f: tinyllm.load_model(tinyllm.make_tiny(Path(workdir.name) / f, seed=0, family=f), backend="numpy")
                 for f in families}
rows = []
for f, m in family_models.items():
    a = m.arch
    windows = [spec.window for spec in a.layers]
    rows.append(dict(family=f, norm="x*(1+w)" if a.norm_offset else "x*w", norms=4 if a.sandwich_norms else 2,
                     qkv_bias="yes" if a.qkv_bias else "-", qk_norm="yes" if a.qk_norm else "-",
                     mlp="GeGLU" if a.activation == "gelu_tanh" else "SwiGLU", embed_x=f"{a.embed_scale:.3g}",
                     window=f"{max((w for w in windows if w), default=0)} on {sum(map(bool, windows))}/{len(windows)}",
                     rope=a.rope_scaling + (" +local" if any(s.rope == "local" for s in a.layers) else ""),
                     caps=f"{a.attn_softcap}/{a.final_softcap}" if a.attn_softcap else "-"))
print(bench.format_table(rows, list(rows[0])))

# %% [markdown]
# What a window does, on Mistral's miniature (windows of 4 tokens on every layer): the same model without its
# window sees more context. The first 4 positions cannot tell the two apart (nothing is outside a window yet);
# every later position can. (On Gemma 3 the comparison would also change RoPE: its window layers have their own
# base.)

# %%
mistral = family_models["mistral"]
no_window = tinyllm.load_model(tinyllm.make_tiny(Path(workdir.name) / "mistral-full", seed=0, family="mistral",
                                                 sliding_window=None), backend="numpy")
mids = np.array([np.random.default_rng(6).integers(3, 500, 10)])
windowed, unwindowed = mistral.forward(mids)[0], no_window.forward(mids)[0]
_lesson.close("positions 0-3: with and without the window", windowed[:4], unwindowed[:4],
              atol=1e-4 * np.abs(unwindowed).max(), got_label="window 4", want_label="no window")
print(f"positions 4-9: largest difference {np.abs(windowed[4:] - unwindowed[4:]).max():.2f}")
assert np.abs(windowed[4:] - unwindowed[4:]).max() > 1e-2

# %% [markdown]
# ## Benchmark
#
# The forward above is written once and runs on two engines (tinyllm/engines/): the NumPy engine, every op
# a line of NumPy or a CPU kernel tested against one (what this lesson checked), and, on a GPU, the device engine: the same forward with every op
# a numbattn kernel and the weights resident on the GPU. On a GPU we build a random model of TinyLlama's real
# width (hidden 2048, 32/4 heads, MLP 5632, vocabulary 32000) but only 2 layers, and time a prefill at a few
# prompt lengths plus one decode step on both engines. Without a GPU the same code runs on the miniature model
# at tiny lengths, on the NumPy engine.

# %%
def time_forward(model_path, seq_lens, backends, repeat):
    rows = []
    for be in backends:
        m = tinyllm.load_model(model_path, backend=be)
        vocab = m.config.vocab_size
        for n in seq_lens:
            prompt_ids = np.random.default_rng(n).integers(3, min(vocab, 512), size=(1, n))
            prefill_ms = bench.timed(lambda: m.forward(prompt_ids), "host", warmup=1, repeat=repeat)
            token = prompt_ids[:, -1:]
            decode_ms = bench.timed(lambda: m.forward(token, start_pos=n), "host", warmup=1, repeat=repeat)
            rows.append(dict(backend=be, prompt=n, prefill_ms=prefill_ms, prefill_tok_per_s=n / prefill_ms * 1e3,
                             decode_ms=decode_ms))
    return rows


columns = ["backend", "prompt", "prefill_ms", "prefill_tok_per_s", "decode_ms"]
if BACKEND == "cuda":
    wide = tinyllm.make_tiny(Path(workdir.name) / "wide", seed=0, hidden_size=2048, intermediate_size=5632,
                             num_attention_heads=32, num_key_value_heads=4, num_hidden_layers=2,
                             vocab_size=32000, max_position_embeddings=2048)
    print("TinyLlama width, 2 of 22 layers, batch 1 (cuda: the device engine; numpy: the NumPy engine):")
    print(bench.format_table(time_forward(wide, (128, 512, 1024), ("cuda", "numpy"), repeat=3), columns))
else:
    print("the simulator's times measure Python threads; the whole TinyLlama-1.1B shape, measured on the GPU "
          "machine (both engines, and Hugging Face transformers for comparison):")
    _lesson.measured("## End to end", ["impl", "prompt", "prefill_ms", "decode_ms", "decode_tok_s"],
                     plot="model.png")
    print("the miniature here, attention in NumPy (a CPU timing of this machine):")
    print(bench.format_table(time_forward(model_dir, (8,), ("numpy",), repeat=3), columns))
workdir.cleanup()
