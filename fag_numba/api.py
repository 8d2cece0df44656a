"""Public API of fag_numba: ``flash_attention_score`` and ``flash_attention_score_grad``.

The contract is SPEC.md; this docstring is the short form.

Math (per sequence b, query head h, kv head n2 = h // G; all float32)::

    X = Q K^T;  Z = (X + pse) * scale  (pse_type 1) | X * scale + pse  (0)
              | X * scale - slope * |delta|  (2) | X * scale - slope * sqrt(|delta|)  (3)
    P = C ? exp(Z - m) / l : 0;  Pd = R ? P / keep_prob : 0;  O = Pd V
    dP = dY V^T;  dS = P * ((R ? dP / keep_prob : 0) - rowsum(dY * O))
    dV = Pd^T dY;  dQ = scale * dS K;  dK = scale * dS^T Q  (dK, dV summed over the G heads)

GQA: query head h attends to kv head ``h // (N1 // N2)`` (heads 0..G-1 of Q use kv head 0).

Masks (C, "element is computed"; 1 = computed below), e.g. S1 = 3, S2 = 5 (delta = 2)::

    mode 2 (leftUpCausal)   mode 3 (rightDownCausal)   mode 4 band pre=1, next=0
    1 0 0 0 0               1 1 1 0 0                   0 1 1 0 0
    1 1 0 0 0               1 1 1 1 0                   0 0 1 1 0
    1 1 1 0 0               1 1 1 1 1                   0 0 0 1 1

Argument names are the aclnn attribute names (``pre_tokens``, not torch_npu's
``pre_tockens``; ``fag_numba.torch`` accepts both).  Internal names: query/key/value -> q/k/v,
dy -> do, attention_in -> o, softmax_max/sum -> m/l (lse = m + log l), atten_mask -> mask plan.
"""
import dataclasses
from typing import NamedTuple, Optional

import numpy as np

from . import dtypes, layout, memory, mkl, validation
from .errors import FagTypeError, FagValueError
from .kernels import desc
from .threads import blas_single_thread

INT32_MAX = 2147483647
#: Debug hook: the number of (q-block, kv-block, head) tiles the last forward / backward driver
#: computed (EMPTY tiles are skipped and not counted).  Tests use it to prove tile skipping.
last_tile_count = {"forward": 0, "backward": 0}
_FLT_MAX = np.float32(3.4028234663852886e38)


class FlashAttentionOutput(NamedTuple):
    """Forward result: attention_out (query layout, last dim Dv) and the row statistics
    softmax_max / softmax_sum, float32 ``[B, N1, S1, 8]`` (TND ``[T1, N1, 8]``)."""
    attention_out: np.ndarray
    softmax_max: np.ndarray
    softmax_sum: np.ndarray


class FlashAttentionGrads(NamedTuple):
    """Backward result: dq (like query), dk (like key), dv (like value), dpse (like pse, or the
    slope gradient for generated ALiBi, or None)."""
    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    dpse: Optional[np.ndarray]


class _Problem:
    """Everything the drivers need, built once per call by ``_prepare`` (plain attributes)."""


def _prepare(fn, query, key, value, dy, head_num, input_layout, pse, drop_mask, atten_mask,
             scale_value, keep_prob, pre_tokens, next_tokens, inner_precise, prefix,
             actual_seq_qlen, actual_seq_kvlen, sparse_mode, pse_type, q_start_idx,
             kv_start_idx, softmax_layout, seed, offset, d_scales, out_dtype):
    """Validate every argument and turn the options into descriptors (no kernel runs here)."""
    from . import masks, pse as pse_mod
    from . import dropout as dropout_mod

    f = fn + ": "
    P = _Problem()
    lay = validation.check_layout(input_layout, f)
    head_num = validation.check_int("head_num", head_num, 1, None, f)
    arrays = [("query", query), ("key", key), ("value", value)]
    if dy is not None:
        arrays.append(("dy", dy))
    qdt = validation.check_qkv(arrays, lay, f)
    P.qdtype = qdt
    P.fp8 = qdt in dtypes.FP8_DTYPES
    P.scale = validation.check_real("scale_value", scale_value, f, finite=True)
    kp = validation.check_real("keep_prob", keep_prob, f)
    if not (kp > 0 and kp <= 1):
        raise FagValueError(f"{f}keep_prob must be in (0, 1] after rounding to float32, got "
                            f"{keep_prob!r}")
    P.keep_prob = kp
    validation.check_int("inner_precise", inner_precise, 0, 2, f)
    validation.check_int("pre_tokens", pre_tokens, -2**63, 2**63 - 1, f)
    validation.check_int("next_tokens", next_tokens, -2**63, 2**63 - 1, f)
    if not isinstance(softmax_layout, str):
        raise FagTypeError(f"{f}softmax_layout must be a str, got "
                           f"{type(softmax_layout).__name__} {softmax_layout!r}")
    slay = softmax_layout.upper()
    if lay == "TND":
        if slay not in ("", "TND"):
            raise FagValueError(f"{f}softmax_layout must be \"\" or \"TND\" for input_layout "
                                f"TND, got {softmax_layout!r}")
        seq_q, seq_k, cu_q, cu_k = layout.parse_varlen(actual_seq_qlen, actual_seq_kvlen,
                                                       query.shape[0], key.shape[0], f)
        dims = layout.parse_dims(query, key, value, head_num, lay, seq_q, seq_k, cu_q, cu_k)
    else:
        if slay != "":
            raise FagValueError(f"{f}softmax_layout must be \"\" for input_layout {lay}, got "
                                f"{softmax_layout!r}")
        for name, x in (("actual_seq_qlen", actual_seq_qlen),
                        ("actual_seq_kvlen", actual_seq_kvlen)):
            if x is not None:
                raise FagValueError(f"{f}{name} is only allowed with input_layout TND, got "
                                    f"{x!r} for layout {lay}")
        dims = layout.parse_dims(query, key, value, head_num, lay)
    P.dims = dims
    P.softmax_layout = slay
    P.dy_shape = validation.expected_dy_shape(query, dims)
    if dy is not None:
        validation.check_like("dy", dy, P.dy_shape, f)

    # ---- output dtype and fp8 dequantisation scales ----
    P.out_dtype = _out_dtype(out_dtype, qdt, f)
    P.d_scales = _check_d_scales(d_scales, qdt, dims, f)

    # ---- masks (SPEC §6, §7) ----
    P.mask = masks.plan_masks(atten_mask, sparse_mode, pre_tokens, next_tokens, prefix,
                              dims.seq_q, dims.seq_k, batch=dims.B, n1=dims.N1, tnd=dims.tnd,
                              s1=dims.S1, s2=dims.S2, defer=True)
    has_mask = atten_mask is not None
    # causal: every computed element has j <= i (a dense mask only removes more elements)
    causal = bool(has_mask and np.all(P.mask.hi <= 0) and not np.any(P.mask.prefix > 0))

    # ---- pse (SPEC §4) ----
    P.pse = pse_mod.plan_pse(pse, pse_type, q_start_idx, kv_start_idx, dims, qdt, causal,
                             int(sparse_mode), has_mask, f, pre_tokens, next_tokens)

    # ---- dropout (SPEC §5) ----
    P.drop_kind = desc.DROP_NONE
    P.drop_flat = np.zeros(1, np.uint8)
    P.drop_raw = None
    P.seed_lo = P.seed_hi = P.off_lo = P.off_hi = P.threshold = 0
    numels = dims.N1 * int(np.sum(dims.seq_q * dims.seq_k))
    if kp < 1:
        if (drop_mask is None) == (seed is None):
            raise FagValueError(f"{f}keep_prob={float(kp)} < 1 needs exactly one source of keep "
                                f"bits: drop_mask or seed (got "
                                f"{'both' if seed is not None else 'neither'})")
        if drop_mask is not None:
            validation.check_array("drop_mask", drop_mask, f)
            if drop_mask.dtype != np.uint8:
                raise FagTypeError(f"{f}drop_mask must be uint8 (a packed bit stream), got "
                                   f"{drop_mask.dtype}")
            need = -(-numels // 8)
            if drop_mask.size < need:
                raise FagValueError(f"{f}drop_mask must hold at least ceil(numels/8) = {need} "
                                    f"bytes (numels = {numels}), got {drop_mask.size}")
            P.drop_kind = desc.DROP_MASK
            P.drop_raw = drop_mask           # flattened by _materialize, after every check
        else:
            P.seed_lo, P.seed_hi = dropout_mod.split_seed(seed, fn)
            P.off_lo, P.off_hi = dropout_mod.split_offset(offset, fn)
            P.threshold = dropout_mod.keep_threshold(kp)
            P.drop_kind = desc.DROP_PHILOX
    return P


def _materialize(P, fn, arrays, grad, stats_given, pse, atten_mask, drop_mask):
    """After every check: refuse a call that cannot fit (FagMemoryError, SPEC §9), then make
    the flat forms the kernels read (mask bytes, pse float32, drop_mask bytes)."""
    from . import masks, pse as pse_mod

    memory.require(memory.estimate_call(P, arrays, grad, stats_given, pse, atten_mask,
                                        drop_mask), "this call (outputs and working memory)",
                   fn + ": ")
    if P.mask.has_dense:
        # a read-only array is a different numba type (a second compile of every driver)
        P.mask = dataclasses.replace(P.mask, dense=dtypes.writable(masks.dense_flat(P.mask.dense)))
    pse_mod.finish(P.pse, pse)
    if P.drop_raw is not None:
        P.drop_flat = dtypes.writable(np.ascontiguousarray(P.drop_raw).reshape(-1))
    return P


def _unmask(fn, args):
    """SPEC §9 array forms: a masked array with masked entries is a FagTypeError (named); one
    without is read as its plain data.  Returns the values of ``args`` in order."""
    out = []
    for name, x in args.items():
        if isinstance(x, np.ndarray):
            validation.check_array(name, x, fn + ": ")
            x = validation.plain(x)
        out.append(x)
    return out


def _out_dtype(out_dtype, qdt, f):
    """Output dtype: the input dtype, or for fp8 inputs float16 (default), bfloat16, float32."""
    if out_dtype is None:
        return dtypes.FLOAT16 if qdt in dtypes.FP8_DTYPES else qdt
    # (built here, not before: dtypes.BFLOAT16 imports ml_dtypes)
    names = {"float16": dtypes.FLOAT16, "bfloat16": dtypes.BFLOAT16, "float32": dtypes.FLOAT32}
    codes = {0: dtypes.FLOAT16, 1: dtypes.BFLOAT16}
    if validation.is_int(out_dtype):
        if int(out_dtype) not in codes:
            raise FagValueError(f"{f}out_dtype code must be 0 (float16) or 1 (bfloat16), got "
                                f"{out_dtype}")
        dt = codes[int(out_dtype)]
    elif isinstance(out_dtype, str) and out_dtype in names:
        dt = names[out_dtype]
    else:
        try:
            dt = np.dtype(out_dtype)
        except TypeError:
            raise FagTypeError(f"{f}out_dtype must be a dtype, a dtype name or 0/1, got "
                               f"{out_dtype!r}") from None
        if dt not in names.values():
            raise FagValueError(f"{f}out_dtype must be float16, bfloat16 or float32, got {dt}")
    if qdt not in dtypes.FP8_DTYPES and dt != qdt:
        if qdt == dtypes.FLOAT32 or dt != dtypes.FLOAT32:
            allowed = ("None or float32" if qdt == dtypes.FLOAT32
                       else f"None, the input dtype {qdt.name} or float32")
            raise FagValueError(f"{f}out_dtype must be {allowed} for {qdt.name} inputs, got "
                                f"{dt.name}")
        # float16/bfloat16 inputs with out_dtype=float32: unrounded float32 outputs, what
        # chunked and ring callers accumulate (SPEC §1, §12)
    return dt


def _check_d_scales(d_scales, qdt, dims, f):
    """d_scale_q/k/v/dy: only for fp8 inputs; a real or float32 [B, N, ceil(S/512), 1]."""
    out = {}
    for name, x in d_scales.items():
        if x is None:
            out[name] = None
            continue
        if qdt not in dtypes.FP8_DTYPES:
            raise FagValueError(f"{f}{name} is only allowed with float8 inputs, got {x!r} for "
                                f"{qdt.name} inputs")
        if isinstance(x, np.ndarray):
            if x.dtype != np.float32:
                raise FagTypeError(f"{f}{name} array must be float32, got {x.dtype}")
            if dims.tnd:
                raise FagValueError(f"{f}{name}: per-block scale arrays are not supported for "
                                    f"TND (pass a float), got shape {x.shape}")
            n = dims.N2 if name in ("d_scale_k", "d_scale_v") else dims.N1
            s = dims.S2 if name in ("d_scale_k", "d_scale_v") else dims.S1
            want = (dims.B, n, -(-s // 512), 1)
            if tuple(x.shape) != want:
                raise FagValueError(f"{f}{name} must have shape {want} (one scale per 512 "
                                    f"positions), got {tuple(x.shape)}")
            out[name] = x
        else:
            out[name] = validation.check_real(name, x, f, finite=True)
    return out


def _dequant(x, scale, dims, which):
    """float32 flat copy/view of x; fp8 values times their d_scale (scalar or per 512 block)."""
    if scale is None:
        return dtypes.to_f32_flat(x)
    if not isinstance(scale, np.ndarray):
        return dtypes.to_f32_flat(x, scale)
    x32 = dtypes.to_f32_flat(x).reshape(x.shape)
    n = dims.N1 if which in ("q", "dy") else dims.N2
    s = dims.S1 if which in ("q", "dy") else dims.S2
    per_pos = np.repeat(scale[:, :, :, 0], 512, axis=2)[:, :, :s]          # [B, N, S]
    lay = dims.layout
    if lay == "BNSD":
        x32 = x32 * per_pos[:, :, :, None]
    elif lay == "BSND":
        x32 = x32 * per_pos.transpose(0, 2, 1)[:, :, :, None]
    elif lay == "BSH":
        x32 = (x32.reshape(dims.B, s, n, -1) * per_pos.transpose(0, 2, 1)[:, :, :, None])
    else:  # SBH
        x32 = (x32.reshape(s, dims.B, n, -1) * per_pos.transpose(2, 0, 1)[:, :, :, None])
    return np.ascontiguousarray(x32, dtype=np.float32).reshape(-1)


def _tables(P, block_m, block_n):
    """Fill the seqtab / gp / fp descriptor tables (kernels/desc.py) for one call."""
    d = P.dims
    nb = d.B
    st = np.zeros((nb, desc.NSEQ), np.int64)
    st[:, desc.S1] = d.seq_q
    st[:, desc.S2] = d.seq_k
    qo, qhs, qrs = layout.tensor_desc(d, "q")
    ko, khs, krs = layout.tensor_desc(d, "k")
    vo, vhs, vrs = layout.tensor_desc(d, "v")
    yo, yhs, yrs = layout.tensor_desc(d, "dy")
    st[:, desc.Q_OFF] = qo
    st[:, desc.K_OFF] = ko
    st[:, desc.V_OFF] = vo
    st[:, desc.DY_OFF] = yo
    so, shs, srs, nrows = layout.stats_desc(d, P.softmax_layout)
    st[:, desc.ST_OFF] = so
    st[:, desc.ST_HS] = shs
    mp = P.mask
    st[:, desc.LO] = mp.lo
    st[:, desc.HI] = mp.hi
    st[:, desc.PREFIX] = mp.prefix
    st[:, desc.MASK_OFF] = mp.dense_boff
    pp = P.pse
    st[:, desc.PSE_OFF] = pp.off
    st[:, desc.PSE_HS] = pp.hs
    st[:, desc.PSE_RS] = pp.rs
    st[:, desc.DPSE_OFF] = pp.off
    geom = getattr(P, "drop_geom", None)
    if geom is None:
        blk = d.seq_q * d.seq_k * d.N1
        st[1:, desc.DROP_OFF] = np.cumsum(blk)[:-1]
        st[:, desc.DROP_HS] = d.seq_q * d.seq_k
        st[:, desc.DROP_RS] = d.seq_k
    else:
        # a chunk pair (chunks.py): rows/cols start at (i0, j0) of a global S1g x S2g problem,
        # so the dropout bits are those of the unchunked call (SPEC §12)
        s1g, s2g, i0, j0 = geom
        st[:, desc.DROP_OFF] = (np.arange(nb, dtype=np.int64) * (d.N1 * s1g * s2g)
                                + i0 * s2g + j0)
        st[:, desc.DROP_HS] = s1g * s2g
        st[:, desc.DROP_RS] = s2g
    st[:, desc.QSTART] = pp.qstart
    st[:, desc.KVSTART] = pp.kvstart
    st[:, desc.SLOPE_OFF] = pp.slope_off
    gp = np.zeros(desc.NGP, np.int64)
    gp[desc.N1], gp[desc.N2], gp[desc.G], gp[desc.D], gp[desc.DV] = d.N1, d.N2, d.G, d.D, d.Dv
    gp[desc.Q_HS], gp[desc.Q_RS] = qhs, qrs
    gp[desc.K_HS], gp[desc.K_RS] = khs, krs
    gp[desc.V_HS], gp[desc.V_RS] = vhs, vrs
    gp[desc.DY_HS], gp[desc.DY_RS] = yhs, yrs
    gp[desc.ST_RS] = srs
    gp[desc.MASK_KIND] = (desc.MASK_NONE if mp.full else
                          (desc.MASK_DENSE if mp.has_dense else desc.MASK_BAND))
    gp[desc.MASK_HS], gp[desc.MASK_RS] = mp.dense_hs, mp.dense_rs
    gp[desc.PSE_KIND] = pp.kind
    gp[desc.DROP_KIND] = P.drop_kind
    gp[desc.SEED_LO], gp[desc.SEED_HI] = P.seed_lo, P.seed_hi
    gp[desc.OFFSET_LO], gp[desc.OFFSET_HI] = P.off_lo, P.off_hi
    gp[desc.DROP_THRESHOLD] = P.threshold
    gp[desc.BLOCK_M], gp[desc.BLOCK_N] = block_m, block_n
    gp[desc.NSPLIT] = 1
    fp = np.zeros(desc.NFP, np.float32)
    fp[desc.SCALE] = P.scale
    fp[desc.INV_KEEP] = np.float32(1.0) / P.keep_prob
    return st, gp, fp, nrows


def _inputs(P, query, key, value, dy=None, dy_bits=False):
    """float32 flat views/copies of the inputs (fp8 dequantised): (q, k, v, y).

    When the call will run the bf16 tile products on the inputs' own bits (``P.native``: bf16
    inputs, a bf16/amx kind), q, k and v are None: converting them would be wasted (~5 ms per
    call at (1,8,2048,128)); ``_qkv_f32`` converts them later if a non-finite input or
    statistics row sends the call to the BLAS driver.  y likewise with
    ``dy_bits`` (the caller's attention_in is bf16 too: the statistics pass then reads both
    as bits), else it is converted.
    """
    P.raw = (query, key, value, dy)       # bf16 bits for the native bf16 products
    P.native = _native_bits(P)
    if P.native is not None:
        return None, None, None, (None if dy is None or dy_bits else _y_f32(P))
    return _qkv_f32(P) + (None if dy is None else _y_f32(P),)


def _y_f32(P):
    """float32 flat dy of ``P.raw`` (fp8 dequantised)."""
    ds = P.d_scales
    return _dequant(P.raw[3], ds.get("d_scale_dy") if P.fp8 else None, P.dims, "dy")


def _qkv_f32(P):
    """float32 flat q, k, v of ``P.raw`` (fp8 dequantised)."""
    ds = P.d_scales
    query, key, value = P.raw[:3]
    q = _dequant(query, ds.get("d_scale_q") if P.fp8 else None, P.dims, "q")
    k = _dequant(key, ds.get("d_scale_k") if P.fp8 else None, P.dims, "k")
    v = _dequant(value, ds.get("d_scale_v") if P.fp8 else None, P.dims, "v")
    return q, k, v


def _flag_rows(x, e):
    """uint8 flags of the rows (length e) of flat float32 ``x`` holding a NaN/inf, or None when
    every value is finite.

    The common all-finite case costs one BLAS dot product (``x . x`` is finite iff every
    element is, barring |x| > 1e19 overflow, which only sends us to the exact row scan):
    0.4 ms per 2M elements, ~0.5% of a forward at (1,8,2048,128)."""
    if e <= 0 or x.size == 0:
        return None
    with np.errstate(all="ignore"):
        if np.isfinite(np.dot(x, x)):
            return None
        flags = ~np.isfinite(x.reshape(-1, e)).all(axis=1)
    return flags.astype(np.uint8) if flags.any() else None


def _bad_rows(gp, parts):
    """Fill gp[NONFINITE]/gp[BAD_*] and return the concatenated row flags (kernels/guard.py).

    parts: (gp slot, flat float32 array, row length) per tensor, or (slot, ready uint8 flags,
    None); a 1-byte dummy when all inputs are finite (the kernels then never read
    it)."""
    flags = [(slot, x if x.any() else None, x.size) if e is None else
             (slot, _flag_rows(x, e), x.size // e if e > 0 else 0) for slot, x, e in parts]
    if all(f is None for _, f, _ in flags):
        gp[desc.NONFINITE] = 0
        return np.zeros(1, np.uint8)
    bad = np.zeros(sum(n for _, _, n in flags) + 1, np.uint8)
    base = 0
    for slot, f, n in flags:
        gp[slot] = base
        if f is not None:
            bad[base:base + n] = f
        base += n
    gp[desc.NONFINITE] = 1
    return bad


def _run_forward(P, q, k, v, bf16_out=False, native=True):
    """Run the forward driver; returns (out float32 flat in the dy layout, m, l row arrays).
    ``bf16_out``: the caller wants a bfloat16 attention_out; on the native bf16 kinds the
    kernel then writes its bits (out is bfloat16 flat: the same bits as converting the float32
    output, without that buffer and pass).  ``native=False``: the BLAS driver whatever the
    kind (q, k, v then float32)."""
    memory.keep_freed_memory()
    from .kernels.driver import fwd_driver
    from .planning import forward_blocks, forward_pv_split, plan_forward

    kind, arrays = _native_inputs(P, q, k, v, backward=False) if native else (None, None)
    bm, bn = forward_blocks(kind)
    if kind in ("bf16", "amx"):          # bf16 pairs of keys start on even columns
        bn += bn % 2
    st, gp, fp, nrows = _tables(P, bm, bn)
    nout = int(np.prod(P.dy_shape))
    direct = bf16_out and kind in ("bf16", "amx") and dtypes.is_bf16(P.out_dtype)
    # every query row of every sequence is an item row the kernels write (out 0 for an invalid
    # row): when those rows are the whole output, it needs no zeros (rows past the sequences,
    # as TND's beyond the last offset, stay 0)
    alloc = (memory.empty64 if P.dims.N1 * int(st[:, desc.S1].sum()) * P.dims.Dv == nout
             else memory.zeros64)
    out = alloc(nout, np.uint16 if direct else np.float32)
    m = np.full(nrows, -_FLT_MAX, np.float32)
    l = np.full(nrows, _FLT_MAX, np.float32)
    items, tptr = plan_forward(st, P.dims.N1, bm, bn, P.dims.D + P.dims.Dv)
    gp[desc.PV_ROWS], gp[desc.PV_KEYS] = forward_pv_split(P.dims.Dv)
    visits = np.zeros(tptr.size - 1, np.int64)
    if items.shape[0]:
        # only v rows can leak in the forward (P @ V); masked scores overwrite q/k garbage
        # (v is None on the native bf16 kinds: they check the v rows they read themselves)
        bad = _bad_rows(gp, [(desc.BAD_V, v, P.dims.Dv)] if v is not None else [])
        if gp[desc.NONFINITE]:
            kind = None                  # the careful path lives in the BLAS drivers
            if direct:                   # (which write float32)
                out, direct = alloc(nout), False
        if kind is None:
            with blas_single_thread(), mkl.float32_gemm(gp):
                fwd_driver(q, k, v, out, m, l, P.pse.flat, P.pse.slopes, P.mask.dense,
                           P.drop_flat, st, gp, fp, items, tptr, visits, bad)
        else:
            # (no BLAS in the native kernels: the BLAS thread limit is not touched)
            from .kernels import native
            flags = np.zeros(tptr.size - 1, np.int64)
            native.driver("fwd", kind)(
                *arrays[:3], out, m, l, P.pse.flat, P.pse.slopes, P.mask.dense, P.drop_flat,
                st, gp, fp, items, tptr, visits, flags)
            if flags.any():
                # an inf / NaN in a v row the bf16 kernel read: the whole call again, on the
                # BLAS driver's careful path (float32 copies, fresh outputs)
                return _run_forward(P, *_qkv_f32(P), bf16_out=bf16_out, native=False)
    last_tile_count["forward"] = int(visits.sum())
    return (out.view(dtypes.BFLOAT16) if direct else out), m, l


def _stats_out(P, rows):
    """Row values -> the 8-lane float32 statistics array of SPEC §3 / §8.3."""
    return np.repeat(rows, 8).reshape(layout.stats_shape(P.dims))


def flash_attention_score(query, key, value, head_num, input_layout, *, pse=None,
                          drop_mask=None, padding_mask=None, atten_mask=None, scale_value=1.0,
                          keep_prob=1.0, pre_tokens=INT32_MAX, next_tokens=INT32_MAX,
                          inner_precise=0, prefix=None, actual_seq_qlen=None,
                          actual_seq_kvlen=None, sparse_mode=0, pse_type=1, q_start_idx=None,
                          kv_start_idx=None, softmax_layout="", seed=None, offset=0,
                          d_scale_q=None, d_scale_k=None, d_scale_v=None, out_dtype=None):
    """FlashAttentionScore forward: attention output and the softmax statistics FAG consumes.

    Parameters
    ----------
    query : ndarray
        ``[B,S1,N1*D]`` (BSH), ``[S1,B,N1*D]`` (SBH), ``[B,S1,N1,D]`` (BSND),
        ``[B,N1,S1,D]`` (BNSD) or ``[T1,N1,D]`` (TND); float32, float16, bfloat16 or fp8.
    key, value : ndarray
        The same layout with N2 heads (N1 % N2 == 0); value's head dim Dv <= D.
    head_num : int
        N1.
    input_layout : str
        BSH, SBH, BSND, BNSD or TND (case-insensitive).
    pse, atten_mask, drop_mask, seed, offset, keep_prob, sparse_mode, pre_tokens, next_tokens,
    prefix, actual_seq_qlen, actual_seq_kvlen, pse_type, q_start_idx, kv_start_idx,
    softmax_layout, d_scale_q/k/v, out_dtype
        See SPEC.md §1-§8 and the README.  ``padding_mask`` is accepted and ignored;
        ``inner_precise`` accepts 0, 1, 2 and changes nothing (invalid rows are always
        handled as the NPU's ``inner_precise=2``).  ``out_dtype=float32`` with float16/bfloat16
        inputs keeps attention_out in float32, unrounded (SPEC §12).
    scale_value : float
        Multiplies Q K^T (rounded to float32; default 1.0, not 1/sqrt(D)).

    Returns
    -------
    FlashAttentionOutput
        ``attention_out`` like query with last dim Dv (dtype: the input dtype, or out_dtype for
        fp8); ``softmax_max``, ``softmax_sum``: float32 ``[B,N1,S1,8]`` (TND ``[T1,N1,8]``).
    """
    (query, key, value, pse, drop_mask, atten_mask, prefix, actual_seq_qlen, actual_seq_kvlen,
     q_start_idx, kv_start_idx, d_scale_q, d_scale_k, d_scale_v) = _unmask(
        "flash_attention_score", dict(
            query=query, key=key, value=value, pse=pse, drop_mask=drop_mask,
            atten_mask=atten_mask, prefix=prefix, actual_seq_qlen=actual_seq_qlen,
            actual_seq_kvlen=actual_seq_kvlen, q_start_idx=q_start_idx,
            kv_start_idx=kv_start_idx, d_scale_q=d_scale_q, d_scale_k=d_scale_k,
            d_scale_v=d_scale_v))
    P = _prepare("flash_attention_score", query, key, value, None, head_num, input_layout, pse,
                 drop_mask, atten_mask, scale_value, keep_prob, pre_tokens, next_tokens,
                 inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode, pse_type,
                 q_start_idx, kv_start_idx, softmax_layout, seed, offset,
                 {"d_scale_q": d_scale_q, "d_scale_k": d_scale_k, "d_scale_v": d_scale_v},
                 out_dtype)
    _materialize(P, "flash_attention_score", {"query": query, "key": key, "value": value},
                 False, False, pse, atten_mask, drop_mask)
    q, k, v, _ = _inputs(P, query, key, value)
    out, m, l = _run_forward(P, q, k, v, bf16_out=True)
    return FlashAttentionOutput(dtypes.from_f32(out, P.dy_shape, P.out_dtype),
                                _stats_out(P, m), _stats_out(P, l))


def flash_attention_score_grad(query, key, value, dy, head_num, input_layout, *, pse=None,
                               drop_mask=None, padding_mask=None, atten_mask=None,
                               softmax_max=None, softmax_sum=None, softmax_in=None,
                               attention_in=None, softmax_lse=None, scale_value=1.0, keep_prob=1.0,
                               pre_tokens=INT32_MAX, next_tokens=INT32_MAX, inner_precise=0,
                               prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                               sparse_mode=0, pse_type=1, q_start_idx=None, kv_start_idx=None,
                               softmax_layout="", seed=None, offset=0, d_scale_q=None,
                               d_scale_k=None, d_scale_v=None, d_scale_dy=None, out_dtype=None):
    """FlashAttentionScoreGrad: dq, dk, dv (and dpse) from q, k, v, dy and the forward's results.

    Parameters
    ----------
    query, key, value, head_num, input_layout, and the options
        As in :func:`flash_attention_score`; they must be the forward's.
    dy : ndarray
        Gradient of attention_out: the query's shape with last dim Dv, query's dtype.
    softmax_max, softmax_sum : ndarray, optional
        float32 ``[B,N1,S1,8]`` (or ``[B,N1,S1,1]`` / ``[B,N1,S1]``; TND ``[T1,N1,8|1]`` /
        ``[T1,N1]``); lane 0 is read.  Given together with ``attention_in`` or not at all: when
        omitted the forward runs internally (its output stays float32), which costs about one
        extra forward.
    attention_in : ndarray, optional
        The forward output O (float32, float16 or bfloat16), used as given in
        ``rowsum(dy * O)``.
    softmax_lse : ndarray, optional
        float32 ``[B,N1,S1]`` (TND ``[T1,N1]`` in the ``softmax_layout`` row order): the
        log-sum-exp ``m + log(l)`` of :func:`fag_numba.softmax_lse`, in place of the pair
        softmax_max / softmax_sum (still together with ``attention_in``; giving it and either of
        the pair is an error).  ``-inf`` marks an invalid row: its gradients are zero.
    softmax_in : ignored (reserved on the NPU too).
    out_dtype : optional
        For float16/bfloat16 inputs: None (the input dtype) or float32 (dq/dk/dv kept in
        float32, unrounded: what accumulating chunked/ring callers need); fp8: see SPEC §1.

    Returns
    -------
    FlashAttentionGrads
        dq like query, dk like key, dv like value (input dtype; out_dtype for fp8 inputs);
        dpse like pse (per-element pse gradient summed over broadcast dims), the float32 slope
        gradient for pse_type 2/3, None without pse or for compressed ALiBi.
    """
    fn = "flash_attention_score_grad"
    validation.check_array("dy", dy, fn + ": ")
    (query, key, value, dy, pse, drop_mask, atten_mask, prefix, actual_seq_qlen, actual_seq_kvlen,
     q_start_idx, kv_start_idx, d_scale_q, d_scale_k, d_scale_v, d_scale_dy, softmax_max,
     softmax_sum, attention_in) = _unmask(fn, dict(
         query=query, key=key, value=value, dy=dy, pse=pse, drop_mask=drop_mask,
         atten_mask=atten_mask, prefix=prefix, actual_seq_qlen=actual_seq_qlen,
         actual_seq_kvlen=actual_seq_kvlen, q_start_idx=q_start_idx, kv_start_idx=kv_start_idx,
         d_scale_q=d_scale_q, d_scale_k=d_scale_k, d_scale_v=d_scale_v, d_scale_dy=d_scale_dy,
         softmax_max=softmax_max, softmax_sum=softmax_sum, attention_in=attention_in))
    P = _prepare(fn, query, key, value, dy, head_num, input_layout, pse, drop_mask, atten_mask,
                 scale_value, keep_prob, pre_tokens, next_tokens, inner_precise, prefix,
                 actual_seq_qlen, actual_seq_kvlen, sparse_mode, pse_type, q_start_idx,
                 kv_start_idx, softmax_layout, seed, offset,
                 {"d_scale_q": d_scale_q, "d_scale_k": d_scale_k, "d_scale_v": d_scale_v,
                  "d_scale_dy": d_scale_dy}, out_dtype)
    f = fn + ": "
    if softmax_lse is not None:
        if softmax_max is not None or softmax_sum is not None:
            raise FagValueError(f"{f}softmax_lse replaces softmax_max/softmax_sum: give either "
                                f"softmax_lse or the pair, got softmax_lse and "
                                f"{'softmax_max' if softmax_max is not None else 'softmax_sum'}")
        if attention_in is None:
            raise FagValueError(f"{f}softmax_lse must be given together with attention_in, got "
                                f"attention_in=None")
        validation.check_array("softmax_lse", softmax_lse, f)
        # (one float32 per row: small next to what _materialize refuses or converts)
        lse = validation.check_lse("softmax_lse", validation.plain(softmax_lse), P.dims, f)
        stats_given = True
    else:
        given = [x is not None for x in (softmax_max, softmax_sum, attention_in)]
        if any(given) and not all(given):
            raise FagValueError(
                f"{f}softmax_max, softmax_sum and attention_in must be given together or not "
                f"at all, got softmax_max={'set' if given[0] else None}, "
                f"softmax_sum={'set' if given[1] else None}, "
                f"attention_in={'set' if given[2] else None}")
        stats_given = all(given)
        if stats_given:
            validation.check_stats("softmax_max", softmax_max, P.dims, f, convert=False)
            validation.check_stats("softmax_sum", softmax_sum, P.dims, f, convert=False)
    arrays = {"query": query, "key": key, "value": value, "dy": dy}
    if stats_given:
        validation.check_like("attention_in", attention_in, P.dy_shape, f,
                              allowed=dtypes.ATTN_IN_DTYPES)
        arrays["attention_in"] = attention_in
    _materialize(P, fn, arrays, True, stats_given, pse, atten_mask, drop_mask)
    if softmax_lse is not None:
        # the kernels take (m, l) and form m + log(l); (lse, 1) gives lse exactly.  An invalid
        # row (-inf) becomes m = +inf: exp(z - inf) = 0 for every element, so its gradients
        # are zero whatever the mask (-inf itself would give exp(z + inf) = inf).
        m = np.where(lse == -np.inf, np.float32(np.inf), lse).astype(np.float32)
        l = np.ones_like(m)
    elif stats_given:
        m = validation.check_stats("softmax_max", softmax_max, P.dims, f)
        l = validation.check_stats("softmax_sum", softmax_sum, P.dims, f)
    bits = stats_given and dtypes.is_bf16(dy.dtype) and dtypes.is_bf16(attention_in.dtype)
    q, k, v, y = _inputs(P, query, key, value, dy, dy_bits=bits)
    if stats_given:
        # (bf16 bits when y is: the statistics pass reads both without float32 copies)
        o = _bits16(attention_in) if y is None else dtypes.to_f32_flat(attention_in)
    else:
        o, m, l = _run_forward(P, q, k, v)
    return _grads_out(P, query, key, value, _run_backward(P, q, k, v, y, o, m, l, bf16_out=True))


def _grads_out(P, query, key, value, res):
    """float32 flat (dq, dk, dv, dpse) -> FlashAttentionGrads in the output dtype."""
    dq, dk, dv, dpse = res
    odt = P.out_dtype
    return FlashAttentionGrads(dtypes.from_f32(dq, query.shape, odt),
                               dtypes.from_f32(dk, key.shape, odt),
                               dtypes.from_f32(dv, value.shape, odt), dpse)


def _run_backward(P, q, k, v, y, o, m, l, bf16_out=False):
    """Row statistics pass, then the backward driver; dq/dk scaled once at the end (as the NPU).
    Returns float32 flat (dq, dk, dv) and dpse; ``bf16_out``: the caller wants bfloat16
    gradients, which the native bf16 kinds then write themselves (``native._make_bwd``'s
    out16: the bits of scaling and converting here) when the call has one S2 split and the
    sequences' rows are the whole arrays: (dq, dk, dv) are then bfloat16 flat."""
    memory.keep_freed_memory()
    from .kernels.driver import bwd_driver, rowstats_driver
    from .planning import backward_blocks, backward_group, plan_backward

    d = P.dims
    kind, arrays = _native_inputs(P, q, k, v, y, backward=True)
    bm, bn = backward_blocks(d.D, kind)
    if kind in ("bf16", "amx"):          # bf16 pairs start on even rows and columns
        bm, bn = bm + bm % 2, bn + bn % 2
    st, gp, fp, nrows = _tables(P, bm, bn)
    lse = np.zeros(nrows, np.float32)
    dsum = np.zeros(nrows, np.float32)
    pp = P.pse
    items, tptr, nsplit = plan_backward(st, d.N2, d.G, bm, bn, pp.merge_b, d.D + d.Dv)
    gp[desc.NSPLIT] = nsplit
    gp[desc.BWD_GROUP] = backward_group(bm)
    gp[desc.DPSE_KIND] = pp.dpse_kind
    # every kernel zeroes the gradient rows its items own (driver._zero_owned): when the
    # sequences' rows are the whole arrays (not TND rows past the last offset) and the kernels
    # run, no zero fill (3 x 8 MB memset on this thread: 0.9 ms at (2,16,512,64))
    s1sum, s2sum = int(st[:, desc.S1].sum()), int(st[:, desc.S2].sum())
    owned = (items.shape[0] > 0 and nrows > 0 and d.N1 * s1sum * d.D == P.raw[0].size
             and d.N2 * s2sum * d.D == P.raw[1].size and d.N2 * s2sum * d.Dv == P.raw[2].size)
    alloc = memory.empty64 if owned else memory.zeros64
    dq = alloc(P.raw[0].size)
    dk = alloc(P.raw[1].size)
    dv = alloc(P.raw[2].size)
    dqp = alloc((nsplit - 1, dq.size) if nsplit > 1 else (1, 1))
    dpse = np.zeros(pp.flat.size if pp.dpse_kind == 1 else 1, np.float32)
    dslope = np.zeros((d.B, d.N1, nsplit) if pp.dpse_kind == 3 else (1, 1, 1), np.float32)
    visits = np.zeros(tptr.size - 1, np.int64)
    if items.shape[0] and nrows:
        # (plain loops, no BLAS: no thread limit to set; ~10 us of set/restore calls saved)
        # (y None: dy and attention_in as bf16 bits, _inputs; dy's are the native kind's)
        rowstats_driver(arrays[3] if y is None else y, o, m, l, st, gp, lse, dsum)
        # statistics rows: dsum = rowsum(dy * attention_in) carries non-finite attention_in
        # rows; an lse of NaN / -inf makes a computed P of a -inf score NaN (guard.p_guard)
        with np.errstate(invalid="ignore"):
            srow = ~np.isfinite(dsum) | np.isnan(lse) | (lse == -np.inf)
        srow = srow.astype(np.uint8)
        if q is None and srow.any():
            q, k, v = _qkv_f32(P)        # the BLAS driver's careful path will run
        if y is None and srow.any():
            y = _y_f32(P)
        # (q, k, v still None: the native bf16 kinds, which check the bits they read.)  dy
        # needs no check of its own unless a statistics row is non-finite: every dy row the
        # kernels read is in a dsum = sum(dy * attention_in), which an inf or NaN in dy makes
        # non-finite (inf * 0 and NaN * x are NaN); one scan saved, 0.3-0.5 ms at 2M elements
        bad = _bad_rows(gp, _bad_parts(d, q, k, v, y if srow.any() else None, srow))
        if gp[desc.NONFINITE]:
            kind = None                  # the careful path lives in the BLAS drivers
        if kind is not None:
            from .kernels import native
            flags = np.zeros(tptr.size - 1, np.int64)
            direct = (bf16_out and owned and nsplit == 1 and kind in ("bf16", "amx")
                      and dtypes.is_bf16(P.out_dtype))
            out16 = [memory.empty64(x.size, np.uint16) if direct else np.zeros(1, np.uint16)
                     for x in (dq, dk, dv)]
            native.driver("bwd", kind)(
                *arrays, lse, dsum, dq, dqp, dk, dv, dpse, dslope, pp.flat, pp.slopes,
                P.mask.dense, P.drop_flat, st, gp, fp, items, tptr, visits, flags, *out16)
            if flags.any():
                # a bf16 kind read an inf / NaN in q, k, v or dy: the driver again on the BLAS
                # driver's careful path (float32 copies; same plan and statistics rows; dq,
                # dk, dv and the partials need no reset: every kernel zeroes the rows it owns)
                kind = None
                for x in (dpse, dslope, visits):
                    x.fill(0)
                if q is None:
                    q, k, v = _qkv_f32(P)
                if y is None:
                    y = _y_f32(P)
                bad = _bad_rows(gp, _bad_parts(d, q, k, v, y, srow))
            elif direct:
                # the kernels wrote the scaled bf16 gradients: no host passes
                dq, dk, dv = (x.view(dtypes.BFLOAT16) for x in out16)
        if kind is None:
            with blas_single_thread(), mkl.float32_gemm(gp):
                bwd_driver(q, k, v, y, lse, dsum, dq, dqp, dk, dv, dpse, dslope, pp.flat,
                           pp.slopes, P.mask.dense, P.drop_flat, st, gp, fp, items, tptr, visits,
                           bad)
    last_tile_count["backward"] = int(visits.sum())
    if dq.dtype == np.float32:           # (not when the kernels wrote bf16 gradients)
        for c in range(nsplit - 1):      # fixed order: the result never depends on threads
            dq += dqp[c]
        dq *= P.scale
        dk *= P.scale
    out_pse = None
    if pp.dpse_kind == 1:
        out_pse = dtypes.cast(dpse.reshape(pp.shape), pp.dtype)
    elif pp.dpse_kind == 3:
        sl = dslope.sum(axis=2, dtype=np.float64)          # splits, in order
        if len(pp.shape) == 1:
            sl = sl.sum(axis=0)                             # batch, in order
        out_pse = sl.astype(np.float32).reshape(pp.shape)
    return dq, dk, dv, out_pse


def _bad_parts(d, q, k, v, y, srow):
    """``_bad_rows`` parts of the backward: the row flags of q, k, v, dy (those given) and the
    statistics rows."""
    parts = [(desc.BAD_Q, q, d.D), (desc.BAD_K, k, d.D), (desc.BAD_V, v, d.Dv),
             (desc.BAD_DY, y, d.Dv), (desc.BAD_DSUM, srow, None)]
    return [p for p in parts if p[1] is not None]


def _native_bits(P):
    """(kind, [q, k, v, dy] uint16 flat bf16 bits) when the call runs the bf16 tile products
    (kernels/native.py kinds "bf16" / "amx") on the inputs' own bits, else None.  The kernels
    check the bits they read as they pack them; a NaN/inf sends the call to the BLAS driver,
    whose handling of non-finite values is the reference one (a masked NaN must contribute
    exactly 0, SPEC §3): ``_run_forward`` / ``_run_backward``."""
    from . import isa

    if not dtypes.is_bf16(P.qdtype):
        return None
    kind = isa.native_kind(True, P.dims.D, P.dims.Dv)
    if kind not in ("bf16", "amx"):
        return None
    return kind, [None if x is None else _bits16(x) for x in P.raw]


def _bits16(x):
    """The flat uint16 bits of a bf16 array (a view when it is C-contiguous)."""
    return np.ascontiguousarray(x).reshape(-1).view(np.uint16)


def _native_inputs(P, q, k, v, y=None, backward=False):
    """(kind, (q, k, v, dy)) for the native tile products (kernels/native.py), or (None, None).

    kind "bf16" / "amx": the inputs' own bf16 bits (``P.native``, set by ``_inputs``; dy's only
    for the ``backward``); "f32": the float32 arrays, only when every value is finite (else
    the BLAS driver, as above).
    """
    native_bits = getattr(P, "native", None)
    if native_bits is not None:
        kind, raw = native_bits
        return kind, (raw if backward else raw[:3] + [None])
    from . import isa

    if isa.native_kind(dtypes.is_bf16(P.qdtype), P.dims.D, P.dims.Dv) != "f32":
        return None, None
    from .kernels import native

    if all(x is None or native.all_finite_f32(x) for x in (q, k, v, y)):
        return "f32", (q, k, v, y)
    return None, None


def warmup(dtypes=("float32", "float16", "bfloat16")):
    """Compile every kernel a call of these input dtypes can need, now, on tiny problems.

    The kernels compile lazily on first use, once per machine: they are cached on disk
    (``_jit.py``; ``FAG_NUMBA_CACHE=0`` compiles once per process instead).  Call this at
    start-up to pay that cost up front.  Each dtype compiles two variants, because a call
    without pse and dropout runs kernels with that code pruned (``kernels.driver.plain``: the
    common call compiles ~3 s less): both are compiled here.  float32 kernels serve
    float32, fp16 and fp8 inputs ("float16" adds only its conversions; an fp8 call still
    compiles its decoder, ~0.2 s); "bfloat16" adds the native bf16 kernels where the CPU has
    AVX512_BF16 or AMX (``isa.native_kind``), else only its conversions.
    """
    from . import dtypes as dtypes_mod      # (the argument shadows the module)

    known = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
             "bfloat16": dtypes_mod.BFLOAT16}
    if isinstance(dtypes, str):
        dtypes = (dtypes,)
    chosen = []
    for name in dtypes:
        try:
            dt = np.dtype(name)
        except TypeError:
            dt = None
        if dt not in known.values():
            raise FagValueError(f"warmup: dtypes must name float32, float16 or bfloat16 "
                                f"(numpy dtypes or their names), got {name!r}")
        chosen.append(dt)
    rng = np.random.default_rng(0)
    mask = np.triu(np.ones((2048, 2048), bool), 1)
    for dt in chosen:
        q, k, v, dy = (rng.standard_normal((1, 1, 4, 8)).astype(np.float32).astype(dt)
                       for _ in range(4))
        pse = rng.standard_normal((1, 1, 4, 4)).astype(np.float32).astype(dt)
        # the full kernels (mask, dropout and a pse of the input dtype: its conversion too),
        # then the plain ones, then (bf16, fp16) the plain ones with float32 outputs: the bf16
        # kinds write bf16 outputs in other kernel variants (``native._make_fwd/_make_bwd``'s
        # out16), and a backward with S2 splits or out_dtype=float32 runs the float32 ones
        odts = (None,) if dt == np.float32 else (None, np.float32)
        for kw in (dict(atten_mask=mask, sparse_mode=3, keep_prob=0.5, seed=0, pse=pse,
                        pse_type=1), *({"out_dtype": o} for o in odts)):
            fwd = flash_attention_score(q, k, v, 1, "BNSD", **kw)
            flash_attention_score_grad(q, k, v, dy, 1, "BNSD", softmax_max=fwd.softmax_max,
                                       softmax_sum=fwd.softmax_sum,
                                       attention_in=fwd.attention_out, **kw)
