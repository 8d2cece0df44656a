"""Issue 13 probes as regression tests: refusals before allocation, error classes, merge NaN,
exact zeros for masked garbage (NaN/inf), invalid rows only by the mask.

Every test here is a minimal reproduction of a probe that once failed (the issue's numbering in
the comments).  Huge shapes are numpy broadcast views (no memory), so the refusals are checked
for real: a conversion or allocation would die in numpy's MemoryError instead.
"""
import sys

import numba
import numpy as np
import pytest

import fag_numba
from fag_numba import FagError, FagMemoryError, FagTypeError, FagValueError, memory

fwd = fag_numba.flash_attention_score
grad = fag_numba.flash_attention_score_grad


def _big(shape):
    return np.broadcast_to(np.zeros((1,) * len(shape), np.float32), shape)


def _small(shape=(1, 1, 4, 8), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- 3. refusals before allocation ------------------------------------------------------------

def test_error_class_hierarchy():
    assert issubclass(FagMemoryError, FagError) and issubclass(FagMemoryError, MemoryError)
    assert "FagMemoryError" in fag_numba.__all__


def test_wrong_pse_shape_of_a_huge_view_is_a_value_error_not_memory():
    q = _small()
    huge = np.broadcast_to(np.float32(0), (10000, 10000, 512, 512))
    with pytest.raises(FagValueError, match="pse"):
        fwd(q, q, q, 1, "BNSD", pse=huge)
    with pytest.raises(FagValueError, match="pse"):
        grad(q, q, q, q, 1, "BNSD", pse=huge)


def test_wrong_stats_shape_is_found_before_a_huge_mask_is_converted():
    # a non-contiguous full mask needs a copy; the stats shape error must come first
    q = _small((1, 1, 4, 8))
    mask = np.broadcast_to(np.zeros((1, 1, 1, 4), bool), (1, 1, 4, 4))
    f = fwd(q, q, q, 1, "BNSD")
    with pytest.raises(FagValueError, match="softmax_max"):
        grad(q, q, q, q, 1, "BNSD", atten_mask=mask, sparse_mode=1,
             softmax_max=f.softmax_max[..., :2], softmax_sum=f.softmax_sum,
             attention_in=f.attention_out)


@pytest.mark.parametrize("case", ["fwd", "grad", "s1_1_s2_2e31"])
def test_calls_that_cannot_fit_raise_fag_memory_error(case):
    big = _big((1, 1, 2 ** 31, 128))
    with pytest.raises(FagMemoryError, match=r"GiB|TiB") as e:
        if case == "fwd":
            fwd(big, big, big, 1, "BNSD")
        elif case == "grad":
            grad(big, big, big, big, 1, "BNSD")
        else:
            fwd(_small((1, 1, 1, 128)), big, big, 1, "BNSD")
    assert isinstance(e.value, MemoryError) and "bytes" in str(e.value)


def test_dropout_mask_too_large_raises_before_allocating():
    with pytest.raises(FagMemoryError, match="numels"):
        fag_numba.dropout_mask(2 ** 40, 0.5, 1)


def test_empty_tensor_with_a_huge_batch_refuses_its_tables():
    e = _big((2 ** 33, 1, 0, 8))
    with pytest.raises(FagMemoryError, match="B=8589934592"):
        fwd(e, e, e, 1, "BNSD")


def test_memory_check_uses_available_memory(monkeypatch):
    # a call that normally runs is refused when the available memory is (pretended) tiny
    from fag_numba import config
    q = _small((1, 2, 64, 16))
    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
    fwd(q, q, q, 2, "BNSD")              # below MEMCHECK_MIN_BYTES: not checked at all
    monkeypatch.setattr(config, "MEMCHECK_MIN_BYTES", 0)
    with pytest.raises(FagMemoryError, match="available"):
        fwd(q, q, q, 2, "BNSD")
    monkeypatch.setattr(memory, "available_bytes", lambda: None)      # unknown: no check
    fwd(q, q, q, 2, "BNSD")


@pytest.mark.parametrize("shape", [1, 5, (3, 7), 1 << 20])
def test_zeros64_is_zeros_on_a_cache_line(shape):
    """The result buffers the kernels accumulate in start on a 64-byte line (numpy's large
    arrays start 16 bytes past one), are zero, C-contiguous and writable."""
    z = memory.zeros64(shape)
    assert z.ctypes.data % 64 == 0
    assert z.shape == np.zeros(shape).shape and z.dtype == np.float32
    assert z.flags.c_contiguous and z.flags.writeable and not z.any()


def _poisoned(shape, dtype=np.float32):
    """``memory.empty64`` filled with a NaN pattern: what a reused heap buffer may hold."""
    x = memory.zeros64(shape, dtype)
    x.view(np.uint8)[:] = 0xFF
    return x


def _full_write_case(case, dtype, seed):
    """(q, k, v, dy, layout, N1, kwargs) of a ``*_written_in_full`` case: masks with invalid
    rows, a band, TND (with rows past the last offsets), BSH with GQA, S2 splits (with
    ``blocks(split=3)``), pse + dropout (dpse summed over the batch)."""
    import ml_dtypes
    dt = ml_dtypes.bfloat16 if dtype == "bf16" else np.float32
    rng = np.random.default_rng(seed)
    kw, lay, n1 = {}, "BNSD", 2
    shape_q = shape_k = (2, 2, 37, 16)
    if case == "causal-invalid-rows":
        kw = dict(atten_mask=np.triu(np.ones((2048, 2048), bool), 1), sparse_mode=4,
                  pre_tokens=10, next_tokens=-5)       # rows 0-4 see no key: invalid
    elif case == "band":
        kw = dict(atten_mask=np.triu(np.ones((2048, 2048), bool), 1), sparse_mode=4,
                  pre_tokens=7, next_tokens=3)
    elif case.startswith("tnd"):
        lay, extra = "TND", 4 if case == "tnd-extra-rows" else 0
        kw = dict(actual_seq_qlen=[11, 30], actual_seq_kvlen=[13, 29])
        shape_q, shape_k = (30 + extra, 2, 16), (29 + extra, 2, 16)
    elif case == "bsh-gqa":
        lay, n1 = "BSH", 4
        shape_q, shape_k = (2, 37, 64), (2, 37, 32)
    elif case == "splits":
        shape_q, shape_k = (1, 2, 37, 16), (1, 2, 41, 16)
    elif case == "pse-dropout":
        kw = dict(pse=rng.standard_normal((1, 2, 37, 37)).astype(np.float32), keep_prob=0.8,
                  seed=3)
    q = rng.standard_normal(shape_q, dtype=np.float32).astype(dt)
    k, v = (rng.standard_normal(shape_k, dtype=np.float32).astype(dt) for _ in range(2))
    dy = rng.standard_normal(q.shape, dtype=np.float32).astype(dt)     # (Dv = D here)
    return q, k, v, dy, lay, n1, kw


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("case", ["dense", "causal-invalid-rows", "band", "tnd", "tnd-extra-rows",
                                  "bsh-gqa"])
def test_forward_output_is_written_in_full(case, dtype, blocks, monkeypatch):
    """attention_out skips its zero fill (``memory.empty64``) when the sequences' rows are the
    whole output: every element must then be written by the kernels (invalid rows as 0). With
    the buffer poisoned, results equal the default allocation's bitwise; rows past the
    sequences (TND's beyond the last offset) still get the zero fill."""
    blocks()
    q, k, v, _, lay, n1, kw = _full_write_case(case, dtype, 12)
    want = fag_numba.flash_attention_score(q, k, v, n1, lay, **kw)
    calls = []
    monkeypatch.setattr(memory, "empty64", lambda *a: calls.append(a) or _poisoned(*a))
    got = fag_numba.flash_attention_score(q, k, v, n1, lay, **kw)
    for a, e in zip(got, want):
        assert a.tobytes() == e.tobytes()
    assert len(calls) == (0 if case == "tnd-extra-rows" else 1)
    if case == "tnd-extra-rows":
        assert not np.asarray(got.attention_out, np.float32)[30:].any()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("case", ["dense", "causal-invalid-rows", "band", "tnd", "tnd-extra-rows",
                                  "bsh-gqa", "splits", "pse-dropout"])
def test_backward_gradients_are_written_in_full(case, dtype, blocks, monkeypatch):
    """dq, dk, dv (and the dq partials of S2 splits) skip their zero fill (``memory.empty64``)
    when the sequences' rows are the whole arrays: every backward kernel zeroes the rows its
    items own (``driver._zero_owned``) before accumulating.  With the buffers poisoned (NaN
    bits), the gradients equal the default allocation's bitwise, on the BLAS driver (fp32) and
    the bf16 kinds; TND rows past the last offset keep the zero fill."""
    blocks(bm=4, bn=6, split=3 if case == "splits" else None)
    q, k, v, dy, lay, n1, kw = _full_write_case(case, dtype, 13)
    f = fag_numba.flash_attention_score(q, k, v, n1, lay, **kw)
    gkw = dict(kw, softmax_max=f.softmax_max, softmax_sum=f.softmax_sum,
               attention_in=f.attention_out)
    want = fag_numba.flash_attention_score_grad(q, k, v, dy, n1, lay, **gkw)
    calls = []
    monkeypatch.setattr(memory, "empty64", lambda *a: calls.append(a) or _poisoned(*a))
    got = fag_numba.flash_attention_score_grad(q, k, v, dy, n1, lay, **gkw)
    for a, e in zip(got, want):
        assert (a is None) == (e is None)
        if a is not None:
            assert a.tobytes() == e.tobytes()
    f32 = [a for a in calls if len(a) == 1 or a[1] == np.float32]     # dq, dk, dv, partials
    assert len(f32) == (0 if case == "tnd-extra-rows" else 4)
    if case == "tnd-extra-rows":
        assert not np.asarray(got.dq, np.float32)[30:].any()
        assert not np.asarray(got.dk, np.float32)[29:].any()


def test_results_start_on_a_cache_line():
    rng = np.random.default_rng(0)
    q, k, v, dy = (rng.standard_normal((1, 2, 300, 64), dtype=np.float32) for _ in range(4))
    out = fag_numba.flash_attention_score(q, k, v, 2, "BNSD")
    g = fag_numba.flash_attention_score_grad(
        q, k, v, dy, 2, "BNSD", softmax_max=out.softmax_max, softmax_sum=out.softmax_sum,
        attention_in=out.attention_out)
    for x in (out.attention_out, *g[:3]):
        assert x.ctypes.data % 64 == 0


_CHURN = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.mallopt(-3, 64 << 10)           # M_MMAP_THRESHOLD: blocks >= 64 KB mapped afresh
libc.mallopt(-1, 64 << 10)           # M_TRIM_THRESHOLD
import ml_dtypes, numpy as np
import fag_numba
rng = np.random.default_rng(0)
q, k, v, dy = (rng.standard_normal((1, 4, 1024, 64), dtype=np.float32)
               .astype(ml_dtypes.bfloat16) for _ in range(4))
out = fag_numba.flash_attention_score(q, k, v, 4, "BNSD")
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fag_numba.flash_attention_score_grad(q, k, v, dy, 4, "BNSD", softmax_max=out.softmax_max,
        softmax_sum=out.softmax_sum, attention_in=out.attention_out)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults(); faults()
print(min(faults(), faults(), faults()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="a (1,4,1024,64) call as plain Python")
def test_keep_freed_memory_stops_page_faults_per_call():
    """When glibc maps and unmaps each call's MB-sized buffers afresh (seen once torch had run
    after fag_numba's first calls: ~1000 page faults per bf16 backward of this shape, ~4000
    and 2x the time at (1,8,2048,128); forced here by low fixed thresholds, since what
    triggers glibc depends on the heap's history), ``memory.keep_freed_memory`` (the
    default) keeps them in the heap.  Fresh processes: mallopt cannot be undone within one."""
    import os
    import subprocess
    got = {}
    for tune in ("0", "1"):
        env = dict(os.environ, FAG_NUMBA_MALLOC_TUNE=tune)
        res = subprocess.run([sys.executable, "-c", _CHURN], env=env, capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        got[tune] = int(res.stdout.split()[-1])
    assert got["0"] > 200, got          # the churn is there to remove (4 x 256 KB + 512 KB)
    assert got["1"] < got["0"] // 10, got


def test_keep_freed_memory_opt_out(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_state", {"done": False, "set": False})
    monkeypatch.setattr(fag_numba.config, "MALLOC_TUNE", False)
    assert memory.keep_freed_memory() is False
    assert memory.keep_freed_memory() is False     # decided once per process


def test_available_bytes_is_positive_here():
    a = memory.available_bytes()
    assert a is None or a > 0


# ---- 4. error classes ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw,cls,name", [
    (dict(q_start_idx=2 ** 63), FagValueError, "q_start_idx"),
    (dict(kv_start_idx=-2 ** 63 - 1), FagValueError, "kv_start_idx"),
    (dict(q_start_idx=[]), FagValueError, "q_start_idx"),
    (dict(kv_start_idx=np.array([], np.int64)), FagValueError, "kv_start_idx"),
])
def test_start_index_errors(kw, cls, name):
    q = _small()
    with pytest.raises(cls, match=name):
        fwd(q, q, q, 1, "BNSD", pse=np.ones(1, np.float32), pse_type=2, **kw)


@pytest.mark.parametrize("seq", [[], (), np.array([]), np.array([], np.int64)])
def test_empty_varlen_sequence_is_a_value_error(seq):
    q = _small((4, 1, 8))
    with pytest.raises(FagValueError, match="actual_seq_qlen"):
        fwd(q, q, q, 1, "TND", actual_seq_qlen=seq, actual_seq_kvlen=[4])


def test_empty_prefix_is_a_value_error():
    q = _small((1, 1, 4, 8))
    mask = np.zeros((4, 4), bool)
    with pytest.raises(FagValueError, match="prefix"):
        fwd(q, q, q, 1, "BNSD", atten_mask=mask, sparse_mode=5, prefix=[])


def test_merge_rejects_string_attention_out():
    q = _small()
    f = fwd(q, q, q, 1, "BNSD")
    bad = fag_numba.FlashAttentionOutput(np.full(f.attention_out.shape, "x"), f.softmax_max,
                                         f.softmax_sum)
    with pytest.raises(FagTypeError, match="attention_out"):
        fag_numba.merge_attention_outputs([bad], 1, "BNSD")


@pytest.mark.parametrize("which", ["query", "key", "value", "dy", "atten_mask", "pse",
                                   "softmax_max", "attention_in"])
def test_masked_array_with_masked_entries_is_a_type_error(which):
    q = _small()
    f = fwd(q, q, q, 1, "BNSD")
    args = dict(query=q, key=q, value=q, dy=q)
    kw = dict(softmax_max=f.softmax_max, softmax_sum=f.softmax_sum, attention_in=f.attention_out)
    pick = {"atten_mask": np.zeros((4, 4), bool), "pse": np.zeros((1, 1, 4, 4), np.float32)}
    base = args.get(which, kw.get(which, pick.get(which)))
    m = np.ma.masked_array(base, mask=np.zeros(base.shape, bool))
    m.mask.flat[0] = True
    if which in args:
        args[which] = m
    else:
        kw[which] = m
        if which == "atten_mask":
            kw["sparse_mode"] = 1
    with pytest.raises(FagTypeError, match=which):
        grad(args["query"], args["key"], args["value"], args["dy"], 1, "BNSD", **kw)


def test_masked_array_without_masked_entries_is_its_data():
    q = _small()
    a = fwd(np.ma.masked_array(q), q, q, 1, "BNSD")
    b = fwd(q, q, q, 1, "BNSD")
    assert type(a.attention_out) is np.ndarray
    np.testing.assert_array_equal(a.attention_out, b.attention_out)


@pytest.mark.parametrize("scale", [1e40, -1e39, float("inf"), float("nan"), 10 ** 400],
                         ids=["1e40", "-1e39", "inf", "nan", "10**400"])
def test_scale_must_be_finite_in_float32(scale):
    q = _small()
    with pytest.raises(FagValueError, match="scale_value"):
        fwd(q, q, q, 1, "BNSD", scale_value=scale)


def test_object_array_is_a_type_error():
    q = _small()
    with pytest.raises(FagTypeError, match="query"):
        fwd(q.astype(object), q, q, 1, "BNSD")


# ---- 2. merge: NaN propagates, only -FLT_MAX marks an invalid row ------------------------------

def test_merge_propagates_nan_statistics():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 6, 8)).astype(np.float32) for _ in range(3))
    v = v.copy()
    v[0, 1, 5, :] = np.nan       # key 5 of head 1 is in the second chunk only
    k = k.copy()
    k[0, 0, 1, 0] = np.nan       # scores of key 1, head 0: NaN softmax_max in the first chunk
    with np.errstate(all="ignore"):
        full = fwd(q, k, v, 2, "BNSD")
        parts = [fwd(q, k[:, :, a:b], v[:, :, a:b], 2, "BNSD") for a, b in ((0, 3), (3, 6))]
        merged = fag_numba.merge_attention_outputs(parts, 2, "BNSD")
    assert np.isnan(parts[0].softmax_max[0, 0]).all()
    np.testing.assert_array_equal(np.isnan(merged.attention_out), np.isnan(full.attention_out))
    np.testing.assert_array_equal(np.isnan(merged.softmax_max), np.isnan(full.softmax_max))
    assert np.isnan(merged.attention_out[0, 0]).all() and np.isnan(merged.attention_out[0, 1]).all()


def test_softmax_lse_path_reads_mask_pse_and_drop_mask():
    # the lse form of the grad goes through the same conversions as the (m, l) form
    rng = np.random.default_rng(5)
    q, k, v, dy = (rng.standard_normal((1, 2, 6, 8)).astype(np.float32) for _ in range(4))
    mask = np.broadcast_to(np.triu(np.ones((6, 6), bool), 1), (1, 1, 6, 6))   # strided view
    pse = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)[..., ::-1]      # non-contiguous
    drop = fag_numba.dropout_mask(2 * 36, 0.8, 7)
    kw = dict(atten_mask=mask, sparse_mode=1, pse=pse, keep_prob=0.8, drop_mask=drop)
    f = fwd(q, k, v, 2, "BNSD", **kw)
    a = grad(q, k, v, dy, 2, "BNSD", softmax_max=f.softmax_max, softmax_sum=f.softmax_sum,
             attention_in=f.attention_out, **kw)
    b = grad(q, k, v, dy, 2, "BNSD", softmax_lse=fag_numba.softmax_lse(f.softmax_max,
                                                                        f.softmax_sum),
             attention_in=f.attention_out, **kw)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


# ---- 1. NaN/inf at masked positions contribute exactly 0; 7. only the mask invalidates a row ---

from reference import ref_backward, ref_forward  # noqa: E402
from tolerances import tolerance  # noqa: E402
from utils import assert_close, assert_grads_close  # noqa: E402

F32 = np.dtype(np.float32)
CAUSAL = np.triu(np.ones((2048, 2048), bool), 1)


def _check_vs_reference(q, k, v, dy, n1, layout, keep=None, **kw):
    """Forward and grad (given the forward's statistics) vs the reference: NaN exactly where
    the reference has NaN, values within tolerance elsewhere."""
    with np.errstate(all="ignore"):
        f = fwd(q, k, v, n1, layout, **kw)
        g = grad(q, k, v, dy, n1, layout, softmax_max=f.softmax_max, softmax_sum=f.softmax_sum,
                 attention_in=f.attention_out, **kw)
        rkw = {a: b for a, b in kw.items() if a not in ("seed", "offset", "drop_mask")}
        ro, rm, rl = ref_forward(q, k, v, n1, layout, keep=keep, **rkw)
        rg = ref_backward(q, k, v, dy, n1, layout, keep=keep, softmax_max=f.softmax_max,
                          softmax_sum=f.softmax_sum, attention_in=f.attention_out, **rkw)
    assert_close(f.attention_out, ro, tolerance(F32, "fwd"), "attention_out")
    assert_close(f.softmax_max, rm, tolerance(F32, "stats"), "softmax_max")
    assert_close(f.softmax_sum, rl, tolerance(F32, "stats"), "softmax_sum")
    assert_grads_close(g, rg, F32, dpse_dtype=F32)
    return f, g


def _qkv(shape_q, shape_k, seed=0, dv=None):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(shape_q).astype(np.float32)
    k = rng.standard_normal(shape_k).astype(np.float32)
    vs = shape_k if dv is None else shape_k[:-1] + (dv,)
    v = rng.standard_normal(vs).astype(np.float32)
    dy = rng.standard_normal(shape_q[:-1] + (vs[-1],)).astype(np.float32)
    return q, k, v, dy


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_in_a_key_masked_for_every_query_stays_out(bad, blocks):
    blocks(bm=4, bn=8, fbm=5, fbn=7)
    q, k, v, dy = _qkv((1, 1, 32, 8), (1, 1, 32, 8))
    v[0, 0, 3] = bad
    k[0, 0, 3, 1] = bad
    mask = np.zeros((32, 32), bool)
    mask[:, 3] = True
    f, g = _check_vs_reference(q, k, v, dy, 1, "BNSD", atten_mask=mask, sparse_mode=1)
    assert np.isfinite(f.attention_out).all()
    assert all(np.isfinite(x).all() for x in g[:3])


def test_padding_garbage_stays_in_the_padding(blocks):
    # keys >= 5 of batch 0 are padding filled with garbage (NaN, inf, huge), masked by a
    # [B,1,S1,S2] padding mask: batch 0 stays finite
    blocks(bm=4, bn=8, fbm=5, fbn=7)
    q, k, v, dy = _qkv((2, 2, 12, 8), (2, 2, 12, 8), seed=1)
    for x in (k, v):
        x[0, :, 5:] = np.nan
        x[0, :, 7, 0] = np.inf
        x[0, :, 9, :] = 3e38
    mask = np.zeros((2, 1, 12, 12), bool)
    mask[0, :, :, 5:] = True
    f, g = _check_vs_reference(q, k, v, dy, 2, "BNSD", atten_mask=mask, sparse_mode=1)
    assert np.isfinite(f.attention_out).all() and np.isfinite(g.dq).all()
    assert np.isfinite(g.dk[0, :, :5]).all() and np.isfinite(g.dv[0, :, :5]).all()


def test_causal_nan_in_dy_row_0_reaches_key_0_only(blocks):
    blocks(bm=4, bn=8, fbm=5, fbn=7)
    q, k, v, dy = _qkv((1, 1, 20, 8), (1, 1, 20, 8), seed=2)
    dy[0, 0, 0, 0] = np.nan
    f, g = _check_vs_reference(q, k, v, dy, 1, "BNSD", atten_mask=CAUSAL, sparse_mode=2)
    assert np.isnan(g.dk[0, 0]).any(axis=1).nonzero()[0].tolist() == [0]
    assert np.isnan(g.dv[0, 0]).any(axis=1).nonzero()[0].tolist() == [0]
    assert np.isnan(g.dq[0, 0]).any(axis=1).nonzero()[0].tolist() == [0]


def test_mode3_nan_in_last_value_row_reaches_last_query_row_only():
    # default tiles: the old leak followed the 384-row forward tile grid (rows 384..511)
    q, k, v, dy = _qkv((1, 1, 512, 16), (1, 1, 512, 16), seed=3)
    v[0, 0, 511] = np.nan
    with np.errstate(all="ignore"):
        f = fwd(q, k, v, 1, "BNSD", atten_mask=CAUSAL, sparse_mode=3)
        g = grad(q, k, v, dy, 1, "BNSD", atten_mask=CAUSAL, sparse_mode=3,
                 softmax_max=f.softmax_max, softmax_sum=f.softmax_sum,
                 attention_in=f.attention_out)
    assert np.isnan(f.attention_out[0, 0]).any(axis=1).nonzero()[0].tolist() == [511]
    assert np.isnan(g.dq[0, 0]).any(axis=1).nonzero()[0].tolist() == [511]
    # dv[511] = P[511, 511] dy[511] is finite; dsum[511] = dy[511] . O[511] is NaN, so dk is
    # NaN wherever row 511 attends (every key): the math, checked against the reference
    assert np.isfinite(g.dv).all()
    _check_vs_reference(q, k, v, dy, 1, "BNSD", atten_mask=CAUSAL, sparse_mode=3)


@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND", "TND"])
def test_nonfinite_masked_rows_every_layout(layout, blocks):
    blocks(bm=3, bn=5, fbm=4, fbn=3)
    B, N1, N2, S, D = 2, 4, 2, 9, 6
    rng = np.random.default_rng(4)
    from utils import make_qkv
    kw = {}
    if layout == "TND":
        kw = dict(actual_seq_qlen=[S, 2 * S], actual_seq_kvlen=[S, 2 * S])
    q, k, v, dy = make_qkv(layout, B, N1, N2, S, S, D, D, np.float32, rng, **kw)
    for x in (q, k, v, dy):
        flat = x.reshape(-1)
        flat[rng.choice(flat.size, 3, replace=False)] = rng.choice([np.nan, np.inf, -np.inf], 3)
    _check_vs_reference(q, k, v, dy, N1, layout, atten_mask=CAUSAL, sparse_mode=3, **kw)


def test_nonfinite_attention_in_of_invalid_rows_gives_zero_grads(blocks):
    blocks(bm=4, bn=8, fbm=5, fbn=7)
    q, k, v, dy = _qkv((1, 1, 8, 8), (1, 1, 8, 8), seed=6)
    mask = np.zeros((8, 8), bool)
    mask[2] = True                       # row 2 is invalid
    f = fwd(q, k, v, 1, "BNSD", atten_mask=mask, sparse_mode=1)
    o = f.attention_out.copy()
    o[0, 0, 2] = np.nan
    with np.errstate(all="ignore"):
        g = grad(q, k, v, dy, 1, "BNSD", atten_mask=mask, sparse_mode=1,
                 softmax_max=f.softmax_max, softmax_sum=f.softmax_sum, attention_in=o)
    assert all(np.isfinite(x).all() for x in g[:3])
    assert (g.dq[0, 0, 2] == 0).all()


def test_dropped_elements_are_exactly_zero_even_for_a_nan_row(blocks):
    # Pd = R ? P / keep : 0 is a select: a NaN query row reaches dv only through kept elements
    blocks(bm=4, bn=8, fbm=5, fbn=7)
    q, k, v, dy = _qkv((1, 1, 6, 8), (1, 1, 10, 8), seed=7)
    q[0, 0, 1, 0] = np.nan
    numels = 60
    keep = np.random.default_rng(8).random(numels) < 0.5
    keep[6 + 0] = True
    drop = np.packbits(keep, bitorder="little")
    _, g = _check_vs_reference(q, k, v, dy, 1, "BNSD", keep=keep.reshape(1, 1, 6, 10),
                               keep_prob=0.5, drop_mask=drop)
    assert (np.isnan(g.dv[0, 0]).any(axis=1) == keep.reshape(6, 10)[1]).all()


def test_minus_inf_query_row_is_nan_not_invalid():
    q = np.ones((1, 1, 2, 4), np.float32)
    q[0, 0, 0] = -np.inf
    k = np.ones((1, 1, 3, 4), np.float32)
    with np.errstate(all="ignore"):
        f = fwd(q, k, k, 1, "BNSD")
    assert np.isnan(f.attention_out[0, 0, 0]).all()
    assert f.softmax_max[0, 0, 0, 0] == -np.inf and np.isnan(f.softmax_sum[0, 0, 0, 0])
    np.testing.assert_allclose(f.attention_out[0, 0, 1], 1.0)
    _check_vs_reference(q, k, k, q, 1, "BNSD")


def test_all_minus_inf_pse_row_is_nan_but_a_masked_row_is_invalid():
    q, k, v, dy = _qkv((1, 1, 3, 4), (1, 1, 5, 4), seed=9)
    pse = np.zeros((1, 1, 3, 5), np.float32)
    pse[0, 0, 1] = -np.inf                 # additive "mask" in pse: the math gives NaN
    mask = np.zeros((3, 5), bool)
    mask[2] = True                         # the mask: an invalid row (zeros, -FLT_MAX/+FLT_MAX)
    f, g = _check_vs_reference(q, k, v, dy, 1, "BNSD", pse=pse, atten_mask=mask, sparse_mode=1)
    assert np.isnan(f.attention_out[0, 0, 1]).all()
    assert (f.attention_out[0, 0, 2] == 0).all() and f.softmax_max[0, 0, 2, 0] < -3e38


# ---- 5, 6. threads and fork (one subprocess; numba's omp layer loaded, hard timeout) ----------

@pytest.mark.parametrize("with_torch", [False, True])
def test_threads_and_fork_in_a_subprocess(with_torch):
    """Without torch the chunks run on Python threads (nothing fork-unsafe); with torch the
    main thread's run on torch's OpenMP team, which fag_numba releases before each fork, so the
    children compute fag_numba's and torch's results instead of hanging in libgomp."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    if with_torch:
        pytest.importorskip("torch")
        if numba.config.DISABLE_JIT:
            pytest.skip("the OpenMP runner needs compiled (nogil) kernels")
    worker = Path(__file__).with_name("reliability_threads_worker.py")
    env = dict(os.environ, NUMBA_THREADING_LAYER="omp",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("FAG_NUMBA_CHUNK_RUNNER", None)
    r = subprocess.run([sys.executable, str(worker)] + (["torch"] if with_torch else []),
                       env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout
    assert r.returncode == 0, (out, r.stderr[-2000:])
    assert "errs []" in out                        # 4 concurrent threads, results bitwise equal
    if with_torch:
        assert "early fork child exit 3" in out    # torch's team only, then a fork
        assert "openmp used True" in out
    # a forked child computes the parent's result
    assert "fork child exit 3" in out
    assert "pool ok True" in out and "ppe ok True" in out   # no hang, same results
    assert "parent after forks ok True" in out


# ---- found by tests/test_fuzz.py ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["k_inf", "q_nan", "pse_minus_inf", "k_inf_v_inf"])
def test_nan_row_whose_computed_elements_are_all_dropped_gives_zero_out(kind, blocks):
    # fuzz find: a row whose l is NaN (an inf key, a NaN query, an all -inf pse row) has NaN P
    # for every computed element, so O = Pd @ V is NaN iff one is kept; dropout that removes
    # them all gives exactly 0 (Pd = R ? P / keep : 0), not the NaN of acc / l
    blocks(bm=1, bn=1, fbm=1, fbn=1)
    q, k, v, dy = _qkv((1, 1, 3, 2), (1, 1, 4, 2), seed=11)
    kw = {}
    if kind.startswith("k_inf"):
        k[0, 0, 1] = np.inf                # every row attends key 1 (full attention)
        if kind == "k_inf_v_inf":
            v[0, 0, 1, 0] = np.inf         # a dropped P still meets V: 0 * inf = NaN there
    elif kind == "q_nan":
        q[0, 0, 1, 0] = np.nan
    else:
        pse = np.zeros((1, 1, 3, 4), np.float32)
        pse[0, 0, 1] = -np.inf
        kw = dict(pse=pse)
    keep = np.ones((1, 1, 3, 4), bool)
    keep[0, 0, 1] = False                  # row 1: every element dropped
    drop = np.packbits(keep.reshape(-1), bitorder="little")
    f, _ = _check_vs_reference(q, k, v, dy, 1, "BNSD", keep=keep, keep_prob=0.5,
                               drop_mask=drop, **kw)
    if kind == "k_inf_v_inf":
        assert np.isnan(f.attention_out[0, 0, 1, 0]) and f.attention_out[0, 0, 1, 1] == 0
    else:
        assert (f.attention_out[0, 0, 1] == 0).all()
