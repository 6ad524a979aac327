"""Launching compiled kernels cheaply, and replaying a whole sequence of launches as a CUDA graph.

Why this exists. `kernel[grid, threads](*args)` is convenient, and on the host it is slow: for every call Numba
types each argument, finds the compiled overload, flattens every array into ~9 C values, boxes each scalar in
a ctypes object, and builds a parameter block for the driver: tens of microseconds per launch, more with
every argument (BENCHMARKS.md and shared/gpu/README.md have the measurements). At batch 1 a decode step is
~130 small launches, so that host time, not the GPU, would set the speed.

A `Launch` does all of that once: it compiles (or finds) the overload for the arguments' types, marshals the
arguments into a parameter block that stays alive, and each call is then a single cuLaunchKernel through
cuda.bindings (the library numba-cuda itself is built on). Arguments can be replaced (`set_arg`), which
re-marshals only that one; the grid can change per call (`grid=`), which costs nothing. In Numba's simulator
there is no driver: a Launch simply calls the kernel the normal way, so code using it runs unchanged there.

Compiling ahead (`planning()`): launches prepared inside it are recorded, not made, and bind to their compiled
kernel at their first call. Running a forward pass once inside it therefore lists every kernel and argument types
it will need, which numbattn.kernel_cache.prepare then compiles (or loads from disk) before the first real call:
a model compiles at load time, with a progress line, not in the middle of a reply.

`Graph` goes one step further: it records every launch made on a stream between `capture()` and its end as a
CUDA graph and replays all of them with one driver call. Values that change between replays (the token id, the
position) must then live in device memory that the kernels read, never in kernel arguments, which are frozen at
capture.
"""
import contextlib
import ctypes

import numpy as np

from .kernels.common import SIM


def _check(result):
    """cuda.bindings calls return (error, *values): raise on error, return the value(s)."""
    err, *values = result
    if int(err) != 0:
        from cuda.bindings import driver as cu
        _, name = cu.cuGetErrorName(err)
        raise RuntimeError(f"CUDA driver error {int(err)} ({name.decode() if name else '?'})")
    return values[0] if len(values) == 1 else values


def stream_handle(stream):
    """The CUstream of a Numba stream (0: the legacy default stream)."""
    handle = getattr(stream, "handle", None)
    if handle is None:
        return 0
    return int(getattr(handle, "value", handle))      # a ctypes handle (older numba-cuda) or a CUstream


_PLAN = []     # while planning(): [the list that records (kernel, argument types) of the launches prepared]


@contextlib.contextmanager
def planning():
    """Launches prepared inside are recorded, not made (and bind at their first call after it):

        with planning() as plan:
            forward(...)                # every kernel call of it recorded in plan, none run
        kernel_cache.prepare(plan)      # compile (or load) them all now

    plan: a list of (kernel, argument types); in the simulator, whose kernels compile nothing, (kernel, None)."""
    if _PLAN:
        raise RuntimeError("planning() does not nest")
    plan = []
    _PLAN.append(plan)
    try:
        yield plan
    finally:
        _PLAN.clear()


def planned(kernel, args):
    """For launches made without a Launch (kernel[grid, block](*args)): inside planning(), record them and return
    True (the caller must not launch); else False."""
    if not _PLAN:
        return False
    _PLAN[0].append((kernel, None if SIM else tuple(kernel.typeof_pyval(a) for a in args)))
    return True


class Launch:
    """kernel[grid, block, stream](*args), prepared once and repeated for one driver call each.

        step = Launch(kernel, grid, block, (x, w, y), stream)
        step()                      # launches; step(grid=(n, 1, 1)) with another grid
        step.set_arg(0, other_x)    # another array of the same type (re-marshals only that argument)
    """

    def __init__(self, kernel, grid, block, args, stream=0, shared_mem=0):
        self.kernel, self.grid, self.block, self.stream = kernel, _dim3(grid), _dim3(block), stream
        self.args, self.shared_mem = list(args), shared_mem
        self._func = None
        if SIM:
            if _PLAN:
                _PLAN[0].append((kernel, None))
            return
        from cuda.bindings import driver as cu
        self._cu = cu
        self.types = tuple(kernel.typeof_pyval(a) for a in self.args)
        self._stream = stream_handle(stream)
        if _PLAN:
            _PLAN[0].append((kernel, self.types))
            return
        self._bind()

    def _bind(self):
        """Compile (or find, in memory or on disk) the kernel for these argument types; marshal the arguments."""
        self._overload = self.kernel.compile(self.types)
        self._func = self._overload._codelibrary.get_cufunc().handle
        self._values = [self._marshal(i) for i in range(len(self.args))]
        self._build()

    def _marshal(self, i):
        """Argument i as the C values Numba's calling convention passes (an array is 5 + 2*ndim of them)."""
        flat = []
        self._overload._prepare_args(self._overload.argument_types[i], self.args[i], self.stream, [], flat)
        return [_as_ctype(v) for v in flat]

    def _build(self):
        self._storage = [v for values in self._values for v in values]     # keeps the C values alive
        self._params = (ctypes.c_void_p * len(self._storage))(*[ctypes.addressof(v) for v in self._storage])
        self._params_address = ctypes.addressof(self._params)

    def set_arg(self, i, value):
        """Replace argument i by a value of the same Numba type (e.g. another device array of the same shape)."""
        if not SIM and self.kernel.typeof_pyval(value) != self.types[i]:
            raise ValueError(f"argument {i}: {self.kernel.typeof_pyval(value)} does not match the prepared type "
                             f"{self.types[i]}")
        self.args[i] = value
        if self._func is not None:
            self._values[i] = self._marshal(i)
            self._build()

    def set_args(self, args):
        """Replace every argument at once by values of the same types (the caller guarantees it: no check)."""
        self.args = list(args)
        if self._func is not None:
            self._values = [self._marshal(i) for i in range(len(self.args))]
            self._build()

    def __call__(self, grid=None):
        grid = self.grid if grid is None else _dim3(grid)
        if _PLAN:                       # planning: recorded when prepared, never run
            return
        if SIM:
            self.kernel[grid, self.block, self.stream, self.shared_mem](*self.args)
            return
        if self._func is None:
            self._bind()
        _check(self._cu.cuLaunchKernel(self._func, *grid, *self.block, self.shared_mem, self._stream,
                                       self._params_address, 0))


def _dim3(d):
    d = (d,) if isinstance(d, (int, np.integer)) else tuple(d)
    return tuple(int(x) for x in d) + (1,) * (3 - len(d))


def _as_ctype(v):
    """Numba's argument preparation yields Python ints for pointers, sizes, shapes and strides (all 64-bit in its
    ABI), Python bools for booleans, and ctypes objects for other scalars."""
    if isinstance(v, bool):
        return ctypes.c_bool(v)
    if isinstance(v, int):
        return ctypes.c_int64(v)
    return v


class Graph:
    """Launches recorded once on a stream, replayed with one driver call (GPU only).

        graph = Graph(stream)
        with graph.capture():
            for step in launches: step()
        graph.replay()              # every captured launch, in order, on the same stream
    """

    def __init__(self, stream):
        if SIM:
            raise RuntimeError("CUDA graphs need a real GPU (the simulator has no driver)")
        from cuda.bindings import driver as cu
        self._cu, self.stream, self._exec = cu, stream, None
        self._handle = stream_handle(stream)
        if self._handle == 0:
            raise ValueError("capture needs a stream of its own (cuda.stream()), not the legacy default stream")

    def capture(self):
        return _Capture(self)

    def replay(self):
        _check(self._cu.cuGraphLaunch(self._exec, self._handle))


class _Capture:
    def __init__(self, graph):
        self.graph = graph

    def __enter__(self):
        g = self.graph
        _check(g._cu.cuStreamBeginCapture(g._handle, g._cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL))
        return g

    def __exit__(self, exc_type, exc, tb):
        g = self.graph
        graph = _check(g._cu.cuStreamEndCapture(g._handle))
        if exc_type is None:
            g._exec = _check(g._cu.cuGraphInstantiate(graph, 0))
        _check(g._cu.cuGraphDestroy(graph))
        return False
