"""Long runs on one machine (SPEC §12, §10, §1): the lse form, out_dtype=float32 for fp16/bf16,
and the chunked driver.

- ``softmax_lse``: values against float64 ``m + log(l)``, every statistics shape, invalid rows
  (``-inf``), TND in both softmax layouts, errors naming the argument;
- the grad's ``softmax_lse=``: bitwise equal to the grad given softmax_max/softmax_sum (the same
  float32 expression feeds the kernels), invalid rows give zero gradients, errors;
- ``out_dtype=float32`` for float16/bfloat16 inputs in forward and grad: float32 outputs that are
  the unrounded values (rounding them gives the default outputs bit for bit).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fag_numba
from fag_numba import FagTypeError, FagValueError
from reference import FLT_MAX, ref_backward
from tolerances import tolerance
from utils import assert_close, assert_grads_close, forward_backward, make_qkv

BF16 = np.dtype(ml_dtypes.bfloat16)
TRI = np.triu(np.ones((2048, 2048), bool), 1)


def _fwd_grad_lse(q, k, v, dy, n1, layout, **kw):
    fwd = fag_numba.flash_attention_score(q, k, v, n1, layout, **kw)
    lse = fag_numba.softmax_lse(fwd.softmax_max, fwd.softmax_sum)
    g_pair = fag_numba.flash_attention_score_grad(
        q, k, v, dy, n1, layout, softmax_max=fwd.softmax_max, softmax_sum=fwd.softmax_sum,
        attention_in=fwd.attention_out, **kw)
    g_lse = fag_numba.flash_attention_score_grad(
        q, k, v, dy, n1, layout, softmax_lse=lse, attention_in=fwd.attention_out, **kw)
    return fwd, lse, g_pair, g_lse


def _equal_grads(a, b):
    for name in ("dq", "dk", "dv"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y), f"{name}: max diff {np.abs(x - y).max()}"
    if a.dpse is None:
        assert b.dpse is None
    else:
        assert np.array_equal(a.dpse, b.dpse)


# ------------------------------------------------------------------------------------------
# softmax_lse
# ------------------------------------------------------------------------------------------

def test_softmax_lse_values_shapes_and_invalid_rows(rng):
    B, N, S1, S2, D = 2, 3, 11, 6, 8
    q, k, v, _ = make_qkv("BNSD", B, N, N, S1, S2, D, D, np.float32, rng)
    # rightDownCausal with S1 > S2: the first S1 - S2 rows see nothing (invalid rows)
    fwd = fag_numba.flash_attention_score(q, k, v, N, "BNSD", atten_mask=TRI, sparse_mode=3,
                                          scale_value=0.4)
    m, l = fwd.softmax_max, fwd.softmax_sum
    lse = fag_numba.softmax_lse(m, l)
    assert lse.shape == (B, N, S1) and lse.dtype == np.float32
    invalid = m[..., 0] == -FLT_MAX
    assert invalid.sum() == B * N * (S1 - S2)
    assert np.all(lse[invalid] == -np.inf)
    want = m[..., 0].astype(np.float64) + np.log(l[..., 0].astype(np.float64))
    assert np.all(np.isfinite(lse[~invalid]))
    np.testing.assert_allclose(lse[~invalid], want[~invalid], rtol=2e-7, atol=2e-7)
    # the three accepted statistics shapes give the same values
    for mm, ll in ((m[..., :1], l[..., :1]), (m[..., 0], l[..., 0]),
                   (np.asfortranarray(m), l)):
        assert np.array_equal(fag_numba.softmax_lse(mm, ll), lse)
    # inputs are never modified; read-only inputs are fine
    m2 = m.copy()
    m2.flags.writeable = False
    assert np.array_equal(fag_numba.softmax_lse(m2, l), lse)
    assert np.array_equal(m2, m)


@pytest.mark.parametrize("softmax_layout", ["", "TND"])
def test_softmax_lse_tnd_keeps_the_row_order(softmax_layout, rng):
    seq_q, seq_k = [3, 3, 9], [4, 4, 10]          # an empty sequence in the middle
    q, k, v, dy = make_qkv("TND", 1, 2, 1, None, None, 8, 8, np.float32, rng,
                           actual_seq_qlen=seq_q, actual_seq_kvlen=seq_k)
    kw = dict(actual_seq_qlen=seq_q, actual_seq_kvlen=seq_k, softmax_layout=softmax_layout,
              scale_value=0.3)
    fwd, lse, g_pair, g_lse = _fwd_grad_lse(q, k, v, dy, 2, "TND", **kw)
    assert lse.shape == (9, 2)
    m, l = fwd.softmax_max[..., 0], fwd.softmax_sum[..., 0]
    want = m.astype(np.float64) + np.log(l.astype(np.float64))
    np.testing.assert_allclose(lse, want, rtol=2e-7, atol=2e-7)   # same memory order as m, l
    assert np.array_equal(fag_numba.softmax_lse(m, l), lse)        # [T1, N1] input
    _equal_grads(g_pair, g_lse)


@pytest.mark.parametrize("bad,exc,name", [
    (dict(softmax_max=np.zeros((1, 2, 3, 8), np.float64)), FagTypeError, "softmax_max"),
    (dict(softmax_sum=[1.0]), FagTypeError, "softmax_sum"),
    (dict(softmax_sum=np.ones((1, 2, 4, 8), np.float32)), FagValueError, "softmax_sum"),
    (dict(softmax_max=np.zeros((1, 2, 3, 8, 1), np.float32)), FagValueError, "softmax_max"),
    (dict(softmax_max=np.zeros(3, np.float32)), FagValueError, "softmax_max"),
])
def test_softmax_lse_errors_name_the_argument(bad, exc, name):
    a = dict(softmax_max=np.zeros((1, 2, 3, 8), np.float32),
             softmax_sum=np.ones((1, 2, 3, 8), np.float32))
    a.update(bad)
    with pytest.raises(exc, match=name):
        fag_numba.softmax_lse(**a)


# ------------------------------------------------------------------------------------------
# The grad's softmax_lse=
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout,dtype,kw", [
    ("BNSD", np.float32, dict()),
    ("BSND", np.float32, dict(atten_mask=TRI, sparse_mode=3)),         # invalid rows (S1 > S2)
    ("BSH", np.float16, dict(atten_mask=TRI, sparse_mode=4, pre_tokens=3, next_tokens=1)),
    ("SBH", BF16, dict(keep_prob=0.7, seed=5, offset=9)),
    ("BNSD", np.float32, dict(pse_type=2, q_start_idx=3, kv_start_idx=1)),
])
def test_grad_with_lse_equals_grad_with_max_sum(layout, dtype, kw, rng, blocks):
    blocks()
    B, N1, N2, S1, S2, D = 2, 4, 2, 13, 9, 8
    q, k, v, dy = make_qkv(layout, B, N1, N2, S1, S2, D, D, dtype, rng)
    if kw.get("pse_type") == 2:
        kw = dict(kw, pse=rng.random(N1).astype(np.float32))
    fwd, lse, g_pair, g_lse = _fwd_grad_lse(q, k, v, dy, N1, layout, scale_value=0.35, **kw)
    _equal_grads(g_pair, g_lse)
    if dtype == np.float32 and "seed" not in kw:
        ref = ref_backward(q, k, v, dy, N1, layout, softmax_max=fwd.softmax_max,
                           softmax_sum=fwd.softmax_sum, attention_in=fwd.attention_out,
                           scale_value=0.35, **kw)
        assert_grads_close(g_lse, ref, np.float32)


def test_grad_lse_minus_inf_rows_have_zero_gradients(rng):
    """-inf marks an invalid row: zero dq there and no contribution to dk/dv, even where the
    mask computes elements (exp(z - lse) would be inf with the -FLT_MAX convention)."""
    B, N, S, D = 1, 2, 7, 8
    q, k, v, dy = make_qkv("BNSD", B, N, N, S, S, D, D, np.float32, rng)
    fwd = fag_numba.flash_attention_score(q, k, v, N, "BNSD", scale_value=0.3)
    lse = fag_numba.softmax_lse(fwd.softmax_max, fwd.softmax_sum)
    dead = np.array([1, 4])
    lse[:, :, dead] = -np.inf
    g = fag_numba.flash_attention_score_grad(q, k, v, dy, N, "BNSD", softmax_lse=lse,
                                             attention_in=fwd.attention_out, scale_value=0.3)
    for x in g[:3]:
        assert np.all(np.isfinite(x))
    assert np.all(g.dq[:, :, dead] == 0)
    # dk/dv equal a run where those rows have dy = 0 and do not exist in the softmax
    keep = np.setdiff1d(np.arange(S), dead)
    ref = ref_backward(q[:, :, keep], k, v, dy[:, :, keep], N, "BNSD",
                       softmax_max=fwd.softmax_max[:, :, keep],
                       softmax_sum=fwd.softmax_sum[:, :, keep],
                       attention_in=fwd.attention_out[:, :, keep], scale_value=0.3)
    assert_close(g.dk, ref[1], tolerance(np.float32, "bwd"), "dk")
    assert_close(g.dv, ref[2], tolerance(np.float32, "bwd"), "dv")
    assert_close(g.dq[:, :, keep], ref[0], tolerance(np.float32, "bwd"), "dq")


def _grad_args(S1=5):
    rng = np.random.default_rng(1)
    q, k, v, dy = make_qkv("BNSD", 1, 2, 1, S1, 4, 8, 8, np.float32, rng)
    return dict(query=q, key=k, value=v, dy=dy, head_num=2, input_layout="BNSD",
                attention_in=np.zeros_like(dy), softmax_lse=np.zeros((1, 2, S1), np.float32))


@pytest.mark.parametrize("over,exc,name", [
    (dict(softmax_max=np.zeros((1, 2, 5, 8), np.float32)), FagValueError, "softmax_lse"),
    (dict(softmax_sum=np.ones((1, 2, 5, 8), np.float32)), FagValueError, "softmax_lse"),
    (dict(softmax_max=np.zeros((1, 2, 5, 8), np.float32),
          softmax_sum=np.ones((1, 2, 5, 8), np.float32)), FagValueError, "softmax_lse"),
    (dict(attention_in=None), FagValueError, "attention_in"),
    (dict(softmax_lse=np.zeros((1, 2, 5), np.float64)), FagTypeError, "softmax_lse"),
    (dict(softmax_lse=np.zeros((1, 2, 5, 8), np.float32)), FagValueError, "softmax_lse"),
    (dict(softmax_lse=np.zeros((1, 2, 4), np.float32)), FagValueError, "softmax_lse"),
    (dict(softmax_lse=[0.0]), FagTypeError, "softmax_lse"),
    (dict(attention_in=np.zeros((1, 2, 4, 8), np.float32)), FagValueError, "attention_in"),
])
def test_grad_lse_errors_name_the_argument(over, exc, name):
    a = _grad_args()
    a.update(over)
    with pytest.raises(exc, match=name):
        fag_numba.flash_attention_score_grad(**a)


# ------------------------------------------------------------------------------------------
# out_dtype=float32 for float16 / bfloat16 inputs
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, BF16])
@pytest.mark.parametrize("spelling", ["float32", np.float32])
def test_out_dtype_float32_gives_the_unrounded_outputs(dtype, spelling, rng, blocks):
    blocks()
    B, N1, N2, S1, S2, D = 1, 4, 2, 10, 12, 8
    q, k, v, dy = make_qkv("BSND", B, N1, N2, S1, S2, D, D, dtype, rng)
    kw = dict(scale_value=0.3, atten_mask=TRI, sparse_mode=2)
    f_def = fag_numba.flash_attention_score(q, k, v, N1, "BSND", **kw)
    f32 = fag_numba.flash_attention_score(q, k, v, N1, "BSND", out_dtype=spelling, **kw)
    assert f32.attention_out.dtype == np.float32
    assert f_def.attention_out.dtype == np.dtype(dtype)
    assert np.array_equal(f32.attention_out.astype(dtype), f_def.attention_out)
    assert np.array_equal(f32.softmax_max, f_def.softmax_max)
    gkw = dict(kw, softmax_max=f32.softmax_max, softmax_sum=f32.softmax_sum,
               attention_in=f32.attention_out)
    g_def = fag_numba.flash_attention_score_grad(q, k, v, dy, N1, "BSND", **gkw)
    g32 = fag_numba.flash_attention_score_grad(q, k, v, dy, N1, "BSND", out_dtype=spelling,
                                               **gkw)
    for a, b in zip(g32[:3], g_def[:3]):
        assert a.dtype == np.float32 and b.dtype == np.dtype(dtype)
        assert np.array_equal(a.astype(dtype), b)
    # and they are float32-accurate where the input dtype's rounding would not be: vs float64
    ref = ref_backward(q, k, v, dy, N1, "BSND", softmax_max=f32.softmax_max,
                       softmax_sum=f32.softmax_sum, attention_in=f32.attention_out, **kw)
    rounded_err = max(np.abs(b.astype(np.float64) - r).max() for b, r in zip(g_def[:3], ref))
    f32_err = max(np.abs(a.astype(np.float64) - r).max() for a, r in zip(g32[:3], ref))
    if dtype == np.float16:          # the fp16 path is float32 throughout: float32 accuracy
        assert_grads_close(g32, ref, np.float32)
    assert f32_err < rounded_err


# ------------------------------------------------------------------------------------------
# The chunk-pair schedule
# ------------------------------------------------------------------------------------------

def test_plan_pair_matches_brute_force():
    """Empty pairs are None, kept pairs are trimmed to exactly the rows/columns with a computed
    element, ``full`` iff every element of the trimmed block is computed."""
    from fag_numba.chunks import plan_pair
    inf = fag_numba.config.BAND_INF
    r = np.random.default_rng(7)
    for _ in range(400):
        i0, j0 = int(r.integers(0, 12)), int(r.integers(0, 12))
        i1, j1 = i0 + int(r.integers(1, 9)), j0 + int(r.integers(1, 9))
        lo = int(r.integers(-10, 6)) if r.random() < 0.8 else -inf
        hi = int(r.integers(lo if lo > -inf else -10, 10)) if r.random() < 0.8 else inf
        i = np.arange(i0, i1)[:, None]
        j = np.arange(j0, j1)[None, :]
        c = (j - i >= lo) & (j - i <= hi)
        p = plan_pair(i0, i1, j0, j1, lo, hi)
        if not c.any():
            assert p is None
            continue
        rows, cols = np.nonzero(c.any(axis=1))[0], np.nonzero(c.any(axis=0))[0]
        assert (p.i0, p.i1, p.j0, p.j1) == (i0 + rows[0], i0 + rows[-1] + 1,
                                            j0 + cols[0], j0 + cols[-1] + 1)
        assert p.full == bool(c[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all())


def test_schedule_skips_empty_pairs():
    from fag_numba.chunks import schedule
    # causal 11 x 11 in blocks of 3: only pairs with kv-block <= q-block, diagonals partial
    pairs = schedule(11, 11, 3, -fag_numba.config.BAND_INF, 0)
    assert [(a, c) for a, c, _ in pairs] == [(a, c) for a in range(4) for c in range(a + 1)]
    assert [p.full for a, c, p in pairs] == [a != c for a, c, _ in pairs]
    # kv-block outer order for the backward
    assert [(a, c) for a, c, _ in schedule(11, 11, 3, -fag_numba.config.BAND_INF, 0, True)] \
        == [(a, c) for c in range(4) for a in range(c, 4)]


# ------------------------------------------------------------------------------------------
# The chunked driver: equal to the unchunked call
# ------------------------------------------------------------------------------------------

_unchunked = forward_backward


def _assert_same(fc, gc, f, g, dtype):
    tf, tb = tolerance(dtype, "fwd"), tolerance(dtype, "bwd")
    assert fc.attention_out.dtype == f.attention_out.dtype
    assert_close(fc.attention_out, f.attention_out, tf, "attention_out")
    assert_close(fc.softmax_max, f.softmax_max, tolerance(dtype, "stats"), "softmax_max")
    assert_close(fc.softmax_sum, f.softmax_sum, tolerance(dtype, "stats"), "softmax_sum")
    for name in ("dq", "dk", "dv"):
        a, b = getattr(gc, name), getattr(g, name)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close(a, b, tb, name)
    if g.dpse is None:
        assert gc.dpse is None
    else:
        assert_close(gc.dpse, g.dpse, tolerance(np.float32, "dpse"), "dpse")


CASES = {
    "none": dict(),
    "mode2": dict(atten_mask=TRI, sparse_mode=2),
    "mode3": dict(atten_mask=TRI, sparse_mode=3),
    "band": dict(atten_mask=TRI, sparse_mode=4, pre_tokens=6, next_tokens=2),
    "band-neg": dict(atten_mask=TRI, sparse_mode=4, pre_tokens=9, next_tokens=-3),
    "alibi": dict(pse_type=2, q_start_idx=5, kv_start_idx=2),
    "alibi-sqrt-causal": dict(pse_type=3, atten_mask=TRI, sparse_mode=3),
    "dropout": dict(keep_prob=0.8, seed=11, offset=2**64 - 40),
    "dropout-band": dict(keep_prob=0.6, seed=3, atten_mask=TRI, sparse_mode=4, pre_tokens=4,
                         next_tokens=4),
}


@pytest.mark.parametrize("layout", ["BNSD", "BSND", "BSH", "SBH"])
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_equals_unchunked(layout, case, rng, blocks):
    blocks()
    B, N1, N2, S1, S2, D = 2, 4, 2, 23, 29, 8        # GQA; chunks 7 / 5 do not divide S
    kw = dict(CASES[case], scale_value=0.35)
    if "pse_type" in kw:
        kw["pse"] = rng.random((B, N1)).astype(np.float32)
    q, k, v, dy = make_qkv(layout, B, N1, N2, S1, S2, D, D, np.float32, rng)
    f, g = _unchunked(q, k, v, dy, N1, layout, **kw)
    fc = fag_numba.chunked_attention_score(q, k, v, N1, layout, chunk=7, **kw)
    gc = fag_numba.chunked_attention_score_grad(
        q, k, v, dy, N1, layout, softmax_max=f.softmax_max, softmax_sum=f.softmax_sum,
        attention_in=f.attention_out, chunk=5, **kw)
    _assert_same(fc, gc, f, g, np.float32)


@pytest.mark.parametrize("dtype", [np.float16, BF16])
def test_chunked_half_precision_inputs(dtype, rng, blocks):
    """One rounding at the end: the chunked outputs are the unchunked ones within one ulp."""
    blocks()
    q, k, v, dy = make_qkv("BSND", 1, 2, 1, 20, 20, 8, 6, dtype, rng)
    kw = dict(atten_mask=TRI, sparse_mode=2, scale_value=0.3)
    f, g = _unchunked(q, k, v, dy, 2, "BSND", **kw)
    fc = fag_numba.chunked_attention_score(q, k, v, 2, "BSND", chunk=6, **kw)
    gc = fag_numba.chunked_attention_score_grad(
        q, k, v, dy, 2, "BSND", softmax_max=f.softmax_max[..., :1],
        softmax_sum=f.softmax_sum[..., 0], attention_in=f.attention_out, chunk=6, **kw)
    _assert_same(fc, gc, f, g, dtype)


def test_chunked_invalid_rows_and_one_chunk(rng, blocks):
    """mode 3 with S1 > S2: the first rows see nothing (out 0, invalid statistics, dq 0);
    chunk >= S is the unchunked computation as one pair."""
    blocks()
    q, k, v, dy = make_qkv("BNSD", 1, 2, 2, 19, 8, 8, 8, np.float32, rng)
    kw = dict(atten_mask=TRI, sparse_mode=3, scale_value=0.3)
    f, g = _unchunked(q, k, v, dy, 2, "BNSD", **kw)
    for chunk in (4, 100):
        fc = fag_numba.chunked_attention_score(q, k, v, 2, "BNSD", chunk=chunk, **kw)
        gc = fag_numba.chunked_attention_score_grad(
            q, k, v, dy, 2, "BNSD", softmax_max=f.softmax_max, softmax_sum=f.softmax_sum,
            attention_in=f.attention_out, chunk=chunk, **kw)
        assert np.all(fc.softmax_max[:, :, :11] == -FLT_MAX)
        assert np.all(fc.softmax_sum[:, :, :11] == FLT_MAX)
        assert np.all(fc.attention_out[:, :, :11] == 0) and np.all(gc.dq[:, :, :11] == 0)
        _assert_same(fc, gc, f, g, np.float32)


def test_chunked_memmap_in_and_out(tmp_path, rng, blocks):
    """np.memmap inputs (read-only) and out= memmaps: written in place and returned, inputs
    unchanged, results equal to the in-memory run."""
    blocks()
    B, N, S, D = 1, 2, 26, 8
    arrays = make_qkv("BSH", B, N, N, S, S, D, D, np.float32, rng)
    maps = []
    for name, x in zip("qkvy", arrays):
        mm = np.lib.format.open_memmap(tmp_path / f"{name}.npy", "w+", x.dtype, x.shape)
        mm[...] = x
        mm.flush()
        maps.append(np.load(tmp_path / f"{name}.npy", mmap_mode="r"))
    q, k, v, dy = maps
    kw = dict(atten_mask=TRI, sparse_mode=4, pre_tokens=5, next_tokens=3, scale_value=0.4,
              keep_prob=0.9, seed=1)
    f, g = _unchunked(*arrays, N, "BSH", **kw)

    def omap(name, shape):
        return np.lib.format.open_memmap(tmp_path / f"out_{name}.npy", "w+", np.float32, shape)
    out = fag_numba.FlashAttentionOutput(omap("o", q.shape), omap("m", (B, N, S, 8)),
                                         omap("l", (B, N, S, 8)))
    fc = fag_numba.chunked_attention_score(q, k, v, N, "BSH", chunk=8, out=out, **kw)
    assert all(a is b for a, b in zip(fc, out))
    gout = fag_numba.FlashAttentionGrads(omap("dq", q.shape), omap("dk", k.shape),
                                         omap("dv", v.shape), None)
    gout.dq[...] = 123.0                          # stale contents are overwritten everywhere
    gc = fag_numba.chunked_attention_score_grad(
        q, k, v, dy, N, "BSH", softmax_max=fc.softmax_max, softmax_sum=fc.softmax_sum,
        attention_in=fc.attention_out, chunk=8, out=gout, **kw)
    assert all(a is b for a, b in zip(gc[:3], gout[:3]))
    _assert_same(fc, gc, f, g, np.float32)
    for x, m in zip(arrays, maps):
        assert np.array_equal(x, m)


def test_chunked_progress_bar(rng, capsys):
    q, k, v, dy = make_qkv("BNSD", 1, 1, 1, 12, 12, 8, 8, np.float32, rng)
    fag_numba.chunked_attention_score(q, k, v, 1, "BNSD", chunk=4, atten_mask=TRI,
                                      sparse_mode=2, progress=True)
    err = capsys.readouterr().err
    assert "chunked_attention_score" in err and "6/6" in err       # 4 x 4 causal: 6 pairs
    fag_numba.chunked_attention_score(q, k, v, 1, "BNSD", chunk=4)
    assert capsys.readouterr().err == ""


def _chunk_args(**over):
    rng = np.random.default_rng(2)
    q, k, v, dy = make_qkv("BNSD", 1, 2, 1, 6, 5, 8, 8, np.float32, rng)
    a = dict(query=q, key=k, value=v, head_num=2, input_layout="BNSD")
    a.update(over)
    return a


@pytest.mark.parametrize("over,exc,name", [
    (dict(chunk=0), FagValueError, "chunk"),
    (dict(chunk=-3), FagValueError, "chunk"),
    (dict(chunk=2.0), FagTypeError, "chunk"),
    (dict(progress="yes"), FagTypeError, "progress"),
    (dict(drop_mask=np.ones(8, np.uint8), keep_prob=0.5), FagValueError, "drop_mask"),
    (dict(prefix=[1]), FagValueError, "prefix"),
    (dict(out_dtype=np.float32), FagValueError, "out_dtype"),
    (dict(softmax_layout="TND"), FagValueError, "softmax_layout"),
    (dict(atten_mask=np.zeros((6, 5), bool), sparse_mode=1), FagValueError, "sparse_mode"),
    (dict(atten_mask=TRI), FagValueError, "sparse_mode"),
    (dict(pse=np.zeros((1, 2, 6, 5), np.float32)), FagValueError, "pse"),
    (dict(input_layout="TND"), FagValueError, "input_layout"),
    (dict(atten_mask=~TRI, sparse_mode=2), FagValueError, "atten_mask"),      # unchunked rule
    (dict(keep_prob=0.5), FagValueError, "seed"),
    (dict(out=(1, 2, 3)), FagTypeError, "out.attention_out"),
    (dict(out=fag_numba.FlashAttentionOutput(np.zeros((1, 2, 6, 7), np.float32),
                                             np.zeros((1, 2, 6, 8), np.float32),
                                             np.zeros((1, 2, 6, 8), np.float32))),
     FagValueError, "out.attention_out"),
    (dict(out=fag_numba.FlashAttentionOutput(np.zeros((1, 2, 6, 8), np.float32),
                                             np.zeros((1, 2, 6, 8), np.float64),
                                             np.zeros((1, 2, 6, 8), np.float32))),
     FagTypeError, "out.softmax_max"),
])
def test_chunked_errors_name_the_argument(over, exc, name):
    with pytest.raises(exc, match=name):
        fag_numba.chunked_attention_score(**_chunk_args(**over))


@pytest.mark.parametrize("over,exc,name", [
    (dict(chunk=0), FagValueError, "chunk"),
    (dict(softmax_max=np.zeros((1, 2, 6, 3), np.float32)), FagValueError, "softmax_max"),
    (dict(softmax_sum=np.ones((1, 2, 6, 8), np.float64)), FagTypeError, "softmax_sum"),
    (dict(attention_in=np.zeros((1, 2, 5, 8), np.float32)), FagValueError, "attention_in"),
    (dict(dy=np.zeros((1, 2, 6, 7), np.float32)), FagValueError, "dy"),
    (dict(drop_mask=np.ones(8, np.uint8)), FagValueError, "drop_mask"),
    (dict(out=fag_numba.FlashAttentionGrads(np.zeros((1, 2, 6, 8), np.float32),
                                            np.zeros((1, 1, 5, 8), np.float32),
                                            np.zeros((1, 1, 6, 8), np.float32), None)),
     FagValueError, "out.dv"),
])
def test_chunked_grad_errors_name_the_argument(over, exc, name):
    a = _chunk_args()
    a.update(dy=np.zeros((1, 2, 6, 8), np.float32), softmax_max=np.zeros((1, 2, 6, 8), np.float32),
             softmax_sum=np.ones((1, 2, 6, 8), np.float32),
             attention_in=np.zeros((1, 2, 6, 8), np.float32))
    a.update(over)
    with pytest.raises(exc, match=name):
        fag_numba.chunked_attention_score_grad(**a)
