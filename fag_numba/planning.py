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

from . import config
from .memo import memoised
from .kernels import desc


def _ceil_div(a, b):
    return -(-a // b)


def _kv_block_counts(lo, hi, prefix, s2, i0, i1, bn):
    """``driver.kv_block_range`` over arrays: the number of key blocks rows [i0, i1) reach."""
    jlo = np.where(prefix > 0, 0, np.maximum(0, i0 + lo))
    jhi = np.minimum(s2, np.maximum(i1 + hi, prefix))
    return np.where(jhi > jlo, _ceil_div(jhi, bn) - jlo // bn, 0)


def _q_block_counts(lo, hi, prefix, s1, j0, j1, bm):
    """``driver.q_block_range`` over arrays: the number of query blocks columns [j0, j1) reach."""
    ilo = np.maximum(0, j0 - hi)
    ihi = np.minimum(s1, j1 - lo)
    n = np.where(ihi > ilo, _ceil_div(ihi, bm) - ilo // bm, 0)
    return np.where(j0 < prefix, _ceil_div(s1, bm), n)


def _per_block(seqtab, count_col, blk):
    """(b, block index) of every block of every sequence: S1 (or S2) cut into ``blk`` rows."""
    nblk = _ceil_div(seqtab[:, count_col], blk)
    b = np.repeat(np.arange(seqtab.shape[0], dtype=np.int64), nblk)
    first = np.cumsum(nblk) - nblk
    ib = np.arange(b.size, dtype=np.int64) - np.repeat(first, nblk)
    return b, ib


def _fwd_items(seqtab, n1, bm, bn):
    """Forward items (b, h, q-block), ordered by b, q-block, h, and their costs (non-empty key
    blocks per item, +1 for the row finalisation).  numpy, not numba: planning compiled in
    numba cost ~1 s of the cold first call."""
    b, ib = _per_block(seqtab, desc.S1, bm)
    st = seqtab[b]
    i0 = ib * bm
    c = 1 + _kv_block_counts(st[:, desc.LO], st[:, desc.HI], st[:, desc.PREFIX], st[:, desc.S2],
                             i0, np.minimum(st[:, desc.S1], i0 + bm), bn)
    items = np.empty((b.size * n1, 3), np.int64)
    items[:, 0] = np.repeat(b, n1)
    items[:, 1] = np.tile(np.arange(n1, dtype=np.int64), b.size)
    items[:, 2] = np.repeat(ib, n1)
    return items, np.repeat(c, n1).astype(np.int64)


def _bwd_items(seqtab, n2, g, bm, bn, nsplit, merge_b):
    """Backward items (b_lo, b_hi, n2, split) and their costs (non-empty tiles x G), ordered by
    sequence group, kv head, split.

    merge_b: one item covers every sequence (used when dpse must be summed over the batch,
    so that a single item owns each dpse element).
    """
    nb = seqtab.shape[0]
    b, jb = _per_block(seqtab, desc.S2, bn)
    st = seqtab[b]
    j0 = jb * bn
    tiles = _q_block_counts(st[:, desc.LO], st[:, desc.HI], st[:, desc.PREFIX], st[:, desc.S1],
                            j0, np.minimum(st[:, desc.S2], j0 + bn), bm)
    # tiles per (sequence, split): key block jb belongs to split jb % nsplit
    per = np.bincount(b * nsplit + jb % nsplit, weights=tiles,
                      minlength=nb * nsplit).astype(np.int64).reshape(nb, nsplit)
    if merge_b:
        per = per.sum(axis=0, keepdims=True)
        lo_hi = np.array([[0, nb]], np.int64)
    else:
        ar = np.arange(nb, dtype=np.int64)
        lo_hi = np.stack([ar, ar + 1], axis=1)
    ngroups = per.shape[0]
    items = np.empty((ngroups, n2, nsplit, 4), np.int64)
    items[..., 0] = lo_hi[:, 0, None, None]
    items[..., 1] = lo_hi[:, 1, None, None]
    items[..., 2] = np.arange(n2, dtype=np.int64)[None, :, None]
    items[..., 3] = np.arange(nsplit, dtype=np.int64)[None, None, :]
    cost = np.broadcast_to(per[:, None, :] * g, (ngroups, n2, nsplit))
    return items.reshape(-1, 4), np.ascontiguousarray(cost).reshape(-1)


def _assign(cost, idx, nthreads):
    """Split the items over ``nthreads`` chunks, balanced by cost; ``idx``: items by decreasing
    cost.  Up to ``LPT_ITEMS`` items: greedy LPT (each item to the least-loaded chunk, the
    lowest-numbered on ties).  More items: a "snake" deal over the same order (0, 1, .., t-1,
    t-1, .., 0, ...), vectorised, whose imbalance is at most one item's cost, i.e. negligible
    when every chunk has hundreds of items (a Python LPT loop took ~90 ms for 160k TND items).

    Returns (order, tptr): chunk t runs ``order[tptr[t]:tptr[t+1]]``, in increasing item
    index (memory locality).  Which chunk runs an item never changes results.
    """
    n = cost.size
    owner = np.zeros(n, np.int64)
    if nthreads > 1 and n > LPT_ITEMS:
        pos = np.arange(n, dtype=np.int64) % (2 * nthreads)
        owner[idx] = np.where(pos < nthreads, pos, 2 * nthreads - 1 - pos)
    elif nthreads > 1 and n:
        import heapq
        heap = [(0, t) for t in range(nthreads)]
        for x, c in zip(idx.tolist(), np.maximum(cost, 1)[idx].tolist()):
            load, t = heapq.heappop(heap)
            owner[x] = t
            heapq.heappush(heap, (load + c, t))
    order = np.argsort(owner, kind="stable").astype(np.int64)
    tptr = np.zeros(nthreads + 1, np.int64)
    tptr[1:] = np.cumsum(np.bincount(owner, minlength=nthreads))
    return order, tptr


#: above this many items the split is a vectorised snake deal instead of an LPT loop
LPT_ITEMS = 4096


def _by_cost(cost):
    """Item indices by decreasing cost (numpy's sort: compiling one inside numba costs ~1.5 s)."""
    return np.argsort(-cost, kind="stable")


def chunk_count(seqtab, n1, width, limit):
    """Chunks (threads) a plan is split over: 1 when the call's work ``N1 * sum_b S1_b * S2_b *
    width`` (width = D + Dv: the dense multiply-adds per score, masks ignored) is at most
    ``limit`` (config.SERIAL_WORK_FWD / _BWD), else ``threads.num_threads()``.

    Below the limit the hand-off of a chunk to a pool thread and the wait for it (~0.05-0.1 ms)
    cost more than the second thread saves.  Shape-only, and which chunk runs an item never
    changes its result, so results stay bitwise identical whatever the thread count.
    ``width=None``: always ``num_threads()``.
    """
    nt = max(1, num_threads())
    if nt == 1 or width is None:
        return nt
    # float64: S1_b * S2_b can exceed int64 for absurd shapes; only small sums matter here
    work = float(n1) * float(np.dot(seqtab[:, desc.S1].astype(np.float64),
                                    seqtab[:, desc.S2].astype(np.float64))) * float(width)
    return 1 if work <= limit else nt


_plans = {}
# the seqtab columns the plans read (_fwd_items, _bwd_items, split_count)
_PLAN_COLS = [desc.S1, desc.S2, desc.LO, desc.HI, desc.PREFIX]


def _cached(key, seqtab, make):
    """``make()`` -> tuple of arrays, memoised (:func:`memo.memoised`: fresh copies) by ``key``
    + the seqtab columns the plans read, when the call has at most config.PLAN_CACHE_SEQS
    sequences and the plan at most config.PLAN_CACHE_ITEMS items (bounded memory).  Every
    input of a plan is in the key: seqtab's band/length columns, the block sizes, head counts
    and the chunk count."""
    if seqtab.shape[0] > config.PLAN_CACHE_SEQS:
        return make()
    # a large plan is not kept: its numpy cost is small next to its run
    return memoised(_plans, key + (seqtab[:, _PLAN_COLS].tobytes(),), make,
                    keep=lambda plan: plan[0].shape[0] <= config.PLAN_CACHE_ITEMS)


def plan_forward(seqtab, n1, bm, bn, width=None):
    """Items int64 [n, 3] ordered by thread chunk, and tptr int64 [chunks + 1] (chunk count:
    :func:`chunk_count` with config.SERIAL_WORK_FWD; width = D + Dv).  Cached per shape."""
    nt = chunk_count(seqtab, n1, width, config.SERIAL_WORK_FWD)

    def make():
        items, cost = _fwd_items(seqtab, n1, bm, bn)
        order, tptr = _assign(cost, _by_cost(cost), nt)
        return np.ascontiguousarray(items[order]), tptr
    return _cached(("fwd", int(n1), int(bm), int(bn), nt, LPT_ITEMS), seqtab, make)


def forward_blocks(kind=None):
    """Forward tile (FWD_BLOCK_M, FWD_BLOCK_N); the native kind "amx" has its own
    (FWD_BLOCK_M_AMX/N_AMX, measured there)."""
    if kind == "amx":
        return config.FWD_BLOCK_M_AMX, config.FWD_BLOCK_N_AMX
    return config.FWD_BLOCK_M, config.FWD_BLOCK_N


def backward_blocks(d, kind=None):
    """Backward tile (BLOCK_M, BLOCK_N) for head dim D (config: wider tiles from WIDE_D on;
    taller ones for the native kind "amx" below it, ``BWD_AMX_ROWS_FACTOR``)."""
    if d >= config.WIDE_D:
        return config.BLOCK_M_WIDE, config.BLOCK_N_WIDE
    if kind == "amx":
        return config.BLOCK_M * max(int(config.BWD_AMX_ROWS_FACTOR), 1), config.BLOCK_N
    return config.BLOCK_M, config.BLOCK_N


def _host_has_avx512():
    from .isa import _features
    return "avx512f" in _features()[1]


def forward_pv_split(dv):
    """(rows, keys) of the sub-products the forward splits ``P @ V`` into, or (0, 0) for one
    product per tile.

    OpenBLAS's small-matrix kernel (no packing) takes products with M*N*K <= FWD_PV_MNK; at
    Dv = 64 a 112 x 64 x 128 sub-product runs at ~190 GFLOP/s vs ~163 for the whole
    512 x 64 x 256 one (1 thread, A/B).  The split is used only when it leaves at least
    FWD_PV_MIN_ROWS rows (at Dv = 128 the 48-row products measured slower than one call).
    Shape-only, so results stay bitwise identical across thread counts.
    """
    keys = int(config.FWD_PV_KEYS)
    # OpenBLAS has its small-matrix kernels on the AVX-512 CPUs (SkylakeX kernels and later);
    # elsewhere the sub-products would only repack V more often
    if dv <= 0 or keys <= 0 or not _host_has_avx512():
        return 0, 0
    rows = (int(config.FWD_PV_MNK) // (dv * keys)) // 16 * 16
    if rows < int(config.FWD_PV_MIN_ROWS):
        return 0, 0
    return rows, keys


def backward_group(bm):
    """Whole backward tiles of consecutive query blocks that share one score product and one
    dy v^T product: ``BWD_SCORE_ROWS // bm`` (at least 1).  Shape-only, as every plan choice."""
    return max(1, int(config.BWD_SCORE_ROWS) // max(int(bm), 1))


def split_count(n_groups, n2, max_kv_blocks):
    """Number of S2 splits of the backward: shape-only, so results do not depend on threads.

    One long head (B*N2 small) is split into up to ``SPLIT_TARGET`` interleaved sets of key
    blocks with their own dq partial; each extra split costs one dq-sized float32 buffer.
    """
    items = max(1, n_groups * n2)
    want = -(-config.SPLIT_TARGET // items)
    return int(max(1, min(want, max_kv_blocks)))


def plan_backward(seqtab, n2, g, bm, bn, merge_b, width=None):
    """Backward plan: (items int64 [n, 4], tptr, nsplit); chunk count: :func:`chunk_count`
    with config.SERIAL_WORK_BWD (width = D + Dv).  nsplit never depends on it.  Cached per
    shape."""
    nb = seqtab.shape[0]
    max_s2 = int(seqtab[:, desc.S2].max()) if nb else 0
    nsplit = split_count(1 if merge_b else nb, n2, -(-max_s2 // bn))
    nt = chunk_count(seqtab, n2 * g, width, config.SERIAL_WORK_BWD)

    def make():
        items, cost = _bwd_items(seqtab, n2, g, bm, bn, nsplit, merge_b)
        order, tptr = _assign(cost, _by_cost(cost), nt)
        return np.ascontiguousarray(items[order]), tptr, nsplit
    return _cached(("bwd", int(n2), int(g), int(bm), int(bn), bool(merge_b), nsplit, nt,
                    LPT_ITEMS), seqtab, make)
