"""fag_numba.flash_attn (SPEC §12) against a float64 reference of flash-attn 2's documented
semantics: bottom-right causal for S1 != S2, window_size (left, right) in bottom-right alignment,
ALiBi ``-slope*|i + S2 - S1 - j|`` added to the scaled scores, GQA, empty rows (out 0, lse -inf),
varlen with empty sequences; outputs, softmax_lse and gradients; the private per-step kernels
(4-tuple, buffers written in place, float32 buffers unrounded, aliasing); the packed forms.
Tolerances: tests/tolerances.py by dtype (small tiles patched: ``blocks``)."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fag_numba.flash_attn as fa  # noqa: E402
from tests.tolerances import STATS, tolerance  # noqa: E402
from tests.utils import assert_close  # noqa: E402

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NPDT = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def ref_attention(q, k, v, scale=None, causal=False, window=(-1, -1), alibi=None):
    """flash-attn's math in float64 for one sequence batch: q (B,S1,H,D), k/v (B,S2,Hk,D)
    (float64 tensors requiring grad or not); returns (out (B,S1,H,Dv), lse (B,H,S1))."""
    b, s1, h, d = q.shape
    s2, hk = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    g = h // hk
    if s2 == 0:       # no key at all: every row empty
        return (q.new_zeros(b, s1, h, v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum()),
                torch.full((b, h, s1), float("-inf"), dtype=q.dtype))
    kk, vv = (t.repeat_interleave(g, dim=2) for t in (k, v))
    z = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    i = torch.arange(s1)[:, None]
    j = torch.arange(s2)[None, :]
    rel = i + s2 - s1 - j                     # flash-attn's bottom-right diagonal offset
    left, right = window
    if causal:
        right = 0
    ok = torch.ones(s1, s2, dtype=torch.bool)
    if right >= 0:
        ok &= j <= i + s2 - s1 + right
    if left >= 0:
        ok &= j >= i + s2 - s1 - left
    if alibi is not None:
        sl = alibi.double().reshape(-1 if alibi.dim() == 1 else b, h)
        sl = sl[None] if alibi.dim() == 1 else sl
        z = z - sl.reshape(sl.shape[0], h, 1, 1) * rel.abs().double()
    z = z.masked_fill(~ok, float("-inf"))
    m = z.amax(-1, keepdim=True)
    valid = torch.isfinite(m)
    p = torch.where(valid, torch.exp(z - torch.where(valid, m, 0.0)), 0.0)
    l = p.sum(-1, keepdim=True)
    p = p / torch.where(l > 0, l, 1.0)
    out = torch.einsum("bhij,bjhd->bihd", p, vv)
    lse = torch.where(valid, m + torch.log(torch.where(l > 0, l, 1.0)), float("-inf"))[..., 0]
    return out, lse


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _check(actual, expected, key, kind, name):
    assert_close(actual.detach().float().numpy(), expected.detach().numpy(),
                 tolerance(NPDT[key], kind), name)


CASES = [  # (S1, S2, causal, window, alibi)
    (13, 13, False, (-1, -1), None),
    (7, 13, True, (-1, -1), None),       # decode-like: bottom-right
    (13, 7, True, (-1, -1), None),       # S1 > S2: the first 6 rows are empty
    (13, 11, False, (3, 2), None),
    (9, 14, True, (4, -1), "h"),
    (11, 11, False, (-1, -1), "bh"),
    (8, 12, False, (2, 0), "h"),
]


@pytest.mark.parametrize("key", ["fp32", "bf16"])
@pytest.mark.parametrize("s1,s2,causal,window,alibi", CASES)
def test_flash_attn_func_vs_reference(blocks, key, s1, s2, causal, window, alibi):
    blocks()
    b, h, hk, d = 2, 4, 2, 16
    q, k, v = (_rand(s, DT[key], i) for i, s in enumerate([(b, s1, h, d), (b, s2, hk, d),
                                                           (b, s2, hk, d)]))
    slopes = None if alibi is None else torch.rand(h if alibi == "h" else (b, h),
                                                    generator=torch.Generator().manual_seed(9))
    for t in (q, k, v):
        t.requires_grad_()
    out, lse, none = fa.flash_attn_func(q, k, v, causal=causal, window_size=window,
                                        alibi_slopes=slopes, return_attn_probs=True)
    assert none is None and out.dtype == q.dtype and lse.dtype == torch.float32
    dout = _rand(out.shape, DT[key], 7)
    out.backward(dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = ref_attention(q64, k64, v64, causal=causal, window=window, alibi=slopes)
    ro.backward(dout.double())
    _check(out, ro, key, "fwd", "out")
    empty = torch.isinf(rl)
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all()
    assert_close(lse[~empty].numpy(), rl[~empty].detach().numpy(), STATS, "lse")
    for name, a, r in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        _check(a.grad, r.grad, key, "bwd", name)


def test_scale_and_defaults():
    q, k, v = (_rand((1, 5, 2, 8), torch.float32, i) for i in range(3))
    a = fa.flash_attn_func(q, k, v)
    b = fa.flash_attn_func(q, k, v, softmax_scale=1 / math.sqrt(8))
    c = fa.flash_attn_func(q, k, v, softmax_scale=0.5)
    assert torch.equal(a, b) and not torch.allclose(a, c)


CU_Q = [0, 0, 5, 5, 12, 15, 15]      # lengths 0, 5, 0, 7, 3, 0
CU_K = [0, 0, 3, 9, 20, 20, 24]      # lengths 0, 3, 6, 11, 0, 4


@pytest.mark.parametrize("causal,window,alibi", [(False, (-1, -1), None), (True, (-1, -1), None),
                                                 (False, (2, 3), None), (True, (-1, -1), "bh"),
                                                 (False, (-1, -1), "h")])
def test_varlen_vs_reference(blocks, causal, window, alibi):
    blocks()
    h, hk, d, nseq = 4, 2, 16, len(CU_Q) - 1
    q = _rand((CU_Q[-1], h, d), torch.float32, 1).requires_grad_()
    k = _rand((CU_K[-1], hk, d), torch.float32, 2).requires_grad_()
    v = _rand((CU_K[-1], hk, d), torch.float32, 3).requires_grad_()
    slopes = None if alibi is None else torch.rand(h if alibi == "h" else (nseq, h),
                                                    generator=torch.Generator().manual_seed(5))
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32) for c in (CU_Q, CU_K))
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 11, causal=causal,
                                            window_size=window, alibi_slopes=slopes,
                                            return_attn_probs=True)
    assert lse.shape == (h, CU_Q[-1])
    dout = _rand(out.shape, torch.float32, 4)
    out.backward(dout)
    for s in range(nseq):
        q0, q1, k0, k1 = CU_Q[s], CU_Q[s + 1], CU_K[s], CU_K[s + 1]
        q64, k64, v64 = (t.detach()[a:z].double()[None].requires_grad_()
                         for t, a, z in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        sl = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[s:s + 1])
        ro, rl = ref_attention(q64, k64, v64, causal=causal, window=window, alibi=sl)
        ro.backward(dout[q0:q1].double()[None])
        _check(out[q0:q1], ro[0], "fp32", "fwd", f"out seq {s}")
        got = lse[:, q0:q1]
        assert torch.equal(torch.isinf(got), torch.isinf(rl[0]))
        fin = ~torch.isinf(rl[0])
        assert_close(got[fin].numpy(), rl[0][fin].detach().numpy(), STATS, f"lse seq {s}")
        _check(q.grad[q0:q1], q64.grad[0], "fp32", "bwd", f"dq seq {s}")
        _check(k.grad[k0:k1], k64.grad[0], "fp32", "bwd", f"dk seq {s}")
        _check(v.grad[k0:k1], v64.grad[0], "fp32", "bwd", f"dv seq {s}")


def test_packed_forms_equal_unpacked():
    qkv = _rand((2, 9, 3, 4, 8), torch.float32, 1).requires_grad_()
    out = fa.flash_attn_qkvpacked_func(qkv, causal=True)
    out.sum().backward()
    q, k, v = (qkv.detach()[:, :, i].clone().requires_grad_() for i in range(3))
    ref = fa.flash_attn_func(q, k, v, causal=True)
    ref.sum().backward()
    assert torch.equal(out, ref)
    assert torch.equal(qkv.grad, torch.stack([q.grad, k.grad, v.grad], 2))
    kv = torch.stack([k.detach(), v.detach()], 2)
    assert torch.equal(fa.flash_attn_kvpacked_func(q.detach(), kv, causal=True), ref)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    t = qkv.detach()[0]
    vo = fa.flash_attn_varlen_qkvpacked_func(t, cu, 5, causal=True)
    vk = fa.flash_attn_varlen_kvpacked_func(t[:, 0], t[:, 1:], cu, cu, 5, 5, causal=True)
    r0 = fa.flash_attn_func(t[None, :4, 0], t[None, :4, 1], t[None, :4, 2], causal=True)[0]
    assert torch.equal(vo, vk) and torch.allclose(vo[:4], r0, atol=1e-6)


def test_dropout_same_bits_in_backward():
    """dropout_p: the backward regenerates the forward's bits (checked against a finite
    difference of the same seeded forward), and different seeds give different outputs."""
    q, k, v = (_rand((1, 6, 2, 8), torch.float32, i).requires_grad_() for i in range(3))
    torch.manual_seed(0)
    a = fa.flash_attn_func(q, k, v, dropout_p=0.3)
    torch.manual_seed(0)
    b = fa.flash_attn_func(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, fa.flash_attn_func(q, k, v))
    a.sum().backward()
    eps, idx = 1e-2, (0, 2, 1, 3)
    qp = q.detach().clone()
    qp[idx] += eps
    qm = q.detach().clone()
    qm[idx] -= eps
    fd = []
    for qq in (qp, qm):
        torch.manual_seed(0)
        fd.append(fa.flash_attn_func(qq, k.detach(), v.detach(), dropout_p=0.3).sum().item())
    assert abs((fd[0] - fd[1]) / (2 * eps) - q.grad[idx].item()) < 2e-3


def test_private_kernels_write_buffers():
    """_flash_attn_forward's 4-tuple, _flash_attn_backward into given buffers (strided, float32
    for bf16 inputs: unrounded), softmax_d, and a dq buffer aliasing dout."""
    b, s, h, d = 1, 10, 2, 8
    q, k, v, dout = (_rand((b, s, h, d), torch.bfloat16, i) for i in range(4))
    out, lse, s_dmask, rng = fa._flash_attn_forward(q, k, v, 0.0, None, True, -1, -1, 0.0, None,
                                                    False)
    assert s_dmask is None and rng.dtype == torch.int64 and lse.shape == (b, h, s)
    ref = fa.flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out, ref)
    dq32 = torch.empty(b, s, h, d, dtype=torch.float32)
    dk_t = torch.empty(b, h, s, d, dtype=torch.bfloat16).transpose(1, 2)     # strided buffer
    dv = torch.empty(b, s, h, d, dtype=torch.bfloat16)
    sd = fa._flash_attn_backward(dout, q, k, v, out, lse, dq32, dk_t, dv, 0.0, None, True, -1,
                                 -1, 0.0, None, False, None)
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    fa.flash_attn_func(qq, kk, vv, causal=True).backward(dout)
    assert (dq32 != dq32.bfloat16().float()).any()           # float32 buffer: unrounded
    assert torch.allclose(dq32.bfloat16().float(), qq.grad.float(), atol=1.6e-2, rtol=1.6e-2)
    assert torch.equal(dk_t, kk.grad) and torch.equal(dv, vv.grad)
    assert torch.allclose(sd, (dout.float() * out.float()).sum(-1).transpose(1, 2))
    alias = dout.clone()                                      # dq buffer == dout
    sd2 = fa._flash_attn_backward(alias, q, k, v, out, lse, alias, dk_t, dv, 0.0, None, True,
                                  -1, -1, 0.0, None, False, None)
    assert torch.equal(alias, qq.grad) and torch.equal(sd2, sd)


def test_private_varlen_kernels():
    cu = torch.tensor([0, 0, 4, 11], dtype=torch.int32)
    q, k, v, dout = (_rand((11, 2, 8), torch.float32, i) for i in range(4))
    out, lse, _, rng = fa._flash_attn_varlen_forward(q, k, v, cu, cu, 7, 7, 0.0, None, True)
    assert lse.shape == (2, 11)
    dq, dk, dv = (torch.full_like(q, 7.0) for _ in range(3))
    sd = fa._flash_attn_varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, cu, cu, 7, 7, 0.0,
                                        None, True)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    fa.flash_attn_varlen_func(qq, kk, vv, cu, cu, 7, 7, causal=True).backward(dout)
    assert torch.equal(dq, qq.grad) and torch.equal(dk, kk.grad) and torch.equal(dv, vv.grad)
    assert sd.shape == (2, 11)


def test_unsupported_arguments():
    q = _rand((1, 4, 2, 8), torch.float32, 0)
    with pytest.raises(NotImplementedError, match="softcap"):
        fa.flash_attn_func(q, q, q, softcap=5.0)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="block_table"):
        fa.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 4, 4, block_table=torch.zeros(1))
    with pytest.raises(NotImplementedError, match="kvcache"):
        fa.flash_attn_with_kvcache(q, q, q)
