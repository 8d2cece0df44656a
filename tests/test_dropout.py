"""Dropout through the operator (SPEC §3, §5): the user ``drop_mask`` bit stream and the
in-kernel generator (``seed``/``offset``) against the float64 reference (fed the unpacked keep
bits), the two paths bit for bit against each other, GQA, masks, pse, TND, forward -> backward
consistency, ``keep_prob == 1`` and validation.

The generator's bits themselves are pinned in ``test_dropout_generator.py``; here
``fag_numba.dropout_mask`` is the bridge: its packed bits, passed as ``drop_mask``, must give the
same results as ``seed``/``offset``, and the reference gets them unpacked as ``keep``.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fag_numba as F
from fag_numba import FagTypeError, FagValueError

import reference as R
from tolerances import STATS, tolerance
from utils import assert_close, assert_grads_close, make_id, make_qkv

F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
TRI = np.triu(np.ones((2048, 2048), dtype=bool), k=1)
SCALE = 0.45


@pytest.fixture(autouse=True)
def _small_tiles(blocks):
    blocks(bm=4, bn=8, fbm=5, fbn=7)


def keep_of(drop_mask, numels):
    return np.unpackbits(np.asarray(drop_mask, np.uint8).reshape(-1),
                         bitorder="little")[:numels]


def mask_kw(mode, s1=None, s2=None, rng=None):
    if mode is None:
        return {}
    if mode == 1:
        return dict(atten_mask=rng.random((s1, s2)) < 0.3, sparse_mode=1)
    if mode == 3:
        return dict(atten_mask=TRI, sparse_mode=3)
    if mode == 4:
        return dict(atten_mask=TRI, sparse_mode=4, pre_tokens=4, next_tokens=2)
    raise AssertionError(mode)


def run_fag(q, k, v, dy, n1, layout, **kw):
    fo = F.flash_attention_score(q, k, v, n1, layout, **kw)
    g = F.flash_attention_score_grad(q, k, v, dy, n1, layout, softmax_max=fo.softmax_max,
                                     softmax_sum=fo.softmax_sum, attention_in=fo.attention_out,
                                     **kw)
    return fo, g


def check(q, k, v, dy, n1, layout, out_dtype, keep, fkw, **kw):
    """fag_numba with ``fkw`` (drop_mask or seed/offset) vs the reference with ``keep``."""
    fo, g = run_fag(q, k, v, dy, n1, layout, **fkw, **kw)
    ro, rm, rl = R.ref_forward(q, k, v, n1, layout, keep=keep, **kw)
    assert_close(fo.attention_out, ro, tolerance(out_dtype, "fwd"), "attention_out")
    assert_close(fo.softmax_max, rm, STATS, "softmax_max")
    assert_close(fo.softmax_sum, rl, STATS, "softmax_sum")
    ref = R.ref_backward(q, k, v, dy, n1, layout, keep=keep, softmax_max=fo.softmax_max,
                         softmax_sum=fo.softmax_sum, attention_in=fo.attention_out, **kw)
    assert_grads_close(g, ref, out_dtype)
    return fo, g


def assert_same(a, b):
    """Bitwise equality of two (fwd, grad) results."""
    (fa, ga), (fb, gb) = a, b
    for x, y, name in zip(tuple(fa) + tuple(ga), tuple(fb) + tuple(gb),
                          ("out", "max", "sum", "dq", "dk", "dv", "dpse")):
        if x is None:
            assert y is None
            continue
        assert np.array_equal(x, y, equal_nan=True), name


# ------------------------------------------------------------------------------------------------
# 1. drop_mask path vs the reference
# ------------------------------------------------------------------------------------------------

DM_CASES = [
    # layout, dtype, n1, n2, s1, s2, mode, keep_prob, mask form
    ("BNSD", F32, 2, 2, 9, 13, None, 0.7, "flat"),
    ("BSND", F16, 4, 2, 13, 9, 3, 0.5, "rows"),
    ("BSH", BF16, 3, 1, 11, 11, 4, 0.8, "2d-extra"),
    ("SBH", F32, 2, 1, 7, 17, 1, 0.3, "strided"),
    ("BNSD", F16, 4, 1, 10, 10, 3, 0.9, "readonly"),
    ("BSND", F32, 2, 2, 12, 5, 4, 0.6, "flat"),
]


def _drop_mask(form, numels, rng, B, n1, s1, s2):
    nbytes = -(-numels // 8)
    if form == "flat":
        return rng.integers(0, 256, nbytes, dtype=np.uint8)
    if form == "rows":            # the ops-transformer tests' [B,N1,S1,ceil(S2/8)] (read flat)
        return rng.integers(0, 256, (B, n1, s1, -(-s2 // 8)), dtype=np.uint8)
    if form == "2d-extra":
        return rng.integers(0, 256, (3, nbytes // 3 + 5), dtype=np.uint8)
    if form == "strided":         # a non-contiguous view: read in its logical (C) order
        return rng.integers(0, 256, (2 * nbytes + 2,), dtype=np.uint8)[::2]
    if form == "readonly":
        m = rng.integers(0, 256, nbytes, dtype=np.uint8)
        m.flags.writeable = False
        return m
    raise AssertionError(form)


@pytest.mark.parametrize("layout,dt,n1,n2,s1,s2,mode,kp,form", DM_CASES,
                         ids=[make_id(layout=c[0], dtype=c[1], sm=c[6], kp=c[7], m=c[8],
                                      n1=c[2], n2=c[3], s1=c[4], s2=c[5]) for c in DM_CASES])
def test_drop_mask_vs_reference(layout, dt, n1, n2, s1, s2, mode, kp, form):
    rng = np.random.default_rng(abs(hash((layout, form, s1))) % 2**32)
    B = 2
    q, k, v, dy = make_qkv(layout, B, n1, n2, s1, s2, 5, 4, dt, rng)
    numels = B * n1 * s1 * s2
    dm = _drop_mask(form, numels, rng, B, n1, s1, s2)
    before = dm.copy()
    keep = keep_of(np.ascontiguousarray(dm).reshape(-1), numels)
    check(q, k, v, dy, n1, layout, dt, keep, dict(drop_mask=dm), keep_prob=kp,
          scale_value=SCALE, **mask_kw(mode, s1, s2, rng))
    assert np.array_equal(dm, before)                 # never modified


# ------------------------------------------------------------------------------------------------
# 2. seed/offset path: vs the reference, and bitwise equal to drop_mask = dropout_mask(...)
# ------------------------------------------------------------------------------------------------

SEED_CASES = [
    # layout, dtype, n1, n2, s1, s2, mode, keep_prob, seed, offset
    ("BNSD", F32, 2, 1, 9, 13, None, 0.7, 0, 0),
    ("BSND", F16, 4, 2, 13, 9, 3, 0.5, 1234, 77),
    ("SBH", BF16, 2, 2, 11, 11, 4, 0.85, 2**64 - 1, 2**64 - 37),      # counter wraps
    ("BSH", F32, 3, 3, 6, 21, 1, 0.25, 2**40 + 3, 2**33 + 5),
]


@pytest.mark.parametrize("layout,dt,n1,n2,s1,s2,mode,kp,seed,offset", SEED_CASES,
                         ids=[make_id(layout=c[0], dtype=c[1], sm=c[6], kp=c[7], seed=c[8] % 997,
                                      n1=c[2], n2=c[3], s1=c[4], s2=c[5]) for c in SEED_CASES])
def test_seed_path(layout, dt, n1, n2, s1, s2, mode, kp, seed, offset):
    rng = np.random.default_rng(seed % 2**32 + 1)
    B = 2
    q, k, v, dy = make_qkv(layout, B, n1, n2, s1, s2, 5, 4, dt, rng)
    numels = B * n1 * s1 * s2
    dm = F.dropout_mask(numels, kp, seed, offset)
    keep = keep_of(dm, numels)
    assert 0 < keep.sum() < numels
    kw = dict(keep_prob=kp, scale_value=SCALE, **mask_kw(mode, s1, s2, rng))
    a = check(q, k, v, dy, n1, layout, dt, keep, dict(seed=seed, offset=offset), **kw)
    b = run_fag(q, k, v, dy, n1, layout, drop_mask=dm, **kw)
    assert_same(a, b)
    # the grad with its internal forward agrees too
    ga = F.flash_attention_score_grad(q, k, v, dy, n1, layout, seed=seed, offset=offset, **kw)
    gb = F.flash_attention_score_grad(q, k, v, dy, n1, layout, drop_mask=dm, **kw)
    for x, y in zip(ga[:3], gb[:3]):
        assert np.array_equal(x, y)


def test_seed_offset_shift_is_a_stream_shift():
    """offset = o uses bits o .. o+numels-1 of the offset-0 stream (SPEC §5)."""
    rng = np.random.default_rng(3)
    q, k, v, dy = make_qkv("BNSD", 1, 2, 1, 6, 10, 4, 4, F32, rng)
    numels = 2 * 6 * 10
    long = F.dropout_mask(numels + 29, 0.6, 99, 0)
    shifted = np.packbits(keep_of(long, numels + 29)[29:], bitorder="little")
    a = run_fag(q, k, v, dy, 2, "BNSD", keep_prob=0.6, seed=99, offset=29)
    b = run_fag(q, k, v, dy, 2, "BNSD", keep_prob=0.6, drop_mask=shifted)
    assert_same(a, b)
    c = run_fag(q, k, v, dy, 2, "BNSD", keep_prob=0.6, seed=99, offset=30)
    assert not np.array_equal(a[0].attention_out, c[0].attention_out)


# ------------------------------------------------------------------------------------------------
# 3. GQA: every query head has its own bits
# ------------------------------------------------------------------------------------------------

def test_gqa_each_query_head_has_its_own_bits():
    rng = np.random.default_rng(4)
    B, n1, n2, s1, s2 = 1, 2, 1, 5, 9
    q, k, v, dy = make_qkv("BNSD", B, n1, n2, s1, s2, 4, 4, F32, rng)
    keep = np.zeros((B, n1, s1, s2), bool)
    keep[:, 0] = True                     # head 0 keeps everything, head 1 (same kv head) nothing
    dm = np.packbits(keep.ravel(), bitorder="little")
    kp = 0.5
    fo = F.flash_attention_score(q, k, v, n1, "BNSD", keep_prob=kp, drop_mask=dm)
    plain = F.flash_attention_score(q, k, v, n1, "BNSD")
    assert not fo.attention_out[:, 1].any()
    assert_close(fo.attention_out[:, 0], plain.attention_out[:, 0] / np.float32(kp),
                 tolerance(F32, "fwd"), "head 0")
    # the statistics do not depend on dropout
    assert np.array_equal(fo.softmax_max, plain.softmax_max)
    g = F.flash_attention_score_grad(q, k, v, dy, n1, "BNSD", keep_prob=kp, drop_mask=dm)
    r = R.ref_backward(q, k, v, dy, n1, "BNSD", keep_prob=kp, keep=keep.ravel())
    for x, y, name in zip(g[:3], r[:3], ("dq", "dk", "dv")):
        assert_close(x, y, tolerance(F32, "bwd"), name)


# ------------------------------------------------------------------------------------------------
# 4. pse + dropout (dpse / dslope included)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ptype,path", [(1, "mask"), (0, "seed"), (2, "seed"), (3, "mask")])
def test_pse_and_dropout(ptype, path):
    rng = np.random.default_rng(10 + ptype)
    B, n1, n2, s1, s2 = 2, 4, 2, 9, 12
    layout = ("BSND", "BNSD", "SBH", "BSH")[ptype]
    q, k, v, dy = make_qkv(layout, B, n1, n2, s1, s2, 4, 4, F32, rng)
    if ptype in (0, 1):
        pse = rng.standard_normal((1, n1, s1, s2) if ptype else (B, n1, 1, s2)).astype(np.float32)
    else:
        pse = rng.uniform(0.05, 0.5, (B, n1) if ptype == 2 else (n1,)).astype(np.float32)
    numels = B * n1 * s1 * s2
    dm = F.dropout_mask(numels, 0.75, 5 + ptype, 3)
    fkw = dict(drop_mask=dm) if path == "mask" else dict(seed=5 + ptype, offset=3)
    check(q, k, v, dy, n1, layout, F32, keep_of(dm, numels), fkw, keep_prob=0.75, pse=pse,
          pse_type=ptype, scale_value=SCALE, atten_mask=TRI, sparse_mode=3, q_start_idx=2)


# ------------------------------------------------------------------------------------------------
# 5. TND: one stream per sequence, blocks [N1, S1_b, S2_b] concatenated
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,mode", [("mask", None), ("seed", 3), ("mask", 4), ("seed", None)])
def test_tnd(path, mode):
    rng = np.random.default_rng(20 + (mode or 0))
    sq, sk = [3, 3, 8, 12], [5, 9, 15, 20]         # sequence 1: no query rows
    n1, n2 = 4, 2
    q, k, v, dy = make_qkv("TND", 1, n1, n2, 14, 21, 4, 4, F32, rng, actual_seq_qlen=sq,
                           actual_seq_kvlen=sk)   # rows / keys past the last offsets
    lens = np.diff([0] + sq) * np.diff([0] + sk)
    numels = n1 * int(lens.sum())
    dm = F.dropout_mask(numels, 0.6, 31, 0) if path == "seed" else \
        rng.integers(0, 256, -(-numels // 8), dtype=np.uint8)
    fkw = dict(seed=31) if path == "seed" else dict(drop_mask=dm)
    kw = dict(keep_prob=0.6, scale_value=SCALE, actual_seq_qlen=sq, actual_seq_kvlen=sk,
              **mask_kw(mode))
    a = check(q, k, v, dy, n1, "TND", F32, keep_of(dm, numels), fkw, **kw)
    if path == "seed":
        assert_same(a, run_fag(q, k, v, dy, n1, "TND", drop_mask=dm, **kw))
    # the per-sequence stream: sequence 2 alone (BNSD, its own [N1, S1_b, S2_b] block of bits)
    keep = keep_of(dm, numels)
    off = n1 * int(lens[:2].sum())
    blk = keep[off:off + n1 * int(lens[2])]
    bn = lambda x: np.ascontiguousarray(x.transpose(1, 0, 2)[None])
    qs, ks = slice(3, 8), slice(9, 15)
    mkw = {kk: vv for kk, vv in kw.items() if kk not in ("actual_seq_qlen", "actual_seq_kvlen")}
    one = F.flash_attention_score(bn(q[qs]), bn(k[ks]), bn(v[ks]), n1, "BNSD",
                                  drop_mask=np.packbits(blk, bitorder="little"), **mkw)
    assert_close(a[0].attention_out[qs], one.attention_out[0].transpose(1, 0, 2),
                 tolerance(F32, "fwd"), "sequence 2 alone")


def test_tnd_trailing_zeros_do_not_count():
    """Trailing (0, 0) entries end the batch list: numels counts only the real sequences."""
    rng = np.random.default_rng(8)
    sq, sk = [3, 7, 0, 0], [4, 9, 0, 0]
    q, k, v, dy = make_qkv("TND", 1, 2, 1, 7, 9, 4, 4, F32, rng, actual_seq_qlen=sq,
                           actual_seq_kvlen=sk)
    numels = 2 * (3 * 4 + 4 * 5)
    dm = F.dropout_mask(numels, 0.5, 1)
    kw = dict(keep_prob=0.5, actual_seq_qlen=sq, actual_seq_kvlen=sk)
    check(q, k, v, dy, 2, "TND", F32, keep_of(dm, numels), dict(drop_mask=dm), **kw)
    with pytest.raises(FagValueError, match="drop_mask"):
        F.flash_attention_score(q, k, v, 2, "TND", drop_mask=dm[:-1], **kw)


# ------------------------------------------------------------------------------------------------
# 6. forward then backward: the grad's internal forward = the given statistics
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["mask", "seed"])
@pytest.mark.parametrize("layout,dt", [("BSND", F32), ("TND", F32), ("BNSD", F16)])
def test_forward_then_backward_consistency(path, layout, dt):
    rng = np.random.default_rng(30)
    n1, n2 = 2, 1
    kw = dict(keep_prob=0.7, scale_value=SCALE, atten_mask=TRI, sparse_mode=3)
    if layout == "TND":
        sq, sk = [4, 9, 11], [6, 8, 15]
        q, k, v, dy = make_qkv("TND", 1, n1, n2, 11, 15, 4, 4, dt, rng, actual_seq_qlen=sq,
                               actual_seq_kvlen=sk)
        kw.update(actual_seq_qlen=sq, actual_seq_kvlen=sk)
        numels = n1 * (4 * 6 + 5 * 2 + 2 * 7)
    else:
        q, k, v, dy = make_qkv(layout, 2, n1, n2, 10, 13, 4, 4, dt, rng)
        numels = 2 * n1 * 10 * 13
    fkw = (dict(seed=7, offset=11) if path == "seed"
           else dict(drop_mask=F.dropout_mask(numels, 0.7, 8)))
    fo = F.flash_attention_score(q, k, v, n1, layout, **fkw, **kw)
    given = F.flash_attention_score_grad(q, k, v, dy, n1, layout, softmax_max=fo.softmax_max,
                                         softmax_sum=fo.softmax_sum,
                                         attention_in=fo.attention_out, **fkw, **kw)
    internal = F.flash_attention_score_grad(q, k, v, dy, n1, layout, **fkw, **kw)
    if dt == F32:
        for x, y in zip(given[:3], internal[:3]):
            assert np.array_equal(x, y)
    else:   # attention_in rounded to float16 vs the internal float32 O
        for x, y, name in zip(given[:3], internal[:3], ("dq", "dk", "dv")):
            assert_close(x, y.astype(np.float64), tolerance(dt, "bwd"), name)


# ------------------------------------------------------------------------------------------------
# 7. keep_prob == 1 (after rounding to float32): drop_mask and seed are ignored
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kp", [1, 1.0, 1 - 1e-9, np.float32(1)])
def test_keep_prob_one_ignores_sources(kp):
    rng = np.random.default_rng(40)
    q, k, v, dy = make_qkv("BSND", 2, 2, 1, 6, 9, 4, 4, F32, rng)
    base = run_fag(q, k, v, dy, 2, "BSND", keep_prob=kp)
    zeros = np.zeros(1, np.uint8)                      # too short, and "drop everything"
    for fkw in (dict(drop_mask=zeros), dict(seed=3, offset=5),
                dict(drop_mask=zeros, seed=3), dict(drop_mask=np.zeros(3, np.float32))):
        assert_same(base, run_fag(q, k, v, dy, 2, "BSND", keep_prob=kp, **fkw))
    assert_same(base, run_fag(q, k, v, dy, 2, "BSND"))


# ------------------------------------------------------------------------------------------------
# 8. validation
# ------------------------------------------------------------------------------------------------

def _args():
    rng = np.random.default_rng(0)
    return make_qkv("BNSD", 2, 2, 1, 5, 7, 4, 4, F32, rng)


NUMELS = 2 * 2 * 5 * 7                  # 140 bits = 18 bytes
GOOD = np.zeros(18, np.uint8)

VALIDATION = [
    ("kp0", dict(keep_prob=0.0, drop_mask=GOOD), FagValueError, "keep_prob"),
    ("kp-neg", dict(keep_prob=-0.1, drop_mask=GOOD), FagValueError, "keep_prob"),
    ("kp>1", dict(keep_prob=1.5, drop_mask=GOOD), FagValueError, "keep_prob"),
    ("kp-nan", dict(keep_prob=float("nan"), drop_mask=GOOD), FagValueError, "keep_prob"),
    ("kp-inf", dict(keep_prob=float("inf"), drop_mask=GOOD), FagValueError, "keep_prob"),
    ("kp-underflow", dict(keep_prob=1e-46, drop_mask=GOOD), FagValueError, "keep_prob"),
    ("kp-str", dict(keep_prob="0.5", drop_mask=GOOD), FagTypeError, "keep_prob"),
    ("kp-bool", dict(keep_prob=True), FagTypeError, "keep_prob"),
    ("neither", dict(keep_prob=0.5), FagValueError, "drop_mask"),
    ("both", dict(keep_prob=0.5, drop_mask=GOOD, seed=1), FagValueError, "drop_mask"),
    ("mask-int8", dict(keep_prob=0.5, drop_mask=GOOD.astype(np.int8)), FagTypeError,
     "drop_mask"),
    ("mask-bool", dict(keep_prob=0.5, drop_mask=np.ones(NUMELS, bool)), FagTypeError,
     "drop_mask"),
    ("mask-list", dict(keep_prob=0.5, drop_mask=[0] * 18), FagTypeError, "drop_mask"),
    ("mask-short", dict(keep_prob=0.5, drop_mask=GOOD[:17]), FagValueError, "drop_mask"),
    ("mask-short-2d", dict(keep_prob=0.5, drop_mask=np.zeros((4, 4), np.uint8)), FagValueError,
     "drop_mask"),
    ("seed-neg", dict(keep_prob=0.5, seed=-1), FagValueError, "seed"),
    ("seed-big", dict(keep_prob=0.5, seed=2**64), FagValueError, "seed"),
    ("seed-float", dict(keep_prob=0.5, seed=1.0), FagTypeError, "seed"),
    ("seed-bool", dict(keep_prob=0.5, seed=True), FagTypeError, "seed"),
    ("offset-neg", dict(keep_prob=0.5, seed=1, offset=-1), FagValueError, "offset"),
    ("offset-big", dict(keep_prob=0.5, seed=1, offset=2**64), FagValueError, "offset"),
    ("offset-str", dict(keep_prob=0.5, seed=1, offset="0"), FagTypeError, "offset"),
]


@pytest.mark.parametrize("kw,exc,match", [pytest.param(*c[1:], id=c[0]) for c in VALIDATION])
def test_validation(kw, exc, match):
    q, k, v, dy = _args()
    with pytest.raises(exc, match=match) as e1:
        F.flash_attention_score(q, k, v, 2, "BNSD", **kw)
    assert "flash_attention_score:" in str(e1.value)
    with pytest.raises(exc, match=match) as e2:
        F.flash_attention_score_grad(q, k, v, dy, 2, "BNSD", **kw)
    assert "flash_attention_score_grad:" in str(e2.value)


def test_exact_length_drop_mask_accepted():
    q, k, v, dy = _args()
    F.flash_attention_score_grad(q, k, v, dy, 2, "BNSD", keep_prob=0.5, drop_mask=GOOD)
    F.flash_attention_score_grad(q, k, v, dy, 2, "BNSD", keep_prob=0.5, seed=2**64 - 1,
                                 offset=2**64 - 1)
