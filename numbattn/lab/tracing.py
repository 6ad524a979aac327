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
and not local memory (registers). A view taken inside the kernel by fixing leading indices (`k_row = k[b, hk]`)
counts its accesses against the full array's index (b, hk, j, d); other views (slices) raise. Accesses made
outside a kernel (host code) are allowed and not counted.

Shared memory too, inside `with tracer.shared():` (or trace_prefill(..., shared=True)): every
`cuda.shared.array` a simulated kernel allocates is handed to it traced, named after the variable it is assigned
to on its source line (`Ks = cuda.shared.array(...)` -> "Ks"; tracer.shared_names lists them), its accesses
counted like a global array's (slices of a shared array are allowed and count each element). The simulator's
own exchange buffers (the MMA and shuffle twins' `scratch` and `red`) are shared arrays too, though on a GPU
those values move between registers. And each access is stamped with the barrier interval it happened in (the
number of cuda.syncthreads() its thread had passed), so that tracer.hazards() can name every race: a shared
element written by one thread and read or written by another between the same two barriers (what CUDA's
compute-sanitizer --tool racecheck reports). It does not depend on how the simulator happened to schedule the
threads: a missing barrier is found on every run, also when the answer came out right.

    tracer.per_thread("k")                   # Counter {(block, thread): element reads of k}
    tracer.hazards()                         # [Hazard(name, block, index, interval, writers, readers), ...]

Simulator only: on a GPU the kernel is machine code and no Python runs per access, so Tracer() raises there,
and when numba.cuda is missing. Creating a Tracer runs numbattn.backend.probe(), which also makes the
simulator's shared-array allocation thread-safe before any kernel is launched.
"""
import contextlib
import linecache
import os
import re
import threading
from collections import Counter, namedtuple

import numpy as np

from .. import backend as _backend
from .. import simulator as _simulator

READ, WRITE = "read", "write"
# a race: shared array `name`, element `index` of block `block`, touched between barriers `interval` and
# `interval + 1` by writers (thread x-indices) and readers
Hazard = namedtuple("Hazard", "name block index interval writers readers")
_ACTIVE = []        # the tracer counting shared memory now (tracer.shared()), if any


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
        self._intervals = {}            # (name, block, index, interval) -> (writer threads, reader threads)
        self.shared_names = set()

    @contextlib.contextmanager
    def shared(self):
        """While inside: the shared arrays simulated kernels allocate are traced too (see the module docstring)."""
        _count_barriers()
        if _ACTIVE:
            raise RuntimeError("another Tracer is already counting shared memory")
        _ACTIVE.append(self)
        _simulator.SHARED_ARRAY_HOOK[0] = self._traced_shared
        try:
            yield self
        finally:
            _simulator.SHARED_ARRAY_HOOK[0] = None
            _ACTIVE.clear()

    def _traced_shared(self, memory, where):
        name = _shared_name(*where)
        self.shared_names.add(name)
        return TracedArray(self, name, memory, slices=True)

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
        thread = threading.current_thread()
        key = (name, kind, tuple(block_idx), tuple(thread.threadIdx), index)
        with self._lock:                                # simulated threads run concurrently
            self._log[key] += 1
            if name in self.shared_names:
                where = (name, tuple(block_idx), index, getattr(thread, "numbattn_barriers", 0))
                writers, readers = self._intervals.setdefault(where, (set(), set()))
                (writers if kind == WRITE else readers).add(tuple(thread.threadIdx)[0])

    def per_thread(self, name, kind=READ):
        """Counter {(block, thread): element accesses of `name`}: e.g. its most, max(tracer.per_thread(..).values())."""
        out = Counter()
        for blk, thr, _, c in self._select(name, kind):
            out[blk, thr] += c
        return out

    def hazards(self):
        """Races on shared memory: an element written by one thread and read or written by another between the
        same two barriers -> [Hazard], sorted (empty: every shared access was ordered by a cuda.syncthreads())."""
        out = []
        for (name, blk, index, interval), (writers, readers) in self._intervals.items():
            if len(writers) > 1 or (writers and readers - writers) or (len(writers) == 1 and readers - writers):
                out.append(Hazard(name, blk, index, interval, sorted(writers), sorted(readers)))
        return sorted(out)

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

    def __init__(self, tracer, name, memory, prefix=(), slices=False):
        self._tracer, self._name, self._memory, self._prefix = tracer, name, memory, prefix
        self._slices = slices           # shared arrays: slices allowed, each element counted
        self.shape, self.dtype, self.ndim, self.size = memory.shape, memory.dtype, memory.ndim, memory.size

    def _index(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        if not all(isinstance(i, (int, np.integer)) for i in idx) or len(idx) > self.ndim:
            raise TypeError(f"traced array {self._name!r}: index {idx!r} is not supported (element access and "
                            f"views that fix leading indices, like k[b, hk], are)")
        return tuple(int(i) + n if i < 0 else int(i) for i, n in zip(idx, self.shape))

    def _elements(self, idx):
        """A slice of a shared array -> the full index of every element it covers."""
        cells = np.stack(np.meshgrid(*(np.arange(n) for n in self.shape), indexing="ij"), axis=-1)[idx]
        return [self._prefix + tuple(int(i) for i in cell) for cell in cells.reshape(-1, self.ndim)]

    def __getitem__(self, idx):
        if self._slices and not all(isinstance(i, (int, np.integer)) for i in (idx if isinstance(idx, tuple)
                                                                                else (idx,))):
            for cell in self._elements(idx):
                self._tracer.record(self._name, READ, cell)
            return np.array(self._memory[idx])
        idx = self._index(idx)
        if len(idx) < self.ndim:                        # a view such as k[b, hk]: accesses count on k itself
            return TracedArray(self._tracer, self._name, self._memory[idx], self._prefix + idx)
        value = self._memory[idx]
        self._tracer.record(self._name, READ, self._prefix + idx)
        return value

    def __setitem__(self, idx, value):
        if self._slices and not all(isinstance(i, (int, np.integer)) for i in (idx if isinstance(idx, tuple)
                                                                                else (idx,))):
            self._memory[idx] = value
            for cell in self._elements(idx):
                self._tracer.record(self._name, WRITE, cell)
            return
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


def _shared_name(filename, line):
    """The variable a `cuda.shared.array` on this source line is assigned to, e.g. "Ks"."""
    found = re.match(r"\s*(\w+)\s*=\s*cuda\.shared\.array", linecache.getline(filename, line))
    return found.group(1) if found else f"shared@{os.path.basename(filename)}:{line}"


def _count_barriers():
    """Make every simulated cuda.syncthreads() count itself on its thread (numbattn_barriers): the barrier interval
    that Tracer.hazards() compares. Installed once per process."""
    from numba.cuda.simulator import kernelapi
    module = kernelapi.FakeCUDAModule
    if getattr(module, "_numbattn_counted", False):
        return
    original = module.syncthreads

    def syncthreads(self):
        original(self)
        thread = threading.current_thread()
        thread.numbattn_barriers = getattr(thread, "numbattn_barriers", 0) + 1

    module.syncthreads, module._numbattn_counted = syncthreads, True


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


def trace_prefill(q, k, v, causal=False, version="v1", tiles=None, scale=None, window=None, shared=False):
    """Run one prefill kernel (numbattn/kernels/prefill_*.py) in the simulator with q, k, v and out traced.

    q [batch, n_heads, q_len, d], k, v [batch, n_kv_heads, kv_len, d] host arrays; tiles default to the
    simulator's (prefill.SIM_TILES); window: a sliding window, as numbattn.attention's; shared: count shared
    memory too (tracer.shared()).
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
    with tracer.shared() if shared else contextlib.nullcontext():
        prefill.launch(tq, tk, tv, tout, causal, scale, version, tiles, window=window)
    return out, tracer


def trace_decode(q, k, v, lengths, config=None, shared=False, module=None):
    """Run the default decode kernel, v1 (kernels/decode_slots.py in the split-K frame of decode_splitk.py), once
    in the simulator with every argument traced: q [batch, n_heads, d], k, v [batch, n_kv_heads, S, d] float32
    host arrays (a full cache layer: token j in slot j), lengths [batch]; config: a decode.Config with a split
    (default decode.SIM_CONFIG). K and V are read as raw words, as the kernel reads them (decode_splitk.word_type:
    up to 8 bytes, so an element read of k counts 1 to 2 float32 values: tracer.values_per_word says how many).
    module: another decode_slots to take make_decode_v1 from (the lessons' "break it" switches run an edited copy).
    -> (out [batch, n_heads, d], tracer); tracer names: q, k, v, lengths, part, counters, out."""
    from .. import decode
    from ..kernels import decode_slots
    make_decode_v1 = (module or decode_slots).make_decode_v1
    from ..kernels.decode_splitk import kv_word_types
    from ..reference import LOG2E
    config = config or decode.SIM_CONFIG
    batch, n_heads, d = q.shape
    n_kv_heads, slots = k.shape[1], k.shape[2]
    if k.dtype != np.float32 or v.dtype != k.dtype or not config.split:
        raise ValueError("trace_decode: k and v must be float32 and config must name a split")
    lengths = np.asarray(lengths, np.int32)
    n_splits = decode.n_splits_for(int(lengths.max()), config.split)
    kernel = make_decode_v1(d, n_heads // n_kv_heads, config.threads, config.dims_per_lane, config.keys_per_step, 4)
    out = np.full((batch, n_heads, d), np.nan, np.float32)
    part = np.full((batch, n_heads, n_splits, d + 2), np.nan, np.float32)
    counters = np.zeros(batch * n_kv_heads, np.int32)
    (word, per_word), _ = kv_word_types("v1", d, config.dims_per_lane, 4)
    tracer = Tracer()
    tracer.values_per_word = per_word
    args = tracer.wrap(q=np.ascontiguousarray(q, np.float32), k=np.ascontiguousarray(k).view(np.dtype(word.name)),
                       v=np.ascontiguousarray(v).view(np.dtype(word.name)), lengths=lengths, part=part,
                       counters=counters, out=out)
    with tracer.shared() if shared else contextlib.nullcontext():
        kernel[(n_splits, n_kv_heads, batch), config.threads](
            *args[:4], np.int64(config.split), np.float32(d ** -0.5 * LOG2E), np.int64(slots), np.float32(0.0),
            *args[4:])
    return out, tracer


def trace_v1(q, k, v, causal=False, scale=None, tiles=None, module=None):
    """Run the v1 kernel (kernels/prefill_tiled.py, its traced variant) and record each query row's running max
    and sum after every key tile. On the simulator or a GPU. module: another prefill_tiled to take make_v1 from
    (the lessons' "break it" switches run an edited copy).

    -> (out [b, h, q_len, d], trace [b, h, q_len, n_key_tiles, 2]) with trace[..., t, 0] = m_i and
    trace[..., t, 1] = l_i after tile t, in the kernel's base-2 units (scores scaled by log2 e); NaN where a
    row never reached tile t (causal rows stop at their diagonal).
    """
    from numba import cuda

    from .. import prefill
    from ..kernels import prefill_tiled
    from ..reference import LOG2E
    from ..validate import check_qkv, check_scale
    make_v1 = (module or prefill_tiled).make_v1
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
