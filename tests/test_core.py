"""Core numerics of fag_numba against the float64 reference (tests/reference.py).

No masks, no pse, no dropout here (other files own those features).  Covered:

1. Forward (attention_out, softmax_max, softmax_sum) and backward (dq, dk, dv) vs the reference,
   for a generated set of cases: every layout x dtype x GQA ratio (1, 2, N1) x (Dv == D, Dv < D),
   sizes drawn with ``random.Random(0)`` from S in {1, 3, 17, 129} and D in {1, 59, 111}, plus
   the edges (S1 != S2 both ways, S = 1, D = 1, MQA).  Tiles are patched small so that tiny
   inputs span many tiles; the backward S2 split is exercised with 1 and several partials.
   fp16/bf16 also pass the relative check of STYLE b8 against a naive same-dtype baseline.
2. Output contract: shapes, dtypes, C-contiguity, 8 equal statistic lanes, no NaN/inf.
3. The grad with the statistics given vs computed internally; the three accepted statistics
   shapes give identical grads.
4. scale_value / keep_prob rounded to float32.
5. Empty tensors (B, S1, S2, D=Dv, Dv = 0): zero-filled outputs of the right shapes, invalid-row
   statistics when S2 = 0.
6. Non-contiguous inputs (transposed, sliced, reversed views) give bitwise the same results as
   contiguous copies; inputs are never modified (writable and read-only).
7. GQA equals MHA with K/V repeated along heads (dk/dv summed over each group).
"""
from __future__ import annotations

import itertools
import random
from typing import NamedTuple

import ml_dtypes
import numpy as np
import pytest

import fag_numba
from fag_numba import config

from reference import FLT_MAX, ref_backward, ref_forward
from tolerances import STATS, K_BWD, K_FWD, baseline_check, tolerance
from utils import (assert_close, from_bnsd, layout_shape, make_id, make_qkv, naive_attention,
                   repeat_heads, sum_head_groups, to_bnsd, to_float64)

LAYOUTS = ("BSH", "SBH", "BSND", "BNSD")
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BF16)
S_SIZES = (1, 3, 17, 129)
D_SIZES = (1, 59, 111)

# (BLOCK_M, BLOCK_N, FWD_BLOCK_M, FWD_BLOCK_N); None = the package defaults.
BLOCKS = ((4, 8, 5, 7), (5, 7, 4, 8), (3, 2, 2, 3), None)

fwd = fag_numba.flash_attention_score
grad = fag_numba.flash_attention_score_grad


class Case(NamedTuple):
    layout: str
    dtype: np.dtype
    B: int
    N1: int
    N2: int
    S1: int
    S2: int
    D: int
    Dv: int
    scale: float
    blocks: tuple | None
    split: int
    seed: int

    @property
    def id(self):
        return make_id(layout=self.layout, dtype=self.dtype, gqa=self.N1 // self.N2,
                       split=self.split,
                       blk="x".join(map(str, self.blocks)) if self.blocks else "default",
                       b=self.B, n1=self.N1, n2=self.N2, s1=self.S1, s2=self.S2, d=self.D,
                       dv=self.Dv)


def _blocks_for(r, s1, s2):
    # the tiniest tiles only for small sequences (keeps the file fast)
    choices = BLOCKS if max(s1, s2) <= 17 else tuple(b for b in BLOCKS if b != (3, 2, 2, 3))
    return r.choice(choices)


def core_cases():
    """layout x dtype x GQA ratio x (Dv == D, Dv < D) with seeded random sizes, plus the edges."""
    r = random.Random(0)
    cases = []
    for layout, dtype, gqa, dv_kind in itertools.product(LAYOUTS, DTYPES, ("1", "2", "N1"),
                                                         ("eq", "lt")):
        if gqa == "1":
            n1 = r.choice((1, 2, 3))
            g = 1
        elif gqa == "2":
            n1 = r.choice((2, 4))
            g = 2
        else:
            n1 = r.choice((2, 3, 4))
            g = n1
        s1, s2 = r.choice(S_SIZES), r.choice(S_SIZES)
        d = r.choice(D_SIZES if dv_kind == "eq" else D_SIZES[1:])
        dv = d if dv_kind == "eq" else r.randrange(1, d)
        b = r.choice((1, 2))
        cases.append(Case(layout, dtype, b, n1, n1 // g, s1, s2, d, dv,
                          scale=float(1 / np.sqrt(d)), blocks=_blocks_for(r, s1, s2),
                          split=r.choice((1, 4)), seed=len(cases)))
    f32, f16 = DTYPES[0], DTYPES[1]
    edges = [  # layout, dtype, B, N1, N2, S1, S2, D, Dv, scale
        ("BNSD", f32, 1, 1, 1, 1, 1, 1, 1, 1.0),          # the smallest problem
        ("BSH", f32, 1, 2, 1, 1, 129, 59, 59, 0.13),      # one query row, many key tiles
        ("SBH", f16, 2, 2, 2, 129, 1, 111, 7, 0.09),      # many query tiles, one key
        ("BSND", BF16, 1, 3, 1, 17, 3, 59, 58, 0.13),     # S1 > S2
        ("BNSD", f32, 2, 4, 2, 3, 17, 111, 1, 0.5),       # S1 < S2, Dv = 1
        ("BNSD", f32, 1, 4, 1, 129, 129, 111, 111, 0.095),  # MQA, long
        ("BSH", BF16, 1, 1, 1, 129, 17, 1, 1, 1.0),       # D = 1
        ("SBH", f32, 3, 2, 1, 17, 17, 59, 30, 1.0),       # scale 1 (peaked softmax)
    ]
    for k, (layout, dtype, b, n1, n2, s1, s2, d, dv, scale) in enumerate(edges):
        cases.append(Case(layout, dtype, b, n1, n2, s1, s2, d, dv, scale,
                          blocks=BLOCKS[k % 2], split=(1, 4)[k % 2], seed=1000 + k))
    return cases


CORE_CASES = core_cases()


def _setup(case, blocks):
    if case.blocks is not None:
        bm, bn, fbm, fbn = case.blocks
        blocks(bm=bm, bn=bn, fbm=fbm, fbn=fbn, split=case.split)
    else:
        blocks(bm=config.DEFAULTS["BLOCK_M"], bn=config.DEFAULTS["BLOCK_N"],
               fbm=config.DEFAULTS["FWD_BLOCK_M"], fbn=config.DEFAULTS["FWD_BLOCK_N"],
               split=case.split)
    rng = np.random.default_rng(case.seed)
    return make_qkv(case.layout, case.B, case.N1, case.N2, case.S1, case.S2, case.D, case.Dv,
                    case.dtype, rng)


def check_forward_contract(out, query, layout, B, N1, S1, Dv):
    """attention_out like query (last dim Dv), stats float32 [B,N1,S1,8] with 8 equal lanes."""
    o, m, l = out
    assert isinstance(out, fag_numba.FlashAttentionOutput)
    assert o.shape == layout_shape(layout, B, N1, S1, Dv)
    assert o.dtype == query.dtype
    for name, s in (("softmax_max", m), ("softmax_sum", l)):
        assert s.shape == (B, N1, S1, 8), (name, s.shape)
        assert s.dtype == np.float32, (name, s.dtype)
        assert s.flags.c_contiguous, name
        assert np.array_equal(s, np.broadcast_to(s[..., :1], s.shape)), f"{name}: lanes differ"
    for name, a in (("attention_out", o), ("softmax_max", m), ("softmax_sum", l)):
        assert a.flags.c_contiguous, name
        assert np.isfinite(to_float64(a)).all(), f"{name}: NaN or inf"


def check_grad_contract(g, query, key, value):
    """dq/dk/dv like query/key/value: shape, dtype, C-contiguous, finite; dpse None."""
    assert isinstance(g, fag_numba.FlashAttentionGrads)
    for name, a, like in (("dq", g.dq, query), ("dk", g.dk, key), ("dv", g.dv, value)):
        assert a.shape == like.shape, (name, a.shape, like.shape)
        assert a.dtype == like.dtype, (name, a.dtype, like.dtype)
        assert a.flags.c_contiguous, name
        assert np.isfinite(to_float64(a)).all(), f"{name}: NaN or inf"
    assert g.dpse is None


# ------------------------------------------------------------------------------------------------
# 1-2. forward and backward vs the float64 reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CORE_CASES, ids=[c.id for c in CORE_CASES])
def test_forward_and_backward_match_reference(case, blocks):
    q, k, v, dy = _setup(case, blocks)
    lay, n1, dt = case.layout, case.N1, case.dtype
    kw = dict(scale_value=case.scale)

    out = fwd(q, k, v, n1, lay, **kw)
    check_forward_contract(out, q, lay, case.B, n1, case.S1, case.Dv)
    r_o, r_m, r_l = ref_forward(q, k, v, n1, lay, **kw)
    assert_close(out.attention_out, r_o, tolerance(dt, "fwd"), "attention_out")
    assert_close(out.softmax_max, r_m, STATS, "softmax_max")
    assert_close(out.softmax_sum, r_l, STATS, "softmax_sum")

    # statistics computed internally (the forward's O stays float32)
    g = grad(q, k, v, dy, n1, lay, **kw)
    check_grad_contract(g, q, k, v)
    r_dq, r_dk, r_dv, _ = ref_backward(q, k, v, dy, n1, lay, **kw)
    tol = tolerance(dt, "bwd")
    for name, a, e in (("dq", g.dq, r_dq), ("dk", g.dk, r_dk), ("dv", g.dv, r_dv)):
        assert_close(a, e, tol, name)

    # statistics and attention_in given (the forward's, in the input dtype): used as given
    stats = dict(softmax_max=out.softmax_max, softmax_sum=out.softmax_sum,
                 attention_in=out.attention_out)
    g2 = grad(q, k, v, dy, n1, lay, **stats, **kw)
    check_grad_contract(g2, q, k, v)
    e2 = ref_backward(q, k, v, dy, n1, lay, **stats, **kw)
    for name, a, e in zip(("dq", "dk", "dv"), g2[:3], e2[:3]):
        assert_close(a, e, tol, name + " (stats given)")

    if dt != np.float32:
        # STYLE b8 (2): error within k x the error of a naive same-dtype implementation + floor
        nq, nk, nv, ndy = (to_bnsd(x, lay, n) for x, n in
                           ((q, n1), (k, case.N2), (v, case.N2), (dy, n1)))
        naive = naive_attention(nq, nk, nv, ndy, np.float32(case.scale), n1 // case.N2, dt)
        naive = [from_bnsd(x, lay) for x in naive]
        baseline_check(out.attention_out, r_o, naive[0], k=K_FWD, name="attention_out")
        for name, a, e, nv_ in zip(("dq", "dk", "dv"), g[:3], (r_dq, r_dk, r_dv), naive[1:]):
            baseline_check(a, e, nv_, k=K_BWD, name=name)


def split_cases():
    """One long kv head (B*N2 == 1) under several split targets, and B*N2 > target."""
    out = []
    for k, (layout, split) in enumerate(itertools.product(("BNSD", "SBH"), (1, 2, 3, 4, 17, 64))):
        out.append((layout, 1, 3, 1, split, k))
    out.append(("BSND", 2, 4, 2, 4, 99))            # B*N2 = 4 >= target: no split
    out.append(("BSH", 1, 2, 2, 3, 98))             # target 3 over 2 items: 2 splits each
    return out


@pytest.mark.parametrize("layout,B,N1,N2,split,seed", split_cases(),
                         ids=[make_id(layout=c[0], split=c[4], b=c[1], n1=c[2], n2=c[3])
                              for c in split_cases()])
def test_backward_split_over_s2_matches_reference(layout, B, N1, N2, split, seed, blocks):
    """SPLIT_TARGET decides how many dq partials the backward sums (1 = no split)."""
    blocks(bm=4, bn=8, split=split)
    rng = np.random.default_rng(500 + seed)
    q, k, v, dy = make_qkv(layout, B, N1, N2, 17, 129, 59, 40, np.float32, rng)
    g = grad(q, k, v, dy, N1, layout, scale_value=0.13)
    check_grad_contract(g, q, k, v)
    e = ref_backward(q, k, v, dy, N1, layout, scale_value=0.13)
    for name, a, r in zip(("dq", "dk", "dv"), g[:3], e[:3]):
        assert_close(a, r, tolerance(np.float32, "bwd"), name)


def test_default_block_sizes_multi_tile(blocks):
    """Unpatched tiles (64 x 128 backward, 64 x 256 forward) with sizes that are not multiples."""
    blocks(bm=config.DEFAULTS["BLOCK_M"], bn=config.DEFAULTS["BLOCK_N"],
           fbm=config.DEFAULTS["FWD_BLOCK_M"], fbn=config.DEFAULTS["FWD_BLOCK_N"],
           split=config.DEFAULTS["SPLIT_TARGET"])
    rng = np.random.default_rng(7)
    q, k, v, dy = make_qkv("BSND", 1, 2, 1, 131, 300, 64, 48, np.float32, rng)
    out = fwd(q, k, v, 2, "BSND", scale_value=0.125)
    r = ref_forward(q, k, v, 2, "BSND", scale_value=0.125)
    for name, a, e, tol in zip(("attention_out", "softmax_max", "softmax_sum"), out, r,
                               (tolerance(np.float32, "fwd"), STATS, STATS)):
        assert_close(a, e, tol, name)
    g = grad(q, k, v, dy, 2, "BSND", scale_value=0.125)
    e = ref_backward(q, k, v, dy, 2, "BSND", scale_value=0.125)
    for name, a, r_ in zip(("dq", "dk", "dv"), g[:3], e[:3]):
        assert_close(a, r_, tolerance(np.float32, "bwd"), name)


def test_forward_pv_sub_products_match_reference(blocks, monkeypatch):
    """P @ V as sub-products (planning.forward_pv_split) of 16 rows x 5 keys with ragged edges,
    with and without a causal band, matches the reference; the split really happens."""
    from fag_numba import planning
    blocks(fbm=40, fbn=24)
    monkeypatch.setattr(config, "FWD_PV_KEYS", 5)
    monkeypatch.setattr(config, "FWD_PV_MNK", 24 * 16 * 5 + 7)   # Dv = 24 -> 16 rows
    monkeypatch.setattr(config, "FWD_PV_MIN_ROWS", 16)
    monkeypatch.setattr(planning, "_host_has_avx512", lambda: True)   # split on any CPU
    assert planning.forward_pv_split(24) == (16, 5)
    rng = np.random.default_rng(11)
    q, k, v, _ = make_qkv("BNSD", 2, 2, 1, 53, 61, 32, 24, np.float32, rng)
    for kw in ({}, {"sparse_mode": 3, "atten_mask": np.triu(np.ones((2048, 2048), bool), 1)}):
        out = fwd(q, k, v, 2, "BNSD", scale_value=0.17, **kw)
        r = ref_forward(q, k, v, 2, "BNSD", scale_value=0.17, **kw)
        for name, a, e, tol in zip(("attention_out", "softmax_max", "softmax_sum"), out, r,
                                   (tolerance(np.float32, "fwd"), STATS, STATS)):
            assert_close(a, e, tol, name)


# ------------------------------------------------------------------------------------------------
# 3. statistics given vs internal; the accepted statistics shapes
# ------------------------------------------------------------------------------------------------

STATS_CASES = [(lay, dt, gqa) for lay, dt, gqa in itertools.product(LAYOUTS, DTYPES, (1, 2))]


@pytest.mark.parametrize("layout,dtype,gqa", STATS_CASES,
                         ids=[make_id(layout=c[0], dtype=c[1], gqa=c[2]) for c in STATS_CASES])
def test_grad_with_stats_given_equals_internal_forward(layout, dtype, gqa, blocks):
    """Given the forward's statistics and output, the grad equals the one that runs the forward
    itself: bitwise for float32 (same O), within the dtype tolerance otherwise (O rounded)."""
    blocks(split=2)
    rng = np.random.default_rng(11)
    n1 = 2 * gqa
    q, k, v, dy = make_qkv(layout, 2, n1, 2, 13, 21, 24, 16, dtype, rng)
    out = fwd(q, k, v, n1, layout, scale_value=0.2)
    given = grad(q, k, v, dy, n1, layout, scale_value=0.2, softmax_max=out.softmax_max,
                 softmax_sum=out.softmax_sum, attention_in=out.attention_out)
    internal = grad(q, k, v, dy, n1, layout, scale_value=0.2)
    for name, a, b in zip(("dq", "dk", "dv"), given[:3], internal[:3]):
        if dtype == np.float32:
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            assert_close(a, b, tolerance(dtype, "bwd"), name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stats_shapes_8_1_and_3d_give_identical_grads(layout, blocks):
    blocks()
    rng = np.random.default_rng(12)
    q, k, v, dy = make_qkv(layout, 2, 4, 2, 9, 17, 16, 16, BF16, rng)
    out = fwd(q, k, v, 4, layout)
    res = []
    for shape_kind in ("8", "1", "3d"):
        m, l = out.softmax_max, out.softmax_sum
        if shape_kind == "1":
            m, l = m[..., :1].copy(), l[..., :1].copy()
        elif shape_kind == "3d":
            m, l = m[..., 0].copy(), l[..., 0].copy()
        res.append(grad(q, k, v, dy, 4, layout, softmax_max=m, softmax_sum=l,
                        attention_in=out.attention_out))
    for other in res[1:]:
        for name, a, b in zip(("dq", "dk", "dv"), res[0][:3], other[:3]):
            np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16), err_msg=name)


def test_stats_lane_zero_is_read():
    """Only lane 0 of [B,N1,S1,8] statistics is read (SPEC §3)."""
    rng = np.random.default_rng(13)
    q, k, v, dy = make_qkv("BNSD", 1, 2, 1, 5, 7, 8, 8, np.float32, rng)
    out = fwd(q, k, v, 2, "BNSD")
    m, l = out.softmax_max.copy(), out.softmax_sum.copy()
    m[..., 1:] = 123.0
    l[..., 1:] = -7.0
    a = grad(q, k, v, dy, 2, "BNSD", softmax_max=m, softmax_sum=l, attention_in=out.attention_out)
    b = grad(q, k, v, dy, 2, "BNSD", softmax_max=out.softmax_max, softmax_sum=out.softmax_sum,
             attention_in=out.attention_out)
    for x, y in zip(a[:3], b[:3]):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("attn_dtype", DTYPES, ids=[make_id(dtype=d) for d in DTYPES])
def test_attention_in_any_float_dtype_used_as_given(attn_dtype, blocks):
    """attention_in may be float32/float16/bfloat16 whatever the input dtype; the grad uses it
    as given (compare with the reference fed the same attention_in)."""
    blocks()
    rng = np.random.default_rng(14)
    q, k, v, dy = make_qkv("BSH", 1, 2, 1, 6, 10, 12, 12, np.float16, rng)
    out = fwd(q, k, v, 2, "BSH")
    o = (out.attention_out.astype(np.float32) * 1.5).astype(attn_dtype)   # deliberately "wrong"
    kw = dict(softmax_max=out.softmax_max, softmax_sum=out.softmax_sum, attention_in=o)
    g = grad(q, k, v, dy, 2, "BSH", **kw)
    e = ref_backward(q, k, v, dy, 2, "BSH", **kw)
    for name, a, r in zip(("dq", "dk", "dv"), g[:3], e[:3]):
        assert_close(a, r, tolerance(np.float16, "bwd"), name)


# ------------------------------------------------------------------------------------------------
# 4. scale_value and keep_prob are rounded to float32
# ------------------------------------------------------------------------------------------------

def _same_results(a, b):
    for x, y in zip(a, b):
        if x is None:
            assert y is None
        else:
            np.testing.assert_array_equal(x, y)


def test_scale_value_rounded_to_float32():
    rng = np.random.default_rng(15)
    q, k, v, dy = make_qkv("BNSD", 1, 2, 2, 5, 6, 8, 8, np.float32, rng)
    s32 = np.float32(0.1)
    variants = [0.1, np.float64(0.1), s32, float(s32), 0.1 + 1e-12]
    base_f = fwd(q, k, v, 2, "BNSD", scale_value=s32)
    base_g = grad(q, k, v, dy, 2, "BNSD", scale_value=s32)
    for s in variants:
        assert np.float32(s) == s32
        _same_results(fwd(q, k, v, 2, "BNSD", scale_value=s), base_f)
        _same_results(grad(q, k, v, dy, 2, "BNSD", scale_value=s), base_g)
    # a float64 scale whose float32 rounding is 1.0 behaves exactly like 1.0
    one_ish = 1.0 + 2.0 ** -30
    assert np.float32(one_ish) == 1
    _same_results(fwd(q, k, v, 2, "BNSD", scale_value=one_ish), fwd(q, k, v, 2, "BNSD"))
    _same_results(grad(q, k, v, dy, 2, "BNSD", scale_value=one_ish), grad(q, k, v, dy, 2, "BNSD"))
    # integers are accepted
    _same_results(fwd(q, k, v, 2, "BNSD", scale_value=2), fwd(q, k, v, 2, "BNSD",
                                                               scale_value=2.0))
    # the default is 1.0, not 1/sqrt(D)
    _same_results(fwd(q, k, v, 2, "BNSD"), fwd(q, k, v, 2, "BNSD", scale_value=1.0))


def test_keep_prob_rounding_to_one_means_no_dropout():
    """float32(1 - 2**-30) == 1: no dropout, so neither drop_mask nor seed is needed."""
    rng = np.random.default_rng(16)
    q, k, v, dy = make_qkv("BSND", 1, 2, 1, 5, 6, 8, 8, np.float32, rng)
    kp = 1.0 - 2.0 ** -30
    assert np.float32(kp) == 1
    _same_results(fwd(q, k, v, 2, "BSND", keep_prob=kp), fwd(q, k, v, 2, "BSND"))
    _same_results(grad(q, k, v, dy, 2, "BSND", keep_prob=kp), grad(q, k, v, dy, 2, "BSND"))


# ------------------------------------------------------------------------------------------------
# 5. empty tensors
# ------------------------------------------------------------------------------------------------

def empty_cases():
    """Each zero dimension in each layout (GQA 2 so N1 != N2)."""
    base = dict(B=2, N1=2, N2=1, S1=3, S2=4, D=5, Dv=5)
    zeros = {"B0": dict(B=0), "S1_0": dict(S1=0), "S2_0": dict(S2=0), "D0": dict(D=0, Dv=0),
             "Dv0": dict(Dv=0), "S1S2_0": dict(S1=0, S2=0)}
    out = []
    for layout, (name, z) in itertools.product(LAYOUTS, zeros.items()):
        out.append((layout, name, {**base, **z}))
    return out


@pytest.mark.parametrize("layout,name,dims", empty_cases(),
                         ids=[f"{c[0]}-{c[1]}" for c in empty_cases()])
def test_empty_tensors(layout, name, dims, blocks):
    blocks(split=4)
    B, N1, N2, S1, S2, D, Dv = (dims[k] for k in ("B", "N1", "N2", "S1", "S2", "D", "Dv"))
    rng = np.random.default_rng(17)
    q, k, v, dy = make_qkv(layout, B, N1, N2, S1, S2, D, Dv, BF16, rng)
    out = fwd(q, k, v, N1, layout)
    check_forward_contract(out, q, layout, B, N1, S1, Dv)
    g = grad(q, k, v, dy, N1, layout)
    check_grad_contract(g, q, k, v)
    g2 = grad(q, k, v, dy, N1, layout, softmax_max=out.softmax_max,
              softmax_sum=out.softmax_sum, attention_in=out.attention_out)
    check_grad_contract(g2, q, k, v)
    for x, y in zip(g[:3], g2[:3]):
        np.testing.assert_array_equal(to_float64(x), to_float64(y))

    o, m, l = (to_float64(x) for x in out)
    if S2 == 0:                       # every row invalid: out 0, dq 0, (-FLT_MAX, +FLT_MAX)
        assert np.all(o == 0) and np.all(to_float64(g.dq) == 0)
        assert np.all(m == -FLT_MAX) and np.all(l == FLT_MAX)
    if S1 == 0:
        assert np.all(to_float64(g.dk) == 0) and np.all(to_float64(g.dv) == 0)
    if D == 0 and S2 > 0:             # scores are all 0: m = 0, l = S2
        assert np.all(m == 0) and np.all(l == S2)
    if Dv == 0 and D > 0:             # dP = 0 and Dsum = 0 -> dS = 0
        assert np.all(to_float64(g.dq) == 0) and np.all(to_float64(g.dk) == 0)
    if D == 0 and layout in ("BSH", "SBH"):
        return                        # the reference cannot infer N2 from H2 = 0
    # and the reference agrees on every value
    r = ref_forward(q, k, v, N1, layout)
    for nm, a, e, tol in zip(("attention_out", "softmax_max", "softmax_sum"), out, r,
                             (tolerance(BF16, "fwd"), STATS, STATS)):
        assert_close(a, e, tol, nm)
    e = ref_backward(q, k, v, dy, N1, layout)
    for nm, a, r_ in zip(("dq", "dk", "dv"), g[:3], e[:3]):
        assert_close(a, r_, tolerance(BF16, "bwd"), nm)


# ------------------------------------------------------------------------------------------------
# 6. non-contiguous and read-only inputs; inputs never modified
# ------------------------------------------------------------------------------------------------

def _noncontig(x, kind):
    """A view of a copy of ``x`` with the same values but non-C-contiguous strides."""
    if x.size == 0 or x.ndim < 2:
        return x
    if kind == "transposed":          # swap the first two axes in memory
        y = np.ascontiguousarray(x.swapaxes(0, 1)).swapaxes(0, 1)
    elif kind == "sliced":            # every other element of a larger buffer, last two axes
        big = np.zeros(x.shape[:-2] + (2 * x.shape[-2], 3 * x.shape[-1]), x.dtype)
        y = big[..., ::2, 1::3]
        y[...] = x
    elif kind == "reversed":          # negative strides
        y = np.ascontiguousarray(x[::-1, ..., ::-1])[::-1, ..., ::-1]
    elif kind == "lastdim":           # last axis not unit-stride
        y = np.ascontiguousarray(np.moveaxis(x, -1, 0))
        y = np.moveaxis(y, 0, -1)
    else:
        raise AssertionError(kind)
    assert np.array_equal(to_float64(y), to_float64(x))
    assert not y.flags.c_contiguous
    return y


NONCONTIG_CASES = [(lay, dt, kind) for lay, dt, kind in itertools.product(
    LAYOUTS, (DTYPES[0], BF16), ("transposed", "sliced", "reversed", "lastdim"))]


@pytest.mark.parametrize("layout,dtype,kind", NONCONTIG_CASES,
                         ids=[make_id(layout=c[0], dtype=c[1], view=c[2])
                              for c in NONCONTIG_CASES])
def test_noncontiguous_inputs_equal_contiguous(layout, dtype, kind, blocks):
    blocks(split=3)
    rng = np.random.default_rng(18)
    q, k, v, dy = make_qkv(layout, 2, 4, 2, 7, 11, 12, 8, dtype, rng)
    out = fwd(q, k, v, 4, layout, scale_value=0.3)
    g = grad(q, k, v, dy, 4, layout, scale_value=0.3)
    gs = grad(q, k, v, dy, 4, layout, scale_value=0.3, softmax_max=out.softmax_max,
              softmax_sum=out.softmax_sum, attention_in=out.attention_out)

    nq, nk, nv, ndy = (_noncontig(x, kind) for x in (q, k, v, dy))
    out_n = fwd(nq, nk, nv, 4, layout, scale_value=0.3)
    g_n = grad(nq, nk, nv, ndy, 4, layout, scale_value=0.3)
    gs_n = grad(nq, nk, nv, ndy, 4, layout, scale_value=0.3,
                softmax_max=_noncontig(out.softmax_max, kind),
                softmax_sum=_noncontig(out.softmax_sum, kind),
                attention_in=_noncontig(out.attention_out, kind))
    for a, b in zip(out + g[:3] + gs[:3], out_n + g_n[:3] + gs_n[:3]):
        assert a.flags.c_contiguous and b.flags.c_contiguous
        np.testing.assert_array_equal(to_float64(a), to_float64(b))


def _snapshot(arrays):
    return [(x.shape, x.strides, x.dtype, x.flags.writeable,
             np.ascontiguousarray(x).tobytes()) for x in arrays]


RO_CASES = [(lay, dt, ro) for lay, dt, ro in itertools.product(LAYOUTS, DTYPES, (False, True))]


@pytest.mark.parametrize("layout,dtype,readonly", RO_CASES,
                         ids=[make_id(layout=c[0], dtype=c[1], readonly=c[2]) for c in RO_CASES])
def test_inputs_never_modified(layout, dtype, readonly, blocks):
    blocks(split=2)
    rng = np.random.default_rng(19)
    q, k, v, dy = make_qkv(layout, 2, 2, 1, 9, 6, 10, 10, dtype, rng)
    ref_out = fwd(q.copy(), k.copy(), v.copy(), 2, layout)
    ref_g = grad(q.copy(), k.copy(), v.copy(), dy.copy(), 2, layout)
    m, l, o = (ref_out.softmax_max.copy(), ref_out.softmax_sum.copy(),
               ref_out.attention_out.copy())
    ins = [q, k, v, dy, m, l, o]
    if readonly:
        for x in ins:
            x.flags.writeable = False
    before = _snapshot(ins)
    out = fwd(q, k, v, 2, layout)
    g = grad(q, k, v, dy, 2, layout)
    gs = grad(q, k, v, dy, 2, layout, softmax_max=m, softmax_sum=l, attention_in=o)
    assert _snapshot(ins) == before
    _same_results(out, ref_out)
    _same_results(g, ref_g)
    # outputs are new, writable arrays that share no memory with the inputs
    for a in tuple(out) + tuple(g[:3]) + tuple(gs[:3]):
        assert a.flags.writeable and a.flags.c_contiguous
        assert not any(np.shares_memory(a, x) for x in ins)


def test_outputs_are_fresh_arrays_for_float32_inputs():
    """float32 C-contiguous inputs are read in place: make sure no output aliases them and a
    second call does not see the first call's outputs modified."""
    rng = np.random.default_rng(20)
    q, k, v, dy = make_qkv("BNSD", 1, 1, 1, 4, 4, 4, 4, np.float32, rng)
    g1 = grad(q, k, v, dy, 1, "BNSD")
    keep = [x.copy() for x in g1[:3]]
    for x in g1[:3]:
        x[...] = 99.0
    g2 = grad(q, k, v, dy, 1, "BNSD")
    for a, b in zip(keep, g2[:3]):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# 7. GQA == MHA with repeated K/V
# ------------------------------------------------------------------------------------------------

GQA_CASES = [(lay, dt, n1, g) for lay, dt, (n1, g) in itertools.product(
    LAYOUTS, (DTYPES[0], DTYPES[1]), ((4, 2), (4, 4), (3, 3)))]


@pytest.mark.parametrize("layout,dtype,N1,G", GQA_CASES,
                         ids=[make_id(layout=c[0], dtype=c[1], n1=c[2], gqa=c[3])
                              for c in GQA_CASES])
def test_gqa_equals_mha_with_repeated_kv(layout, dtype, N1, G, blocks):
    blocks(split=2)
    n2 = N1 // G
    rng = np.random.default_rng(21)
    q, k, v, dy = make_qkv(layout, 2, N1, n2, 10, 13, 12, 9, dtype, rng)
    kr, vr = repeat_heads(k, layout, n2, G), repeat_heads(v, layout, n2, G)
    assert kr.dtype == dtype
    kw = dict(scale_value=0.25)
    o_g = fwd(q, k, v, N1, layout, **kw)
    o_m = fwd(q, kr, vr, N1, layout, **kw)
    ftol, btol = tolerance(dtype, "fwd"), tolerance(dtype, "bwd")
    assert_close(o_g.attention_out, o_m.attention_out, ftol, "attention_out")
    assert_close(o_g.softmax_max, o_m.softmax_max, STATS, "softmax_max")
    assert_close(o_g.softmax_sum, o_m.softmax_sum, STATS, "softmax_sum")
    g_g = grad(q, k, v, dy, N1, layout, **kw)
    g_m = grad(q, kr, vr, dy, N1, layout, **kw)
    assert_close(g_g.dq, g_m.dq, btol, "dq")
    # fp16 MHA grads are rounded per head before the group sum: allow one rounding per head
    gtol = btol if dtype == np.float32 else type(btol)(btol.atol * G, btol.rtol * G)
    assert_close(g_g.dk, sum_head_groups(g_m.dk, layout, N1, G), gtol, "dk")
    assert_close(g_g.dv, sum_head_groups(g_m.dv, layout, N1, G), gtol, "dv")


# ------------------------------------------------------------------------------------------------
# 8. NaN / inf in the inputs propagate like the math says (SPEC §9: "not an error")
# ------------------------------------------------------------------------------------------------

def test_nan_and_inf_in_some_keys_propagate():
    """A NaN or +-inf in one key row: attention_out, softmax_sum and the grads have NaN exactly
    where the float64 reference has them, and agree with it elsewhere.  (softmax_max of a row
    with a NaN score is not compared: the max of a set containing NaN is left open.)"""
    rng = np.random.default_rng(22)
    q, k, v, dy = make_qkv("BNSD", 1, 2, 1, 5, 4, 8, 8, np.float32, rng)
    for bad in (np.nan, np.inf, -np.inf):
        kb = k.copy()
        kb[0, 0, 1, 0] = bad
        with np.errstate(all="ignore"):
            out = fwd(q, kb, v, 2, "BNSD")
            g = grad(q, kb, v, dy, 2, "BNSD")
            r_o, _, r_l = ref_forward(q, kb, v, 2, "BNSD")
            r_g = ref_backward(q, kb, v, dy, 2, "BNSD")
        assert np.isnan(r_o).any(), "the case must produce NaN"
        pairs = (("attention_out", out.attention_out, r_o, tolerance(np.float32, "fwd")),
                 ("softmax_sum", out.softmax_sum, r_l, STATS),
                 ("dq", g.dq, r_g[0], tolerance(np.float32, "bwd")),
                 ("dk", g.dk, r_g[1], tolerance(np.float32, "bwd")),
                 ("dv", g.dv, r_g[2], tolerance(np.float32, "bwd")))
        for name, a, e, tol in pairs:
            np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=f"{name} {bad}")
            ok = ~np.isnan(e)
            assert_close(a[ok], e[ok], tol, f"{name} ({bad})")


@pytest.mark.parametrize("where", ["query_row"])
def test_nan_score_row_propagates_in_forward(where):
    # (a NaN scale_value is a FagValueError since issue 13: the scale must be finite in
    # float32; tests/test_reliability.py checks that)
    rng = np.random.default_rng(23)
    q, k, v, dy = make_qkv("BNSD", 1, 1, 1, 3, 4, 8, 8, np.float32, rng)
    kw = {}
    q = q.copy()
    q[0, 0, 0, 0] = np.nan                           # row 0: every score is NaN
    rows = [0]
    with np.errstate(all="ignore"):
        out = fwd(q, k, v, 1, "BNSD", **kw)
        g = grad(q, k, v, dy, 1, "BNSD", **kw)
    assert np.isnan(g.dq[0, 0, rows]).all()          # the grad does propagate (passes today)
    assert np.isnan(out.attention_out[0, 0, rows]).all(), out.attention_out[0, 0, rows]
    assert np.isnan(out.softmax_sum[0, 0, rows]).all(), out.softmax_sum[0, 0, rows]


# ------------------------------------------------------------------------------------------------
# 9. larger shapes (slow lane)
# ------------------------------------------------------------------------------------------------

SLOW_CASES = [("BSND", BF16, 2, 4, 2, 700, 1030, 128, 128), ("SBH", np.dtype(np.float16), 1, 8,
                                                                1, 1025, 513, 96, 64),
              ("BNSD", np.dtype(np.float32), 1, 2, 2, 2049, 2049, 64, 64)]


@pytest.mark.slow
@pytest.mark.parametrize("layout,dtype,B,N1,N2,S1,S2,D,Dv", SLOW_CASES,
                         ids=[make_id(layout=c[0], dtype=c[1], b=c[2], n1=c[3], n2=c[4], s1=c[5],
                                      s2=c[6], d=c[7], dv=c[8]) for c in SLOW_CASES])
def test_large_shapes_default_tiles(layout, dtype, B, N1, N2, S1, S2, D, Dv):
    rng = np.random.default_rng(S1 + S2)
    q, k, v, dy = make_qkv(layout, B, N1, N2, S1, S2, D, Dv, dtype, rng)
    kw = dict(scale_value=float(1 / np.sqrt(D)))
    out = fwd(q, k, v, N1, layout, **kw)
    check_forward_contract(out, q, layout, B, N1, S1, Dv)
    r = ref_forward(q, k, v, N1, layout, **kw)
    for name, a, e, tol in zip(("attention_out", "softmax_max", "softmax_sum"), out, r,
                               (tolerance(dtype, "fwd"), STATS, STATS)):
        assert_close(a, e, tol, name)
    g = grad(q, k, v, dy, N1, layout, **kw)
    check_grad_contract(g, q, k, v)
    e = ref_backward(q, k, v, dy, N1, layout, **kw)
    for name, a, r_ in zip(("dq", "dk", "dv"), g[:3], e[:3]):
        assert_close(a, r_, tolerance(dtype, "bwd"), name)
