"""A paged KV cache: many sequences of different lengths in one pool of fixed-size pages (host side).

What you will learn here
------------------------
The contiguous KVCache (kvcache.py) gives every row max_len slots up front: right for one chat, wasteful for a
server, where 32 requests of 50 to 2000 tokens would each reserve the longest. vLLM's PagedAttention (Kwon et al.
2023) stores K and V the way an operating system stores memory: in pages (blocks of BS tokens, 16 by default),
handed out from a free list as a sequence grows, given back when it ends. A block table per sequence maps its
token positions to pages:

    k(layer), v(layer)   [n_blocks, n_kv_heads, BS, head_dim]: the pool, shared by every sequence
    block_tables         int32 [max_seqs, max_pages]: sequence s's token p is in page block_tables[s, p // BS],
                         at offset p % BS (-1: no page yet)
    free list            the pages no sequence holds (NaN-poisoned: a kernel that read one would show it)
    lengths              tokens held, per layer and sequence (host int32 [n_layers, max_seqs], and its device copy)

    sequence 0: [ 7 | 2 | 9 ]  -> tokens 0-15 in page 7, 16-31 in page 2, 32-40 in page 9
    sequence 1: [ 4 ]          -> tokens 0-5 in page 4          free list: 0 1 3 5 6 8 10 ...

Memory is then what the sequences hold (rounded up to a page each), not max_seqs * max_len, and a decode batch is
any set of sequences: batch row b names its sequence (rows[b]; a negative row is padding for a CUDA-graph bucket),
and the kernels (kernels/decode_paged.py, kernels/paged_append.py) read each row through its table, so rows at
different lengths decode in one launch.

One owner, one method per event: allocate (pages for a sequence to grow to n tokens), append (K, V of new tokens at
each row's length), advance (kernels elsewhere appended: tinyllm's fused RoPE, a graph's replay), free (a sequence
ended or was cancelled: its pages back to the free list, poisoned), reset. A call that cannot be done (too few
free pages, a row past its pages, a bad shape) raises ValueError before anything changes.

paged_decode_attention is decode_attention for this layout (the same split-K plan, decode v1's scan per page,
soft caps included); every layer is a full one here: no sliding window, no ring (KVCache keeps those).
"""
import numpy as np
from numba import cuda

from . import backend as _backend
from . import decode, reference
from .kernels.decode_paged import make_decode_paged
from .kernels.paged_append import append_paged, fill_pages_nan, gather_pages
from .kvcache import GPU_COPY, SIM_COPY, KVCache, _grid_x, poison_layer
from .launch import Launch
from .reference import LOG2E
from .validate import (DTYPES, SUPPORTED_HEAD_DIMS, as_count, check_dtype, check_rank, check_scale,
                       check_softcap)

BLOCK_SIZE = 16     # tokens per page (vLLM's default): small pages waste little; each costs one table read


class PagedKVCache:
    """K/V pools of pages shared by up to max_seqs sequences of up to max_len tokens each.

        cache = PagedKVCache(n_layers, n_blocks, n_kv_heads, head_dim, max_seqs, max_len, block_size=16)
        cache.allocate(seq, n)             # pages for sequence seq to hold n tokens
        cache.append(layer, rows, k, v)    # k, v [batch, n_kv_heads, t, head_dim]: row b into sequence rows[b]
        out = numbattn.paged_decode_attention(q, cache, layer, rows)
        cache.free(seq)                    # its pages back to the free list
    """

    def __init__(self, n_layers, n_blocks, n_kv_heads, head_dim, max_seqs, max_len, block_size=BLOCK_SIZE,
                 dtype=np.float32, backend="auto"):
        for name, x in (("n_layers", n_layers), ("n_blocks", n_blocks), ("n_kv_heads", n_kv_heads),
                        ("max_seqs", max_seqs), ("max_len", max_len), ("block_size", block_size)):
            if as_count(name, x) < 1:
                raise ValueError(f"{name}={x} must be >= 1")
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim={head_dim}; the kernels support {SUPPORTED_HEAD_DIMS}")
        if np.dtype(dtype) not in [np.dtype(d) for d in DTYPES]:
            raise ValueError(f"dtype={np.dtype(dtype).name}; the cache stores float32 or float16")
        self.n_layers, self.n_blocks, self.n_kv_heads, self.head_dim = n_layers, n_blocks, n_kv_heads, head_dim
        self.max_seqs, self.max_len, self.block_size, self.dtype = max_seqs, max_len, block_size, np.dtype(dtype)
        self.max_pages = -(-max_len // block_size)
        self.backend = _backend.resolve(backend)
        self.on_device = self.backend != "numpy"
        self.shape = (n_blocks, n_kv_heads, block_size, head_dim)
        self._copy_shape = SIM_COPY if self.backend == "sim" else GPU_COPY
        self._lengths = np.zeros((n_layers, max_seqs), np.int32)        # the host mirror of the lengths
        self._tables = np.full((max_seqs, self.max_pages), -1, np.int32)
        self._free = []
        self._workspace = None
        make = (lambda shape, dt: cuda.device_array(shape, dt)) if self.on_device else np.empty
        self._k = [make(self.shape, self.dtype) for _ in range(n_layers)]
        self._v = [make(self.shape, self.dtype) for _ in range(n_layers)]
        if self.on_device:
            self._len_dev = cuda.to_device(self._lengths)
            self._tables_dev = cuda.to_device(self._tables)
            self._counters = cuda.to_device(np.zeros((n_layers, max_seqs), np.int32))
            self._len_views = [self._len_dev[i] for i in range(n_layers)]       # views made once
            self._counter_views = [self._counters[i] for i in range(n_layers)]
        self.reset()

    def __repr__(self):
        return (f"PagedKVCache(n_layers={self.n_layers}, n_blocks={self.n_blocks}, block_size={self.block_size}, "
                f"max_seqs={self.max_seqs}, max_len={self.max_len}, free_blocks={self.free_blocks}, "
                f"backend={self.backend!r})")

    @property
    def nbytes(self):
        """Bytes of K/V storage: every layer's two pools."""
        return 2 * self.n_layers * int(np.prod(self.shape)) * self.dtype.itemsize

    # ---- bookkeeping ------------------------------------------------------------------------------------
    @property
    def free_blocks(self):
        return len(self._free)

    def pages_for(self, n_tokens):
        """Pages a sequence of n_tokens holds."""
        return -(-n_tokens // self.block_size)

    def pages(self, seq):
        """Host int32: the pages sequence seq holds, in order (a copy)."""
        table = self._tables[self.check_seq(seq)]
        return table[table >= 0].copy()

    def seq_lengths(self):
        """Host int32 [max_seqs]: tokens that every layer holds, per sequence (a copy)."""
        return self._lengths.min(axis=0).astype(np.int32)

    # the per-layer accessors are KVCache's own (the same attributes mean the same things: _lengths, _len_views,
    # _counter_views, _k, _v, n_layers), so the two caches check and hand out layers one way
    layer_lengths = KVCache.layer_lengths
    host_lengths_view = KVCache.host_lengths_view
    device_lengths = KVCache.device_lengths
    append_counters = KVCache.append_counters
    check_layer = KVCache.check_layer
    k = KVCache.k
    v = KVCache.v

    def host_tables(self):
        view = self._tables.view()
        view.flags.writeable = False
        return view

    def device_tables(self):
        return self._tables_dev

    def check_seq(self, seq):
        if isinstance(seq, (bool, np.bool_)) or not isinstance(seq, (int, np.integer)) or not 0 <= seq < self.max_seqs:
            raise ValueError(f"seq={seq!r} must be an integer in [0, {self.max_seqs})")
        return int(seq)

    def check_rows(self, rows, batch=None):
        """rows: int array [batch] of distinct sequences (or -1, padding) -> host int32 array."""
        r = np.asarray(_backend.to_host(rows))
        if r.ndim != 1 or r.dtype.kind not in "iu" or (batch is not None and len(r) != batch):
            raise ValueError(f"rows has shape {r.shape}, dtype {r.dtype.name}; expected an int array "
                             f"[{batch if batch is not None else 'batch'}] of sequence numbers")
        real = r[r >= 0]
        if (r < -1).any() or (real >= self.max_seqs).any() or len(np.unique(real)) != len(real):
            raise ValueError(f"rows={r.tolist()}: each must be a distinct sequence in [0, {self.max_seqs}) or -1 "
                             f"(padding)")
        return r.astype(np.int32)

    # ---- events -----------------------------------------------------------------------------------------
    def reset(self):
        """No sequence holds anything; every page is free and NaN."""
        self._lengths[:] = 0
        self._tables[:] = -1
        self._free = list(range(self.n_blocks - 1, -1, -1))       # popped from the end: page 0 first
        for layer in range(self.n_layers):
            poison_layer(self._k[layer], self._v[layer], self.shape, self.dtype, self.on_device)
        if self.on_device:
            self._len_dev.copy_to_device(self._lengths)
            self._tables_dev.copy_to_device(self._tables)

    def allocate(self, seq, n_tokens):
        """Give sequence seq pages enough to hold n_tokens (it keeps those it has). ValueError, nothing changed,
        if n_tokens > max_len or the free list is short."""
        seq, n_tokens = self.check_seq(seq), as_count("n_tokens", n_tokens)
        if n_tokens > self.max_len:
            raise ValueError(f"allocate({seq}, {n_tokens}): a sequence holds at most max_len {self.max_len} tokens")
        have = int((self._tables[seq] >= 0).sum())
        need = self.pages_for(n_tokens) - have
        if need <= 0:
            return
        if need > len(self._free):
            raise ValueError(f"allocate({seq}, {n_tokens}): needs {need} more pages, {len(self._free)} are free")
        for i in range(have, have + need):
            self._tables[seq, i] = self._free.pop()
        if self.on_device:
            self._tables_dev[seq].copy_to_device(self._tables[seq])

    def free(self, seq):
        """Sequence seq ends (finished or cancelled): its pages are poisoned and go back to the free list."""
        seq = self.check_seq(seq)
        pages = self.pages(seq)
        if len(pages):
            self._poison(pages)
        self._free.extend(pages[::-1].tolist())
        self._tables[seq] = -1
        self._lengths[:, seq] = 0
        if self.on_device:
            self._tables_dev[seq].copy_to_device(self._tables[seq])
            self._len_dev.copy_to_device(self._lengths)

    def _poison(self, pages):
        def numpy_path():
            for layer in range(self.n_layers):
                for pool in (self._k[layer], self._v[layer]):
                    host = _backend.to_host(pool)
                    host[pages] = np.nan
                    if self.on_device:
                        pool.copy_to_device(host)

        def kernel_path():
            d_pages = cuda.to_device(pages.astype(np.int32))
            grid = (_grid_x(self.block_size * self.head_dim, self._copy_shape), self.n_kv_heads, len(pages))
            for layer in range(self.n_layers):
                fill_pages_nan[grid, self._copy_shape[0]](self._k[layer], self._v[layer], d_pages)

        _backend.run("paged KV-cache free", self.backend, kernel_path, numpy_path)

    def advance(self, rows, t, layer=None):
        """Record on the host that kernels launched elsewhere appended t tokens to the sequences in rows (of
        `layer`, default every layer); their device lengths were advanced by those kernels."""
        rows, t = self.check_rows(rows), as_count("t", t)
        rows = rows[rows >= 0]
        table = self._lengths if layer is None else self._lengths[self.check_layer(layer)][None]
        capacity = (self._tables[rows] >= 0).sum(axis=1) * self.block_size
        if len(rows) and (table[:, rows] + t > capacity).any():
            raise ValueError(f"advance({t}): sequences {rows.tolist()} hold {table[:, rows].max(axis=0).tolist()} "
                             f"tokens in pages for {capacity.tolist()}")
        table[:, rows] += np.int32(t)

    def append(self, layer, rows, k, v):
        """Write k, v [batch, n_kv_heads, t, head_dim]: row b at the length of sequence rows[b], which must have
        the pages for it (allocate first); advance those lengths by t."""
        layer = self.check_layer(layer)
        rows = self.check_append(layer, rows, k, v)
        t, real = k.shape[2], rows >= 0

        def numpy_path():
            kh, vh = _backend.to_host(k), _backend.to_host(v)
            for b in np.flatnonzero(real):
                for j, p in enumerate(range(self._lengths[layer, rows[b]], self._lengths[layer, rows[b]] + t)):
                    page, at = self._tables[rows[b], p // self.block_size], p % self.block_size
                    self._write(layer, page, at, kh[b, :, j], vh[b, :, j])
            if self.on_device:
                self._len_views[layer].copy_to_device(self._lengths[layer] + np.int32(t) * self._row_mask(rows))

        def kernel_path():
            dk, dv = (x if _backend.is_device_array(x) else cuda.to_device(np.ascontiguousarray(x)) for x in (k, v))
            grid = (_grid_x(t * self.head_dim, self._copy_shape), self.n_kv_heads, len(rows))
            append_paged[grid, self._copy_shape[0]](dk, dv, self._k[layer], self._v[layer], self._tables_dev,
                                                    cuda.to_device(rows), self._len_views[layer],
                                                    self._counter_views[layer])

        _backend.run("paged KV-cache append", self.backend, kernel_path, numpy_path)
        self._lengths[layer] += np.int32(t) * self._row_mask(rows)

    def _row_mask(self, rows):
        mask = np.zeros(self.max_seqs, np.int32)
        mask[rows[rows >= 0]] = 1
        return mask

    def _write(self, layer, page, at, k_tok, v_tok):
        """One token's K, V [n_kv_heads, head_dim] into page `page` at offset `at` (the NumPy path)."""
        for pool, x in ((self._k[layer], k_tok), (self._v[layer], v_tok)):
            if self.on_device:
                host = pool[page].copy_to_host()
                host[:, at] = x
                pool[page].copy_to_device(host)
            else:
                pool[page, :, at] = x

    def check_append(self, layer, rows, k, v):
        layout = "[batch, n_kv_heads, t, head_dim]"
        for name, x in (("k", k), ("v", v)):
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                raise ValueError(f"{name} must be a NumPy or device array; got {type(x).__name__}")
            check_rank(name, x, 4, layout)
            check_dtype(name, x)
        if tuple(k.shape) != tuple(v.shape) or k.shape[1] != self.n_kv_heads or k.shape[3] != self.head_dim \
                or k.shape[2] < 1:
            raise ValueError(f"k has shape {tuple(k.shape)}, v {tuple(v.shape)}; expected equal shapes (batch, "
                             f"{self.n_kv_heads}, t >= 1, {self.head_dim})")
        rows = self.check_rows(rows, k.shape[0])
        real = rows[rows >= 0]
        need = self._lengths[layer, real] + k.shape[2]
        have = (self._tables[real] >= 0).sum(axis=1) * self.block_size
        if (need > have).any():
            raise ValueError(f"append of {k.shape[2]} tokens: sequences {real[need > have].tolist()} have pages for "
                             f"{have[need > have].tolist()} tokens (allocate first); nothing was written")
        return rows

    def gather(self, layer, seq, n=None):
        """Sequence seq's first n tokens (default: all it holds in `layer`) as contiguous K, V [1, n_kv_heads, n,
        head_dim]: device arrays on a kernel backend, else host arrays."""
        layer, seq = self.check_layer(layer), self.check_seq(seq)
        n = int(self._lengths[layer, seq]) if n is None else as_count("n", n)
        if not 1 <= n <= self._lengths[layer, seq]:
            raise ValueError(f"gather(n={n}): sequence {seq} holds {self._lengths[layer, seq]} tokens in layer {layer}")
        table = self._tables[seq]

        def numpy_path():
            k, v = (reference.gather_pages(_backend.to_host(x), table, n)[None]
                    for x in (self._k[layer], self._v[layer]))
            return (cuda.to_device(k), cuda.to_device(v)) if self.on_device else (k, v)

        def kernel_path():
            k, v = (cuda.device_array((1, self.n_kv_heads, n, self.head_dim), self.dtype) for _ in range(2))
            grid = (_grid_x(n * self.head_dim, self._copy_shape), self.n_kv_heads)
            gather_pages[grid, self._copy_shape[0]](self._k[layer], self._v[layer], self._tables_dev[seq], k, v)
            return k, v

        return _backend.run("paged KV-cache gather", self.backend, kernel_path, numpy_path)

    def decode_workspace(self):
        if self._workspace is None:
            self._workspace = PagedWorkspace(self)
        return self._workspace


class PagedWorkspace:
    """What paged_decode_attention keeps per cache: partials and tickets sized for max_seqs rows, host-row
    staging, and prepared launches."""

    def __init__(self, cache):
        self.cache, self._partials, self.calls, self._io = cache, None, {}, {}
        self.counters = cuda.to_device(np.zeros(cache.max_seqs * cache.n_kv_heads, np.int32))

    def partials(self, n_heads, n_splits):
        have = self._partials
        if have is None or have.shape[1] != n_heads or have.shape[2] < n_splits:
            room = max(n_splits, 2 * have.shape[2]) if have is not None else n_splits
            self._partials = cuda.device_array((self.cache.max_seqs, n_heads, room, self.cache.head_dim + 2),
                                               np.float32)
        return self._partials

    def staged(self, name, x):
        """A host array -> a device buffer kept per (name, shape, dtype), refilled."""
        key = (name, x.shape, x.dtype.str)
        if key not in self._io:
            self._io[key] = cuda.device_array(x.shape, x.dtype)
        self._io[key].copy_to_device(np.ascontiguousarray(x))
        return self._io[key]

    def out_buffer(self, shape):
        key = ("out", tuple(shape))
        if key not in self._io:
            self._io[key] = cuda.device_array(shape, np.float32)
        return self._io[key]


def paged_split(cache, batch, max_length, config):
    """Keys per split block: decode's plan, rounded up to whole pages."""
    split, _ = decode.plan(batch, cache.n_kv_heads, max_length, config)
    bs = cache.block_size
    split = -(-split // bs) * bs
    return split, decode.n_splits_for(max_length, split)


class _PreparedPaged:
    """One (layer, q, rows, out, config) of paged_decode_attention, validated once and launched many times."""

    def __init__(self, cache, layer, q, rows, out, scale, softcap, config, max_length, stream):
        self.q, self.rows, self.out, self.max_length, self.config = q, rows, out, max_length, config
        self.cache, self.layer_lengths = cache, cache.host_lengths_view(layer)
        batch, n_heads, head_dim = q.shape
        group, itemsize = n_heads // cache.n_kv_heads, cache.dtype.itemsize
        kernel = make_decode_paged(head_dim, group, config.threads, config.dims_per_lane, config.keys_per_step,
                                   itemsize, config.min_blocks_per_sm, softcap is not None)
        cap = np.float32(0.0 if softcap is None else softcap * LOG2E)      # in the scores' log2 units
        (k_word, _), (v_word, _) = decode.kv_word_types("v1", head_dim, config.dims_per_lane, itemsize)
        k, v = cache.k(layer).view(np.dtype(k_word.name)), cache.v(layer).view(np.dtype(v_word.name))
        self.split, _ = paged_split(cache, batch, 1, config)
        most = decode.n_splits_for(cache.max_len, self.split)
        ws = cache.decode_workspace()
        self.launch = Launch(kernel, (1, cache.n_kv_heads, batch), config.threads,
                             (q, k, v, cache.device_tables(), rows, cache.device_lengths(layer), np.int64(self.split),
                              np.float32(scale * LOG2E), cap, ws.partials(n_heads, most), ws.counters, out), stream)

    def __call__(self, host_rows=None):
        if self.max_length:
            max_length = self.max_length
        else:
            real = host_rows[host_rows >= 0]
            max_length = int(self.layer_lengths[real].max()) if len(real) else 1
        split, n_splits = paged_split(self.cache, self.q.shape[0], max(max_length, 1), self.config)
        if split != self.split:
            self.split = split
            self.launch.set_arg(6, np.int64(split))
        self.launch(grid=(n_splits, self.cache.n_kv_heads, self.q.shape[0]))


def check_paged_args(q, cache, layer, rows, scale, softcap, out, config):
    layer, batch, n_heads, head_dim = decode.check_query(q, cache, PagedKVCache, layer)
    if head_dim != cache.head_dim or batch > cache.max_seqs:
        raise ValueError(f"q has shape {tuple(q.shape)} but the cache holds head_dim {cache.head_dim} and at most "
                         f"{cache.max_seqs} sequences")
    host_rows = cache.check_rows(rows, batch)
    config = decode.check_out_and_config(q, out, config, "v1", cache.backend, cache.n_kv_heads)
    return layer, host_rows, check_scale(scale, head_dim), check_softcap(softcap), config


def paged_decode_attention(q, cache, layer, rows, scale=None, out=None, config=None, max_length=None, stream=0,
                           softcap=None):
    """One query token per batch row over a paged cache: row b attends to the lengths[rows[b]] tokens of sequence
    rows[b] (its new token's K/V already appended); a padding row (-1) or an empty sequence gets zeros. softcap:
    scores s -> softcap * tanh(s / softcap) (as decode_attention's).

    q [batch, n_heads, head_dim] host or device; rows int [batch] host or device (a device rows array is read by
    the kernel, so a CUDA graph replays with whatever it holds then). Returns float32 [batch, n_heads, head_dim]
    (host for a host q). max_length: a bound on every row's length that fixes the grid (a graph's bucket).
    """
    ws = cache.decode_workspace() if getattr(cache, "on_device", False) else None
    key = (layer, scale, config, max_length, stream, softcap)
    call = ws.calls.get(key) if ws is not None else None
    if call is not None and call.q is q and call.rows is rows and (call.out is out or out is None):
        call(None if max_length else cache.check_rows(rows))       # the hot path: the same device arrays again
        return call.out
    layer, host_rows, scale, softcap, config = check_paged_args(q, cache, layer, rows, scale, softcap, out, config)
    on_device = _backend.is_device_array(q)

    def numpy_path():
        k, v = _backend.to_host(cache.k(layer)), _backend.to_host(cache.v(layer))
        o = reference.paged_decode_attention(_backend.to_host(q), k, v, cache.host_tables(), host_rows,
                                             cache.layer_lengths(layer), scale=scale, softcap=softcap)
        return _backend.deliver(o, out, on_device)

    def kernel_path():
        dq = q if on_device else ws.staged("q", np.asarray(q))
        d_rows = rows if _backend.is_device_array(rows) else ws.staged("rows", host_rows)
        o = out if out is not None else ws.out_buffer(q.shape)
        prepared = ws.calls.get(key)
        if prepared is None or prepared.q is not dq or prepared.rows is not d_rows or prepared.out is not o:
            prepared = ws.calls[key] = _PreparedPaged(cache, layer, dq, d_rows, o, scale, softcap, config,
                                                      max_length, stream if on_device else 0)
        prepared(host_rows)
        return o if on_device else o.copy_to_host()

    return _backend.run("paged decode attention", cache.backend, kernel_path, numpy_path)
