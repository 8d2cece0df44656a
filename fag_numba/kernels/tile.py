"""Serial tile kernels: BLAS products, the vectorised exp, and the one score-modification step.

Every function here is serial (``_jit.kernel``); only ``driver.py`` is parallel.  Arrays are
flat float32 buffers addressed through the descriptor tables of ``desc.py``; a tile is the
product of rows ``[i0, i0 + m_len)`` of one query head and rows ``[j0, j0 + n_len)`` of one
key head of sequence b.
"""
import numba
import numpy as np
from numba import types
from numba.extending import intrinsic
from numba.np.linalg import _BLAS

from .. import _jit
from ..dropout import _counter_start, _mask_keep_row, _philox_keep_row
from ..masks import _band_tile_class, _dense_tile_class
from . import desc

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
    _xxgemm(_KIND_S, tb, ta, n, m, k, ab[0:1].ctypes, b[b_off:].ctypes, max(ldb, 1),
            a[a_off:].ctypes, max(lda, 1), ab[1:2].ctypes, c[c_off:].ctypes, max(ldc, 1))


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


# ---- exp: Cephes expf range reduction + degree-6 polynomial, written so LLVM vectorises it ----
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_P0 = np.float32(1.9875691500e-4)
_P1 = np.float32(1.3981999507e-3)
_P2 = np.float32(8.3334519073e-3)
_P3 = np.float32(4.1665795894e-2)
_P4 = np.float32(1.6666665459e-1)
_P5 = np.float32(5.0000001201e-1)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)
_ZERO = np.float32(0.0)
_XMIN = np.float32(-87.33654)   # below: exp underflows to (almost) 0 -> exactly 0
_XCLAMP = np.float32(88.0)      # clamp for the 2**n bits (n <= 127 keeps the exponent finite)
_XOVF = np.float32(88.72283)    # above: float32 overflow -> inf
_INF = np.float32(np.inf)
NEG_INF = np.float32(-np.inf)


@_jit.kernel
def exp_sub(buf, off, sub, n, ibuf):
    """In place ``buf[off + q] = exp(buf[off + q] - sub)`` for q < n.

    Vectorised (PERF.md: a scalar libm exp per score costs as much as the GEMMs at D = 64):
    range reduction x = n*ln2 + t, a degree-6 polynomial for exp(t), and 2**n built from integer
    bits in ``ibuf`` (int32 scratch of at least n) read back through a float32 view.  Max relative
    error ~6e-7.  x < -87.34 (and -inf) give exactly 0, x > 88.72 gives inf, NaN propagates;
    arguments in (88, 88.72] are clamped to 88 (softmax arguments are <= 0).
    """
    # a row view indexed by the loop counter: numba then knows every index is >= 0, drops the
    # negative-index wrap-around and LLVM vectorises the loop (8x faster than buf[off + q])
    b = buf[off:off + n]
    fbuf = ibuf.view(np.float32)
    for q in range(n):
        src = b[q]
        x = src - sub
        xc = min(max(x, _XMIN), _XCLAMP)
        fx = np.floor(xc * _LOG2E + _HALF)
        t = xc - fx * _LN2_HI - fx * _LN2_LO
        y = ((((_P0 * t + _P1) * t + _P2) * t + _P3) * t + _P4) * t + _P5
        y = y * (t * t) + t + _ONE
        ibuf[q] = (np.int32(fx) + np.int32(127)) << np.int32(23)
        v = y if x >= _XMIN else _ZERO
        v = _INF if x > _XOVF else v
        v = x if x != x else v
        # a masked score (-inf) gives exactly 0 whatever sub is (even -inf or NaN statistics)
        b[q] = _ZERO if src == NEG_INF else v
    for q in range(n):
        b[q] = b[q] * fbuf[q]


# the only flag on these calls: signed zeros may come out either way (either is the row max;
# without it LLVM adds a -0 < +0 fixup to every maximum), NaN still propagates
_NSZ = ("nsz",)


def _vmax_codegen(context, builder, sig, args):
    """max(init, x[off:off + n]) through 4 x 16 lanes of ``llvm.maximum`` (NaN-propagating)."""
    import llvmlite.ir as ir
    from numba.core import cgutils

    xv, off, n, init = args
    f32 = ir.FloatType()
    i32 = ir.IntType(32)
    i64 = ir.IntType(64)
    vf = ir.VectorType(f32, 16)
    vm = ir.VectorType(ir.IntType(1), 16)
    vi = ir.VectorType(i32, 16)
    mod = builder.module
    base = builder.gep(context.make_array(sig.args[0])(context, builder, xv).data, [off])
    vmax = cgutils.get_or_insert_function(mod, ir.FunctionType(vf, [vf, vf]),
                                          "llvm.maximum.v16f32")
    red = cgutils.get_or_insert_function(mod, ir.FunctionType(f32, [vf]),
                                         "llvm.vector.reduce.fmaximum.v16f32")
    mload = cgutils.get_or_insert_function(mod, ir.FunctionType(vf, [base.type, i32, vm, vf]),
                                           "llvm.masked.load.v16f32.p0")
    v0 = builder.insert_element(ir.Constant(vf, ir.Undefined), init, ir.Constant(i32, 0))
    splat = builder.shuffle_vector(v0, ir.Constant(vf, ir.Undefined), ir.Constant(vi, [0] * 16))
    pre = builder.block
    nb = builder.sdiv(n, ir.Constant(i64, 64))
    loop = builder.append_basic_block("vmax.loop")
    after = builder.append_basic_block("vmax.after")
    builder.cbranch(builder.icmp_signed(">", nb, ir.Constant(i64, 0)), loop, after)
    builder.position_at_end(loop)
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
        new.append(builder.call(vmax, [accs[u], x], fastmath=_NSZ))
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
    m = builder.call(vmax, [builder.call(vmax, [acc[0], acc[1]], fastmath=_NSZ),
                            builder.call(vmax, [acc[2], acc[3]], fastmath=_NSZ)], fastmath=_NSZ)
    # the last n % 64 elements: up to 4 masked loads (masked-off lanes read as init)
    done = builder.mul(nb, ir.Constant(i64, 64))
    lane = ir.Constant(vi, list(range(16)))
    for u in range(4):
        o = builder.add(done, ir.Constant(i64, 16 * u))
        rem = builder.trunc(builder.sub(n, o), i32)
        r0 = builder.insert_element(ir.Constant(vi, ir.Undefined), rem, ir.Constant(i32, 0))
        rs = builder.shuffle_vector(r0, ir.Constant(vi, ir.Undefined), ir.Constant(vi, [0] * 16))
        mask = builder.icmp_signed("<", lane, rs)
        x = builder.call(mload, [builder.gep(base, [o]), ir.Constant(i32, 4), mask, splat])
        m = builder.call(vmax, [m, x], fastmath=_NSZ)
    return builder.call(red, [m], fastmath=_NSZ)


@intrinsic
def _vmax(typingctx, x, off, n, init):
    """``max(init, x[off:off + n])`` NaN-propagating (a float32 array, int64 off/n)."""
    return types.float32(x, off, n, init), _vmax_codegen


@_jit.kernel(inline="always")
def row_max(x, n, init, lanes):
    """``max(init, x[0:n])``, NaN-propagating (SPEC §9), vectorised.

    A plain running max is a loop-carried select that LLVM cannot reorder without ``nnan``
    (which we never enable), so it runs scalar; 16-lane ``llvm.maximum`` (NaN-propagating by
    definition) in 4 accumulators makes it SIMD: 384 rows of 256 measured 28 us through a
    16-float lane array in memory, 3.8 us this way.  ``lanes`` (float32[16]) is unused, kept
    for the callers' signature.  Signed zeros: +0 wins over -0 (either is the row's max).
    """
    return _vmax(x, np.int64(0), np.int64(n), np.float32(init))


def _row_max_python(x, n, init, lanes):
    """``row_max`` for ``NUMBA_DISABLE_JIT=1`` only (the coverage lane): pure Python cannot run
    the ``_vmax`` intrinsic.  Same result: NaN if any element (or init) is NaN, else the max."""
    mx = init
    for c in range(n):
        v = x[c]
        mx = v if (v > mx or v != v) else mx
    return mx


if numba.config.DISABLE_JIT:
    row_max = _row_max_python     # noqa: F811  (chosen at import, as gemm above)


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


@_jit.kernel
def score_tile(q, k, seqtab, gp, fp, pse, slopes, mask, b, h, i0, m_len, j0, n_len, cls,
               s, ab):
    """Scores of one tile, the single place where scores are modified (pse, mask).

    ``s[r * n_len + c] = Z[i0 + r, j0 + c]`` of SPEC §3 for query head h of sequence b, with
    masked elements (PARTIAL tiles only) set to -inf.  q/k are flat float32 with descriptor
    offsets; ``pse`` is the flat external pse or unused; ``slopes`` float32 ALiBi slopes.
    """
    n2 = h // gp[desc.G]
    q_off = seqtab[b, desc.Q_OFF] + h * gp[desc.Q_HS] + i0 * gp[desc.Q_RS]
    k_off = seqtab[b, desc.K_OFF] + n2 * gp[desc.K_HS] + j0 * gp[desc.K_RS]
    # s <- alpha * q @ k.T
    gemm(TRANS_N, TRANS_T, m_len, n_len, gp[desc.D], score_alpha(gp, fp), q, q_off,
         gp[desc.Q_RS], k, k_off, gp[desc.K_RS], np.float32(0.0), s, OFF0, n_len, ab)
    adjust_scores(seqtab, gp, fp, pse, slopes, mask, b, h, i0, m_len, j0, n_len, cls, s)


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
