"""Four repairs to Numba's CUDA simulator (numba-cuda 0.30), applied once when the simulator is the backend.

The simulator runs a kernel one block at a time, each CUDA thread of the block as a Python thread. numbattn's
tests and lessons run every kernel there, so its speed and its correctness are ours to care about:

1. cuda.shared.array looks its block's array up in a dict and, if missing, creates and stores it, unlocked.
   Two threads of a block that switch between the lookup and the store get *different* arrays, and the kernel
   silently computes garbage (seen as a rare, moving failure of the test suite, more likely with the short
   thread switch interval the tests set). Fixed: the same lookup, under a lock. (numbattn/lab/tracing.py can
   have each array handed out traced, through SHARED_ARRAY_HOOK, to count shared-memory accesses.)
2. A block's barrier is a busy loop: the main thread polls every thread's `syncthreads_blocked` flag and
   `is_alive()` until all are blocked or finished, holding the GIL the block's own threads need to get there
   (two thirds of a simulated decode step was that loop). Replaced by a counting barrier on one condition
   variable: the last thread to arrive (or to finish) opens it, the main thread sleeps until the block is done.
   Same contract: a thread that finished (or raised) no longer counts; the first thread's exception is raised
   from the launch once the block is done; `abort` plus a wake-up (stop_threads) makes a waiting thread raise.
3. Every call of a device function swaps its module's `cuda` global for the launch's fake module: under two
   locks, scanning the module's globals whenever no other thread happens to be inside it (150 us a call, most
   of a simulated GEMM's time). Replaced by one swap per module per launch, undone when the launch ends.
4. After ^C, stop_threads ends the threads a dead launch left blocked (see its docstring).
"""
import contextlib
import logging
import sys
import threading
import time

import numpy as np

log = logging.getLogger("numbattn")


def repair():
    """Apply the repairs (idempotent). Call only after numba.cuda was imported with the simulator on."""
    from numba.cuda.simulator import kernel, kernelapi
    if getattr(kernel, "_numbattn_repaired", False):
        return
    _lock_shared_array_creation(kernelapi)
    kernel.BlockManager.run = _run_block
    kernel.BlockThread.syncthreads = _syncthreads
    kernel.swapped_cuda_module = _swapped_for_the_launch
    kernel._numbattn_repaired = True


def _lock_shared_array_creation(kernelapi):
    from numba.cuda.simulator.kernelapi import numpy_support, types
    shared = kernelapi.FakeCUDAShared
    original, lock = shared.array, threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:     # dynamic shared memory (one buffer), or an error upstream
            return original(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)     # one allocation per source line, as upstream
        with lock:
            if key not in self._allocations:
                dt = numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype
                self._allocations[key] = np.empty(shape, dt)
            memory = self._allocations[key]
        hook = SHARED_ARRAY_HOOK[0]
        return memory if hook is None else hook(memory, key)

    shared.array = array


# numbattn.lab.tracing sets SHARED_ARRAY_HOOK[0] = hook(memory, (file, line)) -> what the kernel gets in place of a
# simulated shared array (a traced view of it), while it counts shared-memory accesses; None otherwise.
SHARED_ARRAY_HOOK = [None]


class _Launch:
    """The modules the running launch has swapped to its fake `cuda`: {id(globals): (globals, names)}; None
    between launches."""
    swapped, lock = None, threading.Lock()


@contextlib.contextmanager
def _swapped_for_the_launch(fn, fake):
    """kernel.swapped_cuda_module: entered by a launch (from the host thread), then by each device call in it."""
    if fake is None:                            # a device function called outside any kernel: nothing to swap
        yield
        return
    if _Launch.swapped is not None:             # a device call inside the launch: swap its module once
        if id(fn.__globals__) not in _Launch.swapped:
            _swap(fn.__globals__, fake)
        yield
        return
    _Launch.swapped = {}
    try:
        _swap(fn.__globals__, fake)
        yield
    finally:
        from numba import cuda
        for g, names in _Launch.swapped.values():
            g.update(dict.fromkeys(names, cuda))
        _Launch.swapped = None


def _swap(g, fake):
    from numba import cuda
    with _Launch.lock:
        if id(g) not in _Launch.swapped:
            names = [k for k, v in g.items() if v is cuda]
            g.update(dict.fromkeys(names, fake))
            _Launch.swapped[id(g)] = (g, names)


class _Barrier:
    """A block's barrier: `alive` threads still running, `arrived` of them waiting, `generation` counts openings."""

    def __init__(self, n_threads):
        self.cond = threading.Condition()
        self.alive, self.arrived, self.generation = n_threads, 0, 0

    def open_if_all_arrived(self):      # caller holds cond
        if self.arrived and self.arrived == self.alive:
            self.arrived, self.generation = 0, self.generation + 1
            self.cond.notify_all()


def _syncthreads(self):
    """BlockThread.syncthreads: arrive, and wait for the block's last thread (or an abort)."""
    if self.abort:
        raise RuntimeError("abort flag set on syncthreads call")
    barrier = self._manager.barrier
    with barrier.cond:
        generation = barrier.generation
        barrier.arrived += 1
        barrier.open_if_all_arrived()
        while barrier.generation == generation and not self.abort:
            barrier.cond.wait()
    if self.abort:
        raise RuntimeError("abort flag set on syncthreads clear")


def _run_block(self, grid_point, *args):
    """BlockManager.run: start the block's threads, sleep until each has finished, raise the first error."""
    from numba.cuda.simulator.kernel import BlockThread
    self.barrier = barrier = _Barrier(int(np.prod(self._block_dim)))

    def target():
        try:
            self._f(*args)
        finally:                        # a finished thread no longer holds the barrier back
            with barrier.cond:
                barrier.alive -= 1
                barrier.open_if_all_arrived()
                barrier.cond.notify_all()

    threads = [BlockThread(target, self, grid_point, point, self._debug) for point in np.ndindex(*self._block_dim)]
    for t in threads:
        t.start()
    with barrier.cond:
        while barrier.alive:
            barrier.cond.wait()
    for t in threads:                   # each is past its kernel body; joined, its error (if any) is recorded
        t.join()
    for t in threads:
        if t.exception:
            raise t.exception[0].with_traceback(t.exception[1])


def _abort(threads):
    for t in threads:
        t.abort = True
    barriers = {id(t._manager): getattr(t._manager, "barrier", None) for t in threads}
    for barrier in barriers.values():
        if barrier is not None:
            with barrier.cond:
                barrier.cond.notify_all()


def stop_threads(timeout=10.0):
    """After an interrupt in the middle of a simulated kernel: stop the block's threads.

    ^C stops only the main thread; the block's others stay waiting at the barrier forever, inside the kernel's
    device functions. With upstream's per-call swap of the module's `cuda` global, a thread left there kept the
    swap alive: every later launch of that module's kernels ran against the stale launch's grid and shared
    memory, and the first new kernel compiled there failed ("'FakeCUDAModule' object has no attribute 'jit'"),
    so everything after one ^C quietly ran on the NumPy fallback. The launch now undoes its swaps as it ends
    (repair 3), but a left thread would still wake later and write into arrays: setting the abort flag and
    waking them makes each raise out of the kernel, and joining them means none writes after we return.
    """
    from numba.cuda.simulator.kernel import BlockThread
    threads = [t for t in threading.enumerate() if isinstance(t, BlockThread)]
    _abort(threads)
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = sum(t.is_alive() for t in threads)
    if alive:
        log.warning("numbattn: %d simulated CUDA threads still running %.0f s after an interrupt", alive, timeout)
