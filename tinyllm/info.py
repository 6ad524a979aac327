"""What a model is, without loading it: configuration, parameters, memory and disk (the CLI's `info`).

    for line in describe_model("path/to/TinyLlama"): print(line)      # or a .gguf file
"""
import math
from collections import Counter

from . import open_model_files
from .architecture import describe
from .config import FAMILIES
from .gguf import is_gguf
from .model import context_size, kv_cache_bytes
from .units import human_bytes, human_count
from .weights import expected_shapes


def describe_model(source, per_tensor=False):
    """Lines about a model directory or .gguf file: config, parameters, RAM (fp32) and disk, the bytes of weights a
    token reads in each form the engines can keep them in, and (per_tensor) every tensor's format. Reads headers,
    not weights."""
    files = open_model_files(source, download=False)
    c, ckpt, tok = files.config, files.checkpoint, files.tokenizer
    n_params = sum(math.prod(s) for s in expected_shapes(c).values())   # (one pass: a config may claim many layers)
    ram = 4 * n_params               # (a tied output head is a view of the embeddings: no second copy)
    context = context_size(c, None, backend=None)
    limit = (f"the model allows {c.max_position_embeddings:,}; -c/--ctx-size asks for more"
             if context < c.max_position_embeddings else "the model's maximum")
    paths = {ckpt.file_of(name) for name in ckpt.shapes}
    disk = sum(p.stat().st_size for p in paths)
    kind = "GGUF" if is_gguf(files.source) else "safetensors"
    stored = Counter(ckpt.stored_dtype(name) for name in ckpt.shapes)
    kept = host_bytes(ckpt, c, ram)
    return [
        f"model: {files.source}",
        f"  family: {c.family} ({FAMILIES[c.family].architecture}): {describe(c).summary()}",
        (f"  layers {c.num_hidden_layers}, hidden {c.hidden_size}, heads {c.num_attention_heads} "
         f"({c.num_key_value_heads} KV heads, head_dim {c.head_dim}), ffn {c.intermediate_size}, "
         f"vocab {c.vocab_size}, max context {c.max_position_embeddings}, rope_theta {c.rope_theta:g}"
         f"{', tied embeddings' if c.tie_word_embeddings else ''}"),
        f"  tokenizer: {tok.vocab_size} tokens, chat template: {'yes' if tok.chat_template else 'no'}",
        f"  parameters: {human_count(n_params)}",
        f"  context: {context:,} tokens by default ({limit})",
        (f"  memory: {human_bytes(kept)} of "
         f"{'fp32 weights in RAM' if kept == ram else 'weights in RAM (GGUF blocks as stored, the rest fp32)'}, + "
         f"{human_bytes(kv_cache_bytes(c, context))} of fp32 KV cache for the context of {context:,} tokens (the "
         f"GPU's device engine stores it in fp16: half)"),
        (f"  on disk: {human_bytes(disk)} in {len(paths)} {kind} file(s), stored as "
         f"{', '.join(f'{t} ({n} tensors)' if len(stored) > 1 else t for t, n in sorted(stored.items()))}"),
        ("  weights read per token: " + ", ".join(f"{human_bytes(token_bytes(ckpt, c, form))} {label}"
                                                 for form, label in FORMS.items())),
    ] + (tensor_lines(ckpt, c) if per_tensor else [])


FORMS = {"as-stored": "as stored (load_model's default: the device engine and the CPU kernels keep GGUF blocks)",
         "bf16": "as bf16", "fp32": "as fp32"}


def kept_as(ckpt, name, form):
    """The kind a tensor is kept in on the device (numbattn/blocks.py) for load_model(weights=form)."""
    from numbattn.blocks import KIND_OF_GGML

    from .engines.device_weights import DEVICE_BLOCK_KINDS
    if len(ckpt.shapes[name]) == 1 or form == "fp32":
        return "f32"
    if form == "bf16":
        return "bf16"
    kind = KIND_OF_GGML.get(ckpt.stored_dtype(name), "f32")
    return kind if kind in DEVICE_BLOCK_KINDS or kind in ("bf16", "f16") else "f32"


def tensor_bytes(ckpt, name, form):
    from numbattn.blocks import row_words
    shape = ckpt.shapes[name]
    return 4 * shape[0] if len(shape) == 1 else shape[0] * 8 * row_words(kept_as(ckpt, name, form), shape[1])


def token_bytes(ckpt, config, form):
    """Bytes of weights one token reads with the weights kept in `form`: every tensor, but one row of the
    embedding table (all of it when it is the output head too)."""
    names = list(expected_shapes(config))
    total = sum(tensor_bytes(ckpt, n, form) for n in names)
    if config.tie_word_embeddings:
        return total + tensor_bytes(ckpt, names[0], form) // config.vocab_size
    return total - tensor_bytes(ckpt, names[0], form) * (config.vocab_size - 1) // config.vocab_size


def host_bytes(ckpt, config, fp32_bytes):
    """RAM of the NumPy engine's weights: GGUF blocks its CPU kernels read kept as stored, everything else fp32
    (fp32_bytes: all of it fp32)."""
    from .weights import blocks_kind
    blocked = [n for n in expected_shapes(config) if blocks_kind(ckpt, n) is not None]
    return fp32_bytes + sum(tensor_bytes(ckpt, n, "as-stored") - 4 * math.prod(ckpt.shapes[n]) for n in blocked)


def tensor_lines(ckpt, config):
    """One line per tensor: name, shape, format in the file, as the engines keep it (as stored), bytes."""
    lines = ["  tensors (name, shape, stored as, kept as, bytes):"]
    for name in expected_shapes(config):
        kept = kept_as(ckpt, name, "as-stored")
        lines.append(f"    {name} {'x'.join(map(str, ckpt.shapes[name]))} {ckpt.stored_dtype(name)} {kept} "
                     f"{human_bytes(tensor_bytes(ckpt, name, 'as-stored'))}")
    return lines
