"""Dropout keep bits: fag_numba's counter-based generator and the ``drop_mask`` reader (SPEC §5).

When dropout is active (``keep_prob`` rounded to float32 is < 1), every score element of the
attention gets one keep bit ``R``.  The bits come either from a user ``drop_mask`` (a packed bit
stream) or from the generator below, evaluated inside the kernels tile by tile, so that no
O(S1*S2) mask ever exists.  :func:`dropout_mask` returns the generator's bits packed exactly like a
``drop_mask``, so both paths agree bit for bit.

Bit definition (normative; enough to reproduce the bits in any language)
------------------------------------------------------------------------
Inputs: the element index ``e`` (a 0-based integer, SPEC §5: ``e = ((b*N1 + h)*S1 + i)*S2 + j``,
local to the call; TND: per-sequence blocks concatenated), ``seed`` and ``offset`` (integers in
``[0, 2**64)``) and ``keep_prob``.

1. ``kp = float32(keep_prob)`` (round to nearest even); it must lie in ``(0, 1]``.
2. ``threshold = floor(kp * 2**32)``, computed exactly (``kp`` is a float32, so ``kp * 2**32`` is
   exact in float64).  ``0 <= threshold <= 2**32``; it is **not** clamped: ``kp == 1`` gives
   ``threshold == 2**32`` and every element is kept.
3. ``c = (offset + e) mod 2**64``  (the 64-bit counter; it wraps around).
4. ``(x0, x1, x2, x3) = Philox4x32_10(counter=(c mod 2**32, c >> 32, 0, 0),
   key=(seed mod 2**32, seed >> 32))`` -- the Philox-4x32 generator with 10 rounds of
   Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3" (SC'11), exactly
   as in the Random123 library (``philox4x32_R(10, ctr, key)``).  One round maps
   ``(c0, c1, c2, c3)`` with key ``(k0, k1)`` to::

       p0 = 0xD2511F53 * c0            (full 64-bit product)
       p1 = 0xCD9E8D57 * c2
       (hi(p1) ^ c1 ^ k0,  lo(p1),  hi(p0) ^ c3 ^ k1,  lo(p0))

   where ``hi``/``lo`` are the upper/lower 32 bits; between rounds the key is bumped:
   ``k0 += 0x9E3779B9``, ``k1 += 0xBB67AE85`` (mod 2**32).  Ten rounds, nine bumps.
5. Element ``e`` is **kept** iff ``x0 < threshold`` (only output word 0 is used).

So a bit is a function of ``(seed, offset + e, keep_prob)`` only: a chunk of the element stream
called with its own ``offset = o`` reproduces bits ``o .. o+n-1`` of the stream of offset 0
(mod 2**64), anywhere.

Consequences a user should know:

- The keep probability realised is ``threshold / 2**32``, which equals ``kp`` exactly whenever
  ``kp >= 2**-9``, so ``E[R / kp] == 1`` exactly there (no bias).  For ``kp < 2**-9`` it is
  ``kp`` rounded down to a multiple of ``2**-32`` (``kp < 2**-32`` keeps nothing).
- Increasing ``keep_prob`` only ever turns dropped bits into kept bits (same ``x0``, larger
  threshold): the masks of one ``(seed, offset)`` are nested in ``keep_prob``.
- The bits are fag_numba's own; they are **not** the bits of the Ascend NPU's generator (its
  algorithm and counter layout are not public), only the same contract (SPEC §5).

Why one Philox call per element, word 0 only: the definition stays one line per step, any
element is addressable on its own (tiles start anywhere), and the row helper below is a simple
loop that LLVM vectorises (AVX-512 ``vpmuludq``); measured ~1.4 ns per element for a 128-wide
tile row, small next to the ~10*D flops the backward spends on each element.

``drop_mask`` bit stream (SPEC §5): element ``e`` is kept iff
``(drop_mask.flat[e >> 3] >> (e & 7)) & 1`` (least significant bit first), i.e.
``np.packbits(keep, bitorder="little")``.

Layers
------
- ``_philox4x32_10`` (njit, ``inline="always"``): the block function on uint64 scalars holding
  32-bit values.  ``_philox4x32_10_py``: the same in plain Python ints (the tests' independent
  second implementation).
- ``_counter_start``, ``_philox_keep_row``, ``_mask_keep_row`` (serial njit): what the kernels call
  once per tile row; no allocation, no branching on ``None``/strings.
- ``keep_threshold``, ``split_seed``, ``split_offset`` (pure Python): validate and convert the
  API arguments into the plain integers the kernels take.
- ``dropout_mask`` (public): the packed bits, built byte by byte by ``_dropout_mask_packed``.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import _jit, memory
from .errors import FagTypeError, FagValueError
from .validation import is_int

__all__ = ["dropout_mask", "keep_threshold", "split_seed", "split_offset"]

# Numba policy (STYLE b4): serial kernels through the package's ``_jit.kernel`` (nogil, numpy
# error model, the curated fastmath set, which changes nothing in this integer code).


def _njit(**extra):
    """The package's serial-kernel decorator (``_jit.kernel``) plus ``extra``."""
    return _jit.kernel(**extra)


# ---- Philox-4x32-10 constants (Random123 philox.h: PHILOX_M4x32_0/1, PHILOX_W32_0/1) ----
# All njit arithmetic is done in uint64 and masked to 32 bits.  The constants are np.uint64
# globals on purpose: Numba freezes globals as typed constants, and mixing uint64 with an int64
# literal would silently promote to float64 (losing bits).
_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_LO32 = np.uint64(0xFFFFFFFF)
_SH32 = np.uint64(32)
_U0 = np.uint64(0)
_U1 = np.uint64(1)

_TWO32 = 1 << 32
_TWO64 = 1 << 64
_PHILOX_ROUNDS = 10


# ------------------------------------------------------------------------------------------
# The block function
# ------------------------------------------------------------------------------------------
@_njit(inline="always")
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 block function (Salmon et al., SC'11; Random123 ``philox4x32_R(10, ...)``).

    Parameters
    ----------
    c0, c1, c2, c3 : uint64
        Counter words, each holding a value in ``[0, 2**32)``.
    k0, k1 : uint64
        Key words, each in ``[0, 2**32)``.

    Returns
    -------
    x0, x1, x2, x3 : uint64
        The four output words, each in ``[0, 2**32)``.

    Notes
    -----
    Inputs must already be uint64 and < 2**32 (callers mask); the 32x32->64 products are then
    exact in uint64 and LLVM lowers them to ``vpmuludq`` when the calling loop vectorises.
    Dead output words are removed by LLVM after inlining, so callers that need only ``x0`` pay
    only for the dependency chain of ``x0``.
    """
    for _ in range(10):
        # (c0, c1, c2, c3) <- (hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0))
        p0 = _M0 * c0
        p1 = _M1 * c2
        n0 = (p1 >> _SH32) ^ c1 ^ k0
        n2 = (p0 >> _SH32) ^ c3 ^ k1
        c1 = p1 & _LO32
        c3 = p0 & _LO32
        c0 = n0
        c2 = n2
        # Key schedule (Weyl sequence).  Random123 bumps before rounds 2..10; the extra bump
        # after round 10 here is dead code and does not change the outputs.
        k0 = (k0 + _W0) & _LO32
        k1 = (k1 + _W1) & _LO32
    return c0, c1, c2, c3


def _philox4x32_10_py(counter4, key2):
    """Philox-4x32-10 in plain Python integers: an independent second implementation.

    Parameters
    ----------
    counter4 : sequence of 4 int
        Counter words ``(c0, c1, c2, c3)``, each in ``[0, 2**32)``.
    key2 : sequence of 2 int
        Key words ``(k0, k1)``, each in ``[0, 2**32)``.

    Returns
    -------
    tuple of 4 int
        Output words ``(x0, x1, x2, x3)``, each in ``[0, 2**32)``.

    Notes
    -----
    Written straight from the paper's round function with Random123's key schedule (bump before
    every round but the first), without any of the njit version's tricks, so the tests can
    check one against the other and both against the Random123 known-answer vectors.
    """
    m = 0xFFFFFFFF
    c0, c1, c2, c3 = (int(w) & m for w in counter4)
    k0, k1 = (int(w) & m for w in key2)
    for r in range(_PHILOX_ROUNDS):
        if r > 0:
            k0 = (k0 + 0x9E3779B9) & m
            k1 = (k1 + 0xBB67AE85) & m
        prod0 = 0xD2511F53 * c0
        prod1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((prod1 >> 32) ^ c1 ^ k0, prod1 & m,
                          (prod0 >> 32) ^ c3 ^ k1, prod0 & m)
    return c0, c1, c2, c3


# ------------------------------------------------------------------------------------------
# Kernel helpers (serial njit; called once per tile row)
# ------------------------------------------------------------------------------------------
@_njit(inline="always")
def _counter_start(offset_lo, offset_hi, e_start):
    """Counter of element ``e_start``: ``(offset + e_start) mod 2**64`` as a uint64.

    Parameters
    ----------
    offset_lo, offset_hi : int64 or uint64
        The two 32-bit halves of ``offset`` (:func:`split_offset`), each in ``[0, 2**32)``.
    e_start : int64
        Element index (>= 0).

    Returns
    -------
    uint64
        ``c_start`` for :func:`_philox_keep_row`.

    Notes
    -----
    Exists because ``uint64 + int64`` in Numba is float64 (53 bits): building the counter by
    hand in a kernel is an easy way to lose bits.  Here every operand is converted to uint64
    first, so the sum wraps modulo 2**64 exactly.
    """
    off = (np.uint64(offset_hi) << _SH32) | (np.uint64(offset_lo) & _LO32)
    return off + np.uint64(e_start)


@_njit()
def _philox_keep_row(seed_lo, seed_hi, c_start, n, threshold, out):
    """Generator keep bits of ``n`` consecutive elements: ``out[k] = R(c_start + k)``.

    Parameters
    ----------
    seed_lo, seed_hi : int64 or uint64
        The 32-bit halves of ``seed`` (:func:`split_seed`), each in ``[0, 2**32)``.
    c_start : uint64
        Counter of element 0 of the row, ``(offset + e_start) mod 2**64``
        (:func:`_counter_start`).  An int64 holding the same 64 bits is accepted too.  Do not
        pass a float: it would have lost bits already.  From Python, pass ``np.uint64(c)``, not
        a Python int (Numba's dispatcher may try int64 first and raise ``OverflowError``).
    n : int
        Number of elements, ``0 <= n <= out.shape[0]``.
    threshold : int64 or uint64
        :func:`keep_threshold` of ``keep_prob``, in ``[0, 2**32]``.
    out : ndarray, shape (>= n,), float32
        Receives ``1.0`` (kept) or ``0.0`` (dropped) in ``out[:n]``; the rest is untouched.

    Notes
    -----
    Counter ``c_start + k`` wraps modulo 2**64.  No allocation; the loop has no data-dependent
    branch, so LLVM vectorises the ten Philox rounds across ``k`` (about 1.4 ns per element on
    AVX-512 at n = 128).
    """
    k0 = np.uint64(seed_lo) & _LO32
    k1 = np.uint64(seed_hi) & _LO32
    c0 = np.uint64(c_start)
    thr = np.uint64(threshold)
    for k in range(n):
        c = c0 + np.uint64(k)
        x0, _x1, _x2, _x3 = _philox4x32_10(c & _LO32, c >> _SH32, _U0, _U0, k0, k1)
        out[k] = np.float32(1.0) if x0 < thr else np.float32(0.0)


@_njit()
def _mask_keep_row(drop_mask, e_start, n, out):
    """User ``drop_mask`` keep bits of ``n`` consecutive elements: ``out[k] = bit(e_start + k)``.

    Parameters
    ----------
    drop_mask : ndarray, shape (nbytes,), uint8
        The flat packed mask (``drop_mask.reshape(-1)``), least significant bit first.
    e_start : int64
        Element index of ``out[0]``; the caller guarantees ``ceil((e_start + n) / 8) <= nbytes``.
    n : int
        Number of elements, ``0 <= n <= out.shape[0]``.
    out : ndarray, shape (>= n,), float32
        Receives ``1.0`` (kept) or ``0.0`` (dropped) in ``out[:n]``; the rest is untouched.

    Notes
    -----
    ``out[k] = (drop_mask[(e_start + k) >> 3] >> ((e_start + k) & 7)) & 1`` (SPEC §5).
    Whole bytes are expanded eight bits at a time (no per-bit byte index) once the stream is
    byte aligned; the unaligned head is done bit by bit.
    """
    e = np.int64(e_start)
    k = 0
    # Head: bits up to the next byte boundary.
    while k < n and (e + k) & 7 != 0:
        ee = e + k
        out[k] = np.float32((drop_mask[ee >> 3] >> (ee & 7)) & 1)
        k += 1
    # Body: whole bytes; the inner 8-loop is unrolled by LLVM.
    byte = (e + k) >> 3
    while k + 8 <= n:
        v = drop_mask[byte]
        for t in range(8):
            out[k + t] = np.float32((v >> t) & 1)
        byte += 1
        k += 8
    # Tail: fewer than 8 bits left, starting at a byte boundary.
    if k < n:
        v = drop_mask[byte]
        t = 0
        while k < n:
            out[k] = np.float32((v >> t) & 1)
            t += 1
            k += 1


@_njit()
def _dropout_mask_packed(seed_lo, seed_hi, c_start, numels, threshold, out):
    """Pack the generator bits of elements ``0 .. numels-1`` into ``out`` (LSB first).

    Parameters
    ----------
    seed_lo, seed_hi : int64 or uint64
        The 32-bit halves of ``seed``.
    c_start : uint64
        Counter of element 0, i.e. ``offset``.
    numels : int64
        Number of elements (>= 0).
    threshold : int64 or uint64
        Keep threshold in ``[0, 2**32]``.
    out : ndarray, shape (ceil(numels / 8),), uint8
        Receives the packed bits; unused high bits of the last byte are set to 0.

    Notes
    -----
    Builds each byte from its eight bits directly (no bool array of ``numels``); the 8 Philox
    evaluations of a byte are independent, so LLVM vectorises them.
    """
    k0 = np.uint64(seed_lo) & _LO32
    k1 = np.uint64(seed_hi) & _LO32
    c0 = np.uint64(c_start)
    thr = np.uint64(threshold)
    nfull = numels >> 3
    for byte in range(nfull):
        cb = c0 + (np.uint64(byte) << np.uint64(3))
        v = _U0
        for t in range(8):
            c = cb + np.uint64(t)
            x0, _x1, _x2, _x3 = _philox4x32_10(c & _LO32, c >> _SH32, _U0, _U0, k0, k1)
            v |= (_U1 if x0 < thr else _U0) << np.uint64(t)
        out[byte] = np.uint8(v)
    rem = numels - (nfull << 3)
    if rem > 0:
        cb = c0 + (np.uint64(nfull) << np.uint64(3))
        v = _U0
        for t in range(rem):
            c = cb + np.uint64(t)
            x0, _x1, _x2, _x3 = _philox4x32_10(c & _LO32, c >> _SH32, _U0, _U0, k0, k1)
            v |= (_U1 if x0 < thr else _U0) << np.uint64(t)
        out[nfull] = np.uint8(v)


# ------------------------------------------------------------------------------------------
# Argument checks and conversions (pure Python)
# ------------------------------------------------------------------------------------------
def _type_name(x) -> str:
    """Type name for error messages (``float``, ``NoneType``, ``str``...)."""
    return type(x).__name__


def _check_u64(value, name: str, caller: str) -> int:
    """Validate an int in ``[0, 2**64)`` and return it as a Python int."""
    if not is_int(value):
        raise FagTypeError(
            f"{caller}: {name} must be an int in [0, 2**64), got {_type_name(value)} ({value!r})")
    v = int(value)
    if not 0 <= v < _TWO64:
        raise FagValueError(f"{caller}: {name} must be in [0, 2**64), got {v}")
    return v


def _check_keep_prob(keep_prob, caller: str) -> np.float32:
    """Validate ``keep_prob`` (a real number, not bool) and return it rounded to float32."""
    if isinstance(keep_prob, (bool, np.bool_)) or not isinstance(
            keep_prob, (numbers.Real, np.integer, np.floating)):
        raise FagTypeError(
            f"{caller}: keep_prob must be a real number (int or float), got "
            f"{_type_name(keep_prob)} ({keep_prob!r})")
    with np.errstate(over="ignore"):  # 1e300 -> inf, rejected below with its own message
        kp = np.float32(keep_prob)
    if not (0.0 < kp <= 1.0):  # also rejects NaN
        raise FagValueError(
            f"{caller}: keep_prob must be in (0, 1] after rounding to float32, got {keep_prob}"
            + ("" if float(kp) == keep_prob else f" (float32: {float(kp)!r})"))
    return kp


def _threshold_of(kp: np.float32) -> int:
    """``floor(kp * 2**32)`` for an already validated float32 ``kp``."""
    # float32 -> float64 is exact, and so is multiplying by a power of two; floor is then exact.
    return math.floor(float(kp) * _TWO32)


def keep_threshold(keep_prob) -> int:
    """Keep threshold of the generator: ``floor(float32(keep_prob) * 2**32)``.

    Parameters
    ----------
    keep_prob : float
        Probability of keeping an element; rounded to float32, it must lie in ``(0, 1]``.

    Returns
    -------
    int
        ``threshold`` in ``[0, 2**32]``; an element is kept iff its Philox word ``x0 <
        threshold``.  ``keep_prob == 1`` gives ``2**32`` (all kept; deliberately not clamped to
        ``2**32 - 1``, which would drop the elements whose ``x0`` is ``0xFFFFFFFF``).

    Raises
    ------
    FagTypeError
        ``keep_prob`` is not a real number (bool is rejected).
    FagValueError
        ``float32(keep_prob)`` is outside ``(0, 1]`` or NaN.
    """
    return _threshold_of(_check_keep_prob(keep_prob, "keep_threshold"))


def split_seed(seed, caller: str = "split_seed") -> tuple[int, int]:
    """Split ``seed`` into the Philox key words ``(seed & 0xFFFFFFFF, seed >> 32)``.

    Parameters
    ----------
    seed : int
        An int (Python or numpy integer, not bool) in ``[0, 2**64)``.
    caller : str, default "split_seed"
        Function name that error messages start with (the public API passes its own).

    Returns
    -------
    (lo, hi) : tuple of int
        Both in ``[0, 2**32)``; pass them as ``seed_lo, seed_hi`` to the kernels.

    Raises
    ------
    FagTypeError
        ``seed`` is not an int.
    FagValueError
        ``seed`` is outside ``[0, 2**64)``.
    """
    v = _check_u64(seed, "seed", caller)
    return v & 0xFFFFFFFF, v >> 32


def split_offset(offset, caller: str = "split_offset") -> tuple[int, int]:
    """Split ``offset`` into its 32-bit halves ``(offset & 0xFFFFFFFF, offset >> 32)``.

    Parameters
    ----------
    offset : int
        An int (Python or numpy integer, not bool) in ``[0, 2**64)``.
    caller : str, default "split_offset"
        Function name that error messages start with (the public API passes its own).

    Returns
    -------
    (lo, hi) : tuple of int
        Both in ``[0, 2**32)``, as :func:`_counter_start` takes them (they fit an int64 table).

    Raises
    ------
    FagTypeError
        ``offset`` is not an int.
    FagValueError
        ``offset`` is outside ``[0, 2**64)``.
    """
    v = _check_u64(offset, "offset", caller)
    return v & 0xFFFFFFFF, v >> 32


# ------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------
def dropout_mask(numels, keep_prob, seed, offset=0) -> np.ndarray:
    """Keep bits of fag_numba's dropout generator, packed like a ``drop_mask`` (SPEC §5).

    Passing the result as ``drop_mask`` (with the same ``keep_prob``) gives bit-for-bit the same
    result as passing ``seed`` and ``offset``.

    Parameters
    ----------
    numels : int
        Number of elements ``numels >= 0`` (``B*N1*S1*S2``; TND ``N1*sum_b S1_b*S2_b``).
    keep_prob : float
        Probability of keeping an element; rounded to float32, it must lie in ``(0, 1]``.
        ``keep_prob == 1`` gives all bits 1.
    seed : int
        Generator seed in ``[0, 2**64)`` (the Philox key).
    offset : int, default 0
        Counter of element 0, in ``[0, 2**64)``; element ``e`` uses counter
        ``(offset + e) mod 2**64``.

    Returns
    -------
    ndarray, shape (ceil(numels / 8),), uint8
        Bit ``e & 7`` (least significant first) of byte ``e >> 3`` is 1 iff element ``e`` is
        kept; the unused high bits of the last byte are 0.  Equal to
        ``np.packbits(keep, bitorder="little")`` of the ``[numels]`` keep array.

    Raises
    ------
    FagTypeError
        ``numels``, ``seed`` or ``offset`` is not an int (bool is not), or ``keep_prob`` is not
        a real number.
    FagValueError
        ``numels < 0`` (or ``>= 2**63``), ``float32(keep_prob)`` outside ``(0, 1]``, or
        ``seed``/``offset`` outside ``[0, 2**64)``.

    Notes
    -----
    The bit of element ``e`` is defined in this module's docstring: kept iff word 0 of
    ``Philox4x32_10(counter=(c mod 2**32, c >> 32, 0, 0), key=(seed mod 2**32, seed >> 32))``,
    ``c = (offset + e) mod 2**64``, is below ``floor(float32(keep_prob) * 2**32)``.  Hence
    ``dropout_mask(n, p, s, offset=o)`` holds bits ``o .. o+n-1`` of ``dropout_mask(o+n, p, s)``.
    Cost: about 1.5 ns per element, serial, no temporary of size ``numels``.

    Examples
    --------
    >>> m = dropout_mask(10, 0.5, seed=1234)
    >>> m.shape, m.dtype
    ((2,), dtype('uint8'))
    >>> keep = np.unpackbits(m, bitorder="little")[:10].astype(bool)
    """
    caller = "dropout_mask"
    if not is_int(numels):
        raise FagTypeError(
            f"{caller}: numels must be an int, got {_type_name(numels)} ({numels!r})")
    n = int(numels)
    if n < 0:
        raise FagValueError(f"{caller}: numels must be >= 0, got {n}")
    if n >= 1 << 63:
        raise FagValueError(f"{caller}: numels must be < 2**63, got {n}")
    kp = _check_keep_prob(keep_prob, caller)
    s = _check_u64(seed, "seed", caller)
    o = _check_u64(offset, "offset", caller)
    memory.require((n + 7) >> 3, f"the packed mask of numels={n}", f"{caller}: ")
    out = np.empty((n + 7) >> 3, dtype=np.uint8)
    if n == 0:
        return out
    # errstate matters only under NUMBA_DISABLE_JIT=1, where the uint64 counter wrap-around
    # (intended, mod 2**64) would otherwise emit numpy overflow warnings.
    with np.errstate(over="ignore"):
        _dropout_mask_packed(s & 0xFFFFFFFF, s >> 32, np.uint64(o), np.int64(n),
                             np.uint64(_threshold_of(kp)), out)
    return out
