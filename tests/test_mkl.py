"""The BLAS drivers' float32 products on torch's bundled MKL (``fag_numba/mkl.py``,
``config.FLOAT32_BLAS``): used when torch is imported, correct against the float64 reference,
bitwise the same across thread counts, the caller's OpenMP thread limit left as it was, and
the setting validated."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

import fag_numba
from fag_numba import config, mkl
from fag_numba.errors import FagValueError

from reference import ref_backward, ref_forward
from tolerances import tolerance
from utils import assert_close, forward_backward, make_qkv

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
HAS_MKL = not numba.config.DISABLE_JIT and mkl._load() is not None
needs_mkl = pytest.mark.skipif(not HAS_MKL, reason="no MKL sgemm_ in this torch (or no JIT)")


@pytest.fixture
def used(monkeypatch):
    """The ``sgemm_`` addresses the BLAS drivers were given (``mkl.float32_gemm`` sets
    ``gp[desc.SGEMM]`` from ``mkl.sgemm_address``), call by call."""
    seen = []
    orig = mkl.sgemm_address
    monkeypatch.setattr(mkl, "sgemm_address", lambda: seen.append(orig()) or seen[-1])
    return seen


_call = forward_backward


@needs_mkl
@pytest.mark.parametrize("case", ["dense", "causal-gqa", "band-d128"])
def test_mkl_products_match_the_reference_and_are_deterministic(case, used, blocks,
                                                                monkeypatch, rng):
    """With torch imported, "auto" runs the BLAS drivers on MKL (a nonzero address), within
    the float32 tolerance of the float64 reference, bitwise the same on 1 and 2 threads, and
    within the tolerance of OpenBLAS's results (often bitwise the same)."""
    blocks(bm=16, bn=24, fbm=20, fbn=28)
    lay, n1, n2, s1, s2, d, kw = "BNSD", 2, 2, 67, 75, 64, {}
    mask = np.triu(np.ones((2048, 2048), bool), 1)
    if case == "causal-gqa":
        n1, kw = 4, dict(atten_mask=mask, sparse_mode=3)
    elif case == "band-d128":
        d, kw = 128, dict(atten_mask=mask, sparse_mode=4, pre_tokens=20, next_tokens=5)
    q, k, v, dy = make_qkv(lay, 1, n1, n2, s1, s2, d, d, np.float32, rng)
    kw["scale_value"] = d ** -0.5
    monkeypatch.setattr(config, "FLOAT32_BLAS", "auto")
    monkeypatch.setattr(mkl, "_auto", None)        # decided afresh (torch is imported here)
    f, g = _call(q, k, v, dy, n1, lay, **kw)
    assert used and all(a != 0 for a in used)
    ro, rm, rs = ref_forward(q, k, v, n1, lay, **kw)
    rg = ref_backward(q, k, v, dy, n1, lay, **kw)
    assert_close(f.attention_out, ro, tolerance(np.float32, "fwd"), "attention_out")
    for a, e, name in zip(g[:3], rg[:3], ("dq", "dk", "dv")):
        assert_close(a, e, tolerance(np.float32, "bwd"), name)
    with fag_numba.threads(1):
        f1, g1 = _call(q, k, v, dy, n1, lay, **kw)
    for a, b in zip((*f, *g[:3]), (*f1, *g1[:3])):
        assert a.tobytes() == b.tobytes()
    used.clear()
    monkeypatch.setattr(config, "FLOAT32_BLAS", "openblas")
    fo, go = _call(q, k, v, dy, n1, lay, **kw)
    assert used and all(a == 0 for a in used)
    assert_close(f.attention_out, fo.attention_out, tolerance(np.float32, "fwd"), "vs OpenBLAS")
    for a, b in zip(g[:3], go[:3]):
        assert_close(a, b, tolerance(np.float32, "bwd"), "vs OpenBLAS")


@needs_mkl
def test_the_callers_mkl_thread_count_is_restored(monkeypatch, rng):
    """MKL runs on torch's OpenMP: the call holds the calling thread's MKL thread count at 1
    (``MKL_Set_Num_Threads_Local``: no team inside every product, even after
    ``torch.set_num_threads``) and restores it, so the caller's torch ops keep their threads."""
    monkeypatch.setattr(config, "FLOAT32_BLAS", "mkl")
    before = torch.get_num_threads()
    local = mkl._load()[1]
    q, k, v, dy = make_qkv("BNSD", 1, 2, 2, 300, 300, 64, 64, np.float32, rng)
    _call(q, k, v, dy, 2, "BNSD")
    assert local(0) == 0                  # the thread's setting was "none" before: and again
    assert torch.get_num_threads() == before


def test_float32_blas_setting_is_validated(monkeypatch, rng):
    """A value other than auto / openblas / mkl is a FagValueError naming the setting."""
    monkeypatch.setattr(config, "FLOAT32_BLAS", "blis")
    q, k, v, _ = make_qkv("BNSD", 1, 1, 1, 8, 8, 8, 8, np.float32, rng)
    with pytest.raises(FagValueError, match="FLOAT32_BLAS"):
        fag_numba.flash_attention_score(q, k, v, 1, "BNSD")


_NO_TORCH = r"""
import sys, numpy as np
import fag_numba
from fag_numba import config
from fag_numba.errors import FagValueError
q = np.ones((1, 1, 8, 8), np.float32)
config.FLOAT32_BLAS = "auto"
fag_numba.flash_attention_score(q, q, q, 1, "BNSD")           # OpenBLAS, no torch needed
config.FLOAT32_BLAS = "mkl"
try:
    fag_numba.flash_attention_score(q, q, q, 1, "BNSD")
except FagValueError as e:
    assert "FLOAT32_BLAS" in str(e) and "torch" in str(e), e
    assert "torch" not in sys.modules
    print("OK")
"""


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="no MKL path under NUMBA_DISABLE_JIT")
def test_without_torch_auto_uses_openblas_and_mkl_is_an_error():
    """fag_numba never imports torch for MKL: without it "auto" runs OpenBLAS and "mkl" is a
    FagValueError that says torch is needed."""
    res = subprocess.run([sys.executable, "-c", _NO_TORCH], capture_output=True, text=True,
                         cwd=str(ROOT), timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
