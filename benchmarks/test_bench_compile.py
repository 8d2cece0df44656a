"""First-call latency (JIT compilation) of forward + backward, each measured in a fresh process.

Compile time is a user-facing cost (STYLE b9; stumpy#699, pynndescent#111), so it is measured
separately from the steady-state benchmarks.  For each case a child process
(``subprocess.run([sys.executable, "-c", CHILD])``) times, from its own start:

* ``import_s``: ``import fag_numba`` (must stay cheap: no compilation at import);
* ``first_fwd_s`` / ``first_bwd_s``: the first forward and the first grad call (compile + run);
* ``steady_fwd_s`` / ``steady_bwd_s``: a second call of each (run only), so the compile part is
  ``first - steady``.

Variants: ``nocache`` (``FAG_NUMBA_CACHE=0``: the cold compile) and ``cached`` (the default
cache in a temporary ``FAG_NUMBA_CACHE_DIR``: an untimed first child fills the empty cache,
the timed second child loads it; the filling child's numbers are recorded too as ``fill_*``).  The benchmark time is
the child's whole wall time (interpreter start included); the breakdown is in ``extra_info``.

Run alone: ``python -m pytest benchmarks/test_bench_compile.py --benchmark-only``
(add ``--benchmark-columns=min`` for a short table; ``-s`` prints the breakdown).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

from benchmarks import common

# The child: tiny inputs, so the time is compilation, not work.  It prints one JSON line.
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import fag_numba
t_import = time.perf_counter() - t0
B, N, S, D, mode, dtype = {B}, {N}, {S}, {D}, {mode}, {dtype!r}
rng = np.random.default_rng(0)
if dtype == "bf16":
    import ml_dtypes
    dt = ml_dtypes.bfloat16
else:
    dt = np.float32
q, k, v, dy = (rng.standard_normal((B, N, S, D), dtype=np.float32).astype(dt) for _ in range(4))
kw = dict(scale_value=D ** -0.5)
if mode:
    kw.update(sparse_mode=mode, atten_mask=np.triu(np.ones((2048, 2048), bool), 1))
def fwd():
    return fag_numba.flash_attention_score(q, k, v, N, "BNSD", **kw)
def bwd(o):
    return fag_numba.flash_attention_score_grad(
        q, k, v, dy, N, "BNSD", softmax_max=o.softmax_max, softmax_sum=o.softmax_sum,
        attention_in=o.attention_out, **kw)
res = {{"import_s": t_import}}
try:
    t = time.perf_counter(); o = fwd(); res["first_fwd_s"] = time.perf_counter() - t
    t = time.perf_counter(); bwd(o); res["first_bwd_s"] = time.perf_counter() - t
    t = time.perf_counter(); o = fwd(); res["steady_fwd_s"] = time.perf_counter() - t
    t = time.perf_counter(); bwd(o); res["steady_bwd_s"] = time.perf_counter() - t
except NotImplementedError as exc:
    res["skip"] = f"NotImplementedError: {{exc}}"
import numba
res["threading_layer"] = fag_numba.runtime_info()["threading_layer"]
res["numba_threads"] = fag_numba.num_threads()
res["numba"] = numba.__version__
res["total_s"] = time.perf_counter() - t0
print("RESULT " + json.dumps(res))
"""

# (name, B, N, S, D, sparse_mode, dtype): the kernels a user compiles on a first call.
CASES = [
    ("dense-fp32", 1, 2, 256, 64, 0, "fp32"),
    ("causal-fp32", 1, 2, 256, 64, 3, "fp32"),
    ("dense-bf16", 1, 2, 256, 64, 0, "bf16"),
]


def run_child(case, env_extra: dict) -> dict:
    """Run the child in a fresh interpreter; return its JSON plus the parent's wall time."""
    _, B, N, S, D, mode, dtype = case
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(common.REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(env_extra)
    code = CHILD.format(B=B, N=N, S=S, D=D, mode=mode, dtype=dtype)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=1800, cwd=str(common.REPO_ROOT))
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"compile child failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall_s"] = wall
    return res


def _record(benchmark, prefix: str, res: dict):
    for key, value in res.items():
        if isinstance(value, float):
            value = round(value, 4)
        benchmark.extra_info[prefix + key] = value
    if "first_fwd_s" in res:
        benchmark.extra_info[prefix + "compile_s"] = round(
            res["first_fwd_s"] + res["first_bwd_s"] - res["steady_fwd_s"] - res["steady_bwd_s"], 4)


@pytest.mark.parametrize("cache", ["nocache", "cached"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_first_call(benchmark, case, cache, tmp_path):
    try:
        common.import_fag()
    except common.Unavailable as exc:
        pytest.skip(str(exc))
    benchmark.group = f"compile-{case[0]}"
    env = {"FAG_NUMBA_CACHE": "0"}
    fill = None
    if cache == "cached":
        env = {"FAG_NUMBA_CACHE": "1",
               "FAG_NUMBA_CACHE_DIR": tempfile.mkdtemp(prefix="fag-cache-", dir=tmp_path)}
        fill = run_child(case, env)              # untimed: populates the cache
        if "skip" in fill:
            pytest.skip(fill["skip"])
    results = {}

    def target():
        results["res"] = run_child(case, env)

    with common.LoadMeter() as load:           # compile time doubles when a core is taken
        benchmark.pedantic(target, rounds=1, iterations=1, warmup_rounds=0)
    res = results["res"]
    if "skip" in res:
        pytest.skip(res["skip"])
    benchmark.extra_info.update(case=case[0], cache=cache, other_load=round(load.fraction, 3))
    _record(benchmark, "", res)
    if fill is not None:
        _record(benchmark, "fill_", fill)
    print(f"\n{case[0]} {cache}: " + ", ".join(f"{k}={v}" for k, v in benchmark.extra_info.items()))
