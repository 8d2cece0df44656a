"""Compute-dtype policy: every input is converted to float32 on the host, outputs cast back once.

Numba has no CPU fp16/bf16 arithmetic (numba#4402), so fp16/bf16 (and fp8, dequantised) are
upcast here; float32 C-contiguous inputs pass through with no copy.
"""
import ml_dtypes
import numpy as np

FLOAT32 = np.dtype(np.float32)
FLOAT16 = np.dtype(np.float16)
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FP8_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_E5M2 = np.dtype(ml_dtypes.float8_e5m2)

#: dtypes of query/key/value/dy (stated once; validation and tests read these)
FLOAT_DTYPES = (FLOAT32, FLOAT16, BFLOAT16)
FP8_DTYPES = (FP8_E4M3, FP8_E5M2)
INPUT_DTYPES = FLOAT_DTYPES + FP8_DTYPES
#: dtypes attention_in may have in the grad (any of them, whatever the input dtype)
ATTN_IN_DTYPES = FLOAT_DTYPES


def dtype_name(dt):
    """Readable dtype name for messages ("bfloat16", "float8_e4m3fn", ...)."""
    return np.dtype(dt).name


def writable(a):
    """``a`` itself, or a copy when it is read-only: numba types read-only arrays separately,
    so passing one would compile every driver a second time."""
    return a if a.flags.writeable else a.copy()


def to_f32_flat(x):
    """float32 C-contiguous 1-D view of ``x`` (no copy when x already is a writable float32
    C-contiguous array; the kernels only read it)."""
    return writable(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))


def from_f32(flat, shape, dtype):
    """Reshape a fresh float32 buffer and cast it to the output dtype (no copy for float32)."""
    arr = flat.reshape(shape)
    if np.dtype(dtype) == FLOAT32:
        return arr
    return arr.astype(dtype)
