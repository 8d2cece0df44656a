"""Tests of the float64 reference itself (tests/reference.py).

1. ``ref_computed`` pinned to golden 0/1 matrices written out from SPEC §7 (and the mode 7/8 worked
   examples of ASCEND_FAG_NOTES §7.2), plus the same predicates seen through ``ref_forward``.
2. ``ref_backward`` against torch autograd in float64 of the SPEC §3 formula (masks, pse types 0-3
   with dpse / dslope, dropout, GQA, TND), and a finite-difference check.
3. Layout consistency, softmax-statistics memory orders, given statistics used literally, invalid
   rows, empty tensors, compressed ALiBi.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

try:                                   # tests/ as a package or as a plain directory on sys.path
    from . import reference as R
    from .tolerances import Tolerances
    from .utils import (FLT_MAX, assert_close, layout_shape, make_id, make_qkv, pack_keep,
                        unpack_drop_mask)
except ImportError:
    import reference as R
    from tolerances import Tolerances
    from utils import (FLT_MAX, assert_close, layout_shape, make_id, make_qkv, pack_keep,
                       unpack_drop_mask)

EXACT = Tolerances(atol=1e-12, rtol=1e-12)
TRIU2048 = np.triu(np.ones((2048, 2048), dtype=bool), k=1)       # compressed mask, modes 2,3,4,7,8
PREFIX3072 = np.concatenate([TRIU2048, np.zeros((1024, 2048), dtype=bool)])
PREFIX3072[2048:, 1024:] = True                                  # compressed mask, mode 6


def golden(text):
    """Rows of 0/1 characters -> bool matrix."""
    return np.array([[ch == "1" for ch in row.split()] for row in text.strip().splitlines()])


# ------------------------------------------------------------------------------------------------
# 1. The predicate
# ------------------------------------------------------------------------------------------------

GOLDEN_CASES = {
    # mode 2, leftUpCausal: j <= i
    "sm2-3x5": (dict(sparse_mode=2, s1=3, s2=5), """
        1 0 0 0 0
        1 1 0 0 0
        1 1 1 0 0"""),
    "sm2-5x3": (dict(sparse_mode=2, s1=5, s2=3), """
        1 0 0
        1 1 0
        1 1 1
        1 1 1
        1 1 1"""),
    # mode 3, rightDownCausal: j <= i + (S2 - S1)
    "sm3-3x5": (dict(sparse_mode=3, s1=3, s2=5), """
        1 1 1 0 0
        1 1 1 1 0
        1 1 1 1 1"""),
    "sm3-5x3": (dict(sparse_mode=3, s1=5, s2=3), """
        0 0 0
        0 0 0
        1 0 0
        1 1 0
        1 1 1"""),
    # mode 2/3 ignore the tokens
    "sm3-tokens-ignored": (dict(sparse_mode=3, s1=3, s2=5, pre_tokens=0, next_tokens=-5), """
        1 1 1 0 0
        1 1 1 1 0
        1 1 1 1 1"""),
    # mode 4, band from the bottom-right: i+d-pre <= j <= i+d+next, d = 2: i+1 <= j <= i+2
    "sm4-4x6-pre1-next0": (dict(sparse_mode=4, s1=4, s2=6, pre_tokens=1, next_tokens=0), """
        0 1 1 0 0 0
        0 0 1 1 0 0
        0 0 0 1 1 0
        0 0 0 0 1 1"""),
    # d = -1, pre 2, next 1: i-3 <= j <= i
    "sm4-5x4-pre2-next1": (dict(sparse_mode=4, s1=5, s2=4, pre_tokens=2, next_tokens=1), """
        1 0 0 0
        1 1 0 0
        1 1 1 0
        1 1 1 1
        0 1 1 1"""),
    # mode 0, raw tokens from the top-left: pre=9, next=-3 -> i-9 <= j <= i-3
    "sm0-12x12-pre9-next-3": (dict(sparse_mode=0, s1=12, s2=12, pre_tokens=9, next_tokens=-3), """
        0 0 0 0 0 0 0 0 0 0 0 0
        0 0 0 0 0 0 0 0 0 0 0 0
        0 0 0 0 0 0 0 0 0 0 0 0
        1 0 0 0 0 0 0 0 0 0 0 0
        1 1 0 0 0 0 0 0 0 0 0 0
        1 1 1 0 0 0 0 0 0 0 0 0
        1 1 1 1 0 0 0 0 0 0 0 0
        1 1 1 1 1 0 0 0 0 0 0 0
        1 1 1 1 1 1 0 0 0 0 0 0
        1 1 1 1 1 1 1 0 0 0 0 0
        0 1 1 1 1 1 1 1 0 0 0 0
        0 0 1 1 1 1 1 1 1 0 0 0"""),
    # pre=-3, next=7 -> i+3 <= j <= i+7
    "sm0-12x12-pre-3-next7": (dict(sparse_mode=0, s1=12, s2=12, pre_tokens=-3, next_tokens=7), """
        0 0 0 1 1 1 1 1 0 0 0 0
        0 0 0 0 1 1 1 1 1 0 0 0
        0 0 0 0 0 1 1 1 1 1 0 0
        0 0 0 0 0 0 1 1 1 1 1 0
        0 0 0 0 0 0 0 1 1 1 1 1
        0 0 0 0 0 0 0 0 1 1 1 1
        0 0 0 0 0 0 0 0 0 1 1 1
        0 0 0 0 0 0 0 0 0 0 1 1
        0 0 0 0 0 0 0 0 0 0 0 1
        0 0 0 0 0 0 0 0 0 0 0 0
        0 0 0 0 0 0 0 0 0 0 0 0
        0 0 0 0 0 0 0 0 0 0 0 0"""),
    # mode 6: j <= i + d or j < prefix. 6x4 (d=-2), prefix 2
    "sm6-6x4-prefix2": (dict(sparse_mode=6, s1=6, s2=4, prefix_b=2), """
        1 1 0 0
        1 1 0 0
        1 1 0 0
        1 1 0 0
        1 1 1 0
        1 1 1 1"""),
    # 3x5 (d=2), prefix 4
    "sm6-3x5-prefix4": (dict(sparse_mode=6, s1=3, s2=5, prefix_b=4), """
        1 1 1 1 0
        1 1 1 1 0
        1 1 1 1 1"""),
    # mode 7 worked example: qlen [3,5], kvlen [3,9], pre=6, next=-2.
    # sequence 0 (3x3, not band): mode 3; last sequence (2x6, band): j <= i + 2
    "sm7-seq0-3x3-other": (dict(sparse_mode=7, s1=3, s2=3, pre_tokens=6, next_tokens=-2,
                                role="other"), """
        1 0 0
        1 1 0
        1 1 1"""),
    "sm7-seq1-2x6-band": (dict(sparse_mode=7, s1=2, s2=6, pre_tokens=6, next_tokens=-2,
                               role="band"), """
        1 1 1 0 0 0
        1 1 1 1 0 0"""),
    # mode 8 worked example: qlen [3,8,12], kvlen [4,9,13], pre=4, next=1.
    # first sequence (3x4, band): i-3 <= j <= i+2; the others (5x5, 4x4): mode 2
    "sm8-seq0-3x4-band": (dict(sparse_mode=8, s1=3, s2=4, pre_tokens=4, next_tokens=1,
                               role="band"), """
        1 1 1 0
        1 1 1 1
        1 1 1 1"""),
    "sm8-seq1-5x5-other": (dict(sparse_mode=8, s1=5, s2=5, pre_tokens=4, next_tokens=1,
                                role="other"), """
        1 0 0 0 0
        1 1 0 0 0
        1 1 1 0 0
        1 1 1 1 0
        1 1 1 1 1"""),
    "sm8-other-3x4-is-left-up": (dict(sparse_mode=8, s1=3, s2=4, role="other"), """
        1 0 0 0
        1 1 0 0
        1 1 1 0"""),
}


@pytest.mark.parametrize("case", list(GOLDEN_CASES), ids=list(GOLDEN_CASES))
def test_ref_computed_golden(case):
    kw, text = GOLDEN_CASES[case]
    got = R.ref_computed(**kw)
    np.testing.assert_array_equal(got.astype(int), golden(text).astype(int))


MASK_4x6 = golden("""
    0 0 1 0 0 0
    0 1 0 0 0 0
    0 0 0 0 1 0
    1 0 0 0 0 0""")


def test_ref_computed_full_mask_modes():
    # mode 1: the mask alone (tokens ignored)
    got = R.ref_computed(1, 4, 6, pre_tokens=0, next_tokens=0, mask2d=MASK_4x6)
    np.testing.assert_array_equal(got, ~MASK_4x6)
    # mode 0: mask AND i-pre <= j <= i+next (pre=1, next=2)
    got = R.ref_computed(0, 4, 6, pre_tokens=1, next_tokens=2, mask2d=MASK_4x6)
    np.testing.assert_array_equal(got.astype(int), golden("""
        1 1 0 0 0 0
        1 0 1 1 0 0
        0 1 1 1 0 0
        0 0 1 1 1 1"""))
    # mode 5: mask AND (j <= i + 2 or j < 1)
    got = R.ref_computed(5, 4, 6, prefix_b=1, mask2d=MASK_4x6)
    np.testing.assert_array_equal(got.astype(int), golden("""
        1 1 0 0 0 0
        1 0 1 1 0 0
        1 1 1 1 0 0
        0 1 1 1 1 1"""))
    # compressed modes never read mask2d... they take None; mode 4 with default tokens: all
    assert R.ref_computed(4, 3, 5).all()


def _support_via_forward(layout_kw, qlen=None, kvlen=None, s1=None, s2=None, n1=1, **kw):
    """C seen through ref_forward: V one-hot per key position -> out[i, j] > 0 iff computed."""
    if qlen is not None:
        seqs = R.tnd_sequences(qlen, kvlen)
        t1, t2 = max(qlen), max(kvlen)
        width = max(k1 - k0 for _, _, k0, k1 in seqs)
        v = np.zeros((t2, 1, width))
        for _, _, k0, k1 in seqs:
            v[k0:k1, 0, :k1 - k0] = np.eye(k1 - k0)
        q = np.zeros((t1, n1, width))
        out, _, _ = R.ref_forward(q, np.zeros_like(v), v, n1, "TND", actual_seq_qlen=qlen,
                                  actual_seq_kvlen=kvlen, **kw)
        return [out[q0:q1, 0, :k1 - k0] > 0 for q0, q1, k0, k1 in seqs]
    v = np.eye(s2).reshape(1, 1, s2, s2)
    q = np.zeros((1, n1, s1, s2))
    out, _, _ = R.ref_forward(q, np.zeros_like(v), v, n1, "BNSD", **kw)
    return out[0] > 0


def test_mode7_worked_example_through_forward():
    got = _support_via_forward(None, qlen=[3, 5], kvlen=[3, 9], atten_mask=TRIU2048,
                               sparse_mode=7, pre_tokens=6, next_tokens=-2)
    np.testing.assert_array_equal(got[0], golden(GOLDEN_CASES["sm7-seq0-3x3-other"][1]))
    np.testing.assert_array_equal(got[1], golden(GOLDEN_CASES["sm7-seq1-2x6-band"][1]))
    # a trailing sequence with S1_b = 0 is not the band one: the last with S1_b > 0 is
    got = _support_via_forward(None, qlen=[3, 5, 5], kvlen=[3, 9, 12], atten_mask=TRIU2048,
                               sparse_mode=7, pre_tokens=6, next_tokens=-2)
    np.testing.assert_array_equal(got[1], golden(GOLDEN_CASES["sm7-seq1-2x6-band"][1]))


def test_mode8_worked_example_through_forward():
    got = _support_via_forward(None, qlen=[3, 8, 12], kvlen=[4, 9, 13], atten_mask=TRIU2048,
                               sparse_mode=8, pre_tokens=4, next_tokens=1)
    np.testing.assert_array_equal(got[0], golden(GOLDEN_CASES["sm8-seq0-3x4-band"][1]))
    np.testing.assert_array_equal(got[1], golden(GOLDEN_CASES["sm8-seq1-5x5-other"][1]))
    np.testing.assert_array_equal(got[2], np.tril(np.ones((4, 4), dtype=bool)))
    # a leading empty sequence (S1_b = 0) is skipped: the band is the first with S1_b > 0
    got = _support_via_forward(None, qlen=[0, 3, 8], kvlen=[2, 6, 11], atten_mask=TRIU2048,
                               sparse_mode=8, pre_tokens=4, next_tokens=1)
    np.testing.assert_array_equal(got[1], golden(GOLDEN_CASES["sm8-seq0-3x4-band"][1]))


def test_no_atten_mask_means_full_attention_in_every_mode():
    for mode in range(7):
        got = _support_via_forward(None, s1=3, s2=5, sparse_mode=mode, pre_tokens=0,
                                   next_tokens=0, prefix=[1])
        assert got.all(), mode


def test_mask_shapes_through_forward():
    """[S1,S2], [1,1,S1,S2], [B,1,S1,S2] and [B,N1,S1,S2] masks index (b, h) as SPEC §6 says."""
    rng = np.random.default_rng(5)
    masks = rng.random((2, 3, 4, 6)) < 0.3
    v = np.broadcast_to(np.eye(6), (2, 1, 6, 6))
    q = np.zeros((2, 3, 4, 6))
    k = np.zeros((2, 1, 6, 6))
    for mask, pick in [(masks[0, 0], lambda b, h: masks[0, 0]),
                       (masks[:1, :1], lambda b, h: masks[0, 0]),
                       (masks[:, :1], lambda b, h: masks[b, 0]),
                       (masks, lambda b, h: masks[b, h])]:
        out, _, _ = R.ref_forward(q, k, v, 3, "BNSD", atten_mask=mask, sparse_mode=1)
        for b in range(2):
            for h in range(3):
                np.testing.assert_array_equal(out[b, h] > 0, ~pick(b, h))


# ------------------------------------------------------------------------------------------------
# 2. torch autograd of the SPEC §3 formula
# ------------------------------------------------------------------------------------------------

def _torch_grads(torch, q, k, v, dy, layout, n1, seqs, scale, keep_prob, computed, keep, z_of,
                 params):
    """float64 autograd of SPEC §3 written with torch, one sequence at a time.

    q, k, v, dy: numpy arrays in BNSD or TND. seqs: list of (b, q-slice, kv-slice).
    computed(b) / keep(b) -> numpy bool [N1, S1_b, S2_b] (keep may be None);
    z_of(x, b, params) -> Z from X = Q K^T. Returns (out, dq, dk, dv, *dparams) as numpy.
    """
    tq, tk, tv = (torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True)
                  for x in (q, k, v))
    tdy = torch.tensor(np.asarray(dy, dtype=np.float64))
    tparams = [torch.tensor(np.asarray(p, dtype=np.float64), requires_grad=True) for p in params]
    n2 = k.shape[1]                       # BNSD [B,N2,S,D] and TND [T,N2,D] alike
    group = n1 // n2
    kp = float(np.float32(keep_prob))
    sc = float(np.float32(scale))

    def seq(t, b, sl):
        return t[b][:, sl] if layout == "BNSD" else t.permute(1, 0, 2)[:, sl]

    heads = torch.arange(n1) // group
    loss, outs = 0.0, []
    for b, qs, ks in seqs:
        qb, dyb = seq(tq, b, qs), seq(tdy, b, qs)
        kb, vb = seq(tk, b, ks)[heads], seq(tv, b, ks)[heads]
        x = qb @ kb.transpose(1, 2)
        z = z_of(x, b, tparams, sc)
        c = torch.tensor(computed(b))
        zm = torch.where(c, z, torch.full_like(z, -1e300))
        p = torch.softmax(zm, dim=-1) * c.any(dim=-1, keepdim=True)
        if kp < 1:
            r = keep(b)
            pd = p / kp if r is None else torch.where(torch.tensor(r), p / kp, torch.zeros_like(p))
        else:
            pd = p
        o = pd @ vb
        loss = loss + (o * dyb).sum()
        outs.append((b, qs, o.detach().numpy()))
    grads = torch.autograd.grad(loss, [tq, tk, tv] + tparams, allow_unused=True)
    out = np.zeros(q.shape[:-1] + (v.shape[-1],))
    for b, qs, o in outs:
        if layout == "BNSD":
            out[b][:, qs] = o
        else:
            out[qs] = o.transpose(1, 0, 2)
    return [out] + [np.zeros_like(a) if g is None else g.numpy()
                    for a, g in zip([q, k, v] + list(params), grads)]


def _check_against_torch(torch, name, q, k, v, dy, layout, n1, kw, computed, keep_of, z_of, params,
                         seqs, dpse_expected_none=False):
    out_ref, _, _ = R.ref_forward(q, k, v, n1, layout, **kw)
    dq, dk, dv, dpse = R.ref_backward(q, k, v, dy, n1, layout, **kw)
    res = _torch_grads(torch, q, k, v, dy, layout, n1, seqs, kw.get("scale_value", 1.0),
                       kw.get("keep_prob", 1.0), computed, keep_of, z_of, params)
    tol = Tolerances(atol=1e-11, rtol=1e-10)
    assert_close(out_ref, res[0], tol, f"{name} out")
    assert_close(dq, res[1], tol, f"{name} dq")
    assert_close(dk, res[2], tol, f"{name} dk")
    assert_close(dv, res[3], tol, f"{name} dv")
    if params:
        assert dpse is not None
        assert_close(dpse, res[4], tol, f"{name} dpse")
    else:
        assert dpse is None
    return res


def _bnsd_case(rng, B, N1, N2, S1, S2, D, Dv):
    return make_qkv("BNSD", B, N1, N2, S1, S2, D, Dv, np.float64, rng)


def _pse_z(pse_type):
    """z_of for the BNSD cases: external pse [Bp, N1, Sp, S2] or slopes [N1] / [B, N1]."""
    def z_of(x, b, tp, sc, dist=None):
        if not tp:
            return x * sc
        p = tp[0]
        if pse_type in (0, 1):
            blk = p[b if p.shape[0] > 1 else 0]
            return (x + blk) * sc if pse_type == 1 else x * sc + blk
        raise AssertionError
    return z_of


BNSD_CASES = [
    # name, sizes (B,N1,N2,S1,S2,D,Dv), sparse_mode, mask kind, pse kind, pse_type, dropout
    ("sm0-tokens-mask-pseBNSS-t1-gqa2", (2, 4, 2, 5, 7, 6, 4), 0, "random", "BNSS", 1, False),
    ("sm1-maskBN-pse1N1S-t0", (2, 2, 2, 6, 5, 4, 4), 1, "BN", "1N1S", 0, False),
    ("sm3-invalid-rows-slopesN-t2", (2, 4, 2, 7, 4, 5, 3), 3, "triu", "slopesN", 2, True),
    ("sm4-band-slopesBN-t3", (2, 2, 1, 5, 8, 4, 4), 4, "triu", "slopesBN", 3, False),
    ("sm5-prefix-drop-pse1NSS-t1", (2, 2, 1, 6, 6, 3, 2), 5, "random", "1NSS", 1, True),
    ("sm6-prefix-mqa-drop-pseBN1S-t0", (2, 4, 1, 5, 7, 4, 4), 6, "prefix", "BN1S", 0, True),
    ("sm2-drop-nopse", (1, 2, 2, 6, 3, 4, 5), 2, "triu", None, 1, True),
    ("sm3-no-mask-full", (1, 2, 1, 4, 6, 3, 3), 3, None, None, 1, False),
]


@pytest.mark.parametrize("case", BNSD_CASES, ids=[c[0] for c in BNSD_CASES])
def test_backward_matches_torch_autograd_bnsd(case):
    torch = pytest.importorskip("torch")
    name, (B, N1, N2, S1, S2, D, Dv), mode, mask_kind, pse_kind, pse_type, drop = case
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    q, k, v, dy = _bnsd_case(rng, B, N1, N2, S1, S2, D, Dv)
    kw = dict(scale_value=0.37, sparse_mode=mode, pse_type=pse_type)
    pre, nxt = {0: (2, 1), 4: (1, 2)}.get(mode, (R.NO_LIMIT, R.NO_LIMIT))
    kw.update(pre_tokens=pre, next_tokens=nxt)
    prefix = None
    if mode in (5, 6):
        prefix = [S2 - S1 + 1 if S2 >= S1 else 2, S2] if B == 2 else [S2]
        kw["prefix"] = prefix
    mask = None
    if mask_kind == "random":
        mask = rng.random((S1, S2)) < 0.25
    elif mask_kind == "BN":
        mask = rng.random((B, N1, S1, S2)) < 0.3
    elif mask_kind == "triu":
        mask = TRIU2048
    elif mask_kind == "prefix":
        mask = PREFIX3072
    kw["atten_mask"] = mask

    def computed(b):
        if mask is None:
            return np.ones((N1, S1, S2), dtype=bool)
        out = []
        for h in range(N1):
            m2 = None
            if mode in (0, 1, 5):
                m4 = mask.reshape((1, 1) + mask.shape) if mask.ndim == 2 else mask
                m2 = m4[b if m4.shape[0] > 1 else 0, h if m4.shape[1] > 1 else 0]
            out.append(R.ref_computed(mode, S1, S2, pre, nxt,
                                      None if prefix is None else prefix[b], m2))
        return np.stack(out)

    keep_all = None
    if drop:
        keep_all = rng.random(B * N1 * S1 * S2) < 0.7
        kw.update(keep=keep_all, keep_prob=0.7)

    def keep_of(b):
        return None if keep_all is None else keep_all.reshape(B, N1, S1, S2)[b]

    params = []
    shapes = {"BNSS": (B, N1, S1, S2), "1NSS": (1, N1, S1, S2), "BN1S": (B, N1, 1, S2),
              "1N1S": (1, N1, 1, S2), "slopesN": (N1,), "slopesBN": (B, N1)}
    if pse_kind is not None:
        pse = rng.standard_normal(shapes[pse_kind])
        if pse_kind.startswith("slopes"):
            pse = np.abs(pse).astype(np.float32)
        params = [pse]
        kw["pse"] = pse
    if pse_type in (2, 3):
        kw.update(q_start_idx=[3], kv_start_idx=1)
        i = np.arange(S1)[:, None]
        j = np.arange(S2)[None, :]
        dist = np.abs((j + 1) - (i + 3)).astype(np.float64)
        dist = dist if pse_type == 2 else np.sqrt(dist)

        def z_of(x, b, tp, sc):
            slope = tp[0] if tp[0].dim() == 1 else tp[0][b]
            return x * sc - slope[:, None, None] * torch.tensor(dist)[None]
    else:
        z_of = _pse_z(pse_type)

    seqs = [(b, slice(None), slice(None)) for b in range(B)]
    _check_against_torch(torch, name, q, k, v, dy, "BNSD", N1, kw, computed, keep_of, z_of, params,
                         seqs)


TND_CASES = [
    # name, qlen, kvlen, extra rows (T1 - last, T2 - last), mode, pse kind, pse_type, dropout
    ("sm3-slopesBN-t2-drop-empty-trailing", [3, 3, 7, 9, 0], [4, 6, 6, 11, 0], (2, 1), 3,
     "slopesBN", 2, True),
    ("sm8-slopesN-t3-start-band-only", [3, 8, 12], [4, 9, 13], (0, 0), 8, "slopesN", 3, False),
    ("sm0-maskSS-pseT2N1-t1", [2, 6, 7], [5, 8, 12], (1, 2), 0, "T2N1", 1, True),
    ("sm1-maskSS-pseNSS-t0-gqa", [4, 4, 9], [3, 7, 9], (0, 0), 1, "NSS", 0, False),
    ("sm7-nopse-drop", [3, 5], [3, 9], (1, 0), 7, None, 1, True),
]


@pytest.mark.parametrize("case", TND_CASES, ids=[c[0] for c in TND_CASES])
def test_backward_matches_torch_autograd_tnd(case):
    torch = pytest.importorskip("torch")
    name, qlen, kvlen, (x1, x2), mode, pse_kind, pse_type, drop = case
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    N1, N2, D, Dv = 4, 2, 5, 3
    seqs = R.tnd_sequences(qlen, kvlen)
    T1, T2 = seqs[-1][1] + x1, seqs[-1][3] + x2
    q, k, v, dy = make_qkv("TND", 1, N1, N2, T1, T2, D, Dv, np.float64, rng)
    assert q.shape == (T1, N1, D)
    kw = dict(scale_value=0.5, sparse_mode=mode, pse_type=pse_type, actual_seq_qlen=qlen,
              actual_seq_kvlen=kvlen)
    pre, nxt = {0: (1, 2), 7: (6, -2), 8: (4, 1)}.get(mode, (R.NO_LIMIT, R.NO_LIMIT))
    kw.update(pre_tokens=pre, next_tokens=nxt)
    lens = [(q1 - q0, k1 - k0) for q0, q1, k0, k1 in seqs]
    mask = None
    if mode in (0, 1):
        mask = rng.random((max(s for s, _ in lens), max(s for _, s in lens))) < 0.3
    else:
        mask = TRIU2048
    kw["atten_mask"] = mask
    with_rows = [b for b, (s1, _) in enumerate(lens) if s1 > 0]
    band = with_rows[-1] if mode == 7 else with_rows[0]

    def computed(b):
        s1, s2 = lens[b]
        m2 = mask[:s1, :s2] if mode in (0, 1) else None
        role = ("band" if b == band else "other") if mode in (7, 8) else None
        return np.broadcast_to(R.ref_computed(mode, s1, s2, pre, nxt, None, m2, role), (N1, s1, s2))

    keep_all = None
    numels = sum(N1 * s1 * s2 for s1, s2 in lens)
    if drop:
        keep_all = rng.random(numels) < 0.6
        kw.update(keep=keep_all, keep_prob=0.6)
    offs = np.cumsum([0] + [N1 * s1 * s2 for s1, s2 in lens])

    def keep_of(b):
        s1, s2 = lens[b]
        return None if keep_all is None else keep_all[offs[b]:offs[b + 1]].reshape(N1, s1, s2)

    params = []
    if pse_kind == "slopesN":
        params = [np.abs(rng.standard_normal(N1)).astype(np.float32)]
    elif pse_kind == "slopesBN":
        params = [np.abs(rng.standard_normal((len(seqs), N1))).astype(np.float32)]
    elif pse_kind == "T2N1":
        params = [rng.standard_normal(T2 * N1)]
    elif pse_kind == "NSS":
        params = [rng.standard_normal(numels)]
    if params:
        kw["pse"] = params[0]
    qs_, ks_ = 2, 5
    if pse_type in (2, 3):
        kw.update(q_start_idx=qs_, kv_start_idx=[ks_])

    def z_of(x, b, tp, sc):
        s1, s2 = lens[b]
        if not tp:
            return x * sc
        p = tp[0]
        if pse_type in (2, 3):
            a, c = (qs_, ks_) if (mode != 8 or b == band) else (0, 0)   # mode 8: band seq only
            i = np.arange(s1)[:, None]
            j = np.arange(s2)[None, :]
            dist = np.abs((j + c) - (i + a)).astype(np.float64)
            dist = torch.tensor(dist if pse_type == 2 else np.sqrt(dist))
            slope = p if p.dim() == 1 else p[b]
            return x * sc - slope[:, None, None] * dist[None]
        if pse_kind == "T2N1":
            k0 = seqs[b][2]
            blk = p[k0 * N1:k0 * N1 + N1 * s2].reshape(N1, 1, s2)
        else:
            blk = p[offs[b]:offs[b + 1]].reshape(N1, s1, s2)
        return (x + blk) * sc if pse_type == 1 else x * sc + blk

    tseqs = [(b, slice(q0, q1), slice(k0, k1)) for b, (q0, q1, k0, k1) in enumerate(seqs)]
    _check_against_torch(torch, name, q, k, v, dy, "TND", N1, kw, computed, keep_of, z_of, params,
                         tseqs)
    # rows past the last offset: zero outputs and gradients, invalid-row statistics
    out, m, l = R.ref_forward(q, k, v, N1, "TND", softmax_layout="TND", **kw)
    dq, dk, dv, _ = R.ref_backward(q, k, v, dy, N1, "TND", **kw)
    last_q, last_k = seqs[-1][1], seqs[-1][3]
    assert not out[last_q:].any() and not dq[last_q:].any()
    assert not dk[last_k:].any() and not dv[last_k:].any()
    assert (m[last_q:] == -FLT_MAX).all() and (l[last_q:] == FLT_MAX).all()


def test_finite_differences_dq_dpse_dslope():
    rng = np.random.default_rng(11)
    B, N1, N2, S1, S2, D, Dv = 1, 2, 1, 3, 4, 3, 2
    q, k, v, dy = _bnsd_case(rng, B, N1, N2, S1, S2, D, Dv)
    mask = golden("""
        0 0 1 0
        0 0 0 1
        1 0 0 0""")
    keep = np.array([1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1] * 2, dtype=bool)
    pse = rng.standard_normal((1, N1, S1, S2))
    base = dict(atten_mask=mask, sparse_mode=0, pre_tokens=2, next_tokens=1, scale_value=0.7,
                keep=keep, keep_prob=0.75)

    def loss(qq, kw):
        return float((R.ref_forward(qq, k, v, N1, "BNSD", **kw)[0] * dy).sum())

    def fd(x, f, eps=1e-6):
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            xp, xm = x.copy(), x.copy()
            xp[idx] += eps
            xm[idx] -= eps
            g[idx] = (f(xp) - f(xm)) / (2 * eps)
        return g

    tol = Tolerances(atol=1e-7, rtol=1e-6)
    kw = dict(base, pse=pse, pse_type=1)
    dq, _, _, dpse = R.ref_backward(q, k, v, dy, N1, "BNSD", **kw)
    assert_close(dq, fd(q, lambda x: loss(x, kw)), tol, "fd dq")
    assert_close(dpse, fd(pse, lambda p: loss(q, dict(kw, pse=p))), tol, "fd dpse")
    slopes = np.array([0.5, 0.25])
    kw = dict(base, pse=slopes, pse_type=2, q_start_idx=1, kv_start_idx=0)
    _, _, _, dslope = R.ref_backward(q, k, v, dy, N1, "BNSD", **kw)
    assert_close(dslope, fd(slopes, lambda p: loss(q, dict(kw, pse=p))), tol, "fd dslope")


# ------------------------------------------------------------------------------------------------
# 3. Layouts, statistics, edge cases
# ------------------------------------------------------------------------------------------------

def _from_bnsd(x, layout):
    """Test-side layout conversion (independent of reference._from_bnsd)."""
    b, n, s, d = x.shape
    return {"BNSD": lambda: x, "BSND": lambda: x.transpose(0, 2, 1, 3),
            "BSH": lambda: x.transpose(0, 2, 1, 3).reshape(b, s, n * d),
            "SBH": lambda: x.transpose(2, 0, 1, 3).reshape(s, b, n * d)}[layout]().copy()


@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND"])
def test_layouts_are_transposes_of_bnsd(layout):
    rng = np.random.default_rng(2)
    B, N1, N2, S1, S2, D, Dv = 2, 4, 2, 5, 6, 6, 4
    q, k, v, dy = _bnsd_case(rng, B, N1, N2, S1, S2, D, Dv)
    kw = dict(atten_mask=TRIU2048, sparse_mode=3, pse=rng.standard_normal((B, N1, S1, S2)),
              scale_value=0.4, keep=rng.random(B * N1 * S1 * S2) < 0.8, keep_prob=0.8)
    want = R.ref_forward(q, k, v, N1, "BNSD", **kw) + R.ref_backward(q, k, v, dy, N1, "BNSD", **kw)
    conv = [_from_bnsd(x, layout) for x in (q, k, v, dy)]
    assert conv[0].shape == layout_shape(layout, B, N1, S1, D)
    got = R.ref_forward(*conv[:3], N1, layout, **kw) + R.ref_backward(*conv, N1, layout, **kw)
    for name, w, g, kind in zip(["out", "m", "l", "dq", "dk", "dv", "dpse"], want, got,
                                ["x", "s", "s", "x", "x", "x", "p"]):
        expect = _from_bnsd(w, layout) if kind == "x" else w
        assert_close(g, expect, EXACT, f"{layout} {name}")


def test_tnd_equals_bsnd_with_equal_lengths_and_stat_orders():
    rng = np.random.default_rng(3)
    B, N1, N2, S1, S2, D, Dv = 3, 4, 2, 4, 5, 3, 3
    q, k, v, dy = make_qkv("BSND", B, N1, N2, S1, S2, D, Dv, np.float32, rng)
    pse = rng.standard_normal((B, N1, S1, S2)).astype(np.float32)
    keep = rng.random(B * N1 * S1 * S2) < 0.5
    common = dict(scale_value=0.3, keep=keep, keep_prob=0.5, pse_type=0)
    kw = dict(common, pse=pse, atten_mask=TRIU2048, sparse_mode=2)
    want = R.ref_forward(q, k, v, N1, "BSND", **kw) + R.ref_backward(q, k, v, dy, N1, "BSND", **kw)
    tq, tk, tv, tdy = (x.reshape((-1,) + x.shape[2:]) for x in (q, k, v, dy))
    qlen, kvlen = [S1 * (b + 1) for b in range(B)], [S2 * (b + 1) for b in range(B)]
    tkw = dict(common, pse=pse.ravel(), atten_mask=TRIU2048, sparse_mode=2,
               actual_seq_qlen=qlen, actual_seq_kvlen=kvlen)
    out, m_tnd, l_tnd = R.ref_forward(tq, tk, tv, N1, "TND", softmax_layout="TND", **tkw)
    grads = R.ref_backward(tq, tk, tv, tdy, N1, "TND", **tkw)
    assert_close(out, want[0].reshape(out.shape), EXACT, "out")
    for g, w, name in zip(grads[:3], want[3:6], ["dq", "dk", "dv"]):
        assert_close(g, w.reshape(g.shape), EXACT, name)
    assert_close(grads[3], want[6].ravel(), EXACT, "dpse")
    # "TND" stats: true [T1, N1, 8] order = BSND stats [B,N1,S1,8] moved to [B,S1,N1,8]
    assert_close(m_tnd, want[1].transpose(0, 2, 1, 3).reshape(B * S1, N1, 8), EXACT, "m TND")
    # "" stats: memory offset (cumq[b-1]*N1 + h*S1_b + i)*8 + lane
    _, m_def, l_def = R.ref_forward(tq, tk, tv, N1, "TND", **tkw)
    flat_m, flat_l = m_def.reshape(-1, 8), l_def.reshape(-1, 8)
    for b in range(B):
        for h in range(N1):
            for i in range(S1):
                row = b * S1 * N1 + h * S1 + i
                assert (flat_m[row] == want[1][b, h, i, 0]).all()
                assert (flat_l[row] == want[2][b, h, i, 0]).all()
    # the grad reads each order back (8 lanes, 1 lane or none) and gives the same gradients
    for lay, m, l in [("TND", m_tnd, l_tnd), ("", m_def, l_def)]:
        for cut in (lambda a: a, lambda a: a[..., :1], lambda a: a[..., 0]):
            g = R.ref_backward(tq, tk, tv, tdy, N1, "TND", softmax_max=cut(m), softmax_sum=cut(l),
                               attention_in=out, softmax_layout=lay, **tkw)
            assert_close(g[0], grads[0], EXACT, f"dq with stats layout {lay!r}")


def test_given_statistics_and_attention_in_are_used_literally():
    rng = np.random.default_rng(4)
    B, N1, N2, S1, S2, D, Dv = 1, 2, 1, 4, 5, 3, 3
    q, k, v, dy = _bnsd_case(rng, B, N1, N2, S1, S2, D, Dv)
    kw = dict(scale_value=0.5, atten_mask=TRIU2048, sparse_mode=3)
    out, m, l = R.ref_forward(q, k, v, N1, "BNSD", **kw)
    dq, dk, dv, _ = R.ref_backward(q, k, v, dy, N1, "BNSD", softmax_max=m, softmax_sum=l,
                                   attention_in=out, **kw)
    dq0, dk0, dv0, _ = R.ref_backward(q, k, v, dy, N1, "BNSD", **kw)
    assert_close(dq, dq0, EXACT, "dq")
    # softmax_sum doubled -> P halved -> every gradient halved
    g2 = R.ref_backward(q, k, v, dy, N1, "BNSD", softmax_max=m[..., :1], softmax_sum=2 * l[..., 0],
                        attention_in=out, **kw)
    for a, b_, name in zip(g2[:3], (dq, dk, dv), ["dq", "dk", "dv"]):
        assert_close(a, b_ / 2, EXACT, name)
    # attention_in = 0 -> Dsum = 0 -> dS = P * dP
    g3 = R.ref_backward(q, k, v, dy, N1, "BNSD", softmax_max=m, softmax_sum=l,
                        attention_in=np.zeros_like(out), **kw)
    kk = k[:, [0, 0]]
    c = np.tril(np.ones((S1, S2), dtype=bool), k=S2 - S1)
    z = q @ kk.transpose(0, 1, 3, 2) * 0.5
    p = np.where(c, np.exp(z - m[..., :1]) / l[..., :1], 0)
    ds = p * (dy @ v[:, [0, 0]].transpose(0, 1, 3, 2))
    assert_close(g3[0], 0.5 * ds @ kk, EXACT, "dq with attention_in = 0")


def test_invalid_rows():
    """mode 3 with S1 > S2: rows i < S1 - S2 compute nothing (SPEC §3 invalid rows)."""
    rng = np.random.default_rng(6)
    q, k, v, dy = _bnsd_case(rng, 1, 2, 2, 6, 3, 4, 4)
    kw = dict(atten_mask=TRIU2048, sparse_mode=3)
    out, m, l = R.ref_forward(q, k, v, 2, "BNSD", **kw)
    assert not out[:, :, :3].any() and out[:, :, 3:].all()
    assert (m[:, :, :3] == -FLT_MAX).all() and (l[:, :, :3] == FLT_MAX).all()
    assert np.isfinite(m).all() and np.isfinite(l).all()
    # whatever statistics are given for those rows, their dq is exactly 0 and nothing is NaN
    m2, l2 = m.copy(), l.copy()
    m2[:, :, :3], l2[:, :, :3] = 0.0, 1.0
    for mm, ll in [(m, l), (m2, l2)]:
        dq, dk, dv, _ = R.ref_backward(q, k, v, dy, 2, "BNSD", softmax_max=mm, softmax_sum=ll,
                                       attention_in=out, **kw)
        assert not dq[:, :, :3].any()
        assert all(np.isfinite(x).all() for x in (dq, dk, dv))


def test_empty_tensors():
    rng = np.random.default_rng(7)
    # S2 = 0: dq = 0, invalid-row statistics, out 0
    q, k, v, dy = _bnsd_case(rng, 2, 2, 1, 3, 0, 4, 4)
    out, m, l = R.ref_forward(q, k, v, 2, "BNSD")
    dq, dk, dv, _ = R.ref_backward(q, k, v, dy, 2, "BNSD")
    assert out.shape == (2, 2, 3, 4) and not out.any() and not dq.any()
    assert (m == -FLT_MAX).all() and (l == FLT_MAX).all() and dk.shape == (2, 1, 0, 4)
    # S1 = 0: dk = dv = 0
    q, k, v, dy = _bnsd_case(rng, 1, 2, 1, 0, 3, 4, 2)
    dq, dk, dv, _ = R.ref_backward(q, k, v, dy, 2, "BNSD")
    assert dq.shape == (1, 2, 0, 4) and not dk.any() and not dv.any() and dv.shape == (1, 1, 3, 2)
    # B = 0 in BSH
    q, k, v, dy = make_qkv("BSH", 0, 2, 1, 3, 4, 4, 4, np.float32, rng)
    grads = R.ref_backward(q, k, v, dy, 2, "BSH")
    assert [x.shape for x in grads[:3]] == [q.shape, k.shape, v.shape]
    # D = 0: the scores are the pse alone
    q, k, v, dy = _bnsd_case(rng, 1, 1, 1, 2, 3, 0, 2)
    pse = rng.standard_normal((1, 1, 2, 3))
    out, _, _ = R.ref_forward(q, k, v, 1, "BNSD", pse=pse, pse_type=0)
    p = np.exp(pse[0, 0]) / np.exp(pse[0, 0]).sum(-1, keepdims=True)
    assert_close(out[0, 0], p @ v[0, 0], EXACT, "D=0 out")
    # Dv = 0
    q, k, v, dy = _bnsd_case(rng, 1, 2, 2, 3, 3, 2, 0)
    out, _, _ = R.ref_forward(q, k, v, 2, "BNSD")
    dq, dk, dv, _ = R.ref_backward(q, k, v, dy, 2, "BNSD")
    assert out.shape == (1, 2, 3, 0) and not dq.any() and dv.shape == (1, 2, 3, 0)


def test_compressed_alibi_equals_full_toeplitz_pse():
    rng = np.random.default_rng(8)
    S = 1027
    q, k, v, dy = _bnsd_case(rng, 1, 2, 1, S, S, 4, 3)
    slope = np.array([0.02, 0.05])
    i = np.arange(S)[:, None]
    j = np.arange(S)[None, :]
    full = (-slope[:, None, None] * (i - j)[None] + 0.1 * np.cos(i - j)[None])[None]   # f(i - j)
    kw = dict(atten_mask=TRIU2048, sparse_mode=3, scale_value=0.5, pse_type=1)
    want_out, _, _ = R.ref_forward(q, k, v, 2, "BNSD", pse=full, **kw)
    want = R.ref_backward(q, k, v, dy, 2, "BNSD", pse=full, **kw)
    comp = np.ascontiguousarray(full[:, :, -1024:, :])
    got_out, _, _ = R.ref_forward(q, k, v, 2, "BNSD", pse=comp, **kw)
    got = R.ref_backward(q, k, v, dy, 2, "BNSD", pse=comp, **kw)
    assert_close(got_out, want_out, EXACT, "out")
    for a, b_, name in zip(got[:3], want[:3], ["dq", "dk", "dv"]):
        assert_close(a, b_, EXACT, name)
    assert got[3] is None


def test_gqa_equals_mha_with_repeated_kv():
    rng = np.random.default_rng(9)
    q, k, v, dy = _bnsd_case(rng, 2, 6, 2, 4, 5, 3, 2)
    kw = dict(atten_mask=TRIU2048, sparse_mode=2, scale_value=0.6)
    kr, vr = np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1)
    g = R.ref_backward(q, k, v, dy, 6, "BNSD", **kw)
    gm = R.ref_backward(q, kr, vr, dy, 6, "BNSD", **kw)
    assert_close(g[0], gm[0], EXACT, "dq")
    assert_close(g[1], gm[1].reshape(2, 2, 3, 5, 3).sum(2), EXACT, "dk")
    assert_close(g[2], gm[2].reshape(2, 2, 3, 5, 2).sum(2), EXACT, "dv")


def test_scale_and_keep_prob_rounded_to_float32():
    rng = np.random.default_rng(10)
    q, k, v, dy = _bnsd_case(rng, 1, 1, 1, 3, 3, 2, 2)
    a = R.ref_forward(q, k, v, 1, "BNSD", scale_value=0.1, keep_prob=0.9)[0]
    b = R.ref_forward(q, k, v, 1, "BNSD", scale_value=float(np.float32(0.1)),
                      keep_prob=float(np.float32(0.9)))[0]
    np.testing.assert_array_equal(a, b)
    # keep_prob 1: no dropout, keep ignored
    d = R.ref_forward(q, k, v, 1, "BNSD", keep=np.zeros(9, bool), keep_prob=1.0)[0]
    np.testing.assert_array_equal(d, R.ref_forward(q, k, v, 1, "BNSD")[0])


def test_drop_mask_pack_roundtrip():
    keep = np.random.default_rng(12).random(29) < 0.5
    packed = pack_keep(keep)
    assert packed.shape == (4,)
    e = 13
    assert bool((packed[e >> 3] >> (e & 7)) & 1) == keep[e]          # SPEC §5 bit order
    np.testing.assert_array_equal(unpack_drop_mask(packed, 29), keep)


def test_make_id():
    import ml_dtypes
    assert make_id(layout="BNSD", dtype=ml_dtypes.bfloat16, sm=3, gqa=4, pse=True, drop=True,
                   b=2, s1=113, s2=203, d=59) == "BNSD-bf16-sm3-gqa4-pse-drop-b2s113x203d59"
    assert make_id(layout="tnd", dtype=np.float16, sm=0, pse=False, b=1, s1=4, s2=4) == \
        "TND-fp16-sm0-b1s4"


def test_masked_p_is_exactly_zero_in_a_nan_row():
    # found by tests/test_fuzz.py: in a row whose l is NaN (an inf score), a masked element's
    # P was 0 / NaN = NaN, and a kept masked element then leaked NaN into attention_out;
    # P = C ? exp(Z - m) / l : 0 (SPEC §3), so with the computed key dropped the row is 0
    q = np.ones((1, 1, 1, 2))
    k = np.array([[[[np.inf, 1.0], [1.0, 1.0]]]])
    v = np.ones((1, 1, 2, 1))
    mask = np.array([[False, True]])                 # key 1 masked
    keep = np.array([False, True])                   # key 0 (computed) dropped, key 1 kept
    with np.errstate(all="ignore"):
        out, m, l = R.ref_forward(q, k, v, 1, "BNSD", atten_mask=mask, sparse_mode=1,
                                keep_prob=0.5, keep=keep)
        out_kept, _, _ = R.ref_forward(q, k, v, 1, "BNSD", atten_mask=mask, sparse_mode=1,
                                     keep_prob=0.5, keep=~keep)
    assert m[0, 0, 0, 0] == np.inf and np.isnan(l[0, 0, 0, 0])
    assert out[0, 0, 0, 0] == 0.0
    assert np.isnan(out_kept[0, 0, 0, 0])            # the computed NaN P, kept, is NaN
