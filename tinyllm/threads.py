"""BLAS threads for the NumPy engine: one per core that other programs leave idle (and as many for its Numba kernels).

    blas = BlasThreads()            # at the start of a command: the measuring window opens
    ...                             # import, load the model: the window runs while we work
    blas.update()                   # -> threads now in use (measured, chosen, applied through threadpoolctl)
    blas.follow()                   # during a reply: update() once a FOLLOW_S window has passed
    blas.describe()                 # "2 of 2 cores (auto: other programs use 0.1 cores)"
    blas.restore()                  # the library's own setting again
    BlasThreads(requested=1)        # -t 1: fixed, never measured

Why. Every matmul of a decode step is split over OpenBLAS's threads, which then wait for each other at its
end, spinning. When another program wants the same cores, one of our threads is descheduled for a whole
time slice while the others spin: SmolLM2-135M's CPU decode went from 33 ms to 500-800 ms per token on a
2-core machine running one other busy process, and back to ~50 ms with one thread (issue 33). On an idle
machine more threads are faster (more memory bandwidth for the weights), so a fixed 1 would cost the idle
speed. The rule therefore measures instead of guessing:

    others  = (CPU time the machine spent busy - CPU time of this process) / wall time, over a window
    threads = the cores we may run on minus others, rounded down unless within a quarter core, at least 1

Rounded down: a core that another program uses even in part stalls our thread on it (at 1.3 other cores
busy on 2, 1 thread decoded at 70 ms per token, 2 threads at 660 ms); the quarter core is measurement noise
(a 100 Hz tick over a 0.2 s window) and the daemons of an idle machine.

OpenBLAS's idle threads spin for 2^28 cycles (~0.1 s) after each matmul before they sleep. A prompt's matmuls
run on them and the decode steps after it on Numba's threads (a GGUF file's blocks), which then found both cores
taken for the first ~10 tokens of every reply: SmolLM2 Q4_1 on 2 cores decoded at 13.9 ms a token instead of
10.5. The entry points (cli.py, the CPU benchmarks) therefore set OPENBLAS_THREAD_TIMEOUT=18 (2^18 cycles, ~0.1 ms)
before NumPy loads OpenBLAS, unless it is set already; the prompt's time did not change (140 ms either way).

"CPU time of this process" (getrusage, every thread, and children) is subtracted so that our own work
during the window (loading the weights, the previous reply, spinning BLAS threads) never counts as load:
the window can be the time the model took to load, or the previous turn of a chat, at no extra cost.
The machine's busy time is /proc/stat's (Linux); elsewhere the 1-minute load average stands in (it lags,
and counts our own threads, so it leans to fewer threads: the safe side). The first update() waits until
its window is MIN_WINDOW_S long; a later, shorter one keeps the previous choice.
"""
import logging
import math
import os
import resource
import time
from dataclasses import dataclass

log = logging.getLogger("tinyllm")

MIN_WINDOW_S = 0.2
FOLLOW_S = 1.0


def usable_cores():
    """The cores this process may run on (its CPU affinity; a container's cpuset), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_threads(cores, others):
    """The rule: the cores that the other programs leave idle, rounded down unless within a quarter, at least 1."""
    return max(1, min(cores, math.floor(cores - others + 0.25)))


@dataclass(frozen=True)
class CpuSample:
    wall: float           # seconds, monotonic
    busy: float | None    # machine-wide busy CPU seconds since boot (/proc/stat), None where unreadable
    own: float            # CPU seconds of this process (all its threads) and its finished children


def sample():
    """What the machine and this process have used so far."""
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return CpuSample(time.monotonic(), _machine_busy_seconds(), own)


def _machine_busy_seconds():
    """Busy CPU seconds of every core since boot: /proc/stat's first line less idle and iowait."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]       # user nice system [idle iowait] irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def others_load(start, end):
    """Cores kept busy by other programs between two samples (>= 0), or None if the window is too short."""
    wall = end.wall - start.wall
    if wall < MIN_WINDOW_S:
        return None
    if start.busy is None or end.busy is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(0.0, (end.busy - start.busy - (end.own - start.own)) / wall)


class BlasThreads:
    """The BLAS thread count of this process: fixed (requested), or chosen by the rule at each update()."""

    def __init__(self, requested=None):
        if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int)
                                      or requested < 1):
            raise ValueError(f"threads={requested!r}: must be a positive integer (or None: measured)")
        self.requested, self.cores = requested, usable_cores()
        self.mark = sample() if requested is None else None          # the window opens now
        self.others, self.threads = None, None
        self._libs, self._original = [], None        # threadpoolctl's BLAS controllers, their own counts

    def update(self):
        """Measure since the last update (or the start), choose, apply -> the thread count now in use."""
        if self.requested is not None:
            return self._apply(self.requested)
        if self.threads is None:                         # the first choice: measure over a window long enough
            time.sleep(max(0.0, self.mark.wall + MIN_WINDOW_S - time.monotonic()))
        now = sample()
        others = others_load(self.mark, now)
        if others is None:                               # too short a window to say: keep what we have
            return self.threads
        self.mark, self.others = now, others
        return self._apply(choose_threads(self.cores, others))

    def follow(self):
        """Called as tokens arrive: a program that starts or ends during a long reply changes the count within
        about FOLLOW_S (a /proc/stat read and a getrusage a second; nothing in between)."""
        if self.requested is None and self.mark is not None and time.monotonic() - self.mark.wall >= FOLLOW_S:
            self.update()
        return self.threads

    def use(self, n):
        """Run n threads from now on, whatever the rule says (bench's sweep over thread counts)."""
        return self._apply(n)

    def _apply(self, n):
        if n != self.threads:
            import numba
            if self._original is None:
                from threadpoolctl import ThreadpoolController   # after numpy: it finds the BLAS numpy loaded
                self._libs = ThreadpoolController().select(user_api="blas").lib_controllers
                self._original = [lib.get_num_threads() for lib in self._libs] + [numba.get_num_threads()]
            for lib in self._libs:
                lib.set_num_threads(n)
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))   # the GGUF blocks' CPU kernels
            log.info("tinyllm: BLAS threads %s", self.describe(n))
            self.threads = n
        return n

    def describe(self, n=None):
        n = self.threads if n is None else n
        if self.requested is not None:
            why = f"-t {self.requested}"
        elif self.others is None:
            why = "auto: not measured yet"
        else:
            why = f"auto: other programs use {self.others:.1f} cores"
        return f"{n} of {self.cores} cores ({why})"

    def restore(self):
        """Give BLAS back the thread count it had before."""
        if self._original is not None:
            import numba
            for lib, n in zip(self._libs, self._original[:-1], strict=True):
                lib.set_num_threads(n)
            numba.set_num_threads(self._original[-1])
            self._libs, self._original, self.threads = [], None, None


def blas_libraries():
    """What threadpoolctl sees: [(library, version, threads now)] for each BLAS loaded in this process."""
    from threadpoolctl import threadpool_info
    return [(i.get("internal_api"), i.get("version"), i.get("num_threads")) for i in threadpool_info()
            if i.get("user_api") == "blas"]
