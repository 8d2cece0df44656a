"""Host-side float32 <-> bfloat16 / float16 conversions, bit for bit what ``astype`` gives.

Every bf16/fp16 call converts its inputs to float32 (``dtypes.to_f32_flat``: the float32 path
runs BLAS) and its outputs back (``dtypes.from_f32``); ml_dtypes' and numpy's ``astype`` are
scalar loops, slower than a float32 copy.  Measured through ``dtypes.from_f32`` /
``dtypes.to_f32_flat`` (4M elements, a new output per call, best of 30, 2-core
Sapphire-Rapids-class Xeon, load 1.2; a float32 ``copy()`` takes 1.12 ms there):

=================  ==========  ===============  ===============
conversion         ``astype``  kernels, 1 thr.  kernels, 2 thr.
=================  ==========  ===============  ===============
float32 -> bf16    3.29 ms     0.90 ms          0.59 ms
float32 -> fp16    6.75 ms     0.89 ms          0.57 ms
bf16 -> float32    1.31 ms     0.87 ms          0.56 ms
fp16 -> float32    3.42 ms     0.88 ms          0.56 ms
=================  ==========  ===============  ===============

End to end at (1, 8, 2048, 128) BNSD, 2 threads, A/B in one process against ``astype`` (median
of 9 alternating rounds, load 1.0, outputs bitwise equal): fp16 backward 192 -> 162 ms (0.85),
fp16 forward 72 -> 64 ms (0.89), bf16 backward 62 -> 56 ms (0.90), bf16 forward 24.7 -> 23.2
ms (0.94).  Cold compile of the 8 kernels: ~0.9 s on the first bf16/fp16 call (cached after).

Bitwise contract (``tests/test_convert.py`` checks every fp16/bf16 bit pattern and the float32
special values, rounding ties and overflow boundaries against ``astype``):

- float32 -> bf16 as ml_dtypes 0.7: round to nearest even on the bits, denormal results kept
  (not flushed: ``vcvtneps2bf16``, the ``fptrunc`` to ``bfloat`` of ``native.py``, flushes
  them and keeps NaN payloads, checked on this CPU; hence integer code here), +-inf kept,
  overflow to +-inf, every NaN becomes the quiet NaN 0x7fc0 with its sign (ml_dtypes drops
  the payload).
- bf16 -> float32: the bits shifted left by 16 (exact, NaN payloads kept).
- float32 -> fp16 as numpy 2.x (``npy_floatbits_to_halfbits``): ``vcvtps2ph`` (LLVM's
  ``fptrunc`` to ``half`` with F16C) rounds to nearest even like numpy and keeps denormal
  results, but it quiets a signalling NaN where numpy keeps the truncated payload (and makes
  it 0x7c01 when the payload truncates to 0), so NaN lanes take numpy's formula instead.
- fp16 -> float32: ``vcvtph2ps`` (``fpext``), exact, with the same NaN fix-up (numpy keeps a
  signalling NaN signalling).

The fp16 kernels are explicit 16-lane LLVM IR (``@intrinsic``); they are compiled only when
numba's target and the host have F16C (``isa.target_has("f16c")``: without it LLVM turns the
conversion into a libcall numba does not link); otherwise, and under ``NUMBA_DISABLE_JIT=1``
(intrinsics cannot run as Python), ``from_f32`` / ``to_f32`` fall back to ``astype``.  The
bf16 kernels are plain integer loops that LLVM vectorises (zmm code), so they need no guard
(under ``NUMBA_DISABLE_JIT=1`` they would run as Python loops: ``astype`` there too).  No path
emits numpy's "overflow / invalid value encountered in cast" RuntimeWarning (the fallback runs
under ``np.errstate``), so the warnings do not depend on the CPU.

Arrays of at least ``config.CONVERT_THREAD_MIN`` elements are split into one chunk per thread
(``threads.run_chunks``); smaller ones convert on the calling thread.

Assumes the default MXCSR (round to nearest even, no FTZ/DAZ), as every numba kernel does; the
bf16 kernels do not depend on it.
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import config as nconfig
from numba.extending import intrinsic

from .. import _jit, config, isa
from .llir import F32, I16, I32, VF, VH16, VI, VM, data, fn, lanes

_HALF = ir.HalfType()
_VHALF = ir.VectorType(_HALF, 16)
_U32 = np.uint32
_F32 = np.dtype(np.float32)
_F16 = np.dtype(np.float16)


# ---------------------------------------------------------------- bfloat16 (integer loops)

@_jit.kernel
def bf16_from_f32(src, dst, lo, hi):
    """``dst[i] = bf16 bits of src[i]`` for lo <= i < hi (src: float32 bits as uint32, dst:
    uint16), rounded to nearest even; a NaN becomes 0x7fc0 with its sign (as ml_dtypes)."""
    # slices, not ``range(lo, hi)``: with a loop from ``lo`` numba cannot prove the index
    # non-negative and keeps its negative-index wrap-around, which stops the vectoriser
    # (2.4 ms instead of 0.84 ms for 4M elements)
    s = src[lo:hi]
    d = dst[lo:hi]
    for i in range(s.size):
        u = s[i]
        if (u & _U32(0x7fffffff)) > _U32(0x7f800000):
            r = ((u >> _U32(16)) & _U32(0x8000)) | _U32(0x7fc0)
        else:
            # +0x7fff, +1 more when the kept lsb is odd: ties go to even; the largest finite
            # values carry into the exponent and give inf (no uint32 overflow: u <= 0xff800000)
            r = (u + _U32(0x7fff) + ((u >> _U32(16)) & _U32(1))) >> _U32(16)
        d[i] = np.uint16(r)


@_jit.kernel
def f32_from_bf16(src, dst, lo, hi):
    """``dst[i] = src[i] << 16`` for lo <= i < hi (src: bf16 bits as uint16, dst: float32 bits
    as uint32): exact."""
    s = src[lo:hi]
    d = dst[lo:hi]
    for i in range(s.size):
        d[i] = _U32(s[i]) << _U32(16)


# ---------------------------------------------------------------- float16 (16-lane IR, F16C)

def _const(ty, v):
    return ir.Constant(ty, [v] * ty.count)


def _f32_to_f16_ir(builder, x):
    """<16 x float> -> <16 x i16> numpy's half bits (vcvtps2ph, NaN lanes by numpy's rule)."""
    h = builder.bitcast(builder.fptrunc(x, _VHALF), VH16)
    u = builder.bitcast(x, VI)
    sign = builder.and_(builder.lshr(u, _const(VI, 16)), _const(VI, 0x8000))
    sig = builder.and_(builder.lshr(u, _const(VI, 13)), _const(VI, 0x3ff))
    # numpy: 0x7c00 + (mantissa >> 13), plus 1 when that is 0 (so it stays a NaN)
    keep = builder.zext(builder.icmp_unsigned("==", sig, _const(VI, 0)), VI)
    nan = builder.or_(builder.or_(sign, _const(VI, 0x7c00)), builder.or_(sig, keep))
    isnan = builder.fcmp_unordered("uno", x, x)
    return builder.select(isnan, builder.trunc(nan, VH16), h)


def _f16_to_f32_ir(builder, h):
    """<16 x i16> half bits -> <16 x i32> float32 bits (vcvtph2ps, NaN lanes by numpy's rule:
    sign, all-ones exponent, the 10 mantissa bits shifted up, never quieted)."""
    f = builder.bitcast(builder.fpext(builder.bitcast(h, _VHALF), VF), VI)
    w = builder.zext(h, VI)
    isnan = builder.icmp_unsigned(">", builder.and_(w, _const(VI, 0x7fff)), _const(VI, 0x7c00))
    nan = builder.or_(builder.shl(builder.and_(w, _const(VI, 0x8000)), _const(VI, 16)),
                      builder.or_(_const(VI, 0x7f800000),
                                  builder.shl(builder.and_(w, _const(VI, 0x3ff)), _const(VI, 13))))
    return builder.select(isnan, nan, f)


def _block(convert, src_ty, dst_ty, masked):
    """An intrinsic converting 16 elements ``src[s_off:s_off+16]`` into ``dst[d_off:...]``
    (``masked``: only the first ``n`` lanes are read and written, for the tail)."""
    s_align = src_ty.width // 8 if isinstance(src_ty, ir.IntType) else 4
    d_align = dst_ty.width // 8
    vs = ir.VectorType(src_ty, 16)
    vd = ir.VectorType(dst_ty, 16)

    def codegen(context, builder, sig, args):
        sv, so, dv, do = args[:4]
        sp = builder.gep(data(context, builder, sig.args[0], sv), [so])
        dp = builder.gep(data(context, builder, sig.args[2], dv), [do])
        sp = builder.bitcast(sp, vs.as_pointer())
        dp = builder.bitcast(dp, vd.as_pointer())
        if masked:
            mod = builder.module
            m = lanes(builder, args[4])
            ld = fn(mod, f"llvm.masked.load.v16{_tag(src_ty)}.p0", vs,
                    [sp.type, I32, VM, vs])
            st = fn(mod, f"llvm.masked.store.v16{_tag(dst_ty)}.p0", ir.VoidType(),
                    [vd, dp.type, I32, VM])
            x = builder.call(ld, [sp, ir.Constant(I32, s_align), m, ir.Constant(vs, None)])
            builder.call(st, [convert(builder, x), dp, ir.Constant(I32, d_align), m])
        else:
            x = builder.load(sp, align=s_align)
            builder.store(convert(builder, x), dp, align=d_align)
        return context.get_dummy_value()

    if masked:
        def typer(typingctx, src, s_off, dst, d_off, n):
            return types.void(src, s_off, dst, d_off, n), codegen
    else:
        def typer(typingctx, src, s_off, dst, d_off):
            return types.void(src, s_off, dst, d_off), codegen
    return intrinsic(typer)


def _tag(ty):
    return "f32" if ty == F32 else f"i{ty.width}"


def _f32_to_bf16_ir(builder, u):
    """<16 x i32> float32 bits -> <16 x i16> bf16 bits, ``bf16_from_f32``'s integer rule
    (round to nearest even, denormals kept, NaN -> 0x7fc0 with its sign)."""
    hi = builder.lshr(u, _const(VI, 16))
    isnan = builder.icmp_unsigned(">", builder.and_(u, _const(VI, 0x7fffffff)),
                                  _const(VI, 0x7f800000))
    nan = builder.or_(builder.and_(hi, _const(VI, 0x8000)), _const(VI, 0x7fc0))
    r = builder.lshr(builder.add(builder.add(u, _const(VI, 0x7fff)),
                                 builder.and_(hi, _const(VI, 1))), _const(VI, 16))
    return builder.trunc(builder.select(isnan, nan, r), VH16)


_f2b16 = _block(_f32_to_bf16_ir, I32, I16, False)
_f2b_tail = _block(_f32_to_bf16_ir, I32, I16, True)


@_jit.kernel
def bf16_row(src, s_off, n, dst, d_off):
    """``dst[d_off + e] = bf16 bits of src[s_off + e]`` for e < n (src: float32 bits as uint32,
    dst: uint16), the bits of ``bf16_from_f32``, with offsets instead of slices: for the
    kernels' per-row loops (``tile.scale_into`` says why).  16-lane IR, AVX-512 kernels only."""
    e = 0
    while e + 16 <= n:
        _f2b16(src, s_off + e, dst, d_off + e)
        e += 16
    if e < n:
        _f2b_tail(src, s_off + e, dst, d_off + e, n - e)


_f2h16 = _block(_f32_to_f16_ir, F32, I16, False)
_f2h_tail = _block(_f32_to_f16_ir, F32, I16, True)
_h2f16 = _block(_f16_to_f32_ir, I16, I32, False)
_h2f_tail = _block(_f16_to_f32_ir, I16, I32, True)


@_jit.kernel
def f16_from_f32(src, dst, lo, hi):
    """``dst[i] = fp16 bits of src[i]`` for lo <= i < hi (src float32, dst uint16), as numpy's
    ``astype(float16)``.  F16C targets only (``isa.target_has("f16c")``)."""
    i = lo
    while i + 16 <= hi:
        _f2h16(src, i, dst, i)
        i += 16
    if i < hi:
        _f2h_tail(src, i, dst, i, hi - i)


@_jit.kernel
def f32_from_f16(src, dst, lo, hi):
    """``dst[i] = float32 bits of fp16 src[i]`` for lo <= i < hi (src uint16, dst uint32),
    exact, as numpy's ``astype(float32)``.  F16C targets only."""
    i = lo
    while i + 16 <= hi:
        _h2f16(src, i, dst, i)
        i += 16
    if i < hi:
        _h2f_tail(src, i, dst, i, hi - i)


# ---------------------------------------------------------------- host entry points

#: multiple of every chunk boundary (elements): 64 uint16 = one cache line, so two threads
#: never write the same line, and a multiple of the 16-lane blocks
_ALIGN = 64


@_jit.kernel(inline="always")
def share(n, t, nchunks):
    """(lo, hi): chunk t's share of n elements split in ``nchunks`` (boundaries multiples of
    ``_ALIGN``; the last shares may be empty)."""
    step = (n + nchunks - 1) // nchunks
    step = (step + _ALIGN - 1) // _ALIGN * _ALIGN
    lo = min(n, t * step)
    return lo, min(n, lo + step)


def _chunked(body):
    """A ``run_chunks`` kernel: chunk t of ``nchunks`` converts its share of ``src``."""
    @_jit.kernel
    def chunk(t, src, dst, nchunks):
        lo, hi = share(src.size, t, nchunks)
        body(src, dst, lo, hi)
    return chunk


_BF16_FROM_F32 = _chunked(bf16_from_f32)
_F32_FROM_BF16 = _chunked(f32_from_bf16)
_F16_FROM_F32 = _chunked(f16_from_f32)
_F32_FROM_F16 = _chunked(f32_from_f16)


def _run(chunk, src, dst):
    """One chunk per thread at or above ``config.CONVERT_THREAD_MIN`` elements, else the whole
    array on the calling thread."""
    n = src.size
    if n < config.CONVERT_THREAD_MIN:
        chunk(0, src, dst, 1)
        return
    # imported here: threads -> validation -> dtypes -> this module at import time
    from ..threads import num_threads, run_chunks
    nchunks = min(num_threads(), -(-n // _ALIGN))
    run_chunks(chunk, nchunks, (src, dst, nchunks))


def _is_bf16(dtype):
    """bfloat16 (ml_dtypes imported lazily: dtypes.is_bf16)."""
    from ..dtypes import is_bf16
    return is_bf16(dtype)


def _native_ok(dtype):
    """Whether the kernels may run for this half dtype (else ``astype``)."""
    if nconfig.DISABLE_JIT:         # the coverage lane: intrinsics cannot run as Python
        return False
    if _is_bf16(dtype):
        return True
    return dtype == _F16 and isa.target_has("f16c")


def _astype(src, dtype):
    """The fallback, as quiet as the kernels: numpy warns when a cast overflows to inf or
    meets a NaN; the kernels never did (the values are the same either way)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return src.astype(dtype)


def from_f32(src, dtype):
    """``src.astype(dtype)`` for float32 ``src`` (any shape) and dtype bfloat16 or float16,
    bit for bit, as a new C-contiguous array; other dtypes go to ``astype``."""
    dtype = np.dtype(dtype)
    if src.dtype != _F32 or not _native_ok(dtype):
        return _astype(src, dtype)
    flat = np.ascontiguousarray(src).reshape(-1)
    out = np.empty(flat.size, np.uint16)
    if _is_bf16(dtype):
        _run(_BF16_FROM_F32, flat.view(np.uint32), out)
    else:
        _run(_F16_FROM_F32, flat, out)
    return out.view(dtype).reshape(src.shape)


def to_f32(src):
    """``src.astype(np.float32)`` for bfloat16 / float16 ``src`` (any shape and strides), bit
    for bit, as a new C-contiguous array; other dtypes go to ``astype``."""
    dtype = src.dtype
    if not _native_ok(dtype):
        return _astype(src, _F32)
    flat = np.ascontiguousarray(src).reshape(-1).view(np.uint16)
    out = np.empty(flat.size, np.uint32)
    _run(_F32_FROM_BF16 if _is_bf16(dtype) else _F32_FROM_F16, flat, out)
    return out.view(np.float32).reshape(src.shape)
