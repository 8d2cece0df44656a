"""``python -m fag_numba [demo|info|selftest|bench]``: the demo (default), runtime facts, a
self-check, a configurable benchmark."""
import argparse
import json
import sys
import time

import numpy as np


def _problem(shape, dtype, seed=0):
    b, n, s, d = shape
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((b, n, s, d)).astype(dtype) for _ in range(4)]


def _check_small(verbose=True):
    """Compare forward + backward with the dense float64 attention on small problems."""
    import fag_numba
    from fag_numba._dense import dense_attention

    worst = 0.0
    cases = [((2, 4, 37, 24), 2, 1.0 / np.sqrt(24), None),
             ((1, 4, 70, 16), 4, 0.25, 3)]
    for (b, n1, s, d), g, scale, mode in cases:
        q, k, v, dy = _problem((b, n1, s, d), np.float32)
        k, v = k[:, :n1 // g], v[:, :n1 // g]
        kw = dict(scale_value=scale)
        comp = None
        if mode == 3:
            kw.update(atten_mask=np.triu(np.ones((2048, 2048), bool), 1), sparse_mode=3)
            comp = np.tril(np.ones((s, s), bool))
        fwd = fag_numba.flash_attention_score(q, k, v, n1, "BNSD", **kw)
        grads = fag_numba.flash_attention_score_grad(
            q, k, v, dy, n1, "BNSD", softmax_max=fwd.softmax_max, softmax_sum=fwd.softmax_sum,
            attention_in=fwd.attention_out, **kw)
        o, lse, dq, dk, dv = dense_attention(q, k, v, dy, np.float32(scale), comp)
        for name, a, r in (("attention_out", fwd.attention_out, o), ("dq", grads.dq, dq),
                           ("dk", grads.dk, dk), ("dv", grads.dv, dv)):
            err = float(np.max(np.abs(a - r)) / max(1.0, float(np.max(np.abs(r)))))
            worst = max(worst, err)
            if verbose and err > 1e-4:
                print(f"  MISMATCH {name}: relative error {err:.2e}")
    return worst


def demo(args):
    import numba

    import fag_numba

    b, n, s, d = args.shape
    dtype = {"float32": np.float32, "float16": np.float16}.get(args.dtype)
    if dtype is None:
        import ml_dtypes
        dtype = ml_dtypes.bfloat16
    print(f"fag_numba {fag_numba.__version__}: FlashAttentionScore + Grad on the CPU "
          f"({fag_numba.num_threads()} threads, numba {numba.__version__})")
    t = time.perf_counter()
    worst = _check_small()
    print(f"check vs dense float64 (BNSD, GQA, causal): max relative error {worst:.1e} "
          f"({'ok' if worst < 1e-4 else 'FAILED'}); first call incl. JIT compile "
          f"{time.perf_counter() - t:.1f} s")
    q, k, v, dy = _problem((b, n, s, d), dtype, 1)
    scale = 1.0 / np.sqrt(d)
    t = time.perf_counter()
    fwd = fag_numba.flash_attention_score(q, k, v, n, "BNSD", scale_value=scale)
    tf = time.perf_counter() - t
    t = time.perf_counter()
    fag_numba.flash_attention_score_grad(q, k, v, dy, n, "BNSD", scale_value=scale,
                                         softmax_max=fwd.softmax_max,
                                         softmax_sum=fwd.softmax_sum,
                                         attention_in=fwd.attention_out)
    tb = time.perf_counter() - t
    flops = 4.0 * b * n * s * s * d
    print(f"problem B={b} N={n} S={s} D={d} {np.dtype(dtype).name} BNSD, no mask")
    print(f"forward  {tf * 1e3:8.1f} ms  {flops / tf / 1e9:6.1f} GFLOP/s")
    print(f"backward {tb * 1e3:8.1f} ms  {2.5 * flops / tb / 1e9:6.1f} GFLOP/s")
    return 0 if worst < 1e-4 else 1


def info(args):
    import fag_numba
    print(json.dumps(fag_numba.runtime_info(), indent=2, default=str))
    return 0


def selftest(args):
    t = time.perf_counter()
    worst = _check_small(verbose=True)
    ok = worst < 1e-4
    print(f"selftest: max relative error {worst:.2e}: {'PASS' if ok else 'FAIL'} "
          f"({time.perf_counter() - t:.1f} s)")
    return 0 if ok else 1


def bench(args):
    """Time forward and backward on a configurable problem; optional torch peer."""
    import resource

    if args.torch:
        # torch must load its own OpenMP runtime before numba starts the system libgomp pool,
        # else torch's kernels run ~10x slower (measured in benchmarks/common.py)
        try:
            import torch  # noqa: F401
        except ImportError:
            pass
    import fag_numba
    from fag_numba import dtypes

    if args.threads:
        fag_numba.set_num_threads(args.threads)
    b, n1, s, d = args.shape
    n2 = args.kv_heads or n1
    dt = {"float32": dtypes.FLOAT32, "float16": dtypes.FLOAT16, "bfloat16": dtypes.BFLOAT16,
          "float8_e4m3fn": dtypes.FP8_E4M3, "float8_e5m2": dtypes.FP8_E5M2}[args.dtype]
    rng = np.random.default_rng(0)
    shapes = {"BNSD": ((b, n1, s, d), (b, n2, s, d)), "BSND": ((b, s, n1, d), (b, s, n2, d)),
              "BSH": ((b, s, n1 * d), (b, s, n2 * d)), "SBH": ((s, b, n1 * d), (s, b, n2 * d)),
              "TND": ((b * s, n1, d), (b * s, n2, d))}
    qs, ks = shapes[args.layout]
    q, dy = (rng.standard_normal(qs).astype(np.float32).astype(dt) for _ in range(2))
    k, v = (rng.standard_normal(ks).astype(np.float32).astype(dt) for _ in range(2))
    kw = dict(scale_value=1.0 / np.sqrt(d), sparse_mode=args.sparse_mode)
    density = 1.0
    if args.sparse_mode in (2, 3):
        kw["atten_mask"] = np.triu(np.ones((2048, 2048), bool), 1)
        density = 0.5
    elif args.sparse_mode == 4:
        kw.update(atten_mask=np.triu(np.ones((2048, 2048), bool), 1),
                  pre_tokens=args.band, next_tokens=args.band)
        density = min(1.0, (2 * args.band + 1) / s)
    elif args.sparse_mode != 0:
        print("bench: --sparse-mode must be 0, 2, 3 or 4", file=sys.stderr)
        return 2
    if args.layout == "TND":
        cu = [s * (i + 1) for i in range(b)]
        kw.update(actual_seq_qlen=cu, actual_seq_kvlen=cu)
    from tqdm import tqdm

    # stderr (tqdm's default), so the report on stdout stays clean
    bar = tqdm(total=args.rounds + 1, desc="bench", unit="round", file=sys.stderr)
    fwd = fag_numba.flash_attention_score(q, k, v, n1, args.layout, **kw)
    grad = lambda: fag_numba.flash_attention_score_grad(
        q, k, v, dy, n1, args.layout, softmax_max=fwd.softmax_max, softmax_sum=fwd.softmax_sum,
        attention_in=fwd.attention_out, **kw)
    grad()
    bar.update(1)                                    # the first call (with the JIT compile)
    tf, tb = [], []
    for r in range(args.rounds):
        t = time.perf_counter()
        fag_numba.flash_attention_score(q, k, v, n1, args.layout, **kw)
        tf.append(time.perf_counter() - t)
        t = time.perf_counter()
        grad()
        tb.append(time.perf_counter() - t)
        bar.update(1)
    bar.close()
    flops = 4.0 * b * n1 * s * s * d * density
    mf, mb = float(np.median(tf)), float(np.median(tb))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"fag_numba {args.layout} {args.dtype} B={b} N1={n1} N2={n2} S={s} D={d} "
          f"sparse_mode={args.sparse_mode} threads={fag_numba.num_threads()}")
    print(f"forward  median {mf * 1e3:9.1f} ms  {flops / mf / 1e9:7.1f} GFLOP/s")
    print(f"backward median {mb * 1e3:9.1f} ms  {2.5 * flops / mb / 1e9:7.1f} GFLOP/s")
    print(f"peak RSS of the process {peak:.0f} MB")
    if args.torch:
        try:
            import torch
        except ImportError:
            print("torch peer: torch is not installed (pip install torch==2.13.0)")
            return 0
        if args.layout != "BNSD" or args.sparse_mode not in (0, 2, 3) or n1 != n2:
            print("torch peer: only BNSD, N1 == N2, sparse_mode 0/2/3 (torch has no band/GQA "
                  "flash path)")
            return 0
        torch.set_num_threads(fag_numba.num_threads())
        tt = torch.float32 if args.dtype == "float32" else torch.bfloat16
        tq, tk, tv, tdy = (torch.randn(b, n1, s, d, dtype=tt) for _ in range(4))
        causal = args.sparse_mode in (2, 3)
        op = torch.ops.aten
        out, lse = op._scaled_dot_product_flash_attention_for_cpu(tq, tk, tv, 0.0, causal,
                                                                 scale=kw["scale_value"])
        tgrad = lambda: op._scaled_dot_product_flash_attention_for_cpu_backward(
            tdy, tq, tk, tv, out, lse, 0.0, causal, scale=kw["scale_value"])
        tgrad()
        ts = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            tgrad()
            ts.append(time.perf_counter() - t)
        mt = float(np.median(ts))
        print(f"torch backward median {mt * 1e3:9.1f} ms  {2.5 * flops / mt / 1e9:7.1f} GFLOP/s"
              f"  -> ratio fag_numba / torch = {mb / mt:.2f}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fag_numba",
                                description="fag_numba: Ascend FlashAttentionScoreGrad on the CPU.")
    sub = p.add_subparsers(dest="cmd")
    pd = sub.add_parser("demo", help="forward + backward on a default problem (the default)")
    for q in (p, pd):
        q.add_argument("--shape", type=int, nargs=4, default=[1, 8, 2048, 128],
                       metavar=("B", "N", "S", "D"), help="problem size (default 1 8 2048 128)")
        q.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    pb = sub.add_parser("bench", help="time forward/backward on a configurable problem")
    pb.add_argument("--shape", type=int, nargs=4, default=[1, 8, 2048, 128],
                    metavar=("B", "N1", "S", "D"))
    pb.add_argument("--kv-heads", type=int, default=0, help="N2 (default N1)")
    pb.add_argument("--layout", default="BNSD", choices=["BNSD", "BSND", "BSH", "SBH", "TND"])
    pb.add_argument("--dtype", default="float32",
                    choices=["float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"])
    pb.add_argument("--sparse-mode", type=int, default=0, help="0 (dense), 2/3 (causal), 4 (band)")
    pb.add_argument("--band", type=int, default=256, help="pre = next tokens for sparse mode 4")
    pb.add_argument("--threads", type=int, default=0, help="numba threads (default all)")
    pb.add_argument("--rounds", type=int, default=3, help="timed rounds (medians reported)")
    pb.add_argument("--torch", action="store_true", help="also time torch's CPU flash backward")
    sub.add_parser("info", help="versions, threading layer, threads, BLAS, CPU, cache dir")
    sub.add_parser("selftest", help="quick correctness check; exit code 0 = pass")
    args = p.parse_args(argv)
    return {"info": info, "selftest": selftest, "bench": bench}.get(args.cmd, demo)(args)


if __name__ == "__main__":
    sys.exit(main())
