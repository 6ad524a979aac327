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


def describe_model(source):
    """Lines about a model directory or .gguf file: config, parameters, RAM (fp32) and disk. Reads headers,
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
        (f"  memory: {human_bytes(ram)} of fp32 weights in RAM, + {human_bytes(kv_cache_bytes(c, context))} of "
         f"fp32 KV cache for the context of {context:,} tokens (the GPU's device engine stores it in fp16: half)"),
        (f"  on disk: {human_bytes(disk)} in {len(paths)} {kind} file(s), stored as "
         f"{', '.join(f'{t} ({n} tensors)' if len(stored) > 1 else t for t, n in sorted(stored.items()))}"),
    ]
