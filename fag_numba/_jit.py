"""The only place that calls ``numba.njit`` (STYLE b4), and the on-disk kernel cache.

``kernel`` is for every compiled function: all are serial (no ``parallel=True`` anywhere: the
parallel level is ``threads.run_chunks``, which runs one chunk kernel per Python thread).  Both use ``error_model="numpy"`` (float division by zero gives inf/nan
instead of raising) and the curated ``config.FASTMATH_FLAGS`` set, never blanket fastmath,
because ``nnan``/``ninf`` would let LLVM break the ``-inf`` masking and NaN propagation.

Cache (on by default; ``FAG_NUMBA_CACHE=0`` turns it off, see ``config.cache_dir`` for where):
every dispatcher gets a ``_KernelCache`` instead of numba's ``cache=True`` machinery, because
numba's own cache has three gaps that matter here (STYLE c):

- its index is stamped with the hash of the function's *own* source file only, so a cached
  driver survives an edit of ``tile.py`` (the code it inlines) and loads stale code.  Our stamp
  is a hash of every ``fag_numba/**/*.py`` plus the fastmath flags and the numba version: any
  source change (an upgrade, a local edit) recompiles everything;
- on Linux an unwritable cache directory makes the *compile* fail (``PermissionError`` from
  ``ensure_cache_path``) and a corrupt data file makes the load fail (unpickling error).  Here
  both warn once (``FagCacheWarning``) and fall back to compiling, uncached;
- entries for different CPUs share one index, and two processes adding different keys at once
  can hand one key the other's data file.  Our directory includes a hash of numba's
  target-machine tuple (triple, CPU name, features), so one index only ever holds one CPU's code
  (the tuple is also part of numba's key: a different ``NUMBA_CPU_NAME`` recompiles), and data
  files are named by a hash of their key (``_DataFile``);
- closures over dispatchers or intrinsics (the native drivers' factories) never hit numba's
  cache: their cells pickle with per-process uuids into the key.  ``_stable`` describes cells
  by name instead (their code is in the source stamp).

Concurrent first calls from several processes are safe: numba writes index and data files to a
temporary name and renames them into place (atomic), a missing data file reads as a miss, and
with one signature per dispatcher and one CPU per directory all writers write the same key
(``tests/test_cache.py`` starts 4 processes on an empty cache).  Nothing is touched at import:
the cache object is built on the first compile (it needs numba's target machine).
"""
from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path

import numba
from numba.core import caching

from . import config

_COMMON = dict(nogil=True, error_model="numpy", fastmath=set(config.FASTMATH_FLAGS))
_PKG = Path(__file__).resolve().parent


class FagCacheWarning(UserWarning):
    """The kernel cache could not be read or written; kernels are compiled instead."""


_warned: set = set()


def _warn_once(what: str, exc: BaseException) -> None:
    if what in _warned:
        return
    _warned.add(what)
    warnings.warn(f"fag_numba kernel cache: cannot {what} ({type(exc).__name__}: {exc}); "
                  f"compiling instead (set FAG_NUMBA_CACHE=0 to silence, or FAG_NUMBA_CACHE_DIR "
                  f"to a writable directory)", FagCacheWarning, stacklevel=3)


@functools.lru_cache(maxsize=1)
def source_stamp() -> str:
    """sha256 over every source file of the package, the fastmath flags and numba's version."""
    h = hashlib.sha256()
    for path in sorted(_PKG.rglob("*.py")):
        h.update(path.relative_to(_PKG).as_posix().encode())
        h.update(path.read_bytes())
    h.update(repr(sorted(config.FASTMATH_FLAGS)).encode())
    h.update(numba.__version__.encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _target_tag() -> str:
    """A short hash of numba's target-machine tuple (triple, CPU name, CPU features)."""
    from numba.core.registry import cpu_target
    magic = cpu_target.target_context.codegen().magic_tuple()
    return hashlib.sha256(repr(magic).encode()).hexdigest()[:16]


class _Locator(caching._CacheLocator):
    """``<config.cache_dir()>/<target tag>/<source dir name>_<hash of its path>/``."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = os.path.join(config.cache_dir(), _target_tag(),
                                        self.get_suitable_cache_subpath(py_file))

    def get_cache_path(self):
        return self._cache_path

    def get_source_stamp(self):
        return source_stamp()

    def get_disambiguator(self):
        return str(self._lineno)

    @classmethod
    def from_function(cls, py_func, py_file):
        # no filesystem access here; an unwritable directory shows up (and is handled) on save
        return cls(py_func, py_file)


class _Impl(caching.CompileResultCacheImpl):
    _locator_classes = [_Locator]


class _DataFile(caching.IndexDataCacheFile):
    """Data files named by a hash of their key, not by their position in the index: two
    processes adding *different* keys to one index at once (e.g. the two closures of a driver
    factory, which share a qualname and line) would otherwise both pick ``<n>.nbc``, and the
    index could point a key at the other key's code.  Now the worst case is a lost index entry:
    a later miss and recompile."""

    def save(self, key, data):
        overloads = self._load_index()
        data_name = overloads.get(key)
        if data_name is None:
            tag = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
            data_name = self._data_name_pattern.replace("{number:d}", tag)
            overloads[key] = data_name
            self._save_index(overloads)
        self._save_data(data_name, data)


def _stable(obj, depth=0):
    """A process-independent description of a closure cell (numba pickles cell contents into
    the index key; a dispatcher or intrinsic pickles with a per-process uuid, so closures over
    them never hit).  Callables are described by name and their own closure: their code is
    covered by ``source_stamp``."""
    if depth > 4:
        return "..."
    if isinstance(obj, (bool, int, float, str, bytes, type(None))):
        return repr(obj)
    if isinstance(obj, (tuple, list, frozenset)):
        return (type(obj).__name__,) + tuple(_stable(x, depth + 1) for x in obj)
    fn = getattr(obj, "py_func", None) or getattr(obj, "_defn", None) or obj
    if callable(fn) and hasattr(fn, "__qualname__"):
        cells = getattr(fn, "__closure__", None) or ()
        return (getattr(fn, "__module__", ""), fn.__qualname__,
                tuple(_stable(c.cell_contents, depth + 1) for c in cells))
    return (type(obj).__module__, type(obj).__qualname__, repr(obj))


class _FunctionCache(caching.FunctionCache):
    _impl_class = _Impl

    def __init__(self, py_func):
        super().__init__(py_func)
        self._cache_file = _DataFile(cache_path=self._cache_path,
                                     filename_base=self._impl.filename_base,
                                     source_stamp=self._impl.locator.get_source_stamp())

    def _index_key(self, sig, codegen):
        cells = tuple(_stable(c.cell_contents) for c in (self._py_func.__closure__ or ()))
        return (sig, codegen.magic_tuple(),
                (hashlib.sha256(self._py_func.__code__.co_code).hexdigest(),
                 hashlib.sha256(repr(cells).encode()).hexdigest()))


class _KernelCache(caching._Cache):
    """Numba's ``FunctionCache`` with our locator, built lazily, failures turned into warnings."""

    def __init__(self, py_func):
        self._py_func = py_func
        self._real = None
        self._enabled = True

    def _cache(self):
        if self._real is None:
            self._real = _FunctionCache(self._py_func)
        return self._real

    @property
    def cache_path(self):
        try:
            return self._cache().cache_path
        except Exception:               # pragma: no cover - only for reporting
            return None

    def load_overload(self, sig, target_context):
        if not self._enabled:
            return None
        try:
            return self._cache().load_overload(sig, target_context)
        except OSError:                 # no (usable) directory yet: a miss; saving will tell
            return None
        except Exception as exc:        # corrupt or unreadable entry: compile instead
            _warn_once("load a cached kernel", exc)
            return None

    def save_overload(self, sig, data):
        if not self._enabled:
            return
        try:
            self._cache().save_overload(sig, data)
        except Exception as exc:        # read-only / full / vanished directory: stay uncached
            _warn_once(f"write to {config.cache_dir()}", exc)
            self._enabled = False

    def enable(self):
        self._enabled = True

    def disable(self):
        self._enabled = False

    def flush(self):
        if self._real is not None:
            self._real.flush()


def _attach_cache(disp):
    # under NUMBA_DISABLE_JIT=1 njit returns the plain function: nothing to cache
    if config.CACHE and hasattr(disp, "py_func"):
        disp._cache = _KernelCache(disp.py_func)
    return disp


def kernel(fn=None, **extra):
    """Decorate a serial njit kernel (inlined where ``inline="always"`` is passed)."""
    opts = dict(_COMMON, **extra)
    if fn is None:
        return lambda f: _attach_cache(numba.njit(**opts)(f))
    return _attach_cache(numba.njit(**opts)(fn))


def cache_info() -> dict:
    """Whether the kernel cache is on and where it lives (for ``runtime_info``)."""
    return {"cache": config.CACHE, "cache_dir": config.cache_dir() if config.CACHE else None}
