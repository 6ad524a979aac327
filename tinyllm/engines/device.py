"""DeviceEngine: the forward on the GPU (or in Numba's simulator), weights resident, every op a numbattn kernel.

Only the token ids go in and the logits come out (tinyllm/engines/__init__.py lists the ops). The ops return
handles to device buffers, and two of them are deferred so that they fuse into the kernel after them: rms_norm
returns a pending norm that the next matmul applies while it loads x (the GEMV's prologue), and rope returns
pending rotations that attention applies while it appends k and v (numbattn.kernels.rowwise.rope_append). On a GPU,
a decode step (one token per row) is captured once per context bucket as a CUDA graph and then replayed with one
driver call (numbattn/launch.py).
"""
import numpy as np

import numbattn
from numbattn import linear, prefill
from numbattn.kernels import rowwise
from numbattn.kernels.common import SIM
from numbattn.launch import Graph, Launch

from ..units import human_bytes
from .step import Step


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
        self.config, self.weights, self.cache, self.backend = config, weights, cache, backend
        self.layers, self.norm = weights.layers, weights.norm
        self.stream = cuda.stream()
        self.cos, self.sin = cuda.to_device(cos, stream=self.stream), cuda.to_device(sin, stream=self.stream)
        c = config
        self.H, self.HKV, self.D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.QKV = (self.H + 2 * self.HKV) * self.D
        self.eps = np.float32(c.rms_norm_eps)
        self.use_graphs = backend == "cuda"
        B, rows = self.sizes(cache)
        self.buf = {name: cuda.device_array((rows, width), np.float32, stream=self.stream) for name, width in (
            ("x", c.hidden_size), ("h", c.hidden_size), ("qkv", self.QKV), ("attn", self.H * self.D),
            ("g", c.intermediate_size))}
        self.ids_host = cuda.pinned_array(rows, np.int32)
        self.ids_dev = cuda.device_array(rows, np.int32, stream=self.stream)
        self.logits_dev = cuda.device_array((B, c.vocab_size), np.float32, stream=self.stream)
        self.logits_host = cuda.pinned_array((B, c.vocab_size), np.float32)
        self._views, self._launches, self._graphs, self._warm = {}, {}, {}, set()

    def sizes(self, cache):
        """(the most rows a step has, the most token rows its activation buffers hold)."""
        return cache.batch, cache.batch * self.prefill_chunk

    def describe(self):
        kinds = "/".join(self.weights.kinds)
        where = "the GPU" if self.backend == "cuda" else "the simulated device (host memory)"
        return (f"device engine ({self.backend}): weights on {where} ({human_bytes(self.weights.nbytes)} of "
                f"{kinds} words), KV cache {human_bytes(self.cache.nbytes)} {self.cache.dtype.name}, every op a "
                f"numbattn kernel{'; decode steps replayed as CUDA graphs' if self.use_graphs else ''}")

    # ---- views and launches, made once per shape ----------------------------------------------------------
    def view(self, name, rows):
        """The first `rows` rows of buffer `name` (a view made once)."""
        key = (name, rows)
        if key not in self._views:
            self._views[key] = self.buf[name][:rows]
        return self._views[key]

    def launch(self, key, kernel, grid, block, args):
        """Launch kernel, through a prepared Launch kept under `key` while its arguments stay the same objects."""
        prepared = self._launches.get(key)
        if prepared is None or any(a is not b for a, b in zip(prepared.args, args)):
            if len(self._launches) > 4096:
                self._launches.clear()
            prepared = self._launches[key] = Launch(kernel, grid, block, args, self.stream)
        prepared()

    # ---- the ops ----------------------------------------------------------------------------------------
    def embed(self, ids):
        B, s = ids.shape
        M = B * s
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

    def rope(self, q, k, step):
        return _Rotate(q), k

    def attention(self, layer, q, k, v, step):
        """RoPE + append (one kernel), then decode (one token per row) or prefill attention over the cache."""
        B, s = step.batch, step.seq
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
                                      max_length=step.max_length or self._bucket(step.start_pos + 1))
        else:
            self._prefill_attention(layer, qkv, attn, B, s, step.start_pos + s)
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

    def logits(self, h, step):
        """The output head on the last token of every row (step.last_only) or on every token -> a host float32
        array [b, 1 or s, vocab] that the stream fills: valid once run() has synchronised it."""
        B, s = step.batch, step.seq
        if step.last_only or s == 1:
            last = self._last_rows(h.x, B, s)
            out_dev, out_host = self._logit_rows(B)       # only the step's rows come back (a paged step: <= max)
            self.matmul(("logits", B), _Norm(last, h.w), self.weights.lm_head, out_dev, "none")
            out_dev.copy_to_host(out_host, stream=self.stream)
            return self.logits_host[:, None, :]
        from numba import cuda
        every = cuda.device_array((B * s, self.config.vocab_size), np.float32, stream=self.stream)
        self.matmul(("logits all",), h, self.weights.lm_head, every, "none")
        return every.copy_to_host(stream=self.stream).reshape(B, s, -1)

    def _logit_rows(self, B):
        key = ("logit rows", B)
        if key not in self._views:
            self._views[key] = ((self.logits_dev, self.logits_host) if B == len(self.logits_host)
                                else (self.logits_dev[:B], self.logits_host[:B]))
        return self._views[key]

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
        words, kind = w
        x, norm = (a.x, a.w) if isinstance(a, _Norm) else (a, None)
        M = x.shape[0]
        if M <= linear.GEMV_MAX_TOKENS:
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
        """forward(ids, step) on this engine -> host logits. On a GPU a decode step (one token per row) runs normally
        the first time in its context bucket, is recorded as a CUDA graph the second time, and is replayed from
        then on: one driver call per token instead of ~150 launches. The forward replayed is the forward recorded:
        the same ops on the same buffers, whose per-step values (token ids, positions) live in device memory."""
        B, s = ids.shape
        if s > self.prefill_chunk:
            raise ValueError(f"{s} tokens in one forward: the device buffers hold {self.prefill_chunk} per row "
                             f"(Llama.forward runs longer prompts in chunks)")
        if not (self.use_graphs and s == 1):
            logits = forward(ids, Step(B, s, start_pos, last_only))
            self.stream.synchronize()
            return np.array(logits)
        bucket = self._bucket(start_pos + 1)
        step = Step(B, 1, start_pos, True, max_length=bucket)
        return self.graph_step((B, bucket), lambda: forward(ids, step), lambda: self.cache.advance(1), ids)

    def graph_step(self, key, run_forward, advance, ids):
        """One decode step through the CUDA graph kept under key: run normally the first time (compiling and preparing
        every launch), recorded the second, replayed from then on -> host logits [rows, 1, vocab]. advance(): on the
        host mirror, what a replay's appends do to the cache on the device; ids [rows, 1]: the step's tokens."""
        graph = self._graphs.get(key)
        if graph is None and key not in self._warm:
            self._warm.add(key)
            logits = run_forward()
            self.stream.synchronize()
            return np.array(logits)
        if graph is None:
            graph = self._graphs[key] = Graph(self.stream)
            with graph.capture():          # recorded, not run: the replay below runs it
                run_forward()              # (its appends advance the cache's host mirror now; the replay, the device)
        else:
            self.ids_host[:len(ids)] = ids[:, 0]
            advance()
        graph.replay()
        self.stream.synchronize()
        return self.logits_host.copy()[:, None, :]


def _prefix(cache_array, n):
    """cache_array[:, :, :n] as a view, made directly (Numba's own slicing walks every contiguous piece: ~3 ms
    per layer on the host for a prompt's K and V)."""
    if SIM:
        return cache_array[:, :, :n]
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    b, h, _, d = cache_array.shape
    return DeviceNDArray((b, h, n, d), cache_array.strides, cache_array.dtype, gpu_data=cache_array.gpu_data)


def _strided(buf, shape, strides, offset_rows=0):
    """A view of the 2-D float32 device buffer `buf`, from row offset_rows on, with the given shape and element
    strides (no copy): e.g. the query heads inside the fused q/k/v buffer, as [batch, heads, seq, head_dim]."""
    itemsize = buf.dtype.itemsize
    strides = tuple(s * itemsize for s in strides)
    if SIM:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        return FakeCUDAArray(np.lib.stride_tricks.as_strided(buf._ary[offset_rows:], shape, strides))
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    start = offset_rows * buf.strides[0]
    return DeviceNDArray(shape, strides, buf.dtype, gpu_data=buf.gpu_data.view(start) if start else buf.gpu_data)
