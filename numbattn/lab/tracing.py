"""Look inside the kernels, for lessons and tests: count their global-memory reads and writes in Numba's CUDA
simulator (Tracer, trace_prefill), and record the online softmax's running max and sum per tile (trace_v1).

GPU-Puzzles counts each thread's reads and writes in the simulator and draws them; this does the same for
numbattn's real kernels. In the simulator a kernel is plain Python, run once per CUDA thread by a Python
thread whose `blockIdx` and `threadIdx` say which CUDA thread it stands for, and every `k[b, hk, j, d]` in
the kernel is an indexing call on the array argument. So an array that logs each element access, passed to
the kernel in place of the device array, sees every global-memory read and write: which element, by which
block and thread.

    tracer = tracing.Tracer()
    tq, tk, tv, tout = tracer.wrap(q=q, k=k, v=v, out=out)     # host NumPy or simulator device arrays
    prefill.launch(tq, tk, tv, tout, causal, scale, "v1", tiles)
    tracer.reads("k")                        # element reads of k, all blocks together
    tracer.reads("k", block=(0, 0, 0))       # ... by block (x, y, z) only
    tracer.rows("k", axis=2)                 # {block: {key row: reads}}: which keys each block read

or, for the prefill kernels, `out, tracer = tracing.trace_prefill(q, k, v, causal, version, tiles)`. A tracer
adds up every launch its arrays are passed to: use a new one per launch to count one kernel alone.

What is counted: one read per element a thread loads (`x = k[b, hk, j, d]`), one write per element it stores,
as the threads request them. Not bytes as the hardware moves them (no caches, no coalescing, no broadcast),
and not shared or local memory (those are not arguments). A view taken inside the kernel by fixing leading
indices (`k_row = k[b, hk]`) counts its accesses against the full array's index (b, hk, j, d); other views
(slices) raise. Accesses made outside a kernel (host code) are allowed and not counted.

Simulator only: on a GPU the kernel is machine code and no Python runs per access, so Tracer() raises there,
and when numba.cuda is missing. Creating a Tracer runs numbattn.backend.probe(), which also makes the
simulator's shared-array allocation thread-safe before any kernel is launched.
"""
import threading
from collections import Counter

import numpy as np

from .. import backend as _backend

READ, WRITE = "read", "write"


def require_simulator():
    """Raise RuntimeError unless kernels run in Numba's CUDA simulator in this process."""
    backends, reason = _backend.probe()
    if backends[0] != "sim":
        raise RuntimeError(f"numbattn.tracing counts memory accesses in Numba's CUDA simulator only, but this "
                           f"process runs the {backends[0]!r} backend ({reason}). Set NUMBA_ENABLE_CUDASIM=1 "
                           f"before numba.cuda is first imported.")


class Tracer:
    """A log of element accesses, (array, read/write, block, thread, element index) -> count. Thread-safe."""

    def __init__(self):
        require_simulator()
        self._lock = threading.Lock()
        self._log = Counter()

    def wrap(self, **arrays):
        """name=array, ... -> a TracedArray per argument, in order (one array: that array alone).

        Each array is a host NumPy array or a simulator device array; the kernel reads and writes the same
        memory through the TracedArray, so results land where they would have without tracing."""
        traced = [TracedArray(self, name, _memory_of(name, a)) for name, a in arrays.items()]
        return traced[0] if len(traced) == 1 else traced

    def record(self, name, kind, index):
        block_idx = getattr(threading.current_thread(), "blockIdx", None)
        if block_idx is None:
            return                                      # host code, not a kernel thread
        thread_idx = threading.current_thread().threadIdx
        key = (name, kind, tuple(block_idx), tuple(thread_idx), index)
        with self._lock:                                # simulated threads run concurrently
            self._log[key] += 1

    def _select(self, name, kind, block=None, thread=None):
        for (n, kd, blk, thr, index), count in self._log.items():
            if n == name and kd == kind and block in (None, blk) and thread in (None, thr):
                yield blk, thr, index, count

    def reads(self, name, block=None, thread=None):
        """Element reads of array `name`, by one block (x, y, z) / thread (x, y, z) or all of them."""
        return sum(c for *_, c in self._select(name, READ, _dim3(block), _dim3(thread)))

    def writes(self, name, block=None, thread=None):
        return sum(c for *_, c in self._select(name, WRITE, _dim3(block), _dim3(thread)))

    def blocks(self, name, kind=READ):
        """{block: element accesses of `name`} for every block that made one."""
        per = Counter()
        for blk, _, _, c in self._select(name, kind):
            per[blk] += c
        return dict(sorted(per.items()))

    def elements(self, name, kind=READ, block=None, thread=None):
        """Counter {element index: accesses} of array `name` (full indices, views resolved)."""
        out = Counter()
        for _, _, index, c in self._select(name, kind, _dim3(block), _dim3(thread)):
            out[index] += c
        return out

    def rows(self, name, axis, kind=READ):
        """{block: Counter {index[axis]: accesses}}: e.g. axis=2 of k is which key rows each block read."""
        out = {}
        for blk, _, index, c in self._select(name, kind):
            out.setdefault(blk, Counter())[index[axis]] += c
        return dict(sorted(out.items()))

    def threads(self, name, kind=READ, block=(0, 0, 0)):
        """{element index: sorted thread x-indices that accessed it} within one block: who loads what."""
        out = {}
        for _, thr, index, _ in self._select(name, kind, _dim3(block)):
            out.setdefault(index, set()).add(thr[0])
        return {index: sorted(ts) for index, ts in out.items()}


class TracedArray:
    """Stands in for one array argument of a simulated kernel and reports every element access to a Tracer."""

    def __init__(self, tracer, name, memory, prefix=()):
        self._tracer, self._name, self._memory, self._prefix = tracer, name, memory, prefix
        self.shape, self.dtype, self.ndim, self.size = memory.shape, memory.dtype, memory.ndim, memory.size

    def _index(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        if not all(isinstance(i, (int, np.integer)) for i in idx) or len(idx) > self.ndim:
            raise TypeError(f"traced array {self._name!r}: index {idx!r} is not supported (element access and "
                            f"views that fix leading indices, like k[b, hk], are)")
        return tuple(int(i) + n if i < 0 else int(i) for i, n in zip(idx, self.shape))

    def __getitem__(self, idx):
        idx = self._index(idx)
        if len(idx) < self.ndim:                        # a view such as k[b, hk]: accesses count on k itself
            return TracedArray(self._tracer, self._name, self._memory[idx], self._prefix + idx)
        value = self._memory[idx]
        self._tracer.record(self._name, READ, self._prefix + idx)
        return value

    def __setitem__(self, idx, value):
        idx = self._index(idx)
        if len(idx) < self.ndim:
            raise TypeError(f"traced array {self._name!r}: assign single elements, not the view {idx!r}")
        self._memory[idx] = value
        self._tracer.record(self._name, WRITE, self._prefix + idx)

    def __len__(self):
        return self.shape[0]

    def copy_to_host(self):
        """A host copy (not counted); also what makes numbattn treat this as a device array."""
        return np.array(self._memory)

    def __repr__(self):
        return f"TracedArray({self._name!r}, shape={self.shape}, dtype={self.dtype})"


def _memory_of(name, a):
    if isinstance(a, np.ndarray):
        return a
    memory = getattr(a, "_ary", None)                   # the simulator's FakeCUDAArray wraps a NumPy array
    if isinstance(memory, np.ndarray):
        return memory
    raise TypeError(f"{name}: expected a NumPy array or a simulator device array, got {type(a).__name__}")


def _dim3(x):
    """(x,), (x, y) or (x, y, z) -> (x, y, z), as the simulator's blockIdx/threadIdx read; None stays None."""
    return None if x is None else tuple(x) + (0,) * (3 - len(x))


def trace_prefill(q, k, v, causal=False, version="v1", tiles=None, scale=None, window=None):
    """Run one prefill kernel (numbattn/kernels/prefill_*.py) in the simulator with q, k, v and out traced.

    q [batch, n_heads, q_len, d], k, v [batch, n_kv_heads, kv_len, d] host arrays; tiles default to the
    simulator's (prefill.SIM_TILES); window: a sliding window, as numbattn.attention's.
    -> (out float32 [batch, n_heads, q_len, d], tracer)."""
    from .. import prefill
    from ..validate import check_qkv, check_scale, check_window
    check_qkv(q, k, v, causal)
    scale, window = check_scale(scale, q.shape[3]), check_window(window, causal)
    tracer = Tracer()
    tiles = tiles or prefill.default_tiles(version, "sim", q.shape[3])
    out = np.zeros(q.shape, np.float32)
    tq, tk, tv, tout = tracer.wrap(q=np.ascontiguousarray(q), k=np.ascontiguousarray(k),
                                   v=np.ascontiguousarray(v), out=out)
    prefill.launch(tq, tk, tv, tout, causal, scale, version, tiles, window=window)
    return out, tracer


def trace_v1(q, k, v, causal=False, scale=None, tiles=None):
    """Run the v1 kernel (kernels/prefill_tiled.py, its traced variant) and record each query row's running max
    and sum after every key tile. On the simulator or a GPU.

    -> (out [b, h, q_len, d], trace [b, h, q_len, n_key_tiles, 2]) with trace[..., t, 0] = m_i and
    trace[..., t, 1] = l_i after tile t, in the kernel's base-2 units (scores scaled by log2 e); NaN where a
    row never reached tile t (causal rows stop at their diagonal).
    """
    from numba import cuda

    from .. import prefill
    from ..kernels.prefill_tiled import make_v1
    from ..reference import LOG2E
    from ..validate import check_qkv, check_scale
    check_qkv(q, k, v, causal)
    scale = check_scale(scale, q.shape[3])
    be = _backend.resolve("auto")
    if be == "numpy":
        raise ValueError("trace_v1 runs the kernel itself: it needs the cuda or sim backend")
    tiles = tiles or prefill.default_tiles("v1", be, q.shape[3])
    prefill.check_tiles("v1", tiles, q.shape[3])
    n_tiles = (k.shape[2] + tiles.block_n - 1) // tiles.block_n
    trace = cuda.to_device(np.full(tuple(q.shape[:3]) + (n_tiles, 2), np.nan, np.float32))
    out = cuda.device_array(q.shape, np.float32)
    grid = ((q.shape[2] + tiles.block_m - 1) // tiles.block_m, q.shape[1], q.shape[0])
    kernel = make_v1(q.shape[3], tiles.block_m, tiles.block_n, traced=True)
    kernel[grid, tiles.threads](*(cuda.to_device(np.ascontiguousarray(x)) for x in (q, k, v)), out,
                                np.float32(scale * LOG2E), bool(causal), np.int64(k.shape[2]), np.int64(k.shape[2]),
                                np.float32(0.0), trace)
    return out.copy_to_host(), trace.copy_to_host()
