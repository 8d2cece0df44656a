"""Work plans: work items, their costs, and a cost-balanced split over the threads.

Items are balanced by their count of non-empty tiles, not by index (STYLE b3.3; stumpy's
``_get_array_ranges``): greedy longest-processing-time assignment to ``threads.num_threads()``
chunks.  Which thread runs an item never changes its result (single ownership), so plans may
depend on the thread count while results stay bitwise identical.

The backward's S2 split count depends on the shape only (``config.SPLIT_TARGET``): it decides
how dq partials are summed, so it must not depend on the thread count (SPEC §9b).
"""
from .threads import num_threads
import numpy as np

from . import _jit, config
from .kernels import desc
from .kernels.driver import kv_block_range, q_block_range


@_jit.kernel
def _fwd_items(seqtab, n1, bm, bn):
    """Forward items (b, h, q-block) and their costs (non-empty key blocks per item)."""
    nb = seqtab.shape[0]
    count = 0
    for b in range(nb):
        count += n1 * ((seqtab[b, desc.S1] + bm - 1) // bm)
    items = np.empty((count, 3), np.int64)
    cost = np.empty(count, np.int64)
    x = 0
    for b in range(nb):
        s1 = seqtab[b, desc.S1]
        s2 = seqtab[b, desc.S2]
        nqb = (s1 + bm - 1) // bm
        for ib in range(nqb):
            i0 = ib * bm
            lo_, hi_ = kv_block_range(seqtab[b, desc.LO], seqtab[b, desc.HI],
                                      seqtab[b, desc.PREFIX], s2, i0, min(s1, i0 + bm), bn)
            c = 1 + (hi_ - lo_)      # +1: the row finalisation costs something too
            for h in range(n1):
                items[x, 0] = b
                items[x, 1] = h
                items[x, 2] = ib
                cost[x] = c
                x += 1
    return items, cost


@_jit.kernel
def _bwd_items(seqtab, n2, g, bm, bn, nsplit, merge_b):
    """Backward items (b_lo, b_hi, n2, split) and their costs (non-empty tiles x G).

    merge_b: one item covers every sequence (used when dpse must be summed over the batch,
    so that a single item owns each dpse element).
    """
    nb = seqtab.shape[0]
    ngroups = 1 if merge_b else nb
    count = ngroups * n2 * nsplit
    items = np.empty((count, 4), np.int64)
    cost = np.zeros(count, np.int64)
    x = 0
    for grp in range(ngroups):
        b_lo = 0 if merge_b else grp
        b_hi = nb if merge_b else grp + 1
        for n in range(n2):
            for c in range(nsplit):
                items[x, 0] = b_lo
                items[x, 1] = b_hi
                items[x, 2] = n
                items[x, 3] = c
                tot = 0
                for b in range(b_lo, b_hi):
                    s1 = seqtab[b, desc.S1]
                    s2 = seqtab[b, desc.S2]
                    nkb = (s2 + bn - 1) // bn
                    for jb in range(c, nkb, nsplit):
                        j0 = jb * bn
                        lo_, hi_ = q_block_range(seqtab[b, desc.LO], seqtab[b, desc.HI],
                                                 seqtab[b, desc.PREFIX], s1, j0,
                                                 min(s2, j0 + bn), bm)
                        tot += hi_ - lo_
                cost[x] = tot * g
                x += 1
    return items, cost


@_jit.kernel
def _assign(cost, idx, nthreads):
    """Greedy LPT: items in ``idx`` order (cost descending) go to the least-loaded chunk.

    Returns (order, tptr): chunk t runs ``order[tptr[t]:tptr[t+1]]``, in increasing item
    index (memory locality).
    """
    n = cost.size
    owner = np.empty(n, np.int64)
    load = np.zeros(nthreads, np.int64)
    for x in range(n):
        best = 0
        for t in range(1, nthreads):
            if load[t] < load[best]:
                best = t
        owner[idx[x]] = best
        load[best] += max(cost[idx[x]], 1)
    tptr = np.zeros(nthreads + 1, np.int64)
    for x in range(n):
        tptr[owner[x] + 1] += 1
    for t in range(nthreads):
        tptr[t + 1] += tptr[t]
    fill = tptr[:-1].copy()
    order = np.empty(n, np.int64)
    for x in range(n):
        order[fill[owner[x]]] = x
        fill[owner[x]] += 1
    return order, tptr


def _by_cost(cost):
    """Item indices by decreasing cost (numpy's sort: compiling one inside numba costs ~1.5 s)."""
    return np.argsort(-cost, kind="stable")


def plan_forward(seqtab, n1, bm, bn):
    """Items int64 [n, 3] ordered by thread chunk, and tptr int64 [threads + 1]."""
    items, cost = _fwd_items(seqtab, n1, bm, bn)
    order, tptr = _assign(cost, _by_cost(cost), max(1, num_threads()))
    return np.ascontiguousarray(items[order]), tptr


def backward_blocks(d):
    """Backward tile (BLOCK_M, BLOCK_N) for head dim D (config: wider tiles from WIDE_D on)."""
    if d >= config.WIDE_D:
        return config.BLOCK_M_WIDE, config.BLOCK_N_WIDE
    return config.BLOCK_M, config.BLOCK_N


def split_count(n_groups, n2, max_kv_blocks):
    """Number of S2 splits of the backward: shape-only, so results do not depend on threads.

    One long head (B*N2 small) is split into up to ``SPLIT_TARGET`` interleaved sets of key
    blocks with their own dq partial; each extra split costs one dq-sized float32 buffer.
    """
    items = max(1, n_groups * n2)
    want = -(-config.SPLIT_TARGET // items)
    return int(max(1, min(want, max_kv_blocks)))


def plan_backward(seqtab, n2, g, bm, bn, merge_b):
    """Backward plan: (items int64 [n, 4], tptr, nsplit)."""
    nb = seqtab.shape[0]
    max_s2 = int(seqtab[:, desc.S2].max()) if nb else 0
    nsplit = split_count(1 if merge_b else nb, n2, -(-max_s2 // bn))
    items, cost = _bwd_items(seqtab, n2, g, bm, bn, nsplit, merge_b)
    order, tptr = _assign(cost, _by_cost(cost), max(1, num_threads()))
    return np.ascontiguousarray(items[order]), tptr, nsplit
