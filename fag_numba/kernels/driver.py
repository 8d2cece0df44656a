"""Drivers: the parallel level of fag_numba (STYLE b3, b4).

Each driver runs its serial chunk kernel once per thread chunk of a plan (``planning.py``)
through ``threads.run_chunks`` (Python threads over ``nogil`` kernels; why not numba's
``prange``: see ``run_chunks``): chunk t owns
work items ``items[tptr[t]:tptr[t+1]]``.  Every output element has exactly one writer, so the
result does not depend on which thread runs an item: bitwise identical across thread counts.

- ``fwd_driver``: items (b, h, q-block); online softmax over the key blocks (FA-2 forward).
- ``rowstats_driver`` (serial, cheap): rows (b, h, i); ``lse = m + log(l)`` and
  ``dsum = rowsum(dy * o)``.
- ``bwd_driver``: items (b_lo, b_hi, n2, split); the item owns dk/dv of the key blocks
  ``split, split + NSPLIT, ...`` of kv head n2 for sequences ``[b_lo, b_hi)``, the partial dq
  of its split for the G query heads, and the dpse elements of those tiles.
"""
import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .. import _jit, config
from ..threads import num_threads, run_chunks
from . import desc
from .guard import (any_bad, computed_tile, dropped_nan_row_out, ds_guard, gemm_guard, p_guard,
                    row_has_computed)
from .tile import (NEG_INF, OFF0, TRANS_N, TRANS_T, drop_ds, drop_p, ds_rows, exp_scale_bf16,
                   exp_scale_bf16_le, exp_sub, exp_sub_le, gemm, row_max, row_max_skip_nan,
                   gemm_scratch, scale_into, score_tile, score_tile_plain, scratch, tile_class,
                   zero_rows)

_FLT_MAX = np.float32(3.4028234663852886e38)


@_jit.kernel(inline="always")
def _log(x):
    """``math.log`` of a float32 statistic (numba: -inf for 0, NaN below)."""
    return math.log(x)


if numba.config.DISABLE_JIT:
    def _log(x):  # noqa: F811  (NUMBA_DISABLE_JIT=1: Python's math.log raises on 0 and below)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(np.float64(x))


def plain(name, gp):
    """Whether a call of pass ``name`` ("fwd", "bwd") with descriptor ``gp`` takes the plain
    chunk kernels: no dropout, no pse and (backward) no pse gradient.  Plain and full variants
    run the same operations on such a call; the split only keeps the pse and dropout code out
    of a process that never uses them (each variant compiles on its first call)."""
    return bool(gp[desc.DROP_KIND] == desc.DROP_NONE and gp[desc.PSE_KIND] == desc.PSE_NONE
                and (name == "fwd" or gp[desc.DPSE_KIND] == 0))


@_jit.kernel
def kv_block_range(lo, hi, prefix, s2, i0, i1, bn):
    """Key blocks ``[jb_lo, jb_hi)`` that can hold computed elements of query rows [i0, i1)."""
    if prefix > 0:
        jlo = 0
    else:
        jlo = max(0, i0 + lo)
    # the band of the last row ends at i1 - 1 + hi; prefix columns [0, prefix) count too
    jhi = min(s2, max(i1 - 1 + hi + 1, prefix))
    if jhi <= jlo:
        return 0, 0
    return jlo // bn, (jhi + bn - 1) // bn


@_jit.kernel(inline="always")
def trim_tile(lo, hi, prefix, i0, m_len, j0, n_len):
    """Shrink a tile to the rows and columns the band ``lo <= j - i <= hi`` can reach.

    Returns (i0, m_len, j0, n_len) of the trimmed tile (m_len = n_len = 0 when nothing is
    left).  Edge tiles of a causal or band mask lose their fully masked margins, so the BLAS
    products cover less dead area (a band of width W costs ~W + block instead of W + 2 blocks
    per row).  With prefix columns the tile is left whole.
    """
    if prefix > 0:
        return i0, m_len, j0, n_len
    a = max(i0, j0 - hi)
    e = min(i0 + m_len, j0 + n_len - lo)
    if e <= a:
        return i0, 0, j0, 0
    c0 = max(j0, a + lo)
    c1 = min(j0 + n_len, e + hi)
    if c1 <= c0:
        return i0, 0, j0, 0
    return a, e - a, c0, c1 - c0


# The forwards split a tile that the band cuts through (a causal diagonal block) into this many
# row strips, each trimmed to the columns its rows reach (at least 16 rows: one AMX tile).
# Same-process A/B against whole tiles, bf16 causal forward (native amx kind, 512 x 256
# tiles): 8 strips of 64 rows 0.895 / 0.930 / 0.971 at (1,8,1024,64) / (1,8,2048,128) /
# (1,4,4096,64); 4 strips 0.974 / 0.945 / 0.987; 16 strips 0.924 / 0.985 / 0.962; dense calls
# unchanged (0.99-1.00), results bitwise the same.
FWD_STRIPS = 8


@_jit.kernel(inline="always")
def strip_rows(lo, hi, prefix, i0, m_len, j0, n_len, cls, sbm):
    """Rows per strip of a forward tile (FWD_STRIPS): ``sbm`` when the band cuts the tile so
    that its first or last ``sbm`` rows reach fewer columns (a causal diagonal block), else
    ``m_len`` (the tile in one piece)."""
    if cls == desc.FULL or m_len <= sbm:
        return m_len
    last = i0 + (m_len - 1) // sbm * sbm
    f0 = trim_tile(lo, hi, prefix, i0, sbm, j0, n_len)
    f1 = trim_tile(lo, hi, prefix, last, i0 + m_len - last, j0, n_len)
    return sbm if f0[3] < n_len or f1[3] < n_len else m_len


@_jit.kernel
def q_block_range(lo, hi, prefix, s1, j0, j1, bm):
    """Query blocks ``[ib_lo, ib_hi)`` that can hold computed elements of key columns [j0, j1)."""
    if j0 < prefix:
        return 0, (s1 + bm - 1) // bm
    ilo = max(0, j0 - hi)
    ihi = min(s1, j1 - 1 - lo + 1)
    if ihi <= ilo:
        return 0, 0
    return ilo // bm, (ihi + bm - 1) // bm


@intrinsic
def _ld_f32(typingctx, x, i):
    """``x[i]`` as float32: a float32 array's element, or the bf16 bits of a uint16 array
    shifted into a float32 (exact).  No bounds check, no negative index (i >= 0)."""
    if x.dtype == types.float32:
        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, args[0])
            return builder.load(builder.gep(arr.data, [args[1]]))
    elif x.dtype == types.uint16:
        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, args[0])
            h = builder.zext(builder.load(builder.gep(arr.data, [args[1]])), ir.IntType(32))
            return builder.bitcast(builder.shl(h, ir.Constant(ir.IntType(32), 16)),
                                   ir.FloatType())
    else:
        return None
    return types.float32(x, types.int64), codegen


def _ld_f32_python(x, i):
    """``_ld_f32`` for ``NUMBA_DISABLE_JIT=1`` only."""
    if x.dtype == np.uint16:
        return np.array([np.uint32(x[i]) << np.uint32(16)], np.uint32).view(np.float32)[0]
    return x[i]


if numba.config.DISABLE_JIT:
    _ld_f32 = _ld_f32_python     # noqa: F811


@_jit.kernel
def rowstats_chunk(t, nchunks, dy, o, m, l, seqtab, gp, lse, dsum):
    """Chunk t of ``rowstats_driver``: the (b, h) heads ``[t * H // nchunks, (t + 1) * H //
    nchunks)`` of H = B * N1, each row with one writer (so any chunk count gives the same bits).
    dy, o: float32, or uint16 bf16 bits (the native bf16 backward reads its inputs' bits: no
    float32 copies of dy and attention_in, half the bytes)."""
    n1 = gp[desc.N1]
    nbh = seqtab.shape[0] * n1
    dv = gp[desc.DV]
    for bh in range(t * nbh // nchunks, (t + 1) * nbh // nchunks):
        b = bh // n1
        h = bh - b * n1
        s1 = seqtab[b, desc.S1]
        st = seqtab[b, desc.ST_OFF] + h * seqtab[b, desc.ST_HS]
        base = seqtab[b, desc.DY_OFF] + h * gp[desc.DY_HS]
        for i in range(s1):
            row = st + i * gp[desc.ST_RS]
            lse[row] = m[row] + np.float32(_log(l[row]))
            off = base + i * gp[desc.DY_RS]
            acc = np.float32(0.0)
            # (no slices: tile.scale_into; the sum is sequential, the same in every chunk)
            for e in range(dv):
                acc += _ld_f32(dy, off + e) * _ld_f32(o, off + e)
            dsum[row] = acc


def rowstats_driver(dy, o, m, l, seqtab, gp, lse, dsum):
    """``lse[row] = m[row] + log(l[row])`` and ``dsum[row] = sum_e dy[row, e] * o[row, e]``.

    Rows are (b, h, i) addressed through the statistics columns of ``seqtab``; dy and o share
    the query layout with last dim Dv (float32, or both uint16 bf16 bits).  One chunk per
    thread from ``config.CONVERT_THREAD_MIN`` elements of dy (it runs at memory speed: 1.7 ms
    serial for two float32 arrays of 2M at (1,8,2048,128)), else on the calling thread.
    """
    nbh = seqtab.shape[0] * int(gp[desc.N1])
    n = 1 if dy.size < config.CONVERT_THREAD_MIN else max(1, min(num_threads(), nbh))
    run_chunks(rowstats_chunk, n, (n, dy, o, m, l, seqtab, gp, lse, dsum))


def _make_online_softmax(to16):
    """``online_softmax`` (to16 false) or ``online_softmax16`` (see its docstring)."""
    TO16 = to16

    @_jit.kernel
    def online_softmax(s, tm, n_len, ro, cls, mrun, lrun, vrow, acc, dv, sub, cor, mold,
                       seqtab, gp, mask, b, h, ti0, j0, alpha, p16, ldp):
        """One key block of the FA-2 online softmax, in place (shared by the BLAS and the native
        forward drivers).

        s: the block's scores Z, rows [ti0, ti0 + tm) of the item (row stride n_len), becomes
        P~ = exp(Z - m_new); per item row ``ro + r``: ``m_new = max(m, rowmax)``,
        ``l = l * exp(m - m_new) + rowsum(P~)``, ``acc *= exp(m - m_new)``; ``vrow`` marks rows
        with a computed element (a row of -inf computed scores is NaN, not invalid: only the mask
        makes a row invalid, SPEC §3).  sub, cor, mold: float32 scratch of >= tm.

        ``online_softmax16`` (the native bf16 forward without dropout or pse): s holds
        Z / alpha (alpha > 0, the scaling pass not done) and stays unchanged; P~ goes to ``p16``
        (uint16 bf16 bits, row r at ``r * ldp``) instead, the same bits as scaling, this step
        and a conversion pass (one pass over the tile instead of three: the row max of Z is
        alpha times that of Z / alpha, which rounding preserves for alpha > 0).  Its row max
        skips NaN scores (``row_max_skip_nan``, a third of the instructions); the exp then
        gives a NaN score NaN, so a NaN row sum with a finite maximum means a NaN score, and
        the row is redone with m = NaN: the results of a NaN-propagating maximum.
        ``online_softmax``: alpha, p16, ldp are unused (a closure constant, so neither compiles
        the other's branch).
        """
        for r in range(tm):
            # m_new <- max(m, rowmax(s));  corr <- exp(m - m_new)  (exp below, one pass)
            ri = ro + r
            mold[r] = mrun[ri]
            # NaN scores make m NaN (SPEC §9: NaN propagates), never an invalid row
            if TO16:
                mx = alpha * row_max_skip_nan(s, r * n_len, n_len, NEG_INF)
                if mx != mx or mrun[ri] != mrun[ri]:
                    mx = np.float32(np.nan)
                elif mrun[ri] > mx:
                    mx = mrun[ri]
            else:
                mx = row_max(s, r * n_len, n_len, mrun[ri])
            if mx == NEG_INF:
                # all -inf so far: masked, or computed with -inf scores (inf inputs, pse)
                if vrow[ri] == 0 and (cls == desc.FULL or row_has_computed(
                        seqtab, gp, mask, b, h, ti0 + r, j0, n_len)):
                    vrow[ri] = 1
                sub[r] = np.float32(0.0)   # nothing computed yet: exp(-inf - 0) = 0
                cor[r] = np.float32(0.0)   # corr 1
            else:
                sub[r] = mx
                # first computed block: corr 0 (exp_sub maps -inf to exactly 0)
                cor[r] = mrun[ri] - mx if mrun[ri] != NEG_INF else NEG_INF
            mrun[ri] = mx
        # the corrections of all rows as one vector pass (a libm exp per row and tile was 2% of a
        # D = 64 forward); exp(0) is exactly 1, so unchanged maxima skip the rescale
        exp_sub(cor, OFF0, np.float32(0.0), tm)
        for r in range(tm):
            # p <- exp(s - m_new);  l <- l * corr + rowsum(p);  acc <- acc * corr
            ri = ro + r
            corr = cor[r]
            if TO16:
                if math.isfinite(sub[r]):
                    rs = exp_scale_bf16_le(s, r * n_len, alpha, sub[r], n_len, p16, r * ldp)
                    if rs != rs:
                        # a NaN score (the maximum skipped it): m = NaN, and the correction
                        # and P of the NaN maximum (exp(m - NaN): 0 for m = -inf, else NaN)
                        nan = np.float32(np.nan)
                        mrun[ri] = nan
                        corr = np.float32(0.0) if mold[r] == NEG_INF else nan
                        rs = exp_scale_bf16(s, r * n_len, alpha, nan, n_len, p16, r * ldp)
                else:
                    rs = exp_scale_bf16(s, r * n_len, alpha, sub[r], n_len, p16, r * ldp)
            elif math.isfinite(sub[r]):
                # every score <= sub (the row max): no NaN/overflow cases to test for
                rs = exp_sub_le(s, r * n_len, sub[r], n_len)
            else:
                rs = exp_sub(s, r * n_len, sub[r], n_len)
            lrun[ri] = lrun[ri] * corr + rs
            if corr != 1.0:
                scale_into(acc, ri * dv, dv, corr, acc, ri * dv)

    return online_softmax


online_softmax = _make_online_softmax(False)
online_softmax16 = _make_online_softmax(True)


def _make_fwd_chunk(full):
    """The forward chunk kernel: ``full`` (every feature) or plain (``plain``: no pse and no
    dropout; numba prunes the ``FULL`` branches, so a process that never meets pse or dropout
    never compiles their code: ~3 s of a cold float32 first forward + backward)."""
    FULL = 1 if full else 0     # a closure constant (pruned before lowering)
    score = score_tile if full else score_tile_plain

    @_jit.kernel
    def fwd_chunk(t, q, k, v, out, mrow, lrow, pse, slopes, mask, drop_mask, seqtab, gp, fp,
                   items, tptr, visits, bad):
        """Forward work of chunk t: items ``items[tptr[t]:tptr[t + 1]]`` (see ``fwd_driver``).

        Serial and ``nogil``: ``threads.run_chunks`` runs one call per chunk, each on its own
        thread.  The plain variant: pse, slopes and drop_mask unused.
        """
        bm = gp[desc.BLOCK_M]
        bn = gp[desc.BLOCK_N]
        dv = gp[desc.DV]
        g = gp[desc.G]
        dropping = gp[desc.DROP_KIND] != desc.DROP_NONE
        careful_on = gp[desc.NONFINITE] != 0
        pv_rows = gp[desc.PV_ROWS]     # > 0: P @ V as sub-products of PV_ROWS x PV_KEYS
        pv_keys = max(gp[desc.PV_KEYS], 1)
        # careful path scratch (guard.py), 1 element when every input is finite
        cm = np.empty(bm * bn if careful_on else 1, np.uint8)
        gbuf = scratch(bn * max(dv, 1) if careful_on else 1, np.float32)
        vrow = np.empty(bm, np.uint8)      # row has a computed element (only the mask invalidates)
        # scratch: s, rb: BLOCK_M*BLOCK_N; acc: BLOCK_M*Dv; row vectors: BLOCK_M
        s = scratch(bm * bn, np.float32)
        rb = scratch(bm * bn, np.float32)
        acc = scratch(bm * max(dv, 1), np.float32)
        mrun = np.empty(bm, np.float32)
        lrun = np.empty(bm, np.float32)
        sub = np.empty(bm, np.float32)
        cor = np.empty(bm, np.float32)
        mold = np.empty(bm, np.float32)
        ab = gemm_scratch(gp)             # alpha, beta and the sgemm_ to call (tile.gemm)
        no16 = np.empty(1, np.uint16)      # online_softmax's bf16 output, unused here
        sbm = max(16, bm // FWD_STRIPS)    # rows per strip of a band-cut tile
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
            lo = seqtab[b, desc.LO]
            hi = seqtab[b, desc.HI]
            pre = seqtab[b, desc.PREFIX]
            jb_lo, jb_hi = kv_block_range(lo, hi, pre, s2, i0, i0 + m_len, bn)
            for jb in range(jb_lo, jb_hi):
                # the rows [ti0, ti0 + tm) and columns of the key block the band can reach: the
                # other rows of the item have nothing computed in this block and keep their m, l,
                # acc (a causal diagonal block of 512 x 256 needs only half its rows)
                ti0, tm, j0, n_len = trim_tile(lo, hi, pre, i0, m_len, jb * bn,
                                               min(bn, s2 - jb * bn))
                if n_len == 0:
                    continue
                cls = tile_class(seqtab, gp, mask, b, h, ti0, tm, j0, n_len)
                if cls == desc.EMPTY:
                    continue
                visits[t] += 1
                # a tile the band cuts through runs in row strips trimmed to their columns
                # (FWD_STRIPS: the top strip of a causal diagonal block reaches fewer keys)
                sb = strip_rows(lo, hi, pre, ti0, tm, j0, n_len, cls, sbm)
                tile_i0, tile_m, tile_j0, tile_n = ti0, tm, j0, n_len
                for sr0 in range(tile_i0, tile_i0 + tile_m, sb):
                    if sb < tile_m:
                        ti0, tm, j0, n_len = trim_tile(lo, hi, pre, sr0,
                                                       min(sb, tile_i0 + tile_m - sr0), tile_j0,
                                                       tile_n)
                        if n_len == 0:
                            continue
                        cls = tile_class(seqtab, gp, mask, b, h, ti0, tm, j0, n_len)
                        if cls == desc.EMPTY:
                            continue
                    ro = ti0 - i0              # the strip's first row within the item
                    # s <- z (scaled, biased, masked)
                    score(q, k, seqtab, gp, fp, pse, slopes, mask, b, h, ti0, tm, j0, n_len, cls, s,
                          ab)
                    online_softmax(s, tm, n_len, ro, cls, mrun, lrun, vrow, acc, dv, sub, cor,
                                   mold, seqtab, gp, mask, b, h, ti0, j0, np.float32(1.0), no16, 0)
                    if FULL and dropping:
                        # p_drop <- R ? p / keep_prob : 0
                        drop_p(seqtab, gp, fp, drop_mask, b, h, ti0, tm, j0, n_len, s, rb)
                    # acc <- acc + p_drop @ v
                    v_off = seqtab[b, desc.V_OFF] + n2 * gp[desc.V_HS] + j0 * gp[desc.V_RS]
                    if careful_on and any_bad(bad, gp[desc.BAD_V], v_off, gp[desc.V_RS], dv,
                                              n_len):
                        # a NaN/inf row of v: masked p = 0 must not meet it (0 * NaN)
                        computed_tile(seqtab, gp, mask, b, h, ti0, tm, j0, n_len, cls, cm)
                        gemm_guard(TRANS_N, tm, n_len, dv, s, n_len, v, v_off, gp[desc.V_RS],
                                   acc, ro * dv, dv, bad, gp[desc.BAD_V], cm, gbuf, ab)
                    elif pv_rows > 0:
                        # sub-products small enough for OpenBLAS's unpacked small-matrix kernel
                        # (planning.forward_pv_split), in a fixed order
                        for r0 in range(0, tm, pv_rows):
                            mr = min(pv_rows, tm - r0)
                            for c0 in range(0, n_len, pv_keys):
                                nc = min(pv_keys, n_len - c0)
                                gemm(TRANS_N, TRANS_N, mr, dv, nc, np.float32(1.0), s,
                                     r0 * n_len + c0, n_len, v, v_off + c0 * gp[desc.V_RS],
                                     gp[desc.V_RS], np.float32(1.0), acc, (ro + r0) * dv, dv,
                                     ab)
                    else:
                        gemm(TRANS_N, TRANS_N, tm, dv, n_len, np.float32(1.0), s, OFF0, n_len,
                             v, v_off, gp[desc.V_RS], np.float32(1.0), acc, ro * dv, dv, ab)
            st = seqtab[b, desc.ST_OFF] + h * seqtab[b, desc.ST_HS]
            o_off = seqtab[b, desc.DY_OFF] + h * gp[desc.DY_HS]
            for r in range(m_len):
                i = i0 + r
                row = st + i * gp[desc.ST_RS]
                oo = o_off + i * gp[desc.DY_RS]
                if mrun[r] == NEG_INF and vrow[r] != 0:
                    # computed elements, all scores -inf: m = -inf, l = exp(-inf + inf) = NaN;
                    # out NaN unless dropout removed every computed element (dropped_nan_row_out)
                    mrow[row] = NEG_INF
                    lrow[row] = np.float32(np.nan)
                    if FULL and dropping:
                        dropped_nan_row_out(seqtab, gp, mask, drop_mask, v, b, h, i, rb, out, oo)
                    else:
                        for e in range(dv):
                            out[oo + e] = np.float32(np.nan)
                elif mrun[r] == NEG_INF:
                    # invalid row (SPEC §3): out 0, m = -FLT_MAX, l = +FLT_MAX
                    mrow[row] = -_FLT_MAX
                    lrow[row] = _FLT_MAX
                    for e in range(dv):
                        out[oo + e] = 0.0
                else:
                    mrow[row] = mrun[r]
                    lrow[row] = lrun[r]
                    inv_l = np.float32(1.0) / lrun[r]
                    if FULL and dropping and inv_l != inv_l:
                        # every computed P is NaN: out from the keep bits (acc may hold NaN from
                        # an exp(inf - inf) rescale even when all of them were dropped)
                        dropped_nan_row_out(seqtab, gp, mask, drop_mask, v, b, h, i, rb, out, oo)
                    else:
                        scale_into(acc, r * dv, dv, inv_l, out, oo)

    return fwd_chunk


_fwd_chunk = _make_fwd_chunk(True)
_fwd_chunk_plain = _make_fwd_chunk(False)


def fwd_driver(q, k, v, out, mrow, lrow, pse, slopes, mask, drop_mask, seqtab, gp, fp,
               items, tptr, visits, bad):
    """Forward: ``out = softmax(Z) (dropped) @ v`` and the row statistics m, l (SPEC §3).

    items: int64 [n_items, 3] = (b, h, q-block); tptr: int64 [n_chunks + 1]; visits: int64
    [n_chunks], tiles computed per chunk (the debug hook that proves EMPTY tiles are skipped).
    Invalid rows (no computed element) get out = 0, m = -FLT_MAX, l = +FLT_MAX; a row with
    computed elements whose scores are all -inf is not invalid: m = -inf and l, out = NaN (the
    math; only the mask makes a row invalid).  bad: uint8 non-finite row flags (guard.py).
    """
    chunk = _fwd_chunk_plain if plain("fwd", gp) else _fwd_chunk
    run_chunks(chunk, tptr.size - 1, (q, k, v, out, mrow, lrow, pse, slopes, mask,
                                          drop_mask, seqtab, gp, fp, items, tptr, visits, bad))


@_jit.kernel
def _zero_owned(seqtab, gp, b, n2, c, dqbuf, dk, dv):
    """Zero the gradient rows a backward item (split c, kv head n2) owns in sequence b: dq rows
    (in ``dqbuf``, split c's buffer) of the G query heads of n2, and dk / dv rows of the key
    blocks of split c (blocks c, c + nsplit, ...).  Every backward kernel calls this first,
    so ``api._run_backward`` allocates the gradients without zeros when the sequences' rows
    are the whole arrays."""
    g = gp[desc.G]
    bn = gp[desc.BLOCK_N]
    nsplit = gp[desc.NSPLIT]
    s2 = seqtab[b, desc.S2]
    for gg in range(g):
        h = n2 * g + gg
        zero_rows(dqbuf, seqtab[b, desc.Q_OFF] + h * gp[desc.Q_HS], gp[desc.Q_RS],
                  seqtab[b, desc.S1], gp[desc.D])
    for jb in range(c, (s2 + bn - 1) // bn, nsplit):
        n = min(bn, s2 - jb * bn)
        zero_rows(dk, seqtab[b, desc.K_OFF] + n2 * gp[desc.K_HS] + jb * bn * gp[desc.K_RS],
                  gp[desc.K_RS], n, gp[desc.D])
        zero_rows(dv, seqtab[b, desc.V_OFF] + n2 * gp[desc.V_HS] + jb * bn * gp[desc.V_RS],
                  gp[desc.V_RS], n, gp[desc.DV])


def _make_bwd_chunk(full):
    """The backward chunk kernel, ``full`` or plain (as ``_make_fwd_chunk``)."""
    FULL = 1 if full else 0
    score = score_tile if full else score_tile_plain

    @_jit.kernel
    def bwd_chunk(t, q, k, v, dy, lse, dsum, dq, dqp, dk, dv, dpse, dslope, pse, slopes, mask,
                   drop_mask, seqtab, gp, fp, items, tptr, visits, bad):
        """Backward work of chunk t: items ``items[tptr[t]:tptr[t + 1]]`` (see ``bwd_driver``);
        serial for the same compile-time reason as ``fwd_chunk``; the plain variant: pse, slopes,
        drop_mask, dpse and dslope unused."""
        bm = gp[desc.BLOCK_M]
        bn = gp[desc.BLOCK_N]
        d = gp[desc.D]
        dvd = gp[desc.DV]
        g = gp[desc.G]
        nsplit = gp[desc.NSPLIT]
        scale = fp[desc.SCALE]
        dropping = gp[desc.DROP_KIND] != desc.DROP_NONE
        dpk = gp[desc.DPSE_KIND]
        pk = gp[desc.PSE_KIND]
        careful_on = gp[desc.NONFINITE] != 0
        cm = np.empty(bm * bn if careful_on else 1, np.uint8)
        gbuf = scratch(max(bm, bn) * max(d, 1) if careful_on else 1, np.float32)
        # tiles per run sharing the score and dy v^T products (1 when gp leaves it 0)
        grp = max(gp[desc.BWD_GROUP], 1)
        # scratch: s (p), dp (ds): a run of tiles; rb (keep bits, then p_drop): one tile
        s = scratch(grp * bm * bn, np.float32)
        dp = scratch(grp * bm * bn, np.float32)
        rb = scratch(bm * bn, np.float32)
        ab = gemm_scratch(gp)             # alpha, beta and the sgemm_ to call (tile.gemm)
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
                    for gg in range(g):
                        h = n2 * g + gg
                        st = seqtab[b, desc.ST_OFF] + h * seqtab[b, desc.ST_HS]
                        ib = ib_lo
                        while ib < ib_hi:
                            # the tile, trimmed to the rows/columns the band can reach
                            i0, m_len, j0, n_len = trim_tile(lo, hi, pre, ib * bm,
                                                             min(bm, s1 - ib * bm), jb0, jb_len)
                            if m_len == 0:
                                ib += 1
                                continue
                            cls = tile_class(seqtab, gp, mask, b, h, i0, m_len, j0, n_len)
                            if cls == desc.EMPTY:
                                ib += 1
                                continue
                            # a run of up to ``grp`` whole (untrimmed, FULL) tiles shares one score
                            # product and one dy v^T product: taller products run faster in OpenBLAS
                            # (its packed path; the inner dimension is only D)
                            ng = 1
                            rows = m_len
                            if (grp > 1 and not careful_on and cls == desc.FULL and m_len == bm
                                    and n_len == jb_len and i0 == ib * bm and j0 == jb0):
                                while ng < grp and ib + ng < ib_hi:
                                    x0 = (ib + ng) * bm
                                    xl = min(bm, s1 - x0)
                                    a0, am, c0, cn = trim_tile(lo, hi, pre, x0, xl, jb0, jb_len)
                                    if (a0 != x0 or am != xl or c0 != jb0 or cn != jb_len
                                            or tile_class(seqtab, gp, mask, b, h, x0, xl, jb0,
                                                          jb_len) != desc.FULL):
                                        break
                                    ng += 1
                                    rows += xl
                            visits[t] += ng
                            k_off = seqtab[b, desc.K_OFF] + n2 * gp[desc.K_HS] + j0 * gp[desc.K_RS]
                            v_off = seqtab[b, desc.V_OFF] + n2 * gp[desc.V_HS] + j0 * gp[desc.V_RS]
                            q_off = seqtab[b, desc.Q_OFF] + h * gp[desc.Q_HS] + i0 * gp[desc.Q_RS]
                            dy_off = (seqtab[b, desc.DY_OFF] + h * gp[desc.DY_HS]
                                      + i0 * gp[desc.DY_RS])
                            # (a run has ng = 1 whenever careful_on)
                            careful = careful_on and (
                                any_bad(bad, gp[desc.BAD_Q], q_off, gp[desc.Q_RS], d, m_len)
                                or any_bad(bad, gp[desc.BAD_DY], dy_off, gp[desc.DY_RS], dvd, m_len)
                                or any_bad(bad, gp[desc.BAD_DSUM], st + i0 * gp[desc.ST_RS],
                                           gp[desc.ST_RS], np.int64(1), m_len)
                                or any_bad(bad, gp[desc.BAD_K], k_off, gp[desc.K_RS], d, n_len)
                                or any_bad(bad, gp[desc.BAD_V], v_off, gp[desc.V_RS], dvd, n_len))
                            # s <- z;  p <- exp(s - lse)   (all rows of the run)
                            score(q, k, seqtab, gp, fp, pse, slopes, mask, b, h, i0, rows, j0,
                                  n_len, cls, s, ab)
                            for r in range(rows):
                                exp_sub(s, r * n_len, lse[st + (i0 + r) * gp[desc.ST_RS]], n_len)
                            if careful:
                                computed_tile(seqtab, gp, mask, b, h, i0, m_len, j0, n_len, cls, cm)
                                p_guard(s, cm, lse, st, gp[desc.ST_RS], i0, m_len, n_len)
                            # dp <- dy @ v.T
                            gemm(TRANS_N, TRANS_T, rows, n_len, dvd, np.float32(1.0), dy, dy_off,
                                 gp[desc.DY_RS], v, v_off, gp[desc.V_RS], np.float32(0.0), dp, OFF0,
                                 n_len, ab)
                            for x in range(ng):
                                # tile x of the run: rows [ti0, ti0 + tm), at element so of s / dp
                                ti0 = i0 + x * bm
                                tm = min(bm, i0 + rows - ti0)
                                so = x * bm * n_len
                                tq_off = q_off + x * bm * gp[desc.Q_RS]
                                tdy_off = dy_off + x * bm * gp[desc.DY_RS]
                                mn = tm * n_len
                                # dp_drop, p_drop (into rb) and ds <- p * (dp_drop - dsum) in dp
                                if FULL:
                                    drop_ds(seqtab, gp, fp, drop_mask, dsum, st, b, h, ti0, tm, j0,
                                            n_len, s, dp, so, rb)
                                else:
                                    ds_rows(gp, dsum, st, ti0, tm, n_len, s, dp, so)
                                pd = rb if dropping else s
                                pd_off = OFF0 if dropping else so
                                if careful:
                                    # non-finite rows meet this tile: masked ds exactly 0, and the
                                    # three products exclude masked elements exactly (guard.py)
                                    ds_guard(dp, cm, mn)
                                    gemm_guard(TRANS_T, n_len, tm, dvd, pd, n_len, dy, tdy_off,
                                               gp[desc.DY_RS], dv, v_off, gp[desc.V_RS], bad,
                                               gp[desc.BAD_DY], cm, gbuf, ab)
                                    gemm_guard(TRANS_T, n_len, tm, d, dp, n_len, q, tq_off,
                                               gp[desc.Q_RS], dk, k_off, gp[desc.K_RS], bad,
                                               gp[desc.BAD_Q], cm, gbuf, ab)
                                    gemm_guard(TRANS_N, tm, n_len, d, dp, n_len, k, k_off,
                                               gp[desc.K_RS], dqbuf, tq_off, gp[desc.Q_RS], bad,
                                               gp[desc.BAD_K], cm, gbuf, ab)
                                else:
                                    # dv <- dv + p_drop.T @ dy
                                    gemm(TRANS_T, TRANS_N, n_len, dvd, tm, np.float32(1.0), pd,
                                         pd_off, n_len, dy, tdy_off, gp[desc.DY_RS],
                                         np.float32(1.0), dv, v_off, gp[desc.V_RS], ab)
                                    # dk <- dk + ds.T @ q      (times scale later)
                                    gemm(TRANS_T, TRANS_N, n_len, d, tm, np.float32(1.0), dp, so,
                                         n_len, q, tq_off, gp[desc.Q_RS], np.float32(1.0), dk,
                                         k_off, gp[desc.K_RS], ab)
                                    # dq <- dq + ds @ k        (times scale later)
                                    gemm(TRANS_N, TRANS_N, tm, d, n_len, np.float32(1.0), dp, so,
                                         n_len, k, k_off, gp[desc.K_RS], np.float32(1.0), dqbuf,
                                         tq_off, gp[desc.Q_RS], ab)
                                if FULL and dpk != 0:
                                    _dpse_tile(dp[so:], tm, n_len, b, h, ti0, j0, c, pk, dpk, scale,
                                               seqtab, dpse, dslope)
                            ib += ng

    return bwd_chunk


_bwd_chunk = _make_bwd_chunk(True)
_bwd_chunk_plain = _make_bwd_chunk(False)


def bwd_driver(q, k, v, dy, lse, dsum, dq, dqp, dk, dv, dpse, dslope, pse, slopes, mask,
               drop_mask, seqtab, gp, fp, items, tptr, visits, bad):
    """Backward: accumulate unscaled dq, dk and dv (the caller multiplies dq, dk by scale).

    items: int64 [n_items, 4] = (b_lo, b_hi, n2, split).  Split 0 writes dq, split c > 0 its
    partial ``dqp[c - 1]`` (same offsets), reduced by the caller in a fixed order.
    dpse: flat float32 with the pse offsets (DPSE_KIND 1/2), dslope: float32 [B, N1, NSPLIT];
    visits: int64 [n_chunks], tiles computed per chunk (debug hook).  bad: uint8 non-finite
    row flags; tiles touching a flagged row of q/k/v/dy/stats take guard.py's careful path.
    """
    chunk = _bwd_chunk_plain if plain("bwd", gp) else _bwd_chunk
    run_chunks(chunk, tptr.size - 1, (q, k, v, dy, lse, dsum, dq, dqp, dk, dv, dpse, dslope,
                                          pse, slopes, mask, drop_mask, seqtab, gp, fp, items,
                                          tptr, visits, bad))


@_jit.kernel
def _dpse_tile(ds, m_len, n_len, b, h, i0, j0, c, pk, dpk, scale, seqtab, dpse, dslope):
    """Accumulate the pse gradient of one tile (SPEC §4.4).

    DPSE_KIND 1: ``dpse[b,h,i,j] += f * ds`` (f = scale for pse_type 1, 1 for type 0) at the pse
    offsets (a row stride 0 sums over the broadcast rows, in row order, inside this item);
    DPSE_KIND 3: ``dslope[b, h, c] += sum ds * (-|delta|)`` (or -sqrt).
    """
    if dpk == 1:
        f = scale if (pk == desc.PSE_ADD_THEN_SCALE) else np.float32(1.0)
        p_off = seqtab[b, desc.DPSE_OFF] + h * seqtab[b, desc.PSE_HS] + j0
        p_rs = seqtab[b, desc.PSE_RS]
        for r in range(m_len):
            po = p_off + (i0 + r) * p_rs
            dr = dpse[po:po + n_len]
            sr = ds[r * n_len:(r + 1) * n_len]
            for cc in range(n_len):
                dr[cc] += f * sr[cc]
    elif dpk == 3:
        base = (j0 + seqtab[b, desc.KVSTART]) - (i0 + seqtab[b, desc.QSTART])
        acc = np.float32(0.0)
        for r in range(m_len):
            for cc in range(n_len):
                dl = np.float32(abs(base + cc - r))
                if pk == desc.PSE_ALIBI_SQRT:
                    dl = np.sqrt(dl)
                acc -= ds[r * n_len + cc] * dl
        dslope[b, h, c] += acc

