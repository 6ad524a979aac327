"""tinyllm: TinyLlama in NumPy, chatting on numbattn's attention kernels. No torch anywhere.

    from tinyllm import load_model
    model = load_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0")   # or a local directory
    print(model.chat([{"role": "user", "content": "Why is the sky blue?"}], max_new_tokens=64))

The package, in the order a token flows through it:

    hub.py        find the files: a directory, the Hugging Face cache, or a download
    config.py     config.json -> LlamaConfig (refuses models we do not implement)
    weights.py    safetensors on np.memmap, bf16 -> fp32, every tensor checked against the config
    tokenizer.py  tokenizer.json + the chat template; streaming detokenisation
    model.py      the forward pass: RMSNorm, RoPE, GQA attention on numbattn, SwiGLU
    generate.py   sampling (greedy, temperature, top-k, top-p, repetition penalty) and the decode loop
    tiny.py       a miniature random checkpoint in the same layout, for tests and offline demos
"""
import json
import logging
from pathlib import Path

from .config import ConfigError, LlamaConfig, load_config
from .generate import (ContextOverflowError, Generation, GenerationInterrupted, GenerationStats, NonFiniteLogitsError,
                       Sampler)
from .hub import MODEL_ID, HubError, resolve_model
from .model import Llama
from .tiny import make_tiny
from .tokenizer import StreamDecoder, Tokenizer, TokenizerError
from .weights import WeightsError, load_weights

log = logging.getLogger("tinyllm")

__all__ = ["load_model", "Llama", "LlamaConfig", "Tokenizer", "StreamDecoder", "Sampler", "Generation",
           "GenerationInterrupted", "GenerationStats", "make_tiny", "resolve_model", "MODEL_ID", "ConfigError", "WeightsError", "TokenizerError",
           "HubError", "ContextOverflowError", "NonFiniteLogitsError"]


def load_model(model=MODEL_ID, backend="auto", max_len=None, progress=None, download=True):
    """A Hub repo id or a model directory -> a ready Llama with its tokenizer.

    backend: numbattn's "auto" | "cuda" | "sim" | "numpy" for attention (matmuls are NumPy either way).
    max_len: KV-cache size in tokens (default: the model's max_position_embeddings).
    progress(i, n, name): called while weights are converted, e.g. to draw a progress bar.
    download: allow fetching from the Hub when the model is neither a directory nor in the cache.
    """
    model_dir = resolve_model(model, download=download)
    config = load_config(model_dir)
    tokenizer = Tokenizer(model_dir)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"{model_dir / 'tokenizer.json'} has {tokenizer.vocab_size} tokens but config.json's "
                          f"vocab_size is {config.vocab_size}: they do not belong together")
    weights = load_weights(model_dir, config, progress=progress)
    log.info("tinyllm: loaded %s (%d layers, hidden %d, vocab %d)", model_dir, config.num_hidden_layers,
             config.hidden_size, config.vocab_size)
    try:
        return Llama(config, weights, tokenizer, backend=backend, max_len=max_len,
                     stop_ids=_stop_ids(model_dir, config, tokenizer))
    except MemoryError as e:     # the KV cache and RoPE tables are sized by the context
        n = max_len or config.max_position_embeddings
        asked = f"max_len={max_len}" if max_len else f"max_position_embeddings={n}"
        raise ConfigError(f"{model_dir / 'config.json'}: no memory for a context of {n:,} tokens ({asked}; {e}): "
                          f"ask for a shorter one with max_len (the CLI's --ctx-size)") from e


def _stop_ids(model_dir, config, tokenizer):
    """EOS ids from config.json, generation_config.json (may list several) and the tokenizer."""
    ids = set(config.eos_token_ids)
    if tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        try:
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError, RecursionError) as e:
            log.warning("tinyllm: ignoring unreadable %s (%s)", path, e)
            eos = None
        for i in eos if isinstance(eos, list) else [eos]:
            if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < config.vocab_size:
                ids.add(i)
    return ids
