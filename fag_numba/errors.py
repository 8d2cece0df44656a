"""Error classes of fag_numba (SPEC §9).

``FagTypeError`` is raised for a non-array argument, an argument of the wrong Python type, an
unsupported array dtype, or dtypes that must match and do not. Every other violation (value,
shape, combination) raises ``FagValueError``. Both subclass ``FagError``; messages name the
argument, the rule and the value received.
"""


class FagError(Exception):
    """Base class of every error fag_numba raises on bad input."""


class FagValueError(FagError, ValueError):
    """A value, shape or combination of arguments violates the contract."""


class FagTypeError(FagError, TypeError):
    """An argument has the wrong Python type or an unsupported / mismatched dtype."""


class FagMemoryError(FagError, MemoryError):
    """A valid call whose outputs or working memory cannot fit in the memory available now
    (raised before anything large is allocated; the message names the size)."""
