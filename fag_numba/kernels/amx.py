"""bf16 tile products on Intel AMX (``tdpbf16ps``): LLVM's AMX intrinsics as numba intrinsics.

What AMX is, in the terms used here: 8 tile registers (tiles 0-7) of up to 16 rows x 64 bytes,
whose shapes come from a 64-byte tile configuration loaded by ``ldtilecfg`` (palette 1;
``colsb[t]`` u16 at byte 16 + 2t, ``rows[t]`` u8 at byte 48 + t).  ``tdpbf16ps c, a, b`` adds
``A . B`` to the float32 tile C, with A = M rows of K bf16 (row-major, ``colsb = 2K``) and B = K/2
rows of N dwords, each dword the bf16 pair (B[2p, c], B[2p + 1, c]) ("VNNI" pairs, the layout
``native.pack_pairs16`` makes).  One instruction is a 16 x 16 x 32 product.

Rules this module follows:
- the OS must grant the tile-data state first (Linux ``arch_prctl(ARCH_REQ_XCOMP_PERM,
  XFEATURE_XTILEDATA)``, once per process: ``isa.amx_available``); without it the first tile
  instruction raises SIGILL.  Nothing here is compiled unless ``isa.amx_available()`` said yes
  (LLVM also aborts the process on an AMX intrinsic for a target without amx-tile);
- the tile configuration is per-thread state and ``ldtilecfg`` zeroes every tile, so each
  product loads its own configuration (a product may run on any thread) and keeps no tile
  across a configuration change;
- the intrinsics (``llvm.x86.ldtilecfg``, ``tilezero``, ``tileloadd64``, ``tdpbf16ps``,
  ``tilestored64``, ``tilerelease``: LLVM 22, the legacy forms with immediate tile numbers)
  address physical tiles, so the register allocation is ours: C tiles 0-3 (a 2 x 2 block of
  16 x 16 float32 tiles, 32 x 32 of C), A tiles 4-5 (rows 0-15, 16-31), B tiles 6-7 (columns
  0-15, 16-31).

Edges need no padding of M and N: a configuration sets the exact rows / column bytes of the
edge tiles (loads and stores then touch nothing outside the C, A and B bounds), and a product
loads at most four configurations (full blocks, the column edge, the row edge, the corner).  The
contraction is cut in equal chunks of ``kc`` <= 16 pairs (the largest divisor of the pair count),
so operands whose pair count is a multiple of 16 run full-width ``tdpbf16ps``; packed operands
are zero-padded to that by their packers.
"""
import llvmlite.ir as ir
import numpy as np
from numba import types
from numba.extending import intrinsic

from .. import _jit, isa
from .tile import _exp16
from .llir import (I1 as _I1, I8 as _I8, I16 as _I16, I32 as _I32, I64 as _I64, VF as _VF,
                   VB16 as _VB16, VI as _VI, VM as _VM, VOID as _VOID, bf16_pairs as _bf16_pairs,
                   edges, fn as _fn, loop_entry as _loop_entry, rounded as _rounded,
                   splat as _splat, transpose16)

# the tile-data permission, asked at import so a direct user of these kernels (a benchmark, a
# test) cannot run a tile instruction without it (SIGILL); the drivers ask through
# isa.native_kind before they compile anything
isa.amx_available()

_PTR = ir.PointerType(_I8)

# tile numbers
_C = (0, 1, 2, 3)      # C[0:16, 0:16], C[0:16, 16:32], C[16:32, 0:16], C[16:32, 16:32]
_A = (4, 5)            # A rows 0-15, 16-31
_B = (6, 7)            # B columns 0-15, 16-31


def _ptr(context, builder, aty, arr, off):
    """i8* to element ``off`` of a numba array."""
    data = context.make_array(aty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [off]), _PTR)


def _tile(n):
    return ir.Constant(_I8, n)


@intrinsic
def tile_config(typingctx, cfg):
    """``ldtilecfg``: load the 64-byte configuration ``cfg`` (uint8[64]) on this thread."""
    sig = types.void(cfg)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], ir.Constant(_I64, 0))
        builder.call(_fn(builder.module, "llvm.x86.ldtilecfg", _VOID, [_PTR]), [p])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def tile_release(typingctx):
    """``tilerelease``: back to the initial state (no tile data for the OS to save)."""
    sig = types.void()

    def codegen(context, builder, sig, args):
        builder.call(_fn(builder.module, "llvm.x86.tilerelease", _VOID, []), [])
        return context.get_dummy_value()

    return sig, codegen


def _make_block(mt, nt):
    """The block intrinsic for ``mt`` x ``nt`` C tiles (1 or 2 each) under the loaded config."""

    @intrinsic
    def block(typingctx, c, c_off, ldc, a, a_off, lda, b, b_off, ldb, nch, kc, accum):
        """C block (+)= A . B: c float32[:], rows ``ldc`` floats apart from ``c_off``; a
        uint32[:] (bf16 pairs), rows ``lda`` dwords apart from ``a_off``, chunk k at dword
        ``k * kc``; b uint32[:] pair-rows ``ldb`` dwords apart from ``b_off``, chunk k at row
        ``k * kc``; ``nch`` chunks; ``accum`` true loads C first, false starts from zero."""
        sig = types.void(c, c_off, ldc, a, a_off, lda, b, b_off, ldb, nch, kc, accum)

        def codegen(context, builder, sig, args):
            (cv, c_off, ldc, av, a_off, lda, bv, b_off, ldb, nch, kc, acc) = args
            mod = builder.module
            load = _fn(mod, "llvm.x86.tileloadd64", _VOID, [_I8, _PTR, _I64])
            store = _fn(mod, "llvm.x86.tilestored64", _VOID, [_I8, _PTR, _I64])
            zero = _fn(mod, "llvm.x86.tilezero", _VOID, [_I8])
            dot = _fn(mod, "llvm.x86.tdpbf16ps", _VOID, [_I8, _I8, _I8])
            four = ir.Constant(_I64, 4)
            sixteen = ir.Constant(_I64, 16)
            cstride = builder.mul(ldc, four)
            astride = builder.mul(lda, four)
            bstride = builder.mul(ldb, four)
            # C tile (i, j) starts at c_off + 16 i ldc + 16 j
            coffs = {}
            for i in range(mt):
                for j in range(nt):
                    o = builder.add(c_off, builder.add(builder.mul(ldc, ir.Constant(_I64, 16 * i)),
                                                       ir.Constant(_I64, 16 * j)))
                    coffs[i, j] = _ptr(context, builder, sig.args[0], cv, o)
            acc_on = builder.icmp_unsigned("!=", context.cast(builder, acc, sig.args[11],
                                                              types.int64), ir.Constant(_I64, 0))
            with builder.if_else(acc_on) as (then, other):
                with then:
                    for (i, j), p in coffs.items():
                        builder.call(load, [_tile(_C[2 * i + j]), p, cstride])
                with other:
                    for (i, j) in coffs:
                        builder.call(zero, [_tile(_C[2 * i + j])])
            a16 = builder.mul(lda, sixteen)
            bchunk = builder.mul(kc, ldb)
            pre, loop, done = _loop_entry(builder, nch, "amx")
            k = builder.phi(_I64)
            k.add_incoming(ir.Constant(_I64, 0), pre)
            ao = builder.phi(_I64)
            ao.add_incoming(a_off, pre)
            bo = builder.phi(_I64)
            bo.add_incoming(b_off, pre)
            builder.call(load, [_tile(_A[0]), _ptr(context, builder, sig.args[3], av, ao), astride])
            builder.call(load, [_tile(_B[0]), _ptr(context, builder, sig.args[6], bv, bo), bstride])
            builder.call(dot, [_tile(_C[0]), _tile(_A[0]), _tile(_B[0])])
            if nt == 2:
                builder.call(load, [_tile(_B[1]),
                                    _ptr(context, builder, sig.args[6], bv,
                                         builder.add(bo, sixteen)), bstride])
                builder.call(dot, [_tile(_C[1]), _tile(_A[0]), _tile(_B[1])])
            if mt == 2:
                builder.call(load, [_tile(_A[1]),
                                    _ptr(context, builder, sig.args[3], av,
                                         builder.add(ao, a16)), astride])
                builder.call(dot, [_tile(_C[2]), _tile(_A[1]), _tile(_B[0])])
                if nt == 2:
                    builder.call(dot, [_tile(_C[3]), _tile(_A[1]), _tile(_B[1])])
            end = builder.block
            k1 = builder.add(k, ir.Constant(_I64, 1))
            k.add_incoming(k1, end)
            ao.add_incoming(builder.add(ao, kc), end)
            bo.add_incoming(builder.add(bo, bchunk), end)
            builder.cbranch(builder.icmp_signed("<", k1, nch), loop, done)
            builder.position_at_end(done)
            for (i, j), p in coffs.items():
                builder.call(store, [_tile(_C[2 * i + j]), p, cstride])
            return context.get_dummy_value()

        return sig, codegen
    return block


block22 = _make_block(2, 2)
block21 = _make_block(2, 1)
block12 = _make_block(1, 2)
block11 = _make_block(1, 1)


@_jit.kernel
def set_config(cfg, ma, mb, na, nb, kc):
    """Configuration of a block with A rows ``ma`` (+ ``mb``), B columns ``na`` (+ ``nb``) and
    ``kc`` pairs per chunk (module docstring for the tile numbers; unused tiles stay 0 x 0).
    A call (four per product): inlined, its 4 copies were most of ``_product``'s 1.6 s of
    cold compile.  One loop over the 8 tiles, not 8 inlined helper calls (0.27 -> 0.1 s of
    cold compile)."""
    for x in range(64):
        cfg[x] = 0
    cfg[0] = 1
    # tile t: rows[t] rows of cols[t] dwords (a zero leaves the tile unused)
    rows = (ma, ma, mb, mb, ma, mb, kc, kc)
    cols = (na, nb, na, nb, kc, kc, na, nb)
    for t in range(8):
        if rows[t] != 0 and cols[t] != 0:
            cfg[48 + t] = rows[t]
            cfg[16 + 2 * t] = 4 * cols[t]      # <= 64: the high byte stays 0


@_jit.kernel
def _blocks(c, c_off, ldc, m0, m1, n0, n1, a, a_off, lda, b, b_off, ldb, nch, kc, accum, mt,
            nt):
    """Every block of rows [m0, m1) step 32, columns [n0, n1) step 32 (one configuration).
    A call, not inlined: ``_product`` calls it 4 times, and each inlined copy held all four
    block intrinsics (16 in all; 1.8 s of the bf16 forward's cold compile was ``_product``)."""
    for r0 in range(m0, m1, 32):
        for c0 in range(n0, n1, 32):
            co = c_off + r0 * ldc + c0
            ao = a_off + r0 * lda
            bo = b_off + c0
            if mt == 2:
                if nt == 2:
                    block22(c, co, ldc, a, ao, lda, b, bo, ldb, nch, kc, accum)
                else:
                    block21(c, co, ldc, a, ao, lda, b, bo, ldb, nch, kc, accum)
            elif nt == 2:
                block12(c, co, ldc, a, ao, lda, b, bo, ldb, nch, kc, accum)
            else:
                block11(c, co, ldc, a, ao, lda, b, bo, ldb, nch, kc, accum)


@_jit.kernel(inline="always")
def product_amx(c, c_off, ldc, m, n, a, a_off, lda, b, b_off, ldb, kp, accum, cfg):
    """``C[m, n] (+)= A . B`` on AMX tiles: C float32 rows ``ldc`` apart from ``c_off``; A
    ``m`` rows of ``kp`` bf16 pairs (uint32 dwords, rows ``lda`` apart from ``a_off``); B
    ``kp`` pair-rows of ``n`` dwords (``ldb`` apart from ``b_off``).  ``cfg``: a uint8[64]
    scratch for the tile configuration.  Only elements inside these bounds are read or written.

    An inlined entry that strips literal types (numba compiles a called function once per
    literal argument: the drivers' constant offsets and flags made 5 copies of the product,
    20 of its blocks, +160 s of cold compile) before the one compiled ``_product``.
    """
    _product(c, np.int64(c_off), np.int64(ldc), np.int64(m), np.int64(n), a, np.int64(a_off),
             np.int64(lda), b, np.int64(b_off), np.int64(ldb), np.int64(kp), accum != 0, cfg)


@_jit.kernel
def _product(c, c_off, ldc, m, n, a, a_off, lda, b, b_off, ldb, kp, accum, cfg):
    """``product_amx`` (a call, not inlined: each inlined copy costs compile time and the work
    per call is microseconds)."""
    if m <= 0 or n <= 0:
        return
    if kp <= 0:
        if not accum:
            for r in range(m):
                for x in range(n):
                    c[c_off + r * ldc + x] = 0.0
        return
    kc = 16
    while kp % kc != 0:
        kc -= 1
    nch = kp // kc
    mf = m - m % 32
    nf = n - n % 32
    mr = m - mf
    nr = n - nf
    ma = min(16, mr)
    na = min(16, nr)
    # (int64 zeros and twos, not literals: a literal argument compiles its own _blocks)
    zero = np.int64(0)
    two = np.int64(2)
    s16 = np.int64(16)
    if mf > 0 and nf > 0:
        set_config(cfg, s16, s16, s16, s16, kc)
        tile_config(cfg)
        _blocks(c, c_off, ldc, zero, mf, zero, nf, a, a_off, lda, b, b_off, ldb, nch, kc, accum,
                two, two)
    if mf > 0 and nr > 0:
        set_config(cfg, s16, s16, na, nr - na, kc)
        tile_config(cfg)
        _blocks(c, c_off, ldc, zero, mf, nf, n, a, a_off, lda, b, b_off, ldb, nch, kc, accum,
                two, two if nr > 16 else np.int64(1))
    if mr > 0 and nf > 0:
        set_config(cfg, ma, mr - ma, s16, s16, kc)
        tile_config(cfg)
        _blocks(c, c_off, ldc, mf, m, zero, nf, a, a_off, lda, b, b_off, ldb, nch, kc, accum,
                two if mr > 16 else np.int64(1), two)
    if mr > 0 and nr > 0:
        set_config(cfg, ma, mr - ma, na, nr - na, kc)
        tile_config(cfg)
        _blocks(c, c_off, ldc, mf, m, nf, n, a, a_off, lda, b, b_off, ldb, nch, kc, accum,
                two if mr > 16 else np.int64(1), two if nr > 16 else np.int64(1))
    tile_release()




@intrinsic
def _tpairs16(typingctx, src, s_off, ld, nrows, ncols, dst, d_off, ldd):
    """One 32-row x 16-column block of float32 ``src`` (rows ``ld`` apart from ``s_off``) as
    transposed bf16 pairs: ``dst[d_off + j * ldd + p] = (bf16(src[2p, j]), bf16(src[2p+1, j]))``
    for p < 16, j < min(16, ncols); rows >= ``nrows`` read as zero and are never loaded, nor
    columns >= ``ncols``.  16 x 16 dword transpose in 4 shuffle stages (64 two-source shuffles).
    """
    sig = types.void(src, s_off, ld, nrows, ncols, dst, d_off, ldd)

    def codegen(context, builder, sig, args):
        sv, s_off, ld, nrows, ncols, dv, d_off, ldd = args
        mod = builder.module
        sbase = context.make_array(sig.args[0])(context, builder, sv).data
        dbase = context.make_array(sig.args[5])(context, builder, dv).data
        mload = _fn(mod, "llvm.masked.load.v16f32.p0", _VF, [sbase.type, _I32, _VM, _VF])
        mstore = _fn(mod, "llvm.masked.store.v16i32.p0", _VOID, [_VI, dbase.type, _I32, _VM])
        zero = ir.Constant(_VF, [0.0] * 16)
        colmask, last = edges(builder, nrows, ncols)
        rows = []
        for r in range(32):
            rc = ir.Constant(_I64, r)
            ok = builder.icmp_signed("<", rc, nrows)
            rr = builder.select(ok, rc, last)
            p = builder.gep(sbase, [builder.add(s_off, builder.mul(rr, ld))])
            m = builder.and_(colmask, _splat(builder, ok, _VM))
            rows.append(builder.call(mload, [p, ir.Constant(_I32, 4), m, zero]))
        vec = _pair_rows(builder, rows)
        transpose16(builder, vec)
        allm = _splat(builder, ir.Constant(_I1, 1), _VM)
        for j in range(16):
            ok = builder.icmp_signed("<", ir.Constant(_I64, j), ncols)
            p = builder.gep(dbase, [builder.add(d_off, builder.mul(ir.Constant(_I64, j), ldd))])
            builder.call(mstore, [vec[j], p, ir.Constant(_I32, 4),
                                  builder.and_(allm, _splat(builder, ok, _VM))])
        return context.get_dummy_value()

    return sig, codegen


def _pair_rows(builder, rows):
    """32 float32 rows -> 16 <16 x i32> of bf16 pairs (row 2p, row 2p + 1) per lane."""
    return [_bf16_pairs(builder, rows[2 * p], rows[2 * p + 1]) for p in range(16)]


@intrinsic
def _pds16(typingctx, s, dp, t_off, ld, nrows, ncols, alpha, lt, dt, r0, at, ast, d_off, ldd,
           sr, sr_off, ldr):
    """The backward's elementwise step of one 32-row x 16-column block, fused (AMX kind,
    without dropout, pse or dpse): from the raw scores ``s`` and ``dp = dY V^T`` (float32,
    rows ``ld`` apart from ``t_off``), ``P = exp(alpha * s - lse)`` and
    ``dS = P * (dP - Dsum)`` (``lt`` / ``dt``: float32 lse and Dsum of the tile's rows, this
    block's first at ``r0``), written once as the three bf16 A operands: transposed pairs of P
    into ``at`` and of dS into ``ast`` (``t_pairs`` layout from ``d_off``, ``ldd``) and dS rows
    into ``sr`` (uint16, rows ``ldr`` apart from ``sr_off``).  Bitwise the values of the
    alpha pass, ``exp_sub``, ``drop_ds``, ``t_pairs`` x 2 and ``to_bf16_rows`` it replaces
    (the same float32 operations in the same order).  Rows >= nrows are zero pairs and are
    never read; columns >= ncols are neither read nor written.
    """
    sig = types.void(s, dp, t_off, ld, nrows, ncols, alpha, lt, dt, r0, at, ast, d_off, ldd, sr,
                     sr_off, ldr)

    def codegen(context, builder, sig, args):
        (sv, dpv, t_off, ld, nrows, ncols, alpha, ltv, dtv, r0, atv, astv, d_off, ldd, srv,
         sr_off, ldr) = args
        mod = builder.module
        sbase = context.make_array(sig.args[0])(context, builder, sv).data
        dpbase = context.make_array(sig.args[1])(context, builder, dpv).data
        lbase = context.make_array(sig.args[7])(context, builder, ltv).data
        dbase = context.make_array(sig.args[8])(context, builder, dtv).data
        atb = context.make_array(sig.args[10])(context, builder, atv).data
        astb = context.make_array(sig.args[11])(context, builder, astv).data
        srb = context.make_array(sig.args[14])(context, builder, srv).data
        mload = _fn(mod, "llvm.masked.load.v16f32.p0", _VF, [sbase.type, _I32, _VM, _VF])
        mstore = _fn(mod, "llvm.masked.store.v16i32.p0", _VOID, [_VI, atb.type, _I32, _VM])
        hstore = _fn(mod, "llvm.masked.store.v16i16.p0", _VOID,
                     [ir.VectorType(_I16, 16), srb.type, _I32, _VM])
        zero = ir.Constant(_VF, [0.0] * 16)
        colmask, last = edges(builder, nrows, ncols)
        alphav = _splat(builder, alpha, _VF)
        prow, dsrow = [], []
        for r in range(32):
            rc = ir.Constant(_I64, r)
            ok = builder.icmp_signed("<", rc, nrows)
            rr = builder.select(ok, rc, last)
            m = builder.and_(colmask, _splat(builder, ok, _VM))
            o = builder.add(t_off, builder.mul(rr, ld))
            x = builder.call(mload, [builder.gep(sbase, [o]), ir.Constant(_I32, 4), m, zero])
            y = builder.call(mload, [builder.gep(dpbase, [o]), ir.Constant(_I32, 4), m, zero])
            ri = builder.add(r0, rr)
            lse = _splat(builder, builder.load(builder.gep(lbase, [ri])), _VF)
            dsum = _splat(builder, builder.load(builder.gep(dbase, [ri])), _VF)
            p = _exp16(builder, _rounded(builder, builder.fmul(x, alphav)), lse, True)
            ds = builder.fmul(p, builder.fsub(y, dsum))
            # rows past nrows: zero pairs (t_pairs' padding), whatever was computed
            okv = _splat(builder, ok, _VM)
            prow.append(builder.select(okv, p, zero))
            dsrow.append(builder.select(okv, ds, zero))
            h = builder.bitcast(builder.fptrunc(ds, _VB16), ir.VectorType(_I16, 16))
            so = builder.add(sr_off, builder.mul(rr, ldr))
            builder.call(hstore, [h, builder.gep(srb, [so]), ir.Constant(_I32, 2), m])
        allm = _splat(builder, ir.Constant(_I1, 1), _VM)
        for rows, base in ((prow, atb), (dsrow, astb)):
            vec = _pair_rows(builder, rows)
            transpose16(builder, vec)
            for j in range(16):
                ok = builder.icmp_signed("<", ir.Constant(_I64, j), ncols)
                ptr = builder.gep(base, [builder.add(d_off, builder.mul(ir.Constant(_I64, j),
                                                                        ldd))])
                builder.call(mstore, [vec[j], ptr, ir.Constant(_I32, 4),
                                      builder.and_(allm, _splat(builder, ok, _VM))])
        return context.get_dummy_value()

    return sig, codegen


@_jit.kernel
def pds_pairs(s, dp, m, n, alpha, lt, dt, at, ast, ldd, kp, sr, ldr):
    """``_pds16`` over a whole m x n tile (row stride n in ``s`` and ``dp``): transposed pairs
    of P and dS in ``at`` / ``ast`` for p < kp (pairs past (m + 1) // 2 zero, as ``t_pairs``)
    and dS rows (bf16, uint16 ``sr``, row stride ``ldr``)."""
    for p0 in range(0, kp, 16):
        for j0 in range(0, n, 16):
            _pds16(s, dp, 2 * p0 * n + j0, n, m - 2 * p0, n - j0, alpha, lt, dt, 2 * p0, at, ast,
                   j0 * ldd + p0, ldd, sr, 2 * p0 * ldr + j0, ldr)


@_jit.kernel
def t_pairs(src, m, n, ld, dst, ldd, kp):
    """Transposed bf16 pairs of rows, the A operand of ``P^T dY`` and ``dS^T Q``:
    ``dst[j * ldd + p] = (bf16(src[2p, j]), bf16(src[2p + 1, j]))`` (uint32) for j < n,
    p < kp; rows >= m are zero (so pairs past (m + 1) // 2 are zero padding).  ``ldd`` >= kp
    rounded up to 16."""
    for p0 in range(0, kp, 16):
        for j0 in range(0, n, 16):
            _tpairs16(src, 2 * p0 * ld + j0, ld, m - 2 * p0, n - j0, dst, j0 * ldd + p0, ldd)


@_jit.kernel(inline="always")
def kpad(kp):
    """Pairs a packed operand is padded to: full 16-pair chunks past one chunk (``product_amx``
    cuts the contraction in equal chunks, so 47 pairs would run as 47 one-pair chunks)."""
    return kp if kp <= 16 else (kp + 15) // 16 * 16


@_jit.kernel(inline="always")
def zero_cols(a, m, lda, k0, k1):
    """``a[r * lda + x] = 0`` for r < m, k0 <= x < k1: the padding pairs of a row operand."""
    for r in range(m):
        for x in range(k0, k1):
            a[r * lda + x] = 0
