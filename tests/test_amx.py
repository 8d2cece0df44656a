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


PDS_SHAPES = [(1, 1), (2, 16), (7, 5), (31, 17), (32, 32), (33, 47), (64, 48), (96, 128)]


@pytest.mark.parametrize("shape", PDS_SHAPES, ids=[f"{m}x{n}" for m, n in PDS_SHAPES])
def test_pds_pairs_equals_the_passes_it_fuses(shape, rng):
    """amx.pds_pairs (the AMX backward's fused step) against the six passes it replaces:
    scale, exp_sub, dS = P * (dP - Dsum), t_pairs of P and of dS, to_bf16_rows of dS; bitwise,
    with -inf (masked) scores, padding pairs up to a whole 16-pair chunk, and sentinels that
    must survive around every written range."""
    from fag_numba.kernels.amx import kpad, pds_pairs, t_pairs
    from fag_numba.kernels.native import to_bf16_rows
    from fag_numba.kernels.tile import exp_sub
    m, n = shape
    alpha = np.float32(0.37)
    s = rng.standard_normal(m * n).astype(np.float32) * 3
    s[rng.random(m * n) < 0.2] = -np.inf
    dp = rng.standard_normal(m * n).astype(np.float32)
    lse = (rng.standard_normal(m) + 1.5).astype(np.float32)
    dsum = rng.standard_normal(m).astype(np.float32)
    kp = kpad((m + 1) // 2)
    ldd = (kp + 15) // 16 * 16 + 3
    ldr = 2 * ((n + 1) // 2) + 6
    sentinel = np.uint32(0xDEADBEEF)
    lt = np.full(2 * ldd + 32, np.nan, np.float32)
    dt = np.full(2 * ldd + 32, np.nan, np.float32)
    lt[:m], dt[:m] = lse, dsum
    # fused
    at = np.full(n * ldd + 16, sentinel, np.uint32)
    ast = at.copy()
    sr = np.full(m * ldr + 16, 0xBEEF, np.uint16)
    s_in, dp_in = s.copy(), dp.copy()
    pds_pairs(s, dp, m, n, alpha, lt, dt, at, ast, ldd, kp, sr, ldr)
    assert np.array_equal(s, s_in) and np.array_equal(dp, dp_in)     # inputs only read
    # the passes it replaces
    p = s * alpha
    for r in range(m):
        exp_sub(p, r * n, lse[r], n)
    ds = (p.reshape(m, n) * (dp.reshape(m, n) - dsum[:, None])).reshape(-1)
    at2 = np.full_like(at, sentinel)
    ast2 = np.full_like(ast, sentinel)
    t_pairs(p, m, n, n, at2, ldd, kp)
    t_pairs(ds, m, n, n, ast2, ldd, kp)
    sr2 = np.full_like(sr, 0xBEEF)
    to_bf16_rows(ds, m, n, n, sr2, ldr)
    if n % 2 == 1:                 # to_bf16_rows' zero after an odd row (the driver's job here)
        sr2.reshape(-1)[[r * ldr + n for r in range(m)]] = 0xBEEF
    assert np.array_equal(at, at2)
    assert np.array_equal(ast, ast2)
    assert np.array_equal(sr, sr2)
    assert np.any(at[:n * ldd] != sentinel)
