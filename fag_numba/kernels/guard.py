"""The careful path for tiles that touch a non-finite input row (SPEC §3).

A masked element contributes exactly 0 even when its inputs are NaN/inf, but a BLAS product
``P @ V`` computes ``0 * NaN = NaN`` for a masked P element facing a NaN row of V.  Four tile
products reduce over a masked dimension and can leak that way:

    forward   acc += P  @ V      (over keys: V rows)
    backward  dv  += Pd^T @ dY   (over queries: dY rows)
              dk  += dS^T @ Q    (over queries: Q rows)
              dq  += dS @ K      (over keys: K rows)

plus the elementwise ``dS = P * (dPd - Dsum)`` (a NaN in dP or Dsum times a masked P = 0).
The score product ``Q K^T`` and ``dY V^T`` are element-local (masked scores are overwritten),
so they need nothing.

The host scans the inputs once (``api._nonfinite_rows``, O(S*D)); when every value is finite,
``gp[NONFINITE]`` is 0 and the drivers never enter this module (the finite path is unchanged).
Otherwise a tile whose operand rows include a flagged one runs :func:`gemm_guard`: the product
over the finite rows (a copy with the flagged rows zeroed) through BLAS, plus the flagged rows'
contributions added explicitly for the computed elements only (IEEE arithmetic there, so a NaN
reaches exactly the outputs whose math uses it: a computed element whose P underflowed to 0
still gives ``0 * NaN = NaN``, as the math says).  Dropout is a multiplication by the keep
bit (SPEC §3 ``Pd = R ? P/keep : 0`` read as a product): a dropped but computed element
still carries ``0 * NaN``; only the mask excludes.
"""
import numpy as np

from .. import _jit
from . import desc
from .tile import NEG_INF, OFF0, TRANS_N, gemm, keep_tile

_NAN = np.float32(np.nan)
_INF = np.float32(np.inf)


@_jit.kernel(inline="always")
def is_computed(seqtab, gp, mask, b, h, i, j):
    """SPEC §6/§7 predicate of element (i, j) of sequence b, head h (masks.py formula)."""
    if gp[desc.MASK_KIND] == desc.MASK_NONE:
        return True
    dl = j - i
    ok = (dl >= seqtab[b, desc.LO] and dl <= seqtab[b, desc.HI]) or j < seqtab[b, desc.PREFIX]
    if ok and gp[desc.MASK_KIND] == desc.MASK_DENSE:
        moff = seqtab[b, desc.MASK_OFF] + h * gp[desc.MASK_HS]
        ok = mask[moff + i * gp[desc.MASK_RS] + j] == 0
    return ok


@_jit.kernel
def row_has_computed(seqtab, gp, mask, b, h, i, j0, n_len):
    """True when row i has a computed element among columns [j0, j0 + n_len)."""
    for j in range(j0, j0 + n_len):
        if is_computed(seqtab, gp, mask, b, h, i, j):
            return True
    return False


@_jit.kernel
def row_keeps_computed(seqtab, gp, mask, drop_mask, b, h, i, rb):
    """True when row i has a computed element whose dropout keep bit is 1 (without dropout:
    a computed element).  The native forward's form of ``dropped_nan_row_out`` (its inputs are
    all finite, so a row whose computed NaN P are all dropped is exactly 0).  rb: float32
    scratch (>= 1 element)."""
    s2 = seqtab[b, desc.S2]
    dropping = gp[desc.DROP_KIND] != desc.DROP_NONE
    n = rb.size
    for j0 in range(0, s2, n):
        nl = min(n, s2 - j0)
        if dropping:
            keep_tile(seqtab, gp, drop_mask, b, h, i, 1, j0, nl, rb)
        for c in range(nl):
            if (not dropping or rb[c] != 0.0) and is_computed(seqtab, gp, mask, b, h, i, j0 + c):
                return True
    return False


@_jit.kernel
def dropped_nan_row_out(seqtab, gp, mask, drop_mask, v, b, h, i, rb, out, oo):
    """Attention output row of a row whose l is NaN, under dropout (BLAS forward driver).

    Every computed P is NaN there, so ``O = Pd @ V`` is NaN if one of them is kept; when
    dropout removed them all, ``O[e] = sum_j 0 * V[j, e]`` over the computed j: 0, or NaN where
    such a V element is NaN/inf (a dropped element still meets V in the product, as
    ``gemm_guard`` computes it; only the mask excludes).  The deferred normalisation
    ``acc / l`` alone would give NaN everywhere.  v: flat float32; rb: float32 scratch."""
    s2 = seqtab[b, desc.S2]
    dv = gp[desc.DV]
    v0 = seqtab[b, desc.V_OFF] + (h // gp[desc.G]) * gp[desc.V_HS]
    for e in range(dv):
        out[oo + e] = np.float32(0.0)
    n = rb.size
    for j0 in range(0, s2, n):
        nl = min(n, s2 - j0)
        keep_tile(seqtab, gp, drop_mask, b, h, i, 1, j0, nl, rb)
        for c in range(nl):
            if not is_computed(seqtab, gp, mask, b, h, i, j0 + c):
                continue
            if rb[c] != 0.0:
                for e in range(dv):
                    out[oo + e] = _NAN
                return
            vr = v0 + (j0 + c) * gp[desc.V_RS]
            for e in range(dv):
                x = v[vr + e]
                if x != x or x == _INF or x == NEG_INF:
                    out[oo + e] = _NAN


@_jit.kernel
def computed_tile(seqtab, gp, mask, b, h, i0, m_len, j0, n_len, cls, cm):
    """``cm[r * n_len + c] = 1`` iff element (i0 + r, j0 + c) is computed (uint8 scratch)."""
    for r in range(m_len):
        for c in range(n_len):
            if cls == desc.FULL:
                cm[r * n_len + c] = 1
            else:
                cm[r * n_len + c] = 1 if is_computed(seqtab, gp, mask, b, h, i0 + r,
                                                     j0 + c) else 0


@_jit.kernel
def any_bad(bad, base, off, rs, e, n):
    """True when one of the n rows at element offsets ``off + x * rs`` (row length e) of the
    tensor whose flags start at ``bad[base]`` is flagged non-finite."""
    if e <= 0:
        return False
    r0 = off // e
    st = rs // e
    for x in range(n):
        if bad[base + r0 + x * st] != 0:
            return True
    return False


@_jit.kernel
def p_guard(p, cm, lse, st, srs, i0, m_len, n_len):
    """P of a computed element with score -inf in a row whose lse is NaN or -inf is NaN by
    the math (``exp(-inf - m) / l`` with m or l NaN, or m = -inf); ``exp_sub`` gives it an
    exact 0 because it cannot tell it from a masked one.  Such an element is the only way a
    computed P is exactly 0 in those rows (a finite score gives NaN or inf)."""
    for r in range(m_len):
        x = lse[st + (i0 + r) * srs]
        if x != x or x == NEG_INF:
            for c in range(n_len):
                if cm[r * n_len + c] != 0 and p[r * n_len + c] == 0.0:
                    p[r * n_len + c] = _NAN


@_jit.kernel
def ds_guard(ds, cm, mn):
    """Masked elements of dS are exactly 0 (``P = 0`` times a non-finite dP or Dsum)."""
    for x in range(mn):
        if cm[x] == 0:
            ds[x] = np.float32(0.0)


@_jit.kernel
def gemm_guard(ta, ny, nx, e, a, lda, bsrc, b_off, ldb, c, c_off, ldc, bad, base, cm, gbuf, ab):
    """``C[y, :] += sum_x A(y, x) * B[x, :]`` over computed elements, exact for non-finite B rows.

    A is a tile scratch: ``A(y, x) = a[y * lda + x]`` (ta = TRANS_N) or ``a[x * lda + y]``
    (TRANS_T), with the same indexing for the computed flags ``cm``; B rows (length e, stride
    ldb) start at ``bsrc[b_off]``, their flags at ``bad[base + offset // e]``.  Masked A
    elements are exactly 0 already, so finite rows go through BLAS as usual; a flagged row is
    zeroed in the copy ``gbuf`` ([nx, e]) and its contribution added for computed (y, x) only.
    """
    if ny <= 0 or e <= 0 or nx <= 0:
        return
    r0 = b_off // e
    st = ldb // e
    nbad = 0
    for x in range(nx):
        nbad += 1 if bad[base + r0 + x * st] != 0 else 0
    if nbad == 0:
        gemm(ta, TRANS_N, ny, e, nx, np.float32(1.0), a, OFF0, lda, bsrc, b_off, ldb,
             np.float32(1.0), c, c_off, ldc, ab)
        return
    for x in range(nx):
        src = bsrc[b_off + x * ldb:b_off + x * ldb + e]
        dst = gbuf[x * e:(x + 1) * e]
        if bad[base + r0 + x * st] != 0:
            for t in range(e):
                dst[t] = np.float32(0.0)
        else:
            for t in range(e):
                dst[t] = src[t]
    gemm(ta, TRANS_N, ny, e, nx, np.float32(1.0), a, OFF0, lda, gbuf, OFF0, e, np.float32(1.0), c,
         c_off, ldc, ab)
    for x in range(nx):
        if bad[base + r0 + x * st] == 0:
            continue
        src = bsrc[b_off + x * ldb:b_off + x * ldb + e]
        for y in range(ny):
            ix = y * lda + x if ta == TRANS_N else x * lda + y
            if cm[ix] == 0:
                continue
            av = a[ix]
            cr = c[c_off + y * ldc:c_off + y * ldc + e]
            for t in range(e):
                cr[t] += av * src[t]
