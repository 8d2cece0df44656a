"""Argument checks shared by the public functions (SPEC §9): every message names the argument,
the rule and the value received.  Nothing here computes; ``api.py`` calls these before any work.

``FagTypeError``: not an array / wrong Python type / unsupported or mismatched dtype.
``FagValueError``: every other violation (value, shape, combination).
"""
import numbers

import numpy as np

from . import config, dtypes
from .errors import FagTypeError, FagValueError

INT32_MAX = 2147483647


def _fmt(x):
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    return repr(x)


def is_int(x):
    """True for Python / numpy integers, but not for bool."""
    return isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_int(name, x, lo=None, hi=None, fn=""):
    """An int (not bool) within [lo, hi]; returns it as a Python int."""
    if not is_int(x):
        raise FagTypeError(f"{fn}{name} must be an int, got {type(x).__name__} {_fmt(x)}")
    x = int(x)
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise FagValueError(f"{fn}{name} must be in [{lo}, {hi}], got {x}")
    return x


def check_real(name, x, fn="", finite=False):
    """A real number (not bool, not an array); returns it rounded to float32 (SPEC §3).

    ``finite=True``: the float32 value must be finite (``scale_value=1e40`` would silently
    become inf, NaN would poison every output): FagValueError otherwise."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (numbers.Real, np.floating, np.integer)):
        raise FagTypeError(f"{fn}{name} must be a real number, got {type(x).__name__} {_fmt(x)}")
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            v = np.float32(x)
        except OverflowError:          # a Python int beyond float range
            v = np.float32(np.inf)
    if finite and not np.isfinite(v):
        shown = repr(x) if len(repr(x)) < 40 else f"{repr(x)[:20]}... ({len(repr(x))} digits)"
        raise FagValueError(f"{fn}{name} must be finite in float32, got {shown} (float32: "
                            f"{float(v)!r})")
    return v


def check_array(name, x, fn=""):
    """A numpy ndarray (FagTypeError otherwise; SPEC §9 array forms).

    Any strides, read-only, memmap and misaligned arrays are valid.  A numpy masked array with
    masked entries is a FagTypeError (the math has no meaning for "missing" entries and the
    raw data under the mask is garbage); one without masked entries is read as its data.
    Object and other non-numeric dtypes are rejected by the callers' dtype checks.
    """
    if not isinstance(x, np.ndarray):
        raise FagTypeError(f"{fn}{name} must be a numpy array, got {type(x).__name__}")
    if isinstance(x, np.ma.MaskedArray) and np.ma.getmask(x) is not np.ma.nomask \
            and bool(np.ma.getmask(x).any()):
        raise FagTypeError(f"{fn}{name} is a numpy masked array with "
                           f"{int(np.ma.getmask(x).sum())} masked entries; pass a plain array "
                           f"(fill the masked entries, or mask them with atten_mask)")
    return x


def plain(x):
    """The plain ndarray behind an (already checked) array argument: the data of a masked
    array without masked entries, other arrays unchanged."""
    if isinstance(x, np.ma.MaskedArray):
        return np.ma.getdata(x)
    return x


def check_layout(input_layout, fn=""):
    """Parse input_layout (case-insensitive) into one of config.LAYOUTS."""
    if not isinstance(input_layout, str):
        raise FagTypeError(f"{fn}input_layout must be a str, got {type(input_layout).__name__} "
                           f"{_fmt(input_layout)}")
    lay = input_layout.upper()
    if lay not in config.LAYOUTS:
        raise FagValueError(f"{fn}input_layout must be one of {', '.join(config.LAYOUTS)} "
                            f"(case-insensitive), got {input_layout!r}")
    return lay


def check_qkv(arrays, layout, fn=""):
    """query/key/value(/dy): numpy arrays of one supported dtype with the layout's rank."""
    qdt = None
    for name, x in arrays:
        check_array(name, x, fn)
        if x.dtype not in dtypes.INPUT_DTYPES:
            raise FagTypeError(f"{fn}{name} dtype must be one of "
                               f"{', '.join(dtypes.INPUT_DTYPES.names)}, got {x.dtype}")
        if qdt is None:
            qdt = x.dtype
        elif x.dtype != qdt:
            raise FagTypeError(f"{fn}{name} dtype {x.dtype} must equal query's dtype {qdt}")
        if x.ndim != len(layout):
            raise FagValueError(f"{fn}{name} must have rank {len(layout)} for layout {layout}, "
                                f"got shape {x.shape}")
    return qdt


def expected_dy_shape(query, dims):
    """query's shape with the last dim replaced by Dv (N1*Dv for BSH/SBH)."""
    last = dims.N1 * dims.Dv if dims.layout in ("BSH", "SBH") else dims.Dv
    return tuple(query.shape[:-1]) + (last,)


def check_like(name, x, shape, fn="", allowed=None):
    """An array of an exact shape (dtype checked against ``allowed`` if given)."""
    check_array(name, x, fn)
    if allowed is not None and x.dtype not in allowed:
        names = getattr(allowed, "names", None) or [np.dtype(d).name for d in allowed]
        raise FagTypeError(f"{fn}{name} dtype must be one of {', '.join(names)}, got "
                           f"{x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise FagValueError(f"{fn}{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x


def check_stats(name, x, dims, fn="", convert=True):
    """softmax_max / softmax_sum as grad inputs: float32 [B,N1,S1,8|1] or [B,N1,S1]
    (TND: [T1,N1,8|1] or [T1,N1]).  Returns the lane-0 values as a float32 1-D array in
    memory order (row order of ``layout.stats_desc``); ``convert=False`` checks only (SPEC §9:
    every shape is checked before anything is converted)."""
    check_array(name, x, fn)
    if x.dtype != np.float32:
        raise FagTypeError(f"{fn}{name} must be float32, got {x.dtype}")
    base = (dims.T1, dims.N1) if dims.tnd else (dims.B, dims.N1, dims.S1)
    ok = [base + (8,), base + (1,), base]
    if tuple(x.shape) not in ok:
        raise FagValueError(f"{fn}{name} must have shape {ok[0]}, {ok[1]} or {ok[2]}, "
                            f"got {tuple(x.shape)}")
    if not convert:
        return x
    x = plain(x)
    if x.ndim == len(base) + 1:
        x = x[..., 0]
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1)


def check_lse(name, x, dims, fn=""):
    """softmax_lse as a grad input: float32 ``[B,N1,S1]`` (TND ``[T1,N1]``, rows in the
    softmax_layout order).  Returns the values as a float32 1-D array in row order."""
    check_array(name, x, fn)
    if x.dtype != np.float32:
        raise FagTypeError(f"{fn}{name} must be float32, got {x.dtype}")
    base = (dims.T1, dims.N1) if dims.tnd else (dims.B, dims.N1, dims.S1)
    if tuple(x.shape) != base:
        raise FagValueError(f"{fn}{name} must have shape {base}, got {tuple(x.shape)}")
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
