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

Causal masking, GQA and ragged lengths are v1's and v2's: bottom-right aligned diagonal, tiles above it never
loaded, keys past kv_len and above the diagonal set to -inf in the tiles that cross them; rows past q_len
computed on zeros and never stored. Control flow is the same for every thread of a block (no early exits
per warp), because the simulator twin of the MMA is a block-wide exchange (kernels/mma.py).

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
and 16-96 bytes of spill at 128 x 32 / 256 threads (one block of 8 warps per SM); D = 128 needs far more
(Q alone is 128) and spills more: 128 x 8 tiles there.
Shared memory: K and V tiles, BN rows of D + 4 words: the padding makes both fragment reads conflict-free
(K: lanes read K[g][t] -> bank 4g + t; V: lanes read V[2t][g] -> bank 8t + g). (2 * BN * (D + 4)) * 4 bytes:
17.4 KB at BN = 32, D = 64, well under the 48 KB of static shared memory every GPU allows.
Memory traffic per (batch, head): Q and O once; K and V once per query tile of BLOCK_M rows (halved for
causal): the same as v2 with the same BLOCK_M.
"""
import functools
import math

from numba import cuda, float32

from .common import (NEG_INF, device, kernel, make_group_reduce, prefill_block, reduce_scratch_shape, tile_is_whole,
                     visible_keys)
from .mma import make_mma_3xtf32_n, mma_scratch_shape, tf32_split
from .softmax import finish, lse, rescale


def layout(block_m, block_n, threads, head_dim):
    """(warps, KD = head_dim / 8 k-steps of S, NS = block_n / 8 key blocks, NO = head_dim / 8 output blocks,
    NL = K (and V) elements each thread stages per tile)."""
    warps = threads // 32
    if (threads % 32 or block_m != 16 * warps or block_n % 8 or head_dim % 8 or not warps
            or block_n * head_dim % threads):
        raise ValueError(f"v3 tiles block_m={block_m}, block_n={block_n}, threads={threads}: expected whole warps "
                         f"of 32 threads, block_m = 16 rows per warp, block_n and head_dim ({head_dim}) multiples of "
                         f"8, and block_n * head_dim a multiple of threads")
    return warps, head_dim // 8, block_n // 8, head_dim // 8, block_n * head_dim // threads


def shared_bytes(block_m, block_n, head_dim):
    """Static shared memory of one block on a GPU (the K and V tiles; the simulator's scratch not counted)."""
    return 4 * 2 * block_n * (head_dim + 4)


@functools.lru_cache(maxsize=None)
def make_v3(head_dim, block_m, block_n, threads, with_lse=False):
    """The v3 kernel (q, k, v, out, scale_log2, causal); with with_lse=True (..., causal, lse_out): lse_out
    [B, H, Lq] float32 receives each row's log-sum-exp (natural log), which the backward recomputes P from."""
    body = _make_v3_body(head_dim, block_m, block_n, threads, _store_lse if with_lse else _no_lse)
    if with_lse:
        @kernel
        def attention_v3_lse(q, k, v, out, scale_log2, causal, lse_out):
            body(q, k, v, out, scale_log2, causal, lse_out)
        return attention_v3_lse

    @kernel
    def attention_v3(q, k, v, out, scale_log2, causal):
        body(q, k, v, out, scale_log2, causal, 0)
    return attention_v3


def _make_v3_body(D, BM, BN, NT, store_lse):
    W, KD, NS, NO, NL = layout(BM, BN, NT, D)
    DP = D + 4                                      # padded row: conflict-free fragment reads (docstring)
    group_max, group_sum = make_group_reduce(4, 2)  # over a quad: the 4 lanes holding one row
    RED, MMA_SCRATCH = reduce_scratch_shape(2, NT), mma_scratch_shape(NT, max(NS, NO))
    load_q_fragments, fetch_kv, store_kv = _make_loads(D, NT, KD, NL)
    scores, mask_scores = _make_scores(KD, NS)
    softmax_step = _make_softmax_step(NS, group_max)
    pv = _make_pv(NS, NO)
    init_state, store_rows = _make_state(NO)

    @device
    def attention_v3(q, k, v, out, scale_log2, causal, lse_out):
        # q [B, H, Lq, D], k/v [B, Hkv, Lk, D] -> out [B, H, Lq, D] (and lse_out [B, H, Lq])
        b, h, hk, q_len, kv_len = prefill_block(q, k)
        tid = cuda.threadIdx.x
        g, t = (tid % 32) >> 2, tid & 3             # this lane's fragment coordinates (lane = 4 g + t)
        q0 = cuda.blockIdx.x * BM
        row = q0 + (tid // 32) * 16 + g             # this lane's rows: row and row + 8

        Ks = cuda.shared.array((BN, DP), float32)
        Vs = cuda.shared.array((BN, DP), float32)
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
        pb = cuda.local.array((1, 4), float32)      # one key block's P fragment, split
        ps = cuda.local.array((1, 4), float32)
        m_i = cuda.local.array(2, float32)          # rows row and row + 8: running max
        l_i = cuda.local.array(2, float32)          # ... and this lane's partial running sum
        m_tile = cuda.local.array(2, float32)       # ... the tile's max, then the rescale factor alpha
        load_q_fragments(q, b, h, row, q_len, scale_log2, t, qb, qs)
        init_state(o, m_i, l_i)
        kv_begin, kv_end = visible_keys(q0, BM, q_len, kv_len, causal)
        for j0 in range(kv_begin, kv_end, BN):
            fetch_kv(k, v, b, hk, j0, kv_len, tid, kr, vr)
            cuda.syncthreads()                      # every warp is done with the previous K/V tile
            store_kv(kr, vr, tid, Ks, Vs)
            cuda.syncthreads()
            scores(Ks, qb, qs, kb, ks, s, g, t, scratch)
            if not tile_is_whole(j0, BN, q0, BM, q_len, kv_len, causal):
                mask_scores(s, row, j0, t, q_len, kv_len, causal)
            softmax_step(s, m_i, l_i, m_tile, red)
            pv(Vs, s, o, acc, pb, ps, vb, vs, m_tile, g, t, scratch)

        group_sum(l_i, red)                         # the row sums, combined over the quad once
        store_rows(out, o, l_i, b, h, row, t, q_len)
        store_lse(lse_out, m_i, l_i, b, h, row, t, q_len)

    return attention_v3


def _make_loads(D, NT, KD, NL):
    @device
    def load_q_fragments(q, b, h, row, q_len, scale_log2, t, qb, qs):
        """Q's A fragments for rows row, row + 8 -> registers, scaled for exp2 and split into TF32 big + small
        once (they serve every key tile); rows past q_len are 0."""
        for kk in range(KD):
            for e in range(4):
                r = row + 8 * (e & 1)               # a0, a2: row g; a1, a3: row g + 8
                c = kk * 8 + t + 4 * (e >> 1)       # a0, a1: column t; a2, a3: column t + 4
                x = float32(q[b, h, r, c]) * scale_log2 if r < q_len else float32(0.0)
                qb[kk, e], qs[kk, e] = tf32_split(x)

    @device
    def fetch_kv(k, v, b, hk, j0, kv_len, tid, kr, vr):
        """This thread's NL elements of the K and V tiles at key j0 -> registers (consecutive threads read
        consecutive addresses); keys past kv_len: 0. A fixed count, so every load is issued before any is used."""
        for i in range(NL):
            idx = tid + i * NT
            r, c = idx // D, idx % D
            inside = j0 + r < kv_len
            kr[i] = float32(k[b, hk, j0 + r, c]) if inside else float32(0.0)
            vr[i] = float32(v[b, hk, j0 + r, c]) if inside else float32(0.0)

    @device
    def store_kv(kr, vr, tid, Ks, Vs):
        """The fetched elements -> the shared K and V tiles."""
        for i in range(NL):
            idx = tid + i * NT
            Ks[idx // D, idx % D] = kr[i]
            Vs[idx // D, idx % D] = vr[i]
    return load_q_fragments, fetch_kv, store_kv


def _make_scores(KD, NS):
    mma_n = make_mma_3xtf32_n(NS)

    @device
    def scores(Ks, qb, qs, kb, ks, s, g, t, scratch):
        """s = the warp's S [16, BN] = Q K^T as C fragments; B = K^T, so b0 = K[key g][t], b1 = K[key g][t + 4].
        kb, ks [NS, 2]: the B fragments of one k-step, split."""
        for n in range(NS):
            for e in range(4):
                s[n, e] = 0.0
        for kk in range(KD):
            for n in range(NS):
                kb[n, 0], ks[n, 0] = tf32_split(Ks[n * 8 + g, kk * 8 + t])
                kb[n, 1], ks[n, 1] = tf32_split(Ks[n * 8 + g, kk * 8 + t + 4])
            mma_n(qb, qs, kk, kb, ks, s, scratch)

    @device
    def mask_scores(s, row, j0, t, q_len, kv_len, causal):
        """-inf where a key lies past kv_len or above the causal diagonal (c_e: row + 8 (e >> 1), key 2t + (e & 1))."""
        for e in range(4):
            first, end = visible_keys(row + 8 * (e >> 1), 1, q_len, kv_len, causal)
            for n in range(NS):
                if not first <= j0 + n * 8 + 2 * t + (e & 1) < end:
                    s[n, e] = NEG_INF
    return scores, mask_scores


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
    mma_n = make_mma_3xtf32_n(NO)

    @device
    def pv(Vs, s, o, acc, pb, ps, vb, vs, alpha, g, t, scratch):
        """o = o * alpha + P V. The k index runs over each 8-key block permuted (k = t <-> key 2t, k = t + 4 <->
        key 2t + 1), so P's A fragment is S's C fragment reordered in registers: (c0, c2, c1, c3); b0, b1 =
        V[2t][g], V[2t+1][g]. P V is summed over the tile in acc, from zero, and added to o in fp32 (round to
        nearest): the tensor cores' own accumulation rounds less carefully, and over thousands of keys in one
        accumulator its error grew past 1e-5 (3.6e-5 at n = 4096, non-causal, on an H100).
        pb, ps [1, 4]: one key block's P fragment, split; vb, vs [NO, 2]: its V fragments, split."""
        for c in range(NO):
            for e in range(4):
                acc[c, e] = 0.0
        for n in range(NS):
            pb[0, 0], ps[0, 0] = tf32_split(s[n, 0])
            pb[0, 1], ps[0, 1] = tf32_split(s[n, 2])
            pb[0, 2], ps[0, 2] = tf32_split(s[n, 1])
            pb[0, 3], ps[0, 3] = tf32_split(s[n, 3])
            for c in range(NO):
                vb[c, 0], vs[c, 0] = tf32_split(Vs[n * 8 + 2 * t, c * 8 + g])
                vb[c, 1], vs[c, 1] = tf32_split(Vs[n * 8 + 2 * t + 1, c * 8 + g])
            mma_n(pb, ps, 0, vb, vs, acc, scratch)
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
    def store_rows(out, o, l_i, b, h, row, t, q_len):
        """out = o / l_i for this lane's two rows (c0, c1: row, columns 2t, 2t + 1 of each 8; c2, c3: row + 8)."""
        for r in range(2):
            i = row + 8 * r
            if i < q_len:
                inv_l = finish(l_i[r])
                for c in range(NO):
                    out[b, h, i, c * 8 + 2 * t] = o[c, 2 * r] * inv_l
                    out[b, h, i, c * 8 + 2 * t + 1] = o[c, 2 * r + 1] * inv_l
    return init_state, store_rows


@device
def _store_lse(lse_out, m_i, l_i, b, h, row, t, q_len):
    """The with_lse variant: the log-sum-exp (natural log) of this lane's rows row and row + 8, written by the
    quad's first lane (all four hold the same m and, after the group sum, the same l)."""
    for r in range(2):
        if t == 0 and row + 8 * r < q_len:
            lse_out[b, h, row + 8 * r] = lse(m_i[r], l_i[r])


@device
def _no_lse(lse_out, m_i, l_i, b, h, row, t, q_len):
    pass
