"""The float32 products on torch's bundled MKL (``config.FLOAT32_BLAS``, default "auto").

torch's CPU wheels link MKL into ``libtorch_cpu.so`` and export its Fortran ``sgemm_`` (LP64).
At the kernels' tile shapes it runs at 1.16-1.35x the GFLOP/s of SciPy's OpenBLAS, one thread
(``benchmarks/blas_peer.py``); the BLAS drivers spend ~75% of a float32 call in sgemm.  So when
the process has imported torch (fag_numba never imports it for this), the BLAS drivers call
that ``sgemm_`` through its address (``desc.SGEMM``: passed at run time, so the on-disk kernel
cache never holds a process's address; ``tile.gemm``).

MKL runs on torch's OpenMP (libgomp): called from a thread with the default settings, it
would start a team of threads inside every product (torch.set_num_threads(n) sets MKL's
global count), on top of fag_numba's own chunk threads: measured 2x slower.  So every thread
that runs chunks gets MKL's thread-local count of 1 (``MKL_Set_Num_Threads_Local``, which
overrides the global one for that thread only) while MKL is in use: the pool's worker threads
once (``threads.run_chunks``' per-thread setup, which touches only those threads), the calling
thread for the duration of the driver (:func:`float32_gemm`: its previous setting restored
after, so the caller's own torch ops keep their threads).
"""
import contextlib
import ctypes

from . import config
from ._torchlib import TorchLib
from .errors import FagValueError
from .kernels import desc

_auto = None           # "auto": whether this process uses MKL (set at the first BLAS call)


def _open(path):
    """(MKL's ``sgemm_`` address, its ``MKL_Set_Num_Threads_Local``) in ``libtorch_cpu.so``."""
    lib = ctypes.CDLL(path)
    addr = ctypes.cast(lib.sgemm_, ctypes.c_void_p).value
    # MKL's C interface, by value (``mkl_set_num_threads_local``, lower case, is the Fortran
    # one here: by reference); returns the thread's previous setting
    local = lib.MKL_Set_Num_Threads_Local
    local.argtypes = [ctypes.c_int]
    local.restype = ctypes.c_int
    return (addr, local) if addr else None


_mkl = TorchLib("libtorch_cpu.so", _open)


def _load():
    """(torch's MKL ``sgemm_`` address, its ``MKL_Set_Num_Threads_Local``), or None (torch
    not imported, not Linux, or no exported ``sgemm_``)."""
    return _mkl.get()


def sgemm_address():
    """The address of the ``sgemm_`` the BLAS drivers call (``config.FLOAT32_BLAS``), or 0 for
    SciPy's OpenBLAS.  "auto" decides once per process, at the first call that gets here: MKL
    when torch is imported by then.  "mkl" without torch's MKL is a FagValueError naming the
    setting."""
    mode = str(config.FLOAT32_BLAS).strip().lower()
    if mode == "openblas":
        return 0
    if mode not in ("auto", "mkl"):
        raise FagValueError(f"config.FLOAT32_BLAS (env FAG_NUMBA_FLOAT32_BLAS) must be 'auto', "
                            f"'openblas' or 'mkl', got {config.FLOAT32_BLAS!r}")
    from numba.core import config as nconfig
    global _auto
    found = None if nconfig.DISABLE_JIT else _load()
    if mode == "auto":
        # decided once per process, at the first BLAS-driver call: repeated calls stay
        # bitwise identical (SPEC §9b) even if torch is imported later
        if _auto is None:
            _auto = found is not None
        if not _auto:
            return 0
    if found is None:
        if mode == "mkl":
            raise FagValueError("config.FLOAT32_BLAS is 'mkl', but no MKL sgemm_ was found: it "
                                "needs torch's CPU wheel imported first (libtorch_cpu.so on "
                                "Linux)")
        return 0
    return found[0]


def _one_thread():
    """A chunk thread's MKL thread count of 1 (``threads.run_chunks`` setup hook); returns
    the undo (the OpenMP runner restores the setting of torch's threads after their chunks)."""
    found = _load()
    if found is not None:
        saved = found[1](1)
        return lambda: found[1](saved)
    return None


@contextlib.contextmanager
def float32_gemm(gp):
    """Around a BLAS driver call: ``gp[desc.SGEMM]`` set (:func:`sgemm_address`); with MKL,
    the calling thread's MKL thread count held at 1 and the pool threads' set up to be."""
    addr = sgemm_address()
    gp[desc.SGEMM] = addr
    if not addr:
        yield
        return
    from .threads import set_thread_setup
    set_thread_setup(_one_thread)
    local = _load()[1]
    saved = local(1)
    try:
        yield
    finally:
        local(saved)
