"""Same-process A/B of the working tree's fag_numba against another git revision of it.

Usage (from the repository root)::

    python benchmarks/ab.py 1 8 2048 128                        # bf16 backward vs HEAD
    python benchmarks/ab.py 1 4 4096 64 --dtype fp32 --pass fwd --causal --base HEAD~3
    python benchmarks/ab.py 1 4 4096 64 --set BWD_AMX_ROWS_FACTOR=1   # a tunable, same code

Why: on the shared 2-core machine, times of the same code and inputs differ by 10-30% between
processes (memory placement, neighbours), more than most single changes gain, so separate runs
of ``compare.py`` cannot decide them.  Here both versions live in one process: the base
revision's package is extracted (``git archive``) into a temporary directory and imported as
``fag_numba_base`` (fag_numba's own imports are relative), both are called once (compile), then
``--rounds`` rounds call each once, the order swapped every round; a round during which other
processes used more than 8% of the machine is set aside and retried after the machine calms
down (``common.LoadMeter`` / ``wait_for_idle``).  Prints the medians, new/old (< 1: the working
tree is faster), the min ratio, and max |new - old| / max |old| of the outputs (0: bitwise the
same).  ``--set KEY=VALUE`` sets a ``fag_numba.config`` tunable on the working tree's side only.
``--after-torch`` runs torch's SDPA forward of the same shape right before every timed call: a
mixed torch + fag_numba workload, where torch's OpenMP workers spin (~3 ms, libgomp's default
wait policy) on a core the fag_numba call needs.
"""
from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):                     # run as a script
    sys.path.insert(0, str(ROOT))


def _extract(rev: str, dest: Path) -> None:
    """The package of revision ``rev`` as ``dest/fag_numba_base``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "fag_numba"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    (dest / "fag_numba").rename(dest / "fag_numba_base")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("B", type=int)
    ap.add_argument("N", type=int)
    ap.add_argument("S", type=int)
    ap.add_argument("D", type=int)
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--pass", dest="pass_", default="bwd", choices=("fwd", "bwd"))
    ap.add_argument("--causal", action="store_true", help="sparse_mode 3, compressed mask")
    ap.add_argument("--base", default="HEAD", help="git revision to compare against")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a fag_numba.config tunable for the working tree only")
    ap.add_argument("--after-torch", action="store_true",
                    help="run torch's SDPA forward of the same shape right before each timed "
                         "call (a mixed torch + fag_numba workload: torch's OpenMP workers "
                         "then spin into the fag_numba call)")
    args = ap.parse_args(argv)

    import torch  # (README: torch's OpenMP before numba's, as the other benchmarks)
    import ml_dtypes
    import numpy as np

    from benchmarks import common

    tmp = Path(tempfile.mkdtemp(prefix="fag_ab_"))
    try:
        _extract(args.base, tmp)
        sys.path.insert(0, str(tmp))
        new = importlib.import_module("fag_numba")
        old = importlib.import_module("fag_numba_base")
        for kv in args.set:
            key, val = kv.split("=", 1)
            setattr(new.config, key, type(getattr(new.config, key))(val))
        dt = {"fp32": np.float32, "bf16": ml_dtypes.bfloat16, "fp16": np.float16}[args.dtype]
        rng = np.random.default_rng(0)
        shape = (args.B, args.N, args.S, args.D)
        q, k, v, dy = (rng.standard_normal(shape, dtype=np.float32).astype(dt) for _ in range(4))
        kw = {"scale_value": args.D ** -0.5}
        if args.causal:
            kw.update(sparse_mode=3, atten_mask=common.compressed_causal_mask())

        def callable_of(fag):
            fwd = fag.flash_attention_score(q, k, v, args.N, "BNSD", **kw)
            if args.pass_ == "fwd":
                return lambda: fag.flash_attention_score(q, k, v, args.N, "BNSD", **kw)
            gkw = dict(kw, softmax_max=fwd.softmax_max, softmax_sum=fwd.softmax_sum,
                       attention_in=fwd.attention_out)
            return lambda: fag.flash_attention_score_grad(q, k, v, dy, args.N, "BNSD", **gkw)

        fns = {"new": callable_of(new), "old": callable_of(old)}
        torch_op = None
        if args.after_torch:
            tq, tk, tv = (torch.from_numpy(np.asarray(x, np.float32)).to(
                torch.bfloat16 if args.dtype == "bf16" else torch.float32) for x in (q, k, v))

            def torch_op():
                torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
            torch_op()
        outs = {name: fn() for name, fn in fns.items()}
        pick = (lambda r: [r.attention_out]) if args.pass_ == "fwd" else (lambda r: list(r[:3]))
        err = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
                        / max(float(np.max(np.abs(np.asarray(b, np.float64)))), 1e-30))
                  for a, b in zip(pick(outs["new"]), pick(outs["old"])))
        del outs
        times = {"new": [], "old": []}
        loads, attempts = [], 0
        while len(loads) < args.rounds and attempts < 6 * args.rounds:
            attempts += 1
            order = ("new", "old") if attempts % 2 else ("old", "new")
            with common.LoadMeter() as meter:
                got = {}
                for name in order:
                    if torch_op is not None:
                        torch_op()
                    t0 = time.perf_counter()
                    fns[name]()
                    got[name] = time.perf_counter() - t0
            if meter.fraction > 0.08 and sum(got.values()) > 0.02:
                common.wait_for_idle(30, 0.08, 0.5)
                continue
            loads.append(meter.fraction)
            for name, t in got.items():
                times[name].append(t)
        med = {name: float(np.median(ts)) for name, ts in times.items()}
        print(f"{shape} {args.dtype} {args.pass_}{' causal' if args.causal else ''}"
              f"{' after torch' if args.after_torch else ''} "
              f"vs {args.base}{' ' + ' '.join(args.set) if args.set else ''}: "
              f"new {med['new'] * 1e3:.1f} ms, old {med['old'] * 1e3:.1f} ms, "
              f"new/old {med['new'] / med['old']:.3f} "
              f"(min {min(times['new']) / min(times['old']):.3f}), max rel diff {err:.1e}, "
              f"other load {np.mean(loads) if loads else float('nan'):.2f}, "
              f"{len(loads)}/{attempts} rounds kept")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
