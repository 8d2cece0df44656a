"""Native tile products (kernels/native.py): each path forced, against the float64 reference.

Paths: "amx" (AMX tiles, P and dS rounded to bf16, SPEC §3), "bf16" (AVX512_BF16 dot products,
P and dS rounded to bf16), "f32" (float32 FMA micro-kernel), "blas" (the OpenBLAS driver).  Every test records which path really ran, so
none can pass on a silent fallback.  Determinism across 1 and 2 threads (SPEC §9b), the
non-finite fallback, and the CPU-feature guard (a target without AVX512_BF16 must never compile
the bf16 kernels: LLVM would abort the process) are checked too.
"""
from __future__ import annotations

import ml_dtypes
import numba
import numpy as np
import pytest

import fag_numba
from fag_numba import api, config, isa

from reference import ref_backward, ref_forward
from tolerances import tolerance
from utils import assert_close, make_qkv, unpack_drop_mask

BF16 = np.dtype(ml_dtypes.bfloat16)
HAS_BF16 = isa.target_has("avx512bf16", "avx512f", "avx512bw", "fma")
HAS_F32 = isa.target_has("avx512f", "avx512bw", "fma")
HAS_AMX = HAS_BF16 and isa.amx_available()
# (NATIVE, BF16_PRODUCTS) that select each path
PATHS = {"amx": ("all", "amx"), "bf16": ("all", "bf16"), "f32": ("all", "float32"),
         "blas": ("off", "auto")}


@pytest.fixture
def path(monkeypatch):
    """``path(name)`` forces a product path; returns the list of kinds the backward used."""
    used = []
    orig = api._native_inputs

    def spy(*a, **kw):
        res = orig(*a, **kw)
        used.append(res[0] or "blas")
        return res

    def force(name):
        if name == "bf16" and not HAS_BF16:
            pytest.skip("numba's target has no AVX512_BF16")
        if name == "amx" and not HAS_AMX:
            pytest.skip("no AMX tiles (CPU, numba's target or the OS permission)")
        if name == "f32" and not HAS_F32:
            pytest.skip("numba's target has no AVX-512")
        monkeypatch.setattr(config, "NATIVE", PATHS[name][0])
        monkeypatch.setattr(config, "BF16_PRODUCTS", PATHS[name][1])
        monkeypatch.setattr(api, "_native_inputs", spy)
        return used
    return force


CASES = [  # layout, B, N1, N2, S1, S2, D, kwargs
    ("BNSD", 1, 2, 2, 37, 45, 16, {}),
    ("BSH", 2, 4, 2, 29, 51, 8, dict(sparse_mode=3, atten_mask="causal")),
    ("BSND", 1, 2, 1, 40, 33, 12, dict(sparse_mode=4, pre_tokens=7, next_tokens=3,
                                        atten_mask="causal")),
    ("BNSD", 1, 2, 2, 31, 31, 10, dict(keep_prob=0.8, seed=5, pse_type=2,
                                        pse="alibi", sparse_mode=2, atten_mask="causal")),
    ("TND", 2, 2, 2, 0, 0, 14, dict(actual_seq_qlen=[17, 40], actual_seq_kvlen=[23, 41])),
]


def _ref_kwargs(kw, numels):
    """The reference's options: a seed becomes the explicit keep bits it generates."""
    ref_kw = dict(kw)
    if "seed" in ref_kw:
        bits = fag_numba.dropout_mask(numels, kw["keep_prob"], ref_kw.pop("seed"))
        ref_kw["keep"] = unpack_drop_mask(bits, numels)
    return ref_kw


def _kwargs(kw, n1):
    kw = dict(kw)
    if kw.get("atten_mask") == "causal":
        kw["atten_mask"] = np.triu(np.ones((2048, 2048), bool), 1)
    if kw.get("pse") == "alibi":
        kw["pse"] = (0.5 ** np.arange(1, n1 + 1)).astype(np.float32)
    return kw


@pytest.mark.parametrize("name", ["amx", "bf16", "f32", "blas"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32)], ids=["bf16", "fp32"])
def test_paths_match_reference(name, case, dtype, path, blocks, rng):
    if name in ("amx", "bf16") and dtype != BF16:
        pytest.skip("the bf16 products only serve bfloat16 inputs")
    used = path(name)
    blocks(bm=6, bn=10)           # even (bf16 pairs) and small: many tiles, trimmed edges
    lay, B, N1, N2, S1, S2, D, kw = case
    kw = _kwargs(kw, N1)
    q, k, v, dy = make_qkv(lay, B, N1, N2, S1, S2, D, D, dtype, rng,
                           kw.get("actual_seq_qlen"), kw.get("actual_seq_kvlen"))
    out = fag_numba.flash_attention_score(q, k, v, N1, lay, scale_value=0.3, **kw)
    g = fag_numba.flash_attention_score_grad(
        q, k, v, dy, N1, lay, scale_value=0.3, softmax_max=out.softmax_max,
        softmax_sum=out.softmax_sum, attention_in=out.attention_out, **kw)
    assert used == [name, name]                   # forward, backward
    ref_kw = _ref_kwargs(kw, B * N1 * S1 * S2)
    r = ref_backward(q, k, v, dy, N1, lay, softmax_max=out.softmax_max,
                     softmax_sum=out.softmax_sum, attention_in=out.attention_out,
                     scale_value=0.3, **ref_kw)
    ro, rm, rl = ref_forward(q, k, v, N1, lay, scale_value=0.3, **ref_kw)
    assert_close(out.attention_out, ro, tolerance(dtype, "fwd"), "attention_out")
    assert_close(out.softmax_max, rm, tolerance(np.float32, "stats"), "softmax_max")
    assert_close(out.softmax_sum, rl, tolerance(np.float32, "stats"), "softmax_sum")
    tb = tolerance(dtype, "bwd")
    for a, e, nm in zip(g[:3], r[:3], ("dq", "dk", "dv")):
        assert_close(a, e, tb, nm)
    if g.dpse is not None:
        assert_close(g.dpse, r[3], tolerance(np.float32, "dpse"), "dpse")


def _fused_case(case, rng):
    """(layout, N1, q, k, v, dy, kwargs, zero pse) of a CASES entry in bf16: a zero pse of type 1
    ((X + 0) * scale: the same scaled scores) forces the unfused passes of the bf16 kinds."""
    lay, B, N1, N2, S1, S2, D, kw = case
    q, k, v, dy = make_qkv(lay, B, N1, N2, S1, S2, D, D, BF16, rng)
    kw = dict(_kwargs(kw, N1), scale_value=0.3)
    return lay, N1, q, k, v, dy, kw, np.zeros((B, N1, S1, S2), np.float32)


@pytest.mark.parametrize("name", ["amx", "bf16"])
@pytest.mark.parametrize("case", CASES[:3], ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES[:3])])
def test_fused_forward_softmax_bitwise_equals_three_passes(name, case, path, blocks, rng):
    """Without dropout/pse the bf16 kinds' forward scales, exponentiates and converts P to
    bf16 in one pass (online_softmax's to16); a zero pse of type 1 ((X + 0) * scale: the same
    scores) takes the three passes.  Outputs and statistics must be bitwise equal."""
    used = path(name)
    blocks(bm=6, bn=10)
    lay, N1, q, k, v, _, kw, zero = _fused_case(case, rng)
    fused = fag_numba.flash_attention_score(q, k, v, N1, lay, **kw)
    passes = fag_numba.flash_attention_score(q, k, v, N1, lay, pse=zero, pse_type=1, **kw)
    assert used == [name, name]
    for a, e in zip(fused, passes):
        assert a.tobytes() == e.tobytes()


@pytest.mark.skipif(not HAS_BF16, reason="numba's target has no AVX512_BF16")
def test_fused_softmax_nan_scores_give_the_nan_maximum():
    """online_softmax16's row maximum skips NaN scores (one vmaxps per 16 scores) and redoes a
    row whose exp sum comes out NaN with m = NaN.  Its m, l, rescaled acc and bf16 P equal
    online_softmax's (NaN-propagating maximum) on the scaled scores, NaN payloads aside (which
    NaN a maximum propagates is not specified): NaN in the first or a later key block, a row
    of NaN only, a NaN after an all -inf block (correction 0), and rows without NaN (bitwise)."""
    from fag_numba.kernels import desc, driver, native
    rng = np.random.default_rng(9)
    tm, n, dv, alpha = 6, 37, 8, np.float32(0.3)
    blocks = [rng.standard_normal((tm, n)).astype(np.float32) * 4 for _ in range(3)]
    blocks[0][1, 5] = np.nan            # NaN in the first block
    blocks[1][3, 30] = np.nan           # in a later block
    blocks[0][2, :] = np.nan            # a row of NaN only
    blocks[0][4, :] = -np.inf           # all -inf, then a NaN: correction 0
    blocks[1][4, 2] = np.nan
    blocks[2][5, :7] = -np.inf          # no NaN: bitwise as before
    gp = np.zeros(64, np.int64)
    seqtab = np.zeros((1, 64), np.int64)
    mask = np.zeros(1, np.uint8)

    def run(fused):
        mrun = np.full(tm, -np.inf, np.float32)
        lrun = np.zeros(tm, np.float32)
        vrow = np.zeros(tm, np.uint8)
        acc = np.ones(tm * dv, np.float32)
        sub, cor, mold = (np.empty(tm, np.float32) for _ in range(3))
        ldp = 2 * ((n + 1) // 2)
        ps = []
        for blk in blocks:
            p16 = np.zeros(tm * ldp, np.uint16)
            if fused:
                driver.online_softmax16(blk.reshape(-1).copy(), tm, n, 0, desc.FULL, mrun, lrun, vrow, acc,
                                        dv, sub, cor, mold, seqtab, gp, mask, 0, 0, 0, 0, alpha,
                                        p16, ldp)
            else:
                z = (blk * alpha).astype(np.float32).reshape(-1)
                driver.online_softmax(z, tm, n, 0, desc.FULL, mrun, lrun, vrow, acc, dv, sub,
                                      cor, mold, seqtab, gp, mask, 0, 0, 0, 0, np.float32(1.0),
                                      p16, 0)
                native.to_bf16_rows(z, tm, n, n, p16, ldp)
            ps.append(p16.reshape(tm, ldp)[:, :n].view(BF16).astype(np.float32))
        return [mrun, lrun, acc] + ps

    for a, e, nm in zip(run(True), run(False), ("m", "l", "acc", "p0", "p1", "p2")):
        assert np.array_equal(a, e, equal_nan=True), nm
        ok = ~np.isnan(a)
        assert a[ok].tobytes() == e[ok].tobytes(), nm
    m = run(True)[0]
    assert np.isnan(m[1:5]).all() and not np.isnan(m[0]) and not np.isnan(m[5])


@pytest.mark.parametrize("name", ["amx", "bf16"])
@pytest.mark.parametrize("case", CASES[:3], ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES[:3])])
def test_fused_backward_step_bitwise_equals_six_passes(name, case, path, blocks, rng):
    """Without dropout/pse/dpse the bf16 kinds' backward fuses P, dS and their bf16 operands
    into one pass (amx.pds_pairs, native.pds_panels); a zero pse of type 1 ((X + 0) * scale:
    the same scaled scores) takes the unfused passes instead.  dq, dk, dv must be bitwise
    equal."""
    used = path(name)
    blocks(bm=6, bn=10)
    lay, N1, q, k, v, dy, kw, zero = _fused_case(case, rng)
    out = fag_numba.flash_attention_score(q, k, v, N1, lay, **kw)
    stats = dict(softmax_max=out.softmax_max, softmax_sum=out.softmax_sum,
                 attention_in=out.attention_out, **kw)
    fused = fag_numba.flash_attention_score_grad(q, k, v, dy, N1, lay, **stats)
    passes = fag_numba.flash_attention_score_grad(q, k, v, dy, N1, lay, pse=zero, pse_type=1,
                                                  **stats)
    assert used == [name] * 3
    assert passes.dpse is not None and fused.dpse is None
    for a, e in zip(fused[:3], passes[:3]):
        assert a.tobytes() == e.tobytes()


def test_amx_taller_backward_tiles_bitwise_equal(path, blocks, rng, monkeypatch):
    """The AMX backward's BWD_AMX_ROWS_FACTOR changes the tiles only: with tiles of whole
    16-pair chunks (32-row multiples, as the defaults) dK, dV, dQ accumulate the same chunks in
    the same order whatever the tile height, so 1x, 2x and 3x rows give the same bits (and the
    factor is really applied: the tile counts differ).  Smaller tiles cut the contraction into
    other chunks (``amx.product_amx``), which may round differently."""
    path("amx")
    blocks(bm=32, bn=10)
    q, k, v, dy = make_qkv("BSND", 2, 4, 2, 192, 47, 16, 16, BF16, rng)
    out = fag_numba.flash_attention_score(q, k, v, 4, "BSND", scale_value=0.3)
    kw = dict(softmax_max=out.softmax_max, softmax_sum=out.softmax_sum,
              attention_in=out.attention_out, scale_value=0.3)
    res, tiles = [], []
    for f in (1, 2, 3):
        monkeypatch.setattr(config, "BWD_AMX_ROWS_FACTOR", f)
        g = fag_numba.flash_attention_score_grad(q, k, v, dy, 4, "BSND", **kw)
        res.append([x.tobytes() for x in g[:3]])
        tiles.append(api.last_tile_count["backward"])
    assert res[0] == res[1] == res[2]
    assert tiles[0] > tiles[1] > tiles[2]


@pytest.mark.parametrize("name", ["amx", "bf16", "f32"])
def test_native_bitwise_identical_across_thread_counts(name, path, blocks, rng):
    path(name)
    blocks(bm=6, bn=10, split=2)   # one kv head: dq from 2 partials
    q, k, v, dy = make_qkv("BNSD", 1, 3, 1, 41, 67, 16, 16, BF16, rng)
    out = fag_numba.flash_attention_score(q, k, v, 3, "BNSD")
    kw = dict(softmax_max=out.softmax_max, softmax_sum=out.softmax_sum,
              attention_in=out.attention_out)
    res = []
    for n in (1, 2):
        with fag_numba.threads(min(n, numba.config.NUMBA_NUM_THREADS)):
            g = fag_numba.flash_attention_score_grad(q, k, v, dy, 3, "BNSD", **kw)
            o = fag_numba.flash_attention_score(q, k, v, 3, "BNSD")
        res.append([x.tobytes() for x in g[:3]] + [x.tobytes() for x in o])
    again = fag_numba.flash_attention_score_grad(q, k, v, dy, 3, "BNSD", **kw)
    assert res[0] == res[1]
    assert res[0][:3] == [x.tobytes() for x in again[:3]]
    assert res[0][3:] == [x.tobytes() for x in out]


def test_bf16_products_round_p_and_ds(path, blocks, rng):
    """The bf16 path really is a different computation (P, dS rounded) yet within tolerance:
    it differs from the float32 path, which the switch forces."""
    q, k, v, dy = make_qkv("BNSD", 1, 2, 2, 64, 64, 32, 32, BF16, rng)
    out = fag_numba.flash_attention_score(q, k, v, 2, "BNSD")
    kw = dict(softmax_max=out.softmax_max, softmax_sum=out.softmax_sum,
              attention_in=out.attention_out)
    res = {}
    names = [n for n, ok in (("amx", HAS_AMX), ("bf16", HAS_BF16)) if ok] + ["f32"]
    for name in names:
        path(name)
        res[name] = fag_numba.flash_attention_score_grad(q, k, v, dy, 2, "BNSD", **kw)
    for name in names[:-1]:
        assert any(not np.array_equal(a, b) for a, b in zip(res[name][:3], res["f32"][:3]))


def test_non_finite_input_takes_blas_driver(path, blocks, rng):
    used = path("f32")
    q, k, v, dy = make_qkv("BNSD", 1, 1, 1, 20, 20, 8, 8, np.float32, rng)
    k[0, 0, 19] = np.nan                         # masked for every row but the last (causal)
    used.clear()
    mask = np.triu(np.ones((2048, 2048), bool), 1)
    out = fag_numba.flash_attention_score(q, k, v, 1, "BNSD", atten_mask=mask, sparse_mode=3)
    fag_numba.flash_attention_score_grad(q, k, v, dy, 1, "BNSD", atten_mask=mask, sparse_mode=3,
                                         softmax_max=out.softmax_max,
                                         softmax_sum=out.softmax_sum,
                                         attention_in=out.attention_out)
    assert used == ["blas", "blas"]


@pytest.mark.parametrize("name", ["amx", "bf16"])
def test_bf16_kinds_skip_the_float32_copies_yet_fall_back_exactly(name, path, blocks, rng,
                                                                 monkeypatch):
    """The bf16 kinds read the inputs' own bits: q, k, v are not converted to float32
    (api._inputs), unless a non-finite statistics row (here a NaN row of attention_in) sends
    the backward to the BLAS driver's careful path, which then converts them: bitwise the
    result of the BLAS path."""
    blocks(bm=6, bn=10)
    q, k, v, dy = make_qkv("BNSD", 1, 2, 1, 23, 31, 8, 8, BF16, rng)
    out = fag_numba.flash_attention_score(q, k, v, 2, "BNSD")
    o = out.attention_out.copy()
    o[0, 1, 4] = np.nan
    kw = dict(softmax_max=out.softmax_max, softmax_sum=out.softmax_sum, attention_in=o)
    converted = []
    orig = api._dequant

    def spy(x, *a):
        converted.append(x is q or x is k or x is v)
        return orig(x, *a)

    path(name)
    monkeypatch.setattr(api, "_dequant", spy)
    fag_numba.flash_attention_score(q, k, v, 2, "BNSD")
    assert converted == []                        # forward: no float32 copy of q, k, v
    got = fag_numba.flash_attention_score_grad(q, k, v, dy, 2, "BNSD", **kw)
    assert converted.count(True) == 3             # the fallback converted q, k, v
    path("blas")
    want = fag_numba.flash_attention_score_grad(q, k, v, dy, 2, "BNSD", **kw)
    for a, b in zip(got[:3], want[:3]):
        assert a.tobytes() == b.tobytes()
    assert np.isnan(got.dq[0, 1, 4]).all() and np.isfinite(got.dq[0, 0]).all()


@pytest.mark.parametrize("name", ["amx", "bf16"])
def test_bf16_statistics_pass_reads_the_bits_of_dy_and_attention_in(name, path, blocks, rng,
                                                                    monkeypatch):
    """With bf16 dy and attention_in the bf16 kinds' statistics pass (dsum = rowsum(dy * o),
    ``driver.rowstats_driver``, one chunk per thread) reads their bits: neither is converted to
    float32, and the gradients are bitwise those of a float32 attention_in (the same values,
    converted), on one thread and on all."""
    blocks(bm=6, bn=10)
    monkeypatch.setattr(config, "CONVERT_THREAD_MIN", 1)      # chunked statistics pass
    q, k, v, dy = make_qkv("BSND", 2, 4, 2, 29, 31, 16, 16, BF16, rng)
    out = fag_numba.flash_attention_score(q, k, v, 4, "BSND")
    kw = dict(softmax_max=out.softmax_max, softmax_sum=out.softmax_sum)
    path(name)
    converted = []
    orig_dq, orig_f32 = api._dequant, api.dtypes.to_f32_flat
    monkeypatch.setattr(api, "_dequant", lambda x, *a: converted.append(x is dy) or
                        orig_dq(x, *a))
    monkeypatch.setattr(api.dtypes, "to_f32_flat", lambda x, *a: converted.append(
        x is out.attention_out) or orig_f32(x, *a))
    bits = fag_numba.flash_attention_score_grad(q, k, v, dy, 4, "BSND",
                                                attention_in=out.attention_out, **kw)
    assert not any(converted)
    with fag_numba.threads(1):
        one = fag_numba.flash_attention_score_grad(q, k, v, dy, 4, "BSND",
                                                   attention_in=out.attention_out, **kw)
    f32 = fag_numba.flash_attention_score_grad(
        q, k, v, dy, 4, "BSND", attention_in=out.attention_out.astype(np.float32), **kw)
    assert any(converted)                         # the float32 attention_in: dy converted
    for a, b, c in zip(bits[:3], f32[:3], one[:3]):
        assert a.tobytes() == b.tobytes() == c.tobytes()


def test_odd_head_dim_bf16_uses_float32_products(path, blocks, rng):
    used = path("bf16")
    q, k, v, dy = make_qkv("BNSD", 1, 1, 1, 9, 9, 7, 7, BF16, rng)
    fag_numba.flash_attention_score_grad(q, k, v, dy, 1, "BNSD")
    assert used == ["f32", "f32"]                 # internal forward, backward


def test_guard_target_without_features(monkeypatch):
    """NUMBA_CPU_NAME=generic (numba then sets CPU_FEATURES to "") or a feature string without
    avx512bf16: the native kinds are refused before anything compiles."""
    from numba.core import config as nconfig
    isa._features.cache_clear()
    try:
        monkeypatch.setattr(config, "NATIVE", "all")
        monkeypatch.setattr(config, "BF16_PRODUCTS", "bf16")
        monkeypatch.setattr(nconfig, "CPU_FEATURES", "")
        assert isa.native_kind(True, 64, 64) is None
        isa._features.cache_clear()
        monkeypatch.setattr(nconfig, "CPU_FEATURES", "+avx512f,+avx512bw,+fma,-avx512bf16")
        kind = isa.native_kind(True, 64, 64)
        assert kind == ("f32" if HAS_F32 else None)
        # AMX forced on a target without amx-tile (host may have it): never the amx kind
        isa._features.cache_clear()
        monkeypatch.setattr(config, "BF16_PRODUCTS", "amx")
        monkeypatch.setattr(nconfig, "CPU_FEATURES",
                            "+avx512f,+avx512bw,+fma,+avx512bf16,-amx-tile,-amx-bf16")
        assert not isa.amx_available()
        kind = isa.native_kind(True, 64, 64)
        assert kind == ("f32" if HAS_F32 else None)
    finally:
        monkeypatch.undo()
        isa._features.cache_clear()


def test_config_switches(monkeypatch):
    monkeypatch.setattr(config, "NATIVE", "off")
    assert isa.native_kind(True, 64, 64) is None
    monkeypatch.setattr(config, "NATIVE", "auto")          # the default
    assert isa.native_kind(False, 64, 64) is None
    monkeypatch.setattr(config, "BF16_PRODUCTS", "float32")
    assert isa.native_kind(True, 64, 64) is None
    monkeypatch.setattr(config, "NATIVE", "all")
    assert isa.native_kind(False, 64, 64) == ("f32" if HAS_F32 else None)
    assert isa.native_kind(True, 64, 64) == ("f32" if HAS_F32 else None)
    monkeypatch.setattr(config, "BF16_PRODUCTS", "bf16")
    assert isa.native_kind(True, 64, 64) == ("bf16" if HAS_BF16 else
                                             ("f32" if HAS_F32 else None))
    assert isa.native_kind(True, 63, 64) == ("f32" if HAS_F32 else None)   # odd D
    monkeypatch.setattr(config, "BF16_PRODUCTS", "amx")
    assert isa.native_kind(True, 64, 64) == ("amx" if HAS_AMX else
                                             ("f32" if HAS_F32 else None))
    assert isa.native_kind(True, 64, 62) == ("amx" if HAS_AMX else
                                             ("f32" if HAS_F32 else None))
    assert isa.native_kind(True, 63, 64) == ("f32" if HAS_F32 else None)   # odd D
    monkeypatch.setattr(config, "NATIVE", "auto")
    monkeypatch.setattr(config, "BF16_PRODUCTS", "auto")
    # AMX where granted; AMX CPUs without the permission: the float32 path (BLAS drivers)
    want = ("amx" if HAS_AMX else None if isa.target_has("amx-bf16") else
            "bf16" if HAS_BF16 else None)
    assert isa.native_kind(True, 64, 64) == want


@pytest.mark.parametrize("name", ["amx", "bf16", "f32", "blas"])
def test_all_minus_inf_scores_give_nan_rows_on_every_path(name, path, blocks, rng):
    """Issue 13 item 7 on the native kernels: a row whose computed scores are all -inf (a pse
    row of -inf; the inputs are finite, so the native products run) is NaN, as the math and
    the BLAS driver say; only the mask makes a row invalid (zeros, -FLT_MAX / +FLT_MAX)."""
    used = path(name)
    blocks(bm=6, bn=10)
    q, k, v, dy = make_qkv("BNSD", 1, 2, 1, 13, 22, 8, 8, BF16, rng)
    pse = np.zeros((1, 2, 13, 22), np.float32)
    pse[0, 0, 4] = -np.inf                    # head 0, row 4: every score -inf
    pse[0, 1, 11, :12] = -np.inf              # head 1, row 11: the rest masked below
    mask = np.zeros((13, 22), bool)
    mask[7] = True                            # row 7: invalid by the mask
    mask[11, 12:] = True
    kw = dict(pse=pse, atten_mask=mask, sparse_mode=1, scale_value=0.5)
    with np.errstate(all="ignore"):
        out = fag_numba.flash_attention_score(q, k, v, 2, "BNSD", **kw)
        g = fag_numba.flash_attention_score_grad(
            q, k, v, dy, 2, "BNSD", softmax_max=out.softmax_max, softmax_sum=out.softmax_sum,
            attention_in=out.attention_out, **kw)
        ro, rm, rl = ref_forward(q, k, v, 2, "BNSD", **kw)
        r = ref_backward(q, k, v, dy, 2, "BNSD", softmax_max=out.softmax_max,
                         softmax_sum=out.softmax_sum, attention_in=out.attention_out, **kw)
    # the forward ran on the forced path (the backward then sees NaN statistics, which send
    # it to the careful BLAS driver after the spy has seen the native choice)
    assert used[0] == name
    o = out.attention_out.astype(np.float32)
    assert np.isnan(o[0, 0, 4]).all() and np.isnan(o[0, 1, 11]).all()
    assert out.softmax_max[0, 0, 4, 0] == -np.inf and np.isnan(out.softmax_sum[0, 0, 4, 0])
    assert (o[0, :, 7] == 0).all() and (out.softmax_max[0, :, 7] < -3e38).all()
    assert np.isfinite(np.delete(o, [4, 7, 11], axis=2)).all()
    assert_close(out.attention_out, ro, tolerance(BF16, "fwd"), "attention_out")
    assert_close(out.softmax_max, rm, tolerance(np.float32, "stats"), "softmax_max")
    assert_close(out.softmax_sum, rl, tolerance(np.float32, "stats"), "softmax_sum")
    for a, e, nm in zip(g[:3], r[:3], ("dq", "dk", "dv")):
        assert_close(a, e, tolerance(BF16, "bwd"), nm)


@pytest.mark.parametrize("name", ["amx", "bf16", "f32", "blas"])
def test_nan_row_with_every_element_dropped_is_zero_on_every_path(name, path, blocks, rng):
    """A -inf pse row has NaN P for every computed element; when dropout removes them all,
    O = Pd @ V is exactly 0 (SPEC §3), not the NaN of the deferred ``acc / l``; a row keeping
    one of them is NaN (fuzz find, tests/test_fuzz.py)."""
    used = path(name)
    blocks(bm=6, bn=10)
    S1, S2 = 9, 14
    q, k, v, dy = make_qkv("BNSD", 1, 1, 1, S1, S2, 8, 8, BF16, rng)
    pse = np.zeros((1, 1, S1, S2), np.float32)
    pse[0, 0, 2] = -np.inf
    pse[0, 0, 5] = -np.inf
    keep = rng.random((1, 1, S1, S2)) < 0.7
    keep[0, 0, 2] = False                  # row 2: every element dropped -> 0
    keep[0, 0, 5, 3] = True                # row 5: one kept -> NaN
    drop = np.packbits(keep.reshape(-1), bitorder="little")
    kw = dict(pse=pse, keep_prob=0.7, scale_value=0.5)
    with np.errstate(all="ignore"):
        out = fag_numba.flash_attention_score(q, k, v, 1, "BNSD", drop_mask=drop, **kw)
        ro, rm, rl = ref_forward(q, k, v, 1, "BNSD", keep=keep.reshape(-1), **kw)
    assert used[0] == name
    o = out.attention_out.astype(np.float32)
    assert (o[0, 0, 2] == 0).all() and np.isnan(o[0, 0, 5]).all()
    assert_close(out.attention_out, ro, tolerance(BF16, "fwd"), "attention_out")
    assert_close(out.softmax_sum, rl, tolerance(np.float32, "stats"), "softmax_sum")


AMX_CASES = [  # layout, B, N1, N2, S1, S2, D, Dv, kwargs: production-like tiles (full 32 x 32
    # blocks, several 16-pair chunks, 16-pair padding of trimmed diagonal tiles, D = 80 cut in
    # 10-pair chunks, GQA, dropout)
    ("BNSD", 1, 2, 1, 203, 261, 64, 64, dict(sparse_mode=3, atten_mask="causal")),
    ("BSH", 1, 2, 2, 150, 150, 80, 48, {}),
    ("BSND", 1, 2, 1, 131, 197, 128, 128, dict(keep_prob=0.9, seed=3)),
]


@pytest.mark.parametrize("case", AMX_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(AMX_CASES)])
def test_amx_production_tiles_match_reference(case, path, rng):
    """The AMX products at the default block sizes (the tiny blocks of the other tests never
    fill a 32 x 32 block or a second contraction chunk)."""
    used = path("amx")
    lay, B, N1, N2, S1, S2, D, Dv, kw = case
    kw = _kwargs(kw, N1)
    q, k, v, dy = make_qkv(lay, B, N1, N2, S1, S2, D, Dv, BF16, rng)
    out = fag_numba.flash_attention_score(q, k, v, N1, lay, **kw)
    g = fag_numba.flash_attention_score_grad(
        q, k, v, dy, N1, lay, softmax_max=out.softmax_max, softmax_sum=out.softmax_sum,
        attention_in=out.attention_out, **kw)
    assert used == ["amx", "amx"]
    ref_kw = _ref_kwargs(kw, B * N1 * S1 * S2)
    r = ref_backward(q, k, v, dy, N1, lay, softmax_max=out.softmax_max,
                     softmax_sum=out.softmax_sum, attention_in=out.attention_out, **ref_kw)
    ro, _, _ = ref_forward(q, k, v, N1, lay, **ref_kw)
    assert_close(out.attention_out, ro, tolerance(BF16, "fwd"), "attention_out")
    for a, e, nm in zip(g[:3], r[:3], ("dq", "dk", "dv")):
        assert_close(a, e, tolerance(BF16, "bwd"), nm)


STRIP_CASES = [  # layout, B, N1, N2, S1, S2, D, kwargs: tiles the band cuts through, in strips
    ("BNSD", 1, 2, 1, 203, 261, 64, dict(sparse_mode=3, atten_mask="causal")),   # S1 < S2
    ("BSND", 1, 2, 2, 190, 150, 16, dict(sparse_mode=2, atten_mask="causal")),   # S1 > S2
    ("BNSD", 1, 2, 2, 170, 170, 32, dict(sparse_mode=4, pre_tokens=37, next_tokens=5,
                                          atten_mask="causal")),               # both edges
    ("BSH", 1, 2, 2, 161, 161, 16, dict(keep_prob=0.8, seed=5, pse_type=2, pse="alibi",
                                         sparse_mode=3, atten_mask="causal")),  # unfused
    ("TND", 2, 2, 1, 0, 0, 32, dict(actual_seq_qlen=[70, 150], actual_seq_kvlen=[90, 150],
                                     sparse_mode=3, atten_mask="causal")),
]


@pytest.mark.parametrize("name", ["amx", "bf16", "f32", "blas"])
@pytest.mark.parametrize("case", STRIP_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(STRIP_CASES)])
def test_forward_strips_of_band_cut_tiles_match_reference(name, case, path, blocks, rng):
    """The forwards (native kinds and the BLAS driver) run a tile that the band cuts through
    in row strips (``driver.FWD_STRIPS``: 64-row tiles, 16-row strips here, the minimum), each
    trimmed to the columns its rows reach: the strips' K^T / V-pair offsets (a band's lower
    edge moves the first column), the AMX padding pairs past a strip, odd strip widths, rows no
    key reaches."""
    used = path(name)
    blocks(fbm=64, fbn=48)
    lay, B, N1, N2, S1, S2, D, kw = case
    kw = _kwargs(kw, N1)
    dt = BF16 if name in ("amx", "bf16") else np.dtype(np.float32)
    q, k, v, _ = make_qkv(lay, B, N1, N2, S1, S2, D, D, dt, rng, kw.get("actual_seq_qlen"),
                          kw.get("actual_seq_kvlen"))
    out = fag_numba.flash_attention_score(q, k, v, N1, lay, scale_value=0.2, **kw)
    assert used == [name]
    ro, rm, rl = ref_forward(q, k, v, N1, lay, scale_value=0.2,
                             **_ref_kwargs(kw, B * N1 * S1 * S2))   # (numels: dropout, not TND)
    assert_close(out.attention_out, ro, tolerance(dt, "fwd"), "attention_out")
    assert_close(out.softmax_max, rm, tolerance(np.float32, "stats"), "softmax_max")
    assert_close(out.softmax_sum, rl, tolerance(np.float32, "stats"), "softmax_sum")


@pytest.mark.skipif(not HAS_F32, reason="numba's target has no AVX-512")
@pytest.mark.parametrize("m, n, ld, ldd, off", [(384, 64, 64, 384, 0), (37, 5, 9, 40, 3),
                                                (16, 16, 16, 16, 0), (1, 1, 1, 1, 0),
                                                (17, 33, 40, 50, 7), (100, 48, 64, 112, 320)])
def test_pack_t32_is_the_dword_transpose(m, n, ld, ldd, off, rng):
    """``native.pack_t32`` (16 x 16 register blocks, masked at the edges) writes exactly the
    transpose and nothing else: the other dwords of dst keep their values, and src is read
    only inside its bounds (an exact-size src; a read past it would fault or show in dst)."""
    from fag_numba.kernels import native
    src = rng.integers(0, 2 ** 32, off + (m - 1) * ld + n, dtype=np.uint64).astype(np.uint32)
    dst = rng.integers(0, 2 ** 32, (n - 1) * ldd + m + 19, dtype=np.uint64).astype(np.uint32)
    want = dst.copy()
    for j in range(m):
        for p in range(n):
            want[p * ldd + j] = src[off + j * ld + p]
    before = src.copy()
    native.pack_t32(src, off, ld, m, n, dst, ldd)
    np.testing.assert_array_equal(dst, want)
    np.testing.assert_array_equal(src, before)


_EXP_BITS = """
import sys, numpy as np
from fag_numba.kernels import tile
tile._FORCE_NO_SCALEF[0] = sys.argv[1] == "portable"
assert tile._scalef_ok() == (sys.argv[1] == "scalef")
rng = np.random.default_rng(0)
x = np.concatenate([rng.uniform(-100, 0, 1 << 18), rng.uniform(-88, -86, 1 << 14),
                    np.linspace(-90, 89, 1 << 14),
                    [-np.inf, np.inf, np.nan, 0.0, -0.0, -87.33654, -87.3365, -87.34, 88.72,
                     88.8, 1e30, -1e30]]).astype(np.float32)
full = x.copy()
s1 = tile.exp_sub(full, 0, np.float32(0.5), full.size)
le = np.nan_to_num(np.minimum(x, 0), nan=0.0).astype(np.float32)
s2 = tile.exp_sub_le(le, 0, np.float32(0.0), le.size)
np.save(sys.argv[2], np.concatenate([full.view(np.uint32), le.view(np.uint32),
                                     np.array([s1, s2], np.float32).view(np.uint32)]))
"""


@pytest.mark.skipif(not HAS_F32, reason="numba's target has no AVX-512")
def test_exp_with_vscalefps_gives_the_bits_of_the_portable_form(tmp_path):
    """``tile._exp16`` scales by 2**n with vscalefps on AVX-512 targets; the values (and row
    sums) are bitwise those of the portable integer-exponent form, over the whole range,
    subnormal results, the clamps, +-inf and NaN.  Fresh processes: each compiles one form."""
    import os
    import subprocess
    import sys
    got = {}
    env = dict(os.environ, FAG_NUMBA_CACHE="0")
    for form in ("portable", "scalef"):
        path = tmp_path / f"{form}.npy"
        res = subprocess.run([sys.executable, "-c", _EXP_BITS, form, str(path)], env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        got[form] = np.load(path)
    np.testing.assert_array_equal(got["portable"], got["scalef"])


def test_exp_is_accurate_with_its_special_cases(rng):
    """``exp_sub`` / ``exp_sub_le`` (the one exp of every kernel) against float64: relative
    error at most ``EXP_REL`` where the result is normal (arguments up to 88: (88, 88.72] is
    clamped to 88, documented), exactly 0 below -87.34 and for -inf,
    inf above 88.72, NaN kept, and the returned row sum is the float32 sum of the values."""
    from fag_numba.kernels import tile
    from tolerances import EXP_REL
    x = np.concatenate([rng.uniform(-87.3, 0, 1 << 17), np.linspace(-87.3, 88.0, 1 << 15),
                        -np.logspace(-8, 1.9, 4096)]).astype(np.float32)
    for le, fn in ((False, tile.exp_sub), (True, tile.exp_sub_le)):
        sub = np.float32(0.0 if le else 0.25)
        buf = np.minimum(x, 0) if le else (x + sub).astype(np.float32)
        d = buf.astype(np.float64) - sub
        y = buf.copy()
        total = fn(y, 0, sub, y.size)
        want = np.exp(d)
        normal = want > np.finfo(np.float32).tiny
        rel = np.abs(y[normal] / want[normal] - 1.0)
        assert rel.max() <= EXP_REL, (fn.__name__, rel.max(), d[normal][rel.argmax()])
        # the sum of the values (in float32; x <= 0 only, the rest overflows float32)
        if le:
            assert abs(total - y.sum(dtype=np.float64)) <= 1e-5 * y.sum(dtype=np.float64)
    edge = np.array([-np.inf, -87.35, -88.0, -1e30, 88.8, np.inf, np.nan, 0.0],
                    np.float32)
    out = edge.copy()
    tile.exp_sub(out, 0, np.float32(0.0), out.size)
    np.testing.assert_array_equal(out[:4], 0.0)
    assert np.isposinf(out[4]) and np.isposinf(out[5]) and np.isnan(out[6]) and out[7] == 1.0


_NONFINITE16 = [0x7F80, 0xFF80, 0x7FC0, 0xFFFF, 0x7F81]      # inf, -inf, NaNs


@pytest.mark.skipif(not HAS_F32, reason="numba's target has no AVX-512")
@pytest.mark.parametrize("bits", _NONFINITE16)
@pytest.mark.parametrize("m, n, ld, off", [(7, 5, 9, 3), (33, 20, 24, 1), (16, 16, 16, 0)])
def test_packers_flag_every_inf_and_nan_they_read(bits, m, n, ld, off, rng):
    """The bf16 kinds check their inputs as they pack them: ``pack_pairs16`` (bf16 rows
    [0, m) x columns [0, n) of rows ld apart) and ``pack_t32`` (the same numbers in dwords, a
    bf16 pair each: either half) return 1 for any inf/NaN pattern at any element read
    (16-blocks' edges, an odd m's last row), 0 for the largest finite values (0x7F7F, 0xFF7F)
    and for a NaN next to the rows / columns read."""
    from fag_numba.kernels import native
    size = off + (m + 1) * ld + n + 1
    src16 = rng.standard_normal(size).astype(BF16).view(np.uint16)
    src32 = rng.standard_normal(2 * size).astype(BF16).view(np.uint16).view(np.uint32)
    src16[off] = 0x7F7F
    src16[off + ld + 1] = 0xFF7F
    src32[off] = 0xFF7F7F7F

    def pairs(x):
        return native.pack_pairs16(x, off, ld, m, n, np.zeros(2 * ((m + 1) // 2) * n, np.uint16), n)

    def t32(x):
        return native.pack_t32(x, off, ld, m, n, np.zeros(n * m, np.uint32), m)

    assert pairs(src16) == 0 and t32(src32) == 0
    for r, c in {(0, 0), (m - 1, n - 1), (m // 2, n // 2), (m - 1, 0), (0, n - 1)}:
        x = src16.copy()
        x[off + r * ld + c] = bits
        assert pairs(x) == 1, (r, c)
        for half in (0, 1):
            y = src32.copy()
            y.view(np.uint16)[2 * (off + r * ld + c) + half] = bits
            assert t32(y) == 1, (r, c, half)
    x, y = src16.copy(), src32.copy()
    for z in (x, y.view(np.uint16)):
        w = 2 if z is not x else 1
        z[w * (off + m * ld)] = bits                 # the row after the last one
        if ld > n:
            z[w * (off + n)] = bits                  # past row 0's columns
        if off:
            z[w * (off - 1)] = bits                  # before the first element
    assert pairs(x) == 0 and t32(y) == 0


def _nonfinite_case(which, where, rng):
    """bf16 BNSD q, k, v, dy (S1 = 23, S2 = 31: odd, several tiles) and a dense mask
    (sparse_mode 0: causal, j > i masked, plus query row 5 fully masked), with one inf/NaN in
    ``which`` where the mask hides it ("masked": key 25, masked for every row yet in a tile
    that is read; query row 5) or not ("seen": key 0, seen by every row; query row 3)."""
    q, k, v, dy = make_qkv("BNSD", 1, 2, 1, 23, 31, 8, 8, BF16, rng)
    mask = np.triu(np.ones((23, 31), bool), 1)
    mask[5] = True
    x = {"q": q, "k": k, "v": v, "dy": dy}[which]
    row = ({"masked": 25, "seen": 0} if which in ("k", "v") else {"masked": 5, "seen": 3})[where]
    x[0, 0, row, 1] = np.inf if which == "k" else np.nan
    return q, k, v, dy, dict(atten_mask=mask, sparse_mode=0)


@pytest.mark.parametrize("name", ["amx", "bf16"])
@pytest.mark.parametrize("which", ["q", "k", "v", "dy"])
@pytest.mark.parametrize("where", ["masked", "seen"])
def test_bf16_kinds_check_the_inputs_they_read(name, which, where, path, blocks, rng,
                                               monkeypatch):
    """No separate finiteness pass: the bf16 kinds flag an inf/NaN in what they pack and the
    call reruns on the BLAS driver's careful path, whose result it then is, bitwise (the
    forward for v, the backward for q, k, v, dy).  The forward reads q and k garbage as the
    BLAS driver does (masked scores overwritten, an unmasked NaN score is the math): the same
    non-finite elements, the rest within the bf16 tolerance.  Every case matches the float64
    reference's NaN pattern."""
    blocks(bm=6, bn=10, fbm=6, fbn=10)
    monkeypatch.setattr(config, "BWD_AMX_ROWS_FACTOR", 1)
    q, k, v, dy, kw = _nonfinite_case(which, where, rng)
    inputs = [x.copy() for x in (q, k, v, dy)]
    res = {}
    for p in ("blas", name):
        path(p)
        with np.errstate(all="ignore"):
            f = fag_numba.flash_attention_score(q, k, v, 2, "BNSD", **kw)
            fs = f if p == "blas" else res["blas"][0]       # the same statistics for both
            g = fag_numba.flash_attention_score_grad(
                q, k, v, dy, 2, "BNSD", softmax_max=fs.softmax_max,
                softmax_sum=fs.softmax_sum, attention_in=fs.attention_out, **kw)
        res[p] = (f, g)
    for x, x0 in zip((q, k, v, dy), inputs):
        assert x.tobytes() == x0.tobytes()               # inputs never modified
    (fn, gn), (fb, gb) = res[name], res["blas"]
    if which == "v":
        for a, b in zip(fn, fb):
            assert a.tobytes() == b.tobytes()
    else:
        for a, b in zip(fn, fb):
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        assert_close(fn.attention_out, fb.attention_out, tolerance(BF16, "fwd"), "out")
    for a, b in zip(gn[:3], gb[:3]):
        assert a.tobytes() == b.tobytes()
    ro, _, _ = ref_forward(*(x.astype(np.float64) for x in (q, k, v)), 2, "BNSD", **kw)
    np.testing.assert_array_equal(np.isnan(fn.attention_out), np.isnan(ro))
    if where == "masked":                  # hidden garbage stays out of every output
        assert all(np.isfinite(x.astype(np.float32)).all() for x in (fn[0], *gn[:3]))
    else:
        assert not all(np.isfinite(x.astype(np.float32)).all() for x in (fn[0], *gn[:3]))


@pytest.mark.parametrize("name", ["amx", "bf16"])
@pytest.mark.parametrize("case", ["dense", "masked_keys", "causal_odd", "band_gqa", "pse",
                                  "splits", "tnd_extra"])
def test_bf16_gradients_written_by_the_kernel_equal_the_converted_float32(name, case, path,
                                                                         blocks, rng,
                                                                         monkeypatch):
    """The native backward writes bf16 dq, dk, dv itself (the out16 variant: one S2 split, the
    sequences' rows the whole arrays); they are the bits of the float32 gradients
    (out_dtype=float32, the other variant) scaled and converted by the host, including key
    blocks no query reaches (band: zero rows), GQA, odd sizes and a scale != 1.  With S2
    splits or TND rows past the last offset the host converts (the same bits)."""
    blocks(bm=6, bn=10, split=3 if case == "splits" else None)
    path(name)
    written = []
    orig = api.memory.empty64

    def poisoned(*a):                 # NaN bits: every element must be written
        written.append(a[1:] == (np.uint16,))
        x = orig(*a)
        x.view(np.uint8)[:] = 0xFF
        return x
    monkeypatch.setattr(api.memory, "empty64", poisoned)
    lay, B, n1, n2, S1, S2, kw = "BNSD", 2, 2, 2, 37, 45, {}
    if case == "splits":              # one (sequence, kv head): split along S2
        B, n2 = 1, 1
    elif case == "causal_odd":
        S1, S2, kw = 29, 51, dict(sparse_mode=3, atten_mask="causal")
    elif case == "band_gqa":          # keys 40.. are seen by no query: blocks without tiles
        n1, S1, S2, kw = 4, 33, 57, dict(sparse_mode=4, pre_tokens=5, next_tokens=2,
                                          atten_mask="causal")
    elif case == "pse":
        kw = dict(pse="alibi", pse_type=2)
    elif case == "tnd_extra":         # 3 rows past the last offsets
        lay, S1, S2, kw = "TND", 33, 32, dict(actual_seq_qlen=[11, 30], actual_seq_kvlen=[13, 29])
    q, k, v, dy = make_qkv(lay, B, n1, n2, S1, S2, 16, 16, BF16, rng,
                           **{x: kw[x] for x in ("actual_seq_qlen", "actual_seq_kvlen") if x in kw})
    kw = _kwargs(kw, n1)
    kw["scale_value"] = 0.37
    if case == "masked_keys":
        m = rng.random((S1, S2)) < 0.3
        m[:, [3, 17, 30]] = True                  # three keys masked for every row: dk = 0
        kw["atten_mask"] = m
    f = fag_numba.flash_attention_score(q, k, v, n1, lay, out_dtype=np.float32, **kw)
    gkw = dict(kw, softmax_max=f.softmax_max, softmax_sum=f.softmax_sum,
               attention_in=f.attention_out)
    written.clear()
    g16 = fag_numba.flash_attention_score_grad(q, k, v, dy, n1, lay, **gkw)
    direct = written.count(True) == 3
    assert direct == (case not in ("splits", "tnd_extra"))
    g32 = fag_numba.flash_attention_score_grad(q, k, v, dy, n1, lay, out_dtype=np.float32,
                                               **gkw)
    for a, b in zip(g16[:3], g32[:3]):
        assert a.dtype == BF16 and b.dtype == np.float32
        np.testing.assert_array_equal(a.view(np.uint16), b.astype(BF16).view(np.uint16))
    if case == "masked_keys":
        assert not g16.dk[:, :, [3, 17, 30]].astype(np.float32).any()


@pytest.mark.parametrize("name", ["amx", "bf16"])
@pytest.mark.parametrize("case", ["dense", "masked_rows", "causal_odd"])
def test_bf16_output_written_by_the_kernel_equals_the_converted_float32(name, case, path,
                                                                        blocks, rng):
    """The native forward writes a bf16 attention_out's bits itself; they are the bits of its
    float32 output (out_dtype=float32, the other compiled variant) converted by the host,
    including rows masked out entirely (zeros) and odd sizes."""
    path(name)
    S1, S2, kw = {"dense": (37, 45, {}),
                  "masked_rows": (40, 33, {}),
                  "causal_odd": (29, 51, dict(sparse_mode=3, atten_mask="causal"))}[case]
    q, k, v, _ = make_qkv("BNSD", 1, 2, 2, S1, S2, 16, 16, BF16, rng)
    kw = _kwargs(kw, 2)
    if case == "masked_rows":
        m = rng.random((S1, S2)) < 0.3
        m[[3, 17, 30]] = True                  # three rows masked entirely: zero output
        kw["atten_mask"] = m
    o16 = fag_numba.flash_attention_score(q, k, v, 2, "BNSD", **kw)
    o32 = fag_numba.flash_attention_score(q, k, v, 2, "BNSD", out_dtype=np.float32, **kw)
    assert o16.attention_out.dtype == BF16 and o32.attention_out.dtype == np.float32
    np.testing.assert_array_equal(o16.attention_out.view(np.uint16),
                                  o32.attention_out.astype(BF16).view(np.uint16))
    np.testing.assert_array_equal(o16.softmax_max, o32.softmax_max)
    if case == "masked_rows":
        assert not o16.attention_out[0, :, [3, 17, 30]].astype(np.float32).any()
