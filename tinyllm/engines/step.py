"""Step: what one forward call is, passed to every op that needs it (the engines keep no per-call state)."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One forward call: ids [batch, seq] at positions start_pos .. start_pos + seq - 1; last_only: the logits of
    the last position only. max_length: a bound on the context that the decode launch's grid is sized for (the
    device engine's graph bucket, so that a captured step stays right as the context grows; None: the cache's
    current length). defer_logits: the device engine's padded short prompts: logits() computes nothing, the
    engine takes the logits of the real last tokens itself after the forward."""
    batch: int
    seq: int
    start_pos: int
    last_only: bool
    max_length: int | None = None
    defer_logits: bool = False
