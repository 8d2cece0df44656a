"""End-to-end tests of the TND (varlen) layout (SPEC §8, §6, §7; ASCEND_FAG_NOTES §6-§8, §10.2).

- forward / backward vs the float64 reference and vs the per-sequence BSND computation stitched
  together (statistics in both softmax layouts);
- empty sequences (equal neighbours), trailing zeros (``[2, 5, 9, 0, 0]``), T1/T2 larger than the
  last offset (rows past it: out 0, invalid statistics, zero gradients, also when the backward is
  given garbage statistics for them);
- softmax_layout "" and "TND": forward -> grad round trips with statistics given as
  ``[T1,N1,8]``, ``[T1,N1,1]``, ``[T1,N1]``;
- masks: full ``[maxS1, maxS2]`` masks (modes 0, 1), compressed modes 2/3/4/6, modes 7 and 8 with
  the worked examples of the docs, random valid configurations; tile counts vs brute force;
- validation errors (each names its argument);
- work balancing: one long and many short sequences give bitwise the same result on 1 and 2
  threads.
"""
from __future__ import annotations


import ml_dtypes
import numba
import numpy as np
import pytest

import fag_numba
from fag_numba import api
from fag_numba.errors import FagTypeError, FagValueError
from reference import FLT_MAX, ref_backward, ref_computed, ref_forward, tnd_sequences
from tolerances import tolerance
from utils import assert_close, bwd_block_m, fwd_block_n, make_qkv

F32 = np.dtype(np.float32)
BF16 = np.dtype(ml_dtypes.bfloat16)
BM, BN, FBM, FBN = 4, 8, 5, 7
TRI = np.triu(np.ones((2048, 2048), dtype=bool), k=1)
TRI.flags.writeable = False
TRI6 = np.concatenate([TRI, np.repeat(np.r_[np.zeros(1024, bool), np.ones(1024, bool)][None],
                                      1024, axis=0)])
TRI6.flags.writeable = False


@pytest.fixture(autouse=True)
def _small_tiles(blocks):
    blocks(bm=BM, bn=BN, fbm=FBM, fbn=FBN, split=3)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def seqs_of(cq, ck):
    """[(q0, q1, k0, k1)] per batch entry (trailing zeros removed)."""
    return tnd_sequences(cq, ck)


def band_index(cq, ck, mode):
    with_rows = [b for b, (q0, q1, _, _) in enumerate(seqs_of(cq, ck)) if q1 > q0]
    if not with_rows:
        return None
    return with_rows[-1] if mode == 7 else with_rows[0]


def seq_predicate(cq, ck, b, atten_mask=None, sparse_mode=0, pre_tokens=2147483647,
                  next_tokens=2147483647, prefix=None, **_ignored):
    """bool [S1_b, S2_b] for sequence b (local indices), from the reference."""
    q0, q1, k0, k1 = seqs_of(cq, ck)[b]
    s1, s2 = q1 - q0, k1 - k0
    if atten_mask is None:
        return np.ones((s1, s2), bool)
    role = None
    if sparse_mode in (7, 8):
        role = "band" if b == band_index(cq, ck, sparse_mode) else "other"
    dense = None
    if sparse_mode in (0, 1):
        dense = atten_mask.reshape(atten_mask.shape[-2:])[:s1, :s2]
    return ref_computed(sparse_mode, s1, s2, pre_tokens, next_tokens,
                        None if prefix is None else prefix[b], dense, role)


def tile_count(cq, ck, n1, bm, bn, **kw):
    """Non-EMPTY tiles over every sequence and head (local tiling per sequence)."""
    n = 0
    for b in range(len(seqs_of(cq, ck))):
        c = seq_predicate(cq, ck, b, **kw)
        s1, s2 = c.shape
        for i0 in range(0, s1, bm):
            for j0 in range(0, s2, bn):
                n += bool(c[i0:i0 + bm, j0:j0 + bn].any())
    return n * n1


def tnd_inputs(cq, ck, N1, N2, D, Dv, dtype, seed, extra_q=0, extra_k=0):
    rng = np.random.default_rng(seed)
    T1 = max(cq) + extra_q
    T2 = max(ck) + extra_k
    return make_qkv("TND", 1, N1, N2, T1, T2, D, Dv, dtype, rng)


def rows_of(stats, cq, ck, n1, softmax_layout):
    """Statistics (lane 0) -> float64 [N1, T1] in true row order (rows past the end included)."""
    t1 = stats.shape[0]
    a = np.asarray(stats, dtype=np.float64)
    a = a[..., 0] if a.ndim == 3 else a
    if softmax_layout.upper() == "TND":
        return a.T.copy()
    flat = a.reshape(-1)
    rows = np.empty((n1, t1))
    end = 0
    for q0, q1, _, _ in seqs_of(cq, ck):
        rows[:, q0:q1] = flat[q0 * n1:q1 * n1].reshape(n1, q1 - q0)
        end = q1
    rows[:, end:] = flat[end * n1:].reshape(n1, t1 - end)
    return rows


def check_tnd(cq, ck, N1, N2, D, Dv, dtype, seed, *, extra_q=0, extra_k=0, softmax_layout="",
              **kw):
    """Backward (given the reference statistics) then forward, both vs the reference."""
    q, k, v, dy = tnd_inputs(cq, ck, N1, N2, D, Dv, dtype, seed, extra_q, extra_k)
    kw = dict(kw, actual_seq_qlen=cq, actual_seq_kvlen=ck, softmax_layout=softmax_layout)
    kw.setdefault("scale_value", 1.0 / np.sqrt(D))
    ro = ref_forward(q, k, v, N1, "TND", **kw)
    st = dict(softmax_max=ro[1].astype(np.float32), softmax_sum=ro[2].astype(np.float32),
              attention_in=ro[0].astype(np.float32))
    g = fag_numba.flash_attention_score_grad(q, k, v, dy, N1, "TND", **st, **kw)
    rg = ref_backward(q, k, v, dy, N1, "TND", **st, **kw)
    for name, a, e in zip(("dq", "dk", "dv"), g[:3], rg[:3]):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert_close(a, e, tolerance(dtype, "bwd"), name)
    bwd_tiles = api.last_tile_count["backward"]
    fo = fag_numba.flash_attention_score(q, k, v, N1, "TND", **kw)
    assert fo.softmax_max.shape == (q.shape[0], N1, 8)
    assert_close(fo.attention_out, ro[0], tolerance(dtype, "fwd"), "attention_out")
    assert_close(fo.softmax_max, ro[1], tolerance(dtype, "stats"), "softmax_max")
    assert_close(fo.softmax_sum, ro[2], tolerance(dtype, "stats"), "softmax_sum")
    for x in (fo.attention_out, fo.softmax_max, fo.softmax_sum, *g[:3]):
        assert np.isfinite(np.asarray(x, dtype=np.float64)).all()
    # tiles: exactly the non-EMPTY ones, local tiling per sequence
    assert bwd_tiles == tile_count(cq, ck, N1, bwd_block_m(BM, dtype, D, Dv), BN, **kw)
    assert api.last_tile_count["forward"] == tile_count(cq, ck, N1, FBM,
                                                        fwd_block_n(FBN, dtype, D, Dv), **kw)
    return (q, k, v, dy), fo, g


# ------------------------------------------------------------------------------------------------
# 1. against the reference: lengths, empty sequences, trailing zeros, extra rows
# ------------------------------------------------------------------------------------------------

LENGTHS = [
    pytest.param([5, 12, 20], [7, 11, 24], 0, 0, id="basic"),
    pytest.param([9], [13], 0, 0, id="one-seq"),
    pytest.param([3, 3, 8, 8], [4, 9, 9, 15], 0, 0, id="empty-seqs"),
    pytest.param([0, 6, 6], [5, 5, 11], 0, 0, id="empty-first"),
    pytest.param([2, 5, 9, 0, 0], [3, 5, 10, 0, 0], 0, 0, id="trailing-zeros"),
    pytest.param([4, 4, 10, 0], [6, 11, 11, 0], 3, 5, id="extra-rows-trailing"),
    pytest.param([6, 13], [8, 17], 4, 2, id="extra-rows"),
]


@pytest.mark.parametrize("softmax_layout", ["", "TND"])
@pytest.mark.parametrize("cq,ck,extra_q,extra_k", LENGTHS)
def test_tnd_vs_reference(cq, ck, extra_q, extra_k, softmax_layout):
    seed = sum(cq) + 3 * sum(ck) + len(softmax_layout)
    gqa = (1, 2, 4)[seed % 3]
    dtype = BF16 if seed % 4 == 0 else F32
    check_tnd(cq, ck, 4, 4 // gqa, 8, 6 if seed % 2 else 8, dtype, seed, extra_q=extra_q,
              extra_k=extra_k, softmax_layout=softmax_layout)


@pytest.mark.parametrize("softmax_layout", ["", "tnd"])
def test_empty_sequences_and_rows_past_the_end(softmax_layout):
    """Rows of sequences with S2_b = 0 and rows past the last offset: out 0, invalid statistics,
    dq 0; key rows of sequences with S1_b = 0 and past the last offset: dk = dv = 0 -- also when
    the backward is given garbage statistics / attention_in for those rows."""
    cq, ck = [3, 3, 8, 8, 12, 0], [4, 9, 9, 15, 20, 0]     # seqs: 3x4, 0x5, 5x0, 0x6, 4x5
    N1, N2, D = 2, 1, 8
    (q, k, v, dy), fo, _ = check_tnd(cq, ck, N1, N2, D, D, F32, 21, extra_q=3, extra_k=4,
                                     softmax_layout=softmax_layout, atten_mask=TRI,
                                     sparse_mode=3)
    T1, T2 = q.shape[0], k.shape[0]
    dead_q = np.zeros(T1, bool)
    dead_q[3:8] = True               # the S2 = 0 sequence
    dead_q[12:] = True               # past the last offset
    dead_k = np.zeros(T2, bool)
    dead_k[4:9] = True               # S1 = 0 sequences
    dead_k[9:15] = True
    dead_k[20:] = True
    assert (fo.attention_out[dead_q] == 0).all()
    m = rows_of(fo.softmax_max, cq, ck, N1, softmax_layout)
    l = rows_of(fo.softmax_sum, cq, ck, N1, softmax_layout)
    assert (m[:, dead_q] == -FLT_MAX).all() and (l[:, dead_q] == FLT_MAX).all()
    assert (fo.softmax_max == fo.softmax_max[..., :1]).all()      # 8 equal lanes
    kw = dict(actual_seq_qlen=cq, actual_seq_kvlen=ck, softmax_layout=softmax_layout,
              atten_mask=TRI, sparse_mode=3, scale_value=1 / np.sqrt(D))
    good = fag_numba.flash_attention_score_grad(
        q, k, v, dy, N1, "TND", softmax_max=fo.softmax_max, softmax_sum=fo.softmax_sum,
        attention_in=fo.attention_out, **kw)
    assert (good.dq[dead_q] == 0).all()
    assert (good.dk[dead_k] == 0).all() and (good.dv[dead_k] == 0).all()
    # garbage for the dead rows: same memory positions in either layout
    sel = np.zeros((T1, N1), bool)
    if softmax_layout == "":
        flat = np.zeros(T1 * N1, bool)
        flat[3 * N1:8 * N1] = True
        flat[12 * N1:] = True
        sel = flat.reshape(T1, N1)
    else:
        sel[dead_q] = True
    rng = np.random.default_rng(22)
    o_bad = fo.attention_out.copy()
    o_bad[dead_q] = rng.standard_normal(o_bad[dead_q].shape)
    for mval, lval in [(0.0, 0.0), (FLT_MAX, 0.0), (-3.0, 1e-30)]:
        mm, ll = fo.softmax_max.copy(), fo.softmax_sum.copy()
        mm[sel] = mval
        ll[sel] = lval
        bad = fag_numba.flash_attention_score_grad(
            q, k, v, dy, N1, "TND", softmax_max=mm, softmax_sum=ll, attention_in=o_bad, **kw)
        for a, e in zip(bad[:3], good[:3]):
            assert np.array_equal(a, e)


# ------------------------------------------------------------------------------------------------
# 2. against the per-sequence BSND computation stitched together
# ------------------------------------------------------------------------------------------------

def _per_seq_kw(cq, ck, b, kw):
    """The BSND options of sequence b that reproduce the TND options."""
    mode = kw.get("sparse_mode", 0)
    mask = kw.get("atten_mask")
    out = {k: v for k, v in kw.items() if k not in ("atten_mask", "prefix", "sparse_mode")}
    q0, q1, k0, k1 = seqs_of(cq, ck)[b]
    if mask is None:
        return out
    if mode in (0, 1):
        out.update(atten_mask=np.ascontiguousarray(mask.reshape(mask.shape[-2:])[:q1 - q0, :k1 - k0]),
                   sparse_mode=mode)
    elif mode in (7, 8):
        if b == band_index(cq, ck, mode):
            out.update(atten_mask=TRI, sparse_mode=4)
        else:
            out.update(atten_mask=TRI, sparse_mode=3 if mode == 7 else 2)
    else:
        out.update(atten_mask=mask, sparse_mode=mode)
        if mode == 6:
            out["prefix"] = [kw["prefix"][b]]
    return out


STITCH = [
    pytest.param([6, 10, 19], [9, 10, 22], {}, id="nomask"),
    pytest.param([6, 10, 19], [9, 14, 22], dict(atten_mask="full", sparse_mode=0, pre_tokens=4,
                                                next_tokens=2), id="sm0"),
    pytest.param([6, 10, 19], [9, 14, 22], dict(atten_mask="full", sparse_mode=1), id="sm1"),
    pytest.param([6, 13, 19], [9, 14, 22], dict(atten_mask=TRI, sparse_mode=2), id="sm2"),
    pytest.param([6, 13, 19], [9, 14, 22], dict(atten_mask=TRI, sparse_mode=3), id="sm3"),
    pytest.param([6, 13, 19], [9, 14, 22], dict(atten_mask=TRI, sparse_mode=4, pre_tokens=3,
                                                next_tokens=1), id="sm4"),
    pytest.param([6, 13, 19], [9, 14, 22], dict(atten_mask=TRI6, sparse_mode=6,
                                                prefix=[5, 1, 3]), id="sm6"),
    pytest.param([4, 9, 16], [7, 13, 21], dict(atten_mask=TRI, sparse_mode=7, pre_tokens=9,
                                               next_tokens=-1), id="sm7"),
    pytest.param([5, 9, 16], [7, 13, 21], dict(atten_mask=TRI, sparse_mode=8, pre_tokens=7,
                                               next_tokens=3), id="sm8"),
]


@pytest.mark.parametrize("softmax_layout", ["", "TND"])
@pytest.mark.parametrize("cq,ck,kw", STITCH)
def test_tnd_equals_stitched_bsnd(cq, ck, kw, softmax_layout):
    N1, N2, D, Dv = 2, 1, 8, 8
    kw = dict(kw, scale_value=0.35)
    rng = np.random.default_rng(31)
    if isinstance(kw.get("atten_mask"), str):
        ms1 = max(q1 - q0 for q0, q1, _, _ in seqs_of(cq, ck))
        ms2 = max(k1 - k0 for _, _, k0, k1 in seqs_of(cq, ck))
        kw["atten_mask"] = (rng.random((ms1, ms2)) < 0.3).astype(np.uint8)
    if kw.get("sparse_mode") == 6:
        # prefix rules: [S2 - S1, S2] when S1 <= S2, else [0, S2]
        kw["prefix"] = [min(k1 - k0, max(0, (k1 - k0) - (q1 - q0)) + p) for (q0, q1, k0, k1), p
                        in zip(seqs_of(cq, ck), kw["prefix"])]
    q, k, v, dy = tnd_inputs(cq, ck, N1, N2, D, Dv, F32, 32)
    tkw = dict(kw, actual_seq_qlen=cq, actual_seq_kvlen=ck, softmax_layout=softmax_layout)
    fo = fag_numba.flash_attention_score(q, k, v, N1, "TND", **tkw)
    g = fag_numba.flash_attention_score_grad(q, k, v, dy, N1, "TND", softmax_max=fo.softmax_max,
                                             softmax_sum=fo.softmax_sum,
                                             attention_in=fo.attention_out, **tkw)
    m_rows = rows_of(fo.softmax_max, cq, ck, N1, softmax_layout)
    l_rows = rows_of(fo.softmax_sum, cq, ck, N1, softmax_layout)
    dk = np.zeros(k.shape)
    dv = np.zeros(v.shape)
    for b, (q0, q1, k0, k1) in enumerate(seqs_of(cq, ck)):
        bkw = _per_seq_kw(cq, ck, b, kw)
        args = (q[None, q0:q1], k[None, k0:k1], v[None, k0:k1])
        so = fag_numba.flash_attention_score(*args, N1, "BSND", **bkw)
        sg = fag_numba.flash_attention_score_grad(*args, dy[None, q0:q1], N1, "BSND",
                                                  softmax_max=so.softmax_max,
                                                  softmax_sum=so.softmax_sum,
                                                  attention_in=so.attention_out, **bkw)
        tol_f, tol_b = tolerance(F32, "fwd"), tolerance(F32, "bwd")
        assert_close(fo.attention_out[q0:q1], so.attention_out[0], tol_f, f"out seq {b}")
        assert_close(m_rows[:, q0:q1], so.softmax_max[0, :, :, 0], tol_f, f"max seq {b}")
        assert_close(l_rows[:, q0:q1], so.softmax_sum[0, :, :, 0], tol_f, f"sum seq {b}")
        if softmax_layout == "":
            # SPEC §8.3: per-sequence head-major memory = the BSND [1, N1, S1_b, 8] block
            blk = fo.softmax_max.reshape(-1)[q0 * N1 * 8:q1 * N1 * 8]
            assert_close(blk, so.softmax_max.reshape(-1), tol_f, f"max memory seq {b}")
        assert_close(g.dq[q0:q1], sg.dq[0], tol_b, f"dq seq {b}")
        dk[k0:k1] += sg.dk[0]
        dv[k0:k1] += sg.dv[0]
    assert_close(g.dk, dk, tolerance(F32, "bwd"), "dk")
    assert_close(g.dv, dv, tolerance(F32, "bwd"), "dv")
    # and against the reference
    ro = ref_forward(q, k, v, N1, "TND", **tkw)
    assert_close(fo.attention_out, ro[0], tolerance(F32, "fwd"))
    assert_close(fo.softmax_sum, ro[2], tolerance(F32, "stats"))


# ------------------------------------------------------------------------------------------------
# 3. softmax_layout round trips, statistics shapes
# ------------------------------------------------------------------------------------------------

def test_softmax_layout_round_trips():
    cq, ck = [5, 5, 12, 20], [7, 11, 11, 24]
    N1, N2, D = 3, 1, 8
    q, k, v, dy = tnd_inputs(cq, ck, N1, N2, D, D, F32, 41, extra_q=2)
    base = dict(actual_seq_qlen=cq, actual_seq_kvlen=ck, atten_mask=TRI, sparse_mode=2,
                scale_value=0.3)
    results = {}
    for sl in ("", "TND", "tnd"):
        fo = fag_numba.flash_attention_score(q, k, v, N1, "TND", softmax_layout=sl, **base)
        results[sl] = fo
        internal = fag_numba.flash_attention_score_grad(q, k, v, dy, N1, "TND",
                                                        softmax_layout=sl, **base)
        for form in ("8", "1", "none"):
            def shape(x):
                return {"8": x, "1": x[..., :1].copy(), "none": x[..., 0].copy()}[form]
            g = fag_numba.flash_attention_score_grad(
                q, k, v, dy, N1, "TND", softmax_max=shape(fo.softmax_max),
                softmax_sum=shape(fo.softmax_sum), attention_in=fo.attention_out,
                softmax_layout=sl, **base)
            for a, e in zip(g[:3], internal[:3]):
                assert np.array_equal(a, e), (sl, form)
    # the two layouts hold the same values in different memory orders (SPEC §8.3)
    a, b = results[""], results["TND"]
    assert np.array_equal(a.attention_out, b.attention_out)
    assert np.array_equal(rows_of(a.softmax_max, cq, ck, N1, ""),
                          rows_of(b.softmax_max, cq, ck, N1, "TND"))
    assert np.array_equal(rows_of(a.softmax_sum, cq, ck, N1, ""),
                          rows_of(b.softmax_sum, cq, ck, N1, "TND"))
    assert np.array_equal(results["tnd"].softmax_max, b.softmax_max)
    # explicit offsets: "" -> (cu[b]*N1 + h*S1_b + i)*8, "TND" -> ((cu[b] + i)*N1 + h)*8
    fa, fb = a.softmax_max.reshape(-1), b.softmax_max.reshape(-1)
    for q0, q1, _, _ in seqs_of(cq, ck):
        s1 = q1 - q0
        for h in range(N1):
            for i in range(s1):
                assert fa[(q0 * N1 + h * s1 + i) * 8] == fb[((q0 + i) * N1 + h) * 8]
    # the layouts differ for B > 1, so reading one as the other gives a different backward
    wrong = fag_numba.flash_attention_score_grad(
        q, k, v, dy, N1, "TND", softmax_max=a.softmax_max, softmax_sum=a.softmax_sum,
        attention_in=a.attention_out, softmax_layout="TND", **base)
    assert not np.array_equal(wrong.dq, internal.dq)


# ------------------------------------------------------------------------------------------------
# 4. masks in TND
# ------------------------------------------------------------------------------------------------

def fag_predicate(cq, ck, **kw):
    """Read the computed set back from fag_numba itself: scores all 0 and value rows one-hot in
    the local key position, so out[t, h, j] > 0 iff (i, j) is computed (N1 = 1, D = maxS2)."""
    seqs = seqs_of(cq, ck)
    ms2 = max(k1 - k0 for _, _, k0, k1 in seqs)
    T1, T2 = max(cq), max(ck)
    q = np.zeros((T1, 1, ms2), np.float32)
    k = np.zeros((T2, 1, ms2), np.float32)
    v = np.zeros((T2, 1, ms2), np.float32)
    for _, _, k0, k1 in seqs:
        v[k0:k1, 0, :k1 - k0] = np.eye(k1 - k0)
    fo = fag_numba.flash_attention_score(q, k, v, 1, "TND", actual_seq_qlen=cq,
                                         actual_seq_kvlen=ck, **kw)
    return [fo.attention_out[q0:q1, 0, :k1 - k0] > 0 for q0, q1, k0, k1 in seqs]


def G(text):
    return np.array([[ch == "1" for ch in row.strip()] for row in text.strip().splitlines()])


def test_mode7_worked_example():
    """Docs, mode 7: pre=6, next=-2, actual_seq_qlen=[3,5], actual_seq_kvlen=[3,9]: the last
    sequence (2 x 6) is the band (j <= i + 2), the first one right-down causal."""
    kw = dict(atten_mask=TRI, sparse_mode=7, pre_tokens=6, next_tokens=-2)
    expected = [G("100\n110\n111"), G("111000\n111100")]
    got = fag_predicate([3, 5], [3, 9], **kw)
    for b, (g, e) in enumerate(zip(got, expected)):
        np.testing.assert_array_equal(g, e)
        np.testing.assert_array_equal(seq_predicate([3, 5], [3, 9], b, **kw), e)
    check_tnd([3, 5], [3, 9], 2, 1, 8, 8, F32, 51, **kw)


def test_mode8_worked_example():
    """Docs, mode 8: pre=4, next=1, actual_seq_qlen=[3,8,12], actual_seq_kvlen=[4,9,13]: the first
    sequence (3 x 4) is the band (i - 3 <= j <= i + 2), the others left-up causal."""
    kw = dict(atten_mask=TRI, sparse_mode=8, pre_tokens=4, next_tokens=1)
    lower5 = np.tril(np.ones((5, 5), bool))
    expected = [G("1110\n1111\n1111"), lower5, lower5[:4, :4]]
    cq, ck = [3, 8, 12], [4, 9, 13]
    got = fag_predicate(cq, ck, **kw)
    for b, (g, e) in enumerate(zip(got, expected)):
        np.testing.assert_array_equal(g, e)
        np.testing.assert_array_equal(seq_predicate(cq, ck, b, **kw), e)
    check_tnd(cq, ck, 2, 1, 8, 8, F32, 52, softmax_layout="TND", **kw)


@pytest.mark.parametrize("mode", [7, 8])
def test_mode78_band_sequence_skips_empty_sequences(mode):
    """The band sequence is the last (7) / first (8) with S1_b > 0: empty ones are skipped."""
    cq, ck = [0, 4, 9, 9], [3, 8, 15, 19]       # seqs: 0x3, 4x5, 5x7, 0x4
    kw = dict(atten_mask=TRI, sparse_mode=mode, pre_tokens=9,
              next_tokens=-1 if mode == 7 else 1)
    band = band_index(cq, ck, mode)
    assert band == (2 if mode == 7 else 1)
    got = fag_predicate(cq, ck, **kw)
    for b in range(4):
        np.testing.assert_array_equal(got[b], seq_predicate(cq, ck, b, **kw))
    check_tnd(cq, ck, 2, 2, 8, 8, F32, 53 + mode, **kw)


MASKED = [
    pytest.param(dict(atten_mask="full-bool", sparse_mode=0, pre_tokens=3, next_tokens=5),
                 id="sm0-bool"),
    pytest.param(dict(atten_mask="full-u8-rank4", sparse_mode=0, pre_tokens=9, next_tokens=-2),
                 id="sm0-u8-rank4-neg"),
    pytest.param(dict(atten_mask="full-u8", sparse_mode=1), id="sm1-u8"),
    pytest.param(dict(atten_mask=TRI, sparse_mode=2), id="sm2"),
    pytest.param(dict(atten_mask=TRI[None, None], sparse_mode=3), id="sm3-rank4"),
    pytest.param(dict(atten_mask=TRI.astype(np.uint8), sparse_mode=4, pre_tokens=2,
                      next_tokens=0), id="sm4-u8"),
    pytest.param(dict(atten_mask=TRI6, sparse_mode=6, prefix="rand"), id="sm6"),
]


@pytest.mark.parametrize("kw", MASKED)
def test_masks_in_tnd(kw):
    cq, ck = [7, 7, 15, 26], [9, 14, 22, 33]         # seqs 7x9, 0x5, 8x8, 11x11
    rng = np.random.default_rng(61)
    kw = dict(kw)
    m = kw["atten_mask"]
    if isinstance(m, str):
        shape = (11, 11) if "rank4" not in m else (1, 1, 11, 11)
        mask = rng.random(shape) < 0.3
        mask[..., 0, :] = True                      # a fully masked row in every sequence
        kw["atten_mask"] = mask.astype(np.uint8) * 5 if "u8" in m else mask
    if kw.get("prefix") == "rand":
        kw["prefix"] = [int(rng.integers(s2 - s1 if s1 <= s2 else 0, s2 + 1))
                        for s1, s2 in ((7, 9), (0, 5), (8, 8), (11, 11))]
    snap = kw["atten_mask"].copy()
    check_tnd(cq, ck, 4, 2, 8, 8, F32 if kw["sparse_mode"] != 2 else BF16, 62,
              softmax_layout="TND" if kw["sparse_mode"] % 2 else "", **kw)
    np.testing.assert_array_equal(kw["atten_mask"], snap)


def _random_config(seed):
    """A random valid TND configuration: lengths (with empty sequences), mode, tokens, mask."""
    rng = np.random.default_rng(seed)
    mode = (0, 1, 2, 3, 4, 6, 7, 8)[seed % 8]
    B = int(rng.integers(1, 6))
    for _ in range(1000):
        s1 = rng.integers(0, 12, size=B)
        s2 = rng.integers(0, 12, size=B)
        s1[rng.random(B) < 0.15] = 0
        if mode == 7:
            s2 = np.maximum(s2, s1)          # non-band sequences need S1 <= S2
        if s1.sum() and s2.sum():
            break
    cq = np.cumsum(s1).tolist()
    ck = np.cumsum(s2).tolist()
    if rng.random() < 0.3:
        cq, ck = cq + [0], ck + [0]          # trailing zeros
    kw = dict(sparse_mode=mode)
    live = (s1 > 0) & (s2 > 0)
    if mode in (0, 1):
        mask = rng.random((int(s1.max()), int(s2.max()))) < 0.25
        kw["atten_mask"] = mask.astype(np.uint8) if rng.random() < 0.5 else mask
    elif mode == 6:
        kw["atten_mask"] = TRI6
    else:
        kw["atten_mask"] = TRI
    if mode in (0, 4):
        for _ in range(1000):
            pre, nxt = (int(x) for x in rng.integers(-8, 12, size=2))
            if mode == 0:
                pp, nn = np.full(B, pre), np.full(B, nxt)
            else:
                pp, nn = pre + s1 - s2, nxt - s1 + s2
            ok = ~live | ((-pp <= s2) & (-nn <= s1))
            if pre + nxt >= 0 and ok.all():
                break
        kw.update(pre_tokens=pre, next_tokens=nxt)
    if mode in (7, 8):
        band = band_index(cq, ck, mode)
        sb1, sb2 = int(s1[band]), int(s2[band])
        pre = sb2 + int(rng.integers(0, 4))
        if mode == 7:                        # S1_b <= S2_b everywhere (see above)
            nxt = int(rng.integers(sb1 - sb2, 1))
        else:
            nxt = sb1 - sb2 + int(rng.integers(0, 4))
        kw.update(pre_tokens=pre, next_tokens=nxt)
    if mode == 6:
        kw["prefix"] = [int(rng.integers(b2 - b1 if 0 < b1 <= b2 else 0, b2 + 1))
                        for b1, b2 in zip(s1, s2)]
    return cq, ck, kw


@pytest.mark.parametrize("seed", range(10))
def test_random_valid_configs(seed):
    cq, ck, kw = _random_config(1000 + seed)
    rng = np.random.default_rng(seed)
    n1, g = [(1, 1), (2, 2), (4, 2), (3, 3)][seed % 4]
    check_tnd(cq, ck, n1, n1 // g, 8, 8, F32, seed, extra_q=int(rng.integers(0, 3)),
              softmax_layout=("", "TND")[seed % 2], **kw)


WIDE = dict(atten_mask=TRI6, sparse_mode=6, prefix=[3, 18])     # seqs 4x6, 20x20


@pytest.mark.parametrize("softmax_layout", ["", "TND"])
def test_mode6_wide_prefix(softmax_layout):
    """Regression (kernels/driver.py::kv_block_range ignored prefix columns past the band):
    actual_seq_qlen=[4, 24], actual_seq_kvlen=[6, 26], prefix [3, 18], forward tiles 5 x 7: rows
    0..4 of sequence 1 must see key columns 0..17, not only 0..6."""
    check_tnd([4, 24], [6, 26], 2, 1, 8, 8, F32, 101, softmax_layout=softmax_layout, **WIDE)


@pytest.mark.parametrize("mode", [2, 5, 7, 8])
def test_no_mask_in_tnd_is_full_attention(mode):
    cq, ck = [3, 9], [5, 6]
    q, k, v, dy = tnd_inputs(cq, ck, 2, 1, 8, 8, F32, 71)
    base = fag_numba.flash_attention_score(q, k, v, 2, "TND", actual_seq_qlen=cq,
                                           actual_seq_kvlen=ck)
    # tokens that break the mode 7/8 band rules, mode 5 (not TND), no prefix: not validated
    with pytest.warns(UserWarning, match=f"sparse_mode {mode}"):
        fo = fag_numba.flash_attention_score(q, k, v, 2, "TND", actual_seq_qlen=cq,
                                             actual_seq_kvlen=ck, sparse_mode=mode,
                                             pre_tokens=-50, next_tokens=7)
    assert all(np.array_equal(a, b) for a, b in zip(fo, base))


# ------------------------------------------------------------------------------------------------
# 5. validation
# ------------------------------------------------------------------------------------------------

CQ, CK = [3, 8, 12], [4, 9, 13]          # seqs 3x4, 5x5, 4x4


@pytest.fixture(scope="module")
def tnd_small():
    rng = np.random.default_rng(81)
    return make_qkv("TND", 1, 2, 1, 12, 13, 4, 4, F32, rng)


def _fwd(x, **kw):
    q, k, v, _ = x
    kw.setdefault("actual_seq_qlen", CQ)
    kw.setdefault("actual_seq_kvlen", CK)
    return fag_numba.flash_attention_score(q, k, v, 2, "TND", **kw)


def _bwd(x, **kw):
    q, k, v, dy = x
    kw.setdefault("actual_seq_qlen", CQ)
    kw.setdefault("actual_seq_kvlen", CK)
    return fag_numba.flash_attention_score_grad(q, k, v, dy, 2, "TND", **kw)


SEQ_ERRORS = [
    # (qlen, kvlen, exception, match)
    (None, CK, FagValueError, "actual_seq_qlen"),
    (CQ, None, FagValueError, "actual_seq_kvlen"),
    (None, None, FagValueError, "actual_seq_qlen"),
    ([3, 8], CK, FagValueError, "actual_seq_qlen"),              # unequal lengths
    ([], [], FagValueError, "actual_seq_qlen"),
    ([3, 2, 12], CK, FagValueError, "actual_seq_qlen"),          # decreasing
    (CQ, [4, 9, 5], FagValueError, "actual_seq_kvlen"),
    ([-1, 8, 12], CK, FagValueError, "actual_seq_qlen"),         # negative first offset
    ([3, 8, 0], CK, FagValueError, "actual_seq_qlen"),           # a drop to 0 in one list only
    (CQ, [4, 9, 0], FagValueError, "actual_seq_kvlen"),
    ([3, 0, 12], [4, 0, 13], FagValueError, "actual_seq"),       # non-zero after trailing zeros
    ([3, 8, 0, 0, 5], [4, 9, 0, 0, 6], FagValueError, "actual_seq"),
    ([3, 8, 13], CK, FagValueError, "actual_seq_qlen"),          # T1 = 12 < last offset
    (CQ, [4, 9, 14], FagValueError, "actual_seq_kvlen"),         # T2 = 13 < last offset
    ([3.0, 8.0, 12.0], CK, FagTypeError, "actual_seq_qlen"),
    (CQ, "4,9,13", FagTypeError, "actual_seq_kvlen"),
    (np.array(CQ, np.float32), CK, FagTypeError, "actual_seq_qlen"),
    (np.array([CQ]), CK, FagTypeError, "actual_seq_qlen"),
    ([True, 8, 12], CK, FagTypeError, "actual_seq_qlen"),
    (3, CK, FagTypeError, "actual_seq_qlen"),
]


@pytest.mark.parametrize("cq,ck,exc,match", SEQ_ERRORS,
                         ids=[f"{i}-{m}" for i, (_, _, _, m) in enumerate(SEQ_ERRORS)])
def test_actual_seq_errors(tnd_small, cq, ck, exc, match):
    for fn in (_fwd, _bwd):
        with pytest.raises(exc, match=match):
            fn(tnd_small, actual_seq_qlen=cq, actual_seq_kvlen=ck)


def test_actual_seq_accepted_forms(tnd_small):
    base = _fwd(tnd_small)
    for cq, ck in [(tuple(CQ), tuple(CK)), (np.array(CQ, np.int32), np.array(CK, np.int64)),
                   ([np.int64(x) for x in CQ], CK), (CQ + [0, 0], CK + [0, 0])]:
        out = _fwd(tnd_small, actual_seq_qlen=cq, actual_seq_kvlen=ck)
        assert all(np.array_equal(a, b) for a, b in zip(out, base))


def test_actual_seq_rejected_for_other_layouts():
    rng = np.random.default_rng(82)
    q, k, v, dy = make_qkv("BSND", 1, 2, 2, 4, 4, 4, 4, F32, rng)
    for name in ("actual_seq_qlen", "actual_seq_kvlen"):
        with pytest.raises(FagValueError, match=name):
            fag_numba.flash_attention_score(q, k, v, 2, "BSND", **{name: [4]})
        with pytest.raises(FagValueError, match=name):
            fag_numba.flash_attention_score_grad(q, k, v, dy, 2, "BSND", **{name: [4]})
    with pytest.raises(FagValueError, match="softmax_layout"):
        fag_numba.flash_attention_score(q, k, v, 2, "BSND", softmax_layout="TND")
    with pytest.raises(FagValueError, match="sparse_mode"):
        fag_numba.flash_attention_score(q, k, v, 2, "BSND", atten_mask=TRI, sparse_mode=7)
    with pytest.raises(FagValueError, match="sparse_mode"):
        fag_numba.flash_attention_score_grad(q, k, v, dy, 2, "BSND", atten_mask=TRI,
                                             sparse_mode=8)


MODE_ERRORS = [
    # mode 5 is not TND
    (dict(atten_mask=np.zeros((5, 5), bool), sparse_mode=5, prefix=[4, 5, 4]), "sparse_mode"),
    # mode 7, band = last sequence 4x4: pre >= S2 = 4, S1 - S2 = 0 <= next <= 0
    (dict(atten_mask=TRI, sparse_mode=7, pre_tokens=3, next_tokens=0), "pre_tokens"),
    (dict(atten_mask=TRI, sparse_mode=7, pre_tokens=4, next_tokens=1), "next_tokens"),
    (dict(atten_mask=TRI, sparse_mode=7, pre_tokens=4, next_tokens=-1), "next_tokens"),
    # mode 8, band = first sequence 3x4: pre >= 4, next >= -1
    (dict(atten_mask=TRI, sparse_mode=8, pre_tokens=3, next_tokens=0), "pre_tokens"),
    (dict(atten_mask=TRI, sparse_mode=8, pre_tokens=4, next_tokens=-2), "next_tokens"),
    # tokens of mode 0 / 4, per sequence
    (dict(atten_mask=np.zeros((5, 5), bool), sparse_mode=0, pre_tokens=-5, next_tokens=9),
     "pre_tokens"),
    (dict(atten_mask=np.zeros((5, 5), bool), sparse_mode=0, pre_tokens=2, next_tokens=-3),
     "pre_tokens|next_tokens"),
    (dict(atten_mask=TRI, sparse_mode=4, pre_tokens=-6, next_tokens=7), "pre_tokens"),
    # masks: shape
    (dict(atten_mask=np.zeros((3, 1, 5, 5), bool), sparse_mode=0), "atten_mask"),
    (dict(atten_mask=np.zeros((3, 2, 5, 5), bool), sparse_mode=1), "atten_mask"),
    (dict(atten_mask=np.zeros((12, 13), bool), sparse_mode=1), "atten_mask"),      # [T1, T2]
    (dict(atten_mask=np.zeros((5, 6), bool), sparse_mode=1), "atten_mask"),
    (dict(atten_mask=TRI, sparse_mode=0), "atten_mask"),
    (dict(atten_mask=np.zeros((5, 5), bool), sparse_mode=3), "atten_mask"),
    (dict(atten_mask=TRI6, sparse_mode=7, pre_tokens=4, next_tokens=0), "atten_mask"),
    (dict(atten_mask=~TRI, sparse_mode=8, pre_tokens=4, next_tokens=0), "atten_mask"),
    (dict(atten_mask=np.zeros((5, 5), np.int8), sparse_mode=1), "atten_mask"),
    # prefix: one per sequence (after trailing zeros), in range
    (dict(atten_mask=TRI6, sparse_mode=6, prefix=[4, 5]), "prefix"),
    (dict(atten_mask=TRI6, sparse_mode=6, prefix=[0, 5, 4]), "prefix"),      # 3x4: >= 1
]


@pytest.mark.parametrize("kw,match", MODE_ERRORS,
                         ids=[f"{i}-{m.split('|')[0]}" for i, (_, m) in enumerate(MODE_ERRORS)])
def test_mode_errors(tnd_small, kw, match):
    exc = FagTypeError if kw["atten_mask"].dtype == np.int8 else FagValueError
    for fn in (_fwd, _bwd):
        with pytest.raises(exc, match=match):
            fn(tnd_small, **kw)


def test_mode7_other_sequences_need_s1_le_s2(tnd_small):
    q, k, v, dy = tnd_small
    with pytest.raises(FagValueError, match="actual_seq"):
        fag_numba.flash_attention_score(q, k, v, 2, "TND", actual_seq_qlen=[5, 8, 12],
                                        actual_seq_kvlen=[4, 9, 13], atten_mask=TRI,
                                        sparse_mode=7, pre_tokens=4, next_tokens=0)
    # ... but the band sequence itself may not (it is the last one with S1 > 0)
    with pytest.raises(FagValueError, match="next_tokens"):
        fag_numba.flash_attention_score(q, k, v, 2, "TND", actual_seq_qlen=[3, 8, 12],
                                        actual_seq_kvlen=[4, 9, 12], atten_mask=TRI,
                                        sparse_mode=7, pre_tokens=4, next_tokens=0)


def test_token_checks_skip_empty_sequences(tnd_small):
    """Mode 0 tokens are checked per sequence, skipping sequences with S1_b = 0 or S2_b = 0."""
    q, k, v, dy = tnd_small
    kw = dict(atten_mask=np.zeros((5, 5), bool), sparse_mode=0, pre_tokens=9, next_tokens=-4)
    # seqs 3x4 (next=-4: -next > S1 = 3 -> error) ...
    with pytest.raises(FagValueError, match="next_tokens"):
        _fwd(tnd_small, **kw)
    # ... made empty (0x4): skipped
    cq, ck = [0, 5, 9], [4, 9, 13]
    q2 = q[:9]
    fo = fag_numba.flash_attention_score(q2, k, v, 2, "TND", actual_seq_qlen=cq,
                                         actual_seq_kvlen=ck, **kw)
    ro = ref_forward(q2, k, v, 2, "TND", actual_seq_qlen=cq, actual_seq_kvlen=ck, **kw)
    assert_close(fo.attention_out, ro[0], tolerance(F32, "fwd"))


def test_softmax_layout_and_stats_errors(tnd_small):
    q, k, v, dy = tnd_small
    with pytest.raises(FagValueError, match="softmax_layout"):
        _fwd(tnd_small, softmax_layout="BSH")
    with pytest.raises(FagValueError, match="softmax_layout"):
        _bwd(tnd_small, softmax_layout="same_as_input")
    with pytest.raises(FagTypeError, match="softmax_layout"):
        _fwd(tnd_small, softmax_layout=None)
    with pytest.raises(FagTypeError, match="softmax_layout"):
        _bwd(tnd_small, softmax_layout=1)
    T1, N1 = q.shape[0], q.shape[1]
    o = np.zeros(dy.shape, np.float32)
    good = np.zeros((T1, N1, 8), np.float32)
    for sl in ("", "TND"):
        for bad in [np.zeros((N1, T1, 8), np.float32),       # the kernel's transposed form
                    np.zeros((T1, N1, 2), np.float32), np.zeros((T1 * N1,), np.float32),
                    np.zeros((T1 + 1, N1, 8), np.float32), np.zeros((1, T1, N1, 8), np.float32)]:
            with pytest.raises(FagValueError, match="softmax_max"):
                _bwd(tnd_small, softmax_layout=sl, softmax_max=bad, softmax_sum=good,
                     attention_in=o)
            with pytest.raises(FagValueError, match="softmax_sum"):
                _bwd(tnd_small, softmax_layout=sl, softmax_max=good, softmax_sum=bad,
                     attention_in=o)
        with pytest.raises(FagTypeError, match="softmax_max"):
            _bwd(tnd_small, softmax_layout=sl, softmax_max=good.astype(np.float64),
                 softmax_sum=good, attention_in=o)
        with pytest.raises(FagValueError, match="attention_in"):
            _bwd(tnd_small, softmax_layout=sl, softmax_max=good, softmax_sum=good,
                 attention_in=o[:-1])


# ------------------------------------------------------------------------------------------------
# 6. work balancing: bitwise identical on 1 and 2 threads
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
@pytest.mark.parametrize("kw", [{}, dict(atten_mask=TRI, sparse_mode=3)], ids=["full", "sm3"])
def test_one_long_many_short_threads_bitwise(kw):
    rng = np.random.default_rng(91)
    s1 = np.r_[97, rng.integers(1, 5, size=24)]
    s2 = np.r_[90, rng.integers(1, 6, size=24)]
    s2 = np.maximum(s2, s1) if kw else s2
    rng.shuffle(perm := np.arange(s1.size))
    s1, s2 = s1[perm], s2[perm]
    cq, ck = np.cumsum(s1).tolist(), np.cumsum(s2).tolist()
    N1, N2, D = 2, 1, 16
    q, k, v, dy = tnd_inputs(cq, ck, N1, N2, D, D, F32, 92)
    tkw = dict(kw, actual_seq_qlen=cq, actual_seq_kvlen=ck, scale_value=0.25)
    runs = []
    old = numba.get_num_threads()
    try:
        for nt in (1, 2, 1):
            numba.set_num_threads(nt)
            fo = fag_numba.flash_attention_score(q, k, v, N1, "TND", **tkw)
            g = fag_numba.flash_attention_score_grad(q, k, v, dy, N1, "TND", **tkw)
            g2 = fag_numba.flash_attention_score_grad(
                q, k, v, dy, N1, "TND", softmax_max=fo.softmax_max, softmax_sum=fo.softmax_sum,
                attention_in=fo.attention_out, **tkw)
            runs.append(list(fo) + list(g[:3]) + list(g2[:3]))
    finally:
        numba.set_num_threads(old)
    for r in runs[1:]:
        for a, e in zip(r, runs[0]):
            assert np.array_equal(a, e)
    ro = ref_forward(q, k, v, N1, "TND", **tkw)
    assert_close(runs[0][0], ro[0], tolerance(F32, "fwd"))
    rg = ref_backward(q, k, v, dy, N1, "TND", **tkw)
    for a, e in zip(runs[0][3:6], rg[:3]):
        assert_close(a, e, tolerance(F32, "bwd"))
