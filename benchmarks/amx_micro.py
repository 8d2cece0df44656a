"""Single-thread GFLOP/s of one bf16 tile product at the flash tile shapes: AMX (kernels/amx.py)
vs the AVX512_BF16 register-block micro-kernel (kernels/native.py, ``product_bf16``) vs OpenBLAS
sgemm on float32 (scipy).  C (M x N, float32) = A (M x K) . B (K x N); the bf16 B operand is in
VNNI pairs (packed once, outside the timing, as the drivers pack it once per key block).

Run under the shared lock:  flock /tmp/bench.lock python benchmarks/amx_micro.py
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_dtypes  # noqa: E402
import numba  # noqa: E402
import numpy as np  # noqa: E402
from scipy.linalg import blas  # noqa: E402

from fag_numba import isa  # noqa: E402

SHAPES = [(96, 128, 64), (128, 128, 64), (128, 256, 128), (384, 256, 64), (256, 64, 256)]


def _aligned(x):
    """A copy of the flat array ``x`` starting on a 64-byte line (numpy's large arrays start
    16 bytes past one: split-line tile rows measured 560-1000 instead of 1100-1670 GFLOP/s)."""
    buf = np.empty(x.nbytes + 64, np.uint8)
    skip = -buf.ctypes.data % 64
    out = buf[skip:skip + x.nbytes].view(x.dtype)
    out[:] = x.reshape(-1)
    return out


def _pairs(b):
    kp, n = b.shape[0] // 2, b.shape[1]
    out = np.empty((kp, n, 2), np.uint16)
    out[:, :, 0] = b[0::2].view(np.uint16)
    out[:, :, 1] = b[1::2].view(np.uint16)
    return _aligned(np.ascontiguousarray(out.reshape(kp, n * 2).view(np.uint32)).reshape(-1))


def _best(fn, reps, rounds=7):
    fn(1)
    best = np.inf
    for _ in range(rounds):
        t = time.perf_counter()
        fn(reps)
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def main():
    from fag_numba.kernels import native
    amx = None
    if isa.amx_available():
        from fag_numba.kernels import amx

        @numba.njit(nogil=True)
        def run_amx(reps, c, m, n, a, kp, b, cfg):
            for _ in range(reps):
                amx.product_amx(c, 0, n, m, n, a, 0, kp, b, 0, n, kp, False, cfg)

    have_bf16 = isa.target_has("avx512bf16", "avx512f", "avx512bw", "fma")
    if have_bf16:
        @numba.njit(nogil=True)
        def run_bf16(reps, c, m, n, a, kp, b):
            for _ in range(reps):
                native.product_bf16(c, 0, n, m, n, a, 0, kp, 1, 4 * kp, b, 0, n, kp, False)

    rng = np.random.default_rng(0)
    print(f"load: {os.getloadavg()}")
    print(f"{'M x N x K':>16} {'amx':>8} {'avx512bf16':>11} {'sgemm':>8}  GFLOP/s (1 thread, best of 7)"
          "   max|amx-f64|/max|f64|")
    for m, n, k in SHAPES:
        a = rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16)
        b = rng.standard_normal((k, n)).astype(ml_dtypes.bfloat16)
        kp = k // 2
        a32 = _aligned(np.ascontiguousarray(a).view(np.uint32).reshape(-1))
        bp = _pairs(b)
        flops = 2.0 * m * n * k
        reps = max(1, int(2e9 / flops / 10))
        ref = a.astype(np.float64) @ b.astype(np.float64)
        row = []
        err = float("nan")
        if amx is not None:
            c = _aligned(np.empty(m * n, np.float32))
            cfg = np.zeros(64, np.uint8)
            t = _best(lambda r: run_amx(r, c, m, n, a32, kp, bp, cfg), reps)
            row.append(flops / t / 1e9)
            err = np.abs(c.reshape(m, n) - ref).max() / np.abs(ref).max()
        else:
            row.append(float("nan"))
        if have_bf16:
            c = _aligned(np.empty(m * n, np.float32))
            t = _best(lambda r: run_bf16(r, c, m, n, a32, kp, bp), reps)
            row.append(flops / t / 1e9)
        else:
            row.append(float("nan"))
        af = np.asfortranarray(a.astype(np.float32))
        bf = np.asfortranarray(b.astype(np.float32))
        cf = np.zeros((m, n), np.float32, order="F")

        def sg(r):
            for _ in range(r):
                blas.sgemm(1.0, af, bf, 0.0, cf, overwrite_c=1)
        t = _best(sg, reps)
        row.append(flops / t / 1e9)
        print(f"{f'{m}x{n}x{k}':>16} {row[0]:8.0f} {row[1]:11.0f} {row[2]:8.0f}   {err:.1e}")
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main()
