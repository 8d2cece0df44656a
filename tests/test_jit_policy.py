"""The Numba decorator policy of STYLE b4, checked on the package's source (AST walk):

- only ``fag_numba/_jit.py`` (and ``fag_numba/dropout.py``) may call ``numba.njit`` /
  ``numba.jit`` directly (``from numba import njit`` counts too); everything else uses
  ``_jit.kernel`` / ``_jit.driver``;
- ``fastmath=True`` appears nowhere (curated flag set only), neither as a keyword nor in a dict;
- ``parallel=True`` appears only in ``fag_numba/_jit.py``; every function that uses ``prange`` is
  decorated with ``_jit.driver``;
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

import pytest

PKG = Path(__file__).resolve().parents[1] / "fag_numba"
ROOT = PKG.parent
NJIT_ALLOWED = {"fag_numba/_jit.py", "fag_numba/dropout.py"}
PARALLEL_ALLOWED = {"fag_numba/_jit.py"}
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
                       f"fag_numba._jit.kernel / _jit.driver (STYLE b4)")


@pytest.mark.parametrize("name,tree", MODULES, ids=IDS)
def test_no_fastmath_true(name, tree):
    lines = _literal_true_options(tree, "fastmath")
    assert not lines, f"{name}: fastmath=True at lines {lines} (use config.FASTMATH_FLAGS)"


@pytest.mark.parametrize("name,tree", MODULES, ids=IDS)
def test_parallel_true_only_in_jit_module(name, tree):
    if name in PARALLEL_ALLOWED:
        return
    lines = _literal_true_options(tree, "parallel")
    assert not lines, f"{name}: parallel=True at lines {lines} (decorate drivers with _jit.driver)"


@pytest.mark.parametrize("name,tree", MODULES, ids=IDS)
def test_no_hard_coded_cache(name, tree):
    lines = _literal_true_options(tree, "cache")
    assert not lines, f"{name}: cache=True at lines {lines} (the cache is _jit's, config.CACHE)"


def _is_driver_decorator(dec):
    return (isinstance(dec, ast.Attribute) and dec.attr == "driver"
            and isinstance(dec.value, ast.Name) and dec.value.id == "_jit")


@pytest.mark.parametrize("name,tree", MODULES, ids=IDS)
def test_prange_only_in_drivers(name, tree):
    """A ``prange`` outside a ``_jit.driver`` function would silently run serially (or nest
    parallel regions); STYLE b4 allows exactly one parallel level, in the drivers."""
    bad = []

    def own_nodes(fn):
        """Nodes of ``fn`` outside the functions nested in it (a factory such as
        kernels/native.py's ``_make_bwd`` returns a decorated driver defined inside it)."""
        stack = list(ast.iter_child_nodes(fn))
        while stack:
            n = stack.pop()
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            yield n
            stack.extend(ast.iter_child_nodes(n))

    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        uses = [n.lineno for n in own_nodes(fn)
                if (isinstance(n, ast.Name) and n.id == "prange")
                or (isinstance(n, ast.Attribute) and n.attr == "prange")]
        if uses and not any(_is_driver_decorator(d) for d in fn.decorator_list):
            bad.append((fn.name, uses))
    assert not bad, f"{name}: prange used outside a _jit.driver function: {bad}"


def test_jit_module_is_the_parallel_one():
    """Sanity of the walk itself: _jit.py does call numba.njit with parallel=True, and some
    driver uses prange (so the checks above are not vacuous)."""
    trees = dict(MODULES)
    assert _jit_uses(trees["fag_numba/_jit.py"])
    assert _literal_true_options(trees["fag_numba/_jit.py"], "parallel")
    drivers = [fn.name for _, t in MODULES for fn in ast.walk(t)
               if isinstance(fn, ast.FunctionDef) and any(_is_driver_decorator(d)
                                                          for d in fn.decorator_list)]
    assert drivers, "no _jit.driver functions found"
    # and the detector does flag the forbidden forms
    probe = ast.parse("import numba as nb\nfrom numba import njit as fast\n"
                      "@nb.njit(fastmath=True, parallel=True)\ndef f(): pass\n"
                      "g = fast(lambda: 0)\nopts = {'fastmath': True}\n")
    assert sorted(_jit_uses(probe)) == [3, 5]
    assert sorted(_literal_true_options(probe, "fastmath")) == [3, 6]
    assert _literal_true_options(probe, "parallel") == [3]


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


def _clean_env():
    import os
    env = dict(os.environ)
    env.pop("FAG_NUMBA_CACHE", None)
    return env
