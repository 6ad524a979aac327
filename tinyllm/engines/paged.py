"""The two engines over a paged KV cache: each batch row its own sequence, at its own position (continuous batching).

The server (tinyllm/server/) keeps many conversations in one numbattn.PagedKVCache and runs them together: a decode
step is one forward over the running sequences, row b continuing sequence rows[b] at its own length, and a prompt
is prefilled in chunks between those steps. The forward is model.py's, unchanged; only four ops differ, and only in
where positions and K/V come from (Step.rows, Step.positions):

    rope        each row rotated by its own positions (NumPy: per-row cos/sin; device: read from the lengths)
    attention   append K/V through the block tables; one token per row: numbattn.paged_decode_attention over the
                batch in one launch; a prompt chunk (one sequence): its pages gathered, then the prefill kernel
    run_rows    the call itself: forward(ids, Step(rows=..., positions=...)); on a GPU, decode steps replayed as
                CUDA graphs per (batch bucket, context bucket), padding rows -1 filling the bucket
"""
import numpy as np

import numbattn
from numbattn import backend as _backend
from numbattn import reference
from numbattn.kernels import paged_append, rowwise

from .device import DeviceEngine, _prefix
from .host import NumpyEngine, merge_heads
from .step import Step

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)     # decode graphs are captured per batch bucket (padded up)


def row_positions(cache, rows):
    """The position of each row's next token: the tokens its sequence holds (0 for a padding row)."""
    rows = np.asarray(rows)
    return np.where(rows >= 0, cache.seq_lengths()[np.maximum(rows, 0)], 0)


class PagedNumpyEngine(NumpyEngine):
    """NumpyEngine over a PagedKVCache: NumPy matmuls, attention on numbattn's paged kernels or its reference."""
    prefill_chunk = 64

    def rope(self, q, k, step, layer):
        if step.rows is None:
            return super().rope(q, k, step, layer)
        cos, sin = self.rope_tables[self.arch.layers[layer].rope]
        positions = np.asarray(step.positions)[:, None] + np.arange(step.seq)        # [b, seq]
        cos, sin = cos[positions][:, None], sin[positions][:, None]                 # [b, 1, seq, head_dim / 2]
        return reference.rope(q, cos, sin), reference.rope(k, cos, sin)

    def attention(self, layer, q, k, v, step):
        """Append k, v through the block tables; one token per row: the paged decode kernel over the batch; a
        chunk: each row's sequence gathered and attended to with the bottom-right causal mask. -> [b, s, H*D]"""
        rows = np.asarray(step.rows)
        self.cache.append(layer, rows, k, v)
        scale, softcap = self.arch.attn_scale, self.arch.attn_softcap
        if step.seq == 1:
            out = numbattn.paged_decode_attention(np.ascontiguousarray(q[:, :, 0]), self.cache, layer, rows,
                                                  scale=scale, softcap=softcap)
            return merge_heads(_backend.to_host(out)[:, :, None, :])                  # [b, 1, H * d]
        outs = []
        for b, seq in enumerate(rows):
            k_all, v_all = self.cache.gather(layer, int(seq))                        # [1, n_kv_heads, n, d]
            outs.append(_backend.to_host(numbattn.attention(q[b:b + 1], k_all, v_all, causal=True, scale=scale,
                                                            softcap=softcap, backend=self.backend)))
        return merge_heads(np.concatenate(outs))

    def run_rows(self, forward, ids, rows, last_only):
        rows = self.cache.check_rows(rows, ids.shape[0])
        step = Step(ids.shape[0], ids.shape[1], 0, last_only, rows=rows, positions=row_positions(self.cache, rows))
        return forward(ids, step)


class PagedDeviceEngine(DeviceEngine):
    """DeviceEngine over a PagedKVCache: the paged RoPE-append and decode kernels, graphs per batch bucket."""
    prefill_chunk = 256         # a long prompt is prefilled 256 tokens per step, between the others' decode steps

    def __init__(self, config, arch, weights, cache, rope, backend):
        super().__init__(config, arch, weights, cache, rope, backend)
        from numba import cuda
        self.rows_host = cuda.pinned_array(cache.max_seqs, np.int32)
        self.rows_dev = cuda.device_array(cache.max_seqs, np.int32, stream=self.stream)
        self.gathered = [cuda.device_array((1, self.HKV, cache.max_len, self.D), cache.dtype, stream=self.stream)
                         for _ in range(2)]          # one sequence's K and V, contiguous, for a prefill chunk

    def sizes(self, cache):
        return cache.max_seqs, max(cache.max_seqs, self.prefill_chunk)

    def embed(self, ids):
        """The step's token ids and its rows go to the device together (inside a captured graph too)."""
        B = ids.shape[0]
        rows = self._rows_view(B)
        rows.copy_to_device(self.rows_host[:B] if B != len(self.rows_host) else self.rows_host, stream=self.stream)
        return super().embed(ids)

    def _rows_view(self, B):
        key = ("rows", B)
        if key not in self._views:
            self._views[key] = self.rows_dev[:B]
        return self._views[key]

    def attention(self, layer, q, k, v, step):
        """The q/k/v projection (the GEMV's RoPE-and-append epilogue writes a contiguous cache: not here), paged
        RoPE + append (one kernel), then the paged decode kernel, or (a prompt chunk of one sequence) its pages
        gathered and the prefill kernel over them."""
        B, s = step.batch, step.seq
        pending = q.qkv
        rows, qkv = self._rows_view(B), self._project(pending, B * s)
        if self.arch.qkv_bias or pending.norms:
            self._finish_qkv(layer, pending, qkv)
        cache = self.cache
        self.launch(("rope paged", layer, B * s), paged_append.make_rope_append_paged(self.H, self.HKV, self.D),
                    rowwise.rope_append_grid(s, B), rowwise.THREADS,
                    (qkv,) + pending.table + (cache.k(layer), cache.v(layer), cache.device_tables(), rows,
                                              cache.device_lengths(layer), cache.append_counters(layer)))
        cache.advance(step.rows, s, layer)
        attn = self.view("attn", B * s)
        if s == 1:
            q3, out3 = self._decode_views(B)
            numbattn.paged_decode_attention(q3, cache, layer, rows, scale=self.arch.attn_scale, out=out3,
                                            stream=self.stream, softcap=self.arch.attn_softcap,
                                            max_length=step.max_length or self._bucket(int(step.positions.max()) + 1))
        else:
            self._chunk_attention(layer, qkv, attn, step)
        return attn

    def _chunk_attention(self, layer, qkv, attn, step):
        if step.batch != 1:
            raise ValueError(f"a prompt chunk of {step.batch} sequences: the paged device engine prefills one at a "
                             f"time")
        seq, n, s = int(step.rows[0]), int(step.positions[0]) + step.seq, step.seq
        k_all, v_all = (_prefix(x, n) for x in self.gathered)
        grid = (-(-n * self.D // 256), self.HKV)
        self.launch(("gather", layer, n), paged_append.gather_pages, grid, 256 if self.backend == "cuda" else 16,
                    (self.cache.k(layer), self.cache.v(layer), self._table_view(seq), k_all, v_all))
        self._causal_prefill(*self._query_views(qkv, attn, 1, s), k_all, v_all)

    def _table_view(self, seq):
        key = ("table", seq)
        if key not in self._views:
            self._views[key] = self.cache.device_tables()[seq]
        return self._views[key]

    def run_rows(self, forward, ids, rows, last_only):
        """forward over rows of a paged cache -> host logits [b, s|1, vocab]. A decode step on a GPU runs padded to
        its batch bucket (rows -1), as a CUDA graph from its second time in a (batch, context) bucket on."""
        B, s = ids.shape
        rows = self.cache.check_rows(rows, B)
        positions = row_positions(self.cache, rows)
        if s > self.prefill_chunk or B > self.cache.max_seqs:
            raise ValueError(f"{B} rows of {s} tokens: this engine holds {self.cache.max_seqs} rows and "
                             f"{self.prefill_chunk} tokens per prompt chunk")
        if not (self.use_graphs and s == 1):
            self.rows_host[:B] = rows
            logits = forward(ids, Step(B, s, 0, last_only, rows=rows, positions=positions))
            self.stream.synchronize()
            return np.array(logits)[:B]
        return self._replay_decode(forward, ids, rows, positions)[:B]

    def _replay_decode(self, forward, ids, rows, positions):
        """A decode step padded to its batch bucket, through DeviceEngine._replay_or_run (the one graph logic)."""
        B = ids.shape[0]
        bucket_b = min(next(b for b in BATCH_BUCKETS if b >= B), self.cache.max_seqs)
        context = self._bucket(int(positions.max()) + 1)
        pad = bucket_b - B
        ids = np.concatenate([ids, np.zeros((pad, 1), ids.dtype)])
        rows = np.concatenate([rows, np.full(pad, -1, np.int32)])
        positions = np.concatenate([positions, np.zeros(pad, positions.dtype)])
        self.rows_host[:bucket_b] = rows
        step = Step(bucket_b, 1, 0, True, max_length=context, rows=rows, positions=positions)
        self._replay_or_run(("paged", bucket_b, context), forward, ids, step)
        return self._host_logits()

    def _advance_mirror(self, step):
        self.cache.advance(step.rows, step.seq)
