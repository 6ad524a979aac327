"""Argument checks shared by the kernel launchers: kernels never see unchecked input.

Every failure is a ValueError naming the argument and its shape or dtype (a list or anything else that is not
a NumPy or Numba device array included).
"""
import numpy as np

from .reference import LOG2E

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (np.float32, np.float16)
MAX_SCALE = float(np.finfo(np.float32).max) / LOG2E         # ~2.36e38: larger is inf once folded in float32


def as_count(name, x):
    """An integer argument (count, length, position) as a Python int: bools, floats and strings are refused, and
    NumPy integers are converted exactly (np.uint64(2**64 - 1) stays 18446744073709551615, never -1)."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise ValueError(f"{name}={x!r} must be an integer")
    return int(x)


def check_dtype(name, x, allowed=DTYPES):
    if np.dtype(x.dtype) not in allowed:             # (a dtype equals its scalar type: np.dtype("f4") == np.float32)
        names = ", ".join(np.dtype(d).name for d in allowed)
        raise ValueError(f"{name} has dtype {np.dtype(x.dtype).name}; expected one of: {names}")


def check_rank(name, x, rank, layout):
    if not isinstance(x, np.ndarray) and not hasattr(x, "copy_to_host"):
        raise ValueError(f"{name} is a {type(x).__name__}; expected a NumPy array or a Numba device array "
                         f"{layout}")
    if len(x.shape) != rank:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {rank} dimensions {layout}")


def check_head_dim(name, head_dim):
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{name} has head_dim {head_dim}; the kernels support {SUPPORTED_HEAD_DIMS}")


def check_heads(q_name, n_heads, kv_name, n_kv_heads):
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"{q_name} has {n_heads} heads, {kv_name} has {n_kv_heads}: "
                         f"n_heads must be a multiple of n_kv_heads (grouped-query attention)")


def check_scale(scale, head_dim):
    """The softmax scale (default 1/sqrt(head_dim)) -> float, checked as the kernels use it: they multiply scores
    by float32(scale * log2(e)) (the NumPy path by float32(scale)), so that must be a finite float32.

    A scale within this limit can still make q.k * scale overflow float32 for large enough q.k (with scale=1e38,
    any |q.k| > 2.4): those rows are NaN, in the kernels and the NumPy reference alike, as in any float32
    attention."""
    value = 1.0 / np.sqrt(head_dim) if scale is None else scale
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"scale={scale!r} must be a number") from None
    if not abs(value) <= MAX_SCALE:        # NaN fails this too
        raise ValueError(f"scale={value!r} must be a finite number of magnitude <= {MAX_SCALE:.4g}: the kernels "
                         f"compute in float32 and multiply the scale by log2(e) = {LOG2E:.4f}")
    return value


def check_window(window, causal=True):
    """A sliding window (None: unlimited) -> None or an int >= 1; a window needs causal attention."""
    if window is None:
        return None
    window = as_count("window", window)
    if window < 1:
        raise ValueError(f"window={window} must be >= 1 (a query sees itself and the window - 1 keys before it), "
                         f"or None for no window")
    if not causal:
        raise ValueError(f"window={window} needs causal=True (a sliding window is a causal mask's lower bound)")
    return window


def check_softcap(softcap):
    """The logit soft cap (None: none) -> None or a float > 0 that stays finite once the kernels fold in log2 e."""
    if softcap is None:
        return None
    try:
        value = float(softcap)
    except (TypeError, ValueError):
        raise ValueError(f"softcap={softcap!r} must be a number (or None)") from None
    if not 0 < value <= MAX_SCALE:        # NaN fails this too
        raise ValueError(f"softcap={value!r} must be a finite number > 0 of magnitude <= {MAX_SCALE:.4g} "
                         f"(or None for no cap)")
    return value


def check_qkv(q, k, v, causal):
    """Validate prefill inputs q [b, h, q_len, d], k, v [b, h_kv, kv_len, d]."""
    layout = "[batch, n_heads, seq_len, head_dim]"
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(name, x, 4, layout)
        check_dtype(name, x)
    if np.dtype(k.dtype) != np.dtype(v.dtype):
        raise ValueError(f"k has dtype {np.dtype(k.dtype).name} but v has {np.dtype(v.dtype).name}")
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; they must match")
    b, h, q_len, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"q has batch {b} (shape {tuple(q.shape)}) but k has batch {k.shape[0]} "
                         f"(shape {tuple(k.shape)})")
    if k.shape[3] != d:
        raise ValueError(f"q has head_dim {d} (shape {tuple(q.shape)}) but k has head_dim {k.shape[3]} "
                         f"(shape {tuple(k.shape)})")
    check_head_dim("q", d)
    check_heads("q", h, "k", k.shape[1])
    kv_len = k.shape[2]
    if q_len < 1 or kv_len < 1 or b < 1:
        raise ValueError(f"empty input: q has shape {tuple(q.shape)}, k has shape {tuple(k.shape)}")
    if causal and q_len > kv_len:
        raise ValueError(f"causal attention needs q_len <= kv_len (bottom-right aligned mask); "
                         f"q has q_len {q_len} (shape {tuple(q.shape)}), k has kv_len {kv_len}")
