"""The model families (tinyllm/architecture.py): each family's miniature, from safetensors in Hugging Face's layout and
from GGUF as llama.cpp writes it, against an fp64 NumPy statement of that family's equations written here.

`family_logits` below shares no code with tinyllm: it reads config.json and the safetensors itself and writes each
family's block as transformers' modeling files do (Llama 3's RoPE frequency scaling, Mistral's window, Qwen2's
q/k/v biases, Qwen3's per-head q/k norms, Gemma's (1 + w) norms, sandwich norms, GeGLU, sqrt(hidden) embeddings,
query_pre_attn_scalar, window layers with a local RoPE base, soft caps). Prompts are longer than the windows (4
tokens). Tolerance: 1e-4 relative to the largest logit, as tests/test_model.py (a missing switch, a window off by
one or the wrong RoPE table is off by > 1e-2). (The same miniatures agree with transformers' own implementation to
~1e-6: a cross-check made once on a machine with torch, not part of the suite.)
"""
import dataclasses
import json
import math
import shutil

import numpy as np
import pytest

from gguf_files import write_gguf
from test_model import read_bf16_safetensors, rel_err
from tinyllm import ConfigError, WeightsError, load_model, make_tiny
from tinyllm.config import LlamaConfig
from tinyllm.engines import NumpyEngine
from tinyllm.tiny import FAMILY_CONFIGS

RTOL = 1e-4
FAMILIES = [f for f in FAMILY_CONFIGS if f != "llama"]          # TinyLlama's: tests/test_model.py


# --------------------------------------------------------------------------------------------------------
# Each family's equations, in fp64
# --------------------------------------------------------------------------------------------------------
def inv_frequencies(cfg, d, theta):
    """theta^(-2i/d), and Llama 3.1's rescaling (transformers' _compute_llama3_parameters, as torch.where)."""
    inv = theta ** (-np.arange(0, d, 2) / d)
    s = cfg.get("rope_scaling") or {}
    if s.get("rope_type") != "llama3":
        return inv
    old, low, high, factor = (s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"],
                              s["factor"])
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def is_window_layer(cfg, i):
    if "layer_types" in cfg:
        return cfg["layer_types"][i] == "sliding_attention"
    arch = cfg["architectures"][0]
    if arch == "MistralForCausalLM":
        return cfg.get("sliding_window") is not None
    if arch == "Gemma2ForCausalLM":
        return i % 2 == 0
    return False


def family_logits(model_dir, ids):
    """fp64 logits of the miniature in model_dir for ids [batch, seq], the whole sequence at once."""
    cfg = json.loads((model_dir / "config.json").read_text())
    W = read_bf16_safetensors(model_dir / "model.safetensors")
    gemma = cfg["architectures"][0].startswith("Gemma")
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    eps, batch, seq = cfg["rms_norm_eps"], *ids.shape

    def norm(x, w):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * ((1 + w) if gemma else w)

    def rotate(x, theta, stretch):              # x [b, seq, heads, hd]; pairs (x[i], x[i + hd/2])
        turn = np.exp(1j * np.arange(seq)[:, None] / stretch * inv_frequencies(cfg, hd, theta))   # [seq, hd/2]
        z = (x[..., :hd // 2] + 1j * x[..., hd // 2:]) * turn[None, :, None, :]
        return np.concatenate([z.real, z.imag], axis=-1)

    def act(g):
        if gemma:
            return 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
        return g / (1 + np.exp(-g))

    x = W["model.embed_tokens.weight"][ids] * (math.sqrt(cfg["hidden_size"]) if gemma else 1.0)
    pos = np.arange(seq)
    for i in range(cfg["num_hidden_layers"]):
        L = {k[len(f"model.layers.{i}."):]: v for k, v in W.items() if k.startswith(f"model.layers.{i}.")}
        window = is_window_layer(cfg, i)
        visible = (pos[None, :] <= pos[:, None]) & ((pos[:, None] - pos[None, :] < cfg["sliding_window"])
                                                    if window else True)
        theta = cfg["rope_local_base_freq"] if window and "rope_local_base_freq" in cfg else cfg["rope_theta"]
        linear = (cfg.get("rope_scaling") or {}).get("rope_type") == "linear" and theta == cfg["rope_theta"]
        stretch = cfg["rope_scaling"]["factor"] if linear else 1.0          # (Gemma 3: its global layers only)
        h = norm(x, L["input_layernorm.weight"])
        q, k, v = ((h @ L[f"self_attn.{p}_proj.weight"].T + L.get(f"self_attn.{p}_proj.bias", 0)).reshape(
            batch, seq, -1, hd) for p in "qkv")
        if "self_attn.q_norm.weight" in L:
            q, k = norm(q, L["self_attn.q_norm.weight"]), norm(k, L["self_attn.k_norm.weight"])
        q, k = rotate(q, theta, stretch), rotate(k, theta, stretch)
        out = np.zeros_like(q)
        for head in range(n_heads):
            kv = head * n_kv // n_heads
            s = np.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, kv]) * cfg.get("query_pre_attn_scalar", hd) ** -0.5
            if cfg.get("attn_logit_softcapping"):
                s = cfg["attn_logit_softcapping"] * np.tanh(s / cfg["attn_logit_softcapping"])
            s = np.where(visible, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[:, :, head] = (p / p.sum(-1, keepdims=True)) @ v[:, :, kv]
        a = out.reshape(batch, seq, -1) @ L["self_attn.o_proj.weight"].T
        x = x + (norm(a, L["post_attention_layernorm.weight"]) if gemma else a)
        h = norm(x, L["pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight"])
        m = (act(h @ L["mlp.gate_proj.weight"].T) * (h @ L["mlp.up_proj.weight"].T)) @ L["mlp.down_proj.weight"].T
        x = x + (norm(m, L["post_feedforward_layernorm.weight"]) if gemma else m)
    logits = norm(x, W["model.norm.weight"]) @ W.get("lm_head.weight", W["model.embed_tokens.weight"]).T
    cap = cfg.get("final_logit_softcapping")
    return cap * np.tanh(logits / cap) if cap else logits


def ids_for(seed, seq=14, batch=1):
    return np.random.default_rng(seed).integers(3, 500, (batch, seq))


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    made = {}

    def make(family):
        if family not in made:
            made[family] = make_tiny(tmp_path_factory.mktemp(family), seed=1, family=family)
        return made[family]
    return make


# --------------------------------------------------------------------------------------------------------
# The NumPy engine: every family, from both formats, equal to its equations
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_from_safetensors_matches_its_equations(family, family_dir):
    model = load_model(family_dir(family), backend="numpy")
    assert model.config.family == ("llama" if family == "llama3" else family)
    ids = ids_for(0, batch=2)
    assert rel_err(model.forward(ids), family_logits(family_dir(family), ids)) < RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_from_gguf_equals_its_safetensors(family, family_dir, tmp_path):
    """llama.cpp's form of each family: its tensor names, Qwen's biases and norms, Gemma's norms stored as 1 + w,
    Llama 3's rope_freqs tensor, no q/k permutation outside "llama". Mistral's window is not in a GGUF file
    (llama.cpp runs Mistral on full attention), so its GGUF equals its safetensors without the window."""
    source = family_dir(family)
    if family == "mistral":
        source = shutil.copytree(source, tmp_path / "no_window")
        cfg = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps(dict(cfg, sliding_window=None)))
    path = write_gguf(tmp_path / "m.gguf", source)
    model = load_model(path, backend="numpy")
    ids = ids_for(1)
    assert rel_err(model.forward(ids), family_logits(source, ids)) < RTOL
    want = load_model(source, backend="numpy").arch
    assert dataclasses.replace(model.arch, family=want.family) == want     # (Mistral comes back as a "llama")


def test_llama3_gguf_reads_its_rope_factors_from_rope_freqs(family_dir, tmp_path):
    from tinyllm.architecture import rope_frequencies
    model = load_model(write_gguf(tmp_path / "m.gguf", family_dir("llama3")), backend="numpy")
    assert model.config.rope_freq_factors is not None and model.arch.rope_scaling == "llama3"
    want = rope_frequencies(load_model(family_dir("llama3"), backend="numpy").config)
    assert np.allclose(rope_frequencies(model.config), want, rtol=1e-6)           # float32 factors vs the formula
    assert not np.allclose(want, 500000.0 ** (-np.arange(0, 16, 2) / 16))          # it does rescale


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_chunks_and_decode_steps_past_the_window_equal_one_pass(family, family_dir, monkeypatch):
    """Prefill in chunks of 3 over a cache, then token by token, 12 tokens through windows of 4: the mask of each
    chunk (bottom-right aligned, window counted from each query's own position) is the whole sequence's."""
    monkeypatch.setattr(NumpyEngine, "prefill_chunk", 3)
    model = load_model(family_dir(family), backend="numpy")
    ids = ids_for(2, seq=12)
    parts = [model.forward(ids[:, :8])]
    parts += [model.forward(ids[:, p:p + 1], start_pos=p) for p in range(8, 12)]
    assert rel_err(np.concatenate(parts, axis=1), family_logits(family_dir(family), ids)) < RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers5_layout_gives_the_same_model(family, family_dir, tmp_path):
    """transformers 5 nests RoPE in rope_parameters (per layer type for Gemma 3) and writes dtype."""
    d = shutil.copytree(family_dir(family), tmp_path / "v5")
    cfg = json.loads((d / "config.json").read_text())
    rope = dict(cfg.pop("rope_scaling", None) or {"rope_type": "default"}, rope_theta=cfg.pop("rope_theta"))
    if family == "gemma3":
        rope = {"full_attention": rope, "sliding_attention": {"rope_type": "default",
                                                              "rope_theta": cfg.pop("rope_local_base_freq")}}
    cfg.update(rope_parameters=rope, dtype=cfg.pop("torch_dtype"), transformers_version="5.0.0")
    (d / "config.json").write_text(json.dumps(cfg))
    ids = ids_for(3, seq=9)
    v4, v5 = load_model(family_dir(family), backend="numpy"), load_model(d, backend="numpy")
    assert v4.config == v5.config and np.array_equal(v4.forward(ids), v5.forward(ids))


def test_query_pre_attn_scalar_and_a_linear_scaling_on_gemma3s_global_layers(tmp_path):
    """Gemma's score scale is query_pre_attn_scalar ** -0.5, not head_dim's; Gemma 3's linear RoPE scaling (4B and
    up) stretches the global layers only."""
    d = make_tiny(tmp_path / "g", seed=2, family="gemma3", query_pre_attn_scalar=20,
                  rope_scaling={"rope_type": "linear", "factor": 8.0})
    model, ids = load_model(d, backend="numpy"), ids_for(4)
    assert model.arch.attn_scale == 20 ** -0.5 and model.arch.rope_scaling == "linear"
    assert np.allclose(model.rope["global"][0][8, 0], np.cos(1.0)) and np.allclose(model.rope["local"][0][8, 0],
                                                                                  np.cos(8.0))
    assert rel_err(model.forward(ids), family_logits(d, ids)) < RTOL


# --------------------------------------------------------------------------------------------------------
# What is still refused: a field a family does not read, a family's unimplemented variant
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, change, words", [
    ("llama", {"sliding_window": 4096}, "sliding_window=4096: changes the model's computation"),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}},
     "low_freq_factor=4 must be below high_freq_factor=1"),
    ("mistral", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0: .* for mistral"),
    ("qwen2", {"use_sliding_window": True, "max_window_layers": "2"}, "max_window_layers='2'"),
    ("qwen2", {"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ("qwen3", {"attention_bias": True}, "attention_bias=true"),
    ("qwen3", {"query_pre_attn_scalar": 64}, "query_pre_attn_scalar=64: .* for qwen3"),
    ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation='gelu'"),
    ("gemma2", {"sliding_window_size": 8}, "sliding_window_size=8 differs"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3", {"layer_types": ["sliding_attention"] * 5}, "layer_types=.*expected 6 entries"),
    ("gemma3", {"layer_types": ["sliding_attention"] * 5 + ["chunked_attention"]}, "layer_types"),
    ("gemma3", {"_sliding_window_pattern": 0, "layer_types": None}, "_sliding_window_pattern=0"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {
        "rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_theta": None, "rope_local_base_freq": None},
     "a RoPE scaling on window layers is not implemented"),
    ("llama", {"rope_parameters": {"full_attention": {"rope_theta": 1e4}}, "rope_theta": None},
     "per layer type are read for Gemma 3 only"),
])
def test_what_a_family_does_not_implement_is_refused(family, change, words):
    d = {k: v for k, v in dict(FAMILY_CONFIGS[family], **change).items() if v is not None or k in ("head_dim",)}
    with pytest.raises(ConfigError, match=words) as e:
        LlamaConfig.from_dict(d, source="my/config.json")
    assert str(e.value).startswith("my/config.json: ")


@pytest.mark.parametrize("family, metadata, words", [
    ("qwen2", {"qwen2.attention.sliding_window": 4096}, "qwen2.attention.sliding_window changes the model"),
    ("gemma3", {"gemma3.expert_count": 8}, "gemma3.expert_count changes the model"),
    ("gemma3", {"gemma3.rope.scaling.type": "yarn"}, "gemma3.rope.scaling.type='yarn'"),
])
def test_gguf_metadata_a_family_does_not_implement_is_refused(family, metadata, words, family_dir, tmp_path):
    with pytest.raises(ConfigError, match=words):
        load_model(write_gguf(tmp_path / "m.gguf", family_dir(family), metadata=metadata), backend="numpy")


def test_a_gguf_tensor_a_family_does_not_have_is_refused(family_dir, tmp_path):
    bias = {"blk.0.attn_q.bias": (np.zeros(128, np.float32), "F32")}           # Qwen3 has no biases
    with pytest.raises(WeightsError, match="'blk.0.attn_q.bias' has no place in the qwen3 model"):
        load_model(write_gguf(tmp_path / "m.gguf", family_dir("qwen3"), raw_tensors=bias), backend="numpy")


def test_gguf_gemma_follows_llama_cpp_where_the_file_is_silent(family_dir, tmp_path):
    """No window pattern, no local RoPE base and no query_pre_attn_scalar in a GGUF Gemma 3: llama.cpp's constants
    (five window layers of six, 10000, head_dim) apply, and the sizes of the 27B models (62 layers) scale scores by
    hidden / heads instead, as llama.cpp does."""
    model = load_model(write_gguf(tmp_path / "m.gguf", family_dir("gemma3")), backend="numpy")
    assert [spec.window for spec in model.arch.layers] == [4] * 5 + [None]
    assert model.config.rope_local_base_freq == 10000.0 and model.config.query_pre_attn_scalar == 32
    from tinyllm.gguf import GEMMA_27B_LAYERS
    assert GEMMA_27B_LAYERS == {"gemma2": 46, "gemma3": 62}


# --------------------------------------------------------------------------------------------------------
# The device engine (Numba's simulator in CI, or the GPU), and the ring buffers of window layers
# --------------------------------------------------------------------------------------------------------
# the simulator runs a Python thread per CUDA thread: the fewest layers that still hold each family's switches
FEW_LAYERS = {"gemma2": dict(num_hidden_layers=1),                        # a window layer, capped scores
              "gemma3": dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])}


@pytest.mark.parametrize("family", FAMILIES)
def test_device_engine_equals_the_numpy_engine(family, kernel_backend, tmp_path, monkeypatch):
    """Each family's switches as the device engine runs them (numbattn/kernels/families.py, the gated epilogues,
    rms_norm adding into x, windows and caps in the attention kernels): a short prefill, then a decode step. Window
    families prefill 7 tokens in chunks of 3, so that a window layer's ring (window 4 + 3 - 1 = 6 slots) wraps;
    Mistral's then rewinds into the wrapped ring (to 5 tokens, the fewest it still serves) and runs the rest again.
    (The simulator runs a Python thread per CUDA thread: few tokens, and GEMMs are tests/test_linear.py's.)"""
    from tinyllm.engines import DeviceEngine
    monkeypatch.setattr(DeviceEngine, "prefill_chunk", 3)
    monkeypatch.setattr(NumpyEngine, "prefill_chunk", 3)
    d = make_tiny(tmp_path / family, seed=1, family=family, **FEW_LAYERS.get(family, dict(num_hidden_layers=1)))
    device = load_model(d, backend=kernel_backend, max_len=64)
    host = load_model(d, backend="numpy", max_len=64, kv_dtype=np.float16)     # the device's cache storage
    assert device.engine == "device"
    n = 7 if any(device.arch.windows) else 2
    ids = ids_for(5, seq=n + 1)
    assert rel_err(device.forward(ids[:, :n]), host.forward(ids[:, :n])) < RTOL
    assert rel_err(device.forward(ids[:, n:], start_pos=n), host.forward(ids[:, n:], start_pos=n)) < RTOL
    if family == "mistral":
        assert device.reusable(5) == 5 and device.reusable(4) == 0
        got, want = (m.forward(ids[:, 5:], start_pos=5) for m in (device, host))
        assert rel_err(got, want) < RTOL and device.cache.lengths.tolist() == [8]


def test_a_chat_turn_reuses_the_cache_past_a_rings_wrap_or_recomputes(tmp_path, monkeypatch):
    """A ring of 6 slots (window 4, chunks of 3) wraps during the first turn. The next turn shares the first 9
    tokens: the ring still holds what token 9's window needs, so 9 are reused; a turn that shares only 5 would need
    tokens the ring has overwritten, so the prompt is recomputed (reused 0). Either way the reply is a fresh
    model's."""
    monkeypatch.setattr(NumpyEngine, "prefill_chunk", 3)
    d = make_tiny(tmp_path / "g", seed=1, family="gemma2")
    model = load_model(d, backend="numpy", max_len=40)
    first = ids_for(6, seq=8)[0].tolist()
    reply = model.generate(first, max_new_tokens=3, stop_ids=()).ids                     # cache: 10 tokens
    assert model.n_cached == 10 and model.cache.slots(0) == 6 and int(model.cache.min_rewind()[0]) == 7
    for shared, reused in ((9, 9), (5, 0)):
        prompt = (first + reply)[:shared] + [7, 8, 9]
        got = model.generate(prompt, max_new_tokens=2, stop_ids=())
        want = load_model(d, backend="numpy", max_len=40).generate(prompt, max_new_tokens=2, stop_ids=())
        assert got.stats.reused_tokens == reused and got.ids == want.ids
        model.reset()
        model.generate(first, max_new_tokens=3, stop_ids=())


# ---- real GPU only ----------------------------------------------------------------------------------------
REAL_WIDTHS = {   # each family's width at the size people run (2 of their layers), random bf16 weights
    "llama3": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=64, vocab_size=128256),
    "qwen2": dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                  vocab_size=151936),
    "qwen3": dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, vocab_size=151936),
    "mistral": dict(hidden_size=1024, intermediate_size=3584, num_attention_heads=16, num_key_value_heads=8,
                    sliding_window=256, vocab_size=32768),
    "gemma2": dict(hidden_size=2304, intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, query_pre_attn_scalar=256, sliding_window=256, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, vocab_size=256000),
    "gemma3": dict(hidden_size=1152, intermediate_size=6912, num_attention_heads=4, num_key_value_heads=1,
                   head_dim=256, query_pre_attn_scalar=256, sliding_window=256, vocab_size=262144,
                   layer_types=["sliding_attention", "full_attention"]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_real_widths_on_the_gpu_past_the_window(family, tmp_path):
    """Two layers of each family at its real width on the GPU: a 700-token prompt (past windows of 256, in one
    chunk: the ring holds window + 2047 slots), then 12 decode steps (run, captured, replayed as CUDA graphs) fed
    the same tokens, each step's logits equal to the NumPy engine's on the same fp16 cache storage. (Logits, not
    greedy ids: Gemma 2's cap of 30 squeezes random logits of std ~48 together, where argmaxes tie.)"""
    d = make_tiny(tmp_path / family, seed=0, family=family, num_hidden_layers=2, max_position_embeddings=4096,
                  **REAL_WIDTHS[family])
    device = load_model(d, backend="cuda")
    host = load_model(d, backend="numpy", kv_dtype=np.float16)
    ids = np.random.default_rng(1).integers(3, 500, (1, 712))
    assert rel_err(device.forward(ids[:, :700], last_only=True), host.forward(ids[:, :700], last_only=True)) < RTOL
    for p in range(700, 712):
        step = ids[:, p:p + 1]
        assert rel_err(device.forward(step, start_pos=p), host.forward(step, start_pos=p)) < RTOL, p


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama3"])
def test_serving_runs_a_familys_switches_on_the_paged_cache(family, family_dir):
    """The server's engine (a paged KV cache, two sequences batched, each at its own position) gives each row the
    logits of the family's own forward on that row alone."""
    model = load_model(family_dir(family), backend="numpy")
    ops = model.paged_engine(max_seqs=2, n_blocks=8, block_size=4)
    a, b = ids_for(8, seq=6)[0].tolist(), ids_for(9, seq=3)[0].tolist()
    for seq, prompt in ((0, a), (1, b)):
        ops.cache.allocate(seq, len(prompt) + 1)
        model.forward_rows(ops, np.array([prompt]), [seq])
    got = model.forward_rows(ops, np.array([[7], [9]]), [0, 1])[:, -1]
    want = [family_logits(family_dir(family), np.array([p + [t]]))[0, -1] for p, t in ((a, 7), (b, 9))]
    assert all(rel_err(g, w) < RTOL for g, w in zip(got, want))


def test_serving_on_the_device_engine_runs_biases_and_head_norms(kernel_backend, tmp_path):
    """The paged device engine (the simulator in CI) runs Qwen2's biases and Qwen3's head norms: one layer of each
    family, two sequences batched, rows in another order than their sequences; each row's logits are the family's
    own (within 1e-3: the device's fp16 cache against fp64)."""
    for family in ("qwen2", "qwen3"):
        d = make_tiny(tmp_path / family, seed=1, family=family, num_hidden_layers=1)
        model = load_model(d, backend=kernel_backend, max_len=32)
        ops = model.paged_engine(max_seqs=2, n_blocks=8, block_size=4)
        a, b = ids_for(8, seq=3)[0].tolist(), ids_for(9, seq=2)[0].tolist()
        for seq, prompt in ((0, a), (1, b)):
            ops.cache.allocate(seq, len(prompt) + 1)
            model.forward_rows(ops, np.array([prompt]), [seq])
        got = model.forward_rows(ops, np.array([[9], [7]]), [1, 0])[:, -1]
        want = [family_logits(d, np.array([p + [t]]))[0, -1] for p, t in ((b, 9), (a, 7))]
        assert all(rel_err(g, w) < 1e-3 for g, w in zip(got, want)), family


def test_serving_a_model_with_windows_is_refused_in_one_line(family_dir):
    with pytest.raises(ValueError, match=r"serving \(a paged KV cache\) does not run sliding windows yet \(gemma3\)"):
        load_model(family_dir("gemma3"), backend="numpy").paged_engine(max_seqs=2, n_blocks=8, block_size=4)
