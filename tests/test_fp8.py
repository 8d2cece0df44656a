"""fp8 inputs (SPEC §1): float8_e4m3fn / float8_e5m2 query/key/value/dy in every layout,
dequantised as ``x * d_scale`` (a float, or per 512-position block ``[B, N, ceil(S/512), 1]``),
outputs in ``out_dtype`` (float16 default, bfloat16, float32; names and NPU codes 0/1), the
``attention_in`` dtypes of the grad, special values (NaN, max magnitude), and validation of
out_dtype / d_scale_* for fp8 and non-fp8 inputs.

The float64 reference runs on the dequantised values; gradients are with respect to them.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fag_numba as F
from fag_numba import FagTypeError, FagValueError

import reference as R
from tolerances import STATS, tolerance
from utils import assert_close, from_bnsd, make_id, make_qkv, to_bnsd

E4 = np.dtype(ml_dtypes.float8_e4m3fn)
E5 = np.dtype(ml_dtypes.float8_e5m2)
F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
TRI = np.triu(np.ones((2048, 2048), dtype=bool), k=1)
SCALE = 0.4


@pytest.fixture(autouse=True)
def _small_tiles(blocks):
    blocks(bm=4, bn=8, fbm=5, fbn=7)


def dequant(x, scale, layout, n):
    """float64 ``x * d_scale`` (scale: None, a float, or float32 [B, n, ceil(S/512), 1])."""
    x64 = x.astype(np.float64)
    if scale is None:
        return x64
    if not isinstance(scale, np.ndarray):
        return x64 * float(np.float32(scale))
    xb = to_bnsd(x64, layout, n)                         # [B, n, S, d]
    per_pos = np.repeat(scale[:, :, :, 0].astype(np.float64), 512, axis=2)[:, :, :xb.shape[2]]
    return from_bnsd(xb * per_pos[..., None], layout)


def block_scales(rng, B, n, S):
    """Distinct per-(b, head, 512-block) scales, float32 [B, n, ceil(S/512), 1]."""
    nb = -(-S // 512)
    return rng.uniform(0.3, 2.0, (B, n, nb, 1)).astype(np.float32)


def check(args, scales, n1, n2, layout, expect, *, attn_in_dtype=None, **kw):
    """fag_numba on fp8 inputs vs the float64 reference on the dequantised values.

    scales: dict of d_scale_q/k/v/dy (values may be None); ``expect`` is the expected output
    dtype; ``kw`` may contain an ``out_dtype`` spelling and every common option.
    """
    q, k, v, dy = args
    sq, sk, sv, sy = (scales.get(x) for x in ("d_scale_q", "d_scale_k", "d_scale_v",
                                              "d_scale_dy"))
    rq, rk, rv, ry = (dequant(q, sq, layout, n1), dequant(k, sk, layout, n2),
                      dequant(v, sv, layout, n2), dequant(dy, sy, layout, n1))
    fscales = {kk: vv for kk, vv in scales.items() if kk != "d_scale_dy" and vv is not None}
    rkw = {kk: vv for kk, vv in kw.items() if kk != "out_dtype"}
    fo = F.flash_attention_score(q, k, v, n1, layout, **fscales, **kw)
    ro, rm, rl = R.ref_forward(rq, rk, rv, n1, layout, **rkw)
    assert fo.attention_out.dtype == expect
    assert fo.softmax_max.dtype == F32 and fo.softmax_sum.dtype == F32
    assert_close(fo.attention_out, ro, tolerance(expect, "fwd"), "attention_out")
    assert_close(fo.softmax_max, rm, STATS, "softmax_max")
    assert_close(fo.softmax_sum, rl, STATS, "softmax_sum")
    o_in = fo.attention_out if attn_in_dtype is None else fo.attention_out.astype(attn_in_dtype)
    gscales = {kk: vv for kk, vv in scales.items() if vv is not None}
    g = F.flash_attention_score_grad(q, k, v, dy, n1, layout, softmax_max=fo.softmax_max,
                                     softmax_sum=fo.softmax_sum, attention_in=o_in,
                                     **gscales, **kw)
    rdq, rdk, rdv, rdpse = R.ref_backward(rq, rk, rv, ry, n1, layout,
                                          softmax_max=fo.softmax_max,
                                          softmax_sum=fo.softmax_sum, attention_in=o_in, **rkw)
    tb = tolerance(expect, "bwd")
    for x, ref, like, name in ((g.dq, rdq, q, "dq"), (g.dk, rdk, k, "dk"), (g.dv, rdv, v, "dv")):
        assert x.dtype == expect and x.shape == like.shape, name
        assert_close(x, ref, tb, name)
    if rdpse is None:
        assert g.dpse is None
    else:
        assert_close(g.dpse, rdpse, tolerance(g.dpse.dtype, "dpse"), "dpse")
    return fo, g


# ------------------------------------------------------------------------------------------------
# 1. every layout, both fp8 kinds, scalar / per-block / default scales, every out_dtype spelling
# ------------------------------------------------------------------------------------------------

CASES = [
    # layout, fp8, n1, n2, s1, s2, scales ("none"|"float"|"block"), out_dtype kw, expected, mode
    ("BSH", E4, 2, 1, 9, 13, "float", None, F16, None),
    ("BSH", E5, 4, 2, 13, 9, "block", "bfloat16", BF16, 3),
    ("SBH", E5, 2, 2, 11, 11, "none", 1, BF16, None),
    ("SBH", E4, 3, 1, 10, 12, "block", np.float32, F32, 4),
    ("BSND", E4, 2, 2, 9, 13, "block", "float32", F32, None),
    ("BSND", E5, 4, 1, 12, 7, "float", np.float16, F16, 3),
    ("BNSD", E5, 2, 1, 9, 13, "block", "float16", F16, 4),
    ("BNSD", E4, 4, 2, 8, 8, "none", ml_dtypes.bfloat16, BF16, 3),
    ("BNSD", E4, 2, 2, 7, 10, "float", 0, F16, None),
    ("TND", E4, 2, 1, None, None, "float", None, F16, 3),
    ("TND", E5, 4, 2, None, None, "float", F32, F32, None),
    ("TND", E5, 2, 2, None, None, "none", 1, BF16, 4),
]


def _mask_kw(mode):
    if mode is None:
        return {}
    if mode == 3:
        return dict(atten_mask=TRI, sparse_mode=3)
    return dict(atten_mask=TRI, sparse_mode=4, pre_tokens=4, next_tokens=2)


def _odt_name(o):
    if o is None:
        return "default"
    if isinstance(o, str):
        return o
    if isinstance(o, int):
        return f"code{o}"
    return np.dtype(o).name


@pytest.mark.parametrize(
    "layout,fp8,n1,n2,s1,s2,sc,odt,expect,mode", CASES,
    ids=[make_id(layout=c[0], dtype=c[1], scales=c[6], out=_odt_name(c[7]), sm=c[9], n1=c[2],
                 n2=c[3]) for c in CASES])
def test_fp8_vs_reference(layout, fp8, n1, n2, s1, s2, sc, odt, expect, mode):
    rng = np.random.default_rng(abs(hash((layout, str(fp8), sc, n1))) % 2**32)
    B = 2
    kw = dict(scale_value=SCALE, **_mask_kw(mode))
    if layout == "TND":
        sq, sk = [3, 9, 9, 14], [5, 8, 12, 20]
        args = make_qkv("TND", 1, n1, n2, 15, 20, 5, 4, fp8, rng, actual_seq_qlen=sq,
                        actual_seq_kvlen=sk)
        kw.update(actual_seq_qlen=sq, actual_seq_kvlen=sk)
    else:
        args = make_qkv(layout, B, n1, n2, s1, s2, 5, 4, fp8, rng)
    if sc == "none":
        scales = {}
    elif sc == "float":
        scales = dict(d_scale_q=0.5, d_scale_k=np.float32(1.25), d_scale_v=0.75, d_scale_dy=2)
    else:
        scales = dict(d_scale_q=block_scales(rng, B, n1, s1),
                      d_scale_k=block_scales(rng, B, n2, s2),
                      d_scale_v=block_scales(rng, B, n2, s2),
                      d_scale_dy=block_scales(rng, B, n1, s1))
    if odt is not None:
        kw["out_dtype"] = odt
    check(args, scales, n1, n2, layout, expect, **kw)


def test_default_scales_equal_one():
    rng = np.random.default_rng(1)
    q, k, v, dy = make_qkv("BNSD", 1, 2, 1, 6, 9, 4, 4, E4, rng)
    a = F.flash_attention_score_grad(q, k, v, dy, 2, "BNSD")
    b = F.flash_attention_score_grad(q, k, v, dy, 2, "BNSD", d_scale_q=1.0, d_scale_k=1,
                                     d_scale_v=np.float32(1), d_scale_dy=1.0)
    for x, y in zip(a[:3], b[:3]):
        assert np.array_equal(x, y)


# ------------------------------------------------------------------------------------------------
# 2. per-block scale arrays with S > 512, not a multiple of 512
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout,fp8", [("BSH", E4), ("SBH", E5), ("BSND", E5), ("BNSD", E4)],
                         ids=["BSH-e4m3", "SBH-e5m2", "BSND-e5m2", "BNSD-e4m3"])
def test_block_scales_long_sequence(blocks, layout, fp8):
    blocks(bm=32, bn=64, fbm=32, fbn=64)
    rng = np.random.default_rng(abs(hash((layout, str(fp8)))) % 2**32)
    B, n1, n2, s1, s2 = 2, 2, 1, 600, 530
    args = make_qkv(layout, B, n1, n2, s1, s2, 4, 3, fp8, rng)
    scales = dict(d_scale_q=block_scales(rng, B, n1, s1), d_scale_k=block_scales(rng, B, n2, s2),
                  d_scale_v=block_scales(rng, B, n2, s2), d_scale_dy=block_scales(rng, B, n1, s1))
    for x in scales.values():
        assert x.shape[2] == 2 and np.all(x[:, :, 0] != x[:, :, 1])
    fo, g = check(args, scales, n1, n2, layout, F32, out_dtype="float32", scale_value=0.3,
                  atten_mask=TRI, sparse_mode=3)
    # the same as float32 inputs holding the dequantised values (no d_scale then)
    q, k, v, dy = args
    deq = [dequant(x, scales[n], layout, nh).astype(np.float32)
           for x, n, nh in ((q, "d_scale_q", n1), (k, "d_scale_k", n2), (v, "d_scale_v", n2),
                            (dy, "d_scale_dy", n1))]
    g32 = F.flash_attention_score_grad(*deq, n1, layout, scale_value=0.3, atten_mask=TRI,
                                       sparse_mode=3)
    for x, y, name in zip(g[:3], g32[:3], ("dq", "dk", "dv")):
        assert_close(x, y.astype(np.float64), tolerance(F32, "bwd"), name)
    # the second block's scale matters: using block 0's scale everywhere changes the result
    flat = scales["d_scale_k"].copy()
    flat[:, :, 1] = flat[:, :, 0]
    other = F.flash_attention_score(q, k, v, n1, layout, out_dtype=F32, scale_value=0.3,
                                    atten_mask=TRI, sparse_mode=3, d_scale_k=flat,
                                    d_scale_q=scales["d_scale_q"], d_scale_v=scales["d_scale_v"])
    assert not np.allclose(other.attention_out, fo.attention_out)


# ------------------------------------------------------------------------------------------------
# 3. out_dtype spellings; the output is the float32 result rounded once
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fp8", [E4, E5], ids=["e4m3", "e5m2"])
def test_out_dtype_spellings(fp8):
    rng = np.random.default_rng(2)
    q, k, v, dy = make_qkv("BSND", 2, 2, 1, 7, 9, 4, 4, fp8, rng)
    kw = dict(d_scale_q=0.7, scale_value=SCALE)
    ref = F.flash_attention_score_grad(q, k, v, dy, 2, "BSND", out_dtype=np.float32, **kw)
    reff = F.flash_attention_score(q, k, v, 2, "BSND", out_dtype="float32", **kw)
    assert reff.attention_out.dtype == F32 and ref.dq.dtype == F32
    spellings = {F16: [None, np.float16, F16, "float16", 0, np.int64(0)],
                 BF16: [ml_dtypes.bfloat16, BF16, "bfloat16", 1, np.int32(1)],
                 F32: [np.float32, F32, "float32"]}
    for dt, names in spellings.items():
        for name in names:
            g = F.flash_attention_score_grad(q, k, v, dy, 2, "BSND", out_dtype=name, **kw)
            fo = F.flash_attention_score(q, k, v, 2, "BSND", out_dtype=name, **kw)
            assert fo.attention_out.dtype == dt, name
            assert np.array_equal(fo.attention_out, reff.attention_out.astype(dt)), name
            assert np.array_equal(fo.softmax_max, reff.softmax_max)
            for x, y in zip(g[:3], ref[:3]):
                assert x.dtype == dt, name
                assert np.array_equal(x, y.astype(dt)), name


# ------------------------------------------------------------------------------------------------
# 4. attention_in in float32 / float16 / bfloat16 (whatever the input dtype)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qdt", [E4, E5, F32, F16, BF16])
@pytest.mark.parametrize("odt", [F32, F16, BF16])
def test_attention_in_dtypes(qdt, odt):
    rng = np.random.default_rng(3)
    n1, n2 = 2, 1
    args = make_qkv("BSH", 2, n1, n2, 6, 11, 4, 4, qdt, rng)
    fp8 = qdt in (E4, E5)
    scales = dict(d_scale_q=0.8, d_scale_dy=1.5) if fp8 else {}
    expect = F16 if fp8 else qdt
    check(args, scales, n1, n2, "BSH", expect, attn_in_dtype=odt, scale_value=SCALE)


# ------------------------------------------------------------------------------------------------
# 5. pse with fp8 queries: float32, float16 or bfloat16
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pdt", [F32, F16, BF16])
def test_pse_dtypes_with_fp8(pdt):
    rng = np.random.default_rng(4)
    args = make_qkv("BNSD", 2, 2, 2, 7, 9, 4, 4, E4, rng)
    pse = rng.standard_normal((2, 2, 1, 9)).astype(pdt)
    fo, g = check(args, dict(d_scale_k=0.5), 2, 2, "BNSD", F16, pse=pse, pse_type=1,
                  scale_value=SCALE)
    assert g.dpse.dtype == pdt and g.dpse.shape == pse.shape


# ------------------------------------------------------------------------------------------------
# 6. special values: max magnitude, NaN
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fp8", [E4, E5], ids=["e4m3", "e5m2"])
def test_max_magnitude_values(fp8):
    rng = np.random.default_rng(5)
    big = float(ml_dtypes.finfo(fp8).max)            # 448 / 57344
    n1, n2 = 2, 1
    q, k, v, dy = make_qkv("BSND", 1, n1, n2, 6, 8, 4, 4, fp8, rng)
    sign = lambda a: np.where(rng.random(a.shape) < 0.5, -big, big).astype(fp8)
    q = sign(q)                                        # every element +-max
    k[:, ::2] = sign(k[:, ::2])
    v[:, 1::3] = sign(v[:, 1::3])
    dy[:, 0] = sign(dy[:, 0])
    assert np.abs(q.astype(np.float64)).max() == big
    # q, k scaled back to O(1) scores; v and dy at full magnitude (float32 outputs)
    scales = dict(d_scale_q=1.0 / big, d_scale_k=1.0 / big, d_scale_v=1.0, d_scale_dy=1.0 / big)
    check((q, k, v, dy), scales, n1, n2, "BSND", F32, out_dtype="float32", scale_value=0.5)
    # float16 attention_out of values up to max (57344 < 65504 fits float16)
    fscales = {kk: vv for kk, vv in scales.items() if kk != "d_scale_dy"}
    fo = F.flash_attention_score(q, k, v, n1, "BSND", scale_value=0.5, **fscales)
    ro, _, _ = R.ref_forward(dequant(q, 1.0 / big, "BSND", n1), dequant(k, 1.0 / big, "BSND", n2),
                             v.astype(np.float64), n1, "BSND", scale_value=0.5)
    assert fo.attention_out.dtype == F16 and np.isfinite(fo.attention_out).all()
    assert np.abs(fo.attention_out.astype(np.float64)).max() > big / 8
    assert_close(fo.attention_out, ro, tolerance(F16, "fwd"), "float16 attention_out")


def _nan_case(fp8, where):
    rng = np.random.default_rng(6)
    n1, n2 = 4, 2
    q, k, v, dy = make_qkv("BNSD", 1, n1, n2, 6, 9, 4, 4, fp8, rng)
    nan = np.array(np.nan, dtype=fp8)
    if where == "q":
        q[0, 1, 3, 2] = nan        # query head 1, row 3
    elif where == "k":
        k[0, 1, 5, 0] = nan        # kv head 1 (query heads 2, 3), key 5
    elif where == "v":
        v[0, 0, 4, 3] = nan        # kv head 0 (query heads 0, 1), key 4, column 3
    else:
        dy[0, 2, 1, 1] = nan       # query head 2, row 1
    return q, k, v, dy, n1


def _finite_rows_match(fo, args, n1, ok):
    """Rows selected by ``ok`` ([B, N1, S1] bool) are finite and match the reference."""
    q, k, v, _ = args
    ro, _, _ = R.ref_forward(q, k, v, n1, "BNSD", scale_value=SCALE)
    out = fo.attention_out.astype(np.float64)
    assert np.isfinite(out[ok]).all()
    assert_close(out[ok], ro[ok], tolerance(F16, "fwd"), "unaffected rows")


@pytest.mark.parametrize("fp8", [E4, E5], ids=["e4m3", "e5m2"])
def test_nan_in_query_row_propagates(fp8):
    q, k, v, dy, n1 = _nan_case(fp8, "q")
    fo = F.flash_attention_score(q, k, v, n1, "BNSD", scale_value=SCALE)
    out = fo.attention_out.astype(np.float64)
    ok = np.ones(out.shape[:3], bool)
    ok[0, 1, 3] = False
    _finite_rows_match(fo, (q, k, v, dy), n1, ok)
    assert np.isnan(out[0, 1, 3]).all()


@pytest.mark.parametrize("fp8", [E4, E5], ids=["e4m3", "e5m2"])
def test_nan_in_key_and_value_propagates(fp8):
    q, k, v, dy, n1 = _nan_case(fp8, "k")
    fo = F.flash_attention_score(q, k, v, n1, "BNSD", scale_value=SCALE)
    out = fo.attention_out.astype(np.float64)
    assert np.isnan(out[0, 2:]).all()               # every row of the heads using kv head 1
    ok = np.zeros(out.shape[:3], bool)
    ok[0, :2] = True
    _finite_rows_match(fo, (q, k, v, dy), n1, ok)
    g = F.flash_attention_score_grad(q, k, v, dy, n1, "BNSD", scale_value=SCALE)
    assert np.isnan(g.dq.astype(np.float64)[0, 2:]).all()
    assert np.isfinite(g.dq.astype(np.float64)[0, :2]).all()

    q, k, v, dy, n1 = _nan_case(fp8, "v")
    fo = F.flash_attention_score(q, k, v, n1, "BNSD", scale_value=SCALE)
    out = fo.attention_out.astype(np.float64)
    assert np.isnan(out[0, :2, :, 3]).all()         # column 3 of heads 0, 1
    assert np.isfinite(out[0, :2, :, :3]).all() and np.isfinite(out[0, 2:]).all()


@pytest.mark.parametrize("fp8", [E4, E5], ids=["e4m3", "e5m2"])
def test_nan_in_dy_and_query_propagate_to_gradients(fp8):
    q, k, v, dy, n1 = _nan_case(fp8, "dy")           # query head 2, row 1
    g = F.flash_attention_score_grad(q, k, v, dy, n1, "BNSD", scale_value=SCALE)
    dq = g.dq.astype(np.float64)
    assert np.isnan(dq[0, 2, 1]).all()
    ok = np.ones(dq.shape[:3], bool)
    ok[0, 2, 1] = False
    assert np.isfinite(dq[ok]).all()
    assert np.isnan(g.dk.astype(np.float64)[0, 1]).any()      # kv head 1 sums row 1 of head 2
    assert np.isfinite(g.dk.astype(np.float64)[0, 0]).all()
    assert np.isfinite(g.dv.astype(np.float64)[0, 0]).all()
    # with the reference's statistics: the unaffected gradients match it
    rq, rk, rv, ry = (x.astype(np.float64) for x in (q, k, v, dy))
    ro, rm, rl = R.ref_forward(rq, rk, rv, n1, "BNSD", scale_value=SCALE)
    rg = R.ref_backward(rq, rk, rv, ry, n1, "BNSD", scale_value=SCALE, softmax_max=rm,
                        softmax_sum=rl, attention_in=ro)
    assert_close(dq[ok], rg[0][ok], tolerance(F16, "bwd"), "dq unaffected rows")
    assert_close(g.dk[0, 0], rg[1][0, 0], tolerance(F16, "bwd"), "dk kv head 0")

    q, k, v, dy, n1 = _nan_case(fp8, "q")            # query head 1, row 3
    g = F.flash_attention_score_grad(q, k, v, dy, n1, "BNSD", scale_value=SCALE)
    dq = g.dq.astype(np.float64)
    assert np.isnan(dq[0, 1, 3]).all()
    assert np.isfinite(dq[0, 1, :3]).all() and np.isfinite(dq[0, 1, 4:]).all()
    assert np.isnan(g.dk.astype(np.float64)[0, 0]).all()


# ------------------------------------------------------------------------------------------------
# 7. validation
# ------------------------------------------------------------------------------------------------

def _fp8_args(fp8=E4, layout="BNSD", s1=6, s2=7):
    rng = np.random.default_rng(0)
    return make_qkv(layout, 2, 2, 1, s1, s2, 4, 4, fp8, rng)


def _raises(exc, match, args, layout="BNSD", grad_only=False, **kw):
    q, k, v, dy = args
    fkw = {kk: vv for kk, vv in kw.items() if kk != "d_scale_dy"}
    if not grad_only:
        with pytest.raises(exc, match=match):
            F.flash_attention_score(q, k, v, 2, layout, **fkw)
    with pytest.raises(exc, match=match):
        F.flash_attention_score_grad(q, k, v, dy, 2, layout, **kw)


def test_validation_mixed_dtypes():
    q, k, v, dy = _fp8_args(E4)
    q5, k5, v5, dy5 = _fp8_args(E5)
    _raises(FagTypeError, "key", (q, k5, v, dy))
    _raises(FagTypeError, "value", (q, k, v5, dy))
    _raises(FagTypeError, "dy", (q, k, v, dy5), grad_only=True)
    _raises(FagTypeError, "key", (q5, k, v5, dy5))
    for dt in (F16, F32, BF16):
        _raises(FagTypeError, "dy", (q, k, v, dy.astype(dt)), grad_only=True)
        _raises(FagTypeError, "key", (q, k.astype(dt), v, dy))
    # fp8 pse is not a pse dtype
    _raises(FagTypeError, "pse", (q, k, v, dy), pse=np.zeros((2, 2, 6, 7), E4))


B1 = np.ones((2, 2, 1, 1), np.float32)     # [B, N1, ceil(6/512), 1]
B1K = np.ones((2, 1, 1, 1), np.float32)    # [B, N2, ceil(7/512), 1]

D_SCALE_ERRORS = [
    ("q-shape-N2", dict(d_scale_q=B1K), FagValueError, "d_scale_q"),
    ("q-rank3", dict(d_scale_q=B1[..., 0]), FagValueError, "d_scale_q"),
    ("q-blocks", dict(d_scale_q=np.ones((2, 2, 2, 1), np.float32)), FagValueError, "d_scale_q"),
    ("k-shape-N1", dict(d_scale_k=B1), FagValueError, "d_scale_k"),
    ("v-batch", dict(d_scale_v=np.ones((1, 1, 1, 1), np.float32)), FagValueError, "d_scale_v"),
    ("v-0d", dict(d_scale_v=np.array(1.0, np.float32)), FagValueError, "d_scale_v"),
    ("dy-shape", dict(d_scale_dy=B1K), FagValueError, "d_scale_dy"),
    ("q-f64", dict(d_scale_q=B1.astype(np.float64)), FagTypeError, "d_scale_q"),
    ("k-f16", dict(d_scale_k=B1K.astype(np.float16)), FagTypeError, "d_scale_k"),
    ("v-str", dict(d_scale_v="1.0"), FagTypeError, "d_scale_v"),
    ("v-list", dict(d_scale_v=[1.0]), FagTypeError, "d_scale_v"),
    ("q-bool", dict(d_scale_q=True), FagTypeError, "d_scale_q"),
    ("dy-str", dict(d_scale_dy="2"), FagTypeError, "d_scale_dy"),
]


@pytest.mark.parametrize("kw,exc,match", [pytest.param(*c[1:], id=c[0]) for c in D_SCALE_ERRORS])
def test_validation_d_scale(kw, exc, match):
    _raises(exc, match, _fp8_args(), grad_only="d_scale_dy" in kw, **kw)


def test_validation_d_scale_tnd_arrays():
    rng = np.random.default_rng(0)
    sq, sk = [3, 6], [4, 7]
    args = make_qkv("TND", 1, 2, 1, 6, 7, 4, 4, E5, rng, actual_seq_qlen=sq,
                    actual_seq_kvlen=sk)
    tkw = dict(actual_seq_qlen=sq, actual_seq_kvlen=sk)
    _raises(FagValueError, "d_scale_q", args, "TND", d_scale_q=np.ones((2, 2, 1, 1), np.float32),
            **tkw)
    _raises(FagValueError, "d_scale_k", args, "TND", d_scale_k=np.ones((2, 1, 1, 1), np.float32),
            **tkw)


OUT_DTYPE_ERRORS = [
    (np.float64, FagValueError), ("float64", FagValueError), (2, FagValueError),
    (-1, FagValueError), (np.int32, FagValueError), (E4, FagValueError),
    ("float8_e5m2", FagValueError), ("foo", FagTypeError), (1.5, FagTypeError),
    (True, FagTypeError), ([0], FagTypeError),
]


@pytest.mark.parametrize("odt,exc", OUT_DTYPE_ERRORS, ids=[repr(c[0]) for c in OUT_DTYPE_ERRORS])
def test_validation_out_dtype_fp8(odt, exc):
    _raises(exc, "out_dtype", _fp8_args(), out_dtype=odt)


@pytest.mark.parametrize("qdt,bad,good", [
    (F32, [np.float16, "float16", 0, 1, ml_dtypes.bfloat16, np.float64], [np.float32, "float32",
                                                                          F32]),
    (F16, ["bfloat16", 1, ml_dtypes.bfloat16, np.float64], [np.float16, "float16", 0]),
    (BF16, [np.float16, "float16", 0, np.float64], [ml_dtypes.bfloat16, "bfloat16", 1]),
])
def test_validation_out_dtype_non_fp8(qdt, bad, good):
    args = _fp8_args(qdt)
    for odt in bad:
        _raises(FagValueError, "out_dtype", args, out_dtype=odt)
    q, k, v, dy = args
    for odt in good:
        fo = F.flash_attention_score(q, k, v, 2, "BNSD", out_dtype=odt)
        g = F.flash_attention_score_grad(q, k, v, dy, 2, "BNSD", out_dtype=odt)
        assert fo.attention_out.dtype == qdt and g.dq.dtype == qdt
    if qdt != F32:
        # SPEC §1/§12: float16/bfloat16 inputs may keep float32 outputs (unrounded)
        for odt in (np.float32, "float32"):
            fo = F.flash_attention_score(q, k, v, 2, "BNSD", out_dtype=odt)
            g = F.flash_attention_score_grad(q, k, v, dy, 2, "BNSD", out_dtype=odt)
            assert fo.attention_out.dtype == F32 and g.dq.dtype == F32 and g.dv.dtype == F32


@pytest.mark.parametrize("qdt", [F32, F16, BF16])
def test_validation_d_scale_with_non_fp8(qdt):
    args = _fp8_args(qdt)
    _raises(FagValueError, "d_scale_q", args, d_scale_q=1.0)
    _raises(FagValueError, "d_scale_k", args, d_scale_k=0.5)
    _raises(FagValueError, "d_scale_v", args, d_scale_v=np.ones((2, 1, 1, 1), np.float32))
    _raises(FagValueError, "d_scale_dy", args, grad_only=True, d_scale_dy=2.0)


def test_inputs_not_modified():
    rng = np.random.default_rng(9)
    q, k, v, dy = make_qkv("BSH", 2, 2, 1, 5, 6, 4, 4, E5, rng)
    sk = block_scales(rng, 2, 1, 6)
    before = [x.copy() for x in (q, k, v, dy, sk)]
    F.flash_attention_score_grad(q, k, v, dy, 2, "BSH", d_scale_k=sk, d_scale_q=0.5)
    for x, y in zip((q, k, v, dy, sk), before):
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8))
