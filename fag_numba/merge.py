"""``merge_attention_outputs``: combine forward partials over disjoint key sets (SPEC §10).

For chunked / ring attention: each part is the forward of the same queries against one key
chunk.  Per row, with the parts' statistics (m_k, l_k) and outputs o_k::

    m = max_k m_k;   w_k = l_k * exp(m_k - m);   l = sum_k w_k;   o = sum_k w_k * o_k / l

A part whose row is invalid (m_k = -FLT_MAX) contributes nothing; a row invalid in every part
stays invalid (o = 0, m = -FLT_MAX, l = +FLT_MAX; never inf); NaN
statistics or outputs propagate.  float32 math; the output
has the first part's attention_out dtype.
"""
import numpy as np

from . import dtypes, validation
from .api import FlashAttentionOutput
from .errors import FagTypeError, FagValueError
from .layout import parse_varlen

_FLT_MAX = np.float32(3.4028234663852886e38)


def _row_index(lay, out_shape, head_num, stats_rows, cu=None, softmax_layout=""):
    """Index array mapping every out row (all dims but the last) to its statistics row."""
    if lay == "BNSD":
        b, n, s = out_shape[:3]
        return np.arange(b * n * s).reshape(b, n, s)
    if lay in ("BSND", "BSH"):
        b, s = out_shape[:2]
        return np.arange(b * head_num * s).reshape(b, head_num, s).transpose(0, 2, 1)
    if lay == "SBH":
        s, b = out_shape[:2]
        return np.arange(b * head_num * s).reshape(b, head_num, s).transpose(2, 0, 1)
    # TND: out [T1, N1, Dv]
    t1 = out_shape[0]
    if softmax_layout == "TND":
        return np.arange(t1 * head_num).reshape(t1, head_num)
    idx = np.arange(t1 * head_num).reshape(t1, head_num)   # rows past the last offset: as is
    for b in range(len(cu) - 1):
        s1 = cu[b + 1] - cu[b]
        if s1:
            h = np.arange(head_num)[None, :]
            i = np.arange(s1)[:, None]
            idx[cu[b]:cu[b + 1]] = cu[b] * head_num + h * s1 + i
    return idx


def merge_attention_outputs(parts, head_num, input_layout, *, actual_seq_qlen=None,
                            softmax_layout=""):
    """Merge ``FlashAttentionOutput`` parts of the same queries over disjoint key sets.

    Parameters
    ----------
    parts : sequence of FlashAttentionOutput (or 3-tuples)
        Same layout and shapes; attention_out ``[.., Dv]`` like query, statistics float32
        ``[B,N1,S1,8|1]`` / ``[B,N1,S1]`` (TND ``[T1,N1,8|1]`` / ``[T1,N1]``).
    head_num : int
        N1.
    input_layout : str
        The parts' layout (BSH, SBH, BSND, BNSD, TND).
    actual_seq_qlen : sequence of int, required for TND
        Cumulative query end offsets (SPEC §8.1), to read the ``softmax_layout=""`` rows.
    softmax_layout : str
        "" or "TND" (TND only), as in the forward.

    Returns
    -------
    FlashAttentionOutput
        Merged attention_out (first part's dtype) and 8-lane float32 statistics.
    """
    fn = "merge_attention_outputs: "
    lay = validation.check_layout(input_layout, fn)
    head_num = validation.check_int("head_num", head_num, 1, None, fn)
    if not isinstance(parts, (list, tuple)) or len(parts) == 0:
        raise FagValueError(f"{fn}parts must be a non-empty sequence of FlashAttentionOutput, "
                            f"got {type(parts).__name__}")
    if not isinstance(softmax_layout, str) or softmax_layout.upper() not in ("", "TND"):
        raise FagValueError(f"{fn}softmax_layout must be \"\" or \"TND\", got {softmax_layout!r}")
    slay = softmax_layout.upper()
    if lay != "TND" and slay:
        raise FagValueError(f"{fn}softmax_layout must be \"\" for input_layout {lay}")
    if lay == "TND" and actual_seq_qlen is None:
        raise FagValueError(f"{fn}actual_seq_qlen is required for input_layout TND")
    outs, ms, ls = [], [], []
    for k, p in enumerate(parts):
        if not isinstance(p, tuple) or len(p) != 3:
            raise FagTypeError(f"{fn}parts[{k}] must be a FlashAttentionOutput, got "
                               f"{type(p).__name__}")
        o, m, l = p
        for name, x in (("attention_out", o), ("softmax_max", m), ("softmax_sum", l)):
            validation.check_array(f"parts[{k}].{name}", x, fn)
        o, m, l = validation.plain(o), validation.plain(m), validation.plain(l)
        if o.dtype not in dtypes.FLOAT_DTYPES:
            raise FagTypeError(f"{fn}parts[{k}].attention_out dtype must be one of "
                               f"{', '.join(dtypes.FLOAT_DTYPES.names)}, got {o.dtype}")
        if outs and o.dtype != outs[0].dtype:
            raise FagTypeError(f"{fn}parts[{k}].attention_out dtype {o.dtype} differs from "
                               f"parts[0]'s {outs[0].dtype}")
        if m.dtype != np.float32 or l.dtype != np.float32:
            raise FagTypeError(f"{fn}parts[{k}] statistics must be float32, got {m.dtype}, "
                               f"{l.dtype}")
        if outs and (o.shape != outs[0].shape or m.shape != ms[0].shape or l.shape != ls[0].shape):
            raise FagValueError(f"{fn}parts[{k}] shapes {o.shape}, {m.shape}, {l.shape} differ "
                                f"from parts[0]'s {outs[0].shape}, {ms[0].shape}, {ls[0].shape}")
        outs.append(o)
        ms.append(m)
        ls.append(l)
    o0 = outs[0]
    if o0.ndim != len(lay):
        raise FagValueError(f"{fn}parts[0].attention_out must have rank {len(lay)} for layout "
                            f"{lay}, got shape {o0.shape}")
    cu = None
    if lay == "TND":
        _, _, cu, _ = parse_varlen(actual_seq_qlen, actual_seq_qlen, o0.shape[0], o0.shape[0], fn)
    elif actual_seq_qlen is not None:
        raise FagValueError(f"{fn}actual_seq_qlen is only allowed with input_layout TND")
    if lay in ("BSH", "SBH"):
        if o0.shape[2] % head_num:
            raise FagValueError(f"{fn}head_num {head_num} must divide the hidden size "
                                f"{o0.shape[2]}")
        dv = o0.shape[2] // head_num
        view = o0.shape[:2] + (head_num, dv)
    else:
        view = o0.shape
    nrows = int(np.prod(view[:-1]))
    stats_shape = ms[0].shape
    lead = stats_shape[:-1] if (len(stats_shape) and stats_shape[-1] in (1, 8)
                                and len(stats_shape) == (4 if lay != "TND" else 3)) else stats_shape
    if int(np.prod(lead)) != nrows:
        raise FagValueError(f"{fn}statistics shape {stats_shape} does not match attention_out "
                            f"shape {o0.shape}")
    idx = _row_index(lay, o0.shape, head_num, nrows, cu, slay)
    idx = idx.reshape(view[:-1])

    def rows(st):
        flat = st.reshape(nrows, -1)[:, 0] if st.ndim == len(lead) + 1 else st.reshape(-1)
        return flat.astype(np.float32)[idx]

    m_all = np.stack([rows(m) for m in ms])                 # [K, ...rows]
    l_all = np.stack([rows(l) for l in ls])
    # only -FLT_MAX marks an invalid row (SPEC §10); a NaN statistic is a valid row whose NaN
    # propagates into the merged row (as the unchunked forward gives)
    valid = m_all != -_FLT_MAX
    mmax = np.where(valid, m_all, -np.inf).max(axis=0)
    any_valid = valid.any(axis=0)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        w = np.where(valid, l_all * np.exp(m_all - np.where(any_valid, mmax, 0)), 0).astype(np.float32)
        lsum = w.sum(axis=0, dtype=np.float32)
        acc = np.zeros(view, np.float32)
        for k in range(len(outs)):
            ok = dtypes.cast(np.asarray(outs[k]), np.float32).reshape(view)
            acc += np.where(valid[k][..., None], w[k][..., None] * ok, 0)
        out = np.where(any_valid[..., None], acc / np.where(any_valid, lsum, 1)[..., None], 0)
    m_new = np.where(any_valid, mmax, -_FLT_MAX).astype(np.float32)
    l_new = np.where(any_valid, lsum, _FLT_MAX).astype(np.float32)
    # back to the statistics memory order
    m_rows = np.empty(nrows, np.float32)
    l_rows = np.empty(nrows, np.float32)
    m_rows[idx.reshape(-1)] = m_new.reshape(-1)
    l_rows[idx.reshape(-1)] = l_new.reshape(-1)
    st_shape = tuple(lead) + (8,)
    return FlashAttentionOutput(dtypes.cast(out.reshape(o0.shape), o0.dtype),
                                np.repeat(m_rows, 8).reshape(st_shape),
                                np.repeat(l_rows, 8).reshape(st_shape))
