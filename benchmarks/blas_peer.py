"""sgemm at the kernels' tile shapes: SciPy's OpenBLAS (what the float32 path calls) against the
MKL that torch's CPU wheel bundles (``sgemm_`` exported by ``libtorch_cpu.so``), one thread each.

Usage (needs torch: ``pip install torch==2.13.0``)::

    python benchmarks/blas_peer.py

Why: the float32 forward and backward spend 71-77% of their samples in OpenBLAS's sgemm, and
torch, the peer they are compared with, runs its products on MKL.  Measured 2026-12-06 on the
2-core Xeon (AMX class), one thread, row-major C = op(A) op(B) through ctypes (~2 us per call,
included): MKL 1.16-1.36x OpenBLAS's GFLOP/s at the forward's and backward's tile shapes (e.g.
384 x 256 x 64 (A B^T): 135 vs 173 GFLOP/s).  fag_numba does not call MKL yet: the open points
are in the README (*Where the remaining gaps are*).  Both results are checked against numpy.
"""
from __future__ import annotations

import ctypes
import glob
import os
import time

import numpy as np

# (m, n, k, op(A), op(B)) of the products: forward S = Q K^T and P V, backward dV = P^T dY etc.
SHAPES = [(384, 256, 64, "N", "T"), (384, 64, 256, "N", "N"), (512, 256, 64, "N", "T"),
          (512, 64, 256, "N", "N"), (256, 256, 128, "N", "T"), (256, 128, 256, "N", "N"),
          (128, 256, 64, "N", "T"), (256, 64, 128, "T", "N"), (256, 128, 256, "T", "N")]


def _openblas_sgemm():
    """SciPy's OpenBLAS ``scipy_sgemm_`` (LP64)."""
    import scipy
    libs = glob.glob(os.path.join(os.path.dirname(scipy.__file__) + ".libs",
                                  "libscipy_openblas*.so"))
    if not libs:
        raise SystemExit("SciPy's bundled OpenBLAS not found (scipy.libs/libscipy_openblas*.so)")
    return ctypes.CDLL(libs[0]).scipy_sgemm_


def _mkl_sgemm():
    """torch's bundled MKL ``sgemm_`` (LP64; torch's thread count set to 1 by the caller)."""
    import torch
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    try:
        return lib.sgemm_
    except AttributeError:
        raise SystemExit("this torch build exports no sgemm_ (no bundled MKL)") from None


def _gflops(f, m, n, k, ta, tb, rng):
    """(GFLOP/s, correct) of row-major ``C = op(A) op(B)`` through the Fortran interface (the
    column-major product C^T = op(B)^T op(A)^T, as ``kernels/tile.gemm``)."""
    a = rng.standard_normal((m, k) if ta == "N" else (k, m)).astype(np.float32)
    b = rng.standard_normal((n, k) if tb == "T" else (k, n)).astype(np.float32)
    c = np.zeros((m, n), np.float32)
    i32, ref = ctypes.c_int, ctypes.byref

    def ptr(x):
        return x.ctypes.data_as(ctypes.c_void_p)
    args = (ref(ctypes.c_char(tb.encode())), ref(ctypes.c_char(ta.encode())), ref(i32(n)),
            ref(i32(m)), ref(i32(k)), ref(ctypes.c_float(1)), ptr(b),
            ref(i32(k if tb == "T" else n)), ptr(a), ref(i32(k if ta == "N" else m)),
            ref(ctypes.c_float(0)), ptr(c), ref(i32(n)))
    f(*args)
    want = (a if ta == "N" else a.T) @ (b.T if tb == "T" else b)
    ok = bool(np.allclose(c, want, atol=2e-3))
    reps = max(50, int(1e9 / (2 * m * n * k)))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            f(*args)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * m * n * k / best / 1e9, ok


def main() -> int:
    import torch                      # before the BLAS limit: its MKL runs on its OpenMP
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    ob, mkl = _openblas_sgemm(), _mkl_sgemm()
    rng = np.random.default_rng(0)
    print("(m, n, k, opA, opB)      OpenBLAS      MKL   MKL/OpenBLAS   (GFLOP/s, 1 thread)")
    with threadpool_limits(1, user_api="blas"):
        for m, n, k, ta, tb in SHAPES:
            g_ob, ok_ob = _gflops(ob, m, n, k, ta, tb, rng)
            g_mkl, ok_mkl = _gflops(mkl, m, n, k, ta, tb, rng)
            flag = "" if ok_ob and ok_mkl else "  WRONG RESULT"
            print(f"({m}, {n}, {k}, {ta}, {tb})".ljust(24)
                  + f"{g_ob:8.0f} {g_mkl:8.0f} {g_mkl / g_ob:10.2f}{flag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
