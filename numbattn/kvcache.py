"""The KV cache: keys and values of every token seen so far, kept where the kernels run, plus the append kernel.

What you will learn here
------------------------
Generation runs the model once over the prompt (prefill) and then once per new token (decode). Every step
needs the keys and values of all earlier tokens; recomputing them would make step n cost O(n) matmuls, so they
are stored once and appended to. llama2.c-style, everything is allocated up front:

    k(layer), v(layer)   [batch, n_kv_heads, max_len, head_dim] per layer, float32 (default) or float16
                         storage; on the GPU (Numba device arrays) under the cuda and sim backends, NumPy
                         arrays under numpy. Math on them is always float32.
    lengths              tokens held, per layer and per row (rows of a batch may hold different counts after
                         a per-row truncate). The host keeps the authoritative int32 [n_layers, batch] table.

Unused slots (past a row's length) are filled with NaN at construction, on reset(), and when truncate()
rewinds a row: any kernel that reads an unused slot poisons its output, and the tests see it.

Bookkeeping. append(layer, k, v) writes t new tokens of that layer at each row's own length and advances that
layer's lengths by t. A model step appends to layer 0, 1, ... in turn, so mid-step the layers differ;
`cache.lengths` is the minimum over layers, i.e. the tokens that EVERY layer holds: after a complete step that
is simply "tokens in the cache", and it is the position of the next token. layer_lengths(layer) gives one
layer's row lengths.

The append kernel lives in numbattn/kernels/kv_append.py: one launch writes the new tokens' K and V at each row's
length, and the device copy of the lengths is advanced by the kernel itself (its last block), so nothing is
uploaded per append and a sequence of steps can be replayed as a CUDA graph. The host keeps a mirror of the
table, advanced by the same amounts, so cache.lengths never needs a device->host copy. Decode reads
device_lengths(layer).

One owner: the cache's lengths (device table and host mirror) and its decode workspace are written only here,
one method per event: append (and advance, for kernels that appended on their own: tinyllm's fused RoPE+append,
a CUDA graph's replay), truncate, reset.

Host inputs: a bulk append copies k and v to the device once; a one-token append (the decode hot path of the
NumPy-matmul engine, once per layer per token) goes through a staging buffer kept by the cache, one copy for K
and V together. Host-side costs are measured in BENCHMARKS.md.

Validation comes first: a call that would overflow max_len, or has a bad layer, dtype or shape, raises
ValueError before anything is written, so the cache is unchanged after any failed call.
"""
import numpy as np
from numba import cuda

from . import backend as _backend
from .kernels.kv_append import append_kv, fill_nan
from .validate import DTYPES, SUPPORTED_HEAD_DIMS, as_count, check_dtype, check_rank

# launch shape of the copy kernels: on the GPU enough blocks to spread a long prompt over the SMs; in the
# simulator (one Python thread per CUDA thread) a single small block per (row, KV head)
GPU_COPY = (256, 64)    # threads per block, most blocks per (row, KV head); a grid-stride loop covers the rest
SIM_COPY = (16, 1)


def _grid_x(n_elements, copy_shape):
    threads, most = copy_shape
    return max(1, min(most, -(-n_elements // threads)))


def check_append(k_new, v_new, k_cache, lengths_in, lengths_out, counters):
    """Shapes and dtypes of one append: k_new, v_new [batch, n_kv_heads, t, head_dim] into the cache."""
    layout = "[batch, n_kv_heads, t, head_dim]"
    for name, x in (("k", k_new), ("v", v_new)):
        check_rank(name, x, 4, layout)
        check_dtype(name, x)
    if tuple(k_new.shape) != tuple(v_new.shape):
        raise ValueError(f"k has shape {tuple(k_new.shape)} but v has {tuple(v_new.shape)}; they must match")
    b, h, _, d = k_cache.shape
    if tuple(k_new.shape[:2]) != (b, h) or k_new.shape[3] != d or k_new.shape[2] < 1:
        raise ValueError(f"k has shape {tuple(k_new.shape)}; expected ({b}, {h}, t, {d}) with t >= 1 "
                         f"(the cache holds batch {b}, n_kv_heads {h}, head_dim {d})")
    for name, x in (("lengths_in", lengths_in), ("lengths_out", lengths_out), ("counters", counters)):
        if tuple(x.shape) != (b,) or np.dtype(x.dtype) != np.int32:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, dtype {np.dtype(x.dtype).name}; "
                             f"expected ({b},) int32")


def launch_append(k_new, v_new, k_cache, v_cache, lengths_in, lengths_out, counters, copy_shape=GPU_COPY,
                  stream=0):
    """Append on device arrays, one launch: new tokens go to slots lengths_in[b].. of row b, and
    lengths_out[b] = lengths_in[b] + t (the same array: advanced in place). counters: int32 [batch] zeros, used
    to find each row's last block. With two different length arrays every call writes the same slots (handy
    for timing). The caller guarantees lengths_in[b] + t <= max_len (KVCache.append checks it on the host);
    rows that would overflow are skipped by the kernel, never written out of bounds.
    """
    check_rank("k_cache", k_cache, 4, "[batch, n_kv_heads, max_len, head_dim]")
    check_dtype("k_cache", k_cache)
    if tuple(v_cache.shape) != tuple(k_cache.shape) or np.dtype(v_cache.dtype) != np.dtype(k_cache.dtype):
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)}, dtype {np.dtype(v_cache.dtype).name}; "
                         f"expected k_cache's {tuple(k_cache.shape)}, {np.dtype(k_cache.dtype).name}")
    check_append(k_new, v_new, k_cache, lengths_in, lengths_out, counters)
    batch, n_kv_heads, t, head_dim = k_new.shape
    grid = (_grid_x(t * head_dim, copy_shape), n_kv_heads, batch)
    append_kv[grid, copy_shape[0], stream](k_new, v_new, k_cache, v_cache, lengths_in, lengths_out, counters)


class KVCache:
    """Per-layer K and V buffers [batch, n_kv_heads, max_len, head_dim] and per-row lengths.

        cache = KVCache(n_layers, batch, n_kv_heads, max_len, head_dim, dtype=np.float32, backend="auto")
        cache.append(layer, k, v)      # k, v [batch, n_kv_heads, t, head_dim], host or device, fp32/fp16
        cache.lengths                  # host int32 [batch]: tokens every layer holds
        out = numbattn.decode_attention(q, cache, layer)
        cache.truncate(n)              # keep at most n tokens per row (int, or int array [batch])
        cache.reset()                  # empty, every slot NaN again
    """

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, dtype=np.float32, backend="auto"):
        for name, x in (("n_layers", n_layers), ("batch", batch), ("n_kv_heads", n_kv_heads),
                        ("max_len", max_len), ("head_dim", head_dim)):
            if as_count(name, x) < 1:
                raise ValueError(f"{name}={x} must be >= 1")
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim={head_dim}; the kernels support {SUPPORTED_HEAD_DIMS}")
        try:
            dtype = np.dtype(dtype)
        except TypeError as e:
            raise ValueError(f"dtype={dtype!r} is not a NumPy dtype") from e
        if dtype not in [np.dtype(d) for d in DTYPES]:
            raise ValueError(f"dtype={dtype.name}; the cache stores float32 or float16")
        self.n_layers, self.batch, self.n_kv_heads = int(n_layers), int(batch), int(n_kv_heads)
        self.max_len, self.head_dim, self.dtype = int(max_len), int(head_dim), dtype
        self.backend = _backend.resolve(backend)
        self.on_device = self.backend != "numpy"
        self.shape = (self.batch, self.n_kv_heads, self.max_len, self.head_dim)
        self._copy_shape = SIM_COPY if self.backend == "sim" else GPU_COPY
        self._lengths = np.zeros((self.n_layers, self.batch), np.int32)    # the host mirror of the lengths
        self._token_buffers = {}    # dtype -> device staging buffer for one decode token's k and v
        self._workspace = None          # numbattn.decode's buffers for this cache, made on first use
        if self.on_device:
            self._k = [cuda.device_array(self.shape, dtype) for _ in range(self.n_layers)]
            self._v = [cuda.device_array(self.shape, dtype) for _ in range(self.n_layers)]
            self._len_dev = cuda.to_device(np.zeros((self.n_layers, self.batch), np.int32))
            self._counters = cuda.to_device(np.zeros((self.n_layers, self.batch), np.int32))
            # views made once: slicing a device array per call would cost Python time on the hot path
            self._len_views = [self._len_dev[i] for i in range(self.n_layers)]
            self._counter_views = [self._counters[i] for i in range(self.n_layers)]
        else:
            self._k = [np.empty(self.shape, dtype) for _ in range(self.n_layers)]
            self._v = [np.empty(self.shape, dtype) for _ in range(self.n_layers)]
        self.reset()

    def __repr__(self):
        return (f"KVCache(n_layers={self.n_layers}, batch={self.batch}, n_kv_heads={self.n_kv_heads}, "
                f"max_len={self.max_len}, head_dim={self.head_dim}, dtype={self.dtype.name}, "
                f"backend={self.backend!r}, lengths={self.lengths.tolist()})")

    @staticmethod
    def bytes_per_token(n_layers, n_kv_heads, head_dim, dtype=np.float32):
        """Bytes one token takes in a cache of this shape: K and V, every layer and KV head."""
        return 2 * n_layers * n_kv_heads * head_dim * np.dtype(dtype).itemsize

    @property
    def nbytes(self):
        """Bytes of K/V storage this cache holds (allocated up front: batch * max_len tokens)."""
        return self.batch * self.max_len * self.bytes_per_token(self.n_layers, self.n_kv_heads, self.head_dim,
                                                                self.dtype)

    # ---- bookkeeping ------------------------------------------------------------------------------------
    @property
    def lengths(self):
        """Host int32 [batch]: tokens that every layer holds (a copy; the minimum over layers)."""
        return self._lengths.min(axis=0).astype(np.int32)

    def layer_lengths(self, layer):
        """Host int32 [batch]: tokens held by one layer, per row (a copy)."""
        return self._lengths[self.check_layer(layer)].copy()

    def host_lengths_view(self, layer):
        """Host int32 [batch]: one layer's row lengths as a read-only view (follows every later change)."""
        view = self._lengths[self.check_layer(layer)].view()
        view.flags.writeable = False
        return view

    def decode_workspace(self):
        """The buffers numbattn.decode keeps for this cache (made on first use; device caches only)."""
        if self._workspace is None:
            self._workspace = DecodeWorkspace(self)
        return self._workspace

    def device_lengths(self, layer):
        """Device int32 [batch]: the current device copy of layer's row lengths (what decode reads)."""
        if not self.on_device:
            raise ValueError(f"device_lengths: this cache lives on the host (backend {self.backend!r})")
        return self._len_views[self.check_layer(layer)]

    def append_counters(self, layer):
        """Device int32 [batch], zero between launches: the append kernels' last-block tickets for `layer`."""
        return self._counter_views[self.check_layer(layer)]

    def check_layer(self, layer):
        if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)):
            raise ValueError(f"layer={layer!r} must be an integer in [0, {self.n_layers})")
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer={layer} is out of range: the cache has {self.n_layers} layers")
        return int(layer)

    def k(self, layer):
        """The K storage of one layer, [batch, n_kv_heads, max_len, head_dim] (device or host array)."""
        return self._k[self.check_layer(layer)]

    def v(self, layer):
        return self._v[self.check_layer(layer)]

    def _upload_lengths(self):
        """Host table -> device (reset/truncate only: rare, so a synchronous copy is fine)."""
        self._len_dev.copy_to_device(self._lengths)

    def advance(self, t, layer=None):
        """Record on the host that kernels launched elsewhere (tinyllm's GPU engine: RoPE fused with the append,
        or a CUDA graph's replay) appended t tokens to every row of `layer` (default: of every layer). The
        device table was advanced by those kernels themselves."""
        t = as_count("t", t)
        rows = self._lengths if layer is None else self._lengths[self.check_layer(layer)]
        if int(rows.max()) + t > self.max_len:
            raise ValueError(f"advance({t}): the cache holds {rows.max()} of {self.max_len} tokens")
        rows += np.int32(t)

    def _stage_token(self, k, v):
        """One decode token's host k, v -> device, through one reused buffer and one copy.

        Two cuda.to_device calls would be two allocations and two copies per layer per token; one copy into a
        kept buffer is a fraction of that host time. The copy is ordered on the stream after the kernels that
        read the previous token, so reusing the buffer is safe.
        """
        dtype = np.result_type(k.dtype, v.dtype)
        if dtype.str not in self._token_buffers:
            buf = cuda.device_array((2, self.batch, self.n_kv_heads, 1, self.head_dim), dtype)
            self._token_buffers[dtype.str] = (buf, buf[0], buf[1])    # views made once
        buf, dk, dv = self._token_buffers[dtype.str]
        buf.copy_to_device(np.stack([k, v]).astype(dtype, copy=False))
        return dk, dv

    # ---- operations -------------------------------------------------------------------------------------
    def reset(self):
        """Empty every layer; every slot becomes NaN again."""
        self._lengths[:] = 0
        poison = np.full(self.shape, np.nan, self.dtype)
        for layer in range(self.n_layers):
            if self.on_device:
                self._k[layer].copy_to_device(poison)
                self._v[layer].copy_to_device(poison)
            else:
                self._k[layer][...] = poison
                self._v[layer][...] = poison
        if self.on_device:
            self._upload_lengths()

    def append(self, layer, k, v):
        """Write k, v [batch, n_kv_heads, t, head_dim] at each row's current length of `layer`; advance it by t."""
        layer = self.check_layer(layer)
        for name, x in (("k", k), ("v", v)):
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                raise ValueError(f"{name} must be a NumPy or device array; got {type(x).__name__}")
        lengths = self._lengths[layer]
        lengths_dev = self._len_views[layer] if self.on_device else lengths
        check_append(k, v, self._k[layer], lengths_dev, lengths_dev, lengths_dev)
        t = k.shape[2]
        if int(lengths.max()) + t > self.max_len:
            rows = np.flatnonzero(lengths + t > self.max_len).tolist()
            raise ValueError(f"append of {t} tokens to layer {layer} overflows max_len {self.max_len}: rows "
                             f"{rows} hold {lengths[rows].tolist()} tokens; nothing was written")
        new_lengths = (lengths + t).astype(np.int32)

        def numpy_path():   # also the fallback if the kernel fails: host copies in, device copies back
            kh, vh = _backend.to_host(k), _backend.to_host(v)
            K = self._k[layer].copy_to_host() if self.on_device else self._k[layer]
            V = self._v[layer].copy_to_host() if self.on_device else self._v[layer]
            for b, n in enumerate(lengths):
                K[b, :, n:n + t] = kh[b]
                V[b, :, n:n + t] = vh[b]
            if self.on_device:
                self._k[layer].copy_to_device(K)
                self._v[layer].copy_to_device(V)
                self._len_views[layer].copy_to_device(new_lengths)

        def kernel_path():
            if _backend.is_device_array(k) or _backend.is_device_array(v) or t != 1:
                dk, dv = (x if _backend.is_device_array(x) else cuda.to_device(np.ascontiguousarray(x))
                          for x in (k, v))
            else:
                dk, dv = self._stage_token(k, v)
            lengths_dev = self._len_views[layer]
            launch_append(dk, dv, self._k[layer], self._v[layer], lengths_dev, lengths_dev,
                          self._counter_views[layer], self._copy_shape)

        _backend.run("KV-cache append", self.backend, kernel_path, numpy_path)
        self._lengths[layer] = new_lengths

    def truncate(self, n):
        """Keep at most n tokens in every layer and row (n: int, or int array [batch] for per-row limits).

        The chat CLI keeps the cached prefix that the next turn shares with this one. Rewound slots are
        NaN-poisoned again, like never-written ones.
        """
        values = n.tolist() if isinstance(n, np.ndarray) else n              # Python ints: no wrap-around
        if isinstance(n, np.ndarray) and (n.dtype.kind not in "iu" or n.shape not in ((), (self.batch,))):
            raise ValueError(f"n has shape {n.shape} and dtype {n.dtype.name}; expected an int or an int array "
                             f"of shape ({self.batch},)")
        if isinstance(n, (float, np.floating)):
            raise ValueError(f"n={n!r} has dtype {np.asarray(n).dtype.name}; expected an int or an int array")
        counts = [as_count("n", x) for x in (values if isinstance(values, list) else [values])]
        if min(counts) < 0:
            raise ValueError(f"n={counts if isinstance(values, list) else counts[0]} must be >= 0")
        limit = np.array([min(c, self.max_len) for c in counts], np.int64)
        new = np.minimum(self._lengths, limit).astype(np.int32)   # [n_layers, batch]
        for layer in range(self.n_layers):
            old = self._lengths[layer]
            if (new[layer] == old).all():
                continue
            K, V = self._k[layer], self._v[layer]

            def numpy_path(K=K, V=V, lo=new[layer], hi=old):
                Kh, Vh = (_backend.to_host(x) for x in (K, V))
                for b in range(self.batch):
                    Kh[b, :, lo[b]:hi[b]] = np.nan
                    Vh[b, :, lo[b]:hi[b]] = np.nan
                if self.on_device:
                    K.copy_to_device(Kh)
                    V.copy_to_device(Vh)

            def kernel_path(K=K, V=V, lo=new[layer], hi=old):
                span = int((hi - lo).max()) * self.head_dim
                grid = (_grid_x(span, self._copy_shape), self.n_kv_heads, self.batch)
                fill_nan[grid, self._copy_shape[0]](K, V, cuda.to_device(lo), cuda.to_device(hi.copy()))

            _backend.run("KV-cache truncate", self.backend, kernel_path, numpy_path)
        self._lengths[:] = new
        if self.on_device:
            self._upload_lengths()


class DecodeWorkspace:
    """What decode_attention keeps per KVCache (cache.decode_workspace()): the split partials and tickets, device
    buffers for host queries, and one prepared launch per (layer, arguments), so a repeated call does no
    allocation, no upload and no re-validation."""

    def __init__(self, cache):
        self.batch, self.head_dim = cache.batch, cache.head_dim
        self._partials = None
        self.counters = cuda.to_device(np.zeros(cache.batch * cache.n_kv_heads, np.int32))
        self._io = {}
        self.calls = {}

    def partials(self, n_heads, n_splits):
        """part [batch, n_heads, >= n_splits, head_dim + 2] float32, grown (doubled) for longer contexts."""
        have = self._partials
        if have is None or have.shape[1] != n_heads or have.shape[2] < n_splits:
            room = max(n_splits, 2 * have.shape[2]) if have is not None else n_splits
            self._partials = cuda.device_array((self.batch, n_heads, room, self.head_dim + 2), np.float32)
        return self._partials

    def host_io(self, q):
        """Device buffers (q, out) for a host query of q's shape and dtype, reused across calls."""
        key = (tuple(q.shape), np.dtype(q.dtype).str)
        if key not in self._io:
            self._io[key] = (cuda.device_array(q.shape, q.dtype), self.out_buffer(q.shape, ("host", key)))
        return self._io[key]

    def out_buffer(self, shape, key):
        """A float32 device result buffer of this shape kept under `key` (a layer, or host staging)."""
        if key not in self._io:
            self._io[key] = cuda.device_array(shape, np.float32)
        return self._io[key]
