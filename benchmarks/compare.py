"""A/B comparison of fag_numba against torch, one process, alternating calls after warm-up.

Usage (from the repository root)::

    python benchmarks/compare.py                          # issue shapes, fp32, backward
    python benchmarks/compare.py --dtype fp32 bf16 --rounds 7
    python benchmarks/compare.py --shapes causal b1n1s8192d64 --pass both
    python benchmarks/compare.py --shapes all --json /tmp/compare.json

``--shapes`` takes row names or tags of ``benchmarks/shapes.py`` (``issue``, ``causal``,
``band``, ``feature``, ``smoke``, ``big``, ``all``).  For every shape, dtype and pass it builds
the inputs, calls each implementation once (JIT compile, excluded), then times ``--rounds``
rounds, each round calling both (order swapped every round so drift hits both alike), and
prints the medians, the ratio fag/torch (< 1: fag_numba is faster), the GFLOP/s of each
(benchmarks/flops.py) and max|fag - torch| / max|torch| of the warm-up outputs as a sanity
check.  numba and torch get the same thread count.  The machine is shared: quote ratios, and
look at ``other%`` (CPU used by other processes during the timed rounds, % of the machine):
torch's OpenMP kernel degrades badly when a core is taken away, so rows with other% above ~5
are not comparable.  Rounds measured while others used more than ``--max-other`` percent are
retried (up to 4x); if the machine never got quiet enough the least loaded rounds are used and
other% is starred.  ``--wait-idle 300`` also waits for a quiet machine before each row.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):                     # run as a script: python benchmarks/compare.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, flops, shapes  # noqa: E402

COLUMNS = ("shape", "dtype", "pass", "fag ms", "torch ms", "fag/torch", "fag GF/s",
           "torch GF/s", "peer", "rel.err", "other%")
WIDTHS = (28, 5, 4, 9, 9, 9, 8, 10, 12, 8, 6)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _line(cells) -> str:
    out = []
    for i, (cell, width) in enumerate(zip(cells, WIDTHS)):
        out.append(f"{cell:<{width}}" if i in (0, 1, 2, 8) else f"{cell:>{width}}")
    return "  ".join(out).rstrip()


def compare_one(row: shapes.Row, dtype: str, pass_: str, rounds: int, check: bool,
                max_other: float | None = 0.05) -> dict:
    """Warm up both sides, time them alternately, return medians and derived numbers."""
    case = common.make_case(row, dtype)
    prepared, notes = {}, []
    for impl in common.IMPLS:
        try:
            prepared[impl] = common.prepare(impl, case, pass_)
        except common.Unavailable as exc:
            notes.append(f"{impl}: {exc}")
    err = None
    if check and len(prepared) == 2:
        err = common.max_rel_diff(case, prepared["fag_numba"].first, prepared["torch"].first,
                                  pass_)
    for p in prepared.values():
        p.first = None
    gc.collect()

    # A/B rounds; a round during which other processes used more than ``max_other`` of the
    # machine is set aside and retried (up to 4x rounds attempts), because one busy core slows
    # an OpenMP kernel far more than its share.  Rounds shorter than 0.1 s are always kept:
    # /proc/stat counts in 10 ms ticks, too coarse to judge them.
    order = list(prepared)
    kept, spare, attempts = [], [], 0
    while len(kept) < rounds and attempts < 4 * rounds:
        with common.LoadMeter() as load:
            ts = {impl: common.time_once(prepared[impl].fn)
                  for impl in (order if attempts % 2 == 0 else order[::-1])}
        attempts += 1
        rnd = (load.fraction, ts)
        if max_other is None or sum(ts.values()) < 0.1 or load.fraction <= max_other:
            kept.append(rnd)
        else:
            spare.append(rnd)
    short = rounds - len(kept)
    if short > 0:                       # never quiet enough: use the least loaded rounds
        kept += sorted(spare, key=lambda x: x[0])[:short]
    times = {impl: [ts[impl] for _, ts in kept] for impl in prepared}
    other = statistics.mean(f for f, _ in kept) if kept else 0.0
    med = {impl: statistics.median(ts) for impl, ts in times.items()}
    fag_s, torch_s = med.get("fag_numba"), med.get("torch")
    result = {
        "shape": row.name, "describe": row.describe(), "dtype": dtype, "pass": pass_,
        "rounds": rounds, "gflop": flops.flops(row, pass_) / 1e9,
        "fag_ms": fag_s * 1e3 if fag_s else None,
        "torch_ms": torch_s * 1e3 if torch_s else None,
        "ratio": fag_s / torch_s if fag_s and torch_s else None,
        "fag_gflops": common.gflops(row, pass_, fag_s) if fag_s else None,
        "torch_gflops": common.gflops(row, pass_, torch_s) if torch_s else None,
        "peer": prepared["torch"].label if "torch" in prepared else None,
        "rel_err": err, "notes": notes, "other_load": other,
        "loaded": short > 0, "attempts": attempts,
        "fag_times_ms": [t * 1e3 for t in times.get("fag_numba", [])],
        "torch_times_ms": [t * 1e3 for t in times.get("torch", [])],
    }
    del prepared, case
    gc.collect()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["issue"],
                        help="row names or tags from benchmarks/shapes.py (default: issue)")
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--pass", dest="passes", default="bwd", choices=["bwd", "fwd", "both"])
    parser.add_argument("--rounds", type=int, default=5, help="timed A/B rounds (default 5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for numba and torch (default: numba's count)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the fag-vs-torch output comparison")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each row wait up to SECONDS for other processes to use "
                             "< 10%% of the machine (the box is shared; default 0: no wait)")
    parser.add_argument("--max-other", type=float, default=5.0, metavar="PCT",
                        help="retry A/B rounds during which other processes used more than PCT%% "
                             "of the machine (default 5; -1 keeps every round)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    try:
        rows = shapes.select(args.shapes)
    except KeyError as exc:
        parser.error(str(exc))
    threads = common.setup_threads(args.threads)
    passes = ["fwd", "bwd"] if args.passes == "both" else [args.passes]

    results, header_done = [], False
    for row in rows:
        for dtype in args.dtype:
            for pass_ in passes:
                if args.wait_idle > 0:
                    common.wait_for_idle(args.wait_idle)
                res = compare_one(row, dtype, pass_, args.rounds, not args.no_check,
                                  None if args.max_other < 0 else args.max_other / 100)
                results.append(res)
                if not header_done:         # after the first warm-up: the layer is known now
                    info = common.env_info()
                    print(f"# fag_numba {info.get('fag_numba')} vs torch {info.get('torch')} | "
                          f"numba {info['numba']} layer={info['threading_layer']} "
                          f"threads={threads} (torch {info.get('torch_threads')}) | "
                          f"{info['cpu']} | load avg {os.getloadavg()[0]:.2f} | "
                          f"median of {args.rounds} A/B rounds after warm-up")
                    if info.get("torch_own_libgomp") is False:
                        print("# WARNING: torch runs on the system libgomp (numba's OpenMP pool "
                              "started before torch was imported): torch times are pessimistic")
                    print(_line(COLUMNS))
                    header_done = True
                print(_line((res["shape"], dtype, pass_, _fmt(res["fag_ms"], ".1f"),
                             _fmt(res["torch_ms"], ".1f"), _fmt(res["ratio"], ".2f"),
                             _fmt(res["fag_gflops"], ".1f"), _fmt(res["torch_gflops"], ".1f"),
                             (res["peer"] or "none").replace("torch ", ""),
                             _fmt(res["rel_err"], ".1e"),
                             _fmt(100 * res["other_load"], ".0f")
                             + ("*" if res["loaded"] else ""))), flush=True)
                for note in res["notes"]:
                    print(f"    n/a {note}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"env": common.env_info(), "threads": threads,
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
