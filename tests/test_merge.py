"""merge_attention_outputs and the chunk contract of SPEC §10 (long sequences split in chunks)."""
import numpy as np
import pytest

import fag_numba
from fag_numba import FagTypeError, FagValueError, merge_attention_outputs

from tolerances import tolerance
from utils import assert_close, make_qkv

FLT_MAX = np.float32(3.4028234663852886e38)
CAUSAL = np.triu(np.ones((2048, 2048), bool), 1)


def _take(x, layout, a, b):
    """Rows [a, b) along the sequence axis of a layout."""
    ax = {"BNSD": 2, "BSND": 1, "BSH": 1, "SBH": 0, "TND": 0}[layout]
    return np.take(x, np.arange(a, b), axis=ax)


@pytest.mark.parametrize("layout", ["BNSD", "BSND", "BSH", "SBH"])
def test_merge_equals_unchunked_forward(layout, rng):
    B, N1, N2, S1, S2, D = 2, 4, 2, 19, 45, 16
    q, k, v, _ = make_qkv(layout, B, N1, N2, S1, S2, D, D, np.float32, rng)
    full = fag_numba.flash_attention_score(q, k, v, N1, layout, scale_value=0.3)
    cuts = [0, 7, 30, 45]
    parts = [fag_numba.flash_attention_score(q, _take(k, layout, a, b), _take(v, layout, a, b),
                                             N1, layout, scale_value=0.3)
             for a, b in zip(cuts[:-1], cuts[1:])]
    mg = merge_attention_outputs(parts, N1, layout)
    assert_close(mg.attention_out, full.attention_out, tolerance(np.float32, "fwd"), "out")
    assert_close(mg.softmax_max, full.softmax_max, tolerance(np.float32, "stats"), "max")
    assert_close(mg.softmax_sum, full.softmax_sum, tolerance(np.float32, "stats"), "sum")
    assert mg.softmax_max.shape == full.softmax_max.shape


def test_merge_invalid_rows():
    """A causal chunk split: the second key chunk is invisible to the first query rows."""
    rng = np.random.default_rng(3)
    B, N, S, D = 1, 2, 12, 8
    q, k, v, _ = make_qkv("BNSD", B, N, N, S, S, D, D, np.float32, rng)
    full = fag_numba.flash_attention_score(q, k, v, N, "BNSD", atten_mask=CAUSAL, sparse_mode=2)
    # chunk 1: keys 0..5 with the top-left causal mask; chunk 2: keys 6..11, query i sees j <= i
    p1 = fag_numba.flash_attention_score(q, k[:, :, :6], v[:, :, :6], N, "BNSD",
                                         atten_mask=CAUSAL, sparse_mode=2)
    m2 = np.ones((S, 6), bool)
    for i in range(S):
        m2[i, :max(0, i - 6 + 1)] = False
    p2 = fag_numba.flash_attention_score(q, k[:, :, 6:], v[:, :, 6:], N, "BNSD",
                                         atten_mask=m2, sparse_mode=1)
    assert np.all(p2.softmax_max[0, 0, :6] == -FLT_MAX)          # invalid in part 2
    mg = merge_attention_outputs([p1, p2], N, "BNSD")
    assert_close(mg.attention_out, full.attention_out, tolerance(np.float32, "fwd"), "out")
    assert_close(mg.softmax_sum, full.softmax_sum, tolerance(np.float32, "stats"), "sum")
    # a row invalid in every part stays invalid, never inf / NaN
    both = merge_attention_outputs([p2, p2], N, "BNSD")
    assert np.all(both.softmax_max[0, :, :6] == -FLT_MAX)
    assert np.all(both.softmax_sum[0, :, :6] == FLT_MAX)
    assert np.all(both.attention_out[0, :, :6] == 0)
    assert np.all(np.isfinite(both.attention_out))


@pytest.mark.parametrize("softmax_layout", ["", "TND"])
def test_merge_tnd(softmax_layout, rng):
    N, D = 2, 8
    cq, ck = [5, 5, 12], [7, 9, 20]
    T1, T2 = 12, 20
    q = rng.standard_normal((T1, N, D)).astype(np.float32)
    k = rng.standard_normal((T2, N, D)).astype(np.float32)
    v = rng.standard_normal((T2, N, D)).astype(np.float32)
    full = fag_numba.flash_attention_score(q, k, v, N, "TND", actual_seq_qlen=cq,
                                           actual_seq_kvlen=ck, softmax_layout=softmax_layout)
    # split every sequence's keys into its first 2 keys and the rest
    lens = np.diff([0] + ck)
    starts = np.cumsum([0] + list(lens))[:-1]
    idx_a = np.concatenate([np.arange(s, s + min(2, n)) for s, n in zip(starts, lens)])
    idx_b = np.concatenate([np.arange(s + min(2, n), s + n) for s, n in zip(starts, lens)])
    ka, kb = np.cumsum([min(2, n) for n in lens]), np.cumsum([n - min(2, n) for n in lens])
    pa = fag_numba.flash_attention_score(q, k[idx_a], v[idx_a], N, "TND", actual_seq_qlen=cq,
                                         actual_seq_kvlen=list(ka), softmax_layout=softmax_layout)
    pb = fag_numba.flash_attention_score(q, k[idx_b], v[idx_b], N, "TND", actual_seq_qlen=cq,
                                         actual_seq_kvlen=list(kb), softmax_layout=softmax_layout)
    mg = merge_attention_outputs([pa, pb], N, "TND", actual_seq_qlen=cq,
                                 softmax_layout=softmax_layout)
    assert_close(mg.attention_out, full.attention_out, tolerance(np.float32, "fwd"), "out")
    assert_close(mg.softmax_max, full.softmax_max, tolerance(np.float32, "stats"), "max")
    assert_close(mg.softmax_sum, full.softmax_sum, tolerance(np.float32, "stats"), "sum")


def test_chunked_backward_sums_to_full(rng):
    """SPEC §10 chunk contract: grads of (q-chunk a, kv-chunk c) with the global statistics and
    attention_out of chunk a sum to the unchunked gradients; causal diagonal blocks use mode 2,
    fully visible blocks no mask, invisible blocks are not called."""
    B, N, S, D = 1, 2, 24, 16
    q, k, v, dy = make_qkv("BNSD", B, N, N, S, S, D, D, np.float32, rng)
    kw = dict(scale_value=0.25)
    full_f = fag_numba.flash_attention_score(q, k, v, N, "BNSD", atten_mask=CAUSAL,
                                             sparse_mode=3, **kw)
    full_g = fag_numba.flash_attention_score_grad(
        q, k, v, dy, N, "BNSD", atten_mask=CAUSAL, sparse_mode=3,
        softmax_max=full_f.softmax_max, softmax_sum=full_f.softmax_sum,
        attention_in=full_f.attention_out, **kw)
    C = 8
    dq = np.zeros_like(q)
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)
    for a in range(S // C):
        qa = slice(a * C, (a + 1) * C)
        for c in range(a + 1):
            kc = slice(c * C, (c + 1) * C)
            extra = dict(atten_mask=CAUSAL, sparse_mode=2) if c == a else {}
            g = fag_numba.flash_attention_score_grad(
                q[:, :, qa], k[:, :, kc], v[:, :, kc], dy[:, :, qa], N, "BNSD",
                softmax_max=full_f.softmax_max[:, :, qa], softmax_sum=full_f.softmax_sum[:, :, qa],
                attention_in=full_f.attention_out[:, :, qa], **extra, **kw)
            dq[:, :, qa] += g.dq
            dk[:, :, kc] += g.dk
            dv[:, :, kc] += g.dv
    tol = tolerance(np.float32, "bwd")
    assert_close(dq, full_g.dq, tol, "dq")
    assert_close(dk, full_g.dk, tol, "dk")
    assert_close(dv, full_g.dv, tol, "dv")


def test_merge_validation(rng):
    q, k, v, _ = make_qkv("BNSD", 1, 2, 2, 4, 6, 8, 8, np.float32, rng)
    p = fag_numba.flash_attention_score(q, k, v, 2, "BNSD")
    with pytest.raises(FagValueError, match="parts"):
        merge_attention_outputs([], 2, "BNSD")
    with pytest.raises(FagTypeError, match="parts"):
        merge_attention_outputs([p, "x"], 2, "BNSD")
    with pytest.raises(FagValueError, match="input_layout"):
        merge_attention_outputs([p], 2, "XYZ")
    with pytest.raises(FagValueError, match="actual_seq_qlen"):
        merge_attention_outputs([p], 2, "BNSD", actual_seq_qlen=[4])
    with pytest.raises(FagValueError, match="actual_seq_qlen"):
        merge_attention_outputs([p], 2, "TND")
    p2 = fag_numba.flash_attention_score(q[:, :, :3], k, v, 2, "BNSD")
    with pytest.raises(FagValueError, match="parts"):
        merge_attention_outputs([p, p2], 2, "BNSD")
    with pytest.raises(FagValueError, match="softmax_layout"):
        merge_attention_outputs([p], 2, "BNSD", softmax_layout="TND")
