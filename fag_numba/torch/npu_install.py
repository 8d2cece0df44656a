"""``install_as_torch_npu()``: fag_numba.torch as the ``torch_npu`` package of third-party code.

"Swap the import" ports code you own; libraries (Hugging Face transformers' NPU flash path,
yunchang, MindSpeed-style code) probe for torch_npu themselves before they take their NPU path::

    importlib.util.find_spec("torch_npu")        # transformers' is_torch_npu_available()
    import torch_npu; torch.npu.is_available()
    from torch_npu import npu_fusion_attention

One call makes all of these work on the CPU with fag_numba::

    import fag_numba.torch
    fag_numba.torch.install_as_torch_npu()       # before importing the client library
    import transformers                          # attn_implementation="flash_attention_2" now
                                                 # runs transformers' NPU path on fag_numba

What it installs (idempotent; returns the ``torch_npu`` module):

| name | what it is |
|---|---|
| ``sys.modules["torch_npu"]`` | a module with ``__spec__`` (so ``find_spec`` answers), ``__version__`` (``"<torch version>+fag_numba"``), ``__file__``, and fag_numba.torch's public functions: ``npu_fusion_attention``, ``npu_fusion_attention_grad``, their ``_v2`` forms, ``flash_attention`` ... |
| a ``sys.meta_path`` finder | serves ``torch_npu`` and ``torch_npu.npu`` to ``import``/``find_spec`` even after a client deleted the ``sys.modules`` entry |
| ``torch.npu`` (also ``sys.modules["torch.npu"]``, ``torch_npu.npu``) | a device stub: ``is_available() -> True``, ``device_count() -> 1``, ``current_device() -> 0``, ``is_bf16_supported() -> True``, ``set_device``/``synchronize``/``empty_cache`` no-ops, ``manual_seed(_all)`` -> ``torch.manual_seed``, memory queries ``-> 0``, ``get_device_name() -> "fag_numba (CPU)"`` |

Decisions:

- Tensors stay on the CPU: there is no ``"npu"`` device in torch, so code that moves tensors with
  ``.npu()`` or ``.to("npu")`` (training frameworks picking a device when ``torch.npu`` says it
  is available) fails; the stub is for the attention calls, on CPU tensors.
- transformers caches ``is_torch_npu_available()``: call this before importing transformers.  If
  transformers is already imported, the cache is cleared and an already imported
  ``transformers.integrations.npu_flash_attention`` gets ``npu_fusion_attention``, but models
  already built keep the implementation they chose.
- A real ``torch_npu`` already imported is never replaced (``FagValueError``).
- transformers' NPU flash path has no window argument (it drops a model's sliding window); use
  ``fag_numba.transformers.register()`` and ``attn_implementation="fag_numba"`` for such models.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

import torch

from fag_numba.errors import FagValueError

from . import npu

__all__ = ["install_as_torch_npu"]

_MARK = "__fag_numba_stub__"       # set on the modules this file creates


def _device_module() -> types.ModuleType:
    """The ``torch.npu`` stub: device queries answer "one device, available"."""
    m = types.ModuleType("torch.npu", "fag_numba stand-in for torch.npu (tensors stay on the CPU)")
    setattr(m, _MARK, True)

    def _none(*args, **kwargs):
        return None

    m.is_available = lambda: True
    m.device_count = lambda: 1
    m.current_device = lambda: 0
    m.is_bf16_supported = lambda *a, **k: True
    m.get_device_name = lambda *a, **k: "fag_numba (CPU)"
    for name in ("set_device", "synchronize", "empty_cache", "reset_peak_memory_stats",
                 "init", "set_compile_mode"):
        setattr(m, name, _none)
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved",
                 "max_memory_reserved"):
        setattr(m, name, lambda *a, **k: 0)
    m.manual_seed = lambda seed: torch.manual_seed(seed)
    m.manual_seed_all = lambda seed: torch.manual_seed(seed)
    return m


def _torch_npu_module(device: types.ModuleType) -> types.ModuleType:
    m = types.ModuleType("torch_npu", "fag_numba.torch installed as torch_npu "
                                      "(fag_numba.torch.install_as_torch_npu)")
    setattr(m, _MARK, True)
    for name in npu.__all__:
        setattr(m, name, getattr(npu, name))
    m.__version__ = f"{torch.__version__.split('+')[0]}+fag_numba"
    m.__file__ = __file__        # transformers treats a module without __file__ as a namespace
    m.npu = device
    return m


class _Loader(importlib.abc.Loader):
    def __init__(self, module):
        self.module = module

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        pass


class _Finder(importlib.abc.MetaPathFinder):
    """Serves installed stand-in modules to ``import`` and ``importlib.util.find_spec``."""

    def __init__(self):
        self.modules = {}

    def find_spec(self, fullname, path=None, target=None):
        mod = self.modules.get(fullname)
        return mod.__spec__ if mod is not None else None


_FINDER = _Finder()
_STATE = {}


def install_modules(modules):
    """Put stand-in modules (``{name: module}``; a name with a dot is a submodule of an entry)
    into ``sys.modules`` with a ``__spec__``/``__loader__`` and serve them from a
    ``sys.meta_path`` finder, so ``import``, ``find_spec`` and re-imports after a deletion from
    ``sys.modules`` all find them.  Shared by :func:`install_as_torch_npu` and
    ``fag_numba.flash_attn.install``."""
    for name, mod in modules.items():
        is_pkg = any(other.startswith(name + ".") for other in modules)
        if is_pkg and not hasattr(mod, "__path__"):
            mod.__path__ = []
        if getattr(mod, "__spec__", None) is None or mod.__spec__.name != name:
            spec = importlib.machinery.ModuleSpec(name, _Loader(mod), origin=__file__,
                                                  is_package=is_pkg)
            mod.__spec__ = spec
            mod.__loader__ = spec.loader
        _FINDER.modules[name] = mod
        sys.modules[name] = mod
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def install_as_torch_npu() -> types.ModuleType:
    """Make ``import torch_npu``, ``importlib.util.find_spec("torch_npu")`` and
    ``torch.npu.is_available()`` work, backed by fag_numba.torch (see the module docstring).

    Returns the ``torch_npu`` module.  Idempotent.  Raises ``FagValueError`` if a real torch_npu
    is already imported.
    """
    existing = sys.modules.get("torch_npu")
    if existing is not None and not getattr(existing, _MARK, False):
        raise FagValueError("install_as_torch_npu: a real torch_npu is already imported "
                            f"({getattr(existing, '__file__', existing)!r}); not replacing it")
    if not _STATE:
        device = _device_module()
        top = _torch_npu_module(device)
        sub = types.ModuleType("torch_npu.npu")
        sub.__dict__.update({k: v for k, v in device.__dict__.items() if not k.startswith("__")})
        top.npu = sub
        _STATE.update(top=top, sub=sub, device=device)
    top, sub, device = _STATE["top"], _STATE["sub"], _STATE["device"]
    install_modules({"torch_npu": top, "torch_npu.npu": sub})
    if not hasattr(torch, "npu") or getattr(torch.npu, _MARK, False):
        torch.npu = device
        sys.modules["torch.npu"] = device
    _refresh_transformers(top)
    return top


def _refresh_transformers(top):
    """transformers caches its torch_npu probe (lru_cache) and binds npu_fusion_attention at
    import time: refresh both if it was imported before the install."""
    iu = sys.modules.get("transformers.utils.import_utils")
    probe = getattr(iu, "is_torch_npu_available", None)
    for fn in (probe, getattr(probe, "__wrapped__", None)):
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()
    nfa = sys.modules.get("transformers.integrations.npu_flash_attention")
    if nfa is not None:
        nfa.npu_fusion_attention = top.npu_fusion_attention
