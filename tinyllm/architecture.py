"""What changes between the model families tinyllm runs, as data: one Architecture, made once from the config and
read by the forward (tinyllm/model.py), both engines and the weight loaders.

Every family is the Llama block (pre-norm, RoPE, grouped-query attention, a gated MLP) with a few named changes:

                      Llama 2/3     Mistral    Qwen2/2.5   Qwen3        Gemma 2             Gemma 3
    RMSNorm weight    x * w         x * w      x * w       x * w        x * (1 + w)         x * (1 + w)
    norms per block   2             2          2           2            4 (also after attn  4
                                                                        and after the MLP)
    q/k/v biases      -             -          yes         -            -                   -
    q/k RMSNorm       -             -          -           per head    -                   per head
    MLP               SwiGLU        SwiGLU     SwiGLU      SwiGLU       GeGLU (tanh GELU)   GeGLU (tanh GELU)
    embeddings        x             x          x           x            x * sqrt(hidden)    x * sqrt(hidden)
    score scale       1/sqrt(d)     1/sqrt(d)  1/sqrt(d)   1/sqrt(d)    query_pre_attn_scalar ** -0.5
    sliding window    -             all layers (opt.)      -            every other layer   5 layers of 6
    RoPE              base; 3.1+:   base       base        base         base                global base, a local
                      llama3 scale                                                          one on window layers
    soft caps         -             -          -           -            scores 50, logits 30  -

`Architecture` holds those switches; `LayerSpec` what differs from layer to layer (the window, the RoPE table).
The (1 + w) of Gemma's RMSNorm is folded into the weights once, when they are loaded (norm_offset), so every
engine's RMSNorm is the same x / rms(x) * w; the rest are switches the forward and the engines read by name.
"""
import functools
import math
from dataclasses import dataclass

import numpy as np

from numbattn.reference import rope_tables

from .config import GEMMA, QK_NORM, QKV_BIAS


@dataclass(frozen=True)
class LayerSpec:
    window: int | None      # a sliding window of this many tokens (itself and window - 1 before), or None: causal
    rope: str               # which RoPE table rotates its q and k: "global", or "local" (Gemma 3's window layers)


@dataclass(frozen=True)
class Architecture:
    family: str
    norm_offset: float            # RMSNorm scales by (norm_offset + w): 0, or 1 for Gemma (folded in at load)
    activation: str               # the gated MLP: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qkv_bias: bool                # biases added to q, k and v (Qwen2)
    qk_norm: bool                 # an RMSNorm over each head of q and of k, before RoPE (Qwen3, Gemma 3)
    sandwich_norms: bool          # RMSNorm also on the attention's and the MLP's outputs (Gemma: four per block)
    embed_scale: float            # x = embed[ids] * embed_scale (Gemma: sqrt(hidden))
    attn_scale: float             # scores = q . k * attn_scale
    attn_softcap: float | None    # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None   # logits -> cap * tanh(logits / cap) (Gemma 2)
    tied_embeddings: bool         # the output head is the embedding table
    rope_scaling: str             # how the global RoPE table is stretched: "none", "linear" or "llama3" (rope_table)
    layers: tuple                 # LayerSpec per layer

    @property
    def windows(self):
        """Each layer's window (None: full causal attention), as numbattn.KVCache takes them."""
        return tuple(spec.window for spec in self.layers)

    def summary(self):
        """One line of what this model uses beyond a Llama 2 block (the CLI's `info`)."""
        windows = [spec.window for spec in self.layers if spec.window is not None]
        switches = [
            (self.activation == "silu", "SwiGLU MLP"), (self.activation == "gelu_tanh", "GeGLU MLP (tanh GELU)"),
            (self.norm_offset == 1.0, "RMSNorm x * (1 + w)"), (self.sandwich_norms, "four norms per block"),
            (self.qkv_bias, "q/k/v biases"), (self.qk_norm, "q/k RMSNorm per head"),
            (self.embed_scale != 1.0, f"embeddings x {self.embed_scale:.4g}"),
            (bool(windows), f"sliding window {windows[0] if windows else 0} on {len(windows)} of {len(self.layers)} "
                            f"layers"),
            (any(spec.rope == "local" for spec in self.layers), "a local RoPE base on window layers"),
            (self.rope_scaling != "none", f"{self.rope_scaling} RoPE scaling"),
            (self.attn_softcap is not None, f"score soft cap {self.attn_softcap}"),
            (self.final_softcap is not None, f"logit soft cap {self.final_softcap}"),
            (self.tied_embeddings, "tied embeddings")]
        return ", ".join(text for used, text in switches if used)


@functools.lru_cache(maxsize=64)
def describe(config):
    """The config -> its Architecture (see the table above); made once per config."""
    gemma = config.family in GEMMA
    full, window = LayerSpec(None, "global"), LayerSpec(config.sliding_window,
                                                         "local" if config.rope_local_base_freq else "global")
    layers = (tuple(window if kind == "sliding_attention" else full for kind in config.layer_types)
              or (full,) * config.num_hidden_layers)
    return Architecture(
        family=config.family,
        norm_offset=1.0 if gemma else 0.0,
        activation="gelu_tanh" if gemma else "silu",
        qkv_bias=config.family in QKV_BIAS,
        qk_norm=config.family in QK_NORM,
        sandwich_norms=gemma,
        # transformers rounds sqrt(hidden) to the dtype it computes in (embed_scale.to(weight.dtype)): float32 here
        embed_scale=float(np.float32(math.sqrt(config.hidden_size))) if gemma else 1.0,
        attn_scale=1.0 / math.sqrt(config.query_pre_attn_scalar if gemma else config.head_dim),
        attn_softcap=config.attn_logit_softcapping,
        final_softcap=config.final_logit_softcapping,
        tied_embeddings=config.tie_word_embeddings,
        rope_scaling=("llama3" if config.rope_llama3 or config.rope_freq_factors else
                      "linear" if config.rope_scaling_factor != 1.0 else "none"),
        layers=layers)


def rope_frequencies(config, table="global"):
    """The rotation frequency of each pair of a head, [head_dim / 2] float64: theta^(-2i / head_dim), then scaled.

    "local" is Gemma 3's window layers: their own base, never scaled. "global" divides by Llama 3.1's factors
    (rope_llama3: 1 for fast pairs, whose wavelength is under original_context / high_freq_factor; `factor` for
    slow ones, over original_context / low_freq_factor; a smooth blend between) or by the factors a GGUF file
    stores for them (rope_freq_factors, llama.cpp's rope_freqs tensor); linear scaling divides positions instead
    (rope_tables' scaling_factor)."""
    theta = config.rope_local_base_freq if table == "local" else config.rope_theta
    d = config.head_dim
    inv_freq = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)                  # [head_dim / 2]
    if table == "local":
        return inv_freq
    if config.rope_freq_factors is not None:
        return inv_freq / np.asarray(config.rope_freq_factors, np.float64)
    if config.rope_llama3 is not None:
        factor, low, high, original = config.rope_llama3
        wavelength = 2 * math.pi / inv_freq
        smooth = np.clip((original / wavelength - low) / (high - low), 0.0, 1.0)   # 0: slow pairs, 1: fast ones
        return inv_freq / factor * (1 - smooth) + inv_freq * smooth
    return inv_freq


def rope_table(config, n_positions, table="global"):
    """(cos, sin) [n_positions, head_dim / 2] float32 for the layers that use `table`."""
    scaling = 1.0 if table == "local" else config.rope_scaling_factor
    return rope_tables(config.head_dim, n_positions, None, scaling, inv_freq=rope_frequencies(config, table))
