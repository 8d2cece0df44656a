"""pytest plumbing for the unit-test lane (STYLE b8).

- ``pytest_report_header``: ``fag_numba.runtime_info()`` (numba version, threading layer,
  thread count, BLAS), so every CI log says what it ran on.
- Numba's on-disk cache is never enabled by the tests: ``FAG_NUMBA_CACHE`` is forced to ``0``
  before ``fag_numba`` is imported, and a session fixture asserts the decorators really run
  with ``cache=False`` (STYLE c: parallel + cache, concurrent cache writers under xdist).
- Fixtures: ``rng`` (a session-wide seeded generator), ``blocks`` (patch the tile sizes and the
  S2 split target for one test; restored automatically), and an autouse guard that restores
  every ``fag_numba.config`` tunable after each test.

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
    assert config.CACHE is False, "tests must run with FAG_NUMBA_CACHE unset/0"
    assert _jit._COMMON.get("cache") is False, _jit._COMMON
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
        if split is not None:
            monkeypatch.setattr(config, "SPLIT_TARGET", split)
    return patch
