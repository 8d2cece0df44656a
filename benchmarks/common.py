"""Shared machinery of the benchmarks: inputs, the timed callables of fag_numba and torch,
thread setup and the environment record.

Everything that decides *what* is timed lives here, so ``compare.py``, the pytest cases and
``peak_memory.py`` time exactly the same calls:

* fag_numba backward: ``flash_attention_score_grad(q, k, v, dy, N1, layout, softmax_max=...,
  softmax_sum=..., attention_in=...)`` with the statistics of one untimed forward;
* fag_numba forward: ``flash_attention_score(q, k, v, N1, layout, ...)``;
* torch flash: ``_scaled_dot_product_flash_attention_for_cpu[_backward]`` (PERF.md) with the
  out/lse of one untimed forward;
* torch math: ``_scaled_dot_product_attention_math`` and ``torch.autograd.grad`` of its output
  (the graph is built once, untimed; ``retain_graph=True``).

``prepare(...)`` makes the callable and calls it once (the warm-up, which includes JIT
compilation), so nothing it returns still has to compile.  A case that cannot run raises
``Unavailable`` with the reason (API not importable yet, feature raising NotImplementedError,
torch missing).
"""
from __future__ import annotations

import functools
import importlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

# torch is imported here, before anything can start numba's OpenMP pool.  Measured on this box
# (torch 2.13.0, numba 0.68.1, omp layer): if numba's pool starts first, numba has loaded the
# system libgomp.so.1, torch's own bundled libgomp.so.1 (same soname) is then never loaded, and
# torch's CPU flash backward runs on the system runtime ~10x slower (b2n16s512d64: 43 ms -> 450-650
# ms).  fag_numba's own speed does not depend on the order.  env_info()["torch_own_libgomp"]
# records which runtime torch got.
try:
    import torch as _torch  # noqa: F401
except ImportError:         # torch is optional: its cases are skipped
    _torch = None

from benchmarks import flops as _flops
from benchmarks.shapes import COMPRESSED_MASK_SIZE, Row

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = 20241124          # input data and dropout seed: fixed so every run times the same work
IMPLS = ("fag_numba", "torch")


class Unavailable(Exception):
    """This implementation cannot run this case; the message says why."""


# ---------------------------------------------------------------------------------------------
# imports and environment
# ---------------------------------------------------------------------------------------------
def import_fag():
    """Import fag_numba and check that the public API of SPEC section 1 exists."""
    try:
        fag = importlib.import_module("fag_numba")
    except ImportError as exc:                      # pragma: no cover - depends on the checkout
        raise Unavailable(f"fag_numba is not importable: {exc}") from exc
    for name in ("flash_attention_score", "flash_attention_score_grad"):
        if not hasattr(fag, name):
            raise Unavailable(f"fag_numba.{name} does not exist yet (SPEC section 1 API "
                              "still being written)")
    return fag


def import_torch():
    """Import torch or raise ``Unavailable`` (install it with ``pip install torch==2.13.0``)."""
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        raise Unavailable("torch is not installed (pip install torch==2.13.0)") from exc


def setup_threads(n: int | None = None) -> int:
    """Give numba and torch the same thread count and return it.

    ``n=None`` keeps numba's current count.  numba is asked first and torch set afterwards,
    because asking numba has been reported to reset torch's count (numba/numba#9387).
    """
    import numba

    n = numba.get_num_threads() if n is None else int(n)
    numba.set_num_threads(n)
    try:
        import_torch().set_num_threads(n)
    except Unavailable:
        pass
    return n


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU model name (fag_numba.runtime_info's reading of /proc/cpuinfo)."""
    from fag_numba.threads import _cpu_name
    return _cpu_name()


def threading_layer() -> str:
    """How fag_numba runs in parallel (Python threads over nogil kernels: numba's threading
    layer is not used)."""
    from fag_numba.threads import _threading_layer

    return _threading_layer()


def torch_own_libgomp() -> bool | None:
    """Whether torch's bundled libgomp is mapped (False: torch shares the system libgomp with
    numba and its timings are pessimistic; see the note at the imports).  None without torch."""
    if _torch is None:
        return None
    torch_lib = str(Path(_torch.__file__).parent / "lib")
    try:
        with open("/proc/self/maps") as f:
            gomp = {line.split()[-1] for line in f if "libgomp" in line}
    except OSError:
        return None
    return any(path.startswith(torch_lib) for path in gomp) or not gomp


def env_info() -> dict:
    """Versions, threads and flags recorded with every result (STYLE b9)."""
    import numba

    info = {
        "numba": numba.__version__,
        "threading_layer": threading_layer(),
        "numba_threads": numba.get_num_threads(),
        "numpy": np.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    try:
        torch = import_torch()
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_own_libgomp"] = torch_own_libgomp()
    except Unavailable:
        info["torch"] = None
    try:
        fag = importlib.import_module("fag_numba")
        info["fag_numba"] = getattr(fag, "__version__", "?")
        config = importlib.import_module("fag_numba.config")
        info["fastmath"] = ",".join(sorted(getattr(config, "FASTMATH_FLAGS", ())))
        info["fag_cache"] = bool(getattr(config, "CACHE", False))
    except ImportError:
        info["fag_numba"] = None
    return info


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def np_dtype(name: str):
    """``"fp32"`` -> float32, ``"bf16"`` -> ml_dtypes.bfloat16, ``"fp16"`` -> float16."""
    if name == "fp32":
        return np.dtype(np.float32)
    if name == "fp16":
        return np.dtype(np.float16)
    if name == "bf16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    raise ValueError(f"unknown dtype {name!r} (fp32, bf16 or fp16)")


def to_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """(B, N, S, D) -> the layout's C-contiguous array (SPEC section 2)."""
    b, n, s, d = x.shape
    if layout == "BNSD":
        return np.ascontiguousarray(x)
    if layout == "BSND":
        return np.ascontiguousarray(x.transpose(0, 2, 1, 3))
    if layout == "BSH":
        return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(b, s, n * d)
    if layout == "SBH":
        return np.ascontiguousarray(x.transpose(2, 0, 1, 3)).reshape(s, b, n * d)
    raise ValueError(f"to_layout: unsupported layout {layout!r}")


def from_layout(y: np.ndarray, layout: str, b: int, n: int, s: int, d: int) -> np.ndarray:
    """The layout's array -> (B, N, S, D) view (inverse of ``to_layout``)."""
    if layout == "BNSD":
        return y.reshape(b, n, s, d)
    if layout == "BSND":
        return y.reshape(b, s, n, d).transpose(0, 2, 1, 3)
    if layout == "BSH":
        return y.reshape(b, s, n, d).transpose(0, 2, 1, 3)
    if layout == "SBH":
        return y.reshape(s, b, n, d).transpose(1, 2, 0, 3)
    raise ValueError(f"from_layout: unsupported layout {layout!r}")


@dataclass
class Case:
    """The inputs of one (row, dtype): fag_numba's in the row's layout, torch's in BNSD."""

    row: Row
    dtype: str
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    dy: np.ndarray
    canon: tuple          # (q, k, v, dy) as (B, N, S, D) (TND: (T, N, D)) in the case dtype


def make_case(row: Row, dtype: str = "fp32", seed: int = SEED) -> Case:
    """Standard-normal q, k, v, dy (seeded), rounded to ``dtype``."""
    rng = np.random.default_rng(seed)
    dt = np_dtype(dtype)
    if row.layout == "TND":
        t1 = sum(a for a, _ in row.seqlens)
        t2 = sum(b for _, b in row.seqlens)
        shapes = [(t1, row.N1, row.D), (t2, row.N2, row.D), (t2, row.N2, row.D),
                  (t1, row.N1, row.D)]
    else:
        shapes = [(row.B, row.N1, row.S1, row.D), (row.B, row.N2, row.S2, row.D),
                  (row.B, row.N2, row.S2, row.D), (row.B, row.N1, row.S1, row.D)]
    canon = tuple(rng.standard_normal(shape, dtype=np.float32).astype(dt) for shape in shapes)
    if row.layout == "TND":
        arrays = canon
    else:
        arrays = tuple(to_layout(x, row.layout) for x in canon)
    return Case(row, dtype, *arrays, canon=canon)


def scale_of(row: Row) -> float:
    """The softmax scale used by both sides: 1 / sqrt(D)."""
    return 1.0 / math.sqrt(row.D)


@functools.lru_cache(maxsize=1)
def compressed_causal_mask() -> np.ndarray:
    """The canonical compressed mask of modes 2/3/4: ``triu(ones([2048, 2048]), 1)``."""
    mask = np.triu(np.ones((COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE), dtype=bool), 1)
    mask.setflags(write=False)
    return mask


def alibi_slopes(n: int) -> np.ndarray:
    """The ALiBi paper's geometric slopes 2^(-8 (h+1) / n), float32 [n]."""
    return (2.0 ** (-8.0 * np.arange(1, n + 1) / n)).astype(np.float32)


def fag_kwargs(row: Row) -> dict:
    """Keyword arguments shared by fag_numba's forward and grad for this row."""
    kw: dict[str, Any] = {"scale_value": scale_of(row)}
    if row.sparse_mode:
        kw["sparse_mode"] = row.sparse_mode
    if row.has_mask:
        kw["atten_mask"] = compressed_causal_mask()
        if row.sparse_mode == 4:
            kw["pre_tokens"] = row.pre_tokens
            kw["next_tokens"] = row.next_tokens
    if row.keep_prob < 1.0:
        kw.update(keep_prob=row.keep_prob, seed=SEED, offset=0)
    if row.pse == "alibi":
        kw.update(pse=alibi_slopes(row.N1), pse_type=2)
    if row.layout == "TND":
        kw["actual_seq_qlen"] = list(np.cumsum([a for a, _ in row.seqlens]).tolist())
        kw["actual_seq_kvlen"] = list(np.cumsum([b for _, b in row.seqlens]).tolist())
    return kw


# ---------------------------------------------------------------------------------------------
# the timed callables
# ---------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A warmed-up callable: ``fn()`` is what gets timed; ``first`` is the warm-up's result."""

    impl: str
    label: str           # e.g. "fag_numba", "torch flash", "torch math"
    fn: Callable[[], Any]
    first: Any


def _unimplemented(row: Row, what: str, exc: Exception) -> Unavailable:
    needs = ", ".join(row.features) or "this case"
    return Unavailable(f"fag_numba {what} raised NotImplementedError for {needs}: {exc}")


def prepare_fag(case: Case, pass_: str, warmup: bool = True) -> Prepared:
    """fag_numba forward or backward for ``case``, warmed up (compiled) once unless
    ``warmup=False`` (the backward's forward still runs, to produce the statistics)."""
    fag = import_fag()
    row = case.row
    kw = fag_kwargs(row)

    def forward():
        return fag.flash_attention_score(case.q, case.k, case.v, row.N1, row.layout, **kw)

    try:
        if pass_ == "fwd":
            fn = forward
        else:
            fwd = forward()
            gkw = dict(kw, softmax_max=fwd.softmax_max, softmax_sum=fwd.softmax_sum,
                       attention_in=fwd.attention_out)
            del fwd

            def fn():
                return fag.flash_attention_score_grad(case.q, case.k, case.v, case.dy, row.N1,
                                                      row.layout, **gkw)
        first = fn() if warmup else None
    except NotImplementedError as exc:
        raise _unimplemented(row, "forward" if pass_ == "fwd" else "backward", exc) from exc
    return Prepared("fag_numba", "fag_numba", fn, first)


def torch_tensor(x: np.ndarray):
    """numpy float32 / ml_dtypes.bfloat16 -> torch tensor with identical values (no copy)."""
    torch = import_torch()
    x = np.ascontiguousarray(x)
    if x.dtype in (np.float32, np.float16):
        return torch.from_numpy(x)
    if x.dtype == np_dtype("bf16"):
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    raise TypeError(f"torch_tensor: unsupported dtype {x.dtype}")


def _torch_inputs(case: Case, expand_kv: bool):
    """torch q, k, v, dy in (B, N, S, D); K/V expanded to N1 heads for GQA rows if asked."""
    row = case.row
    if row.layout == "TND":
        raise Unavailable("torch has no varlen (TND) flash kernel: no peer")
    q, k, v, dy = case.canon
    if expand_kv and row.N1 != row.N2:
        g = row.N1 // row.N2          # query head h uses kv head h // G
        k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    return tuple(torch_tensor(x) for x in (q, k, v, dy))


def prepare_torch_flash(case: Case, pass_: str, warmup: bool = True) -> Prepared:
    """torch's CPU flash-attention kernel (PERF.md), warmed up once unless ``warmup=False``."""
    torch = import_torch()
    row = case.row
    q, k, v, dy = _torch_inputs(case, expand_kv=True)
    scale, causal = scale_of(row), row.is_causal
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    def forward():
        return flash(q, k, v, 0.0, causal, scale=scale)

    if pass_ == "fwd":
        fn = forward
    else:
        out, lse = forward()

        def fn():
            return flash_bwd(dy, q, k, v, out, lse, 0.0, causal, scale=scale)
    label = "torch flash" + ("-kvrep" if row.N1 != row.N2 else "")   # K/V repeated to N1 heads
    return Prepared("torch", label, fn, fn() if warmup else None)


def _math_bias(row: Row, dtype):
    """Additive float bias for the math peer: ALiBi -slope*|j-i| and/or causal -inf."""
    torch = import_torch()
    if row.pse != "alibi":
        return None
    i = torch.arange(row.S1).view(-1, 1)
    j = torch.arange(row.S2).view(1, -1)
    slopes = torch.from_numpy(alibi_slopes(row.N1)).view(1, -1, 1, 1)
    bias = -slopes * (j - i).abs().to(torch.float32)
    if row.is_causal:
        bias = bias.masked_fill(j > i + (row.S2 - row.S1 if row.sparse_mode == 3 else 0),
                                float("-inf"))
    return bias.to(dtype).contiguous()


def prepare_torch_math(case: Case, pass_: str, warmup: bool = True) -> Prepared:
    """torch's O(S^2) MATH attention (its fallback for dropout / bias), warmed up once unless
    ``warmup=False``."""
    torch = import_torch()
    row = case.row
    if row.has_mask and not row.is_causal:
        raise Unavailable("torch math peer: band masks are not modelled (no peer)")
    q, k, v, dy = _torch_inputs(case, expand_kv=False)
    scale = scale_of(row)
    bias = _math_bias(row, q.dtype)
    is_causal = row.is_causal and bias is None
    p = 1.0 - row.keep_prob
    gqa = row.N1 != row.N2
    attn = torch.ops.aten._scaled_dot_product_attention_math

    if pass_ == "fwd":
        def fn():
            with torch.no_grad():
                return attn(q, k, v, bias, p, is_causal, scale=scale, enable_gqa=gqa)[0]
    else:
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        out = attn(qg, kg, vg, bias, p, is_causal, scale=scale, enable_gqa=gqa)[0]

        def fn():
            return torch.autograd.grad(out, (qg, kg, vg), dy, retain_graph=True)
    return Prepared("torch", "torch math", fn, fn() if warmup else None)


def prepare(impl: str, case: Case, pass_: str, warmup: bool = True) -> Prepared:
    """The warmed-up callable of ``impl`` ("fag_numba" or "torch") for ``case`` and ``pass_``
    (``warmup=False``: not called yet; ``peak_memory.py`` wants the first call itself)."""
    if pass_ not in ("fwd", "bwd"):
        raise ValueError(f"pass_ must be 'fwd' or 'bwd', got {pass_!r}")
    if impl == "fag_numba":
        return prepare_fag(case, pass_, warmup)
    if impl == "torch":
        if case.row.peer == "flash":
            return prepare_torch_flash(case, pass_, warmup)
        if case.row.peer == "math":
            return prepare_torch_math(case, pass_, warmup)
        raise Unavailable(f"torch has no peer for {case.row.describe()} "
                          f"({', '.join(case.row.features) or 'no comparable kernel'})")
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
def _as_f32(x) -> np.ndarray:
    if hasattr(x, "detach"):                       # torch tensor
        x = x.detach().float().numpy()
    return np.asarray(x).astype(np.float32)


def fag_result_bnsd(case: Case, result, pass_: str) -> list[np.ndarray]:
    """fag_numba's outputs as float32 (B, N, S, D): [out] or [dq, dk, dv]."""
    row = case.row
    if pass_ == "fwd":
        arrays = [(result.attention_out, row.N1, row.S1)]
    else:
        arrays = [(result.dq, row.N1, row.S1), (result.dk, row.N2, row.S2),
                  (result.dv, row.N2, row.S2)]
    return [from_layout(_as_f32(a), row.layout, row.B, n, s, row.D) for a, n, s in arrays]


def torch_result_bnsd(case: Case, result, pass_: str) -> list[np.ndarray]:
    """torch's outputs as float32 (B, N, S, D), dk/dv summed back over GQA groups."""
    row = case.row
    if pass_ == "fwd":
        return [_as_f32(result[0] if isinstance(result, tuple) else result)]
    dq, dk, dv = (_as_f32(t) for t in result[:3])
    if dk.shape[1] != row.N2:                      # K/V were expanded for the flash peer
        g = row.N1 // row.N2
        dk = dk.reshape(row.B, row.N2, g, row.S2, row.D).sum(axis=2)
        dv = dv.reshape(row.B, row.N2, g, row.S2, row.D).sum(axis=2)
    return [dq, dk, dv]


def max_rel_diff(case: Case, fag_result, torch_result, pass_: str) -> float | None:
    """max |fag - torch| / max |torch| over the outputs; None when not comparable (dropout
    uses different random bits, no peer, varlen)."""
    if case.row.keep_prob < 1.0 or case.row.layout == "TND":
        return None
    ours = fag_result_bnsd(case, fag_result, pass_)
    theirs = torch_result_bnsd(case, torch_result, pass_)
    worst = 0.0
    for a, b in zip(ours, theirs):
        ref = float(np.max(np.abs(b))) or 1.0
        worst = max(worst, float(np.max(np.abs(a - b))) / ref)
    return worst


def _machine_busy_seconds() -> float:
    """CPU-seconds all CPUs spent busy since boot (/proc/stat; 0 where unavailable)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    idle = vals[3] + vals[4]                          # idle + iowait
    return (sum(vals) - idle) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """CPU used by *other* processes while a block runs, as a fraction of the whole machine.

    The machine is shared: a row timed while something else ran is suspect, so every result
    carries this number (``other%`` in compare.py, ``other_load`` in extra_info).  It is the
    machine's busy CPU time (/proc/stat) minus this process's own (``os.times``), over
    wall time x CPU count.
    """

    def __enter__(self):
        self._t = time.perf_counter()
        self._busy = _machine_busy_seconds()
        self._own = sum(os.times()[:4])   # children (waited for) count as own
        self.fraction = None
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._t
        other = (_machine_busy_seconds() - self._busy) - (sum(os.times()[:4]) - self._own)
        cpus = os.cpu_count() or 1
        self.fraction = max(0.0, other / (wall * cpus)) if wall > 0 else 0.0
        return False


def wait_for_idle(max_wait: float, threshold: float = 0.10, sample: float = 1.0) -> float:
    """Wait (up to ``max_wait`` s) until other processes use < ``threshold`` of the machine
    over a ``sample``-second window; return the last measured fraction."""
    deadline = time.perf_counter() + max_wait
    while True:
        with LoadMeter() as meter:
            time.sleep(sample)
        if meter.fraction < threshold or time.perf_counter() >= deadline:
            return meter.fraction
        time.sleep(2.0)


def time_once(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call (perf_counter); the result is dropped afterwards."""
    t0 = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - t0
    del result
    return elapsed


def gflops(row: Row, pass_: str, seconds: float) -> float:
    """GFLOP/s of one call of ``seconds`` (benchmarks/flops.py conventions)."""
    return _flops.gflops_per_s(row, pass_, seconds)
