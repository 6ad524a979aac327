"""Decode attention: one new query token per row against the KV cache (flash-decoding), in one launch (host side).

What you will learn here
------------------------
Each generation step brings ONE new query token per sequence (row of the batch). Its attention reads every
cached key and value once and does ~4 FLOPs per cached element per query head sharing it: decode streams the
cache, so the goal is to read it once, with the whole GPU, and to pay as little as possible around that.

Three kernels live in numbattn/kernels/ (the version table is in kernels/__init__.py), all tested by the same
suite: v0 one block per (row, query head) (decode_naive.py); v1 split-K, key slots (decode_slots.py, the
default); v2 split-K, a key per lane (decode_lanes.py; faster only past ~32K tokens with an fp16 cache).
v1 and v2 share the split-K frame (decode_splitk.py): split blocks over the keys, each for all G query heads of a
KV head, and the last block to finish merging the splits by the log-sum-exp rule, in one launch.

Slots past a row's length are never read: the cache keeps them NaN-poisoned (numbattn/kvcache.py) and 0 * NaN
is NaN, so loads there are skipped, not multiplied by zero. A row holding 0 tokens gets zeros.

Sliding windows: a row holding n tokens attends to its last min(n, window) (the new token and window - 1 before
it), so the splits cover O(window) keys at any context, read from the ring buffer of a window layer where it
wraps. The window is the layer's (KVCache(windows=...)) unless a smaller one is asked for. Soft-capped scores
(softcap: Gemma 2) are capped as they are computed.

This module plans and launches them. How many splits: about BLOCKS_PER_SM split blocks per SM over the whole
batch, never fewer than MIN_SPLIT keys per split (so the partials, written and read once, stay small next to the
K/V bytes) and never more than MAX_SPLIT (so that no block walks too long a stretch alone). Measured speeds and
the host cost of a call are in BENCHMARKS.md.

The API call itself is kept cheap: what is fixed per cache (its buffers, the validated shapes) is prepared
once in the decode workspace the cache owns (kvcache.DecodeWorkspace), the launch is a prepared one
(numbattn/launch.py: one driver call), the lengths are already on the device, and nothing is allocated,
uploaded or re-validated per call.
"""
from dataclasses import dataclass

import numpy as np

from . import backend as _backend
from . import cpu_attention, gpu, reference
from .kernels.decode_lanes import make_decode_v2
from .kernels.decode_naive import make_decode_v0
from .kernels.decode_slots import make_decode_v1
from .kernels.decode_splitk import kv_word_types, split_layout
from .launch import Launch
from .reference import LOG2E
from .validate import (as_count, check_dtype, check_head_dim, check_heads, check_rank, check_scale, check_softcap,
                       check_window)

VERSIONS = ("v0", "v1", "v2")
DEFAULT_VERSION = "v1"     # v2 is faster only past ~32K tokens with an fp16 cache (BENCHMARKS.md)
BLOCKS_PER_SM = 1          # split blocks per SM that the automatic split aims for (swept on the H100: BENCHMARKS.md)
MIN_SPLIT = 256            # keys; shorter splits make the partials and each block's merge a large share
MAX_SPLIT = 2048           # keys; longer ones make a block's serial walk the limit (131072 tokens: 2048 beat 4096)


@dataclass(frozen=True)
class Config:
    """Launch shape. split: keys per split block (v1, v2; None: chosen from the length); threads per block;
    dims_per_lane: head dims of each head's accumulator a v1/v2 thread holds (head_dim / dims_per_lane lanes form
    a key slot, v1, or a lane group, v2); keys_per_step: keys each v1 slot, or each v2 lane, takes per step;
    min_blocks_per_sm: blocks that must fit on an SM at once (CUDA launch bounds: the compiler caps the registers
    per thread to make it so; 0: no cap)."""
    split: int | None
    threads: int
    dims_per_lane: int = 8
    keys_per_step: int = 1
    min_blocks_per_sm: int = 0


# The simulator runs a Python thread per CUDA thread: few threads, tiny splits (several splits and slots).
SIM_CONFIG = Config(split=4, threads=8, dims_per_lane=8, keys_per_step=2)


def gpu_config(version, head_dim, group):
    """v0: 32 threads (one warp: each keeps a whole acc row). v1: 256 threads (16 key slots: twice the keys in
    flight of 128, at the same register count), 4 dims per lane (head_dim / 4 lanes per key: fewer registers than
    8, so no spill at a group of 8 heads), one key per step. v2: 256 threads, lane groups of one warp (head_dim / 32
    dims per lane), and launch bounds that keep 2 blocks (16 warps) on an SM: more loads in flight (131072 tokens:
    115 -> 100 us); not past head_dim 64, where those 128 registers a thread spilled 0.5-1.5 KB (compile_check).
    Fewer threads where the shared arrays would not fit. Swept on the H100: BENCHMARKS.md (head_dim 64)."""
    if version == "v0":
        return Config(split=None, threads=32)
    lanes = (4, 2, 1) if version == "v1" else (max(1, head_dim // 32),)
    lanes = [d for d in lanes if head_dim // d <= 32] or [head_dim // 32]    # head_dim 256: 8 dims a lane
    for threads in (256, 128, 64, 32):
        for dpl in lanes:
            bound = 512 // threads if version == "v2" and head_dim <= 64 else 0    # wider heads: it spilled
            config = Config(split=None, threads=threads, dims_per_lane=dpl, min_blocks_per_sm=bound)
            if head_dim // dpl <= 32 and shared_bytes(version, head_dim, group, config) <= gpu.SHARED_LIMIT:
                return config
    raise ValueError(f"a group of {group} query heads per KV head at head_dim {head_dim} does not fit in "
                     f"{gpu.SHARED_LIMIT} bytes of shared memory: use version='v0'")


def default_config(version, backend, head_dim, group):
    """The launch shape for a backend: none for "numpy" (no launch: the CPU kernel), the GPU's, or the simulator's."""
    if backend == "numpy":
        return None
    if backend != "sim":
        return gpu_config(version, head_dim, group)
    if version == "v0":
        return Config(None, 8)
    return SIM_CONFIG if head_dim <= 64 else Config(split=4, threads=8, dims_per_lane=head_dim // 8, keys_per_step=2)


def shared_bytes(version, head_dim, group, config):
    """Static shared memory of a v1/v2 block: the slots' states for the merge; v2 also q and a tile of p per group."""
    lanes, slots = split_layout(head_dim, config.threads, config.dims_per_lane)
    merge = 4 * slots * group * (head_dim + 2)
    return merge if version == "v1" else merge + 4 * group * (head_dim + slots * lanes * config.keys_per_step)


def choose_split(max_length, batch, n_kv_heads, n_sm=None):
    """Keys per split: about BLOCKS_PER_SM split blocks per SM, at least MIN_SPLIT and at most MAX_SPLIT keys (more
    blocks than that past ~64K tokens), a multiple of MIN_SPLIT (so that a growing context changes it rarely)."""
    n_sm = gpu.sm_count() if n_sm is None else n_sm
    want_splits = -(-BLOCKS_PER_SM * n_sm // (batch * n_kv_heads))
    split = -(-max(max_length, 1) // want_splits)
    return min(-(-split // MIN_SPLIT) * MIN_SPLIT, MAX_SPLIT)


def n_splits_for(max_length, split):
    return max(1, -(-max_length // split))


def plan(batch, n_kv_heads, max_length, config):
    """-> (keys per split, number of splits) for one launch over rows holding at most max_length tokens."""
    split = config.split or choose_split(max_length, batch, n_kv_heads)
    return split, n_splits_for(max_length, split)


def check_config(config, version, head_dim):
    ok = (isinstance(config, Config) and (config.split is None or config.split >= 1) and config.threads >= 1
          and config.dims_per_lane >= 1 and config.keys_per_step >= 1 and config.min_blocks_per_sm >= 0)
    if not ok:
        raise ValueError(f"config={config!r}: expected a decode.Config with split None or >= 1, threads >= 1, "
                         f"dims_per_lane >= 1, keys_per_step >= 1 and min_blocks_per_sm >= 0")
    if version != "v0":
        split_layout(head_dim, config.threads, config.dims_per_lane)


class _PreparedCall:
    """One (layer, q, out, scale, config, version) of decode_attention: validated once, launched many times.
    owns_out: out is the workspace's buffer (decode_attention was given no `out`)."""

    def __init__(self, cache, layer, q, out, owns_out, scale, config, version, max_length, stream, window, softcap):
        self.q, self.out, self.owns_out, self.version = q, out, owns_out, version
        self.max_length, self.window = max_length, window          # window: an int <= the layer's slots
        self.layer_lengths = cache.host_lengths_view(layer)   # the host mirror (read-only view): max -> the grid
        batch, n_heads, head_dim = q.shape
        self.batch, self.n_kv_heads, self.n_heads = batch, cache.n_kv_heads, n_heads
        self.config = config
        k, v, lengths = cache.k(layer), cache.v(layer), cache.device_lengths(layer)
        scale_log2, cap = np.float32(scale * LOG2E), np.float32(0.0 if softcap is None else softcap * LOG2E)
        variant = (cache.kind(layer) == "ring", softcap is not None)     # compiled in only where needed
        if version == "v0":
            kernel = make_decode_v0(head_dim, config.threads, *variant)
            self.launch = Launch(kernel, (n_heads, batch), config.threads,
                                 (q, k, v, lengths, scale_log2, np.int64(window), cap, out), stream)
            return
        group = n_heads // cache.n_kv_heads
        itemsize = np.dtype(k.dtype).itemsize
        make = make_decode_v1 if version == "v1" else make_decode_v2
        kernel = make(head_dim, group, config.threads, config.dims_per_lane, config.keys_per_step, itemsize,
                      config.min_blocks_per_sm, *variant)
        (k_word, _), (v_word, _) = kv_word_types(version, head_dim, config.dims_per_lane, itemsize)
        k, v = k.view(np.dtype(k_word.name)), v.view(np.dtype(v_word.name))   # the rows as words: wide loads
        self.split, _ = plan(batch, cache.n_kv_heads, 1, config)
        most_splits = n_splits_for(window, config.split or MIN_SPLIT)
        ws = cache.decode_workspace()
        self.launch = Launch(kernel, (1, cache.n_kv_heads, batch), config.threads,
                             (q, k, v, lengths, np.int64(self.split), scale_log2, np.int64(window), cap,
                              ws.partials(n_heads, most_splits), ws.counters, out), stream)

    def __call__(self):
        max_length = self.max_length or int(self.layer_lengths.max())
        if self.version == "v0":
            self.launch()
            return
        split, n_splits = plan(self.batch, self.n_kv_heads, min(max_length, self.window), self.config)
        if split != self.split:                                 # a longer context: longer splits
            self.split = split
            self.launch.set_arg(4, np.int64(split))
        self.launch(grid=(n_splits, self.n_kv_heads, self.batch))


def check_query(q, cache, cache_type, layer):
    """What both decode APIs check first (here and paged.py's): the cache's type, the layer, q's rank and dtype
    -> (layer, batch, n_heads, head_dim)."""
    if not isinstance(cache, cache_type):
        raise ValueError(f"cache must be a numbattn.{cache_type.__name__}; got {type(cache).__name__}")
    layer = cache.check_layer(layer)
    check_rank("q", q, 3, "[batch, n_heads, head_dim]")
    check_dtype("q", q)
    check_heads("q", q.shape[1], "the cache", cache.n_kv_heads)
    return (layer, *q.shape)


def check_out_and_config(q, out, config, version, backend, n_kv_heads):
    """What both decode APIs check last: out (None, or a float32 device array shaped as q) and the launch
    config (None: the default for this version, backend, head_dim and group) -> the config."""
    if out is not None and (tuple(out.shape) != tuple(q.shape) or np.dtype(out.dtype) != np.float32
                            or not _backend.is_device_array(out)):
        raise ValueError(f"out has shape {tuple(out.shape)} and dtype {np.dtype(out.dtype).name}; expected a "
                         f"device array of shape {tuple(q.shape)}, float32")
    if config is None:
        return default_config(version, backend, q.shape[2], q.shape[1] // n_kv_heads)
    check_config(config, version, q.shape[2])
    return config


def check_decode_args(q, cache, layer, scale, out, config, version, window, softcap):
    """Everything decode_attention checks, once per (cache, layer, q, out): -> (layer, scale, config, window,
    softcap), window an int: the layer's window (or a smaller one asked for), or its slots (every token held)."""
    from .kvcache import KVCache
    layer, batch, n_heads, head_dim = check_query(q, cache, KVCache, layer)
    if batch != cache.batch or head_dim != cache.head_dim:
        raise ValueError(f"q has shape {tuple(q.shape)} but the cache holds batch {cache.batch}, head_dim "
                         f"{cache.head_dim}")
    check_head_dim("q", head_dim)
    scale, softcap = check_scale(scale, head_dim), check_softcap(softcap)
    window, own = check_window(window), cache.window(layer)
    if window is not None and own is not None and window > own:
        raise ValueError(f"window={window}: layer {layer} keeps a sliding window of {own} tokens (a ring buffer); "
                         f"it cannot attend to more")
    if version not in VERSIONS:
        raise ValueError(f"version={version!r}: expected one of {VERSIONS}")
    config = check_out_and_config(q, out, config, version, cache.backend, cache.n_kv_heads)
    return layer, scale, config, min(window or own or cache.slots(layer), cache.slots(layer)), softcap


def host_key(q, cache, out, key):
    """The key under which a host cache keeps a host query's checked call (host_decode, made for its shape and dtype
    with the call's other arguments: the checks depend on nothing else), or None: a device cache or query, an out,
    an argument that cannot be a key. The NumPy engine's decode step then costs its kernel and ~2 us more (~15 us
    of checks and set-up a layer before: a token of SmolLM2, 30 layers, spent 0.45 ms on them)."""
    if out is not None or not isinstance(q, np.ndarray) or not hasattr(cache, "checked_calls") or cache.on_device:
        return None
    memo = (*key, q.shape, q.dtype.str)
    try:
        hash(memo)
    except TypeError:                     # e.g. a list for a number: check_decode_args names it
        return None
    return memo


def host_decode(cache, layer, scale, window, softcap):
    """The NumPy backend's decode of one layer, arguments checked -> a function of a host q [batch, n_heads,
    head_dim] -> float32 out: the CPU kernel reading a float32 cache's storage in place (a ring's slots too), or
    for a float16 one the NumPy reference on the tokens each row sees (at the call: the function is kept)."""
    k, v = _backend.to_host(cache.k(layer)), _backend.to_host(cache.v(layer))
    if k.dtype == np.float32:
        return cpu_attention.prepare(k, v, cache.host_lengths_view(layer), scale, window, softcap)

    def reference_path(q):
        if cache.kind(layer) == "full":     # token p in slot p already: the storage is the oracle's layout
            keys, values, n = k, v, cache.layer_lengths(layer)
        else:                               # a ring: each row's last min(n, window) tokens, gathered in order
            keys, values, n = cache.last_tokens(layer, window)
        return reference.decode_attention(q, keys, values, n, scale=scale, window=window, softcap=softcap)
    return reference_path


def decode_attention(q, cache, layer, scale=None, out=None, config=None, version=DEFAULT_VERSION, max_length=None,
                     stream=0, window=None, softcap=None):
    """One query token per row over the cached keys/values of `layer`: softmax(soft_cap(q k^T * scale)) v per row.

    q [batch, n_heads, head_dim] float32/float16, host (-> host result) or device (-> device result).
    Row b attends to its last min(n, window) tokens, n = cache.layer_lengths(layer)[b] (the new token's own K/V
    already appended); a row holding none gets zeros. window: the layer's own sliding window by default (None
    for a full layer: every token), or a smaller one; softcap: scores s -> softcap * tanh(s / softcap).
    Returns float32 [batch, n_heads, head_dim]. `out` (device float32, q's shape) receives the result if given;
    without it, a device q's result lands in a buffer the cache keeps per layer: valid until the next call for
    that layer (pass `out` to keep results apart). `config` overrides the launch shape and `version` the kernel
    (tests use tiny splits and both kernels). A device q seen before (the same object, and the same out) skips
    every check and goes straight to one launch; a host q on a host cache is checked once per shape, dtype and
    argument set (host_key). max_length: a bound on every row's length that fixes the grid
    (so a launch captured into a CUDA graph stays right while the context grows up to it; default: the
    cache's current longest row). stream: a Numba stream for the launch (device q only).
    """
    ws = cache.decode_workspace() if getattr(cache, "on_device", False) else None
    key = (layer, scale, config, version, max_length, stream, window, softcap)
    call = ws.calls.get(key) if ws is not None else None
    if call is not None and call.q is q and (call.out is out or (out is None and call.owns_out)):
        call()                                           # the hot path: a device q (and out) seen before
        return call.out
    memo = host_key(q, cache, out, key)
    host_call = cache.checked_calls.get(memo) if memo is not None else None
    if host_call is None:
        layer, scale, config, window, softcap = check_decode_args(q, cache, layer, scale, out, config, version,
                                                                  window, softcap)
        if max_length is not None and not 1 <= as_count("max_length", max_length) <= cache.max_len:
            raise ValueError(f"max_length={max_length} must lie in [1, {cache.max_len}] (the cache's max_len)")
        if memo is not None:
            host_call = cache.checked_calls[memo] = host_decode(cache, layer, scale, window, softcap)
    if host_call is not None:
        return host_call(q)                              # a host q on a host cache
    on_device = _backend.is_device_array(q)

    def numpy_path():
        o = host_decode(cache, layer, scale, window, softcap)(_backend.to_host(q))
        return _backend.deliver(o, out, on_device)

    def kernel_path():
        ws = cache.decode_workspace()
        if on_device:
            dq, o = q, out if out is not None else ws.out_buffer(q.shape, (layer, tuple(q.shape)))
        else:               # host in, host out: the device copies of q and out never escape, so reuse them
            dq, o = ws.host_io(q)
            dq.copy_to_device(np.ascontiguousarray(q))
            o = out if out is not None else o
        prepared = ws.calls.get(key)
        if prepared is None or prepared.q is not dq or prepared.out is not o:
            prepared = ws.calls[key] = _PreparedCall(cache, layer, dq, o, out is None, scale, config, version,
                                                     max_length, stream if on_device else 0, window, softcap)
        prepared()
        return o if on_device else o.copy_to_host()

    return _backend.run("decode attention", cache.backend, kernel_path, numpy_path)
