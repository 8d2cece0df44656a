"""Serial tile kernels: BLAS products, the vectorised exp, and the one score-modification step.

Every function here is serial (``_jit.kernel``); only ``driver.py`` is parallel.  Arrays are
flat float32 buffers addressed through the descriptor tables of ``desc.py``; a tile is the
product of rows ``[i0, i0 + m_len)`` of one query head and rows ``[j0, j0 + n_len)`` of one
key head of sequence b.
"""
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic
from numba.np.linalg import _BLAS

from .. import _jit
from ..dropout import _counter_start, _mask_keep_row, _philox_keep_row
from ..masks import _band_tile_class, _dense_tile_class
from . import desc
from .llir import (F32 as _F32, I32 as _I32, I64 as _I64, VB16 as _VB16, VF as _VF, VH16 as _VH16,
                   VI as _VI, VM as _VM, data as _data, fn as _llvm_fn, lanes as _lanes,
                   loop_entry as _loop_entry, rounded as _rounded, splat as _splat,
                   store as _store)

# numba's own BLAS entry (it calls SciPy's cython_blas sgemm): single-threaded here because the
# chunk kernels run it on several threads at once and hold OpenBLAS to one thread (threads.py).
_xxgemm = _BLAS().numba_xxgemm(types.float32)
_KIND_S = ord("s")
# int64 scalars, not Python ints: a Python-int global (or a literal 0) reaches ``gemm`` as a
# Literal type, and every distinct literal combination compiled its own ``gemm`` (4 copies).
TRANS_N = np.int64(ord("N"))
TRANS_T = np.int64(ord("T"))
OFF0 = np.int64(0)   # "offset 0" for scratch tiles, for the same reason


@_jit.kernel
def scratch(n, dtype):
    """``np.empty(n, dtype)`` starting on a 64-byte cache line: numba aligns its arrays to 32
    bytes, so half of the scratch tiles (by where the heap put them) started mid-line, and
    every 64-byte vector or AMX tile row of them touched two lines (the same process ran the
    bf16 forward at 21 or 26 ms by its heap state).  A call, not inlined: compiled once per
    dtype instead of once per use (~20 uses: +0.3 s of cold compile inlined)."""
    buf = np.empty(n + 64, dtype)
    skip = ((-buf.ctypes.data) % 64) // buf.itemsize
    return buf[skip:skip + n]


@_jit.kernel
def zscratch(n, dtype):
    """``scratch`` filled with zeros (a call: an inlined ``x[:] = 0`` per use cost cold
    compile)."""
    buf = scratch(n, dtype)
    for x in range(n):
        buf[x] = 0
    return buf


@_jit.kernel
def gemm(ta, tb, m, n, k, alpha, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc, ab):
    """Row-major ``C[m, n] = alpha * op(A) @ op(B) + beta * C`` on flat float32 buffers.

    ``A``, ``B``, ``C`` start at element offsets ``a_off``, ``b_off``, ``c_off`` with row strides
    ``lda``, ``ldb``, ``ldc`` (the last dim is contiguous); ``op`` is ``TRANS_N``/``TRANS_T``.
    Column-major BLAS sees the transposed problem ``C^T = op(B)^T op(A)^T``, so A and B swap.
    ``ab`` is a float32 scratch of 2 elements holding alpha/beta for the pointer interface.
    """
    if m <= 0 or n <= 0:
        return
    if k <= 0:
        # empty inner dimension (D = 0): the product is zero; BLAS would reject ld = 0
        if beta == 0.0:
            for r in range(m):
                for q in range(n):
                    c[c_off + r * ldc + q] = 0.0
        return
    ab[0] = alpha
    ab[1] = beta
    fn = _ab_fn(ab)
    if fn != 0:         # an LP64 Fortran sgemm_ by address (torch's MKL: fag_numba/mkl.py)
        _sgemm_at(fn, tb, ta, n, m, k, ab, b, b_off, max(ldb, 1), a, a_off, max(lda, 1), c,
                  c_off, max(ldc, 1))
        return
    _xxgemm(_KIND_S, tb, ta, n, m, k, ab[0:1].ctypes, b[b_off:].ctypes, max(ldb, 1),
            a[a_off:].ctypes, max(lda, 1), ab[1:2].ctypes, c[c_off:].ctypes, max(ldc, 1))


@_jit.kernel(inline="always")
def gemm_scratch(gp):
    """``gemm``'s ``ab``: float32 [4], alpha and beta in 0 and 1, and in bytes 8..15 the
    int64 address of the ``sgemm_`` to call (``gp[desc.SGEMM]``; 0: SciPy's OpenBLAS)."""
    ab = np.zeros(4, np.float32)
    _set_ab_fn(ab, gp[desc.SGEMM])
    return ab


def _gemm_scratch_python(gp):
    """``gemm_scratch`` for ``NUMBA_DISABLE_JIT=1`` (intrinsics cannot run as Python)."""
    ab = np.zeros(4, np.float32)
    ab.view(np.int64)[1] = gp[desc.SGEMM]
    return ab


if numba.config.DISABLE_JIT:
    gemm_scratch = _gemm_scratch_python     # noqa: F811  (chosen at import, as gemm)


def _ab_slot(context, builder, aty, abv):
    """Pointer to the int64 in bytes 8..15 of the float32 array ``ab``."""
    p = builder.gep(_data(context, builder, aty, abv), [ir.Constant(ir.IntType(64), 2)])
    return builder.bitcast(p, ir.IntType(64).as_pointer())


@intrinsic
def _ab_fn(typingctx, ab):
    """The int64 in bytes 8..15 of ``ab`` (a load; numba's ``view`` cost compile time)."""
    def codegen(context, builder, sig, args):
        return builder.load(_ab_slot(context, builder, sig.args[0], args[0]))
    return types.int64(ab), codegen


@intrinsic
def _set_ab_fn(typingctx, ab, fn):
    """Store the int64 ``fn`` in bytes 8..15 of ``ab``."""
    def codegen(context, builder, sig, args):
        builder.store(args[1], _ab_slot(context, builder, sig.args[0], args[0]))
        return context.get_dummy_value()
    return types.void(ab, types.int64), codegen


@intrinsic
def _sgemm_at(typingctx, fn, ta, tb, m, n, k, ab, a, a_off, lda, b, b_off, ldb, c, c_off, ldc):
    """Call the LP64 Fortran ``sgemm_(transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C,
    ldc)`` at address ``fn`` (every argument by pointer; alpha, beta: ab[0], ab[1]; the
    matrices at element offsets of flat float32 arrays)."""
    sig = types.void(fn, ta, tb, m, n, k, ab, a, a_off, lda, b, b_off, ldb, c, c_off, ldc)

    def codegen(context, builder, sig, args):
        from numba.core import cgutils
        (fnv, ta, tb, m, n, k, abv, av, a_off, lda, bv, b_off, ldb, cv, c_off, ldc) = args
        i8, i32 = ir.IntType(8), ir.IntType(32)
        f32p = ir.FloatType().as_pointer()

        def boxed(val, ty):
            slot = cgutils.alloca_once(builder, ty)
            builder.store(builder.trunc(val, ty), slot)
            return slot
        abp = _data(context, builder, sig.args[6], abv)
        ptrs = [boxed(ta, i8), boxed(tb, i8), boxed(m, i32), boxed(n, i32), boxed(k, i32),
                abp,
                builder.gep(_data(context, builder, sig.args[7], av), [a_off]), boxed(lda, i32),
                builder.gep(_data(context, builder, sig.args[10], bv), [b_off]),
                boxed(ldb, i32),
                builder.gep(abp, [ir.Constant(ir.IntType(64), 1)]),
                builder.gep(_data(context, builder, sig.args[13], cv), [c_off]),
                boxed(ldc, i32)]
        fnty = ir.FunctionType(ir.VoidType(), [i8.as_pointer(), i8.as_pointer()]
                               + [i32.as_pointer()] * 3 + [f32p, f32p, i32.as_pointer(), f32p,
                                                           i32.as_pointer(), f32p, f32p,
                                                           i32.as_pointer()])
        builder.call(builder.inttoptr(fnv, fnty.as_pointer()), ptrs)
        return context.get_dummy_value()

    return sig, codegen


def _gemm_numpy(ta, tb, m, n, k, alpha, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc, ab):
    """``gemm`` in numpy, for ``NUMBA_DISABLE_JIT=1`` only (the coverage lane): pure Python
    cannot call numba's BLAS external function (calling it there silently returns its type).
    Same operands, offsets and strides; ``beta == 0`` never reads C (as BLAS)."""
    if m <= 0 or n <= 0:
        return
    r = np.arange(m)[:, None]
    q = np.arange(n)[None, :]
    if k <= 0:
        if beta == 0.0:
            c[c_off + r * ldc + q] = 0.0
        return
    p = np.arange(k)
    # op(A)[r, p] and op(B)[p, q] gathered from the flat buffers
    ia = a_off + (r * lda + p[None, :] if ta == TRANS_N else p[None, :] * lda + r)
    ib = b_off + (p[:, None] * ldb + q if tb == TRANS_N else q * ldb + p[:, None])
    prod = np.float32(alpha) * (a[ia] @ b[ib])
    ic = c_off + r * ldc + q
    c[ic] = prod if beta == 0.0 else prod + np.float32(beta) * c[ic]


if numba.config.DISABLE_JIT:
    gemm = _gemm_numpy     # noqa: F811  (chosen at import; the kernels call ``gemm`` by name)


# ---- exp: Cephes expf range reduction + a degree-5 polynomial, as explicit 16-lane IR ----
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
# exp(t) ~ 1 + t * (1 + t * (C2 + t * (C3 + t * (C4 + t * C5)))) on |t| <= ln2 / 2: a degree-5
# fit of the relative error (Lawson iterations on 20001 points; 1.05e-7 in exact arithmetic,
# 1.74e-7 measured in float32 with this reduction).  Six fmas, where Cephes' degree-7 form took
# eight operations: the exp is the forward's largest part (the vector ports' limit), ~10% of it.
_MAGIC = np.float32(12582912.0)        # 1.5 * 2**23
_C2 = np.float32(0.499992311000824)
_C3 = np.float32(0.16667114198207855)
_C4 = np.float32(0.04189009591937065)
_C5 = np.float32(0.008312505669891834)
_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_XMIN = np.float32(-87.33654)   # below: exp underflows to (almost) 0 -> exactly 0
_XCLAMP = np.float32(88.0)      # clamp for the 2**n bits (n <= 127 keeps the exponent finite)
_XOVF = np.float32(88.72283)    # above: float32 overflow -> inf
_INF = np.float32(np.inf)
NEG_INF = np.float32(-np.inf)


def _vc(x):
    """A 16-lane float32 constant."""
    return ir.Constant(_VF, [float(np.float32(x))] * 16)


def _scalef_ok():
    """Whether ``_exp16`` may emit vscalefps (AVX-512F in numba's target and the host; LLVM
    aborts on the intrinsic for a target without it)."""
    from .. import isa
    return isa.target_has("avx512f") and not _FORCE_NO_SCALEF[0]


_FORCE_NO_SCALEF = [False]      # tests: build the portable form on an AVX-512 machine too


def _exp16(builder, x, subv, full):
    """IR: 16 lanes of ``exp(x - sub)`` with the special cases of ``exp_sub`` (``full``), or
    only the underflow-to-0 one (``exp_sub_le``: the caller guarantees x <= sub, finite sub)."""
    mod = builder.module
    # fmuladd, not fma: fused where the target has FMA, a multiply and an add elsewhere (an
    # fma on a target without it is a libm call per lane)
    fma = _llvm_fn(mod, "llvm.fmuladd.v16f32", _VF, [_VF, _VF, _VF])
    d = builder.fsub(x, subv)
    scalef_ok = _scalef_ok()
    if scalef_ok:
        # a NaN d flows through to a NaN result (vscalefps of NaN is NaN), which the final
        # select keeps: exp_sub_le / exp_scale_bf16_le give NaN for a NaN argument, and
        # online_softmax16 finds a NaN score by its row sum.  (The portable form must not:
        # fptosi of NaN is poison.)
        xc = builder.select(builder.fcmp_ordered("<", d, _vc(_XMIN)), _vc(_XMIN), d)
    else:
        xc = builder.select(builder.fcmp_ordered(">", d, _vc(_XMIN)), d, _vc(_XMIN))
    if full:
        xc = builder.select(builder.fcmp_ordered("<", xc, _vc(_XCLAMP)), xc, _vc(_XCLAMP))
    # n = round(x / ln2) by the magic number 1.5 * 2**23 (|x / ln2| < 2**22: the sum's rounding
    # is the rounding to an integer): an fma and a subtraction, where floor(x / ln2 + 0.5)
    # took an fma and a vrndscaleps (two port-0 uops).  Only ties round differently; |t| stays
    # <= ln2 / 2 either way.
    fx = builder.fsub(builder.call(fma, [xc, _vc(_LOG2E), _vc(_MAGIC)]), _vc(_MAGIC))
    nfx = builder.fneg(fx)
    t = builder.call(fma, [nfx, _vc(_LN2_HI), xc])
    t = builder.call(fma, [nfx, _vc(_LN2_LO), t])
    y = _vc(_C5)
    for p in (_C4, _C3, _C2, _ONE, _ONE):
        y = builder.call(fma, [y, t, _vc(p)])
    # y * 2**n, n >= -126 after the clamp (2**n a normal number): with AVX-512 one vscalefps,
    # which rounds exactly as the product with 2**n does (exact unless the result is
    # subnormal, then the same IEEE rounding), instead of convert, add, shift and multiply
    # (then 0 below XMIN: the scalef form keeps a NaN d's NaN, the portable one gives 0)
    if scalef_ok:
        scalef = _llvm_fn(mod, "llvm.x86.avx512.mask.scalef.ps.512", _VF,
                          [_VF, _VF, _VF, ir.IntType(16), _I32])
        y = builder.call(scalef, [y, fx, _vc(_ZERO), ir.Constant(ir.IntType(16), -1),
                                  ir.Constant(_I32, 4)])        # 4: the current rounding mode
        v = builder.select(builder.fcmp_ordered("<", d, _vc(_XMIN)), _vc(_ZERO), y)
    else:
        # 2**n from its exponent bits
        bits = builder.shl(builder.add(builder.fptosi(fx, _VI), ir.Constant(_VI, [127] * 16)),
                           ir.Constant(_VI, [23] * 16))
        y = builder.fmul(y, builder.bitcast(bits, _VF))
        v = builder.select(builder.fcmp_ordered(">=", d, _vc(_XMIN)), y, _vc(_ZERO))
    if not full:
        return v
    v = builder.select(builder.fcmp_ordered(">", d, _vc(_XOVF)), _vc(_INF), v)
    v = builder.select(builder.fcmp_unordered("uno", d, d), d, v)
    # a masked score (-inf) gives exactly 0 whatever sub is (even -inf or NaN statistics)
    return builder.select(builder.fcmp_ordered("==", x, _vc(NEG_INF)), _vc(_ZERO), v)


def _make_exp_row(full, to16=False):
    """The row intrinsic of ``exp_sub`` (``full``) or of ``exp_sub_le``; ``to16``: of
    ``exp_scale_bf16`` / ``exp_scale_bf16_le``."""
    def _exp_row_typer(buf, dst):
        """``buf[off:off+n] = exp(buf[off:off+n] - sub)`` in 16-lane vectors; returns their sum.
        ``to16``: ``dst[doff:doff+n] = bf16(exp(alpha * buf[off:off+n] - sub))`` instead (buf
        only read; dst uint16), the sum of the float32 values returned as well.

        Explicit <16 x float> IR, not a numba loop: LLVM's vectoriser keeps to 256-bit vectors on
        this target ("prefer-vector-width" 256), explicit 512-bit vectors compile to zmm: 0.27 vs
        0.36 ns per element.  The tail is a masked load/store.  The sum adds lane-wise, then halves
        the vector 16 -> 8 -> 4 -> 2 -> 1: a fixed order, so the same on every run and thread.
        """
        if to16:
            sig = types.float32(buf, types.int64, types.float32, types.int64, types.float32, dst,
                                types.int64)
        else:
            sig = types.float32(buf, types.int64, types.float32, types.int64)

        def codegen(context, builder, sig, args):
            bufv, off, sub, n = args[:4]
            mod = builder.module
            base = builder.gep(_data(context, builder, sig.args[0], bufv), [off])
            subv = _splat(builder, sub, _VF)
            if to16:
                alphav = _splat(builder, args[4], _VF)
                dbase = builder.gep(_data(context, builder, sig.args[5], args[5]), [args[6]])

            def value(x):
                """exp of a loaded vector: the scaled product first when to16 (a multiply
                of its own, as the separate scaling pass it replaces rounded it)."""
                if to16:
                    x = _rounded(builder, builder.fmul(x, alphav))
                return _exp16(builder, x, subv, full)

            def put(v, i, mask=None):
                """Store the values of element i on: in place, or as bf16 into dst."""
                if to16:
                    h = builder.bitcast(builder.fptrunc(v, _VB16), _VH16)
                    _store(builder, h, builder.bitcast(builder.gep(dbase, [i]),
                                                       _VH16.as_pointer()), 2, mask)
                else:
                    _store(builder, v, builder.bitcast(builder.gep(base, [i]),
                                                       _VF.as_pointer()), 4, mask)
            zero = _vc(_ZERO)
            nvec = builder.and_(n, ir.Constant(_I64, -16))
            entry = builder.block
            loop = builder.append_basic_block("exprow.loop")
            tail = builder.append_basic_block("exprow.tail")
            tdo = builder.append_basic_block("exprow.tdo")
            done = builder.append_basic_block("exprow.done")
            builder.cbranch(builder.icmp_signed(">", nvec, ir.Constant(_I64, 0)), loop, tail)
            builder.position_at_end(loop)
            i = builder.phi(_I64)
            acc = builder.phi(_VF)
            p = builder.bitcast(builder.gep(base, [i]), _VF.as_pointer())
            v = value(builder.load(p, align=4))
            put(v, i)
            acc_n = builder.fadd(acc, v)
            i_n = builder.add(i, ir.Constant(_I64, 16))
            i.add_incoming(ir.Constant(_I64, 0), entry)
            i.add_incoming(i_n, loop)
            acc.add_incoming(zero, entry)
            acc.add_incoming(acc_n, loop)
            builder.cbranch(builder.icmp_signed("<", i_n, nvec), loop, tail)
            builder.position_at_end(tail)
            acc_t = builder.phi(_VF)
            acc_t.add_incoming(zero, entry)
            acc_t.add_incoming(acc_n, loop)
            rem = builder.sub(n, nvec)
            builder.cbranch(builder.icmp_signed(">", rem, ir.Constant(_I64, 0)), tdo, done)
            builder.position_at_end(tdo)
            mask = _lanes(builder, rem)
            pt = builder.bitcast(builder.gep(base, [nvec]), _VF.as_pointer())
            mload = _llvm_fn(mod, "llvm.masked.load.v16f32.p0", _VF, [pt.type, _I32, _VM, _VF])
            xt = builder.call(mload, [pt, ir.Constant(_I32, 4), mask, _vc(NEG_INF)])
            vt = value(xt)
            put(vt, nvec, mask)
            acc_d = builder.fadd(acc_t, builder.select(mask, vt, zero))
            builder.branch(done)
            builder.position_at_end(done)
            a = builder.phi(_VF)
            a.add_incoming(acc_t, tail)
            a.add_incoming(acc_d, tdo)
            w = 16
            while w > 1:
                w //= 2
                und = ir.Constant(a.type, ir.Undefined)
                vw = ir.VectorType(_I32, w)
                lo = builder.shuffle_vector(a, und, ir.Constant(vw, list(range(w))))
                hi = builder.shuffle_vector(a, und, ir.Constant(vw, list(range(w, 2 * w))))
                a = builder.fadd(lo, hi)
            return builder.extract_element(a, ir.Constant(_I32, 0))
        return sig, codegen

    if to16:
        @intrinsic
        def _exp_row(typingctx, buf, off, sub, n, alpha, dst, doff):
            return _exp_row_typer(buf, dst)
    else:
        @intrinsic
        def _exp_row(typingctx, buf, off, sub, n):
            return _exp_row_typer(buf, None)
    _exp_row.__doc__ = _exp_row_typer.__doc__
    return _exp_row


_exp_row = _make_exp_row(True)
_exp_row_le = _make_exp_row(False)
_exp_row16 = _make_exp_row(True, True)
_exp_row16_le = _make_exp_row(False, True)


@_jit.kernel
def exp_sub(buf, off, sub, n):
    """In place ``buf[off + q] = exp(buf[off + q] - sub)`` for q < n; returns their sum.

    Vectorised (PERF.md: a scalar libm exp per score costs as much as the GEMMs at D = 64):
    range reduction x = n*ln2 + t (Cephes expf), a degree-5 polynomial for exp(t), and 2**n
    built from integer bits, in one pass that also sums the row (the forward's l; the former
    int32-scratch two-pass form plus a row-sum pass cost 0.67 ns per element, this 0.27).
    Max relative error 1.7e-7 measured (bound promised: 1e-6).  x < -87.34 (and -inf) give
    exactly 0, x > 88.72 gives inf, NaN propagates; arguments in (88, 88.72] are clamped to 88
    (softmax arguments are <= 0).
    """
    return _exp_row(buf, off, sub, n)


@_jit.kernel
def exp_sub_le(buf, off, sub, n):
    """``exp_sub`` for rows the caller knows satisfy ``buf[off + q] <= sub`` (or -inf) with a
    finite ``sub``: no NaN and no overflow can occur, so only the underflow-to-0 test remains
    (the forward with a finite row max).  7 of ~27 vector operations fewer per 16 elements.
    """
    return _exp_row_le(buf, off, sub, n)


@_jit.kernel
def exp_scale_bf16(buf, off, alpha, sub, n, dst, doff):
    """``dst[doff + q] = bf16(exp(alpha * buf[off + q] - sub))`` (uint16 bits, round to
    nearest even) for q < n, buf only read; returns the sum of the float32 exponentials.  The
    same float32 values, sum and bf16 bits as a scaling pass, ``exp_sub`` and a conversion pass
    (the native forward's three passes over a tile, now one)."""
    return _exp_row16(buf, off, sub, n, alpha, dst, doff)


@_jit.kernel
def exp_scale_bf16_le(buf, off, alpha, sub, n, dst, doff):
    """``exp_scale_bf16`` for rows with ``alpha * buf[off + q] <= sub`` (or -inf), sub finite
    (``exp_sub_le``'s special case)."""
    return _exp_row16_le(buf, off, sub, n, alpha, dst, doff)


def _exp_sub_python(buf, off, sub, n):
    """``exp_sub`` / ``exp_sub_le`` for ``NUMBA_DISABLE_JIT=1`` only (the coverage lane): pure
    Python cannot run the ``_exp_row`` intrinsics.  Same special cases, numpy's exp."""
    b = buf[off:off + n]
    src = b.copy()
    with np.errstate(all="ignore"):
        x = (src - np.float32(sub)).astype(np.float32)
        v = np.exp(np.minimum(x, _XCLAMP)).astype(np.float32)
        v = np.where(x >= _XMIN, v, _ZERO)
        v = np.where(x > _XOVF, _INF, v)
        v = np.where(x != x, x, v)
        v = np.where(src == NEG_INF, _ZERO, v).astype(np.float32)
    b[:] = v
    return np.float32(v.sum(dtype=np.float32))


if numba.config.DISABLE_JIT:
    exp_sub = _exp_sub_python      # noqa: F811  (chosen at import, as gemm above)
    exp_sub_le = _exp_sub_python   # noqa: F811


# the only flag on these calls: signed zeros may come out either way (either is the row max;
# without it LLVM adds a -0 < +0 fixup to every maximum), NaN still propagates
_NSZ = ("nsz",)


def _make_vmax_codegen(skip_nan):
    """The codegen of ``_vmax`` (``llvm.maximum``: NaN-propagating, 3 instructions per vector
    on AVX-512: vmaxps, a NaN compare and a masked move) or of ``_vmax_skip`` (x86 vmaxps, one
    instruction: a NaN element is skipped; online_softmax16 detects it afterwards)."""
    def codegen(context, builder, sig, args):
        xv, off, n, init = args
        f32, i32, i64, vf, vm = _F32, _I32, _I64, _VF, _VM
        mod = builder.module
        base = builder.gep(_data(context, builder, sig.args[0], xv), [off])
        if skip_nan:
            x86max = _llvm_fn(mod, "llvm.x86.avx512.max.ps.512", vf, [vf, vf, i32])

            def vmax(acc, x):
                # vmaxps returns its second operand when either is NaN: a NaN x keeps acc
                return builder.call(x86max, [x, acc, ir.Constant(i32, 4)])
        else:
            lmax = _llvm_fn(mod, "llvm.maximum.v16f32", vf, [vf, vf])

            def vmax(acc, x):
                return builder.call(lmax, [acc, x], fastmath=_NSZ)
        mload = _llvm_fn(mod, "llvm.masked.load.v16f32.p0", vf, [base.type, i32, vm, vf])
        splat = _splat(builder, init, vf)
        nb = builder.sdiv(n, ir.Constant(i64, 64))
        pre, loop, after = _loop_entry(builder, nb, "vmax")
        i = builder.phi(i64)
        i.add_incoming(ir.Constant(i64, 0), pre)
        accs = []
        for _ in range(4):
            ph = builder.phi(vf)
            ph.add_incoming(splat, pre)
            accs.append(ph)
        new = []
        for u in range(4):
            o = builder.add(builder.mul(i, ir.Constant(i64, 64)), ir.Constant(i64, 16 * u))
            x = builder.load(builder.bitcast(builder.gep(base, [o]), vf.as_pointer()), align=4)
            new.append(vmax(accs[u], x))
        i1 = builder.add(i, ir.Constant(i64, 1))
        end = builder.block
        i.add_incoming(i1, end)
        for ph, x in zip(accs, new):
            ph.add_incoming(x, end)
        builder.cbranch(builder.icmp_signed("<", i1, nb), loop, after)
        builder.position_at_end(after)
        acc = []
        for u in range(4):
            ph = builder.phi(vf)
            ph.add_incoming(splat, pre)
            ph.add_incoming(new[u], end)
            acc.append(ph)
        m = vmax(vmax(acc[0], acc[1]), vmax(acc[2], acc[3]))
        # the last n % 64 elements, when there are any: up to 4 masked loads (masked-off lanes
        # read as init)
        done = builder.mul(nb, ir.Constant(i64, 64))
        body = builder.block
        tail = builder.append_basic_block("vmax.tail")
        join = builder.append_basic_block("vmax.join")
        builder.cbranch(builder.icmp_signed("<", done, n), tail, join)
        builder.position_at_end(tail)
        mt = m
        for u in range(4):
            o = builder.add(done, ir.Constant(i64, 16 * u))
            mask = _lanes(builder, builder.sub(n, o))
            x = builder.call(mload, [builder.gep(base, [o]), ir.Constant(i32, 4), mask, splat])
            mt = vmax(mt, x)
        tail_end = builder.block
        builder.branch(join)
        builder.position_at_end(join)
        mj = builder.phi(vf)
        mj.add_incoming(m, body)
        mj.add_incoming(mt, tail_end)
        if not skip_nan:
            red = _llvm_fn(mod, "llvm.vector.reduce.fmaximum.v16f32", f32, [vf])
            return builder.call(red, [mj], fastmath=_NSZ)
        # halve 16 -> 8 -> 4 -> 2 -> 1 lanes (the upper lanes of each step are don't-cares)
        r = mj
        w = 16
        while w > 1:
            w //= 2
            hi = builder.shuffle_vector(r, ir.Constant(vf, ir.Undefined),
                                        ir.Constant(ir.VectorType(i32, 16),
                                                    [(k + w) % 16 for k in range(16)]))
            r = vmax(r, hi)
        res = builder.extract_element(r, ir.Constant(i32, 0))
        # a NaN init (a row whose m is already NaN) stays NaN
        return builder.select(builder.fcmp_unordered("uno", init, init), init, res)
    return codegen


_vmax_codegen = _make_vmax_codegen(False)


@intrinsic
def _vmax(typingctx, x, off, n, init):
    """``max(init, x[off:off + n])`` NaN-propagating (a float32 array, int64 off/n)."""
    return types.float32(x, off, n, init), _vmax_codegen


@intrinsic
def _vmax_skip(typingctx, x, off, n, init):
    """``max(init, x[off:off + n])`` over the non-NaN elements (init NaN gives NaN) where
    numba's target has AVX-512 (decided when it compiles: LLVM aborts on the x86 intrinsic
    for a target without it), else ``_vmax``'s NaN-propagating maximum."""
    def codegen(context, builder, sig, args):
        return _make_vmax_codegen(_skip_ok())(context, builder, sig, args)
    return types.float32(x, off, n, init), codegen


def _skip_ok():
    """Whether ``row_max_skip_nan`` may skip NaN (vmaxps: AVX-512F in numba's target and the
    host): only together with the vscalefps exp, whose ``_le`` form gives a NaN score a NaN
    value (the portable form gives it 0, and the caller would not see the NaN)."""
    return _scalef_ok()


@_jit.kernel(inline="always")
def row_max(x, off, n, init):
    """``max(init, x[off:off + n])``, NaN-propagating (SPEC §9), vectorised (an offset, not a
    slice: see ``scale_into``).

    A plain running max is a loop-carried select that LLVM cannot reorder without ``nnan``
    (which we never enable), so it runs scalar; 16-lane ``llvm.maximum`` (NaN-propagating by
    definition) in 4 accumulators makes it SIMD: 384 rows of 256 measured 28 us through a
    16-float lane array in memory, 3.8 us this way.  Signed zeros: +0 wins over -0 (either is the row's max).
    """
    return _vmax(x, np.int64(off), np.int64(n), np.float32(init))


def _row_max_python(x, off, n, init):
    """``row_max`` for ``NUMBA_DISABLE_JIT=1`` only (the coverage lane): pure Python cannot run
    the ``_vmax`` intrinsic.  Same result: NaN if any element (or init) is NaN, else the max."""
    mx = init
    for c in range(n):
        v = x[off + c]
        mx = v if (v > mx or v != v) else mx
    return mx


if numba.config.DISABLE_JIT:
    row_max = _row_max_python     # noqa: F811  (chosen at import, as gemm above)


@_jit.kernel(inline="always")
def row_max_skip_nan(x, off, n, init):
    """``row_max`` over the non-NaN elements (init NaN still gives NaN): one vmaxps per 16
    elements instead of three instructions.  For ``online_softmax16``, which finds a NaN score
    by its NaN row sum and then gives the row the NaN maximum (same results as ``row_max``).
    Without AVX-512 it is ``row_max`` (NaN-propagating: the caller's check never fires)."""
    return _vmax_skip(x, np.int64(off), np.int64(n), np.float32(init))


if numba.config.DISABLE_JIT:
    row_max_skip_nan = _row_max_python     # noqa: F811  (NaN-propagating: as without AVX-512)


def _load16(builder, base, o, mask):
    """16 float32 lanes at ``base[o]``: all of them, or those of ``mask`` (the others 0)."""
    p = builder.gep(base, [o])
    if mask is None:
        return builder.load(builder.bitcast(p, _VF.as_pointer()), align=4)
    f = _llvm_fn(builder.module, "llvm.masked.load.v16f32.p0", _VF, [p.type, _I32, _VM, _VF])
    return builder.call(f, [p, ir.Constant(_I32, 4), mask, _vc(_ZERO)])


def _put16(builder, v, base, o, mask):
    """Store 16 float32 lanes at ``base[o]`` (those of ``mask`` when given; the masked store
    takes the element pointer, as every masked load and store of these kernels: an LLVM
    intrinsic is declared once per module, with the pointer type of its first use)."""
    p = builder.gep(base, [o])
    if mask is None:
        p = builder.bitcast(p, _VF.as_pointer())
    _store(builder, v, p, 4, mask)


def _each16(builder, n, name, step):
    """``step(o, None)`` for o = 0, 16, ... while a whole vector fits in n (i64), then
    ``step(o, mask)`` once for the n % 16 tail (a mask of no lane when there is none)."""
    nb = builder.sdiv(n, ir.Constant(_I64, 16))
    pre, loop, after = _loop_entry(builder, nb, name)
    i = builder.phi(_I64)
    i.add_incoming(ir.Constant(_I64, 0), pre)
    step(builder.mul(i, ir.Constant(_I64, 16)), None)
    i1 = builder.add(i, ir.Constant(_I64, 1))
    i.add_incoming(i1, builder.block)
    builder.cbranch(builder.icmp_signed("<", i1, nb), loop, after)
    builder.position_at_end(after)
    done = builder.mul(nb, ir.Constant(_I64, 16))
    step(done, _lanes(builder, builder.sub(n, done)))


def _scale_codegen(context, builder, sig, args):
    """``dst[doff + e] = src[off + e] * c`` for e < n in 16-lane vectors, the tail masked."""
    src, off, n, c, dst, doff = args
    sbase = builder.gep(_data(context, builder, sig.args[0], src), [off])
    dbase = builder.gep(_data(context, builder, sig.args[4], dst), [doff])
    cv = _splat(builder, c, _VF)
    _each16(builder, n, "scale", lambda o, m: _put16(
        builder, builder.fmul(_load16(builder, sbase, o, m), cv), dbase, o, m))
    return context.get_dummy_value()


def _ds_codegen(context, builder, sig, args):
    """``dp[off + e] = s[off + e] * (dp[off + e] - d)`` for e < n, 16 lanes, tail masked."""
    sv, dpv, off, n, d = args
    sbase = builder.gep(_data(context, builder, sig.args[0], sv), [off])
    dbase = builder.gep(_data(context, builder, sig.args[1], dpv), [off])
    dv = _splat(builder, d, _VF)

    def step(o, m):
        x = builder.fsub(_load16(builder, dbase, o, m), dv)
        _put16(builder, builder.fmul(_load16(builder, sbase, o, m), x), dbase, o, m)
    _each16(builder, n, "ds", step)
    return context.get_dummy_value()


@intrinsic
def _ds_row(typingctx, s, dp, off, n, d):
    """``dp[off:off + n] = s[off:off + n] * (dp[off:off + n] - d)`` (float32 arrays)."""
    return types.void(s, dp, off, n, d), _ds_codegen


@intrinsic
def _scale(typingctx, src, off, n, c, dst, doff):
    """``dst[doff:doff + n] = src[off:off + n] * c`` (float32 arrays, int64 off/n/doff)."""
    return types.void(src, off, n, c, dst, doff), _scale_codegen


@_jit.kernel(inline="always")
def scale_into(src, off, n, c, dst, doff):
    """``dst[doff + e] = src[off + e] * c`` for e < n (in place when dst, doff are src, off):
    the products of a plain loop, bit for bit.

    Offsets, not slices, in the kernels' per-row loops: every slice of an array is an atomic
    increment and decrement of its NRT reference count (``lock incq``), and on an array both
    threads slice (the output) the count's cache line moves between the cores each time; in
    the forward these were ~9% of all cycles.  (A loop over ``dst[doff + e]`` would not
    vectorise: numba's negative-index wrap-around on a signed index stops LLVM.)
    """
    _scale(src, np.int64(off), np.int64(n), np.float32(c), dst, np.int64(doff))


@intrinsic
def _zero_run(typingctx, x, off, n):
    """``x[off:off + n] = 0`` as one ``llvm.memset`` (no slice: no reference count)."""
    sig = types.void(x, off, n)

    def codegen(context, builder, sig, args):
        xv, off, n = args
        ptr = builder.gep(_data(context, builder, sig.args[0], xv), [off])
        i8p = ir.IntType(8).as_pointer()
        size = builder.mul(n, ir.Constant(ir.IntType(64), sig.args[0].dtype.bitwidth // 8))
        fn = _llvm_fn(builder.module, "llvm.memset.p0.i64", ir.VoidType(),
                      [i8p, ir.IntType(8), ir.IntType(64), ir.IntType(1)])
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(ir.IntType(8), 0), size,
                          ir.Constant(ir.IntType(1), 0)])
        return context.get_dummy_value()

    return sig, codegen


@_jit.kernel
def zero_rows(x, off, rs, nrows, n):
    """``x[off + r * rs + e] = 0`` for r < nrows, e < n: the backward kernels zero the dq, dk,
    dv rows they own (``api._run_backward``: no 24 MB memset on the calling thread, 0.9 ms at
    (2,16,512,64), and the rows are then in cache for the tiles that accumulate into them).
    One memset per row (contiguous rows: one for all)."""
    if rs == n:
        _zero_run(x, np.int64(off), np.int64(nrows * n))
    else:
        for r in range(nrows):
            _zero_run(x, np.int64(off + r * rs), np.int64(n))


def _zero_rows_python(x, off, rs, nrows, n):
    """``zero_rows`` for ``NUMBA_DISABLE_JIT=1`` (slices: the element loop is slow in Python)."""
    for r in range(nrows):
        x[off + r * rs:off + r * rs + n] = 0


def _scale_into_python(src, off, n, c, dst, doff):
    """``scale_into`` for ``NUMBA_DISABLE_JIT=1`` only (intrinsics cannot run as Python)."""
    dst[doff:doff + n] = src[off:off + n] * np.float32(c)


if numba.config.DISABLE_JIT:
    scale_into = _scale_into_python     # noqa: F811  (chosen at import, as gemm above)
    zero_rows = _zero_rows_python       # noqa: F811


@_jit.kernel
def tile_class(seqtab, gp, mask, b, h, i0, m_len, j0, n_len):
    """Classify a tile: ``desc.EMPTY`` (skip), ``desc.FULL`` (no test), ``desc.PARTIAL``.

    The band/prefix part is analytic (``masks._band_tile_class``); a dense mask is scanned
    (bytes only, cheap next to the five products) so a user mask with whole masked or whole
    visible tiles still skips / runs test-free.
    """
    kind = gp[desc.MASK_KIND]
    if kind == desc.MASK_NONE:
        return desc.FULL
    cls = _band_tile_class(seqtab[b, desc.LO], seqtab[b, desc.HI], seqtab[b, desc.PREFIX],
                           i0, i0 + m_len, j0, j0 + n_len)
    if cls == desc.EMPTY or kind != desc.MASK_DENSE:
        return cls
    moff = seqtab[b, desc.MASK_OFF] + h * gp[desc.MASK_HS]
    dcls = _dense_tile_class(mask, moff, gp[desc.MASK_RS], i0, i0 + m_len, j0, j0 + n_len)
    if dcls == desc.EMPTY:
        return desc.EMPTY
    if dcls == desc.FULL and cls == desc.FULL:
        return desc.FULL
    if dcls == desc.PARTIAL and cls == desc.PARTIAL:
        # both partial: their intersection may still be empty; a byte scan is cheap next to
        # the five products it can save
        lo = seqtab[b, desc.LO]
        hi = seqtab[b, desc.HI]
        pre = seqtab[b, desc.PREFIX]
        mrs = gp[desc.MASK_RS]
        for i in range(i0, i0 + m_len):
            mr = mask[moff + i * mrs + j0:moff + i * mrs + j0 + n_len]
            for c in range(n_len):
                dl = j0 + c - i
                if ((dl >= lo and dl <= hi) or j0 + c < pre) and mr[c] == 0:
                    return desc.PARTIAL
        return desc.EMPTY
    return desc.PARTIAL


def _make_score_tile(with_pse):
    """``score_tile`` (``with_pse``) or ``score_tile_plain`` (masks only: the plain drivers,
    which then never compile the pse code)."""
    PSE = 1 if with_pse else 0      # a closure constant: numba prunes the other branch

    @_jit.kernel
    def score_tile(q, k, seqtab, gp, fp, pse, slopes, mask, b, h, i0, m_len, j0, n_len, cls,
                   s, ab):
        """Scores of one tile, the single place where scores are modified (pse, mask).

        ``s[r * n_len + c] = Z[i0 + r, j0 + c]`` of SPEC §3 for query head h of sequence b,
        with masked elements (PARTIAL tiles only) set to -inf.  q/k are flat float32 with
        descriptor offsets; ``pse`` is the flat external pse or unused; ``slopes`` float32
        ALiBi slopes.  ``score_tile_plain``: pse and slopes unused (PSE_NONE).
        """
        n2 = h // gp[desc.G]
        q_off = seqtab[b, desc.Q_OFF] + h * gp[desc.Q_HS] + i0 * gp[desc.Q_RS]
        k_off = seqtab[b, desc.K_OFF] + n2 * gp[desc.K_HS] + j0 * gp[desc.K_RS]
        # s <- alpha * q @ k.T
        gemm(TRANS_N, TRANS_T, m_len, n_len, gp[desc.D], score_alpha(gp, fp), q, q_off,
             gp[desc.Q_RS], k, k_off, gp[desc.K_RS], np.float32(0.0), s, OFF0, n_len, ab)
        if PSE:
            adjust_scores(seqtab, gp, fp, pse, slopes, mask, b, h, i0, m_len, j0, n_len, cls, s)
        else:
            mask_scores(seqtab, gp, mask, b, h, i0, m_len, j0, n_len, cls, s)

    return score_tile


score_tile = _make_score_tile(True)
score_tile_plain = _make_score_tile(False)


@_jit.kernel(inline="always")
def score_alpha(gp, fp):
    """The factor the score product carries: ``scale``, or 1 when pse is added before scaling
    (pse_type 1 and compressed ALiBi; ``adjust_scores`` scales then)."""
    pk = gp[desc.PSE_KIND]
    if pk == desc.PSE_ADD_THEN_SCALE or pk == desc.PSE_COMPRESSED:
        return np.float32(1.0)
    return fp[desc.SCALE]


@_jit.kernel
def adjust_scores(seqtab, gp, fp, pse, slopes, mask, b, h, i0, m_len, j0, n_len, cls, s):
    """pse and mask on ``s = score_alpha * Q K^T`` (row stride n_len): ``s`` becomes Z of SPEC
    §3, masked elements of PARTIAL tiles -inf.  Shared by the BLAS and the native drivers."""
    add_pse(seqtab, gp, fp, pse, slopes, b, h, i0, m_len, j0, n_len, s)
    mask_scores(seqtab, gp, mask, b, h, i0, m_len, j0, n_len, cls, s)


@_jit.kernel
def add_pse(seqtab, gp, fp, pse, slopes, b, h, i0, m_len, j0, n_len, s):
    """The pse step of ``adjust_scores`` (nothing for PSE_NONE).  Its own kernel so that the
    plain drivers (``plain``: no pse, no dropout), which call ``mask_scores`` alone, never
    compile it (~0.5 s of a cold first call)."""
    scale = fp[desc.SCALE]
    pk = gp[desc.PSE_KIND]
    if pk == desc.PSE_ADD_THEN_SCALE or pk == desc.PSE_SCALE_THEN_ADD:
        p_off = seqtab[b, desc.PSE_OFF] + h * seqtab[b, desc.PSE_HS] + j0
        p_rs = seqtab[b, desc.PSE_RS]
        if pk == desc.PSE_ADD_THEN_SCALE:
            # s <- (x + pse) * scale
            for r in range(m_len):
                po = p_off + (i0 + r) * p_rs
                sr = s[r * n_len:(r + 1) * n_len]
                pr = pse[po:po + n_len]
                for c in range(n_len):
                    sr[c] = (sr[c] + pr[c]) * scale
        else:
            # s <- x * scale + pse
            for r in range(m_len):
                po = p_off + (i0 + r) * p_rs
                sr = s[r * n_len:(r + 1) * n_len]
                pr = pse[po:po + n_len]
                for c in range(n_len):
                    sr[c] = sr[c] + pr[c]
    elif pk == desc.PSE_ALIBI_ABS or pk == desc.PSE_ALIBI_SQRT:
        # s <- x * scale - slope * |delta|  (or sqrt), delta = (j + kv_start) - (i + q_start)
        slope = slopes[seqtab[b, desc.SLOPE_OFF] + h]
        base = (j0 + seqtab[b, desc.KVSTART]) - (i0 + seqtab[b, desc.QSTART])
        for r in range(m_len):
            sr = s[r * n_len:(r + 1) * n_len]
            if pk == desc.PSE_ALIBI_SQRT:
                for c in range(n_len):
                    sr[c] = sr[c] - slope * np.sqrt(np.float32(abs(base + c - r)))
            else:
                for c in range(n_len):
                    sr[c] = sr[c] - slope * np.float32(abs(base + c - r))
    elif pk == desc.PSE_COMPRESSED or pk == desc.PSE_COMPRESSED_0:
        # compressed ALiBi H = last 1024 rows of a Toeplitz bias: full[i, j] = H[1023, S1-1-(i-j)]
        # for j <= i; j > i is masked (causal is required), so it gets no bias.
        s1 = seqtab[b, desc.S1]
        p_off = seqtab[b, desc.PSE_OFF] + h * seqtab[b, desc.PSE_HS] + 1023 * seqtab[b, desc.PSE_RS]
        for r in range(m_len):
            i = i0 + r
            for c in range(n_len):
                j = j0 + c
                if j <= i:
                    hv = pse[p_off + s1 - 1 - (i - j)]
                    if pk == desc.PSE_COMPRESSED:
                        s[r * n_len + c] = (s[r * n_len + c] + hv) * scale
                    else:
                        s[r * n_len + c] = s[r * n_len + c] + hv
                elif pk == desc.PSE_COMPRESSED:
                    s[r * n_len + c] = s[r * n_len + c] * scale


@_jit.kernel
def mask_scores(seqtab, gp, mask, b, h, i0, m_len, j0, n_len, cls, s):
    """The mask step of ``adjust_scores``: masked elements of a PARTIAL tile become -inf (FULL
    tiles are left as they are)."""
    if cls == desc.PARTIAL:
        lo = seqtab[b, desc.LO]
        hi = seqtab[b, desc.HI]
        pre = seqtab[b, desc.PREFIX]
        dense = gp[desc.MASK_KIND] == desc.MASK_DENSE
        moff = seqtab[b, desc.MASK_OFF] + h * gp[desc.MASK_HS]
        mrs = gp[desc.MASK_RS]
        for r in range(m_len):
            i = i0 + r
            for c in range(n_len):
                j = j0 + c
                dl = j - i
                ok = (dl >= lo and dl <= hi) or j < pre
                if dense and ok:
                    ok = mask[moff + i * mrs + j] == 0
                if not ok:
                    s[r * n_len + c] = NEG_INF


@_jit.kernel
def keep_tile(seqtab, gp, drop_mask, b, h, i0, m_len, j0, n_len, rbuf):
    """Dropout keep bits of a tile as 0.0/1.0 in ``rbuf[r * n_len + c]`` (SPEC §5).

    Element index ``e = DROP_OFF[b] + h * DROP_HS[b] + i * DROP_RS[b] + j`` (``(h*S1 + i)*S2 + j``
    for a plain call; a chunk pair of a longer problem uses the global indices); the bits come
    from the user's packed ``drop_mask`` or from the counter-based generator keyed on
    (seed, offset + e).
    """
    e_h = seqtab[b, desc.DROP_OFF] + h * seqtab[b, desc.DROP_HS]
    e_rs = seqtab[b, desc.DROP_RS]
    kind = gp[desc.DROP_KIND]
    for r in range(m_len):
        e0 = e_h + (i0 + r) * e_rs + j0
        row = rbuf[r * n_len:(r + 1) * n_len]
        if kind == desc.DROP_MASK:
            _mask_keep_row(drop_mask, e0, n_len, row)
        else:
            c0 = _counter_start(gp[desc.OFFSET_LO], gp[desc.OFFSET_HI], e0)
            _philox_keep_row(gp[desc.SEED_LO], gp[desc.SEED_HI], c0, n_len,
                             gp[desc.DROP_THRESHOLD], row)


@_jit.kernel
def drop_p(seqtab, gp, fp, drop_mask, b, h, i0, m_len, j0, n_len, s, rb):
    """The forward's dropout step of one tile, in place: ``P <- R ? P / keep : 0`` on
    ``s[:m_len * n_len]`` (row stride n_len), the keep bits through ``rb``.  A select, not a
    product: a dropped element is exactly 0 even when P is NaN (SPEC §3).  Shared by the BLAS
    and the native forward drivers (callers skip it without dropout)."""
    inv_keep = fp[desc.INV_KEEP]
    mn = m_len * n_len
    keep_tile(seqtab, gp, drop_mask, b, h, i0, m_len, j0, n_len, rb)
    s_ = s[:mn]
    rb_ = rb[:mn]
    for x in range(mn):
        s_[x] = s_[x] * inv_keep if rb_[x] != 0.0 else np.float32(0.0)


@_jit.kernel
def drop_ds(seqtab, gp, fp, drop_mask, dsum, st, b, h, i0, m_len, j0, n_len, s, dp, so, rb):
    """The backward's elementwise step of one tile, in place (SPEC §3): with dropout,
    ``dP <- R ? dP / keep : 0`` and ``Pd = R ? P / keep : 0`` into ``rb[:m_len * n_len]``
    (selects, not products: a dropped element is exactly 0 even when P is NaN); then
    ``dS = P * (dP - Dsum)`` into dp (``ds_rows``).  The tile's P and dP start at element
    ``so`` of ``s`` / ``dp`` (row stride n_len); Dsum of row i is ``dsum[st + i * ST_RS]``.
    Shared by the BLAS and the native backward drivers.
    """
    mn = m_len * n_len
    if gp[desc.DROP_KIND] != desc.DROP_NONE:
        inv_keep = fp[desc.INV_KEEP]
        keep_tile(seqtab, gp, drop_mask, b, h, i0, m_len, j0, n_len, rb)
        dp_ = dp[so:so + mn]
        rb_ = rb[:mn]
        s_ = s[so:so + mn]
        for e in range(mn):
            kept = rb_[e] != 0.0
            dp_[e] = dp_[e] * inv_keep if kept else np.float32(0.0)
            rb_[e] = s_[e] * inv_keep if kept else np.float32(0.0)
    ds_rows(gp, dsum, st, i0, m_len, n_len, s, dp, so)


@_jit.kernel
def ds_rows(gp, dsum, st, i0, m_len, n_len, s, dp, so):
    """``dS = P * (dP - Dsum)`` into dp, the part of ``drop_ds`` without dropout (the plain
    backward calls it alone, and so never compiles the dropout code)."""
    for r in range(m_len):
        ds_row(s, dp, so + r * n_len, n_len, dsum[st + (i0 + r) * gp[desc.ST_RS]])


@_jit.kernel(inline="always")
def ds_row(s, dp, off, n, d):
    """``dp[off + e] = s[off + e] * (dp[off + e] - d)`` for e < n: the products of the plain
    loop, bit for bit, with an offset instead of two slices (``scale_into``)."""
    _ds_row(s, dp, np.int64(off), np.int64(n), np.float32(d))


def _ds_row_python(s, dp, off, n, d):
    """``ds_row`` for ``NUMBA_DISABLE_JIT=1`` only."""
    dp[off:off + n] = s[off:off + n] * (dp[off:off + n] - np.float32(d))


if numba.config.DISABLE_JIT:
    ds_row = _ds_row_python     # noqa: F811  (chosen at import, as gemm above)
