"""Tests of fag_numba.masks: the sparse_mode -> MaskPlan reduction, its validation, and the njit
tile helpers.

1. Golden 0/1 matrices written out from SPEC §7 (and the mode 7/8 worked examples of
   ASCEND_FAG_NOTES §7.2), read back through ``materialize``.
2. Dense-mask indexing for every accepted shape, zero copy, inputs unmodified, ``full``.
3. ``_band_tile_class``, ``_dense_tile_class`` against
   brute force on random small configurations (seeded loops).
4. Every validation rule (error class and the argument named in the message) and the
   UserWarning for modes 2..8 without a mask.
5. A random cross-check against the independent dense builder of tests/reference.py.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fag_numba import config
from fag_numba.errors import FagTypeError, FagValueError
from fag_numba.masks import (EMPTY, FULL, PARTIAL, MaskPlan, _band_tile_class,
                             _dense_tile_class, materialize, plan_masks)

try:                                   # tests/ as a package or as a plain directory on sys.path
    from . import reference as R
except ImportError:                    # pragma: no cover
    try:
        import reference as R
    except ImportError:
        R = None

INF = config.BAND_INF
TRI = np.triu(np.ones((2048, 2048), dtype=bool), k=1)
TRI6 = np.concatenate([TRI, np.zeros((1024, 2048), dtype=bool)], axis=0)
TRI6[2048:, 1024:] = True


def G(text):
    """Golden matrix from rows of 0/1 characters."""
    rows = text.split()
    return np.array([[c == "1" for c in r] for r in rows], dtype=bool)


def plan(mask, mode, pre=2147483647, nxt=2147483647, prefix=None, sq=(4,), sk=(4,), n1=1,
         tnd=False, **kw):
    sq = np.asarray(sq, np.int64)
    sk = np.asarray(sk, np.int64)
    return plan_masks(mask, mode, pre, nxt, prefix, sq, sk, batch=len(sq), n1=n1, tnd=tnd, **kw)


def nonTND(mask, mode, s1, s2, b=1, **kw):
    return plan(mask, mode, sq=[s1] * b, sk=[s2] * b, **kw)


def tri():
    return TRI.copy()


# ------------------------------------------------------------------------------------------------
# 1. golden matrices (SPEC §7)
# ------------------------------------------------------------------------------------------------

GOLDEN = [
    # (id, mode, s1, s2, pre, next, prefix, expected)
    ("m2-3x5", 2, 3, 5, 0, 0, None, """
        10000
        11000
        11100"""),
    ("m2-5x3", 2, 5, 3, 0, 0, None, """
        100
        110
        111
        111
        111"""),
    ("m3-3x5", 3, 3, 5, 0, 0, None, """
        11100
        11110
        11111"""),
    ("m3-5x3", 3, 5, 3, 0, 0, None, """
        000
        000
        100
        110
        111"""),
    ("m4-3x5-pre1-next0", 4, 3, 5, 1, 0, None, """
        01100
        00110
        00011"""),
    ("m4-5x3-pre1-next0", 4, 5, 3, 1, 0, None, """
        000
        000
        100
        110
        011"""),
    ("m4-3x5-pre0-next1", 4, 3, 5, 0, 1, None, """
        00110
        00011
        00001"""),
    ("m6-5x3-prefix1", 6, 5, 3, 0, 0, [1], """
        100
        100
        100
        110
        111"""),
    ("m6-4x6-prefix4", 6, 4, 6, 0, 0, [4], """
        111100
        111100
        111110
        111111"""),
]


@pytest.mark.parametrize("case", GOLDEN, ids=[c[0] for c in GOLDEN])
def test_golden_compressed_modes(case):
    _, mode, s1, s2, pre, nxt, prefix, expected = case
    mask = TRI6 if mode == 6 else TRI
    p = nonTND(mask, mode, s1, s2, pre=pre, nxt=nxt, prefix=prefix)
    assert not p.has_dense
    np.testing.assert_array_equal(materialize(p, 0, 0, s1, s2), G(expected))


MODE0_NEG_NEXT = """
    000000000000
    000000000000
    000000000000
    100000000000
    110000000000
    111000000000
    111100000000
    111110000000
    111111000000
    111111100000
    011111110000
    001111111000"""
MODE0_NEG_PRE = """
    000111110000
    000011111000
    000001111100
    000000111110
    000000011111
    000000001111
    000000000111
    000000000011
    000000000001
    000000000000
    000000000000
    000000000000"""


@pytest.mark.parametrize("pre,nxt,expected", [(9, -3, MODE0_NEG_NEXT), (-3, 7, MODE0_NEG_PRE)])
def test_golden_mode0_negative_tokens(pre, nxt, expected):
    mask = np.zeros((12, 12), dtype=bool)
    p = nonTND(mask, 0, 12, 12, pre=pre, nxt=nxt)
    assert p.has_dense and not p.full
    np.testing.assert_array_equal(materialize(p, 0, 0, 12, 12), G(expected))


def test_golden_mode0_and_mask():
    """Mode 0 computes mask == 0 AND i - pre <= j <= i + next."""
    mask = G("""
        0100
        0000
        0010
        1000""")
    p = nonTND(mask, 0, 4, 4, pre=1, nxt=1)
    np.testing.assert_array_equal(materialize(p, 0, 0, 4, 4), G("""
        1000
        1110
        0101
        0011"""))


def test_golden_mode1_is_the_mask():
    mask = G("""
        01010
        11000
        00001""").astype(np.uint8) * 7          # any non-zero byte = masked
    p = nonTND(mask, 1, 3, 5, pre=-100, nxt=-100)    # tokens ignored in mode 1
    np.testing.assert_array_equal(materialize(p, 0, 0, 3, 5), G("""
        10101
        00111
        11110"""))


def test_golden_mode5_prefix():
    """Mode 5: mask == 0 and (j <= i + delta or j < prefix); S1=4, S2=6, prefix 4."""
    mask = np.zeros((4, 6), dtype=bool)
    p = nonTND(mask, 5, 4, 6, prefix=[4])
    np.testing.assert_array_equal(materialize(p, 0, 0, 4, 6), G("""
        111100
        111100
        111110
        111111"""))
    mask[0, 1] = True
    mask[3, 5] = True
    p = nonTND(mask, 5, 4, 6, prefix=(4,))
    np.testing.assert_array_equal(materialize(p, 0, 0, 4, 6), G("""
        101100
        111100
        111110
        111110"""))


def test_golden_mode7_doc_example():
    """actual_seq_qlen=[3,5], actual_seq_kvlen=[3,9], pre=6, next=-2: last sequence 2x6
    computes j <= i + 2; the first (3x3) is right-down causal."""
    p = plan(tri(), 7, pre=6, nxt=-2, sq=[3, 2], sk=[3, 6], tnd=True)
    np.testing.assert_array_equal(materialize(p, 1, 0, 2, 6), G("""
        111000
        111100"""))
    np.testing.assert_array_equal(materialize(p, 0, 0, 3, 3), G("""
        100
        110
        111"""))


def test_golden_mode8_doc_example():
    """actual_seq_qlen=[3,8,12], actual_seq_kvlen=[4,9,13], pre=4, next=1: the first sequence
    (3x4) computes i-3 <= j <= i+2, the others are top-left causal."""
    p = plan(tri(), 8, pre=4, nxt=1, sq=[3, 5, 4], sk=[4, 5, 4], tnd=True)
    np.testing.assert_array_equal(materialize(p, 0, 0, 3, 4), G("""
        1110
        1111
        1111"""))
    np.testing.assert_array_equal(materialize(p, 1, 0, 5, 5), np.tril(np.ones((5, 5), bool)))
    np.testing.assert_array_equal(materialize(p, 2, 0, 4, 4), np.tril(np.ones((4, 4), bool)))


def test_mode7_8_band_sequence_skips_empty_sequences():
    # mode 7: the last sequence with S1_b > 0 is sequence 1 (sequence 2 has S1 = 0)
    # (bounds that exclude nothing in their sequence are stored as -/+INF)
    p = plan(tri(), 7, pre=6, nxt=-2, sq=[3, 2, 0], sk=[3, 6, 4], tnd=True)
    assert (p.lo[1], p.hi[1]) == (-INF, 2)       # pre >= S2: a mode-7 band has no lower limit
    assert (p.lo[0], p.hi[0]) == (-INF, 0) and (p.lo[2], p.hi[2]) == (-INF, INF)
    # mode 8: the first sequence with S1_b > 0 is sequence 1
    p = plan(tri(), 8, pre=5, nxt=1, sq=[0, 4, 5], sk=[2, 5, 5], tnd=True)
    assert (p.lo[1], p.hi[1]) == (-INF, 2)
    assert (p.lo[0], p.hi[0]) == (-INF, 0) and (p.lo[2], p.hi[2]) == (-INF, 0)


def test_no_mask_is_full_attention_in_every_mode():
    for mode in range(9):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = plan(None, mode, pre=-5, nxt=-5, sq=[3, 5], sk=[4, 2], tnd=(mode in (7, 8)))
        assert p.full and not p.has_dense and p.sparse_mode == mode
        assert (p.lo == -INF).all() and (p.hi == INF).all() and (p.prefix == 0).all()
        assert materialize(p, 1, 0, 5, 2).all()


# ------------------------------------------------------------------------------------------------
# 2. dense indexing, zero copy, inputs unmodified, `full`
# ------------------------------------------------------------------------------------------------

def _band(s1, s2, pre, nxt):
    i = np.arange(s1)[:, None]
    j = np.arange(s2)[None, :]
    return (j >= i - pre) & (j <= i + nxt)


@pytest.mark.parametrize("shape_kind", ["SS", "11SS", "B1SS", "BNSS"])
@pytest.mark.parametrize("dtype", [np.bool_, np.uint8])
def test_dense_shapes_nonTND(shape_kind, dtype):
    rng = np.random.default_rng(1)
    b, n1, s1, s2 = 3, 2, 5, 7
    shape = {"SS": (s1, s2), "11SS": (1, 1, s1, s2), "B1SS": (b, 1, s1, s2),
             "BNSS": (b, n1, s1, s2)}[shape_kind]
    mask = (rng.random(shape) < 0.3).astype(dtype)
    before = mask.copy()
    for mode in (0, 1, 5):
        p = nonTND(mask, mode, s1, s2, b=b, n1=n1, pre=2, nxt=3,
                   prefix=[3] * b if mode == 5 else None)
        assert p.has_dense and p.dense.dtype == np.uint8 and p.dense.ndim == 1
        assert np.shares_memory(p.dense, mask)
        m4 = mask.reshape((1, 1) + shape) if mask.ndim == 2 else mask
        for bb in range(b):
            for h in range(n1):
                mb = m4[bb if m4.shape[0] > 1 else 0, h if m4.shape[1] > 1 else 0] == 0
                if mode == 0:
                    want = mb & _band(s1, s2, 2, 3)
                elif mode == 1:
                    want = mb
                else:
                    i = np.arange(s1)[:, None]
                    j = np.arange(s2)[None, :]
                    want = mb & ((j <= i + s2 - s1) | (j < 3))
                np.testing.assert_array_equal(materialize(p, bb, h, s1, s2), want)
    np.testing.assert_array_equal(mask, before)


def test_dense_TND_uses_top_left_corner():
    rng = np.random.default_rng(2)
    sq, sk = [3, 5, 0, 2], [4, 2, 3, 6]
    mask = rng.random((5, 6)) < 0.4
    for m in (mask, mask.reshape(1, 1, 5, 6)):
        p = plan(m, 1, sq=sq, sk=sk, tnd=True, n1=3)
        assert p.dense_hs == 0 and p.dense_rs == 6 and (p.dense_boff == 0).all()
        for b, (s1, s2) in enumerate(zip(sq, sk)):
            for h in range(3):
                np.testing.assert_array_equal(materialize(p, b, h, s1, s2),
                                              ~mask[:s1, :s2])


def test_non_contiguous_mask_is_copied_once_and_read_correctly():
    base = np.random.default_rng(3).random((8, 12)) < 0.5
    mask = base[::2, ::2]                       # [4, 6], not C-contiguous
    p = nonTND(mask, 1, 4, 6)
    assert not np.shares_memory(p.dense, base)
    np.testing.assert_array_equal(materialize(p, 0, 0, 4, 6), ~mask)
    f = np.asfortranarray(base)
    p = nonTND(f, 1, 8, 12)
    np.testing.assert_array_equal(materialize(p, 0, 0, 8, 12), ~base)


def test_inputs_unmodified_and_compressed_not_copied():
    m = tri()
    m_before = m.copy()
    prefix = [3, 4]
    p = nonTND(TRI6.copy(), 6, 4, 6, b=2, prefix=prefix)
    assert prefix == [3, 4]
    p = nonTND(m, 3, 4, 6)
    np.testing.assert_array_equal(m, m_before)
    assert p.dense.shape == (1,) and not np.shares_memory(p.dense, m)
    pa = np.array([3, 4], dtype=np.int32)
    p = nonTND(TRI6, 6, 4, 6, b=2, prefix=pa)
    np.testing.assert_array_equal(pa, [3, 4])
    assert p.prefix.dtype == np.int64 and list(p.prefix) == [3, 4]


def test_plan_fields_and_types():
    p = nonTND(np.zeros((2, 3, 4, 5), np.uint8), 0, 4, 5, b=2, n1=3, pre=1, nxt=2)
    assert isinstance(p, MaskPlan)
    for arr in (p.lo, p.hi, p.prefix, p.dense_boff):
        assert arr.dtype == np.int64 and arr.shape == (2,)
    assert list(p.dense_boff) == [0, 60] and p.dense_hs == 20 and p.dense_rs == 5
    assert list(p.lo) == [-1, -1] and list(p.hi) == [2, 2]
    # default tokens stay finite but tokens beyond BAND_INF are clamped
    p = nonTND(tri(), 4, 4, 5, pre=2**63 - 1, nxt=2**63 - 1)
    assert list(p.lo) == [-INF] and list(p.hi) == [INF]


def test_full_flag():
    assert nonTND(tri(), 4, 4, 5, pre=10, nxt=10).full
    assert not nonTND(tri(), 4, 4, 5, pre=3, nxt=10).full
    assert nonTND(tri(), 3, 1, 3).full            # 1 x 3, j <= i + 2: everything
    assert not nonTND(tri(), 3, 2, 3).full
    assert nonTND(TRI6, 6, 3, 5, prefix=[5]).full  # prefix covers every column
    assert not nonTND(np.zeros((4, 4), bool), 1, 4, 4).full      # dense: never `full`
    assert plan(tri(), 2, sq=[0, 1], sk=[5, 1], tnd=True).full   # empty sequences count as full


# ------------------------------------------------------------------------------------------------
# 3. njit helpers against brute force
# ------------------------------------------------------------------------------------------------

def _brute_band(lo, hi, prefix, s1, s2):
    i = np.arange(s1)[:, None]
    j = np.arange(s2)[None, :]
    return ((j - i >= lo) & (j - i <= hi)) | (j < prefix)


def _cls(block):
    if block.all():
        return FULL
    if not block.any():
        return EMPTY
    return PARTIAL


def _random_band(rng, s1, s2):
    choice = rng.integers(0, 5)
    lo = int(rng.integers(-s1 - 3, s2 + 3))
    hi = int(rng.integers(-s1 - 3, s2 + 3))
    if choice == 0:
        lo = -INF
    elif choice == 1:
        hi = INF
    elif choice == 2:
        lo, hi = -INF, INF
    prefix = int(rng.integers(0, s2 + 2)) if rng.random() < 0.4 else 0
    return lo, hi, prefix


def test_band_tile_class_brute_force():
    rng = np.random.default_rng(10)
    for _ in range(3000):
        s1, s2 = int(rng.integers(1, 14)), int(rng.integers(1, 14))
        lo, hi, prefix = _random_band(rng, s1, s2)
        full = _brute_band(lo, hi, prefix, s1, s2)
        i0 = int(rng.integers(0, s1))
        i1 = int(rng.integers(i0 + 1, s1 + 1))
        j0 = int(rng.integers(0, s2))
        j1 = int(rng.integers(j0 + 1, s2 + 1))
        got = _band_tile_class(lo, hi, prefix, i0, i1, j0, j1)
        assert got == _cls(full[i0:i1, j0:j1]), (lo, hi, prefix, i0, i1, j0, j1)


def test_band_tile_class_every_tile_of_small_grids():
    """Exhaustive over tile positions, including corners where prefix and band meet."""
    rng = np.random.default_rng(11)
    for _ in range(200):
        s1, s2 = int(rng.integers(1, 10)), int(rng.integers(1, 10))
        lo, hi, prefix = _random_band(rng, s1, s2)
        full = _brute_band(lo, hi, prefix, s1, s2)
        for i0 in range(s1):
            for i1 in range(i0 + 1, s1 + 1):
                for j0 in range(s2):
                    for j1 in range(j0 + 1, s2 + 1):
                        assert (_band_tile_class(lo, hi, prefix, i0, i1, j0, j1)
                                == _cls(full[i0:i1, j0:j1]))


def test_dense_tile_class_brute_force():
    rng = np.random.default_rng(12)
    for _ in range(2000):
        s1, s2 = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        density = rng.choice([0.0, 0.05, 0.5, 0.95, 1.0])
        nh = 2
        m = (rng.random((nh, s1, s2)) < density).astype(np.uint8) * rng.integers(1, 256)
        flat = m.reshape(-1)
        h = int(rng.integers(0, nh))
        i0 = int(rng.integers(0, s1))
        i1 = int(rng.integers(i0 + 1, s1 + 1))
        j0 = int(rng.integers(0, s2))
        j1 = int(rng.integers(j0 + 1, s2 + 1))
        got = _dense_tile_class(flat, h * s1 * s2, s2, i0, i1, j0, j1)
        assert got == _cls(m[h, i0:i1, j0:j1] == 0)


def raises(exc, match, fn, *a, **kw):
    with pytest.raises(exc, match=match):
        fn(*a, **kw)


@pytest.mark.parametrize("value,exc", [("3", FagTypeError), (3.0, FagTypeError),
                                       (True, FagTypeError), (None, FagTypeError),
                                       (9, FagValueError), (-1, FagValueError)])
def test_sparse_mode_type_and_range(value, exc):
    raises(exc, "sparse_mode", nonTND, None, value, 4, 4)
    raises(exc, "sparse_mode", nonTND, tri(), value, 4, 4)


def test_sparse_mode_numpy_int_accepted():
    p = nonTND(tri(), np.int32(3), 4, 4)
    assert p.sparse_mode == 3 and type(p.sparse_mode) is int


@pytest.mark.parametrize("name", ["pre", "nxt"])
@pytest.mark.parametrize("value,exc", [(1.5, FagTypeError), (True, FagTypeError),
                                       ("1", FagTypeError), (2**63, FagValueError),
                                       (-2**63 - 1, FagValueError)])
def test_tokens_type_and_range(name, value, exc):
    argname = "pre_tokens" if name == "pre" else "next_tokens"
    raises(exc, argname, nonTND, None, 0, 4, 4, **{name: value})   # checked even without mask
    raises(exc, argname, nonTND, tri(), 3, 4, 4, **{name: value})


def test_atten_mask_type_dtype_rank():
    raises(FagTypeError, "atten_mask", nonTND, [[0, 1], [0, 0]], 1, 2, 2)
    raises(FagTypeError, "atten_mask", nonTND, np.zeros((2, 2), np.float32), 1, 2, 2)
    raises(FagTypeError, "atten_mask", nonTND, np.zeros((2, 2), np.int8), 1, 2, 2)
    raises(FagValueError, "atten_mask", nonTND, np.zeros((1, 2, 2), bool), 1, 2, 2)
    raises(FagValueError, "atten_mask", nonTND, np.zeros((), bool), 1, 2, 2)
    raises(FagValueError, "atten_mask", nonTND, np.zeros((1, 1, 1, 2, 2), bool), 1, 2, 2)


def test_mode_layout_combinations():
    raises(FagValueError, "sparse_mode", nonTND, tri(), 7, 4, 4)
    raises(FagValueError, "sparse_mode", nonTND, tri(), 8, 4, 4)
    raises(FagValueError, "sparse_mode", plan, np.zeros((4, 4), bool), 5, prefix=[0],
           sq=[4], sk=[4], tnd=True)
    # without a mask nothing tied to the mode is validated (only the warning)
    with pytest.warns(UserWarning):
        nonTND(None, 7, 4, 4)
    with pytest.warns(UserWarning):
        plan(None, 5, sq=[4], sk=[4], tnd=True)
    with pytest.warns(UserWarning):
        nonTND(None, 6, 4, 4, pre=-100, nxt=-100)        # no prefix, absurd tokens: fine


@pytest.mark.parametrize("mode", [2, 3, 4, 7, 8])
def test_compressed_shapes(mode):
    tnd = mode in (7, 8)
    kw = dict(sq=[4], sk=[4], tnd=tnd, pre=2**31 - 1, nxt=0)
    for bad in [(5, 7), (2048, 2047), (2047, 2048), (3072, 2048), (2, 1, 2048, 2048),
                (1, 2, 2048, 2048)]:
        raises(FagValueError, r"atten_mask: sparse_mode %d needs the compressed \[2048, 2048\]"
               % mode, plan, np.zeros(bad, bool), mode, **kw)
    plan(TRI.reshape(1, 1, 2048, 2048), mode, **kw)
    plan(TRI.astype(np.uint8) * 3, mode, **kw)                # compared as booleans
    plan(np.asfortranarray(TRI), mode, **kw)


def test_compressed_shapes_mode6():
    for bad in [(2048, 2048), (3072, 2047), (2, 1, 3072, 2048)]:
        raises(FagValueError, r"atten_mask: sparse_mode 6 needs the compressed \[3072, 2048\]",
               nonTND, np.zeros(bad, bool), 6, 4, 4, prefix=[0])
    nonTND(TRI6.reshape(1, 1, 3072, 2048), 6, 4, 4, prefix=[0])
    nonTND(TRI6.astype(np.uint8), 6, 4, 4, prefix=[0])


@pytest.mark.parametrize("mode", [2, 3, 4, 6, 7, 8])
@pytest.mark.parametrize("where", [(0, 0), (0, 1), (1000, 999), (2047, 2047), (2500, 1023),
                                   (3071, 1024)])
def test_non_canonical_compressed_mask(mode, where):
    m = (TRI6 if mode == 6 else TRI).copy()
    if where[0] >= m.shape[0]:
        return
    m[where] = ~m[where]
    kw = dict(sq=[4], sk=[4], tnd=mode in (7, 8), prefix=[0] if mode == 6 else None, nxt=0)
    raises(FagValueError, "atten_mask.*canonical", plan, m, mode, **kw)
    raises(FagValueError, "atten_mask.*canonical", plan, m.astype(np.uint8), mode, **kw)


def _forms(m):
    """The forms a compressed mask reaches the check in: bool and uint8, writeable and
    read-only (numba types them apart), 4-D, 8-byte misaligned and strided (the numpy
    fallback), and a uint8 copy holding 3 for masked (canonical as booleans)."""
    ro = m.copy()
    ro.flags.writeable = False
    buf = np.zeros(m.size + 1, np.uint8)
    odd = buf[1:].view(bool).reshape(m.shape)            # misaligned: not the word kernel
    odd[...] = m
    wide = np.zeros((m.shape[0], 2 * m.shape[1]), bool)
    wide[:, ::2] = m
    return [m, m.astype(np.uint8), m.astype(np.uint8) * 3, ro, m.reshape((1, 1) + m.shape),
            odd, wide[:, ::2]]


# every place a row's expected bytes change: the first and last rows and columns, both sides
# of the diagonal, both sides of a word boundary (the check reads 8 bytes at a time), mode 6's
# first / last extra rows and both sides of their column 1024
_FLIPS = [(0, 0), (0, 1), (0, 7), (0, 8), (0, 2047), (7, 7), (7, 8), (8, 8), (8, 9), (1000, 999),
          (1000, 1000), (1000, 1001), (1023, 1024), (2046, 2047), (2047, 2046), (2047, 2047),
          (2048, 0), (2048, 1023), (2048, 1024), (2048, 2047), (2500, 1023), (2500, 1024),
          (3071, 1023), (3071, 1024), (3071, 2047)]


@pytest.mark.parametrize("mode", [3, 6])
def test_canonical_check_every_form_and_single_flips(mode):
    """The canonical check accepts the canonical mask in every form and refuses each single
    flipped element (SPEC §7: a non-canonical compressed mask is always an error)."""
    canon = TRI6 if mode == 6 else TRI
    kw = dict(sq=[4], sk=[4], prefix=[0] if mode == 6 else None)
    for m in _forms(canon):
        plan(m, mode, **kw)
    for r, c in _FLIPS:
        if r >= canon.shape[0]:
            continue
        m = canon.copy()
        m[r, c] = ~m[r, c]
        for x in _forms(m):
            raises(FagValueError, r"atten_mask.*canonical.*element \[%d, %d\]" % (r, c), plan,
                   x, mode, **kw)


def test_canonical_check_kernel_against_numpy():
    """masks._first_bad_row against a numpy row comparison, on random sets of flipped
    elements (seeded), and on a mask canonical as booleans but not as 0/1 bytes (a difference
    for the word kernel: the caller then compares as booleans).  Under NUMBA_DISABLE_JIT (the
    coverage lane: a Python loop over the words) on 48-row slices: the triangle's top rows and
    mode 6's extra rows alone (``split=0``: every row is a t = 1024 row)."""
    import numba
    from fag_numba.masks import _first_bad_row
    rng = np.random.default_rng(7)
    if numba.config.DISABLE_JIT:
        cases = [(TRI[:48], 2048), (TRI6[2048:2096], 0)]
    else:
        cases = [(TRI, 2048), (TRI6, 2048)]
    for canon, split in cases:
        canon = np.ascontiguousarray(canon)
        assert _first_bad_row(canon.reshape(-1).view(np.uint64), 256, split) == -1
        for _ in range(40):
            m = canon.copy()
            n = int(rng.integers(1, 4))
            rows = rng.integers(0, m.shape[0], n)
            cols = rng.integers(0, 2048, n)
            m[rows, cols] = ~m[rows, cols]
            want = int(np.flatnonzero((m != canon).any(axis=1))[0])
            assert _first_bad_row(m.reshape(-1).view(np.uint64), 256, split) == want
        m3 = canon.astype(np.uint8) * 3
        assert _first_bad_row(m3.reshape(-1).view(np.uint64), 256, split) == 0


def test_compressed_mask_is_immutable_and_skips_the_check(monkeypatch):
    """masks.compressed_mask: the canonical masks, read-only over immutable memory (cannot be
    made writeable), accepted without reading (the word kernel is not called for it or its
    4-D reshape); every other array, a copy or read-only, is still read and checked."""
    from fag_numba import masks
    m3, m6 = masks.compressed_mask(3), masks.compressed_mask(6)
    assert m3 is masks.compressed_mask(2) and m3.dtype == np.bool_
    np.testing.assert_array_equal(m3, TRI)
    np.testing.assert_array_equal(m6, TRI6)
    for m in (m3, m6):
        assert not m.flags.writeable
        with pytest.raises(ValueError):
            m.flags.writeable = True
    raises(FagValueError, "sparse_mode", masks.compressed_mask, 1)
    calls = []
    real = masks._first_bad_row
    monkeypatch.setattr(masks, "_first_bad_row", lambda *a: calls.append(1) or real(*a))
    plan(m3, 3)
    plan(m3.reshape(1, 1, 2048, 2048), 3)
    nonTND(m6, 6, 4, 4, prefix=[0])
    assert calls == []
    bad = m3.copy()                       # a copy is the user's: read, and refused when wrong
    bad[5, 5] = True
    bad.flags.writeable = False
    raises(FagValueError, "canonical", plan, bad, 3)
    other = np.frombuffer(bad.tobytes(), dtype=bool).reshape(2048, 2048)   # immutable too
    raises(FagValueError, "canonical", plan, other, 3)
    import numba
    assert len(calls) == (0 if numba.config.DISABLE_JIT else 2)   # (no kernel without the JIT)


def test_full_mask_shapes():
    z = lambda *s: np.zeros(s, bool)                    # noqa: E731
    raises(FagValueError, "atten_mask", nonTND, z(5, 7), 0, 4, 7)
    raises(FagValueError, "atten_mask", nonTND, z(4, 6), 1, 4, 7)
    raises(FagValueError, "atten_mask", nonTND, z(2, 3, 4, 7), 1, 4, 7, b=2, n1=4)
    raises(FagValueError, "atten_mask", nonTND, z(1, 4, 4, 7), 1, 4, 7, b=2, n1=4)
    raises(FagValueError, "atten_mask", nonTND, z(3, 1, 4, 7), 1, 4, 7, b=2, n1=4)
    nonTND(z(1, 4, 4, 7), 1, 4, 7, b=1, n1=4)           # (B, N1) with B = 1
    nonTND(z(2, 1, 4, 7), 1, 4, 7, b=2, n1=4)
    nonTND(z(4, 7), 0, 4, 7, b=2, n1=4)
    raises(FagValueError, "atten_mask", nonTND, tri(), 1, 4, 4)   # compressed shape for mode 1
    # TND: only [maxS1, maxS2] (or [1, 1, maxS1, maxS2])
    kw = dict(sq=[3, 5], sk=[4, 2], tnd=True)
    plan(z(5, 4), 0, **kw)
    plan(z(1, 1, 5, 4), 1, **kw)
    raises(FagValueError, "atten_mask.*TND", plan, z(2, 1, 5, 4), 1, **kw)
    raises(FagValueError, "atten_mask.*TND", plan, z(5, 5), 1, **kw)
    raises(FagValueError, "atten_mask.*TND", plan, z(8, 6), 1, **kw)
    # B == 0 (empty tensors): the declared S1/S2 decide
    p = plan(z(3, 4), 1, sq=[], sk=[], s1=3, s2=4)
    assert p.lo.shape == (0,)
    raises(FagValueError, "atten_mask", plan, z(3, 4), 1, sq=[], sk=[], s1=3, s2=5)


def test_token_rules_mode0():
    m = np.zeros((12, 10), bool)
    nonTND(m, 0, 12, 10, pre=-10, nxt=12)               # -pre == S2: allowed
    raises(FagValueError, "pre_tokens", nonTND, m, 0, 12, 10, pre=-11, nxt=20)
    nonTND(m, 0, 12, 10, pre=20, nxt=-12)               # -next == S1: allowed
    raises(FagValueError, "next_tokens", nonTND, m, 0, 12, 10, pre=20, nxt=-13)
    raises(FagValueError, "pre_tokens, next_tokens", nonTND, m, 0, 12, 10, pre=3, nxt=-4)
    nonTND(m, 0, 12, 10, pre=3, nxt=-3)                 # pre + next == 0: the diagonal-shifted line
    # the sum check is exact beyond int64 clamping
    raises(FagValueError, "pre_tokens, next_tokens", nonTND, m, 0, 12, 10, pre=2**63 - 1,
           nxt=-2**63)
    # tokens are not checked for modes 1, 2, 3, 5, 6
    nonTND(m, 1, 12, 10, pre=-100, nxt=-100)
    nonTND(tri(), 2, 12, 10, pre=-100, nxt=-100)
    nonTND(tri(), 3, 12, 10, pre=-100, nxt=-100)
    nonTND(m, 5, 12, 10, pre=-100, nxt=-100, prefix=[0])
    nonTND(TRI6, 6, 12, 10, pre=-100, nxt=-100, prefix=[0])


def test_token_rules_mode4_rebased():
    # S1=4, S2=6: pre' = pre - 2, next' = next + 2
    nonTND(tri(), 4, 4, 6, pre=-4, nxt=10)              # -pre' = 6 = S2: allowed
    raises(FagValueError, "pre_tokens", nonTND, tri(), 4, 4, 6, pre=-5, nxt=10)
    nonTND(tri(), 4, 4, 6, pre=10, nxt=-6)              # -next' = 4 = S1: allowed
    raises(FagValueError, "next_tokens", nonTND, tri(), 4, 4, 6, pre=10, nxt=-7)
    raises(FagValueError, "pre_tokens, next_tokens", nonTND, tri(), 4, 4, 6, pre=1, nxt=-2)


def test_token_rules_TND_per_sequence_skip_empty():
    m = np.zeros((5, 6), bool)
    kw = dict(sq=[5, 0, 2], sk=[6, 3, 0], tnd=True)
    plan(m, 0, pre=-6, nxt=9, **kw)
    raises(FagValueError, "pre_tokens.*sequence 0", plan, m, 0, pre=-7, nxt=9, **kw)
    kw = dict(sq=[0, 2, 5], sk=[3, 2, 6], tnd=True)
    raises(FagValueError, "pre_tokens.*sequence 1", plan, m, 0, pre=-3, nxt=9, **kw)
    # mode 4 TND: -pre' > S2  <=>  pre < -S1 for each non-empty sequence
    kw = dict(sq=[2, 0, 4], sk=[5, 9, 4], tnd=True)
    plan(tri(), 4, pre=-2, nxt=9, **kw)
    raises(FagValueError, "pre_tokens.*sequence 0", plan, tri(), 4, pre=-3, nxt=9, **kw)


def test_token_rules_mode7():
    kw = dict(sq=[3, 2], sk=[3, 6], tnd=True)
    plan(tri(), 7, pre=6, nxt=-2, **kw)
    plan(tri(), 7, pre=6, nxt=-4, **kw)                  # next == S1 - S2
    plan(tri(), 7, pre=6, nxt=0, **kw)
    raises(FagValueError, "pre_tokens.*band", plan, tri(), 7, pre=5, nxt=-2, **kw)
    raises(FagValueError, "next_tokens.*sparse_mode 7", plan, tri(), 7, pre=6, nxt=1, **kw)
    raises(FagValueError, "next_tokens.*sparse_mode 7", plan, tri(), 7, pre=6, nxt=-5, **kw)
    # the other sequences need S1_b <= S2_b
    raises(FagValueError, "actual_seq_qlen", plan, tri(), 7, pre=6, nxt=-2,
           sq=[4, 2], sk=[3, 6], tnd=True)
    plan(tri(), 7, pre=6, nxt=-2, sq=[4, 2], sk=[0, 6], tnd=True)   # empty: skipped
    # a band sequence with S1 > S2 can never satisfy S1 - S2 <= next <= 0
    raises(FagValueError, "next_tokens", plan, tri(), 7, pre=2, nxt=0, sq=[3, 4], sk=[3, 2],
           tnd=True)
    # no sequence with S1_b > 0: nothing to check
    plan(tri(), 7, pre=-9, nxt=-9, sq=[0, 0], sk=[3, 2], tnd=True)


def test_token_rules_mode8():
    kw = dict(sq=[3, 5, 4], sk=[4, 5, 4], tnd=True)
    plan(tri(), 8, pre=4, nxt=1, **kw)
    plan(tri(), 8, pre=4, nxt=-1, **kw)                  # next == S1 - S2
    raises(FagValueError, "pre_tokens.*band", plan, tri(), 8, pre=3, nxt=1, **kw)
    raises(FagValueError, "next_tokens.*sparse_mode 8", plan, tri(), 8, pre=4, nxt=-2, **kw)
    # other sequences may have any S1_b, S2_b (top-left causal)
    plan(tri(), 8, pre=4, nxt=1, sq=[3, 9, 4], sk=[4, 2, 4], tnd=True)


def test_prefix_rules():
    kw = dict(sq=[4, 4], sk=[6, 6])
    for mode, mask in ((5, np.zeros((4, 6), bool)), (6, TRI6)):
        raises(FagValueError, "prefix.*requires", plan, mask, mode, **kw)
        raises(FagValueError, "prefix.*B=2", plan, mask, mode, prefix=[3], **kw)
        raises(FagTypeError, "prefix", plan, mask, mode, prefix=[3, 2.0], **kw)
        raises(FagTypeError, "prefix", plan, mask, mode, prefix=[3, True], **kw)
        raises(FagTypeError, "prefix", plan, mask, mode, prefix=3, **kw)
        raises(FagTypeError, "prefix", plan, mask, mode, prefix="34", **kw)
        raises(FagTypeError, "prefix", plan, mask, mode, prefix=np.array([3.0, 4.0]), **kw)
        raises(FagValueError, "prefix", plan, mask, mode, prefix=np.array([[3, 4]]), **kw)
        # S1 <= S2: prefix in [S2 - S1, S2] = [2, 6]
        plan(mask, mode, prefix=[2, 6], **kw)
        raises(FagValueError, r"prefix.*prefix\[1\]=1", plan, mask, mode, prefix=[2, 1], **kw)
        raises(FagValueError, r"prefix.*prefix\[0\]=7", plan, mask, mode, prefix=[7, 2], **kw)
        plan(mask, mode, prefix=np.array([2, 6], np.uint16), **kw)
    # S1 > S2: prefix in [0, S2]
    m = np.zeros((6, 4), bool)
    plan(m, 5, prefix=[0, 4], sq=[6, 6], sk=[4, 4])
    raises(FagValueError, "prefix", plan, m, 5, prefix=[-1, 4], sq=[6, 6], sk=[4, 4])
    raises(FagValueError, "prefix", plan, m, 5, prefix=[0, 5], sq=[6, 6], sk=[4, 4])
    # TND mode 6: per sequence; empty sequences accept [0, S2]
    p = plan(TRI6, 6, prefix=[1, 2, 0], sq=[5, 2, 0], sk=[3, 4, 3], tnd=True)
    assert list(p.prefix) == [1, 2, 0]
    raises(FagValueError, r"prefix\[1\]", plan, TRI6, 6, prefix=[1, 1, 0], sq=[5, 2, 0],
           sk=[3, 4, 3], tnd=True)


def test_prefix_type_checked_without_mask_and_ignored_elsewhere():
    raises(FagTypeError, "prefix", nonTND, None, 0, 4, 4, prefix="x")
    p = nonTND(None, 0, 4, 4, prefix=[99, 99, 99])   # length / range not checked without mask
    assert (p.prefix == 0).all()
    p = nonTND(tri(), 3, 4, 4, prefix=[99])           # prefix ignored outside modes 5 / 6
    assert (p.prefix == 0).all()


@pytest.mark.parametrize("mode", range(9))
def test_warning_without_mask(mode):
    kw = dict(sq=[4], sk=[4], tnd=mode in (7, 8))
    if mode >= 2:
        with pytest.warns(UserWarning, match=f"sparse_mode {mode}") as rec:
            plan(None, mode, **kw)
        assert rec[0].filename == __file__          # points at the caller, not at masks.py
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plan(None, mode, **kw)


def test_no_warning_with_mask():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nonTND(tri(), 3, 4, 4)


# ------------------------------------------------------------------------------------------------
# 5. random cross-check against the independent builder in tests/reference.py
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(R is None or not hasattr(R, "ref_computed"),
                    reason="tests/reference.py ref_computed not available")
def test_random_against_reference_builder():
    rng = np.random.default_rng(20)
    checked = 0
    for _ in range(400):
        mode = int(rng.integers(0, 9))
        tnd = mode in (7, 8) or (mode != 5 and rng.random() < 0.3)
        nb = int(rng.integers(1, 4))
        if tnd:
            sq = [int(x) for x in rng.integers(0, 7, nb)]
            sk = [int(x) for x in rng.integers(0, 7, nb)]
        else:
            sq = [int(rng.integers(1, 8))] * nb
            sk = [int(rng.integers(1, 8))] * nb
        pre, nxt = (int(x) for x in rng.integers(-8, 9, 2))
        ms1, ms2 = max(sq), max(sk)
        n1 = 2
        if mode in (0, 1, 5):
            shape = (ms1, ms2) if tnd or rng.random() < 0.5 else (nb, n1, ms1, ms2)
            mask = rng.random(shape) < 0.2
        else:
            mask = TRI6 if mode == 6 else TRI
        prefix = None
        if mode in (5, 6):
            prefix = [int(rng.integers(0, s2 + 1)) if s1 > s2 or s1 == 0 or s2 == 0
                      else int(rng.integers(s2 - s1, s2 + 1)) for s1, s2 in zip(sq, sk)]
        try:
            p = plan(mask, mode, pre=pre, nxt=nxt, prefix=prefix, sq=sq, sk=sk, n1=n1, tnd=tnd)
        except FagValueError:
            continue
        cand = [b for b in range(nb) if sq[b] > 0]
        band_b = (cand[-1] if mode == 7 else cand[0]) if cand else -1
        for b in range(nb):
            role = ("band" if b == band_b else "other") if mode in (7, 8) else None
            for h in range(n1):
                m2 = None
                if mode in (0, 1, 5):
                    m2 = mask[:sq[b], :sk[b]] if mask.ndim == 2 else mask[b, h]
                want = R.ref_computed(mode, sq[b], sk[b], pre, nxt,
                                      None if prefix is None else prefix[b], m2, role)
                got = materialize(p, b, h, sq[b], sk[b])
                np.testing.assert_array_equal(got, want, err_msg=f"mode {mode} b {b}")
                # every tile class agrees with the materialised predicate
                if sq[b] and sk[b]:
                    bc = _band_tile_class(p.lo[b], p.hi[b], p.prefix[b], 0, sq[b], 0, sk[b])
                    if not p.has_dense:
                        assert bc == _cls(got)
                checked += 1
    assert checked > 100


def test_bounds_memo_equals_fresh_plans(monkeypatch):
    """masks._bounds memoises the band/prefix bounds of small calls: on random masked calls
    (every mode, random tokens, lengths, prefixes; each made twice so the second is a hit) the
    plans equal those computed with the memo off, hits hand out fresh arrays, and a call that
    breaks a token or prefix rule raises every time (failures are never memoised)."""
    from fag_numba import masks
    rng = np.random.default_rng(21)
    masks._bounds_memo.clear()
    fields = ("lo", "hi", "prefix", "dense_boff")
    seen = errors = 0
    for _ in range(300):
        mode = int(rng.integers(0, 9))
        tnd = mode in (7, 8) or (mode != 5 and rng.random() < 0.3)
        nb = int(rng.integers(1, 4))
        sq = [int(x) for x in rng.integers(0, 7, nb)] if tnd else [int(rng.integers(1, 8))] * nb
        sk = [int(x) for x in rng.integers(0, 7, nb)] if tnd else [int(rng.integers(1, 8))] * nb
        pre, nxt = (int(x) for x in rng.integers(-8, 9, 2))
        mask = (np.zeros((max(sq), max(sk)), bool) if mode in (0, 1, 5)
                else (TRI6 if mode == 6 else TRI))
        prefix = [int(x) for x in rng.integers(0, 8, nb)] if mode in (5, 6) else None
        kw = dict(pre=pre, nxt=nxt, prefix=prefix, sq=sq, sk=sk, tnd=tnd)
        with monkeypatch.context() as m:
            m.setattr(config, "PLAN_CACHE_SEQS", -1)
            try:
                want = plan(mask, mode, **kw)
            except FagValueError as e:
                for _ in range(2):
                    raises(FagValueError, str(e).split(":")[0], plan, mask, mode, **kw)
                errors += 1
                continue
        for _ in range(2):
            got = plan(mask, mode, **kw)
            for f in fields:
                np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
            assert got.full == want.full
        got.lo[:] = 7                       # a hit is a fresh array
        assert not np.array_equal(plan(mask, mode, **kw).lo, got.lo) or np.all(want.lo == 7)
        seen += 1
    assert seen > 100 and errors > 20
