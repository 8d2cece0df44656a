"""examples/train_tiny_llama.py in its smoke mode (tiny model, in this process, both
attention implementations; exit code 0 iff their losses agree)."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_tiny_llama.py"


def test_train_tiny_llama_smoke(capsys):
    spec = importlib.util.spec_from_file_location("train_tiny_llama", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "fag_numba" in out and "sdpa" in out and "tokens/s" in out
