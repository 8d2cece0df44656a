"""The ``"fag_numba"`` attention implementation for Hugging Face transformers (SPEC §11).

::

    import fag_numba.transformers
    fag_numba.transformers.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fag_numba")

``register()`` adds :func:`attention_forward` to transformers' attention-function registry
(``AttentionInterface`` / ``ALL_ATTENTION_FUNCTIONS``) and, for its masks, transformers' own
flash-attention mask builder to ``AttentionMaskInterface``: models then hand the attention the
2-D padding mask ``[B, S2]`` (1/True = token, None when there is no padding) instead of a dense
``[B, 1, S1, S2]`` mask, so padding becomes varlen (TND) and nothing is computed on it.
Importing this module does not import transformers or torch; ``register()`` does.

How transformers' conventions map onto fag_numba (one place per convention, STYLE b2b):

| transformers | fag_numba call |
|---|---|
| query ``[B,N1,S1,D]``, key/value ``[B,N2,S2,D]`` (GQA: N1 % N2 == 0) | ``input_layout="BSND"`` (transposed views; GQA native, no ``repeat_kv``) |
| ``scaling`` (None -> ``1/sqrt(D)``) | ``scale`` |
| ``dropout`` (p; the models pass 0.0 in eval) | ``keep_prob = 1 - p``, seed drawn from torch's CPU generator |
| ``is_causal`` (or ``module.is_causal``) | ``sparse_mode=3`` (bottom-right: KV-cache decode S1 < S2 sees the whole cache) with the ``[2048,2048]`` ``triu(1)`` mask |
| causal + ``sliding_window=W`` (``kv > q - W``) | ``sparse_mode=4, pre_tokens=W-1, next_tokens=0`` (bottom-right band) |
| bidirectional + ``sliding_window=W`` (``|q - kv| <= W``, transformers' sdpa mask) | ``sparse_mode=4, pre_tokens=W, next_tokens=W`` |
| bidirectional, no window | no mask |
| 2-D padding mask ``[B,S2]`` | ``"TND"``: keys = the mask's tokens; queries = the same tokens when S1 == S2, all S1 queries otherwise (decode, cross-attention); padded query rows return 0 |
| packed rows (``position_ids`` restarting, no mask) or ``cu_seq_lens_q/k`` kwargs | ``"TND"`` with one sequence per packed segment |
| a 4-D bool mask (True = keep) or additive float mask (0 / -inf or dtype min) given by the caller | ``sparse_mode=1`` with ``atten_mask = not keep`` (dense: computes every tile) |

Decisions: ``softcap``, attention sinks (``s_aux``) and additive masks with other values than
0/-inf have no fag_numba equivalent: ``NotImplementedError``.  ``output_attentions`` returns
``None`` weights (as transformers' sdpa and flash backends do).  Tensors must be on the CPU.
With a KV cache, padding must be left padding (what ``generate`` produces), as for
flash-attention.
"""
from __future__ import annotations

import math

NAME = "fag_numba"
INT32_MAX = 2147483647

__all__ = ["register", "attention_forward", "NAME"]

_CAUSAL = {}


def _causal_mask():
    import torch
    if "m" not in _CAUSAL:
        _CAUSAL["m"] = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
    return _CAUSAL["m"]


def register(name: str = NAME) -> str:
    """Register fag_numba as the attention implementation ``name`` (default ``"fag_numba"``)
    in transformers' ``AttentionInterface`` and its 2-D (padding) mask builder in
    ``AttentionMaskInterface``.  Idempotent; returns ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


def _mask_options(causal, window, s1, s2):
    """(sparse_mode, pre_tokens, next_tokens, needs the compressed mask) for one call."""
    if window is not None and window > 0:
        if causal:
            return 4, window - 1, 0, True
        return 4, window, window, True
    if causal:
        return 3, INT32_MAX, INT32_MAX, True
    return 0, INT32_MAX, INT32_MAX, False


def _segments_from_positions(position_ids, b, s):
    """cu_seqlens (with leading 0) of the packed segments of ``position_ids`` [B or 1, S] flattened
    over B*S, or None when no row restarts (transformers' rule: a new segment wherever
    ``position_ids[t] != position_ids[t-1] + 1``)."""
    import torch
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != s or s < 2:
        return None
    pos = position_ids.expand(b, s)
    restart = torch.ones_like(pos, dtype=torch.bool)
    restart[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if not bool(restart[:, 1:].any()):
        return None
    starts = torch.nonzero(restart.reshape(-1)).reshape(-1)
    return starts.tolist()[1:] + [b * s]


def _dense_keep(mask):
    """A caller's 4-D mask as 'True = masked' for sparse_mode 1."""
    import torch
    if mask.dtype == torch.bool:
        return ~mask
    lo = torch.finfo(mask.dtype).min
    masked = (mask == float("-inf")) | (mask <= lo / 2)
    if not bool(((mask == 0) | masked).all()):
        raise NotImplementedError("fag_numba attention: an additive float attention mask with "
                                  "values other than 0 and -inf/dtype-min (a bias) is not "
                                  "supported; pass a bool mask")
    return masked


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      sliding_window=None, softcap=None, is_causal=None, s_aux=None, **kwargs):
    """transformers attention function (the registry's signature) on fag_numba.

    query ``[B,N1,S1,D]``, key ``[B,N2,S2,D]``, value ``[B,N2,S2,Dv]`` (CPU, float32/float16/
    bfloat16); ``attention_mask`` the 2-D padding mask ``[B,S2]`` (or None, or a caller's 4-D
    mask); returns ``(attn_output [B,S1,N1,Dv], None)``.  See the module docstring for the
    mapping of every argument.
    """
    import torch

    from fag_numba.flash_attn import tnd_offsets
    from fag_numba.torch import flash_attention

    if softcap:
        raise NotImplementedError("fag_numba attention: softcap (logit soft-capping) is not "
                                  "supported by fag_numba")
    if s_aux is not None:
        raise NotImplementedError("fag_numba attention: attention sinks (s_aux) are not "
                                  "supported by fag_numba")
    b, n1, s1, d = query.shape
    s2 = key.shape[2]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    keep_prob = 1.0 - float(dropout or 0.0)
    mode, pre, nxt, compressed = _mask_options(causal, sliding_window, s1, s2)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))     # [B, S, N, D]
    common = dict(scale=scale, keep_prob=keep_prob, sparse_mode=mode, pre_tokens=pre,
                  next_tokens=nxt, atten_mask=_causal_mask() if compressed else None)

    if attention_mask is not None and attention_mask.dim() == 4:
        common.update(sparse_mode=1, atten_mask=_dense_keep(attention_mask),
                      pre_tokens=INT32_MAX, next_tokens=INT32_MAX)
        return flash_attention(q, k, v, n1, "BSND", **common), None

    cu_q = cu_k = None
    if attention_mask is None:
        cu_q_kw, cu_k_kw = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if cu_q_kw is not None and cu_k_kw is not None:
            cu_q, cu_k = ([int(x) for x in c.reshape(-1).tolist()[1:]] for c in (cu_q_kw, cu_k_kw))
        elif s1 == s2:
            cu_q = _segments_from_positions(kwargs.get("position_ids"), b, s1)
            cu_k = cu_q
        if cu_q is None:
            return flash_attention(q, k, v, n1, "BSND", **common), None
        qt, kt, vt = (t.reshape(-1, *t.shape[2:]) for t in (q, k, v))
        out = flash_attention(qt, kt, vt, n1, "TND", actual_seq_qlen=cu_q, actual_seq_kvlen=cu_k,
                              **common)
        return out.reshape(b, s1, n1, -1), None

    # padding: keys are the mask's tokens; queries too when S1 == S2, else every query row
    keep_k = attention_mask[:, -s2:].to(torch.bool)
    idx_k = torch.nonzero(keep_k.reshape(-1)).reshape(-1)
    cu_k = torch.cumsum(keep_k.sum(1), 0).tolist()
    kt, vt = (t.reshape(b * s2, *t.shape[2:]).index_select(0, idx_k) for t in (k, v))
    qflat = q.reshape(b * s1, *q.shape[2:])
    if s1 == s2:
        idx_q, cu_q = idx_k, cu_k
        qt = qflat.index_select(0, idx_q)
    else:
        idx_q, cu_q = None, [s1 * (i + 1) for i in range(b)]
        qt = qflat
    cu_q, cu_k, _ = tnd_offsets([0] + cu_q, [0] + cu_k)    # drops leading empty sequences
    out = flash_attention(qt, kt, vt, n1, "TND", actual_seq_qlen=cu_q, actual_seq_kvlen=cu_k,
                          **common)
    if idx_q is not None:
        out = out.new_zeros(b * s1, *out.shape[1:]).index_copy(0, idx_q, out)
    return out.reshape(b, s1, n1, -1), None
