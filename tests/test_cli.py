"""The command line (`python -m fag_numba ...`): every subcommand in a subprocess, exit codes.

The subprocesses share a private on-disk kernel cache (FAG_NUMBA_CACHE=1 with a temporary
NUMBA_CACHE_DIR) so only the first one pays the JIT compile; nothing else in the test lane
caches.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("nbcache")
    env = dict(os.environ, FAG_NUMBA_CACHE="1", NUMBA_CACHE_DIR=str(cache),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def _run(*args):
        return subprocess.run([sys.executable, "-m", "fag_numba", *args], capture_output=True,
                              text=True, env=env, timeout=900, cwd=ROOT)
    return _run


def test_help(run):
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("demo", "info", "selftest", "bench"):
        assert cmd in r.stdout
    for cmd in ("demo", "bench", "info", "selftest"):
        rr = run(cmd, "--help")
        assert rr.returncode == 0 and "usage" in rr.stdout.lower(), cmd


def test_selftest_passes(run):
    r = run("selftest")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout


def test_info_is_json(run):
    r = run("info")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    for key in ("fag_numba", "numba", "threads", "threading_layer", "cpu", "cache_dir"):
        assert key in info


def test_demo_small(run):
    r = run("demo", "--shape", "1", "2", "64", "16")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "GFLOP/s" in r.stdout and "ok" in r.stdout


@pytest.mark.parametrize("args", [
    ("--shape", "1", "2", "64", "16", "--rounds", "1"),
    ("--shape", "2", "4", "40", "8", "--kv-heads", "2", "--layout", "TND", "--dtype", "bfloat16",
     "--sparse-mode", "3", "--rounds", "1", "--threads", "1"),
    ("--shape", "1", "1", "96", "8", "--sparse-mode", "4", "--band", "8", "--dtype",
     "float8_e4m3fn", "--rounds", "1"),
])
def test_bench(run, args):
    r = run("bench", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backward median" in r.stdout and "peak RSS" in r.stdout
    assert "bench: 100%" in r.stderr                  # the tqdm progress bar, completed


def test_bad_arguments_exit_nonzero(run):
    assert run("bench", "--sparse-mode", "7", "--shape", "1", "1", "8", "8").returncode != 0
    assert run("bench", "--layout", "XYZ").returncode != 0
    assert run("nosuchcommand").returncode != 0
