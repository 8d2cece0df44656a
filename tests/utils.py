"""Small test helpers: comparison with diagnostics, readable ids, random case generators.

Independent of ``fag_numba`` (like ``reference.py``).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

FLT_MAX = float(np.finfo(np.float32).max)

_SHORT_DTYPE = {
    "float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16",
    "float8_e4m3fn": "e4m3", "float8_e5m2": "e5m2",
}
_SHAPE_KEYS = ("b", "n1", "n2", "s1", "s2", "t1", "t2", "d", "dv")


def to_float64(x):
    """Any array (numpy floats, ml_dtypes bfloat16 / float8, bool, ints) -> float64 ndarray."""
    return np.asarray(x).astype(np.float64)


def dtype_name(dtype):
    """Short dtype name used in ids and tolerance tables: fp32, fp16, bf16, e4m3, e5m2, fp64."""
    name = np.dtype(dtype).name
    return _SHORT_DTYPE.get(name, name)


def make_id(**axes):
    """Readable pytest id, e.g. ``make_id(layout="BNSD", dtype=bf16, sm=3, gqa=4, pse=True,
    drop=True, b=2, s1=113, s2=203, d=59)`` -> ``BNSD-bf16-sm3-gqa4-pse-drop-b2s113x203d59``.

    Rules, in keyword order: ``layout`` as is; ``dtype`` by its short name; ``sm``/``sparse_mode``
    -> ``sm<v>``; a bool -> the key name when True, nothing when False; None -> nothing; shape keys
    (b, n1, n2, s1, s2, t1, t2, d, dv) are gathered into one final token where ``s1``/``s2`` read
    ``s<s1>x<s2>`` (``s<s1>`` when equal); anything else -> ``<key><value>``.
    """
    parts, shape = [], {}
    for key, val in axes.items():
        k = key.lower()
        if k in _SHAPE_KEYS:
            shape[k] = val
        elif val is None or val is False:
            continue
        elif val is True:
            parts.append(key)
        elif k == "layout":
            parts.append(str(val).upper())
        elif k == "dtype":
            parts.append(dtype_name(val))
        elif k in ("sm", "sparse_mode"):
            parts.append(f"sm{val}")
        else:
            parts.append(f"{key}{val}")
    if shape:
        tok = ""
        for k in ("b", "n1", "n2"):
            if k in shape:
                tok += f"{k}{shape[k]}"
        if "s1" in shape or "s2" in shape:
            s1, s2 = shape.get("s1"), shape.get("s2")
            tok += f"s{s1}" if s2 is None or s1 == s2 else f"s{s1}x{s2}"
        for k in ("t1", "t2", "d", "dv"):
            if k in shape:
                tok += f"{k}{shape[k]}"
        parts.append(tok)
    return "-".join(parts)


def layout_shape(layout, B, N, S, D):
    """Shape of a tensor with N heads, S positions, head dim D in ``layout`` (TND: S is T)."""
    layout = layout.upper()
    return {
        "BSH": (B, S, N * D), "SBH": (S, B, N * D), "BSND": (B, S, N, D),
        "BNSD": (B, N, S, D), "TND": (S, N, D),
    }[layout]


def tnd_total(actual_seq):
    """T needed by a cumulative list: its largest offset (trailing zeros are fine)."""
    return int(max(actual_seq)) if len(actual_seq) else 0


def make_qkv(layout, B, N1, N2, S1, S2, D, Dv, dtype, rng, actual_seq_qlen=None,
             actual_seq_kvlen=None):
    """query, key, value, dy in ``layout``, values ~ N(0, 1) cast to ``dtype``.

    TND: query/dy are [T1, N1, D|Dv] and key/value [T2, N2, D|Dv] with T1/T2 the last offsets of
    ``actual_seq_qlen``/``actual_seq_kvlen``; pass larger S1/S2 to get extra rows
    (T = max(S, offset) when the lists are given). dy has the query shape with last dim Dv.
    """
    if layout.upper() == "TND":
        if actual_seq_qlen is not None:
            S1 = max(S1 or 0, tnd_total(actual_seq_qlen))
            S2 = max(S2 or 0, tnd_total(actual_seq_kvlen))

    def gen(n, s, d):
        return rng.standard_normal(layout_shape(layout, B, n, s, d)).astype(dtype)

    return gen(N1, S1, D), gen(N2, S2, D), gen(N2, S2, Dv), gen(N1, S1, Dv)


def forward_backward(q, k, v, dy, n1, layout, **kw):
    """fag_numba's forward, then its backward from the forward's own statistics: (fwd, grads)."""
    import fag_numba
    f = fag_numba.flash_attention_score(q, k, v, n1, layout, **kw)
    g = fag_numba.flash_attention_score_grad(q, k, v, dy, n1, layout, softmax_max=f.softmax_max,
                                             softmax_sum=f.softmax_sum,
                                             attention_in=f.attention_out, **kw)
    return f, g


def unpack_drop_mask(drop_mask, numels):
    """Packed drop_mask bytes (SPEC §5, LSB first) -> flat bool keep array of ``numels``."""
    bits = np.unpackbits(np.asarray(drop_mask, dtype=np.uint8).reshape(-1), bitorder="little")
    assert bits.size >= numels, (bits.size, numels)
    return bits[:numels].astype(bool)


def pack_keep(keep):
    """Flat bool keep array -> packed uint8 drop_mask (``np.packbits(..., bitorder="little")``)."""
    return np.packbits(np.asarray(keep, dtype=bool).reshape(-1), bitorder="little")


def assert_close(actual, expected, tol, name="output"):
    """Assert ``|actual - expected| <= atol * max(1, max|expected|) + rtol * |expected|``.

    ``tol`` is a ``tolerances.Tolerances`` (or any ``(atol, rtol)`` pair). Entries of ``expected``
    equal to +-FLT_MAX are the invalid-row sentinels of softmax statistics: they must match exactly
    and are left out of the magnitude. NaN never matches anything but NaN. The failure message gives
    the worst index, both values, and the count and percentage of failing elements.
    """
    atol, rtol = tol
    a = to_float64(actual)
    e = to_float64(expected)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != expected {e.shape}"
    if e.size == 0:
        return
    sentinel = np.abs(e) == FLT_MAX
    finite_e = e[~sentinel & np.isfinite(e)]
    mag = max(1.0, float(np.abs(finite_e).max())) if finite_e.size else 1.0
    allowed = np.where(sentinel, 0.0, atol * mag + rtol * np.abs(e))
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(a - e)
    same = (a == e) | (np.isnan(a) & np.isnan(e))
    ok = same | (err <= allowed)
    if ok.all():
        return
    bad = ~ok
    excess = np.where(bad, np.nan_to_num(err - allowed, nan=np.inf, posinf=np.inf), -np.inf)
    worst = np.unravel_index(int(np.argmax(excess)), e.shape)
    n_bad = int(bad.sum())
    raise AssertionError(
        f"{name}: {n_bad}/{e.size} elements ({100.0 * n_bad / e.size:.3g}%) out of tolerance "
        f"(atol={atol:g} x magnitude {mag:.4g}, rtol={rtol:g}); "
        f"worst at {tuple(int(x) for x in worst)}: "
        f"actual={a[worst]!r}, expected={e[worst]!r}, |diff|={err[worst]:.4g}, "
        f"allowed={allowed[worst]:.4g}; "
        f"max |diff| overall {np.nanmax(np.where(sentinel, 0, err)):.4g}")


def max_abs_err(actual, expected):
    """max |actual - expected| in float64 (0 for empty arrays)."""
    a, e = to_float64(actual), to_float64(expected)
    return float(np.abs(a - e).max()) if a.size else 0.0


def bf16():
    """The ml_dtypes bfloat16 dtype (a shortcut for ids and generators)."""
    return np.dtype(ml_dtypes.bfloat16)


# ------------------------------------------------------------------------------------------------
# Layout conversions, head repetition and a naive same-dtype implementation (tests/test_core.py)
# ------------------------------------------------------------------------------------------------

def to_bnsd(x, layout, n):
    """Non-TND tensor in ``layout`` with ``n`` heads -> ``[B, n, S, d]`` (a view when possible)."""
    layout = layout.upper()
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(0, 2, 1, 3)
    if layout == "BSH":
        b, s, h = x.shape
        return x.reshape(b, s, n, h // n if n else 0).transpose(0, 2, 1, 3)
    if layout == "SBH":
        s, b, h = x.shape
        return x.reshape(s, b, n, h // n if n else 0).transpose(1, 2, 0, 3)
    raise ValueError(layout)


def from_bnsd(x, layout):
    """``[B, n, S, d]`` -> the same tensor in ``layout`` (C-contiguous copy)."""
    layout = layout.upper()
    b, n, s, d = x.shape
    y = {"BNSD": lambda: x,
         "BSND": lambda: x.transpose(0, 2, 1, 3),
         "BSH": lambda: x.transpose(0, 2, 1, 3).reshape(b, s, n * d),
         "SBH": lambda: x.transpose(2, 0, 1, 3).reshape(s, b, n * d)}[layout]()
    return np.ascontiguousarray(y)


def repeat_heads(x, layout, n, g):
    """Repeat each of the ``n`` heads of ``x`` ``g`` times (head h of the result = head h // g):
    K/V of a GQA problem turned into the equivalent MHA inputs."""
    return from_bnsd(np.repeat(to_bnsd(x, layout, n), g, axis=1), layout)


def sum_head_groups(x, layout, n, g):
    """Inverse of ``repeat_heads`` for gradients: ``n`` heads summed in groups of ``g``
    (float64)."""
    y = to_float64(to_bnsd(x, layout, n))
    b, _, s, d = y.shape
    return from_bnsd(y.reshape(b, n // g, g, s, d).sum(axis=2), layout)


def naive_attention(q, k, v, dy, scale, g, dtype):
    """Straightforward dense attention forward + backward "in the input dtype" (the baseline of
    ``tolerances.baseline_check``): inputs as given (already in ``dtype``), float32 math, P and dS
    rounded to ``dtype`` before their matmuls (as the NPU does), outputs rounded to ``dtype``.

    q ``[B,N1,S1,D]``, k ``[B,N2,S2,D]``, v ``[B,N2,S2,Dv]``, dy ``[B,N1,S1,Dv]`` (BNSD, no masks,
    no pse, no dropout). Returns ``(out, dq, dk, dv)`` in BNSD and ``dtype``.
    """
    f32 = np.float32
    q32, dy32 = q.astype(f32), dy.astype(f32)
    k32 = np.repeat(k.astype(f32), g, axis=1)
    v32 = np.repeat(v.astype(f32), g, axis=1)
    sc = f32(scale)
    z = (q32 @ k32.transpose(0, 1, 3, 2)) * sc
    if z.shape[-1]:
        m = z.max(axis=-1, keepdims=True)
        e = np.exp(z - m)
        p = e / e.sum(axis=-1, keepdims=True)
    else:
        p = z
    p = p.astype(dtype).astype(f32)
    out = p @ v32
    dp = dy32 @ v32.transpose(0, 1, 3, 2)
    dsum = (dy32 * out.astype(dtype).astype(f32)).sum(axis=-1, keepdims=True)
    ds = (p * (dp - dsum)).astype(dtype).astype(f32)
    dq = sc * (ds @ k32)
    dk = sc * (ds.transpose(0, 1, 3, 2) @ q32)
    dv = p.transpose(0, 1, 3, 2) @ dy32
    b, n1, s2 = q.shape[0], q.shape[1], k.shape[2]
    n2 = n1 // g if g else 0
    dk = dk.reshape(b, n2, g, s2, -1).sum(axis=2)
    dv = dv.reshape(b, n2, g, s2, -1).sum(axis=2)
    return tuple(x.astype(dtype) for x in (out, dq, dk, dv))


def assert_grads_close(grads, ref, out_dtype, dpse_dtype=None):
    """dq/dk/dv (and dpse: None exactly when the reference's is None) of a FlashAttentionGrads
    against the reference's (dq, dk, dv, dpse), with the tolerances of ``out_dtype``."""
    from tolerances import tolerance
    rdq, rdk, rdv, rdpse = ref
    tb = tolerance(out_dtype, "bwd")
    assert_close(grads.dq, rdq, tb, "dq")
    assert_close(grads.dk, rdk, tb, "dk")
    assert_close(grads.dv, rdv, tb, "dv")
    if rdpse is None:
        assert grads.dpse is None
    else:
        assert grads.dpse.shape == np.shape(rdpse)
        dt = grads.dpse.dtype if dpse_dtype is None else dpse_dtype
        assert_close(grads.dpse, rdpse, tolerance(dt, "dpse"), "dpse")


def fwd_block_n(fbn, dtype, d, dv):
    """The forward tile width a call runs for a configured ``FWD_BLOCK_N`` of ``fbn``: the
    bf16-pair native kinds ("bf16", "amx", chosen by ``isa.native_kind`` for bf16 inputs with
    even D, Dv) start pairs on even keys, so the API rounds it up to even; every other path
    uses it as given.  For tests that count tiles."""
    import ml_dtypes
    from fag_numba import isa

    kind = isa.native_kind(np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16), d, dv)
    return fbn + fbn % 2 if kind in ("bf16", "amx") else fbn


def bwd_block_m(bm, dtype, d, dv):
    """The backward tile height a call runs for a configured ``BLOCK_M`` of ``bm`` (below
    ``config.WIDE_D``): the "amx" kind takes ``BWD_AMX_ROWS_FACTOR`` times as many rows, the
    bf16-pair kinds round it up to even.  For tests that count tiles."""
    import ml_dtypes
    from fag_numba import config, isa

    kind = isa.native_kind(np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16), d, dv)
    if kind == "amx" and d < config.WIDE_D:
        bm *= max(int(config.BWD_AMX_ROWS_FACTOR), 1)
    return bm + bm % 2 if kind in ("bf16", "amx") else bm
