"""Long runs on one machine (SPEC §12, §10): the log-sum-exp form, the chunk-pair schedule
and the chunked driver.

- :func:`softmax_lse`: ``lse = m + log(l)`` from the forward's statistics (the form ring and
  chunked callers merge in), ``-inf`` for invalid rows.
- The chunk-pair schedule: :func:`plan_pair` classifies a (q-block, kv-block) pair of a global
  band ``lo <= j - i <= hi`` as empty (None), fully visible (no mask) or partial (sparse mode 4
  with local pre/next tokens), trimmed to the rows and columns the band can reach.
  :class:`PairRunner` runs one pair's forward or backward through the ordinary per-call
  pipeline with the pair's global coordinates: ALiBi gets ``q_start_idx``/``kv_start_idx`` of
  the pair, dropout the global element index ``((b*N1 + h)*S1 + i)*S2 + j``, so a chunked or ring
  run draws exactly the bits of the unchunked call with the same ``seed``/``offset``.  Results
  come back unrounded in float32.  ``fag_numba.torch.ring`` uses the same two pieces (a pair is
  a pair, whether its K/V came from disk or from a neighbour).
- :func:`chunked_attention_score` / :func:`chunked_attention_score_grad`: walk the pairs of
  ``chunk``-token blocks, merge forward partials in float32 (SPEC §10 in running form),
  accumulate gradients in float32, write every finished block to the outputs (``out=`` memmaps
  keep resident memory at O(chunk)).

No torch here.
"""
import math

import numpy as np

from typing import NamedTuple

from . import _jit, api, config, dtypes, validation
from .api import FlashAttentionGrads, FlashAttentionOutput
from .errors import FagTypeError, FagValueError
from .masks import MaskPlan
from .pse import _start_idx

_FLT_MAX = np.float32(3.4028234663852886e38)


@_jit.kernel
def _lse_rows(m, l, out):
    """``out = m + log(l)`` (float32), ``-inf`` where ``m == -FLT_MAX`` (invalid row).

    The same float32 expression as ``kernels.driver.rowstats_driver``, so the grad gets the
    identical lse from ``softmax_lse=`` as from ``softmax_max``/``softmax_sum`` (numpy's float32
    log differs from it in the last bit for ~3% of values).
    """
    for i in range(m.size):
        if m[i] == -_FLT_MAX:
            out[i] = -np.inf
        else:
            out[i] = m[i] + np.float32(math.log(l[i]))


def _lane_free_shape(shape):
    """Statistics shape -> lse shape (SPEC §3, §12): the lane axis (8 or 1) is dropped.

    4-D ``[B,N1,S1,8|1]`` -> ``[B,N1,S1]``; 3-D with last dim 8 or 1 is TND ``[T1,N1,8|1]`` ->
    ``[T1,N1]``; other 3-D ``[B,N1,S1]`` and 2-D ``[T1,N1]`` are already lane-free.
    """
    if len(shape) == 4 and shape[-1] in (1, 8):
        return tuple(shape[:-1])
    if len(shape) == 3 and shape[-1] in (1, 8):
        return tuple(shape[:-1])
    if len(shape) in (2, 3):
        return tuple(shape)
    return None


def softmax_lse(softmax_max, softmax_sum):
    """Log-sum-exp of each row from the forward's statistics: ``lse = m + log(l)``.

    Parameters
    ----------
    softmax_max, softmax_sum : ndarray
        float32 statistics of :func:`fag_numba.flash_attention_score`: ``[B,N1,S1,8]``,
        ``[B,N1,S1,1]`` or ``[B,N1,S1]``; TND ``[T1,N1,8]``, ``[T1,N1,1]`` or ``[T1,N1]``.
        Lane 0 is read.  A 3-D array whose last dim is 8 or 1 is read as TND with lanes (the
        forward always returns 8 lanes; pass ``[B,N1,S1]`` statistics with S1 in {1, 8} as
        ``[B,N1,S1,1]`` to avoid the ambiguity).

    Returns
    -------
    ndarray
        float32 ``[B,N1,S1]`` (TND ``[T1,N1]``, rows in the same memory order as the
        statistics, i.e. the softmax_layout's order); ``-inf`` for invalid rows
        (``softmax_max == -FLT_MAX``).  This is the grad's ``softmax_lse=`` input.
    """
    fn = "softmax_lse: "
    for name, x in (("softmax_max", softmax_max), ("softmax_sum", softmax_sum)):
        validation.check_array(name, x, fn)
        if x.dtype != np.float32:
            raise FagTypeError(f"{fn}{name} must be float32, got {x.dtype}")
        if _lane_free_shape(x.shape) is None:
            raise FagValueError(f"{fn}{name} must have shape [B,N1,S1,8|1], [B,N1,S1], "
                                f"[T1,N1,8|1] or [T1,N1], got {tuple(x.shape)}")
    if softmax_max.shape != softmax_sum.shape:
        raise FagValueError(f"{fn}softmax_sum shape {tuple(softmax_sum.shape)} must equal "
                            f"softmax_max shape {tuple(softmax_max.shape)}")
    shape = _lane_free_shape(softmax_max.shape)

    def lane0(x):
        if len(shape) < x.ndim:
            x = x[..., 0]
        return dtypes.writable(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))

    m = lane0(softmax_max)
    l = lane0(softmax_sum)
    out = np.empty(m.size, np.float32)
    if out.size:
        _lse_rows(m, l, out)
    return out.reshape(shape)



# ------------------------------------------------------------------------------------------
# The chunk-pair schedule
# ------------------------------------------------------------------------------------------

_INF = config.BAND_INF
#: the chunked driver's options (SPEC §12); anything else is a FagValueError naming it
CHUNKED_OPTIONS = ("scale_value", "keep_prob", "seed", "offset", "atten_mask", "sparse_mode",
                   "pre_tokens", "next_tokens", "pse", "pse_type", "q_start_idx", "kv_start_idx",
                   "inner_precise")
_SEQ_AXIS = {"BNSD": 2, "BSND": 1, "BSH": 1, "SBH": 0}


class Pair(NamedTuple):
    """One (q-block, kv-block) pair in global coordinates: query rows ``[i0, i1)``, key rows
    ``[j0, j1)``, trimmed to what the band reaches; ``full``: every element is computed."""
    i0: int
    i1: int
    j0: int
    j1: int
    full: bool


def plan_pair(i0, i1, j0, j1, lo, hi):
    """Classify the block rows ``[i0, i1)`` x columns ``[j0, j1)`` of the global band
    ``lo <= j - i <= hi`` (``-/+config.BAND_INF``: no limit).

    Returns None when no element is computed (the pair is skipped), else the :class:`Pair`
    trimmed to the rows that reach a column of the block and the columns those rows reach.
    """
    a = max(i0, j0 - hi)                  # row i reaches [i + lo, i + hi]
    e = min(i1, j1 - lo)
    if e <= a:
        return None
    c0 = max(j0, a + lo)
    c1 = min(j1, e + hi)
    if c1 <= c0:
        return None
    full = c0 - (e - 1) >= lo and (c1 - 1) - a <= hi
    return Pair(int(a), int(e), int(c0), int(c1), bool(full))


def chunk_bounds(s, chunk):
    """``[(start, stop), ...]`` of the blocks of at most ``chunk`` tokens covering ``[0, s)``."""
    return [(a, min(a + chunk, s)) for a in range(0, s, chunk)]


def schedule(s1, s2, chunk, lo, hi, kv_outer=False):
    """Every non-empty pair of ``chunk``-token blocks: a list of ``(a, c, Pair)`` with a / c the
    q-block / kv-block numbers, q-block outer (forward) or kv-block outer (backward)."""
    qb, kb = chunk_bounds(s1, chunk), chunk_bounds(s2, chunk)
    out = []
    if kv_outer:
        for c, (j0, j1) in enumerate(kb):
            for a, (i0, i1) in enumerate(qb):
                p = plan_pair(i0, i1, j0, j1, lo, hi)
                if p is not None:
                    out.append((a, c, p))
    else:
        for a, (i0, i1) in enumerate(qb):
            for c, (j0, j1) in enumerate(kb):
                p = plan_pair(i0, i1, j0, j1, lo, hi)
                if p is not None:
                    out.append((a, c, p))
    return out


def take(x, layout, a, b):
    """View of sequence positions ``[a, b)`` of an array in a non-TND layout (no copy)."""
    idx = [slice(None)] * x.ndim
    idx[_SEQ_AXIS[layout]] = slice(a, b)
    return x[tuple(idx)]


def bnsd(x, layout, n):
    """``[B, N, S, D]`` view of an array in a non-TND layout with ``n`` heads (no copy)."""
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(0, 2, 1, 3)
    if layout == "BSH":
        b, s, h = x.shape
        return x.reshape(b, s, n, h // n).transpose(0, 2, 1, 3)
    s, b, h = x.shape
    return x.reshape(s, b, n, h // n).transpose(1, 2, 0, 3)


class PairRunner:
    """Runs the forward or backward of one :class:`Pair` of a global ``S1 x S2`` problem.

    ``lo``/``hi``: the global band (``-/+config.BAND_INF`` for full attention); ``qstart`` /
    ``kvstart``: the problem's own ALiBi start indices; ``options``: ``scale_value``,
    ``keep_prob``, ``seed``, ``offset``, ``pse`` (slopes), ``pse_type`` as for the unchunked
    call.  Each pair call goes through ``api._prepare`` (validation, descriptors) with the pair's
    mask (none for a full pair, the local band for a partial one), ALiBi start
    indices ``qstart + i0`` / ``kvstart + j0`` and the global dropout element geometry.
    """

    def __init__(self, fn, head_num, layout, s1, s2, lo, hi, qstart=0, kvstart=0, options=None):
        self.fn, self.head_num, self.layout = fn, head_num, layout
        self.s1, self.s2, self.lo, self.hi = int(s1), int(s2), int(lo), int(hi)
        self.qstart, self.kvstart = int(qstart), int(kvstart)
        o = dict(options or {})
        self.scale = o.get("scale_value", 1.0)
        self.keep_prob = o.get("keep_prob", 1.0)
        self.seed = o.get("seed")
        self.offset = o.get("offset", 0)
        self.pse = o.get("pse")
        self.pse_type = o.get("pse_type", 1)

    def _prepare(self, pair, q, k, v, dy):
        i0, i1, j0, j1, full = pair
        P = api._prepare(self.fn, q, k, v, dy, self.head_num, self.layout, self.pse, None, None,
                         self.scale, self.keep_prob, api.INT32_MAX, api.INT32_MAX, 0, None, None,
                         None, 0, self.pse_type, self.qstart + i0, self.kvstart + j0, "",
                         self.seed, self.offset, {}, None)
        if not full:
            # the pair's band in local coordinates j' - i' (what sparse mode 4 with
            # pre = s2 - s1 - lo', next = hi' - (s2 - s1) would plan, built directly: checking
            # the compressed mask costs ~10 ms per pair), canonical like masks.plan_masks
            s1l, s2l, d = i1 - i0, j1 - j0, j0 - i0
            lo_l = -_INF if self.lo - d <= 1 - s1l else self.lo - d
            hi_l = _INF if self.hi - d >= s2l - 1 else self.hi - d
            nb = P.dims.B
            z = np.zeros(nb, np.int64)
            P.mask = MaskPlan(lo=np.full(nb, lo_l, np.int64), hi=np.full(nb, hi_l, np.int64),
                              prefix=z, has_dense=False, dense=np.zeros(1, np.uint8),
                              dense_boff=z.copy(), dense_hs=0, dense_rs=0, sparse_mode=4,
                              full=False)
        P.drop_geom = (self.s1, self.s2, i0, j0)
        return P

    def forward(self, pair, q, k, v):
        """q: rows ``[i0, i1)``, k/v: rows ``[j0, j1)`` (layout arrays of any dtype).  Returns
        float32 ``(o [B,N1,s1,Dv], m [B,N1,s1], l [B,N1,s1])`` of the pair (invalid rows:
        m = -FLT_MAX, l = +FLT_MAX, o = 0)."""
        P = self._prepare(pair, q, k, v, None)
        q32, k32, v32, _ = api._inputs(P, q, k, v)
        out, m, l = api._run_forward(P, q32, k32, v32)
        d = P.dims
        o4 = bnsd(out.reshape(P.dy_shape), self.layout, d.N1)
        return o4, m.reshape(d.B, d.N1, d.S1), l.reshape(d.B, d.N1, d.S1)

    def backward(self, pair, q, k, v, dy, o, lse):
        """Partial gradients of the pair given the **global** attention_out rows ``o`` and
        float32 lse rows ``lse [B,N1,s1]`` (``-inf``: invalid row).  Returns float32
        ``(dq, dk, dv, dpse)`` with dq/dk/dv shaped like q/k/v (dpse: slope gradient or None)."""
        P = self._prepare(pair, q, k, v, dy)
        q32, k32, v32, y32 = api._inputs(P, q, k, v, dy)
        o32 = dtypes.to_f32_flat(o)
        lse = np.ascontiguousarray(lse, dtype=np.float32).reshape(-1)
        m = np.where(lse == -np.inf, np.float32(np.inf), lse).astype(np.float32)
        l = np.ones_like(m)
        dq, dk, dv, dpse = api._run_backward(P, q32, k32, v32, y32, o32, m, l)
        return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape), dpse


def merge_into(acc, mrun, lrun, o, m, l):
    """Running form of the SPEC §10 merge, in place, float32: ``acc`` (``[..., Dv]``, the
    unnormalised output relative to ``mrun``), ``mrun`` (-inf: nothing yet), ``lrun`` take the
    part ``(o, m, l)``; rows with ``m == -FLT_MAX`` (invalid in the part) add nothing."""
    valid = m > -_FLT_MAX
    mp = np.where(valid, m, -np.inf).astype(np.float32)
    mnew = np.maximum(mrun, mp)
    with np.errstate(invalid="ignore", over="ignore"):
        alpha = np.where(mrun == -np.inf, np.float32(0), np.exp(mrun - mnew)).astype(np.float32)
        beta = np.where(valid, l * np.exp(mp - mnew), np.float32(0)).astype(np.float32)
    acc *= alpha[..., None]
    acc += o * beta[..., None]
    lrun *= alpha
    lrun += beta
    mrun[...] = mnew


def finish_merge(acc, mrun, lrun):
    """(out, m, l) float32 of a running merge; rows that saw nothing are invalid rows
    (out 0, m = -FLT_MAX, l = +FLT_MAX)."""
    valid = mrun > -np.inf
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(valid[..., None], acc / np.where(valid, lrun, 1)[..., None], 0)
    return (out.astype(np.float32), np.where(valid, mrun, -_FLT_MAX).astype(np.float32),
            np.where(valid, lrun, _FLT_MAX).astype(np.float32))


# ------------------------------------------------------------------------------------------
# The chunked driver
# ------------------------------------------------------------------------------------------

class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _bar(progress, total, desc):
    """A tqdm bar over chunk pairs (tqdm imported only when asked for)."""
    if not progress:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="pair", disable=False)


def _setup(fn, query, key, value, dy, head_num, input_layout, chunk, progress, options):
    """Validate the whole problem once (SPEC §9, §12) -> (P, runner, layout, chunk)."""
    f = fn + ": "
    bad = sorted(set(options) - set(CHUNKED_OPTIONS))
    if bad:
        raise FagValueError(f"{f}option {bad[0]}={options[bad[0]]!r} is not supported by the "
                            f"chunked driver (supported: {', '.join(CHUNKED_OPTIONS)}; SPEC §12); "
                            f"use the unchunked function for it")
    if isinstance(chunk, (bool, np.bool_)) or not validation.is_int(chunk):
        raise FagTypeError(f"{f}chunk must be an int, got {type(chunk).__name__} {chunk!r}")
    if int(chunk) < 1:
        raise FagValueError(f"{f}chunk must be >= 1 (tokens per block), got {chunk}")
    if not isinstance(progress, (bool, np.bool_)):
        raise FagTypeError(f"{f}progress must be a bool, got {type(progress).__name__}")
    lay = validation.check_layout(input_layout, f)
    if lay == "TND":
        raise FagValueError(f"{f}input_layout TND is not supported by the chunked driver "
                            f"(layouts BSH, SBH, BSND, BNSD; SPEC §12), got {input_layout!r}")
    mask = options.get("atten_mask")
    mode = options.get("sparse_mode", 0)
    if mask is not None and (not validation.is_int(mode) or int(mode) not in (2, 3, 4)):
        raise FagValueError(f"{f}sparse_mode={mode!r} with an atten_mask is not supported by the "
                            f"chunked driver (only the compressed modes 2, 3, 4; SPEC §12)")
    pse = options.get("pse")
    pse_type = options.get("pse_type", 1)
    if pse is not None and pse_type not in (2, 3):
        raise FagValueError(f"{f}pse with pse_type={pse_type!r} is not supported by the chunked "
                            f"driver (only generated ALiBi, pse_type 2 or 3; SPEC §12)")
    qs = _start_idx("q_start_idx", options.get("q_start_idx"), f)
    ks = _start_idx("kv_start_idx", options.get("kv_start_idx"), f)
    P = api._prepare(fn, query, key, value, dy, head_num, lay, pse, None, mask,
                     options.get("scale_value", 1.0), options.get("keep_prob", 1.0),
                     options.get("pre_tokens", api.INT32_MAX),
                     options.get("next_tokens", api.INT32_MAX), options.get("inner_precise", 0),
                     None, None, None, mode, pse_type, qs, ks, "", options.get("seed"),
                     options.get("offset", 0), {}, None)
    d = P.dims
    if P.mask.full or d.B == 0:
        lo, hi = -_INF, _INF
    else:
        lo, hi = int(P.mask.lo[0]), int(P.mask.hi[0])
    runner = PairRunner(fn, d.N1, lay, d.S1, d.S2, lo, hi, qs, ks,
                        {k: options[k] for k in ("scale_value", "keep_prob", "seed", "offset",
                                                 "pse", "pse_type") if k in options})
    return P, runner, lay, int(chunk)


def _check_out(f, name, x, shape, dts):
    validation.check_array(name, x, f)
    if x.dtype not in dts:
        raise FagTypeError(f"{f}{name} dtype must be one of "
                           f"{', '.join(np.dtype(t).name for t in dts)}, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise FagValueError(f"{f}{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if not x.flags.writeable:
        raise FagValueError(f"{f}{name} must be writable (it is written in place)")
    return x


def _out_arrays(f, out, kind, specs):
    """``out`` (a FlashAttentionOutput / FlashAttentionGrads of preallocated arrays) checked
    against ``specs = [(field, shape, dtypes)]``; None allocates fresh zeroed arrays."""
    if out is None:
        return [np.zeros(shape, dts[0]) for _, shape, dts in specs], True
    if not isinstance(out, tuple) or len(out) < len(specs):
        raise FagTypeError(f"{f}out must be a {kind} of preallocated arrays, got "
                           f"{type(out).__name__}")
    return [_check_out(f, f"out.{name}", x, shape, dts)
            for (name, shape, dts), x in zip(specs, out)], False


def chunked_attention_score(query, key, value, head_num, input_layout, *, chunk=65536, out=None,
                            progress=False, **options):
    """:func:`fag_numba.flash_attention_score` computed by (q-chunk, kv-chunk) pairs.

    Parameters
    ----------
    query, key, value : ndarray
        As for the unchunked forward, layouts BSH, SBH, BSND, BNSD (e.g. ``np.memmap``: only the
        blocks in use are read, converted to float32 one pair at a time).
    head_num, input_layout
        As for the unchunked forward.
    chunk : int
        Tokens per block along S1 and along S2 (>= 1); pairs the mask leaves empty are skipped
        and the others are trimmed to the rows/columns the band reaches.
    out : FlashAttentionOutput, optional
        Preallocated arrays (memmaps, say) written in place and returned: attention_out like
        query with last dim Dv (the output dtype, or float32), softmax_max / softmax_sum float32
        ``[B,N1,S1,8]`` (or ``[B,N1,S1,1]``).
    progress : bool
        Show a tqdm bar over the chunk pairs (stderr).
    **options
        ``scale_value``, ``keep_prob`` with ``seed``/``offset`` (the bits of the unchunked call),
        ``atten_mask`` with ``sparse_mode`` 2/3/4 (compressed; ``pre_tokens``/``next_tokens``),
        ``pse`` slopes with ``pse_type`` 2/3 (``q_start_idx``/``kv_start_idx``),
        ``inner_precise``.  Anything else is a FagValueError naming it.

    Returns
    -------
    FlashAttentionOutput
        What the unchunked forward returns, within float32 rounding (partials merged by SPEC §10
        in float32, rounded to the output dtype once).  Memory beyond inputs and outputs:
        O(B * N1 * chunk * Dv) plus the per-pair kernel scratch.
    """
    fn = "chunked_attention_score"
    f = fn + ": "
    P, run, lay, chunk = _setup(fn, query, key, value, None, head_num, input_layout, chunk,
                                progress, options)
    d = P.dims
    st_shape = (d.B, d.N1, d.S1, 8)
    specs = [("attention_out", P.dy_shape, (P.out_dtype, dtypes.FLOAT32)),
             ("softmax_max", st_shape, (dtypes.FLOAT32,)),
             ("softmax_sum", st_shape, (dtypes.FLOAT32,))]
    if out is not None and isinstance(out, tuple) and len(out) == 3 and \
            isinstance(out[1], np.ndarray) and out[1].shape[-1:] == (1,):
        specs[1] = ("softmax_max", st_shape[:3] + (1,), (dtypes.FLOAT32,))
        specs[2] = ("softmax_sum", st_shape[:3] + (1,), (dtypes.FLOAT32,))
    (o_out, m_out, l_out), _fresh = _out_arrays(f, out, "FlashAttentionOutput", specs)
    pairs = schedule(d.S1, d.S2, chunk, run.lo, run.hi)
    by_q = {}
    for a, c, p in pairs:
        by_q.setdefault(a, []).append((c, p))
    bar = _bar(progress, len(pairs), fn)
    try:
        for a, (a0, a1) in enumerate(chunk_bounds(d.S1, chunk)):
            acc = np.zeros((d.B, d.N1, a1 - a0, d.Dv), np.float32)
            mrun = np.full((d.B, d.N1, a1 - a0), -np.inf, np.float32)
            lrun = np.zeros((d.B, d.N1, a1 - a0), np.float32)
            for c, p in by_q.get(a, ()):
                o, m, l = run.forward(p, take(query, lay, p.i0, p.i1),
                                      take(key, lay, p.j0, p.j1), take(value, lay, p.j0, p.j1))
                r = slice(p.i0 - a0, p.i1 - a0)
                merge_into(acc[:, :, r], mrun[:, :, r], lrun[:, :, r], o, m, l)
                bar.update(1)
            o, m, l = finish_merge(acc, mrun, lrun)
            bnsd(take(o_out, lay, a0, a1), lay, d.N1)[...] = dtypes.cast(o, o_out.dtype)
            m_out[:, :, a0:a1, :] = m[..., None]
            l_out[:, :, a0:a1, :] = l[..., None]
    finally:
        bar.close()
    return FlashAttentionOutput(o_out, m_out, l_out)


def _stats_rows(x, a0, a1):
    """float32 ``[B, N1, a1 - a0]`` rows of a statistics input (lane 0)."""
    if x.ndim == 4:
        x = x[:, :, a0:a1, 0]
    else:
        x = x[:, :, a0:a1]
    return dtypes.writable(np.ascontiguousarray(x, dtype=np.float32))


def chunked_attention_score_grad(query, key, value, dy, head_num, input_layout, *, softmax_max,
                                 softmax_sum, attention_in, chunk=65536, out=None,
                                 progress=False, **options):
    """:func:`fag_numba.flash_attention_score_grad` computed by (q-chunk, kv-chunk) pairs.

    Parameters
    ----------
    query, key, value, dy, head_num, input_layout, chunk, progress, **options
        As for :func:`chunked_attention_score` (dy: query's shape with last dim Dv).
    softmax_max, softmax_sum : ndarray
        The forward's float32 statistics ``[B,N1,S1,8|1]`` or ``[B,N1,S1]`` (required: the
        chunked grad never recomputes the forward).
    attention_in : ndarray
        The forward's attention_out (float32, float16 or bfloat16).
    out : FlashAttentionGrads, optional
        Preallocated dq, dk, dv (like query/key/value; output dtype or float32) written in place
        and returned; ``out.dpse`` may be None or a float32 array like ``pse`` (slopes).

    Returns
    -------
    FlashAttentionGrads
        What the unchunked grad returns within float32 rounding (every pair's partial dq, dk,
        dv summed in float32, SPEC §10, rounded once).  The walk is kv-block outer: dk/dv of a
        block are finished and written before the next; a q-block's dq accumulator lives from
        its first pair to its last (band masks: a few blocks; causal/full: all of them, i.e.
        float32 ``[B, S1, N1, D]`` in total).
    """
    fn = "chunked_attention_score_grad"
    f = fn + ": "
    validation.check_array("dy", dy, f)
    P, run, lay, chunk = _setup(fn, query, key, value, dy, head_num, input_layout, chunk,
                                progress, options)
    d = P.dims
    base = (d.B, d.N1, d.S1)
    for name, x in (("softmax_max", softmax_max), ("softmax_sum", softmax_sum)):
        validation.check_array(name, x, f)
        if x.dtype != np.float32:
            raise FagTypeError(f"{f}{name} must be float32, got {x.dtype}")
        ok = [base + (8,), base + (1,), base]
        if tuple(x.shape) not in ok:
            raise FagValueError(f"{f}{name} must have shape {ok[0]}, {ok[1]} or {ok[2]}, got "
                                f"{tuple(x.shape)}")
    validation.check_like("attention_in", attention_in, P.dy_shape, f,
                          allowed=dtypes.ATTN_IN_DTYPES)
    odts = (P.out_dtype, dtypes.FLOAT32)
    specs = [("dq", query.shape, odts), ("dk", key.shape, odts), ("dv", value.shape, odts)]
    (dq_out, dk_out, dv_out), fresh = _out_arrays(f, out, "FlashAttentionGrads", specs)
    pse = options.get("pse")
    dpse_out = None
    if out is not None and len(out) > 3 and out[3] is not None and pse is not None:
        dpse_out = _check_out(f, "out.dpse", out[3], pse.shape, (dtypes.FLOAT32,))
    pairs = schedule(d.S1, d.S2, chunk, run.lo, run.hi, kv_outer=True)
    qb, kb = chunk_bounds(d.S1, chunk), chunk_bounds(d.S2, chunk)
    last = {a: n for n, (a, _c, _p) in enumerate(pairs)}
    by_kv = {}
    for n, (a, c, p) in enumerate(pairs):
        by_kv.setdefault(c, []).append((n, a, p))
    dslope = np.zeros(pse.shape, np.float64) if pse is not None else None
    open_dq = {}                  # q-block -> (float32 dq accumulator, float32 lse rows)
    bar = _bar(progress, len(pairs), fn)
    try:
        if not fresh:             # blocks no pair touches are zero (the kernels' convention)
            for a, (a0, a1) in enumerate(qb):
                if a not in last:
                    take(dq_out, lay, a0, a1)[...] = 0
        for c, (c0, c1) in enumerate(kb):
            kc = take(key, lay, c0, c1)
            dk_acc = np.zeros(kc.shape, np.float32)
            dv_acc = np.zeros(take(value, lay, c0, c1).shape, np.float32)
            for n, a, p in by_kv.get(c, ()):
                a0, a1 = qb[a]
                if a not in open_dq:
                    lse = np.empty(base[:2] + (a1 - a0,), np.float32)
                    _lse_rows(_stats_rows(softmax_max, a0, a1).reshape(-1),
                              _stats_rows(softmax_sum, a0, a1).reshape(-1), lse.reshape(-1))
                    open_dq[a] = (np.zeros(take(query, lay, a0, a1).shape, np.float32), lse)
                acc, lse = open_dq[a]
                gq, gk, gv, gs = run.backward(
                    p, take(query, lay, p.i0, p.i1), take(key, lay, p.j0, p.j1),
                    take(value, lay, p.j0, p.j1), take(dy, lay, p.i0, p.i1),
                    take(attention_in, lay, p.i0, p.i1), lse[:, :, p.i0 - a0:p.i1 - a0])
                bnsd(acc, lay, d.N1)[:, :, p.i0 - a0:p.i1 - a0] += bnsd(gq, lay, d.N1)
                bnsd(dk_acc, lay, d.N2)[:, :, p.j0 - c0:p.j1 - c0] += bnsd(gk, lay, d.N2)
                bnsd(dv_acc, lay, d.N2)[:, :, p.j0 - c0:p.j1 - c0] += bnsd(gv, lay, d.N2)
                if gs is not None:
                    dslope += gs
                if last[a] == n:                     # the q-block's last pair: write dq
                    take(dq_out, lay, a0, a1)[...] = dtypes.cast(acc, dq_out.dtype)
                    del open_dq[a]
                bar.update(1)
            take(dk_out, lay, c0, c1)[...] = dtypes.cast(dk_acc, dk_out.dtype)
            take(dv_out, lay, c0, c1)[...] = dtypes.cast(dv_acc, dv_out.dtype)
    finally:
        bar.close()
    dpse = None
    if pse is not None:
        dpse = dslope.astype(np.float32)
        if dpse_out is not None:
            dpse_out[...] = dpse
            dpse = dpse_out
    return FlashAttentionGrads(dq_out, dk_out, dv_out, dpse)
