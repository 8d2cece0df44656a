"""End-to-end tests of atten_mask and sparse_mode 0..6 (SPEC §6, §7; ASCEND_FAG_NOTES §6, §7).

Forward and backward of ``fag_numba`` against the independent float64 reference
(``tests/reference.py``) for every sparse mode of the non-TND layouts (modes 7/8 are TND only:
``tests/test_tnd.py``):

- full masks (modes 0, 1, 5) in all four shapes ``[S1,S2]``, ``[1,1,S1,S2]``, ``[B,1,S1,S2]``,
  ``[B,N1,S1,S2]``, bool and uint8 (any non-zero byte = masked), S1 < S2, S1 > S2, S1 == S2;
- compressed masks (modes 2, 3, 4, 6), rank 2 and rank 4, bool and uint8;
- negative tokens, rows left empty by the pattern (exact invalid-row values, and a backward fed
  garbage statistics for those rows), GQA ratios 1 / 2 / N1, the four layouts, float32 and bf16;
- tile skipping: ``fag_numba.api.last_tile_count`` equals the number of non-EMPTY tiles counted by
  brute force over ``ref_computed``, causal costs about half of dense;
- no atten_mask = full attention (UserWarning for modes 2..8), non-canonical compressed masks are
  errors, mask inputs are never modified.

Tiles are patched small (backward 4 x 8, forward 5 x 7) so that EMPTY, FULL and PARTIAL tiles all
occur in sequences of ~10-30 positions.
"""
from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest

import fag_numba
from fag_numba import api, config
from fag_numba.errors import FagTypeError, FagValueError
from reference import FLT_MAX, ref_backward, ref_computed, ref_forward
from tolerances import tolerance
from utils import assert_close, fwd_block_n, make_id, make_qkv, to_bnsd

F32 = np.dtype(np.float32)
BF16 = np.dtype(ml_dtypes.bfloat16)
LAYOUTS = ("BSH", "SBH", "BSND", "BNSD")
BM, BN, FBM, FBN = 4, 8, 5, 7          # backward / forward tile sizes used by every test here


@pytest.fixture(autouse=True)
def _small_tiles(blocks):
    blocks(bm=BM, bn=BN, fbm=FBM, fbn=FBN, split=3)



# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

_COMPRESSED = {}


def compressed(mode, dtype=bool, rank4=False):
    """The canonical compressed mask of ``mode`` (cached; read-only so no test can alter it)."""
    key = (mode == 6, np.dtype(dtype).name, rank4)
    if key not in _COMPRESSED:
        tri = np.triu(np.ones((2048, 2048), dtype=bool), k=1)
        if mode == 6:
            rect = np.zeros((1024, 2048), dtype=bool)
            rect[:, 1024:] = True
            tri = np.concatenate([tri, rect])
        m = tri.astype(dtype)
        if rank4:
            m = m[None, None]
        m.flags.writeable = False
        _COMPRESSED[key] = m
    return _COMPRESSED[key]


def full_mask(rng, shape, dtype):
    """A random full mask with structure: a fully masked block (dense-EMPTY tiles), a fully
    visible block (dense-FULL tiles), random elsewhere; uint8 uses assorted non-zero bytes."""
    s1, s2 = shape[-2:]
    m = rng.random(shape) < 0.3
    m[..., : s1 // 2, (2 * s2) // 3:] = True
    m[..., s1 // 2:, : s2 // 2] = False
    if np.dtype(dtype) == np.uint8:
        return np.where(m, rng.choice(np.array([1, 7, 255], np.uint8), size=shape), 0).astype(np.uint8)
    return m


def mask_of(shape_kind, B, N1, S1, S2):
    return {"2d": (S1, S2), "11": (1, 1, S1, S2), "b1": (B, 1, S1, S2),
            "bn": (B, N1, S1, S2)}[shape_kind]


def mask_slice(mask, b, h):
    """[S1, S2] slice of a full mask for sequence b, head h (None for no/compressed masks)."""
    if mask is None:
        return None
    if mask.ndim == 2:
        return mask
    return mask[b if mask.shape[0] > 1 else 0, h if mask.shape[1] > 1 else 0]


def predicates(B, N1, S1, S2, *, atten_mask=None, sparse_mode=0, pre_tokens=2147483647,
               next_tokens=2147483647, prefix=None, **_ignored):
    """bool [B, N1, S1, S2]: the element-is-computed predicate from the reference."""
    c = np.ones((B, N1, S1, S2), dtype=bool)
    if atten_mask is None:
        return c
    for b in range(B):
        for h in range(N1):
            dense = mask_slice(atten_mask, b, h) if sparse_mode in (0, 1, 5) else None
            c[b, h] = ref_computed(sparse_mode, S1, S2, pre_tokens, next_tokens,
                                   None if prefix is None else prefix[b], dense)
    return c


def tile_census(c, bm, bn):
    """(non-EMPTY, FULL, PARTIAL) tile counts of a [.., S1, S2] predicate for bm x bn tiles."""
    s1, s2 = c.shape[-2:]
    ne = full = part = 0
    for c2 in c.reshape((-1, s1, s2)):
        for i0 in range(0, s1, bm):
            for j0 in range(0, s2, bn):
                t = c2[i0:i0 + bm, j0:j0 + bn]
                if t.any():
                    ne += 1
                    if t.all():
                        full += 1
                    else:
                        part += 1
    return ne, full, part


def to_bnsd_rows(x, layout, n):
    """A query-like tensor -> [B, N, S, last] float64 (utils.to_bnsd, upcast)."""
    return to_bnsd(np.asarray(x).astype(np.float64), layout, n)


def no_nan_inf(*arrays):
    for a in arrays:
        if a is not None:
            assert np.isfinite(np.asarray(a).astype(np.float64)).all()


def check_case(layout, B, N1, N2, S1, S2, D, Dv, dtype, seed, *, internal_fwd=False, **kw):
    """Backward, then forward, vs the reference; returns (inputs, forward output, grads).

    The backward is given the reference forward's statistics and output (float32), so it is
    checked independently of the forward (``internal_fwd`` checks the omitted-statistics path).
    """
    rng = np.random.default_rng(seed)
    q, k, v, dy = make_qkv(layout, B, N1, N2, S1, S2, D, Dv, dtype, rng)
    kw.setdefault("scale_value", 1.0 / np.sqrt(D))
    ro = ref_forward(q, k, v, N1, layout, **kw)
    if internal_fwd:
        g = fag_numba.flash_attention_score_grad(q, k, v, dy, N1, layout, **kw)
        rg = ref_backward(q, k, v, dy, N1, layout, **kw)
    else:
        st = dict(softmax_max=ro[1].astype(np.float32), softmax_sum=ro[2].astype(np.float32),
                  attention_in=ro[0].astype(np.float32))
        g = fag_numba.flash_attention_score_grad(q, k, v, dy, N1, layout, **st, **kw)
        rg = ref_backward(q, k, v, dy, N1, layout, **st, **kw)
    for name, a, e in zip(("dq", "dk", "dv"), g[:3], rg[:3]):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert_close(a, e, tolerance(dtype, "bwd"), name)
    assert g.dpse is None
    fo = fag_numba.flash_attention_score(q, k, v, N1, layout, **kw)
    assert fo.attention_out.dtype == dtype and fo.attention_out.shape == ro[0].shape
    assert_close(fo.attention_out, ro[0], tolerance(dtype, "fwd"), "attention_out")
    assert_close(fo.softmax_max, ro[1], tolerance(dtype, "stats"), "softmax_max")
    assert_close(fo.softmax_sum, ro[2], tolerance(dtype, "stats"), "softmax_sum")
    no_nan_inf(fo.attention_out, fo.softmax_max, fo.softmax_sum, *g[:3])
    return (q, k, v, dy), fo, g


def prefix_for(rng, B, S1, S2):
    lo = 0 if S1 > S2 else S2 - S1
    return [int(x) for x in rng.integers(lo, S2 + 1, size=B)]


# ------------------------------------------------------------------------------------------------
# 1. full masks: modes 0, 1, 5 x the four shapes
# ------------------------------------------------------------------------------------------------

SIZES = ((13, 21), (21, 13), (16, 16))
GQA = (1, 2, 4)                 # N1 = 4: ratios 1, 2 and N1 (MQA)
B_, N1_ = 2, 4


def _full_cases():
    cases, x = [], 0
    for mode in (0, 1, 5):
        for shape_kind in ("2d", "11", "b1", "bn"):
            s1, s2 = SIZES[x % 3]
            layout = LAYOUTS[x % 4]
            gqa = GQA[(x // 2) % 3]
            mdt = (bool, np.uint8)[x % 2]
            dtype = BF16 if x % 5 == 4 else F32
            rng = np.random.default_rng(100 + x)
            kw = dict(atten_mask=full_mask(rng, mask_of(shape_kind, B_, N1_, s1, s2), mdt),
                      sparse_mode=mode)
            if mode == 0:
                kw.update(pre_tokens=6, next_tokens=4)
            if mode == 1:
                kw.update(pre_tokens=-1, next_tokens=-1)   # ignored by mode 1 (no token checks)
            if mode == 5:
                kw["prefix"] = prefix_for(rng, B_, s1, s2)
            cases.append(pytest.param(kw, s1, s2, layout, gqa, dtype, x,
                                      id=make_id(sm=mode, mask=shape_kind, mdt=np.dtype(mdt).name,
                                                 layout=layout, gqa=gqa, dtype=dtype,
                                                 s1=s1, s2=s2)))
            x += 1
    return cases


@pytest.mark.parametrize("kw,s1,s2,layout,gqa,dtype,seed", _full_cases())
def test_full_mask_modes(kw, s1, s2, layout, gqa, dtype, seed):
    mask = kw["atten_mask"]
    keep = mask.copy()
    dv = 8 if seed % 3 else 6
    check_case(layout, B_, N1_, N1_ // gqa, s1, s2, 8, dv, dtype, seed, **kw)
    np.testing.assert_array_equal(mask, keep)
    # the tiles computed are exactly the non-EMPTY ones (dense x band intersections included)
    c = predicates(B_, N1_, s1, s2, **kw)
    assert api.last_tile_count["forward"] == tile_census(c, FBM, fwd_block_n(FBN, dtype, 8, dv))[0]


def test_full_mask_per_head_differs():
    """[B, N1, S1, S2]: each (b, h) reads its own plane (one plane fully visible, one causal)."""
    B, N1, S1, S2 = 2, 2, 11, 9
    mask = np.ones((B, N1, S1, S2), dtype=bool)
    mask[0, 0] = False
    mask[0, 1] = np.triu(np.ones((S1, S2), bool), k=1)
    mask[1, 0] = np.tril(np.ones((S1, S2), bool), k=-1)
    mask[1, 1, :, ::2] = False
    check_case("BNSD", B, N1, 1, S1, S2, 8, 8, F32, 7, atten_mask=mask, sparse_mode=1)


# ------------------------------------------------------------------------------------------------
# 2. compressed masks: modes 2, 3, 4, 6
# ------------------------------------------------------------------------------------------------

def _compressed_cases():
    cases, x = [], 0
    for mode in (2, 3, 4, 6):
        for s1, s2 in SIZES:
            layout = LAYOUTS[(x + 1) % 4]
            gqa = GQA[x % 3]
            mdt = (bool, np.uint8)[(x // 2) % 2]
            rank4 = x % 3 == 1
            dtype = BF16 if x % 4 == 3 else F32
            rng = np.random.default_rng(200 + x)
            kw = dict(atten_mask=compressed(mode, mdt, rank4), sparse_mode=mode)
            if mode in (2, 3):
                kw.update(pre_tokens=-5, next_tokens=-5)     # ignored by modes 2/3
            if mode == 4:
                kw.update(pre_tokens=3, next_tokens=2)
            if mode == 6:
                kw["prefix"] = prefix_for(rng, B_, s1, s2)
            cases.append(pytest.param(kw, s1, s2, layout, gqa, dtype, x,
                                      id=make_id(sm=mode, layout=layout, gqa=gqa,
                                                 mdt=np.dtype(mdt).name, rank4=rank4,
                                                 dtype=dtype, s1=s1, s2=s2)))
            x += 1
    return cases


@pytest.mark.parametrize("kw,s1,s2,layout,gqa,dtype,seed", _compressed_cases())
def test_compressed_modes(kw, s1, s2, layout, gqa, dtype, seed):
    check_case(layout, B_, N1_, N1_ // gqa, s1, s2, 8, 7, dtype, 200 + seed,
               internal_fwd=(seed % 4 == 0 and kw["sparse_mode"] != 6), **kw)
    c = predicates(B_, N1_, s1, s2, **kw)
    # compressed modes have no dense part: the classification is exact
    assert api.last_tile_count["forward"] == tile_census(c, FBM, fwd_block_n(FBN, dtype, 8, 7))[0]


@pytest.mark.parametrize("mode", [5, 6])
@pytest.mark.parametrize("layout,s1,s2", [("BNSD", 21, 13), ("BSH", 13, 21), ("SBH", 16, 16)])
def test_prefix_modes_wide_prefix(mode, layout, s1, s2):
    """Modes 5/6 with prefixes wide enough that prefix columns lie far right of the band of the
    first query blocks (regression: the forward's key-block range used to ignore them)."""
    B, N1 = 2, 2
    prefix = [s2, max(0 if s1 > s2 else s2 - s1, s2 - 2)]
    rng = np.random.default_rng(500 + s1)
    mask = (compressed(6) if mode == 6 else
            full_mask(rng, (B, 1, s1, s2), np.uint8) * np.uint8(rng.random((B, 1, s1, s2)) < 0.5))
    kw = dict(atten_mask=mask, sparse_mode=mode, prefix=prefix, scale_value=0.3)
    q, k, v, dy = make_qkv(layout, B, N1, 1, s1, s2, 8, 8, F32, rng)
    ro = ref_forward(q, k, v, N1, layout, **kw)
    st = dict(softmax_max=ro[1].astype(np.float32), softmax_sum=ro[2].astype(np.float32),
              attention_in=ro[0].astype(np.float32))
    g = fag_numba.flash_attention_score_grad(q, k, v, dy, N1, layout, **st, **kw)
    rg = ref_backward(q, k, v, dy, N1, layout, **st, **kw)
    for name, a, e in zip(("dq", "dk", "dv"), g[:3], rg[:3]):
        assert_close(a, e, tolerance(F32, "bwd"), name)
    c = predicates(B, N1, s1, s2, **kw)
    assert api.last_tile_count["backward"] == tile_census(c, BM, BN)[0]
    fo = fag_numba.flash_attention_score(q, k, v, N1, layout, **kw)
    assert api.last_tile_count["forward"] == tile_census(c, FBM, FBN)[0]
    for name, a, e in zip(("attention_out", "softmax_max", "softmax_sum"), fo, ro):
        assert_close(a, e, tolerance(F32, "fwd"), name)


def test_prefix_forward_default_blocks(blocks):
    """Regression (kernels/driver.py::kv_block_range ignored prefix columns past the band), with
    the default tile sizes: BNSD, B = N = 1, S1 = S2 = 600, D = 8, sparse_mode 6, prefix [500]:
    query rows 0..63 (first forward block) must see key columns 0..499."""
    blocks(**{"bm": 64, "bn": 128, "fbm": 64, "fbn": 256})
    rng = np.random.default_rng(0)
    S = 600
    q, k, v = (rng.standard_normal((1, 1, S, 8)).astype(np.float32) for _ in range(3))
    kw = dict(atten_mask=compressed(6), sparse_mode=6, prefix=[500])
    fo = fag_numba.flash_attention_score(q, k, v, 1, "BNSD", **kw)
    ro = ref_forward(q, k, v, 1, "BNSD", **kw)
    assert_close(fo.softmax_max, ro[1], tolerance(F32, "stats"), "softmax_max")
    assert_close(fo.softmax_sum, ro[2], tolerance(F32, "stats"), "softmax_sum")
    assert_close(fo.attention_out, ro[0], tolerance(F32, "fwd"), "attention_out")


@pytest.mark.parametrize("mode,pre,nxt", [(0, 9, -3), (0, -3, 7), (4, 9, -3), (4, -3, 7)])
@pytest.mark.parametrize("s1,s2", [(14, 20), (20, 14)])
def test_negative_tokens(mode, pre, nxt, s1, s2):
    rng = np.random.default_rng(300 + mode + s1)
    mask = (rng.random((s1, s2)) < 0.1) if mode == 0 else compressed(4)
    layout = "BSND" if s1 < s2 else "SBH"
    _, fo, _ = check_case(layout, 2, 2, 1, s1, s2, 8, 8, F32, 301 + s1, atten_mask=mask,
                          sparse_mode=mode, pre_tokens=pre, next_tokens=nxt)
    c = predicates(2, 2, s1, s2, atten_mask=mask, sparse_mode=mode, pre_tokens=pre,
                   next_tokens=nxt)
    if mode == 0 and mask is not None:
        # literal band check of SPEC §7: i - pre <= j <= i + next
        i = np.arange(s1)[:, None]
        j = np.arange(s2)[None, :]
        band = (i - pre <= j) & (j <= i + nxt)
        np.testing.assert_array_equal(c[0, 0], band & (mask == 0))


# ------------------------------------------------------------------------------------------------
# 3. rows left empty by the pattern: exact invalid-row values, garbage statistics
# ------------------------------------------------------------------------------------------------

def _invalid_row_cases():
    m1 = np.zeros((15, 12), dtype=np.uint8)
    m1[[0, 6, 7, 14], :] = 3                 # fully masked rows
    m1[2, :11] = 1                           # one visible element only
    return [
        pytest.param("BNSD", 21, 13, dict(sparse_mode=3), id="sm3-s21x13"),
        pytest.param("BSH", 21, 13, dict(sparse_mode=4, pre_tokens=2, next_tokens=-1),
                     id="sm4-band-misses-rows"),
        pytest.param("SBH", 14, 20, dict(sparse_mode=0, pre_tokens=9, next_tokens=-3),
                     id="sm0-pre9-next-3"),
        pytest.param("BSND", 20, 13, dict(sparse_mode=0, pre_tokens=-3, next_tokens=7),
                     id="sm0-pre-3-next7"),
        pytest.param("BNSD", 15, 12, dict(sparse_mode=1, atten_mask=m1), id="sm1-masked-rows"),
    ]


GARBAGE = [(0.0, 0.0), (-FLT_MAX, FLT_MAX), (FLT_MAX, 0.0), (1e30, 1e-30), (-7.5, 3.25)]


@pytest.mark.parametrize("layout,s1,s2,kw", _invalid_row_cases())
def test_invalid_rows(layout, s1, s2, kw, monkeypatch):
    # the bitwise comparison below (garbage statistics of invalid rows: the careful path, whose
    # products are split by rows, vs the plain path) holds with OpenBLAS, whose kernels add each
    # element's products in k order whatever the shape; MKL's differ by shape (float32 rounding)
    monkeypatch.setattr(config, "FLOAT32_BLAS", "openblas")
    B, N1, N2, D = 2, 2, 1, 8
    kw = dict(kw)
    mode = kw["sparse_mode"]
    if "atten_mask" not in kw:
        kw["atten_mask"] = np.zeros((s1, s2), bool) if mode == 0 else compressed(mode)
    (q, k, v, dy), fo, _ = check_case(layout, B, N1, N2, s1, s2, D, D, F32, 400 + s1, **kw)
    # the forward -> grad round trip with fag_numba's own statistics
    g = fag_numba.flash_attention_score_grad(
        q, k, v, dy, N1, layout, softmax_max=fo.softmax_max, softmax_sum=fo.softmax_sum,
        attention_in=fo.attention_out, scale_value=1 / np.sqrt(D), **kw)
    c = predicates(B, N1, s1, s2, **kw)
    invalid = ~c.any(axis=-1)                                   # [B, N1, S1]
    assert invalid.any() and not invalid.all()
    out = to_bnsd_rows(fo.attention_out, layout, N1)
    assert (out[invalid] == 0).all()
    assert (fo.softmax_max[invalid] == -FLT_MAX).all()          # exactly, all 8 lanes
    assert (fo.softmax_sum[invalid] == FLT_MAX).all()
    assert (to_bnsd_rows(g.dq, layout, N1)[invalid] == 0).all()

    # the backward given garbage statistics / attention_in for those rows: still exactly 0
    rng = np.random.default_rng(9)
    o_bad = to_bnsd_rows(fo.attention_out, layout, N1).astype(np.float32)
    o_bad[invalid] = rng.standard_normal((int(invalid.sum()), o_bad.shape[-1]))
    o_bad = _from_bnsd(o_bad, layout)
    for mval, lval in GARBAGE:
        m = fo.softmax_max.copy()
        l = fo.softmax_sum.copy()
        m[invalid] = mval
        l[invalid] = lval
        for lanes in (8, 1, 0):
            mm = m[..., :lanes] if lanes else m[..., 0]
            ll = l[..., :lanes] if lanes else l[..., 0]
            gb = fag_numba.flash_attention_score_grad(
                q, k, v, dy, N1, layout, softmax_max=mm, softmax_sum=ll, attention_in=o_bad,
                scale_value=1 / np.sqrt(D), **kw)
            no_nan_inf(*gb[:3])
            assert (to_bnsd_rows(gb.dq, layout, N1)[invalid] == 0).all()
            # the invalid rows contribute exactly nothing: bitwise the result of good stats
            for name, a, e in zip(("dq", "dk", "dv"), gb[:3], g[:3]):
                assert np.array_equal(a, e), (name, mval, lval, lanes)
        rg = ref_backward(q, k, v, dy, N1, layout, softmax_max=m, softmax_sum=l,
                          attention_in=o_bad, scale_value=1 / np.sqrt(D), **kw)
        for name, a, e in zip(("dq", "dk", "dv"), gb[:3], rg[:3]):
            assert_close(a, e, tolerance(F32, "bwd"), name)


def _from_bnsd(x, layout):
    b, n, s, d = x.shape
    y = {"BNSD": x, "BSND": x.transpose(0, 2, 1, 3),
         "BSH": x.transpose(0, 2, 1, 3).reshape(b, s, n * d),
         "SBH": x.transpose(2, 0, 1, 3).reshape(s, b, n * d)}[layout]
    return np.ascontiguousarray(y)


def test_every_row_masked():
    """A mask that masks everything: out 0, invalid statistics everywhere, zero gradients."""
    B, N1, S1, S2 = 1, 2, 9, 10
    mask = np.ones((S1, S2), np.uint8)
    (q, k, v, dy), fo, g = check_case("BNSD", B, N1, 2, S1, S2, 8, 8, F32, 5, atten_mask=mask,
                                      sparse_mode=1)
    assert (fo.attention_out == 0).all()
    assert (fo.softmax_max == -FLT_MAX).all() and (fo.softmax_sum == FLT_MAX).all()
    for x in g[:3]:
        assert (x == 0).all()
    assert api.last_tile_count == {"forward": 0, "backward": 0}


# ------------------------------------------------------------------------------------------------
# 4. tile skipping (SPEC §7: EMPTY skipped, causal ~ half of dense)
# ------------------------------------------------------------------------------------------------

def _counts(layout, B, N1, N2, S1, S2, **kw):
    rng = np.random.default_rng(11)
    q, k, v, dy = make_qkv(layout, B, N1, N2, S1, S2, 8, 8, F32, rng)
    fag_numba.flash_attention_score(q, k, v, N1, layout, **kw)
    fwd = api.last_tile_count["forward"]
    # internal forward + backward: "forward" is overwritten by the same forward again
    fag_numba.flash_attention_score_grad(q, k, v, dy, N1, layout, **kw)
    assert api.last_tile_count["forward"] == fwd
    return fwd, api.last_tile_count["backward"]


@pytest.mark.parametrize("mode,S", [(3, 64), (2, 80)])
def test_causal_costs_about_half_of_dense(mode, S):
    B, N1 = 1, 2
    dense = _counts("BNSD", B, N1, 1, S, S)
    causal = _counts("BNSD", B, N1, 1, S, S, atten_mask=compressed(mode), sparse_mode=mode)
    ones = np.ones((B, N1, S, S), bool)
    c = predicates(B, N1, S, S, atten_mask=compressed(mode), sparse_mode=mode)
    assert dense == (tile_census(ones, FBM, FBN)[0], tile_census(ones, BM, BN)[0])
    fne, ffull, fpart = tile_census(c, FBM, FBN)
    bne, bfull, bpart = tile_census(c, BM, BN)
    assert causal == (fne, bne)
    assert min(ffull, fpart, bfull, bpart) > 0             # every tile class occurs
    for cz, dz in zip(causal, dense):
        assert 0.45 <= cz / dz <= 0.6, (causal, dense)


def _skip_cases():
    S1, S2 = 23, 30
    rng = np.random.default_rng(12)
    m0 = np.zeros((S1, S2), bool)
    m0[:, 20:] = True                                         # masked column blocks
    m5 = np.zeros((2, 1, S1, S2), np.uint8)
    m5[1, 0, 8:16, :] = 1                                     # masked row blocks in batch 1
    m1 = full_mask(rng, (2, 3, S1, S2), bool)
    kw5 = dict(atten_mask=m5, sparse_mode=5, prefix=[10, 25])
    kw6 = dict(atten_mask=compressed(6), sparse_mode=6, prefix=[7, 19])
    return [
        pytest.param(dict(atten_mask=m0, sparse_mode=0, pre_tokens=5, next_tokens=0), id="sm0"),
        pytest.param(dict(atten_mask=m1, sparse_mode=1), id="sm1"),
        pytest.param(dict(atten_mask=compressed(2), sparse_mode=2), id="sm2"),
        pytest.param(dict(atten_mask=compressed(4), sparse_mode=4, pre_tokens=6,
                          next_tokens=-2), id="sm4"),
        pytest.param(kw5, id="sm5"),
        pytest.param(kw6, id="sm6"),
        pytest.param(dict(atten_mask=compressed(3), sparse_mode=3), id="sm3"),
    ]


@pytest.mark.parametrize("kw", _skip_cases())
def test_tile_count_equals_brute_force(kw):
    B, N1, S1, S2 = 2, 3, 23, 30
    fwd, bwd = _counts("BSH", B, N1, 1, S1, S2, **kw)
    c = predicates(B, N1, S1, S2, **kw)
    assert (fwd, bwd) == (tile_census(c, FBM, FBN)[0], tile_census(c, BM, BN)[0])
    # and it is strictly less than dense: something was skipped
    assert bwd < B * N1 * -(-S1 // BM) * -(-S2 // BN)


def test_dense_and_band_tile_skipping():
    """Mode 0, pre = next = 0 (the diagonal) and a mask that masks exactly the diagonal: nothing
    is computed, so no tile may be visited (BNSD, B = N = 1, S1 = S2 = 8, tiles 4x8 / 5x7).
    Regression: tile_class used to call a tile whose band and dense parts are each PARTIAL
    PARTIAL even when their intersection is empty (forward 3, backward 2 tiles visited)."""
    S = 8
    rng = np.random.default_rng(19)
    q, k, v, dy = make_qkv("BNSD", 1, 1, 1, S, S, 4, 4, F32, rng)
    kw = dict(atten_mask=np.eye(S, dtype=bool), sparse_mode=0, pre_tokens=0, next_tokens=0)
    fo = fag_numba.flash_attention_score(q, k, v, 1, "BNSD", **kw)
    fwd = api.last_tile_count["forward"]
    g = fag_numba.flash_attention_score_grad(q, k, v, dy, 1, "BNSD", **kw)
    # the results themselves are right: every row invalid
    assert (fo.attention_out == 0).all() and (fo.softmax_max == -FLT_MAX).all()
    assert all((x == 0).all() for x in g[:3])
    assert (fwd, api.last_tile_count["backward"]) == (0, 0)


# ------------------------------------------------------------------------------------------------
# 5. no mask = full attention; warnings; canonical check; inputs unmodified
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", range(9))
def test_no_mask_is_full_attention(mode):
    layout, B, N1, N2, S1, S2, D = "BSND", 2, 2, 1, 11, 17, 8
    rng = np.random.default_rng(13)
    q, k, v, dy = make_qkv(layout, B, N1, N2, S1, S2, D, D, F32, rng)
    base_f = fag_numba.flash_attention_score(q, k, v, N1, layout)
    base_g = fag_numba.flash_attention_score_grad(q, k, v, dy, N1, layout)
    base_tiles = dict(api.last_tile_count)
    # tokens and prefix that would be invalid with a mask, sparse_mode 5/7/8 outside their rules
    kw = dict(sparse_mode=mode, pre_tokens=-100, next_tokens=-100, prefix=[99, 99, 99])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fo = fag_numba.flash_attention_score(q, k, v, N1, layout, **kw)
        g = fag_numba.flash_attention_score_grad(q, k, v, dy, N1, layout, **kw)
    user = [w for w in rec if issubclass(w.category, UserWarning)]
    if mode >= 2:
        assert len(user) == 2 and all(str(mode) in str(w.message) for w in user)
        assert all(w.filename == __file__ for w in user)          # points at the caller
    else:
        assert not user
    for a, e in zip(list(fo) + list(g[:3]), list(base_f) + list(base_g[:3])):
        assert np.array_equal(a, e)
    assert api.last_tile_count == base_tiles
    ro = ref_forward(q, k, v, N1, layout)
    assert_close(fo.attention_out, ro[0], tolerance(F32, "fwd"))


def _flip(mask, r, c, val):
    m = np.array(mask)
    m[..., r, c] = val
    return m


@pytest.mark.parametrize("mode", [2, 3, 4, 6])
def test_non_canonical_compressed_mask_is_an_error(mode):
    B, N1, S = 1, 1, 8
    rng = np.random.default_rng(14)
    q, k, v, dy = make_qkv("BNSD", B, N1, N1, S, S, 4, 4, F32, rng)
    kw = dict(sparse_mode=mode, prefix=[4])
    canon = compressed(mode)
    bad = [
        _flip(canon, 5, 100, False),                  # a masked element cleared
        _flip(canon, 100, 5, True),                   # a visible element masked
        _flip(canon, 2047, 0, True),                  # far away from what S = 8 reads
        np.zeros_like(canon),                         # all zeros (a "no mask" attempt)
        _flip(compressed(mode, np.uint8, True), 0, 1, 0),     # rank 4 uint8
    ]
    if mode == 6:
        bad.append(_flip(canon, 3000, 10, True))      # the prefix rectangle
        bad.append(compressed(2))                     # the [2048, 2048] one for mode 6
    else:
        bad.append(compressed(6))                     # the mode-6 one for other modes
        bad.append(np.zeros((S, S), bool))            # a full mask for a compressed mode
    for m in bad:
        for fn, extra in ((fag_numba.flash_attention_score, ()),
                          (fag_numba.flash_attention_score_grad, (dy,))):
            with pytest.raises(FagValueError, match="atten_mask"):
                fn(q, k, v, *extra, N1, "BNSD", atten_mask=m, **kw)
    # compared as booleans: any non-zero byte counts as masked
    u = compressed(mode, np.uint8).copy()
    u[u != 0] = 200
    a = fag_numba.flash_attention_score(q, k, v, N1, "BNSD", atten_mask=u, **kw)
    b = fag_numba.flash_attention_score(q, k, v, N1, "BNSD", atten_mask=canon, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_mask_dtype_shape_errors():
    B, N1, S1, S2 = 2, 2, 6, 7
    rng = np.random.default_rng(15)
    q, k, v, dy = make_qkv("BSND", B, N1, N1, S1, S2, 4, 4, F32, rng)
    f = fag_numba.flash_attention_score
    with pytest.raises(FagTypeError, match="atten_mask"):
        f(q, k, v, N1, "BSND", atten_mask=np.zeros((S1, S2), np.int32), sparse_mode=1)
    with pytest.raises(FagTypeError, match="atten_mask"):
        f(q, k, v, N1, "BSND", atten_mask=[[0] * S2] * S1, sparse_mode=1)
    for shape in [(S2, S1), (1, S1, S2), (B, 2 * N1, S1, S2), (1, N1, S1, S2), (3, 1, S1, S2),
                  (1, 1, 1, S1, S2)]:
        with pytest.raises(FagValueError, match="atten_mask"):
            f(q, k, v, N1, "BSND", atten_mask=np.zeros(shape, bool), sparse_mode=0)
    with pytest.raises(FagValueError, match="prefix"):
        f(q, k, v, N1, "BSND", atten_mask=np.zeros((S1, S2), bool), sparse_mode=5)
    with pytest.raises(FagValueError, match="prefix"):      # S1 < S2: prefix in [S2-S1, S2]
        f(q, k, v, N1, "BSND", atten_mask=compressed(6), sparse_mode=6, prefix=[0, 7])
    with pytest.raises(FagValueError, match="sparse_mode"):
        f(q, k, v, N1, "BSND", atten_mask=compressed(7), sparse_mode=7)
    with pytest.raises(FagValueError, match="pre_tokens|next_tokens"):
        f(q, k, v, N1, "BSND", atten_mask=compressed(4), sparse_mode=4, pre_tokens=-3,
          next_tokens=1)


def test_mask_inputs_not_modified_any_strides():
    """Masks are read, never written; read-only and non-contiguous masks give the same result."""
    layout, B, N1, S1, S2 = "BNSD", 2, 2, 13, 18
    rng = np.random.default_rng(16)
    q, k, v, dy = make_qkv(layout, B, N1, N1, S1, S2, 8, 8, F32, rng)
    base = full_mask(rng, (B, N1, S1, S2), np.uint8)
    results = []
    big = np.zeros((B, N1, 2 * S1, 3 * S2), np.uint8)
    big[:, :, ::2, ::3] = base
    ro = base.copy()
    ro.flags.writeable = False
    fortran = np.asfortranarray(base)
    as_bool = base.astype(bool)
    for m in (base, big[:, :, ::2, ::3], ro, fortran, as_bool):
        snap = m.copy()
        fo = fag_numba.flash_attention_score(q, k, v, N1, layout, atten_mask=m, sparse_mode=1)
        g = fag_numba.flash_attention_score_grad(q, k, v, dy, N1, layout, atten_mask=m,
                                                 sparse_mode=1)
        np.testing.assert_array_equal(m, snap)
        results.append(list(fo) + list(g[:3]))
    for r in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(r, results[0]))
    c = compressed(3, np.uint8).copy()
    snap = c.copy()
    fag_numba.flash_attention_score_grad(q, k, v, dy, N1, layout, atten_mask=c, sparse_mode=3)
    np.testing.assert_array_equal(c, snap)


@pytest.mark.parametrize("layout,gqa,dtype", [("BSH", 1, BF16), ("SBH", 4, F32),
                                              ("BSND", 2, BF16), ("BNSD", 4, BF16)])
def test_layouts_gqa_dtypes_causal_and_band(layout, gqa, dtype):
    """A sample of layout x GQA x dtype with a causal and a dense mode, B = 3, Dv < D."""
    N1 = 4
    check_case(layout, 3, N1, N1 // gqa, 19, 25, 12, 8, dtype, 17 + gqa,
               atten_mask=compressed(3), sparse_mode=3)
    rng = np.random.default_rng(18)
    check_case(layout, 3, N1, N1 // gqa, 25, 19, 12, 8, dtype, 18 + gqa,
               atten_mask=full_mask(rng, (3, 1, 25, 19), np.uint8), sparse_mode=0,
               pre_tokens=4, next_tokens=9)


@pytest.mark.parametrize("pre,nxt", [(2**63 - 1, 2**63 - 1), (2**62, 3), (-3, 2**63 - 1),
                                     (2**31 - 1, 2**31 - 1)])
def test_extreme_tokens(pre, nxt):
    """Tokens anywhere in the int64 range: bounds are clamped, nothing overflows.  Compared with
    the same band written with small tokens (the float64 reference itself overflows in int64 for
    tokens near 2**63, so it is not used with the raw values here)."""
    layout, B, N1, S1, S2 = "BSND", 1, 2, 9, 12
    rng = np.random.default_rng(23)
    q, k, v, dy = make_qkv(layout, B, N1, N1, S1, S2, 8, 8, F32, rng)
    small = lambda t: max(-S1 - S2, min(S1 + S2, t))          # noqa: E731  same band, small ints
    for mode, mask in ((0, np.zeros((S1, S2), bool)), (4, compressed(4))):
        kw = dict(atten_mask=mask, sparse_mode=mode)
        big = (fag_numba.flash_attention_score(q, k, v, N1, layout, pre_tokens=pre,
                                               next_tokens=nxt, **kw),
               fag_numba.flash_attention_score_grad(q, k, v, dy, N1, layout, pre_tokens=pre,
                                                    next_tokens=nxt, **kw))
        ref_kw = dict(kw, pre_tokens=small(pre), next_tokens=small(nxt))
        ro = ref_forward(q, k, v, N1, layout, **ref_kw)
        rg = ref_backward(q, k, v, dy, N1, layout, **ref_kw)
        for a, e in zip(list(big[0]) + list(big[1][:3]), list(ro) + list(rg[:3])):
            assert_close(a, e, tolerance(F32, "bwd"))
