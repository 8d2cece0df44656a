"""The Numba decorator policy of STYLE b4, checked on the package's source (AST walk):

- only ``fag_numba/_jit.py`` (and ``fag_numba/dropout.py``) may call ``numba.njit`` /
  ``numba.jit`` directly (``from numba import njit`` counts too); everything else uses
  ``_jit.kernel``;
- ``fastmath=True`` appears nowhere (curated flag set only), neither as a keyword nor in a dict;
- ``parallel=True`` and ``prange`` appear nowhere: the one parallel level is
  ``threads.run_chunks`` (Python threads over serial nogil chunk kernels), which the drivers call;
- ``cache=True`` is never hard-coded (``_jit`` attaches its own cache; ``FAG_NUMBA_CACHE=0``
  turns it off).

And the import contract (SPEC §11, STYLE b10): ``import fag_numba`` does not import torch and
compiles nothing.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numba
import pytest

PKG = Path(__file__).resolve().parents[1] / "fag_numba"
ROOT = PKG.parent
NJIT_ALLOWED = {"fag_numba/_jit.py", "fag_numba/dropout.py"}
JIT_NAMES = {"njit", "jit", "generated_jit", "vectorize", "guvectorize", "cfunc", "stencil"}


def _modules():
    files = sorted(PKG.rglob("*.py"))
    assert files, f"no sources under {PKG}"
    return [(f.relative_to(ROOT).as_posix(), ast.parse(f.read_text(), filename=str(f)))
            for f in files]


MODULES = _modules()
IDS = [name for name, _ in MODULES]


def _numba_aliases(tree):
    """Names bound to the numba module (``import numba``, ``import numba as nb``) and to its
    jit decorators (``from numba import njit as fast``)."""
    mods, funcs = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "numba" or a.name.startswith("numba."):
                    mods.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and (
                node.module == "numba" or node.module.startswith("numba.")):
            for a in node.names:
                if a.name in JIT_NAMES:
                    funcs.add(a.asname or a.name)
    return mods, funcs


def _jit_uses(tree):
    """Line numbers where a numba jit decorator is referenced (called or used as decorator)."""
    mods, funcs = _numba_aliases(tree)
    lines = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr in JIT_NAMES
                and isinstance(node.value, ast.Name) and node.value.id in mods):
            lines.append(node.lineno)
        elif isinstance(node, ast.Name) and node.id in funcs and isinstance(node.ctx, ast.Load):
            lines.append(node.lineno)
    return lines


def _literal_true_options(tree, option):
    """Line numbers of ``option=True`` keywords and ``{"option": True}`` dict entries."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == option:
            if isinstance(node.value, ast.Constant) and node.value.value is True:
                lines.append(node.value.lineno)
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if (isinstance(k, ast.Constant) and k.value == option
                        and isinstance(v, ast.Constant) and v.value is True):
                    lines.append(k.lineno)
    return lines


@pytest.mark.parametrize("name,tree", MODULES, ids=IDS)
def test_only_jit_module_calls_numba_jit(name, tree):
    if name in NJIT_ALLOWED:
        return
    lines = _jit_uses(tree)
    assert not lines, (f"{name} uses numba's jit decorators directly at lines {lines}: use "
                       f"fag_numba._jit.kernel (STYLE b4)")


@pytest.mark.parametrize("name,tree", MODULES, ids=IDS)
def test_no_fastmath_true(name, tree):
    lines = _literal_true_options(tree, "fastmath")
    assert not lines, f"{name}: fastmath=True at lines {lines} (use config.FASTMATH_FLAGS)"


@pytest.mark.parametrize("name,tree", MODULES, ids=IDS)
def test_no_parallel_true(name, tree):
    lines = _literal_true_options(tree, "parallel")
    assert not lines, f"{name}: parallel=True at lines {lines} (threads.run_chunks is the parallel level)"


@pytest.mark.parametrize("name,tree", MODULES, ids=IDS)
def test_no_hard_coded_cache(name, tree):
    lines = _literal_true_options(tree, "cache")
    assert not lines, f"{name}: cache=True at lines {lines} (the cache is _jit's, config.CACHE)"


@pytest.mark.parametrize("name,tree", MODULES, ids=IDS)
def test_no_prange(name, tree):
    """numba's prange would add a second parallel level (and ~6 s of cold compile per parallel
    function); chunks run in parallel through ``threads.run_chunks`` only."""
    uses = [n.lineno for n in ast.walk(tree)
            if (isinstance(n, ast.Name) and n.id == "prange")
            or (isinstance(n, ast.Attribute) and n.attr == "prange")
            or (isinstance(n, ast.alias) and n.name == "prange")]
    assert not uses, f"{name}: prange at lines {uses}"


def test_drivers_run_chunks_and_the_detectors_work():
    """Sanity of the walk itself: _jit.py does call numba.njit, the drivers do call
    ``run_chunks`` (so the checks above are not vacuous), and the detectors flag the forbidden
    forms."""
    trees = dict(MODULES)
    assert _jit_uses(trees["fag_numba/_jit.py"])
    for mod in ("fag_numba/kernels/driver.py", "fag_numba/kernels/native.py"):
        calls = [n for n in ast.walk(trees[mod]) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Name) and n.func.id == "run_chunks"]
        assert calls, f"{mod} does not call run_chunks"
    probe = ast.parse("import numba as nb\nfrom numba import njit as fast\n"
                      "@nb.njit(fastmath=True, parallel=True)\ndef f(): pass\n"
                      "g = fast(lambda: 0)\nopts = {'fastmath': True}\n")
    assert sorted(_jit_uses(probe)) == [3, 5]
    assert sorted(_literal_true_options(probe, "fastmath")) == [3, 6]
    assert _literal_true_options(probe, "parallel") == [3]
    with pytest.raises(AssertionError, match="prange at lines"):
        test_no_prange("probe", ast.parse("from numba import prange\nfor i in prange(3): pass\n"))


_IMPORT_PROBE = r"""
import sys
import fag_numba
import fag_numba.api, fag_numba.kernels.driver, fag_numba.masks, fag_numba.planning
import fag_numba.dropout, fag_numba.kernels.tile
from numba.core.registry import CPUDispatcher
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
compiled = [f"{name}.{k}" for name, m in list(sys.modules.items()) if name.startswith("fag_numba")
            for k, v in vars(m).items() if isinstance(v, CPUDispatcher) and v.signatures]
assert not compiled, compiled
print("OK")
"""


def test_import_does_not_import_torch_nor_compile():
    env_path = str(ROOT)
    res = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True,
                         cwd=env_path, timeout=300,
                         env={**_clean_env(), "PYTHONPATH": env_path})
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]


# A probe's calls: forward and grad (with the forward's statistics), dense and causal, for each
# dtype in DTYPES (each probe substitutes its own)
_CALLS = r"""
rng = np.random.default_rng(0)
mask = np.triu(np.ones((2048, 2048), bool), 1)
for dt in (DTYPES):
    q, k, v, dy = (rng.standard_normal((1, 2, 40, 16), dtype=np.float32).astype(dt)
                   for _ in range(4))
    for kw in ({}, dict(atten_mask=mask, sparse_mode=3)):
        o = fag_numba.flash_attention_score(q, k, v, 2, "BNSD", **kw)
        fag_numba.flash_attention_score_grad(q, k, v, dy, 2, "BNSD", softmax_max=o.softmax_max,
                                             softmax_sum=o.softmax_sum,
                                             attention_in=o.attention_out, **kw)"""


_LAZY_ML_PROBE = r"""
import sys
import numpy as np
import fag_numba
assert "ml_dtypes" not in sys.modules
""" + _CALLS.replace("DTYPES", "np.float32, np.float16") + r"""
    fag_numba.flash_attention_score_grad(q, k, v, dy, 2, "BNSD")      # (no statistics)
    try:
        fag_numba.flash_attention_score(q.astype(np.int64), k, v, 2, "BNSD")
    except fag_numba.FagError as e:
        assert "float32, float16, bfloat16, float8_e4m3fn, float8_e5m2" in str(e), e
    else:
        raise AssertionError("an int64 query was accepted")
assert "ml_dtypes" not in sys.modules, "imported by a float32/float16 call"
from fag_numba import dtypes
assert dtypes.is_bf16(np.float32) is False and np.float16 not in dtypes.FP8_DTYPES
assert "ml_dtypes" not in sys.modules
import ml_dtypes
assert dtypes.BFLOAT16 == np.dtype(ml_dtypes.bfloat16) and dtypes.is_bf16(dtypes.BFLOAT16)
assert [d.name for d in dtypes.INPUT_DTYPES] == list(dtypes.INPUT_DTYPES.names)
assert np.dtype(ml_dtypes.float8_e5m2) in dtypes.FP8_DTYPES
assert np.dtype(ml_dtypes.float8_e5m2) not in dtypes.FLOAT_DTYPES
q = rng.standard_normal((1, 2, 40, 16), dtype=np.float32).astype(ml_dtypes.bfloat16)
o = fag_numba.flash_attention_score(q, q, q, 2, "BNSD")
assert o.attention_out.dtype == dtypes.BFLOAT16
print("OK")
"""


def test_float32_and_float16_calls_never_import_ml_dtypes():
    """``import fag_numba`` and its float32/float16 calls (forward, grad with and without the
    statistics, masks, a dtype error) leave ml_dtypes unimported (its import is ~0.5 s, half
    of fag_numba's before); bf16 after ``import ml_dtypes`` works, and the lazy dtype sets
    answer as the real dtypes do."""
    env_path = str(ROOT)
    res = subprocess.run([sys.executable, "-c", _LAZY_ML_PROBE], capture_output=True,
                         text=True, cwd=env_path, timeout=600,
                         env={**_clean_env(), "PYTHONPATH": env_path})
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]


def _clean_env():
    import os
    env = dict(os.environ)
    env.pop("FAG_NUMBA_CACHE", None)
    return env


_PLAIN_PROBE = r"""
import numpy as np, ml_dtypes
import fag_numba
from fag_numba.kernels import driver, guard, native, tile
""" + _CALLS.replace("DTYPES", "np.float32, ml_dtypes.bfloat16") + r"""
cold = {"tile.add_pse": tile.add_pse, "tile.keep_tile": tile.keep_tile,
        "tile.drop_p": tile.drop_p, "tile.drop_ds": tile.drop_ds,
        "driver._dpse_tile": driver._dpse_tile, "driver._fwd_chunk": driver._fwd_chunk,
        "driver._bwd_chunk": driver._bwd_chunk,
        "guard.dropped_nan_row_out": guard.dropped_nan_row_out,
        "guard.row_keeps_computed": guard.row_keeps_computed}
compiled = sorted(n for n, d in cold.items() if d.signatures)
assert not compiled, compiled
assert driver._fwd_chunk_plain.signatures and driver._bwd_chunk_plain.signatures
print("OK")
"""


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="compilation is what is tested")
def test_calls_without_pse_or_dropout_never_compile_their_code():
    """A process that only meets calls without pse and dropout (fp32 and bf16, with and
    without a mask) compiles none of the pse and dropout kernels (``driver.plain``: ~3 s of a
    cold first forward + backward).  A fresh process without the kernel cache."""
    res = subprocess.run([sys.executable, "-c", _PLAIN_PROBE], capture_output=True, text=True,
                         cwd=str(ROOT), timeout=600,
                         env={**_clean_env(), "FAG_NUMBA_CACHE": "0", "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]


_WARMUP_PROBE = r"""
import sys
import numpy as np, ml_dtypes
import fag_numba
from numba.core.registry import CPUDispatcher
from fag_numba.kernels import native

def compiled():
    n = sum(len(v.signatures) for name, m in list(sys.modules.items())
            if name.startswith("fag_numba") for v in vars(m).values()
            if isinstance(v, CPUDispatcher))
    return n + sum(len(d.signatures) for d in native._CHUNKS.values())

fag_numba.warmup()
before = compiled()
rng = np.random.default_rng(1)
mask = np.triu(np.ones((2048, 2048), bool), 1)
for dt in (np.float32, ml_dtypes.bfloat16, np.float16):
    q, k, v, dy = (rng.standard_normal((2, 3, 37, 16), dtype=np.float32).astype(dt)
                   for _ in range(4))
    for kw in ({}, dict(atten_mask=mask, sparse_mode=2), dict(keep_prob=0.8, seed=3),
               dict(pse=rng.standard_normal((2, 3, 37, 37)).astype(dt), pse_type=1),
               dict(out_dtype=np.float32)):
        o = fag_numba.flash_attention_score(q, k, v, 3, "BNSD", **kw)
        fag_numba.flash_attention_score_grad(q, k, v, dy, 3, "BNSD", softmax_max=o.softmax_max,
                                             softmax_sum=o.softmax_sum,
                                             attention_in=o.attention_out, **kw)
    # one long head: the backward splits S2 (float32 gradient kernels, then converted)
    q1, k1, v1, dy1 = (x[:1, :1].repeat(40, axis=2) for x in (q, k, v, dy))
    o = fag_numba.flash_attention_score(q1, k1, v1, 1, "BNSD")
    fag_numba.flash_attention_score_grad(q1, k1, v1, dy1, 1, "BNSD", softmax_max=o.softmax_max,
                                         softmax_sum=o.softmax_sum, attention_in=o.attention_out)
after = compiled()
assert after == before, (before, after)
print("OK", before)
"""


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="compilation is what is tested")
def test_warmup_compiles_what_later_calls_need():
    """After ``warmup()``, float32, bf16 and fp16 calls with and without masks, dropout and pse
    compile nothing more: both kernel variants (``driver.plain``), the native bf16 ones and
    the conversions are warmed.  A fresh process without
    the kernel cache."""
    res = subprocess.run([sys.executable, "-c", _WARMUP_PROBE], capture_output=True, text=True,
                         cwd=str(ROOT), timeout=900,
                         env={**_clean_env(), "FAG_NUMBA_CACHE": "0", "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
