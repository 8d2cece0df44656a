"""Peak extra memory of the backward: fag_numba vs torch's flash backward, fresh process each.

Usage (from the repository root)::

    python benchmarks/peak_memory.py                        # S=32768, N=1, D=64, fp32, both
    python benchmarks/peak_memory.py --S 8192 32768 131072 --impl fag_numba
    python benchmarks/peak_memory.py --causal --threads 1

For each (impl, S) a child process (this file with ``--child``):

1. compiles / warms up forward and backward on a tiny shape (S=256), so JIT memory and
   one-time allocations are not counted;
2. creates q, k, v, dy (B, N, S, D) and runs the forward once to get the backward's inputs
   (fag_numba: softmax_max, softmax_sum, attention_out; torch: out, lse);
3. ``gc.collect()``, reads the current RSS (``/proc/self/statm``: the *baseline*, "RSS after
   the inputs exist") and resets the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``)
   so the forward's and the warm-up's peaks do not hide the backward's;
4. runs the backward once and reads ``resource.getrusage(RUSAGE_SELF).ru_maxrss``.

``extra = peak - baseline`` includes the gradients themselves (dq, dk, dv: 3*N*D*4 bytes per
token in fp32); ``bytes/token = extra / (B*S)``.  If the peak mark cannot be reset the line is
flagged ``(no reset)`` and the number is an upper bound.  PERF.md's torch anchor: ~1 KB/token.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):                     # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, shapes  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def current_rss() -> int:
    """Resident set size now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_rss() -> int:
    """Peak resident set size, in bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset the peak-RSS mark to the current RSS (Linux >= 4.0); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_row(S: int, N: int, D: int, B: int, causal: bool) -> shapes.Row:
    return shapes.Row(B, N, N, S, S, D, "BNSD", 3 if causal else 0, name=f"peak-s{S}",
                      peer="flash")


def child(args) -> dict:
    """Steps 1-4 of the module docstring for one implementation; returns the numbers."""
    threads = common.setup_threads(args.threads)
    # 1. warm-up on a tiny shape: compile forward + backward and touch every code path once
    tiny = common.make_case(make_row(256, args.N, args.D, args.B, args.causal), args.dtype)
    common.prepare(args.child, tiny, "bwd")
    del tiny
    # 2. inputs and the forward's statistics
    row = make_row(args.S, args.N, args.D, args.B, args.causal)
    case = common.make_case(row, args.dtype)
    prepared = common.prepare(args.child, case, "bwd", warmup=False)
    gc.collect()
    # 3. baseline
    baseline = current_rss()
    peak_before = peak_rss()
    reset = reset_peak()
    # 4. the backward
    result = prepared.fn()
    peak = peak_rss()
    outputs = result[:3] if isinstance(result, tuple) else (result.dq, result.dk, result.dv)
    out_bytes = sum(int(getattr(t, "nbytes", 0) or t.numel() * t.element_size())
                    for t in outputs)
    tokens = row.B * row.S1
    return {"impl": prepared.label, "S": args.S, "B": args.B, "N": args.N, "D": args.D,
            "dtype": args.dtype, "causal": args.causal, "threads": threads,
            "baseline_bytes": baseline, "peak_bytes": peak, "extra_bytes": peak - baseline,
            "bytes_per_token": (peak - baseline) / tokens,
            "output_bytes_per_token": out_bytes / tokens,
            "peak_reset": reset, "peak_before_reset_bytes": peak_before}


def run_child(impl: str, S: int, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, "--S", str(S),
           "--N", str(args.N), "--D", str(args.D), "--B", str(args.B), "--dtype", args.dtype]
    if args.causal:
        cmd.append("--causal")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(common.REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"impl": impl, "S": S, "error": " | ".join(tail) or f"rc={proc.returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--S", type=int, nargs="+", default=[32768], help="sequence lengths")
    parser.add_argument("--N", type=int, default=1, help="heads (default 1)")
    parser.add_argument("--D", type=int, default=64, help="head dim (default 64)")
    parser.add_argument("--B", type=int, default=1, help="batch (default 1)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--causal", action="store_true",
                        help="fag: sparse_mode 3 + compressed mask; torch: is_causal")
    parser.add_argument("--impl", nargs="+", default=list(common.IMPLS),
                        choices=list(common.IMPLS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--child", choices=list(common.IMPLS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        args.S = args.S[0]
        try:
            res = child(args)
        except common.Unavailable as exc:
            res = {"impl": args.child, "S": args.S, "error": str(exc)}
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    mode = "causal (fag sm3, torch is_causal)" if args.causal else "dense"
    print(f"# backward peak RSS above inputs; B{args.B} N{args.N} D{args.D} {args.dtype} BNSD "
          f"{mode}; fresh process per line, JIT warm-up excluded")
    print(f"{'impl':<12} {'S':>7} {'threads':>7} {'baseline MB':>11} {'extra MB':>9} "
          f"{'B/token':>8} {'grads B/token':>13} {'beyond grads':>12}")
    results = []
    for S in args.S:
        for impl in args.impl:
            res = run_child(impl, S, args)
            results.append(res)
            if "error" in res:
                print(f"{impl:<12} {S:>7}  n/a: {res['error']}", flush=True)
                continue
            flag = "" if res["peak_reset"] else "  (no reset: upper bound)"
            print(f"{res['impl']:<12} {S:>7} {res['threads']:>7} "
                  f"{res['baseline_bytes'] / 2**20:>11.1f} {res['extra_bytes'] / 2**20:>9.1f} "
                  f"{res['bytes_per_token']:>8.0f} {res['output_bytes_per_token']:>13.0f} "
                  f"{res['bytes_per_token'] - res['output_bytes_per_token']:>12.0f}{flag}",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
