"""pytest-benchmark plumbing: options, case generation, the shared runner, the report header.

Options (all optional):

``--bench-shapes SPEC[,SPEC]``  rows by name or tag (benchmarks/shapes.py), default ``all``
``--bench-dtypes fp32[,bf16]``   restrict the dtypes (default: each row's own list)
``--bench-threads N[,N]``        thread counts to sweep, same for numba and torch
                                 (default: numba's current count, i.e. all cores)
``--bench-rounds N``             override every row's timed rounds (e.g. 1 for a quick pass)

Every (row, dtype, threads) gives one benchmark group holding fag_numba and its torch peer, so
``pytest-benchmark`` prints them side by side.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:           # fag_numba is used from the checkout (it is not installed)
    sys.path.insert(0, _ROOT)

from benchmarks import common, flops, shapes  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("fag_numba benchmarks")
    group.addoption("--bench-shapes", default="all",
                    help="comma list of row names or tags from benchmarks/shapes.py")
    group.addoption("--bench-dtypes", default="",
                    help="comma list of dtypes (fp32, bf16); default: each row's dtypes")
    group.addoption("--bench-threads", default="",
                    help="comma list of thread counts (default: numba.get_num_threads())")
    group.addoption("--bench-rounds", type=int, default=0,
                    help="timed rounds per case, overriding the rows' defaults")


def _csv(text: str) -> list[str]:
    return [t for t in text.replace(",", " ").split() if t]


def _thread_counts(config) -> list[int]:
    values = _csv(config.getoption("--bench-threads"))
    if values:
        return [int(v) for v in values]
    import numba

    return [numba.get_num_threads()]


def bench_params(config, pass_: str):
    """pytest.param objects (row, dtype, impl, threads), each marked with its group."""
    rows = shapes.select(_csv(config.getoption("--bench-shapes")) or ["all"])
    only = set(_csv(config.getoption("--bench-dtypes")))
    params = []
    for row in rows:
        for dtype in row.dtypes:
            if only and dtype not in only:
                continue
            for threads in _thread_counts(config):
                group = f"{pass_}-{row.name}-{dtype}-t{threads}"
                impls = ["fag_numba"] + (["torch"] if row.peer else [])
                for impl in impls:
                    params.append(pytest.param(
                        (row, dtype, impl, threads),
                        id=f"{row.name}-{dtype}-{impl}-t{threads}",
                        marks=pytest.mark.benchmark(group=group)))
    return params


def pytest_generate_tests(metafunc):
    if "bench_case" in metafunc.fixturenames:
        pass_ = getattr(metafunc.module, "PASS")
        metafunc.parametrize("bench_case", bench_params(metafunc.config, pass_))


def pytest_report_header(config):
    info = common.env_info()
    return [f"fag_numba benchmarks: cpu={info['cpu']} ({info['cpu_count']} cpus), "
            f"numba {info['numba']} threads={info['numba_threads']}, "
            f"torch {info.get('torch')}, fag_numba {info.get('fag_numba')}"]


@pytest.fixture
def run_bench(request):
    """``run_bench(benchmark, bench_case, pass_)``: prepare (warm up), time, record extra_info."""
    rounds_override = request.config.getoption("--bench-rounds")

    def run(benchmark, bench_case, pass_):
        row, dtype, impl, threads = bench_case
        common.setup_threads(threads)
        try:
            case = common.make_case(row, dtype)
            prepared = common.prepare(impl, case, pass_)    # warm-up call: compile excluded
        except common.Unavailable as exc:
            pytest.skip(str(exc))
        rounds = rounds_override or row.rounds
        with common.LoadMeter() as load:
            benchmark.pedantic(prepared.fn, rounds=rounds, iterations=1, warmup_rounds=1)
        info = common.env_info()
        total = flops.flops(row, pass_)
        extra = benchmark.extra_info
        extra.update(
            impl=prepared.label, pass_=pass_, shape=row.describe(), row=row.name, dtype=dtype,
            B=row.B, N1=row.N1, N2=row.N2, S1=row.S1, S2=row.S2, D=row.D, layout=row.layout,
            sparse_mode=row.sparse_mode, density=round(flops.density(row), 6),
            gflop=round(total / 1e9, 3), threads=threads, rounds=rounds,
            numba=info["numba"], threading_layer=info["threading_layer"],
            numba_threads=info["numba_threads"], torch=info.get("torch"),
            torch_threads=info.get("torch_threads"), cpu=info["cpu"],
            fastmath=info.get("fastmath"), fag_numba=info.get("fag_numba"),
            torch_own_libgomp=info.get("torch_own_libgomp"),
            other_load=round(load.fraction, 3))
        stats = getattr(benchmark, "stats", None)
        if stats is not None and getattr(stats, "stats", None) is not None:
            median = stats.stats.median
            extra["median_ms"] = round(median * 1e3, 3)
            extra["gflops"] = round(total / median / 1e9, 2) if median > 0 else None
        return prepared

    return run
