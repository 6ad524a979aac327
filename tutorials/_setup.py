"""Imported first by every lesson (`import _setup`): choose the engine before anything imports numba.cuda.

Numba decides once, when `numba.cuda` is first imported, whether kernels run on a real GPU or in its CUDA
simulator (NUMBA_ENABLE_CUDASIM=1: every CUDA thread becomes a Python thread on the CPU). So the choice has
to be made here, before `import numbattn`, and without importing numba.cuda to ask for a GPU:

    NUMBATTN_TUTORIAL_GPU=1          use the GPU; never turn the simulator on
    NUMBA_ENABLE_CUDASIM already set  respected as it is (0 or 1)
    `nvidia-smi` on the PATH          a GPU is assumed: the simulator stays off
    otherwise                         NUMBA_ENABLE_CUDASIM=1: the kernels run, slowly, on the CPU

It also
  * puts the repository root on sys.path, so `python tutorials/01_naive_attention.py` works from a checkout
    without installing anything;
  * in the simulator, shortens Python's thread switch interval (its barriers wait on it);
  * sets NUMBATTN_STRICT=1 unless you set it: numbattn normally answers with its NumPy reference when a
    kernel fails (a slow answer beats a crash), but a lesson about a kernel must run that kernel, so here a
    failing kernel raises.

In a notebook (VS Code / Jupyter running the `# %%` cells), run the first cell before anything else; if
numba.cuda was already imported in that kernel, the choice made then stands and a warning says so.
"""
import os
import shutil
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _truthy(name):
    return os.environ.get(name, "") not in ("", "0")


def choose_engine():
    """Set NUMBA_ENABLE_CUDASIM if needed -> a one-line reason (printed by the lessons)."""
    if _truthy("NUMBATTN_TUTORIAL_GPU"):
        return "NUMBATTN_TUTORIAL_GPU=1: kernels run on the GPU"
    if "NUMBA_ENABLE_CUDASIM" in os.environ:
        on = _truthy("NUMBA_ENABLE_CUDASIM")
        return f"NUMBA_ENABLE_CUDASIM={os.environ['NUMBA_ENABLE_CUDASIM']} was set: " + \
            ("kernels run in Numba's CUDA simulator" if on else "kernels run on the GPU")
    if shutil.which("nvidia-smi"):
        return "nvidia-smi found: kernels run on the GPU"
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    return "no GPU found: kernels run in Numba's CUDA simulator (slow, so the shapes here are tiny)"


if "numba.cuda" in sys.modules:
    warnings.warn("numba.cuda was imported before tutorials/_setup.py: the GPU/simulator choice made then stands "
                  "(restart the kernel and run the first cell first to change it)", stacklevel=2)
    ENGINE = "numba.cuda already imported: engine unchanged"
else:
    ENGINE = choose_engine()
os.environ.setdefault("NUMBATTN_STRICT", "1")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if _truthy("NUMBA_ENABLE_CUDASIM"):
    # the simulator's barriers wait out Python's thread switch interval (5 ms by default): 0.1 ms is ~5x faster
    sys.setswitchinterval(1e-4)
