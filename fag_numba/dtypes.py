"""Compute-dtype policy: every input is converted to float32 on the host, outputs cast back once.

Numba has no CPU fp16/bf16 arithmetic (numba#4402), so fp16/bf16 (and fp8, dequantised) are
upcast here; float32 C-contiguous inputs pass through with no copy.

ml_dtypes (bfloat16, float8) is imported on first need, not with fag_numba: its import takes
~0.5 s (numpy's ufunc-loop registration is quadratic in the loops it adds), half of
``import fag_numba``.  No array can hold one of its dtypes before it is imported, so the
dtype sets below answer ``in`` for float32/float16 arrays without importing it;
``BFLOAT16``, ``FP8_E4M3``, ``FP8_E5M2`` import it when first read (module ``__getattr__``).
"""
import functools
import sys

import numpy as np

from . import _jit
from .kernels import convert

FLOAT32 = np.dtype(np.float32)
FLOAT16 = np.dtype(np.float16)
_ML_NAMES = {"BFLOAT16": "bfloat16", "FP8_E4M3": "float8_e4m3fn", "FP8_E5M2": "float8_e5m2"}


@functools.lru_cache(maxsize=None)
def _ml(name):
    """The ml_dtypes dtype of that name (imports ml_dtypes)."""
    import ml_dtypes
    return np.dtype(getattr(ml_dtypes, name))


def __getattr__(name):
    if name in _ML_NAMES:
        return _ml(_ML_NAMES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class DtypeSet:
    """A set of dtypes, some from ml_dtypes: ``dt in s`` never imports ml_dtypes (an array of
    one of its dtypes cannot exist before it is imported); iterating yields the dtypes (and
    imports it), ``names`` their names for messages."""

    def __init__(self, *names):
        self.names = names
        self._builtin = tuple(np.dtype(n) for n in names if n in ("float32", "float16"))
        self._ml = tuple(n for n in names if n not in ("float32", "float16"))

    def __contains__(self, dt):
        try:
            dt = np.dtype(dt)
        except TypeError:
            return False
        if dt in self._builtin:
            return True
        return "ml_dtypes" in sys.modules and any(dt == _ml(n) for n in self._ml)

    def __iter__(self):
        return iter(self._builtin + tuple(_ml(n) for n in self._ml))

    def __repr__(self):
        return f"DtypeSet{self.names}"


#: dtypes of query/key/value/dy (stated once; validation and tests read these)
FLOAT_DTYPES = DtypeSet("float32", "float16", "bfloat16")
FP8_DTYPES = DtypeSet("float8_e4m3fn", "float8_e5m2")
INPUT_DTYPES = DtypeSet(*FLOAT_DTYPES.names, *FP8_DTYPES.names)
BF16_DTYPES = DtypeSet("bfloat16")
#: dtypes attention_in may have in the grad (any of them, whatever the input dtype)
ATTN_IN_DTYPES = FLOAT_DTYPES


def is_bf16(dt):
    """Whether ``dt`` is bfloat16 (without importing ml_dtypes for other dtypes)."""
    return dt in BF16_DTYPES


def dtype_name(dt):
    """Readable dtype name for messages ("bfloat16", "float8_e4m3fn", ...)."""
    return np.dtype(dt).name


def writable(a):
    """``a`` itself, or a copy when it is read-only: numba types read-only arrays separately,
    so passing one would compile every driver a second time."""
    return a if a.flags.writeable else a.copy()


@functools.lru_cache(maxsize=None)
def _lut(dtype):
    """float32 value of every bit pattern of a 1-byte (fp8) dtype."""
    return np.arange(256, dtype=np.uint8).view(dtype).astype(np.float32)


@_jit.kernel
def _decode(src, lut, scale, out):
    """``out[i] = lut[src[i]] * scale`` (serial: ~0.3 ns/element, memory bound; a parallel
    version measured slower because of the thread wake-up)."""
    for i in range(src.size):
        out[i] = lut[np.intp(src[i])] * scale


def to_f32_flat(x, scale=1.0):
    """float32 C-contiguous 1-D array of ``x * scale`` (no copy when x already is a writable
    float32 C-contiguous array and scale is 1; the kernels only read it).

    fp8 inputs are decoded through a 256-entry table (exact: the table is ml_dtypes' own
    conversion of every bit pattern), 3-15x faster than ml_dtypes' ``astype``; fp16/bf16
    through ``kernels.convert.to_f32`` (bitwise ``astype``, 1.5-4x faster on one thread).
    """
    dt = np.dtype(x.dtype)
    if dt in FP8_DTYPES:
        codes = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
        out = np.empty(x.size, np.float32)
        _decode(codes, _lut(dt), np.float32(scale), out)
        return out
    if dt == FLOAT16 or is_bf16(dt):
        arr = convert.to_f32(x).reshape(-1)
    else:
        arr = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if scale != 1:
        return (arr * np.float32(scale)).astype(np.float32, copy=False)
    return writable(arr)


def from_f32(flat, shape, dtype):
    """Reshape a fresh float32 buffer and cast it to the output dtype (no copy for float32;
    bf16/fp16 through ``kernels.convert.from_f32``: bitwise ``astype``, 4-8x faster; a buffer
    already in the output dtype, as the native forward's bf16 output, is only reshaped)."""
    return cast(flat.reshape(shape), dtype)


def cast(a, dtype):
    """``a.astype(dtype, copy=False)`` (``a`` itself when it has the dtype, else a new
    array), float32 <-> bfloat16/float16 through ``kernels.convert`` (bitwise the same values,
    faster; the result is C-contiguous)."""
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return a
    if a.dtype == FLOAT32:
        return convert.from_f32(a, dtype)          # astype for dtypes it has no kernel for
    if dtype == FLOAT32:
        return convert.to_f32(a)
    return a.astype(dtype)
