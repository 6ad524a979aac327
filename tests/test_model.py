"""tinyllm/model.py against an independent fp64 Llama written here from the equations.

The reference below shares no code with tinyllm: its own safetensors parsing, RoPE as a complex rotation of
the pairs (x[i], x[i + d/2]) (Hugging Face's rotate-half layout), per-head attention with an explicit causal
mask, no KV cache. Tolerance: 1e-4 relative to the largest logit (float32 matmuls over hidden 64 land
near 1e-6; a wrong RoPE pairing, a missing norm weight or a mask off by one is off by > 1e-2).
"""
import json

import numpy as np
import pytest

from tinyllm import ContextOverflowError, load_model, make_tiny
from numbattn.reference import rope, rope_tables

RTOL = 1e-4


def read_bf16_safetensors(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        assert info["dtype"] == "BF16"
        bits = np.frombuffer(raw[8 + n + begin:8 + n + end], dtype="<u2").astype(np.uint32) << 16
        out[name] = bits.view(np.float32).astype(np.float64).reshape(info["shape"])
    return out


def reference_logits(model_dir, ids):
    """fp64 LlamaForCausalLM logits for ids [batch, seq], the whole sequence at once."""
    cfg = json.loads((model_dir / "config.json").read_text())
    W = read_bf16_safetensors(model_dir / "model.safetensors")
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps = cfg["hidden_size"] // n_heads, cfg["rms_norm_eps"]
    batch, seq = ids.shape

    def norm(x, w):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w

    turn = np.exp(1j * np.arange(seq)[:, None] * cfg["rope_theta"] ** (-np.arange(0, hd, 2) / hd))  # [seq, hd/2]

    def rotate(x):  # x [b, seq, heads, hd]: pair i is the complex number x[i] + 1j * x[i + hd/2]
        z = (x[..., :hd // 2] + 1j * x[..., hd // 2:]) * turn[None, :, None, :]
        return np.concatenate([z.real, z.imag], axis=-1)

    x = W["model.embed_tokens.weight"][ids]
    allowed = np.tril(np.ones((seq, seq), bool))
    for i in range(cfg["num_hidden_layers"]):
        L = {k[len(f"model.layers.{i}."):]: v for k, v in W.items() if k.startswith(f"model.layers.{i}.")}
        h = norm(x, L["input_layernorm.weight"])
        q = rotate((h @ L["self_attn.q_proj.weight"].T).reshape(batch, seq, n_heads, hd))
        k = rotate((h @ L["self_attn.k_proj.weight"].T).reshape(batch, seq, n_kv, hd))
        v = (h @ L["self_attn.v_proj.weight"].T).reshape(batch, seq, n_kv, hd)
        out = np.zeros_like(q)
        for head in range(n_heads):
            kv = head * n_kv // n_heads
            s = np.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, kv]) / np.sqrt(hd)
            p = np.exp(np.where(allowed, s, -np.inf) - s.max(-1, keepdims=True))
            out[:, :, head] = (p / p.sum(-1, keepdims=True)) @ v[:, :, kv]
        x = x + out.reshape(batch, seq, -1) @ L["self_attn.o_proj.weight"].T
        h = norm(x, L["post_attention_layernorm.weight"])
        gate = h @ L["mlp.gate_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ L["mlp.up_proj.weight"].T)) @ L["mlp.down_proj.weight"].T
    x = norm(x, W["model.norm.weight"])
    head = W["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else W["lm_head.weight"]
    return x @ head.T


def rel_err(got, want):
    return np.abs(got - want).max() / np.abs(want).max()


def random_ids(seed, batch, seq, vocab=512):
    return np.random.default_rng(seed).integers(3, vocab, (batch, seq))


def test_forward_matches_fp64_reference(tiny_model, tiny_model_dir):
    ids = random_ids(0, 2, 11)
    got = tiny_model.forward(ids)
    assert got.shape == (2, 11, 512) and got.dtype == np.float32
    assert rel_err(got, reference_logits(tiny_model_dir, ids)) < RTOL


def test_tied_embeddings_and_other_shapes_match_reference(tmp_path):
    # tied lm_head, plain multi-head attention (4 KV heads), head_dim 32, a different theta
    d = make_tiny(tmp_path / "t", seed=3, tie_word_embeddings=True, num_key_value_heads=4, hidden_size=128,
                  num_hidden_layers=1, rope_theta=500.0)
    model = load_model(d, backend="numpy")
    ids = random_ids(1, 1, 9)
    assert rel_err(model.forward(ids), reference_logits(d, ids)) < RTOL


def test_prefill_then_decode_equals_one_long_prefill(tiny_model, tiny_model_dir):
    ids = random_ids(2, 1, 10)
    want = reference_logits(tiny_model_dir, ids)
    parts = [tiny_model.forward(ids[:, :6], start_pos=0)]
    for pos in range(6, 10):
        parts.append(tiny_model.forward(ids[:, pos:pos + 1], start_pos=pos))
    assert rel_err(np.concatenate(parts, axis=1), want) < RTOL
    assert tiny_model.cached_ids == ids[0].tolist() and tiny_model.cache.lengths.tolist() == [10]


def test_chunked_prefill_and_rewind(tiny_model, tiny_model_dir):
    ids = random_ids(3, 1, 10)
    want = reference_logits(tiny_model_dir, ids)
    a = tiny_model.forward(ids[:, :4])
    b = tiny_model.forward(ids[:, 4:7], start_pos=4)     # a chunk over the cache: bottom-right causal mask
    c = tiny_model.forward(ids[:, 7:], start_pos=7)
    assert rel_err(np.concatenate([a, b, c], axis=1), want) < RTOL
    again = tiny_model.forward(ids[:, 5:], start_pos=5)  # rewind: recompute a suffix over a shorter cache
    assert rel_err(again, want[:, 5:]) < RTOL


def test_kernel_attention_matches_numpy(tiny_model_dir, tiny_model, kernel_backend):
    """The NumPy engine with attention on numbattn's kernels (the simulator in CI; or the GPU): the same steps.
    (The device engine, every op a kernel, is tests/test_engines.py's.)"""
    kernels = load_model(tiny_model_dir, backend=kernel_backend, engine="numpy")
    ids = random_ids(4, 1, 7)
    got = [kernels.forward(ids[:, :5]), kernels.forward(ids[:, 5:6], start_pos=5),
           kernels.forward(ids[:, 6:], start_pos=6)]
    want = [tiny_model.forward(ids[:, :5]), tiny_model.forward(ids[:, 5:6], start_pos=5),
            tiny_model.forward(ids[:, 6:], start_pos=6)]
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-5


def test_interrupted_forward_leaves_the_cache_consistent(tiny_model, tiny_model_dir, monkeypatch):
    ids = random_ids(5, 1, 8)
    tiny_model.forward(ids[:, :5])
    attention = type(tiny_model.ops).attention

    def interrupted(self, layer, *args):
        if layer == 1:
            raise KeyboardInterrupt              # ^C after layer 0 appended its K/V
        return attention(self, layer, *args)

    monkeypatch.setattr(type(tiny_model.ops), "attention", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_model.forward(ids[:, 5:7], start_pos=5)
    monkeypatch.undo()
    assert tiny_model.cached_ids == ids[0, :5].tolist() and tiny_model.n_cached == 5
    rest = tiny_model.forward(ids[:, 5:], start_pos=5)
    assert rel_err(rest, reference_logits(tiny_model_dir, ids)[:, 5:]) < RTOL


def test_forward_argument_errors(tiny_model_dir):
    model = load_model(tiny_model_dir, backend="numpy", max_len=8)
    with pytest.raises(ValueError, match="start_pos=3, but the KV cache holds 0 tokens"):
        model.forward([[5, 6]], start_pos=3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.forward([[5, 512]])
    with pytest.raises(ValueError, match="expected integer token ids"):
        model.forward([5, 6])
    with pytest.raises(ContextOverflowError, match="max_len 8"):
        model.forward(random_ids(6, 1, 9))
    model.forward(random_ids(6, 1, 8))                   # exactly full is fine
    with pytest.raises(ContextOverflowError):
        model.forward([[5]], start_pos=8)
    with pytest.raises(ValueError, match="max_len=999"):
        load_model(tiny_model_dir, backend="numpy", max_len=999)


def test_batch_change_and_reset(tiny_model, tiny_model_dir):
    ids = random_ids(7, 3, 5)
    assert rel_err(tiny_model.forward(ids), reference_logits(tiny_model_dir, ids)) < RTOL
    assert tiny_model.cached_ids == []                   # prefix reuse is a batch-1 feature
    with pytest.raises(ValueError, match="start_pos=0"):
        tiny_model.forward(ids[:1, :1], start_pos=5)
    tiny_model.reset()
    assert tiny_model.n_cached == 0 and tiny_model.cache.lengths.max() == 0


def test_rope_rotates_pairs_of_halves():
    cos, sin = rope_tables(head_dim=4, n_positions=3, theta=100.0)
    x = np.array([1.0, 0.0, 0.0, 0.0], np.float32)[None, None, None, :].repeat(3, axis=2)   # [1, 1, 3, 4]
    y = rope(x, cos, sin)[0, 0]
    assert np.allclose(y[:, 0], np.cos(np.arange(3))) and np.allclose(y[:, 2], np.sin(np.arange(3)))
    assert np.allclose(y[:, [1, 3]], 0)                  # pair 0 is (x[0], x[2]): x[1], x[3] untouched
    assert np.allclose(np.linalg.norm(rope(np.ones((1, 2, 3, 4), np.float32), cos, sin), axis=-1), 2.0)


# --------------------------------------------------------------------------------------------------------
# The context: sized by what will be used, checked against free memory before anything is allocated
# --------------------------------------------------------------------------------------------------------
def huge_context_dir(tmp_path, tiny_model_dir, n_positions):
    import shutil
    d = shutil.copytree(tiny_model_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=n_positions)))
    return d


def test_the_default_context_is_the_models_maximum_up_to_4096(tmp_path, tiny_model_dir):
    """A config (or GGUF) claiming 2^40 positions used to get a cache of 4 GiB, NaN-filled, for a model of 156K
    parameters. Now: 4096 tokens unless asked, as llama.cpp."""
    from tinyllm.model import DEFAULT_CONTEXT, kv_cache_bytes
    model = load_model(huge_context_dir(tmp_path, tiny_model_dir, 2**40), backend="numpy")
    assert model.max_len == DEFAULT_CONTEXT == 4096
    assert model.cache.shape == (1, 2, 4096, 16) and kv_cache_bytes(model.config, 4096) == 2 * 2 * 2 * 16 * 4 * 4096
    assert load_model(tiny_model_dir, backend="numpy").max_len == 256           # a maximum below 4096: all of it
    assert load_model(tmp_path / "m", backend="numpy", max_len=10000).max_len == 10000     # more, when asked


def test_a_context_larger_than_free_memory_is_refused_before_allocating(tmp_path, tiny_model_dir, monkeypatch):
    from tinyllm import model as model_module
    d = huge_context_dir(tmp_path, tiny_model_dir, 2**40)
    monkeypatch.setattr(model_module, "free_memory", lambda backend: 100 << 20)       # 100 MiB free
    with pytest.raises(ValueError, match=r"a KV cache of 1000000 tokens for this model needs 0\.60 GiB, but 0\.10 "
                                         r"GiB of memory is free: ask for a shorter context \(max_len / --ctx-size\)"):
        load_model(d, backend="numpy", max_len=10**6)
    assert load_model(d, backend="numpy", max_len=10**5).max_len == 10**5          # 64 MB fits


def test_free_memory_sees_an_address_space_limit():
    """Under `ulimit -v` (RLIMIT_AS) the room left is what can be allocated, whatever MemAvailable says."""
    import subprocess
    import sys
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 31, 1 << 31)); "
            "from tinyllm.model import free_memory; print(free_memory('numpy'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 0 < int(out.stdout) < 1 << 31
