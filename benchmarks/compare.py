"""A/B comparison of fag_numba against torch, one process, alternating calls after warm-up.

Usage (from the repository root)::

    python benchmarks/compare.py                          # issue shapes, fp32, backward
    python benchmarks/compare.py --dtype fp32 bf16 --rounds 7
    python benchmarks/compare.py --shapes causal b1n1s8192d64 --pass both
    python benchmarks/compare.py --shapes all --json /tmp/compare.json
    python benchmarks/compare.py --dtype fp32 bf16 fp16 --pass both --json new.json \
        --compare base.json                               # diff against a saved run
    python benchmarks/compare.py --shapes sweep --dtype fp32 bf16 --plot out.png

``--shapes`` takes row names or tags of ``benchmarks/shapes.py`` (``issue``, ``causal``,
``band``, ``feature``, ``smoke``, ``big``, ``all``).  For every shape, dtype and pass it builds
the inputs, calls each implementation once (JIT compile, excluded), then times ``--rounds``
rounds, each round calling both (order swapped every round so drift hits both alike), and
prints the medians, the ratio fag/torch (< 1: fag_numba is faster), the GFLOP/s of each
(benchmarks/flops.py) and max|fag - torch| / max|torch| of the warm-up outputs as a sanity
check.  numba and torch get the same thread count.  The run starts by measuring the sgemm
ceiling at that thread count (numpy's BLAS, float32 2048^3, best of 5): ``fag/ceil`` is
fag_numba's GFLOP/s over it (the same fp32 ceiling for every dtype: no sbgemm exists to compare
bf16 with).  ``--compare base.json`` prints, per row present in both runs, fag_numba's time
new/base and both fag/torch ratios (rows are matched by shape, dtype and pass; times from two
runs are only as comparable as the machine's load).  The machine is shared: quote ratios, and
look at ``other%`` (CPU used by other processes during the timed rounds, % of the machine):
torch's OpenMP kernel degrades badly when a core is taken away, so rows with other% above ~5
are not comparable.  Rounds measured while others used more than ``--max-other`` percent are
retried (up to 4x); if the machine never got quiet enough the least loaded rounds are used and
other% is starred.  ``--wait-idle 300`` also waits for a quiet machine before each row.
Right after a torch call, torch's OpenMP workers spin for ~3 ms (libgomp's default wait policy)
on a core the next fag_numba call needs: ``--omp-passive`` sets ``OMP_WAIT_POLICY=PASSIVE``
before torch loads (torch itself measured ~4% slower with it on a 4 ms call).
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

if "--omp-passive" in sys.argv[1:]:   # before torch loads (benchmarks.common imports it)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from benchmarks import common, flops, shapes  # noqa: E402

COLUMNS = ("shape", "dtype", "pass", "fag ms", "torch ms", "fag/torch", "fag GF/s",
           "torch GF/s", "fag/ceil", "peer", "rel.err", "other%")
WIDTHS = (28, 5, 4, 9, 9, 9, 8, 10, 8, 12, 8, 6)
TEXT_COLUMNS = (0, 1, 2, 9)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _line(cells) -> str:
    out = []
    for i, (cell, width) in enumerate(zip(cells, WIDTHS)):
        out.append(f"{cell:<{width}}" if i in TEXT_COLUMNS else f"{cell:>{width}}")
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


def sgemm_ceiling(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of numpy's float32 ``n x n @ n x n`` on ``threads`` BLAS threads (best of
    ``repeats``): the machine's dense-GEMM ceiling for this run (PERF.md's anchor)."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    with threadpool_limits(limits=threads, user_api="blas"):
        a @ b                                           # warm-up (thread pool, pages)
        best = min(common.time_once(lambda: a @ b) for _ in range(repeats))
    return 2.0 * n ** 3 / best / 1e9


def _key(res: dict) -> tuple:
    return (res["shape"], res["dtype"], res["pass"])


def compare_with_baseline(results: list[dict], baseline: dict) -> list[str]:
    """Lines of the new-vs-baseline table (rows present in both runs)."""
    base = {_key(r): r for r in baseline.get("results", [])}
    lines = [f"# vs baseline: sgemm ceiling {baseline.get('sgemm_gflops') or float('nan'):.0f} "
             f"GFLOP/s then; new/base < 1 means faster now",
             f"{'shape':<28}  {'dtype':<5}  {'pass':<4}  {'fag ms':>9}  {'base ms':>9}  "
             f"{'new/base':>8}  {'fag/torch':>9}  {'was':>6}"]
    for res in results:
        old = base.get(_key(res))
        if old is None:
            lines.append(f"{res['shape']:<28}  {res['dtype']:<5}  {res['pass']:<4}  (not in baseline)")
            continue
        ratio = (res["fag_ms"] / old["fag_ms"]) if res.get("fag_ms") and old.get("fag_ms") else None
        lines.append(f"{res['shape']:<28}  {res['dtype']:<5}  {res['pass']:<4}  "
                     f"{_fmt(res.get('fag_ms'), '.1f'):>9}  {_fmt(old.get('fag_ms'), '.1f'):>9}  "
                     f"{_fmt(ratio, '.2f'):>8}  {_fmt(res.get('ratio'), '.2f'):>9}  "
                     f"{_fmt(old.get('ratio'), '.2f'):>6}")
    return lines


def plot(results: list[dict], ceiling: float | None, path: Path, title: str) -> None:
    """Time and GFLOP/s against S for fag_numba (solid) and torch (dashed), one colour per
    dtype, dense and causal side by side, one row pair per pass; the sgemm ceiling as a line.

    Needs matplotlib (``pip install ".[bench]"``).  S is the row's S1; rows of other shapes
    (another B, N or D) are drawn as they come, so plot one family (``--shapes sweep``).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install \".[bench]\"") from exc
    from benchmarks import shapes as _shapes

    passes = [p for p in ("fwd", "bwd") if any(r["pass"] == p for r in results)]
    kinds = ("dense", "causal")
    fig, axes = plt.subplots(2 * len(passes), 2, figsize=(10, 4.2 * len(passes)), squeeze=False,
                             sharex=True)
    colours = {"fp32": "tab:blue", "bf16": "tab:orange", "fp16": "tab:green"}
    for pi, pass_ in enumerate(passes):
        for ki, kind in enumerate(kinds):
            ax_t, ax_g = axes[2 * pi, ki], axes[2 * pi + 1, ki]
            for dtype in colours:
                rows = sorted((r for r in results if r["pass"] == pass_ and r["dtype"] == dtype
                               and (_shapes.BY_NAME[r["shape"]].sparse_mode != 0) == (ki == 1)),
                              key=lambda r: _shapes.BY_NAME[r["shape"]].S1)
                if not rows:
                    continue
                xs = [_shapes.BY_NAME[r["shape"]].S1 for r in rows]
                for impl, style in (("fag", "-"), ("torch", "--")):
                    t = [r.get(f"{impl}_ms") for r in rows]
                    g = [r.get(f"{impl}_gflops") for r in rows]
                    if all(v is None for v in t):
                        continue
                    label = f"{'fag_numba' if impl == 'fag' else 'torch'} {dtype}"
                    ax_t.plot(xs, t, style, marker="o", color=colours[dtype], label=label)
                    ax_g.plot(xs, g, style, marker="o", color=colours[dtype], label=label)
            if ceiling:
                ax_g.axhline(ceiling, color="grey", linestyle=":", label=f"sgemm ceiling "
                             f"{ceiling:.0f}")
            ax_t.set_yscale("log")
            ax_t.set_ylabel("ms (log)")
            ax_g.set_ylabel("GFLOP/s")
            ax_g.set_ylim(bottom=0)
            ax_t.set_title(f"{'backward' if pass_ == 'bwd' else 'forward'}, {kind}")
            for ax in (ax_t, ax_g):
                ax.set_xscale("log", base=2)
                ax.grid(True, alpha=0.3)
            ax_g.set_xlabel("S (= S1 = S2)")
    handles, labels = axes[1, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8,
               frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["issue"],
                        help="row names or tags from benchmarks/shapes.py (default: issue)")
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
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
    parser.add_argument("--compare", type=Path, metavar="BASE.json",
                        help="print new/base times against a JSON written by an earlier --json")
    parser.add_argument("--plot", type=Path, metavar="OUT.png",
                        help="draw time and GFLOP/s vs S (needs matplotlib: the bench extra)")
    parser.add_argument("--omp-passive", action="store_true",
                        help="OMP_WAIT_POLICY=PASSIVE for torch (set before torch loads): its "
                             "OpenMP workers then sleep after each call instead of spinning "
                             "~3 ms on a core the next fag_numba call needs (README, Threads)")
    args = parser.parse_args(argv)
    if args.omp_passive and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        parser.error("--omp-passive: torch was imported before the flag was seen (OpenMP read "
                     "its wait policy then); set OMP_WAIT_POLICY=PASSIVE in the environment")

    try:
        rows = shapes.select(args.shapes)
    except KeyError as exc:
        parser.error(str(exc))
    baseline = json.loads(args.compare.read_text()) if args.compare else None
    threads = common.setup_threads(args.threads)
    passes = ["fwd", "bwd"] if args.passes == "both" else [args.passes]
    ceiling = sgemm_ceiling(threads)

    results, header_done = [], False
    for row in rows:
        for dtype in args.dtype:
            for pass_ in passes:
                if args.wait_idle > 0:
                    common.wait_for_idle(args.wait_idle)
                res = compare_one(row, dtype, pass_, args.rounds, not args.no_check,
                                  None if args.max_other < 0 else args.max_other / 100)
                res["ceiling_ratio"] = res["fag_gflops"] / ceiling if res["fag_gflops"] else None
                results.append(res)
                if not header_done:         # after the first warm-up: the layer is known now
                    info = common.env_info()
                    print(f"# fag_numba {info.get('fag_numba')} vs torch {info.get('torch')} | "
                          f"numba {info['numba']} layer={info['threading_layer']} "
                          f"threads={threads} (torch {info.get('torch_threads')}) | "
                          f"{info['cpu']} | load avg {os.getloadavg()[0]:.2f} | "
                          f"median of {args.rounds} A/B rounds after warm-up | "
                          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} | "
                          f"sgemm ceiling {ceiling:.0f} GFLOP/s ({threads} threads)")
                    if info.get("torch_own_libgomp") is False:
                        print("# WARNING: torch runs on the system libgomp (numba's OpenMP pool "
                              "started before torch was imported): torch times are pessimistic")
                    print(_line(COLUMNS))
                    header_done = True
                print(_line((res["shape"], dtype, pass_, _fmt(res["fag_ms"], ".1f"),
                             _fmt(res["torch_ms"], ".1f"), _fmt(res["ratio"], ".2f"),
                             _fmt(res["fag_gflops"], ".1f"), _fmt(res["torch_gflops"], ".1f"),
                             _fmt(res["ceiling_ratio"], ".2f"),
                             (res["peer"] or "none").replace("torch ", ""),
                             _fmt(res["rel_err"], ".1e"),
                             _fmt(100 * res["other_load"], ".0f")
                             + ("*" if res["loaded"] else ""))), flush=True)
                for note in res["notes"]:
                    print(f"    n/a {note}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"env": common.env_info(), "threads": threads,
                                         "sgemm_gflops": ceiling, "results": results}, indent=1))
    if baseline is not None:
        print("\n".join(compare_with_baseline(results, baseline)))
    if args.plot:
        info = common.env_info()
        plot(results, ceiling, args.plot,
             f"fag_numba {info.get('fag_numba')} vs torch {info.get('torch')}, {threads} threads, "
             f"{info['cpu']}; medians of {args.rounds} A/B rounds")
        print(f"# plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
