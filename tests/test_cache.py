"""The on-disk kernel cache (``fag_numba/_jit.py``), each check in fresh subprocesses.

- 4 processes started at once on an empty cache (causal forward: the parallel forward driver
  and the planning kernels; the backward driver is cached the same way but would double the
  test's compile time) all succeed and agree bitwise with each other and with this (uncached)
  test process; a later process loads the driver from the cache, also with a different thread
  count (numba#7518: cached parallel code once crashed then);
- a source change anywhere in the package (here: ``kernels/tile.py``, not the file of the
  cached function, which numba's own stamp would miss) recompiles instead of loading;
- a different CPU (``NUMBA_CPU_NAME``) recompiles;
- an unusable cache directory and corrupt cache files warn (``FagCacheWarning``) and compile;
- ``FAG_NUMBA_CACHE=0`` writes nothing.

The cheap checks use ``fag_numba.dropout_mask`` (one small serial kernel: the same cache
machinery as the drivers, a fraction of the compile time).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fag_numba

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import hashlib, json, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import numpy as np
    import fag_numba
    from fag_numba import _jit
    from fag_numba.kernels import driver
    from fag_numba import dropout
    what = sys.argv[1]
    h = hashlib.sha256()
    if what == "attention":
        rng = np.random.default_rng(5)
        q, k, v, dy = (rng.standard_normal((1, 2, 40, 16)).astype(np.float32) for _ in range(4))
        mask = np.triu(np.ones((2048, 2048), bool), 1)
        kw = dict(scale_value=0.25, atten_mask=mask, sparse_mode=3)
        o = fag_numba.flash_attention_score(q, k, v, 2, "BNSD", **kw)
        for a in (o.attention_out, o.softmax_max, o.softmax_sum):
            h.update(np.ascontiguousarray(a).tobytes())
        disps = {"fwd_chunk": driver._fwd_chunk_plain}
    else:
        h.update(fag_numba.dropout_mask(1000, 0.7, 11, 3).tobytes())
        disps = {name: getattr(dropout, name) for name in vars(dropout)
                 if getattr(getattr(dropout, name), "signatures", None)}
stats = {n: (sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values()))
         for n, d in disps.items()}
print("RESULT " + json.dumps({
    "hash": h.hexdigest(), "stats": stats,
    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught
                 if issubclass(w.category, _jit.FagCacheWarning)]}))
"""


def _env(cache_dir, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_NAME", "NUMBA_CACHE_DIR")}
    env.update(FAG_NUMBA_CACHE="1", FAG_NUMBA_CACHE_DIR=str(cache_dir),
               PYTHONPATH=str(extra.pop("root", ROOT)))
    env.update(extra)
    return env


def _start(what, env, cwd=ROOT):
    return subprocess.Popen([sys.executable, "-c", CHILD, what], env=env, cwd=str(cwd),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
    out, err = proc.communicate(timeout=1800)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child failed (rc={proc.returncode}):\n{err[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _run(what, env, cwd=ROOT):
    return _finish(_start(what, env, cwd))


def _all_hits(res):
    return all(h > 0 and m == 0 for h, m in res["stats"].values())


def _all_misses(res):
    return all(h == 0 and m > 0 for h, m in res["stats"].values())


def _in_process_attention_hash():
    rng = np.random.default_rng(5)
    q, k, v, dy = (rng.standard_normal((1, 2, 40, 16)).astype(np.float32) for _ in range(4))
    mask = np.triu(np.ones((2048, 2048), bool), 1)
    kw = dict(scale_value=0.25, atten_mask=mask, sparse_mode=3)
    o = fag_numba.flash_attention_score(q, k, v, 2, "BNSD", **kw)
    h = hashlib.sha256()
    for a in (o.attention_out, o.softmax_max, o.softmax_sum):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_four_concurrent_cold_starts_agree_and_fill_the_cache(tmp_path):
    cache = tmp_path / "cache"
    procs = [_start("attention", _env(cache)) for _ in range(4)]
    results = [_finish(p) for p in procs]
    hashes = {r["hash"] for r in results}
    assert len(hashes) == 1, results
    assert hashes == {_in_process_attention_hash()}, "cached child differs from uncached"
    assert not any(r["warnings"] for r in results), results
    assert any(_all_misses(r) for r in results), results      # somebody compiled
    # a later process loads every driver, also with another thread count (numba#7518)
    for threads in ("2", "1"):
        warm = _run("attention", _env(cache, NUMBA_NUM_THREADS=threads))
        assert _all_hits(warm), warm
        assert warm["hash"] in hashes


def test_source_change_elsewhere_in_the_package_recompiles(tmp_path):
    """numba stamps an entry with its own file only; ours covers every package file."""
    root = tmp_path / "src"
    shutil.copytree(ROOT / "fag_numba", root / "fag_numba",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = _env(tmp_path / "cache", root=root)
    first = _run("dropout", env, cwd=root)
    assert _all_misses(first) and first["stats"], first
    again = _run("dropout", env, cwd=root)
    assert _all_hits(again) and again["hash"] == first["hash"], again
    with open(root / "fag_numba" / "kernels" / "tile.py", "a") as f:
        f.write("\n# an upgrade changed this file\n")
    changed = _run("dropout", env, cwd=root)
    assert _all_misses(changed), changed
    assert changed["hash"] == first["hash"]


def test_other_cpu_name_recompiles(tmp_path):
    env = _env(tmp_path / "cache")
    assert _all_misses(_run("dropout", env))
    other = _run("dropout", dict(env, NUMBA_CPU_NAME="x86-64"))
    assert _all_misses(other), other
    assert _all_hits(_run("dropout", dict(env, NUMBA_CPU_NAME="x86-64")))


def test_unusable_cache_dir_warns_and_compiles(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    res = _run("dropout", _env(blocker / "cache"))
    assert res["warnings"] and "cannot write" in res["warnings"][0], res
    assert res["hash"] == _run("dropout", dict(_env(tmp_path / "c"), FAG_NUMBA_CACHE="0"))["hash"]


def test_corrupt_cache_files_warn_and_compile(tmp_path):
    cache = tmp_path / "cache"
    good = _run("dropout", _env(cache))
    data = list(cache.rglob("*.nbc"))
    assert data
    for f in data:
        f.write_bytes(b"garbage")
    res = _run("dropout", _env(cache))
    assert res["hash"] == good["hash"]
    assert res["warnings"] and "cannot load" in res["warnings"][0], res
    assert _all_hits(_run("dropout", _env(cache)))          # rewritten by the recompile


def test_opt_out_writes_nothing(tmp_path):
    cache = tmp_path / "cache"
    res = _run("dropout", dict(_env(cache), FAG_NUMBA_CACHE="0"))
    assert all(h == 0 for h, _ in res["stats"].values())
    assert not cache.exists()
