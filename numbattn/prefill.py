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

Causal masking is bottom-right aligned (FlashAttention-2): with q_len <= kv_len, query i sees keys
j <= i + (kv_len - q_len). Key tiles that lie entirely above the diagonal are never loaded; only the tile that
straddles the diagonal is masked element by element. Grouped-query attention: query head h reads KV head
h // (n_heads // n_kv_heads); K and V are never copied.

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
from .launch import Launch
from .reference import LOG2E
from .validate import check_qkv, check_scale


@dataclass(frozen=True)
class Tiles:
    """Launch shape of one kernel version: query rows per block, keys per tile, threads per block."""
    block_m: int
    block_n: int
    threads: int


# --------------------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------------------
def check_version(version):
    if version not in VERSIONS:
        raise ValueError(f"version={version!r}: expected one of {VERSIONS}")


def check_tiles(version, tiles, head_dim):
    """Every version's launch shape, before anything is compiled: v0 and v1 run one thread per query row."""
    check_version(version)
    ok = isinstance(tiles, Tiles) and min(tiles.block_m, tiles.block_n, tiles.threads) >= 1
    if ok and version in ("v0", "v1") and tiles.threads != tiles.block_m:
        raise ValueError(f"{version} tiles {tiles}: threads must equal block_m (one thread per query row)")
    if not ok:
        raise ValueError(f"tiles={tiles!r}: expected Tiles(block_m, block_n, threads) with positive sizes")
    if version == "v2":
        prefill_registers.layout(tiles.block_m, tiles.block_n, tiles.threads, head_dim)
    if version == "v3":
        prefill_mma.layout(tiles.block_m, tiles.block_n, tiles.threads, head_dim)


def make_kernel(version, head_dim, tiles, with_lse=False):
    """The compiled (cached) kernel of `version` for this head_dim and launch shape; with_lse: the variant that also
    writes each row's log-sum-exp (one more argument, lse [B, H, Lq]; v1 and v3, see LSE_VERSIONS)."""
    check_tiles(version, tiles, head_dim)
    if with_lse and version not in LSE_VERSIONS:
        raise ValueError(f"version={version!r} does not return the log-sum-exp; {LSE_VERSIONS} do")
    if version == "v0":
        return prefill_naive.make_v0(head_dim, tiles.block_m)
    if version == "v1":
        return prefill_tiled.make_v1(head_dim, tiles.block_m, tiles.block_n, with_lse=with_lse)
    if version == "v2":
        return prefill_registers.make_v2(head_dim, tiles.block_m, tiles.block_n, tiles.threads)
    return prefill_mma.make_v3(head_dim, tiles.block_m, tiles.block_n, tiles.threads, with_lse=with_lse)


VERSIONS = ("v0", "v1", "v2", "v3")
DEFAULT_VERSION = "v3"
LSE_VERSIONS = ("v1", "v3")     # the versions that can also return the log-sum-exp (the teaching one, the default)
# The simulator runs one Python thread per CUDA thread, so tests use tiny tiles (several tiles per sequence).
# v3's MMAs are per warp: one warp of 32 threads owning 16 query rows, keys in blocks of 8.
SIM_TILES = {"v0": Tiles(4, 1, 4), "v1": Tiles(4, 4, 4), "v2": Tiles(4, 4, 4), "v3": Tiles(16, 8, 32)}


def gpu_tiles(version, head_dim, cc=None):
    """Tiles for a real GPU, from the launch-shape sweep in BENCHMARKS.md (H100, n = 4096, causal; v3: the sweep
    of benchmarks/gpu_report.py's `tiles` section, 2026-11-26, whose v3 tiles all stay under 48 KB).

    The big tiles (v2: 65-75 KB, v1: 48.3 KB) declare more *static* shared memory than the 48 KB that CUDA
    documents per block. On the H100 machine Numba's kernels with them compiled (through the driver's JIT),
    ran and matched the reference; but GPUs before sm_90 reject them, and so does ptxas inside nvJitLink
    (`tools/compile_check.py` shows it), which some numba-cuda installs link through. So they are used only
    on sm_90+ where a one-time probe kernel with 64 KB of static shared memory compiles and runs; otherwise
    the tiles that fit under 48 KB. cc: (major, minor) to ask about a GPU (no probe); default: this GPU.
    """
    big_d = head_dim > 64
    big_smem = cc >= (9, 0) if cc else gpu.compute_capability() >= (9, 0) and gpu.static_shared_over_48k()
    if big_smem:
        return {"v0": Tiles(64, 1, 64),
                "v1": Tiles(32, 16, 32) if big_d else Tiles(64, 64, 64),
                "v2": Tiles(64, 32, 256) if big_d else Tiles(128, 32, 256),
                "v3": Tiles(128, 8, 256) if big_d else Tiles(128, 32, 256)}[version]
    return {"v0": Tiles(64, 1, 64),
            "v1": Tiles(32, 16, 32) if big_d else Tiles(64, 32, 64),
            "v2": Tiles(32, 16, 64) if big_d else Tiles(64, 32, 128),
            "v3": Tiles(128, 8, 256) if big_d else Tiles(128, 32, 256)}[version]


def default_tiles(version, backend, head_dim):
    check_version(version)
    return SIM_TILES[version] if backend == "sim" else gpu_tiles(version, head_dim)


def launch(q, k, v, out, causal, scale, version=DEFAULT_VERSION, tiles=None, stream=0, lse=None):
    """Launch one prefill kernel on device arrays (already validated). Returns out. lse: a float32 device array
    [B, H, Lq] that also receives each row's log-sum-exp (versions LSE_VERSIONS).

    Through a prepared Launch (numbattn/launch.py) kept per kernel and argument layout: a repeated call with
    arrays of the same dtypes, shapes and strides only re-marshals the arguments (no typing, no lookup)."""
    batch, n_heads, q_len, head_dim = q.shape
    if version == "v3" and not SIM and not gpu.has_tf32_mma():
        version, tiles = ("v2", None) if lse is None else ("v1", None)
    tiles = tiles or default_tiles(version, "cuda", head_dim)
    grid = ((q_len + tiles.block_m - 1) // tiles.block_m, n_heads, batch)
    args = (q, k, v, out, float32(scale * LOG2E), bool(causal)) + (() if lse is None else (lse,))
    if SIM:     # the simulator has no launch cost worth saving (and the lessons' tracer passes stand-in arrays)
        make_kernel(version, head_dim, tiles, lse is not None)[grid, tiles.threads, stream](*args)
        return out
    arrays = args[:4] + args[6:]
    key = (version, tiles, stream_key(stream), *((a.dtype.str, a.shape, a.strides) for a in arrays))
    prepared = _LAUNCHES.get(key)
    if prepared is None:
        if len(_LAUNCHES) > 256:
            _LAUNCHES.clear()
        prepared = _LAUNCHES[key] = Launch(make_kernel(version, head_dim, tiles, lse is not None), grid,
                                           tiles.threads, args, stream)
    else:
        prepared.set_args(args)
    prepared(grid)
    return out


_LAUNCHES = {}


def stream_key(stream):
    return id(stream) if stream else 0


def flash_attention(q, k, v, causal=False, scale=None, backend="auto", out=None, version=DEFAULT_VERSION,
                    tiles=None, return_lse=False, lse_out=None):
    """numbattn.attention with the kernel version, tile sizes and output buffer exposed (tests, lessons, bench).

    q [batch, n_heads, q_len, head_dim], k, v [batch, n_kv_heads, kv_len, head_dim]: float32 or float16,
    host NumPy arrays (-> host result) or Numba device arrays (-> device result). Returns float32.
    `out`, if given, is a float32 device array of q's shape that the kernel fills (e.g. NaN-poisoned by a test).
    return_lse: return (out, lse), lse [batch, n_heads, q_len] float32 the log-sum-exp of each row's scores
    (natural log; what numbattn.attention_backward takes), written into lse_out if given (versions v1 and v3).
    """
    check_qkv(q, k, v, causal)
    scale = check_scale(scale, q.shape[3])
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
        o = _backend.deliver(reference.attention(qh, kh, vh, causal=causal, scale=scale), out, on_device)
        if not return_lse:
            return o
        return o, _backend.deliver(reference.log_sum_exp(reference.scores(qh, kh, causal, scale)), lse_out, on_device)

    def kernel_path():
        dq, dk, dv = (x if _backend.is_device_array(x) else cuda.to_device(np.ascontiguousarray(x))
                      for x in (q, k, v))
        o = out if out is not None else cuda.device_array(q.shape, dtype=np.float32)
        lse = None if not return_lse else lse_out if lse_out is not None else \
            cuda.device_array(q.shape[:3], dtype=np.float32)
        launch(dq, dk, dv, o, causal, scale, version, tiles or default_tiles(version, be, q.shape[3]), lse=lse)
        results = (o,) if lse is None else (o, lse)
        results = results if on_device else tuple(x.copy_to_host() for x in results)
        return results if return_lse else results[0]

    return _backend.run(f"prefill attention {version}", be, kernel_path, numpy_path)


def check_output(name, buffer, shape):
    """An output buffer given by the caller: None, or a float32 array of this shape (else a ValueError naming it)."""
    if buffer is not None and (tuple(buffer.shape) != tuple(shape) or np.dtype(buffer.dtype) != np.float32):
        raise ValueError(f"{name} has shape {tuple(buffer.shape)} and dtype {np.dtype(buffer.dtype).name}; "
                         f"expected {tuple(shape)} float32")


def attention(q, k, v, causal=False, scale=None, backend="auto", return_lse=False):
    """softmax(q k^T * scale, causal) v with the default (fastest correct) kernel; with return_lse, (out, lse): the
    log-sum-exp of each row's scores too, what numbattn.attention_backward takes. See flash_attention."""
    return flash_attention(q, k, v, causal=causal, scale=scale, backend=backend, return_lse=return_lse)
