"""tutorials/: every lesson runs start to finish as a plain script, its own asserts included.

Each lesson runs in a fresh interpreter (the GPU/simulator choice is made once per process, before numba.cuda
is imported), offline (HF_HUB_OFFLINE=1), with strict kernels (a failing kernel raises instead of falling
back to NumPy), on the simulator; with NUMBATTN_TEST_GPU=1 on a GPU machine they run on the GPU instead,
benchmarks included. Lesson 7 is pinned to the miniature checkpoint (NUMBATTN_TUTORIAL_TINY=1) so that a
downloaded TinyLlama does not turn this into a multi-minute CPU chat.

`pytest tests/test_tutorials.py -s` prints each lesson's run time.
"""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
GPU_RUN = os.environ.get("NUMBATTN_TEST_GPU", "") not in ("", "0")
TIMEOUT_S = 300 if GPU_RUN else 120


def lesson_env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", NUMBATTN_STRICT="1", NUMBATTN_TUTORIAL_TINY="1",
               PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    if GPU_RUN:
        env["NUMBATTN_TUTORIAL_GPU"] = "1"
        env.pop("NUMBA_ENABLE_CUDASIM", None)
    else:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
        env.pop("NUMBATTN_TUTORIAL_GPU", None)
    return env


def test_there_are_exactly_seven_numbered_lessons():
    names = [p.name for p in LESSONS]
    assert len(names) == 7, f"expected 7 lessons in tutorials/, found {names}"
    assert [int(n[:2]) for n in names] == list(range(1, 8)), f"lessons must be numbered 01..07: {names}"
    assert (ROOT / "tutorials" / "README.md").is_file() and (ROOT / "tutorials" / "_setup.py").is_file()


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs(lesson):
    source = lesson.read_text(encoding="utf-8")
    assert re.search(r"^import _setup\b", source, re.M), f"{lesson.name} must `import _setup` before numba"
    assert "What you will learn" in source and "# %%" in source, f"{lesson.name} lacks the lesson structure"

    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(lesson)], cwd=ROOT, env=lesson_env(), capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-4000:]
        pytest.fail(f"{lesson.name} ran longer than {TIMEOUT_S} s; last output:\n{out!r}")
    elapsed = time.perf_counter() - t0
    print(f"\n{lesson.name}: {elapsed:.1f} s")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{lesson.name} exited with {proc.returncode} after {elapsed:.1f} s:\n{output[-6000:]}"
    number = int(lesson.name[:2])
    assert f"lesson {number} checks passed" in proc.stdout, f"{lesson.name} did not reach its checks:\n{output[-3000:]}"
