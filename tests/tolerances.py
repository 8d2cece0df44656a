"""Every numeric tolerance of the test suite, in one place (STYLE b8, SPEC §9b).

Two checks, both used by the accuracy tests:

(1) ``assert_close(actual, ref64, tolerance(out_dtype, kind))`` (tests/utils.py): elementwise
    ``|actual - ref| <= atol * max(1, max|ref|) + rtol * |ref|``. ``atol`` is relative to the
    magnitude of the reference so that one table serves small and large outputs.
(2) ``baseline_check(actual, ref64, naive_same_dtype)``: ``err(kernel) <= k * err(naive) + floor``
    with ``err`` = max abs error vs the float64 reference (flash-attention's test style).

How the numbers were chosen. The tests feed the float64 reference the *exact* values the package
saw (inputs already rounded to their dtype, fp8 already dequantised), so the only error sources are
(a) float32 arithmetic with float32 accumulation inside the package and (b) the final rounding of
the outputs to their dtype (the package does not round P or dS, SPEC §3). Measured with a tiled
float32 online-softmax emulation (sequential accumulation over 64-wide S2 tiles) on inputs
~N(0,1), scale 1/sqrt(D), S up to 2048 x 2048, D in {59, 64, 128}, causal and full:

- (a) max |err| / max(1, max|ref|) stayed below 1e-6 for attention_out, dq, dk, dv; softmax_max
  relative error < 6e-7 and softmax_sum < 3e-6.
- (b) rounding to the output dtype is at most one ulp when the float32 value lands next to a
  rounding boundary: 2**-10 ~ 9.8e-4 relative for float16, 2**-7 ~ 7.8e-3 for bfloat16.
- Real bugs (missing scale, dq not scaled, causal mask not shifted for S1 != S2, wrong kv head)
  gave errors of 0.2 .. 20 times the magnitude: orders of magnitude above every value below.

So: float32 gets ~10-20x headroom over (a); float16/bfloat16 get 2 ulps (2x (b)) for rtol and the
same for atol (covers elements near 0, whose error is the float32 noise of the large terms).
"""

from __future__ import annotations

from typing import NamedTuple

import ml_dtypes
import numpy as np

from_dtype_name = {  # accepted spellings -> canonical short name
    "float32": "fp32", "fp32": "fp32", "float16": "fp16", "fp16": "fp16",
    "bfloat16": "bf16", "bf16": "bf16", "float64": "fp64", "fp64": "fp64",
}


class Tolerances(NamedTuple):
    """``|actual - ref| <= atol * max(1, max|ref|) + rtol * |ref|`` (see module docstring)."""

    atol: float
    rtol: float


# attention_out (forward). fp32: 1e-5 is ~10x the largest measured float32 error (9e-7 x magnitude).
FWD = {
    "fp32": Tolerances(atol=1e-5, rtol=1e-5),
    "fp16": Tolerances(atol=2e-3, rtol=2e-3),     # 2 ulps of float16 (2**-10 each)
    "bf16": Tolerances(atol=1.6e-2, rtol=1.6e-2),  # 2 ulps of bfloat16 (2**-7 each)
    "fp64": Tolerances(atol=1e-12, rtol=1e-12),   # reference vs itself (layout round trips)
}

# dq, dk, dv (backward): one more matmul chain and the Dsum cancellation, so fp32 gets 2x FWD.
# Rounding of fp16/bf16 outputs happens once at the end, exactly like the forward.
BWD = {
    "fp32": Tolerances(atol=2e-5, rtol=2e-5),
    "fp16": Tolerances(atol=2e-3, rtol=2e-3),
    "bf16": Tolerances(atol=1.6e-2, rtol=1.6e-2),
    "fp64": Tolerances(atol=1e-12, rtol=1e-12),
}

# dpse: a reduction over S1 (broadcast pse) or over S1*S2 (ALiBi slopes, weighted by |delta| up to
# S), i.e. up to millions of float32 terms with cancellation. Measured for dslope at S = 1024
# (causal, 0.5M terms per head): 2e-7 x magnitude with per-tile sums, 2.5e-6 for one fully
# sequential float32 sum. 1e-4 leaves room for S ~ 64k sequential sums; bugs give O(1).
DPSE = {
    "fp32": Tolerances(atol=1e-4, rtol=1e-4),
    "fp16": Tolerances(atol=2e-3, rtol=2e-3),
    "bf16": Tolerances(atol=1.6e-2, rtol=1.6e-2),
    "fp64": Tolerances(atol=1e-12, rtol=1e-12),
}

# softmax_max / softmax_sum: always float32 (whatever the input dtype). Measured: m < 6e-7,
# l < 3e-6 relative; l sums S2 terms, so leave room for long sequences. Invalid-row sentinels
# (+-FLT_MAX) are compared exactly by assert_close.
STATS = Tolerances(atol=2e-5, rtol=2e-5)

# The kernels' vectorised exp (kernels/tile.py ``_exp16``): max relative error against float64
# exp over the softmax range.  Measured 1.74e-7 (degree-5 polynomial, two-step ln2 reduction);
# the documented bound is 1e-6, this keeps the measured claim honest.
EXP_REL = 3e-7

# baseline_check floors, relative to max(1, max|ref|): one ulp of the output dtype for fp16/bf16
# (the rounding noise of the output itself; "ref + 0.3 - 0.3 - ref" in flash-attention's tests),
# ~8 float32 eps for fp32 (accumulation-order noise between two correct float32 implementations).
FLOOR = {"fp32": 1e-6, "fp16": 2.0 ** -10, "bf16": 2.0 ** -7, "fp64": 1e-13}

# baseline_check factors (STYLE b8): 2 for the forward recompute, 3 for gradients.
K_FWD = 2.0
K_BWD = 3.0

_TABLES = {"fwd": FWD, "bwd": BWD, "dpse": DPSE}


def dtype_key(dtype):
    """Output dtype (numpy dtype, ml_dtypes.bfloat16, or a name) -> "fp32"/"fp16"/"bf16"/"fp64".

    fp8 *inputs* produce float16 by default (SPEC §1 ``out_dtype``): look up the **output** dtype.
    """
    if isinstance(dtype, str):
        return from_dtype_name[dtype.lower()]
    dt = np.dtype(dtype)
    if dt == np.dtype(ml_dtypes.bfloat16):
        return "bf16"
    return from_dtype_name[dt.name]


def tolerance(out_dtype, kind="bwd"):
    """The ``Tolerances`` for outputs of ``out_dtype``; kind is "fwd", "bwd", "dpse" or "stats"."""
    if kind == "stats":
        return STATS
    return _TABLES[kind][dtype_key(out_dtype)]


def _max_err(a, ref):
    a = np.asarray(a).astype(np.float64)
    return float(np.abs(a - ref).max()) if a.size else 0.0


def baseline_check(actual, ref64, naive_same_dtype, k=K_BWD, floor=None, name="output"):
    """STYLE b8 (2): ``err(actual) <= k * err(naive_same_dtype) + floor`` (max abs errors vs ref64).

    ``naive_same_dtype`` is a straightforward implementation run in the same input/output dtype.
    ``floor`` defaults to ``FLOOR[dtype of actual] * max(1, max|ref64|)``. Returns
    ``(err_actual, err_naive)``; raises AssertionError with both numbers otherwise.
    """
    ref = np.asarray(ref64).astype(np.float64)
    if floor is None:
        mag = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
        floor = FLOOR[dtype_key(np.asarray(actual).dtype)] * mag
    err_a = _max_err(actual, ref)
    err_n = _max_err(naive_same_dtype, ref)
    if not err_a <= k * err_n + floor:   # also catches NaN
        raise AssertionError(
            f"{name}: error vs float64 reference {err_a:.4g} > {k:g} x naive error {err_n:.4g} "
            f"+ floor {floor:.4g}")
    return err_a, err_n

# Whole-model comparisons (tests/test_transformers_backend.py, tests/clients/*): a tiny float32
# transformer with fag_numba attention vs the same weights with transformers' sdpa, logits / loss
# / every parameter gradient, as max|a - b| / max(1, max|b|) (gradients: / max(1e-3, max|b|)).
# Both are float32 implementations of the same math; measured 4e-7 (logits) and < 1e-5
# (gradients, 2 layers + LM head; the gradient of a near-zero parameter amplifies relative
# noise); a dropped window or a mis-aligned causal mask gives 1e-1 .. 1.
MODEL = Tolerances(atol=1e-4, rtol=0.0)
