"""What every lesson shares after `import _setup`: checks that say what broke, exercises, pictures, H100 numbers.

Checks
    close(what, got, want, atol, rtol)   arrays agree, or AssertionError naming how many values differ, the
                                         worst one (index, both values, |difference|) and the tolerance
    check_races(what, tracer)            no shared-memory race in a traced kernel run, or the races named
    show_kernel(factory, name, steps)    print a kernel from its source, its steps labelled in the margin
    break_it(name, mistake, prediction, expect, run)
                                         a "break it" switch: run() makes the mistake, a check must fail, and
                                         its message must contain `expect` (the prediction, come true). A
                                         plain run tries every switch and prints one line each;
                                         `python tutorials/0N_*.py --break NAME` runs the lesson up to that
                                         switch, prints the check's whole message, and stops there
    edited(module, old, new)             a copy of a numbattn module with one line changed (your file is not
                                         touched): how a switch plants a mistake in a real kernel

Exercises (a loop or a whole kernel left for you in each kernel lesson)
    The code sits in a function marked EXERCISE in the lesson, with a stub that runs but does nothing
    useful. By default the lesson runs the given solution (tutorials/solutions.py), so it always runs start
    to finish. Write yours, then run

        python tutorials/02_online_softmax.py --exercise        (or NUMBATTN_TUTORIAL_EXERCISE=1)

    and the lesson runs YOUR function instead. exercise() scores it twice: its answer against the
    expected one ("yours" next to "expected": check_exercise), and, in the simulator, its memory traffic,
    counted by numbattn/lab/tracing.py, against a stated budget of reads per thread (check_budget); it
    stops at the first exercise that is not solved yet.

Pictures
    save(fig, name) writes a PNG to tutorials/out/ (NUMBATTN_TUTORIAL_OUT=dir to change it) and prints the
    path. pyplot() is None when matplotlib is missing (`pip install -e ".[bench]"`): no pictures, no error.

Measured numbers
    measured(heading, columns) prints a table of BENCHMARKS.md (measured on an H100): without a GPU the
    simulator's timings say nothing about the kernels, so the lessons quote these instead.
"""
import atexit
import os
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXERCISE = "--exercise" in sys.argv or os.environ.get("NUMBATTN_TUTORIAL_EXERCISE", "") not in ("", "0")
OUT = Path(os.environ.get("NUMBATTN_TUTORIAL_OUT") or ROOT / "tutorials" / "out")
# tests/test_tutorials.py: also run each exercise's stub (it must fail) in the same process
SELFTEST = os.environ.get("NUMBATTN_TUTORIAL_SELFTEST", "") not in ("", "0")


def _switch(flag):
    """The value after `flag` on the command line (--break NAME or --break=NAME), else None."""
    for i, arg in enumerate(sys.argv):
        if arg == flag and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


BREAK = _switch("--break")
BREAKS = []                 # the switches this lesson offers, in order
LABEL = ["yours" if EXERCISE else "solution"]     # who is being checked: an exercise's check names it


def _unknown_break():
    if BREAK and BREAK not in BREAKS:
        print(f"--break {BREAK}: this lesson has no such switch; it has: {', '.join(BREAKS) or 'none'}",
              file=sys.stderr)
        os._exit(2)


def offered_breaks(path):
    """The switch names a lesson's source offers (its break_it("name", ... calls), in order."""
    import re
    return re.findall(r'break_it\(\s*"([\w-]+)"', Path(path).read_text(encoding="utf-8"))


if BREAK:
    atexit.register(_unknown_break)
    if os.path.isfile(sys.argv[0]) and BREAK not in offered_breaks(sys.argv[0]):
        BREAKS[:] = offered_breaks(sys.argv[0])
        _unknown_break()


# -------------------------------------------------------------------------------------------------------
# checks
# -------------------------------------------------------------------------------------------------------
def close(what, got, want, atol=0.0, rtol=0.0, got_label="got", want_label="expected"):
    """Assert got ≈ want elementwise (|got - want| <= atol + rtol·|want|; NaN never matches) -> max |diff|."""
    got, want = np.broadcast_arrays(np.asarray(got, np.float64), np.asarray(want, np.float64))
    diff = np.abs(got - want)
    bad = ~(diff <= atol + rtol * np.abs(want))          # NaN compares False: counted as a mismatch
    worst = float(np.nanmax(np.where(np.isnan(diff), np.inf, diff))) if diff.size else 0.0
    if bad.any():
        order = np.argsort(np.where(bad, np.where(np.isnan(diff), np.inf, diff), -1.0), axis=None)[::-1]
        rows = [f"    at {tuple(int(i) for i in np.unravel_index(j, got.shape))}: {got_label} {got.flat[j]:.6g}, "
                f"{want_label} {want.flat[j]:.6g}, |diff| {diff.flat[j]:.2e}" for j in order[:min(4, bad.sum())]]
        cause = likely_cause(got[bad], want[bad])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} values differ by more than "
                             f"atol={atol:g} + rtol={rtol:g}·|{want_label}| (largest |diff| {worst:.2e}):\n"
                             + "\n".join(rows) + (f"\n    likely cause: {cause}" if cause else ""))
    return worst


def likely_cause(got, want):
    """A guess from the pattern of the differing values (float64 arrays of equal size), or ''."""
    if np.isnan(got).any() and not np.isnan(want).any():
        return ("NaN where a number was expected: an element never written (buffers start as NaN here), a read of "
                "a poisoned (NaN) slot past a row's length, or 0/0 or inf/inf (a row that saw no key; an exp that "
                "overflowed)")
    if np.isinf(got).any() and np.isfinite(want).all():
        return "infinite values: an overflow (exp without the max subtracted?) or a division by zero"
    if (got == 0).all() and (want != 0).any():
        return "all zeros: nothing was accumulated or written (a stub, or a loop that never ran?)"
    nonzero = (want != 0) & (got != 0) & np.isfinite(got) & np.isfinite(want)
    if nonzero.sum() >= 2:
        ratio = np.median(got[nonzero] / want[nonzero])
        for factor, name in ((np.log2(np.e), "log2(e)"), (1 / np.log2(np.e), "ln(2)")):
            if abs(ratio - factor) < 1e-3 * factor and np.allclose(got[nonzero] / want[nonzero], factor, rtol=1e-3):
                return f"every value is {name} = {factor:.4f} times the expected one: base-2 vs natural units?"
    return ""


SIMULATOR_ONLY = ("it runs in the simulator only: its check counts each thread's memory accesses "
                  "(numbattn/lab/tracing.py) or runs a kernel on host arrays; run the lesson without "
                  "NUMBATTN_TUTORIAL_GPU=1 to try it")


def break_it(name, mistake, prediction, expect, run, catch=(AssertionError,), simulator_only=False):
    """A "break it" switch. run() makes `mistake`; a check must then fail (an exception of `catch`) with a message
    containing `expect`: the `prediction` comes true. Plain run: every switch is tried, one line each. With
    --break NAME: only that switch runs, its whole message is printed, and the lesson stops there. A
    `simulator_only` switch is offered on a GPU run as "not available here", with the reason."""
    if simulator_only and os.environ.get("NUMBA_ENABLE_CUDASIM", "0") in ("", "0"):
        if BREAK and BREAK != name:                 # another switch was asked for: nothing to say about this one
            BREAKS.append(name)
            return None
        return skip_break(name, SIMULATOR_ONLY)
    BREAKS.append(name)
    if BREAK and BREAK != name:
        return None
    label, LABEL[0] = LABEL[0], "the kernel"        # an exercise's checks, run on the broken code, name it so
    try:
        run()
    except catch as e:
        message = str(e) if isinstance(e, AssertionError) else f"{type(e).__name__}: {e}"
    else:
        raise AssertionError(f"--break {name} ({mistake}): no check failed, so the prediction did not come true: "
                             f"{prediction}")
    finally:
        LABEL[0] = label
    if expect not in message:
        raise AssertionError(f"--break {name} ({mistake}): predicted a failure saying {expect!r}, but the check "
                             f"said:\n{message[:1500]}")
    lines = message.splitlines()
    shown = lines[1:] if BREAK else lines[1:3] + [x for x in lines[3:] if "likely cause" in x]
    print(f"  --break {name}: {mistake}\n    predicted: {prediction}\n    confirmed: {lines[0]}"
          + "".join(f"\n       {x.strip()}" for x in shown))
    if BREAK == name:
        print(f"(--break {name}: the prediction came true; the lesson stops here. Run it without --break to go on.)")
        sys.stdout.flush()
        os._exit(0)
    return message


def show_kernel(factory, kernel_name, steps):
    """Print the kernel (or device function) `kernel_name` defined inside `factory`, with file line numbers and, in
    the margin, the label of each (text, label) of `steps`, matched in order. A step no longer found (you edited
    the kernel) is reported, and the lesson goes on: its checks judge the change."""
    import inspect
    factory = inspect.unwrap(factory)                   # factories are wrapped in a cache
    lines, first = inspect.getsourcelines(factory)
    begin = next(n for n, line in enumerate(lines) if f"def {kernel_name}(" in line) - 1    # its decorator
    end = next(n for n, line in enumerate(lines) if line.strip() == f"return {kernel_name}")
    todo, missing = list(steps), []
    print(f"{Path(inspect.getsourcefile(factory)).relative_to(ROOT)}, {kernel_name}:")
    for n in range(begin, end):
        label = ""
        hit = next((i for i, (text, _) in enumerate(todo) if text in lines[n]), None)
        if hit is not None:                             # the steps before it are gone from the kernel
            missing += todo[:hit]
            label, todo = todo[hit][1], todo[hit + 1:]
        print(f"{label:>3} {first + n:4d} {lines[n].rstrip()}")
    todo = missing + todo
    if todo:
        print(f"(note: {kernel_name} no longer has {', '.join(repr(x) for x, _ in todo)}: steps "
              f"{', '.join(label for _, label in todo)} are not labelled; the lesson goes on, its checks will judge "
              f"the change)")


def check_races(what, tracer):
    """No shared-memory race in a kernel run traced with tracer.shared() (numbattn/lab/tracing.py), or an
    AssertionError naming the first ones and the likely cause."""
    hazards = tracer.hazards()
    if hazards:
        rows = [f"    {h.name}{list(h.index)} in block {h.block[0]}: written by thread {h.writers}, read by threads "
                f"{h.readers} between barriers {h.interval} and {h.interval + 1}" for h in hazards[:3]]
        raise AssertionError(f"{what}: {len(hazards)} shared-memory races: elements written by one thread and read "
                             f"by another with no cuda.syncthreads() between (a missing barrier?):\n"
                             + "\n".join(rows))
    return "no shared-memory race"


def skip_break(name, why):
    """A switch this run cannot offer (e.g. it needs the simulator): say so, and stop here if it was asked for."""
    BREAKS.append(name)
    print(f"  --break {name}: not available here: {why}")
    if BREAK == name:
        sys.stdout.flush()
        os._exit(0)


def edited(module, old, new, count=1):
    """A fresh copy of `module` (a numbattn module, e.g. numbattn.kernels.prefill_tiled) whose source has `old`
    replaced by `new` (its `count`-th occurrence; new may be "" to delete). The file on disk is not touched."""
    import inspect
    source = inspect.getsource(module)
    at = -1
    for _ in range(count):
        at = source.find(old, at + 1)
        if at < 0:
            raise LookupError(f"{module.__name__} no longer contains {old!r} (occurrence {count}): the lesson's "
                              f"switch needs updating")
    copy = types.ModuleType(module.__name__ + "_edited")
    copy.__package__, copy.__file__ = module.__package__, module.__file__
    exec(compile(source[:at] + new + source[at + len(old):], module.__file__, "exec"), copy.__dict__)
    return copy


# -------------------------------------------------------------------------------------------------------
# exercises
# -------------------------------------------------------------------------------------------------------
def exercise(number, what, yours, solution, score):
    """Exercise `number`: score(fn) runs the code built around fn (yours with --exercise, else the solution) and
    checks its answer (check_exercise) and its counted traffic (check_budget), raising AssertionError at the first
    miss; it returns a line for the report. With NUMBATTN_TUTORIAL_SELFTEST=1 the stub is scored first and must
    fail. -> what score returned."""
    print(f"exercise {number} ({what}): running {'YOUR ' + yours.__name__ if EXERCISE else 'the given solution'}"
          + ("" if EXERCISE else " (write yours in the EXERCISE function, then run with --exercise)"))
    if SELFTEST and not EXERCISE:
        LABEL[0] = "yours"
        try:
            score(yours)
        except AssertionError as e:
            print(f"exercise {number}: the stub fails, as it must: {str(e).splitlines()[0]}")
        else:
            raise AssertionError(f"exercise {number}: the stub in the lesson passes its own check")
    LABEL[0] = "yours" if EXERCISE else "solution"
    report = score(yours if EXERCISE else solution)
    print(f"exercise {number} ({what}): {LABEL[0]} passes{': ' + report if report else ''}")
    return report


def check_exercise(number, what, got, want, atol=0.0, rtol=0.0):
    """close() for an exercise's result, labelled 'yours' (or 'solution') against 'expected'."""
    worst = close(f"exercise {number} ({what})", got, want, atol, rtol, got_label=LABEL[0], want_label="expected")
    print(f"exercise {number} ({what}): {LABEL[0]} matches expected (largest |diff| {worst:.1e})")


def check_budget(number, what, counted, budget, hint=""):
    """An exercise's counted accesses per thread (the most any thread made) against its budget."""
    if counted > budget:
        who = f"exercise {number} ({what}): {LABEL[0]}" if number else f"{what}: the kernel"
        raise AssertionError(f"{who} made {counted} per thread, the budget is {budget}{'; ' + hint if hint else ''}")
    return f"{what} {counted} <= {budget}"


# -------------------------------------------------------------------------------------------------------
# pictures
# -------------------------------------------------------------------------------------------------------
def pyplot():
    """matplotlib.pyplot (a file-only backend when run as a script), or None if matplotlib is missing."""
    try:
        import matplotlib
        if "ipykernel" not in sys.modules:      # in a notebook keep its backend: the figure shows inline too
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed, so no pictures: pip install -e \".[bench]\")")
        return None
    return plt


def save(fig, name):
    """Write fig to OUT/name and print where it went."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    fig.savefig(path, dpi=100, bbox_inches="tight")
    if "ipykernel" not in sys.modules:
        import matplotlib.pyplot as plt
        plt.close(fig)
    print(f"picture: {path}")
    return path


def grid(ax, values, title, cmap="tab20", labels=True, xlabel="", ylabel="", vmin=None, vmax=None):
    """A matrix as coloured cells, each labelled with its value: owner maps, bank maps, read counts.
    cmap="distinct": one colour per integer value (up to 40), e.g. one per shared-memory bank."""
    values = np.asarray(values)
    if cmap == "distinct":
        from matplotlib import colormaps
        from matplotlib.colors import ListedColormap
        colours = list(colormaps["tab20"].colors) + list(colormaps["tab20b"].colors)
        cmap, vmin, vmax = ListedColormap(colours), -0.5, len(colours) - 0.5
    ax.imshow(values, cmap=cmap, aspect="auto", interpolation="nearest", vmin=vmin, vmax=vmax)
    if labels:
        for (r, c), x in np.ndenumerate(values):
            ax.text(c, r, str(x), ha="center", va="center", fontsize=7)
    for axis, n in ((ax.set_yticks, values.shape[0]), (ax.set_xticks, values.shape[1])):
        axis(range(0, n, 1 if n <= 16 else 4))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)


# -------------------------------------------------------------------------------------------------------
# measured numbers (BENCHMARKS.md)
# -------------------------------------------------------------------------------------------------------
def benchmarks_table(heading):
    """Rows (dicts of strings) of the first table after the line of BENCHMARKS.md that starts with heading."""
    lines = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    if start is None:
        raise LookupError(f"BENCHMARKS.md has no section starting with {heading!r}")
    table = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif table:
            break
    header, body = table[0], table[2:]              # table[1] is the |---|---| line
    return [dict(zip(header, row)) for row in body]


def measured(heading, columns, where=lambda row: True, plot=None):
    """Print columns of a BENCHMARKS.md table (rows where `where` holds), with the machine and date it came from."""
    from numbattn.lab import bench
    head = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8").split("\n## ")[0]
    device = next((ln.split(":", 1)[1].strip() for ln in head.splitlines() if ln.strip().startswith("device:")), "")
    date = next((ln.split(":", 1)[1].strip()[:10] for ln in head.splitlines() if ln.strip().startswith("date:")), "")
    rows = [r for r in benchmarks_table(heading) if where(r)]              # LookupError if there is no such table
    lines = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8").splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(heading))
    section = [line for line in lines[:at] if line.startswith("## ")]     # a dated section: its own date
    date = section[-1][3:13] if section and section[-1].startswith("## 20") else date
    print(f"measured on {device.split(',')[0] or 'the GPU machine'} ({date}), BENCHMARKS.md, {heading.lstrip('# ')}:")
    print(bench.format_table(rows, columns))
    if plot:
        print(f"plot: {ROOT / 'benchmarks' / 'plots' / plot}")
    return rows
