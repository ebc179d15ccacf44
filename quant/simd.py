"""Integer SIMD steps for the quantized dot products, as Numba intrinsics that emit LLVM vector IR.

Accumulators are small stack arrays (kernels._stack) that LLVM keeps in vector registers: 8 int32 or 8 float32
lanes at an element offset. Each step is what ggml-cpu's x86 vec_dot kernels do with intrinsics (arch/x86/quants.c):
`_mm256_maddubs_epi16` (unsigned x signed bytes, pairs summed to int16) then `_mm256_madd_epi16` with a
sub-block scale, or `_mm256_dpbusd_epi32` where AVX512-VNNI has it. Which instructions are used is decided
for the host CPU when a kernel compiles: VNNI (AVX512-VNNI with VL, or AVX-VNNI), else AVX2; without AVX2
there are no integer kernels (`AVAILABLE` is False) and the float kernels serve every type.
"""
from __future__ import annotations

from typing import Any

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_FEATURES = llvm.get_host_cpu_features()
AVX2 = bool(_FEATURES.get("avx2"))
VNNI = AVX2 and bool((_FEATURES.get("avx512vnni") and _FEATURES.get("avx512vl")) or _FEATURES.get("avxvnni"))
AVAILABLE = AVX2

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_B32 = ir.VectorType(_I8, 32)    # 32 bytes
_B16 = ir.VectorType(_I8, 16)
_W16 = ir.VectorType(_I16, 16)   # 16 int16
_D8 = ir.VectorType(_I32, 8)     # 8 int32
_F8 = ir.VectorType(_F32, 8)     # 8 float32


def _ptr(context: Any, builder: ir.IRBuilder, aryty: types.Array, ary: Any, off: Any, vty: ir.Type) -> Any:
    """A pointer to a `vty` at element `off` of array `ary`."""
    a = context.make_array(aryty)(context, builder, ary)
    return builder.bitcast(builder.gep(a.data, [off]), vty.as_pointer())


def _fn(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Type]) -> Any:
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _splat(builder: ir.IRBuilder, vty: ir.VectorType, v: Any) -> Any:
    x = builder.insert_element(ir.Constant(vty, ir.Undefined), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(x, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(_I32, vty.count),
                                                                                [0] * vty.count))


def _maddubs(builder: ir.IRBuilder, u: Any, s: Any) -> Any:
    """16 int16: u[2i]*s[2i] + u[2i+1]*s[2i+1] for unsigned bytes u, signed bytes s (saturating; the callers'
    operands never reach it)."""
    return builder.call(_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _W16, [_B32, _B32]), [u, s])


def _madd_acc(builder: ir.IRBuilder, acc: Any, p16: Any, scale16: Any) -> Any:
    """acc (8 int32) + pairwise sums of p16 * scale16 (int16 x int16)."""
    if VNNI:
        return builder.call(_fn(builder, "llvm.x86.avx512.vpdpwssd.256", _D8, [_D8, _D8, _D8]),
                            [acc, builder.bitcast(p16, _D8), builder.bitcast(scale16, _D8)])
    return builder.add(acc, builder.call(_fn(builder, "llvm.x86.avx2.pmadd.wd", _D8, [_W16, _W16]), [p16, scale16]))


def _dot_u8s8(builder: ir.IRBuilder, acc: Any, u: Any, s: Any) -> Any:
    """acc (8 int32) + sums of four u*s products (unsigned x signed bytes)."""
    if VNNI:
        return builder.call(_fn(builder, "llvm.x86.avx512.vpdpbusd.256", _D8, [_D8, _D8, _D8]),
                            [acc, builder.bitcast(u, _D8), builder.bitcast(s, _D8)])
    return _madd_acc(builder, acc, _maddubs(builder, u, s), ir.Constant(_W16, [1] * 16))


@intrinsic
def hsum(typingctx: Any, accf: Any, fo: Any) -> Any:
    """The sum of accf[fo:fo+8] (float32)."""
    sig = types.float32(accf, fo)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        v = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _F8), align=4)
        return builder.call(_fn(builder, "llvm.vector.reduce.fadd.v8f32", _F32, [_F32, _F8]), [ir.Constant(_F32, 0.0), v])
    return sig, codegen


# ---- whole blocks: the weights' scales decoded in vector registers, then shared by several activation rows ----

def _k4_scale_words(builder: ir.IRBuilder, u0: Any, u1: Any, u2: Any) -> tuple[Any, Any]:
    """Q4_K / Q5_K's 12 scale bytes (as three uint32 words) to the eight 6-bit scales and eight mins, one per
    byte of an i64 each (ggml's utmp / kmask unpacking)."""
    c = lambda v: ir.Constant(_I32, v)  # noqa: E731
    lo6, lo4, hi2 = c(0x3F3F3F3F), c(0x0F0F0F0F), c(0x30303030)
    sc_lo = builder.and_(u0, lo6)
    sc_hi = builder.or_(builder.and_(u2, lo4), builder.and_(builder.lshr(u0, c(2)), hi2))
    mn_lo = builder.and_(u1, lo6)
    mn_hi = builder.or_(builder.and_(builder.lshr(u2, c(4)), lo4), builder.and_(builder.lshr(u1, c(2)), hi2))
    join = lambda lo, hi: builder.or_(builder.zext(lo, _I64), builder.shl(builder.zext(hi, _I64), ir.Constant(_I64, 32)))  # noqa: E731,E501
    return join(sc_lo, sc_hi), join(mn_lo, mn_hi)


def _load_at(builder: ir.IRBuilder, data: Any, off: Any, ty: ir.Type, align: int = 1) -> Any:
    return builder.load(builder.bitcast(builder.gep(data, [off]), ty.as_pointer()), align=align)


def _plus(builder: ir.IRBuilder, off: Any, k: int) -> Any:
    return builder.add(off, ir.Constant(off.type, k))


def _f16_pair(builder: ir.IRBuilder, data: Any, off: Any) -> tuple[Any, Any]:
    """The two fp16 at bytes off..off+4 as float32 (vcvtph2ps)."""
    h = builder.bitcast(_load_at(builder, data, off, ir.VectorType(_I16, 2)), ir.VectorType(ir.HalfType(), 2))
    f = builder.fpext(h, ir.VectorType(_F32, 2))
    return builder.extract_element(f, ir.Constant(_I32, 0)), builder.extract_element(f, ir.Constant(_I32, 1))


def _f16(builder: ir.IRBuilder, data: Any, off: Any, second: bool = False) -> Any:
    """The fp16 at bytes off..off+2 (second=False) or off+2..off+4 as float32, read as a 4-byte word: a lone 2-byte
    load becomes vpinsrw into a live register, whose old value (often an accumulator) the conversion then waits for."""
    a, b = _f16_pair(builder, data, off)
    return b if second else a


def _block_data(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> tuple[Any, ...]:
    """A block intrinsic's data pointers: accumulators, weights, activation quants, their sums, their scales
    (arguments 0, 2, 4, 7, 10 of the shared signature)."""
    return tuple(context.make_array(sig.args[i])(context, builder, args[i]).data for i in (0, 2, 4, 7, 10))


ROWS = 8   # blocks exist for 1..ROWS activation rows: a decode batch's rows of one expert go in one pass


def _chains(ntok: int) -> int:
    """Independent integer accumulators per activation row: four hide the multiply-add latency for one row;
    with more rows the rows' own chains do, and four each would not fit the registers."""
    return 4 if ntok <= 3 else 1


def _sum(builder: ir.IRBuilder, vs: list) -> Any:
    """The sum of int32 vectors in pairs (the integer total is exact, whatever the order)."""
    while len(vs) > 1:
        vs = [builder.add(vs[i], vs[i + 1]) for i in range(0, len(vs) - 1, 2)] + ([vs[-1]] if len(vs) % 2 else [])
    return vs[0]


def _pack(builder: ir.IRBuilder, a: Any, b: Any) -> Any:
    """16 int16 from two vectors of 8 int32 (vpackssdw: a0-3, b0-3, a4-7, b4-7; the callers' values fit)."""
    return builder.call(_fn(builder, "llvm.x86.avx2.packssdw", _W16, [_D8, _D8]), [a, b])


def _pair_lanes(a: list[int], b: list[int]) -> list[int]:
    """The scale index of each int16 lane of _pack(vpdpbusd of group a, of group b), from the groups' own lanes
    (a[m]: the scale of maddubs lane m, so of bytes 2m, 2m+1; constant over each four bytes)."""
    return [a[2 * l] for l in range(4)] + [b[2 * l] for l in range(4)] + [a[2 * l] for l in range(4, 8)] + \
        [b[2 * l] for l in range(4, 8)]


def _scales(builder: ir.IRBuilder, sc16: Any, lanes: list[list[int]], pairs: bool) -> list:
    """Scale vectors (16 int16) for the eight 32-quant groups whose lanes[i][m] is the scale index (into sc16) of
    maddubs lane m, or for the four pairs of groups when `pairs` (see _dot_groups)."""
    if pairs:
        lanes = [_pair_lanes(lanes[2 * j], lanes[2 * j + 1]) for j in range(4)]
    n = sc16.type.count
    return [builder.shuffle_vector(sc16, ir.Constant(ir.VectorType(_I16, n), ir.Undefined),
                                   ir.Constant(ir.VectorType(_I32, 16), m)) for m in lanes]


def _dot_groups(builder: ir.IRBuilder, ntok: int, quants: list, data: Any, off: Any, scales: list,
                pairs: bool) -> Any:
    """8 int32 lanes summing to: over the eight groups, quants[i] . (the 32 activation bytes at off + 32i in data)
    (unsigned x signed bytes) times the group's scales. Without `pairs`, maddubs then a scaled madd per group;
    with them (VNNI), each group's 32 products summed in fours by vpdpbusd (|sum| <= 4 * 63 * 127 fits int16), two
    groups packed to int16, then one scaled madd: three multiplies for two groups where the first way takes four."""
    qv = [_load_at(builder, data, _plus(builder, off, 32 * i), _B32) for i in range(8)]
    chains = [ir.Constant(_D8, [0] * 8)] * _chains(ntok)
    for i in range(len(scales)):
        k = i % len(chains)
        if pairs:
            zero = ir.Constant(_D8, [0] * 8)
            a = _dot_u8s8(builder, zero, quants[2 * i], qv[2 * i])
            b = _dot_u8s8(builder, zero, quants[2 * i + 1], qv[2 * i + 1])
            chains[k] = _madd_acc(builder, chains[k], _pack(builder, a, b), scales[i])
        else:
            chains[k] = _madd_acc(builder, chains[k], _maddubs(builder, quants[i], qv[i]), scales[i])
    return _sum(builder, chains)


# Q4_K and Q5_K blocks read their activations in this order (int8.Acts makes it once per input, `q8kt`): vector j
# (activation bytes 32j..32j+31) lane l (4 bytes) pairs with the weights of sub-block 2(l % 4) + j // 4, positions
# 4m..4m+3 where m = j % 4 + 4 (l // 4). Then each int32 lane of a vpdpbusd sums one sub-block's products.
Q8K_ORDER = [32 * (2 * (l % 4) + j // 4) + 4 * (j % 4 + 4 * (l // 4)) + b for j in range(8) for l in range(8)
             for b in range(4)]


def _sv(builder: ir.IRBuilder, a: Any, b: Any, mask: list[int]) -> Any:
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(mask)), mask))


def _k4_transposed(builder: ir.IRBuilder, wd: Any, wo: Any, qs0: int, five: bool) -> list:
    """A Q4_K (Q5_K: five) block's 256 quants as eight vectors of 32 bytes in Q8K_ORDER: the four 32-byte chunks
    of qs transposed as a 4 x 8 matrix of dwords (unpack 32 then 64: lanes k and k + 4 of U[m] are chunk k's dwords
    m and m + 4), then the low nibbles (even sub-blocks) and the high ones (odd)."""
    C = [_load_at(builder, wd, _plus(builder, wo, qs0 + 32 * c), _D8) for c in range(4)]
    lo32, hi32 = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
    lo64, hi64 = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    a, b = _sv(builder, C[0], C[1], lo32), _sv(builder, C[0], C[1], hi32)
    c, d = _sv(builder, C[2], C[3], lo32), _sv(builder, C[2], C[3], hi32)
    U = [builder.bitcast(_sv(builder, x, y, m), _B32)
         for x, y, m in ((a, c, lo64), (a, c, hi64), (b, d, lo64), (b, d, hi64))]
    m15 = ir.Constant(_B32, [15] * 32)
    even = [builder.and_(u, m15) for u in U]
    odd = [builder.and_(builder.lshr(u, ir.Constant(_B32, [4] * 32)), m15) for u in U]
    if five:                                 # bit s of qh[p] is the fifth bit of sub-block s, position p
        qh = _load_at(builder, wd, _plus(builder, wo, 16), _D8)
        one = ir.Constant(_B32, [1] * 32)
        for m in range(4):
            h = _sv(builder, qh, qh, [m] * 4 + [m + 4] * 4)            # the positions of U[m]'s lanes
            for t, first in ((even, 0), (odd, 1)):
                shift = ir.Constant(_D8, [first + 2 * k for k in range(4)] * 2)
                bit = builder.and_(builder.bitcast(builder.lshr(h, shift), _B32), one)
                t[m] = builder.or_(t[m], builder.shl(bit, ir.Constant(_B32, [4] * 32)))
    return even + odd


def _two_sums(builder: ir.IRBuilder, a: Any, b: Any) -> tuple[Any, Any]:
    """The sums of a's and of b's 8 int32 lanes (exact, in any order), as float32: one shuffle tree for both."""
    s = builder.add(_sv(builder, a, b, [0, 1, 2, 3, 8, 9, 10, 11]), _sv(builder, a, b, [4, 5, 6, 7, 12, 13, 14, 15]))
    s = builder.add(s, _sv(builder, s, s, [2, 3, 0, 1, 6, 7, 4, 5]))
    s = builder.add(s, _sv(builder, s, s, [1, 0, 3, 2, 5, 4, 7, 6]))
    f = builder.sitofp(s, _F8)
    return builder.extract_element(f, ir.Constant(_I32, 0)), builder.extract_element(f, ir.Constant(_I32, 4))


def _accumulate_k4(builder: ir.IRBuilder, fa: Any, fo: Any, isum: Any, msum: Any, dx: Any, d: Any, dmin: Any) -> Any:
    """accf[fo] = fma(msum, -(dx * dmin), fma(isum, dx * d, accf[fo])): a Q4_K block's two integer totals (as
    float32) for one weight row and one activation row, scaled as every Q4_K kernel does (the interleaved ones
    with a weight row per lane, quant/repack.py), so that a row's result is the same bits whichever computed it."""
    pf = builder.gep(fa, [fo])
    fma = _fn(builder, "llvm.fma.f32", _F32, [_F32, _F32, _F32])
    r = builder.call(fma, [isum, builder.fmul(dx, d), builder.load(pf, align=4)])
    r = builder.call(fma, [msum, builder.fneg(builder.fmul(dx, dmin)), r])
    builder.store(r, pf, align=4)


def _make_q4_k_block(ntok: int, five: bool = False) -> Any:
    """Q4_K (or Q5_K, five=True) blocks against Q8_K activations in Q8K_ORDER: scales, mins and quants decoded once
    into registers, transposed so that each int32 lane of a vpdpbusd accumulates one sub-block, then dotted with
    each of ntok activation rows. Per row that leaves eight vpdpbusd, one pack of the sixteen sub-block sums to
    int16 (|sum| <= 16 * 15 * 127, or 8 * 31 * 127 for Q5_K, whose four vectors a side pack in two halves) and
    one scaled madd, where a sub-block per vector takes four packs and four madds a row (bench/int8_rows.py gives
    the rates). Q4_K: the sums the mins multiply are int16 sums per 32 (int8.quantize_q8_k's b32), and a row's
    block ends in two integer totals scaled as the interleaved kernels scale them (_accumulate_k4); Q5_K: they come
    as float32, d times each 32 quants' sum (m), so that a row's mins term is one FMA with -dmin * mins."""
    qs0 = 48 if five else 16                                          # Q5_K: qh[32] sits before qs
    halves = 2 if five else 1

    @intrinsic
    def q4_k_block(typingctx: Any, accf: Any, fo: Any, w: Any, wo: Any, q: Any, qo: Any, qs: Any, m: Any, bo: Any,
                   bs: Any, d: Any, do: Any, ds: Any) -> Any:
        sig = types.void(accf, fo, w, wo, q, qo, qs, m, bo, bs, d, do, ds)

        def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
            accf_v, fo_v, w_v, wo_v, q_v, qo_v, qs_v, b_v, bo_v, bs_v, d_v, do_v, ds_v = args
            fa, wd, qd, bd, dd = _block_data(context, builder, sig, args)
            words = [_load_at(builder, wd, _plus(builder, wo_v, 4 + 4 * i), _I32) for i in range(3)]
            sc, mn = _k4_scale_words(builder, *words)
            sc16 = builder.zext(builder.bitcast(sc, ir.VectorType(_I8, 8)), ir.VectorType(_I16, 8))
            scales = builder.shuffle_vector(sc16, ir.Constant(ir.VectorType(_I16, 8), ir.Undefined),   # _pack's lanes
                                            ir.Constant(ir.VectorType(_I32, 16), [0, 2, 4, 6, 1, 3, 5, 7] * 2))
            mins = builder.zext(builder.bitcast(mn, ir.VectorType(_I8, 8)), _D8)
            dw, dminw = _f16_pair(builder, wd, wo_v)
            quants = _k4_transposed(builder, wd, wo_v, qs0, five)
            zero = ir.Constant(_D8, [0] * 8)
            per = 4 // halves                                        # vectors a side per pack
            for t in range(ntok):                                    # each activation row reuses quants and scales
                qt = _row(builder, qo_v, qs_v, t)
                x = [_load_at(builder, qd, _plus(builder, qt, 32 * j), _B32) for j in range(8)]
                total = zero
                for h in range(halves):
                    sides = []
                    for side in range(2):                            # even sub-blocks, then odd
                        acc = zero
                        for j in range(4 * side + per * h, 4 * side + per * (h + 1)):
                            acc = _dot_u8s8(builder, acc, quants[j], x[j])
                        sides.append(acc)
                    total = _madd_acc(builder, total, _pack(builder, sides[0], sides[1]), scales)
                bt = _row(builder, bo_v, bs_v, t)
                dx = _load_at(builder, dd, _row(builder, do_v, ds_v, t), _F32, 4)
                if not five:
                    b32 = builder.sext(_load_at(builder, bd, bt, ir.VectorType(_I16, 8), 2), _D8)
                    _accumulate_k4(builder, fa, builder.add(fo_v, ir.Constant(fo_v.type, 8 * t)),
                                   *_two_sums(builder, total, builder.mul(mins, b32)), dx, dw, dminw)
                    continue
                mscaled = builder.fmul(builder.uitofp(mins, _F8), _splat(builder, _F8, builder.fneg(dminw)))
                pf = builder.bitcast(builder.gep(fa, [builder.add(fo_v, ir.Constant(fo_v.type, 8 * t))]), _F8.as_pointer())
                r = builder.load(pf, align=4)
                r = builder.call(_fn(builder, "llvm.fma.v8f32", _F8, [_F8, _F8, _F8]),
                                 [builder.sitofp(total, _F8), _splat(builder, _F8, builder.fmul(dx, dw)), r])
                r = builder.call(_fn(builder, "llvm.fma.v8f32", _F8, [_F8, _F8, _F8]),     # - dmin * mins . (d * sums)
                                 [mscaled, _load_at(builder, bd, bt, _F8, align=4), r])
                builder.store(r, pf, align=4)
            return context.get_dummy_value()
        return sig, codegen
    return q4_k_block


# q4_k_block<t>: accf[fo + 8i] += one Q4_K block (bytes wo..) . the Q8_K block of activation row i < t (quants in
# Q8K_ORDER at qo + i*qs, the int16 sums per 32 at bo + i*bs, d at do + i*ds); q5_k_block<t>: accf[fo + 8i : +8],
# with d times the sums per 32 (float32) for sums, the lanes summed by the caller (hsum). A few-row product
# (a decode batch) decodes each weight block once for all its rows; each row's arithmetic is the one-row block's,
# so its result does not depend on the rows beside it.
q4_k_block1, q4_k_block2, q4_k_block3, q4_k_block4, q4_k_block5, q4_k_block6, q4_k_block7, q4_k_block8 = (
    _make_q4_k_block(t) for t in range(1, ROWS + 1))
q5_k_block1, q5_k_block2, q5_k_block3, q5_k_block4, q5_k_block5, q5_k_block6, q5_k_block7, q5_k_block8 = (
    _make_q4_k_block(t, five=True) for t in range(1, ROWS + 1))


# Q4_K x8 (quant/repack.py): eight weight rows' blocks k interleaved, X8_BYTES per group: d[8], dmin[8] (fp16),
# the 6-bit scales as bytes sc[8 sub-blocks][8 rows], mins as mn[4 pairs][8 rows][2], then qs as 4 chunks x 8
# vectors of 32 bytes: vector (c, i) holds, for each row, bytes 4i..4i+3 of that row's 32-byte chunk c.
X8_SCALES, X8_MINS, X8_QS, X8_BYTES = 32, 96, 160, 1184


def _make_q4_k_x8_block(ntok: int) -> Any:
    """Eight interleaved Q4_K rows' block against ntok Q8_K activation rows (natural order), a weight row per
    lane: each vpdpbusd takes four quants of each of the eight rows and four activation bytes broadcast, so a
    sub-block's sums land one per row and are scaled by one vpmulld; the mins are four vpdpwssd. The two
    integer totals are scaled as _accumulate_k4 does, lane by lane: the same bits as the plain Q4_K block."""
    @intrinsic
    def x8_block(typingctx: Any, accf: Any, fo: Any, w: Any, wo: Any, q: Any, qo: Any, qs: Any, b32: Any, bo: Any,
                 bs: Any, d: Any, do: Any, ds: Any) -> Any:
        sig = types.void(accf, fo, w, wo, q, qo, qs, b32, bo, bs, d, do, ds)

        def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
            accf_v, fo_v, w_v, wo_v, q_v, qo_v, qs_v, b_v, bo_v, bs_v, d_v, do_v, ds_v = args
            fa, wd, qd, bd, dd = _block_data(context, builder, sig, args)
            h8 = ir.VectorType(ir.HalfType(), 8)
            dw = builder.fpext(builder.bitcast(_load_at(builder, wd, wo_v, ir.VectorType(_I16, 8)), h8), _F8)
            dmw = builder.fpext(builder.bitcast(_load_at(builder, wd, _plus(builder, wo_v, 16), ir.VectorType(_I16, 8)),
                                                h8), _F8)
            rows = [_row(builder, qo_v, qs_v, t) for t in range(ntok)]
            zero = ir.Constant(_D8, [0] * 8)
            isum = [zero] * ntok
            m15 = ir.Constant(_B32, [15] * 32)
            for c in range(4):
                raw = [_load_at(builder, wd, _plus(builder, wo_v, X8_QS + 256 * c + 32 * i), _B32) for i in range(8)]
                for half, shift in ((0, None), (1, ir.Constant(_B32, [4] * 32))):
                    wq = [builder.and_(r if shift is None else builder.lshr(r, shift), m15) for r in raw]
                    j = 2 * c + half                                          # the sub-block
                    sc = builder.zext(_load_at(builder, wd, _plus(builder, wo_v, X8_SCALES + 8 * j),
                                               ir.VectorType(_I8, 8)), _D8)
                    for t in range(ntok):
                        acc = zero
                        for i in range(8):
                            x = _load_at(builder, qd, _plus(builder, rows[t], 32 * j + 4 * i), _I32)
                            acc = _dot_u8s8(builder, acc, wq[i], builder.bitcast(_splat(builder, _D8, x), _B32))
                        isum[t] = builder.add(isum[t], builder.mul(acc, sc))
                if ntok > 1:
                    _fence(builder)
            mins = [builder.zext(_load_at(builder, wd, _plus(builder, wo_v, X8_MINS + 16 * k), _B16), _W16)
                    for k in range(4)]
            fma = _fn(builder, "llvm.fma.v8f32", _F8, [_F8, _F8, _F8])
            for t in range(ntok):
                bt = _row(builder, bo_v, bs_v, t)
                msum = zero
                for k in range(4):                                            # sums per 32 of sub-blocks 2k, 2k+1
                    pair = _splat(builder, _D8, _load_at(builder, bd, _plus(builder, bt, 2 * k), _I32, 2))
                    msum = _madd_acc(builder, msum, mins[k], builder.bitcast(pair, _W16))
                dx = _splat(builder, _F8, _load_at(builder, dd, _row(builder, do_v, ds_v, t), _F32, 4))
                pf = builder.bitcast(builder.gep(fa, [builder.add(fo_v, ir.Constant(fo_v.type, 8 * t))]), _F8.as_pointer())
                r = builder.call(fma, [builder.sitofp(isum[t], _F8), builder.fmul(dx, dw), builder.load(pf, align=4)])
                r = builder.call(fma, [builder.sitofp(msum, _F8), builder.fneg(builder.fmul(dx, dmw)), r])
                builder.store(r, pf, align=4)
            return context.get_dummy_value()
        return sig, codegen
    return x8_block


def _fence(builder: ir.IRBuilder) -> None:
    """An empty asm statement that clobbers memory: no load after it moves above it. Without it LLVM hoists a
    whole interleaved block's unpacked quants (64 vectors) above the products of several rows, and spills them."""
    builder.call(ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), "", "~{memory}", side_effect=True), [])


X8_ROWS = 8   # activation rows per pass over an interleaved group
(q4_k_x8_block1, q4_k_x8_block2, q4_k_x8_block3, q4_k_x8_block4, q4_k_x8_block5, q4_k_x8_block6, q4_k_x8_block7,
 q4_k_x8_block8) = (_make_q4_k_x8_block(t) for t in range(1, X8_ROWS + 1))


def _make_q6_k_block(ntok: int, pairs: bool = VNNI) -> Any:
    """Q6_K blocks (ql[128], qh[64], scales[16] int8, d) against Q8_K activations: the 6-bit quants and the 16
    scales decoded once; per row, sum(sc * (q6 . x)) - 32 * sum(sc * b16) in integers, scaled once."""
    @intrinsic
    def q6_k_block(typingctx: Any, accf: Any, fo: Any, w: Any, wo: Any, q: Any, qo: Any, qs: Any, b16: Any, bo: Any,
                   bs: Any, d: Any, do: Any, ds: Any) -> Any:
        sig = types.void(accf, fo, w, wo, q, qo, qs, b16, bo, bs, d, do, ds)

        def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
            accf_v, fo_v, w_v, wo_v, q_v, qo_v, qs_v, b_v, bo_v, bs_v, d_v, do_v, ds_v = args
            fa, wd, qd, bd, dd = _block_data(context, builder, sig, args)
            ql = [_load_at(builder, wd, _plus(builder, wo_v, 32 * i), _B32) for i in range(4)]
            qh = [_load_at(builder, wd, _plus(builder, wo_v, 128 + 32 * i), _B32) for i in range(2)]
            sc16 = builder.sext(_load_at(builder, wd, _plus(builder, wo_v, 192), _B16), _W16)
            sc32 = [builder.sext(builder.shuffle_vector(sc16, ir.Constant(_W16, ir.Undefined),
                                                        ir.Constant(ir.VectorType(_I32, 8), list(range(8 * i, 8 * i + 8)))), _D8)
                    for i in range(2)]
            dw = _f16(builder, wd, _plus(builder, wo_v, 206), second=True)
            quants, lanes = [], []
            for n in range(2):
                for g in range(4):
                    low = builder.and_(builder.lshr(ql[2 * n + (g & 1)], ir.Constant(_B32, [4 * (g >> 1)] * 32)),
                                       ir.Constant(_B32, [15] * 32))
                    high = builder.and_(builder.lshr(qh[n], ir.Constant(_B32, [2 * g] * 32)), ir.Constant(_B32, [3] * 32))
                    quants.append(builder.or_(low, builder.shl(high, ir.Constant(_B32, [4] * 32))))
                    j = 8 * n + 2 * g
                    lanes.append([j] * 8 + [j + 1] * 8)              # its two 16-quant halves' scales
            scales = _scales(builder, sc16, lanes, pairs)
            for t in range(ntok):
                total = _dot_groups(builder, ntok, quants, qd, _row(builder, qo_v, qs_v, t), scales, pairs)
                bt = _row(builder, bo_v, bs_v, t)
                m = builder.add(builder.mul(sc32[0], _load_at(builder, bd, bt, _D8, 4)),
                                builder.mul(sc32[1], _load_at(builder, bd, _plus(builder, bt, 8), _D8, 4)))
                total = builder.sub(total, builder.shl(m, ir.Constant(_D8, [5] * 8)))        # - 32 * sum(sc * b16)
                dx = _load_at(builder, dd, _row(builder, do_v, ds_v, t), _F32, 4)
                _accumulate(builder, fa, fo_v, t, total, builder.fmul(dx, dw))
            return context.get_dummy_value()
        return sig, codegen
    return q6_k_block


q6_k_block1, q6_k_block2, q6_k_block3, q6_k_block4, q6_k_block5, q6_k_block6, q6_k_block7, q6_k_block8 = (
    _make_q6_k_block(t) for t in range(1, ROWS + 1))


def _make_q2_k_block(ntok: int, pairs: bool = VNNI) -> Any:
    """Q2_K blocks (scales[16]: 4-bit scale and 4-bit min per 16 quants, qs[64]: 2-bit quants, d, dmin) against
    Q8_K activations, as ggml_vec_dot_q2_K_q8_K: per row sum(sc * (q2 . x)) scaled by d, minus
    sum(min * b16) scaled by dmin; the quants and scales decoded once."""
    @intrinsic
    def q2_k_block(typingctx: Any, accf: Any, fo: Any, w: Any, wo: Any, q: Any, qo: Any, qs: Any, b16: Any, bo: Any,
                   bs: Any, d: Any, do: Any, ds: Any) -> Any:
        sig = types.void(accf, fo, w, wo, q, qo, qs, b16, bo, bs, d, do, ds)

        def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
            accf_v, fo_v, w_v, wo_v, q_v, qo_v, qs_v, b_v, bo_v, bs_v, d_v, do_v, ds_v = args
            fa, wd, qd, bd, dd = _block_data(context, builder, sig, args)
            sm = _load_at(builder, wd, wo_v, _B16)
            sc16 = builder.zext(builder.and_(sm, ir.Constant(_B16, [15] * 16)), _W16)
            mn16 = builder.zext(builder.lshr(sm, ir.Constant(_B16, [4] * 16)), _W16)
            mins = [builder.zext(builder.shuffle_vector(mn16, ir.Constant(_W16, ir.Undefined),
                                                        ir.Constant(ir.VectorType(_I32, 8), list(range(8 * i, 8 * i + 8)))), _D8)
                    for i in range(2)]
            dw, dminw = _f16_pair(builder, wd, _plus(builder, wo_v, 80))
            quants, lanes = [], []
            for j in range(2):                                       # 128 quants per 32 bytes of qs
                bits = _load_at(builder, wd, _plus(builder, wo_v, 16 + 32 * j), _B32)
                for sh in range(4):                                  # quants 128j + 32sh .. +32
                    quants.append(builder.and_(builder.lshr(bits, ir.Constant(_B32, [2 * sh] * 32)), ir.Constant(_B32, [3] * 32)))
                    k = 8 * j + 2 * sh                               # their two sub-blocks' scales
                    lanes.append([k] * 8 + [k + 1] * 8)
            scales = _scales(builder, sc16, lanes, pairs)
            for t in range(ntok):
                total = _dot_groups(builder, ntok, quants, qd, _row(builder, qo_v, qs_v, t), scales, pairs)
                bt = _row(builder, bo_v, bs_v, t)
                m = builder.add(builder.mul(mins[0], _load_at(builder, bd, bt, _D8, 4)),
                                builder.mul(mins[1], _load_at(builder, bd, _plus(builder, bt, 8), _D8, 4)))
                dx = _load_at(builder, dd, _row(builder, do_v, ds_v, t), _F32, 4)
                _accumulate(builder, fa, fo_v, t, total, builder.fmul(dx, dw))
                _accumulate(builder, fa, fo_v, t, m, builder.fneg(builder.fmul(dx, dminw)))
            return context.get_dummy_value()
        return sig, codegen
    return q2_k_block


q2_k_block1, q2_k_block2, q2_k_block3, q2_k_block4, q2_k_block5, q2_k_block6, q2_k_block7, q2_k_block8 = (
    _make_q2_k_block(t) for t in range(1, ROWS + 1))


def _accumulate(builder: ir.IRBuilder, fa: Any, fo: Any, t: int, vals: Any, scale: Any) -> None:
    """accf[fo + 8t : +8] = fma(float(vals), scale, accf[...]) for int32 lanes vals."""
    pf = builder.bitcast(builder.gep(fa, [builder.add(fo, ir.Constant(fo.type, 8 * t))]), _F8.as_pointer())
    r = builder.call(_fn(builder, "llvm.fma.v8f32", _F8, [_F8, _F8, _F8]),
                     [builder.sitofp(vals, _F8), _splat(builder, _F8, scale), builder.load(pf, align=4)])
    builder.store(r, pf, align=4)


def _row(builder: ir.IRBuilder, off: Any, stride: Any, t: int) -> Any:
    return builder.add(off, builder.mul(stride, ir.Constant(stride.type, t)))


def _make_legacy_block(ntok: int, q4: bool) -> Any:
    """Q8_0 (q4=False) or Q4_0 blocks against Q8_0 activations, as ggml's mul_sum_i8_pairs: the weight block's
    signed values w (Q4_0: nibble - 8) once as |w| (unsigned), each activation row as sign(x, w), so that the
    unsigned x signed dot is w . x itself, exact, with no offset to take out per row."""

    @intrinsic
    def block(typingctx: Any, accf: Any, fo: Any, w: Any, wo: Any, q: Any, qo: Any, qs: Any, s: Any, so: Any,
              ss: Any, d: Any, do: Any, ds: Any) -> Any:
        sig = types.void(accf, fo, w, wo, q, qo, qs, s, so, ss, d, do, ds)

        def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
            accf_v, fo_v, w_v, wo_v, q_v, qo_v, qs_v, s_v, so_v, ss_v, d_v, do_v, ds_v = args
            fa, wd, qd, sd, dd = _block_data(context, builder, sig, args)
            dw = _f16(builder, wd, wo_v)
            if q4:
                wv = _load_at(builder, wd, _plus(builder, wo_v, 2), _B16)
                m = ir.Constant(_B16, [15] * 16)
                nib = builder.shuffle_vector(builder.and_(wv, m), builder.and_(builder.lshr(wv, ir.Constant(_B16, [4] * 16)), m),
                                             ir.Constant(ir.VectorType(_I32, 32), list(range(32))))
                ws = builder.sub(nib, ir.Constant(_B32, [8] * 32))
            else:
                ws = _load_at(builder, wd, _plus(builder, wo_v, 2), _B32)
            u = builder.call(_fn(builder, "llvm.abs.v32i8", _B32, [_B32, ir.IntType(1)]),
                             [ws, ir.Constant(ir.IntType(1), 0)])   # |-128| is 128 as an unsigned byte
            psign = _fn(builder, "llvm.x86.avx2.psign.b", _B32, [_B32, _B32])
            for t in range(ntok):
                qv = _load_at(builder, qd, _row(builder, qo_v, qs_v, t), _B32)
                acc = _dot_u8s8(builder, ir.Constant(_D8, [0] * 8), u, builder.call(psign, [qv, ws]))
                scale = builder.fmul(dw, _load_at(builder, dd, _row(builder, do_v, ds_v, t), _F32, 4))
                _accumulate(builder, fa, fo_v, t, acc, scale)
            return context.get_dummy_value()
        return sig, codegen
    return block


q8_0_block1, q8_0_block2, q8_0_block3, q8_0_block4, q8_0_block5, q8_0_block6, q8_0_block7, q8_0_block8 = (
    _make_legacy_block(t, False) for t in range(1, ROWS + 1))
q4_0_block1, q4_0_block2, q4_0_block3, q4_0_block4, q4_0_block5, q4_0_block6, q4_0_block7, q4_0_block8 = (
    _make_legacy_block(t, True) for t in range(1, ROWS + 1))


def _make_prefetch(locality: int) -> Any:
    @intrinsic
    def prefetch(typingctx: Any, w: Any, off: Any) -> Any:
        sig = types.void(w, off)

        def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            p = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
            fn = _fn(builder, "llvm.prefetch.p0i8", ir.VoidType(), [p.type, _I32, _I32, _I32])
            builder.call(fn, [p, ir.Constant(_I32, 0), ir.Constant(_I32, locality), ir.Constant(_I32, 1)])
            return context.get_dummy_value()
        return sig, codegen
    return prefetch


# prefetch(w, off): ask for the cache line holding byte `off` of w's data (llvm.prefetch: read; into L1, or into L2
# for prefetch_l2: prefetcht1); past the end is harmless (a prefetch never faults).
prefetch, prefetch_l2 = _make_prefetch(3), _make_prefetch(2)


@intrinsic
def copy(typingctx: Any, dst: Any, doff: Any, src: Any, soff: Any, n: Any) -> Any:
    """dst's bytes doff:doff+n = src's bytes soff:soff+n (llvm.memcpy; the two never overlap): a weight row that a
    kernel has just read, written on to an arena slot while it is still in the cache."""
    sig = types.void(dst, doff, src, soff, n)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        d = context.make_array(sig.args[0])(context, builder, args[0]).data
        s = context.make_array(sig.args[2])(context, builder, args[2]).data
        dp = builder.bitcast(builder.gep(d, [args[1]]), _I8.as_pointer())
        sp = builder.bitcast(builder.gep(s, [args[3]]), _I8.as_pointer())
        cgutils.raw_memcpy(builder, dp, sp, args[4], 1)
        return context.get_dummy_value()
    return sig, codegen
