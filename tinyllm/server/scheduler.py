"""Continuous batching: one thread runs the model for every request, a decode step over all of them at a time.

    scheduler = Scheduler(llm, max_seqs=32, max_queue=64)
    job = scheduler.submit(prompt_ids, max_new=64, sampler=Sampler(...), on_event=callback)
    job.cancel()                          # a client went away: its pages are freed at the next step

The loop (Orca's iteration-level scheduling, Yu et al. 2022; vLLM's continuous batching), one iteration:

    1. admit    waiting requests join while a sequence seat is free and the page pool can promise them the pages for
                prompt + max_new tokens (pages are allocated as the sequence grows, but promised up front, so no
                running request can run out mid-reply and nothing needs preempting)
    2. prefill  ONE chunk (the engine's prefill_chunk tokens) of the oldest request whose prompt is not in yet: a
                long prompt is spread over several iterations instead of stalling everyone's next token
    3. decode   one token for every request past its prompt, all in one forward (Llama.forward_rows: row b its
                own sequence in the paged cache, at its own position)
    4. leave    a request that sampled a stop token, reached max_new, or was cancelled frees its pages

Events go back through on_event(kind, value), called from this thread: ("token", id) per token, then ("done",
finish_reason) with "stop" or "length", or ("error", message). A step that fails (NaN logits, a kernel error) ends
the requests it ran with an error and frees their pages; the others go on. The queue of waiting requests is bounded
(submit raises Busy past max_queue): memory never grows with the number of clients.
"""
import collections
import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from ..generate import NonFiniteLogitsError, finite

log = logging.getLogger("tinyllm.server")
DEFAULT_KV_BYTES = 4 * 2**30    # the page pool, unless asked otherwise: every seat a full context, up to this much


class Busy(RuntimeError):
    """The waiting queue is full: the caller should come back later."""


@dataclass(eq=False)
class Job:
    """One request as the scheduler sees it."""
    prompt: list
    max_new: int
    sampler: object
    stop_ids: frozenset
    on_event: object
    seq: int = -1                 # its sequence in the paged cache, once admitted
    fed: int = 0                  # prompt tokens prefilled so far
    tokens: list = field(default_factory=list)
    cancelled: bool = False

    def cancel(self):
        """Stop generating (any thread); the scheduler frees the pages at its next step."""
        self.cancelled = True


class Scheduler:
    """The model's only user once serving: a thread that admits, prefills and decodes (see the module docstring)."""

    def __init__(self, llm, max_seqs=32, max_queue=64, n_blocks=None, block_size=16):
        pages_per_seq = -(-llm.max_len // block_size)
        c = llm.config
        page_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * llm.kv_dtype.itemsize * block_size
        n_blocks = n_blocks or max(pages_per_seq, min(max_seqs * pages_per_seq, DEFAULT_KV_BYTES // page_bytes))
        if n_blocks < pages_per_seq:
            raise ValueError(f"{n_blocks} KV pages of {block_size} tokens cannot hold one full context of "
                             f"{llm.max_len} tokens ({pages_per_seq} pages)")
        self.llm, self.max_queue = llm, max_queue
        self.ops = llm.paged_engine(max_seqs, n_blocks, block_size)
        self.cache = self.ops.cache
        self.waiting, self.running = collections.deque(), []
        self.counts = collections.Counter()
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="tinyllm-scheduler", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout=10.0):
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout)

    def stats(self):
        return dict(requests_running=len(self.running), requests_waiting=len(self.waiting),
                    kv_blocks_free=self.cache.free_blocks, kv_blocks_total=self.cache.n_blocks,
                    kv_block_size=self.cache.block_size, max_seqs=self.cache.max_seqs,
                    requests_done=self.counts["done"], requests_cancelled=self.counts["cancelled"],
                    requests_failed=self.counts["failed"], largest_decode_batch=self.counts["largest_batch"])

    def submit(self, prompt, max_new, sampler, on_event, stop_ids=frozenset()):
        """Queue a request -> Job. Busy if max_queue requests are waiting already."""
        if not 1 <= len(prompt) < self.llm.max_len or not 1 <= max_new <= self.llm.max_len - len(prompt):
            raise ValueError(f"a prompt of {len(prompt)} tokens and {max_new} new ones do not fit the context of "
                             f"{self.llm.max_len}")
        job = Job(list(prompt), int(max_new), sampler, frozenset(stop_ids), on_event)
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                raise Busy(f"{len(self.waiting)} requests are waiting already (the queue holds {self.max_queue})")
            self.waiting.append(job)
            self._wake.notify()
        return job

    # ---- the loop ---------------------------------------------------------------------------------------
    def _loop(self):
        while True:
            with self._wake:
                while not self._stop and not self.running and not self.waiting:
                    self._wake.wait()
                if self._stop:
                    return
            self._leave([j for j in self.running if j.cancelled], "cancelled")
            self._admit()
            self._prefill_chunk()
            self._decode_step()

    def _promised(self):
        """Pages the running requests may still claim."""
        return sum(self.cache.pages_for(len(j.prompt) + j.max_new) - len(self.cache.pages(j.seq))
                   for j in self.running)

    def _admit(self):
        with self._wake:
            for job in [j for j in self.waiting if j.cancelled]:
                self.waiting.remove(job)
                self.counts["cancelled"] += 1
            while self.waiting and len(self.running) < self.cache.max_seqs:
                job = self.waiting[0]
                if self.cache.free_blocks - self._promised() < self.cache.pages_for(len(job.prompt) + job.max_new):
                    break                               # it waits (in order) until pages come back
                taken = {j.seq for j in self.running}
                job.seq = next(s for s in range(self.cache.max_seqs) if s not in taken)
                self.running.append(self.waiting.popleft())

    def _prefill_chunk(self):
        job = next((j for j in self.running if j.fed < len(j.prompt)), None)
        if job is None:
            return
        part = job.prompt[job.fed:job.fed + self.ops.prefill_chunk]
        try:
            self.cache.allocate(job.seq, job.fed + len(part))
            logits = self.llm.forward_rows(self.ops, np.array([part]), [job.seq])[0, -1]
            job.fed += len(part)
            if job.fed == len(job.prompt):
                self._take(job, finite(logits, job.fed - 1))
        except Exception as e:                          # noqa: BLE001 (the thread must outlive any step)
            self._fail([job], e)

    def _decode_step(self):
        jobs = [j for j in self.running if j.tokens and j.fed == len(j.prompt)]
        if not jobs:
            return
        try:
            for j in jobs:
                self.cache.allocate(j.seq, len(j.prompt) + len(j.tokens))
            ids = np.array([[j.tokens[-1]] for j in jobs])
            logits = self.llm.forward_rows(self.ops, ids, [j.seq for j in jobs])[:, -1]     # [batch, vocab]
            self.counts["largest_batch"] = max(self.counts["largest_batch"], len(jobs))
        except Exception as e:                          # noqa: BLE001
            self._fail(jobs, e)
            return
        ok, argmax = np.isfinite(logits).all(axis=1), np.argmax(logits, axis=1)     # the whole batch at once
        for j, row, fine, best in zip(jobs, logits, ok, argmax):
            try:
                self._take(j, row if fine else finite(row, len(j.prompt) + len(j.tokens) - 1), int(best))
            except NonFiniteLogitsError as e:
                self._fail([j], e)

    def _take(self, job, logits, best=None):
        """Sample the job's next token (greedy: `best`, the row's argmax, if given), tell its client, and let it
        leave if it is done."""
        s = job.sampler
        greedy = best is not None and s.temperature == 0 and s.repetition_penalty == 1.0
        token = best if greedy else s(logits, job.prompt + job.tokens)
        job.tokens.append(token)
        job.on_event("token", token)
        if token in job.stop_ids:
            self._leave([job], "done", "stop")
        elif len(job.tokens) == job.max_new:
            self._leave([job], "done", "length")

    def _leave(self, jobs, outcome, reason=None):
        for job in jobs:
            if job in self.running:
                self.running.remove(job)
                self.cache.free(job.seq)
                self.counts[outcome] += 1
                if outcome == "done":
                    job.on_event("done", reason)

    def _fail(self, jobs, error):
        log.warning("tinyllm serve: a step failed for %d request(s): %s", len(jobs), error)
        self._leave(jobs, "failed")
        for job in jobs:
            job.on_event("error", str(error).splitlines()[0] if str(error) else type(error).__name__)
