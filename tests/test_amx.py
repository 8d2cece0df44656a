"""AMX tile products (kernels/amx.py) against numpy float64, on odd sizes.

Skipped unless ``isa.amx_available()`` (amx-tile and amx-bf16 in numba's target and the host,
and the OS granted the tile-data permission): compiling an AMX intrinsic for a target without
it aborts the process.  Every element outside the C bounds carries a sentinel that must survive,
so a tile store past an edge fails the test.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from fag_numba import isa

pytestmark = pytest.mark.skipif(not isa.amx_available(), reason="no AMX (or no permission)")
BF16 = np.dtype(ml_dtypes.bfloat16)


def _pairs(b):
    """VNNI pairs of a (2 kp, n) bf16 matrix: (kp, n) uint32, dword (p, c) = (b[2p, c], b[2p+1, c])."""
    kp, n = b.shape[0] // 2, b.shape[1]
    out = np.empty((kp, n, 2), np.uint16)
    out[:, :, 0] = b[0::2].view(np.uint16)
    out[:, :, 1] = b[1::2].view(np.uint16)
    return out.reshape(kp, n * 2).view(np.uint32)


SHAPES = [  # m, n, kp (pairs)
    (1, 1, 1), (16, 16, 16), (32, 32, 16), (17, 33, 5), (31, 15, 23), (45, 70, 48),
    (96, 128, 32), (64, 47, 16), (33, 64, 17), (50, 18, 64),
]


@pytest.mark.parametrize("accum", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
def test_product_amx_matches_float64(shape, accum, rng):
    from fag_numba.kernels.amx import product_amx
    m, n, kp = shape
    a = rng.standard_normal((m, 2 * kp)).astype(BF16)
    b = rng.standard_normal((2 * kp, n)).astype(BF16)
    lda, ldb, ldc = kp + 3, n + 5, n + 7            # strides wider than the bounds
    a_off, b_off, c_off = 2, 3, 11
    abuf = np.full(a_off + m * lda + 8, 0x7FC07FC0, np.uint32)      # NaN pairs around A
    abuf[a_off:a_off + m * lda].reshape(m, lda)[:, :kp] = a.view(np.uint32)
    bbuf = np.full(b_off + kp * ldb + 8, 0x7FC07FC0, np.uint32)
    bbuf[b_off:b_off + kp * ldb].reshape(kp, ldb)[:, :n] = _pairs(b)
    sentinel = np.float32(-12345.0)
    cbuf = np.full(c_off + m * ldc + 16, sentinel, np.float32)
    c0 = rng.standard_normal((m, n)).astype(np.float32)
    cview = cbuf[c_off:c_off + m * ldc].reshape(m, ldc)
    cview[:, :n] = c0
    cfg = np.zeros(64, np.uint8)
    product_amx(cbuf, c_off, ldc, m, n, abuf, a_off, lda, bbuf, b_off, ldb, kp, accum, cfg)
    ref = a.astype(np.float64) @ b.astype(np.float64) + (c0 if accum else 0.0)
    got = cview[:, :n]
    scale = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)) + 1.0
    assert np.all(np.abs(got - ref) <= 1e-5 * scale), np.abs(got - ref).max()
    outside = cbuf.copy()
    outside[c_off:c_off + m * ldc].reshape(m, ldc)[:, :n] = sentinel
    assert np.all(outside == sentinel)


def test_product_amx_empty_contraction_zeroes_c():
    from fag_numba.kernels.amx import product_amx
    c = np.full(12, 7.0, np.float32)
    product_amx(c, 0, 4, 3, 4, np.zeros(1, np.uint32), 0, 1, np.zeros(1, np.uint32), 0, 4, 0,
                False, np.zeros(64, np.uint8))
    assert np.all(c == 0.0)
