"""The CPU's GGUF-block arithmetic in LLVM's vector IR: int8 dot products of 32 codes, a group dequantized, fp16.

What you will learn here
------------------------
A CPU's widest arithmetic is on bytes: one AVX-512 VNNI instruction (vpdpbusd) multiplies 64 unsigned bytes by
64 signed bytes and adds each four products into 16 int32 sums, 64 multiply-adds where an fp32 FMA does 16. So a
GEMV on 4- or 8-bit weight codes runs fastest when the activation x is quantized too (llama.cpp's Q8 step):

    x_g ~ dx_g * q_g        a group g of 32 values of x: dx_g = max|x_g| / 127, q_g = round(x_g / dx_g) (int8)
    W[n] . x ~ sum_g dx_g * (a_ng * (c_ng . q_g - z qsum_g) + b_ng qsum_g)       qsum_g = sum(q_g)

with c_ng the group's 32 codes (unsigned bytes), a_ng, b_ng and z its factor, offset and zero point (kernels/
blocks.py). The one product per weight is c . q, a sum of 32 byte products: dot_acc below.

Why LLVM IR and not a Numba loop: Numba types the arithmetic of integers narrower than 64 bits in 64 bits, so a
loop `s += c[t] * q[t]` is vectorised, if at all, as 8-lane int64 multiplies. Written as vector IR instead,

    %c = load <16 x i8>; lo = c & 15; hi = c >> 4                 (4-bit codes: two per byte)
    %p = mul (zext <32 x i8> [lo, hi] to <32 x i32>), (sext <32 x i8> q to <32 x i32>)
    %s = llvm.vector.reduce.add(%p)                                 -> i32

is a pattern LLVM's x86 backend turns into vpdpbusd (plus a horizontal sum of 8 lanes) where the CPU has VNNI,
and into pmaddwd-style code where it has not; other CPUs get their own vector code from the same IR. Where Numba
compiles for this very CPU and it has VNNI (VNNI below), dot_acc calls vpdpbusd itself (llvm.x86.avx512.vpdpbusd
.256) and keeps its 8 int32 sums as 8 float lanes of the row's accumulator: no horizontal sum per group, one per
row (SmolLM2's Q8_0 head 1.23x faster; its Q4_1 matrices the same, their scale records then the limit). An int8
code (Q8_0) is made unsigned first: c + 128 is the byte with its top bit flipped (z = 128). 5- and 6-bit codes
(Q5_0, Q5_1, Q5_K, Q6_K) are unpacked as 4-bit pairs with their high bits merged in from the row's high-bit stream
(one vector shift per lane), and are then bytes like the others.

Memory traffic: 16 (4-bit) or 32 (8-bit) code bytes and 32 activation bytes read, 8 floats of accumulator read
and written (in L1); the caller keeps q in cache (K bytes a token) and streams the codes once. No bounds checks:
the callers (numbattn/cpu_linear.py) pass offsets of whole groups inside the row.

    dot_acc(c, i, q, j, s, acc)      acc[0:8] += s * (codes . q[j : j+32]) spread over the 8 lanes; c uint8:
                                     16 bytes of 4-bit pairs at c[i] (low nibbles . q[j : j+16], high nibbles
                                     . q[j+16 : j+32]); c int8: 32 int8 codes (top bit flipped: c + 128)
    dot_acc_high(c, i, f, q, j, s, acc)   the same for 5-bit codes: the 4-bit pairs at c[i] and bit 4 of each
                                     from f, the group's 32 high bits (HIGH_BIT_OF_LANE: which bit a lane takes)
    dot_acc_q6(c, i, f0, f1, q, j, s0, s1, acc)   6-bit codes (Q6_K): two code words' 4-bit pairs at c[i] with
                                     bits 4, 5 from their fields f0, f1, a scale each (s0, s1), zero point 32
    dot_rows_tokens(c, n, q, j, stride, a, s, k, acc)   the same for ROWS rows and TOKENS tokens of a
                                     prompt chunk at once, over whole rows (G groups; row n + r, token t,
                                     group g: codes c[n + r], x at q[j + t stride + 32 g], scale a[r, g]
                                     s[g, k+t], lanes acc[(r TOKENS + t) 8 : +8]): each group's codes unpacked
                                     once for the TOKENS tokens, each x loaded once for the ROWS rows, the
                                     ROWS x TOKENS accumulators kept in registers across the groups (with a
                                     Numba loop over the groups they went through memory at every group):
                                     the int8 GEMM's step (8 tokens: as fast as 4 on one thread, faster on two)
    dot_rows_tokens_high(c, n, h0, q, j, stride, a, s, k, acc)   the same for 5-bit codes, their bit 4 from the
                                     rows' high-bit stream at byte h0
    dot_rows_tokens_q6(c, n, h0, q, j, stride, a, s, k, acc)   and for Q6_K (a [ROWS, 2 G]: a scale per 16)
    dequantize(c, i, a, b, out, j)   out[j : j+32] = a * codes + b (one vector FMA; prefill's fp32 panels)
    The codes array's dtype picks their unpacking when Numba compiles the caller: uint8 4-bit, int8 8-bit.
    f32_of_half(bits)                an fp16's float32 (vcvtph2ps with F16C)
    prefetch(a, i)                   the cache line of a[i], asked for now
"""
import os

import llvmlite.binding as llvm
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

I8, I32, F32 = ir.IntType(8), ir.IntType(32), ir.FloatType()


def _host_has_vnni():
    """vpdpbusd on 8 lanes (AVX512-VNNI with VL, or AVX-VNNI), where Numba compiles for this very CPU (and
    NUMBATTN_CPU_VNNI=0 does not ask for the portable IR: what the tests compile on purpose)."""
    if numba.config.CPU_NAME is not None or os.environ.get("NUMBATTN_CPU_VNNI") == "0":
        return False
    f = llvm.get_host_cpu_features()
    return bool(f.get("avxvnni") or (f.get("avx512vnni") and f.get("avx512vl")))


VNNI = _host_has_vnni()


def _vector_at(context, builder, array_type, array, index, lanes, element=I8):
    """A pointer to `lanes` elements of a 1-D array at element `index`, as <lanes x element>*."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), ir.VectorType(element, lanes).as_pointer())


def _codes_u4(context, builder, array_type, array, index):
    """16 bytes of 4-bit pairs -> <32 x i8>: the 16 low nibbles, then the 16 high ones."""
    v16 = ir.VectorType(I8, 16)
    codes = builder.load(_vector_at(context, builder, array_type, array, index, 16), align=1)
    lo = builder.and_(codes, ir.Constant(v16, [15] * 16))
    hi = builder.lshr(codes, ir.Constant(v16, [4] * 16))
    return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(I32, 32), list(range(32))))


def _codes_u8(context, builder, array_type, array, index):
    """32 int8 codes -> <32 x i8> unsigned: top bit flipped (c + 128)."""
    v32 = ir.VectorType(I8, 32)
    codes = builder.load(_vector_at(context, builder, array_type, array, index, 32), align=1)
    return builder.xor(codes, ir.Constant(v32, [0x80] * 32))


def _dot_i32(builder, codes, q):
    """reduce.add(zext(codes) * sext(q)) over 32 lanes -> i32: the pattern that becomes vpdpbusd."""
    wide = ir.VectorType(I32, 32)
    products = builder.mul(builder.zext(codes, wide), builder.sext(q, wide))
    reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(I32, [wide]),
                                            "llvm.vector.reduce.add.v32i32")
    return builder.call(reduce, [products])


def _add_scaled_dot(context, builder, codes, x, scale, lanes):
    """lanes[0:8] += scale * (codes . x), codes <32 x i8> unsigned, x <32 x i8> signed, lanes a <8 x float>*. VNNI:
    vpdpbusd's 8 int32 sums of four products each, converted and scaled as a vector (no horizontal sum per group:
    one at the row's end). Else: the reduce.add pattern's int32 into lanes[0]."""
    f8, v8 = ir.VectorType(F32, 8), ir.VectorType(I32, 8)
    if VNNI:
        vpdpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8, v8, v8]),
                                                  "llvm.x86.avx512.vpdpbusd.256")
        sums = builder.call(vpdpbusd, [ir.Constant(v8, [0] * 8), builder.bitcast(codes, v8), builder.bitcast(x, v8)])
        splat = builder.insert_element(ir.Constant(f8, ir.Undefined), scale, ir.Constant(I32, 0))
        splat = builder.shuffle_vector(splat, splat, ir.Constant(v8, [0] * 8))
        builder.store(builder.fadd(builder.load(lanes, align=4), builder.fmul(splat, builder.sitofp(sums, f8))), lanes,
                      align=4)
    else:
        first = builder.bitcast(lanes, F32.as_pointer())
        total = builder.fmul(scale, builder.sitofp(_dot_i32(builder, codes, x), F32))
        builder.store(builder.fadd(builder.load(first, align=4), total), first, align=4)


def _accumulate(context, builder, signature, args, codes):
    """acc[0:8] += scale * (codes . q[j : j+32]); args = (c, i, q, j, scale, acc)."""
    x = builder.load(_vector_at(context, builder, signature.args[2], args[2], args[3], 32), align=1)
    lanes = _vector_at(context, builder, signature.args[5], args[5], ir.Constant(I32, 0), 8, F32)
    _add_scaled_dot(context, builder, codes, x, args[4], lanes)
    return context.get_dummy_value()


def _with_codes(unpack, body):
    """A codegen that unpacks the group's codes (arguments c, i) and hands them to body."""
    def codegen(context, builder, signature, args):
        return body(context, builder, signature, args, unpack(context, builder, signature.args[0], args[0], args[1]))
    return codegen


def _check(c, q, scale=types.float32, acc=None):
    if not (isinstance(c, types.Array) and c.ndim == 1 and c.dtype in (types.uint8, types.int8)
            and isinstance(q, types.Array) and q.ndim == 1 and q.dtype == types.int8 and scale == types.float32
            and (acc is None or (isinstance(acc, types.Array) and acc.ndim == 1 and acc.dtype == types.float32))):
        raise TypeError(f"int8 dot products take 1-D byte arrays (codes), int8 arrays (q), a float32 scale and a "
                        f"1-D float32 acc; not {c}, {q}, {scale}, {acc}")


def _unpack_for(c):
    """The codes' unpacking, chosen by the codes array's dtype at compile time: uint8 rows hold 4-bit pairs, int8
    rows 8-bit codes (Q8_0)."""
    return _codes_u8 if c.dtype == types.int8 else _codes_u4


@intrinsic
def dot_acc(typingctx, c, i, q, j, scale, acc):
    """acc[0:8] += scale * (codes . q[j : j+32]), spread over acc's 8 lanes (sum(acc) is the dot product). c uint8:
    16 bytes of 4-bit pairs at c[i] (low nibbles . q[j : j+16], high nibbles . q[j+16 : j+32]); c int8: 32 int8
    codes at c[i], top bit flipped (c + 128)."""
    _check(c, q, scale, acc)
    return types.none(c, i, q, j, scale, acc), _with_codes(_unpack_for(c), _accumulate)


# 5-bit codes (Q5_0, Q5_1, Q5_K): the group's 16 code bytes as for 4-bit codes, and bit 4 of each code from the
# group's 32-bit high-bit field (its two code words' 16-bit fields): byte b (word b // 8, t = b % 8) holds code
# 16 (b // 8) + t in its low nibble and code 16 (b // 8) + 8 + t in its high one, whose bit 4 is field bit
# 16 (b // 8) + t or 16 (b // 8) + 8 + t: one shift count per lane of the unpacked <32 x i8>.
HIGH_BIT_OF_LANE = ([16 * (b // 8) + b % 8 for b in range(16)] + [16 * (b // 8) + 8 + b % 8 for b in range(16)])


def _codes_u5(context, builder, array_type, array, index, field):
    """_codes_u4's 32 nibbles with bit 4 of each from field (i32): <32 x i8>, codes 0 .. 31."""
    v32, b32 = ir.VectorType(I32, 32), ir.VectorType(I8, 32)
    splat = builder.insert_element(ir.Constant(v32, ir.Undefined), field, ir.Constant(I32, 0))
    splat = builder.shuffle_vector(splat, splat, ir.Constant(v32, [0] * 32))
    bits = builder.and_(builder.lshr(splat, ir.Constant(v32, HIGH_BIT_OF_LANE)), ir.Constant(v32, [1] * 32))
    high = builder.trunc(builder.shl(bits, ir.Constant(v32, [4] * 32)), b32)
    return builder.or_(_codes_u4(context, builder, array_type, array, index), high)


def _low_32(builder, v):
    """An integer argument's low 32 bits as i32 (Numba passes its integers as i64)."""
    width = v.type.width
    return builder.trunc(v, I32) if width > 32 else builder.zext(v, I32) if width < 32 else v


def _load_i32(context, builder, array_type, array, index):
    """The 4 bytes at array[index] (a byte array) as one little-endian i32."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.load(builder.bitcast(builder.gep(data, [index]), I32.as_pointer()), align=1)


def _codes_u5_in_row(context, builder, array_type, array, index, high_index):
    """_codes_u5 with the group's field loaded from the same byte array at high_index (4 bytes, little-endian)."""
    return _codes_u5(context, builder, array_type, array, index,
                     _load_i32(context, builder, array_type, array, high_index))


@intrinsic
def dot_acc_high(typingctx, c, i, field, q, j, scale, acc):
    """dot_acc for 5-bit codes: the 4-bit pairs at c[i] (uint8) with bit 4 of each from field, the group's 32
    high bits (an integer; its low 32 bits: HIGH_BIT_OF_LANE)."""
    _check(c, q, scale, acc)
    if c.dtype != types.uint8 or not isinstance(field, types.Integer):
        raise TypeError(f"dot_acc_high takes uint8 codes and an integer field, not {c}, {field}")

    def codegen(context, builder, signature, args):
        c_, i_, field_, q_, j_, scale_, acc_ = args
        codes = _codes_u5(context, builder, signature.args[0], c_, i_, _low_32(builder, field_))
        x = builder.load(_vector_at(context, builder, signature.args[3], q_, j_, 32), align=1)
        lanes = _vector_at(context, builder, signature.args[6], acc_, ir.Constant(I32, 0), 8, F32)
        _add_scaled_dot(context, builder, codes, x, scale_, lanes)
        return context.get_dummy_value()
    return types.none(c, i, field, q, j, scale, acc), codegen


# 6-bit codes (Q6_K): value = a (c - 32), a scale a per 16 values (one code word). A call takes two code words
# (32 values, one group of x's quantization): their 16 bytes unpacked as 4-bit pairs, bits 4 and 5 of each code
# from its word's 32-bit field (bits 2t, 2t + 1 for code 16 w + t), and two scales. In the unpacked <32 x i8>
# word 0's codes are byte lanes 0-7 and 16-23, word 1's 8-15 and 24-31; vpdpbusd sums four byte lanes into each
# of 8 int32 lanes, so int32 lanes 0, 1, 4, 5 are word 0's and 2, 3, 6, 7 word 1's: a scale vector
# [a0, a0, a1, a1, a0, a0, a1, a1] applies both scales without a horizontal sum. The zero point: 32 q . 1, the same
# lanes' sums of q (one more vpdpbusd, against a vector of ones).
Q6_WORD_OF_LANE = [b // 8 for b in range(16)] * 2
Q6_SHIFT_OF_LANE = [2 * (b % 8) for b in range(16)] + [16 + 2 * (b % 8) for b in range(16)]
Q6_SCALE_OF_I32_LANE = [0, 0, 1, 1, 0, 0, 1, 1]


def _codes_u6(context, builder, array_type, array, index, fields):
    """_codes_u4's 32 nibbles with bits 4 and 5 of each from fields (<2 x i32>: the two words'): <32 x i8>, 0 .. 63."""
    v32, b32 = ir.VectorType(I32, 32), ir.VectorType(I8, 32)
    per_lane = builder.shuffle_vector(fields, fields, ir.Constant(v32, Q6_WORD_OF_LANE))
    bits = builder.and_(builder.lshr(per_lane, ir.Constant(v32, Q6_SHIFT_OF_LANE)), ir.Constant(v32, [3] * 32))
    high = builder.trunc(builder.shl(bits, ir.Constant(v32, [4] * 32)), b32)
    return builder.or_(_codes_u4(context, builder, array_type, array, index), high)


def _add_q6_dot(builder, codes, x, scale0, scale1, lanes):
    """lanes[0:8] += a_w (codes - 32) . x over each word w's lanes (scale0, scale1: a_0, a_1)."""
    f8, v8 = ir.VectorType(F32, 8), ir.VectorType(I32, 8)
    pair = builder.insert_element(builder.insert_element(ir.Constant(ir.VectorType(F32, 2), ir.Undefined), scale0,
                                                         ir.Constant(I32, 0)), scale1, ir.Constant(I32, 1))
    scales = builder.shuffle_vector(pair, pair, ir.Constant(v8, Q6_SCALE_OF_I32_LANE))
    if VNNI:
        vpdpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8, v8, v8]),
                                                  "llvm.x86.avx512.vpdpbusd.256")
        zero, xs = ir.Constant(v8, [0] * 8), builder.bitcast(x, v8)
        sums = builder.call(vpdpbusd, [zero, builder.bitcast(codes, v8), xs])
        ones = builder.call(vpdpbusd, [zero, ir.Constant(v8, [0x01010101] * 8), xs])
        dots = builder.sub(sums, builder.shl(ones, ir.Constant(v8, [5] * 8)))           # - 32 (q . 1)
        builder.store(builder.fadd(builder.load(lanes, align=4), builder.fmul(scales, builder.sitofp(dots, f8))),
                      lanes, align=4)
        return
    wide = ir.VectorType(I32, 32)
    products = builder.mul(builder.sub(builder.zext(codes, wide), ir.Constant(wide, [32] * 32)), builder.sext(x, wide))
    reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(I32, [wide]),
                                            "llvm.vector.reduce.add.v32i32")
    first = builder.bitcast(lanes, F32.as_pointer())
    total = builder.load(first, align=4)
    for w, scale in enumerate((scale0, scale1)):
        mask = ir.Constant(wide, [1 if word == w else 0 for word in Q6_WORD_OF_LANE])
        part = builder.call(reduce, [builder.mul(products, mask)])
        total = builder.fadd(total, builder.fmul(scale, builder.sitofp(part, F32)))
    builder.store(total, first, align=4)


@intrinsic
def dot_acc_q6(typingctx, c, i, field0, field1, q, j, scale0, scale1, acc):
    """acc[0:8] += scale0 ((codes - 32) . q) over code word 0's 16 values + scale1 (...) over word 1's: 6-bit
    codes, the 4-bit pairs at c[i] (uint8, two code words) with bits 4 and 5 from field0, field1 (the words' 32-bit
    high-bit fields), q[j : j+32] in the same order as dot_acc's."""
    _check(c, q, scale0, acc)
    if c.dtype != types.uint8 or scale1 != types.float32 or not (isinstance(field0, types.Integer)
                                                                 and isinstance(field1, types.Integer)):
        raise TypeError(f"dot_acc_q6 takes uint8 codes, two integer fields and two float32 scales, not {c}, "
                        f"{field0}, {field1}, {scale1}")

    def codegen(context, builder, signature, args):
        c_, i_, f0, f1, q_, j_, s0, s1, acc_ = args
        fields = ir.Constant(ir.VectorType(I32, 2), ir.Undefined)
        for k, f in enumerate((f0, f1)):
            fields = builder.insert_element(fields, _low_32(builder, f), ir.Constant(I32, k))
        codes = _codes_u6(context, builder, signature.args[0], c_, i_, fields)
        x = builder.load(_vector_at(context, builder, signature.args[4], q_, j_, 32), align=1)
        lanes = _vector_at(context, builder, signature.args[8], acc_, ir.Constant(I32, 0), 8, F32)
        _add_q6_dot(builder, codes, x, s0, s1, lanes)
        return context.get_dummy_value()
    return types.none(c, i, field0, field1, q, j, scale0, scale1, acc), codegen


# --------------------------------------------------------------------------------------------------------
# A group's 32 codes to floats (prefill's panels: dequantized once, multiplied by BLAS)
# --------------------------------------------------------------------------------------------------------
def _store_affine(context, builder, signature, args, codes):
    """out[j : j+32] = a * float(codes) + b (codes <32 x i8>, unsigned), one vector FMA."""
    f32x32 = ir.VectorType(F32, 32)
    _, _, a, b, out, j = args

    def splat(x):
        v = builder.insert_element(ir.Constant(f32x32, ir.Undefined), x, ir.Constant(I32, 0))
        return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, 32), [0] * 32))
    values = builder.fadd(builder.fmul(splat(a), builder.uitofp(codes, f32x32)), splat(b))
    data = context.make_array(signature.args[4])(context, builder, out).data
    builder.store(values, builder.bitcast(builder.gep(data, [j]), f32x32.as_pointer()), align=4)
    return context.get_dummy_value()


def _check_dequantize(c, a, b, out):
    if not (isinstance(c, types.Array) and c.ndim == 1 and c.dtype in (types.uint8, types.int8)
            and isinstance(out, types.Array) and out.ndim == 1 and out.dtype == types.float32
            and a == types.float32 and b == types.float32):
        raise TypeError(f"dequantize takes a 1-D byte array, float32 a and b, a 1-D float32 out; not "
                        f"{c}, {a}, {b}, {out}")


@intrinsic
def dequantize(typingctx, c, i, a, b, out, j):
    """out[j : j+32] = a * codes + b: a group of 32 codes as floats (c uint8: 4-bit pairs, the low nibbles' 16
    values first; c int8: int8 codes, top bit flipped)."""
    _check_dequantize(c, a, b, out)
    return types.none(c, i, a, b, out, j), _with_codes(_unpack_for(c), _store_affine)


@intrinsic
def f32_of_half(typingctx, bits):
    """The fp16 number whose bits are the low 16 of `bits`, as float32, exactly (fpext: F16C's vcvtph2ps on x86)."""
    if not isinstance(bits, types.Integer):
        raise TypeError(f"f32_of_half takes an integer (fp16 bits), not {bits}")

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(builder.trunc(args[0], ir.IntType(16)), ir.HalfType()), F32)
    return types.float32(bits), codegen


@intrinsic
def prefetch(typingctx, a, i):
    """Ask the memory system for the cache line holding a[i] (a 1-D array) now, to be read soon (llvm.prefetch)."""
    if not (isinstance(a, types.Array) and a.ndim == 1):
        raise TypeError(f"prefetch takes a 1-D array, not {a}")

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, I32, I32, I32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])
        return context.get_dummy_value()
    return types.none(a, i), codegen


# --------------------------------------------------------------------------------------------------------
# A row's codes against TOKENS tokens at once (prefill): each group's codes unpacked once
# --------------------------------------------------------------------------------------------------------
TOKENS = 8          # tokens a call: more independent sums to hide vpdpbusd's latency behind, one unpacking
ROWS = 2            # rows a call: each token's 32 bytes of x, loaded once, serve both (4: slower)


def _make_rows_tokens(bits):
    """The codegen of dot_rows_tokens (bits 0: 4 or 8, told by the codes' dtype), dot_rows_tokens_high (5) and
    dot_rows_tokens_q6 (6): acc[(r TOKENS + t) 8 : +8] = sum_g a[r, g] s[g, k+t] (codes of row n+r, group g) .
    q[j + t stride + 32 g : +32] for r < ROWS, t < TOKENS, over the rows' G groups in one loop (6 bits: a [ROWS,
    2 G], a scale per 16 values, and the zero point 32): the ROWS x TOKENS accumulators live in registers across
    the groups (allocas LLVM promotes), stored to acc once. args = (c, n, [h0,] q, j, stride, a, s, k, acc);
    c [N, bytes] and s [G, Mp] C-contiguous."""
    def codegen(context, builder, signature, args):
        at = (0, 3, 6, 7, 9) if bits else (0, 2, 5, 6, 8)
        c, n, h0 = args[0], args[1], (args[2] if bits else None)
        q, j, stride, a, s, k, acc = (args[i] for i in range(3 if bits else 2, len(args)))
        ctype, qtype, atype, stype, acctype = (signature.args[i] for i in at)
        f8 = ir.VectorType(F32, 8)
        row_bytes = cgutils.unpack_tuple(builder, context.make_array(ctype)(context, builder, c).shape, 2)[1]
        s_array = context.make_array(stype)(context, builder, s)
        G, Mp = cgutils.unpack_tuple(builder, s_array.shape, 2)
        a_data, s_data = context.make_array(atype)(context, builder, a).data, s_array.data
        first = [builder.mul(builder.add(n, ir.Constant(n.type, r)), row_bytes) for r in range(ROWS)]
        lanes = [[cgutils.alloca_once_value(builder, ir.Constant(f8, [0.0] * 8)) for _ in range(TOKENS)]
                 for _ in range(ROWS)]
        per_row = 2 if bits == 6 else 1                 # scales a row keeps per group: a[r, per_row g + h]

        def scale(r, g, h):
            column = builder.add(builder.mul(g, ir.Constant(g.type, per_row)), ir.Constant(g.type, h))
            return builder.load(builder.gep(a_data, [builder.add(builder.mul(ir.Constant(G.type, per_row * r), G),
                                                                 column)]))
        with cgutils.for_range(builder, G) as loop:
            g = loop.index
            codes = [_group_codes(context, builder, bits, ctype, c, first[r], g, h0) for r in range(ROWS)]
            a_g = [[scale(r, g, h) for h in range(per_row)] for r in range(ROWS)]
            row = builder.mul(g, Mp)
            for t in range(TOKENS):
                offset = builder.add(builder.add(j, builder.mul(stride, ir.Constant(stride.type, t))),
                                     builder.mul(g, ir.Constant(g.type, 32)))
                x = builder.load(_vector_at(context, builder, qtype, q, offset, 32), align=1)
                s_gt = builder.load(builder.gep(s_data, [builder.add(row, builder.add(k, ir.Constant(k.type, t)))]))
                for r in range(ROWS):
                    scales = [builder.fmul(a_rh, s_gt) for a_rh in a_g[r]]
                    if bits == 6:
                        _add_q6_dot(builder, codes[r], x, *scales, lanes[r][t])
                    else:
                        _add_scaled_dot(context, builder, codes[r], x, scales[0], lanes[r][t])
        for r in range(ROWS):
            for t in range(TOKENS):
                out = _vector_at(context, builder, acctype, acc, ir.Constant(I32, 8 * (r * TOKENS + t)), 8, F32)
                builder.store(builder.load(lanes[r][t]), out, align=4)
        return context.get_dummy_value()
    return codegen


def _group_codes(context, builder, bits, ctype, c, row_start, g, h0):
    """Group g's 32 codes of the row starting at byte row_start, unpacked (<32 x i8>); 5 and 6 bits: with their
    high bits from the row's stream at byte h0 (a 32-bit field per group, or per code word)."""
    at = builder.add(row_start, builder.mul(g, ir.Constant(g.type, _code_bytes(ctype))))
    if bits == 5:
        field = builder.add(builder.add(row_start, h0), builder.mul(g, ir.Constant(g.type, 4)))
        return _codes_u5_in_row(context, builder, ctype, c, at, field)
    if bits == 6:
        start = builder.add(builder.add(row_start, h0), builder.mul(g, ir.Constant(g.type, 8)))
        fields = ir.Constant(ir.VectorType(I32, 2), ir.Undefined)
        for w in range(2):
            word = _load_i32(context, builder, ctype, c, builder.add(start, ir.Constant(start.type, 4 * w)))
            fields = builder.insert_element(fields, word, ir.Constant(I32, w))
        return _codes_u6(context, builder, ctype, c, at, fields)
    return _unpack_for(ctype)(context, builder, ctype, c, at)


@intrinsic
def dot_rows_tokens(typingctx, c, n, q, j, stride, a, s, k, acc):
    """dot_acc for ROWS rows and TOKENS tokens of a prompt chunk at once, over whole rows: acc[(r TOKENS + t) 8 :
    +8] = the lanes of token t's dot product with row n + r of c [N, bytes] (G groups: s.shape[0]), token t's group
    g at q[j + t stride + 32 g], scaled by a[r, g] s[g, k + t]; each group's codes unpacked once for the TOKENS
    tokens, each token's x once for the ROWS rows."""
    _check_rows_tokens(c, q, a, s, acc)
    return types.none(c, n, q, j, stride, a, s, k, acc), _make_rows_tokens(0)


def _check_rows_tokens(c, q, a, s, acc):
    ok = (isinstance(c, types.Array) and c.ndim == 2 and c.layout == "C" and c.dtype in (types.uint8, types.int8)
          and isinstance(q, types.Array) and q.ndim == 1 and q.dtype == types.int8
          and all(isinstance(x, types.Array) and x.dtype == types.float32 and x.layout == "C" for x in (a, s, acc))
          and (a.ndim, s.ndim, acc.ndim) == (2, 2, 1))
    if not ok:
        raise TypeError(f"dot_rows_tokens takes codes [N, bytes] (uint8 or int8), q int8, a [ROWS, G], s [G, Mp] and "
                        f"acc float32 (C order); not {c}, {q}, {a}, {s}, {acc}")


def _high_rows_tokens(bits, c, n, h0, q, j, stride, a, s, k, acc):
    if not (isinstance(c, types.Array) and c.dtype == types.uint8 and isinstance(h0, types.Integer)):
        raise TypeError(f"dot_rows_tokens for {bits}-bit codes takes uint8 codes and an integer h0, not {c}, {h0}")
    _check_rows_tokens(c, q, a, s, acc)
    return types.none(c, n, h0, q, j, stride, a, s, k, acc), _make_rows_tokens(bits)


@intrinsic
def dot_rows_tokens_high(typingctx, c, n, h0, q, j, stride, a, s, k, acc):
    """dot_rows_tokens for 5-bit codes (uint8 rows): bit 4 of each code from the row's high-bit stream at byte h0
    (group g's 32-bit field at h0 + 4 g, as dot_acc_high takes it)."""
    return _high_rows_tokens(5, c, n, h0, q, j, stride, a, s, k, acc)


@intrinsic
def dot_rows_tokens_q6(typingctx, c, n, h0, q, j, stride, a, s, k, acc):
    """dot_rows_tokens for Q6_K (uint8 rows): bits 4 and 5 from the row's high-bit stream at byte h0 (code word w's
    32-bit field at h0 + 4 w), a [ROWS, 2 G]: a scale per 16 values, the zero point 32 (as dot_acc_q6)."""
    return _high_rows_tokens(6, c, n, h0, q, j, stride, a, s, k, acc)


def _code_bytes(c):
    """Code bytes a group of 32 takes in rows of Numba array type c: 32 (int8: 8-bit codes) or 16 (uint8: 4-bit
    pairs)."""
    return 32 if c.dtype == types.int8 else 16


@intrinsic
def code_bytes(typingctx, c):
    """_code_bytes for the kernels: the code bytes a group of 32 takes in rows c (a compile-time constant)."""
    if not (isinstance(c, types.Array) and c.dtype in (types.uint8, types.int8)):
        raise TypeError(f"code_bytes takes an array of codes (uint8 or int8), not {c}")
    n = _code_bytes(c)

    def codegen(context, builder, signature, args):
        return context.get_constant(types.intp, n)
    return types.intp(c), codegen

