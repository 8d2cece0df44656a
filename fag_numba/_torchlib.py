"""Where torch's CPU wheel keeps the native libraries fag_numba borrows (mkl.py: MKL's
``sgemm_`` in ``libtorch_cpu.so``; omp.py: GNU OpenMP, ``libgomp.so.1``).  fag_numba never
imports torch for them: they are used only once the process has imported it."""
import os
import sys
import threading


def torch_lib(name):
    """``torch/lib/<name>`` when torch is imported, on Linux, and the file exists; else None."""
    torch = sys.modules.get("torch")
    if torch is None or not sys.platform.startswith("linux"):
        return None
    path = os.path.join(os.path.dirname(getattr(torch, "__file__", "") or ""), "lib", name)
    return path if os.path.exists(path) else None


_all = []


def _after_fork_in_child():
    for lib in _all:                         # a lock held by another thread at fork is dead
        lib._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class TorchLib:
    """A torch library's entry points, opened once per process: ``opener(path)`` returns them
    (or None: not usable).  ``get()`` is None while torch is not imported (not remembered: it
    may be imported later), and after a failed open (remembered)."""

    def __init__(self, name, opener):
        self.name = name
        self._opener = opener
        self._value = None                   # the entry points, False after a failed open
        self._lock = threading.Lock()
        _all.append(self)

    def get(self):
        if self._value is not None:
            return self._value or None
        path = torch_lib(self.name)
        if path is None:
            return None
        with self._lock:
            if self._value is None:
                try:
                    self._value = self._opener(path) or False
                except (OSError, AttributeError, TypeError):
                    self._value = False
        return self._value or None
