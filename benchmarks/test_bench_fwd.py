"""Forward benchmarks: fag_numba.flash_attention_score vs torch's forward, per shape and dtype.

Warm-up (compile) excluded as in ``test_bench_bwd.py``; one group per (row, dtype, threads).
"""
PASS = "fwd"


def test_fwd(benchmark, bench_case, run_bench):
    run_bench(benchmark, bench_case, PASS)
