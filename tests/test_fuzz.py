"""Hypothesis fuzzer over the whole parameter space (issue 13): every call matches the float64
reference or raises the ``FagError`` subclass SPEC §9 names, never another exception, and never
modifies its inputs.

One example draws, together: the layout (BSH, SBH, BSND, BNSD, TND), the dtype (float32,
float16, bfloat16, float8_e4m3fn / e5m2 with scalar or per-block ``d_scale_*`` and an
``out_dtype`` spelling), B, N1, N2 (GQA), S1, S2, D, Dv (empty dimensions included), a sparse
mode with its mask shape, tokens (negative ones too) and prefix, a pse (types 0-3, every shape
SPEC §4 lists, float32 or the query dtype), a dropout source (seed or drop_mask), TND lengths with
empty sequences, trailing zeros and rows past the last offset, NaN/inf placed anywhere in the
inputs and pse (so both in masked and in computed positions), odd array forms (non-contiguous,
negative strides, Fortran order, read-only, misaligned, read-only memmap), the statistics form the
grad receives (the pair, ``softmax_lse``, or none), and the tile sizes (patched small, as
conftest's ``blocks`` does, so EMPTY, FULL and PARTIAL tiles all occur).  About one example in
six is mutated into a call SPEC §9 refuses, with the error class it names.

The generators of the feature tests are reused: ``test_random_combinations.problems`` (non-TND
shapes, masks, tokens, prefixes), ``test_tnd._random_config`` (valid TND lengths and modes) and
``test_fp8.dequant`` (the reference's view of fp8 inputs).  The reference (tests/reference.py)
carries SPEC §3's NaN rules: a masked element contributes exactly 0 even for NaN/inf inputs, and
``assert_close`` matches NaN only with NaN, so a NaN must reach exactly the outputs whose math
uses it.

Profiles: ``test_fuzz_bounded`` runs in the default lane (fixed seed, ``FUZZ_BOUNDED``
examples); ``test_fuzz_long`` (marker ``fuzz``) runs on demand with ``pytest -m fuzz``,
``FAG_FUZZ_EXAMPLES`` examples (default 2000), a fresh random seed each run unless
``FAG_FUZZ_SEED`` is set (hypothesis prints the failing example and its reproduction blob).
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st

import fag_numba
from fag_numba import FagTypeError, FagValueError, config, isa

from reference import ref_backward, ref_forward, tnd_sequences
from test_fp8 import dequant
from test_random_combinations import problems as dense_problems
from test_tnd import _random_config as tnd_config
from tolerances import STATS, tolerance
from utils import assert_close, make_qkv

F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
E4 = np.dtype(ml_dtypes.float8_e4m3fn)
E5 = np.dtype(ml_dtypes.float8_e5m2)
FP8 = (E4, E5)
FUZZ_BOUNDED = 250          # default lane: ~45 s on the loaded 2-core machine, compile included
OUT_SPELLINGS = [(None, F16), ("float16", F16), (0, F16), ("bfloat16", BF16), (1, BF16),
                 (BF16, BF16), (np.float32, F32), ("float32", F32)]
FORMS = ["c", "c", "c", "strided", "negstride", "fortran", "readonly", "misaligned", "memmap"]
_TMP = tempfile.mkdtemp(prefix="fag_fuzz_")          # memmap files, removed at exit
atexit.register(shutil.rmtree, _TMP, True)


# ------------------------------------------------------------------------------------------------
# odd array forms (SPEC §9: any strides, read-only, memmap and misaligned arrays are valid)
# ------------------------------------------------------------------------------------------------

def odd_form(x, form, tag):
    """``x``'s values in another memory form (a new array; ``x`` itself is left alone)."""
    x = np.asarray(x)
    if x.dtype == object:                       # the "object" mutation: refused anyway
        return x
    if form == "c" or x.ndim == 0:
        return np.ascontiguousarray(x)
    if form == "strided":                       # every other element of the last axis
        big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if form == "negstride":                     # a reversed view of a reversed copy
        return np.ascontiguousarray(x[::-1])[::-1]
    if form == "fortran":
        return np.asfortranarray(x)
    if form == "readonly":
        y = np.array(x)
        y.flags.writeable = False
        return y
    if form == "misaligned":                    # data pointer 1 byte past an aligned buffer
        buf = np.zeros(x.nbytes + 1, np.uint8)
        y = buf[1:].view(x.dtype).reshape(x.shape)
        y[...] = x
        return y
    if form == "memmap":
        if x.size == 0:
            return np.array(x)
        path = os.path.join(_TMP, f"{tag}-{os.getpid()}.bin")
        mm = np.memmap(path, dtype=x.dtype, mode="w+", shape=x.shape)
        mm[...] = x
        mm.flush()
        del mm
        return np.memmap(path, dtype=x.dtype, mode="r", shape=x.shape)
    raise AssertionError(form)


def snapshot(arrays):
    return [None if a is None or not isinstance(a, np.ndarray) else
            (a.shape, a.dtype, np.ascontiguousarray(a).tobytes()) for a in arrays]


# ------------------------------------------------------------------------------------------------
# the case generator
# ------------------------------------------------------------------------------------------------

def _token_error(mode, s1, s2, pre, nxt):
    """SPEC §7 token checks (an atten_mask is given) for modes 0 and 4, one sequence."""
    if mode not in (0, 4) or s1 == 0 or s2 == 0:
        return False
    p, n = (pre, nxt) if mode == 0 else (pre + s1 - s2, nxt - s1 + s2)
    return -p > s2 or -n > s1 or p + n < 0


@st.composite
def cases(draw, native=False):
    """(call, expected error class or None); ``call`` is a dict of everything one example runs.

    ``native``: also draw the native tile products (kernels/native.py, forced as
    tests/test_native.py does; the long profile only: their first use compiles ~1 min)."""
    layout = draw(st.sampled_from(["BSH", "SBH", "BSND", "BNSD", "TND"]))
    dtype = draw(st.sampled_from([F32, F32, F16, BF16, E4, E5]))
    case_seed = draw(st.integers(0, 2 ** 31))
    rng = np.random.default_rng(case_seed)
    expect = None
    kw = {}
    if layout == "TND":
        cq, ck, kw = tnd_config(draw(st.integers(0, 10 ** 6)))
        if draw(st.integers(0, 5)) == 0:
            kw = {"sparse_mode": kw["sparse_mode"]}      # no mask: full attention, a warning
        N2 = draw(st.integers(1, 2))
        N1 = N2 * draw(st.integers(1, 3))
        D = draw(st.integers(0, 10))
        Dv = draw(st.integers(0, D))
        seqs = tnd_sequences(cq, ck)
        B = len(seqs)
        extra_q, extra_k = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        S1 = max(cq) + extra_q
        S2 = max(ck) + extra_k
        kw.update(actual_seq_qlen=cq, actual_seq_kvlen=ck)
        if draw(st.booleans()):
            kw["softmax_layout"] = "TND"
        numels = N1 * sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in seqs)
    else:
        # the shapes and mask options of the feature-combination generator (its layout, pse,
        # dropout and tiles are drawn here instead)
        _lay, B, N1, N2, S1, S2, D, Dv, dkw, _keep, _s, _blk = draw(dense_problems())
        kw = {a: b for a, b in dkw.items() if a in ("sparse_mode", "atten_mask", "pre_tokens",
                                                    "next_tokens", "prefix")}
        mode = kw.get("sparse_mode")
        if mode is None and draw(st.integers(0, 7)) == 0:
            # empty dimensions (SPEC §2: no error; the math decides every value)
            which = draw(st.sampled_from(["B", "S1", "S2", "D"]))
            if which == "B":
                B = 0
            elif which == "S1":
                S1 = 0
            elif which == "S2":
                S2 = 0
            elif layout not in ("BSH", "SBH"):
                D = Dv = 0
        if mode in (0, 4) and draw(st.integers(0, 2)) == 0:
            kw["pre_tokens"] = draw(st.integers(-S2 - 2, S1 + 3))
            kw["next_tokens"] = draw(st.integers(-S1 - 2, S2 + 3))
            if _token_error(mode, S1, S2, kw["pre_tokens"], kw["next_tokens"]):
                expect = FagValueError
        numels = B * N1 * S1 * S2
    mode = kw.get("sparse_mode")
    has_mask = kw.get("atten_mask") is not None

    # ---- pse ----------------------------------------------------------------------------------
    pse_kind = draw(st.sampled_from(["none", "none", "ext0", "ext1", "alibi2", "alibi3"]))
    if dtype in FP8:
        pse_dtypes = [F32, F16, BF16]
    else:
        pse_dtypes = [F32, dtype]
    if pse_kind.startswith("ext"):
        if layout == "TND":
            per_key = draw(st.booleans())
            n = S2 * N1 if per_key else N1 * sum((q1 - q0) * (k1 - k0)
                                                 for q0, q1, k0, k1 in tnd_sequences(cq, ck))
            shape = (n,)
        else:
            shape = (draw(st.sampled_from([1, B])), N1, draw(st.sampled_from([1, S1])), S2)
        pdt = draw(st.sampled_from(pse_dtypes))
        kw["pse"] = rng.standard_normal(shape).astype(pdt)
        kw["pse_type"] = int(pse_kind[-1])
        if layout == "TND" and has_mask and mode in (7, 8):
            expect = expect or FagValueError             # SPEC §4.3
    elif pse_kind.startswith("alibi"):
        shape = (N1,) if draw(st.booleans()) else (B, N1)
        kw["pse"] = rng.uniform(0.05, 0.5, shape).astype(np.float32)
        kw["pse_type"] = int(pse_kind[-1])
        if draw(st.booleans()):
            kw["q_start_idx"] = draw(st.integers(-3, 3))
            kw["kv_start_idx"] = draw(st.sampled_from([draw(st.integers(-3, 3)), [2]]))
        if layout == "TND" and has_mask and mode == 7:
            expect = expect or FagValueError             # SPEC §4.3

    # ---- dropout ------------------------------------------------------------------------------
    drop = draw(st.sampled_from(["none", "none", "seed", "mask"]))
    keep = None
    if drop != "none":
        kp = draw(st.sampled_from([0.5, 0.75, 0.9]))
        kw["keep_prob"] = kp
        if drop == "seed":
            kw["seed"] = draw(st.integers(0, 2 ** 64 - 1))
            kw["offset"] = draw(st.integers(0, 2 ** 64 - 1))
            bits = fag_numba.dropout_mask(numels, kp, kw["seed"], kw["offset"])
        else:
            bits = np.packbits(rng.random(numels) < kp, bitorder="little")
            bits = np.concatenate([bits, np.zeros(draw(st.integers(0, 2)), np.uint8)])
            kw["drop_mask"] = bits
        keep = np.unpackbits(bits, bitorder="little")[:numels].astype(bool)

    # ---- tensors, fp8 scales, non-finite values -----------------------------------------------
    gen = np.float32 if dtype in FP8 else dtype
    q, k, v, dy = make_qkv(layout, B, N1, N2, S1, S2, D, Dv, gen, rng)   # TND: S = T
    scales = {}
    if dtype in FP8:
        q, k, v, dy = (x.astype(dtype) for x in (q, k, v, dy))
        for name, n, s in (("d_scale_q", N1, S1), ("d_scale_k", N2, S2), ("d_scale_v", N2, S2),
                           ("d_scale_dy", N1, S1)):
            kind = draw(st.sampled_from(["none", "float", "block"]))
            if kind == "float":
                scales[name] = float(rng.uniform(0.3, 2.0))
            elif kind == "block" and layout != "TND" and B > 0 and s > 0:
                scales[name] = rng.uniform(0.3, 2.0, (B, n, -(-s // 512), 1)).astype(np.float32)
        out_kw, out_dt = draw(st.sampled_from(OUT_SPELLINGS))
        if out_kw is not None:
            kw["out_dtype"] = out_kw
    else:
        out_dt = dtype
        if dtype != F32 and draw(st.integers(0, 3)) == 0:
            kw["out_dtype"], out_dt = "float32", F32
    nonfinite = draw(st.sampled_from(["none", "none", "few", "pse"]))
    if nonfinite != "none":
        targets = [q, k, v, dy] if nonfinite == "few" else [kw.get("pse")]
        for x in targets:
            if x is None or x.size == 0:
                continue
            flat = x.reshape(-1)
            cnt = draw(st.integers(0, 2))
            idx = rng.choice(flat.size, min(cnt, flat.size), replace=False)
            flat[idx] = rng.choice([np.nan, np.inf, -np.inf], idx.size)

    # ---- the statistics form of the grad, tiles, array forms ----------------------------------
    # the grad's statistics: the forward's pair, its lse form, none (internal forward), or
    # the pair with a NaN planted in attention_in (the Dsum of that row is NaN)
    stats = draw(st.sampled_from(["pair", "pair", "lse", "none", "pair_nan_o"]))
    o_nan = draw(st.integers(0, 10 ** 6))
    blocks = (draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 9)),
              draw(st.integers(1, 9)), draw(st.integers(1, 3)))
    forms = {name: draw(st.sampled_from(FORMS))
             for name in ("q", "k", "v", "dy", "pse", "mask", "stats")}

    products = (draw(st.sampled_from(["off", "off", "float32", "bf16", "amx"])) if native
                else "off")
    call = dict(layout=layout, dtype=dtype, out_dt=out_dt, N1=N1, q=q, k=k, v=v, dy=dy, kw=kw,
                keep=keep, scales=scales, stats=stats, o_nan=o_nan, blocks=blocks, forms=forms,
                products=products, D=D, Dv=Dv)

    # ---- one in six: a call SPEC §9 refuses -----------------------------------------------------
    if expect is None and draw(st.integers(0, 5)) == 0:
        expect = draw(st.sampled_from(sorted(MUTATIONS)))
        call["mutation"] = expect
        expect = MUTATIONS[expect](call, rng)
    return call, expect


def _mut_kw(**upd):
    def f(call, rng):
        call["kw"].update(upd)
        return FagValueError
    return f


def _mut_dtype(call, rng):
    call["k"] = call["k"].astype(np.float16 if call["dtype"] != F16 else np.float32)
    return FagTypeError


def _mut_object(call, rng):
    call["q"] = call["q"].astype(object)
    return FagTypeError


def _mut_pse_dtype(call, rng):
    if call["kw"].get("pse") is None:
        # a rank no SPEC §4.1 form has
        call["kw"].update(pse=np.zeros((1, 1, 1, 1, 1), np.float32), pse_type=1)
        return FagValueError
    call["kw"]["pse"] = call["kw"]["pse"].astype(np.float64)
    return FagTypeError


def _mut_mask_dtype(call, rng):
    m = call["kw"].get("atten_mask")
    if m is None:
        call["kw"]["scale_value"] = float("inf")
        return FagValueError
    call["kw"]["atten_mask"] = np.asarray(m).astype(np.float32)
    return FagTypeError


def _mut_head_num(call, rng):
    call["N1"] = call["N1"] + 1 if call["layout"] not in ("BSH", "SBH") else 0
    return FagValueError


def _mut_drop_mask(call, rng):
    kw = call["kw"]
    kw.update(keep_prob=0.5, drop_mask=np.zeros(0, np.uint8), seed=1)   # two sources
    return FagValueError


MUTATIONS = {
    "sparse_mode": _mut_kw(sparse_mode=9),
    "pse_type": _mut_kw(pse_type=4),
    "keep_prob": _mut_kw(keep_prob=0.0),
    "scale": _mut_kw(scale_value=1e40),
    "inner_precise": _mut_kw(inner_precise=3),
    "layout": lambda call, rng: call.update(layout="BXSD") or FagValueError,
    "dtype": _mut_dtype,
    "object": _mut_object,
    "pse_dtype": _mut_pse_dtype,
    "mask_dtype": _mut_mask_dtype,
    "head_num": _mut_head_num,
    "drop_sources": _mut_drop_mask,
}


# ------------------------------------------------------------------------------------------------
# one example
# ------------------------------------------------------------------------------------------------

def run_case(call, expect):
    layout, N1, kw = call["layout"], call["N1"], dict(call["kw"])
    # the mix this run covered (pytest --hypothesis-show-statistics)
    event(f"layout {layout}, dtype {call['dtype'].name}")
    event(f"sparse_mode {kw.get('sparse_mode') if kw.get('atten_mask') is not None else None}")
    event(f"pse_type {kw.get('pse_type') if kw.get('pse') is not None else None}")
    event("dropout " + ("seed" if "seed" in kw else "drop_mask" if "drop_mask" in kw else "none"))
    event("non-finite inputs" if any(
        np.asarray(x).dtype.kind == "f" and not np.isfinite(np.asarray(x, np.float64)).all()
        for x in (call["q"], call["k"], call["v"], call["dy"], kw.get("pse"))
        if x is not None and np.asarray(x).dtype != object) else "finite inputs")
    event(f"expect {expect.__name__ if expect else 'result'} {call.get('mutation', '')}")
    forms = call["forms"]
    q, k, v, dy = (odd_form(call[n], forms[n], n) for n in ("q", "k", "v", "dy"))
    if isinstance(kw.get("pse"), np.ndarray):
        kw["pse"] = odd_form(kw["pse"], forms["pse"], "pse")
    if isinstance(kw.get("atten_mask"), np.ndarray) and kw["atten_mask"].size < 100_000:
        kw["atten_mask"] = odd_form(kw["atten_mask"], forms["mask"], "mask")
    scales = call["scales"]
    fscales = {a: b for a, b in scales.items() if a != "d_scale_dy"}
    inputs = [q, k, v, dy] + list(kw.values()) + list(scales.values())
    before = snapshot(inputs)
    bm, bn, fbm, fbn, split = call["blocks"]
    config.BLOCK_M = config.BLOCK_M_WIDE = bm
    config.BLOCK_N = config.BLOCK_N_WIDE = bn
    config.FWD_BLOCK_M, config.FWD_BLOCK_N, config.SPLIT_TARGET = fbm, fbn, split
    config.FWD_BLOCK_M_AMX, config.FWD_BLOCK_N_AMX = fbm, fbn
    # "off": the default kinds; else NATIVE="all" with that BF16_PRODUCTS (isa.py decides
    # whether the CPU allows it; non-finite inputs still take the BLAS drivers)
    off = call["products"] == "off"
    config.NATIVE = config.DEFAULTS["NATIVE"] if off else "all"
    config.BF16_PRODUCTS = config.DEFAULTS["BF16_PRODUCTS"] if off else call["products"]
    event(f"products {call['products']}")
    event(f"grad statistics {call['stats']}")

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", UserWarning)      # sparse_mode 2..8 without a mask
        if expect is not None:
            with pytest.raises(expect):
                fag_numba.flash_attention_score(q, k, v, N1, layout, **fscales, **kw)
            with pytest.raises(expect):
                fag_numba.flash_attention_score_grad(q, k, v, dy, N1, layout, **scales, **kw)
            assert snapshot(inputs) == before, "inputs modified"
            return
        fo = fag_numba.flash_attention_score(q, k, v, N1, layout, **fscales, **kw)
        o_in = fo.attention_out
        if call["stats"] == "pair_nan_o" and o_in.size:
            o_in = o_in.copy()
            o_in.reshape(-1)[call["o_nan"] % o_in.size] = np.nan
        sf = forms["stats"]
        if call["stats"] in ("pair", "pair_nan_o"):
            st_kw = dict(softmax_max=odd_form(fo.softmax_max, sf, "m"),
                         softmax_sum=odd_form(fo.softmax_sum, sf, "l"),
                         attention_in=odd_form(o_in, sf, "o"))
        elif call["stats"] == "lse":
            lse = fag_numba.softmax_lse(fo.softmax_max, fo.softmax_sum)
            st_kw = dict(softmax_lse=odd_form(lse, sf, "lse"), attention_in=odd_form(o_in, sf, "o"))
        else:
            st_kw = {}
        stats_before = snapshot(list(st_kw.values()))
        g = fag_numba.flash_attention_score_grad(q, k, v, dy, N1, layout, **scales, **st_kw,
                                                 **kw)
        assert snapshot(inputs) == before, "inputs modified"
        assert snapshot(list(st_kw.values())) == stats_before, "statistics modified"

        # the reference on the values fag_numba saw (fp8 dequantised)
        n2 = None
        rq, rk, rv, rdy = (np.asarray(x) for x in (call["q"], call["k"], call["v"], call["dy"]))
        if call["dtype"] in FP8:
            if layout == "TND":
                n2 = rk.shape[1]
            elif layout in ("BSH", "SBH"):
                n2 = rk.shape[-1] // (rq.shape[-1] // N1)
            else:
                n2 = rk.shape[1 if layout == "BNSD" else 2]
            rq = dequant(rq, scales.get("d_scale_q"), layout, N1)
            rk = dequant(rk, scales.get("d_scale_k"), layout, n2)
            rv = dequant(rv, scales.get("d_scale_v"), layout, n2)
            rdy = dequant(rdy, scales.get("d_scale_dy"), layout, N1)
        rkw = {a: b for a, b in call["kw"].items()
               if a not in ("seed", "offset", "drop_mask", "out_dtype")}
        ro, rm, rl = ref_forward(rq, rk, rv, N1, layout, keep=call["keep"], **rkw)
        if st_kw:
            rst = dict(softmax_max=fo.softmax_max, softmax_sum=fo.softmax_sum,
                       attention_in=o_in)
        else:
            rst = {}
        rdq, rdk, rdv, rdpse = ref_backward(rq, rk, rv, rdy, N1, layout, keep=call["keep"],
                                            **rst, **rkw)
    out_dt = call["out_dt"]
    tol_dt = out_dt
    bf16_products = (call["dtype"] == BF16
                     and isa.native_kind(True, call["D"], call["Dv"]) in ("bf16", "amx"))
    if bf16_products:
        # the bf16 products round P and dS to bf16 (SPEC §3 allows it for bf16 inputs): the
        # bf16 tolerance, also for out_dtype=float32 (seen with products "bf16"; "auto" takes
        # them on CPUs with AVX512_BF16 and without AMX, and the amx kind on CPUs with AMX)
        tol_dt = BF16
    assert fo.attention_out.dtype == out_dt and fo.attention_out.shape == ro.shape
    assert fo.softmax_max.dtype == F32 and fo.softmax_sum.dtype == F32
    assert_close(fo.attention_out, ro, tolerance(tol_dt, "fwd"), "attention_out")
    assert_close(fo.softmax_max, rm, STATS, "softmax_max")
    assert_close(fo.softmax_sum, rl, STATS, "softmax_sum")
    tb = tolerance(tol_dt, "bwd")
    for x, ref, like, name in ((g.dq, rdq, q, "dq"), (g.dk, rdk, k, "dk"), (g.dv, rdv, v, "dv")):
        assert x.dtype == out_dt and x.shape == like.shape, name
        assert x.flags.c_contiguous, name
        assert_close(x, ref, tb, name)
    if rdpse is None:
        assert g.dpse is None
    else:
        assert g.dpse.shape == rdpse.shape
        assert_close(g.dpse, rdpse, tolerance(BF16 if bf16_products else g.dpse.dtype, "dpse"),
                     "dpse")


_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


@settings(max_examples=FUZZ_BOUNDED, deadline=None, derandomize=True, database=None,
          suppress_health_check=_HEALTH)
@given(cases())
def test_fuzz_bounded(c):
    run_case(*c)


_LONG = int(os.environ.get("FAG_FUZZ_EXAMPLES", "2000"))
_LONG_SEED = os.environ.get("FAG_FUZZ_SEED")


@pytest.fixture
def _long_selected(request):
    expr = request.config.getoption("-m") or ""
    if "fuzz" not in expr or "not fuzz" in expr:
        pytest.skip("the long fuzz profile runs with `pytest -m fuzz` (FAG_FUZZ_EXAMPLES)")


@pytest.mark.fuzz
@settings(max_examples=_LONG, deadline=None, database=None, print_blob=True,
          suppress_health_check=_HEALTH + [HealthCheck.function_scoped_fixture])
@given(cases(native=True))
def test_fuzz_long(_long_selected, c):
    run_case(*c)


if _LONG_SEED is not None:
    test_fuzz_long = seed(int(_LONG_SEED))(test_fuzz_long)
