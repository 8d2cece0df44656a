"""Argument validation of the public API (SPEC §9, fag_numba/validation.py, layout.py, api.py,
pse.py; mask details are in tests/test_masks.py).

One test case per rule: each rule is a bad variant of a small valid call, run through the
forward and/or the grad, and must raise ``FagTypeError`` (non-array, wrong Python type,
unsupported or mismatched dtype) or ``FagValueError`` (everything else) whose message names the
argument.  Every case also checks that the failed call left its array arguments untouched.
Positive cases pin what must be accepted (case-insensitive layout, inner_precise 0..2, out_dtype
spellings of the input dtype, keep_prob rounding to 1, ignored padding_mask / softmax_in).
"""
from __future__ import annotations

import itertools
import warnings
from typing import Callable, NamedTuple

import ml_dtypes
import numpy as np
import pytest

import fag_numba
from fag_numba import FagError, FagTypeError, FagValueError

from utils import layout_shape, make_qkv

BF16 = np.dtype(ml_dtypes.bfloat16)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
LAYOUTS = ("BSH", "SBH", "BSND", "BNSD")
GRAD_ONLY = ("dy", "softmax_max", "softmax_sum", "attention_in", "softmax_in", "d_scale_dy")


def base(layout="BNSD", dtype=np.float32, B=1, N1=2, N2=1, S1=3, S2=4, D=8, Dv=8, stats=False):
    """Keyword arguments of a valid call (grad arguments included; the forward drops them)."""
    q, k, v, dy = make_qkv(layout, B, N1, N2, S1, S2, D, Dv, dtype, np.random.default_rng(0))
    args = dict(query=q, key=k, value=v, dy=dy, head_num=N1, input_layout=layout)
    if stats:
        args.update(softmax_max=np.zeros((B, N1, S1, 8), np.float32),
                    softmax_sum=np.ones((B, N1, S1, 8), np.float32),
                    attention_in=np.zeros(layout_shape(layout, B, N1, S1, Dv), dtype))
    return args


def call(which, args):
    if which == "fwd":
        a = {k: v for k, v in args.items() if k not in GRAD_ONLY}
        return fag_numba.flash_attention_score(**a)
    return fag_numba.flash_attention_score_grad(**args)


class Rule(NamedTuple):
    id: str
    make: Callable[[], dict]          # the bad call's keyword arguments
    exc: type
    match: str                        # the argument the message must name (a regex)
    where: tuple = ("fwd", "grad")
    xfail: dict = {}                  # {which: reason} for known package bugs (strict xfail)


def on(base_kw, **over):
    """A rule maker: ``base(**base_kw)`` with some arguments replaced (callables are applied to
    the base value: ``query=lambda q: q[..., 0]``)."""
    def make():
        a = base(**base_kw)
        for k, v in over.items():
            a[k] = v(a[k]) if callable(v) and not isinstance(v, type) else v
        return a
    return make




def _arr(shape, dtype=np.float32):
    return np.zeros(shape, dtype)


def rules():
    R = []
    V, T = FagValueError, FagTypeError
    add = lambda *a, **k: R.append(Rule(*a, **k))                     # noqa: E731

    # ---- input_layout ----
    add("layout-type-int", on({}, input_layout=3), T, "input_layout")
    add("layout-type-none", on({}, input_layout=None), T, "input_layout")
    add("layout-type-bytes", on({}, input_layout=b"BNSD"), T, "input_layout")
    add("layout-value", on({}, input_layout="BNDS"), V, "input_layout")
    add("layout-value-empty", on({}, input_layout=""), V, "input_layout")
    add("layout-value-spaces", on({}, input_layout=" BNSD"), V, "input_layout")

    # ---- ranks per layout (each array one axis too many / too few) ----
    for lay, name in itertools.product(LAYOUTS, ("query", "key", "value", "dy")):
        where = ("grad",) if name == "dy" else ("fwd", "grad")
        add(f"rank-{lay}-{name}-plus1", on(dict(layout=lay), **{name: lambda x: x[None]}), V,
            name, where)
        add(f"rank-{lay}-{name}-minus1", on(dict(layout=lay), **{name: lambda x: x[..., 0]}), V,
            name, where)

    # ---- head_num ----
    for bad in (2.0, True, "2", None, np.float32(2)):
        add(f"head_num-type-{type(bad).__name__}", on({}, head_num=bad), T, "head_num")
    for bad in (0, -1):
        add(f"head_num-value{bad}", on({}, head_num=bad), V, "head_num")
    for lay in ("BSND", "BNSD"):
        add(f"head_num-ne-N-axis-{lay}", on(dict(layout=lay), head_num=3), V, "head_num")
        add(f"head_num-ne-N-axis-{lay}-smaller", on(dict(layout=lay, N1=4, N2=2), head_num=2), V,
            "head_num")
    for lay in ("BSH", "SBH"):
        add(f"H1-not-multiple-of-head_num-{lay}", on(dict(layout=lay, N1=2, D=8), head_num=3), V,
            "head_num")
        add(f"H1-zero-but-H2-not-{lay}", on(dict(layout=lay), query=lambda x: x[..., :0],
                                             dy=lambda x: x[..., :0]), V, "key")

    # ---- GQA: N1 % N2, kv head counts ----
    add("N1-not-multiple-of-N2-BNSD", on(dict(N1=4, N2=3)), V, "key")
    add("N1-not-multiple-of-N2-BSND", on(dict(layout="BSND", N1=2, N2=3, D=4, Dv=4)), V, "key")
    add("N1-not-multiple-of-N2-BSH", on(dict(layout="BSH", N1=4, N2=3)), V, "key")
    add("H2-not-multiple-of-D-BSH", on(dict(layout="BSH"), key=lambda x: x[..., :-1],
                                       value=lambda x: x[..., :-1]), V, "key")
    add("N2-zero-BNSD", on({}, key=lambda x: x[:, :0], value=lambda x: x[:, :0]), V, "key")
    add("value-heads-ne-key-heads-BNSD", on(dict(N1=4, N2=2),
                                            value=lambda x: x[:, :1]), V, "value")
    add("value-heads-ne-key-heads-BSND", on(dict(layout="BSND", N1=4, N2=2),
                                            value=lambda x: x[:, :, :1]), V, "value")
    add("value-H-not-multiple-of-N2-BSH", on(dict(layout="BSH", N1=2, N2=2),
                                             value=lambda x: x[..., :-1]), V, "value")

    # ---- shapes: batch, sequence, head dims ----
    for lay in LAYOUTS:
        bax = 1 if lay == "SBH" else 0
        sax = {"BSH": 1, "SBH": 0, "BSND": 1, "BNSD": 2}[lay]
        take1 = lambda ax: (lambda x: np.take(x, [0], axis=ax))   # noqa: E731
        add(f"key-batch-ne-query-{lay}", on(dict(layout=lay, B=2), key=take1(bax),
                                            value=take1(bax)), V, "key")
        add(f"value-seq-ne-key-{lay}", on(dict(layout=lay), value=take1(sax)), V, "value")
        add(f"dy-seq-ne-query-{lay}", on(dict(layout=lay), dy=take1(sax)), V, "dy", ("grad",))
        add(f"dy-batch-ne-query-{lay}", on(dict(layout=lay, B=2), dy=take1(bax)), V, "dy",
            ("grad",))
    for lay in ("BSND", "BNSD"):
        add(f"Dk-ne-Dq-{lay}", on(dict(layout=lay), key=lambda x: x[..., :6]), V, "key")
        add(f"Dv-gt-D-{lay}", on(dict(layout=lay), value=lambda x: np.concatenate([x, x], -1),
                                 dy=lambda x: np.concatenate([x, x], -1)), V, "value")
        add(f"dy-last-is-D-not-Dv-{lay}", on(dict(layout=lay, D=8, Dv=4),
                                             dy=lambda x: np.concatenate([x, x], -1)), V, "dy",
            ("grad",))
    for lay in ("BSH", "SBH"):
        add(f"Dv-gt-D-{lay}", on(dict(layout=lay), value=lambda x: np.concatenate([x, x], -1),
                                 dy=lambda x: np.concatenate([x, x], -1)), V, "value")
        add(f"dy-last-wrong-{lay}", on(dict(layout=lay), dy=lambda x: x[..., :-1]), V, "dy",
            ("grad",))

    # ---- dtypes ----
    for bad in (np.float64, np.int32, np.bool_, np.complex64, np.int8):
        nm = np.dtype(bad).name
        add(f"query-dtype-{nm}", on({}, query=lambda x, b=bad: x.astype(b)), T, "query")
    add("key-dtype-ne-query", on({}, key=lambda x: x.astype(np.float16)), T, "key")
    add("value-dtype-ne-query", on({}, value=lambda x: x.astype(BF16)), T, "value")
    add("dy-dtype-ne-query", on({}, dy=lambda x: x.astype(np.float16)), T, "dy", ("grad",))
    add("key-fp8-query-fp32", on({}, key=lambda x: x.astype(E4M3)), T, "key")
    add("all-float64", on({}, query=lambda x: x.astype(np.float64),
                          key=lambda x: x.astype(np.float64),
                          value=lambda x: x.astype(np.float64),
                          dy=lambda x: x.astype(np.float64)), T, "query")

    # ---- non-array arguments ----
    for name in ("query", "key", "value", "dy"):
        where = ("grad",) if name == "dy" else ("fwd", "grad")
        add(f"{name}-list", on({}, **{name: lambda x: x.tolist()}), T, name, where)
        add(f"{name}-none", on({}, **{name: None}), T, name, where)
        add(f"{name}-scalar", on({}, **{name: 1.0}), T, name, where)
    add("atten_mask-list", on({}, atten_mask=[[0]]), T, "atten_mask")
    add("pse-list", on({}, pse=[[0.0]]), T, "pse")
    add("drop_mask-list", on({}, keep_prob=0.5, drop_mask=[255, 255]), T, "drop_mask")

    # ---- softmax statistics and attention_in (grad) ----
    G = ("grad",)
    add("stats-only-max", on({}, softmax_max=_arr((1, 2, 3, 8))), V, "attention_in", G)
    add("stats-only-sum", on({}, softmax_sum=_arr((1, 2, 3, 8))), V, "softmax_max", G)
    add("stats-only-attention_in", on({}, attention_in=_arr((1, 2, 3, 8))), V, "softmax_sum", G)
    add("stats-without-attention_in", on(dict(stats=True), attention_in=None), V,
        "attention_in", G)
    add("stats-without-sum", on(dict(stats=True), softmax_sum=None), V, "softmax_sum", G)
    for name in ("softmax_max", "softmax_sum"):
        for shape in ((1, 2, 3, 4), (1, 2, 4, 8), (1, 2, 3, 8, 1), (2, 3, 8), (1, 1, 3, 8),
                      (2, 1, 3, 8), (1, 2, 3, 2)):
            add(f"{name}-shape-{'x'.join(map(str, shape))}",
                on(dict(stats=True), **{name: _arr(shape)}), V, name, G)
        for dt in (np.float64, np.float16, BF16, np.int32):
            add(f"{name}-dtype-{np.dtype(dt).name}",
                on(dict(stats=True), **{name: lambda x, d=dt: x.astype(d)}), T, name, G)
        add(f"{name}-list", on(dict(stats=True), **{name: lambda x: x.tolist()}), T, name, G)
    add("attention_in-shape-last-D-not-Dv", on(dict(stats=True, D=8, Dv=4),
                                                attention_in=_arr((1, 2, 3, 8))), V,
        "attention_in", G)
    add("attention_in-shape-seq", on(dict(stats=True), attention_in=_arr((1, 2, 4, 8))), V,
        "attention_in", G)
    for dt in (np.float64, np.int32, E4M3):
        add(f"attention_in-dtype-{np.dtype(dt).name}",
            on(dict(stats=True), attention_in=lambda x, d=dt: x.astype(d)), T, "attention_in", G)
    add("attention_in-list", on(dict(stats=True), attention_in=lambda x: x.tolist()), T,
        "attention_in", G)

    # ---- scale_value, keep_prob ----
    for bad in ("0.5", True, None, np.array(0.5), 1j, [0.5]):
        add(f"scale_value-type-{type(bad).__name__}", on({}, scale_value=bad), T, "scale_value")
    for bad in ("0.9", True, None, np.array(0.9), [0.9]):
        add(f"keep_prob-type-{type(bad).__name__}", on({}, keep_prob=bad), T, "keep_prob")
    for bad in (0, 0.0, -0.1, 1.5, 1.0000001, float("nan"), float("inf"), 1e-46, -1e-46):
        add(f"keep_prob-value-{bad!r}", on({}, keep_prob=bad), V, "keep_prob")

    # ---- inner_precise, tokens, sparse_mode ----
    for bad in (3, -1, 100):
        add(f"inner_precise-value{bad}", on({}, inner_precise=bad), V, "inner_precise")
    for bad in (1.0, "0", None, True):
        add(f"inner_precise-type-{type(bad).__name__}", on({}, inner_precise=bad), T,
            "inner_precise")
    for name in ("pre_tokens", "next_tokens"):
        for bad in (1.5, "10", None):
            add(f"{name}-type-{type(bad).__name__}", on({}, **{name: bad}), T, name)
    for bad in (9, -1):
        add(f"sparse_mode-value{bad}", on({}, sparse_mode=bad), V, "sparse_mode")
    add("sparse_mode-type-str", on({}, sparse_mode="0"), T, "sparse_mode")

    # ---- softmax_layout, actual_seq_* outside TND ----
    for lay in LAYOUTS:
        add(f"softmax_layout-TND-with-{lay}", on(dict(layout=lay), softmax_layout="TND"), V,
            "softmax_layout")
    add("softmax_layout-other", on({}, softmax_layout="BNSD"), V, "softmax_layout")
    add("softmax_layout-type-none", on({}, softmax_layout=None), T, "softmax_layout")
    add("softmax_layout-type-int", on({}, softmax_layout=0), T, "softmax_layout")
    for name in ("actual_seq_qlen", "actual_seq_kvlen"):
        for lay in LAYOUTS:
            add(f"{name}-with-{lay}", on(dict(layout=lay), **{name: [3]}), V, name)
        add(f"{name}-empty-list-BNSD", on({}, **{name: []}), V, name)

    # ---- dropout sources ----
    add("keep_prob<1-neither-source", on({}, keep_prob=0.9), V, "drop_mask")
    add("keep_prob<1-both-sources", on({}, keep_prob=0.9, seed=1,
                                       drop_mask=np.full(4, 255, np.uint8)), V, "seed")
    numels = 1 * 2 * 3 * 4                                            # B*N1*S1*S2 of base()
    for dt in (np.bool_, np.int8, np.float32, np.uint16):
        add(f"drop_mask-dtype-{np.dtype(dt).name}",
            on({}, keep_prob=0.9, drop_mask=np.ones(numels, dt)), T, "drop_mask")
    add("drop_mask-too-small", on({}, keep_prob=0.9,
                                  drop_mask=np.full(numels // 8 - 1, 255, np.uint8)), V,
        "drop_mask")
    add("drop_mask-empty", on({}, keep_prob=0.9, drop_mask=np.zeros(0, np.uint8)), V, "drop_mask")
    for bad in (-1, 2 ** 64, -2 ** 63):
        add(f"seed-value{bad}", on({}, keep_prob=0.9, seed=bad), V, "seed")
        add(f"offset-value{bad}", on({}, keep_prob=0.9, seed=1, offset=bad), V, "offset")
    for bad in (1.5, "1", True, np.float64(1)):
        add(f"seed-type-{type(bad).__name__}", on({}, keep_prob=0.9, seed=bad), T, "seed")
        add(f"offset-type-{type(bad).__name__}", on({}, keep_prob=0.9, seed=1, offset=bad), T,
            "offset")

    # ---- out_dtype / d_scale_* for non-fp8 inputs ----
    for dt, bad in ((np.float32, np.float16), (np.float32, "bfloat16"), (np.float32, 0),
                    (np.float32, 1), (np.float16, BF16), (np.float16, 1),
                    (BF16, "float16"), (BF16, 0), (np.float32, np.float64),
                    (np.float32, "float64"), (np.float32, E4M3), (np.float32, 5),
                    (np.float32, -1)):
        add(f"out_dtype-{np.dtype(dt).name}-given-{bad!r}",
            on(dict(dtype=dt), out_dtype=bad), V, "out_dtype")
    for bad in (object(), 1.5):
        add(f"out_dtype-type-{type(bad).__name__}", on({}, out_dtype=bad), T, "out_dtype")
    for name in ("d_scale_q", "d_scale_k", "d_scale_v", "d_scale_dy"):
        where = ("grad",) if name == "d_scale_dy" else ("fwd", "grad")
        for dt in (np.float32, np.float16, BF16):
            add(f"{name}-with-{np.dtype(dt).name}", on(dict(dtype=dt), **{name: 1.0}), V,
                name, where)
        add(f"{name}-array-with-float32", on({}, **{name: np.ones((1, 2, 1, 1), np.float32)}),
            V, name, where)

    # ---- pse / pse_type ----
    for bad in (4, -1, 10):
        add(f"pse_type-value{bad}", on({}, pse_type=bad), V, "pse_type")
    for bad in (0, 2, 3):
        add(f"pse_type{bad}-without-pse", on({}, pse_type=bad), V, "pse_type")
    for bad in ("1", 1.0, None, True):
        add(f"pse_type-type-{type(bad).__name__}", on({}, pse_type=bad), T, "pse_type")
    add("pse-dtype-float64", on({}, pse=np.zeros((1, 2, 3, 4))), T, "pse")
    add("pse-shape", on({}, pse=np.zeros((1, 2, 3, 5), np.float32)), V, "pse")
    add("alibi-slopes-dtype", on({}, pse=np.zeros(2, np.float16), pse_type=2), T, "pse")
    add("alibi-slopes-shape", on({}, pse=np.zeros(3, np.float32), pse_type=3), V, "pse")
    return R


RULES = rules()
CASES = [(r, w) for r in RULES for w in r.where]
PARAMS = [pytest.param(r, w, id=f"{w}-{r.id}",
                       marks=[pytest.mark.xfail(strict=True, reason=r.xfail[w])]
                       if w in r.xfail else [])
          for r, w in CASES]


def _snapshot(args):
    return {k: (v.shape, v.strides, v.dtype, np.ascontiguousarray(v).tobytes())
            for k, v in args.items() if isinstance(v, np.ndarray)}


@pytest.mark.parametrize("rule,which", PARAMS)
def test_rule(rule, which):
    args = rule.make()
    before = _snapshot(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)       # float32 overflow of 1e300 etc.
        with pytest.raises(rule.exc, match=rule.match) as info:
            call(which, args)
    assert isinstance(info.value, FagError)
    assert _snapshot(args) == before, "a failed call modified its inputs"


def test_rule_ids_unique():
    ids = [f"{w}-{r.id}" for r, w in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_error_class_hierarchy():
    assert issubclass(FagValueError, FagError) and issubclass(FagValueError, ValueError)
    assert issubclass(FagTypeError, FagError) and issubclass(FagTypeError, TypeError)
    assert not issubclass(FagValueError, TypeError)
    assert not issubclass(FagTypeError, ValueError)
    assert fag_numba.FagError is FagError


@pytest.mark.parametrize("arg,value,text", [
    ("head_num", 0, "0"), ("inner_precise", 7, "7"), ("pse_type", 5, "5"),
    ("keep_prob", 1.5, "1.5"), ("input_layout", "XYZ", "XYZ"), ("sparse_mode", 11, "11"),
])
def test_message_names_the_value_received(arg, value, text):
    with pytest.raises(FagError, match=arg) as info:
        call("grad", {**base(), arg: value})
    assert text in str(info.value)


# ------------------------------------------------------------------------------------------------
# what must be accepted
# ------------------------------------------------------------------------------------------------

def _equal(a, b):
    for x, y in zip(a, b):
        if x is None:
            assert y is None
        else:
            np.testing.assert_array_equal(np.asarray(x, np.float64), np.asarray(y, np.float64))


@pytest.mark.parametrize("spelling", ["bnsd", "Bnsd", "bNsD", "BNSD"])
def test_input_layout_case_insensitive(spelling):
    a = base(layout="BNSD")
    ref = call("grad", a), call("fwd", a)
    b = {**a, "input_layout": spelling}
    got = call("grad", b), call("fwd", b)
    _equal(ref[0], got[0])
    _equal(ref[1], got[1])


@pytest.mark.parametrize("value", [0, 1, 2, np.int64(2)])
def test_inner_precise_accepted_and_changes_nothing(value):
    a = base(layout="BSH")
    _equal(call("fwd", {**a, "inner_precise": value}), call("fwd", a))
    _equal(call("grad", {**a, "inner_precise": value}), call("grad", a))


@pytest.mark.parametrize("dtype,spelling", [
    (np.float32, None), (np.float32, np.float32), (np.float32, "float32"),
    (np.float32, np.dtype("float32")), (np.float16, "float16"), (np.float16, 0),
    (BF16, "bfloat16"), (BF16, 1), (BF16, ml_dtypes.bfloat16),
])
def test_out_dtype_spellings_of_the_input_dtype(dtype, spelling):
    a = base(dtype=dtype)
    out = call("fwd", {**a, "out_dtype": spelling})
    g = call("grad", {**a, "out_dtype": spelling})
    assert out.attention_out.dtype == np.dtype(dtype)
    assert g.dq.dtype == np.dtype(dtype)
    _equal(out, call("fwd", a))


def test_head_num_numpy_int_and_scale_numpy_float_accepted():
    a = base()
    _equal(call("grad", {**a, "head_num": np.int32(2), "scale_value": np.float32(1)}),
           call("grad", a))


def test_keep_prob_one_ignores_dropout_sources():
    """SPEC §5: keep_prob == 1 -> drop_mask and seed are ignored."""
    a = base()
    ref = call("grad", a)
    _equal(call("grad", {**a, "drop_mask": np.zeros(3, np.uint8)}), ref)
    _equal(call("grad", {**a, "seed": 5, "offset": 7}), ref)


def test_padding_mask_and_softmax_in_are_ignored():
    """SPEC §1 / §9: accepted and not validated (reserved on the NPU too)."""
    a = base(stats=True)
    ref = call("grad", a)
    _equal(call("grad", {**a, "padding_mask": "anything", "softmax_in": object()}), ref)
    _equal(call("fwd", {**a, "padding_mask": np.zeros(3)}), call("fwd", a))


def test_sizes_beyond_npu_limits_are_not_errors():
    """SPEC §2: N <= 256, D <= 512 are NPU limits, not errors here (small S keeps it cheap)."""
    a = base(N1=257, N2=257, S1=1, S2=1, D=1, Dv=1)
    g = call("grad", a)
    assert g.dq.shape == a["query"].shape
    a = base(N1=1, N2=1, S1=2, S2=2, D=513, Dv=513)
    g = call("grad", a)
    assert g.dq.shape == a["query"].shape


@pytest.mark.parametrize("bad", ["int8", "float64", "nonsense", 3, ml_dtypes.float8_e4m3fn,
                                 ("float32", None)])
def test_warmup_rejects_dtypes_it_has_no_kernels_for(bad):
    """``warmup(dtypes=...)`` takes float32, float16 and bfloat16 (dtypes or names), checked
    before anything compiles."""
    with pytest.raises(fag_numba.FagValueError, match="dtypes"):
        fag_numba.warmup(dtypes=bad if isinstance(bad, tuple) else (bad,))
