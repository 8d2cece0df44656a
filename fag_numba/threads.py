"""Thread control, the chunk runner, and runtime facts.

- ``run_chunks(kernel, n, args)``: the parallel level of fag_numba: chunk t of a plan runs as
  ``kernel(t, *args)`` on its own Python thread (serial nogil numba kernels, so truly parallel).
- ``threads(n)``: context manager setting the thread count (numba's), restored on exit.
- ``set_num_threads(n)``: numba.set_num_threads with validation; ``num_threads()``: the count
  the plans use (numba's, of the calling thread).
- ``blas_single_thread()``: holds SciPy's OpenBLAS at one thread while a driver runs, because
  the chunk kernels call BLAS from several threads at once (nested threading oversubscribes).
- ``runtime_info()``: versions, threading model, thread count, BLAS, for reports.

fag_numba does not use numba's threading layers (no ``parallel=True``): calling it from several
Python threads at once works on every machine, and a forked child (os.fork, multiprocessing's
'fork' start method, ProcessPoolExecutor, DataLoader workers) computes normally, because the
only threads involved are Python threads that the child recreates on first use.
"""
import contextlib
import functools
import os
import platform
import threading

import numba

from . import _jit, omp
from .errors import FagTypeError, FagValueError
from .validation import is_int


def num_threads():
    """The thread count of the calling thread: ``numba.get_num_threads()`` once numba's
    threading layer runs (``numba.set_num_threads`` / ``fag_numba.set_num_threads`` start it),
    else ``NUMBA_NUM_THREADS`` (numba's default), read without starting the layer: starting it
    loads an OpenMP runtime that fag_numba itself never uses (and that would shadow torch's own
    libgomp when torch is imported later, see the README's import-order note)."""
    from numba.np.ufunc import parallel as _parallel
    if getattr(_parallel, "_is_initialized", True):
        return numba.get_num_threads()
    return numba.config.NUMBA_NUM_THREADS


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
_blas_saved = None
# The chunk runner's worker threads (created on first use; a forked child starts a new pool:
# the parent's threads do not exist there).
_pool_lock = threading.Lock()
_pool = None


def _after_fork_in_child():
    """Locks held by other threads at fork time are dead in the child, and so are the pool's
    threads: start from scratch (the child then computes normally: no OpenMP runtime is used)."""
    global _blas_depth, _blas_saved, _blas_lock, _pool_lock, _pool, _tls
    _blas_lock = threading.Lock()
    _tls = threading.local()
    _pool_lock = threading.Lock()
    _blas_depth = 0
    _blas_saved = None
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# Run once in each pool thread before its next chunk (``set_thread_setup``): mkl.py's MKL
# thread count of 1 for the threads that call MKL.  _setup_gen counts the hooks set, so a thread runs
# a hook set after its last chunk too.
_thread_setup = None
_setup_gen = 0
_tls = threading.local()


def set_thread_setup(fn):
    """Have every pool thread call ``fn()`` once before its next chunk (idempotent per fn)."""
    global _thread_setup, _setup_gen
    if _thread_setup is not fn:
        _thread_setup = fn
        _setup_gen += 1


def _task(kernel, t, args):
    """One chunk on a pool thread, after the thread's setup hook if it has not run it yet."""
    if _thread_setup is not None and getattr(_tls, "gen", 0) != _setup_gen:
        _thread_setup()
        _tls.gen = _setup_gen
    kernel(t, *args)


def _workers():
    global _pool
    with _pool_lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor
            _pool = ThreadPoolExecutor(max(1, numba.config.NUMBA_NUM_THREADS - 1),
                                       thread_name_prefix="fag_numba")
        return _pool


def run_chunks(kernel, nchunks, args):
    """Run ``kernel(t, *args)`` for every chunk t in ``range(nchunks)``, concurrently: chunk 0
    on the calling thread, the others on the worker pool.  The kernels are serial ``nogil``
    numba functions, so the chunks run in parallel on separate cores.

    This replaces numba's ``parallel=True``/``prange`` drivers (STYLE b3/b4, deviation written
    down here and in the README): a parallel function costs ~6 s of extra cold compile (numba
    outlines the prange body into a gufunc and re-optimises every callee linked into it), and
    Python threads make calls from several Python threads, and forked children, safe on every
    machine without choosing a numba threading layer (GNU OpenMP is not fork-safe; the
    workqueue layer aborts on concurrent use).  The plan has one chunk per thread
    (``planning.py``), so this costs one task hand-off per extra thread per call.  Every chunk
    is waited for before returning, even when one raises (they write into the caller's
    outputs); the first exception is then re-raised.
    """
    team = omp.use_for_call()          # (validates config.CHUNK_RUNNER on every call)
    if nchunks <= 1:
        if nchunks == 1:
            kernel(0, *args)
        return
    if team:
        omp.run(kernel, nchunks, args, _thread_setup)
        return
    futures = [_workers().submit(_task, kernel, t, args) for t in range(1, nchunks)]
    error = None
    try:
        kernel(0, *args)
    except BaseException as exc:         # noqa: BLE001 - re-raised after the others finish
        error = exc
    for f in futures:
        try:
            f.result()
        except BaseException as exc:     # noqa: BLE001
            error = error or exc
    if error is not None:
        raise error


@functools.lru_cache(maxsize=1)
def _blas_libs():
    """threadpoolctl's controllers of the loaded BLAS libraries (found once, with the
    controller)."""
    ctl = _controller()
    if ctl is None:
        return ()
    return tuple(lib for lib in ctl.lib_controllers if lib.user_api == "blas")


@contextlib.contextmanager
def blas_single_thread():
    """Around every driver call: hold the BLAS libraries at one thread while any call runs (the
    chunk kernels call BLAS from several threads at once), restored when the last call ends.

    Each library's own get/set_num_threads, not ``ThreadpoolController.limit``: the limiter
    object and its info dicts cost ~30 us per call, noticeable on small calls; a library
    already at one thread is not touched."""
    global _blas_depth, _blas_saved
    libs = _blas_libs()
    if libs:
        with _blas_lock:
            if _blas_depth == 0:
                saved = [(lib, lib.num_threads) for lib in libs]
                for lib, n in saved:
                    if n != 1:
                        lib.set_num_threads(1)
                _blas_saved = saved
            _blas_depth += 1
    try:
        yield
    finally:
        if libs:
            with _blas_lock:
                _blas_depth -= 1
                if _blas_depth == 0 and _blas_saved is not None:
                    for lib, n in _blas_saved:
                        if n != 1:
                            lib.set_num_threads(n)
                    _blas_saved = None


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
        "threads": num_threads(),
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
    """How the main thread's calls run their chunks in parallel (kept under this key for
    reports and tests): "torch-openmp" (``omp.py``: torch imported) or "python-threads"."""
    try:
        return "torch-openmp" if omp.use_for_call() else "python-threads"
    except FagValueError:
        return "python-threads"


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
