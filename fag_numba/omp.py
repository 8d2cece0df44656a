"""Chunks on torch's OpenMP threads (``config.CHUNK_RUNNER``, default "auto").

Why: torch's CPU ops run on GNU OpenMP (the ``libgomp.so.1`` its wheel bundles), whose worker
threads spin for a while after every parallel region (libgomp's default wait policy).  A
fag_numba call right after a torch op then shares the cores with those spinning workers: a bf16
forward (2,16,512,64) took 6.2 ms after a torch call against 2.9 ms alone (2 cores).  Handing our
chunks to that same team (``GOMP_parallel``) puts the spinning workers to work on them instead,
as torch's own next op would.

How: one ctypes callback ``_body(key)`` runs on every thread of the team: thread i of n runs the
chunks i, i + n, ... of the job ``_jobs[key]`` (so a smaller team, e.g. a call from inside a
parallel region, still runs them all).  The chunk kernels are ``nogil`` numba functions, so the
GIL is held only for the call into the kernel.  Each thread of the team runs the
``threads.set_thread_setup`` hook around its chunks (MKL's thread-local count of 1), restored
after: the team's workers are torch's.

When (``use_for_call``): torch imported, its libgomp loaded, the calling thread is the main
thread (torch's team belongs to the thread that runs torch's ops; other Python threads keep the
fag_numba pool, so concurrent calls never start one OpenMP team per thread), and the process
can use the team safely (below).

Fork: libgomp has no fork handler; a child forked after its team ran on the forking thread hangs
at its next parallel region (torch's own ops too).  So before every ``os.fork`` while torch is
imported, the forking thread's team is released (``omp_pause_resource_all``, as
OpenMP 5 defines it; torch's next op starts a new team, ~0.1 ms), and a child of a
``multiprocessing`` parent (where the fork may have come before fag_numba was imported) never
uses the team.  A raw ``os.fork`` made after torch ran and before fag_numba was imported is not
detectable: there ``config.CHUNK_RUNNER = "threads"`` (env ``FAG_NUMBA_CHUNK_RUNNER``) keeps
fag_numba off OpenMP; torch's own ops hang in such a child anyway.
"""
import ctypes
import itertools
import os
import sys
import threading

from . import config
from ._torchlib import TorchLib
from .errors import FagValueError

_used = False          # this process ran chunks on the team (for reports and tests)
_child_ok = True       # False in a child whose parent's team could not be released
_pause_ok = True       # the last fork's release of the team succeeded (read in the child)
_jobs = {}                # key -> (kernel, args, nchunks, errors, setup) of a running call
_keys = itertools.count(1)  # (next() is atomic under the GIL)
_OMP_PAUSE_HARD = 2


def _open(path):
    """The libgomp entry points of ``path`` (torch's ``libgomp.so.1``), if this process has
    loaded it (torch's ops run on that one)."""
    if not _mapped(path):
        return None
    lib = ctypes.CDLL(path)                  # GOMP_parallel: releases the GIL
    fast = ctypes.PyDLL(path)                # trivial queries: keep the GIL
    par = lib.GOMP_parallel
    par.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    par.restype = None
    tnum, tcount = fast.omp_get_thread_num, fast.omp_get_num_threads
    tnum.restype = tcount.restype = ctypes.c_int
    pause = fast.omp_pause_resource_all
    pause.argtypes = [ctypes.c_int]
    pause.restype = ctypes.c_int
    return par, tnum, tcount, pause


_gomp = TorchLib("libgomp.so.1", _open)


def _load():
    """(GOMP_parallel, omp_get_thread_num, omp_get_num_threads, omp_pause_resource_all) of
    torch's libgomp, or None."""
    return _gomp.get()


def _mapped(path):
    """Whether ``path`` is already loaded in this process (torch's ops run on that one)."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/maps") as f:
            return any(real in line for line in f)
    except OSError:
        return False


def use_for_call():
    """Whether this call's chunks run on torch's OpenMP team (``config.CHUNK_RUNNER``)."""
    mode = str(config.CHUNK_RUNNER).strip().lower()
    if mode == "threads":
        return False
    if mode not in ("auto", "openmp"):
        raise FagValueError(f"config.CHUNK_RUNNER (env FAG_NUMBA_CHUNK_RUNNER) must be 'auto', "
                            f"'openmp' or 'threads', got {config.CHUNK_RUNNER!r}")
    from numba.core import config as nconfig
    if nconfig.DISABLE_JIT or not _child_ok:
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    if "torch" not in sys.modules:
        return False
    return _load() is not None


def _body(key):
    """One thread of the team: its share of the job's chunks.  Nothing may escape: ctypes would
    print an escaping error and drop it, and the caller would return with chunks not run."""
    kernel, args, nchunks, errors, setup = _jobs[key]
    try:
        _, tnum, tcount, _ = _load()
        first = tnum()
        if first and not getattr(_pinned, "done", False):
            _pin()
        undo = setup() if setup is not None else None
        try:
            for t in range(first, nchunks, max(1, tcount())):
                try:
                    kernel(t, *args)
                except BaseException as exc:     # noqa: BLE001 - re-raised by run()
                    errors.append(exc)
        finally:
            if undo is not None:
                undo()
    except BaseException as exc:                 # noqa: BLE001 - the setup hook's own errors
        errors.append(exc)


_pinned = threading.local()


def _pin():
    """Keep this worker's Python thread state between callbacks.  ctypes creates one for a
    foreign thread at each callback and deletes it after (PyGILState_Ensure / _Release); one
    extra Ensure, never released, keeps it: a no-op run of 2 chunks took 51 -> 24 us.  The
    state of a worker that later exits (a released team, see fork below) stays allocated (a few
    KB per worker per release)."""
    ctypes.pythonapi.PyGILState_Ensure()
    _pinned.done = True


_callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_body)


def run(kernel, nchunks, args, setup):
    """``kernel(t, *args)`` for t in range(nchunks) on the calling thread's OpenMP team of
    ``nchunks`` threads; the first error re-raised once every chunk is done."""
    global _used
    par = _load()[0]
    errors = []
    key = next(_keys)
    _jobs[key] = (kernel, args, nchunks, errors, setup)
    _used = True
    try:
        par(_callback, key, nchunks, 0)
    finally:
        del _jobs[key]
    if errors:
        raise errors[0]


def _before_fork():
    """Release the forking thread's team, so the child's libgomp starts from scratch instead of
    waiting for threads that do not exist there.  Whenever torch is imported, not only after
    fag_numba used the team: torch's own ops may have started it, and the child's calls would
    otherwise hang on it (torch's next op in the parent starts a new team)."""
    global _pause_ok
    _pause_ok = True
    if "torch" in sys.modules:
        try:
            lib = _load()
            if lib is not None:
                _pause_ok = lib[3](_OMP_PAUSE_HARD) == 0
        except Exception:                    # noqa: BLE001 - never block a fork
            _pause_ok = False


def _after_fork_in_child():
    global _jobs, _child_ok
    _jobs = {}
    _child_ok = _child_ok and _pause_ok


def _parent_is_multiprocessing():
    """A ``multiprocessing`` child: forked before fag_numba was imported, the parent's team may
    be broken here."""
    try:
        import multiprocessing
        return multiprocessing.parent_process() is not None
    except Exception:                        # noqa: BLE001
        return False


if _parent_is_multiprocessing():
    _child_ok = False
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
