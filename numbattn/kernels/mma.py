"""Tensor cores from Numba: TF32 and bf16 warp MMAs through inline PTX, and their simulator twins.

Numba's kernel language has no tensor-core operation, but a Numba `@intrinsic` can emit any PTX
instruction through an llvmlite `ir.InlineAsm` (as common.f32_from_half_bits emits a cvt). Here:

    tf32_split(x) -> (big, small)      x ~ big + small, both TF32 (10-bit mantissa, kept in float32 words):
                                       big = rna(x), small = rna(x - big), rna being cvt.rna.tf32.f32's
                                       rounding (to nearest, ties away) done as two integer instructions;
                                       tf32_split_cvt does the same with the cvt instruction
    mma_tf32(a0..a3, b0, b1, c0..c3)   one mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: the 32 lanes of
        -> (d0, d1, d2, d3)            a warp together compute D[16x8] = A[16x8] B[8x8] + C[16x8]
    make_mma_3xtf32_n(N)               D[n] = A B[n] + C[n] for N B fragments sharing one A fragment, each as
                                       A_small B_big + A_big B_small + A_big B_big: three TF32 MMAs that together
                                       keep fp32 accuracy (CUTLASS's OpMultiplyAddFastF32; the A_small B_small
                                       term, ~2^-22 relative, is dropped); the 3N MMAs issued phase by phase
                                       (all A_small B_big[n], then ...), so that no MMA waits for the one before it
    make_fragments_times_rows(NS, NO)  acc = P B (3xTF32) for P held as the warp's C fragments [16, 8 NS] and B rows
                                       in shared memory [8 NS, 8 NO]: P V of prefill v3, dV, dK, dQ of backward v3
    mma_scratch_shape(threads, n)      the shared scratch the simulator twin needs (a 1-element dummy on a GPU)

and for bf16 (the prefill GEMM, kernels/gemm_mma.py: bf16 weights as stored, fp32 activations split in bf16 terms):

    bf16x2(lo, hi) -> word             a uint32 holding bf16(lo) in its low half and bf16(hi) in its high half,
                                       rounded to nearest even (one cvt.rn.bf16x2.f32)
    make_bf16_split(T)                 split(x0, x1, words): x0 ~ sum of T bf16 terms, x1 too, packed in T
                                       words; term e rounds what the terms before it left: 8 more bits each
                                       (T = 3 is exact: fp32's 24 bits)
    make_mma_bf16_n(N)                 D[n] = A B[n] + C[n] for N B fragments sharing one A fragment: N
                                       mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, fp32 accumulation

Fragment layout of m16n8k16 (.bf16): each 32-bit register holds two elements, the lower index in the low half.

    A (16x16, row major):  a0,a1 = A[g][2t, 2t+1]   a2,a3 = A[g+8][2t, 2t+1]
                           a4,a5 = A[g][2t+8, 2t+9] a6,a7 = A[g+8][2t+8, 2t+9]     (4 words)
    B (16x8, K x N):       b0,b1 = B[2t, 2t+1][g]   b2,b3 = B[2t+8, 2t+9][g]       (2 words)
    C, D (16x8):           as for m16n8k8

With B = W^T for a weight W [N, K] stored row by row in bf16, b0,b1 = W[g][2t], W[g][2t+1]: two neighbours in
memory, i.e. one 32-bit word of the stored row. The weights go to the tensor cores as the checkpoint stores them.

Fragment layout of m16n8k8 (PTX ISA, "Matrix Fragments for mma.m16n8k8", .tf32), lane = 4 g + t:

    A (16x8, row major):  a0 = A[g][t]    a1 = A[g+8][t]    a2 = A[g][t+4]    a3 = A[g+8][t+4]
    B (8x8, K x N):       b0 = B[t][g]    b1 = B[t+4][g]
    C, D (16x8):          c0 = C[g][2t]   c1 = C[g][2t+1]   c2 = C[g+8][2t]   c3 = C[g+8][2t+1]

So lane (g, t) holds rows g and g+8 of C: the four lanes of a quad (same g) hold a whole row, and a row
reduction is two shuffles over the quad (common.make_group_reduce(4, n)).

The simulator twin. Numba's simulator has no inline asm and no warp shuffles: each CUDA thread is a Python
thread. `mma_tf32` and the `make_mma_3xtf32_n` functions therefore take one more argument there, a float32 shared array `scratch`
(shape `mma_scratch_shape(threads)`): every lane posts its A and B fragments, the block waits (syncthreads),
and each lane computes its own four elements of D from its warp's posted fragments with exactly the layout
above (and its own C). So the simulator runs the real fragment layout (a wrong index in a kernel fails the CI
tests), provided every thread of the block reaches every MMA together: kernels built on these keep their
control flow uniform across the block around them. On a GPU `scratch` is a (1, 1, 1, 1) dummy, never touched.
The twin computes in float64 and rounds once to float32; the GPU accumulates in fp32 (differences ~1e-7).
"""
import struct
import threading

import numpy as np
from llvmlite import ir
from numba import cuda, float32, types
from numba.cuda.extending import intrinsic

from .common import SIM, bf16_pair


def mma_scratch_shape(threads, n=1, sim=None, bf16=False):
    """Shape of the shared scratch of the simulator twin for MMAs with up to n B fragments per call (make_mma_3xtf32_n,
    make_mma_bf16_n): (2 slots, warps, operands, 32 lanes), as each lane posts its A elements (4 tf32, 8 bf16) and n
    sets of B elements (2, 4); (1, 1, 1, 1) on a GPU."""
    sim = SIM if sim is None else sim
    return (2, max(1, threads // 32), (8 + 4 * n) if bf16 else (4 + 2 * n), 32) if sim else (1, 1, 1, 1)


# --------------------------------------------------------------------------------------------------------
# GPU: inline PTX
# --------------------------------------------------------------------------------------------------------
@intrinsic
def _cvt_tf32(typingctx, x):
    """float32 -> the nearest TF32 (ties away from zero), as the float32 with the same bits (low 13 bits 0)."""
    def codegen(context, builder, signature, args):
        i32, f32 = ir.IntType(32), ir.FloatType()
        cvt = ir.InlineAsm(ir.FunctionType(i32, [f32]), "cvt.rna.tf32.f32 $0, $1;", "=r,f")
        return builder.bitcast(builder.call(cvt, [args[0]]), f32)
    return float32(float32), codegen


@intrinsic
def _round_tf32(typingctx, x):
    """The same rounding as cvt.rna.tf32.f32, in two integer instructions: add half a TF32 ulp to the bit pattern
    (a carry into the exponent is the correct rounding up) and clear the 13 bits TF32 does not keep. Exact for
    every finite float32; infinities stay infinite, a NaN stays a NaN."""
    def codegen(context, builder, signature, args):
        i32, f32 = ir.IntType(32), ir.FloatType()
        bits = builder.add(builder.bitcast(args[0], i32), ir.Constant(i32, 0x1000))
        return builder.bitcast(builder.and_(bits, ir.Constant(i32, 0xFFFFE000)), f32)
    return float32(float32), codegen


def _warp_mma(instruction, ab_type):
    """An @intrinsic for one warp MMA `instruction` with fp32 C and D: (a0..a3, b0, b1, c0..c3) -> (d0..d3). A and
    B are 32-bit registers of ab_type: float32 holding TF32 bits, or uint32 holding two bf16."""
    ret = types.UniTuple(float32, 4)

    @intrinsic
    def mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        def codegen(context, builder, signature, args):
            i32, f32 = ir.IntType(32), ir.FloatType()
            fnty = ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32] * 6 + [f32] * 4)
            asm = ir.InlineAsm(fnty, f"{instruction} {{$0, $1, $2, $3}}, {{$4, $5, $6, $7}}, {{$8, $9}}, "
                                     "{$10, $11, $12, $13};", "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
            ab = [builder.bitcast(x, i32) if ab_type == float32 else x for x in args[:6]]
            d = builder.call(asm, ab + list(args[6:]))
            return context.make_tuple(builder, ret, [builder.extract_value(d, i) for i in range(4)])
        return ret(*([ab_type] * 6 + [float32] * 4)), codegen
    return mma


_mma_tf32 = _warp_mma("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32", float32)         # one m16n8k8 TF32 MMA
_mma_bf16 = _warp_mma("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", types.uint32)   # m16n8k16 bf16


@intrinsic
def _cvt_bf16x2(typingctx, lo, hi):
    """(lo, hi) float32 -> uint32 with bf16(lo) in the low half, bf16(hi) in the high half, to nearest even. The
    instruction's first source goes to the upper half, hence (hi, lo)."""
    def codegen(context, builder, signature, args):
        i32, f32 = ir.IntType(32), ir.FloatType()
        cvt = ir.InlineAsm(ir.FunctionType(i32, [f32, f32]), "cvt.rn.bf16x2.f32 $0, $1, $2;", "=r,f,f")
        return builder.call(cvt, [args[1], args[0]])
    return types.uint32(float32, float32), codegen


# --------------------------------------------------------------------------------------------------------
# Simulator twins (plain Python per thread; see the module docstring)
# --------------------------------------------------------------------------------------------------------
def tf32_round(x):
    """NumPy: float32 values rounded to TF32 (mantissa to 10 bits, to nearest, ties away from zero), as float32.
    Infinities and NaN pass through (the rounding carry of the largest finite values overflows to inf, as in
    cvt.rna.tf32.f32)."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = ((bits + 0x1000) & 0xFFFFE000).astype(np.uint32)     # add half a TF32 ulp to the magnitude, cut
    return np.where(finite, rounded, bits.astype(np.uint32)).view(np.float32)


def bf16_bits(x):
    """NumPy: float32 values -> the uint16 bits of the nearest bf16 (ties to even), as cvt.rn.bf16x2.f32 rounds;
    infinities stay infinite, a NaN stays a NaN."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(x, np.float32))
    return np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), rounded)


def bf16_terms(x, terms):
    """NumPy: float32 x -> [terms, *x.shape] float32 values exact in bf16 whose sum approximates x: term e is the
    bf16 rounding of what the terms before it left (what make_bf16_split computes)."""
    rest, out = np.asarray(x, np.float32), []
    for _ in range(terms):
        term = (bf16_bits(rest).astype(np.uint32) << 16).view(np.float32)
        out.append(term)
        rest = (rest - term).astype(np.float32)
    return np.stack(out)


def _sim_words(words):
    """Simulator: uint32 words of two bf16 -> their values in order (low half first), as float32."""
    w = np.asarray([int(x) & 0xFFFFFFFF for x in words], np.uint32)
    return np.stack([(w << 16).view(np.float32), (w & 0xFFFF0000).view(np.float32)], axis=1).ravel()


def mma_reference(a, b, c):
    """NumPy: D = A B + C for one 16x8x8 tile from whole matrices (float64 sums, rounded to float32)."""
    return (a.astype(np.float64) @ b.astype(np.float64) + c).astype(np.float32)


TF32_CELLS = (lambda g, t: [(g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4)],             # A [16, 8]: a0..a3
              lambda g, t: [(t, g), (t + 4, g)])                                           # B [8, 8]: b0, b1
BF16_CELLS = (lambda g, t: [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1),  # A [16, 16]: a0..a7
                            (g, 2 * t + 8), (g, 2 * t + 9), (g + 8, 2 * t + 8), (g + 8, 2 * t + 9)],
              lambda g, t: [(2 * t, g), (2 * t + 1, g), (2 * t + 8, g), (2 * t + 9, g)])   # B [16, 8]: b0..b3


def _layout(k, cells):
    """(operand, lane) of every element of A [16, k], B [k, 8] and C [16, 8] by the PTX layout (index arrays):
    operands numbered as a lane posts them: A's elements, then B's, then C's c0..c3."""
    a_cells, b_cells = cells
    n_a, n_b = len(a_cells(0, 0)), len(b_cells(0, 0))
    op = {"A": np.zeros((16, k), int), "B": np.zeros((k, 8), int), "C": np.zeros((16, 8), int)}
    lane_of = {name: np.zeros_like(x) for name, x in op.items()}
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        where = {"A": a_cells(g, t), "B": b_cells(g, t),
                 "C": [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]}
        first = {"A": 0, "B": n_a, "C": n_a + n_b}
        for name, cells_ in where.items():
            for i, cell in enumerate(cells_):
                op[name][cell], lane_of[name][cell] = first[name] + i, lane
    return {name: (op[name], lane_of[name]) for name in op}


LAYOUT = _layout(8, TF32_CELLS)            # m16n8k8 .tf32
LAYOUT_BF16 = _layout(16, BF16_CELLS)      # m16n8k16 .bf16: a lane's A and B registers hold 2 bf16 each (low half
#                                            the lower index), so its 8 A and 4 B elements come in 4 and 2 words


_lane = threading.local()     # the simulator runs each CUDA thread as a Python thread: its own exchange count


def _sim_mma(a, bs, cs, scratch, layout=LAYOUT):
    """Simulator: this lane's four D elements of A B[n] + C[n] for each n (a: its A elements; bs: n tuples of its
    B elements; cs: n quadruples c0..c3, kept by the lane), by `layout`. Post A and the B fragments, wait,
    compute from the warp's posts. Exchanges alternate between two slots of scratch, so one barrier each is
    enough: a lane writes a slot again two exchanges later, after the barrier of the exchange between, which
    every lane passes only once it has read the slot."""
    tid = cuda.threadIdx.x
    warp, lane = tid // 32, tid % 32
    slot = getattr(_lane, "slot", 0)
    _lane.slot = 1 - slot
    posted = list(a) + [x for b in bs for x in b]
    for i in range(len(posted)):
        scratch[slot, warp, i, lane] = posted[i]
    cuda.syncthreads()
    frags = np.asarray(scratch[slot, warp, :len(posted)], np.float64)   # the rest was never written this launch
    g, t = lane >> 2, lane & 3
    rows = frags[layout["A"]][[g, g + 8]]                                          # [2, k]: rows g, g + 8 of A
    b_op, b_lane = layout["B"]
    cols = np.stack([frags[b_op + len(bs[0]) * n, b_lane][:, [2 * t, 2 * t + 1]] for n in range(len(bs))])  # [n,k,2]
    d = rows @ cols + np.asarray(cs, np.float64).reshape(-1, 2, 2)                # [n, 2, 2]: c0 c1 / c2 c3
    return [tuple(np.float32(x) for x in dn.ravel()) for dn in d]


# --------------------------------------------------------------------------------------------------------
# The device functions kernels call: the simulator's twins, or the PTX
# --------------------------------------------------------------------------------------------------------
if SIM:
    @cuda.jit(device=True)
    def tf32_split(x):
        """Simulator twin: x -> (big, small) rounded to TF32 with NumPy (same rounding as cvt.rna.tf32.f32)."""
        big = tf32_round(np.float32(x))[()]
        return big, tf32_round(np.float32(x) - big)[()]

    tf32_split_cvt = tf32_split

    @cuda.jit(device=True)
    def mma_tf32(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, scratch):
        """Simulator twin of the warp MMA: through shared `scratch` (every thread of the block must call it)."""
        return _sim_mma((a0, a1, a2, a3), [(b0, b1)], [(c0, c1, c2, c3)], scratch)[0]
else:
    @cuda.jit(device=True, inline=True)
    def tf32_split(x):
        """x -> (big, small), both TF32: x - big is exact in fp32, and small rounds it to TF32 in turn."""
        big = _round_tf32(x)
        return big, _round_tf32(x - big)

    @cuda.jit(device=True, inline=True)
    def tf32_split_cvt(x):
        """tf32_split through the PTX conversion itself (the tests check that both agree)."""
        big = _cvt_tf32(x)
        return big, _cvt_tf32(x - big)

    @cuda.jit(device=True, inline=True)
    def mma_tf32(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, scratch):
        """D = A B + C for the warp's 16x8x8 tile (layout in the module docstring). scratch: unused here."""
        return _mma_tf32(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)


def make_mma_3xtf32_n(N):
    """mma_n(a, a_s, ia, b, b_s, c, scratch): c[n] += A b[n] (3xTF32) for n < N, in place. The A fragment is row ia
    of the local arrays a (big) and a_s (small), [*, 4]; b, b_s: [N, 2] big and small B fragments; c: [N, 4].

    GPU: the three MMAs of one n depend on each other through the accumulator; issued n by n, each would wait
    for the previous one's result (the tensor-core latency). Here each phase runs over all n first, so N
    independent MMAs follow each other. Simulator: one exchange for all N products (scratch from
    mma_scratch_shape(threads, N)), of the reassembled operands big + small (the small x small term the GPU drops
    is ~2^-22 relative, below fp32 rounding of the sums)."""
    if SIM:
        @cuda.jit(device=True)
        def mma_n(a, a_s, ia, b, b_s, c, scratch):
            whole = lambda x, y: np.float64(x) + np.float64(y)      # noqa: E731  (big + small, exact)
            d = _sim_mma([whole(a[ia, e], a_s[ia, e]) for e in range(4)],
                         [(whole(b[n, 0], b_s[n, 0]), whole(b[n, 1], b_s[n, 1])) for n in range(N)],
                         [tuple(c[n, e] for e in range(4)) for n in range(N)], scratch)
            for n in range(N):
                for e in range(4):
                    c[n, e] = d[n][e]
        return mma_n

    @cuda.jit(device=True, inline=True)
    def mma_n(a, a_s, ia, b, b_s, c, scratch):
        for n in range(N):              # the small products first, while the accumulators are small
            c[n, 0], c[n, 1], c[n, 2], c[n, 3] = _mma_tf32(a_s[ia, 0], a_s[ia, 1], a_s[ia, 2], a_s[ia, 3],
                                                           b[n, 0], b[n, 1], c[n, 0], c[n, 1], c[n, 2], c[n, 3])
        for n in range(N):
            c[n, 0], c[n, 1], c[n, 2], c[n, 3] = _mma_tf32(a[ia, 0], a[ia, 1], a[ia, 2], a[ia, 3],
                                                           b_s[n, 0], b_s[n, 1], c[n, 0], c[n, 1], c[n, 2], c[n, 3])
        for n in range(N):
            c[n, 0], c[n, 1], c[n, 2], c[n, 3] = _mma_tf32(a[ia, 0], a[ia, 1], a[ia, 2], a[ia, 3],
                                                           b[n, 0], b[n, 1], c[n, 0], c[n, 1], c[n, 2], c[n, 3])
    return mma_n


def make_fragments_times_rows(NS, NO):
    """product(Bs, p, d0, acc, pa, pa_s, bb, bb_s, g, t, scratch): acc [NO, 4] = P B as C fragments, summed from zero
    (3xTF32), where P [16, 8 NS] is the warp's C fragments p [NS, 4] (a probability or dS tile it just computed) and B
    = rows 0 .. 8 NS - 1, columns d0 .. d0 + 8 NO - 1 of Bs in shared memory.

    The k index runs over each 8-row block of B permuted (k = t <-> row 2t, k = t + 4 <-> row 2t + 1): the sum may
    run in any order, and so P's A fragment is p's C fragment reordered in registers, (c0, c2, c1, c3), and P never
    goes through shared memory; b0, b1 = B[2t][g], B[2t + 1][g]. pa, pa_s [1, 4]: one block's A fragment, split;
    bb, bb_s [>= NO, 2]: its B fragments, split. Callers add acc to their fp32 accumulators themselves (the tensor
    cores' own accumulation over thousands of rows rounds less carefully: prefill_mma.py measured it)."""
    mma_n = make_mma_3xtf32_n(NO)

    @cuda.jit(device=True, inline=True)
    def product(Bs, p, d0, acc, pa, pa_s, bb, bb_s, g, t, scratch):
        for c in range(NO):
            for e in range(4):
                acc[c, e] = 0.0
        for n in range(NS):
            pa[0, 0], pa_s[0, 0] = tf32_split(p[n, 0])
            pa[0, 1], pa_s[0, 1] = tf32_split(p[n, 2])
            pa[0, 2], pa_s[0, 2] = tf32_split(p[n, 1])
            pa[0, 3], pa_s[0, 3] = tf32_split(p[n, 3])
            for c in range(NO):
                bb[c, 0], bb_s[c, 0] = tf32_split(Bs[n * 8 + 2 * t, d0 + c * 8 + g])
                bb[c, 1], bb_s[c, 1] = tf32_split(Bs[n * 8 + 2 * t + 1, d0 + c * 8 + g])
            mma_n(pa, pa_s, 0, bb, bb_s, acc, scratch)
    return product


# --------------------------------------------------------------------------------------------------------
# bf16
# --------------------------------------------------------------------------------------------------------
if SIM:
    @cuda.jit(device=True)
    def bf16x2(lo, hi):
        """Simulator twin: the word with bf16(lo) low and bf16(hi) high (bf16_bits' rounding, as cvt.rn.bf16x2.f32;
        per scalar in plain Python: NumPy's per-call cost made this most of a simulated GEMM)."""
        return np.uint32(_bf16_bits_of(lo) | _bf16_bits_of(hi) << 16)

    _F32, _U32 = struct.Struct("<f"), struct.Struct("<I")

    def _bf16_bits_of(x):
        """bf16_bits for one float32 scalar: round to nearest even on the upper 16 bits; a NaN stays a NaN."""
        bits = _U32.unpack(_F32.pack(np.float32(x)))[0]
        if x != x:
            return (bits >> 16) | 0x40
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
else:
    @cuda.jit(device=True, inline=True)
    def bf16x2(lo, hi):
        """The word with bf16(lo) in its low half and bf16(hi) in its high half (one cvt.rn.bf16x2.f32)."""
        return _cvt_bf16x2(lo, hi)


def make_bf16_split(T):
    """split(x0, x1, words): words[0:T] = the T bf16 terms of the pair (x0, x1), packed x0 low, x1 high. Term e
    rounds what terms 0..e-1 left; each subtraction is exact in fp32 (x and its rounding share their leading
    bits), so the error after T terms is that of rounding to 8 T bits: 2^-9, 2^-17, 0 relative for T = 1, 2, 3."""
    @cuda.jit(device=True, inline=True)
    def split(x0, x1, words):
        for e in range(T):
            word = bf16x2(x0, x1)
            words[e] = word
            lo, hi = bf16_pair(word)
            x0 -= lo
            x1 -= hi
    return split


def make_mma_bf16_n(N):
    """mma_n(a, ia, b, c, ic, scratch): c[ic + n] += A b[n] for n < N (bf16 x bf16, fp32 accumulation), in place.
    A: this lane's words a0..a3 in row ia of the local uint32 array a [*, 4]; b: [N, 2] uint32 words; c: [*, 4]
    float32 (the N accumulators from row ic on). The N MMAs are independent: issued back to back on a GPU; one
    exchange in the simulator (scratch from mma_scratch_shape(threads, N, bf16=True))."""
    if SIM:
        @cuda.jit(device=True)
        def mma_n(a, ia, b, c, ic, scratch):
            d = _sim_mma(_sim_words([a[ia, e] for e in range(4)]),
                         [tuple(_sim_words([b[n, 0], b[n, 1]])) for n in range(N)],
                         [tuple(c[ic + n, e] for e in range(4)) for n in range(N)], scratch, LAYOUT_BF16)
            for n in range(N):
                for e in range(4):
                    c[ic + n, e] = d[n][e]
        return mma_n

    @cuda.jit(device=True, inline=True)
    def mma_n(a, ia, b, c, ic, scratch):
        for n in range(N):
            c[ic + n, 0], c[ic + n, 1], c[ic + n, 2], c[ic + n, 3] = _mma_bf16(
                a[ia, 0], a[ia, 1], a[ia, 2], a[ia, 3], b[n, 0], b[n, 1],
                c[ic + n, 0], c[ic + n, 1], c[ic + n, 2], c[ic + n, 3])
    return mma_n
