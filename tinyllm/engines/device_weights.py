"""The checkpoint on the GPU, uploaded once, laid out as the kernels read it.

Matrices become rows of uint64 words, in the form `weights` asks for:

    "as-stored" (the default)  what the file holds: bf16 and fp16 bits, fp32, or a GGUF file's quantized blocks
                               (numbattn/blocks.py: the file's bytes, dequantized inside the kernels); only block
                               types without a kernel (Q2_K, Q3_K) are dequantized, to fp32
    "bf16"                     every matrix rounded to bf16 (a quantized one dequantized first)
    "fp32"                     every matrix dequantized or widened to fp32 (what a GGUF file cost before: 4 bytes a
                               weight)

q, k and v rows are stacked into one matrix (one matmul for all three, and their biases, if any, into one vector)
and gate and up rows interleaved (the SwiGLU and GeGLU epilogues see each pair side by side). Parts stored in
different forms (a Q4_K_M file's Q6_K attn_v next to Q4_K q and k) cannot share one matrix: q/k/v then stay separate
parts, each its own matmul (gate/up are widened to fp32). Norm weights stay float32 vectors, holding the factor
RMSNorm applies (Gemma's 1 + w).
"""
import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("tinyllm")
WEIGHTS = ("as-stored", "bf16", "fp32")


@dataclass
class DeviceLayer:
    """One block's weights on the device: norms fp32, matrices as uint64 words (numbattn.linear.pack_weight)."""
    attn_norm: object
    w_qkv: tuple          # (words, kind): q, k and v rows stacked: one matmul for all three (or a list of parts)
    wo: tuple
    ffn_norm: object
    w_gate_up: tuple      # gate and up rows interleaved (2f = gate_f, 2f+1 = up_f): the SwiGLU epilogue
    w_down: tuple
    b_qkv: object = None            # q, k and v biases stacked (Qwen2)
    q_norm: object = None           # per-head RMSNorm weights [head_dim] (Qwen3, Gemma 3)
    k_norm: object = None
    post_attn_norm: object = None   # the sandwich norms (Gemma)
    post_ffn_norm: object = None


@dataclass
class DeviceWeights:
    embed: tuple          # [vocab, dim] as words: rows are looked up (and, tied, the output head)
    layers: list
    norm: object
    lm_head: tuple
    nbytes: int
    kinds: tuple          # the weight kinds present, e.g. ("bf16",) or ("q4_k", "q6_k")
    token_bytes: int = 0  # bytes of weights read per token: every matrix, one row of the embedding table


def check_weights(weights):
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: expected one of {', '.join(map(repr, WEIGHTS))}")


def stored(ckpt, name, weights="as-stored"):
    """A checkpoint matrix [N, K] as the GPU should hold it -> (uint64 words [N, row words], kind): module docstring."""
    from numbattn import blocks
    from numbattn.linear import pack_weight

    from ..weights import f32_to_bf16
    dtype = ckpt.stored_dtype(name)
    kind = blocks.KIND_OF_GGML.get(dtype)
    if weights == "as-stored" and kind in blocks.BLOCK_KINDS and kind in DEVICE_BLOCK_KINDS:
        return blocks.pack(kind, ckpt.blocks(name), ckpt.shapes[name][1]), kind
    if weights == "as-stored" and dtype in ("BF16", "F16"):
        return pack_weight(np.asarray(ckpt.raw(name)))
    if weights == "bf16":
        return pack_weight(np.asarray(ckpt.raw(name)) if dtype == "BF16" else f32_to_bf16(ckpt.get(name)))
    return pack_weight(np.asarray(ckpt.get(name), np.float32))


DEVICE_BLOCK_KINDS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")


def fuse_rows(parts, interleave=False):
    """Matrices (words [n_i, W], kind) of one kind -> one (stacked, or rows interleaved); parts of different kinds
    stay a list of parts (the caller widens gate/up to one kind first)."""
    if len({kind for _, kind in parts}) > 1:
        log.info("tinyllm: q/k/v stored as %s: kept as separate matmuls", "/".join(k for _, k in parts))
        return list(parts)
    words = [w for w, _ in parts]
    if interleave:
        out = np.empty((sum(w.shape[0] for w in words), words[0].shape[1]), np.uint64)
        for i, w in enumerate(words):
            out[i::len(words)] = w
        return out, parts[0][1]
    return np.concatenate(words, axis=0), parts[0][1]


def upload_weights(ckpt, config, stream=0, progress=None, weights="as-stored"):
    """The checkpoint's tensors (checked against config by the caller) -> DeviceWeights, each tensor read once
    from the file (memory-mapped) and copied to the GPU once, matrices in the form `weights` asks for."""
    from numba import cuda

    from ..architecture import describe
    from ..weights import NORMS, expected_shapes, layer_tensors
    check_weights(weights)
    names, done, offset = list(expected_shapes(config)), [0], np.float32(describe(config).norm_offset)
    kinds, total = set(), [0]

    def tick(n=1):
        done[0] += n
        if progress is not None:
            progress(min(done[0], len(names)), len(names), "")

    def matrix(host):
        if isinstance(host, list):                  # parts of different kinds
            return [matrix(part) for part in host]
        words, kind = host
        kinds.add(kind)
        total[0] += words.nbytes
        return cuda.to_device(np.ascontiguousarray(words), stream=stream), kind

    def stored_as(name):
        return stored(ckpt, name, weights)

    def vector(*parts, norm=False):
        tick(len(parts))
        x = np.concatenate([np.asarray(ckpt.get(name), np.float32) for name in parts])
        x = np.ascontiguousarray(x + offset if norm and offset else x)
        total[0] += x.nbytes
        return cuda.to_device(x, stream=stream)

    embed = matrix(stored_as("model.embed_tokens.weight"))
    tick()
    layers = []
    for i in range(config.num_hidden_layers):
        t = {field: f"model.layers.{i}.{name}" for field, (name, _) in layer_tensors(config).items()}
        optional = {field: vector(t[field], norm=True) for field in NORMS if field in t and field != "ffn_norm"
                    and field != "attn_norm"}
        if "bq" in t:
            optional["b_qkv"] = vector(t["bq"], t["bk"], t["bv"])
        layers.append(DeviceLayer(
            attn_norm=vector(t["attn_norm"], norm=True),
            w_qkv=matrix(fuse_rows([stored_as(t[f]) for f in ("wq", "wk", "wv")])),
            wo=matrix(stored_as(t["wo"])),
            ffn_norm=vector(t["ffn_norm"], norm=True),
            w_gate_up=matrix(gate_up(ckpt, t, weights)),
            w_down=matrix(stored_as(t["w_down"])), **optional))
        tick(7)
    norm = vector("model.norm.weight", norm=True)
    lm_head = embed if config.tie_word_embeddings else matrix(stored_as("lm_head.weight"))
    tick(len(names))
    return DeviceWeights(embed, layers, norm, lm_head, total[0], tuple(sorted(kinds)),
                         read_per_token(total[0], embed, lm_head))


def gate_up(ckpt, t, weights):
    """A layer's gate and up matrices, rows interleaved (one kind: widened to fp32 if they are stored apart)."""
    parts = [stored(ckpt, t["w_gate"], weights), stored(ckpt, t["w_up"], weights)]
    if parts[0][1] != parts[1][1]:             # (never in llama.cpp's mixtures)
        log.info("tinyllm: gate/up stored as %s/%s: both widened to fp32", parts[0][1], parts[1][1])
        parts = [stored(ckpt, t[f], "fp32") for f in ("w_gate", "w_up")]
    return fuse_rows(parts, interleave=True)


def read_per_token(total, embed, lm_head):
    """Bytes of weights a token reads: all of them, but one row of the embedding table (tied: all of it, as the
    output head)."""
    table = embed[0].nbytes
    return total + table // embed[0].shape[0] - (table if lm_head is not embed else 0)
