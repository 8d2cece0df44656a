"""Benchmark suite of fag_numba (see ``benchmarks/README.md``).

This is a package only so that the benchmark modules import each other as ``benchmarks.*``
without clashing with module names under ``tests/``.  It is not installed (pyproject includes
``fag_numba*`` only) and the unit-test lane never collects it (``testpaths = ["tests"]``).
"""
