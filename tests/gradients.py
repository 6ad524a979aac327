"""Finite differences for the gradient tests (tests/test_backward.py, tests/test_train.py): the check that does not
trust a derivation."""
import numpy as np


def numerical_gradient(f, x, eps=1e-6):
    """d f() / d x by central differences, element by element, x changed in place and restored (fp64, tiny x)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        up = f()
        x[i] = old - eps
        g[i] = (up - f()) / (2 * eps)
        x[i] = old
    return g
