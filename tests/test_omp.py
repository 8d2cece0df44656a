"""Chunks on torch's OpenMP team (``fag_numba/omp.py``, ``config.CHUNK_RUNNER``): used for the
main thread's calls when torch is imported, bitwise the results of fag_numba's own thread pool,
every chunk run and the first error re-raised, other threads kept on the pool, and the setting
validated.  The fork safety of the team is checked in a subprocess by
``test_reliability.py::test_threads_and_fork_in_a_subprocess``."""
from __future__ import annotations

import threading

import numba
import numpy as np
import pytest

import fag_numba
from fag_numba import config, omp
from fag_numba.threads import run_chunks
from fag_numba.errors import FagValueError

from utils import forward_backward, make_qkv

torch = pytest.importorskip("torch")
needs_team = pytest.mark.skipif(numba.config.DISABLE_JIT or omp._load() is None,
                                reason="no torch libgomp (or no JIT: the kernels are not nogil)")


@pytest.fixture
def runs(monkeypatch):
    """The OpenMP runs (nchunks of each) made by the calls under test."""
    seen = []
    orig = omp.run
    monkeypatch.setattr(omp, "run", lambda k, n, a, s: seen.append(n) or orig(k, n, a, s))
    return seen


@needs_team
@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
@pytest.mark.parametrize("case", ["dense", "causal-gqa"])
def test_openmp_runner_gives_the_pool_results_bitwise(dtype, case, runs, blocks, monkeypatch,
                                                      rng):
    """Forward and backward, float32 (BLAS drivers) and bf16 (native kinds), several items per
    chunk: the team's results are bitwise those of the Python-thread pool."""
    import ml_dtypes
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    blocks(bm=16, bn=24, fbm=20, fbn=28)
    n1, kw = 2, {}
    if case == "causal-gqa":
        n1, kw = 4, dict(atten_mask=np.triu(np.ones((2048, 2048), bool), 1), sparse_mode=3)
    q, k, v, dy = make_qkv("BNSD", 2, n1, 2, 67, 75, 64, 64, dt, rng)
    monkeypatch.setattr(config, "CHUNK_RUNNER", "auto")
    with fag_numba.threads(2):
        f, g = forward_backward(q, k, v, dy, n1, "BNSD", **kw)
        assert runs and all(n == 2 for n in runs)
        runs.clear()
        monkeypatch.setattr(config, "CHUNK_RUNNER", "threads")
        fp, gp = forward_backward(q, k, v, dy, n1, "BNSD", **kw)
    assert not runs
    for a, b in zip((*f, *g[:3]), (*fp, *gp[:3])):
        assert a.tobytes() == b.tobytes()


@needs_team
@pytest.mark.parametrize("nchunks", [2, 3, 5])
def test_every_chunk_runs_once_and_the_first_error_is_raised(nchunks, monkeypatch):
    """Teams of any size (libgomp may give fewer threads than asked, e.g. inside a parallel
    region: thread i runs chunks i, i + n, ...); an error in one chunk is re-raised after the
    others have finished (they write into the caller's outputs)."""
    monkeypatch.setattr(config, "CHUNK_RUNNER", "openmp")
    done = []

    def kernel(t, out):
        done.append(t)
        if t == 1:
            raise ValueError("chunk 1 failed")
        out[t] = t + 1

    out = np.zeros(nchunks)
    with pytest.raises(ValueError, match="chunk 1 failed"):
        run_chunks(kernel, nchunks, (out,))
    assert sorted(done) == list(range(nchunks))
    assert out[0] == 1 and list(out[2:]) == list(range(3, nchunks + 1))
    done.clear()
    omp.run(lambda t, o: done.append(t), nchunks, (out,), None)
    assert sorted(done) == list(range(nchunks))


@needs_team
def test_a_failing_thread_setup_is_an_error_not_a_skipped_chunk():
    """An error outside the chunk kernels (the per-thread setup hook) reaches the caller: a
    ctypes callback would otherwise print and drop it, returning with chunks not run."""
    def setup():
        raise RuntimeError("setup failed")

    with pytest.raises(RuntimeError, match="setup failed"):
        omp.run(lambda t: None, 2, (), setup)
    undone = []
    omp.run(lambda t: None, 2, (), lambda: (lambda: undone.append(1)))
    assert undone == [1, 1]                     # every thread of the team restores its setting


@needs_team
def test_other_threads_and_the_threads_setting_use_the_pool(runs, monkeypatch, rng):
    """Calls from a thread other than the main thread keep fag_numba's pool (no OpenMP team per
    Python thread); "threads" keeps every call there; "openmp" and "auto" use the team."""
    q, k, v, dy = make_qkv("BNSD", 1, 2, 2, 130, 130, 32, 32, np.float32, rng)
    for mode in ("auto", "openmp"):
        monkeypatch.setattr(config, "CHUNK_RUNNER", mode)
        assert omp.use_for_call()
    box = []
    t = threading.Thread(target=lambda: box.append(omp.use_for_call()))
    t.start()
    t.join()
    assert box == [False]
    monkeypatch.setattr(config, "CHUNK_RUNNER", "threads")
    assert not omp.use_for_call()
    with fag_numba.threads(2):
        forward_backward(q, k, v, dy, 2, "BNSD")
    assert not runs


@pytest.mark.parametrize("bad", ["gomp", "", 3])
def test_invalid_chunk_runner_is_refused(bad, monkeypatch, rng):
    monkeypatch.setattr(config, "CHUNK_RUNNER", bad)
    with pytest.raises(FagValueError, match="CHUNK_RUNNER"):
        omp.use_for_call()
    q, k, v, dy = make_qkv("BNSD", 1, 2, 2, 130, 130, 32, 32, np.float32, rng)
    with fag_numba.threads(2), pytest.raises(FagValueError, match="CHUNK_RUNNER"):
        forward_backward(q, k, v, dy, 2, "BNSD")


@needs_team
def test_team_workers_keep_their_python_thread_state():
    """A worker's Python thread state outlives its callback (omp._pin: ctypes would create and
    delete one per callback, ~25 us of each hand-off): its thread-local data is still there at
    the next run."""
    seen = []

    def kernel(t):
        if t == 1:
            seen.append(getattr(omp._pinned, "done", False))
            omp._pinned.mark = getattr(omp._pinned, "mark", 0) + 1
            seen.append(omp._pinned.mark)

    omp.run(kernel, 2, (), None)
    omp.run(kernel, 2, (), None)
    assert seen[0] is True and seen[2] is True and seen[3] == seen[1] + 1
