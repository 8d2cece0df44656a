"""Thread control and runtime facts.

- ``threads(n)``: context manager setting numba's thread count, restored on exit (try/finally).
- ``set_num_threads(n)``: numba.set_num_threads with validation.
- ``blas_single_thread()``: holds SciPy's OpenBLAS at one thread while a driver runs, because
  the drivers call BLAS from inside ``prange`` (nested threading oversubscribes the cores).
- ``runtime_info()``: versions, threading layer, thread count, BLAS, for reports.

Calling fag_numba from several Python threads at once works on every machine: with numba's
``omp`` or ``tbb`` layer the calls run concurrently; on the ``workqueue`` fallback (which aborts
on concurrent use, numba#8563) they are serialised by a lock.  A process forked after a call
(``omp`` layer: GNU OpenMP is not fork-safe) raises FagError at its first call instead of being killed or
hanging; ``tbb`` is fork-safe.
"""
import contextlib
import functools
import os
import platform
import threading

import numba

from . import _jit
from .errors import FagError, FagTypeError, FagValueError
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


# Concurrent calls from Python threads (issue 13): the BLAS limit is one shared state, so it is
# taken by the first active call and restored by the last (a refcount under a lock); a plain
# per-call save/restore interleaved across threads restored the limit of 1 "saved" by another
# call and left the user's numpy/SciPy at one thread.
_blas_lock = threading.Lock()
_blas_depth = 0
_blas_limiter = None
# numba's workqueue layer (the fallback where neither TBB nor an OpenMP runtime is found)
# aborts the process on concurrent parallel launches: calls are serialised there.
_serial_lock = threading.RLock()
_parent_pid = os.getpid()
_forked_after_use = False


def _after_fork_in_child():
    """A forked child of a process whose OpenMP pool already ran cannot launch parallel work
    (GNU OpenMP is not fork-safe: numba terminates the child); remember that."""
    global _forked_after_use, _blas_depth, _blas_limiter, _blas_lock, _serial_lock
    _blas_lock = threading.Lock()        # locks held by other threads at fork time are dead
    _serial_lock = threading.RLock()
    _blas_depth = 0
    _blas_limiter = None
    if _layer_or_none() == "omp":        # tbb and workqueue are fork-safe
        _forked_after_use = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _layer_or_none():
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def _check_fork():
    if _forked_after_use:
        raise FagError(
            f"fag_numba cannot run in this process: it was forked (os.fork, multiprocessing "
            f"'fork' start method, ProcessPoolExecutor, DataLoader workers) from a process that "
            f"had already run fag_numba with numba's {_layer_or_none()!r} threading layer, which "
            f"is not fork-safe. Use the 'spawn' or 'forkserver' start method "
            f"(multiprocessing.set_start_method('spawn'), DataLoader(multiprocessing_context="
            f"'spawn')), or set NUMBA_THREADING_LAYER=tbb (pip install tbb) before the parent "
            f"imports numba")


@contextlib.contextmanager
def blas_single_thread():
    """Around every driver call: refuse in an unsafe forked child (FagError, never a hang),
    serialise calls on numba's workqueue layer, and hold the BLAS libraries at one thread
    while any call runs (the drivers call BLAS inside prange), restored when the last ends."""
    global _blas_depth, _blas_limiter
    _check_fork()
    layer = _layer_or_none()
    serial = layer is None or layer == "workqueue"     # None: first launch, layer not chosen yet
    ctl = _controller()
    if serial:
        _serial_lock.acquire()
    try:
        if ctl is not None:
            with _blas_lock:
                if _blas_depth == 0:
                    _blas_limiter = ctl.limit(limits=1, user_api="blas")
                _blas_depth += 1
        try:
            yield
        finally:
            if ctl is not None:
                with _blas_lock:
                    _blas_depth -= 1
                    if _blas_depth == 0 and _blas_limiter is not None:
                        _blas_limiter.restore_original_limits()
                        _blas_limiter = None
    finally:
        if serial:
            _serial_lock.release()


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
