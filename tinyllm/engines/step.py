"""Step: what one forward call is, passed to every op that needs it (the engines keep no per-call state)."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One forward call: ids [batch, seq] at positions start_pos .. start_pos + seq - 1; last_only: the logits of
    the last position only. max_length: a bound on the context that the decode launch's grid is sized for (the
    device engine's graph bucket, so that a captured step stays right as the context grows; None: the cache's
    current length). defer_logits: the device engine's padded short prompts: logits() computes nothing, the
    engine takes the logits of the real last tokens itself after the forward.

    Over a paged KV cache (the server's continuous batching) the rows are independent sequences: rows[b] is the
    sequence row b continues (-1: a padding row) and positions[b] the position of its first new token (each row's
    own; start_pos is unused). Both are host int arrays [batch]; None for a contiguous cache."""
    batch: int
    seq: int
    start_pos: int
    last_only: bool
    max_length: int | None = None
    defer_logits: bool = False
    rows: object = None
    positions: object = None
