"""Tests of fag_numba's dropout generator and keep-bit readers (SPEC §5, fag_numba/dropout.py).

The reference for every bit is written here again from the module docstring's definition, on
top of ``_philox4x32_10_py`` (plain Python ints), which is itself pinned to the Random123
known-answer vectors; the njit block function is pinned to the same vectors independently.
"""
import math
from fractions import Fraction

import numpy as np
import pytest

from fag_numba.dropout import (
    _counter_start,
    _mask_keep_row,
    _philox4x32_10,
    _philox4x32_10_py,
    _philox_keep_row,
    dropout_mask,
    keep_threshold,
    split_offset,
    split_seed,
)
from fag_numba.errors import FagError, FagTypeError, FagValueError

TWO32 = 1 << 32
TWO64 = 1 << 64

# Random123 examples/kat_vectors, "philox4x32 10" lines: counter[4], key[2] -> output[4].
KAT_PHILOX4X32_10 = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    # digits of pi
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


# ---- the definition, restated independently of the module ----
def ref_threshold(keep_prob):
    """floor(float32(keep_prob) * 2**32), exactly (Fraction arithmetic)."""
    return math.floor(Fraction(float(np.float32(keep_prob))) * TWO32)


def ref_bits(numels, keep_prob, seed, offset):
    """Keep bits of elements 0..numels-1 from the documented definition, as a uint8 array."""
    thr = ref_threshold(keep_prob)
    key = (seed % TWO32, seed >> 32)
    bits = np.empty(numels, dtype=np.uint8)
    for e in range(numels):
        c = (offset + e) % TWO64
        x0 = _philox4x32_10_py((c % TWO32, c >> 32, 0, 0), key)[0]
        bits[e] = x0 < thr
    return bits


def unpack(mask, numels):
    return np.unpackbits(mask, bitorder="little", count=numels)


# ------------------------------------------------------------------------------------------
# Philox-4x32-10 known answers
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ctr, key, expected", KAT_PHILOX4X32_10)
def test_philox_py_known_answers(ctr, key, expected):
    assert _philox4x32_10_py(ctr, key) == expected


@pytest.mark.parametrize("ctr, key, expected", KAT_PHILOX4X32_10)
def test_philox_njit_known_answers(ctr, key, expected):
    args = [np.uint64(w) for w in ctr + key]
    got = tuple(int(w) for w in _philox4x32_10(*args))
    assert got == expected


def test_philox_njit_matches_py_on_random_inputs():
    rng = np.random.default_rng(20240601)
    words = rng.integers(0, TWO32, size=(200, 6), dtype=np.uint64)
    for row in words:
        got = tuple(int(w) for w in _philox4x32_10(*row))
        assert got == _philox4x32_10_py(tuple(int(w) for w in row[:4]),
                                         tuple(int(w) for w in row[4:]))


# ------------------------------------------------------------------------------------------
# dropout_mask == the definition
# ------------------------------------------------------------------------------------------
BIT_CASES = [
    # (numels, keep_prob, seed, offset)
    (300, 0.5, 0, 0),
    (301, 0.9, 1234, 0),
    (257, 0.1, 2**32 + 5, 17),                 # seed uses both key words
    (200, 0.5, 2**64 - 1, 2**64 - 100),        # counter wraps around 2**64 inside the call
    (203, 0.75, 0xDEADBEEFCAFEF00D, 2**32 - 50),   # carry from the low into the high word
    (129, 0.3, 7, 2**63 - 3),
    (64, 1.0, 99, 5),                          # keep_prob 1: all kept
    (40, 1e-10, 99, 5),                        # threshold floor(0.43) = 0: nothing kept
]


@pytest.mark.parametrize("numels, keep_prob, seed, offset", BIT_CASES)
def test_dropout_mask_matches_definition(numels, keep_prob, seed, offset):
    got = dropout_mask(numels, keep_prob, seed, offset)
    expected = np.packbits(ref_bits(numels, keep_prob, seed, offset), bitorder="little")
    np.testing.assert_array_equal(got, expected)


def test_keep_prob_one_and_tiny():
    assert np.all(unpack(dropout_mask(1000, 1.0, 3), 1000) == 1)
    assert np.all(unpack(dropout_mask(1000, 1e-10, 3), 1000) == 0)


def test_numpy_scalars_accepted():
    a = dropout_mask(np.int32(100), np.float32(0.5), np.uint64(TWO64 - 1), np.int64(3))
    b = dropout_mask(100, 0.5, TWO64 - 1, 3)
    np.testing.assert_array_equal(a, b)


def test_keep_prob_rounded_to_float32_first():
    # 1 + 1e-9 rounds to 1.0 in float32: valid, all kept.
    assert np.all(unpack(dropout_mask(64, 1.0 + 1e-9, 0), 64) == 1)
    # 0.1 and float32(0.1) are the same generator.
    np.testing.assert_array_equal(dropout_mask(500, 0.1, 8),
                                  dropout_mask(500, float(np.float32(0.1)), 8))


def test_masks_nested_in_keep_prob():
    # Same x0, larger threshold: raising keep_prob only turns dropped bits into kept ones.
    lo = unpack(dropout_mask(100_000, 0.3, 11, 2), 100_000)
    hi = unpack(dropout_mask(100_000, 0.7, 11, 2), 100_000)
    assert np.all(hi >= lo)


# ------------------------------------------------------------------------------------------
# Kernel row helpers agree with dropout_mask
# ------------------------------------------------------------------------------------------
ROW_CASES = [
    # (seed, offset, e_start, n)
    (5, 0, 0, 128),
    (5, 0, 3, 13),
    (2**40 + 17, 123, 77, 129),
    (1, 2**64 - 10, 4, 31),          # counters wrap inside the row
    (0xFFFFFFFFFFFFFFFF, 2**32 - 3, 1, 8),
    (42, 0, 1000, 0),
    (42, 9, 1001, 1),
    (42, 9, 1001, 7),
]


@pytest.mark.parametrize("seed, offset, e_start, n", ROW_CASES)
@pytest.mark.parametrize("keep_prob", [0.5, 0.9])
def test_philox_keep_row_matches_dropout_mask(seed, offset, e_start, n, keep_prob):
    numels = e_start + n
    expected = unpack(dropout_mask(numels, keep_prob, seed, offset), numels)[e_start:]
    s_lo, s_hi = split_seed(seed)
    o_lo, o_hi = split_offset(offset)
    thr = keep_threshold(keep_prob)
    out = np.full(n + 5, 7.0, dtype=np.float32)          # sentinel past n must survive
    c_start = _counter_start(o_lo, o_hi, e_start)
    assert int(c_start) == (offset + e_start) % TWO64
    # From Python, c_start must be passed as np.uint64: once an int64 specialisation exists,
    # Numba's dispatcher tries int64 first for a Python int and raises OverflowError >= 2**63.
    _philox_keep_row(s_lo, s_hi, np.uint64(c_start), n, thr, out)
    np.testing.assert_array_equal(out[:n], expected.astype(np.float32))
    assert np.all(out[n:] == 7.0)
    # The same 64 bits as an int64 (two's complement) give the same row.
    out2 = np.zeros(n, dtype=np.float32)
    c_signed = (offset + e_start) % TWO64
    c_signed -= TWO64 * (c_signed >= 2**63)
    _philox_keep_row(s_lo, s_hi, np.int64(c_signed), n, thr, out2)
    np.testing.assert_array_equal(out2, expected.astype(np.float32))


@pytest.mark.parametrize("e_start", [0, 1, 5, 8, 13, 64, 1003])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 128, 131])
def test_mask_keep_row_matches_unpackbits(e_start, n):
    rng = np.random.default_rng(e_start * 1000 + n)
    nbytes = (e_start + n + 7) // 8 + 3
    mask = rng.integers(0, 256, size=nbytes, dtype=np.uint8)
    expected = unpack(mask, nbytes * 8)[e_start:e_start + n].astype(np.float32)
    out = np.full(n + 3, 7.0, dtype=np.float32)
    _mask_keep_row(mask, e_start, n, out)
    np.testing.assert_array_equal(out[:n], expected)
    assert np.all(out[n:] == 7.0)


def test_mask_keep_row_reads_dropout_mask_like_the_generator():
    # The two sources agree bit for bit: mask path on dropout_mask(...) == philox path.
    seed, offset, keep_prob, numels = 2**33 + 1, 2**64 - 500, 0.8, 4000
    mask = dropout_mask(numels, keep_prob, seed, offset)
    s_lo, s_hi = split_seed(seed)
    o_lo, o_hi = split_offset(offset)
    thr = keep_threshold(keep_prob)
    a = np.empty(128, np.float32)
    b = np.empty(128, np.float32)
    for e_start, n in [(0, 128), (3, 100), (517, 128), (numels - 13, 13), (1999, 1)]:
        _mask_keep_row(mask, e_start, n, a)
        _philox_keep_row(s_lo, s_hi, np.uint64(_counter_start(o_lo, o_hi, e_start)), n, thr, b)
        np.testing.assert_array_equal(a[:n], b[:n])


# ------------------------------------------------------------------------------------------
# Chunks and packing
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("o, n", [(1, 100), (3, 1000), (8, 64), (13, 4099), (1000, 777)])
def test_chunk_reproduces_slice(o, n):
    full = unpack(dropout_mask(o + n, 0.6, 31337, 0), o + n)
    chunk = unpack(dropout_mask(n, 0.6, 31337, offset=o), n)
    np.testing.assert_array_equal(chunk, full[o:])


def test_chunk_across_wraparound():
    # offset 2**64 - 5: elements 5.. continue at counter 0, i.e. the offset-0 stream.
    wrapped = unpack(dropout_mask(50, 0.5, 9, TWO64 - 5), 50)
    np.testing.assert_array_equal(wrapped[5:], unpack(dropout_mask(45, 0.5, 9, 0), 45))


@pytest.mark.parametrize("numels", [0, 1, 7, 8, 9, 15, 16, 17, 1001])
def test_packing_length_and_unused_bits(numels):
    m = dropout_mask(numels, 1.0, 1)
    assert m.dtype == np.uint8 and m.ndim == 1 and m.shape == ((numels + 7) // 8,)
    if numels % 8:
        assert m[-1] == (1 << (numels % 8)) - 1        # used bits 1, unused high bits 0
    assert np.all(m[: numels // 8] == 0xFF)
    m = dropout_mask(numels, 0.5, 1)
    if numels % 8:
        assert m[-1] >> (numels % 8) == 0


def test_empty():
    m = dropout_mask(0, 0.5, 1, 5)
    assert m.shape == (0,) and m.dtype == np.uint8


# ------------------------------------------------------------------------------------------
# Statistics (5-sigma bounds; fixed seeds, so the tests are deterministic)
# ------------------------------------------------------------------------------------------
N_STAT = 1_000_000


def _bits(keep_prob, seed, offset=0, n=N_STAT):
    return unpack(dropout_mask(n, keep_prob, seed, offset), n).astype(np.float64)


@pytest.mark.parametrize("keep_prob", [0.1, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("seed", [0, 123456789, 2**63 + 11])
def test_keep_rate(keep_prob, seed):
    p = ref_threshold(keep_prob) / TWO32
    rate = _bits(keep_prob, seed, offset=seed % 1000).mean()
    sigma = math.sqrt(p * (1 - p) / N_STAT)
    assert abs(rate - p) < 5 * sigma, (rate, p, sigma)


def _corr(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


# Under independence sqrt(N) * r is ~ N(0, 1); 5 sigma.
BOUND = 5.0 / math.sqrt(N_STAT)


@pytest.mark.parametrize("keep_prob", [0.1, 0.5, 0.9])
def test_neighbour_bits_uncorrelated(keep_prob):
    x = _bits(keep_prob, 77)
    for lag in (1, 2, 7, 8, 64):
        assert abs(_corr(x[:-lag], x[lag:])) < BOUND, lag


@pytest.mark.parametrize("seed_a, seed_b", [(0, 1), (5, 5 + TWO32), (2**64 - 1, 2**64 - 2)])
def test_different_seeds_uncorrelated(seed_a, seed_b):
    assert abs(_corr(_bits(0.5, seed_a), _bits(0.5, seed_b))) < BOUND


@pytest.mark.parametrize("off_a, off_b", [(0, 1), (1, 2), (0, TWO32)])
def test_offset_streams_uncorrelated(off_a, off_b):
    # (0, 2**32): counters differ only in the high word.
    assert abs(_corr(_bits(0.5, 4242, off_a), _bits(0.5, 4242, off_b))) < BOUND


# ------------------------------------------------------------------------------------------
# Helpers and validation
# ------------------------------------------------------------------------------------------
def test_keep_threshold_values():
    assert keep_threshold(1.0) == TWO32
    assert keep_threshold(0.5) == TWO32 // 2
    assert keep_threshold(0.1) == ref_threshold(0.1)
    assert keep_threshold(2.0**-9) == 2**23
    assert keep_threshold(1e-10) == 0
    assert keep_threshold(np.float32(0.999)) == ref_threshold(0.999)


def test_split_seed_and_offset():
    assert split_seed(0) == (0, 0)
    assert split_seed(TWO64 - 1) == (TWO32 - 1, TWO32 - 1)
    assert split_seed(np.uint64(0x0123456789ABCDEF)) == (0x89ABCDEF, 0x01234567)
    assert split_offset(TWO32) == (0, 1)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(numels=1.0), FagTypeError, r"numels must be an int, got float"),
    (dict(numels=True), FagTypeError, r"numels must be an int, got bool"),
    (dict(numels="8"), FagTypeError, r"numels must be an int, got str"),
    (dict(numels=-1), FagValueError, r"numels must be >= 0, got -1"),
    (dict(numels=2**63), FagValueError, r"numels must be < 2\*\*63"),
    (dict(keep_prob="0.5"), FagTypeError, r"keep_prob must be a real number.*got str"),
    (dict(keep_prob=True), FagTypeError, r"keep_prob must be a real number.*got bool"),
    (dict(keep_prob=None), FagTypeError, r"keep_prob must be a real number.*got NoneType"),
    (dict(keep_prob=1.5), FagValueError,
     r"dropout_mask: keep_prob must be in \(0, 1\] after rounding to float32, got 1\.5"),
    (dict(keep_prob=0.0), FagValueError, r"keep_prob must be in \(0, 1\].*got 0\.0"),
    (dict(keep_prob=-0.2), FagValueError, r"keep_prob must be in \(0, 1\].*got -0\.2"),
    (dict(keep_prob=float("nan")), FagValueError, r"keep_prob must be in \(0, 1\].*got nan"),
    (dict(keep_prob=1e300), FagValueError, r"keep_prob must be in \(0, 1\].*float32: inf"),
    (dict(keep_prob=1e-50), FagValueError, r"keep_prob must be in \(0, 1\].*float32: 0\.0"),
    (dict(seed=1.0), FagTypeError, r"seed must be an int in \[0, 2\*\*64\), got float"),
    (dict(seed=False), FagTypeError, r"seed must be an int.*got bool"),
    (dict(seed=None), FagTypeError, r"seed must be an int.*got NoneType"),
    (dict(seed=-1), FagValueError, r"seed must be in \[0, 2\*\*64\), got -1"),
    (dict(seed=TWO64), FagValueError, r"seed must be in \[0, 2\*\*64\), got 18446744073709551616"),
    (dict(offset=2.0), FagTypeError, r"offset must be an int.*got float"),
    (dict(offset=True), FagTypeError, r"offset must be an int.*got bool"),
    (dict(offset=-5), FagValueError, r"offset must be in \[0, 2\*\*64\), got -5"),
    (dict(offset=TWO64), FagValueError, r"offset must be in \[0, 2\*\*64\)"),
])
def test_dropout_mask_validation(kwargs, exc, match):
    args = dict(numels=16, keep_prob=0.5, seed=1, offset=0)
    args.update(kwargs)
    with pytest.raises(exc, match=match) as info:
        dropout_mask(**args)
    assert isinstance(info.value, FagError)
    assert str(info.value).startswith("dropout_mask: ")


def test_error_classes_are_builtin_subclasses():
    with pytest.raises(ValueError):
        dropout_mask(-1, 0.5, 0)
    with pytest.raises(TypeError):
        dropout_mask(1.5, 0.5, 0)


@pytest.mark.parametrize("fn, arg, exc, match", [
    (keep_threshold, 0.0, FagValueError, r"keep_threshold: keep_prob must be in \(0, 1\]"),
    (keep_threshold, 2, FagValueError, r"keep_threshold: keep_prob must be in \(0, 1\].*got 2"),
    (keep_threshold, "x", FagTypeError, r"keep_threshold: keep_prob must be a real number"),
    (split_seed, -1, FagValueError, r"split_seed: seed must be in \[0, 2\*\*64\), got -1"),
    (split_seed, 1.0, FagTypeError, r"split_seed: seed must be an int"),
    (split_offset, TWO64, FagValueError, r"split_offset: offset must be in \[0, 2\*\*64\)"),
    (split_offset, True, FagTypeError, r"split_offset: offset must be an int"),
])
def test_helper_validation(fn, arg, exc, match):
    with pytest.raises(exc, match=match):
        fn(arg)
