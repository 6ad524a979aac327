"""Prefill attention v3: FlashAttention-2 on tensor cores, at fp32 accuracy (3xTF32).

What v3 changes over v2 (kernels/prefill_registers.py), and why
---------------------------------------------------------
v2 runs both products of a tile, S = Q K^T and O += P V, as fp32 FMAs on the SIMT cores: at best ~67 TFLOP/s
on an H100, and it reached 15.5 TFLOP/s at n = 4096 (causal), bound by shared-memory loads. Tensor cores
multiply far faster, but not in fp32: their closest format is TF32 (fp32's 8-bit exponent, 10-bit mantissa),
whose rounding (2^-11 relative) would cost attention three decimal digits. 3xTF32 gets them back (this is
what torch's memory-efficient fp32 kernel does, through CUTLASS's OpMultiplyAddFastF32): split each operand
x = big + small with big = tf32(x) and small = tf32(x - big), and compute

    A B  ~  A_small B_big + A_big B_small + A_big B_big          (A_small B_small, ~2^-22, is dropped)

with three TF32 MMAs accumulating in fp32: relative error ~1e-6, like fp32 FMAs (kernels/mma.py).

Work split: one warp owns 16 query rows (one m16n8k8 MMA's M), a block of W warps owns BLOCK_M = 16 W rows
and shares each K/V tile, staged in shared memory as fp32, between its warps. Per key tile of BLOCK_N keys,
a warp computes

    S [16, BN]  = Q [16, D] K^T [D, BN]      BN/8 x D/8 MMAs (x3): A = Q fragments (registers, split once),
                                             B = K^T fragments from shared memory (split as loaded)
    online softmax on S's C fragments        lane (g, t) = (lane >> 2, lane & 3) holds rows g and g+8, keys
                                             2t, 2t+1 of each 8-key block: a row's max is a 2-shuffle reduction
                                             over its quad (make_group_reduce(4, 2)); row sums stay per lane
                                             until the end, as in v2
    O [16, D]  += P [16, BN] V [BN, D]       D/8 x BN/8 MMAs (x3)

P never goes through shared memory. The C fragment of S gives lane (g, t) the keys 2t and 2t+1 of each
8-key block, while an A fragment wants keys t and t+4. But the sum over keys in P V may run in any order,
so v3 feeds the MMA its k index in a permuted order, k = t <-> key 2t and k = t+4 <-> key 2t+1, for P and
for V alike:

    a0, a1, a2, a3 = P[g][2t], P[g+8][2t], P[g][2t+1], P[g+8][2t+1]   = the C fragment's c0, c2, c1, c3
    b0, b1         = V[2t][g], V[2t+1][g]

Fragment layouts (PTX ISA, mma.m16n8k8 .tf32): A: a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4],
a3 = A[g+8][t+4]; B (K x N): b0 = B[t][g], b1 = B[t+4][g]; C: c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1].

Causal masking, sliding windows, GQA and ragged lengths are v1's and v2's: bottom-right aligned diagonal, tiles
above it and before the block's first window never loaded, keys past kv_len, above the diagonal or before a row's
window set to -inf in the tiles that cross them (after the soft cap, if any: common.soft_cap on the C
fragments); rows past q_len computed on zeros and never stored. Key j comes from slot j mod S of K and V (a
ring-buffer cache layer's layout: common.ring_slot, one division per tile). Control flow is the same for every
thread of a block (no early exits per warp), because the simulator twin of the MMA is a block-wide exchange
(kernels/mma.py).

Large heads: the dims split over warps (head_dim 128 and 256)
------------------------------------------------------------
A lane keeps Q's fragments of its two rows in registers, head_dim / 8 * 8 floats (big and small), and the output
and one tile's P V as C fragments, head_dim / 8 * 4 floats each: 256 of them at head_dim 128, 512 at 256, past the
255 registers a thread may have. So with dim_split = W > 1, W consecutive warps share 16 query rows and each holds
head_dim / W of their dims (64 at both sizes: a lane's load is head_dim 64's again):

    S_w = Q[:, dims of w] K[:, dims of w]^T       each warp's partial scores, as at head_dim 64
    S   = S_0 + ... + S_{W-1}                     through shared memory x [warps, 4 NS, 32]: every lane posts its
                                                  C fragments, one barrier, and every warp of the group sums the W
                                                  partials in the same order, so all hold the same S to the bit
    softmax on S                                  in every warp of the group alike (the same m, l, P)
    O[:, dims of w] += P V[:, dims of w]          each warp its own dims; each stores only those

Costs: one more barrier per key tile, 16 BN floats per warp through shared memory, the softmax done W times, and
block_m = 16 * warps / W query rows per block (more K/V traffic per row than 128-row blocks).

What made it fast (H100, n = 4096, causal, d = 64; measured 2026-11-26 with benchmarks/gpu_report.py)
--------------------------------------------------------------------------------------------------
A first version reached 11.6-16 TFLOP/s (v2: 15.5); three changes together brought 29-31 (torch's
memory-efficient fp32 kernel: 28-29 in the same runs):
* The K/V staging loop runs a fixed number of steps (NL = BN * D / threads per thread), so it unrolls and
  every global load is issued before the first shared store. Written as `range(tid, BN * D, threads)` it
  stayed a loop whose every step waited for its own load. (Prefetching the next tile into registers while
  the MMAs run was tried as well: no faster, more registers, so it is not done.)
* The 3 x N MMAs of a k-step are issued phase by phase across the N accumulators (make_mma_3xtf32_n), so no
  MMA waits for the one just before it.
* TF32 rounding by two integer instructions (mma.tf32_split) rather than cvt.rna.tf32.f32: 31.2 vs 27.1
  TFLOP/s, all else equal.
And BLOCK_M = 128 (8 warps): each K/V tile staged in shared memory serves 128 query rows (64 rows: 22-24).

Accuracy. The tensor cores' own fp32 accumulation rounds less carefully than an FMA; with O accumulated in
the MMAs over all 4096 keys (non-causal) the error reached 3.6e-5 of max|O|. So P V is summed per tile from
zero (3 * BN / 8 MMAs deep) and added to O in fp32 SIMT arithmetic: 2.1e-6 (fp32 SIMT v2: 3.1e-6; torch's
memory-efficient fp32: 2.0e-6), 6e-7 causal.

Registers per lane (D = 64, BN = 32): Q fragments big + small 64, O 32, this tile's P V 32, S/P 16, the
split B fragments of one step 2 * 2 * D/8 = 32, the K/V elements in flight 2 * NL = 16. ptxas: 255 registers
and 16-96 bytes of spill at 128 x 32 / 256 threads (one block of 8 warps per SM; tools/compile_check.py, sm_90:
a 96-byte stack frame with the window arguments, 88 before them, 104 compiled for a ring buffer and a soft cap).
Without splitting, D = 128 needs far more (Q alone is 128) and spills more (128 x 8 tiles: a 144-byte frame;
19.9 TFLOP/s on the H100 with 120). Split (compile_check, sm_90), 8-key tiles: D = 128 at 64 x 8 / 256 threads,
2 warps a row group: 240 registers, no spill; D = 256 at 32 x 8 / 256, 4 warps: 255, none. 16-key tiles spill
(184 bytes at D = 128, 328 at 256: the K/V elements a thread stages).
Shared memory: K and V tiles, BN rows of D + 4 words: the padding makes both fragment reads conflict-free
(K: lanes read K[g][t] -> bank 4g + t; V: lanes read V[2t][g] -> bank 8t + g). (2 * BN * (D + 4)) * 4 bytes,
plus 16 * BN * warps * 4 for the split's partial scores: 17.4 KB at BN = 32, D = 64; 13.3 KB at D = 128 (BN 8,
split); 21.3 KB at D = 256 (BN 8, split): under the 48 KB of static shared memory every GPU allows.
Memory traffic per (batch, head): Q and O once; K and V once per query tile of BLOCK_M rows (halved for
causal; with a sliding window, window + BLOCK_M keys per query tile): the same as v2 with the same BLOCK_M.
For training, `make_v3(..., with_lse=True)` compiles the same kernel with one more argument, lse [B, H, Lq], that
receives each row's log-sum-exp (natural log), what the backward (kernels/backward_mma.py) recomputes P from.
# q [B, H, Lq, D], k/v [B, Hkv, S, D], kv_len, window, softcap -> out [B, H, Lq, D]
"""
import functools
import math

from numba import cuda, float32

from .common import (NEG_INF, device, kernel, make_cap, make_group_reduce, make_slot_of, prefill_block,
                     reduce_scratch_shape, tile_is_whole, visible_keys)
from .mma import make_fragments_times_rows, make_mma_3xtf32_n, mma_scratch_shape, tf32_split
from .softmax import finish, lse, rescale


def layout(block_m, block_n, threads, head_dim, dim_split=1):
    """(warps, KD = head_dim / dim_split / 8 k-steps of a warp's S, NS = block_n / 8 key blocks, NO = head_dim /
    dim_split / 8 output blocks of a warp, NL = K (and V) elements each thread stages per tile)."""
    warps = threads // 32
    if (threads % 32 or not warps or dim_split < 1 or warps % dim_split or block_m != 16 * warps // dim_split
            or block_n % 8 or head_dim % (8 * dim_split) or block_n * head_dim % threads):
        raise ValueError(f"v3 tiles block_m={block_m}, block_n={block_n}, threads={threads}, dim_split={dim_split}: "
                         f"expected whole warps of 32 threads, in groups of dim_split warps sharing 16 rows "
                         f"(block_m = 16 * warps / dim_split), block_n a multiple of 8, head_dim ({head_dim}) a "
                         f"multiple of 8 * dim_split, and block_n * head_dim a multiple of threads")
    ds = head_dim // dim_split
    return warps, ds // 8, block_n // 8, ds // 8, block_n * head_dim // threads


def shared_bytes(block_m, block_n, head_dim, dim_split=1):
    """Static shared memory of one block on a GPU: the K and V tiles, and with dim_split > 1 the partial scores
    the warps exchange (the simulator's scratch not counted)."""
    warps = block_m * dim_split // 16
    return 4 * (2 * block_n * (head_dim + 4) + (16 * block_n * warps if dim_split > 1 else 0))


@functools.lru_cache(maxsize=None)
def make_v3(head_dim, block_m, block_n, threads, dim_split=1, ring=False, capped=False, with_lse=False):
    """The v3 kernel (q, k, v, out, scale_log2, causal, kv_len, window, softcap); with with_lse=True (..., lse_out):
    lse_out [B, H, Lq] float32 receives each row's log-sum-exp (natural log), which the backward recomputes P from.
    ring: K/V may wrap (kv_len > their slots); capped: scores are soft-capped (all three compile-time choices)."""
    body = _make_v3_body(head_dim, block_m, block_n, threads, dim_split, ring, capped,
                         _store_lse if with_lse else _no_lse)
    if with_lse:
        @kernel
        def attention_v3_lse(q, k, v, out, scale_log2, causal, kv_len, window, softcap, lse_out):
            body(q, k, v, out, scale_log2, causal, kv_len, window, softcap, lse_out)
        return attention_v3_lse

    @kernel
    def attention_v3(q, k, v, out, scale_log2, causal, kv_len, window, softcap):
        body(q, k, v, out, scale_log2, causal, kv_len, window, softcap, 0)
    return attention_v3


def _make_v3_body(D, BM, BN, NT, SPLIT, ring, capped, store_lse):
    W, KD, NS, NO, NL = layout(BM, BN, NT, D, SPLIT)
    DS, DP = D // SPLIT, D + 4                      # a warp's dims; padded rows: conflict-free fragment reads
    group_max, group_sum = make_group_reduce(4, 2)  # over a quad: the 4 lanes holding one row
    RED, MMA_SCRATCH = reduce_scratch_shape(2, NT), mma_scratch_shape(NT, max(NS, NO))
    XS = (W, 4 * NS, 32) if SPLIT > 1 else (1, 1, 1)    # the partial scores each warp posts for its row group
    load_q_fragments, fetch_kv, store_kv = _make_loads(D, NT, KD, NL, ring)
    scores, sum_partials, cap_and_mask = _make_scores(BM, BN, KD, NS, SPLIT, capped)
    softmax_step = _make_softmax_step(NS, group_max)
    pv = _make_pv(NS, NO)
    init_state, store_rows = _make_state(NO)

    @device
    def attention_v3(q, k, v, out, scale_log2, causal, kv_len, window, softcap, lse_out):
        # q [B, H, Lq, D], k/v [B, Hkv, S, D] (key j in slot j mod S) -> out [B, H, Lq, D] (and lse_out [B, H, Lq])
        b, h, hk, q_len = prefill_block(q, k)
        tid, warp = cuda.threadIdx.x, cuda.threadIdx.x // 32
        g, t = (tid % 32) >> 2, tid & 3             # this lane's fragment coordinates (lane = 4 g + t)
        q0 = cuda.blockIdx.x * BM
        row = q0 + (warp // SPLIT) * 16 + g         # this lane's rows: row and row + 8 ...
        d0 = (warp % SPLIT) * DS                    # ... and its warp's head dims d0 .. d0 + DS - 1
        Ks = cuda.shared.array((BN, DP), float32)
        Vs = cuda.shared.array((BN, DP), float32)
        x = cuda.shared.array(XS, float32)
        red = cuda.shared.array(RED, float32)
        scratch = cuda.shared.array(MMA_SCRATCH, float32)
        qb = cuda.local.array((KD, 4), float32)     # Q's A fragments, scaled by scale*log2(e): big part
        qs = cuda.local.array((KD, 4), float32)     # ... and small part
        s = cuda.local.array((NS, 4), float32)      # S's C fragments, then P
        o = cuda.local.array((NO, 4), float32)      # the output's C fragments
        acc = cuda.local.array((NO, 4), float32)    # one tile's P V
        kr = cuda.local.array(NL, float32)          # the K/V tile, on its way from global to shared memory
        vr = cuda.local.array(NL, float32)
        kb = cuda.local.array((NS, 2), float32)     # B fragments of one MMA step, split: K^T ...
        ks = cuda.local.array((NS, 2), float32)
        vb = cuda.local.array((NO, 2), float32)     # ... and V
        vs = cuda.local.array((NO, 2), float32)
        pb, ps = cuda.local.array((1, 4), float32), cuda.local.array((1, 4), float32)   # a P fragment, split
        m_i = cuda.local.array(2, float32)          # rows row and row + 8: running max
        l_i = cuda.local.array(2, float32)          # ... and this lane's partial running sum
        m_tile = cuda.local.array(2, float32)       # ... the tile's max, then the rescale factor alpha
        load_q_fragments(q, b, h, row, d0, q_len, scale_log2, t, qb, qs)
        init_state(o, m_i, l_i)
        kv_begin, kv_end = visible_keys(q0, BM, q_len, kv_len, causal, window)
        for j0 in range(kv_begin, kv_end, BN):
            fetch_kv(k, v, b, hk, j0, kv_len, tid, kr, vr)
            cuda.syncthreads()                      # every warp is done with the previous K/V tile
            store_kv(kr, vr, tid, Ks, Vs)
            cuda.syncthreads()
            scores(Ks, qb, qs, kb, ks, s, g, t, d0, scratch)
            sum_partials(s, x, warp, tid % 32)      # dim_split > 1: the row group's partial scores, summed
            cap_and_mask(s, row, j0, t, q0, q_len, kv_len, causal, window, softcap)
            softmax_step(s, m_i, l_i, m_tile, red)
            pv(Vs, s, o, acc, pb, ps, vb, vs, m_tile, g, t, d0, scratch)
        group_sum(l_i, red)                         # the row sums, combined over the quad once
        store_rows(out, o, l_i, b, h, row, d0, t, q_len)
        store_lse(lse_out, m_i, l_i, b, h, row, d0 + t, q_len)

    return attention_v3


def _make_loads(D, NT, KD, NL, ring):
    slot_of = make_slot_of(ring)

    @device
    def load_q_fragments(q, b, h, row, d0, q_len, scale_log2, t, qb, qs):
        """Q's A fragments for rows row, row + 8 and this warp's dims d0.. -> registers, scaled for exp2 and split
        into TF32 big + small once (they serve every key tile); rows past q_len are 0."""
        for kk in range(KD):
            for e in range(4):
                r = row + 8 * (e & 1)               # a0, a2: row g; a1, a3: row g + 8
                c = d0 + kk * 8 + t + 4 * (e >> 1)  # a0, a1: column t; a2, a3: column t + 4
                x = float32(q[b, h, r, c]) * scale_log2 if r < q_len else float32(0.0)
                qb[kk, e], qs[kk, e] = tf32_split(x)

    @device
    def fetch_kv(k, v, b, hk, j0, kv_len, tid, kr, vr):
        """This thread's NL elements of the K and V tiles at key j0 -> registers (consecutive threads read
        consecutive addresses); keys past kv_len: 0. A fixed count, so every load is issued before any is used.
        Key j sits in slot j mod S (common.ring_slot: one division per tile, not per key)."""
        base = j0 % k.shape[2] if ring else j0
        for i in range(NL):
            idx = tid + i * NT
            r, c = idx // D, idx % D
            inside = j0 + r < kv_len
            slot = slot_of(base, r, k.shape[2])
            kr[i] = float32(k[b, hk, slot, c]) if inside else float32(0.0)
            vr[i] = float32(v[b, hk, slot, c]) if inside else float32(0.0)

    @device
    def store_kv(kr, vr, tid, Ks, Vs):
        """The fetched elements -> the shared K and V tiles."""
        for i in range(NL):
            idx = tid + i * NT
            Ks[idx // D, idx % D] = kr[i]
            Vs[idx // D, idx % D] = vr[i]
    return load_q_fragments, fetch_kv, store_kv


def _make_scores(BM, BN, KD, NS, SPLIT, capped):
    mma_n = make_mma_3xtf32_n(NS)
    soft_cap = make_cap(capped)

    @device
    def scores(Ks, qb, qs, kb, ks, s, g, t, d0, scratch):
        """s = the warp's S [16, BN] = Q K^T over its dims d0 .. d0 + 8 KD as C fragments; B = K^T, so
        b0 = K[key g][t], b1 = K[key g][t + 4]. kb, ks [NS, 2]: the B fragments of one k-step, split."""
        for n in range(NS):
            for e in range(4):
                s[n, e] = 0.0
        for kk in range(KD):
            for n in range(NS):
                kb[n, 0], ks[n, 0] = tf32_split(Ks[n * 8 + g, d0 + kk * 8 + t])
                kb[n, 1], ks[n, 1] = tf32_split(Ks[n * 8 + g, d0 + kk * 8 + t + 4])
            mma_n(qb, qs, kk, kb, ks, s, scratch)

    @device
    def cap_and_mask(s, row, j0, t, q0, q_len, kv_len, causal, window, softcap):
        """The soft cap (softcap > 0), then -inf where a key lies past kv_len, above the causal diagonal or before
        the row's window (c_e: row + 8 (e >> 1), key 2t + (e & 1)); tiles that need no mask skip the test."""
        if capped:
            for n in range(NS):
                for e in range(4):
                    s[n, e] = soft_cap(s[n, e], softcap)
        if not tile_is_whole(j0, BN, q0, BM, q_len, kv_len, causal, window):
            for e in range(4):
                first, end = visible_keys(row + 8 * (e >> 1), 1, q_len, kv_len, causal, window)
                for n in range(NS):
                    if not first <= j0 + n * 8 + 2 * t + (e & 1) < end:
                        s[n, e] = NEG_INF
    return scores, _make_sum_partials(NS, SPLIT), cap_and_mask


def _make_sum_partials(NS, SPLIT):
    """sum_partials(s, x, warp, lane): with the head dims split over SPLIT warps, each warp's s holds Q K^T over its
    dims only; the row group's SPLIT partials go through shared memory x [warps, 4 NS, lanes] (every lane posts its
    fragments; lanes of one row group hold the same (row, key) cells) and are summed in the same order in every
    warp of the group, so that all of them hold the same S to the bit and take the same softmax. One barrier: the
    next tile's posts wait at the loop's first barrier, after every warp has read this tile's. SPLIT = 1: nothing."""
    if SPLIT == 1:
        @device
        def sum_partials(s, x, warp, lane):
            pass
        return sum_partials

    @device
    def sum_partials(s, x, warp, lane):
        for n in range(NS):
            for e in range(4):
                x[warp, 4 * n + e, lane] = s[n, e]
        cuda.syncthreads()
        first = warp - warp % SPLIT
        for n in range(NS):
            for e in range(4):
                total = float32(0.0)
                for p in range(SPLIT):
                    total += x[first + p, 4 * n + e, lane]
                s[n, e] = total
    return sum_partials


def _make_softmax_step(NS, group_max):
    @device
    def softmax_step(s, m_i, l_i, m_tile, red):
        """The online-softmax update on the C fragments (rows r = 0: c0, c1; r = 1: c2, c3): the new row max over
        the quad, l_i rescaled, s <- P = exp2(s - m_ref); m_tile <- alpha, the factor that rescales o (in pv).
        The fragment layout's own update: o's rows are spread over C fragments and rescaled in pv."""
        for r in range(2):
            mx = NEG_INF
            for n in range(NS):
                mx = max(mx, max(s[n, 2 * r], s[n, 2 * r + 1]))
            m_tile[r] = mx
        group_max(m_tile, red)
        for r in range(2):
            m_i[r], m_ref, alpha = rescale(m_i[r], m_tile[r])   # kernels/softmax.py: the one rule
            m_tile[r] = alpha
            l_i[r] *= alpha
            for n in range(NS):
                p0 = math.exp2(s[n, 2 * r] - m_ref)
                p1 = math.exp2(s[n, 2 * r + 1] - m_ref)
                s[n, 2 * r], s[n, 2 * r + 1] = p0, p1
                l_i[r] += p0 + p1
    return softmax_step


def _make_pv(NS, NO):
    product = make_fragments_times_rows(NS, NO)

    @device
    def pv(Vs, s, o, acc, pb, ps, vb, vs, alpha, g, t, d0, scratch):
        """o = o * alpha + P V over this warp's dims d0 .. d0 + 8 NO, P being S's C fragments (kernels/mma.py's
        make_fragments_times_rows: the k index permuted so that P's A fragment is its C fragment reordered). P V is
        summed over the tile in acc, from zero, and added to o in fp32 (round to nearest): the tensor cores' own
        accumulation rounds less carefully, and over thousands of keys in one accumulator its error grew past 1e-5
        (3.6e-5 at n = 4096, non-causal, on an H100). pb, ps [1, 4]: one key block's P fragment, split; vb, vs
        [NO, 2]: its V fragments, split."""
        product(Vs, s, d0, acc, pb, ps, vb, vs, g, t, scratch)
        for c in range(NO):
            for e in range(4):
                o[c, e] = o[c, e] * alpha[e >> 1] + acc[c, e]
    return pv


def _make_state(NO):
    @device
    def init_state(o, m_i, l_i):
        """The output fragments at 0, rows row and row + 8 not started: m = -inf, l = 0."""
        for c in range(NO):
            for e in range(4):
                o[c, e] = 0.0
        for r in range(2):
            m_i[r] = NEG_INF
            l_i[r] = 0.0

    @device
    def store_rows(out, o, l_i, b, h, row, d0, t, q_len):
        """out = o / l_i for this lane's two rows and its warp's dims (c0, c1: row, columns d0 + 2t, d0 + 2t + 1 of
        each 8; c2, c3: row + 8)."""
        for r in range(2):
            i = row + 8 * r
            if i < q_len:
                inv_l = finish(l_i[r])
                for c in range(NO):
                    out[b, h, i, d0 + c * 8 + 2 * t] = o[c, 2 * r] * inv_l
                    out[b, h, i, d0 + c * 8 + 2 * t + 1] = o[c, 2 * r + 1] * inv_l
    return init_state, store_rows


@device
def _store_lse(lse_out, m_i, l_i, b, h, row, first, q_len):
    """The with_lse variant: the log-sum-exp (natural log) of this lane's rows row and row + 8, written by one lane
    of the row group: the quad's first lane (t = 0) of the group's first warp (d0 = 0), so first = d0 + t = 0 there.
    All lanes of the group hold the same m and, after the group sum, the same l."""
    for r in range(2):
        if first == 0 and row + 8 * r < q_len:
            lse_out[b, h, row + 8 * r] = lse(m_i[r], l_i[r])


@device
def _no_lse(lse_out, m_i, l_i, b, h, row, first, q_len):
    pass
