"""The only place that calls ``numba.njit`` (STYLE b4).

``kernel`` is for serial kernels and helpers, ``driver`` for the ``parallel=True`` drivers in
``kernels/driver.py``.  Both use ``error_model="numpy"`` (float division by zero gives inf/nan
instead of raising) and the curated ``config.FASTMATH_FLAGS`` set, never blanket fastmath,
because ``nnan``/``ninf`` would let LLVM break the ``-inf`` masking and NaN propagation.
Caching is opt-in through ``FAG_NUMBA_CACHE=1`` (``NUMBA_CACHE_DIR`` chooses the directory).
"""
import numba

from . import config

_COMMON = dict(nogil=True, error_model="numpy", fastmath=set(config.FASTMATH_FLAGS),
               cache=config.CACHE)


def kernel(fn=None, **extra):
    """Decorate a serial njit kernel (inlined where ``inline="always"`` is passed)."""
    opts = dict(_COMMON, **extra)
    if fn is None:
        return lambda f: numba.njit(**opts)(f)
    return numba.njit(**opts)(fn)


def driver(fn):
    """Decorate a parallel driver: the only ``parallel=True`` functions of the package."""
    return numba.njit(parallel=True, **_COMMON)(fn)
