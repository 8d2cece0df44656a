"""Small calls (per-call overhead): the serial rule of ``planning.chunk_count`` and the caches
that skip per-call work.

1. ``chunk_count``: one chunk at or below ``config.SERIAL_WORK_FWD`` / ``_BWD`` (work
   ``N1 * sum_b S1_b * S2_b * (D + Dv)``), every thread above, the thread count when no width
   is given or only one thread runs.
2. The calls use it (a spy on ``chunk_count``) and their results are bitwise those of the same
   calls chunked over every thread (SPEC §9b), for fp32 and bf16, with and without the
   compressed causal mask, BNSD / BSND / TND, forward and backward.
"""
from __future__ import annotations

import ml_dtypes
import numba
import numpy as np
import pytest

import fag_numba
from fag_numba import config, masks, planning
from fag_numba.kernels import desc

BF16 = np.dtype(ml_dtypes.bfloat16)
NT = numba.config.NUMBA_NUM_THREADS


def _seqtab(s1, s2):
    st = np.zeros((len(s1), desc.NSEQ), np.int64)
    st[:, desc.S1] = s1
    st[:, desc.S2] = s2
    return st


def test_chunk_count_rule(monkeypatch):
    st = _seqtab([3, 5], [7, 2])                  # sum S1_b * S2_b = 21 + 10 = 31
    work = 4 * 31 * 24                            # N1 = 4, D + Dv = 24
    with fag_numba.threads(NT):
        assert planning.chunk_count(st, 4, 24, work) == 1
        assert planning.chunk_count(st, 4, 24, work - 1) == NT
        assert planning.chunk_count(st, 4, None, 10**30) == NT
        assert planning.chunk_count(_seqtab([], []), 4, 24, 0) == 1 or NT == 1
    with fag_numba.threads(1):
        assert planning.chunk_count(st, 4, 24, 0) == 1
    # huge shapes: no int64 overflow sends them to one chunk
    big = _seqtab([2**40], [2**40])
    with fag_numba.threads(NT):
        assert planning.chunk_count(big, 1, 128, config.DEFAULTS["SERIAL_WORK_FWD"]) == NT


def _case(layout, dtype, rng):
    b, n, s, d = (2, 2, 40, 16) if layout == "TND" else (1, 2, 48, 16)
    shape = {"BNSD": (b, n, s, d), "BSND": (b, s, n, d), "TND": (b * s, n, d)}[layout]
    q, k, v, dy = (rng.standard_normal(shape).astype(np.float32).astype(dtype) for _ in range(4))
    kw = dict(scale_value=0.25)
    if layout == "TND":
        kw.update(actual_seq_qlen=[s, 2 * s], actual_seq_kvlen=[s, 2 * s])
    return (q, k, v, dy, n, layout), kw


def _bits(res):
    return [None if a is None else np.ascontiguousarray(a).tobytes() for a in res]


def _calls(args, kw):
    q, k, v, dy, n, layout = args
    fwd = fag_numba.flash_attention_score(q, k, v, n, layout, **kw)
    g = fag_numba.flash_attention_score_grad(q, k, v, dy, n, layout, softmax_max=fwd.softmax_max,
                                             softmax_sum=fwd.softmax_sum,
                                             attention_in=fwd.attention_out, **kw)
    g2 = fag_numba.flash_attention_score_grad(q, k, v, dy, n, layout, **kw)   # internal forward
    return _bits(tuple(fwd) + tuple(g) + tuple(g2))


@pytest.mark.skipif(NT < 2, reason="needs 2 numba threads")
@pytest.mark.parametrize("layout", ["BNSD", "BSND", "TND"])
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_small_calls_serial_and_bitwise_as_chunked(layout, dtype, causal, monkeypatch, blocks):
    blocks()                                      # many items: the chunked run really splits
    rng = np.random.default_rng(11)
    args, kw = _case(layout, dtype, rng)
    if causal:
        kw.update(sparse_mode=3, atten_mask=np.triu(np.ones((2048, 2048), bool), 1))
    seen = []
    real = planning.chunk_count
    monkeypatch.setattr(planning, "chunk_count", lambda *a: seen.append(real(*a)) or seen[-1])
    with fag_numba.threads(NT):
        chunked = _calls(args, kw)                # conftest: limits 0, every thread
        assert seen and set(seen) == {NT}
        seen.clear()
        monkeypatch.setattr(config, "SERIAL_WORK_FWD", config.DEFAULTS["SERIAL_WORK_FWD"])
        monkeypatch.setattr(config, "SERIAL_WORK_BWD", config.DEFAULTS["SERIAL_WORK_BWD"])
        serial = _calls(args, kw)
    assert seen and set(seen) == {1}              # every plan of these calls: one chunk
    assert serial == chunked


def _random_seqtab(rng, nb):
    st = _seqtab(rng.integers(0, 300, nb), rng.integers(0, 300, nb))
    st[:, desc.LO] = np.where(rng.random(nb) < 0.5, -config.BAND_INF, -rng.integers(0, 50, nb))
    st[:, desc.HI] = np.where(rng.random(nb) < 0.5, config.BAND_INF, rng.integers(0, 50, nb))
    st[:, desc.PREFIX] = np.where(rng.random(nb) < 0.2, rng.integers(0, 40, nb), 0)
    return st


def _uncached(monkeypatch):
    monkeypatch.setattr(config, "PLAN_CACHE_SEQS", -1)


@pytest.mark.parametrize("nt", sorted({1, NT}))
def test_plan_cache_returns_the_uncached_plans(nt, monkeypatch):
    """planning's plan cache: the same plans as computed afresh for random band/prefix tables,
    block sizes, GQA and merge_b, at 1 and every thread; fresh arrays on every hit (writing one
    does not reach the next call); a different band column or thread count is a different
    plan."""
    rng = np.random.default_rng(5)
    planning._plans.clear()
    cases = []
    for _ in range(30):
        st = _random_seqtab(rng, int(rng.integers(1, 6)))
        cases.append((st, int(rng.integers(1, 4)), int(rng.integers(1, 3)),
                      int(rng.integers(4, 40)), int(rng.integers(4, 40)), bool(rng.random() < .3)))
    with fag_numba.threads(nt):
        for st, n2, g, bm, bn, merge_b in cases:
            got = [planning.plan_forward(st, n2 * g, bm, bn, 32),
                   planning.plan_backward(st, n2, g, bm, bn, merge_b, 32)]
            again = [planning.plan_forward(st, n2 * g, bm, bn, 32),      # hits
                     planning.plan_backward(st, n2, g, bm, bn, merge_b, 32)]
            with monkeypatch.context() as m:
                _uncached(m)
                want = [planning.plan_forward(st, n2 * g, bm, bn, 32),
                        planning.plan_backward(st, n2, g, bm, bn, merge_b, 32)]
            for a, b, c in zip(got, again, want):
                for x, y, z in zip(a, b, c):
                    np.testing.assert_array_equal(x, z)
                    np.testing.assert_array_equal(y, z)
                    if isinstance(x, np.ndarray):
                        assert x is not y and x.flags.writeable
        st, n2, g, bm, bn, merge_b = cases[0]
        items, tptr = planning.plan_forward(st, n2 * g, bm, bn, 32)
        items[:] = -1
        tptr[:] = -1
        items2, tptr2 = planning.plan_forward(st, n2 * g, bm, bn, 32)
        assert items2.min() >= 0 and tptr2[-1] == items2.shape[0]
        st2 = st.copy()
        st2[0, desc.HI] = 0 if st[0, desc.HI] != 0 else 1        # another band: another plan
        with monkeypatch.context() as m:
            _uncached(m)
            want2 = planning.plan_forward(st2, n2 * g, bm, bn, 32)
        got2 = planning.plan_forward(st2, n2 * g, bm, bn, 32)
        np.testing.assert_array_equal(got2[0], want2[0])
    if NT > 1:
        st = _seqtab([40, 30], [40, 50])
        with fag_numba.threads(NT):
            a = planning.plan_forward(st, 4, 8, 8, 32)
        with fag_numba.threads(1):
            b = planning.plan_forward(st, 4, 8, 8, 32)
        assert a[1].size == NT + 1 and b[1].size == 2


def test_plan_cache_keeps_only_small_plans(monkeypatch):
    """Plans of more than config.PLAN_CACHE_ITEMS items are not kept (bounded memory)."""
    planning._plans.clear()
    st = _seqtab([64, 64], [64, 64])
    monkeypatch.setattr(config, "PLAN_CACHE_ITEMS", 3)
    items, _ = planning.plan_forward(st, 2, 8, 8, 32)            # 2 * 2 * 8 = 32 items
    assert items.shape[0] > 3 and not planning._plans
    monkeypatch.setattr(config, "PLAN_CACHE_ITEMS", 10**6)
    planning.plan_forward(st, 2, 8, 8, 32)
    assert len(planning._plans) == 1
