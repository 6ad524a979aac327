"""The checkpoint on the GPU, uploaded once, laid out as the kernels read it.

Matrices become uint64 words (numbattn.linear.pack_weight): bf16 checkpoints keep their bf16 bits (half the bytes of
fp32, widened exactly on the fly), other dtypes become fp32. q, k and v rows are stacked into one matrix (one matmul
for all three, and their biases, if any, into one vector) and gate and up rows interleaved (the SwiGLU epilogue sees
each pair side by side). Norm weights stay float32 vectors, holding the factor RMSNorm applies (Gemma's 1 + w).
"""
from dataclasses import dataclass

import numpy as np


@dataclass
class DeviceLayer:
    """One block's weights on the device: norms fp32, matrices as uint64 words (numbattn.linear.pack_weight)."""
    attn_norm: object
    w_qkv: tuple          # (words, kind): q, k and v rows stacked: one matmul for all three
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
    kinds: tuple          # the weight kinds present, e.g. ("bf16",)


def stored(ckpt, name):
    """A checkpoint tensor as the GPU should hold it: its bf16 bits (uint16) when stored as BF16 (half the bytes
    of fp32, widened exactly on the fly), else float32 (F16 widened, quantized GGUF types dequantized)."""
    if ckpt.stored_dtype(name) == "BF16":
        return np.asarray(ckpt.raw(name))
    return np.asarray(ckpt.get(name), np.float32)


def fuse_rows(parts, interleave=False):
    """Matrices [n_i, K] -> one [sum n_i, K] (stacked, or rows interleaved); bf16 only if all parts are bf16."""
    if any(p.dtype != np.uint16 for p in parts):
        from ..weights import bf16_to_f32
        parts = [bf16_to_f32(p) if p.dtype == np.uint16 else p for p in parts]
    if interleave:
        out = np.empty((sum(p.shape[0] for p in parts), parts[0].shape[1]), parts[0].dtype)
        for i, p in enumerate(parts):
            out[i::len(parts)] = p
        return out
    return np.concatenate(parts, axis=0)


def upload_weights(ckpt, config, stream=0, progress=None):
    """The checkpoint's tensors (checked against config by the caller) -> DeviceWeights, each tensor read once
    from the file (memory-mapped) and copied to the GPU once."""
    from numba import cuda

    from numbattn.linear import pack_weight
    from ..architecture import describe
    from ..weights import NORMS, expected_shapes, layer_tensors
    names, done, offset = list(expected_shapes(config)), [0], np.float32(describe(config).norm_offset)
    kinds, total = set(), [0]

    def tick(n=1):
        done[0] += n
        if progress is not None:
            progress(min(done[0], len(names)), len(names), "")

    def matrix(host):
        words, kind = pack_weight(host)
        kinds.add(kind)
        total[0] += words.nbytes
        return cuda.to_device(words, stream=stream), kind

    def vector(*parts, norm=False):
        tick(len(parts))
        x = np.concatenate([np.asarray(ckpt.get(name), np.float32) for name in parts])
        x = np.ascontiguousarray(x + offset if norm and offset else x)
        total[0] += x.nbytes
        return cuda.to_device(x, stream=stream)

    embed = matrix(stored(ckpt, "model.embed_tokens.weight"))
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
            w_qkv=matrix(fuse_rows([stored(ckpt, t[f]) for f in ("wq", "wk", "wv")])),
            wo=matrix(stored(ckpt, t["wo"])),
            ffn_norm=vector(t["ffn_norm"], norm=True),
            w_gate_up=matrix(fuse_rows([stored(ckpt, t["w_gate"]), stored(ckpt, t["w_up"])], interleave=True)),
            w_down=matrix(stored(ckpt, t["w_down"])), **optional))
        tick(7)
    norm = vector("model.norm.weight", norm=True)
    lm_head = embed if config.tie_word_embeddings else matrix(stored(ckpt, "lm_head.weight"))
    tick(len(names))
    return DeviceWeights(embed, layers, norm, lm_head, total[0], tuple(sorted(kinds)))
