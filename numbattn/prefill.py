"""Prefill attention: softmax(Q K^T * scale) V without ever building the N×N score matrix (the host side).

What you will learn here
------------------------
Naive attention writes an [q_len, kv_len] score matrix per head to memory, reads it back for the softmax
and again for the product with V: O(N²) bytes of traffic and storage. FlashAttention never stores it.
It walks over K and V in tiles and keeps, for each query row i, three running quantities:

    m_i   the largest score seen so far                    (so exp() never overflows)
    l_i   sum_j exp(s_ij - m_i) over the keys seen so far  (the softmax denominator)
    acc   sum_j exp(s_ij - m_i) * v_j                      (the un-normalised output row)

When a new tile raises the maximum from m_old to m_new, everything accumulated so far was scaled by
exp(-m_old) and must be rescaled by alpha = exp(m_old - m_new); then the tile's terms are added. After the
last tile a single division acc / l_i gives the exact softmax-weighted sum. (FlashAttention-2, Alg. 1.)
We fold log2(e) into the scale and use exp2, as the FlashAttention kernels do: exp(x) = exp2(x * log2 e).
The rule is written once (numbattn.reference.softmax_rescale, compiled into every kernel by kernels/softmax.py).

The kernels live in numbattn/kernels/, four versions side by side (llm.c style; the table is in
kernels/__init__.py): v0 naive, v1 tiled (the teaching kernel), v2 register-tiled, v3 tensor cores (the
default). This module is what runs them: the launch shapes per version and GPU, the checks, the prepared
launches, and the public calls `attention` and `flash_attention`.

Causal masking is bottom-right aligned (FlashAttention-2): with q_len <= kv_len, query i sits at absolute
position p = i + (kv_len - q_len) and sees keys j <= p; a sliding window (Mistral, Gemma) also hides keys
j <= p - window. Key tiles that lie entirely outside (above the diagonal, before a block's first window) are
never loaded, so a windowed prefill costs O(q_len * window); only the tiles that straddle a boundary are masked
element by element. An optional soft cap squeezes every score s into cap * tanh(s / cap) first (Gemma 2).
Grouped-query attention: query head h reads KV head h // (n_heads // n_kv_heads); K and V are never copied.
The kernels read key j from slot j mod S of K and V (S slots): a plain array (S = kv_len), or the ring buffer
that a sliding-window layer of the KV cache keeps (chunk_attention).

Tile sizes are compile-time constants (they size shared and local arrays), so kernels come from a cached
factory: tests run 4×4 tiles in the simulator (v3: one warp, 16 rows), the GPU runs 64- or 128-row query tiles.
"""
from dataclasses import dataclass

import numpy as np
from numba import cuda, float32

from . import backend as _backend
from . import gpu, reference
from .kernels import prefill_mma, prefill_naive, prefill_registers, prefill_tiled
from .kernels.common import SIM
from .launch import Launch, planned
from .reference import LOG2E
from .validate import check_dtype, check_heads, check_qkv, check_rank, check_scale, check_softcap, check_window


@dataclass(frozen=True)
class Tiles:
    """Launch shape of one kernel version: query rows per block, keys per tile, threads per block; and (v3 only)
    dim_split: warps that share 16 query rows, each holding head_dim / dim_split of their dims (large heads)."""
    block_m: int
    block_n: int
    threads: int
    dim_split: int = 1


# --------------------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------------------
def check_version(version):
    if version not in VERSIONS:
        raise ValueError(f"version={version!r}: expected one of {VERSIONS}")


def check_tiles(version, tiles, head_dim):
    """Every version's launch shape, before anything is compiled: v0 and v1 run one thread per query row."""
    check_version(version)
    ok = isinstance(tiles, Tiles) and min(tiles.block_m, tiles.block_n, tiles.threads, tiles.dim_split) >= 1
    if ok and version in ("v0", "v1") and tiles.threads != tiles.block_m:
        raise ValueError(f"{version} tiles {tiles}: threads must equal block_m (one thread per query row)")
    if not ok:
        raise ValueError(f"tiles={tiles!r}: expected Tiles(block_m, block_n, threads) with positive sizes")
    if version != "v3" and tiles.dim_split != 1:
        raise ValueError(f"{version} tiles {tiles}: only v3 splits a head's dims over warps (dim_split=1)")
    if version == "v2":
        prefill_registers.layout(tiles.block_m, tiles.block_n, tiles.threads, head_dim)
    if version == "v3":
        prefill_mma.layout(tiles.block_m, tiles.block_n, tiles.threads, head_dim, tiles.dim_split)


def make_kernel(version, head_dim, tiles, ring=False, capped=False, with_lse=False):
    """The compiled (cached) kernel of `version` for this head_dim and launch shape; ring: for K/V that wrap (a ring
    buffer holding fewer slots than kv_len); capped: with a logit soft cap (compile-time choices: without them
    the kernels keep their registers); with_lse: the variant that also writes each row's log-sum-exp (one more
    argument, lse [B, H, Lq]; v1 and v3, see LSE_VERSIONS)."""
    check_tiles(version, tiles, head_dim)
    if with_lse and version not in LSE_VERSIONS:
        raise ValueError(f"version={version!r} does not return the log-sum-exp; {LSE_VERSIONS} do")
    if version == "v0":
        return prefill_naive.make_v0(head_dim, tiles.block_m, ring, capped)
    if version == "v1":
        return prefill_tiled.make_v1(head_dim, tiles.block_m, tiles.block_n, ring=ring, capped=capped,
                                     with_lse=with_lse)
    if version == "v2":
        return prefill_registers.make_v2(head_dim, tiles.block_m, tiles.block_n, tiles.threads, ring=ring,
                                         capped=capped)
    return prefill_mma.make_v3(head_dim, tiles.block_m, tiles.block_n, tiles.threads, tiles.dim_split, ring, capped,
                               with_lse)


VERSIONS = ("v0", "v1", "v2", "v3")
DEFAULT_VERSION = "v3"
LSE_VERSIONS = ("v1", "v3")     # the versions that can also return the log-sum-exp (the teaching one, the default)
# The simulator runs one Python thread per CUDA thread, so tests use tiny tiles (several tiles per sequence).
# v3's MMAs are per warp: one warp of 32 threads owning 16 query rows, keys in blocks of 8.
SIM_TILES = {"v0": Tiles(4, 1, 4), "v1": Tiles(4, 4, 4), "v2": Tiles(4, 4, 4), "v3": Tiles(16, 8, 32)}


# (version, largest head_dim of the class) -> (tiles above 48 KB of static shared memory where allowed, tiles within).
# v3 at head_dim 128 and 256: Q's fragments of a whole head would not fit in a lane's registers (head_dim / 8 * 8
# floats), so dim_split warps share 16 rows, each with 64 of their dims (kernels/prefill_mma.py); 8-key tiles: at
# 16 keys ptxas spills (sm_90: 184 bytes at 128, 328 at 256), at 8 nothing. Not yet timed: see the tile sweep.
GPU_TILES = {
    ("v0", 64): (Tiles(64, 1, 64),) * 2, ("v0", 128): (Tiles(64, 1, 64),) * 2, ("v0", 256): (Tiles(64, 1, 64),) * 2,
    ("v1", 64): (Tiles(64, 64, 64), Tiles(64, 32, 64)), ("v1", 128): (Tiles(32, 16, 32),) * 2,
    ("v1", 256): (Tiles(32, 16, 32), Tiles(16, 8, 16)),
    ("v2", 64): (Tiles(128, 32, 256), Tiles(64, 32, 128)), ("v2", 128): (Tiles(64, 32, 256), Tiles(32, 16, 64)),
    ("v2", 256): (Tiles(32, 16, 64), Tiles(16, 8, 32)),
    ("v3", 64): (Tiles(128, 32, 256),) * 2, ("v3", 128): (Tiles(64, 8, 256, 2),) * 2,
    ("v3", 256): (Tiles(32, 8, 256, 4),) * 2,
}


def gpu_tiles(version, head_dim, cc=None):
    """Tiles for a real GPU (GPU_TILES), from the launch-shape sweep in BENCHMARKS.md (H100, n = 4096, causal; v3:
    the sweep of benchmarks/gpu_report.py's `tiles` section, 2026-11-26, whose v3 tiles all stay under 48 KB; v3 at
    head_dim 128 and 256 split each head's dims over 2 and 4 warps, also under 48 KB, chosen by ptxas's spills:
    to be confirmed by that sweep on the GPU).

    The big tiles (v2: 65-75 KB, v1: 48.3 KB) declare more *static* shared memory than the 48 KB that CUDA
    documents per block. On the H100 machine Numba's kernels with them compiled (through the driver's JIT),
    ran and matched the reference; but GPUs before sm_90 reject them, and so does ptxas inside nvJitLink
    (`tools/compile_check.py` shows it), which some numba-cuda installs link through. So they are used only
    on sm_90+ where a one-time probe kernel with 64 KB of static shared memory compiles and runs; otherwise
    the tiles that fit under 48 KB. cc: (major, minor) to ask about a GPU (no probe); default: this GPU.
    """
    check_version(version)
    big_smem = cc >= (9, 0) if cc else gpu.compute_capability() >= (9, 0) and gpu.static_shared_over_48k()
    big, small = GPU_TILES[version, 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256]
    return big if big_smem else small


def default_tiles(version, backend, head_dim):
    check_version(version)
    return SIM_TILES[version] if backend == "sim" else gpu_tiles(version, head_dim)


def launch(q, k, v, out, causal, scale, version=DEFAULT_VERSION, tiles=None, stream=0, kv_len=None, window=None,
           softcap=None, lse=None):
    """Launch one prefill kernel on device arrays (already validated). Returns out.

    kv_len: the keys, at positions 0 .. kv_len - 1, key j in slot j mod S of k and v (S = k.shape[2]; default
    kv_len = S: a plain array; a ring-buffer layer of the KV cache passes the tokens it has seen). window: None
    or the sliding window; softcap: None or the cap (both as in numbattn.attention). lse: a float32 device array
    [B, H, Lq] that also receives each row's log-sum-exp (versions LSE_VERSIONS).
    Through a prepared Launch (numbattn/launch.py) kept per kernel and argument layout: a repeated call with
    arrays of the same dtypes, shapes and strides only re-marshals the arguments (no typing, no lookup)."""
    batch, n_heads, q_len, head_dim = q.shape
    if version == "v3" and not SIM and not gpu.has_tf32_mma():
        version, tiles = ("v2", None) if lse is None else ("v1", None)
    tiles = tiles or default_tiles(version, "cuda", head_dim)
    grid = ((q_len + tiles.block_m - 1) // tiles.block_m, n_heads, batch)
    kv_len = k.shape[2] if kv_len is None else int(kv_len)
    args = (q, k, v, out, float32(scale * LOG2E), bool(causal), np.int64(kv_len),
            np.int64(kv_len if window is None else min(window, kv_len)),        # a window >= kv_len hides nothing
            float32(0.0 if softcap is None else softcap * LOG2E))              # the kernels' log2 units
    args += () if lse is None else (lse,)
    variant = (kv_len > k.shape[2], softcap is not None, lse is not None)     # (ring, capped, with_lse)
    if SIM:     # the simulator has no launch cost worth saving (and the lessons' tracer passes stand-in arrays)
        kernel = make_kernel(version, head_dim, tiles, *variant)
        if not planned(kernel, args):
            kernel[grid, tiles.threads, stream](*args)
        return out
    arrays = args[:4] + args[9:]
    key = (version, tiles, variant, stream_key(stream), *((a.dtype.str, a.shape, a.strides) for a in arrays))
    prepared = _LAUNCHES.get(key)
    if prepared is None:
        if len(_LAUNCHES) > 256:
            _LAUNCHES.clear()
        prepared = _LAUNCHES[key] = Launch(make_kernel(version, head_dim, tiles, *variant), grid, tiles.threads,
                                           args, stream)
    elif any(a is not b and not (np.isscalar(a) and a == b) for a, b in zip(prepared.args, args)):
        prepared.set_args(args)
    prepared(grid)
    return out


_LAUNCHES = {}


def stream_key(stream):
    return id(stream) if stream else 0


def flash_attention(q, k, v, causal=False, scale=None, backend="auto", out=None, version=DEFAULT_VERSION,
                    tiles=None, window=None, softcap=None, return_lse=False, lse_out=None):
    """numbattn.attention with the kernel version, tile sizes and output buffer exposed (tests, lessons, bench).

    q [batch, n_heads, q_len, head_dim], k, v [batch, n_kv_heads, kv_len, head_dim]: float32 or float16,
    host NumPy arrays (-> host result) or Numba device arrays (-> device result). Returns float32.
    `out`, if given, is a float32 device array of q's shape that the kernel fills (e.g. NaN-poisoned by a test).
    return_lse: return (out, lse), lse [batch, n_heads, q_len] float32 the log-sum-exp of each row's (soft-capped,
    masked) scores (natural log; what numbattn.attention_backward takes), written into lse_out if given (versions
    v1 and v3).
    """
    check_qkv(q, k, v, causal)
    scale = check_scale(scale, q.shape[3])
    window, softcap = check_window(window, causal), check_softcap(softcap)
    check_output("out", out, q.shape)
    if return_lse:
        check_output("lse_out", lse_out, q.shape[:3])
        if version not in LSE_VERSIONS:
            raise ValueError(f"return_lse needs version in {LSE_VERSIONS}, not {version!r}")
    be = _backend.resolve(backend)
    check_version(version)
    if tiles is not None:
        check_tiles(version, tiles, q.shape[3])
    on_device = _backend.is_device_array(q)

    def numpy_path():
        qh, kh, vh = (_backend.to_host(x) for x in (q, k, v))
        o = _backend.deliver(reference.attention(qh, kh, vh, causal=causal, scale=scale, window=window,
                                                 softcap=softcap), out, on_device)
        if not return_lse:
            return o
        s = reference.scores(qh, kh, causal, scale, window, softcap)
        return o, _backend.deliver(reference.log_sum_exp(s), lse_out, on_device)

    def kernel_path():
        dq, dk, dv = (x if _backend.is_device_array(x) else cuda.to_device(np.ascontiguousarray(x))
                      for x in (q, k, v))
        o = out if out is not None else cuda.device_array(q.shape, dtype=np.float32)
        lse = None if not return_lse else lse_out if lse_out is not None else \
            cuda.device_array(q.shape[:3], dtype=np.float32)
        launch(dq, dk, dv, o, causal, scale, version, tiles or default_tiles(version, be, q.shape[3]),
               window=window, softcap=softcap, lse=lse)
        results = (o,) if lse is None else (o, lse)
        results = results if on_device else tuple(x.copy_to_host() for x in results)
        return results if return_lse else results[0]

    return _backend.run(f"prefill attention {version}", be, kernel_path, numpy_path)


def check_output(name, buffer, shape):
    """An output buffer given by the caller: None, or a float32 array of this shape (else a ValueError naming it)."""
    if buffer is not None and (tuple(buffer.shape) != tuple(shape) or np.dtype(buffer.dtype) != np.float32):
        raise ValueError(f"{name} has shape {tuple(buffer.shape)} and dtype {np.dtype(buffer.dtype).name}; "
                         f"expected {tuple(shape)} float32")


def attention(q, k, v, causal=False, scale=None, window=None, softcap=None, backend="auto", return_lse=False):
    """softmax(soft_cap(q k^T * scale), causal, window) v with the default (fastest correct) kernel.

    window: a sliding window (needs causal): query i, at absolute position p = i + kv_len - q_len, sees keys
    p - window < j <= p (transformers' Mistral/Gemma convention); None: every key up to the diagonal.
    softcap: scores s become softcap * tanh(s / softcap) before the softmax (Gemma 2); None: unchanged.
    return_lse: (out, lse), the log-sum-exp of each row's scores too, what numbattn.attention_backward takes.
    See flash_attention for shapes, dtypes and where the result lives."""
    return flash_attention(q, k, v, causal=causal, scale=scale, backend=backend, window=window, softcap=softcap,
                           return_lse=return_lse)


def chunk_attention(q, cache, layer, scale=None, softcap=None, out=None, version=DEFAULT_VERSION, tiles=None,
                    stream=0):
    """Prefill attention over the KV cache: q [batch, n_heads, t, head_dim] are the queries of the t tokens that
    every row of `layer` appended last (their K and V already in the cache), each attending causally to every
    earlier token the layer holds: all of them in a full layer, its window in a sliding-window layer (read from
    its ring buffer where it wraps). Every row must hold the same number of tokens. Returns float32 [batch,
    n_heads, t, head_dim]: host q -> host result; device q -> device result (in `out`, if given)."""
    n, window = check_chunk(q, cache, layer)
    scale, softcap = check_scale(scale, q.shape[3]), check_softcap(softcap)
    check_output("out", out, q.shape)
    on_device = _backend.is_device_array(q)

    def numpy_path():
        k, v, held = cache.last_tokens(layer, n if window is None else q.shape[2] + window - 1)
        o = reference.attention(_backend.to_host(q), k[:, :, :held[0]], v[:, :, :held[0]], causal=True, scale=scale,
                                window=window, softcap=softcap)
        return _backend.deliver(o, out, on_device)

    def kernel_path():
        dq = q if on_device else cuda.to_device(np.ascontiguousarray(q))
        o = out if out is not None else cuda.device_array(q.shape, dtype=np.float32)
        launch(dq, cache.k(layer), cache.v(layer), o, True, scale, version,
               tiles or default_tiles(version, cache.backend, q.shape[3]), stream, kv_len=n, window=window,
               softcap=softcap)
        return o if on_device else o.copy_to_host()

    return _backend.run(f"prefill attention over the cache {version}", cache.backend, kernel_path, numpy_path)


def check_chunk(q, cache, layer):
    """chunk_attention's arguments -> (tokens every row holds, the layer's window)."""
    from .kvcache import KVCache
    if not isinstance(cache, KVCache):
        raise ValueError(f"cache must be a numbattn.KVCache; got {type(cache).__name__}")
    layer = cache.check_layer(layer)
    check_rank("q", q, 4, "[batch, n_heads, t, head_dim]")
    check_dtype("q", q)
    batch, n_heads, t, head_dim = q.shape
    if batch != cache.batch or head_dim != cache.head_dim or t < 1:
        raise ValueError(f"q has shape {tuple(q.shape)} but the cache holds batch {cache.batch}, head_dim "
                         f"{cache.head_dim} (and t >= 1 new tokens are needed)")
    check_heads("q", n_heads, "the cache", cache.n_kv_heads)
    lengths, window = cache.layer_lengths(layer), cache.window(layer)
    if (lengths != lengths[0]).any() or lengths[0] < t:
        raise ValueError(f"chunk_attention: every row of layer {layer} must hold the same number of tokens, at "
                         f"least q's {t}; they hold {lengths.tolist()}")
    n, slots = int(lengths[0]), cache.slots(layer)
    if window is not None and max(0, n - t - window + 1) < max(0, n - slots):       # the oldest needed, the oldest held
        raise ValueError(f"chunk_attention: {t} queries with a window of {window} need the last {t + window - 1} "
                         f"tokens, more than layer {layer}'s ring holds ({slots} slots)")
    return int(lengths[0]), window
