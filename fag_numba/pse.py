"""Position bias (pse): shape normalisation to zero-stride descriptors, and dpse shapes (SPEC §4).

External pse (pse_type 0/1) is read in place through per-sequence (offset, head stride, row
stride) numbers; a row stride of 0 broadcasts ``[.,N1,1,S2]`` over the query rows and a batch
offset of 0 broadcasts ``[1,N1,.,S2]`` over the batch.  Generated ALiBi (pse_type 2/3) keeps only
the float32 slopes; the kernels build the bias tile by tile.

dpse (beyond the NPU): ``dS`` (type 0) or ``scale * dS`` (type 1) summed over the broadcast
dimensions, in pse's own shape and dtype; for generated ALiBi the slope gradient
``sum dS * (-|delta|)`` (or ``-sqrt``); ``None`` for compressed ALiBi and without pse.
Reductions run in a fixed order: rows inside one work item, the batch by making one work item
cover every sequence (``merge_b``), slope partials per (b, h, split) summed on the host.
"""
import dataclasses

import numpy as np

from . import dtypes
from .errors import FagTypeError, FagValueError
from .kernels import desc
from .validation import is_int


#: bound on |q_start_idx|, |kv_start_idx|: position differences then fit int64 for S <= 2**60
START_LIMIT = 1 << 61


@dataclasses.dataclass
class PsePlan:
    """Descriptor of the pse for the kernels (all arrays int64 [B] unless noted)."""
    kind: int                      # desc.PSE_*
    flat: np.ndarray               # float32 1-D external pse, or a 1-element dummy; None until
                                   # ``finish`` converts it (after every argument's checks)
    off: np.ndarray
    hs: np.ndarray
    rs: np.ndarray
    slopes: np.ndarray             # float32 1-D slopes, or a 1-element dummy
    slope_off: np.ndarray
    qstart: np.ndarray
    kvstart: np.ndarray
    dpse_kind: int                 # 0 none, 1 per element, 3 slopes
    merge_b: bool                  # dpse sums over the batch: one work item per (n2, split)
    shape: tuple = ()              # pse's shape and dtype (dpse is returned like this)
    dtype: object = None


def _start_idx(name, x, fn):
    """q_start_idx / kv_start_idx: None, an int, or a length-1 sequence (element 0 used)."""
    if x is None:
        return 0
    if is_int(x):
        return _start_range(name, int(x), fn)
    if isinstance(x, np.ndarray) and x.ndim == 1 and (np.issubdtype(x.dtype, np.integer)
                                                      or x.size == 0):
        v = _start_value(name, x, fn)
    elif isinstance(x, (list, tuple)) and (len(x) == 0 or is_int(x[0])):
        v = _start_value(name, x, fn)
    else:
        raise FagTypeError(f"{fn}{name} must be an int or a non-empty sequence of ints, got "
                           f"{x!r}")
    return v


def _start_value(name, x, fn):
    """Element 0 of a start-index sequence (an empty one is a value error, SPEC §9)."""
    if len(x) == 0:
        raise FagValueError(f"{fn}{name} must be an int or a non-empty sequence of ints, got an "
                            f"empty {type(x).__name__}")
    return _start_range(name, int(x[0]), fn)


def _start_range(name, v, fn):
    """|start index| <= START_LIMIT, so ``(j + kv_start) - (i + q_start)`` fits int64."""
    if not -START_LIMIT <= v <= START_LIMIT:
        raise FagValueError(f"{fn}{name} must be in [-2**61, 2**61] (global positions), got {v}")
    return v


def none_plan(nb):
    z = np.zeros(nb, np.int64)
    return PsePlan(kind=desc.PSE_NONE, flat=np.zeros(1, np.float32), off=z, hs=z, rs=z,
                   slopes=np.zeros(1, np.float32), slope_off=z, qstart=z, kvstart=z,
                   dpse_kind=0, merge_b=False)


def plan_pse(pse, pse_type, q_start_idx, kv_start_idx, dims, qdtype, causal, sparse_mode,
             has_mask, fn="", pre_tokens=None, next_tokens=None):
    """Validate pse / pse_type / start indices and build the PsePlan (SPEC §4).

    causal: the mask makes every computed element satisfy j <= i (needed by compressed ALiBi,
    which SPEC §4.1 allows only with sparse_mode 2/3, or 0 with pre_tokens >= S1 and
    next_tokens == 0; ``pre_tokens``/``next_tokens`` None skip that token test).
    """
    if not is_int(pse_type):
        raise FagTypeError(f"{fn}pse_type must be an int, got {type(pse_type).__name__} "
                           f"{pse_type!r}")
    pse_type = int(pse_type)
    if not 0 <= pse_type <= 3:
        raise FagValueError(f"{fn}pse_type must be in 0..3, got {pse_type}")
    qs = _start_idx("q_start_idx", q_start_idx, fn)
    ks = _start_idx("kv_start_idx", kv_start_idx, fn)
    nb = dims.B
    if pse is None:
        if pse_type != 1:
            raise FagValueError(f"{fn}pse_type must be 1 when pse is None, got {pse_type}")
        return none_plan(nb)
    if not isinstance(pse, np.ndarray):
        raise FagTypeError(f"{fn}pse must be a numpy array or None, got {type(pse).__name__}")
    z = np.zeros(nb, np.int64)
    n1 = dims.N1
    if has_mask and sparse_mode in (7, 8) and pse_type in (0, 1):
        raise FagValueError(f"{fn}pse: an external pse (pse_type {pse_type}) is not allowed with "
                            f"sparse_mode {sparse_mode} (SPEC §4.3)")
    if pse_type in (2, 3):
        if pse.dtype != np.float32:
            raise FagTypeError(f"{fn}pse: ALiBi slopes (pse_type {pse_type}) must be float32, "
                               f"got {pse.dtype}")
        if has_mask and sparse_mode == 7:
            raise FagValueError(f"{fn}pse: generated ALiBi (pse_type {pse_type}) is not allowed "
                                f"with sparse_mode 7 (SPEC §4.3)")
        if pse.shape == (n1,):
            slope_off = z.copy()
        elif pse.shape == (nb, n1):
            slope_off = np.arange(nb, dtype=np.int64) * n1
        else:
            raise FagValueError(f"{fn}pse: ALiBi slopes (pse_type {pse_type}) must have shape "
                                f"({n1},) or ({nb}, {n1}), got {pse.shape}")
        qstart = np.full(nb, qs, np.int64)
        kvstart = np.full(nb, ks, np.int64)
        if dims.tnd and has_mask and sparse_mode == 8:
            # mode 8: the start indices belong to the band sequence (the first with S1_b > 0)
            band = int(np.argmax(dims.seq_q > 0)) if np.any(dims.seq_q > 0) else 0
            keep = np.arange(nb) == band
            qstart = np.where(keep, qstart, 0)
            kvstart = np.where(keep, kvstart, 0)
        kind = desc.PSE_ALIBI_ABS if pse_type == 2 else desc.PSE_ALIBI_SQRT
        return PsePlan(kind=kind, flat=np.zeros(1, np.float32), off=z, hs=z, rs=z,
                       slopes=dtypes.to_f32_flat(pse),
                       slope_off=slope_off, qstart=qstart, kvstart=kvstart, dpse_kind=3,
                       merge_b=False, shape=pse.shape, dtype=pse.dtype)
    # external pse: dtype = query dtype or float32 (fp8 queries: float32, float16, bfloat16)
    allowed = ((dtypes.FLOAT32, dtypes.FLOAT16, dtypes.BFLOAT16) if qdtype in dtypes.FP8_DTYPES
               else (np.dtype(qdtype), dtypes.FLOAT32))
    if pse.dtype not in allowed:
        raise FagTypeError(f"{fn}pse dtype must be one of {', '.join(d.name for d in allowed)} "
                           f"for {np.dtype(qdtype).name} queries, got {pse.dtype}")
    kind = desc.PSE_ADD_THEN_SCALE if pse_type == 1 else desc.PSE_SCALE_THEN_ADD
    flat = None      # converted by finish(): SPEC §9, shapes are checked before any conversion
    s1, s2 = dims.S1, dims.S2
    if dims.tnd:
        if pse.ndim != 1:
            raise FagValueError(f"{fn}pse: in TND only the 1-D forms (length T2*N1 = "
                                f"{dims.T2 * n1} or N1*sum(S1_b*S2_b) = "
                                f"{n1 * int(np.sum(dims.seq_q * dims.seq_k))}) are supported "
                                f"(compressed ALiBi: use pse_type 2/3), got shape {pse.shape}")
        n = pse.shape[0]
        if n == dims.T2 * n1:
            # per sequence [N1, S2_b] at cumkv[b]*N1, broadcast over i (wins when lengths tie)
            return PsePlan(kind=kind, flat=flat, off=dims.cu_k[:-1] * n1, hs=dims.seq_k.copy(),
                           rs=z, slopes=np.zeros(1, np.float32), slope_off=z, qstart=z,
                           kvstart=z, dpse_kind=1, merge_b=False, shape=pse.shape,
                           dtype=pse.dtype)
        blk = dims.seq_q * dims.seq_k
        if n == n1 * int(blk.sum()):
            off = np.zeros(nb, np.int64)
            off[1:] = np.cumsum(blk)[:-1] * n1
            return PsePlan(kind=kind, flat=flat, off=off, hs=blk.copy(), rs=dims.seq_k.copy(),
                           slopes=np.zeros(1, np.float32), slope_off=z, qstart=z, kvstart=z,
                           dpse_kind=1, merge_b=False, shape=pse.shape, dtype=pse.dtype)
        raise FagValueError(f"{fn}pse: 1-D TND pse must have length T2*N1 = {dims.T2 * n1} or "
                            f"N1*sum(S1_b*S2_b) = {n1 * int(blk.sum())}, got {n}")
    if pse.ndim != 4:
        raise FagValueError(f"{fn}pse must be 4-D [B|1, N1, S1|1, S2] (or compressed ALiBi "
                            f"[B|1, N1, 1024, S2]), got shape {pse.shape}")
    bp, np_, sp, s2p = pse.shape
    if bp not in (1, nb) or np_ != n1 or s2p != s2 or sp not in (1, s1, 1024):
        raise FagValueError(f"{fn}pse shape must be one of [{nb}|1, {n1}, {s1}|1, {s2}] or the "
                            f"compressed ALiBi [{nb}|1, {n1}, 1024, {s2}], got {pse.shape}")
    bstride = np_ * sp * s2p if (bp == nb and nb > 1) else 0
    off = np.arange(nb, dtype=np.int64) * bstride
    hs = np.full(nb, sp * s2p, np.int64)
    if sp == 1024 and s1 != 1024:           # at S1 == 1024 the shape is the full form
        if not (s1 == s2 and s1 > 1024):
            raise FagValueError(f"{fn}pse: compressed ALiBi [.,N1,1024,S2] needs S1 == S2 > 1024,"
                                f" got S1={s1}, S2={s2}")
        mode_ok = sparse_mode in (2, 3) or (
            sparse_mode == 0 and (pre_tokens is None or pre_tokens >= s1)
            and (next_tokens is None or next_tokens == 0))
        if not (causal and mode_ok):
            got = f"sparse_mode {sparse_mode}" if has_mask else "no atten_mask"
            raise FagValueError(f"{fn}pse: compressed ALiBi [.,N1,1024,S2] needs causal masking "
                                f"(sparse_mode 2/3 with the compressed mask, or 0 with "
                                f"pre_tokens >= S1 and next_tokens == 0), got {got}, "
                                f"pre_tokens={pre_tokens}, next_tokens={next_tokens}")
        kind = desc.PSE_COMPRESSED if pse_type == 1 else desc.PSE_COMPRESSED_0
        return PsePlan(kind=kind, flat=flat, off=off, hs=hs, rs=np.full(nb, s2, np.int64),
                       slopes=np.zeros(1, np.float32), slope_off=z, qstart=z, kvstart=z,
                       dpse_kind=0, merge_b=False, shape=pse.shape, dtype=pse.dtype)
    # row stride 0 broadcasts [.,N1,1,S2] over the query rows
    rs = np.full(nb, s2 if (sp == s1 and sp != 1) else 0, np.int64)
    return PsePlan(kind=kind, flat=flat, off=off, hs=hs, rs=rs, slopes=np.zeros(1, np.float32),
                   slope_off=z, qstart=z, kvstart=z, dpse_kind=1,
                   merge_b=(bp == 1 and nb > 1), shape=pse.shape, dtype=pse.dtype)


def finish(plan, pse):
    """Convert the external pse to its flat float32 form (the kernels read it in place);
    called once every argument of the call has been checked."""
    if plan.flat is None:
        plan.flat = dtypes.to_f32_flat(pse)
    return plan
