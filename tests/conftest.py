"""pytest plumbing for the unit-test lane (STYLE b8).

- ``pytest_report_header``: ``fag_numba.runtime_info()`` (numba version, threading layer,
  thread count, BLAS), so every CI log says what it ran on.
- The test process itself never uses the on-disk kernel cache (it compiles what it tests):
  ``FAG_NUMBA_CACHE`` is ``0`` while ``fag_numba`` is imported, and a session fixture asserts no
  dispatcher got a cache.  Afterwards the environment is switched to ``FAG_NUMBA_CACHE=1`` with
  a private ``FAG_NUMBA_CACHE_DIR`` for this session, so the subprocesses tests start (CLI,
  ring, install probes) share one cache: the first compiles, the others load.
- Fixtures: ``rng`` (a session-wide seeded generator), ``blocks`` (patch the tile sizes and the
  S2 split target for one test; restored automatically), an autouse guard that restores
  every ``fag_numba.config`` tunable after each test, and an autouse patch that keeps small
  calls chunked over every thread (``_chunked_small_calls``).

The repository root is put on ``sys.path`` so the tests use the checkout (the package is not
installed); ``tests/`` itself is on ``sys.path`` through pytest's rootdir-less import mode, so
test modules import ``reference``, ``tolerances`` and ``utils`` directly.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ["FAG_NUMBA_CACHE"] = "0"          # before the first ``import fag_numba``

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import fag_numba  # noqa: E402
from fag_numba import _jit, config  # noqa: E402

# children (subprocess tests) inherit a cache private to this session, deleted at exit
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

SESSION_CACHE = tempfile.mkdtemp(prefix="fag_numba-test-cache-")
atexit.register(shutil.rmtree, SESSION_CACHE, True)
os.environ["FAG_NUMBA_CACHE"] = "1"
os.environ["FAG_NUMBA_CACHE_DIR"] = SESSION_CACHE


def pytest_report_header(config):  # noqa: D103 (pytest hook; shadows nothing we use)
    info = fag_numba.runtime_info()
    keys = ("fag_numba", "numba", "numpy", "threading_layer", "threads", "max_threads", "cache",
            "cpu")
    line = ", ".join(f"{k}={info.get(k)}" for k in keys)
    blas = info.get("blas") or []
    blas_txt = "; ".join(f"{b.get('internal_api')} {b.get('version')} ({b.get('num_threads')} "
                         f"threads)" for b in blas)
    return [f"fag_numba runtime: {line}", f"fag_numba BLAS: {blas_txt or 'unknown'}"]


@pytest.fixture(scope="session", autouse=True)
def _no_numba_cache():
    """Fail loudly if caching got switched on (e.g. the package was imported before us with
    FAG_NUMBA_CACHE=1 in the environment)."""
    assert config.CACHE is False, "the test process must import fag_numba with FAG_NUMBA_CACHE=0"
    from fag_numba.kernels import driver
    # (NUMBA_DISABLE_JIT=1, the coverage lane: plain functions, no dispatcher, no cache)
    assert not isinstance(getattr(driver._fwd_chunk, "_cache", None), _jit._KernelCache)
    yield


@pytest.fixture(scope="session")
def rng():
    """Session-wide seeded generator (tests that need reproducible data per case should derive
    their own ``np.random.default_rng(<case seed>)``)."""
    return np.random.default_rng(20240607)


_TUNABLES = tuple(config.DEFAULTS)


@pytest.fixture(autouse=True)
def _restore_config():
    """Every ``fag_numba.config`` tunable is back at its value after each test, whatever the
    test (or a failing patch) did."""
    saved = {k: getattr(config, k) for k in _TUNABLES}
    yield
    for k, v in saved.items():
        setattr(config, k, v)


@pytest.fixture(autouse=True)
def _chunked_small_calls(monkeypatch):
    """Tests run small inputs: without this every call would sit below
    ``config.SERIAL_WORK_FWD`` / ``_BWD`` and run on the calling thread alone, and the
    multi-chunk paths (thread hand-off, determinism across thread counts) would go untested.
    Tests of the serial rule itself set the limits back (tests/test_small_calls.py)."""
    monkeypatch.setattr(config, "SERIAL_WORK_FWD", 0)
    monkeypatch.setattr(config, "SERIAL_WORK_BWD", 0)


@pytest.fixture
def blocks(monkeypatch):
    """``blocks(bm=4, bn=8, fbm=5, fbn=7, split=None)`` patches the backward tile
    (``BLOCK_M``/``BLOCK_N``), the forward tile (``FWD_BLOCK_M``/``FWD_BLOCK_N``) and, when given,
    ``SPLIT_TARGET`` for the rest of the test.  The kernels read them at call time, so this never
    recompiles anything."""
    def patch(bm=4, bn=8, fbm=5, fbn=7, split=None):
        monkeypatch.setattr(config, "BLOCK_M", bm)
        monkeypatch.setattr(config, "BLOCK_N", bn)
        monkeypatch.setattr(config, "BLOCK_M_WIDE", bm)      # the D >= WIDE_D tiles too
        monkeypatch.setattr(config, "BLOCK_N_WIDE", bn)
        monkeypatch.setattr(config, "FWD_BLOCK_M", fbm)
        monkeypatch.setattr(config, "FWD_BLOCK_N", fbn)
        monkeypatch.setattr(config, "FWD_BLOCK_M_AMX", fbm)    # the AMX forward's tiles too
        monkeypatch.setattr(config, "FWD_BLOCK_N_AMX", fbn)
        if split is not None:
            monkeypatch.setattr(config, "SPLIT_TARGET", split)
    return patch
