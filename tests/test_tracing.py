"""numbattn/lab/tracing.py: the counted global-memory accesses of the real prefill kernels and of the default decode
kernel equal the formulas; shared-memory accesses are counted too, and a missing barrier is found as a race on every
run (not by luck of the schedule).

Every count here is exact (a lost update between simulated threads, a view counted against the wrong index,
or a host access counted as a kernel's would change it). Shapes are tiny: the simulator runs one Python
thread per CUDA thread.
"""
import numpy as np
import pytest
from numba import cuda

from numbattn import prefill, reference
from numbattn.lab import bench, tracing
from numbattn.prefill import Tiles

pytestmark = pytest.mark.skipif(tracing._backend.probe()[0][0] != "sim", reason="tracing runs in the simulator")

D = 16


def last_key(i, q_len, kv_len, causal):
    """The last key query row i sees (bottom-right causal alignment, as numbattn.reference.causal_mask)."""
    return min(kv_len - 1, i + kv_len - q_len) if causal else kv_len - 1


def tile_rows(q0, block_m, q_len, kv_len, block_n, causal):
    """Key rows a tiled kernel's block starting at query row q0 loads: whole key tiles up to its last row's
    last key, clipped to kv_len (the tiles above the causal diagonal are skipped)."""
    last = last_key(min(q0 + block_m, q_len) - 1, q_len, kv_len, causal)
    kv_end = min(kv_len, -(-(last + 1) // block_n) * block_n)
    return list(range(kv_end))


CASES = [  # (n_heads, n_kv_heads, q_len, kv_len, causal)
    (2, 1, 8, 8, False),
    (2, 1, 9, 9, True),      # ragged last query tile
    (4, 2, 6, 13, True),     # GQA, fewer queries than keys: bottom-right diagonal
    (2, 2, 5, 11, False),
]


def qkv(n_heads, n_kv_heads, q_len, kv_len, seed=0):
    return bench.random_qkv(1, q_len, kv_len, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=D, seed=seed)


@pytest.mark.parametrize("n_heads, n_kv_heads, q_len, kv_len, causal", CASES)
def test_v0_reads_every_key_once_per_query_row(n_heads, n_kv_heads, q_len, kv_len, causal):
    q, k, v = qkv(n_heads, n_kv_heads, q_len, kv_len)
    out, tr = tracing.trace_prefill(q, k, v, causal=causal, version="v0")
    np.testing.assert_allclose(out, reference.attention(q, k, v, causal=causal), atol=1e-5)
    keys_seen = sum(last_key(i, q_len, kv_len, causal) + 1 for i in range(q_len))    # per query head
    assert tr.reads("k") == tr.reads("v") == n_heads * keys_seen * D
    assert tr.reads("q") == n_heads * keys_seen * D        # q[i, d] is loaded again for every key
    assert tr.writes("out") == n_heads * q_len * D and tr.reads("out") == 0
    assert tr.writes("k") == tr.writes("v") == tr.writes("q") == 0
    # query head h reads only its own KV head h // group, and query row i exactly keys 0..last_key(i)
    group = n_heads // n_kv_heads
    for h in range(n_heads):
        for i in range(q_len):
            block, thread = (i // prefill.SIM_TILES["v0"].block_m, h, 0), (i % prefill.SIM_TILES["v0"].block_m,)
            read = tr.elements("k", block=block, thread=thread)
            want = {(0, h // group, j, d): 1 for j in range(last_key(i, q_len, kv_len, causal) + 1) for d in range(D)}
            assert dict(read) == want, f"head {h} row {i}"


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("n_heads, n_kv_heads, q_len, kv_len, causal", CASES)
def test_tiled_kernels_read_each_kv_element_once_per_query_tile(version, n_heads, n_kv_heads, q_len, kv_len, causal):
    q, k, v = qkv(n_heads, n_kv_heads, q_len, kv_len, seed=1)
    tiles = prefill.SIM_TILES[version]
    out, tr = tracing.trace_prefill(q, k, v, causal=causal, version=version, tiles=tiles)
    np.testing.assert_allclose(out, reference.attention(q, k, v, causal=causal), atol=1e-5)
    group = n_heads // n_kv_heads
    q_tiles = range(0, q_len, tiles.block_m)
    for name in ("k", "v"):
        rows = tr.rows(name, axis=2)
        assert set(rows) == {(q0 // tiles.block_m, h, 0) for q0 in q_tiles for h in range(n_heads)}
        for (bx, h, _), counts in rows.items():
            want = tile_rows(bx * tiles.block_m, tiles.block_m, q_len, kv_len, tiles.block_n, causal)
            assert sorted(counts) == want, f"{name}: block {bx} of head {h} read key rows {sorted(counts)}"
            assert set(counts.values()) == {D}, f"{name}: block {bx} of head {h} read some row more than once"
            read = tr.elements(name, block=(bx, h, 0))
            assert {idx[1] for idx in read} == {h // group}, "a query head read another group's KV head"
        total = sum(len(tile_rows(q0, tiles.block_m, q_len, kv_len, tiles.block_n, causal)) for q0 in q_tiles)
        assert tr.reads(name) == n_heads * total * D
    # Q read once and out written once, per element
    assert tr.elements("q") == {(0, h, i, d): 1 for h in range(n_heads) for i in range(q_len) for d in range(D)}
    assert tr.elements("out", "write") == {(0, h, i, d): 1 for h in range(n_heads) for i in range(q_len)
                                           for d in range(D)}


def test_causal_skips_the_tiles_above_the_diagonal():
    """16 x 16 causal in 4 x 4 tiles: query tile t loads key tiles 0..t, i.e. 1 + 2 + 3 + 4 = 10 of 16."""
    q, k, v = qkv(1, 1, 16, 16, seed=2)
    _, full = tracing.trace_prefill(q, k, v, causal=False, version="v1", tiles=Tiles(4, 4, 4))
    _, causal = tracing.trace_prefill(q, k, v, causal=True, version="v1", tiles=Tiles(4, 4, 4))
    assert full.reads("k") == 4 * 16 * D
    assert causal.reads("k") == 10 * 4 * D
    assert {bx: sorted({j // 4 for j in c}) for (bx, _, _), c in causal.rows("k", axis=2).items()} == \
        {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3]}


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_a_sliding_window_skips_the_tiles_before_it(version):
    """24 causal queries, window 5, query tiles of 4 (v1) or 16 (v3) rows, key tiles of 4 or 8: a block loads the
    key tiles from its first row's window start (p - 4) to its last row's diagonal, never one before (skipped, not
    masked), so it reads O(rows + window) keys, not O(n); and its answer is the windowed attention's."""
    q, k, v = qkv(1, 1, 24, 24, seed=4)
    tiles = prefill.SIM_TILES[version]
    out, tr = tracing.trace_prefill(q, k, v, causal=True, version=version, tiles=tiles, window=5)
    np.testing.assert_allclose(out, reference.attention(q, k, v, causal=True, window=5), atol=1e-5)
    for (bx, _, _), counts in tr.rows("k", axis=2).items():
        q0, q1 = bx * tiles.block_m, min(24, (bx + 1) * tiles.block_m)
        first, last = max(0, q0 - 4), q1 - 1
        want = [j for j in range(first, min(24, first + -(-(last + 1 - first) // tiles.block_n) * tiles.block_n))]
        assert sorted(counts) == want, f"block {bx} read key rows {sorted(counts)}"
    if version == "v1":
        assert tr.reads("k") < 0.6 * tracing.trace_prefill(q, k, v, causal=True, version="v1")[1].reads("k")


def test_v1_cooperative_load_owner_map():
    """v1 copies element idx of a K tile with thread idx % threads: the owner of K_tile[r, c] is (r*D + c) % 4."""
    q, k, v = qkv(1, 1, 4, 4, seed=3)
    _, tr = tracing.trace_prefill(q, k, v, version="v1", tiles=Tiles(4, 4, 4))
    owners = tr.threads("k", block=(0, 0, 0))
    assert owners == {(0, 0, r, c): [(r * D + c) % 4] for r in range(4) for c in range(D)}


@cuda.jit
def _gather_rows(a, idx, out):
    """Thread t of block b: out[b, t] = a[b][idx[t]] twice (a row view, then two reads of one element)."""
    b, t = cuda.blockIdx.x, cuda.threadIdx.x
    row = a[b]
    out[b, t] = row[idx[t]] + row[idx[t]]


def test_views_repeats_and_threads_are_counted_exactly():
    tr = tracing.Tracer()
    a = np.arange(3 * 5, dtype=np.float32).reshape(3, 5)
    idx = np.array([4, 0, 4, 2], np.int32)
    out = np.zeros((3, 4), np.float32)
    ta, ti, to = tr.wrap(a=a, idx=idx, out=out)
    a_host = ta[1, 2] + ta.copy_to_host().sum()         # host accesses: allowed, not counted
    _gather_rows[3, 4](ta, ti, to)
    assert a_host == 7 + a.sum() and np.array_equal(out, 2 * a[:, idx])
    assert tr.reads("a") == 3 * 4 * 2 and tr.reads("idx") == 3 * 4 * 2 and tr.writes("out") == 12
    assert tr.elements("a", block=(1,)) == {(1, 4): 4, (1, 0): 2, (1, 2): 2}       # the view's reads land on a
    assert tr.elements("a", block=(2,), thread=(1,)) == {(2, 0): 2}
    assert tr.blocks("out", "write") == {(0, 0, 0): 4, (1, 0, 0): 4, (2, 0, 0): 4}
    assert tr.threads("a", block=(0,)) == {(0, 4): [0, 2], (0, 0): [1], (0, 2): [3]}


def test_clear_errors():
    tr = tracing.Tracer()
    with pytest.raises(TypeError, match="not supported"):
        tr.wrap(a=np.zeros((2, 3)))[0, 1:]
    with pytest.raises(TypeError, match="expected a NumPy array"):
        tr.wrap(a=[1, 2, 3])


def test_simulator_only(monkeypatch):
    monkeypatch.setattr(tracing._backend, "probe", lambda: (["numpy"], "numba.cuda could not be imported"))
    with pytest.raises(RuntimeError, match="simulator only.*'numpy'"):
        tracing.Tracer()


def test_shared_memory_is_counted_per_thread_and_the_real_kernels_have_no_races():
    """v1, 8 x 8 in 4 x 4 tiles (2 query blocks x 2 key tiles): each block writes Q once and a K tile per key tile;
    each thread reads its Q row and every K row once per key (d values each). No shared element is written by one
    thread and touched by another between the same two barriers."""
    q, k, v = qkv(1, 1, 8, 8, seed=5)
    out, tr = tracing.trace_prefill(q, k, v, version="v1", tiles=Tiles(4, 4, 4), shared=True)
    np.testing.assert_allclose(out, reference.attention(q, k, v), atol=1e-5)
    assert tr.shared_names == {"Qs", "Ks", "Vs"}
    assert tr.writes("Qs") == 2 * 4 * D and tr.writes("Ks") == tr.writes("Vs") == 2 * 2 * 4 * D
    assert set(tr.per_thread("Ks").values()) == set(tr.per_thread("Qs").values()) == {8 * D}
    assert tr.hazards() == []
    assert tracing.trace_prefill(q, k, v, version="v1", tiles=Tiles(4, 4, 4))[1].shared_names == set()


def _tile_sums(first_barrier, second_barrier):
    """out[t] = sum of k, through 4-element shared tiles that 4 threads load together (barriers as asked)."""
    @cuda.jit
    def tile_sums(k, out):
        t = cuda.threadIdx.x
        Ks = cuda.shared.array(4, np.float32)
        total = 0.0
        for j0 in range(0, k.shape[0], 4):
            if first_barrier:
                cuda.syncthreads()
            Ks[t] = k[j0 + t]
            if second_barrier:
                cuda.syncthreads()
            for jj in range(4):
                total += Ks[jj]
        out[t] = total
    return tile_sums


@pytest.mark.parametrize("first, second, intervals", [(True, True, None), (True, False, {1, 2}), (False, True, {1})])
def test_a_missing_barrier_is_a_race_on_every_run(first, second, intervals):
    """Without the barrier between the load and the use, thread t reads Ks[j] that thread j writes in the same
    barrier interval (read after write); without the one before the load, thread t overwrites Ks[t] while the
    others may still read the previous tile (write after read). Found from the intervals, not from the answer."""
    k = np.arange(8, dtype=np.float32)
    out = np.zeros(4, np.float32)
    tr = tracing.Tracer()
    tk, tout = tr.wrap(k=k, out=out)
    with tr.shared():
        _tile_sums(first, second)[1, 4](tk, tout)
    hazards = tr.hazards()
    if intervals is None:
        assert hazards == [] and (out == k.sum()).all()
        return
    assert {h.index for h in hazards} == {(0,), (1,), (2,), (3,)} and {h.name for h in hazards} == {"Ks"}
    assert {h.interval for h in hazards} == intervals     # load and use of both tiles / the second load
    assert all(h.writers == [h.index[0]] and set(h.readers) - {h.index[0]} for h in hazards)


def test_the_default_decode_kernel_reads_the_cache_once():
    """decode v1, rows of 11 and 5 tokens, 4 query heads over 2 KV heads, splits of 4: every K and V word of the
    visible tokens is read once (GQA: once for the group, not per query head), nothing past a row's length; each
    split writes its partial (D + 2 values per head) once; no shared-memory race."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, D), dtype=np.float32)
    k, v = (rng.standard_normal((2, 2, 12, D), dtype=np.float32) for _ in range(2))
    out, tr = tracing.trace_decode(q, k, v, [11, 5], shared=True)
    np.testing.assert_allclose(out, reference.decode_attention(q, k, v, [11, 5]), atol=1e-5)
    words = D // tr.values_per_word
    for name in ("k", "v"):
        assert tr.elements(name) == {(b, hk, j, w): 1 for b, n in ((0, 11), (1, 5)) for hk in range(2)
                                     for j in range(n) for w in range(words)}
    splits = -(-11 // 4) + -(-5 // 4)                       # 3 + 2 split blocks per KV head
    assert tr.writes("part") == splits * 2 * 2 * (D + 2)    # x 2 KV heads x 2 query heads each
    assert tr.hazards() == []


@cuda.jit
def _slices(out):
    """Thread t writes its element of a shared row, then (after a barrier) thread 0 reads the row as a slice and
    writes two elements through a slice (the MMA twin's exchange reads its scratch this way)."""
    t = cuda.threadIdx.x
    row = cuda.shared.array(4, np.float32)
    row[t] = t
    cuda.syncthreads()
    if t == 0:
        out[0] = np.asarray(row[0:4]).sum()
        row[1:3] = 0.0


def test_slices_of_shared_arrays_count_every_element():
    tr = tracing.Tracer()
    out = np.zeros(1, np.float32)
    with tr.shared():
        _slices[1, 4](tr.wrap(out=out))
    assert out[0] == 6 and tr.shared_names == {"row"}
    assert tr.per_thread("row") == {((0, 0, 0), (0, 0, 0)): 4}
    assert tr.writes("row") == 4 + 2 and tr.hazards() == []

