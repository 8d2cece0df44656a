"""Determinism (SPEC §9b): bitwise identical results across repeated calls and across thread
counts (``fag_numba.threads(1)`` vs all of numba's threads), for the forward and the backward,
with the backward unsplit (``SPLIT_TARGET = 1``) and split over S2 (``SPLIT_TARGET > 1`` with
``B * N2 == 1``, so dq is a sum of partials), with GQA, and with the statistics given or computed
internally.  Tiles are patched small so that every call has many work items to distribute.
"""
from __future__ import annotations

import itertools

import ml_dtypes
import numba
import numpy as np
import pytest

import fag_numba
from fag_numba import config, planning

from utils import make_id, make_qkv

BF16 = np.dtype(ml_dtypes.bfloat16)
ALL_THREADS = numba.config.NUMBA_NUM_THREADS


def _bits(arrays):
    """Raw bytes of every array (None stays None): bitwise comparison, NaN-safe, -0 != +0."""
    return [None if a is None else (a.shape, a.dtype.str, np.ascontiguousarray(a).tobytes())
            for a in arrays]


def _run(q, k, v, dy, n1, layout, stats):
    out = fag_numba.flash_attention_score(q, k, v, n1, layout, scale_value=0.17)
    kw = {}
    if stats:
        kw = dict(softmax_max=out.softmax_max, softmax_sum=out.softmax_sum,
                  attention_in=out.attention_out)
    g = fag_numba.flash_attention_score_grad(q, k, v, dy, n1, layout, scale_value=0.17, **kw)
    return _bits(tuple(out) + tuple(g))


def det_cases():
    """(layout, dtype, B, N1, N2, S1, S2, split, stats): unsplit / split x MHA / GQA / MQA."""
    out = []
    shapes = (  # B, N1, N2, S1, S2
        (1, 1, 1, 67, 129),     # one kv head: the split case (B*N2 == 1)
        (1, 4, 1, 45, 77),      # MQA, B*N2 == 1
        (2, 4, 2, 33, 50),      # GQA, B*N2 == 4
    )
    for (layout, dtype), shape, split, stats in itertools.product(
            (("BNSD", np.dtype(np.float32)), ("BSH", BF16), ("SBH", np.dtype(np.float16))),
            shapes, (1, 4), (False, True)):
        out.append((layout, dtype) + shape + (split, stats))
    return out


DET_CASES = det_cases()


def _ids(cases):
    return [make_id(layout=c[0], dtype=c[1], gqa=c[3] // c[4], split=c[7], stats=c[8], b=c[2],
                    n1=c[3], n2=c[4], s1=c[5], s2=c[6]) for c in cases]


@pytest.mark.parametrize("layout,dtype,B,N1,N2,S1,S2,split,stats", DET_CASES, ids=_ids(DET_CASES))
def test_bitwise_identical_across_calls_and_thread_counts(layout, dtype, B, N1, N2, S1, S2, split,
                                                          stats, blocks):
    blocks(bm=4, bn=8, fbm=5, fbn=7, split=split)
    rng = np.random.default_rng(S1 * 1000 + S2)
    q, k, v, dy = make_qkv(layout, B, N1, N2, S1, S2, 24, 20, dtype, rng)

    # the split count really is what this case is about
    nkb = -(-S2 // config.BLOCK_N)
    nsplit = planning.split_count(B, N2, nkb)
    assert (nsplit > 1) == (split > 1 and B * N2 < split), nsplit

    first = _run(q, k, v, dy, N1, layout, stats)
    assert _run(q, k, v, dy, N1, layout, stats) == first, "repeated call differs"
    with fag_numba.threads(1):
        assert numba.get_num_threads() == 1
        one = _run(q, k, v, dy, N1, layout, stats)
    with fag_numba.threads(ALL_THREADS):
        assert numba.get_num_threads() == ALL_THREADS
        many = _run(q, k, v, dy, N1, layout, stats)
    names = ("attention_out", "softmax_max", "softmax_sum", "dq", "dk", "dv", "dpse")
    for name, a, b, c in zip(names, first, one, many):
        assert a == b, f"{name}: 1 thread differs from the default thread count"
        assert a == c, f"{name}: {ALL_THREADS} threads differ from the default thread count"


def test_split_and_unsplit_backward_thread_sweep(blocks):
    """Every thread count from 1 to the maximum gives the same bits, split and unsplit, with
    default-sized tiles on a shape that needs several of them."""
    rng = np.random.default_rng(3)
    q, k, v, dy = make_qkv("BSND", 1, 2, 1, 150, 400, 64, 64, np.float32, rng)
    for split in (1, config.DEFAULTS["SPLIT_TARGET"]):
        blocks(bm=config.DEFAULTS["BLOCK_M"], bn=config.DEFAULTS["BLOCK_N"],
               fbm=config.DEFAULTS["FWD_BLOCK_M"], fbn=config.DEFAULTS["FWD_BLOCK_N"],
               split=split)
        results = []
        for n in range(1, ALL_THREADS + 1):
            with fag_numba.threads(n):
                results.append(_run(q, k, v, dy, 2, "BSND", stats=False))
        assert all(r == results[0] for r in results[1:]), f"split={split}"


def test_threads_context_manager_restores_count():
    before = numba.get_num_threads()
    with fag_numba.threads(1):
        assert numba.get_num_threads() == 1
    assert numba.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with fag_numba.threads(1):
            raise RuntimeError("boom")
    assert numba.get_num_threads() == before


@pytest.mark.parametrize("n,exc", [(0, fag_numba.FagValueError),
                                   (ALL_THREADS + 1, fag_numba.FagValueError),
                                   (-1, fag_numba.FagValueError),
                                   (1.0, fag_numba.FagTypeError), ("1", fag_numba.FagTypeError),
                                   (True, fag_numba.FagTypeError)])
def test_threads_rejects_bad_counts_and_keeps_the_current_one(n, exc):
    before = numba.get_num_threads()
    with pytest.raises(exc, match="n must"):
        with fag_numba.threads(n):
            pass                                                  # pragma: no cover
    with pytest.raises(exc):
        fag_numba.set_num_threads(n)
    assert numba.get_num_threads() == before


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["none", "causal", "dense", "nonfinite"])
def test_plain_kernels_give_the_bits_of_the_full_ones(dtype, mode, blocks, monkeypatch):
    """A call without pse or dropout runs the plain chunk kernels (``driver.plain``: their pse
    and dropout code pruned, for the cold compile); forcing the full kernels on the same call
    gives the same bits, masks, the careful (non-finite) path and the bf16 kinds included."""
    from fag_numba.kernels import driver, native
    blocks()
    rng = np.random.default_rng(11)
    q, k, v, dy = make_qkv("BNSD", 1, 2, 2, 37, 53, 16, 16, dtype, rng)
    kw = {}
    if mode == "causal":
        kw = dict(atten_mask=np.triu(np.ones((2048, 2048), bool), 1), sparse_mode=3)
    elif mode == "dense":
        kw = dict(atten_mask=rng.random((37, 53)) < 0.3, sparse_mode=0)
    elif mode == "nonfinite":
        k = k.copy()
        k[0, 1, 5, 3] = np.inf
        dy = dy.copy()
        dy[0, 0, 7, 2] = np.nan

    def run():
        out = fag_numba.flash_attention_score(q, k, v, 2, "BNSD", scale_value=0.3, **kw)
        g = fag_numba.flash_attention_score_grad(
            q, k, v, dy, 2, "BNSD", scale_value=0.3, softmax_max=out.softmax_max,
            softmax_sum=out.softmax_sum, attention_in=out.attention_out, **kw)
        return _bits(tuple(out) + tuple(g))

    real, seen = driver.plain, []

    def spy(name, gp):
        seen.append(real(name, gp))
        return seen[-1]

    for mod in (driver, native):
        monkeypatch.setattr(mod, "plain", spy)
    plain = run()
    assert seen and all(seen), seen        # the plain kernels did run (both passes)
    for mod in (driver, native):
        monkeypatch.setattr(mod, "plain", lambda name, gp: False)
    full = run()
    names = ("attention_out", "softmax_max", "softmax_sum", "dq", "dk", "dv", "dpse")
    for name, a, b in zip(names, plain, full):
        assert a == b, f"{name}: the plain kernels differ from the full ones"

