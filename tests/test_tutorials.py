"""tutorials/: every lesson runs start to finish as a plain script, its own checks included.

Each lesson runs in a fresh interpreter (the GPU/simulator choice is made once per process, before numba.cuda
is imported), offline (HF_HUB_OFFLINE=1), with strict kernels (a failing kernel raises instead of falling
back to NumPy), on the simulator; with NUMBATTN_TEST_GPU=1 on a GPU machine they run on the GPU instead,
benchmarks included. Lesson 8 is pinned to the miniature checkpoint (NUMBATTN_TUTORIAL_TINY=1) so that a
downloaded TinyLlama does not turn this into a multi-minute CPU chat. Pictures go to a temporary folder
(NUMBATTN_TUTORIAL_OUT), and every lesson must write the ones it announces.

The exercises (lessons 2-6): run with --exercise, the lesson's stub must fail its check with a message that
puts "yours" next to "expected"; with the stub line replaced by the line of tutorials/solutions.py, the same
run must pass. `pytest tests/test_tutorials.py -s` prints each lesson's run time.
"""
import importlib.util
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
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
# the pictures each lesson writes (in the simulator: lessons 1, 3 and 4 draw counted accesses there only)
PICTURES = {1: ["01_attention_weights.png"] + ([] if GPU_RUN else ["01_kernel_reads.png"]),
            2: ["02_running_max_and_sum.png"],
            3: ["03_owner_and_bank_maps.png"] + ([] if GPU_RUN else ["03_reads_per_block.png",
                                                                       "03_q_tile_and_streaming_kv.png"]),
            4: [] if GPU_RUN else ["04_tiles_read_per_block.png"],
            5: ["05_split_k.png"], 6: ["06_llama_block.png", "06_gguf_blocks.png"], 7: ["07_loss_curve.png"],
            8: ["08_sampling.png"], 9: ["09_paged_cache.png"]}
EXERCISES = {2: "rescaled_sum", 3: "tile_slot", 4: "n_keys", 5: "merged_lse", 6: "dequantize_q4_k"}
STUB = "# <- replace this line"
# runs a lesson's (edited) source, read from stdin, as if it were the file itself
RUN_SOURCE = ("import sys; path = sys.argv[1]; source = sys.stdin.read(); sys.argv = [path] + sys.argv[2:]; "
              "sys.path.insert(0, path.rsplit('/', 1)[0]); "
              "exec(compile(source, path, 'exec'), {'__name__': '__main__', '__file__': path})")


def lesson_env(out_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", NUMBATTN_STRICT="1", NUMBATTN_TUTORIAL_TINY="1",
               PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", NUMBATTN_TUTORIAL_OUT=str(out_dir))
    env.pop("NUMBATTN_TUTORIAL_EXERCISE", None)
    if GPU_RUN:
        env["NUMBATTN_TUTORIAL_GPU"] = "1"
        env.pop("NUMBA_ENABLE_CUDASIM", None)
    else:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
        env.pop("NUMBATTN_TUTORIAL_GPU", None)
    return env


def run_lesson(lesson, out_dir, args=(), source=None):
    """-> (completed process, seconds). source: run this text instead of the file (as the file)."""
    command = [sys.executable, str(lesson), *args] if source is None else \
        [sys.executable, "-c", RUN_SOURCE, str(lesson), *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, env=lesson_env(out_dir), capture_output=True, text=True,
                              timeout=TIMEOUT_S, input=source)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-4000:]
        pytest.fail(f"{lesson.name} ran longer than {TIMEOUT_S} s; last output:\n{out!r}")
    return proc, time.perf_counter() - t0


def test_there_are_exactly_nine_numbered_lessons():
    names = [p.name for p in LESSONS]
    assert len(names) == 9, f"expected 9 lessons in tutorials/, found {names}"
    assert [int(n[:2]) for n in names] == list(range(1, 10)), f"lessons must be numbered 01..09: {names}"
    for helper in ("README.md", "_setup.py", "_lesson.py", "solutions.py"):
        assert (ROOT / "tutorials" / helper).is_file(), f"tutorials/{helper} is missing"


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs(lesson, tmp_path):
    source = lesson.read_text(encoding="utf-8")
    assert re.search(r"^import _setup\b", source, re.M), f"{lesson.name} must `import _setup` before numba"
    assert "What you will learn" in source and "# %%" in source, f"{lesson.name} lacks the lesson structure"

    proc, elapsed = run_lesson(lesson, tmp_path)
    print(f"\n{lesson.name}: {elapsed:.1f} s")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{lesson.name} exited with {proc.returncode} after {elapsed:.1f} s:\n{output[-6000:]}"
    number = int(lesson.name[:2])
    assert f"lesson {number} checks passed" in proc.stdout, f"{lesson.name} did not reach its checks:\n{output[-3000:]}"
    if HAVE_MATPLOTLIB:
        announced = re.findall(r"^picture: (.+)$", proc.stdout, re.M)
        missing = [p for p in announced if not Path(p).is_file()]
        assert not missing, f"{lesson.name} announced pictures it did not write: {missing}"
        written = sorted(p.name for p in tmp_path.glob("*.png"))
        assert set(PICTURES[number]) <= set(written), f"{lesson.name} wrote {written}, expected {PICTURES[number]}"
    if number in EXERCISES:
        assert "exercise" in proc.stdout and "solution matches expected" in proc.stdout, \
            f"{lesson.name} did not check its exercise:\n{proc.stdout[-2000:]}"
    if 2 <= number <= 5:
        assert "break it:" in proc.stdout, f"{lesson.name} has no 'break it' experiments"


def solve(source, name):
    """The lesson's source with its exercise stub replaced by the one-line solution from tutorials/solutions.py."""
    solutions = (ROOT / "tutorials" / "solutions.py").read_text(encoding="utf-8")
    body = re.search(rf"^def {name}\(.*?^    (return .+)$", solutions, re.M | re.S)
    assert body, f"tutorials/solutions.py has no one-line `return` for {name}"
    stubs = [line for line in source.splitlines() if STUB in line]
    assert len(stubs) == 1, f"expected one exercise stub ({STUB!r}), found {len(stubs)}"
    indent = re.match(r"\s*", stubs[0]).group(0)
    return source.replace(stubs[0], indent + body.group(1))


@pytest.mark.parametrize("number", sorted(EXERCISES), ids=[f"lesson{n}" for n in sorted(EXERCISES)])
def test_exercise_stub_fails_and_solution_passes(number, tmp_path):
    lesson = next(p for p in LESSONS if p.name.startswith(f"{number:02d}_"))
    source = lesson.read_text(encoding="utf-8")
    assert re.search(rf"def {EXERCISES[number]}\(.*\n\s+\"\"\"EXERCISE {number}\.", source), \
        f"{lesson.name}: the function {EXERCISES[number]} should open with an 'EXERCISE {number}.' docstring"

    stub, _ = run_lesson(lesson, tmp_path, ["--exercise"])
    output = stub.stdout + stub.stderr
    assert stub.returncode != 0, f"{lesson.name} --exercise passed with the stub in place:\n{output[-2000:]}"
    assert f"AssertionError: exercise {number} (" in output and "yours" in output and "expected" in output, \
        f"{lesson.name} --exercise did not fail at exercise {number} with yours vs expected:\n{output[-2000:]}"

    solved, elapsed = run_lesson(lesson, tmp_path, ["--exercise"], source=solve(source, EXERCISES[number]))
    output = solved.stdout + solved.stderr
    print(f"\n{lesson.name} --exercise, solved: {elapsed:.1f} s")
    assert solved.returncode == 0, f"{lesson.name} --exercise with the solution failed:\n{output[-4000:]}"
    assert f"exercise {number} (" in solved.stdout and "yours matches expected" in solved.stdout, \
        f"{lesson.name} --exercise with the solution did not report 'yours matches expected':\n{output[-2000:]}"
    assert f"lesson {number} checks passed" in solved.stdout
