"""flash-attn 2 compatible functions on fag_numba (SPEC §12), for CPU torch tensors.

::

    from fag_numba.flash_attn import flash_attn_func       # instead of: from flash_attn import ...
    out = flash_attn_func(q, k, v, causal=True)              # q (B, S1, H, D), k/v (B, S2, Hk, D)

    import fag_numba.flash_attn
    fag_numba.flash_attn.install()                           # third-party code (ring-flash-attn,
    import ring_flash_attn                                   # yunchang ...) runs unchanged

Public functions (flash-attn 2.8 signatures, layouts and defaults; autograd):
``flash_attn_func``, ``flash_attn_kvpacked_func``, ``flash_attn_qkvpacked_func``,
``flash_attn_varlen_func``, ``flash_attn_varlen_kvpacked_func``,
``flash_attn_varlen_qkvpacked_func``.  Private per-step kernels (what ring libraries import):
``_flash_attn_forward``, ``_flash_attn_backward``, ``_flash_attn_varlen_forward``,
``_flash_attn_varlen_backward``.

How flash-attn's conventions map onto fag_numba's (one place per convention, STYLE b2b):

| flash-attn | fag_numba call |
|---|---|
| q ``(B,S1,H,D)``, k/v ``(B,S2,Hk,D)``, H % Hk == 0 | ``input_layout="BSND"``, ``head_num=H`` (GQA native) |
| varlen ``(total, H, D)``, ``cu_seqlens`` int32 with the leading 0 | ``"TND"``, ``actual_seq_qlen = cu_seqlens_q[1:]`` (leading empty sequences dropped: SPEC §8.1 would read their zeros as the end of the list) |
| ``softmax_scale=None`` | ``scale_value = 1/sqrt(D)`` |
| ``causal=True`` (bottom-right) | ``sparse_mode=3`` with the ``[2048,2048]`` ``triu(1)`` mask |
| ``window_size=(L, R)``, -1 = unbounded (causal: R = 0) | ``sparse_mode=4``, ``pre_tokens=L``, ``next_tokens=R`` (-1 -> 2147483647), bottom-right band |
| ``alibi_slopes`` ``(H,)``/``(B,H)`` fp32, bias ``-slope*abs(i + S2 - S1 - j)`` | ``pse=slopes, pse_type=2, q_start_idx=[S2-S1], kv_start_idx=[0]`` (varlen whose sequences have different S2_b - S1_b: one call per sequence) |
| ``dropout_p`` | ``keep_prob = 1 - dropout_p``; ``seed`` drawn from torch's CPU generator; ``rng_state = tensor([seed, offset])`` int64 |
| ``softmax_lse`` ``(B,H,S1)`` fp32 (varlen ``(H,total_q)``) | ``fag_numba.softmax_lse(softmax_max, softmax_sum)``, **-inf for empty rows** (flash-attn's CUDA kernel writes +inf there; -inf is what the log-sum-exp merge of ring libraries needs: an empty block then contributes nothing) |
| backward ``softmax_lse``, ``out`` | the grad's ``softmax_lse=`` and ``attention_in=`` |
| backward ``dq, dk, dv`` buffers | results computed first, then copied in (``copy_``): correct whatever the buffers alias; a float32 ``dq``/``dk``/``dv`` buffer for fp16/bf16 inputs gets unrounded float32 results (``out_dtype=float32``) |
| ``return_attn_probs=True`` | ``(out, softmax_lse, None)``: the attention probabilities are never materialised (``S_dmask`` is None in the private kernels too) |
| ``deterministic`` | ignored: fag_numba is always deterministic |
| ``softcap != 0``, ``block_table``, ``leftpad_k``, ``seqused_k`` | ``NotImplementedError`` |

``install()`` puts modules ``flash_attn`` and ``flash_attn.flash_attn_interface`` into
``sys.modules`` (with a ``__spec__``, ``__version__ = "2.8.3+fag_numba"``), holding these
functions plus ``flash_attn_with_kvcache`` (a stub raising NotImplementedError).
"""
from __future__ import annotations

import math
import types

import numpy as np
import torch

import fag_numba
from fag_numba.masks import compressed_mask
from fag_numba.torch.npu import _draw_seed, numpy_to_tensor, tensor_to_numpy

__all__ = [
    "flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func", "install",
]

INT32_MAX = 2147483647
FLASH_ATTN_VERSION = "2.8.3+fag_numba"
# the library's own canonical mask: immutable, so calls skip the per-call check of its 4 MB
_CAUSAL = compressed_mask(3)


# ----------------------------------------------------------------------------------------------
# argument translation
# ----------------------------------------------------------------------------------------------
def _unsupported(fn, **args):
    for name, value in args.items():
        if value is not None and value is not False and not (name == "softcap" and value == 0):
            raise NotImplementedError(f"fag_numba.flash_attn.{fn}: {name} is not supported by "
                                      f"fag_numba (got {value!r})")


def _mask_kwargs(causal, left, right):
    """sparse_mode / atten_mask / tokens for flash-attn's causal and window_size."""
    left = -1 if left is None else int(left)
    right = -1 if right is None else int(right)
    if causal:
        right = 0
    if left < 0 and right < 0:
        return {}
    if causal and left < 0:
        return dict(sparse_mode=3, atten_mask=_CAUSAL)
    return dict(sparse_mode=4, atten_mask=_CAUSAL, pre_tokens=left if left >= 0 else INT32_MAX,
                next_tokens=right if right >= 0 else INT32_MAX)


def _scale(softmax_scale, d):
    return 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)


def tnd_offsets(cu_q, cu_k):
    """flash-attn ``cu_seqlens`` (leading 0) -> fag_numba cumulative end offsets (no leading 0)
    and the index of the first sequence kept: leading empty sequences are dropped, since SPEC
    §8.1 reads a 0 at an index > 0 in both lists as the end of the lists."""
    cq = [int(x) for x in cu_q][1:]
    ck = [int(x) for x in cu_k][1:]
    first = 0
    while len(cq) > 1 and cq[1] == 0 and ck[1] == 0:
        cq, ck, first = cq[1:], ck[1:], first + 1
    return cq, ck, first


def _slopes(alibi_slopes, first=0, last=None):
    if alibi_slopes is None:
        return None
    a = tensor_to_numpy(alibi_slopes, "alibi_slopes")
    return a[first:last] if a.ndim == 2 else a


class _Call:
    """One flash-attn call translated: numpy kwargs common to forward and grad."""

    def __init__(self, q, k, dropout_p, softmax_scale, causal, left, right, alibi_slopes,
                 rng_state, varlen=None):
        self.varlen = varlen                  # None, or (cu_q list, cu_k list) flash-attn style
        self.kw = dict(scale_value=_scale(softmax_scale, q.shape[-1]),
                       **_mask_kwargs(causal, left, right))
        self.head_num = q.shape[-2]
        self.keep_prob = 1.0 - float(dropout_p or 0.0)
        if self.keep_prob < 1.0:
            if rng_state is None:
                rng_state = torch.tensor([_draw_seed(), 0], dtype=torch.int64)
            seed, offset = (int(x) for x in rng_state.reshape(-1)[:2].tolist())
            self.kw.update(keep_prob=self.keep_prob, seed=seed, offset=offset)
        self.rng_state = rng_state if rng_state is not None else torch.zeros(2, dtype=torch.int64)
        self.alibi = alibi_slopes
        if varlen is None:
            self.layout = "BSND"
            if alibi_slopes is not None:
                self.kw.update(pse=_slopes(alibi_slopes), pse_type=2,
                               q_start_idx=[k.shape[1] - q.shape[1]], kv_start_idx=[0])
        else:
            self.layout = "TND"
            self.kw["softmax_layout"] = "TND"

    def pieces(self):
        """Varlen: the list of (row range q, row range k, numpy kwargs) calls to make: one TND
        call, or one per sequence when ALiBi offsets differ between sequences."""
        cu_q, cu_k = self.varlen
        cq, ck, first = tnd_offsets(cu_q, cu_k)
        deltas = {(cu_k[b + 1] - cu_k[b]) - (cu_q[b + 1] - cu_q[b]) for b in range(len(cu_q) - 1)}
        if self.alibi is None or len(deltas) <= 1:
            kw = dict(self.kw, actual_seq_qlen=cq, actual_seq_kvlen=ck)
            if self.alibi is not None:
                kw.update(pse=_slopes(self.alibi, first), pse_type=2,
                          q_start_idx=[deltas.pop()], kv_start_idx=[0])
            return [((0, None), (0, None), kw)]
        out, offset = [], self.kw.get("offset", 0)
        for b in range(len(cu_q) - 1):
            (q0, q1), (k0, k1) = (cu_q[b], cu_q[b + 1]), (cu_k[b], cu_k[b + 1])
            kw = dict(self.kw, actual_seq_qlen=[q1 - q0], actual_seq_kvlen=[k1 - k0],
                      pse=_slopes(self.alibi, b, b + 1), pse_type=2,
                      q_start_idx=[(k1 - k0) - (q1 - q0)], kv_start_idx=[0])
            if "seed" in kw:      # the same bits as one TND call: its stream is per sequence
                kw["offset"] = offset
                offset += self.head_num * (q1 - q0) * (k1 - k0)
            out.append(((q0, q1), (k0, k1), kw))
        return out


def _np(t, name):
    return tensor_to_numpy(t, name)


# ----------------------------------------------------------------------------------------------
# forward / backward cores (numpy API); results as new tensors
# ----------------------------------------------------------------------------------------------
def _forward(q, k, v, call):
    """(out like q with v's head dim, lse float32: (B,H,S1), varlen (H,total_q))."""
    qn, kn, vn = _np(q, "q"), _np(k, "k"), _np(v, "v")
    if call.layout == "BSND":
        r = fag_numba.flash_attention_score(qn, kn, vn, call.head_num, "BSND", **call.kw)
        return numpy_to_tensor(r.attention_out), numpy_to_tensor(
            fag_numba.softmax_lse(r.softmax_max, r.softmax_sum))
    out = np.zeros(qn.shape[:-1] + (vn.shape[-1],), qn.dtype)
    lse = np.full(qn.shape[:2], -np.inf, np.float32)
    for (q0, q1), (k0, k1), kw in call.pieces():
        r = fag_numba.flash_attention_score(qn[q0:q1], kn[k0:k1], vn[k0:k1], call.head_num,
                                            "TND", **kw)
        out[q0:q1] = r.attention_out
        lse[q0:q1] = fag_numba.softmax_lse(r.softmax_max, r.softmax_sum)
    return numpy_to_tensor(out), numpy_to_tensor(np.ascontiguousarray(lse.T))


def _backward(dout, q, k, v, out, lse, call, f32=(False, False, False)):
    """(dq, dk, dv) as new tensors; each float32 (unrounded) where ``f32`` says so, else in
    the input dtype."""
    qn, kn, vn, on = _np(q, "q"), _np(k, "k"), _np(v, "v"), _np(out, "out")
    dyn = _np(dout.to(q.dtype), "dout")
    ln = _np(lse.to(torch.float32), "softmax_lse")
    any32 = any(f32) and q.dtype != torch.float32
    extra = dict(out_dtype="float32") if any32 else {}
    if call.layout == "BSND":
        g = fag_numba.flash_attention_score_grad(qn, kn, vn, dyn, call.head_num, "BSND",
                                                 softmax_lse=ln, attention_in=on, **call.kw,
                                                 **extra)
        res = (g.dq, g.dk, g.dv)
    else:
        ln = np.ascontiguousarray(ln.T)                  # (H, total) -> [T1, N1]
        dt = np.float32 if any32 else qn.dtype
        res = (np.zeros(qn.shape, dt), np.zeros(kn.shape, dt), np.zeros(vn.shape, dt))
        for (q0, q1), (k0, k1), kw in call.pieces():
            g = fag_numba.flash_attention_score_grad(
                qn[q0:q1], kn[k0:k1], vn[k0:k1], dyn[q0:q1], call.head_num, "TND",
                softmax_lse=ln[q0:q1], attention_in=on[q0:q1], **kw, **extra)
            res[0][q0:q1] += g.dq
            res[1][k0:k1] += g.dk
            res[2][k0:k1] += g.dv
    return tuple(numpy_to_tensor(a) for a in res)


def _softmax_d(dout, out, varlen):
    """flash-attn's returned ``softmax_d = rowsum(dout * out)``: (B,H,S1), varlen (H,total)."""
    d = (dout.float() * out.float()).sum(-1)
    return d.t().contiguous() if varlen else d.transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------
# private per-step kernels (flash-attn 2.8 signatures)
# ----------------------------------------------------------------------------------------------
def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left=-1,
                        window_size_right=-1, softcap=0.0, alibi_slopes=None,
                        return_softmax=False):
    """flash-attn 2.8's ``_flash_attn_forward``: ``(out, softmax_lse, S_dmask, rng_state)``.

    q ``(B,S1,H,D)``, k/v ``(B,S2,Hk,D)``; out like q (its dtype), softmax_lse float32
    ``(B,H,S1)`` (-inf for empty rows), S_dmask None, rng_state int64 ``[seed, offset]``.
    """
    _unsupported("_flash_attn_forward", softcap=softcap)
    call = _Call(q, k, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                 alibi_slopes, None)
    out, lse = _forward(q, k, v, call)
    return out, lse, None, call.rng_state


def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p, softmax_scale, causal, window_size_left=-1,
                               window_size_right=-1, softcap=0.0, alibi_slopes=None,
                               return_softmax=False, block_table=None, leftpad_k=None,
                               seqused_k=None, zero_tensors=False):
    """flash-attn 2.8's ``_flash_attn_varlen_forward``: ``(out, softmax_lse, S_dmask,
    rng_state)``; q ``(total_q,H,D)``, softmax_lse float32 ``(H,total_q)``."""
    _unsupported("_flash_attn_varlen_forward", softcap=softcap, block_table=block_table,
                 leftpad_k=leftpad_k, seqused_k=seqused_k)
    call = _Call(q, k, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                 alibi_slopes, None, varlen=_cu_lists(cu_seqlens_q, cu_seqlens_k))
    out, lse = _forward(q, k, v, call)
    return out, lse, None, call.rng_state


def _write(dst, src):
    if dst is not None:
        dst.copy_(src)


def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale,
                         causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
                         alibi_slopes=None, deterministic=False, rng_state=None):
    """flash-attn 2.8's ``_flash_attn_backward``: writes dq/dk/dv (any dtype, any strides; a
    float32 buffer gets unrounded float32 results) and returns ``softmax_d`` float32
    ``(B,H,S1)``.  ``out``/``softmax_lse`` are the global (merged) ones in ring use."""
    _unsupported("_flash_attn_backward", softcap=softcap)
    call = _Call(q, k, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                 alibi_slopes, rng_state)
    f32 = tuple(t is not None and t.dtype == torch.float32 for t in (dq, dk, dv))
    g = _backward(dout, q, k, v, out, softmax_lse, call, f32)
    softmax_d = _softmax_d(dout, out, False)           # before any write: dq may alias dout
    for dst, src in zip((dq, dk, dv), g):
        _write(dst, src)
    return softmax_d


def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q,
                                cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                softmax_scale, causal, window_size_left=-1, window_size_right=-1,
                                softcap=0.0, alibi_slopes=None, deterministic=False,
                                rng_state=None, zero_tensors=False):
    """flash-attn 2.8's ``_flash_attn_varlen_backward``: like :func:`_flash_attn_backward` on
    ``(total, H, D)`` tensors; softmax_lse ``(H,total_q)``; returns softmax_d ``(H,total_q)``."""
    _unsupported("_flash_attn_varlen_backward", softcap=softcap)
    call = _Call(q, k, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                 alibi_slopes, rng_state, varlen=_cu_lists(cu_seqlens_q, cu_seqlens_k))
    f32 = tuple(t is not None and t.dtype == torch.float32 for t in (dq, dk, dv))
    g = _backward(dout, q, k, v, out, softmax_lse, call, f32)
    softmax_d = _softmax_d(dout, out, True)
    for dst, src in zip((dq, dk, dv), g):
        _write(dst, src)
    return softmax_d


def _cu_lists(cu_q, cu_k):
    as_list = (lambda c: [int(x) for x in (c.reshape(-1).tolist() if isinstance(c, torch.Tensor)
                                            else c)])
    return as_list(cu_q), as_list(cu_k)


# ----------------------------------------------------------------------------------------------
# autograd and the public functions
# ----------------------------------------------------------------------------------------------
class _FlashAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call):  # noqa: D102
        out, lse = _forward(q, k, v, call)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):  # noqa: D102
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, ctx.call)
        return dq, dk, dv, None


def _window(window_size):
    left, right = window_size if window_size is not None else (-1, -1)
    return left, right


def _result(out, lse, return_attn_probs):
    return (out, lse, None) if return_attn_probs else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False):
    """flash-attn's ``flash_attn_func`` on CPU tensors (float32, float16, bfloat16).

    q ``(B,S1,H,D)``, k/v ``(B,S2,Hk,D)`` (H % Hk == 0); returns out ``(B,S1,H,D)``, or
    ``(out, softmax_lse (B,H,S1) float32, None)`` with ``return_attn_probs``.  Differentiable
    in q, k, v.  See the module docstring for every argument's mapping.
    """
    _unsupported("flash_attn_func", softcap=softcap)
    left, right = _window(window_size)
    call = _Call(q, k, dropout_p, softmax_scale, causal, left, right, alibi_slopes, None)
    out, lse = _FlashAttnFunction.apply(q, k, v, call)
    return _result(out, lse, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """``flash_attn_kvpacked_func``: kv ``(B,S2,2,Hk,D)``."""
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """``flash_attn_qkvpacked_func``: qkv ``(B,S,3,H,D)``."""
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale,
                           causal, window_size, softcap, alibi_slopes, deterministic,
                           return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
    """flash-attn's ``flash_attn_varlen_func``: q ``(total_q,H,D)``, k/v ``(total_k,Hk,D)``,
    ``cu_seqlens_*`` int32 ``(B+1,)`` with the leading 0 (equal neighbours: empty sequences,
    whose rows are 0 with lse -inf); ``max_seqlen_*`` are accepted and not needed.  softmax_lse
    (with ``return_attn_probs``) is ``(H,total_q)``."""
    _unsupported("flash_attn_varlen_func", softcap=softcap, block_table=block_table)
    left, right = _window(window_size)
    call = _Call(q, k, dropout_p, softmax_scale, causal, left, right, alibi_slopes, None,
                 varlen=_cu_lists(cu_seqlens_q, cu_seqlens_k))
    out, lse = _FlashAttnFunction.apply(q, k, v, call)
    return _result(out, lse, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False):
    """``flash_attn_varlen_kvpacked_func``: kv ``(total_k,2,Hk,D)``."""
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k,
                                  max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                                  window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                     softmax_scale=None, causal=False, window_size=(-1, -1),
                                     softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """``flash_attn_varlen_qkvpacked_func``: qkv ``(total,3,H,D)``."""
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens,
                                  max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                                  window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_with_kvcache(*args, **kwargs):
    """Not provided (paged / in-place KV-cache decoding): NotImplementedError."""
    raise NotImplementedError("fag_numba.flash_attn: flash_attn_with_kvcache is not supported; "
                              "use flash_attn_func with the cached k/v (causal is bottom-right)")


_INTERFACE = [n for n in __all__ if n != "install"] + [
    "flash_attn_with_kvcache", "_flash_attn_forward", "_flash_attn_backward",
    "_flash_attn_varlen_forward", "_flash_attn_varlen_backward"]


def install():
    """Make ``import flash_attn`` and ``from flash_attn.flash_attn_interface import ...`` (the
    public functions, ``flash_attn_with_kvcache`` and the four private kernels) resolve to this
    module's functions; ``importlib.util.find_spec("flash_attn")`` answers too.  Idempotent;
    returns the ``flash_attn`` module.  Note: transformers' own flash-attention detection also
    wants a ``flash-attn`` distribution (package metadata), so it does not pick this up; use
    ``fag_numba.transformers.register()`` there."""
    from fag_numba.torch.npu_install import install_modules

    import sys
    existing = sys.modules.get("flash_attn")
    if existing is not None:
        if getattr(existing, "__fag_numba_stub__", False):
            return existing
        raise fag_numba.FagValueError("fag_numba.flash_attn.install: a real flash_attn is "
                                      f"already imported ({getattr(existing, '__file__', '')!r});"
                                      " not replacing it")
    top = types.ModuleType("flash_attn", "fag_numba.flash_attn installed as flash_attn")
    iface = types.ModuleType("flash_attn.flash_attn_interface")
    for m in (top, iface):
        m.__fag_numba_stub__ = True
        m.__version__ = FLASH_ATTN_VERSION
        m.__file__ = __file__
        for name in _INTERFACE:
            setattr(m, name, globals()[name])
    top.flash_attn_interface = iface
    install_modules({"flash_attn": top, "flash_attn.flash_attn_interface": iface})
    return top
