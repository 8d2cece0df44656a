"""``fag_numba.flash_attn.install()`` and ``fag_numba.torch.install_as_torch_npu()`` (SPEC §12):
in a fresh interpreter (tests/clients/install_client.py, one spawn for both) ``import flash_attn``
and its interface module resolve to fag_numba.flash_attn, and the probes of third-party code (``find_spec``,
``import torch_npu``, ``torch.npu.is_available()``) succeed and transformers' own NPU
flash-attention path (BSND and, with padding, TND) runs a tiny Llama on fag_numba, matching
``attn_implementation="sdpa"`` in logits, loss and every parameter gradient."""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import fag_numba.torch as fnt  # noqa: E402
from fag_numba import FagValueError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_install_then_transformers_npu_path():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "clients" / "install_client.py")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK"), r.stdout


def test_real_flash_attn_is_not_replaced(monkeypatch):
    import fag_numba.flash_attn as ffa
    real = types.ModuleType("flash_attn")
    monkeypatch.setitem(sys.modules, "flash_attn", real)
    with pytest.raises(FagValueError, match="flash_attn"):
        ffa.install()
    assert sys.modules["flash_attn"] is real


def test_real_torch_npu_is_not_replaced(monkeypatch):
    real = types.ModuleType("torch_npu")
    real.__file__ = "/site-packages/torch_npu/__init__.py"
    monkeypatch.setitem(sys.modules, "torch_npu", real)
    with pytest.raises(FagValueError, match="torch_npu"):
        fnt.install_as_torch_npu()
    assert sys.modules["torch_npu"] is real and not hasattr(torch, "npu")
