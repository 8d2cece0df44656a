"""Long runs on one machine (SPEC §12): the log-sum-exp form and the chunked driver.

- :func:`softmax_lse`: ``lse = m + log(l)`` from the forward's statistics (the form ring and
  chunked callers merge in), ``-inf`` for invalid rows.

No torch here; ``fag_numba.torch.ring`` builds on the same pieces.
"""
import math

import numpy as np

from . import _jit, dtypes, validation
from .errors import FagTypeError, FagValueError

_FLT_MAX = np.float32(3.4028234663852886e38)


@_jit.kernel
def _lse_rows(m, l, out):
    """``out = m + log(l)`` (float32), ``-inf`` where ``m == -FLT_MAX`` (invalid row).

    The same float32 expression as ``kernels.driver.rowstats_driver``, so the grad gets the
    identical lse from ``softmax_lse=`` as from ``softmax_max``/``softmax_sum`` (numpy's float32
    log differs from it in the last bit for ~3% of values).
    """
    for i in range(m.size):
        if m[i] == -_FLT_MAX:
            out[i] = -np.inf
        else:
            out[i] = m[i] + np.float32(math.log(l[i]))


def _lane_free_shape(shape):
    """Statistics shape -> lse shape (SPEC §3, §12): the lane axis (8 or 1) is dropped.

    4-D ``[B,N1,S1,8|1]`` -> ``[B,N1,S1]``; 3-D with last dim 8 or 1 is TND ``[T1,N1,8|1]`` ->
    ``[T1,N1]``; other 3-D ``[B,N1,S1]`` and 2-D ``[T1,N1]`` are already lane-free.
    """
    if len(shape) == 4 and shape[-1] in (1, 8):
        return tuple(shape[:-1])
    if len(shape) == 3 and shape[-1] in (1, 8):
        return tuple(shape[:-1])
    if len(shape) in (2, 3):
        return tuple(shape)
    return None


def softmax_lse(softmax_max, softmax_sum):
    """Log-sum-exp of each row from the forward's statistics: ``lse = m + log(l)``.

    Parameters
    ----------
    softmax_max, softmax_sum : ndarray
        float32 statistics of :func:`fag_numba.flash_attention_score`: ``[B,N1,S1,8]``,
        ``[B,N1,S1,1]`` or ``[B,N1,S1]``; TND ``[T1,N1,8]``, ``[T1,N1,1]`` or ``[T1,N1]``.
        Lane 0 is read.  A 3-D array whose last dim is 8 or 1 is read as TND with lanes (the
        forward always returns 8 lanes; pass ``[B,N1,S1]`` statistics with S1 in {1, 8} as
        ``[B,N1,S1,1]`` to avoid the ambiguity).

    Returns
    -------
    ndarray
        float32 ``[B,N1,S1]`` (TND ``[T1,N1]``, rows in the same memory order as the
        statistics, i.e. the softmax_layout's order); ``-inf`` for invalid rows
        (``softmax_max == -FLT_MAX``).  This is the grad's ``softmax_lse=`` input.
    """
    fn = "softmax_lse: "
    for name, x in (("softmax_max", softmax_max), ("softmax_sum", softmax_sum)):
        validation.check_array(name, x, fn)
        if x.dtype != np.float32:
            raise FagTypeError(f"{fn}{name} must be float32, got {x.dtype}")
        if _lane_free_shape(x.shape) is None:
            raise FagValueError(f"{fn}{name} must have shape [B,N1,S1,8|1], [B,N1,S1], "
                                f"[T1,N1,8|1] or [T1,N1], got {tuple(x.shape)}")
    if softmax_max.shape != softmax_sum.shape:
        raise FagValueError(f"{fn}softmax_sum shape {tuple(softmax_sum.shape)} must equal "
                            f"softmax_max shape {tuple(softmax_max.shape)}")
    shape = _lane_free_shape(softmax_max.shape)

    def lane0(x):
        if len(shape) < x.ndim:
            x = x[..., 0]
        return dtypes.writable(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))

    m = lane0(softmax_max)
    l = lane0(softmax_sum)
    out = np.empty(m.size, np.float32)
    if out.size:
        _lse_rows(m, l, out)
    return out.reshape(shape)

