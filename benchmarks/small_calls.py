"""Per-call time of small calls, where the fixed cost of a call (checks, descriptors, plans,
the compressed-mask check, the thread hand-off) is a large part of it: medians of repeated
forward and backward calls at decode/ring-step sizes, BNSD / BSND / TND, fp32 / bf16, with and
without the compressed causal mask (a caller-built ``np.triu`` mask, checked on every call).
``--profile``: a cProfile table (by own time) of 50 calls of the first four cases.

Run from the repository root (or another checkout: ``--root``) under the shared lock:
    flock /tmp/bench.lock python benchmarks/small_calls.py [--profile]
Compare two checkouts by running it from each, alternately, in one session (absolute times
move with the machine's load: quote the load and compare within a session).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import numpy as np

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                help="checkout whose fag_numba is imported (default: this one)")
ap.add_argument("--calls", type=int, default=60, help="timed calls per median")
ap.add_argument("--profile", action="store_true")
args = ap.parse_args()
sys.path.insert(0, args.root)

import ml_dtypes  # noqa: E402

import fag_numba  # noqa: E402
from fag_numba import flash_attention_score as fwd  # noqa: E402
from fag_numba import flash_attention_score_grad as bwd  # noqa: E402

rng = np.random.default_rng(0)
MASK = np.triu(np.ones((2048, 2048), bool), 1)


def case(b, n, s, d, layout, dtype):
    shape = {"BNSD": (b, n, s, d), "BSND": (b, s, n, d), "TND": (b * s, n, d)}[layout]
    q, k, v, dy = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
    if dtype == "bf16":
        q, k, v, dy = (x.astype(ml_dtypes.bfloat16) for x in (q, k, v, dy))
    kw = dict(scale_value=1.0 / np.sqrt(d))
    if layout == "TND":
        kw.update(actual_seq_qlen=[s * (i + 1) for i in range(b)],
                  actual_seq_kvlen=[s * (i + 1) for i in range(b)])
    return q, k, v, dy, n, layout, kw


def calls(c, causal):
    q, k, v, dy, n, layout, kw = c
    kw = dict(kw)
    if causal:
        kw.update(atten_mask=MASK, sparse_mode=3)
    r = fwd(q, k, v, n, layout, **kw)

    def f():
        return fwd(q, k, v, n, layout, **kw)

    def g():
        return bwd(q, k, v, dy, n, layout, softmax_max=r.softmax_max, softmax_sum=r.softmax_sum,
                   attention_in=r.attention_out, **kw)
    return f, g


def median_ms(fn, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


CASES = []
for layout, b, s in (("BNSD", 1, 256), ("BSND", 1, 256), ("TND", 2, 128)):
    for dtype in ("fp32", "bf16"):
        if layout != "BNSD" and dtype == "bf16":
            continue
        for causal in (False, True):
            name = f"{layout} B{b} N2 S{s} D64 {dtype} {'causal' if causal else 'full'}"
            CASES.append((name, case(b, 2, s, 64, layout, dtype), causal))

print(f"# fag_numba from {os.path.dirname(fag_numba.__file__)}, {fag_numba.num_threads()} "
      f"threads, load {os.getloadavg()[0]:.2f}")
for name, c, causal in CASES:
    f, g = calls(c, causal)
    for _ in range(5):
        f()
        g()
    tf, tg = median_ms(f, args.calls), median_ms(g, args.calls)
    print(f"{name:36s} fwd {tf:6.3f} ms  bwd {tg:6.3f} ms", flush=True)

if args.profile:
    for name, c, causal in CASES[:4]:
        f, g = calls(c, causal)
        for which, fn in (("fwd", f), ("bwd", g)):
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(50):
                fn()
            pr.disable()
            out = io.StringIO()
            pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(18)
            print("=====", name, which)
            print(out.getvalue())
