"""Where a call's cycles go, per numba function: Linux ``perf`` samples attributed to
fag_numba's compiled functions.

Usage (from the repository root; needs ``perf`` and permission to attach to a child)::

    python benchmarks/perf_attr.py 2 16 512 64 --dtype bf16 --pass fwd --calls 2000

``perf report`` alone shows numba's code as raw addresses ("[JIT] tid ...").  This script runs
the workload in a child process that compiles in-process (``FAG_NUMBA_CACHE=0``: a library
loaded from the cache keeps no symbol table), warms up, writes the start address of every
function of every compiled library (callees that LLVM did not inline are functions of their
own), then waits; ``perf record -p`` attaches only for the timed calls.  Each sample is then
given to the function with the greatest start address at or below it, and the table lists
the shares: numba functions by module.qualname, other code by its shared object.

How the 2026-12 findings were made (with ``perf report`` and ``objdump -D -b binary`` of
the hot code's bytes): the NRT reference counts of slices (``lock incq`` / ``lock decq`` in
``NRT_incref`` / ``NRT_decref``), the three-instruction NaN-propagating maximum, the memset of
calloc'ed outputs.  Samples in shared objects (OpenBLAS, libc, libpython) are listed by object;
``perf report --sort dso,symbol`` names their functions.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import ctypes, sys
import numpy as np, ml_dtypes
import fag_numba as F
from numba.core.registry import CPUDispatcher
B, N, S, D, calls = (int(x) for x in sys.argv[1:6])
dt = ml_dtypes.bfloat16 if sys.argv[6] == "bf16" else (np.float16 if sys.argv[6] == "fp16"
                                                       else np.float32)
kw = {"atten_mask": np.triu(np.ones((2048, 2048), bool), 1), "sparse_mode": 3} \
    if sys.argv[8] == "1" else {}
rng = np.random.default_rng(0)
q, k, v, dy = (rng.standard_normal((B, N, S, D), dtype=np.float32).astype(dt) for _ in range(4))
fwd = lambda: F.flash_attention_score(q, k, v, N, "BNSD", scale_value=D ** -0.5, **kw)
f = fwd
if sys.argv[7] == "bwd":
    r = fwd()
    f = lambda: F.flash_attention_score_grad(q, k, v, dy, N, "BNSD", scale_value=D ** -0.5,
                                             softmax_max=r.softmax_max, softmax_sum=r.softmax_sum,
                                             attention_in=r.attention_out, **kw)
for _ in range(5):
    f()
libs = []
for name, m in list(sys.modules.items()):
    if name.startswith("fag_numba"):
        for obj in list(vars(m).values()):
            ds = obj.values() if isinstance(obj, dict) else [obj]
            for d in ds:
                if isinstance(d, CPUDispatcher):
                    libs += [c.library for c in d.overloads.values()]
seen = {}
for lib in libs:
    for fn in lib._final_module.functions:
        if not fn.is_declaration:
            try:
                a = lib.get_pointer_to_function(fn.name)
            except Exception:
                continue
            if a:
                seen[a] = fn.name
with open(sys.argv[9], "w") as fh:
    for a in sorted(seen):
        fh.write(f"{a:x} {seen[a]}\n")
print("READY", flush=True)
sys.stdin.readline()
for _ in range(calls):
    f()
"""


def _demangle(name: str) -> str:
    """module.qualname of a numba symbol (``_ZN...`` length-prefixed parts, up to the hash)."""
    s = name.replace("cfunc.", "").replace("_ZN7cpython", "_ZN")
    if not s.startswith("_ZN"):
        return name[:60]
    s, parts = s[3:], []
    while s and s[0].isdigit():
        n = re.match(r"\d+", s).group()
        parts.append(s[len(n):len(n) + int(n)])
        s = s[len(n) + int(n):]
    return ".".join(p for p in parts if p != "_3clocals_3e")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", nargs=4, type=int, metavar=("B", "N", "S", "D"))
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--pass", dest="pas", default="fwd", choices=["fwd", "bwd"])
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        syms, data = Path(tmp) / "syms.txt", Path(tmp) / "perf.data"
        env = dict(os.environ, FAG_NUMBA_CACHE="0", PYTHONPATH=str(ROOT))
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, *map(str, args.shape), str(args.calls), args.dtype,
             args.pas, "1" if args.causal else "0", str(syms)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if child.stdout.readline().strip() != "READY":
            child.kill()
            print("the workload failed before its timed calls", file=sys.stderr)
            return 1
        rec = subprocess.Popen(["perf", "record", "-q", "-p", str(child.pid), "-o", str(data)])
        child.stdin.write("\n")
        child.stdin.flush()
        child.wait()
        rec.wait()
        ips = subprocess.run(["perf", "script", "-i", str(data), "-F", "ip,dso"],
                             capture_output=True, text=True).stdout
        starts, names = [], []
        for line in syms.read_text().splitlines():
            a, n = line.split(maxsplit=1)
            starts.append(int(a, 16))
            names.append(_demangle(n))
    counts, total = collections.Counter(), 0
    for line in ips.splitlines():
        p = line.split()
        if not p:
            continue
        total += 1
        ip, dso = int(p[0], 16), (p[1] if len(p) > 1 else "")
        i = bisect.bisect_right(starts, ip) - 1
        if ("JIT" in dso or "perf-" in dso or "unknown" in dso) and i >= 0 \
                and ip - starts[i] < 1 << 20:
            counts[names[i]] += 1
        else:
            counts[os.path.basename(dso.strip("()")) or "?"] += 1
    print(f"{total} samples, {args.calls} calls of {args.dtype} {args.pas} {tuple(args.shape)}"
          f"{' causal' if args.causal else ''}")
    for name, c in counts.most_common(args.top):
        print(f"{100 * c / max(total, 1):6.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
