"""atten_mask / sparse_mode -> the mask descriptor the kernels read (SPEC §6, §7).

This module is the one place that states mask polarity and alignment:

* **Polarity.** ``atten_mask`` is bool or uint8; **non-zero = masked** (not computed), 0 = computed
  (the Ascend convention; flash-attn padding masks use the opposite one).
* **Alignment.** Every index is local to one sequence (TND: one varlen sequence): row ``i`` in
  ``[0, S1_b)``, column ``j`` in ``[0, S2_b)``, ``delta_b = S2_b - S1_b``.  Modes 0 and 2 are
  aligned top-left (diagonal ``j == i``); modes 3, 4, 5, 6 and the band sequences of 7/8 are
  aligned bottom-right (diagonal ``j == i + delta_b``).

The kernels never see ``sparse_mode`` (STYLE b3.5).  :func:`plan_masks` validates every
mask-related argument and reduces each mode to a :class:`MaskPlan`::

    computed(b, h, i, j) = (lo[b] <= j - i <= hi[b]  or  j < prefix[b])
                           and (not has_dense
                                or dense[dense_boff[b] + h*dense_hs + i*dense_rs + j] == 0)

===========  ======================================  ==========================  =========
mode         lo[b]                                   hi[b]                       dense
===========  ======================================  ==========================  =========
no mask      -INF                                    +INF                        no
0            -pre                                    next                        yes
1            -INF                                    +INF                        yes
2            -INF                                    0                           no
3            -INF                                    delta_b                     no
4            delta_b - pre                           delta_b + next              no
5            -INF (+ prefix[b] columns)              delta_b                     yes
6            -INF (+ prefix[b] columns)              delta_b                     no
7            band seq: as 4; others: as 3                                        no
8            band seq: as 4; others: as 2                                        no
===========  ======================================  ==========================  =========

(INF is ``config.BAND_INF``; every bound is clamped to ``[-INF, +INF]``.)  The band sequence of
mode 7 is the last sequence with ``S1_b > 0``, of mode 8 the first one.

Small examples (1 = computed), from SPEC §7::

    mode 2, S1=3, S2=5     mode 3, S1=3, S2=5     mode 3, S1=5, S2=3     mode 4, 3x5, pre=1, next=0
    1 0 0 0 0              1 1 1 0 0              0 0 0                  0 1 1 0 0
    1 1 0 0 0              1 1 1 1 0              0 0 0                  0 0 1 1 0
    1 1 1 0 0              1 1 1 1 1              1 0 0                  0 0 0 1 1
                                                  1 1 0
                                                  1 1 1

Tile classification (STYLE b3.4) is analytic for the band/prefix part
(:func:`_band_tile_class`, O(1)) and a byte scan for the dense part (:func:`_dense_tile_class`);
(load balancing counts non-EMPTY tiles per work item in ``planning.py``).
:func:`materialize` builds the dense predicate of one (b, h) for tests and debugging only.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import warnings

import numba
import numpy as np

from . import _jit, config
from .memo import memoised
from .errors import FagTypeError, FagValueError
from .kernels.desc import EMPTY, FULL, PARTIAL
from .validation import check_int, is_int

__all__ = ["MaskPlan", "plan_masks", "materialize", "compressed_mask", "EMPTY", "FULL",
           "PARTIAL"]

# Tile classes: the kernels' own constants (one place for this fact).

_INF = config.BAND_INF
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_COMPRESSED_MODES = (2, 3, 4, 7, 8)
_DENSE_MODES = (0, 1, 5)
_CAUSAL_SIDE = 2048       # compressed triangle: [2048, 2048] = triu(ones, k=1)
_PREFIX_ROWS = 3072       # mode 6: the triangle on top of 1024 rows [0]*1024 + [1]*1024


@dataclasses.dataclass(frozen=True)
class MaskPlan:
    """Mask descriptor of one call: which (b, h, i, j) are computed (module docstring formula).

    Attributes
    ----------
    lo, hi : np.ndarray
        int64 ``[B]``: band limits on ``j - i``; ``-config.BAND_INF`` / ``+config.BAND_INF`` mean
        no limit.  Always within ``[-BAND_INF, BAND_INF]`` (so ``i + lo``, ``i + hi + 1`` never
        overflow int64), and canonical: a bound that excludes nothing in sequence b
        (``lo <= 1 - S1_b``, ``hi >= S2_b - 1``) is stored as exactly ``-/+BAND_INF``.
        ``lo > hi`` is possible (an empty band).
    prefix : np.ndarray
        int64 ``[B]``: columns ``j < prefix[b]`` are computed in every row (0 = none).
    has_dense : bool
        True when ``dense`` is read (modes 0, 1, 5 with a mask).
    dense : np.ndarray
        uint8 1-D flat view of the user's mask (bool viewed as uint8; zero copy when the mask is
        C-contiguous, ``np.ascontiguousarray`` otherwise; read-only if the user's array is);
        ``np.zeros(1, np.uint8)`` when ``has_dense`` is False.  Non-zero = masked.
    dense_boff : np.ndarray
        int64 ``[B]``: element offset of (b, head 0, row 0, col 0) in ``dense`` (zeros when absent).
    dense_hs : int
        Element stride between heads (0 = mask broadcast over heads).
    dense_rs : int
        Element stride between rows (columns are contiguous); 0 when absent.
    sparse_mode : int
        The user's sparse_mode, for docs and debugging only (kernels must not branch on it).
    full : bool
        True when nothing is masked at all: no dense mask and the band/prefix covers every
        element of every sequence (always the case without atten_mask).  Kernels may then skip
        every test (``desc.MASK_NONE``).
    """

    lo: np.ndarray
    hi: np.ndarray
    prefix: np.ndarray
    has_dense: bool
    dense: np.ndarray
    dense_boff: np.ndarray
    dense_hs: int
    dense_rs: int
    sparse_mode: int
    full: bool


# ------------------------------------------------------------------------------------------------
# Validation helpers
# ------------------------------------------------------------------------------------------------

def _check_int(name, value, lo=_I64_MIN, hi=_I64_MAX):
    """An int (not bool) in [lo, hi] (validation.check_int, the package's one int check)."""
    return check_int(name, value, lo, hi)


def _external_stacklevel():
    """stacklevel that points a warning at the first frame outside the fag_numba package."""
    frame = sys._getframe(1)      # the function that will call warnings.warn
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "fag_numba":
        frame = frame.f_back
        level += 1
    return level


def _prefix_values(prefix):
    """Type-check ``prefix`` (a sequence of ints or a 1-D integer array) -> list of Python ints."""
    if isinstance(prefix, np.ndarray):
        if prefix.ndim == 1 and prefix.size == 0:
            return []                    # an empty sequence: the length check says what is wrong
        if prefix.dtype.kind not in "iu":
            raise FagTypeError(f"prefix: must be a sequence of ints, got an array of dtype "
                               f"{prefix.dtype}")
        if prefix.ndim != 1:
            raise FagValueError(f"prefix: must be 1-D (one int per sequence), got shape "
                                f"{prefix.shape}")
        return [int(v) for v in prefix.tolist()]
    if isinstance(prefix, (list, tuple)):
        for k, v in enumerate(prefix):
            if not is_int(v):
                raise FagTypeError(f"prefix: must be a sequence of ints, got "
                                   f"{type(v).__name__} {v!r} at index {k}")
        return [int(v) for v in prefix]
    raise FagTypeError(f"prefix: must be a list/tuple/1-D integer array of one int per sequence, "
                       f"got {type(prefix).__name__} {prefix!r}")


@_jit.kernel
def _first_bad_row(w, wpr, split):
    """First row of a compressed mask that is not canonical, or -1: ``w`` is the C-contiguous
    mask as uint64 words (8 bool bytes each, ``wpr`` words per row).  Row r must hold byte 0 in
    columns ``[0, t)`` and byte 1 in ``[t, cols)``, ``t = r + 1`` for the triangle rows
    (r < ``split``) and ``t = 1024`` for mode 6's extra rows.

    Reads only the user's mask (a comparison with the canonical copy read twice the bytes) and
    stops after the first wrong row.  Each row is one branch-free loop (every word XOR its
    expected value: 0 left of word ``t // 8``, 0x01 bytes right of it; the boundary word
    separately), which vectorises: ~0.14 ms for the 4 MB causal mask, the time of a plain
    read, vs 0.21 ms for two loops split at the boundary (short trip counts) and 0.32 ms for
    ``np.array_equal`` with the canonical copy (1 thread, idle).  A byte other than 0/1 (a
    uint8 mask holding 2, say) reads as a difference here; the caller re-checks as booleans.
    """
    ones = np.uint64(0x0101010101010101)
    zero = np.uint64(0)
    full = ~zero
    rows = w.size // wpr
    for r in range(rows):
        t = r + 1 if r < split else 1024
        base = r * wpr
        tw = t // 8
        acc = zero
        for i in range(wpr):
            e = ones if i > tw else zero
            keep = zero if i == tw else full
            acc |= (w[base + i] ^ e) & keep
        if tw < wpr:                       # the word holding column t: 0 bytes, then 1 bytes
            acc |= w[base + tw] ^ (ones << np.uint64(8 * (t % 8)))
        if acc != 0:
            return r
    return -1


def _root(a):
    """The object that owns ``a``'s memory (the end of its ``base`` chain)."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a


def _same_as_canonical(m2, canon):
    """Whether the compressed mask ``m2`` equals ``canon`` as booleans (SPEC §7), reading m2 on
    every call unless it is ``canon`` itself.

    - ``canon`` (or a view with its data pointer, shape and strides, e.g. the
      ``[1, 1, 2048, 2048]`` reshape): nothing to read.  Safe because its memory is an
      immutable ``bytes`` object (:func:`compressed_mask`), which no array can write; any
      other array, read-only or not, may change between calls (a writeable view of the same
      memory, or ``flags.writeable = True`` on an owner) and is read every time.
    - C-contiguous, 8-byte aligned, under the JIT: :func:`_first_bad_row` (0.14 ms for 4 MB).
    - Anything else, and a mask the kernel found different (it may be a uint8 mask with values
      other than 0/1, canonical as booleans, or really wrong): compared elementwise as booleans
      (one 4-6 MB temporary; the error path).
    """
    if (m2.dtype == np.bool_ and m2.shape == canon.shape and m2.strides == canon.strides
            and m2.ctypes.data == canon.ctypes.data and _root(m2) is _root(canon)):
        return True
    if (m2.flags.c_contiguous and m2.ctypes.data % 8 == 0 and m2.shape[-1] % 8 == 0
            and not numba.config.DISABLE_JIT):
        w = m2.reshape(-1).view(np.uint64)
        if _first_bad_row(w, m2.shape[-1] // 8, _CAUSAL_SIDE) < 0:
            return True
    return np.array_equal(m2, canon) if m2.dtype == np.bool_ else np.array_equal(m2 != 0, canon)


@functools.lru_cache(maxsize=None)
def _canonical(mode6):
    """The canonical compressed mask, built once: read-only bool, over an immutable ``bytes``
    object (so no array can ever write it: ``flags.writeable = True`` raises; see
    :func:`_same_as_canonical`, which skips reading it).

    ``[2048, 2048]`` = ``triu(ones, k=1)``; mode 6: ``[3072, 2048]`` = that triangle on top of
    1024 rows whose columns 0..1023 are 0 and 1024..2047 are 1.
    """
    tri = np.triu(np.ones((_CAUSAL_SIDE, _CAUSAL_SIDE), dtype=bool), k=1)
    if mode6:
        rect = np.zeros((_PREFIX_ROWS - _CAUSAL_SIDE, _CAUSAL_SIDE), dtype=bool)
        rect[:, 1024:] = True
        tri = np.concatenate([tri, rect], axis=0)
    return np.frombuffer(tri.tobytes(), dtype=bool).reshape(tri.shape)


def compressed_mask(sparse_mode=3):
    """The canonical compressed ``atten_mask`` of ``sparse_mode`` (2, 3, 4, 7, 8: ``[2048,
    2048]`` = ``triu(ones, k=1)``; 6: ``[3072, 2048]``), read-only.

    Equal to the mask a caller builds with ``np.triu``, but the calls that receive this very
    array (or its ``[1, 1, ...]`` reshape) skip the per-call canonical check (~0.14 ms: it
    reads 4 MB), because its memory cannot change.  Shared: one array per mode kind.
    """
    if not is_int(sparse_mode) or int(sparse_mode) not in (2, 3, 4, 6, 7, 8):
        raise FagValueError(f"sparse_mode: compressed masks exist for modes 2, 3, 4, 6, 7, 8, "
                            f"got {sparse_mode!r}")
    return _canonical(int(sparse_mode) == 6)


def _check_compressed(mask, sparse_mode):
    """Shape and canonical content of a compressed mask (modes 2, 3, 4, 6, 7, 8)."""
    mode6 = sparse_mode == 6
    rows = _PREFIX_ROWS if mode6 else _CAUSAL_SIDE
    want = (rows, _CAUSAL_SIDE)
    if mask.shape not in (want, (1, 1) + want):
        raise FagValueError(
            f"atten_mask: sparse_mode {sparse_mode} needs the compressed [{rows}, {_CAUSAL_SIDE}] "
            f"mask (or [1, 1, {rows}, {_CAUSAL_SIDE}]), got shape {mask.shape}")
    m2 = mask[0, 0] if mask.ndim == 4 else mask          # a view, never a copy
    canon = _canonical(mode6)
    same = _same_as_canonical(m2, canon)
    if not same:
        r, c = np.argwhere((m2 != 0) != canon)[0]
        what = ("triu(ones(2048, 2048), k=1)" if not mode6 else
                "triu(ones(2048, 2048), k=1) on top of 1024 rows of [0]*1024 + [1]*1024")
        raise FagValueError(
            f"atten_mask: sparse_mode {sparse_mode} needs the canonical compressed mask {what} "
            f"(non-zero = masked; fag_numba computes this mode analytically and does not read "
            f"it), got a different mask: element [{r}, {c}] is {m2[r, c]!r}")


def _check_tokens(sparse_mode, pre, nxt, s1, s2, which, band=False):
    """SPEC §7 token rules on the sequences selected by ``which`` (bool [B]).

    ``pre``/``nxt`` are Python ints (raw user values); ``s1``/``s2`` int64 [B].  Band modes are
    re-based to the top-left first: ``pre' = pre + S1 - S2``, ``next' = next - S1 + S2``.
    """
    if not which.any():
        return
    if pre + nxt < 0:       # pre' + next' == pre + next for every sequence
        raise FagValueError(
            f"pre_tokens, next_tokens: sparse_mode {sparse_mode} needs pre_tokens + next_tokens "
            f">= 0 (a band with no element), got pre_tokens={pre}, next_tokens={nxt}")
    # clamped copies keep the int64 arithmetic exact: |S| <= 2**40 << BAND_INF
    pc = np.int64(max(-_INF, min(_INF, pre)))
    nc = np.int64(max(-_INF, min(_INF, nxt)))
    if sparse_mode == 0:
        pre_p = np.full(s1.shape, pc)
        nxt_p = np.full(s1.shape, nc)
        how = ""
    else:
        pre_p = pc + s1 - s2
        nxt_p = nc - s1 + s2
        how = " (re-based to the top-left: pre' = pre_tokens + S1 - S2)"
    bad = which & (-pre_p > s2)
    if bad.any():
        b = int(np.flatnonzero(bad)[0])
        raise FagValueError(
            f"pre_tokens: sparse_mode {sparse_mode} needs -pre' <= S2{how}, got pre_tokens={pre} "
            f"with S1={s1[b]}, S2={s2[b]} (sequence {b})")
    bad = which & (-nxt_p > s1)
    if bad.any():
        b = int(np.flatnonzero(bad)[0])
        how = "" if sparse_mode == 0 else " (re-based: next' = next_tokens - S1 + S2)"
        raise FagValueError(
            f"next_tokens: sparse_mode {sparse_mode} needs -next' <= S1{how}, got "
            f"next_tokens={nxt} with S1={s1[b]}, S2={s2[b]} (sequence {b})")
    if band:
        b = int(np.flatnonzero(which)[0])
        s1b, s2b = int(s1[b]), int(s2[b])
        if pre < s2b:
            raise FagValueError(
                f"pre_tokens: sparse_mode {sparse_mode} needs pre_tokens >= S2 of its band "
                f"sequence {b} (S2={s2b}: the band must be a cut of a causal mask), "
                f"got pre_tokens={pre}")
        if sparse_mode == 7 and not s1b - s2b <= nxt <= 0:
            raise FagValueError(
                f"next_tokens: sparse_mode 7 needs S1 - S2 <= next_tokens <= 0 for its band "
                f"sequence {b} (S1={s1b}, S2={s2b}), got next_tokens={nxt}")
        if sparse_mode == 8 and nxt < s1b - s2b:
            raise FagValueError(
                f"next_tokens: sparse_mode 8 needs next_tokens >= S1 - S2 for its band sequence "
                f"{b} (S1={s1b}, S2={s2b}), got next_tokens={nxt}")


def _check_prefix(sparse_mode, prefix, s1, s2, batch):
    """Presence, length and per-sequence range of ``prefix`` (modes 5, 6) -> int64 [B]."""
    if prefix is None:
        raise FagValueError(f"prefix: sparse_mode {sparse_mode} requires prefix (one int per "
                            f"sequence), got None")
    vals = _prefix_values(prefix)
    if len(vals) != batch:
        raise FagValueError(f"prefix: sparse_mode {sparse_mode} needs one int per sequence "
                            f"(B={batch}), got {len(vals)} values")
    for b, p in enumerate(vals):
        s1b, s2b = int(s1[b]), int(s2[b])
        if s1b == 0 or s2b == 0:
            lo, rule = 0, "[0, S2] (empty sequence)"
        elif s1b > s2b:
            lo, rule = 0, "[0, S2] when S1 > S2"
        else:
            lo, rule = s2b - s1b, "[S2 - S1, S2] when S1 <= S2"
        if not lo <= p <= s2b:
            raise FagValueError(f"prefix: sparse_mode {sparse_mode} needs prefix[b] in {rule}, "
                                f"got prefix[{b}]={p} with S1={s1b}, S2={s2b}")
    return np.asarray(vals, dtype=np.int64).reshape(batch)


def _dense_layout(mask, sparse_mode, batch, n1, tnd, ms1, ms2):
    """Shape check of a full mask (modes 0, 1, 5) -> (boff [B], hs, rs)."""
    shp = mask.shape
    rows_cols = shp[-2:]
    if tnd:
        if shp not in ((ms1, ms2), (1, 1, ms1, ms2)):
            raise FagValueError(
                f"atten_mask: sparse_mode {sparse_mode} in TND needs the [maxS1, maxS2] = "
                f"[{ms1}, {ms2}] mask (or [1, 1, {ms1}, {ms2}]; sequence b uses its top-left "
                f"[S1_b, S2_b] corner), got shape {shp}")
        return np.zeros(batch, np.int64), 0, int(ms2)
    if rows_cols != (ms1, ms2):
        raise FagValueError(
            f"atten_mask: sparse_mode {sparse_mode} needs a full mask whose last two dims are "
            f"(S1, S2) = ({ms1}, {ms2}), got shape {shp}")
    plane = ms1 * ms2
    if mask.ndim == 2 or shp[:2] == (1, 1):
        return np.zeros(batch, np.int64), 0, int(ms2)
    if shp[:2] == (batch, 1):
        return np.arange(batch, dtype=np.int64) * plane, 0, int(ms2)
    if shp[:2] == (batch, n1):
        return np.arange(batch, dtype=np.int64) * (n1 * plane), int(plane), int(ms2)
    raise FagValueError(
        f"atten_mask: a 4-D full mask must be [1, 1, S1, S2], [B, 1, S1, S2] or [B, N1, S1, S2] "
        f"with B={batch}, N1={n1}, got shape {shp}")


# ------------------------------------------------------------------------------------------------
# The planner
# ------------------------------------------------------------------------------------------------

def dense_flat(mask):
    """uint8 1-D flat view of a full mask: bool -> uint8 is a zero-copy view; only a
    non-C-contiguous mask is copied."""
    return np.ascontiguousarray(mask).reshape(-1).view(np.uint8)


def _bounds(sparse_mode, pre, nxt, prefix, seq_q, seq_k, batch):
    """(lo, hi, prefix, full) of a masked call, after the token and prefix rules of its mode
    (FagValueError).  Fresh arrays; memoised for calls of at most ``config.PLAN_CACHE_SEQS``
    sequences (every input is in the key; only successful results are kept): ~20 us of numpy
    per masked call."""
    if batch > config.PLAN_CACHE_SEQS:
        return _bounds_of(sparse_mode, pre, nxt, prefix, seq_q, seq_k, batch)
    key = (sparse_mode, pre, nxt, None if prefix is None else tuple(_prefix_values(prefix)),
           batch, seq_q.tobytes(), seq_k.tobytes())
    return memoised(_bounds_memo, key,
                    lambda: _bounds_of(sparse_mode, pre, nxt, prefix, seq_q, seq_k, batch))


_bounds_memo = {}


def _bounds_of(sparse_mode, pre, nxt, prefix, seq_q, seq_k, batch):
    """:func:`_bounds`, computed."""
    zeros = np.zeros(batch, np.int64)
    nonempty = (seq_q > 0) & (seq_k > 0)
    delta = seq_k - seq_q
    lo = np.full(batch, -_INF, np.int64)
    hi = np.full(batch, _INF, np.int64)
    pfx = zeros.copy()
    pc = np.int64(max(-_INF, min(_INF, pre)))      # clamped: arithmetic below cannot overflow
    nc = np.int64(max(-_INF, min(_INF, nxt)))

    if sparse_mode == 0:
        _check_tokens(0, pre, nxt, seq_q, seq_k, nonempty)
        lo[:] = -pc
        hi[:] = nc
    elif sparse_mode == 2:
        hi[:] = 0
    elif sparse_mode == 3:
        hi[:] = delta
    elif sparse_mode == 4:
        _check_tokens(4, pre, nxt, seq_q, seq_k, nonempty)
        lo[:] = delta - pc
        hi[:] = delta + nc
    elif sparse_mode in (5, 6):
        pfx = _check_prefix(sparse_mode, prefix, seq_q, seq_k, batch)
        hi[:] = delta
    elif sparse_mode in (7, 8):
        hi[:] = delta if sparse_mode == 7 else 0
        cand = np.flatnonzero(seq_q > 0)
        if sparse_mode == 7:
            bad = nonempty & (seq_q > seq_k)
            bad[cand[-1:]] = False
            if bad.any():
                b = int(np.flatnonzero(bad)[0])
                raise FagValueError(
                    f"actual_seq_qlen, actual_seq_kvlen: sparse_mode 7 needs S1_b <= S2_b for "
                    f"every sequence but the last non-empty one (a right-down causal cut), got "
                    f"S1={seq_q[b]}, S2={seq_k[b]} for sequence {b}")
        if cand.size:
            band = int(cand[-1] if sparse_mode == 7 else cand[0])
            which = np.zeros(batch, dtype=bool)
            which[band] = nonempty[band]
            _check_tokens(sparse_mode, pre, nxt, seq_q, seq_k, which, band=True)
            lo[band] = delta[band] - pc
            hi[band] = delta[band] + nc
    # canonical bounds: a limit that excludes nothing in sequence b (every i - j >= -(S1_b - 1),
    # every j - i <= S2_b - 1) is stored as exactly -/+BAND_INF; this also clamps to the range
    lo[lo <= 1 - seq_q] = -_INF
    hi[hi >= seq_k - 1] = _INF
    np.clip(lo, -_INF, _INF, out=lo)
    np.clip(hi, -_INF, _INF, out=hi)

    # full: _band_tile_class(lo, hi, prefix, 0, S1, 0, S2) == FULL for every non-empty sequence,
    # vectorised (B may be large in non-TND layouts)
    jm = np.maximum(pfx, 0)
    covered = (seq_k <= pfx) | ((lo <= jm - (seq_q - 1)) & (seq_k - 1 <= hi))
    return lo, hi, pfx, bool(np.all(covered | ~nonempty))


def plan_masks(atten_mask, sparse_mode, pre_tokens, next_tokens, prefix, seq_q, seq_k, *,
               batch: int, n1: int, tnd: bool, s1: int | None = None,
               s2: int | None = None, defer: bool = False) -> MaskPlan:
    """Validate every mask-related argument and reduce ``sparse_mode`` to a :class:`MaskPlan`.

    Nothing else happens before every check has passed.  The user's mask is never modified and
    never copied, except by ``np.ascontiguousarray`` when a full mask (modes 0, 1, 5) is not
    C-contiguous (the kernels read it flat).  Compressed masks are only verified, never read.

    Parameters
    ----------
    atten_mask : np.ndarray or None
        bool or uint8, non-zero = masked.  Full shapes (modes 0, 1, 5): ``[S1, S2]``,
        ``[1, 1, S1, S2]``, ``[B, 1, S1, S2]``, ``[B, N1, S1, S2]``; TND only ``[maxS1, maxS2]``
        (or ``[1, 1, maxS1, maxS2]``).  Compressed (2, 3, 4, 7, 8): ``[2048, 2048]`` or
        ``[1, 1, 2048, 2048]``; mode 6: ``[3072, 2048]`` or ``[1, 1, 3072, 2048]``.  None = full
        attention in every mode (UserWarning for modes 2..8).
    sparse_mode : int
        0..8 (SPEC §7).
    pre_tokens, next_tokens : int
        int64 range.  Used by modes 0, 4 and the band sequence of 7/8.
    prefix : sequence of int or None
        One int per sequence (``[B]``); required by modes 5 and 6 when a mask is given.
    seq_q, seq_k : np.ndarray
        int ``[B]`` per-sequence lengths S1_b, S2_b (non-TND: all equal to S1 / S2; TND: the
        varlen lengths after trailing-zero removal).
    batch : int
        B (``len(seq_q)``).
    n1 : int
        Query heads N1 (the ``[B, N1, S1, S2]`` mask shape).
    tnd : bool
        True for the TND layout.
    s1, s2 : int, optional
        Dims that a full mask's last two axes must equal.  Default: ``max(seq_q)`` /
        ``max(seq_k)`` (0 when B == 0); pass them when B == 0 in a non-TND layout.
    defer : bool
        True: ``dense`` is the user's (validated) mask itself, not yet flattened; the caller
        applies :func:`dense_flat` once every other argument is checked (SPEC §9: shapes are
        checked before anything is converted).

    Returns
    -------
    MaskPlan

    Raises
    ------
    FagTypeError
        Wrong Python type of ``sparse_mode``/``pre_tokens``/``next_tokens``/``prefix``, a
        non-array ``atten_mask`` or one whose dtype is not bool/uint8.
    FagValueError
        Every other violation (range, shape, non-canonical compressed mask, token rules, mode /
        layout combination, prefix length or range).
    """
    # ---- checks made whether or not a mask exists (SPEC §6: types, sparse_mode range) ----
    if not is_int(sparse_mode):
        raise FagTypeError(f"sparse_mode: must be an int, got {type(sparse_mode).__name__} "
                           f"{sparse_mode!r}")
    sparse_mode = int(sparse_mode)
    if not 0 <= sparse_mode <= 8:
        raise FagValueError(f"sparse_mode: must be in 0..8, got {sparse_mode}")
    pre = _check_int("pre_tokens", pre_tokens)
    nxt = _check_int("next_tokens", next_tokens)
    if prefix is not None:
        _prefix_values(prefix)       # type only: length and range depend on the mode
    seq_q = np.asarray(seq_q, dtype=np.int64).reshape(-1)
    seq_k = np.asarray(seq_k, dtype=np.int64).reshape(-1)
    batch = int(batch)
    n1 = int(n1)
    if seq_q.shape != (batch,) or seq_k.shape != (batch,):
        raise ValueError(f"plan_masks: seq_q/seq_k must have B={batch} entries, got "
                         f"{seq_q.shape}, {seq_k.shape}")   # internal contract, not user input
    if atten_mask is not None and not isinstance(atten_mask, np.ndarray):
        raise FagTypeError(f"atten_mask: must be a numpy array or None, got "
                           f"{type(atten_mask).__name__}")

    zeros = np.zeros(batch, np.int64)
    if atten_mask is None:
        if 2 <= sparse_mode <= 8:
            warnings.warn(
                f"sparse_mode {sparse_mode} without atten_mask computes full attention (as the "
                f"NPU does): pre_tokens, next_tokens, prefix and sparse_mode have no effect. "
                f"Pass the compressed mask to get the sparse pattern.",
                UserWarning, stacklevel=_external_stacklevel())
        return MaskPlan(lo=np.full(batch, -_INF, np.int64), hi=np.full(batch, _INF, np.int64),
                        prefix=zeros, has_dense=False, dense=np.zeros(1, np.uint8),
                        dense_boff=zeros.copy(), dense_hs=0, dense_rs=0,
                        sparse_mode=sparse_mode, full=True)

    # ---- a mask is given: everything tied to the mode is validated ----
    mask = atten_mask
    if mask.dtype != np.bool_ and mask.dtype != np.uint8:
        raise FagTypeError(f"atten_mask: dtype must be bool or uint8, got {mask.dtype}")
    if mask.ndim not in (2, 4):
        raise FagValueError(f"atten_mask: rank must be 2 or 4, got rank {mask.ndim} "
                            f"(shape {mask.shape})")
    if sparse_mode in (7, 8) and not tnd:
        raise FagValueError(f"sparse_mode: {sparse_mode} is only valid for the TND layout")
    if sparse_mode == 5 and tnd:
        raise FagValueError("sparse_mode: 5 is not supported for the TND layout (use 6 with the "
                            "compressed [3072, 2048] mask)")

    if s1 is None:
        s1 = int(seq_q.max()) if batch else 0
    if s2 is None:
        s2 = int(seq_k.max()) if batch else 0
    ms1, ms2 = int(s1), int(s2)
    if sparse_mode in _DENSE_MODES:
        boff, hs, rs = _dense_layout(mask, sparse_mode, batch, n1, tnd, ms1, ms2)
    else:
        _check_compressed(mask, sparse_mode)

    lo, hi, pfx, full = _bounds(sparse_mode, pre, nxt, prefix, seq_q, seq_k, batch)

    if sparse_mode in _DENSE_MODES:
        # defer: the caller converts later (dense_flat), after every other argument's checks
        dense = mask if defer else dense_flat(mask)
        return MaskPlan(lo=lo, hi=hi, prefix=pfx, has_dense=True, dense=dense, dense_boff=boff,
                        dense_hs=int(hs), dense_rs=int(rs), sparse_mode=sparse_mode, full=False)
    return MaskPlan(lo=lo, hi=hi, prefix=pfx, has_dense=False, dense=np.zeros(1, np.uint8),
                    dense_boff=zeros, dense_hs=0, dense_rs=0, sparse_mode=sparse_mode,
                    full=full)


def materialize(plan: MaskPlan, b: int, h: int, s1: int, s2: int) -> np.ndarray:
    """Dense predicate of sequence ``b``, query head ``h``: bool ``[s1, s2]``, True = computed.

    For tests and debugging only (it allocates S1*S2); the kernels use the descriptor.
    ``s1``/``s2`` are the lengths of sequence b (the plan does not store them).
    """
    i = np.arange(s1, dtype=np.int64)[:, None]
    j = np.arange(s2, dtype=np.int64)[None, :]
    d = j - i
    c = ((d >= plan.lo[b]) & (d <= plan.hi[b])) | (j < plan.prefix[b])
    if plan.has_dense:
        idx = plan.dense_boff[b] + h * plan.dense_hs + i * plan.dense_rs + j
        c = c & (plan.dense[idx] == 0)
    return np.ascontiguousarray(c)


# ------------------------------------------------------------------------------------------------
# njit helpers read by the kernels and the planner
# ------------------------------------------------------------------------------------------------

@_jit.kernel
def _band_tile_class(lo, hi, prefix, i0, i1, j0, j1):
    """Class of tile rows [i0, i1) x cols [j0, j1) (both non-empty) under band-or-prefix only.

    Element (i, j) is in iff ``lo <= j - i <= hi or j < prefix``.  Returns 0 (EMPTY: no element
    in), 1 (FULL: every element in), 2 (PARTIAL).  O(1) and exact: over a rectangle, ``j - i``
    takes every integer in ``[j0 - (i1 - 1), (j1 - 1) - i0]``, so a band condition on a
    sub-rectangle is decided by those two extremes.
    """
    if j1 <= prefix:                     # every column is a prefix column
        return 1
    # FULL iff the non-prefix columns [max(j0, prefix), j1) are inside the band in every row
    jm = j0 if j0 > prefix else prefix
    if lo <= jm - (i1 - 1) and (j1 - 1) - i0 <= hi:
        return 1
    if j0 < prefix:                      # (i0, j0) is a prefix element: not empty
        return 2
    if lo > hi or (j1 - 1) - i0 < lo or j0 - (i1 - 1) > hi:
        return 0
    return 2


@_jit.kernel
def _dense_tile_class(dense, off, rs, i0, i1, j0, j1):
    """Class of tile rows [i0, i1) x cols [j0, j1) under the dense mask alone.

    Reads ``dense[off + i*rs + j]`` (``off`` = offset of row 0, col 0 of this (b, h)).  Returns
    0 if every byte is non-zero (all masked: EMPTY), 1 if every byte is zero (FULL), 2 otherwise;
    stops at the first byte that differs from the first one.
    """
    first = dense[off + i0 * rs + j0] == 0
    for i in range(i0, i1):
        base = off + i * rs
        for j in range(j0, j1):
            if (dense[base + j] == 0) != first:
                return 2
    return 1 if first else 0

