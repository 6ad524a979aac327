"""Model files that pass the format checks but would still hurt (issue 32): each is written here, small (a
count a file claims is refused before what it counts is read, so a header and a sparse tail stand in for a
40 MB file), and given to `cli.py generate` in a child process with an address-space limit and a time limit.
Each must end in one clean error line naming the file (or, for a context the file exaggerates, load with a
sane cache), within seconds and with a peak resident memory under 1 GB.
"""
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from children import child_env
from gguf_files import byte_level_tokenizer, write_gguf

ROOT = Path(__file__).resolve().parent.parent
ADDRESS_SPACE = 3 << 30     # the child's limit: the interpreter, NumPy, Numba and click map ~0.6 GB before any work
PEAK_BYTES = 1 << 30        # resident memory the child may reach at most
SECONDS = 60                # the child is killed after this (a hang fails the test instead of stalling the suite)


def run_limited(*args, cwd):
    """`python cli.py *args` under ADDRESS_SPACE and SECONDS -> (exit code, stdout, stderr, peak RSS in bytes,
    seconds). The peak comes from wait4's rusage of that one child."""
    env = child_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cwd / "no_hf_cache"),
                    TINYLLM_CACHE=str(cwd / "no_tinyllm_cache"), OPENBLAS_NUM_THREADS="1")
    out, err = cwd / "stdout.txt", cwd / "stderr.txt"

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    with open(out, "wb") as o, open(err, "wb") as e:
        t0 = time.monotonic()
        child = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, args)], stdin=subprocess.DEVNULL,
                                 stdout=o, stderr=e, cwd=cwd, env=env, preexec_fn=limit)
        killer = threading.Timer(SECONDS, child.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        finally:
            killer.cancel()
        child.returncode = os.waitstatus_to_exitcode(status)     # reaped here, not by Popen
        seconds = time.monotonic() - t0
    return (child.returncode, out.read_text(errors="replace"), err.read_text(errors="replace"),
            usage.ru_maxrss * 1024, seconds)


def gguf_header(n_tensors=0, kv=(), tensors=b""):
    """GGUF v3 magic, version and counts, then kv = [(key, type, payload bytes)] and raw tensor-info bytes."""
    out = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kv) if isinstance(kv, (list, tuple)) else kv)
    for key, vtype, payload in (kv if isinstance(kv, (list, tuple)) else ()):
        out += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + payload
    return out + tensors


def sparse(path, data, size):
    """data, then zeros up to `size` bytes that take no disk space (and no time to write)."""
    path.write_bytes(data)
    os.truncate(path, size)
    return path


def hf_copy(tmp_path, model_dir, **config):
    d = shutil.copytree(model_dir, tmp_path / "model")
    edit_json(d / "config.json", **config)
    return d


def edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


# --------------------------------------------------------------------------------------------------------
# The cases: each writes its files -> (the model to pass with -m, the file the error must name, the regex the
# error line must match[, more arguments]); a regex of None means the model must load and answer (with a
# warning naming the file, if one is given).
# --------------------------------------------------------------------------------------------------------
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


@case
def gguf_merges_name_tokens_not_in_the_vocabulary(tmp, model_dir):
    path = write_gguf(tmp / "m.gguf", model_dir, tokenizer=byte_level_tokenizer(),
                      metadata={"tokenizer.ggml.merges": ["zz qq"]})
    return path, path, r"the vocabulary cannot be built \(.*out of vocabulary"


@case
def gguf_context_length_of_2_to_the_40(tmp, model_dir):
    return write_gguf(tmp / "m.gguf", model_dir, metadata={"llama.context_length": 2**40}), None, None


@case
def hf_max_position_embeddings_of_2_to_the_40(tmp, model_dir):
    return hf_copy(tmp, model_dir, max_position_embeddings=2**40), None, None


@case
def a_context_larger_than_memory_asked_for(tmp, model_dir):
    d = hf_copy(tmp, model_dir, max_position_embeddings=2**40)
    return d, "", r"a KV cache of 1073741824 tokens for this model needs 640\.00 GiB, but .* GiB of memory is free: " \
                  r"ask for a shorter context \(max_len / --ctx-size\)$", ["-c", 2**30]


@case
def generation_config_json_of_2_gb(tmp, model_dir):
    """Optional (it only adds stop ids): ignored with a warning, unread."""
    d = hf_copy(tmp, model_dir)
    sparse(d / "generation_config.json", b"{", 2 << 30)
    return d, d / "generation_config.json", None


@case
def gguf_header_claims_a_million_metadata_keys(tmp, model_dir):
    path = sparse(tmp / "m.gguf", gguf_header(kv=1 << 20), 22 << 20)
    return path, path, r"header claims 1,048,576 metadata entries \(at most 4,096 are read"


@case
def gguf_header_claims_a_million_tensors(tmp, model_dir):
    one = struct.pack("<Q", 2) + b"t0" + struct.pack("<IQIQ", 1, 0, 0, 0)      # name, 1 dim of 0, F32, offset 0
    path = sparse(tmp / "m.gguf", gguf_header(n_tensors=1 << 20, tensors=one), 40 << 20)
    return path, path, r"header claims 1,048,576 tensors \(at most 16,384 are read"


@case
def gguf_array_claims_two_million_strings(tmp, model_dir):
    tokens = ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 1 << 21))      # an array of 2^21 strings...
    path = sparse(tmp / "m.gguf", gguf_header(kv=[tokens]), 17 << 20)       # ...all empty: the zeros of the tail
    return path, path, r"metadata 'tokenizer.ggml.tokens' claims 2,097,152 items \(at most 1,048,576"


@case
def config_json_of_8_gb(tmp, model_dir):
    d = hf_copy(tmp, model_dir)
    sparse(d / "config.json", b"{", 8 << 30)
    return d, d / "config.json", r"8,589,934,592 bytes, more than the 16,777,216"


@case
def tokenizer_json_of_1_gb(tmp, model_dir):
    d = hf_copy(tmp, model_dir)
    sparse(d / "tokenizer.json", b"{", 1 << 30)
    return d, d / "tokenizer.json", r"1,073,741,824 bytes, more than the 268,435,456"


@case
def gguf_rms_norm_eps_inf(tmp, model_dir):
    path = write_gguf(tmp / "m.gguf", model_dir, metadata={"llama.attention.layer_norm_rms_epsilon": float("inf")})
    return path, path, r"llama\.attention\.layer_norm_rms_epsilon=inf: expected a positive, finite number"


@case
def config_json_rms_norm_eps_infinity(tmp, model_dir):
    d = hf_copy(tmp, model_dir, rms_norm_eps=float("inf"))          # json.dumps writes Infinity
    return d, d / "config.json", r"rms_norm_eps=inf: expected a positive, finite number"


@case
def gguf_vocabulary_of_no_tokens(tmp, model_dir):
    """Written by hand: GGUFWriter refuses empty arrays. No tensors either: the vocabulary is refused first."""
    config = json.loads((model_dir / "config.json").read_text())
    kv = [kv_string("general.architecture", "llama"), kv_string("tokenizer.ggml.model", "llama"),
          *(kv_u32(f"llama.{key}", config[field]) for key, field in (
              ("context_length", "max_position_embeddings"), ("embedding_length", "hidden_size"),
              ("block_count", "num_hidden_layers"), ("feed_forward_length", "intermediate_size"),
              ("attention.head_count", "num_attention_heads"), ("vocab_size", "vocab_size"))),
          ("llama.attention.layer_norm_rms_epsilon", 6, struct.pack("<f", 1e-5))]
    kv += [(f"tokenizer.ggml.{key}", 9, struct.pack("<IQ", 8, 0)) for key in ("tokens", "scores", "token_type")]
    path = tmp / "m.gguf"
    path.write_bytes(gguf_header(kv=kv) + b"\0" * 32)
    return path, path, r"tokenizer\.ggml\.tokens is empty: a vocabulary with no tokens"


def kv_string(key, value):
    return key, 8, struct.pack("<Q", len(value.encode())) + value.encode()


def kv_u32(key, value):
    return key, 4, struct.pack("<I", value)


@case
def tokenizer_json_of_no_tokens(tmp, model_dir):
    d = hf_copy(tmp, model_dir)
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["added_tokens"], tok["model"] = [], dict(tok["model"], vocab={}, merges=[], unk_token=None)
    (d / "tokenizer.json").write_text(json.dumps(tok))
    edit_json(d / "tokenizer_config.json", bos_token=None, eos_token=None)
    return d, d / "tokenizer.json", r"the vocabulary has no tokens$"


@case
def gguf_that_is_a_fifo(tmp, model_dir):
    """Opening a FIFO waits for a writer forever (hub.py refuses it first, as no model file)."""
    os.mkfifo(tmp / "m.gguf")
    return tmp / "m.gguf", tmp / "m.gguf", r"no such model directory or \.gguf file"


@case
def gguf_head_count_not_dividing_the_hidden_size(tmp, model_dir):
    path = write_gguf(tmp / "m.gguf", model_dir, metadata={"llama.attention.head_count": 5,
                                                           "llama.attention.head_count_kv": None})
    return path, path, r"llama\.embedding_length=64 is not divisible by llama\.attention\.head_count=5$"


@case
def gguf_architecture_of_a_megabyte(tmp, model_dir):
    path = write_gguf(tmp / "m.gguf", model_dir, metadata={"general.architecture": "A" * 10**6})
    return path, path, r"general\.architecture='A{150,}…: only llama, qwen2, qwen3, gemma2, gemma3 are implemented"


@case
def chat_template_raising_a_megabyte(tmp, model_dir):
    d = hf_copy(tmp, model_dir)
    edit_json(d / "tokenizer_config.json", chat_template="{{ raise_exception('A' * 1000000) }}")
    return d, d / "tokenizer_config.json", r"the chat template refused the conversation: A{150,}…"


@pytest.mark.parametrize("name", CASES)
def test_a_hostile_file_is_one_line_in_seconds_and_under_a_gigabyte(tmp_path, tiny_model_dir, name):
    model, named, error, *more = CASES[name](tmp_path, tiny_model_dir)
    verbose = ["-v"] if error is None else []         # the stats line says how large the context is
    code, stdout, stderr, peak, seconds = run_limited("generate", "--chat", "hi", "-m", model, "--backend", "numpy",
                                                      "-n", 2, *verbose, *(more[0] if more else []), cwd=tmp_path)
    assert peak < PEAK_BYTES, f"peak resident memory {peak / 2**20:.0f} MB"
    assert seconds < SECONDS / 2, f"took {seconds:.1f} s"
    assert "Traceback" not in stderr, stderr
    if error is None:
        assert code == 0, stderr
        context = re.search(r"\| context \d+/(\d+) tokens \|", stderr)
        assert context and int(context[1]) <= 4096, stderr                 # the default context, never 2^40
        assert named is None or re.search(rf"ignoring {named}: .* bytes, more than", stderr), stderr
        return
    errors = [line for line in stderr.splitlines() if line != "loading weights"]    # (the progress line, no tty)
    assert code == 1 and stdout == "" and len(errors) == 1, stderr[:2000]
    assert errors[0].startswith(f"error: {named}"), errors[0][:300]
    assert re.search(error, errors[0]), errors[0][:300]
    assert len(errors[0]) < 1000
