"""The two engines behind Llama's forward: the arithmetic in NumPy, or every op a Numba kernel on the GPU.

tinyllm/model.py writes the forward once, against the small set of operations below (an "ops" object), so
the fast path can never drift from the readable one:

    embed(ids)                        token ids [b, s] -> x, the residual stream
    rms_norm(x, w)                    RMSNorm
    qkv(h, lw)                        -> q, k, v (split into heads)
    rope(q, k, start_pos)             rotate q and k by their positions
    attention(layer, q, k, v, pos)    append k, v to the KV cache, attend from q to everything cached
    linear(a, w, residual=x)          x + a W^T (the residual stream, updated)
    swiglu(h, lw)                     silu(h W_gate^T) * (h W_up^T)
    logits(h, last_only)              the output head (on the last position only) -> host float32 [b, s|1, vocab]

NumpyEngine is the reference and the CPU path: every op is a line of NumPy from numbattn/reference.py, with
attention through numbattn (its NumPy reference, or its kernels on the GPU or in the simulator: that mix keeps
the matmuls on the host). DeviceEngine keeps the weights on the GPU and runs every op as a kernel of numbattn
(linear.py, rowwise.py, decode.py, prefill*.py): only the token ids go in and the logits come out. Its ops
return handles to device buffers, and two of them are deferred so that they fuse into the kernel after them:
rms_norm returns a pending norm that the next matmul applies while it loads x (numbattn.linear's GEMV
prologue), and rope returns pending rotations that attention applies while it appends k and v
(numbattn.rowwise.rope_append). On a GPU, a decode step (one token per row) is captured once per context
bucket as a CUDA graph and then replayed with one driver call (numbattn/launch.py).
"""
import logging
from dataclasses import dataclass

import numpy as np

import numbattn
from numbattn import backend as _backend
from numbattn import reference

log = logging.getLogger("tinyllm")


# --------------------------------------------------------------------------------------------------------
# NumPy
# --------------------------------------------------------------------------------------------------------
class NumpyEngine:
    """The forward's arithmetic in NumPy float32 (weights: LlamaWeights, matrices [in, out] for x @ W)."""
    name = "numpy"
    prefill_chunk = 256

    def __init__(self, config, weights, cache, cos, sin, attention_backend):
        self.config, self.weights, self.cache = config, weights, cache
        self.layers, self.norm = weights.layers, weights.norm
        self.cos, self.sin, self.backend = cos, sin, attention_backend
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads

    def describe(self):
        where = "the NumPy reference" if self.backend == "numpy" else f"numbattn's kernels ({self.backend})"
        return (f"NumPy engine: weights in host memory ({_human_bytes(_host_bytes(self.weights))} fp32), "
                f"matmuls in NumPy, attention on {where}")

    def embed(self, ids):
        return self.weights.embed[ids]                                   # [b, s] -> [b, s, dim]

    def rms_norm(self, x, w):
        return reference.rms_norm(x, w, self.config.rms_norm_eps)

    def qkv(self, h, lw):
        return (split_heads(h @ lw.wq, self.n_heads), split_heads(h @ lw.wk, self.n_kv_heads),
                split_heads(h @ lw.wv, self.n_kv_heads))                 # [b, heads, s, head_dim] each

    def rope(self, q, k, start_pos):
        cos, sin = self.cos[start_pos:start_pos + q.shape[2]], self.sin[start_pos:start_pos + q.shape[2]]
        return reference.rope(q, cos, sin), reference.rope(k, cos, sin)

    def attention(self, layer, q, k, v, start_pos):
        """Append k, v; a single token uses the decode kernel, a chunk the prefill kernel over the cache so far
        (bottom-right causal alignment: query i of the chunk sees keys 0 .. start_pos + i). -> [b, s, H*D]"""
        self.cache.append(layer, k, v)
        seq, n = q.shape[2], start_pos + q.shape[2]
        if seq == 1:
            out = numbattn.decode_attention(np.ascontiguousarray(q[:, :, 0]), self.cache, layer)
            out = _backend.to_host(out)[:, :, None, :]                   # [b, n_heads, 1, d]
        else:
            k_all = self.cache.k(layer)[:, :, :n]                        # [b, n_kv_heads, n, head_dim] (a view)
            v_all = self.cache.v(layer)[:, :, :n]
            out = _backend.to_host(numbattn.attention(q, k_all, v_all, causal=True, backend=self.backend))
        return merge_heads(out)

    def linear(self, a, w, residual=None):
        return a @ w if residual is None else residual + a @ w

    def swiglu(self, h, lw):
        return reference.swiglu(h @ lw.w_gate, h @ lw.w_up)

    def logits(self, h, last_only):
        return (h[:, -1:] if last_only else h) @ self.weights.lm_head                # [b, s or 1, vocab]

    def run(self, forward, ids, start_pos, last_only):
        return forward(ids, start_pos, last_only)


def split_heads(x, n_heads):
    """[batch, seq, n_heads * head_dim] -> [batch, n_heads, seq, head_dim]."""
    b, s, _ = x.shape
    return np.ascontiguousarray(x.reshape(b, s, n_heads, -1).transpose(0, 2, 1, 3))


def merge_heads(x):
    """[batch, n_heads, seq, head_dim] -> [batch, seq, n_heads * head_dim]."""
    b, h, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, h * d)


def _host_bytes(weights):
    arrays = [weights.embed, weights.norm, weights.lm_head] + [a for lw in weights.layers for a in vars(lw).values()]
    return sum(a.nbytes for a in {id(a): a for a in arrays}.values())


def _human_bytes(n):
    from .info import human_bytes
    return human_bytes(n)


# --------------------------------------------------------------------------------------------------------
# GPU: the weights, uploaded once
# --------------------------------------------------------------------------------------------------------
@dataclass
class DeviceLayer:
    """One block's weights on the device: norms fp32, matrices as uint64 words (numbattn.linear.pack_weight)."""
    attn_norm: object
    w_qkv: tuple          # (words, kind): q, k and v rows stacked: one matmul for all three
    wo: tuple
    ffn_norm: object
    w_gate_up: tuple      # gate and up rows interleaved (2f = gate_f, 2f+1 = up_f): the SwiGLU epilogue
    w_down: tuple


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
        from .weights import bf16_to_f32
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
    from .weights import expected_shapes, layer_tensors
    names, done = list(expected_shapes(config)), [0]
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

    def vector(name):
        tick()
        x = np.ascontiguousarray(np.asarray(ckpt.get(name), np.float32))
        total[0] += x.nbytes
        return cuda.to_device(x, stream=stream)

    embed = matrix(stored(ckpt, "model.embed_tokens.weight"))
    tick()
    layers = []
    for i in range(config.num_hidden_layers):
        t = {field: f"model.layers.{i}.{name}" for field, (name, _) in layer_tensors(config).items()}
        layers.append(DeviceLayer(
            attn_norm=vector(t["attn_norm"]),
            w_qkv=matrix(fuse_rows([stored(ckpt, t[f]) for f in ("wq", "wk", "wv")])),
            wo=matrix(stored(ckpt, t["wo"])),
            ffn_norm=vector(t["ffn_norm"]),
            w_gate_up=matrix(fuse_rows([stored(ckpt, t["w_gate"]), stored(ckpt, t["w_up"])], interleave=True)),
            w_down=matrix(stored(ckpt, t["w_down"]))))
        tick(7)
    norm = vector("model.norm.weight")
    lm_head = embed if config.tie_word_embeddings else matrix(stored(ckpt, "lm_head.weight"))
    tick(len(names))
    return DeviceWeights(embed, layers, norm, lm_head, total[0], tuple(sorted(kinds)))


# --------------------------------------------------------------------------------------------------------
# GPU: the engine
# --------------------------------------------------------------------------------------------------------
class _Norm:
    """A deferred RMSNorm: the next matmul normalises x while it loads it (or, for many tokens, a norm kernel
    runs first)."""

    def __init__(self, x, w):
        self.x, self.w = x, w


class _Rotate:
    """Deferred RoPE: attention rotates q and k while it appends k and v to the cache (one kernel)."""

    def __init__(self, qkv):
        self.qkv = qkv


class DeviceEngine:
    """The forward on the GPU (or in Numba's simulator): weights resident, every op a numbattn kernel."""
    name = "device"
    prefill_chunk = 2048        # tokens per forward pass (a longer prompt is run in chunks of this many)
    buckets = (256, 1024, 4096, 16384, 65536)   # decode graphs are captured per context bucket

    def __init__(self, config, weights, cache, cos, sin, backend):
        from numba import cuda

        from numbattn import linear
        self.config, self.weights, self.cache, self.backend = config, weights, cache, backend
        self.layers, self.norm = weights.layers, weights.norm
        self.stream = cuda.stream()
        self.cos, self.sin = cuda.to_device(cos, stream=self.stream), cuda.to_device(sin, stream=self.stream)
        c = config
        self.H, self.HKV, self.D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.QKV = (self.H + 2 * self.HKV) * self.D
        self.eps = np.float32(c.rms_norm_eps)
        self.use_graphs = backend == "cuda"
        self.gemv_max = linear.GEMV_MAX_TOKENS
        B = cache.batch
        rows = B * self.prefill_chunk
        self.buf = {name: cuda.device_array((rows, width), np.float32, stream=self.stream) for name, width in (
            ("x", c.hidden_size), ("h", c.hidden_size), ("qkv", self.QKV), ("attn", self.H * self.D),
            ("g", c.intermediate_size))}
        self.ids_host = cuda.pinned_array(rows, np.int32)
        self.ids_dev = cuda.device_array(rows, np.int32, stream=self.stream)
        self.logits_dev = cuda.device_array((B, c.vocab_size), np.float32, stream=self.stream)
        self.logits_host = cuda.pinned_array((B, c.vocab_size), np.float32)
        self._views, self._launches, self._graphs, self._warm = {}, {}, {}, set()
        self._capturing = None          # the context bucket while a decode step is being recorded
        self.shape = None               # (batch, seq) of the forward in progress

    def describe(self):
        kinds = "/".join(self.weights.kinds)
        cache = self.cache.n_layers * 2 * int(np.prod(self.cache.shape)) * self.cache.dtype.itemsize
        where = "the GPU" if self.backend == "cuda" else "the simulated device (host memory)"
        return (f"device engine ({self.backend}): weights on {where} ({_human_bytes(self.weights.nbytes)} of "
                f"{kinds} words), KV cache {_human_bytes(cache)} {self.cache.dtype.name}, every op a numbattn "
                f"kernel{'; decode steps replayed as CUDA graphs' if self.use_graphs else ''}")

    # ---- views and launches, made once per shape ----------------------------------------------------------
    def view(self, name, rows):
        """The first `rows` rows of buffer `name` (a view made once)."""
        key = (name, rows)
        if key not in self._views:
            self._views[key] = self.buf[name][:rows]
        return self._views[key]

    def launch(self, key, kernel, grid, block, args):
        """Launch kernel, through a prepared Launch kept under `key` while its arguments stay the same objects."""
        from numbattn.launch import Launch
        prepared = self._launches.get(key)
        if prepared is None or any(a is not b for a, b in zip(prepared.args, args)):
            if len(self._launches) > 4096:
                self._launches.clear()
            prepared = self._launches[key] = Launch(kernel, grid, block, args, self.stream)
        prepared()

    # ---- the ops ----------------------------------------------------------------------------------------
    def embed(self, ids):
        from numbattn import rowwise
        B, s = ids.shape
        M = B * s
        self.shape = (B, s)
        self.ids_host[:M] = ids.reshape(-1)
        ids_dev = self._ids_view(M)
        ids_dev.copy_to_device(self.ids_host[:M] if M != len(self.ids_host) else self.ids_host, stream=self.stream)
        words, kind = self.weights.embed
        x = self.view("x", M)
        self.launch(("embed", M), rowwise.make_embed(kind), M, rowwise.THREADS, (ids_dev, words, x))
        return x

    def _ids_view(self, M):
        key = ("ids", M)
        if key not in self._views:
            self._views[key] = self.ids_dev[:M]
        return self._views[key]

    def rms_norm(self, x, w):
        return _Norm(x, w)

    def qkv(self, h, lw):
        qkv = self.matmul(("qkv", id(lw)), h, lw.w_qkv, self.view("qkv", self._rows(h)), "none")
        return qkv, qkv, qkv

    def rope(self, q, k, start_pos):
        return _Rotate(q), k

    def attention(self, layer, q, k, v, start_pos):
        """RoPE + append (one kernel), then decode (one token per row) or prefill attention over the cache."""
        from numbattn import rowwise
        B, s = self.shape
        M = B * s
        qkv = q.qkv
        self.launch(("rope", layer, M), rowwise.make_rope_append(self.H, self.HKV, self.D),
                    rowwise.rope_append_grid(s, B), rowwise.THREADS,
                    (qkv, self.cos, self.sin, self.cache.k(layer), self.cache.v(layer),
                     self.cache.device_lengths(layer), self.cache.append_counters(layer)))
        self.cache.advance(s, layer)
        attn = self.view("attn", M)
        if s == 1:
            q3, out3 = self._decode_views(B)
            numbattn.decode_attention(q3, self.cache, layer, out=out3, stream=self.stream,
                                      max_length=self._capturing or self._bucket(start_pos + 1))
        else:
            self._prefill_attention(layer, qkv, attn, B, s, start_pos + s)
        return attn

    def _decode_views(self, B):
        """q [B, H, D] inside the qkv buffer and out [B, H, D] over the attn buffer (made once)."""
        key = ("decode", B)
        if key not in self._views:
            qkv, attn = self.view("qkv", B), self.view("attn", B)
            self._views[key] = (_strided(qkv, (B, self.H, self.D), (self.QKV, self.D, 1)),
                                attn.reshape(B, self.H, self.D))
        return self._views[key]

    def _prefill_attention(self, layer, qkv, attn, B, s, n):
        from numbattn import prefill
        q4 = _strided(qkv, (B, self.H, s, self.D), (s * self.QKV, self.D, self.QKV, 1))
        out4 = _strided(attn, (B, self.H, s, self.D), (s * self.H * self.D, self.D, self.H * self.D, 1))
        k_all, v_all = _prefix(self.cache.k(layer), n), _prefix(self.cache.v(layer), n)
        version = prefill.DEFAULT_VERSION
        tiles = prefill.default_tiles(version, self.backend, self.D)
        prefill.launch(q4, k_all, v_all, out4, True, 1.0 / np.sqrt(self.D), version, tiles, stream=self.stream)

    def linear(self, a, w, residual=None):
        return self.matmul(("linear", id(w)), a, w, residual, "residual" if residual is not None else "none")

    def swiglu(self, h, lw):
        rows = self._rows(h)
        return self.matmul(("swiglu", id(lw)), h, lw.w_gate_up, self.view("g", rows), "swiglu")

    def logits(self, h, last_only):
        """The output head on the last token of every row (last_only) or on every token -> host float32."""
        B, s = self.shape
        if last_only or s == 1:
            last = self._last_rows(h.x, B, s)
            self.matmul(("logits", B), _Norm(last, h.w), self.weights.lm_head, self.logits_dev, "none")
            self.logits_dev.copy_to_host(self.logits_host, stream=self.stream)
            if self._capturing:
                return None
            self.stream.synchronize()
            return self.logits_host.copy()[:, None, :]
        from numba import cuda
        every = cuda.device_array((B * s, self.config.vocab_size), np.float32, stream=self.stream)
        self.matmul(("logits all",), h, self.weights.lm_head, every, "none")
        return every.copy_to_host(stream=self.stream).reshape(B, s, -1)

    def _last_rows(self, x, B, s):
        if s == 1:
            return x
        key = ("last", B, s)
        if key not in self._views:
            self._views[key] = _strided(x, (B, x.shape[1]), (s * x.shape[1], 1), offset_rows=s - 1)
        return self._views[key]

    def _rows(self, a):
        return (a.x if isinstance(a, _Norm) else a).shape[0]

    def matmul(self, key, a, w, out, epilogue):
        """out (=, +=, swiglu) a W^T: the GEMV (normalising x on the fly) for a few tokens, else an RMSNorm
        kernel (if a is a pending norm) and the GEMM."""
        from numbattn import linear, rowwise
        words, kind = w
        x, norm = (a.x, a.w) if isinstance(a, _Norm) else (a, None)
        M = x.shape[0]
        if M <= self.gemv_max:
            kernel = linear.make_gemv(x.shape[1], kind, M, epilogue, norm is not None)
            args = (x, words, out, norm if norm is not None else self.norm, self.eps)
            self.launch(key + (M,), kernel, linear.gemv_grid(words.shape[0], epilogue), linear.GEMV_THREADS, args)
            return out
        if norm is not None:
            h = self.view("h", M)
            self.launch(("norm", id(norm), M), rowwise.make_rms_norm(), M, rowwise.THREADS, (x, norm, self.eps, h))
            x = h
        tiles = linear.gemm_tiles(M, words.shape[0])
        self.launch(key + (M,), linear.make_gemm(kind, epilogue, tiles), linear.gemm_grid(M, words.shape[0], tiles),
                    tiles[3], (x, words, out))
        return out

    # ---- one forward, replayed as a CUDA graph for decode steps --------------------------------------------
    def _bucket(self, n):
        """The context bucket of a decode step at n tokens (never past the cache: its grid is sized by it)."""
        return min(next((b for b in self.buckets if n <= b), self.cache.max_len), self.cache.max_len)

    def run(self, forward, ids, start_pos, last_only):
        """forward(ids, start_pos, last_only) on this engine. On a GPU a decode step (one token per row) runs
        normally the first time in its context bucket, is recorded as a CUDA graph the second time, and is
        replayed from then on: one driver call per token instead of ~150 launches."""
        B, s = ids.shape
        if s > self.prefill_chunk:          # the buffers hold prefill_chunk tokens per row: run it in chunks
            c = self.prefill_chunk
            parts = [forward(ids[:, i:i + c], start_pos + i, last_only) for i in range(0, s, c)]
            return parts[-1] if last_only else np.concatenate(parts, axis=1)
        if not (self.use_graphs and s == 1):
            return forward(ids, start_pos, last_only)
        bucket = self._bucket(start_pos + 1)
        key = (B, bucket)
        graph = self._graphs.get(key)
        if graph is None and key not in self._warm:
            self._warm.add(key)            # first step in this bucket: compile and prepare every launch
            return forward(ids, start_pos, last_only)
        self.ids_host[:B] = ids[:, 0]
        if graph is None:
            graph = self._graphs[key] = self._capture(forward, ids, start_pos, bucket)
        else:
            self.cache.advance(1)          # what the replay's appends do on the device, on the host mirror
        graph.replay()
        self.stream.synchronize()
        return self.logits_host.copy()[:, None, :]

    def _capture(self, forward, ids, start_pos, bucket):
        from numbattn.launch import Graph
        graph = Graph(self.stream)
        self._capturing = bucket
        try:
            with graph.capture():
                forward(ids, start_pos, True)   # recorded, not run: the host mirror advanced, the replay does the rest
        finally:
            self._capturing = None
        return graph


def _prefix(cache_array, n):
    """cache_array[:, :, :n] as a view, made directly (Numba's own slicing walks every contiguous piece: ~3 ms
    per layer on the host for a prompt's K and V)."""
    from numbattn.device import SIM
    if SIM:
        return cache_array[:, :, :n]
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    b, h, _, d = cache_array.shape
    return DeviceNDArray((b, h, n, d), cache_array.strides, cache_array.dtype, gpu_data=cache_array.gpu_data)


def _strided(buf, shape, strides, offset_rows=0):
    """A view of the 2-D float32 device buffer `buf`, from row offset_rows on, with the given shape and element
    strides (no copy): e.g. the query heads inside the fused q/k/v buffer, as [batch, heads, seq, head_dim]."""
    from numbattn.device import SIM
    itemsize = buf.dtype.itemsize
    strides = tuple(s * itemsize for s in strides)
    if SIM:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        return FakeCUDAArray(np.lib.stride_tricks.as_strided(buf._ary[offset_rows:], shape, strides))
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    start = offset_rows * buf.strides[0]
    return DeviceNDArray(shape, strides, buf.dtype, gpu_data=buf.gpu_data.view(start) if start else buf.gpu_data)
