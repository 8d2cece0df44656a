"""ring-flash-attn (zhuzilin, PyPI ``ring-flash-attn``) runs unchanged on fag_numba.flash_attn
(SPEC §12): 2 gloo processes, bf16, causal ring and zigzag ring, forward and backward, vs the
single-process result (tests/clients/ring_client.py).  Skipped when ring-flash-attn is not
installed (test-only dependency: ``pip install ring-flash-attn --no-deps``, pure Python)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
if __import__("importlib").util.find_spec("ring_flash_attn") is None:
    pytest.skip("ring-flash-attn is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ring_flash_attn_two_gloo_ranks_bf16(tmp_path):
    # one compile: rank 0 fills a private on-disk kernel cache that rank 1 then loads
    env = dict(os.environ, FAG_NUMBA_CACHE="1", NUMBA_CACHE_DIR=str(tmp_path),
               FAG_NUMBA_CACHE_DIR=str(tmp_path),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # hard timeout: a hung collective must fail the test, not the CI run
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "clients" / "ring_client.py"),
                        str(_free_port())], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "OK" in r.stdout, r.stdout
    print(r.stdout)
