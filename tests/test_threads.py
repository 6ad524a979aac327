"""tinyllm/threads.py: the BLAS thread rule (one thread per core other programs leave idle), its measurement, and
that threadpoolctl sees the count applied and the library's own count restored."""
import subprocess
import sys
import time

import numpy as np  # noqa: F401  (loads the BLAS that threadpoolctl controls)
import pytest

from tinyllm import threads
from tinyllm.threads import BlasThreads, CpuSample, blas_libraries, choose_threads, others_load


@pytest.mark.parametrize("cores, others, expect", [
    (2, 0.0, 2), (2, 0.2, 2),               # idle: every core (daemons and tick noise stay under a quarter core)
    (2, 0.3, 1), (2, 1.0, 1), (2, 1.7, 1),  # a core in use, even in part: one thread fewer
    (2, 7.0, 1), (1, 0.0, 1),               # never fewer than one
    (16, 3.6, 12), (16, 3.8, 12), (16, 0.0, 16),
])
def test_the_rule(cores, others, expect):
    assert choose_threads(cores, others) == expect


def test_others_load_leaves_out_our_own_cpu_time():
    start = CpuSample(wall=10.0, busy=100.0, own=5.0)
    assert others_load(start, CpuSample(wall=12.0, busy=104.0, own=8.0)) == pytest.approx(0.5)   # 4 busy, 3 ours
    assert others_load(start, CpuSample(wall=12.0, busy=103.0, own=8.5)) == 0.0                   # never negative
    assert others_load(start, CpuSample(wall=10.01, busy=100.0, own=5.0)) is None                 # too short to say


class FakeMachine:
    """/proc/stat and getrusage of a machine whose other programs keep .others cores busy; one second passes at
    each sample()."""

    def __init__(self, monkeypatch, others, cores=2):
        self.others, self.t, self.busy = others, 0, 0.0
        monkeypatch.setattr(threads, "sample", self.sample)
        monkeypatch.setattr(threads, "usable_cores", lambda: cores)

    def sample(self):
        self.t += 1
        self.busy += self.others
        return CpuSample(wall=self.t, busy=self.busy, own=0.0)


def test_the_count_is_applied_followed_and_restored(monkeypatch):
    original = blas_libraries()
    assert original, "threadpoolctl finds no BLAS under NumPy"
    machine = FakeMachine(monkeypatch, others=1.5)
    blas = BlasThreads()
    try:
        assert blas.update() == 1 and {n for _, _, n in blas_libraries()} == {1}
        assert blas.describe() == "1 of 2 cores (auto: other programs use 1.5 cores)"
        machine.others = 0.0                                            # the other program ended
        assert blas.follow() == 2 and {n for _, _, n in blas_libraries()} == {2}
        machine.others = 1.0
        assert blas.follow() == 1 and blas.use(2) == 2 and {n for _, _, n in blas_libraries()} == {2}
    finally:
        blas.restore()
    assert blas_libraries() == original


def test_a_requested_count_is_never_measured(monkeypatch):
    monkeypatch.setattr(threads, "sample", lambda: pytest.fail("measured"))
    blas = BlasThreads(1)
    try:
        assert blas.update() == 1 and blas.describe() == f"1 of {blas.cores} cores (-t 1)"
        assert {n for _, _, n in blas_libraries()} == {1}
    finally:
        blas.restore()
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="must be a positive integer"):
            BlasThreads(bad)


def test_a_busy_program_is_measured():
    """The real measurement: a spinning process shows as about one busy core beside us (we sleep meanwhile).
    Whatever else runs on the machine only adds to it."""
    spinner = subprocess.Popen([sys.executable, "-c", "print('go', flush=True)\nwhile 1: pass"],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert spinner.stdout.readline() == "go\n"
        start = threads.sample()
        time.sleep(0.5)
        load = others_load(start, threads.sample())
    finally:
        spinner.kill()
        spinner.wait()
        spinner.stdout.close()
    assert load is not None and load >= 0.5, load
    assert choose_threads(2, load) == 1
