"""Thread control and runtime facts.

- ``threads(n)``: context manager setting numba's thread count, restored on exit (try/finally).
- ``set_num_threads(n)``: numba.set_num_threads with validation.
- ``blas_single_thread()``: holds SciPy's OpenBLAS at one thread while a driver runs, because
  the drivers call BLAS from inside ``prange`` (nested threading oversubscribes the cores).
- ``runtime_info()``: versions, threading layer, thread count, BLAS, for reports.

Calling fag_numba from several Python threads at once needs a thread-safe numba threading
layer (``NUMBA_THREADING_LAYER=tbb`` or ``omp``); the default workqueue layer aborts on
concurrent use (numba#8563).
"""
import contextlib
import functools
import os
import platform

import numba

from . import _jit
from .errors import FagTypeError, FagValueError
from .validation import is_int


def set_num_threads(n):
    """Set the number of threads the kernels use (1 <= n <= NUMBA_NUM_THREADS)."""
    if not is_int(n):
        raise FagTypeError(f"set_num_threads: n must be an int, got {type(n).__name__}")
    if not 1 <= int(n) <= numba.config.NUMBA_NUM_THREADS:
        raise FagValueError(f"set_num_threads: n must be in [1, {numba.config.NUMBA_NUM_THREADS}]"
                            f", got {n}")
    numba.set_num_threads(int(n))


@contextlib.contextmanager
def threads(n):
    """``with fag_numba.threads(1): ...`` runs the kernels on n threads, then restores."""
    old = numba.get_num_threads()
    set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(old)


@functools.lru_cache(maxsize=1)
def _controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return None
    return ThreadpoolController()


@contextlib.contextmanager
def blas_single_thread():
    """Limit the BLAS libraries to one thread for the duration of a driver call."""
    ctl = _controller()
    if ctl is None:
        yield
        return
    with ctl.limit(limits=1, user_api="blas"):
        yield


def runtime_info():
    """A dict of the facts a benchmark or bug report needs."""
    import numpy
    import scipy

    info = {
        "fag_numba": _version(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "numba": numba.__version__,
        "scipy": scipy.__version__,
        "threads": numba.get_num_threads(),
        "max_threads": numba.config.NUMBA_NUM_THREADS,
        "threading_layer": _threading_layer(),
        "cpu": _cpu_name(),
        "cpu_features": _cpu_features(),
        **_jit.cache_info(),        # "cache" (bool) and "cache_dir"
    }
    ctl = _controller()
    if ctl is not None:
        info["blas"] = [
            {k: lib.info().get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for lib in ctl.lib_controllers if lib.user_api == "blas"
        ]
    return info


def _version():
    from . import __version__
    return __version__


def _threading_layer():
    try:
        return numba.threading_layer()
    except ValueError:
        return "(not initialised yet: no parallel kernel has run)"


def _cpu_features():
    """The SIMD features that matter to the kernels (AVX2/AVX-512/AMX/FMA/F16C flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    keep = ("avx", "amx", "fma", "f16c")
                    return sorted(x for x in flags if x.startswith(keep))
    except OSError:
        pass
    return []


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
