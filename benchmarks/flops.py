"""Flop model (FlashAttention-2 convention, PERF.md; STYLE b9).

    forward  = 4 * B * N1 * S1 * S2 * D * density       (QK^T and PV: 2 * S1*S2*D each)
    backward = 2.5 * forward                             (5 GEMMs of which one recomputes QK^T)

``density`` is the fraction of score elements that are computed: 1 without a mask, the exact
element count of the causal triangle ((S+1)/(2S), ~0.5) or of the band for masked modes.
Elementwise work (exp, dropout, pse) is not counted.  With ``Dv != D`` the forward is
``2 * S1 * S2 * (D + Dv)`` per head; the rows here all have ``Dv == D``.
"""
from __future__ import annotations

import numpy as np

from benchmarks.shapes import Row

BWD_FACTOR = 2.5
_BIG = 1 << 62


def band_count(s1: int, s2: int, lo: int, hi: int) -> int:
    """Number of (i, j), 0 <= i < s1, 0 <= j < s2, with ``lo <= j - i <= hi``."""
    if s1 <= 0 or s2 <= 0:
        return 0
    i = np.arange(s1, dtype=np.int64)
    first = np.maximum(i + max(lo, -_BIG), 0)
    last = np.minimum(i + min(hi, _BIG), s2 - 1)
    return int(np.maximum(last - first + 1, 0).sum())


def computed_elements_per_head(s1: int, s2: int, row: Row) -> int:
    """Computed score elements of one (sequence, head) under the row's mask (SPEC section 7)."""
    if not row.has_mask:
        return s1 * s2                      # no atten_mask: full attention in every mode
    delta = s2 - s1
    if row.sparse_mode == 2:                # leftUpCausal: j <= i
        return band_count(s1, s2, -_BIG, 0)
    if row.sparse_mode == 3:                # rightDownCausal: j <= i + delta
        return band_count(s1, s2, -_BIG, delta)
    if row.sparse_mode == 4:                # band: i + delta - pre <= j <= i + delta + next
        return band_count(s1, s2, delta - row.pre_tokens, delta + row.next_tokens)
    raise ValueError(f"no flop model for sparse_mode {row.sparse_mode} with a mask")


def computed_elements(row: Row) -> int:
    """Computed score elements summed over batch (or varlen sequences) and query heads."""
    if row.seqlens is not None:
        return row.N1 * sum(computed_elements_per_head(a, b, row) for a, b in row.seqlens)
    return row.B * row.N1 * computed_elements_per_head(row.S1, row.S2, row)


def density(row: Row) -> float:
    """Computed elements over all score elements (1.0 for dense rows)."""
    if row.seqlens is not None:
        total = row.N1 * sum(a * b for a, b in row.seqlens)
    else:
        total = row.B * row.N1 * row.S1 * row.S2
    return computed_elements(row) / total if total else 0.0


def fwd_flops(row: Row) -> float:
    """Forward flops: 4 * D per computed element."""
    return 4.0 * row.D * computed_elements(row)


def bwd_flops(row: Row) -> float:
    """Backward flops: 2.5 x the forward (FlashAttention-2 convention)."""
    return BWD_FACTOR * fwd_flops(row)


def flops(row: Row, pass_: str) -> float:
    """``fwd_flops`` or ``bwd_flops`` by name (``"fwd"`` / ``"bwd"``)."""
    return {"fwd": fwd_flops, "bwd": bwd_flops}[pass_](row)


def gflops_per_s(row: Row, pass_: str, seconds: float) -> float:
    """Throughput in GFLOP/s for one call taking ``seconds``."""
    return flops(row, pass_) / seconds / 1e9 if seconds > 0 else float("nan")
