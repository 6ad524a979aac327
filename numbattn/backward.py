"""The attention backward, host side: dQ, dK, dV from the forward's output and log-sum-exp (FlashAttention-2).

    out, lse = numbattn.attention(q, k, v, causal=True, return_lse=True)      # the forward, keeping lse
    dq, dk, dv = numbattn.attention_backward(q, k, v, out, lse, dout, causal=True)

What you will learn here
------------------------
The gradients of out = softmax(q k^T * scale) V (numbattn.reference.attention_backward derives them):

    dV = P^T dO,   dP = dO V^T,   dS = P ∘ (dP - D) with D = rowsum(dO ∘ O),   dQ = dS K * scale,   dK = dS^T Q * scale

all need P, the N×N matrix the forward never stored. The backward does not store it either: it recomputes each
tile of P from the scores and the one number per row the forward kept, its log-sum-exp, P = exp(S - lse) (no
running max, no rescaling: the row's final normaliser is already known). So the backward's memory is O(n):
lse and D [batch, heads, q_len] beside the inputs and the gradients. It runs three launches:

    backward_prep.row_dot        D = rowsum(dO ∘ O) (and dK, dV zeroed, see below)
    dkdv (v1 or v3)              K/V-stationary: a block owns a tile of keys and walks over the query tiles
                                 that see them, accumulating dK and dV in registers
    dq (v1 or v3)                Q-stationary: a block owns a tile of query rows and walks over their keys,
                                 accumulating dQ (a second pass: see kernels/backward_mma.py for why)

Grouped-query attention: dK and dV of a KV head are sums over the query heads that read it; K and V are read in
place (never repeated) and each query head's block adds its rows into fp32 dK, dV with atomics.

Sliding windows and soft caps, as in the forward (`window=`, `softcap=`, validated alike; pass the same ones the
forward that made out and lse had). Which (query, key) pairs are visible is asked only of kernels/common.py's
visible_keys and tile_is_whole, with the window (the query tiles dkdv skips, the key range dq walks, the
per-element mask of both versions): a windowed backward costs O(n · window) as the forward does. A soft cap
s -> cap tanh(s / cap) is the forward's device function on the recomputed scores, and multiplies dS by its slope,
1 - (s_capped / cap)² (kernels/backward_prep.make_p_ds, one place for both versions; reference.attention_backward
the same). Kernels with a cap are a compile-time variant, as the forward's.

Versions, numbered as the forward's whose technique they share (numbattn/kernels/__init__.py has the table):
v1 one thread per row with tiles in shared memory (kernels/backward_tiled.py, the teaching kernels), v3 tensor cores
with 3xTF32 (kernels/backward_mma.py, the default).
"""
from dataclasses import dataclass

import numpy as np
from numba import cuda, float32

from . import backend as _backend
from . import gpu, reference
from .kernels import backward_mma, backward_prep, backward_tiled
from .kernels.common import SIM
from .prefill import Tiles, check_output
from .reference import LOG2E
from .validate import check_dtype, check_qkv, check_rank, check_scale, check_softcap, check_window

VERSIONS = ("v1", "v3")
DEFAULT_VERSION = "v3"


@dataclass(frozen=True)
class BackwardTiles:
    """Launch shapes of the two kernels. dkdv: block_n keys per block, query tiles of block_m rows; dq: block_m
    query rows per block, key tiles of block_n keys (v1: one thread per stationary row; v3: 16 per warp)."""
    dkdv: Tiles
    dq: Tiles


# The simulator runs one Python thread per CUDA thread: tiny tiles, so that short sequences cross several of them.
SIM_TILES = {"v1": BackwardTiles(Tiles(4, 4, 4), Tiles(4, 4, 4)),
             "v3": BackwardTiles(Tiles(8, 16, 32), Tiles(16, 8, 32))}


def gpu_tiles(version, head_dim):
    """Launch shapes for a real GPU, all under 48 KB of static shared memory (backward_mma.shared_bytes). v3 at
    head_dim <= 64: four warps own 64 keys (dkdv) or 64 query rows (dq) and stream tiles of 16 rows of the other
    side; chosen by ptxas's registers and spills (tools/compile_check.py, 2026-12: dkdv 255 registers and 48 bytes
    of stack, dq 248 and none; two warps with tiles of 32 spilled 864 and 608 bytes), not yet by a sweep on a GPU.
    (With the window and soft-cap arguments, sm_90: dkdv 255 and no stack, dq 236; compiled with the cap, dkdv has
    an 8-byte stack frame.) head_dim 128: one warp a block (the accumulators alone are 192 registers a lane; it
    spills: 1312 and 976-byte stack frames); head_dim 256 the same tiles, 66 KB of shared memory (v3_runs_here)."""
    if version == "v1":
        return BackwardTiles(Tiles(32, 64, 64), Tiles(64, 32, 64)) if head_dim <= 64 else \
            BackwardTiles(Tiles(16, 32, 32), Tiles(32, 16, 32))
    if head_dim <= 64:
        return BackwardTiles(Tiles(16, 64, 128), Tiles(64, 16, 128))
    return BackwardTiles(Tiles(16, 16, 32), Tiles(16, 16, 32))


def check_tiles(version, tiles, head_dim):
    if version not in VERSIONS:
        raise ValueError(f"version={version!r}: expected one of {VERSIONS}")
    if not isinstance(tiles, BackwardTiles) or not all(isinstance(t, Tiles) and min(t.block_m, t.block_n, t.threads)
                                                       >= 1 for t in (tiles.dkdv, tiles.dq)):
        raise ValueError(f"tiles={tiles!r}: expected BackwardTiles(dkdv=Tiles(...), dq=Tiles(...)) with positive sizes")
    if version == "v1" and (tiles.dkdv.threads != tiles.dkdv.block_n or tiles.dq.threads != tiles.dq.block_m):
        raise ValueError(f"v1 tiles {tiles}: one thread per stationary row (dkdv: threads = block_n; dq: threads = "
                         f"block_m)")
    if version == "v3":
        backward_mma.layout(tiles.dkdv.block_n, tiles.dkdv.block_m, tiles.dkdv.threads, head_dim)
        backward_mma.layout(tiles.dq.block_m, tiles.dq.block_n, tiles.dq.threads, head_dim)


def make_kernels(version, head_dim, tiles, capped=False):
    """(dkdv, dq): the compiled (cached) kernels of `version` for this head_dim and launch shape; capped: with a
    logit soft cap (a compile-time choice: without it the kernels keep their registers)."""
    check_tiles(version, tiles, head_dim)
    a, c = tiles.dkdv, tiles.dq
    if version == "v1":
        return (backward_tiled.make_dkdv_v1(head_dim, a.block_m, a.block_n, capped),
                backward_tiled.make_dq_v1(head_dim, c.block_m, c.block_n, capped))
    return (backward_mma.make_dkdv_v3(head_dim, a.block_m, a.block_n, a.threads, capped),
            backward_mma.make_dq_v3(head_dim, c.block_m, c.block_n, c.threads, capped))


def launch(q, k, v, out, lse, dout, grads, causal, scale, version=DEFAULT_VERSION, tiles=None, window=None,
           softcap=None):
    """The three launches on device arrays (already validated): grads = (dq, dk, dv) float32 device arrays, filled.
    window, softcap: as the forward's (None: none). Returns grads."""
    batch, n_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    if version == "v3" and not SIM and not v3_runs_here(head_dim):
        version, tiles = "v1", None
    tiles = tiles or default_tiles(version, "cuda", head_dim)
    dkdv, dq_kernel = make_kernels(version, head_dim, tiles, softcap is not None)
    dq, dk, dv = grads
    delta = cuda.device_array((batch, n_heads, q_len), np.float32)
    backward_prep.row_dot[((q_len + 63) // 64, n_heads, batch), 64](out, dout, delta)
    for g in (dk, dv):
        flat = g.reshape(g.size)
        backward_prep.zero_fill[min(1024, (g.size + 255) // 256), 256](flat)
    args = (q, k, v, dout, lse, delta)
    scalars = (float32(scale * LOG2E), float32(scale), bool(causal),
               np.int64(kv_len if window is None else min(window, kv_len)),     # a window >= kv_len hides nothing
               float32(0.0 if softcap is None else softcap * LOG2E))          # the kernels' log2 units
    a, c = tiles.dkdv, tiles.dq
    dkdv[((kv_len + a.block_n - 1) // a.block_n, n_heads, batch), a.threads](*args, dk, dv, *scalars)
    dq_kernel[((q_len + c.block_m - 1) // c.block_m, n_heads, batch), c.threads](*args, dq, *scalars)
    return grads


def v3_runs_here(head_dim):
    """v3 needs TF32 tensor cores, and at head_dim > 128 more than the 48 KB of static shared memory CUDA documents per
    block (its K, V, Q and dO tiles of 256-dim rows: 66 KB at the GPU tiles, 49 KB at the smallest its layout allows);
    sm_90 with the probe of gpu.static_shared_over_48k has that. Otherwise launch runs v1 (logged once here)."""
    if not gpu.has_tf32_mma():
        return False
    if head_dim > 128 and not (gpu.compute_capability() >= (9, 0) and gpu.static_shared_over_48k()):
        _backend.log.info("numbattn: backward v3 at head_dim %d needs more than 48 KB of static shared memory: "
                          "running v1", head_dim)
        return False
    return True


def default_tiles(version, backend, head_dim):
    if version not in VERSIONS:
        raise ValueError(f"version={version!r}: expected one of {VERSIONS}")
    return SIM_TILES[version] if backend == "sim" else gpu_tiles(version, head_dim)


def check_backward_args(q, k, v, out, lse, dout, causal):
    """The forward's checks on q, k, v, and out and dout of q's shape, lse [batch, n_heads, q_len] float32."""
    check_qkv(q, k, v, causal)
    for name, x in (("out", out), ("dout", dout)):
        check_rank(name, x, 4, "[batch, n_heads, q_len, head_dim]")
        check_dtype(name, x)
        if tuple(x.shape) != tuple(q.shape):
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected q's shape {tuple(q.shape)}")
    check_rank("lse", lse, 3, "[batch, n_heads, q_len]")
    check_output("lse", lse, q.shape[:3])


def attention_backward(q, k, v, out, lse, dout, causal=False, scale=None, backend="auto", version=DEFAULT_VERSION,
                       tiles=None, grads=None, window=None, softcap=None):
    """-> (dq, dk, dv) float32, the gradients of a loss through out = attention(q, k, v, causal, scale, window,
    softcap), given dout = dL/d out and the forward's out and lse (numbattn.attention(..., return_lse=True) with the
    same causal, scale, window and softcap).

    q, out, dout [batch, n_heads, q_len, head_dim]; k, v [batch, n_kv_heads, kv_len, head_dim] (float32 or
    float16); lse [batch, n_heads, q_len] float32. Host arrays in -> host arrays out; device arrays -> device.
    grads: (dq, dk, dv) float32 device arrays to fill (e.g. NaN-poisoned by a test). The NumPy backend ignores out
    and lse and computes the gradients from their equations (numbattn.reference.attention_backward)."""
    check_backward_args(q, k, v, out, lse, dout, causal)
    scale = check_scale(scale, q.shape[3])
    window, softcap = check_window(window, causal), check_softcap(softcap)
    shapes = (q.shape, k.shape, k.shape)
    if grads is not None:
        for name, g, shape in zip(("dq", "dk", "dv"), grads, shapes):
            check_output(f"grads' {name}", g, shape)
    be = _backend.resolve(backend)
    if tiles is not None:
        check_tiles(version, tiles, q.shape[3])
    on_device = _backend.is_device_array(q)

    def numpy_path():
        host = (_backend.to_host(x) for x in (q, k, v, dout))
        result = reference.attention_backward(*host, causal=causal, scale=scale, window=window, softcap=softcap)
        return tuple(_backend.deliver(x, g, on_device) for x, g in zip(result, grads or (None,) * 3))

    def kernel_path():
        dev = [x if _backend.is_device_array(x) else cuda.to_device(np.ascontiguousarray(x))
               for x in (q, k, v, out, lse, dout)]
        g = grads or tuple(cuda.device_array(shape, np.float32) for shape in shapes)
        launch(*dev, g, causal, scale, version, tiles or default_tiles(version, be, q.shape[3]), window, softcap)
        return g if on_device else tuple(x.copy_to_host() for x in g)

    return _backend.run(f"attention backward {version}", be, kernel_path, numpy_path)
