"""tinyllm/engines/device.py: the device engine (every op a numbattn kernel, weights on the device) against the NumPy
engine, on the same forward.

In CI the device engine runs in Numba's simulator on the miniature checkpoint (slow: a few tokens). With
NUMBATTN_TEST_GPU=1 the same tests run on the GPU, where decode steps are also captured and replayed as CUDA
graphs (the first step of a context bucket runs normally, the second is recorded, later ones replay), plus a
TinyLlama-shaped model (22 layers, hidden 2048, 32/4 heads, vocabulary 32000, random bf16 weights).
Tolerance: logits within 1e-4 relative to the largest (different fp32 summation orders over <= 5632 terms).
"""
import numpy as np
import pytest

from numbattn.launch import planning
from tinyllm import load_model, make_tiny
from tinyllm.engines import DeviceEngine, NumpyEngine, Step

RTOL = 1e-4


def rel_err(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def one_layer_dir(tmp_path_factory):
    """The miniature with one layer: every op of the forward, at half the simulator time of two layers."""
    return make_tiny(tmp_path_factory.mktemp("tiny_one_layer"), seed=0, num_hidden_layers=1)


@pytest.fixture(scope="module")
def device_model(one_layer_dir, kernel_backend):
    return load_model(one_layer_dir, backend=kernel_backend, max_len=200)   # a context below the first bucket (256)


@pytest.fixture
def tiny_model(one_layer_dir):
    """The NumPy engine with the device engine's default fp16 KV cache: the same stored K and V, so logits agree
    to fp32 summation order."""
    return load_model(one_layer_dir, backend="numpy", kv_dtype=np.float16)


def test_engines_are_chosen_by_backend(device_model, tiny_model, kernel_backend):
    assert isinstance(device_model.ops, DeviceEngine) and isinstance(tiny_model.ops, NumpyEngine)
    assert device_model.engine == "device" and "device engine" in device_model.describe()
    assert "bf16" in device_model.describe()                         # uploaded as stored: no fp32 copy
    assert device_model.cache.dtype == np.float16 and "float16" in device_model.describe()   # the device default
    assert load_model(device_model.tokenizer.source, backend="numpy").cache.dtype == np.float32
    with pytest.raises(ValueError, match="kv_dtype=float64"):
        load_model(device_model.tokenizer.source, backend="numpy", kv_dtype=np.float64)
    mixed = load_model(device_model.tokenizer.source, backend=kernel_backend, engine="numpy")
    assert isinstance(mixed.ops, NumpyEngine) and kernel_backend in mixed.describe()
    with pytest.raises(ValueError, match="engine='device' runs numbattn kernels"):
        load_model(device_model.tokenizer.source, backend="numpy", engine="device")


def test_prefill_decode_steps_and_a_rewind_match_the_numpy_engine(device_model, tiny_model, kernel_backend):
    """A 5-token prefill (the GEMM path), decode steps (the GEMV path; on a GPU: run, captured, replayed), and a
    rewind that recomputes a suffix with last_only, all give the NumPy engine's logits; the caches agree."""
    ids = np.random.default_rng(0).integers(3, 500, (1, 10))
    steps = 4 if kernel_backend == "cuda" else 2
    device_model.reset()
    tiny_model.reset()
    got = device_model.forward(ids[:, :5])
    assert rel_err(got, tiny_model.forward(ids[:, :5])) < RTOL and got.shape == (1, 5, 512)
    for pos in range(5, 5 + steps):
        got = device_model.forward(ids[:, pos:pos + 1], start_pos=pos)
        want = tiny_model.forward(ids[:, pos:pos + 1], start_pos=pos)
        assert got.shape == (1, 1, 512) and rel_err(got, want) < RTOL, f"decode step at position {pos}"
    assert device_model.cache.lengths.tolist() == [5 + steps]
    assert device_model.cache.device_lengths(0).copy_to_host().tolist() == [5 + steps]
    n = 5 + steps
    again = device_model.forward(ids[:, 3:n], start_pos=3, last_only=True)
    assert again.shape == (1, 1, 512) and rel_err(again, tiny_model.forward(ids[:, 3:n], start_pos=3)[:, -1:]) < RTOL
    assert device_model.cache.device_lengths(0).copy_to_host().tolist() == [n]


def test_greedy_generation_and_a_chat_turn_reusing_the_cache(device_model, one_layer_dir):
    numpy_model = load_model(one_layer_dir, backend="numpy")
    tok = numpy_model.tokenizer
    device_model.reset()
    first = [{"role": "user", "content": "Hi!"}]
    a = device_model.generate(tok.encode_chat(first), max_new_tokens=2)
    assert a.ids == numpy_model.generate(tok.encode_chat(first), max_new_tokens=2).ids
    second = first + [{"role": "assistant", "content": tok.decode(a.ids)}, {"role": "user", "content": "Yes."}]
    a2 = device_model.generate(tok.encode_chat(second), max_new_tokens=1)
    assert a2.stats.reused_tokens >= len(tok.encode_chat(first)) - 1
    assert a2.ids == load_model(one_layer_dir, backend="numpy").generate(tok.encode_chat(second), max_new_tokens=1).ids


def test_batch_of_two_rows(device_model, tiny_model):
    ids = np.random.default_rng(2).integers(3, 500, (2, 2))
    assert rel_err(device_model.forward(ids), tiny_model.forward(ids)) < RTOL
    step = np.array([[7], [9]])
    assert rel_err(device_model.forward(step, start_pos=2), tiny_model.forward(step, start_pos=2)) < RTOL


def test_a_short_fresh_prompt_runs_padded_to_its_bucket(one_layer_dir, tiny_model, kernel_backend, monkeypatch):
    """The path a GPU replays as one CUDA graph per bucket, run here as it is the first time: a 2-token prompt
    padded to 4 tokens gives the unpadded logits, leaves 2 tokens in the cache (the padding's slots NaN again), and
    the next decode step continues from there."""
    monkeypatch.setattr(DeviceEngine, "prefill_buckets", (4,))
    model = load_model(one_layer_dir, backend=kernel_backend, max_len=64)
    model.ops.pad_short_prompts = True
    ids = np.random.default_rng(6).integers(3, 500, (1, 3))
    got = model.forward(ids[:, :2], last_only=True)
    assert got.shape == (1, 1, 512) and rel_err(got, tiny_model.forward(ids[:, :2])[:, -1:]) < RTOL
    assert model.cache.lengths.tolist() == [2] and model.cache.device_lengths(0).copy_to_host().tolist() == [2]
    k = model.cache.k(0).copy_to_host()
    assert np.isfinite(k[0, :, :2]).all() and np.isnan(k[0, :, 2:4]).all()
    step = model.forward(ids[:, 2:3], start_pos=2)
    assert rel_err(step, tiny_model.forward(ids[:, 2:3], start_pos=2)) < RTOL


def test_a_decode_step_is_five_launches_per_layer_and_two_more(device_model, monkeypatch):
    """Launches of one decode step (what a CUDA graph replays on a GPU): embedding; per layer the q/k/v GEMV with
    its RMSNorm, RoPE and the KV append fused, decode attention, the o GEMV with the residual, the gate/up GEMV
    with its RMSNorm and SwiGLU, the down GEMV with the residual; the output head with the final norm (TinyLlama:
    112, was 134 with RoPE and the append a kernel of their own)."""
    import numbattn.launch
    calls = []
    real = numbattn.launch.Launch.__call__
    monkeypatch.setattr(numbattn.launch.Launch, "__call__", lambda self, grid=None: (calls.append(self.kernel),
                                                                                    real(self, grid))[1])
    device_model.reset()
    B = device_model.cache.batch
    device_model.forward(np.full((B, 1), 9), last_only=True)
    assert len(calls) == 2 + 5 * device_model.config.num_hidden_layers


def test_the_plan_covers_every_chunk_length_and_leaves_the_cache_empty(device_model):
    """What load_model compiles ahead (DeviceEngine.plan: the forward planned, no kernel run, at one length per
    matmul kernel choice and as a decode step) holds every kernel that a chunk of any length launches."""
    ops = device_model.ops
    device_model.reset()
    planned = {k for k, _ in ops.plan(device_model._forward)}
    B = device_model.cache.batch                 # (an earlier test may have left a batch of two)
    assert device_model.cache.lengths.tolist() == [0] * B
    assert device_model.cache.device_lengths(0).copy_to_host().tolist() == [0] * B
    for s in list(range(1, 24)) + [150, 200]:
        with planning() as one:
            device_model._forward(np.zeros((B, s), np.int64), Step(B, s, 0, True))
        device_model.cache.truncate(0)
        assert {k for k, _ in one} <= planned, f"a chunk of {s} tokens launches a kernel the plan does not hold"
    assert len(planned) >= 10


# ---- real GPU only ----------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_short_fresh_prompts_replayed_as_graphs_match_the_numpy_engine(device_model, tiny_model):
    """A fresh prompt of <= 64 tokens runs padded, then is recorded, then replayed (per bucket): each time the same
    logits, and the decode step after a replayed prompt continues from its real length."""
    rng = np.random.default_rng(7)
    for n in (3, 9, 16, 40):
        ids = rng.integers(3, 500, (1, n + 1))
        tiny_model.reset()
        want = tiny_model.forward(ids[:, :n])[:, -1:]
        for _ in range(3):                                  # run, recorded, replayed
            device_model.reset()
            assert rel_err(device_model.forward(ids[:, :n], last_only=True), want) < RTOL, n
            assert device_model.cache.device_lengths(0).copy_to_host().tolist() == [n]
        step = device_model.forward(ids[:, n:], start_pos=n)
        assert rel_err(step, tiny_model.forward(ids[:, n:], start_pos=n)) < RTOL
    assert {key for key in device_model.ops._graphs if key[0] == "prompt"} == {("prompt", 1, 16), ("prompt", 1, 64)}


@pytest.mark.gpu
def test_load_model_compiles_ahead_and_replies_compile_nothing(one_layer_dir, tiny_model):
    """After load_model (which compiles or loads every planned kernel), prompts of every tile class and decode
    steps compile nothing more, and still match the NumPy engine."""
    from numbattn import kernel_cache
    model = load_model(one_layer_dir, backend="cuda")
    before = dict(kernel_cache.COUNTS)
    rng = np.random.default_rng(5)
    for n in (3, 9, 40, 100, 250):                          # (the miniature's context is 256 tokens)
        ids = rng.integers(3, 500, (1, n))
        model.reset()
        tiny_model.reset()
        assert rel_err(model.forward(ids, last_only=True), tiny_model.forward(ids)[:, -1:]) < RTOL
        model.generate(ids[0].tolist(), max_new_tokens=3)
    assert kernel_cache.COUNTS["compiled"] == before["compiled"]


@pytest.fixture(scope="module")
def tinyllama_shaped(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tinyllama_shape"), seed=0, hidden_size=2048, intermediate_size=5632,
                     num_attention_heads=32, num_key_value_heads=4, num_hidden_layers=22, vocab_size=32000,
                     max_position_embeddings=2048)


@pytest.mark.gpu
def test_tinyllama_shape_greedy_64_steps_equal_the_numpy_engine(tinyllama_shaped):
    device = load_model(tinyllama_shaped, backend="cuda")
    host = load_model(tinyllama_shaped, backend="numpy", kv_dtype=np.float16)     # the device's cache storage
    prompt = np.random.default_rng(3).integers(3, 500, 40).tolist()
    got, want = device.generate(prompt, max_new_tokens=64), host.generate(prompt, max_new_tokens=64)
    assert got.ids == want.ids
    logits_d = device.forward(np.array([prompt[:17]]))
    logits_h = host.forward(np.array([prompt[:17]]))
    # 2x RTOL: both round K and V to fp16 for the cache, and a K the two engines computed 1e-7 apart (BLAS's sum
    # order moves with its thread count) can round to neighbouring halves, 5e-4 apart (the H100 gave 1.9e-4 once)
    assert rel_err(logits_d, logits_h) < 2 * RTOL


def test_a_prompt_longer_than_the_buffers_runs_in_chunks(one_layer_dir, tiny_model, kernel_backend, monkeypatch):
    monkeypatch.setattr(DeviceEngine, "prefill_chunk", 3)   # buffers for 3 tokens: a 5-token prompt is 3 + 2
    model = load_model(one_layer_dir, backend=kernel_backend)
    ids = np.random.default_rng(4).integers(3, 500, (1, 5))
    assert rel_err(model.forward(ids), tiny_model.forward(ids)) < RTOL and model.cache.lengths.tolist() == [5]


# ---- a GGUF file's blocks kept on the device (numbattn/blocks.py, dequantized inside the kernels) ------------------
def narrow_dir(path, family):
    """A one-layer miniature whose every matrix splits into 32-value blocks (hidden 32, MLP 64; 2/1 heads of 16; the
    output head tied to the embeddings), a third of one_layer_dir's weights: a third of the simulator's time."""
    return make_tiny(path, seed=0, family=family, num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                     num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)


def mixed_gguf(path, model_dir):
    """The miniature as Q4_0, but attn_v as Q8_0 (as llama.cpp's _M mixtures give attn_v more bits): q/k/v cannot
    share one matrix, so the device engine runs them as separate matmuls and RoPE + the append on their own."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
    from gguf_files import hf_tensors, write_gguf
    tensors = hf_tensors(model_dir)
    v = tensors.pop("model.layers.0.self_attn.v_proj.weight")
    return write_gguf(path, model_dir, "Q4_0", tensors=tensors,
                      raw_tensors={"blk.0.attn_v.weight": (quantize(v, GGMLQuantizationType.Q8_0), "Q8_0")})


@pytest.mark.parametrize("family,qtype", [("llama", "Q8_0"), ("qwen2", "Q4_0 + Q8_0 attn_v")])
def test_gguf_blocks_on_the_device_equal_the_numpy_engine_on_the_same_file(tmp_path, kernel_backend, family, qtype):
    """The device engine keeps the file's blocks (the embedding's too, which is the output head); a 2-token prompt
    and a decode step (the GEMVs: q/k/v with RoPE and the append fused when they share a kind, else one matmul per
    part, then Qwen2's biases) give the logits of the NumPy engine on the same file dequantized to fp32, its
    reference arithmetic, within RTOL. weights="fp32" and "bf16" upload fp32 or bf16 words instead (4 bytes a
    weight: the old way). (Prompts of more tokens run the tensor-core GEMM on blocks, tests/test_linear.py, chosen
    by the same linear.plan_matmul.)"""
    from gguf_files import write_gguf
    source, path = narrow_dir(tmp_path / family, family), tmp_path / "m.gguf"
    path = write_gguf(path, source, "Q8_0") if qtype == "Q8_0" else mixed_gguf(path, source)
    device = load_model(path, backend=kernel_backend, max_len=16)
    oracle = load_model(path, backend="numpy", weights="fp32", kv_dtype=np.float16)
    assert device.weights.kinds == (("q8_0",) if qtype == "Q8_0" else ("q4_0", "q8_0"))
    assert isinstance(device.weights.layers[0].w_qkv, list) == (qtype != "Q8_0")
    ids = np.random.default_rng(3).integers(3, 500, (1, 3))
    assert rel_err(device.forward(ids[:, :2]), oracle.forward(ids[:, :2])) < RTOL
    assert rel_err(device.forward(ids[:, 2:], start_pos=2), oracle.forward(ids[:, 2:], start_pos=2)) < RTOL
    if qtype == "Q8_0":
        fp32 = load_model(path, backend=kernel_backend, max_len=16, weights="fp32")
        assert fp32.weights.kinds == ("f32",) and fp32.weights.nbytes > 2.5 * device.weights.nbytes
        assert load_model(path, backend=kernel_backend, max_len=16, weights="bf16").weights.kinds == ("bf16",)
        with pytest.raises(ValueError, match="weights='q8'"):
            load_model(path, backend=kernel_backend, weights="q8")


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_tinyllama_shape_gguf_blocks_equal_the_numpy_engine(tinyllama_shaped, tmp_path, qtype):
    """TinyLlama's shapes written as llama.cpp would (Q8_0; Q4_K_M: Q4_K with Q6_K for the output head and, in the
    layers llama.cpp picks, attn_v and ffn_down): a 300-token prompt's last logits and 16 greedy tokens equal the
    NumPy engine's on the same file dequantized to fp32, and the device holds the file's bytes, not 4 per weight."""
    from gguf_files import write_gguf
    path = write_gguf(tmp_path / f"t.{qtype}.gguf", tinyllama_shaped, qtype)
    device = load_model(path, backend="cuda")
    host = load_model(path, backend="numpy", weights="fp32", kv_dtype=np.float16)
    assert device.weights.nbytes < 1.1 * path.stat().st_size
    prompt = np.random.default_rng(5).integers(3, 500, 300)
    assert rel_err(device.forward(prompt[None], last_only=True), host.forward(prompt[None], last_only=True)) < RTOL
    device.reset()
    host.reset()
    assert device.generate(prompt[:40].tolist(), max_new_tokens=16).ids == \
        host.generate(prompt[:40].tolist(), max_new_tokens=16).ids
