"""DeviceEngine: the forward on the GPU (or in Numba's simulator), weights resident, every op a numbattn kernel.

Only the token ids go in and the logits come out (tinyllm/engines/__init__.py lists the ops). The ops return
handles to device buffers, and three of them are deferred so that they fuse into the kernel after them: rms_norm
returns a pending norm that the next matmul applies while it loads x (the GEMV's prologue); qkv returns the pending
projection, and rope pending rotations, which attention computes together: for a few tokens one GEMV that
normalises x, projects q, k and v, rotates q and k and appends k and v to the cache (numbattn.linear.plan_qkv_rope:
5 launches per layer in a decode step), for a chunk a GEMM and then RoPE fused with the append
(numbattn.kernels.rowwise.rope_append). A family with q/k/v biases (Qwen2) or per-head q/k norms (Qwen3, Gemma 3)
takes the second way at any length, with its biases and norms finished by one kernel between the two
(numbattn.kernels.families.qkv_finish), and so does a sliding-window layer (Mistral, Gemma), whose K and V go to
its ring buffer (rope_append writes token p to slot p mod the ring's slots). The family's other switches
(tinyllm/architecture.py) are a kernel or an epilogue each: scaled embeddings and the final soft cap
(numbattn/kernels/families.py), sandwich norms (rowwise.rms_norm adding into x), GeGLU (the gate/up matmul's
epilogue), windows and score caps (the attention kernels). On a GPU, a decode step (one token per row) is captured
once per context bucket as a CUDA graph and then replayed with one driver call (numbattn/launch.py), and so is a
short fresh prompt.
"""
import logging
import time

import numpy as np

import numbattn
from numbattn import kernel_cache, linear, prefill
from numbattn.kernels import families, rowwise
from numbattn.kernels.common import SIM
from numbattn.launch import Graph, Launch, planning

from ..units import human_bytes
from .step import Step

log = logging.getLogger("tinyllm")


class _Norm:
    """A deferred RMSNorm: the next matmul normalises x while it loads it (or, for many tokens, a norm kernel
    runs first)."""

    def __init__(self, x, w):
        self.x, self.w = x, w


class _Qkv:
    """The q/k/v projection of h (a pending norm or x) with layer weights lw, deferred to attention(): there it is
    computed with RoPE and the cache append fused in (a few tokens), or followed by them (a chunk). norms: the
    per-head q and k norm weights head_norm() asked for; table: the layer's RoPE (cos, sin), set by rope()."""

    def __init__(self, h, lw):
        self.h, self.lw, self.norms, self.table = h, lw, {}, None


class _Part:
    """q, k or v of a pending _Qkv (the forward holds three; they share one projection)."""

    def __init__(self, qkv, name):
        self.qkv, self.name = qkv, name


class DeviceEngine:
    """The forward on the GPU (or in Numba's simulator): weights resident, every op a numbattn kernel."""
    name = "device"
    prefill_chunk = 2048        # tokens per forward pass (a longer prompt is run in chunks of this many)
    buckets = (256, 1024, 4096, 16384, 65536)   # decode graphs are captured per context bucket
    prefill_buckets = (16, 32, 64)  # a fresh prompt this short runs padded to its bucket (one graph per bucket)

    def __init__(self, config, arch, weights, cache, rope, backend):
        from numba import cuda
        self.config, self.arch, self.weights, self.cache, self.backend = config, arch, weights, cache, backend
        self.layers, self.norm = weights.layers, weights.norm
        self.stream = cuda.stream()
        self.rope_tables = {name: tuple(cuda.to_device(t, stream=self.stream) for t in cos_sin)   # cos, sin
                            for name, cos_sin in rope.items()}
        c = config
        self.H, self.HKV, self.D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.QKV = (self.H + 2 * self.HKV) * self.D
        self.eps = np.float32(c.rms_norm_eps)
        self.use_graphs = backend == "cuda"
        self.pad_short_prompts = self.use_graphs    # (the simulator can run the padded path too: the tests do)
        B, rows = self.sizes(cache)
        widths = {"x": c.hidden_size, "h": c.hidden_size, "qkv": self.QKV, "attn": self.H * self.D,
                  "g": c.intermediate_size}
        if arch.sandwich_norms:
            widths["y"] = c.hidden_size                     # a block's output before its norm joins x
        self.buf = {name: cuda.device_array((rows, width), np.float32, stream=self.stream)
                    for name, width in widths.items()}
        self.ids_host = cuda.pinned_array(rows, np.int32)
        self.ids_dev = cuda.device_array(rows, np.int32, stream=self.stream)
        self.logits_dev = cuda.device_array((B, c.vocab_size), np.float32, stream=self.stream)
        self.logits_host = cuda.pinned_array((B, c.vocab_size), np.float32)
        self._views, self._launches, self._graphs, self._warm = {}, {}, {}, set()
        self._attention_views = {}

    def sizes(self, cache):
        """(the most rows a step has, the most token rows its activation buffers hold)."""
        return cache.batch, cache.batch * self.prefill_chunk

    def describe(self):
        kinds = "/".join(self.weights.kinds)
        where = "the GPU" if self.backend == "cuda" else "the simulated device (host memory)"
        return (f"device engine ({self.backend}): weights on {where} ({human_bytes(self.weights.nbytes)} of "
                f"{kinds} words, {human_bytes(self.weights.token_bytes)} read per token), KV cache "
                f"{human_bytes(self.cache.nbytes)} {self.cache.dtype.name}, every op a numbattn kernel"
                f"{'; decode steps and short prompts replayed as CUDA graphs' * self.use_graphs}")

    # ---- views and launches, made once per shape ----------------------------------------------------------
    def view(self, name, rows):
        """The first `rows` rows of buffer `name` (a view made once)."""
        key = (name, rows)
        if key not in self._views:
            self._views[key] = self.buf[name][:rows]
        return self._views[key]

    def columns(self, name, rows, begin, end):
        """Columns begin .. end - 1 of the first `rows` rows of buffer `name` (a strided view, made once)."""
        key = (name, rows, begin, end)
        if key not in self._views:
            self._views[key] = self.view(name, rows) if (begin, end) == (0, self.buf[name].shape[1]) else \
                self.buf[name][:rows, begin:end]
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
        if self.arch.embed_scale != 1.0:                     # Gemma: x * sqrt(hidden)
            self.launch(("embed scale", M), families.make_row_map("scale"), M, families.THREADS,
                        (x, np.float32(self.arch.embed_scale)))
        return x

    def _ids_view(self, M):
        key = ("ids", M)
        if key not in self._views:
            self._views[key] = self.ids_dev[:M]
        return self._views[key]

    def rms_norm(self, x, w):
        return _Norm(x, w)

    def qkv(self, h, lw):
        pending = _Qkv(h, lw)
        return _Part(pending, "q"), _Part(pending, "k"), _Part(pending, "v")

    def head_norm(self, x, w):
        x.qkv.norms[x.name] = w                              # applied after the projection, before RoPE
        return x

    def rope(self, q, k, step, layer):
        q.qkv.table = self.rope_tables[self.arch.layers[layer].rope]
        return q, k                         # applied by attention(), with the projection and the append

    def attention(self, layer, q, k, v, step):
        """q, k, v projected, rotated and k, v appended (one or two kernels: _project_rotate_append), then decode
        (one token per row) or prefill attention over the cache."""
        B, s = step.batch, step.seq
        M = B * s
        qkv = self._project_rotate_append(layer, q.qkv, B, s)
        self.cache.advance(s, layer)
        attn = self.view("attn", M)
        if s == 1:
            q3, out3 = self._decode_views(B)
            numbattn.decode_attention(q3, self.cache, layer, scale=self.arch.attn_scale, out=out3, stream=self.stream,
                                      max_length=step.max_length or self._bucket(step.start_pos + 1),
                                      softcap=self.arch.attn_softcap)    # (a ring layer: its own window)
        else:
            self._prefill_attention(layer, qkv, attn, B, s, step.start_pos + s)
        return attn

    def _project_rotate_append(self, layer, pending, B, s):
        """-> the qkv buffer holding q rotated; k rotated and v appended to the cache at each row's length. A few
        tokens: one GEMV with the norm, RoPE and append fused (linear.plan_qkv_rope); else (or with biases or head
        norms to apply first, a ring buffer to append to, or q/k/v stored in different forms) the matmul,
        families.qkv_finish, rowwise.rope_append."""
        M, parts = B * s, _parts(pending.lw.w_qkv)
        qkv = self.view("qkv", M)
        x, norm = (pending.h.x, pending.h.w) if isinstance(pending.h, _Norm) else (pending.h, None)
        cache_args = pending.table + (self.cache.k(layer), self.cache.v(layer), self.cache.device_lengths(layer),
                                      self.cache.append_counters(layer))
        finish = self.arch.qkv_bias or bool(pending.norms)
        fused = None if finish or self.cache.kind(layer) == "ring" or len(parts) > 1 else linear.plan_qkv_rope(
            M, x.shape[1], parts[0][0].shape[0], parts[0][1], (self.H, self.HKV, self.D), norm is not None)
        if fused is not None:
            words = parts[0][0]
            kernel, grid, threads = fused
            args = (x, words, qkv, norm if norm is not None else self.norm, self.eps) + cache_args
            self.launch(("qkv rope", layer, M), kernel, grid, threads, args)
            return qkv
        self._project(pending, M)
        if finish:
            self._finish_qkv(layer, pending, qkv)
        self.launch(("rope", layer, M), rowwise.make_rope_append(self.H, self.HKV, self.D),
                    rowwise.rope_append_grid(s, B), rowwise.THREADS, (qkv,) + cache_args)
        return qkv

    def _finish_qkv(self, layer, pending, qkv):
        """q/k/v biases (Qwen2) and per-head q and k RMSNorms (Qwen3, Gemma 3), in place, one kernel."""
        bias, norm = self.arch.qkv_bias, bool(pending.norms)
        args = (qkv, pending.lw.b_qkv if bias else self.norm, pending.norms.get("q", self.norm),
                pending.norms.get("k", self.norm), self.eps)
        self.launch(("qkv finish", layer, qkv.shape[0]), families.make_qkv_finish(self.H, self.HKV, self.D, bias, norm),
                    qkv.shape[0], families.THREADS, args)

    def _project(self, pending, M):
        """The pending q/k/v projection of M tokens alone (no RoPE, no append) -> the qkv buffer [M, (H+2Hkv) D]:
        one matmul, or one per part where q, k and v are stored in different forms (each part's rows: its columns)."""
        col = 0
        for p, part in enumerate(_parts(pending.lw.w_qkv)):
            out = self.columns("qkv", M, col, col + part[0].shape[0])
            self.matmul(("qkv", id(pending.lw), p), pending.h, part, out, "none")
            col += part[0].shape[0]
        return self.view("qkv", M)

    def _decode_views(self, B):
        """q [B, H, D] inside the qkv buffer and out [B, H, D] over the attn buffer (made once)."""
        key = ("decode", B)
        if key not in self._views:
            qkv, attn = self.view("qkv", B), self.view("attn", B)
            self._views[key] = (_strided(qkv, (B, self.H, self.D), (self.QKV, self.D, 1)),
                                attn.reshape(B, self.H, self.D))
        return self._views[key]

    def _prefill_attention(self, layer, qkv, attn, B, s, n):
        """The chunk's queries over the n keys the layer has seen: every slot of a full layer, the window of a ring
        (key j in slot j mod its slots)."""
        ring = self.cache.kind(layer) == "ring"
        self._causal_prefill(*self._prefill_views(layer, qkv, attn, B, s, n), kv_len=n if ring else None,
                             window=self.cache.window(layer))

    def _causal_prefill(self, q4, out4, k_all, v_all, kv_len=None, window=None):
        """out4 = causal attention of q4 [B, H, s, D] over k_all, v_all [B, Hkv, n, D] (the mask bottom-right
        aligned: the s queries are the last s of the n tokens; a ring's n = kv_len keys in slots j mod its length),
        with the family's score scale and soft cap."""
        version = prefill.DEFAULT_VERSION
        tiles = prefill.default_tiles(version, self.backend, self.D)
        prefill.launch(q4, k_all, v_all, out4, True, self.arch.attn_scale, version, tiles, stream=self.stream,
                       kv_len=kv_len, window=window, softcap=self.arch.attn_softcap)

    def _prefill_views(self, layer, qkv, attn, B, s, n):
        """q and out [B, H, s, D] inside the qkv and attn buffers, the keys and values: a full layer's first n, a
        ring's every slot. Made once per shape (the same objects each call: prefill.launch's prepared launch then
        re-marshals nothing)."""
        ring = self.cache.kind(layer) == "ring"
        key = (layer, B, s, None if ring else n)
        if key not in self._attention_views:
            if len(self._attention_views) > 4096:          # chats prefill at ever new positions: keep it bounded
                self._attention_views.clear()
            k, v = self.cache.k(layer), self.cache.v(layer)
            self._attention_views[key] = self._query_views(qkv, attn, B, s) + ((k, v) if ring else
                                                                              (_prefix(k, n), _prefix(v, n)))
        return self._attention_views[key]

    def _query_views(self, qkv, attn, B, s):
        """(q, out) [B, H, s, D] inside the qkv and attn buffers (new views)."""
        HD = self.H * self.D
        return (_strided(qkv, (B, self.H, s, self.D), (s * self.QKV, self.D, self.QKV, 1)),
                _strided(attn, (B, self.H, s, self.D), (s * HD, self.D, HD, 1)))

    def linear(self, a, w, residual=None, post_norm=None):
        """residual += a W^T (the matmul's epilogue), or with post_norm (Gemma's sandwich) residual += norm(a W^T)."""
        if post_norm is None:
            return self.matmul(("linear", id(w)), a, w, residual, "residual" if residual is not None else "none")
        rows = self._rows(a)
        y = self.matmul(("linear", id(w)), a, w, self.view("y", rows), "none")
        self.launch(("post norm", id(post_norm), rows), rowwise.make_rms_norm(add=True), rows, rowwise.THREADS,
                    (y, post_norm, self.eps, residual))
        return residual

    def glu(self, h, lw):
        """act(h W_gate^T) * (h W_up^T), the gate/up matmul's epilogue: SwiGLU, or Gemma's GeGLU."""
        epilogue = "swiglu" if self.arch.activation == "silu" else "geglu"
        return self.matmul(("glu", id(lw)), h, lw.w_gate_up, self.view("g", self._rows(h)), epilogue)

    def logits(self, h, step):
        """The output head on the last token of every row (step.last_only) or on every token -> a host float32
        array [b, 1 or s, vocab] that the stream fills: valid once run() has synchronised it. Deferred (a padded
        short prompt): nothing here; run() takes the real last tokens' logits after the forward (_logits_at)."""
        B, s = step.batch, step.seq
        if step.defer_logits:
            return None
        if step.last_only or s == 1:
            return self._logits_at(B, s, s - 1)
        from numba import cuda
        every = cuda.device_array((B * s, self.config.vocab_size), np.float32, stream=self.stream)
        self._soft_cap(self.matmul(("logits all",), h, self.weights.lm_head, every, "none"))
        return every.copy_to_host(stream=self.stream).reshape(B, s, -1)

    def _logits_at(self, B, s, row):
        """The output head on token `row` of each of the B rows of s tokens that the last forward left in the
        residual stream (the x buffer), normalised by the final norm -> host logits [rows, 1, vocab] (once synced;
        only the first B rows are the step's: a paged step has B <= the rows the buffer holds)."""
        x = self.view("x", B * s)
        last = x if s == 1 else self._last_rows(x, B, s, row)
        out_dev, out_host = self._logit_rows(B)           # only the step's rows come back
        self._soft_cap(self.matmul(("logits", B, s, row), _Norm(last, self.norm), self.weights.lm_head, out_dev,
                                   "none"))
        out_dev.copy_to_host(out_host, stream=self.stream)
        return self.logits_host[:, None, :]

    def _logit_rows(self, B):
        """The first B rows of the logits buffers, device and host (views made once)."""
        key = ("logit rows", B)
        if key not in self._views:
            self._views[key] = ((self.logits_dev, self.logits_host) if B == len(self.logits_host)
                                else (self.logits_dev[:B], self.logits_host[:B]))
        return self._views[key]

    def _soft_cap(self, logits):
        """Gemma 2's final soft cap, in place (nothing for the other families)."""
        if self.arch.final_softcap is not None:
            M = logits.shape[0]
            self.launch(("soft cap", M), families.make_row_map("soft cap"), M, families.THREADS,
                        (logits, np.float32(self.arch.final_softcap)))

    def _last_rows(self, x, B, s, row):
        """Token `row` of each of the B rows of s tokens in x [B * s, dim], as a [B, dim] view (made once)."""
        key = ("last", B, s, row)
        if key not in self._views:
            self._views[key] = _strided(x, (B, x.shape[1]), (s * x.shape[1], 1), offset_rows=row)
        return self._views[key]

    def _rows(self, a):
        return (a.x if isinstance(a, _Norm) else a).shape[0]

    def matmul(self, key, a, w, out, epilogue):
        """out (=, +=, swiglu) a W^T: the GEMV (normalising x on the fly) for a few tokens, else an RMSNorm
        kernel (if a is a pending norm) and a GEMM (numbattn.linear.plan_matmul chooses)."""
        words, kind = w
        x, norm = (a.x, a.w) if isinstance(a, _Norm) else (a, None)
        M = x.shape[0]
        if norm is not None and not linear.use_gemv(M, x.shape[1]):
            h = self.view("h", M)
            self.launch(("norm", id(norm), M), rowwise.make_rms_norm(), M, rowwise.THREADS, (x, norm, self.eps, h))
            x, norm = h, None
        kernel, grid, threads, gemv = linear.plan_matmul(M, x.shape[1], words.shape[0], kind, epilogue,
                                                         norm is not None)
        args = (x, words, out, norm if norm is not None else self.norm, self.eps) if gemv else (x, words, out)
        self.launch(key + (M,), kernel, grid, threads, args)
        return out

    # ---- every kernel compiled before the first reply ------------------------------------------------------
    def plan(self, forward):
        """-> [(kernel, argument types)] of every launch a generation can make: the forward planned, nothing run
        (numbattn.launch.planning), at one chunk length per matmul kernel choice (numbattn.linear.token_classes:
        1-4 tokens, then one per tile class) and as a decode step. The cache is left empty."""
        B = self.cache.batch
        with planning() as plan:
            for s in linear.token_classes(min(self.prefill_chunk, self.cache.max_len)):
                forward(np.zeros((B, s), np.int64), Step(B, s, 0, True))
                self.cache.truncate(0)          # its appends advanced the host's lengths only
            forward(np.zeros((B, 1), np.int64), Step(B, 1, 0, True, max_length=self._bucket(1)))
            self.cache.truncate(0)
        return plan

    def prepare(self, forward, progress=None):
        """Compile, or load from the disk cache (numbattn/kernel_cache.py), every kernel of self.plan(forward) now,
        not in the middle of a reply. progress(i, n, name) counts the kernels compiled. -> (loaded, compiled)."""
        if self.backend != "cuda":          # the simulator compiles nothing
            return 0, 0
        t0 = time.perf_counter()
        loaded, compiled = kernel_cache.prepare(self.plan(forward), progress)
        log.info("tinyllm: %d kernels compiled, %d loaded from %s (%.1f s)", compiled, loaded, kernel_cache.cache_dir(),
                 time.perf_counter() - t0)
        return loaded, compiled

    # ---- one forward, replayed as a CUDA graph for decode steps --------------------------------------------
    def _bucket(self, n):
        """The context bucket of a decode step at n tokens (never past the cache: its grid is sized by it)."""
        return min(next((b for b in self.buckets if n <= b), self.cache.max_len), self.cache.max_len)

    def run(self, forward, ids, start_pos, last_only):
        """forward(ids, step) on this engine -> host logits. On a GPU two kinds of forward are replayed as CUDA
        graphs, each captured per bucket (_replay_or_run): a decode step (one token per row), per context bucket,
        and a fresh prompt of at most 64 tokens, padded to 16, 32 or 64 tokens (_short_prompt). One driver call
        then replaces ~150 launches."""
        B, s = ids.shape
        if s > self.prefill_chunk:
            raise ValueError(f"{s} tokens in one forward: the device buffers hold {self.prefill_chunk} per row "
                             f"(Llama.forward runs longer prompts in chunks)")
        if self.use_graphs and s == 1:
            bucket = self._bucket(start_pos + 1)
            self._replay_or_run((B, bucket), forward, ids, Step(B, 1, start_pos, True, max_length=bucket))
            return self._host_logits()
        padded = next((n for n in self.prefill_buckets if s <= n), None)
        if self.pad_short_prompts and last_only and start_pos == 0 and padded and padded <= self.cache.max_len:
            return self._short_prompt(forward, ids, padded)
        logits = forward(ids, Step(B, s, start_pos, last_only))
        self.stream.synchronize()
        return np.array(logits)

    def _short_prompt(self, forward, ids, n):
        """A fresh prompt of s tokens per row, run as n >= s (its bucket): padding tokens after it, which causal
        attention keeps out of every real token's view, so the n-token forward is one graph for every s of the
        bucket. The logits are those of token s - 1; the padding's K and V leave the cache again (NaN)."""
        B, s = ids.shape
        padded = np.zeros((B, n), np.int64)
        padded[:, :s] = ids
        self._replay_or_run(("prompt", B, n), forward, padded, Step(B, n, 0, True, defer_logits=True))
        self._logits_at(B, n, s - 1)
        logits = self._host_logits()
        self.cache.truncate(s)
        return logits

    def _replay_or_run(self, key, forward, ids, step):
        """forward(ids, step): run normally the first time under key (compiling, preparing every launch), recorded
        as a CUDA graph the second time, replayed from then on (without graphs: always run). The forward replayed
        is the forward recorded: the same ops on the same buffers, whose per-call values (token ids, positions,
        a paged step's rows) live in device memory. Written once for every graph: the contiguous decode steps,
        the short prompts and the paged decode steps (engines/paged.py)."""
        graph = self._graphs.get(key)
        if not self.use_graphs or (graph is None and key not in self._warm):
            self._warm.add(key)
            forward(ids, step)
            return
        if graph is None:
            graph = self._graphs[key] = Graph(self.stream)
            with graph.capture():          # recorded, not run: the replay below runs it
                forward(ids, step)         # (its appends advance the cache's host mirror now; the replay, the device)
        else:
            self.ids_host[:ids.size] = ids.reshape(-1)
            self._advance_mirror(step)     # what the replay's appends do on the device, on the host mirror
        graph.replay()

    def _advance_mirror(self, step):
        """The cache's host lengths, after a replayed step appended its tokens on the device."""
        self.cache.advance(step.seq)

    def _host_logits(self):
        """Once the stream has run the step: a copy of its host logits [rows, 1, vocab]."""
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


def _parts(w_qkv):
    """The q/k/v weights as a list of (words, kind): one stacked matrix, or the parts stored in different forms."""
    return w_qkv if isinstance(w_qkv, list) else [w_qkv]


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
