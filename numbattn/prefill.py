"""Prefill attention kernels: softmax(Q K^T * scale) V without ever building the N×N score matrix.

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

Four versions live side by side (llm.c style); all run unchanged in Numba's CUDA simulator and are
validated by the same tests, and `cli.py bench` / benchmarks/gpu_report.py compare them on a GPU:

    v0  naive: one thread per query row reads every key and value straight from global memory.
        Global traffic per head: each of q_len threads reads all of K and V -> q_len * kv_len * d * 2 loads.
    v1  tiled (the teaching version): a block of BLOCK_M threads, one per query row, stages its Q tile and
        then each BLOCK_N-key tile of K and V in shared memory; every K/V element fetched from global memory
        now serves BLOCK_M query rows -> K/V traffic drops by BLOCK_M (64x on the GPU).
    v2  register-tiled (see numbattn/prefill_v2.py): each thread owns a small block of scores and outputs in
        registers, so every shared-memory load feeds several FMAs. The fastest on the SIMT cores alone.
    v3  tensor cores (the fast one and the default; see numbattn/prefill_v3.py): each warp computes its 16 query
        rows' S = Q K^T and P V with mma.sync TF32 instructions (inline PTX, numbattn/mma.py), three per
        product (3xTF32) for fp32 accuracy: 1.7-1.9x v2 on an H100, and 1.05-1.13x torch's memory-efficient
        fp32 kernel at n = 4096-8192 (sm_80+; older GPUs run v2 in its place).

Causal masking is bottom-right aligned (FlashAttention-2): with q_len <= kv_len, query i sees keys
j <= i + (kv_len - q_len). Key tiles that lie entirely above the diagonal are never loaded (the loop simply
stops early); only the tile that straddles the diagonal is masked element by element.

Grouped-query attention: query head h reads KV head h // (n_heads // n_kv_heads). K and V are never copied.

Tile sizes are compile-time constants (they size shared and local arrays), so kernels come from a cached
factory: tests run 4×4 tiles in the simulator (v3: one warp, 16 rows), the GPU runs 64- or 128-row query tiles.
"""
import functools
import math
from dataclasses import dataclass

import numpy as np
from numba import cuda, float32

from . import backend as _backend
from . import reference
from .device import LOG2E, NEG_INF, SIM
from .launch import Launch
from .validate import check_qkv, check_scale


@dataclass(frozen=True)
class Tiles:
    """Launch shape of one kernel version: query rows per block, keys per tile, threads per block."""
    block_m: int
    block_n: int
    threads: int


# --------------------------------------------------------------------------------------------------------
# v0: naive. One thread = one query row; K and V come straight from global memory, one key at a time.
# --------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def make_v0(head_dim, block_m):
    D = head_dim

    @cuda.jit(fastmath=True)
    def attention_v0(q, k, v, out, scale_log2, causal):
        # q [B, H, Lq, D], k/v [B, Hkv, Lk, D] -> out [B, H, Lq, D]
        q_len, kv_len = q.shape[2], k.shape[2]
        b, h = cuda.blockIdx.z, cuda.blockIdx.y
        hk = h // (q.shape[1] // k.shape[1])                # GQA: which KV head this query head reads
        i = cuda.blockIdx.x * block_m + cuda.threadIdx.x    # this thread's query row
        if i >= q_len:
            return
        acc = cuda.local.array(D, float32)
        for d in range(D):
            acc[d] = 0.0
        m_i = NEG_INF
        l_i = float32(0.0)
        n_keys = min(kv_len, i + (kv_len - q_len) + 1) if causal else kv_len
        for j in range(n_keys):
            s = float32(0.0)
            for d in range(D):
                s += float32(q[b, h, i, d]) * float32(k[b, hk, j, d])
            s *= scale_log2
            m_new = max(m_i, s)
            alpha = math.exp2(m_i - m_new)                  # rescale what was accumulated under m_i
            p = math.exp2(s - m_new)
            l_i = l_i * alpha + p
            for d in range(D):
                acc[d] = acc[d] * alpha + p * float32(v[b, hk, j, d])
            m_i = m_new
        for d in range(D):
            out[b, h, i, d] = acc[d] / l_i

    return attention_v0


# --------------------------------------------------------------------------------------------------------
# v1: tiled. Q, K and V tiles in shared memory; one thread per query row; online softmax per key tile.
# --------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def make_v1(head_dim, block_m, block_n):
    D, BM, BN = head_dim, block_m, block_n
    DP = D + 1  # pad Q rows by a word: with a row stride of D (32 banks' multiple) a warp reads one bank
    load_q_tile, load_kv_tile, record, store_row = _make_v1_loads(D, BM, BN)

    @cuda.jit(fastmath=True)
    def attention_v1(q, k, v, out, scale_log2, causal, trace):
        # q [B, H, Lq, D], k/v [B, Hkv, Lk, D] -> out [B, H, Lq, D]; trace [B, H, Lq, tiles, 2] (lessons only)
        q_len, kv_len = q.shape[2], k.shape[2]
        b, h = cuda.blockIdx.z, cuda.blockIdx.y
        hk = h // (q.shape[1] // k.shape[1])
        t = cuda.threadIdx.x
        q0 = cuda.blockIdx.x * BM           # first query row of this block's tile
        i = q0 + t                          # this thread's query row
        offset = kv_len - q_len             # bottom-right causal alignment: row i sees keys j <= i + offset

        Qs = cuda.shared.array((BM, DP), float32)
        Ks = cuda.shared.array((BN, D), float32)
        Vs = cuda.shared.array((BN, D), float32)
        s = cuda.local.array(BN, float32)   # this row's scores for the current key tile
        acc = cuda.local.array(D, float32)
        load_q_tile(q, b, h, q0, q_len, scale_log2, t, Qs)   # pre-scaled: the loop below can use exp2 directly
        for d in range(D):
            acc[d] = 0.0
        m_i = NEG_INF
        l_i = float32(0.0)
        # Causal: the block's last row sees keys up to q0 + BM - 1 + offset; tiles past that are skipped.
        kv_end = min(kv_len, q0 + BM + offset) if causal else kv_len
        for j0 in range(0, kv_end, BN):
            cuda.syncthreads()              # everyone is done with the previous K/V tile
            load_kv_tile(k, v, b, hk, j0, kv_len, t, Ks, Vs)
            cuda.syncthreads()
            if i < q_len:
                # scores for this tile; keys past kv_len or above the diagonal get -inf
                last_key = min(kv_len - 1, i + offset) if causal else kv_len - 1
                m_tile = NEG_INF
                for jj in range(BN):
                    if j0 + jj <= last_key:
                        x = float32(0.0)
                        for d in range(D):
                            x += Qs[t, d] * Ks[jj, d]   # every thread reads the same Ks word: a broadcast
                        s[jj] = x
                        m_tile = max(m_tile, x)
                    else:
                        s[jj] = NEG_INF
                m_new = max(m_i, m_tile)    # finite: every row sees key 0 in the first tile
                alpha = math.exp2(m_i - m_new)
                l_i *= alpha
                for d in range(D):
                    acc[d] *= alpha
                for jj in range(BN):
                    p = math.exp2(s[jj] - m_new)        # exp2(-inf) = 0 for masked keys
                    l_i += p
                    for d in range(D):
                        acc[d] += p * Vs[jj, d]
                m_i = m_new
                record(trace, b, h, i, j0, m_i, l_i)    # lessons only (see trace_v1)
        store_row(out, acc, l_i, b, h, i, q_len)        # out = acc / l_i: the one division, at the very end

    return attention_v1


def _make_v1_loads(D, BM, BN):
    @cuda.jit(device=True, inline=True)
    def load_q_tile(q, b, h, q0, q_len, scale_log2, t, Qs):
        """Q tile -> shared memory, pre-multiplied by scale * log2(e); rows past q_len become 0."""
        for idx in range(t, BM * D, BM):
            r, c = idx // D, idx % D
            Qs[r, c] = float32(q[b, h, q0 + r, c]) * scale_log2 if q0 + r < q_len else 0.0

    @cuda.jit(device=True, inline=True)
    def load_kv_tile(k, v, b, hk, j0, kv_len, t, Ks, Vs):
        """K and V tiles at key j0 -> shared memory; consecutive threads read consecutive addresses (coalesced)."""
        for idx in range(t, BN * D, BM):
            r, c = idx // D, idx % D
            inside = j0 + r < kv_len
            Ks[r, c] = float32(k[b, hk, j0 + r, c]) if inside else 0.0
            Vs[r, c] = float32(v[b, hk, j0 + r, c]) if inside else 0.0

    @cuda.jit(device=True, inline=True)
    def record(trace, b, h, i, j0, m_i, l_i):
        """m_i and l_i after the key tile at j0, when a trace buffer was given (trace_v1, for the lessons)."""
        if trace.shape[4] == 2:
            trace[b, h, i, j0 // BN, 0] = m_i
            trace[b, h, i, j0 // BN, 1] = l_i

    @cuda.jit(device=True, inline=True)
    def store_row(out, acc, l_i, b, h, i, q_len):
        """out[b, h, i] = acc / l_i (rows past q_len store nothing)."""
        if i < q_len:
            inv_l = 1.0 / l_i
            for d in range(D):
                out[b, h, i, d] = acc[d] * inv_l
    return load_q_tile, load_kv_tile, record, store_row


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
        from .prefill_v2 import layout
        layout(tiles.block_m, tiles.block_n, tiles.threads, head_dim)
    if version == "v3":
        from .prefill_v3 import layout
        layout(tiles.block_m, tiles.block_n, tiles.threads, head_dim)


def _make(version, head_dim, tiles):
    check_tiles(version, tiles, head_dim)
    if version == "v0":
        return make_v0(head_dim, tiles.block_m)
    if version == "v1":
        return make_v1(head_dim, tiles.block_m, tiles.block_n)
    if version == "v2":
        from .prefill_v2 import make_v2
        return make_v2(head_dim, tiles.block_m, tiles.block_n, tiles.threads)
    from .prefill_v3 import make_v3
    return make_v3(head_dim, tiles.block_m, tiles.block_n, tiles.threads)


VERSIONS = ("v0", "v1", "v2", "v3")
DEFAULT_VERSION = "v3"
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
    big_smem = cc >= (9, 0) if cc else _compute_capability() >= (9, 0) and _static_shared_over_48k()
    if big_smem:
        return {"v0": Tiles(64, 1, 64),
                "v1": Tiles(32, 16, 32) if big_d else Tiles(64, 64, 64),
                "v2": Tiles(64, 32, 256) if big_d else Tiles(128, 32, 256),
                "v3": Tiles(128, 8, 256) if big_d else Tiles(128, 32, 256)}[version]
    return {"v0": Tiles(64, 1, 64),
            "v1": Tiles(32, 16, 32) if big_d else Tiles(64, 32, 64),
            "v2": Tiles(32, 16, 64) if big_d else Tiles(64, 32, 128),
            "v3": Tiles(128, 8, 256) if big_d else Tiles(128, 32, 256)}[version]


@functools.lru_cache(maxsize=None)
def _has_tf32_mma():
    """v3's TF32 MMAs need sm_80 or newer; on an older GPU v3 launches run v2 instead (said once, in the log)."""
    ok = _compute_capability() >= (8, 0)
    if not ok:
        _backend.log.info("numbattn: prefill v3 needs TF32 tensor cores (compute capability 8.0+); this GPU has "
                          "%s: running v2", _compute_capability())
    return ok


@functools.lru_cache(maxsize=None)
def _compute_capability():
    return tuple(cuda.get_current_device().compute_capability)


@functools.lru_cache(maxsize=None)
def _static_shared_over_48k():
    """Does this GPU + toolchain compile and run a kernel with 64 KB of static shared memory? (asked once)"""
    @cuda.jit
    def probe(out):
        buf = cuda.shared.array(16384, float32)     # 64 KB
        t = cuda.threadIdx.x
        buf[16383 - t] = float32(t)
        cuda.syncthreads()
        out[t] = buf[16383 - t]

    try:
        out = cuda.to_device(np.zeros(32, np.float32))
        probe[1, 32](out)
        ok = bool((out.copy_to_host() == np.arange(32)).all())
    except Exception as e:      # a compile or launch error: the small tiles it is
        _backend.log.info("numbattn: more than 48 KB of static shared memory per block is not available here "
                          "(%s: %s); using the smaller prefill tiles", type(e).__name__, str(e).splitlines()[0])
        return False
    _backend.log.info("numbattn: static shared memory above 48 KB per block %s: %s prefill tiles",
                      "works" if ok else "gave a wrong result", "big" if ok else "small")
    return ok


def default_tiles(version, backend, head_dim):
    check_version(version)
    return SIM_TILES[version] if backend == "sim" else gpu_tiles(version, head_dim)


def launch(q, k, v, out, causal, scale, version=DEFAULT_VERSION, tiles=None, stream=0, trace=None):
    """Launch one prefill kernel on device arrays (already validated). Returns out.

    Through a prepared Launch (numbattn/launch.py) kept per kernel and argument layout: a repeated call with
    arrays of the same dtypes, shapes and strides only re-marshals the arguments (no typing, no lookup)."""
    batch, n_heads, q_len, head_dim = q.shape
    if version == "v3" and not SIM and not _has_tf32_mma():
        version, tiles = "v2", None
    tiles = tiles or default_tiles(version, "cuda", head_dim)
    grid = ((q_len + tiles.block_m - 1) // tiles.block_m, n_heads, batch)
    args = (q, k, v, out, float32(scale * LOG2E), bool(causal))
    if version == "v1":
        args += (trace if trace is not None else _no_trace(),)
    if SIM:     # the simulator has no launch cost worth saving (and the lessons' tracer passes stand-in arrays)
        _make(version, head_dim, tiles)[grid, tiles.threads, stream](*args)
        return out
    key = (version, tiles, stream_key(stream), *((a.dtype.str, a.shape, a.strides) for a in args[:4]))
    prepared = _LAUNCHES.get(key)
    if prepared is None:
        if len(_LAUNCHES) > 256:
            _LAUNCHES.clear()
        prepared = _LAUNCHES[key] = Launch(_make(version, head_dim, tiles), grid, tiles.threads, args, stream)
    else:
        prepared.set_args(args)
    prepared(grid)
    return out


_LAUNCHES = {}


def stream_key(stream):
    return id(stream) if stream else 0


@functools.lru_cache(maxsize=None)
def _no_trace():
    """The v1 kernel's trace argument when nothing is traced: one tiny device array, made once."""
    return cuda.device_array((1, 1, 1, 1, 1), np.float32)


def flash_attention(q, k, v, causal=False, scale=None, backend="auto", out=None, version=DEFAULT_VERSION,
                    tiles=None):
    """numbattn.attention with the kernel version, tile sizes and output buffer exposed (tests, lessons, bench).

    q [batch, n_heads, q_len, head_dim], k, v [batch, n_kv_heads, kv_len, head_dim]: float32 or float16,
    host NumPy arrays (-> host result) or Numba device arrays (-> device result). Returns float32.
    `out`, if given, is a float32 device array of q's shape that the kernel fills (e.g. NaN-poisoned by a test).
    """
    check_qkv(q, k, v, causal)
    scale = check_scale(scale, q.shape[3])
    if out is not None and (tuple(out.shape) != tuple(q.shape) or np.dtype(out.dtype) != np.float32):
        raise ValueError(f"out has shape {tuple(out.shape)} and dtype {np.dtype(out.dtype).name}; "
                         f"expected {tuple(q.shape)} float32")
    be = _backend.resolve(backend)
    check_version(version)
    if tiles is not None:
        check_tiles(version, tiles, q.shape[3])
    on_device = _backend.is_device_array(q)

    def numpy_path():
        o = reference.attention(*(_backend.to_host(x) for x in (q, k, v)), causal=causal, scale=scale)
        return _backend.deliver(o, out, on_device)

    def kernel_path():
        dq, dk, dv = (x if _backend.is_device_array(x) else cuda.to_device(np.ascontiguousarray(x))
                      for x in (q, k, v))
        o = out if out is not None else cuda.device_array(q.shape, dtype=np.float32)
        launch(dq, dk, dv, o, causal, scale, version, tiles or default_tiles(version, be, q.shape[3]))
        return o if on_device else o.copy_to_host()

    return _backend.run(f"prefill attention {version}", be, kernel_path, numpy_path)


def attention(q, k, v, causal=False, scale=None, backend="auto"):
    """softmax(q k^T * scale, causal) v with the default (fastest correct) kernel. See flash_attention."""
    return flash_attention(q, k, v, causal=causal, scale=scale, backend=backend)


def trace_v1(q, k, v, causal=False, scale=None, tiles=None):
    """Run the v1 kernel and record each query row's running max and sum after every key tile (for lessons).

    -> (out [b, h, q_len, d], trace [b, h, q_len, n_key_tiles, 2]) with trace[..., t, 0] = m_i and
    trace[..., t, 1] = l_i after tile t, in the kernel's base-2 units (scores scaled by log2 e); NaN where a
    row never reached tile t (causal rows stop at their diagonal).
    """
    check_qkv(q, k, v, causal)
    scale = check_scale(scale, q.shape[3])
    be = _backend.resolve("auto")
    if be == "numpy":
        raise ValueError("trace_v1 runs the kernel itself: it needs the cuda or sim backend")
    tiles = tiles or default_tiles("v1", be, q.shape[3])
    n_tiles = (k.shape[2] + tiles.block_n - 1) // tiles.block_n
    trace = cuda.to_device(np.full(tuple(q.shape[:3]) + (n_tiles, 2), np.nan, np.float32))
    out = cuda.device_array(q.shape, np.float32)
    launch(*(cuda.to_device(np.ascontiguousarray(x)) for x in (q, k, v)), out, causal, scale, "v1", tiles,
           trace=trace)
    return out.copy_to_host(), trace.copy_to_host()
