"""What every lesson shares after `import _setup`: checks that say what broke, exercises, pictures, H100 numbers.

Checks
    close(what, got, want, atol, rtol)   arrays agree, or AssertionError naming how many values differ, the
                                         worst one (index, both values, |difference|) and the tolerance
    breaks(mistake, run)                 the "break it" cells: run() makes a known mistake and must fail a
                                         check; the message that check gave is printed

Exercises (one line of a kernel, or of the math, left for you in each kernel lesson)
    The line sits in a small function marked EXERCISE in the lesson. By default the lesson runs the given
    solution (tutorials/solutions.py), so it always runs start to finish. Write your line, then run

        python tutorials/02_online_softmax.py --exercise        (or NUMBATTN_TUTORIAL_EXERCISE=1)

    and the lesson runs YOUR function instead; its check prints "yours" next to "expected" and stops at
    the first exercise that is not solved yet.

Pictures
    save(fig, name) writes a PNG to tutorials/out/ (NUMBATTN_TUTORIAL_OUT=dir to change it) and prints the
    path. pyplot() is None when matplotlib is missing (`pip install -e ".[bench]"`): no pictures, no error.

Measured numbers
    measured(heading, columns) prints a table of BENCHMARKS.md (measured on an H100): without a GPU the
    simulator's timings say nothing about the kernels, so the lessons quote these instead.
"""
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXERCISE = "--exercise" in sys.argv or os.environ.get("NUMBATTN_TUTORIAL_EXERCISE", "") not in ("", "0")
OUT = Path(os.environ.get("NUMBATTN_TUTORIAL_OUT") or ROOT / "tutorials" / "out")


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
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} values differ by more than "
                             f"atol={atol:g} + rtol={rtol:g}·|{want_label}| (largest |diff| {worst:.2e}):\n"
                             + "\n".join(rows))
    return worst


def breaks(mistake, run):
    """A 'break it' experiment: run() makes `mistake` and a check must fail. Prints what the check said."""
    try:
        run()
    except AssertionError as e:
        first = str(e).splitlines()
        print(f"  break it: {mistake}\n    -> caught: {first[0]}" + "".join(f"\n       {x}" for x in first[1:3]))
        return str(e)
    raise AssertionError(f"break it: {mistake}: no check failed, so the checks do not catch this mistake")


# -------------------------------------------------------------------------------------------------------
# exercises
# -------------------------------------------------------------------------------------------------------
def exercise(number, yours, solution):
    """The function the lesson runs for exercise `number`: yours with --exercise, else the solution."""
    print(f"exercise {number}: running {'YOUR ' + yours.__name__ if EXERCISE else 'the given solution'}"
          + ("" if EXERCISE else " (write yours in the EXERCISE function, then run with --exercise)"))
    return yours if EXERCISE else solution


def check_exercise(number, what, got, want, atol=0.0, rtol=0.0):
    """close() for an exercise's result, labelled 'yours' (or 'solution') against 'expected'."""
    worst = close(f"exercise {number} ({what})", got, want, atol, rtol,
                  got_label="yours" if EXERCISE else "solution", want_label="expected")
    print(f"exercise {number} ({what}): {'yours' if EXERCISE else 'solution'} matches expected "
          f"(largest |diff| {worst:.1e})")


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
    rows = [r for r in benchmarks_table(heading) if where(r)]
    print(f"measured on {device.split(',')[0] or 'the GPU machine'} ({date}), BENCHMARKS.md, {heading.lstrip('# ')}:")
    print(bench.format_table(rows, columns))
    if plot:
        print(f"plot: {ROOT / 'benchmarks' / 'plots' / plot}")
    return rows
