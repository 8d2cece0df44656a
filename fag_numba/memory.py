"""Memory budget of one call (SPEC §9): refuse with ``FagMemoryError`` before allocating.

A valid call whose outputs or working memory cannot fit raises :class:`FagMemoryError` (a
``FagError`` and a ``MemoryError``) naming the size, after every argument check and before any
large conversion or allocation.  Without this, a huge call either dies in numpy's MemoryError
halfway through, or (Linux overcommit) gets its lazily zeroed pages and is killed by the OOM
killer later.

**Available** memory is ``MemAvailable`` of ``/proc/meminfo`` (what the kernel can hand out
without swapping), lowered to the cgroup v2/v1 limit minus current usage when the process runs
in a memory-limited container; where neither exists (non-Linux), ``os.sysconf``'s available
physical pages; else no check is made.

**Working memory** of a call is estimated (:func:`estimate_call`) as the sum of

- float32 copies of the inputs that need one (any input not already a writable C-contiguous
  float32 array: other dtypes, strided or broadcast views), pse, a non-contiguous dense mask and
  a non-contiguous ``drop_mask`` (1 byte per element);
- the float32 result buffers and their casts to the output dtype: forward ``attention_out``
  plus statistics (two row arrays and two 8-lane outputs); backward dq, dk, dv, the
  ``SPLIT_TARGET - 1`` dq partials, dpse, the per-row lse/dsum, and the internal forward when no
  statistics are given;
- the per-sequence descriptor tables (:data:`PER_SEQ_BYTES` per sequence, plus 32 bytes per
  forward work item) and the per-thread tile scratch.

Inputs the caller already holds are not counted.  The estimate is an upper bound of what the
call allocates at its peak (within a few percent), not of the process's total memory.
"""
import os
import sys

import numba
import numpy as np

from . import config
from .errors import FagMemoryError

_M_TRIM_THRESHOLD = -1       # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_malloc_state = {"done": False, "set": False}


def keep_freed_memory():
    """Once per process (``config.MALLOC_TUNE``, glibc only): ``mallopt`` M_MMAP_THRESHOLD =
    32 MB and M_TRIM_THRESHOLD = ``config.MALLOC_TRIM_MB``, so the MB-sized buffers of each call
    (float32 gradient accumulators, outputs, tile scratch) come from memory the heap keeps
    instead of fresh mappings: no page faults per call.

    glibc raises both thresholds by itself as large blocks are freed, but not reliably: once
    torch had run in the process, each bf16 backward (1,8,2048,128) mapped and unmapped its
    buffers again, ~4000 page faults and 45 -> 92 ms per call on 2 threads.  32 MB is glibc's
    own adaptive ceiling; the cost is that up to MALLOC_TRIM_MB of freed memory stays with the
    process.  Returns whether the settings were applied (False: disabled, not glibc, or
    refused)."""
    if _malloc_state["done"]:
        return _malloc_state["set"]
    _malloc_state["done"] = True
    if not config.MALLOC_TUNE or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version          # glibc, not musl
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and
              libc.mallopt(_M_TRIM_THRESHOLD, int(config.MALLOC_TRIM_MB) << 20) == 1)
    except (OSError, AttributeError):
        ok = False
    _malloc_state["set"] = ok
    return ok


def _aligned(shape, dtype, alloc):
    """``alloc``'s (np.zeros / np.empty) array of ``shape``, starting on a 64-byte line."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    buf = alloc(n * dtype.itemsize + 64, np.uint8)
    skip = -buf.ctypes.data % 64
    return buf[skip:skip + n * dtype.itemsize].view(dtype).reshape(shape)


def zeros64(shape, dtype=np.float32):
    """``np.zeros(shape, dtype)`` starting on a 64-byte cache line.  numpy's large arrays start
    16 bytes past a page (the allocator's header), so every 64-byte row access of the kernels
    to the results they accumulate in (dq, dk, dv as AMX C tiles, attention_out) touched two
    lines.  One extra line of memory."""
    return _aligned(shape, dtype, np.zeros)


def empty64(shape, dtype=np.float32):
    """``zeros64`` without the zeros, for a result the kernels write in full: since
    ``keep_freed_memory`` the heap serves buffers up to 32 MB, so calloc zeroes them with a
    memset (4 MB of attention_out at (2, 16, 512, 64): ~5% of a float32 forward)."""
    return _aligned(shape, dtype, np.empty)


#: bytes of descriptor tables per sequence: seqtab (``desc.NSEQ`` int64) plus ~26 int64 per-batch
#: arrays of the layout / mask / pse plans
PER_SEQ_BYTES = 8 * (20 + 26)


def _fmt(n):
    for unit, div in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _read_int(path):
    try:
        with open(path) as f:
            txt = f.read().strip()
    except OSError:
        return None
    if not txt or txt == "max":
        return None
    try:
        return int(txt)
    except ValueError:
        return None


def available_bytes():
    """Bytes the process can allocate now without swapping (module docstring), or None."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        avail = None
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    for lim_p, use_p in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        lim, use = _read_int(lim_p), _read_int(use_p)
        if lim is not None and use is not None and lim < (1 << 60):
            room = max(lim - use, 0)
            avail = room if avail is None else min(avail, room)
            break
    return avail


def require(nbytes, what, fn=""):
    """Raise FagMemoryError when ``nbytes`` exceed the memory available now."""
    nbytes = int(nbytes)
    if nbytes < config.MEMCHECK_MIN_BYTES:
        return          # reading /proc and the cgroup files costs ~0.1 ms: not for small calls
    avail = available_bytes()
    if avail is not None and nbytes > avail:
        raise FagMemoryError(f"{fn}{what} needs about {_fmt(nbytes)} ({nbytes} bytes) of memory, "
                             f"but only {_fmt(avail)} are available (MemAvailable); nothing "
                             f"was allocated. Reduce the problem size or process it in chunks "
                             f"(fag_numba.merge_attention_outputs / SPEC §10)")


def copy_bytes(x, itemsize=4):
    """Bytes of the float32 (itemsize 4) or byte (1) copy ``x`` needs before the kernels read it:
    0 for a writable C-contiguous array already of that kind."""
    if x is None or not isinstance(x, np.ndarray):
        return 0
    same = (x.dtype == np.float32) if itemsize == 4 else (x.dtype.itemsize == 1)
    if same and x.flags.c_contiguous and x.flags.writeable:
        return 0
    return int(x.size) * itemsize


def estimate_call(P, arrays, grad, stats_given, pse=None, atten_mask=None, drop_mask=None):
    """Working-memory estimate in bytes (module docstring) of a prepared call ``P``.

    arrays: dict name -> ndarray of the float inputs (query, key, value[, dy, attention_in]).
    """
    d = P.dims
    total = 0
    for name, x in arrays.items():
        total += copy_bytes(x)
        if P.fp8 and isinstance(P.d_scales.get("d_scale_" + {"query": "q", "key": "k",
                                                              "value": "v", "dy": "dy"}.get(name, "")),
                                np.ndarray):
            total += 8 * int(x.size)              # per-block scales: a scaled float32 temporary
    if pse is not None and isinstance(pse, np.ndarray) and pse.ndim > 1:
        total += copy_bytes(pse)
    if atten_mask is not None and P.mask.has_dense:
        total += copy_bytes(atten_mask, 1)
    if drop_mask is not None and P.drop_kind != 0:
        total += copy_bytes(drop_mask, 1)
    nrows = d.T1 * d.N1 if d.tnd else d.B * d.N1 * d.S1
    q_el = int(arrays["query"].size)
    k_el = int(arrays["key"].size)
    v_el = int(arrays["value"].size)
    o_el = int(np.prod(P.dy_shape, dtype=np.int64)) if P.dy_shape else 0
    osz = np.dtype(P.out_dtype).itemsize
    cast = 0 if np.dtype(P.out_dtype) == np.float32 else 1
    fwd_out = 4 * o_el + 8 * nrows                      # out, m, l rows
    bm = max(config.FWD_BLOCK_M, config.FWD_BLOCK_M_AMX,
             config.BLOCK_M * max(int(config.BWD_AMX_ROWS_FACTOR), 1), config.BLOCK_M_WIDE)
    bn = max(config.FWD_BLOCK_N, config.FWD_BLOCK_N_AMX, config.BLOCK_N, config.BLOCK_N_WIDE)
    scratch = numba.config.NUMBA_NUM_THREADS * 4 * (4 * bm * bn + bm * max(d.Dv, 1) + 4 * bn)
    tables = d.B * PER_SEQ_BYTES + 32 * d.N1 * int(np.sum(-(-d.seq_q // max(config.FWD_BLOCK_M, 1))))
    total += tables + scratch
    if not grad:
        total += fwd_out + cast * osz * o_el + 2 * 32 * nrows   # + the 8-lane statistics
        return total
    if not stats_given:
        total += fwd_out
    pse_el = int(pse.size) if isinstance(pse, np.ndarray) else 0
    nsplit = max(int(config.SPLIT_TARGET), 1)
    total += 4 * (q_el + k_el + v_el) + 4 * (nsplit - 1) * q_el + 8 * nrows + 8 * pse_el
    total += cast * osz * (q_el + k_el + v_el) + 8 * nrows     # casts; lse, dsum
    return total
