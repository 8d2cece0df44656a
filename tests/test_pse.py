"""pse (SPEC §4): external pse (types 0/1, every shape incl. compressed ALiBi and the TND 1-D
forms), generated ALiBi (types 2/3, slopes [N1]/[B,N1], start indices), dpse / dslope
(SPEC §4.4), the chunk property of the start indices (§10), determinism of the dpse reductions
(§9b) and the validation rules (§4.3, §9).

Everything is compared with the independent float64 reference ``tests/reference.py`` under the
tolerances of ``tests/tolerances.py``; small tiles make every case span many tiles.
"""
from __future__ import annotations

import itertools

import ml_dtypes
import numba
import numpy as np
import pytest

import fag_numba as F
from fag_numba import FagTypeError, FagValueError, config

import reference as R
from tolerances import STATS, tolerance
from utils import assert_close, make_id, make_qkv

F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
LAY4 = ("BSH", "SBH", "BSND", "BNSD")
TRI = np.triu(np.ones((2048, 2048), dtype=bool), k=1)
SCALE = 0.4


@pytest.fixture(autouse=True)
def _small_tiles(blocks):
    blocks(bm=4, bn=8, fbm=5, fbn=7)


def mask_kw(mode):
    """Keyword arguments of a mask: None (full), 3 (rightDownCausal), 4 (band)."""
    if mode is None:
        return {}
    if mode == 3:
        return dict(atten_mask=TRI, sparse_mode=3)
    if mode == 4:
        return dict(atten_mask=TRI, sparse_mode=4, pre_tokens=4, next_tokens=2)
    raise AssertionError(mode)


def check(q, k, v, dy, n1, layout, out_dtype, **kw):
    """Forward and backward (with the forward's statistics) vs the float64 reference."""
    fo = F.flash_attention_score(q, k, v, n1, layout, **kw)
    ro, rm, rl = R.ref_forward(q, k, v, n1, layout, **kw)
    assert fo.attention_out.dtype == np.dtype(out_dtype)
    assert_close(fo.attention_out, ro, tolerance(out_dtype, "fwd"), "attention_out")
    assert_close(fo.softmax_max, rm, STATS, "softmax_max")
    assert_close(fo.softmax_sum, rl, STATS, "softmax_sum")
    stats = dict(softmax_max=fo.softmax_max, softmax_sum=fo.softmax_sum,
                 attention_in=fo.attention_out)
    g = F.flash_attention_score_grad(q, k, v, dy, n1, layout, **stats, **kw)
    rdq, rdk, rdv, rdpse = R.ref_backward(q, k, v, dy, n1, layout, **stats, **kw)
    tb = tolerance(out_dtype, "bwd")
    assert_close(g.dq, rdq, tb, "dq")
    assert_close(g.dk, rdk, tb, "dk")
    assert_close(g.dv, rdv, tb, "dv")
    pse = kw.get("pse")
    if rdpse is None:
        assert g.dpse is None
    else:
        assert g.dpse.shape == pse.shape
        assert g.dpse.dtype == pse.dtype
        assert_close(g.dpse, rdpse, tolerance(pse.dtype, "dpse"), "dpse")
    return fo, g


def pse_shape(kind, B, N1, S1, S2):
    return {"BNSS": (B, N1, S1, S2), "1NSS": (1, N1, S1, S2), "BN1S": (B, N1, 1, S2),
            "1N1S": (1, N1, 1, S2)}[kind]


# ------------------------------------------------------------------------------------------------
# 1. external pse, 4-D forms (pse_type 0 and 1)
# ------------------------------------------------------------------------------------------------

def _ext_cases():
    cases = []
    prod = itertools.product((0, 1), ("BNSS", "1NSS", "BN1S", "1N1S"), ("q", "f32"))
    for idx, (ptype, kind, pdt) in enumerate(prod):
        layout = LAY4[idx % 4]
        qdt = (F32, F16, BF16)[idx % 3]
        mode = (None, 3, 4)[(idx // 3) % 3]
        n1, n2 = ((2, 2), (4, 2), (3, 1))[(idx // 2) % 3]
        s1, s2 = ((9, 13), (13, 9), (11, 11))[(idx // 4) % 3]
        cases.append(pytest.param(layout, qdt, ptype, kind, pdt, mode, n1, n2, s1, s2,
                                  id=make_id(layout=layout, dtype=qdt, pse=kind, t=ptype,
                                             p=pdt, sm=mode, n1=n1, n2=n2, s1=s1, s2=s2)))
    return cases


@pytest.mark.parametrize("layout,qdt,ptype,kind,pdt,mode,n1,n2,s1,s2", _ext_cases())
def test_external_pse(layout, qdt, ptype, kind, pdt, mode, n1, n2, s1, s2):
    rng = np.random.default_rng(abs(hash((layout, ptype, kind, pdt))) % 2**32)
    B = 2
    q, k, v, dy = make_qkv(layout, B, n1, n2, s1, s2, 5, 4, qdt, rng)
    pdtype = qdt if pdt == "q" else F32
    pse = rng.standard_normal(pse_shape(kind, B, n1, s1, s2)).astype(pdtype)
    check(q, k, v, dy, n1, layout, qdt, pse=pse, pse_type=ptype, scale_value=SCALE,
          **mask_kw(mode))


def test_external_pse_single_row_query():
    """S1 == 1: [B,N1,1,S2] is both the full and the broadcast form (same values either way)."""
    rng = np.random.default_rng(3)
    q, k, v, dy = make_qkv("BNSD", 2, 2, 1, 1, 10, 4, 4, F32, rng)
    for shape in ((2, 2, 1, 10), (1, 2, 1, 10)):
        pse = rng.standard_normal(shape).astype(np.float32)
        check(q, k, v, dy, 2, "BNSD", F32, pse=pse, pse_type=1, scale_value=SCALE)


# ------------------------------------------------------------------------------------------------
# 2. external pse in TND: 1-D forms of length T2*N1 (broadcast over i) and N1*sum S1_b*S2_b
# ------------------------------------------------------------------------------------------------

TND_EXT = [
    # ptype, form, mode, n1, n2, qdt, actual_seq_qlen, actual_seq_kvlen
    (0, "bn1s", None, 2, 1, F32, [3, 7, 7, 12], [5, 9, 13, 15]),
    (1, "bn1s", 3, 4, 2, F16, [4, 9, 12], [6, 9, 16]),
    (0, "bnss", 4, 2, 2, BF16, [3, 8, 8, 12], [6, 9, 12, 20]),
    (1, "bnss", None, 3, 1, F32, [5, 6, 11], [4, 12, 13]),
]


@pytest.mark.parametrize("ptype,form,mode,n1,n2,qdt,sq,sk", TND_EXT,
                         ids=[make_id(t=c[0], form=c[1], sm=c[2], dtype=c[5]) for c in TND_EXT])
def test_external_pse_tnd(ptype, form, mode, n1, n2, qdt, sq, sk):
    rng = np.random.default_rng(11 + ptype)
    # two extra rows past the last offsets (rows that belong to no sequence)
    q, k, v, dy = make_qkv("TND", 1, n1, n2, sq[-1] + 2, sk[-1] + 1, 6, 4, qdt, rng,
                           actual_seq_qlen=sq, actual_seq_kvlen=sk)
    t2 = k.shape[0]
    lens = np.diff([0] + sq) * np.diff([0] + sk)
    n = t2 * n1 if form == "bn1s" else n1 * int(lens.sum())
    pse = rng.standard_normal(n).astype(qdt)
    check(q, k, v, dy, n1, "TND", qdt, pse=pse, pse_type=ptype, scale_value=SCALE,
          actual_seq_qlen=sq, actual_seq_kvlen=sk, **mask_kw(mode))


def test_external_pse_tnd_tie_reads_bn1s():
    """Both 1-D lengths coincide (T2 = 8 keys incl. 3 past the last offset, sum S1_b*S2_b =
    2*3 + 1*2 = 8): the T2*N1 reading (broadcast over i) wins, as in the reference."""
    rng = np.random.default_rng(5)
    sq, sk = [2, 3], [3, 5]
    n1 = 2
    q, k, v, dy = make_qkv("TND", 1, n1, 1, 3, 8, 4, 4, F32, rng, actual_seq_qlen=sq,
                           actual_seq_kvlen=sk)
    assert k.shape[0] == 8
    pse = rng.standard_normal(8 * n1).astype(np.float32)
    kw = dict(pse_type=0, scale_value=SCALE, actual_seq_qlen=sq, actual_seq_kvlen=sk)
    fo, g = check(q, k, v, dy, n1, "TND", F32, pse=pse, **kw)
    # explicitly: sequence 0 (S1_b = 2) uses pse[h*3 + j] for both of its rows
    bn = lambda x: np.ascontiguousarray(x.transpose(1, 0, 2)[None])     # [S,N,D] -> [1,N,S,D]
    s0 = F.flash_attention_score(bn(q[0:2]), bn(k[0:3]), bn(v[0:3]), n1, "BNSD",
                                 pse=pse[:6].reshape(1, n1, 1, 3), pse_type=0,
                                 scale_value=SCALE)
    assert_close(fo.attention_out[0:2], s0.attention_out[0].transpose(1, 0, 2),
                 tolerance(F32, "fwd"), "sequence 0 (bn1s reading)")
    # keys past the last offset belong to no sequence: their dpse is 0
    assert not g.dpse[10:].any()


# ------------------------------------------------------------------------------------------------
# 3. compressed ALiBi [B|1, N1, 1024, S2] (S1 == S2 > 1024, causal masking), dpse None
# ------------------------------------------------------------------------------------------------

def _toeplitz(rng, bp, n1, s):
    """A bias that depends only on i - j: full[b, h, i, j] = t[b, h, i - j + s - 1]."""
    t = (rng.standard_normal((bp, n1, 2 * s - 1)) * 0.5).astype(np.float32)
    idx = np.arange(s)[:, None] - np.arange(s)[None, :] + s - 1
    return t[:, :, idx]


@pytest.mark.parametrize("ptype,bp,mode,layout", [
    (1, 1, 3, "BSH"), (0, 2, 3, "BNSD"), (1, 2, 2, "SBH"), (0, 1, 0, "BSND")])
def test_compressed_alibi(blocks, ptype, bp, mode, layout):
    blocks(bm=32, bn=64, fbm=32, fbn=64)
    rng = np.random.default_rng(100 + ptype + 2 * bp + mode)
    S, B, n1 = 1030, 2, 2
    q, k, v, dy = make_qkv(layout, B, n1, 1, S, S, 3, 2, F32, rng)
    full = _toeplitz(rng, bp, n1, S)
    comp = np.ascontiguousarray(full[:, :, -1024:, :])
    if mode == 0:
        mkw = dict(atten_mask=np.triu(np.ones((S, S), bool), 1), sparse_mode=0, pre_tokens=S,
                   next_tokens=0)
    else:
        mkw = dict(atten_mask=TRI, sparse_mode=mode)
    fo, g = check(q, k, v, dy, n1, layout, F32, pse=comp, pse_type=ptype, scale_value=SCALE,
                  **mkw)
    assert g.dpse is None
    # the same as the full Toeplitz pse
    ff = F.flash_attention_score(q, k, v, n1, layout, pse=full, pse_type=ptype,
                                 scale_value=SCALE, **mkw)
    assert_close(fo.attention_out, ff.attention_out, tolerance(F32, "fwd"), "out vs full pse")


def test_pse_1024_rows_is_the_full_form(blocks):
    """S1 == S2 == 1024: [.,N1,1024,S2] is the full form (no causal mask needed, dpse given)."""
    blocks(bm=32, bn=64, fbm=32, fbn=64)
    rng = np.random.default_rng(7)
    S = 1024
    q, k, v, dy = make_qkv("BNSD", 1, 1, 1, S, S, 2, 2, F32, rng)
    pse = rng.standard_normal((1, 1, S, S)).astype(np.float32)
    check(q, k, v, dy, 1, "BNSD", F32, pse=pse, pse_type=1, scale_value=SCALE)


# ------------------------------------------------------------------------------------------------
# 4. generated ALiBi (pse_type 2/3): slopes [N1] / [B,N1], start indices int / length-1 list
# ------------------------------------------------------------------------------------------------

STARTS = {"none": {}, "int": dict(q_start_idx=5, kv_start_idx=2),
          "list": dict(q_start_idx=[3], kv_start_idx=[11])}


def _alibi_cases():
    cases = []
    lays = LAY4 + ("TND",)
    for idx, (ptype, sshape, start) in enumerate(
            itertools.product((2, 3), ("N", "BN"), ("none", "int", "list"))):
        layout = lays[idx % 5]
        mode = (None, 3, 4)[(idx // 2) % 3]
        n1, n2 = ((2, 1), (4, 2), (2, 2))[idx % 3]
        qdt = (F32, BF16, F16, F32)[idx % 4]
        cases.append(pytest.param(layout, ptype, sshape, start, mode, n1, n2, qdt,
                                  id=make_id(layout=layout, dtype=qdt, t=ptype, slopes=sshape,
                                             start=start, sm=mode, n1=n1, n2=n2)))
    return cases


@pytest.mark.parametrize("layout,ptype,sshape,start,mode,n1,n2,qdt", _alibi_cases())
def test_generated_alibi(layout, ptype, sshape, start, mode, n1, n2, qdt):
    rng = np.random.default_rng(abs(hash((layout, ptype, sshape, start))) % 2**32)
    kw = dict(STARTS[start])
    if layout == "TND":
        sq, sk = [3, 3, 8, 12], [5, 9, 15, 20]        # sequence 1 has no query rows
        kw.update(actual_seq_qlen=sq, actual_seq_kvlen=sk)
        q, k, v, dy = make_qkv("TND", 1, n1, n2, 12, 20, 5, 3, qdt, rng, actual_seq_qlen=sq,
                               actual_seq_kvlen=sk)
        B = 4
    else:
        B = 2
        q, k, v, dy = make_qkv(layout, B, n1, n2, 9, 14, 5, 3, qdt, rng)
    shape = (n1,) if sshape == "N" else (B, n1)
    slopes = rng.uniform(-0.2, 0.6, shape).astype(np.float32)
    check(q, k, v, dy, n1, layout, qdt, pse=slopes, pse_type=ptype, scale_value=SCALE,
          **mask_kw(mode), **kw)


@pytest.mark.parametrize("ptype", [2, 3])
def test_generated_alibi_tnd_mode8_starts_only_on_band_sequence(ptype):
    """TND sparse mode 8: q/kv start indices apply only to the band sequence (the first one
    with S1_b > 0); the reference implements the same rule (SPEC §4.2)."""
    rng = np.random.default_rng(21 + ptype)
    sq, sk = [0, 4, 7, 12], [0, 6, 9, 14]          # sequence 0 is empty: band = sequence 1
    n1 = 2
    q, k, v, dy = make_qkv("TND", 1, n1, 1, 12, 14, 4, 4, F32, rng, actual_seq_qlen=sq,
                           actual_seq_kvlen=sk)
    slopes = np.array([[0.3, 0.1]] * 4, np.float32)
    kw = dict(pse=slopes, pse_type=ptype, scale_value=SCALE, actual_seq_qlen=sq,
              actual_seq_kvlen=sk, atten_mask=TRI, sparse_mode=8, next_tokens=0,
              q_start_idx=4, kv_start_idx=[9])
    fo, g = check(q, k, v, dy, n1, "TND", F32, **kw)
    # the start indices matter for the band sequence
    f0 = F.flash_attention_score(q, k, v, n1, "TND", **{**kw, "q_start_idx": 0,
                                                        "kv_start_idx": 0})
    assert not np.allclose(f0.attention_out[:4], fo.attention_out[:4])
    assert np.array_equal(f0.attention_out[4:], fo.attention_out[4:])


def test_alibi_start_index_forms_agree():
    """int, length-1 list, tuple and 1-D array spell the same start index."""
    rng = np.random.default_rng(4)
    q, k, v, dy = make_qkv("BNSD", 1, 2, 2, 6, 9, 4, 4, F32, rng)
    slopes = np.array([0.2, 0.5], np.float32)
    outs = [F.flash_attention_score(q, k, v, 2, "BNSD", pse=slopes, pse_type=2,
                                    q_start_idx=qs, kv_start_idx=ks).attention_out
            for qs, ks in ((3, 7), ([3], [7]), ((3,), (7,)), (np.array([3]), np.array([7])))]
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])
    none = F.flash_attention_score(q, k, v, 2, "BNSD", pse=slopes, pse_type=2).attention_out
    zero = F.flash_attention_score(q, k, v, 2, "BNSD", pse=slopes, pse_type=2, q_start_idx=0,
                                   kv_start_idx=[0]).attention_out
    assert np.array_equal(none, zero)
    assert not np.allclose(none, outs[0])


def test_start_indices_ignored_by_external_pse():
    rng = np.random.default_rng(6)
    q, k, v, dy = make_qkv("BNSD", 1, 2, 2, 6, 9, 4, 4, F32, rng)
    pse = rng.standard_normal((1, 2, 6, 9)).astype(np.float32)
    a = F.flash_attention_score(q, k, v, 2, "BNSD", pse=pse, pse_type=0).attention_out
    b = F.flash_attention_score(q, k, v, 2, "BNSD", pse=pse, pse_type=0, q_start_idx=5,
                                kv_start_idx=[2]).attention_out
    assert np.array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# 5. finite differences of the float64 forward: dpse (types 0/1) and dslope (types 2/3)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ptype", [0, 1, 2, 3])
def test_dpse_finite_differences(ptype):
    rng = np.random.default_rng(30 + ptype)
    B, n1, s1, s2 = 2, 2, 3, 5
    q, k, v, dy = make_qkv("BNSD", B, n1, 1, s1, s2, 3, 2, F32, rng)
    if ptype in (0, 1):
        pse = rng.standard_normal((1, n1, 1, s2)).astype(np.float32)    # reduced over b and i
    else:
        pse = rng.uniform(0.1, 0.7, (B, n1)).astype(np.float32)
    kw = dict(pse_type=ptype, scale_value=0.7, atten_mask=TRI, sparse_mode=3,
              q_start_idx=1, kv_start_idx=[0])
    g = F.flash_attention_score_grad(q, k, v, dy, n1, "BNSD", pse=pse, **kw)
    dy64 = dy.astype(np.float64)

    def loss(p):
        out, _, _ = R.ref_forward(q, k, v, n1, "BNSD", pse=p, **kw)
        return float((out * dy64).sum())

    p0 = pse.astype(np.float64)
    fd = np.zeros_like(p0)
    eps = 1e-6
    for idx in np.ndindex(p0.shape):
        pp, pm = p0.copy(), p0.copy()
        pp[idx] += eps
        pm[idx] -= eps
        fd[idx] = (loss(pp) - loss(pm)) / (2 * eps)
    assert np.abs(fd).max() > 1e-3                      # the check is not vacuous
    assert_close(g.dpse, fd, tolerance(F32, "dpse"), "dpse vs finite differences")
    rd = R.ref_backward(q, k, v, dy, n1, "BNSD", pse=pse, **kw)[3]
    assert_close(rd, fd, (1e-7, 1e-7), "reference dpse vs finite differences")


# ------------------------------------------------------------------------------------------------
# 6. chunks of a longer sequence with q_start_idx / kv_start_idx (SPEC §4.2, §10)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ptype", [2, 3])
def test_alibi_chunks_match_full(ptype):
    rng = np.random.default_rng(40 + ptype)
    n1, S1, S2 = 2, 20, 23
    q, k, v, dy = make_qkv("BNSD", 1, n1, 1, S1, S2, 4, 4, F32, rng)
    slopes = np.array([0.3, 0.08], np.float32)
    kw = dict(pse=slopes, pse_type=ptype, scale_value=SCALE)
    full = F.flash_attention_score(q, k, v, n1, "BNSD", **kw)
    gfull = F.flash_attention_score_grad(q, k, v, dy, n1, "BNSD", softmax_max=full.softmax_max,
                                         softmax_sum=full.softmax_sum,
                                         attention_in=full.attention_out, **kw)
    tf, tb = tolerance(F32, "fwd"), tolerance(F32, "bwd")
    qa = [(0, 8), (8, 20)]
    kc = [(0, 11), (11, 23)]
    # forward: a q chunk over every key gives the matching rows of the full output
    for a0, a1 in qa:
        part = F.flash_attention_score(q[:, :, a0:a1], k, v, n1, "BNSD", q_start_idx=a0, **kw)
        assert_close(part.attention_out, full.attention_out[:, :, a0:a1], tf, "q chunk out")
        assert_close(part.softmax_max, full.softmax_max[:, :, a0:a1], STATS, "q chunk max")
        assert_close(part.softmax_sum, full.softmax_sum[:, :, a0:a1], STATS, "q chunk sum")
    # forward: kv chunks merged with the softmax statistics give the full output
    parts = [F.flash_attention_score(q, k[:, :, c0:c1], v[:, :, c0:c1], n1, "BNSD",
                                     kv_start_idx=c0, **kw) for c0, c1 in kc]
    ms = [p.softmax_max[..., :1].astype(np.float64) for p in parts]
    ls = [p.softmax_sum[..., :1].astype(np.float64) for p in parts]
    m = np.maximum(*ms)
    w = [li * np.exp(mi - m) for mi, li in zip(ms, ls)]
    merged = sum(p.attention_out * wi for p, wi in zip(parts, w)) / sum(w)
    assert_close(merged, full.attention_out, tf, "merged kv chunks")
    # backward: partial gradients of every (a, c) pair sum to the full ones
    dq = np.zeros(q.shape)
    dk = np.zeros(k.shape)
    dv = np.zeros(v.shape)
    dslope = np.zeros(slopes.shape)
    for (a0, a1), (c0, c1) in itertools.product(qa, kc):
        g = F.flash_attention_score_grad(
            q[:, :, a0:a1], k[:, :, c0:c1], v[:, :, c0:c1], dy[:, :, a0:a1], n1, "BNSD",
            softmax_max=full.softmax_max[:, :, a0:a1], softmax_sum=full.softmax_sum[:, :, a0:a1],
            attention_in=full.attention_out[:, :, a0:a1], q_start_idx=[a0], kv_start_idx=c0,
            **kw)
        dq[:, :, a0:a1] += g.dq
        dk[:, :, c0:c1] += g.dk
        dv[:, :, c0:c1] += g.dv
        dslope += g.dpse
    assert_close(dq, gfull.dq, tb, "sum_c dq")
    assert_close(dk, gfull.dk, tb, "sum_a dk")
    assert_close(dv, gfull.dv, tb, "sum_a dv")
    assert_close(dslope, gfull.dpse, tolerance(F32, "dpse"), "sum dslope")


# ------------------------------------------------------------------------------------------------
# 7. determinism of dpse / dslope: thread counts (bitwise) and S2 split counts
# ------------------------------------------------------------------------------------------------

DET = [(1, "1N1S"), (0, "BNSS"), (1, "1NSS"), (0, "BN1S"), (2, "BN"), (3, "N")]


@pytest.mark.parametrize("ptype,kind", DET, ids=[f"t{a}-{b}" for a, b in DET])
def test_dpse_deterministic(ptype, kind):
    rng = np.random.default_rng(50 + ptype)
    B, n1, n2, s1, s2 = 2, 4, 2, 13, 40
    q, k, v, dy = make_qkv("BSND", B, n1, n2, s1, s2, 4, 4, F32, rng)
    if ptype in (0, 1):
        pse = rng.standard_normal(pse_shape(kind, B, n1, s1, s2)).astype(np.float32)
    else:
        pse = rng.uniform(0.1, 0.5, (n1,) if kind == "N" else (B, n1)).astype(np.float32)
    kw = dict(pse=pse, pse_type=ptype, scale_value=SCALE, atten_mask=TRI, sparse_mode=3)

    def run(nthreads, split):
        config.SPLIT_TARGET = split
        with F.threads(nthreads):
            return F.flash_attention_score_grad(q, k, v, dy, n1, "BSND", **kw)

    nt = min(2, numba.config.NUMBA_NUM_THREADS)
    results = {(t, s): run(t, s) for t in (1, nt) for s in (1, 16)}
    for s in (1, 16):
        a, b = results[(1, s)], results[(nt, s)]
        for name in ("dq", "dk", "dv", "dpse"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), (name, s)
    a, b = results[(1, 1)], results[(1, 16)]
    if ptype in (0, 1):
        # each dpse element has one writer, which sums its rows in order: split-independent
        assert np.array_equal(a.dpse, b.dpse)
    else:
        # slope partials per split are summed on the host: equal up to float32 rounding
        assert_close(a.dpse, b.dpse, tolerance(F32, "dpse"), "dslope split 1 vs 16")
    ref = R.ref_backward(q, k, v, dy, n1, "BSND", **kw)[3]
    assert_close(b.dpse, ref, tolerance(F32, "dpse"), "dpse with splits")


# ------------------------------------------------------------------------------------------------
# 8. validation (SPEC §4.3, §9)
# ------------------------------------------------------------------------------------------------

def _base(layout="BNSD", B=2, n1=2, n2=1, s1=6, s2=7, dtype=F32):
    rng = np.random.default_rng(0)
    q, k, v, dy = make_qkv(layout, B, n1, n2, s1, s2, 4, 4, dtype, rng)
    return q, k, v, dy


def _raises(exc, match, args, n1, layout, **kw):
    q, k, v, dy = args
    with pytest.raises(exc, match=match):
        F.flash_attention_score(q, k, v, n1, layout, **kw)
    with pytest.raises(exc, match=match):
        F.flash_attention_score_grad(q, k, v, dy, n1, layout, **kw)


P4 = np.zeros((2, 2, 6, 7), np.float32)
SL = np.array([0.1, 0.2], np.float32)

VALIDATION = [
    # (id, kwargs, exception, match)
    ("type4", dict(pse=P4, pse_type=4), FagValueError, "pse_type"),
    ("type-1", dict(pse=P4, pse_type=-1), FagValueError, "pse_type"),
    ("type-str", dict(pse=P4, pse_type="1"), FagTypeError, "pse_type"),
    ("type-float", dict(pse=P4, pse_type=1.0), FagTypeError, "pse_type"),
    ("none-type0", dict(pse_type=0), FagValueError, "pse_type"),
    ("none-type2", dict(pse_type=2), FagValueError, "pse_type"),
    ("none-type3", dict(pse_type=3), FagValueError, "pse_type"),
    ("not-array", dict(pse=P4.tolist(), pse_type=1), FagTypeError, "pse"),
    ("rank3", dict(pse=np.zeros((2, 6, 7), np.float32)), FagValueError, "pse"),
    ("rank5", dict(pse=np.zeros((2, 2, 1, 6, 7), np.float32)), FagValueError, "pse"),
    ("bad-B", dict(pse=np.zeros((3, 2, 6, 7), np.float32)), FagValueError, "pse"),
    ("bad-N", dict(pse=np.zeros((2, 1, 6, 7), np.float32)), FagValueError, "pse"),
    ("bad-S1", dict(pse=np.zeros((2, 2, 5, 7), np.float32)), FagValueError, "pse"),
    ("bad-S2", dict(pse=np.zeros((2, 2, 6, 6), np.float32)), FagValueError, "pse"),
    ("bad-S2-bcast", dict(pse=np.zeros((1, 2, 1, 1), np.float32)), FagValueError, "pse"),
    ("f64", dict(pse=P4.astype(np.float64)), FagTypeError, "pse"),
    ("f16-for-f32", dict(pse=P4.astype(np.float16)), FagTypeError, "pse"),
    ("int", dict(pse=P4.astype(np.int32)), FagTypeError, "pse"),
    ("slopes-f64", dict(pse=SL.astype(np.float64), pse_type=2), FagTypeError, "pse"),
    ("slopes-f16", dict(pse=SL.astype(np.float16), pse_type=3), FagTypeError, "pse"),
    ("slopes-N+1", dict(pse=np.zeros(3, np.float32), pse_type=2), FagValueError, "pse"),
    ("slopes-1xN", dict(pse=np.zeros((1, 2), np.float32), pse_type=2), FagValueError, "pse"),
    ("slopes-BxNx1", dict(pse=np.zeros((2, 2, 1), np.float32), pse_type=3), FagValueError,
     "pse"),
    ("slopes-4d", dict(pse=P4, pse_type=2), FagValueError, "pse"),
    ("qstart-float", dict(pse=SL, pse_type=2, q_start_idx=1.5), FagTypeError, "q_start_idx"),
    ("qstart-empty", dict(pse=SL, pse_type=2, q_start_idx=[]), FagValueError, "q_start_idx"),
    ("qstart-huge", dict(pse=SL, pse_type=2, q_start_idx=2**63), FagValueError, "q_start_idx"),
    ("kvstart-huge", dict(pse=SL, pse_type=2, kv_start_idx=[-2**62]), FagValueError,
     "kv_start_idx"),
    ("kvstart-str", dict(pse=SL, pse_type=2, kv_start_idx="3"), FagTypeError, "kv_start_idx"),
]


@pytest.mark.parametrize("kw,exc,match", [pytest.param(*c[1:], id=c[0]) for c in VALIDATION])
def test_validation(kw, exc, match):
    _raises(exc, match, _base(), 2, "BNSD", **kw)


def test_validation_pse_dtype_per_query_dtype():
    args = _base(dtype=BF16)
    _raises(FagTypeError, "pse", args, 2, "BNSD", pse=P4.astype(np.float16))
    args = _base(dtype=F16)
    _raises(FagTypeError, "pse", args, 2, "BNSD", pse=P4.astype(BF16))


def test_validation_compressed_alibi():
    S = 1030
    comp = np.zeros((1, 1, 1024, S), np.float32)
    rng = np.random.default_rng(0)
    ok = make_qkv("BNSD", 1, 1, 1, S, S, 2, 2, F32, rng)
    # no causal masking: no mask at all, a full mask, mode 0 with next_tokens > 0, mode 4 band
    _raises(FagValueError, "pse", ok, 1, "BNSD", pse=comp)
    _raises(FagValueError, "pse", ok, 1, "BNSD", pse=comp,
            atten_mask=np.zeros((S, S), bool), sparse_mode=1)
    _raises(FagValueError, "pse", ok, 1, "BNSD", pse=comp,
            atten_mask=np.zeros((S, S), bool), sparse_mode=0, pre_tokens=S, next_tokens=3)
    _raises(FagValueError, "pse", ok, 1, "BNSD", pse=comp, pse_type=0, atten_mask=TRI,
            sparse_mode=4, pre_tokens=S, next_tokens=5)
    # causal-looking but not one of the allowed forms (SPEC §4.1): mode 0 with
    # pre_tokens < S1 or next_tokens < 0, mode 4 with next_tokens == 0, mode 6 with prefix 0
    tri_full = np.triu(np.ones((S, S), bool), 1)
    _raises(FagValueError, "pse", ok, 1, "BNSD", pse=comp, atten_mask=tri_full, sparse_mode=0,
            pre_tokens=S - 1, next_tokens=0)
    _raises(FagValueError, "pse", ok, 1, "BNSD", pse=comp, atten_mask=tri_full, sparse_mode=0,
            pre_tokens=S, next_tokens=-1)
    _raises(FagValueError, "pse", ok, 1, "BNSD", pse=comp, atten_mask=TRI, sparse_mode=4,
            pre_tokens=S, next_tokens=0)
    tri6 = np.concatenate([TRI, np.zeros((1024, 2048), bool)])
    tri6[2048:, 1024:] = True
    _raises(FagValueError, "pse", ok, 1, "BNSD", pse=comp, atten_mask=tri6, sparse_mode=6,
            prefix=[0])
    # S1 != S2
    q, k, v, dy = make_qkv("BNSD", 1, 1, 1, S, S + 1, 2, 2, F32, rng)
    _raises(FagValueError, "pse", (q, k, v, dy), 1, "BNSD",
            pse=np.zeros((1, 1, 1024, S + 1), np.float32), atten_mask=TRI, sparse_mode=3)
    q, k, v, dy = make_qkv("BNSD", 1, 1, 1, 1025, 1030, 2, 2, F32, rng)
    _raises(FagValueError, "pse", (q, k, v, dy), 1, "BNSD", pse=comp, atten_mask=TRI,
            sparse_mode=3)
    # S1 == S2 < 1024 (1024 rows is then neither the full nor a valid compressed form)
    q, k, v, dy = make_qkv("BNSD", 1, 1, 1, 100, 100, 2, 2, F32, rng)
    _raises(FagValueError, "pse", (q, k, v, dy), 1, "BNSD",
            pse=np.zeros((1, 1, 1024, 100), np.float32), atten_mask=TRI, sparse_mode=3)


def test_validation_tnd():
    rng = np.random.default_rng(0)
    sq, sk = [3, 7], [4, 9]
    args = make_qkv("TND", 1, 2, 1, 7, 9, 4, 4, F32, rng, actual_seq_qlen=sq,
                    actual_seq_kvlen=sk)
    tkw = dict(actual_seq_qlen=sq, actual_seq_kvlen=sk)
    # generated ALiBi with mode 7; external pse with modes 7/8
    _raises(FagValueError, "pse", args, 2, "TND", pse=SL, pse_type=2, atten_mask=TRI,
            sparse_mode=7, next_tokens=0, **tkw)
    _raises(FagValueError, "pse", args, 2, "TND", pse=SL, pse_type=3, atten_mask=TRI,
            sparse_mode=7, next_tokens=0, **tkw)
    ext = np.zeros(9 * 2, np.float32)
    for mode in (7, 8):
        for ptype in (0, 1):
            _raises(FagValueError, "pse", args, 2, "TND", pse=ext, pse_type=ptype,
                    atten_mask=TRI, sparse_mode=mode, next_tokens=0, **tkw)
    # 4-D pse (incl. the compressed ALiBi form) and wrong 1-D lengths
    _raises(FagValueError, "pse", args, 2, "TND", pse=np.zeros((2, 2, 4, 5), np.float32),
            **tkw)
    _raises(FagValueError, "pse", args, 2, "TND", pse=np.zeros((1, 2, 1024, 5), np.float32),
            atten_mask=TRI, sparse_mode=3, **tkw)
    _raises(FagValueError, "pse", args, 2, "TND", pse=np.zeros(19, np.float32), **tkw)
    _raises(FagValueError, "pse", args, 2, "TND", pse=np.zeros((9, 2), np.float32), **tkw)
    # slopes [B, N1] with the wrong B
    _raises(FagValueError, "pse", args, 2, "TND", pse=np.zeros((3, 2), np.float32), pse_type=2,
            **tkw)


def test_mode_rules_need_a_mask():
    """Without atten_mask nothing tied to sparse_mode is validated (SPEC §6): generated ALiBi
    with sparse_mode 7 and no mask is full attention with the bias."""
    rng = np.random.default_rng(2)
    sq, sk = [3, 7], [4, 9]
    q, k, v, dy = make_qkv("TND", 1, 2, 1, 7, 9, 4, 4, F32, rng, actual_seq_qlen=sq,
                           actual_seq_kvlen=sk)
    with pytest.warns(UserWarning):
        check(q, k, v, dy, 2, "TND", F32, pse=SL, pse_type=2, sparse_mode=7,
              actual_seq_qlen=sq, actual_seq_kvlen=sk)


def test_inputs_not_modified():
    rng = np.random.default_rng(9)
    q, k, v, dy = make_qkv("BNSD", 2, 2, 1, 6, 7, 4, 4, F32, rng)
    pse = rng.standard_normal((1, 2, 6, 7)).astype(np.float32)
    pse.flags.writeable = False                     # read-only input works
    keep = pse.copy()
    g = F.flash_attention_score_grad(q, k, v, dy, 2, "BNSD", pse=pse, pse_type=1)
    assert np.array_equal(pse, keep)
    assert g.dpse.flags.writeable and g.dpse.flags.c_contiguous
    strided = np.asfortranarray(rng.standard_normal((2, 2, 6, 7)).astype(np.float32))
    check(q, k, v, dy, 2, "BNSD", F32, pse=strided, pse_type=0)
