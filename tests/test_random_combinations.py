"""Random combinations of every feature at once, against the float64 reference.

Each feature has its own test file; this one draws layouts, GQA, head dims, sparse modes (with
their masks, tokens and prefixes), pse types and shapes, and both dropout sources *together*
(hypothesis, derandomized so CI is reproducible), with tiles patched small so EMPTY, FULL and
PARTIAL tiles all occur, and checks the forward and the backward (incl. dpse) against
tests/reference.py.  Interaction bugs (say, the pse offset of a trimmed tile) show up here.
"""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fag_numba
from fag_numba import config

from reference import ref_backward, ref_forward
from tolerances import tolerance
from utils import assert_close, assert_grads_close, make_qkv

CAUSAL = np.triu(np.ones((2048, 2048), bool), 1)
F32 = np.dtype(np.float32)


@st.composite
def problems(draw):
    layout = draw(st.sampled_from(["BSH", "SBH", "BSND", "BNSD"]))
    B = draw(st.integers(1, 2))
    N2 = draw(st.integers(1, 2))
    G = draw(st.integers(1, 3))
    N1 = N2 * G
    S1 = draw(st.integers(1, 23))
    S2 = draw(st.integers(1, 23))
    D = draw(st.integers(1, 12))
    Dv = draw(st.integers(1, D))
    kw = {}
    mode = draw(st.sampled_from([None, 0, 1, 2, 3, 4, 5, 6]))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    if mode is not None:
        kw["sparse_mode"] = mode
        if mode in (0, 1, 5):
            shape = draw(st.sampled_from([(S1, S2), (1, 1, S1, S2), (B, 1, S1, S2),
                                          (B, N1, S1, S2)]))
            kw["atten_mask"] = rng.random(shape) < 0.3
        else:
            kw["atten_mask"] = CAUSAL if mode != 6 else np.concatenate(
                [CAUSAL, np.concatenate([np.zeros((1024, 1024), bool),
                                         np.ones((1024, 1024), bool)], axis=1)])
        if mode in (0, 4):
            kw["pre_tokens"] = draw(st.integers(0, 8))
            kw["next_tokens"] = draw(st.integers(0, 8))
        if mode in (5, 6):
            lo = 0 if S1 > S2 else S2 - S1
            kw["prefix"] = [draw(st.integers(lo, S2)) for _ in range(B)]
    pse_kind = draw(st.sampled_from(["none", "ext0", "ext1", "alibi2", "alibi3"]))
    if pse_kind.startswith("ext"):
        bp = draw(st.sampled_from([1, B]))
        sp = draw(st.sampled_from([1, S1]))
        kw["pse"] = rng.standard_normal((bp, N1, sp, S2)).astype(np.float32)
        kw["pse_type"] = int(pse_kind[-1])
    elif pse_kind.startswith("alibi"):
        kw["pse"] = rng.uniform(0.05, 0.5, N1).astype(np.float32)
        kw["pse_type"] = int(pse_kind[-1])
        kw["q_start_idx"] = draw(st.integers(-3, 3))
        kw["kv_start_idx"] = draw(st.integers(-3, 3))
    drop = draw(st.sampled_from(["none", "seed", "mask"]))
    if drop != "none":
        kw["keep_prob"] = 0.75
        numels = B * N1 * S1 * S2
        if drop == "seed":
            kw["seed"] = draw(st.integers(0, 2**40))
            kw["offset"] = draw(st.integers(0, 2**20))
            bits = fag_numba.dropout_mask(numels, 0.75, kw["seed"], kw["offset"])
        else:
            bits = np.packbits(rng.random(numels) < 0.75, bitorder="little")
            kw["drop_mask"] = bits
        keep = np.unpackbits(bits, bitorder="little")[:numels].astype(bool)
    else:
        keep = None
    blocks = (draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 9)),
              draw(st.integers(1, 9)), draw(st.integers(1, 3)))
    return layout, B, N1, N2, S1, S2, D, Dv, kw, keep, seed, blocks


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problems())
def test_random_feature_combination(p):
    layout, B, N1, N2, S1, S2, D, Dv, kw, keep, seed, (bm, bn, fbm, fbn, split) = p
    old = {k: getattr(config, k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_M_WIDE", "BLOCK_N_WIDE",
                                           "FWD_BLOCK_M", "FWD_BLOCK_N", "SPLIT_TARGET")}
    try:
        config.BLOCK_M = config.BLOCK_M_WIDE = bm
        config.BLOCK_N = config.BLOCK_N_WIDE = bn
        config.FWD_BLOCK_M, config.FWD_BLOCK_N, config.SPLIT_TARGET = fbm, fbn, split
        rng = np.random.default_rng(seed + 1)
        q, k, v, dy = make_qkv(layout, B, N1, N2, S1, S2, D, Dv, np.float32, rng)
        scale = 1.0 / np.sqrt(D)
        fwd = fag_numba.flash_attention_score(q, k, v, N1, layout, scale_value=scale, **kw)
        grads = fag_numba.flash_attention_score_grad(
            q, k, v, dy, N1, layout, scale_value=scale, softmax_max=fwd.softmax_max,
            softmax_sum=fwd.softmax_sum, attention_in=fwd.attention_out, **kw)
    finally:
        for key, value in old.items():
            setattr(config, key, value)
    rkw = {key: val for key, val in kw.items() if key not in ("seed", "offset", "drop_mask")}
    ro, rm, rl = ref_forward(q, k, v, N1, layout, scale_value=scale, keep=keep, **rkw)
    ref = ref_backward(q, k, v, dy, N1, layout, scale_value=scale, keep=keep, **rkw)
    assert_close(fwd.attention_out, ro, tolerance(F32, "fwd"), "attention_out")
    assert_close(fwd.softmax_max, rm, tolerance(F32, "stats"), "softmax_max")
    assert_close(fwd.softmax_sum, rl, tolerance(F32, "stats"), "softmax_sum")
    assert_grads_close(grads, ref, F32, dpse_dtype=F32)
