"""``python -m fag_numba [demo|info|selftest]``: the demo (default), runtime facts, a self-check."""
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
          f"({numba.get_num_threads()} threads, numba {numba.__version__})")
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


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fag_numba",
                                description="fag_numba: Ascend FlashAttentionScoreGrad on the CPU.")
    sub = p.add_subparsers(dest="cmd")
    pd = sub.add_parser("demo", help="forward + backward on a default problem (the default)")
    for q in (p, pd):
        q.add_argument("--shape", type=int, nargs=4, default=[1, 8, 2048, 128],
                       metavar=("B", "N", "S", "D"), help="problem size (default 1 8 2048 128)")
        q.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    sub.add_parser("info", help="versions, threading layer, threads, BLAS, CPU, cache dir")
    sub.add_parser("selftest", help="quick correctness check; exit code 0 = pass")
    args = p.parse_args(argv)
    return {"info": info, "selftest": selftest}.get(args.cmd, demo)(args)


if __name__ == "__main__":
    sys.exit(main())
