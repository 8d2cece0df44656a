"""Native tile products: a 4 x 64 AVX-512 register-block micro-kernel and the drivers using it.

Two kinds, each compiled only when first used: float32 (``mk32``: broadcast + FMA, 16 zmm
accumulators) and bf16 (``mk``: ``vdpbf16ps``, AVX512_BF16, float32 accumulation, P and dS
rounded to bf16 as SPEC §3 allows).  ``fag_numba.isa.native_kind`` decides; the bf16 kernels
are compiled only after it found AVX512_BF16 in numba's target *and* the host (LLVM aborts the
process on ``vdpbf16ps`` for a target without it, so the check happens before compiling).

The micro-kernel computes ``C[r, c] (+)= sum_p A(r, p) . B[p, c]`` for a 4 x 64 block of C:
``A(r, p)`` is one dword at ``a[a_off + r * ars + p * aps]`` broadcast to 16 lanes (a float, or
two bf16 = elements 2p, 2p+1 of the contraction); ``B[p, c]`` the dword at
``b[b_off + p * bs + c]`` (a float, or the bf16 pair (B[2p, c], B[2p+1, c]), "VNNI" packing).
Rows past ``mrows`` and columns past ``ncols`` are masked (C and B are never touched there; A
rows are clamped to the last valid row), so operands need no padding and inputs are read in
place.

Operand layouts (dwords):
- row-major (q, dy, k rows; a bf16 dS tile): ``ars = row stride``, ``aps = 1``;
- transposed (K^T, V^T of a key block, ``pack_t32``): the B of ``Q K^T`` and ``dY V^T``;
- 4-column panels (P^T, dS^T, ``f32_panels`` / ``bf16_panels``): the A of ``P^T dY`` and
  ``dS^T Q``, 16 contiguous bytes per step;
- bf16 pairs of rows (``pack_pairs16``: q, dy, k tile rows): the B of those products and of
  ``dS K``.
"""
import llvmlite.ir as ir
import numpy as np
from numba import types
from numba.extending import intrinsic

from .. import _jit
from ..threads import run_chunks
from .convert import bf16_row
from . import desc

from .driver import (FWD_STRIPS, _dpse_tile, _zero_owned, kv_block_range, online_softmax,
                     online_softmax16, plain, q_block_range, strip_rows, trim_tile)
from .llir import (BFloat as _BFloat, I1 as _I1, I16 as _I16, I32 as _I32, I64 as _I64,
                   VB16 as _VB16, VB32 as _VB32, VF as _VF, VH16 as _VH16, VI as _VI, VM as _VM,
                   bf16_pairs as _bf16_pairs, data as _data, edges as _edges, fn as _fn,
                   lanes as _lanes, loop_entry as _loop_entry, rounded as _rounded,
                   splat as _splat, store as _store, transpose16 as _transpose16)
from .guard import row_keeps_computed
from .tile import (NEG_INF, _exp16, adjust_scores, drop_ds, drop_p, exp_sub, mask_scores,
                   scale_into, score_alpha, scratch, tile_class, zscratch)

_FLT_MAX = np.float32(3.4028234663852886e38)


_MR = 4      # rows of the register block
# contraction chunk (dwords): a B panel of _KC x 64 dwords = 32 KB stays in L1 (48 KB) while
# the row blocks stream A; unchunked, a 256-long contraction (forward P V, backward dS K at
# 128 x 256 tiles) re-read a 64 KB panel from L2 for every 4 rows
_KC = 128
_NV = 4      # 16-lane vectors per row of the register block (64 columns)


def _make_mk(fp32):
    @intrinsic
    def mk(typingctx, c, c_off, ldc, mrows, ncols, a, a_off, ars, aps, b, b_off, bs, npairs, accum):
        """One 4 x 64 register block (module docstring): c float32[:], a/b uint32[:], ints int64,
        ``accum`` true: C += A.B, false: C = A.B.  0 < mrows (<= 4 used), 0 < ncols (<= 64 used)."""
        sig = types.void(c, c_off, ldc, mrows, ncols, a, a_off, ars, aps, b, b_off, bs, npairs,
                         accum)

        def codegen(context, builder, sig, args):
            (cv, c_off, ldc, mrows, ncols, av, a_off, ars, aps, bv, b_off, bs, npairs, acc) = args
            mod = builder.module
            if fp32:
                dp = _fn(mod, "llvm.fma.v16f32", _VF, [_VF, _VF, _VF])
            else:
                dp = _fn(mod, "llvm.x86.avx512bf16.dpbf16ps.512", _VF, [_VF, _VB32, _VB32])
            cptr = _data(context, builder, sig.args[0], cv)
            aptr = _data(context, builder, sig.args[5], av)
            bptr = _data(context, builder, sig.args[9], bv)
            mload = _fn(mod, "llvm.masked.load.v16f32.p0", _VF, [cptr.type, _I32, _VM, _VF])
            mstore = _fn(mod, "llvm.masked.store.v16f32.p0", ir.VoidType(),
                         [_VF, cptr.type, _I32, _VM])
            bload = _fn(mod, "llvm.masked.load.v16i32.p0", _VI, [bptr.type, _I32, _VM, _VI])
            zero = ir.Constant(_VF, [0.0] * 16)
            izero = ir.Constant(_VI, [0] * 16)
            one = ir.Constant(_I64, 1)
            acc_on = builder.icmp_unsigned("!=", context.cast(builder, acc, sig.args[13],
                                                              types.int64), ir.Constant(_I64, 0))
            ncols32 = builder.trunc(ncols, _I32)
            nspl = _splat(builder, ncols32, _VI)
            colmask = [builder.icmp_signed("<", ir.Constant(_VI, list(range(16 * v, 16 * v + 16))),
                                           nspl) for v in range(_NV)]
            rowok, aro, crow = [], [], []
            last = builder.sub(mrows, one)
            for r in range(_MR):
                rc = ir.Constant(_I64, r)
                ok = builder.icmp_signed("<", rc, mrows)
                rowok.append(ok)
                rr = builder.select(ok, rc, last)
                aro.append(builder.add(a_off, builder.mul(rr, ars)))
                crow.append(builder.gep(cptr, [builder.add(c_off, builder.mul(rc, ldc))]))
            init = []
            for r in range(_MR):
                okm = _splat(builder, builder.and_(rowok[r], acc_on), ir.VectorType(_I1, 16))
                for v in range(_NV):
                    m = builder.and_(okm, colmask[v])
                    p = builder.gep(crow[r], [ir.Constant(_I64, 16 * v)])
                    init.append(builder.call(mload, [p, ir.Constant(_I32, 4), m, zero]))
            arow0 = [builder.gep(aptr, [aro[r]]) for r in range(_MR)]
            brow0 = builder.gep(bptr, [b_off])
            pre, loop, done = _loop_entry(builder, npairs, "mk")
            # pointer phis (one add per row and iteration): keeps the loop free of multiplies and
            # of spills, ~35% faster than indexing with p * stride
            pidx = builder.phi(_I64)
            pidx.add_incoming(ir.Constant(_I64, 0), pre)
            aph = []
            for r in range(_MR):
                ph = builder.phi(aptr.type)
                ph.add_incoming(arow0[r], pre)
                aph.append(ph)
            bph = builder.phi(bptr.type)
            bph.add_incoming(brow0, pre)
            accs = []
            for x in init:
                ph = builder.phi(_VF)
                ph.add_incoming(x, pre)
                accs.append(ph)
            bvec = []
            for v in range(_NV):
                p = builder.gep(bph, [ir.Constant(_I64, 16 * v)])
                # masked: B may be an input array read in place (no padding after its last row)
                x = builder.call(bload, [p, ir.Constant(_I32, 4), colmask[v], izero])
                bvec.append(builder.bitcast(x, _VF if fp32 else _VB32))
            new = []
            for r in range(_MR):
                ae = builder.load(aph[r], align=4)
                abc = builder.bitcast(_splat(builder, ae, _VI), _VF if fp32 else _VB32)
                for v in range(_NV):
                    if fp32:
                        new.append(builder.call(dp, [abc, bvec[v], accs[r * _NV + v]]))
                    else:
                        new.append(builder.call(dp, [accs[r * _NV + v], abc, bvec[v]]))
            nxt = builder.add(pidx, one)
            end = builder.block
            pidx.add_incoming(nxt, end)
            for r in range(_MR):
                aph[r].add_incoming(builder.gep(aph[r], [aps]), end)
            bph.add_incoming(builder.gep(bph, [bs]), end)
            for ph, x in zip(accs, new):
                ph.add_incoming(x, end)
            builder.cbranch(builder.icmp_signed("<", nxt, npairs), loop, done)
            builder.position_at_end(done)
            fin = []
            for x0, x1 in zip(init, new):
                ph = builder.phi(_VF)
                ph.add_incoming(x0, pre)
                ph.add_incoming(x1, end)
                fin.append(ph)
            for r in range(_MR):
                okm = _splat(builder, rowok[r], ir.VectorType(_I1, 16))
                for v in range(_NV):
                    ph = fin[r * _NV + v]
                    m = builder.and_(okm, colmask[v])
                    p = builder.gep(crow[r], [ir.Constant(_I64, 16 * v)])
                    builder.call(mstore, [ph, p, ir.Constant(_I32, 4), m])
            return context.get_dummy_value()

        return sig, codegen
    return mk


mk = _make_mk(False)
mk32 = _make_mk(True)


@intrinsic
def _cvt16(typingctx, src, s_off, dst, d_off):
    """dst uint16[d_off:d_off+16] = bf16(src float32[s_off:s_off+16]) (round to nearest even)."""
    sig = types.void(src, s_off, dst, d_off)

    def codegen(context, builder, sig, args):
        sv, so, dv, do = args
        sp = builder.gep(_data(context, builder, sig.args[0], sv), [so])
        dp_ = builder.gep(_data(context, builder, sig.args[2], dv), [do])
        x = builder.load(builder.bitcast(sp, _VF.as_pointer()), align=4)
        y = builder.bitcast(builder.fptrunc(x, _VB16), _VH16)
        builder.store(y, builder.bitcast(dp_, _VH16.as_pointer()), align=2)
        return context.get_dummy_value()

    return sig, codegen


_V4 = ir.VectorType(_I32, 4)


def _store_panels(builder, vec16, base, d_off, pstride, ncols=None):
    """Store dwords 4k..4k+3 of a <16 x i32> at ``base[d_off + k * pstride]`` (k < 4); with
    ``ncols`` (i64) only the groups that start inside it (4k < ncols)."""
    for kk in range(4):
        def put():
            piece = builder.shuffle_vector(vec16, ir.Constant(_VI, ir.Undefined),
                                           ir.Constant(_V4, [4 * kk + x for x in range(4)]))
            off = builder.add(d_off, builder.mul(pstride, ir.Constant(_I64, kk)))
            builder.store(piece, builder.bitcast(builder.gep(base, [off]), _V4.as_pointer()),
                          align=4)
        if ncols is None:
            put()
        else:
            with builder.if_then(builder.icmp_signed("<", ir.Constant(_I64, 4 * kk), ncols)):
                put()


@intrinsic
def _panel_f32(typingctx, src, s_off, dst, d_off, pstride):
    """Columns c..c+15 of one float32 row into 4 column panels: dst uint32, 4 dwords each."""
    sig = types.void(src, s_off, dst, d_off, pstride)

    def codegen(context, builder, sig, args):
        sv, so, dv, do, ps = args
        sp = builder.gep(_data(context, builder, sig.args[0], sv), [so])
        x = builder.load(builder.bitcast(sp, _VI.as_pointer()), align=4)
        _store_panels(builder, x, _data(context, builder, sig.args[2], dv), do, ps)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _panel_bf16(typingctx, src, o0, o1, dst, d_off, pstride):
    """Columns c..c+15 of float32 rows o0, o1 as bf16 pairs (dword = (row o0, row o1)) into 4
    column panels of 4 dwords."""
    sig = types.void(src, o0, o1, dst, d_off, pstride)

    def codegen(context, builder, sig, args):
        sv, o0, o1, dv, do, ps = args
        base = _data(context, builder, sig.args[0], sv)
        x0 = builder.load(builder.bitcast(builder.gep(base, [o0]), _VF.as_pointer()), align=4)
        x1 = builder.load(builder.bitcast(builder.gep(base, [o1]), _VF.as_pointer()), align=4)
        _store_panels(builder, _bf16_pairs(builder, x0, x1),
                      _data(context, builder, sig.args[3], dv), do, ps)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _pds_pair16(typingctx, s, dp, o0, o1, two, ncols, alpha, l0, l1, d0, d1, pt, dt, d_off,
                pstride, sr, so0, so1):
    """The backward's elementwise step for rows o0, o1 (``two`` false: only o0, row o1 reads as
    zero) and 16 columns of a tile, fused (bf16 kind, without dropout, pse or dpse): from the
    raw scores ``s`` and ``dp = dY V^T``, ``P = exp(alpha * s - lse)`` and
    ``dS = P * (dP - Dsum)`` (l0, l1: lse, d0, d1: Dsum of the two rows), written once as the
    bf16 operands: P and dS pairs of rows in 4-column panels (``bf16_panels`` layout at
    ``d_off`` of ``pt`` / ``dt``) and dS rows (uint16 ``sr`` at so0, so1).  The same bits as
    the scaling pass, ``exp_sub``, ``drop_ds``, ``bf16_panels`` x 2 and ``to_bf16_rows``.
    Columns >= ncols are not read; their panel entries (inside a started 4-column group) are
    zero, which the micro-kernel never reads (it clamps A rows past the tile)."""
    sig = types.void(s, dp, o0, o1, two, ncols, alpha, l0, l1, d0, d1, pt, dt, d_off, pstride,
                     sr, so0, so1)

    def codegen(context, builder, sig, args):
        (sv, dpv, o0, o1, two, ncols, alpha, l0, l1, d0, d1, ptv, dtv, d_off, pstride, srv,
         so0, so1) = args
        mod = builder.module
        sb = _data(context, builder, sig.args[0], sv)
        db = _data(context, builder, sig.args[1], dpv)
        srb = _data(context, builder, sig.args[15], srv)
        mload = _fn(mod, "llvm.masked.load.v16f32.p0", _VF, [sb.type, _I32, _VM, _VF])
        hstore = _fn(mod, "llvm.masked.store.v16i16.p0", ir.VoidType(),
                     [_VH16, srb.type, _I32, _VM])
        zero = ir.Constant(_VF, [0.0] * 16)
        cm = _lanes(builder, ncols)
        two_b = context.cast(builder, two, sig.args[4], types.boolean)
        m1 = builder.and_(cm, _splat(builder, two_b, _VM))
        alphav = _splat(builder, alpha, _VF)
        o1c = builder.select(two_b, o1, o0)          # never address past the tile
        so1c = builder.select(two_b, so1, so0)
        vals = []
        for o, so, lse, dsum, m in ((o0, so0, l0, d0, cm), (o1c, so1c, l1, d1, m1)):
            x = builder.call(mload, [builder.gep(sb, [o]), ir.Constant(_I32, 4), m, zero])
            y = builder.call(mload, [builder.gep(db, [o]), ir.Constant(_I32, 4), m, zero])
            p = _exp16(builder, _rounded(builder, builder.fmul(x, alphav)),
                       _splat(builder, lse, _VF), True)
            ds = builder.fmul(p, builder.fsub(y, _splat(builder, dsum, _VF)))
            p = builder.select(m, p, zero)
            ds = builder.select(m, ds, zero)
            h = builder.bitcast(builder.fptrunc(ds, _VB16), _VH16)
            builder.call(hstore, [h, builder.gep(srb, [so]), ir.Constant(_I32, 2), m])
            vals.append((p, ds))
        for k, arr in ((0, ptv), (1, dtv)):
            # the 4-column groups that start inside the tile
            _store_panels(builder, _bf16_pairs(builder, vals[0][k], vals[1][k]),
                          _data(context, builder, sig.args[11 + k], arr), d_off, pstride, ncols)
        return context.get_dummy_value()

    return sig, codegen


@_jit.kernel
def pds_panels(s, dp, m, n, alpha, lt, dt_, pt, dt, pstride, sr, ldr):
    """``_pds_pair16`` over a whole m x n tile (row stride n in ``s`` and ``dp``): P and dS as
    bf16 pairs of rows in 4-column panels (``pt`` / ``dt``, ``bf16_panels``), dS rows as bf16
    (uint16 ``sr``, row stride ``ldr``); lt / dt_: lse and Dsum of the rows."""
    for p in range((m + 1) // 2):
        r0 = 2 * p
        two = r0 + 1 < m
        r1 = r0 + 1 if two else r0
        for c0 in range(0, n, 16):
            _pds_pair16(s, dp, r0 * n + c0, r1 * n + c0, two, n - c0, alpha, lt[r0], lt[r1],
                        dt_[r0], dt_[r1], pt, dt, (c0 // 4) * pstride + p * 4, pstride, sr,
                        r0 * ldr + c0, r1 * ldr + c0)


@intrinsic
def _cvt1(typingctx, x):
    """bf16 bits (uint16) of one float32 (round to nearest even, as the vector conversion)."""
    sig = types.uint16(x)

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], _BFloat()), _I16)

    return sig, codegen


@_jit.kernel
def to_bf16_rows(src, m, n, ld, dst, ldd):
    """Row-major bf16 copy: ``dst[r * ldd + c] = bf16(src[r * ld + c])`` for c < n, and a zero
    at c = n when n is odd (the pair a dword A read sees).  dst: uint16."""
    nv = n - n % 16
    for r in range(m):
        for c0 in range(0, nv, 16):
            _cvt16(src, r * ld + c0, dst, r * ldd + c0)
        for c in range(nv, n):
            dst[r * ldd + c] = _cvt1(src[r * ld + c])
        if n % 2 == 1:
            dst[r * ldd + n] = 0


@_jit.kernel
def f32_panels(src, m, n, ld, dst, pstride):
    """Transpose operand in 4-column panels: ``dst[(c // 4) * pstride + r * 4 + c % 4] =
    src[r * ld + c]`` (float32 bits, dst uint32).  As A of ``P^T @ B`` each 4-row block of
    the micro-kernel then reads 16 contiguous bytes per step instead of 4 rows n apart (the
    strided form measured ~20% slower at 128 x 256 tiles: one cache line per step)."""
    u = src.view(np.uint32)
    nv = n - n % 16
    for r in range(m):
        for c0 in range(0, nv, 16):
            _panel_f32(src, r * ld + c0, dst, (c0 // 4) * pstride + r * 4, pstride)
        for c in range(nv, n):
            dst[(c // 4) * pstride + r * 4 + c % 4] = u[r * ld + c]


@_jit.kernel
def bf16_panels(src, m, n, ld, dst, pstride):
    """bf16 pairs of rows (2p, 2p + 1) in 4-column panels: dword
    ``dst[(c // 4) * pstride + p * 4 + c % 4]`` = (bf16(src[2p, c]), bf16(src[2p + 1, c]));
    row m of an odd m is zero."""
    nv = n - n % 16
    d16 = dst.view(np.uint16)
    for p in range((m + 1) // 2):
        r0 = 2 * p
        if r0 + 1 < m:
            for c0 in range(0, nv, 16):
                _panel_bf16(src, r0 * ld + c0, (r0 + 1) * ld + c0, dst,
                            (c0 // 4) * pstride + p * 4, pstride)
            lo = nv
        else:
            lo = 0
        for c in range(lo, n):
            x = (c // 4) * pstride + p * 4 + c % 4
            d16[2 * x] = _cvt1(src[r0 * ld + c])
            d16[2 * x + 1] = _cvt1(src[(r0 + 1) * ld + c]) if r0 + 1 < m else 0


@_jit.kernel
def pack_pairs16(src, off, ld, m, n, dst, ldd):
    """Pair-interleave bf16 rows: ``dst[(p * ldd + c) * 2 + e] = src[off + (2p + e) * ld + c]``
    (uint16 bits; row m of an odd m is zero).  Returns 1 when a packed element is an inf or
    NaN, else 0: the native kernels check the inputs they read as they pack them (no separate
    pass over q, k, v, dy; a flagged call reruns on the BLAS driver's careful path)."""
    # exponent bits all ones: (x & 0x7F80) + 0x80 sets bit 15, kept in a uint16 accumulator
    # (the truncation lets LLVM narrow the int64 arithmetic numba types it in to 16-bit lanes:
    # the check costs ~10% of the copy; an int64 flag per element doubled it)
    acc = np.uint16(0)
    for p in range((m + 1) // 2):
        r0 = off + 2 * p * ld
        dr = dst[2 * p * ldd:2 * p * ldd + 2 * n]
        sr0 = src[r0:r0 + n]
        if 2 * p + 1 < m:
            sr1 = src[r0 + ld:r0 + ld + n]
            for c in range(n):
                x0 = sr0[c]
                x1 = sr1[c]
                dr[2 * c] = x0
                dr[2 * c + 1] = x1
                acc = np.uint16(acc | ((x0 & 0x7F80) + 0x80) | ((x1 & 0x7F80) + 0x80))
        else:
            for c in range(n):
                x0 = sr0[c]
                dr[2 * c] = x0
                dr[2 * c + 1] = 0
                acc = np.uint16(acc | ((x0 & 0x7F80) + 0x80))
    return np.int64((acc & 0x8000) != 0)


@intrinsic
def _t32_16(typingctx, src, s_off, ld, nrows, ncols, dst, d_off, ldd):
    """One 16 x 16 dword block of ``pack_t32``: ``dst[d_off + p * ldd + j] = src[s_off + j * ld
    + p]`` for j < min(16, nrows), p < min(16, ncols); nothing outside those bounds is read or
    written (masked loads and stores, rows past nrows addressed as the last one).  Loads 16
    rows, transposes in registers (``llir.transpose16``), stores 16 rows: the scalar loop's
    stores ``ldd`` dwords apart cost 0.37 ns per dword, this ~0.05.  Returns 1 when a dword
    read holds a bf16 inf or NaN in either half (the native bf16 kinds' input check, as
    ``pack_pairs16``; meaningless for float32 data), else 0."""
    sig = types.int64(src, s_off, ld, nrows, ncols, dst, d_off, ldd)

    def codegen(context, builder, sig, args):
        sv, s_off, ld, nrows, ncols, dv, d_off, ldd = args
        mod = builder.module
        sbase = _data(context, builder, sig.args[0], sv)
        dbase = _data(context, builder, sig.args[5], dv)
        mload = _fn(mod, "llvm.masked.load.v16i32.p0", _VI, [sbase.type, _I32, _VM, _VI])
        colmask, last = _edges(builder, nrows, ncols)
        rowmask, _last = _edges(builder, ncols, nrows)      # lanes j < nrows of a stored row
        zero = ir.Constant(_VI, [0] * 16)
        vec = []
        for j in range(16):
            jc = ir.Constant(_I64, j)
            ok = builder.icmp_signed("<", jc, nrows)
            p = builder.gep(sbase, [builder.add(s_off, builder.mul(builder.select(ok, jc, last),
                                                                   ld))])
            m = builder.and_(colmask, _splat(builder, ok, _VM))
            vec.append(builder.call(mload, [p, ir.Constant(_I32, 4), m, zero]))
        # bf16 inf/NaN in a half: its exponent bits all ones (masked lanes read 0: finite)
        flag = None
        for x in vec:
            for emask in (0x7F800000, 0x7F80):
                e = ir.Constant(_VI, [emask] * 16)
                hit = builder.icmp_unsigned("==", builder.and_(x, e), e)
                flag = hit if flag is None else builder.or_(flag, hit)
        bits = builder.bitcast(flag, ir.IntType(16))
        _transpose16(builder, vec)
        for p in range(16):
            ok = builder.icmp_signed("<", ir.Constant(_I64, p), ncols)
            ptr = builder.gep(dbase, [builder.add(d_off, builder.mul(ir.Constant(_I64, p), ldd))])
            _store(builder, vec[p], ptr, 4, builder.and_(rowmask, _splat(builder, ok, _VM)))
        return builder.zext(builder.icmp_unsigned("!=", bits, ir.Constant(ir.IntType(16), 0)),
                            _I64)

    return sig, codegen


@_jit.kernel
def pack_t32(src, off, ld, m, n, dst, ldd):
    """Dword transpose: ``dst[p * ldd + j] = src[off + j * ld + p]`` for j < m, p < n (the B
    of ``Q K^T``: float32 K^T, or bf16 pairs of K^T), in 16 x 16 register blocks.  Returns 1
    when a bf16 half read is an inf or NaN (``_t32_16``; bf16 data only), else 0."""
    bad = 0
    for j0 in range(0, m, 16):
        for p0 in range(0, n, 16):
            bad |= _t32_16(src, off + j0 * ld + p0, ld, m - j0, n - p0, dst, p0 * ldd + j0, ldd)
    return bad


@_jit.kernel(inline="always")
def product_bf16(c, c_off, ldc, m, n, a, a_off, ars, aps, arb, b, b_off, bs, npairs, accum):
    """``C[m, n] (+)= A . B`` over ``npairs`` bf16 pairs through 4 x 64 register blocks (the
    layouts of the module docstring; row block r0 of A starts at ``a_off + r0 / 4 * arb``).  Column blocks outside so each B panel (npairs x 64
    dwords, <= 32 KB) stays in L1 while the row blocks stream A."""
    for k0 in range(0, max(npairs, 1), _KC):       # one pass when empty: C = 0
        kc = min(_KC, npairs - k0)
        acc = accum or k0 > 0
        for c0 in range(0, n, 64):
            nc = min(64, n - c0)
            for r0 in range(0, m, 4):
                mk(c, c_off + r0 * ldc + c0, ldc, min(4, m - r0), nc, a,
                   a_off + (r0 // 4) * arb + k0 * aps, ars, aps, b, b_off + k0 * bs + c0, bs,
                   kc, acc)


@_jit.kernel(inline="always")
def product_f32(c, c_off, ldc, m, n, a, a_off, ars, aps, arb, b, b_off, bs, nk, accum):
    """``C[m, n] (+)= A . B`` in float32 (FMA), same addressing with one float per dword."""
    for k0 in range(0, max(nk, 1), _KC):       # one pass when empty: C = 0
        kc = min(_KC, nk - k0)
        acc = accum or k0 > 0
        for c0 in range(0, n, 64):
            nc = min(64, n - c0)
            for r0 in range(0, m, 4):
                mk32(c, c_off + r0 * ldc + c0, ldc, min(4, m - r0), nc, a,
                     a_off + (r0 // 4) * arb + k0 * aps, ars, aps, b, b_off + k0 * bs + c0, bs,
                     kc, acc)


@_jit.kernel
def all_finite_f32(x):
    """Whether every element of a float32 array is finite (exponent bits not all ones; integer
    test: the curated fastmath flags may fold float tests such as x - x == 0)."""
    u = x.view(np.uint32)
    bad = 0
    for i in range(u.size):
        bad |= np.int64((u[i] & 0x7F800000) == 0x7F800000)
    return bad == 0


@_jit.kernel
def _rows16(src, off, rs, nrows, n, c, dst, row, row32):
    """``dst[o + e] = bf16 bits of float32(src[o + e] * c)``, ``o = off + r * rs``, for r <
    nrows, e < n: the bits of scaling then converting on the host (``convert.bf16_row``).
    row / row32: float32 scratch of >= n and its uint32 view."""
    for r in range(nrows):
        o = off + r * rs
        scale_into(src, o, n, c, row, 0)
        bf16_row(row32, 0, n, dst, o)


@_jit.kernel
def _kv_rows16(dk, dv, kb_off, vb_off, gp, n, scale, dk16, dv16, row, row32):
    """A key block's final bf16 dk (scaled) and dv rows (``_rows16``), n rows."""
    _rows16(dk, kb_off, gp[desc.K_RS], n, gp[desc.D], scale, dk16, row, row32)
    _rows16(dv, vb_off, gp[desc.V_RS], n, gp[desc.DV], np.float32(1.0), dv16, row, row32)


def _make_bwd(kind, fused, out16=False):
    """The backward driver with native tile products of ``kind``: "f32", "bf16" (vdpbf16ps
    pairs) or "amx" (AMX tiles, kernels/amx.py; compiled only after ``isa.amx_available``).

    Same items, loops, tile classes and single-writer ownership as ``driver.bwd_driver`` (so
    the same bitwise determinism across thread counts); only the five products differ.  q, k,
    v, dy: float32 flat, or uint16 flat bf16 bits (bf16, amx; D and Dv even, BLOCK_M/N even).

    ``out16`` (bf16 kinds, one S2 split): the kernel also writes the final bf16 gradients,
    ``dq16 = bf16(dq * scale)``, ``dk16 = bf16(dk * scale)``, ``dv16 = bf16(dv)``, each key
    block's dk / dv rows once its tiles are done and a sequence's dq rows after its last key
    block, while they are in cache (the host's scale and conversion passes read 24 MB again at
    (2,16,512,64)); otherwise dq16, dk16, dv16 are unused dummies.
    """
    bf = kind != "f32"
    prod = product_bf16 if bf else product_f32
    W = 2 if bf else 1        # elements per dword
    BF = 1 if bf else 0
    # AMX: branches on this closure constant are pruned by numba before lowering, so the other
    # kinds never reach LLVM with an AMX intrinsic (which aborts on a target without it)
    AMX = 1 if kind == "amx" else 0
    FUSED = 1 if fused else 0           # pruned like AMX: each variant compiles only its path
    UNFUSED = 1 - FUSED
    OUT16 = 1 if out16 else 0           # pruned like AMX
    if AMX:
        from .amx import kpad, pds_pairs, product_amx, t_pairs, zero_cols
    else:
        kpad = pds_pairs = product_amx = t_pairs = zero_cols = None

    @_jit.kernel
    def bwd(tc, q, k, v, dy, lse, dsum, dq, dqp, dk, dv, dpse, dslope, pse, slopes, mask,
            drop_mask, seqtab, gp, fp, items, tptr, visits, flags, dq16, dk16, dv16):
        bm = gp[desc.BLOCK_M]
        bn = gp[desc.BLOCK_N]
        d = gp[desc.D]
        dvd = gp[desc.DV]
        g = gp[desc.G]
        nsplit = gp[desc.NSPLIT]
        scale = fp[desc.SCALE]
        alpha = score_alpha(gp, fp)
        dropping = gp[desc.DROP_KIND] != desc.DROP_NONE
        dpk = gp[desc.DPSE_KIND]
        pk = gp[desc.PSE_KIND]
        # FUSED (``fusable``: a bf16 kind, no dropout, pse or dpse, 0 < alpha < inf): P, dS
        # and their three bf16 operands in one pass (amx.pds_pairs / pds_panels) instead of six
        dw = d // W
        dvw = dvd // W
        q32 = q.view(np.uint32)
        k32 = k.view(np.uint32)
        v32 = v.view(np.uint32)
        y32 = dy.view(np.uint32)
        hm = (bm + 1) // 2
        hn = (bn + 1) // 2
        pstr = 4 * (hm if BF else bm)
        # AMX: pair counts padded to whole 16-pair chunks (amx.kpad), row strides in dwords
        hm16 = (hm + 15) // 16 * 16
        hn16 = (hn + 15) // 16 * 16
        for t in range(tc, tc + 1):     # chunk tc only (one call per chunk: threads.run_chunks)
            s = scratch(bm * bn, np.float32)
            dp = scratch(bm * bn, np.float32)
            rb = scratch(bm * bn, np.float32)
            # P^T and dS^T in 4-column panels (float32, or bf16 pairs of rows)
            pt = scratch(((bn + 3) // 4) * pstr, np.uint32)
            dt = scratch(((bn + 3) // 4) * pstr, np.uint32)
            kt = scratch(max(dw, 1) * bn, np.uint32)      # K^T of the key block
            vt = scratch(max(dvw, 1) * bn, np.uint32)     # V^T
            # bf16 only: K rows in pairs, Q / dY tile rows in pairs, P / dS in pairs, dS rows
            # (AMX: zeroed, so pair rows past a tile's end are finite: their A pairs are 0)
            kp = zscratch(max(BF * (hn + AMX * 16) * d, 1), np.uint32)
            qp = zscratch(max(BF * (hm16 if AMX else hm) * d, 1), np.uint32)
            yp = zscratch(max(BF * (hm16 if AMX else hm) * dvd, 1), np.uint32)
            sr16 = scratch(max(BF * bm * (hn16 if AMX else hn), 1), np.uint32)
            sr = sr16.view(np.uint16)
            # AMX only: P^T and dS^T as transposed pairs (bn rows of hm16 dwords), tile config
            at = scratch(max(AMX * bn * hm16, 1), np.uint32)
            ast = scratch(max(AMX * bn * hm16, 1), np.uint32)
            # fused step: lse and Dsum of the tile's rows (AMX reads up to 2 * hm16 + 32 in)
            lt = scratch(max(FUSED * (2 * hm16 + 32), 1), np.float32)
            dtt = scratch(max(FUSED * (2 * hm16 + 32), 1), np.float32)
            cfg = np.zeros(64, np.uint8)
            row = np.empty(max(d, dvd, 1), np.float32)       # out16: one row, scaled
            row32 = row.view(np.uint32)
            nf = 0                      # bf16 kinds: an inf / NaN packed (pack_pairs16)
            for it in range(tptr[t], tptr[t + 1]):
                n2 = items[it, 2]
                c = items[it, 3]
                dqbuf = dq if c == 0 else dqp[c - 1]
                for b in range(items[it, 0], items[it, 1]):
                    s1 = seqtab[b, desc.S1]
                    s2 = seqtab[b, desc.S2]
                    nkb = (s2 + bn - 1) // bn
                    lo = seqtab[b, desc.LO]
                    hi = seqtab[b, desc.HI]
                    pre = seqtab[b, desc.PREFIX]
                    _zero_owned(seqtab, gp, b, n2, c, dqbuf, dk, dv)
                    for jb in range(c, nkb, nsplit):
                        jb0 = jb * bn
                        jb_len = min(bn, s2 - jb0)
                        ib_lo, ib_hi = q_block_range(lo, hi, pre, s1, jb0, jb0 + jb_len, bm)
                        kb_off = seqtab[b, desc.K_OFF] + n2 * gp[desc.K_HS] + jb0 * gp[desc.K_RS]
                        vb_off = seqtab[b, desc.V_OFF] + n2 * gp[desc.V_HS] + jb0 * gp[desc.V_RS]
                        if ib_hi <= ib_lo:
                            if OUT16:            # no tile: the block's (zero) rows as they are
                                _kv_rows16(dk, dv, kb_off, vb_off, gp, jb_len, scale, dk16,
                                           dv16, row, row32)
                            continue
                        # the key block's B operands, packed once for all its tiles
                        pack_t32(k32, kb_off // W, gp[desc.K_RS] // W, jb_len, dw, kt, bn)
                        vbad = pack_t32(v32, vb_off // W, gp[desc.V_RS] // W, jb_len, dvw, vt,
                                        bn)
                        if BF:
                            # every k, v, q, dy element a tile reads is packed, and checked
                            # there (k's rows here, v's in its transpose)
                            nf |= vbad | pack_pairs16(k, kb_off, gp[desc.K_RS], jb_len, d,
                                                      kp.view(np.uint16), d)
                        for gg in range(g):
                            h = n2 * g + gg
                            st = seqtab[b, desc.ST_OFF] + h * seqtab[b, desc.ST_HS]
                            for ib in range(ib_lo, ib_hi):
                                i0, m_len, j0, n_len = trim_tile(lo, hi, pre, ib * bm,
                                                                 min(bm, s1 - ib * bm), jb0, jb_len)
                                if m_len == 0:
                                    continue
                                if BF:
                                    # pairs start on even rows/columns: a trimmed tile grows
                                    # by its (fully masked) neighbour row/column
                                    if i0 % 2 == 1:
                                        i0 -= 1
                                        m_len += 1
                                    if j0 % 2 == 1:
                                        j0 -= 1
                                        n_len += 1
                                cls = tile_class(seqtab, gp, mask, b, h, i0, m_len, j0, n_len)
                                if cls == desc.EMPTY:
                                    continue
                                visits[t] += 1
                                jo = j0 - jb0
                                k_off = kb_off + jo * gp[desc.K_RS]
                                v_off = vb_off + jo * gp[desc.V_RS]
                                q_off = seqtab[b, desc.Q_OFF] + h * gp[desc.Q_HS] + i0 * gp[desc.Q_RS]
                                dy_off = seqtab[b, desc.DY_OFF] + h * gp[desc.DY_HS] + i0 * gp[desc.DY_RS]
                                mn = m_len * n_len
                                # s <- z;  p <- exp(s - lse)
                                if AMX:
                                    product_amx(s, 0, n_len, m_len, n_len, q32, q_off // W,
                                                gp[desc.Q_RS] // W, kt, jo, bn, dw, False, cfg)
                                else:
                                    prod(s, 0, n_len, m_len, n_len, q32, q_off // W,
                                         gp[desc.Q_RS] // W, 1, 4 * gp[desc.Q_RS] // W, kt, jo,
                                         bn, dw, False)
                                if FUSED:
                                    # masks only (no pse): -inf on the unscaled scores
                                    mask_scores(seqtab, gp, mask, b, h, i0, m_len, j0, n_len,
                                                cls, s)
                                else:
                                    if alpha != 1.0:
                                        s_ = s[:mn]
                                        for x in range(mn):
                                            s_[x] *= alpha
                                    adjust_scores(seqtab, gp, fp, pse, slopes, mask, b, h, i0,
                                                  m_len, j0, n_len, cls, s)
                                    for r in range(m_len):
                                        exp_sub(s, r * n_len,
                                                lse[st + (i0 + r) * gp[desc.ST_RS]], n_len)
                                # dp <- dy @ v.T
                                if AMX:
                                    product_amx(dp, 0, n_len, m_len, n_len, y32, dy_off // W,
                                                gp[desc.DY_RS] // W, vt, jo, bn, dvw, False, cfg)
                                else:
                                    prod(dp, 0, n_len, m_len, n_len, y32, dy_off // W,
                                         gp[desc.DY_RS] // W, 1, 4 * gp[desc.DY_RS] // W, vt,
                                         jo, bn, dvw, False)
                                if FUSED:
                                    # P, dS and their bf16 operands in one pass below
                                    for r in range(m_len):
                                        lt[r] = lse[st + (i0 + r) * gp[desc.ST_RS]]
                                        dtt[r] = dsum[st + (i0 + r) * gp[desc.ST_RS]]
                                else:
                                    # dp_drop, p_drop (into rb), ds <- p * (dp_drop - dsum) in dp
                                    drop_ds(seqtab, gp, fp, drop_mask, dsum, st, b, h, i0, m_len,
                                            j0, n_len, s, dp, 0, rb)
                                pd = rb if dropping else s
                                if AMX:
                                    # A operands: P^T, dS^T (transposed pairs) and dS rows,
                                    # bf16 (SPEC §3), zero-padded to whole 16-pair chunks
                                    kpm = kpad((m_len + 1) // 2)
                                    hnl = (n_len + 1) // 2
                                    kpn = kpad(hnl)
                                    if FUSED:
                                        pds_pairs(s, dp, m_len, n_len, alpha, lt, dtt, at, ast,
                                                  hm16, kpm, sr, 2 * hn16)
                                        if n_len % 2 == 1:
                                            for r in range(m_len):  # the odd column's pair
                                                sr[r * 2 * hn16 + n_len] = 0
                                    else:
                                        t_pairs(pd, m_len, n_len, n_len, at, hm16, kpm)
                                        t_pairs(dp, m_len, n_len, n_len, ast, hm16, kpm)
                                        to_bf16_rows(dp, m_len, n_len, n_len, sr, 2 * hn16)
                                    zero_cols(sr16, m_len, hn16, hnl, kpn)
                                    nf |= pack_pairs16(dy, dy_off, gp[desc.DY_RS], m_len, dvd,
                                                       yp.view(np.uint16), dvd)
                                    nf |= pack_pairs16(q, q_off, gp[desc.Q_RS], m_len, d,
                                                       qp.view(np.uint16), d)
                                    # dv += p_drop.T @ dy;  dk += ds.T @ q;  dq += ds @ k
                                    product_amx(dv, v_off, gp[desc.V_RS], n_len, dvd, at, 0,
                                                hm16, yp, 0, dvd, kpm, True, cfg)
                                    product_amx(dk, k_off, gp[desc.K_RS], n_len, d, ast, 0,
                                                hm16, qp, 0, d, kpm, True, cfg)
                                    product_amx(dqbuf, q_off, gp[desc.Q_RS], m_len, d, sr16, 0,
                                                hn16, kp, (jo // 2) * d, d, kpn, True, cfg)
                                elif BF:
                                    # P and dS rounded to bf16 (SPEC §3), pairs along the rows
                                    # for dV / dK, along the columns for dQ
                                    hml = (m_len + 1) // 2
                                    if FUSED:
                                        pds_panels(s, dp, m_len, n_len, alpha, lt, dtt, pt, dt,
                                                   pstr, sr, bn)
                                        if n_len % 2 == 1:
                                            for r in range(m_len):  # the odd column's pair
                                                sr[r * bn + n_len] = 0
                                    else:
                                        bf16_panels(pd, m_len, n_len, n_len, pt, pstr)
                                        bf16_panels(dp, m_len, n_len, n_len, dt, pstr)
                                        to_bf16_rows(dp, m_len, n_len, n_len, sr, bn)
                                    nf |= pack_pairs16(dy, dy_off, gp[desc.DY_RS], m_len, dvd,
                                                       yp.view(np.uint16), dvd)
                                    nf |= pack_pairs16(q, q_off, gp[desc.Q_RS], m_len, d,
                                                       qp.view(np.uint16), d)
                                    prod(dv, v_off, gp[desc.V_RS], n_len, dvd, pt, 0, 1, 4, pstr,
                                         yp, 0, dvd, hml, True)
                                    prod(dk, k_off, gp[desc.K_RS], n_len, d, dt, 0, 1, 4, pstr,
                                         qp, 0, d, hml, True)
                                    prod(dqbuf, q_off, gp[desc.Q_RS], m_len, d, sr16, 0, bn // 2,
                                         1, 2 * bn, kp, (jo // 2) * d, d, (n_len + 1) // 2, True)
                                else:
                                    f32_panels(pd, m_len, n_len, n_len, pt, pstr)
                                    f32_panels(dp, m_len, n_len, n_len, dt, pstr)
                                    ds32 = dp.view(np.uint32)
                                    # dv += p_drop.T @ dy;  dk += ds.T @ q;  dq += ds @ k
                                    prod(dv, v_off, gp[desc.V_RS], n_len, dvd, pt, 0, 1, 4, pstr,
                                         y32, dy_off, gp[desc.DY_RS], m_len, True)
                                    prod(dk, k_off, gp[desc.K_RS], n_len, d, dt, 0, 1, 4, pstr,
                                         q32, q_off, gp[desc.Q_RS], m_len, True)
                                    prod(dqbuf, q_off, gp[desc.Q_RS], m_len, d, ds32, 0, n_len,
                                         1, 4 * n_len, k32, k_off, gp[desc.K_RS], n_len, True)
                                if UNFUSED and dpk != 0:
                                    _dpse_tile(dp, m_len, n_len, b, h, i0, j0, c, pk, dpk, scale,
                                               seqtab, dpse, dslope)
                        if OUT16:                # the key block's dk / dv rows are final
                            _kv_rows16(dk, dv, kb_off, vb_off, gp, jb_len, scale, dk16, dv16,
                                       row, row32)
                    if OUT16:                    # one split: the sequence's dq rows are final
                        for gg in range(g):
                            _rows16(dq, seqtab[b, desc.Q_OFF] + (n2 * g + gg) * gp[desc.Q_HS],
                                    gp[desc.Q_RS], s1, d, scale, dq16, row, row32)
            flags[t] = nf

    return bwd


def _make_fwd(kind, fused, out16=False):
    """The forward driver with native products (``driver.fwd_driver``'s items, online softmax
    and ownership; S = Q K^T and O += P V through the micro-kernel or AMX tiles, P rounded to
    bf16 for the bf16 and amx kinds).  Kinds and arrays as in ``_make_bwd``; ``out16``: ``out``
    is uint16 and takes the output's bf16 bits directly (a bf16 ``attention_out``: no float32
    output buffer and no conversion pass on the host)."""
    bf = kind != "f32"
    prod = product_bf16 if bf else product_f32
    W = 2 if bf else 1
    BF = 1 if bf else 0
    AMX = 1 if kind == "amx" else 0           # pruned before lowering (see _make_bwd)
    FUSED = 1 if fused else 0
    UNFUSED = 1 - FUSED
    OUT16 = 1 if out16 else 0               # pruned like AMX
    if AMX:
        from .amx import kpad, product_amx, zero_cols
    else:
        kpad = product_amx = zero_cols = None

    @_jit.kernel
    def fwd(tc, q, k, v, out, mrow, lrow, pse, slopes, mask, drop_mask, seqtab, gp, fp, items, tptr,
            visits, flags):
        bm = gp[desc.BLOCK_M]
        bn = gp[desc.BLOCK_N]
        d = gp[desc.D]
        dv = gp[desc.DV]
        g = gp[desc.G]
        alpha = score_alpha(gp, fp)
        dropping = gp[desc.DROP_KIND] != desc.DROP_NONE
        # FUSED (``fusable``: a bf16 kind, no dropout or pse, 0 < alpha < inf): scaling, exp
        # and the bf16 conversion of P in one pass (online_softmax16) instead of three
        dw = d // W
        q32 = q.view(np.uint32)
        k32 = k.view(np.uint32)
        v32 = v.view(np.uint32)
        hn = (bn + 1) // 2
        hn16 = (hn + 15) // 16 * 16               # AMX: P rows padded to 16-pair chunks
        ldp = hn16 if AMX else hn
        sbm = max(16, bm // FWD_STRIPS)           # rows per strip of a band-cut tile
        for t in range(tc, tc + 1):     # chunk tc only (one call per chunk: threads.run_chunks)
            s = scratch(bm * bn, np.float32)
            rb = scratch(bm * bn, np.float32)
            acc = scratch(bm * max(dv, 1), np.float32)
            mrun = np.empty(bm, np.float32)
            lrun = np.empty(bm, np.float32)
            sub = np.empty(bm, np.float32)
            cor = np.empty(bm, np.float32)
            mold = np.empty(bm, np.float32)
            vrow = np.empty(bm, np.uint8)   # row has a computed element (driver.online_softmax)
            kt = scratch(max(dw, 1) * bn, np.uint32)
            # bf16: V rows in pairs (AMX: zeroed, rows past a tile finite; 16 more pair rows:
            # a strip's padded pairs may start up to 15 past the tile's), P rows
            vp = zscratch(max(BF * (ldp + AMX * 16) * dv, 1), np.uint32)
            p16 = scratch(max(BF * bm * ldp, 1), np.uint32)
            p16h = p16.view(np.uint16)
            ldp16 = 2 * ldp if AMX else 2 * hn       # P rows, in bf16 elements
            cfg = np.zeros(64, np.uint8)
            orow32 = np.empty(max(dv, 1), np.float32)        # one output row
            o32bits = orow32.view(np.uint32)
            # bf16 kinds: an inf / NaN in a v row read (pack_pairs16).  Only v's: q and k
            # garbage stays out as it does on the BLAS driver (a masked score is overwritten
            # with -inf, an unmasked NaN score is the math), but a masked key's NaN v row
            # would meet P = 0 in the product (0 * NaN)
            nf = 0
            for it in range(tptr[t], tptr[t + 1]):
                b = items[it, 0]
                h = items[it, 1]
                i0 = items[it, 2] * bm
                s1 = seqtab[b, desc.S1]
                s2 = seqtab[b, desc.S2]
                m_len = min(bm, s1 - i0)
                n2 = h // g
                for r in range(m_len):
                    mrun[r] = NEG_INF
                    lrun[r] = 0.0
                    vrow[r] = 0
                for x in range(m_len * dv):
                    acc[x] = 0.0
                q_off = seqtab[b, desc.Q_OFF] + h * gp[desc.Q_HS] + i0 * gp[desc.Q_RS]
                lo = seqtab[b, desc.LO]
                hi = seqtab[b, desc.HI]
                pre = seqtab[b, desc.PREFIX]
                jb_lo, jb_hi = kv_block_range(lo, hi, pre, s2, i0, i0 + m_len, bn)
                for jb in range(jb_lo, jb_hi):
                    # the rows [ti0, ti0 + tm) and columns the band can reach (the other rows
                    # keep their m, l, acc: as driver.fwd_chunk; a causal diagonal block of
                    # 512 x 256 needs half its rows)
                    ti0, tm, j0, n_len = trim_tile(lo, hi, pre, i0, m_len, jb * bn,
                                                   min(bn, s2 - jb * bn))
                    if n_len == 0:
                        continue
                    if BF and j0 % 2 == 1:
                        j0 -= 1                 # pairs start on even keys (a masked column)
                        n_len += 1
                    cls = tile_class(seqtab, gp, mask, b, h, ti0, tm, j0, n_len)
                    if cls == desc.EMPTY:
                        continue
                    visits[t] += 1
                    k_off = seqtab[b, desc.K_OFF] + n2 * gp[desc.K_HS] + j0 * gp[desc.K_RS]
                    v_off = seqtab[b, desc.V_OFF] + n2 * gp[desc.V_HS] + j0 * gp[desc.V_RS]
                    # the tile's K^T and V pairs, packed once for all its strips
                    pack_t32(k32, k_off // W, gp[desc.K_RS] // W, n_len, dw, kt, bn)
                    if BF:
                        nf |= pack_pairs16(v, v_off, gp[desc.V_RS], n_len, dv,
                                           vp.view(np.uint16), dv)
                    # A tile the band cuts through (a causal diagonal block) runs in strips
                    # of sb rows, each trimmed to the columns its rows reach: the top strip of
                    # a 512 x 256 diagonal block computes half of its columns, not all
                    sb = strip_rows(lo, hi, pre, ti0, tm, j0, n_len, cls, sbm)
                    for r0 in range(ti0, ti0 + tm, sb):
                        si0, sm, sj0, sn = r0, tm, j0, n_len
                        scls = cls
                        if sb < tm:
                            si0, sm, sj0, sn = trim_tile(lo, hi, pre, r0,
                                                         min(sb, ti0 + tm - r0), j0, n_len)
                            if sn == 0:
                                continue
                            if BF and sj0 % 2 == 1:
                                sj0 -= 1
                                sn += 1
                            scls = tile_class(seqtab, gp, mask, b, h, si0, sm, sj0, sn)
                            if scls == desc.EMPTY:
                                continue
                        co = sj0 - j0           # the strip's first column in the packed tile
                        ro = si0 - i0
                        mn = sm * sn
                        tq_off = q_off + ro * gp[desc.Q_RS]
                        if AMX:
                            product_amx(s, 0, sn, sm, sn, q32, tq_off // W,
                                        gp[desc.Q_RS] // W, kt, co, bn, dw, False, cfg)
                        else:
                            prod(s, 0, sn, sm, sn, q32, tq_off // W, gp[desc.Q_RS] // W, 1,
                                 4 * gp[desc.Q_RS] // W, kt, co, bn, dw, False)
                        if UNFUSED:
                            if alpha != 1.0:
                                s_ = s[:mn]
                                for x in range(mn):
                                    s_[x] *= alpha
                        if FUSED:
                            # masks only, -inf on the unscaled scores
                            mask_scores(seqtab, gp, mask, b, h, si0, sm, sj0, sn, scls, s)
                        else:
                            adjust_scores(seqtab, gp, fp, pse, slopes, mask, b, h, si0, sm,
                                          sj0, sn, scls, s)
                        if FUSED:
                            online_softmax16(s, sm, sn, ro, scls, mrun, lrun, vrow, acc, dv,
                                             sub, cor, mold, seqtab, gp, mask, b, h, si0, sj0,
                                             alpha, p16h, ldp16)
                        else:
                            online_softmax(s, sm, sn, ro, scls, mrun, lrun, vrow, acc, dv, sub,
                                           cor, mold, seqtab, gp, mask, b, h, si0, sj0, alpha,
                                           p16h, ldp16)
                        if UNFUSED:
                            if dropping:
                                drop_p(seqtab, gp, fp, drop_mask, b, h, si0, sm, sj0, sn, s, rb)
                        if FUSED:
                            if sn % 2 == 1:
                                for r in range(sm):     # the odd column's pair (P = 0)
                                    p16h[r * ldp16 + sn] = 0
                        elif BF:
                            to_bf16_rows(s, sm, sn, sn, p16h, ldp16)
                        # acc <- acc + p_drop @ v (the strip's V pairs start at pair co / 2;
                        # AMX's padding pairs past the strip read later keys' V rows, finite
                        # (checked) and met by P = 0, or the zeroed tail of vp)
                        if AMX:
                            hnl = (sn + 1) // 2
                            kpn = kpad(hnl)
                            zero_cols(p16, sm, ldp, hnl, kpn)
                            product_amx(acc, ro * dv, dv, sm, dv, p16, 0, ldp, vp,
                                        co // 2 * dv, dv, kpn, True, cfg)
                        elif BF:
                            prod(acc, ro * dv, dv, sm, dv, p16, 0, hn, 1, 4 * hn, vp,
                                 co // 2 * dv, dv, (sn + 1) // 2, True)
                        else:
                            prod(acc, ro * dv, dv, sm, dv, s.view(np.uint32), 0, sn, 1, 4 * sn,
                                 v32, v_off + co * gp[desc.V_RS], gp[desc.V_RS], sn, True)
                st = seqtab[b, desc.ST_OFF] + h * seqtab[b, desc.ST_HS]
                o_off = seqtab[b, desc.DY_OFF] + h * gp[desc.DY_HS]
                for r in range(m_len):
                    i = i0 + r
                    row = st + i * gp[desc.ST_RS]
                    oo = o_off + i * gp[desc.DY_RS]
                    # the row's float32 values in orow32, then stored as float32 or, for a
                    # uint16 ``out`` (bf16 output), as bf16 bits (convert.bf16_from_f32: the
                    # bits of the host conversion it replaces)
                    if mrun[r] == NEG_INF and vrow[r] != 0:
                        # computed elements, all scores -inf: m = -inf, l = NaN (the math);
                        # out 0 only when dropout removed every computed element
                        mrow[row] = NEG_INF
                        lrow[row] = np.float32(np.nan)
                        fill = np.float32(np.nan)
                        if UNFUSED:         # (pruned in the fused variant: no dropout there,
                            # and the dropout guard was 0.8 s of its cold compile)
                            if dropping and not row_keeps_computed(seqtab, gp, mask, drop_mask,
                                                                   b, h, i, rb):
                                fill = np.float32(0.0)
                        for e in range(dv):
                            orow32[e] = fill
                    elif mrun[r] == NEG_INF:
                        mrow[row] = -_FLT_MAX
                        lrow[row] = _FLT_MAX
                        for e in range(dv):
                            orow32[e] = 0.0
                    else:
                        mrow[row] = mrun[r]
                        lrow[row] = lrun[r]
                        inv_l = np.float32(1.0) / lrun[r]
                        all_dropped = False
                        if UNFUSED:         # (pruned in the fused variant, as above)
                            if dropping and inv_l != inv_l:
                                all_dropped = not row_keeps_computed(seqtab, gp, mask,
                                                                     drop_mask, b, h, i, rb)
                        if all_dropped:
                            for e in range(dv):        # every computed (NaN) P dropped
                                orow32[e] = 0.0
                        else:
                            scale_into(acc, r * dv, dv, inv_l, orow32, 0)
                    # (offsets, not slices of ``out``: tile.scale_into)
                    if OUT16:
                        bf16_row(o32bits, 0, dv, out, oo)
                    else:
                        # (x * 1 is x: the values here are never signalling NaNs)
                        scale_into(orow32, 0, dv, np.float32(1.0), out, oo)
            flags[t] = nf

    return fwd


_DRIVERS = {}
_CHUNKS = {}


def fusable(name, kind, gp, fp):
    """Whether a call takes the fused variant of the bf16 kinds (``_make_fwd`` / ``_make_bwd``
    with ``fused``): no dropout, no pse (and, backward, no dpse) and 0 < scale < inf, so
    scaling commutes with the row max and masked scores stay -inf."""
    if kind == "f32":
        return False
    scale = float(fp[desc.SCALE])
    return plain(name, gp) and 0.0 < scale < float("inf")


def _chunk(name, kind, fused, out16=False):
    """The chunk kernel of (name, kind, fused, out16), made once (each compiles on its first
    call, so a process that never meets dropout or pse never compiles the unfused variant, nor
    a float32-output kernel when it only asks for bf16 outputs)."""
    key = (name, kind, fused, out16)
    if key not in _CHUNKS:
        _CHUNKS[key] = (_make_fwd(kind, fused, out16) if name == "fwd" else
                        _make_bwd(kind, fused, out16))
    return _CHUNKS[key]


def driver(name, kind):
    """The native driver ``name`` ("fwd", "bwd") of ``kind`` ("f32", "bf16", "amx"; a bool means
    "bf16" / "f32"): its chunk kernel (the fused or the unfused variant, ``fusable``; compiled
    on first call) run once per chunk of the plan by ``threads.run_chunks``; the arguments are
    those of ``driver.fwd_driver`` / ``driver.bwd_driver`` with ``flags`` (int64 [chunks],
    zeros) in place of ``bad``: the bf16 kinds set flags[t] to 1 when chunk t read an inf or
    NaN in an input whose garbage could leak (v in the forward; q, k, v, dy in the backward)
    and the caller reruns the call on the BLAS driver.  The backward then takes dq16, dk16,
    dv16: uint16 arrays of dq's, dk's, dv's sizes for the out16 variant (``_make_bwd``), else
    1-element dummies.  The forward's out16: a uint16 ``out``."""
    if isinstance(kind, (bool, int)):
        kind = "bf16" if kind else "f32"
    key = (name, kind)
    if key not in _DRIVERS:
        gi, fi = (11, 12) if name == "fwd" else (17, 18)    # gp, fp in the argument list

        def run(*args):
            if name == "fwd":                # (q, k, v, out, ..., items, tptr, visits, flags)
                tptr = args[-3]
                out16 = args[3].dtype == np.uint16
            else:                            # (q, k, v, dy, lse, dsum, dq, ..., items, tptr,
                tptr = args[-6]              # visits, flags, dq16, dk16, dv16)
                out16 = args[-3].size == args[6].size
            chunk = _chunk(name, kind, fusable(name, kind, args[gi], args[fi]), out16)
            run_chunks(chunk, tptr.size - 1, args)

        _DRIVERS[key] = run
    return _DRIVERS[key]
