"""Long runs (issue 11): one call vs the chunked driver vs ring attention, time and memory.

Usage (from the repository root, under the benchmark lock)::

    flock /tmp/fag_bench.lock python benchmarks/long_runs.py band   --S 1048576
    flock /tmp/fag_bench.lock python benchmarks/long_runs.py causal --S 131072

``band``: N=1, D=64, fp32 BSND, sparse mode 4 pre = next = 1024, forward + backward.
  *one*: one call on in-memory arrays; *chunked*: ``chunked_attention_score(_grad)`` on
  ``np.memmap`` inputs (``.npy`` files) with ``out=`` memmaps.  Each in a fresh process with
  ``NUMBA_NUM_THREADS=2``.
``causal``: N=1, D=64, fp32 BSND causal, forward + backward: *one* (2 threads), *chunked*
  (2 threads, chunk = S/2), *ring* (2 processes x 1 numba thread, gloo on loopback, zigzag),
  plus the ring's per-step bytes sent, compute and wait seconds.

Memory: a sampling thread reads ``RssAnon`` (anonymous resident memory: what the process
allocated, not the file pages a memmap maps) every 5 ms; "peak above inputs" is its maximum
minus its value once the inputs exist.  Kernels come from an on-disk cache (a temp
``NUMBA_CACHE_DIR`` warmed by the first child), so compile time is not measured.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _anon_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


class AnonPeak:
    """Max RssAnon (KB) seen by a 5 ms sampler thread since ``reset()``."""

    def __init__(self):
        self.peak = _anon_kb()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, _anon_kb())
            time.sleep(0.005)

    def reset(self):
        self.peak = _anon_kb()

    def stop(self):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, _anon_kb())


TRI = None


def _tri():
    import numpy as np
    global TRI
    if TRI is None:
        TRI = np.triu(np.ones((2048, 2048), bool), 1)
    return TRI


def _warm():
    import numpy as np
    import fag_numba
    fag_numba.warmup()
    q = np.random.default_rng(0).standard_normal((1, 64, 1, 16)).astype(np.float32)
    kw = dict(atten_mask=_tri(), sparse_mode=4, pre_tokens=8, next_tokens=8)
    f = fag_numba.chunked_attention_score(q, q, q, 1, "BSND", chunk=16, **kw)
    fag_numba.chunked_attention_score_grad(q, q, q, q, 1, "BSND", softmax_max=f.softmax_max,
                                           softmax_sum=f.softmax_sum,
                                           attention_in=f.attention_out, chunk=16, **kw)


def child(args):
    import numpy as np
    import fag_numba
    _warm()
    S, D = args.S, 64
    shape = (1, S, 1, D)
    scale = 1.0 / np.sqrt(D)
    if args.case == "band":
        kw = dict(atten_mask=_tri(), sparse_mode=4, pre_tokens=1024, next_tokens=1024,
                  scale_value=scale)
    else:
        kw = dict(atten_mask=_tri(), sparse_mode=3, scale_value=scale)
    rng = np.random.default_rng(1)
    mon = AnonPeak()
    res = {}
    if args.variant == "one":
        q, k, v, dy = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
        mon.reset()
        base = mon.peak
        for _ in range(args.repeat):          # the last repetition is reported
            t0 = time.perf_counter()
            f = fag_numba.flash_attention_score(q, k, v, 1, "BSND", **kw)
            t1 = time.perf_counter()
            fag_numba.flash_attention_score_grad(q, k, v, dy, 1, "BSND",
                                                 softmax_max=f.softmax_max,
                                                 softmax_sum=f.softmax_sum,
                                                 attention_in=f.attention_out, **kw)
            t2 = time.perf_counter()
            del f
    else:
        tmp = Path(args.tmp)
        names = ("q", "k", "v", "dy")
        for n in names:                 # written in chunks: the writer stays small too
            mm = np.lib.format.open_memmap(tmp / f"{n}.npy", "w+", np.float32, shape)
            for a in range(0, S, 65536):
                mm[:, a:a + 65536] = rng.standard_normal((1, min(65536, S - a), 1, D),
                                                         dtype=np.float32)
            mm.flush()
            del mm
        q, k, v, dy = (np.load(tmp / f"{n}.npy", mmap_mode="r") for n in names)

        def omap(n, shp):
            return np.lib.format.open_memmap(tmp / f"out_{n}.npy", "w+", np.float32, shp)
        fo = fag_numba.FlashAttentionOutput(omap("o", shape), omap("m", (1, 1, S, 8)),
                                            omap("l", (1, 1, S, 8)))
        go = fag_numba.FlashAttentionGrads(omap("dq", shape), omap("dk", shape),
                                           omap("dv", shape), None)
        chunk = args.chunk or (65536 if args.case == "band" else S // 2)
        mon.reset()
        base = mon.peak
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            f = fag_numba.chunked_attention_score(q, k, v, 1, "BSND", chunk=chunk, out=fo, **kw)
            t1 = time.perf_counter()
            fag_numba.chunked_attention_score_grad(q, k, v, dy, 1, "BSND",
                                                   softmax_max=f.softmax_max,
                                                   softmax_sum=f.softmax_sum,
                                                   attention_in=f.attention_out, chunk=chunk,
                                                   out=go, **kw)
            t2 = time.perf_counter()
        res["chunk"] = chunk
    mon.stop()
    res.update(fwd_s=t1 - t0, bwd_s=t2 - t1, peak_above_inputs_mb=(mon.peak - base) / 1024,
               inputs_anon_mb=base / 1024)
    print("RESULT " + json.dumps(res), flush=True)


def ring_child(args):
    import numpy as np
    import torch
    import torch.distributed as dist
    import fag_numba
    import fag_numba.torch as ft
    from fag_numba.torch import ring
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _warm()
    S, D = args.S, 64
    s = S // world
    g = torch.Generator().manual_seed(rank)
    q, k, v, dy = (torch.randn(1, s, 1, D, generator=g) for _ in range(4))
    w = [torch.randn(1, 16 * world, 1, 16).requires_grad_() for _ in range(3)]
    ft.ring_attention(*w, 1, causal=True).sum().backward()          # warm the ring path
    for x in (q, k, v):
        x.requires_grad_()
    for _ in range(args.repeat):
        dist.barrier()
        t0 = time.perf_counter()
        out = ft.ring_attention(q, k, v, 1, "BSND", causal=True, split="zigzag")
        dist.barrier()
        t1 = time.perf_counter()
        out.backward(dy)
        dist.barrier()
        t2 = time.perf_counter()
    res = dict(rank=rank, fwd_s=t1 - t0, bwd_s=t2 - t1, stats=ring.last_ring_stats)
    print("RESULT " + json.dumps(res), flush=True)
    dist.destroy_process_group()
    del np


def _env(cache, threads):
    env = dict(os.environ)
    env.update(NUMBA_CACHE_DIR=str(cache), FAG_NUMBA_CACHE_DIR=str(cache), FAG_NUMBA_CACHE="1",
               NUMBA_NUM_THREADS=str(threads),
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _result(out):
    return [json.loads(l[7:]) for l in out.splitlines() if l.startswith("RESULT ")]


def _run(cmd, env):
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if p.returncode:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
        raise SystemExit(f"child failed: {cmd}")
    return _result(p.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("case", choices=["band", "causal"])
    ap.add_argument("--S", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2, help="runs per variant; the last is "
                    "reported (the first pays one-time costs: cache loads, page faults)")
    ap.add_argument("--variants", nargs="*", default=None)
    ap.add_argument("--child", default=None)
    ap.add_argument("--tmp", default=None)
    args = ap.parse_args()
    if args.child == "ring":
        return ring_child(args)
    if args.child:
        args.variant = args.child
        return child(args)
    args.S = args.S or (1048576 if args.case == "band" else 131072)
    variants = args.variants or (["one", "chunked"] if args.case == "band"
                                 else ["one", "chunked", "ring"])
    with open("/proc/loadavg") as f:
        print(f"# load average: {f.read().split()[:3]}; S={args.S} N=1 D=64 fp32 BSND "
              f"{'band pre=next=1024' if args.case == 'band' else 'causal'}")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp, "cache")
        cache.mkdir()
        me = [sys.executable, str(Path(__file__).resolve()), args.case, "--S", str(args.S),
              "--chunk", str(args.chunk), "--tmp", tmp, "--repeat", str(args.repeat)]
        _run([sys.executable, "-c", "import sys; sys.path.insert(0, 'benchmarks'); "
              "import long_runs; long_runs._warm()"], _env(cache, 2))
        table = {}
        for var in variants:
            if var == "ring":
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                procs = []
                for r in range(2):
                    env = _env(cache, 1)
                    env.update(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(port))
                    procs.append(subprocess.Popen(me + ["--child", "ring"], env=env, cwd=ROOT,
                                                  stdout=subprocess.PIPE, text=True))
                outs = [_result(p.communicate(timeout=1800)[0]) for p in procs]
                ranks = [o[0] for o in outs]
                table[var] = dict(fwd_s=max(r["fwd_s"] for r in ranks),
                                  bwd_s=max(r["bwd_s"] for r in ranks), ranks=ranks)
            else:
                table[var] = _run(me + ["--child", var], _env(cache, 2))[0]
            r = table[var]
            tot = r["fwd_s"] + r["bwd_s"]
            mem = (f", peak above inputs {r['peak_above_inputs_mb']:.0f} MB"
                   if "peak_above_inputs_mb" in r else "")
            print(f"{var:8s} fwd {r['fwd_s']:7.2f} s  bwd {r['bwd_s']:7.2f} s  total {tot:7.2f} s"
                  f"{mem}", flush=True)
            if var == "ring":
                for rk in r["ranks"]:
                    for ph in ("forward", "backward"):
                        st = rk["stats"][ph]
                        print(f"   rank {rk['rank']} {ph:8s} bytes/step "
                              f"{[round(b / 2**20, 1) for b in st['bytes_sent']]} MB, compute "
                              f"{[round(x, 2) for x in st['compute_s']]} s, wait "
                              f"{[round(x, 3) for x in st['wait_s']]} s, total {st['total_s']:.2f} s")
        one = table.get("one")
        if one:
            t1 = one["fwd_s"] + one["bwd_s"]
            for var, r in table.items():
                print(f"ratio {var}/one: {(r['fwd_s'] + r['bwd_s']) / t1:.3f}")
        print("JSON " + json.dumps(table))


if __name__ == "__main__":
    main()
