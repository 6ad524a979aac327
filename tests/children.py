"""The environment of a child process that a test starts: this checkout first on PYTHONPATH, then whatever the test
runner had there (a runner whose packages are found through PYTHONPATH, as on the GPU machine, passes them on),
and the test's own variables.

    subprocess.run([...], env=child_env(NUMBA_ENABLE_CUDASIM="1"))
"""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child_env(**extra):
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **extra)
