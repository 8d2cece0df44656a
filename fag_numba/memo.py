"""Bounded per-shape memo of the numpy-side planning (plans, mask bounds): one mechanism for
both, so their copies, bounds and thread-safety rules are stated once."""
import numpy as np

from . import config


def memoised(table, key, make, keep=None):
    """``make()`` (a tuple of arrays and scalars) memoised in the dict ``table`` under ``key``.

    Returns fresh copies of the arrays (callers may hand them to kernels or modify them; a
    stored array is never exposed).  ``keep(value)`` false: the value is returned but not
    stored (too large to keep).  The table is emptied when it reaches config.PLAN_CACHE_SIZE
    entries.  dict get/set are atomic, so concurrent calls at worst compute a value twice; a
    ``make`` that raises stores nothing (a failed check runs again next time).
    """
    hit = table.get(key)
    if hit is None:
        hit = make()
        if keep is not None and not keep(hit):
            return hit
        if len(table) >= config.PLAN_CACHE_SIZE:
            table.clear()
        table[key] = hit
    return tuple(x.copy() if isinstance(x, np.ndarray) else x for x in hit)
