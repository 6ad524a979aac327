"""The KV cache: keys and values of every token seen so far, kept where the kernels run, plus the append kernel.

What you will learn here
------------------------
Generation runs the model once over the prompt (prefill) and then once per new token (decode). Every step
needs the keys and values of all earlier tokens; recomputing them would make step n cost O(n) matmuls, so they
are stored once and appended to. llama2.c-style, everything is allocated up front:

    k(layer), v(layer)   [batch, n_kv_heads, slots(layer), head_dim] per layer, float32 (default) or float16
                         storage; on the GPU (Numba device arrays) under the cuda and sim backends, NumPy
                         arrays under numpy. Math on them is always float32.
    lengths              tokens seen, per layer and per row (rows of a batch may hold different counts after
                         a per-row truncate). The host keeps the authoritative int32 [n_layers, batch] table.

Two kinds of layer (kind(layer)). A full layer keeps every token: max_len slots, token p in slot p. A
sliding-window layer (windows=..., Mistral, Gemma 2/3) only ever needs the last `window` tokens, so it keeps a
ring buffer: token p in slot p mod S, with S = window + max_chunk - 1 slots, where max_chunk is the most tokens
one append brings (a prefill chunk: its first query still sees window - 1 tokens before it). Its memory is
O(window) at any context; its lengths still count every token seen (they are positions: RoPE's, the mask's).
The kernels read both kinds alike (key p from slot p mod S: a full layer never wraps).

Rewinding a ring (truncate) works while the ring still holds what the next token's window needs: the tokens
since max(0, n - window + 1) for a row rewound to n. A ring that has wrapped has overwritten its oldest tokens,
so a rewind further back than min_rewind() is refused with a ValueError (nothing changed): the caller recomputes,
i.e. reset() (or truncate(0)) and runs the prompt again. Never a silent wrong answer.

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
    """Shapes and dtypes of one append: k_new, v_new [batch, n_kv_heads, t, head_dim] into the cache, and the
    length tables and tickets the kernel reads (int32 [batch])."""
    check_new_tokens(k_new, v_new, k_cache)
    b = k_cache.shape[0]
    for name, x in (("lengths_in", lengths_in), ("lengths_out", lengths_out), ("counters", counters)):
        if tuple(x.shape) != (b,) or np.dtype(x.dtype) != np.int32:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, dtype {np.dtype(x.dtype).name}; "
                             f"expected ({b},) int32")


def check_new_tokens(k_new, v_new, k_cache):
    """k_new, v_new: arrays [batch, n_kv_heads, t >= 1, head_dim] of the cache's batch, KV heads and head_dim."""
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


def launch_append(k_new, v_new, k_cache, v_cache, lengths_in, lengths_out, counters, copy_shape=GPU_COPY,
                  stream=0, max_pos=None):
    """Append on device arrays, one launch: new token j of row b goes to slot (lengths_in[b] + j) mod S (S =
    k_cache.shape[2]: a full layer never wraps, a ring layer does), and lengths_out[b] = lengths_in[b] + t (the
    same array: advanced in place). counters: int32 [batch] zeros, used to find each row's last block. With two
    different length arrays every call writes the same slots (handy for timing). max_pos: the most tokens a row
    may hold (default S); the caller guarantees lengths_in[b] + t <= max_pos and t <= S (KVCache.append checks
    it on the host); rows that would overflow are skipped by the kernel, never written out of bounds.
    """
    check_rank("k_cache", k_cache, 4, "[batch, n_kv_heads, slots, head_dim]")
    check_dtype("k_cache", k_cache)
    if tuple(v_cache.shape) != tuple(k_cache.shape) or np.dtype(v_cache.dtype) != np.dtype(k_cache.dtype):
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)}, dtype {np.dtype(v_cache.dtype).name}; "
                         f"expected k_cache's {tuple(k_cache.shape)}, {np.dtype(k_cache.dtype).name}")
    check_append(k_new, v_new, k_cache, lengths_in, lengths_out, counters)
    batch, n_kv_heads, t, head_dim = k_new.shape
    grid = (_grid_x(t * head_dim, copy_shape), n_kv_heads, batch)
    append_kv[grid, copy_shape[0], stream](k_new, v_new, k_cache, v_cache, lengths_in, lengths_out, counters,
                                           np.int64(k_cache.shape[2] if max_pos is None else max_pos))


def layer_windows(windows, max_chunk, n_layers, max_len):
    """KVCache's windows and max_chunk -> (window per layer: None or an int < max_len, slots per layer)."""
    if windows is None or isinstance(windows, (int, np.integer)) and not isinstance(windows, (bool, np.bool_)):
        windows = [windows] * n_layers
    if not isinstance(windows, (list, tuple)) or len(windows) != n_layers:
        raise ValueError(f"windows={windows!r}: expected None, an int, or one entry (None or an int) per layer "
                         f"({n_layers})")
    out = []
    for layer, w in enumerate(windows):
        if w is not None and as_count(f"windows[{layer}]", w) < 1:
            raise ValueError(f"windows[{layer}]={w} must be >= 1 (or None: a full layer)")
        out.append(None if w is None or w >= max_len else int(w))
    chunk = None if max_chunk is None else as_count("max_chunk", max_chunk)
    if chunk is not None and chunk < 1:
        raise ValueError(f"max_chunk={max_chunk} must be >= 1")
    slots = [max_len if w is None else min(max_len, w + (chunk or w) - 1) for w in out]
    return out, slots


def poison_layer(k, v, shape, dtype, on_device):
    """One layer's K and V arrays (host or device) all NaN again: what an empty slot holds, so that a kernel
    that reads one shows it (the module docstring)."""
    if not on_device:
        k.fill(np.nan)                  # in place: a NaN-filled copy first would double the bytes written
        v.fill(np.nan)
        return
    poison = np.full(shape, np.nan, dtype)
    for a in (k, v):
        a.copy_to_device(poison)


class KVCache:
    """Per-layer K and V buffers [batch, n_kv_heads, slots(layer), head_dim] and per-row lengths.

        cache = KVCache(n_layers, batch, n_kv_heads, max_len, head_dim, dtype=np.float32, backend="auto",
                        windows=None, max_chunk=None)
        cache.append(layer, k, v)      # k, v [batch, n_kv_heads, t, head_dim], host or device, fp32/fp16
        cache.lengths                  # host int32 [batch]: tokens every layer holds
        out = numbattn.decode_attention(q, cache, layer)
        cache.truncate(n)              # keep at most n tokens per row (int, or int array [batch])
        cache.reset()                  # empty, every slot NaN again
        cache.kind(layer), cache.window(layer), cache.slots(layer)   # "full" or "ring"; None or its window

    windows: None (every layer full), an int (every layer a sliding window of that many tokens), or one entry
    per layer, None (full) or an int (e.g. Gemma 3: five window layers, then a full one). A window >= max_len
    hides nothing: that layer is full. max_chunk: the most tokens one append may bring to a window layer (the
    prefill chunk; default: its window); it sizes the ring, window + max_chunk - 1 slots.
    """

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, dtype=np.float32, backend="auto",
                 windows=None, max_chunk=None):
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
        self._windows, self._slots = layer_windows(windows, max_chunk, self.n_layers, self.max_len)
        self.backend = _backend.resolve(backend)
        self.on_device = self.backend != "numpy"
        self.shape = (self.batch, self.n_kv_heads, self.max_len, self.head_dim)     # a full layer's
        self._copy_shape = SIM_COPY if self.backend == "sim" else GPU_COPY
        self._lengths = np.zeros((self.n_layers, self.batch), np.int32)    # the host mirror of the lengths
        self._token_buffers = {}    # dtype -> device staging buffer for one decode token's k and v
        self._workspace = None          # numbattn.decode's buffers for this cache, made on first use
        self.checked_calls = {}         # numbattn.decode's checked calls of host queries (decode.host_key)
        shapes = [self.layer_shape(layer) for layer in range(self.n_layers)]
        if self.on_device:
            self._k = [cuda.device_array(shape, dtype) for shape in shapes]
            self._v = [cuda.device_array(shape, dtype) for shape in shapes]
            self._len_dev = cuda.to_device(np.zeros((self.n_layers, self.batch), np.int32))
            self._counters = cuda.to_device(np.zeros((self.n_layers, self.batch), np.int32))
            # views made once: slicing a device array per call would cost Python time on the hot path
            self._len_views = [self._len_dev[i] for i in range(self.n_layers)]
            self._counter_views = [self._counters[i] for i in range(self.n_layers)]
        else:
            self._k = [np.empty(shape, dtype) for shape in shapes]
            self._v = [np.empty(shape, dtype) for shape in shapes]
        self.reset()

    def __repr__(self):
        rings = {layer: (self._windows[layer], self._slots[layer]) for layer in range(self.n_layers)
                 if self._windows[layer] is not None}
        return (f"KVCache(n_layers={self.n_layers}, batch={self.batch}, n_kv_heads={self.n_kv_heads}, "
                f"max_len={self.max_len}, head_dim={self.head_dim}, dtype={self.dtype.name}, "
                f"backend={self.backend!r}, lengths={self.lengths.tolist()}"
                + (f", ring layers (window, slots)={rings})" if rings else ")"))

    @staticmethod
    def bytes_per_token(n_layers, n_kv_heads, head_dim, dtype=np.float32):
        """Bytes one token takes in a cache of this shape: K and V, every layer and KV head."""
        return 2 * n_layers * n_kv_heads * head_dim * np.dtype(dtype).itemsize

    @property
    def nbytes(self):
        """Bytes of K/V storage this cache holds (allocated up front: batch * slots tokens per layer)."""
        return self.batch * sum(self._slots) * self.bytes_per_token(1, self.n_kv_heads, self.head_dim, self.dtype)

    # ---- the layers' kinds --------------------------------------------------------------------------------
    def kind(self, layer):
        """"full" (every token, max_len slots) or "ring" (a sliding window's last tokens in a ring buffer)."""
        return "full" if self._windows[self.check_layer(layer)] is None else "ring"

    def window(self, layer):
        """The layer's sliding window (the tokens a query sees, itself included), or None: every token."""
        return self._windows[self.check_layer(layer)]

    def slots(self, layer):
        """Token slots of the layer: max_len (full), or window + max_chunk - 1 (ring; token p in slot p mod it)."""
        return self._slots[self.check_layer(layer)]

    def layer_shape(self, layer):
        return (self.batch, self.n_kv_heads, self.slots(layer), self.head_dim)

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
        """The K storage of one layer, [batch, n_kv_heads, slots(layer), head_dim] (device or host array): token p
        of a row in slot p mod slots(layer)."""
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
        layers = range(self.n_layers) if layer is None else [self.check_layer(layer)]
        rows = self._lengths if layer is None else self._lengths[layers[0]]
        if int(rows.max()) + t > self.max_len:
            raise ValueError(f"advance({t}): the cache holds {rows.max()} of {self.max_len} tokens")
        for i in layers:
            self._check_room(i, t)
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
        for layer in range(self.n_layers):
            poison_layer(self._k[layer], self._v[layer], self.layer_shape(layer), self.dtype, self.on_device)
        if self.on_device:
            self._upload_lengths()

    def append(self, layer, k, v):
        """Write k, v [batch, n_kv_heads, t, head_dim] at each row's current length of `layer` (a ring layer: at
        slots length mod slots, over its oldest tokens); advance it by t."""
        layer = self.check_layer(layer)
        check_new_tokens(k, v, self._k[layer])          # (the length tables are the cache's own)
        lengths = self._lengths[layer]
        t = k.shape[2]
        self._check_room(layer, t)
        new_lengths = lengths + np.int32(t)

        def numpy_path():   # also the fallback if the kernel fails: host copies in, device copies back
            kh, vh = _backend.to_host(k), _backend.to_host(v)
            K = self._k[layer].copy_to_host() if self.on_device else self._k[layer]
            V = self._v[layer].copy_to_host() if self.on_device else self._v[layer]
            S = self._slots[layer]
            for b, n in enumerate(lengths.tolist()):
                first = n % S
                if first + t <= S:          # slots first .. first + t - 1: a slice (a token's decode step)
                    K[b, :, first:first + t], V[b, :, first:first + t] = kh[b], vh[b]
                else:                       # a ring wrapping past its last slot
                    slots = (n + np.arange(t)) % S
                    K[b, :, slots] = kh[b].swapaxes(0, 1)
                    V[b, :, slots] = vh[b].swapaxes(0, 1)
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
                          self._counter_views[layer], self._copy_shape, max_pos=self.max_len)

        _backend.run("KV-cache append", self.backend, kernel_path, numpy_path)
        self._lengths[layer] = new_lengths

    def _check_room(self, layer, t):
        """Refuse (before anything is written) an append past max_len, or one longer than a ring layer can take
        while its first new query still sees its window: t <= slots - window + 1 (= max_chunk)."""
        lengths = self._lengths[layer]
        top = int(lengths.max())
        if top + t > self.max_len:
            rows = np.flatnonzero(lengths + t > self.max_len).tolist()
            raise ValueError(f"append of {t} tokens to layer {layer} overflows max_len {self.max_len}: rows "
                             f"{rows} hold {lengths[rows].tolist()} tokens; nothing was written")
        window, slots = self._windows[layer], self._slots[layer]
        if window is not None and t > slots - window + 1 and top + t > slots:
            raise ValueError(f"append of {t} tokens to layer {layer}: its ring of {slots} slots (window {window}) "
                             f"takes at most {slots - window + 1} tokens at once (max_chunk); nothing was written")

    def truncate(self, n):
        """Keep at most n tokens in every layer and row (n: int, or int array [batch] for per-row limits).

        The chat CLI keeps the cached prefix that the next turn shares with this one. Rewound slots are
        NaN-poisoned again, like never-written ones. A ring layer can rewind only while it still holds the
        window the next token needs (min_rewind); further back raises ValueError and changes nothing.
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
        self._check_rewind(np.broadcast_to(limit, (self.batch,)))
        new = np.minimum(self._lengths, limit).astype(np.int32)   # [n_layers, batch]
        for layer in range(self.n_layers):
            old = self._lengths[layer]
            if (new[layer] == old).all():
                continue
            K, V = self._k[layer], self._v[layer]

            def numpy_path(K=K, V=V, lo=new[layer], hi=old):
                Kh, Vh = (_backend.to_host(x) for x in (K, V))
                for b in range(self.batch):
                    slots = np.arange(max(lo[b], hi[b] - K.shape[2]), hi[b]) % K.shape[2]
                    Kh[b, :, slots] = np.nan
                    Vh[b, :, slots] = np.nan
                if self.on_device:
                    K.copy_to_device(Kh)
                    V.copy_to_device(Vh)

            def kernel_path(K=K, V=V, lo=new[layer], hi=old):
                span = int(np.minimum(hi - lo, K.shape[2]).max()) * self.head_dim
                grid = (_grid_x(span, self._copy_shape), self.n_kv_heads, self.batch)
                fill_nan[grid, self._copy_shape[0]](K, V, cuda.to_device(lo), cuda.to_device(hi.copy()))

            _backend.run("KV-cache truncate", self.backend, kernel_path, numpy_path)
        self._lengths[:] = new
        if self.on_device:
            self._upload_lengths()

    def min_rewind(self):
        """Host int64 [batch]: the fewest tokens each row can be truncated to, 0 aside (always allowed), while every
        ring layer still holds the window the next token needs: a ring that wrapped has overwritten its oldest
        tokens (0: no limit)."""
        floor = np.zeros(self.batch, np.int64)
        for layer in range(self.n_layers):
            window, slots = self._windows[layer], self._slots[layer]
            if window is not None:
                oldest = np.maximum(self._lengths[layer].astype(np.int64) - slots, 0)   # the oldest token held
                floor = np.maximum(floor, np.where(oldest > 0, oldest + window - 1, 0))
        return floor

    def _check_rewind(self, limit):
        """A truncate to limit [batch] tokens that a ring layer cannot serve -> ValueError naming the row. (A layer
        holding no more than the limit is not rewound, and its own floor never exceeds its length.)"""
        floor = self.min_rewind()
        bad = (limit > 0) & (limit < floor)
        if bad.any():
            b = int(np.flatnonzero(bad)[0])
            raise ValueError(f"truncate to {int(limit[b])} tokens in row {b}: a sliding-window layer's ring "
                             f"has already overwritten tokens the next one would see (row {b} can rewind to "
                             f"{int(floor[b])} tokens or more, or to 0); reset() and run the prompt again to go "
                             f"further back. Nothing was changed")

    def last_tokens(self, layer, count):
        """Host copies of each row's last min(length, count) tokens of `layer`, oldest first (the NumPy paths read
        them): (k, v [batch, n_kv_heads, count, head_dim], n [batch]), row b's in slots 0 .. n[b] - 1, NaN after.
        count must not exceed what a ring layer holds (its slots)."""
        layer = self.check_layer(layer)
        count = min(count, self.max_len)
        if count > self._slots[layer]:
            raise ValueError(f"last_tokens: layer {layer} holds at most {self._slots[layer]} tokens, not {count}")
        K, V = (_backend.to_host(x) for x in (self._k[layer], self._v[layer]))
        out_k, out_v = (np.full((self.batch, self.n_kv_heads, count, self.head_dim), np.nan, self.dtype)
                        for _ in range(2))
        n = np.minimum(self._lengths[layer], count)
        for b, length in enumerate(self._lengths[layer]):
            slots = np.arange(length - n[b], length) % self._slots[layer]
            out_k[b, :, :n[b]], out_v[b, :, :n[b]] = K[b][:, slots], V[b][:, slots]
        return out_k, out_v, n


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
