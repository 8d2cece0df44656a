"""Host float32 <-> bfloat16 / float16 conversions (``fag_numba/kernels/convert.py`` and the
``dtypes`` functions using them) against ``astype`` (ml_dtypes for bfloat16, numpy for float16),
compared on the bit patterns: every fp16/bf16 pattern up-converted, float32 special values,
rounding ties and overflow / denormal boundaries down-converted, random bit patterns, tails,
empty and non-contiguous arrays, read-only inputs, the threaded path, the no-F16C fallback.

Under ``NUMBA_DISABLE_JIT=1`` (the coverage lane) the ``dtypes`` functions fall back to
``astype``; the fp16 kernels (``@intrinsic`` IR) cannot run there and are skipped, the bf16
loops run as Python on the smaller cases.
"""
from __future__ import annotations

import sys
import warnings

import ml_dtypes
import numba
import numpy as np
import pytest

import fag_numba
from fag_numba import config, dtypes, isa
from fag_numba.kernels import convert

F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
HALVES = (BF16, F16)
NOJIT = numba.config.DISABLE_JIT
needs_jit = pytest.mark.skipif(NOJIT, reason="intrinsic kernels need the JIT")
needs_f16c = pytest.mark.skipif(NOJIT or not isa.target_has("f16c"),
                                reason="the fp16 kernels need the JIT and F16C")

# the kernels, by direction and dtype: (kernel, source view dtype, destination view dtype)
DOWN = {BF16: (convert.bf16_from_f32, np.uint32), F16: (convert.f16_from_f32, np.float32)}
UP = {BF16: convert.f32_from_bf16, F16: convert.f32_from_f16}


def astype(x, dtype):
    """The reference conversion (numpy warns on NaN / overflow casts; the kernels do not)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(x).astype(dtype)


def bits(a):
    """The bit patterns of a float array (uint16 / uint32), for bitwise comparison."""
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bits_equal(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    bad = np.flatnonzero(bits(got).ravel() != bits(want).ravel())
    assert bad.size == 0, (f"{bad.size} differ, first at {bad[:4]}: got "
                           f"{[hex(v) for v in bits(got).ravel()[bad[:4]]]} want "
                           f"{[hex(v) for v in bits(want).ravel()[bad[:4]]]}")


def all_patterns(dtype):
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype)


def special_f32():
    """float32 bit patterns at every place the conversions can go wrong."""
    u = [0x00000000, 0x7f800000, 0x7f7fffff, 0x00000001, 0x007fffff, 0x00800000,
         0x7f800001, 0x7fbfffff, 0x7fc00000, 0x7fffffff, 0x7f802000, 0x7f801fff, 0x7fa00000,
         0x7fc00001, 0x7f810000, 0x7f808000, 0x7fe12345]
    # fp16: largest finite 65504 (0x477fe000), the overflow tie 65520 (0x477ff000), the
    # smallest denormal 2**-24 (0x33800000) and its half 2**-25 (0x33000000, a tie to 0), the
    # smallest normal 2**-14 (0x38800000), the denormal/normal tie just below it
    for c in (0x477fe000, 0x477ff000, 0x33800000, 0x33000000, 0x38800000, 0x387fe000,
              0x387ff000, 0x32800000, 0x33400000, 0x33c00000):
        u += [c - 1, c, c + 1]
    # bf16: the overflow tie 0x7f7f8000, odd / even kept lsb with exact ties and +-1
    for c in (0x7f7f8000, 0x3f808000, 0x3f818000, 0x00008000, 0x00018000, 0x00800000):
        u += [c - 1, c, c + 1]
    u = np.array(u, np.uint32)
    return np.concatenate([u, u | np.uint32(0x80000000)])


def sweep_f32(per_exponent):
    """Both signs x every exponent x ``per_exponent`` mantissas: the extremes, the rounding
    ties of both formats (low 16 bits 0x8000, low 13 bits 0x1000) with +-1, and random ones."""
    rng = np.random.default_rng(7)
    m = [0, 1, 0x7fffff, 0x7fffff - 1, 0x8000, 0x7fff, 0x8001, 0x18000, 0x1000, 0xfff, 0x1001,
         0x3000, 0x400000, 0x400001, 0x200000]
    ties = rng.integers(0, 1 << 7, per_exponent // 4).astype(np.uint32) << 16
    ties16 = rng.integers(0, 1 << 10, per_exponent // 4).astype(np.uint32) << 13
    m = np.concatenate([np.array(m, np.uint32), ties | 0x8000, (ties | 0x8000) - 1,
                        ties16 | 0x1000, (ties16 | 0x1000) + 1,
                        rng.integers(0, 1 << 23, per_exponent // 4).astype(np.uint32)])
    e = np.arange(256, dtype=np.uint32) << 23
    u = (e[:, None] | m[None, :]).ravel()
    return np.concatenate([u, u | np.uint32(0x80000000)])


def random_f32(n, seed=3):
    return np.random.default_rng(seed).integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)


# ------------------------------------------------------------------ the public host functions

@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_every_pattern_up(dtype):
    x = all_patterns(dtype)
    want = astype(x, F32)
    assert_bits_equal(convert.to_f32(x), want)
    assert_bits_equal(dtypes.to_f32_flat(x), want)
    assert_bits_equal(dtypes.cast(x, F32), want)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("case", ["special", "sweep", "random"])
def test_down_bitwise(dtype, case):
    u = {"special": special_f32, "sweep": lambda: sweep_f32(64 if NOJIT else 4096),
         "random": lambda: random_f32(1 << 12 if NOJIT else 1 << 20)}[case]()
    x = u.view(np.float32)
    want = astype(x, dtype)
    assert_bits_equal(convert.from_f32(x, dtype), want)
    assert_bits_equal(dtypes.from_f32(x, x.shape, dtype), want)
    assert_bits_equal(dtypes.cast(x, dtype), want)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_roundtrip_every_pattern(dtype):
    """fp16/bf16 -> float32 -> fp16/bf16 gives the bits back (NaN: as astype does)."""
    x = all_patterns(dtype)
    assert_bits_equal(dtypes.from_f32(dtypes.to_f32_flat(x), x.shape, dtype),
                      astype(astype(x, F32), dtype))


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 7, 15, 16, 17, 31, 33, 63, 64, 65, 129, 1000])
def test_lengths_and_offsets(dtype, n):
    """Tails of every length, and sources starting at an odd element (unaligned loads)."""
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n + 3) * 1e3).astype(np.float32)[3:]
    assert_bits_equal(convert.from_f32(x, dtype), astype(x, dtype))
    h = astype(x, dtype)
    hs = np.concatenate([h[:1], h])[1:]                  # an odd start in a fresh buffer
    assert_bits_equal(convert.to_f32(hs), astype(hs, F32))


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (2, 0, 3), (0, 4)])
def test_empty(dtype, shape):
    x = np.zeros(shape, np.float32)
    y = dtypes.from_f32(x.reshape(-1), shape, dtype)
    assert y.dtype == dtype and y.shape == shape
    z = dtypes.to_f32_flat(np.zeros(shape, dtype))
    assert z.dtype == F32 and z.shape == (0,)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_shapes_strides_readonly_unmodified(dtype):
    """Non-contiguous and read-only inputs; the result has the shape and values of astype and
    the input is left as it was."""
    rng = np.random.default_rng(11)
    base = rng.standard_normal((3, 40, 6)).astype(np.float32)
    views = [base.transpose(2, 0, 1), base[:, ::3, 1:], base[::-1]]
    for v in views:
        keep = v.copy()
        assert_bits_equal(dtypes.cast(v, dtype), astype(v, dtype))
        assert np.array_equal(v, keep)
        h = astype(keep, dtype)
        hv = h.transpose(1, 0, 2)[::2]
        hkeep = hv.copy()
        assert_bits_equal(dtypes.to_f32_flat(hv), astype(hv, F32).ravel())
        assert_bits_equal(dtypes.cast(hv, F32), astype(hv, F32))
        assert_bits_equal(hv, hkeep)
    ro = astype(base, dtype)
    ro.flags.writeable = False
    out = dtypes.to_f32_flat(ro)
    assert out.flags.writeable and out.flags.c_contiguous
    assert_bits_equal(out, astype(ro, F32).ravel())
    ro32 = base.copy()
    ro32.flags.writeable = False
    assert_bits_equal(dtypes.cast(ro32, dtype), astype(base, dtype))


def test_float32_paths_do_not_copy():
    x = np.arange(12, dtype=np.float32)
    assert np.shares_memory(dtypes.to_f32_flat(x), x)
    assert np.shares_memory(dtypes.from_f32(x, (3, 4), F32), x)
    assert dtypes.cast(x, F32) is x


def test_other_dtypes_go_to_astype():
    x = np.arange(5, dtype=np.float64) / 3
    assert_bits_equal(dtypes.cast(x, F32), x.astype(F32))
    assert_bits_equal(dtypes.cast(x.astype(F32), np.float64), x.astype(F32).astype(np.float64))
    e4 = np.dtype(ml_dtypes.float8_e4m3fn)
    assert_bits_equal(dtypes.cast(x.astype(F32), e4), x.astype(F32).astype(e4))


# ------------------------------------------------------------------ the kernels themselves

def _run_down(dtype, x, lo, hi, dst):
    kernel, view = DOWN[dtype]
    kernel(x.view(view), dst, lo, hi)


@pytest.mark.parametrize("dtype", [BF16, pytest.param(F16, marks=needs_f16c)], ids=str)
def test_kernels_write_only_their_range(dtype):
    """``lo <= i < hi`` only: the chunks of two threads share the arrays."""
    x = special_f32().view(np.float32)
    x = np.concatenate([x, x[::-1]])
    h = astype(x, dtype)
    for lo, hi in [(0, x.size), (5, 5), (3, 40), (17, 18), (16, 48), (1, x.size - 1)]:
        dst = np.full(x.size, 0xBEEF, np.uint16)
        _run_down(dtype, x, lo, hi, dst)
        assert np.array_equal(dst[lo:hi], bits(h)[lo:hi])
        assert (dst[:lo] == 0xBEEF).all() and (dst[hi:] == 0xBEEF).all()
        up = np.full(x.size, 0xDEADBEEF, np.uint32)
        UP[dtype](bits(h), up, lo, hi)
        assert np.array_equal(up[lo:hi], bits(astype(h, F32))[lo:hi])
        assert (up[:lo] == 0xDEADBEEF).all() and (up[hi:] == 0xDEADBEEF).all()


@needs_jit
@pytest.mark.parametrize("dtype", [BF16, pytest.param(F16, marks=needs_f16c)], ids=str)
def test_kernels_every_pattern(dtype):
    """The kernels directly (the host functions could fall back to astype unnoticed)."""
    h = all_patterns(dtype)
    up = np.empty(h.size, np.uint32)
    UP[dtype](bits(h), up, 0, h.size)
    assert np.array_equal(up, bits(astype(h, F32)))
    x = np.concatenate([special_f32(), sweep_f32(1024), random_f32(1 << 16)]).view(np.float32)
    dst = np.empty(x.size, np.uint16)
    _run_down(dtype, x, 0, x.size, dst)
    assert np.array_equal(dst, bits(astype(x, dtype)))


@pytest.mark.parametrize("dtype", [BF16, pytest.param(F16, marks=needs_f16c)], ids=str)
@pytest.mark.parametrize("nchunks", [2, 3, 7])
def test_chunks_equal_serial(dtype, nchunks):
    """Every chunk split gives the serial result (lengths not a multiple of the alignment)."""
    from fag_numba.threads import run_chunks
    n = 5 * convert._ALIGN + 13 if NOJIT else 40 * convert._ALIGN + 13
    x = random_f32(n, seed=nchunks).view(np.float32)
    chunk = {BF16: convert._BF16_FROM_F32, F16: convert._F16_FROM_F32}[dtype]
    src = x.view(np.uint32) if dtype == BF16 else x
    out = np.full(n, 0xBEEF, np.uint16)
    run_chunks(chunk, nchunks, (src, out, nchunks))
    assert np.array_equal(out, bits(astype(x, dtype)))
    up = np.full(n, 0xDEADBEEF, np.uint32)
    chunk = {BF16: convert._F32_FROM_BF16, F16: convert._F32_FROM_F16}[dtype]
    run_chunks(chunk, nchunks, (out, up, nchunks))
    assert np.array_equal(up, bits(astype(out.view(dtype), F32)))


@needs_jit
@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 threads")
@pytest.mark.parametrize("dtype", [BF16, pytest.param(F16, marks=needs_f16c)], ids=str)
def test_threaded_path_taken_and_equal(dtype, monkeypatch):
    """Above CONVERT_THREAD_MIN the host functions split across threads (spied), bitwise the
    serial result."""
    seen = []
    real = convert._run

    def spy(chunk, src, dst):
        seen.append(src.size)
        real(chunk, src, dst)

    T = sys.modules["fag_numba.threads"]         # (fag_numba.threads is the context manager)
    calls = []
    real_rc = T.run_chunks

    def rc(kernel, n, args):
        calls.append(n)
        real_rc(kernel, n, args)

    monkeypatch.setattr(convert, "_run", spy)
    monkeypatch.setattr(T, "run_chunks", rc)
    x = random_f32(10_000).view(np.float32)
    serial = convert.from_f32(x, dtype), convert.to_f32(astype(x, dtype))
    assert calls == [] and len(seen) == 2            # below the threshold: no hand-off
    monkeypatch.setattr(config, "CONVERT_THREAD_MIN", 100)
    with fag_numba.threads(2):
        par = convert.from_f32(x, dtype), convert.to_f32(astype(x, dtype))
    assert calls == [2, 2] and len(seen) == 4
    for a, b in zip(serial, par):
        assert_bits_equal(a, b)
    assert_bits_equal(par[0], astype(x, dtype))


@needs_jit
def test_no_f16c_falls_back_to_astype(monkeypatch):
    """Where numba's target lacks F16C the fp16 kernels are never called (compiling them
    there would leave an unlinked libcall), and the result is still astype's."""
    def boom(*a):
        raise AssertionError("fp16 kernel used without F16C")

    monkeypatch.setattr(isa, "target_has", lambda *names: "f16c" not in names)
    monkeypatch.setattr(convert, "_F16_FROM_F32", boom)
    monkeypatch.setattr(convert, "_F32_FROM_F16", boom)
    x = special_f32().view(np.float32)
    assert_bits_equal(dtypes.cast(x, F16), astype(x, F16))
    h = all_patterns(F16)
    assert_bits_equal(dtypes.to_f32_flat(h), astype(h, F32))
    # bf16 needs no F16C: its kernels still run (the spy below would raise otherwise)
    monkeypatch.setattr(convert, "_BF16_FROM_F32", boom)
    with pytest.raises(AssertionError, match="without F16C"):
        dtypes.cast(x, BF16)


def test_disable_jit_uses_astype(monkeypatch):
    """NUMBA_DISABLE_JIT=1: no kernel is called (the fp16 ones are intrinsics)."""
    def boom(*a):
        raise AssertionError("kernel called under NUMBA_DISABLE_JIT")

    monkeypatch.setattr(numba.core.config, "DISABLE_JIT", True)
    for name in ("_BF16_FROM_F32", "_F16_FROM_F32", "_F32_FROM_BF16", "_F32_FROM_F16"):
        monkeypatch.setattr(convert, name, boom)
    x = special_f32().view(np.float32)
    for dt in HALVES:
        assert_bits_equal(dtypes.cast(x, dt), astype(x, dt))
        assert_bits_equal(dtypes.to_f32_flat(all_patterns(dt)), astype(all_patterns(dt), F32))
