"""Ring attention over torch.distributed (SPEC §12), with 2 and 4 real processes.

One spawned job per world size (gloo on loopback, ``MASTER_ADDR=127.0.0.1``, a free port)
runs every case of ``tests/ring_worker.py`` in one process group: both splits, causal and
full, GQA/MQA, float32/float16/bfloat16, ALiBi, dropout (ring == one process with the same
seed), four layouts, a group of one rank (== the plain call, bitwise), shard/unshard round
trips, and refusals on every rank without a hang (mismatched shards, an unknown split, one
rank's bad dtype).  Each rank compares itself with the one-process fag_numba call and writes
its results; this test reads them and fails with every failing case listed.

Cost: the kernels are compiled once into a temporary on-disk cache (``FAG_NUMBA_CACHE_DIR`` /
``NUMBA_CACHE_DIR``, ``FAG_NUMBA_CACHE=1``) by a warm-up process, so the ranks load them instead
of compiling.  Measured: ~145 s for the whole file on the 2-core box at load average 5-9 (the
2-rank job alone ~20 s with a warm cache).
A hard timeout kills a hanging job and fails the test.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TIMEOUT = 600          # seconds for one whole job (a hang fails here, not in CI's global limit)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache):
    env = dict(os.environ)
    env.update(NUMBA_CACHE_DIR=str(cache), FAG_NUMBA_CACHE_DIR=str(cache), FAG_NUMBA_CACHE="1",
               NUMBA_NUM_THREADS="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory):
    """A temporary numba cache filled once (every kernel the ranks use)."""
    cache = tmp_path_factory.mktemp("numba_cache")
    code = ("import numpy as np, fag_numba; fag_numba.warmup(); "
            "fag_numba.softmax_lse(np.zeros((1, 1, 2, 8), np.float32), "
            "np.ones((1, 1, 2, 8), np.float32))")
    subprocess.run([sys.executable, "-c", code], env=_env(cache), check=True, timeout=TIMEOUT,
                   cwd=ROOT)
    return cache


@pytest.mark.parametrize("world", [2, 4])
def test_ring_matches_one_process(world, kernel_cache, tmp_path):
    env = _env(kernel_cache)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
               RING_RESULTS=str(tmp_path))
    procs = []
    for r in range(world):
        log = open(tmp_path / f"log{r}.txt", "w")
        procs.append((subprocess.Popen([sys.executable, str(HERE / "ring_worker.py")],
                                       env=dict(env, RANK=str(r)), stdout=log,
                                       stderr=subprocess.STDOUT, cwd=ROOT), log))
    failed = []
    try:
        for r, (p, _) in enumerate(procs):
            try:
                p.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                failed.append(f"rank {r}: no exit within {TIMEOUT} s (hang)")
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    for r, (p, _) in enumerate(procs):
        res = tmp_path / f"rank{r}.json"
        if not res.exists():
            tail = (tmp_path / f"log{r}.txt").read_text()[-3000:]
            failed.append(f"rank {r}: exit code {p.returncode}, no results:\n{tail}")
            continue
        results = json.loads(res.read_text())
        assert len(results) >= 17, [c["case"] for c in results]
        failed += [f"rank {r} {c['case']}: {c['detail']}" for c in results if not c["ok"]]
    assert not failed, "\n".join(failed)
