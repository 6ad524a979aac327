"""tutorials/: every lesson runs start to finish as a plain script, its own checks, exercises and "break it"
switches included, ONCE per lesson (the simulator is slow: one run checks many things).

Each lesson runs in a fresh interpreter (the GPU/simulator choice is made once per process, before numba.cuda
is imported), offline (HF_HUB_OFFLINE=1), with strict kernels (a failing kernel raises instead of falling
back to NumPy), on the simulator; with NUMBATTN_TEST_GPU=1 on a GPU machine they run on the GPU instead,
benchmarks included. The chat lesson is pinned to the miniature checkpoint (NUMBATTN_TUTORIAL_TINY=1) so that
a downloaded TinyLlama does not turn this into a multi-minute CPU chat. Pictures go to a temporary folder
(NUMBATTN_TUTORIAL_OUT), and every lesson must write the ones it announces.

NUMBATTN_TUTORIAL_SELFTEST=1 makes each exercise score its stub too, in the same process (it must fail), before
the solution (which must pass its answer check and its traffic budget); and a plain run tries every "break it"
switch in-process, each of which must fail a check with its predicted message (tutorials/_lesson.break_it). The
command-line paths (--exercise, --break NAME) are checked on a demo exercise and demo switches, without a lesson.
`pytest tests/test_tutorials.py -s` prints each lesson's run time.
"""
import ast
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
LESSONS = sorted(TUTORIALS.glob("[0-9][0-9]*_*.py"))
GPU_RUN = os.environ.get("NUMBATTN_TEST_GPU", "") not in ("", "0")
TIMEOUT_S = 300 if GPU_RUN else 120
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
STUB = "# <- replace this line"
SIM_ONLY_PICTURES = ("01_kernel_reads.png", "03_reads_per_block.png", "03_q_tile_and_streaming_kv.png",
                     "04_tiles_read_per_block.png")


def number_of(lesson):
    """'03b_tensor_cores.py' -> '3b' (as the lesson prints it: "lesson 3b checks passed")."""
    return re.match(r"0*(\d+[a-z]?)_", lesson.name).group(1)


def lesson_env(out_dir, selftest=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1", NUMBATTN_STRICT="1", NUMBATTN_TUTORIAL_TINY="1",
               PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", NUMBATTN_TUTORIAL_OUT=str(out_dir))
    env.pop("NUMBATTN_TUTORIAL_EXERCISE", None)
    env["NUMBATTN_TUTORIAL_SELFTEST"] = "1" if selftest else "0"
    if GPU_RUN:
        env["NUMBATTN_TUTORIAL_GPU"] = "1"
        env.pop("NUMBA_ENABLE_CUDASIM", None)
    else:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
        env.pop("NUMBATTN_TUTORIAL_GPU", None)
    return env


def run_lesson(lesson, out_dir, args=(), selftest=True):
    """-> (completed process, seconds)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(lesson), *args], cwd=ROOT, env=lesson_env(out_dir, selftest),
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-4000:]
        pytest.fail(f"{lesson.name} ran longer than {TIMEOUT_S} s; last output:\n{out!r}")
    return proc, time.perf_counter() - t0


def switches(source):
    return re.findall(r'break_it\(\s*"([\w-]+)"', source)


def exercises(source):
    """{number: EXERCISE function name} of a lesson's source."""
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef):
            doc = ast.get_docstring(node) or ""
            m = re.match(r"EXERCISE (\d+[a-z]?)\.", doc)
            if m:
                found[m.group(1)] = node.name
    return found


def test_lessons_are_numbered_and_listed():
    names = [p.name for p in LESSONS]
    numbers = [int(re.match(r"\d+", n).group(0)) for n in names]
    assert numbers == sorted(numbers) and sorted(set(numbers)) == list(range(1, max(numbers) + 1)), \
        f"lessons must be numbered 01, 02, ... (a letter may follow, e.g. 03b): {names}"
    readme = (TUTORIALS / "README.md").read_text(encoding="utf-8")
    assert not [n for n in names if f"({n})" not in readme], "tutorials/README.md must link every lesson"
    for helper in ("README.md", "_setup.py", "_lesson.py", "solutions.py", "GLOSSARY.md"):
        assert (TUTORIALS / helper).is_file(), f"tutorials/{helper} is missing"


def test_every_exercise_has_a_stub_and_a_solution_of_the_same_signature():
    solutions = {n.name: n for n in ast.parse((TUTORIALS / "solutions.py").read_text(encoding="utf-8")).body
                 if isinstance(n, ast.FunctionDef)}
    found = 0
    for lesson in LESSONS:
        source = lesson.read_text(encoding="utf-8")
        tree = {n.name: n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
        for number, name in exercises(source).items():
            found += 1
            assert name in solutions, f"tutorials/solutions.py has no {name} (exercise {number}, {lesson.name})"
            args = lambda f: [a.arg for a in f.args.args]          # noqa: E731
            assert args(tree[name]) == args(solutions[name]), \
                f"{name}: the lesson's arguments {args(tree[name])} differ from the solution's {args(solutions[name])}"
            body = "\n".join(source.splitlines()[tree[name].lineno - 1:tree[name].end_lineno])
            assert STUB in body, f"{lesson.name}: exercise {number} ({name}) has no stub line marked {STUB!r}"
            assert re.search(rf'_lesson\.exercise\("?{number}"?,', source), \
                f"{lesson.name}: exercise {number} is never scored"
    assert found >= 5, f"expected at least five exercises, found {found}"


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs(lesson, tmp_path):
    source = lesson.read_text(encoding="utf-8")
    assert re.search(r"^import _setup\b", source, re.M), f"{lesson.name} must `import _setup` before numba"
    assert "What you will learn" in source and "# %%" in source, f"{lesson.name} lacks the lesson structure"

    proc, elapsed = run_lesson(lesson, tmp_path)
    print(f"\n{lesson.name}: {elapsed:.1f} s")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{lesson.name} exited with {proc.returncode} after {elapsed:.1f} s:\n{output[-6000:]}"
    number = number_of(lesson)
    assert f"lesson {number} checks passed" in proc.stdout, f"{lesson.name} did not reach its checks:\n{output[-3000:]}"
    if HAVE_MATPLOTLIB:
        announced = re.findall(r"^picture: (.+)$", proc.stdout, re.M)
        missing = [p for p in announced if not Path(p).is_file()]
        assert not missing, f"{lesson.name} announced pictures it did not write: {missing}"
        written = {p.name for p in tmp_path.glob("*.png")}
        promised = {n for n in re.findall(r'_lesson\.save\(fig, "([\w.]+)"\)', source)
                    if not (GPU_RUN and n in SIM_ONLY_PICTURES)}
        assert promised <= written, f"{lesson.name} wrote {sorted(written)}, expected {sorted(promised)}"
    for n in exercises(source):
        assert f"exercise {n}: the stub fails, as it must" in proc.stdout, f"{lesson.name}: exercise {n}'s stub"
        assert re.search(rf"^exercise {n} \(.*\): solution passes", proc.stdout, re.M), \
            f"{lesson.name}: exercise {n}'s solution did not pass:\n{proc.stdout[-2000:]}"
    names = switches(source)
    assert names, f"{lesson.name}: no break switches"
    simulator_only = set(re.findall(r'break_it\(\s*"([\w-]+)"[^\n]*(?:\n(?!_lesson)[^\n]*)*?simulator_only=True',
                                    source))
    for name in names:                      # each confirmed in-process (break_it raises if not)
        if GPU_RUN and name in simulator_only:
            assert re.search(rf"^  --break {name}: not available here: it runs in the simulator only", proc.stdout,
                             re.M), f"{lesson.name}: --break {name} was not offered as simulator-only"
            continue
        assert re.search(rf"^  --break {name}: .*\n    predicted: .*\n    confirmed: ", proc.stdout, re.M), \
            f"{lesson.name}: --break {name} did not run or was not confirmed:\n{proc.stdout[-3000:]}"


LESSON_SWITCHES = """
import sys
sys.path.insert(0, {tutorials!r})
import _lesson
print("EXERCISE", _lesson.EXERCISE, "BREAK", _lesson.BREAK)
def score(fn):
    _lesson.check_exercise(9, "the answer", fn(), 1.0)
    return _lesson.check_budget(9, "reads", 3, 4)
def stub():
    return 0.0
def solution():
    return 1.0
_lesson.exercise(9, "a demo", stub, solution, score)
_lesson.break_it("first", "a mistake", "it fails", "the answer", lambda: _lesson.close("the answer", 2.0, 1.0))
_lesson.break_it("second", "another", "it fails too", "the answer", lambda: _lesson.close("the answer", 3.0, 1.0))
_lesson.break_it("third", "a counted one", "it fails", "the answer", lambda: _lesson.close("the answer", 4.0, 1.0),
                 simulator_only=True)
print("the end")
"""


def run_switches(*args, selftest=False, simulator=True):
    code = LESSON_SWITCHES.format(tutorials=str(TUTORIALS))
    env = dict(os.environ, NUMBATTN_TUTORIAL_SELFTEST="1" if selftest else "0",
               NUMBA_ENABLE_CUDASIM="1" if simulator else "0")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60)


def test_the_command_line_switches(tmp_path):
    """_lesson's switches, on a demo exercise and three demo breaks (no lesson runs: the lessons' own runs above
    check their exercises and breaks): --exercise scores yours and stops at it with yours vs expected; --break
    NAME runs up to that switch, prints its whole message, and stops; a plain run tries every switch (on a GPU
    run, a simulator-only one says it is not available, and stops there when asked for); the selftest scores the
    stub first; a budget overrun is a failure too."""
    plain = run_switches()
    assert plain.returncode == 0 and "solution passes: reads 3 <= 4" in plain.stdout and "the end" in plain.stdout
    assert plain.stdout.count("confirmed: the answer") == 3
    gpu = run_switches(simulator=False)             # a GPU run: the simulator-only switch is offered, not tried
    assert gpu.returncode == 0 and gpu.stdout.count("confirmed: the answer") == 2 and "the end" in gpu.stdout
    assert "--break third: not available here: it runs in the simulator only" in gpu.stdout
    asked = run_switches("--break", "third", simulator=False)
    assert "--break third: not available here" in asked.stdout and "the end" not in asked.stdout
    other = run_switches("--break", "second", simulator=False)
    assert "--break second: another" in other.stdout and "third" not in other.stdout
    mine = run_switches("--exercise")
    assert mine.returncode != 0 and "AssertionError: exercise 9 (the answer): 1 of 1 values differ" in mine.stderr
    assert "yours 0, expected 1" in mine.stderr and "the end" not in mine.stdout
    second = run_switches("--break", "second")
    assert second.returncode == 0 and "--break second: another" in second.stdout
    assert "--break first" not in second.stdout and "the prediction came true" in second.stdout
    assert "the end" not in second.stdout
    selftest = run_switches(selftest=True)
    assert "exercise 9: the stub fails, as it must" in selftest.stdout and selftest.returncode == 0
    lesson = next(p for p in LESSONS if p.name.startswith("02_"))
    unknown = subprocess.run([sys.executable, str(lesson), "--break", "nope"], capture_output=True, text=True,
                             env=lesson_env(tmp_path, selftest=False), timeout=60, cwd=ROOT)
    assert unknown.returncode == 2 and "no such switch; it has: no-rescale" in unknown.stderr, unknown.stderr
