"""Tensor cores from Numba: TF32 warp MMAs through inline PTX, and their simulator twins.

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
    mma_scratch_shape(threads, n)      the shared scratch the simulator twin needs (a 1-element dummy on a GPU)

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
import threading

import numpy as np
from llvmlite import ir
from numba import cuda, float32, types
from numba.cuda.extending import intrinsic

from .common import SIM


def mma_scratch_shape(threads, n=1, sim=None):
    """Shape of the shared scratch of the simulator twin for MMAs with up to n B fragments per call (make_mma_3xtf32_n):
    (2 slots, warps, 4 + 2 n operands, 32 lanes), as each lane posts a0..a3 and n pairs b0, b1; (1, 1, 1, 1) on a
    GPU."""
    sim = SIM if sim is None else sim
    return (2, max(1, threads // 32), 4 + 2 * n, 32) if sim else (1, 1, 1, 1)


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


@intrinsic
def _mma_tf32(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """One m16n8k8 TF32 MMA of the warp; A and B words are TF32 bit patterns held in float32 values."""
    ret = types.UniTuple(float32, 4)

    def codegen(context, builder, signature, args):
        i32, f32 = ir.IntType(32), ir.FloatType()
        fnty = ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32] * 6 + [f32] * 4)
        mma = ir.InlineAsm(fnty, "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                                 "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
                           "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
        ab = [builder.bitcast(x, i32) for x in args[:6]]
        d = builder.call(mma, ab + list(args[6:]))
        return context.make_tuple(builder, ret, [builder.extract_value(d, i) for i in range(4)])
    return ret(*([float32] * 10)), codegen


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


def mma_reference(a, b, c):
    """NumPy: D = A B + C for one 16x8x8 tile from whole matrices (float64 sums, rounded to float32)."""
    return (a.astype(np.float64) @ b.astype(np.float64) + c).astype(np.float32)


def _layout():
    """(operand, lane) of every element of A [16, 8], B [8, 8] and C [16, 8] by the PTX layout (index arrays):
    operands numbered a0..a3 = 0..3, b0, b1 = 4, 5, c0..c3 = 6..9, as a lane posts them."""
    op = {"A": np.zeros((16, 8), int), "B": np.zeros((8, 8), int), "C": np.zeros((16, 8), int)}
    lane_of = {name: np.zeros_like(x) for name, x in op.items()}
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        where = {"A": [(g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4)], "B": [(t, g), (t + 4, g)],
                 "C": [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]}
        first = {"A": 0, "B": 4, "C": 6}
        for name, cells in where.items():
            for i, cell in enumerate(cells):
                op[name][cell], lane_of[name][cell] = first[name] + i, lane
    return {name: (op[name], lane_of[name]) for name in op}


LAYOUT = _layout()


_lane = threading.local()     # the simulator runs each CUDA thread as a Python thread: its own exchange count


def _sim_mma(a, bs, cs, scratch):
    """Simulator: this lane's four D elements of A B[n] + C[n] for each n (a: a0..a3; bs: n pairs b0, b1; cs: n
    quadruples c0..c3, kept by the lane). Post A and the B fragments, wait, compute from the warp's posts.
    Exchanges alternate between two slots of scratch, so one barrier each is enough: a lane writes a slot again
    two exchanges later, after the barrier of the exchange between, which every lane passes only once it has
    read the slot."""
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
    rows = frags[LAYOUT["A"]][[g, g + 8]]                                               # [2, 8]: rows g, g + 8 of A
    b_op, b_lane = LAYOUT["B"]
    cols = np.stack([frags[b_op + 2 * n, b_lane][:, [2 * t, 2 * t + 1]] for n in range(len(bs))])  # [n, 8, 2]
    d = rows @ cols + np.asarray(cs, np.float64).reshape(-1, 2, 2)                    # [n, 2, 2]: c0 c1 / c2 c3
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
