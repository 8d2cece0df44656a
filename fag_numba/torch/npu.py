"""torch_npu-compatible functions and CPU autograd (SPEC §11); re-exported by ``fag_numba.torch``.

``import fag_numba`` never imports this module (nor torch); ``import fag_numba.torch`` does.
Porting NPU code is a one-line change::

    import fag_numba.torch as torch_npu        # instead of: import torch_npu
    out, m, s, _, seed, offset, numels = torch_npu.npu_fusion_attention(q, k, v, n, "BSND", ...)

Public functions
----------------
- :func:`npu_fusion_attention`, :func:`npu_fusion_attention_grad` (torch_npu's schemas:
  ``pre_tockens``/``next_tockens``; forward ``scale``, grad ``scale_value``) and
  :func:`npu_fusion_attention_v2`, :func:`npu_fusion_attention_grad_v2` (``pre_tokens`` spelling,
  ``pse_type``, ``q_start_idx``, ``kv_start_idx``, keyword-only after ``input_layout``).
  Every one of them also accepts the other spelling (``pre_tokens``/``pre_tockens``,
  ``next_tokens``/``next_tockens``) and the other scale name (``scale``/``scale_value``, as
  MindSpeed's wrappers use) as extra keyword-only parameters; giving both names with different
  values raises ``fag_numba.FagValueError``.
- :class:`FlashAttentionFunction` (a ``torch.autograd.Function``) and :func:`flash_attention`
  (its convenience wrapper, default scale ``1/sqrt(D)``), usable inside ``nn.Module``s.
- :func:`tensor_to_numpy` / :func:`numpy_to_tensor`: the dtype bridges (zero-copy views).

The forward functions are differentiable like torch_npu's (whose ``derivatives.yaml`` maps them
to ``npu_fusion_attention_grad``): when ``query``/``key``/``value``/``pse`` require grad, the
output has a ``grad_fn`` that runs fag_numba's backward with the saved statistics and the saved
dropout ``(seed, offset)``.

Decisions
---------
- **Tensors**: CPU tensors only (another device is a ``FagValueError``), any strides
  (``.contiguous()`` first).  dtypes: float32 and float16 through ``Tensor.numpy()``; bfloat16
  through a same-size int16 view (``t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)``),
  float8_e4m3fn / float8_e5m2 through uint8 views; all zero-copy.  Results come back with
  ``torch.from_numpy`` (bf16 via an int16 view), also zero-copy.  float64 is not supported
  (fag_numba computes in float32): ``fag_numba.FagTypeError``.
- **Dropout** in the ``npu_*`` forwards (``keep_prob < 1``, no ``dropout_mask``): if
  ``seed == 0 and offset == 0`` (the defaults) a fresh seed is drawn from torch's default CPU
  generator (``torch.randint``; so ``torch.manual_seed`` makes runs reproducible) and offset 0 is
  used; otherwise the given ``(seed, offset)`` are used.  The forward runs fag_numba with that
  ``(seed, offset)`` and returns
  them with ``numels = B*N1*S1*S2`` (TND: ``N1*sum_b S1_b*S2_b``), so the grad called with the
  returned triple regenerates the same keep bits, as on the NPU.  The bits are fag_numba's own
  counter-based generator (``fag_numba.dropout_mask``), not the NPU's.  With an explicit
  ``dropout_mask`` (uint8, packed bit stream, 1 = keep) the forward uses it, but
  ``npu_fusion_attention_grad`` has no mask input (torch_npu's schema) and regenerates from
  ``(seed, offset)``: use :func:`flash_attention` (``drop_mask=``), the autograd path of the
  forward, or the numpy API to differentiate through an explicit mask.  ``numels`` given to the
  grad must be 0 or the forward's value.  :func:`flash_attention` draws a seed when ``seed`` is
  None (its default) and saves it for the backward.
- **Returns**: forward 7-tuple ``(attention_out, softmax_max, softmax_sum, softmax_out, seed,
  offset, numels)`` with ``softmax_out`` an empty tensor (reserved on the NPU too); grad
  ``(dq, dk, dv, dpse)``, and ``(dq, dk, dv, dpse, dq_rope, dk_rope, dsink)`` for ``_grad_v2``
  (the last three always empty).  ``dpse`` is an empty ``[0]`` tensor without pse (the NPU's
  convention) and also for compressed ALiBi pse ``[.,N1,1024,S2]`` (not computed, SPEC §4.4);
  otherwise it is the real pse gradient (beyond the NPU, which returns no useful dpse): like
  pse for pse_type 0/1 (summed over broadcast dims), the float32 slope gradient for 2/3.
- **Ignored** (accepted, no effect, as SPEC §1 says): ``padding_mask``, ``softmax_in``,
  ``gen_mask_parallel``, ``sync``; ``inner_precise`` is validated (0..2) and changes nothing.
- **NotImplementedError** (fag_numba has no such feature): ``sink`` (attention sinks),
  ``query_rope``/``key_rope`` (MLA rope split), the autograd backward of float8 inputs (dy would
  have to be float8; call :func:`npu_fusion_attention_grad` with a float8 ``dy`` instead), and
  the gradient of a compressed ALiBi pse requested through autograd.
- **float64 / gradcheck**: fag_numba has no float64 path.  The tests check the autograd gradients
  of :func:`flash_attention` on float32 tensors against torch float64 autograd of the SDPA math
  formula on tiny cases (tolerance from float32 rounding), and additionally run
  ``torch.autograd.gradcheck`` on a float64-in/float64-out wrapper that computes in float32,
  with relaxed ``eps=1e-3, atol=2e-3, rtol=1e-2`` (finite differences of a float32 function
  cannot meet float64 tolerances; this is documented, not hidden).
- **torch.library.custom_op**: ``fag_numba::flash_attention_fwd`` and
  ``fag_numba::flash_attention_bwd`` are registered (``torch.ops.fag_numba.*``; Python handles
  :func:`flash_attention_fwd_op`, :func:`flash_attention_bwd_op`) with fake-tensor kernels and
  the forward's autograd formula (the backward op), for ``torch.compile``/export.  Eager calls
  use :class:`FlashAttentionFunction`; while torch.compile traces, the functions here route
  through the custom op instead (float8 inputs, whose ``out_dtype``/``d_scale_*`` are not in the
  op schema, always use the Function).  The dropout seed is an op input, drawn outside it, so
  the op is a pure function; with dropout and ``fullgraph=True`` pass ``seed=`` yourself (drawing
  one is a ``.item()`` graph break).  Checked with ``torch.library.opcheck``; a
  ``torch.compile(fullgraph=True)`` forward+backward is a slow-lane test (a cold compile costs
  ~40 s on the 2-core CI box).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
from typing import Any, Optional

import ml_dtypes
import numpy as np
import torch

import fag_numba
from fag_numba.errors import FagTypeError, FagValueError

__all__ = [
    "npu_fusion_attention", "npu_fusion_attention_grad",
    "npu_fusion_attention_v2", "npu_fusion_attention_grad_v2",
    "FlashAttentionFunction", "flash_attention",
    "flash_attention_fwd_op", "flash_attention_bwd_op",
    "tensor_to_numpy", "numpy_to_tensor",
]

INT32_MAX = 2147483647


class _Unset:
    """Default of the alias parameters: 'not given'."""

    def __repr__(self):
        return "<unset>"

    def __bool__(self):
        return False


_UNSET = _Unset()


# ----------------------------------------------------------------------------------------------
# dtype bridges
# ----------------------------------------------------------------------------------------------
def _bridges():
    """torch dtype -> (same-size torch view dtype or None, numpy dtype) and its inverse."""
    to_np = {
        torch.float32: (None, np.dtype(np.float32)),
        torch.float16: (None, np.dtype(np.float16)),
        torch.bfloat16: (torch.int16, np.dtype(ml_dtypes.bfloat16)),
        torch.float8_e4m3fn: (torch.uint8, np.dtype(ml_dtypes.float8_e4m3fn)),
        torch.float8_e5m2: (torch.uint8, np.dtype(ml_dtypes.float8_e5m2)),
    }
    to_torch = {npdt: (tdt, view) for tdt, (view, npdt) in to_np.items()}
    return to_np, to_torch


_TO_NP, _TO_TORCH = _bridges()
_VIEW_NP = {torch.int16: np.int16, torch.uint8: np.uint8}
_OUT_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16",
                    torch.float32: "float32"}


def tensor_to_numpy(t: Optional[torch.Tensor], name: str = "tensor") -> Optional[np.ndarray]:
    """A CPU tensor as a numpy array sharing its memory (after ``.contiguous()``).

    float32 / float16 / integer / bool tensors go through ``Tensor.numpy()``; bfloat16 becomes an
    ``ml_dtypes.bfloat16`` array through an int16 view, float8_e4m3fn / float8_e5m2 become
    ``ml_dtypes`` float8 arrays through uint8 views.  The tensor is detached first (the array does
    not track gradients).  ``None`` passes through; a non-tensor is returned unchanged (the numpy
    API validates it).  A tensor on another device raises ``FagValueError``.
    """
    if t is None or not isinstance(t, torch.Tensor):
        return t
    if t.device.type != "cpu":
        raise FagValueError(f"fag_numba.torch: {name} must be a CPU tensor (fag_numba runs on the "
                            f"CPU), got a tensor on device {t.device}")
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    t = t.contiguous()
    entry = _TO_NP.get(t.dtype)
    if entry is None or entry[0] is None:
        return t.numpy()
    view, npdt = entry
    return t.view(view).numpy().view(npdt)


def numpy_to_tensor(a: Optional[np.ndarray]) -> Optional[torch.Tensor]:
    """A numpy array as a CPU tensor sharing its memory (``torch.from_numpy``).

    ``ml_dtypes.bfloat16`` arrays come back as bfloat16 tensors through an int16 view, ml_dtypes
    float8 arrays as float8 tensors through a uint8 view.  A read-only array is copied first
    (torch does not support read-only memory).  ``None`` passes through.
    """
    if a is None:
        return None
    if not a.flags.writeable:
        a = a.copy()
    entry = _TO_TORCH.get(a.dtype)
    if entry is None or entry[1] is None:
        return torch.from_numpy(a)
    tdt, view = entry
    return torch.from_numpy(a.view(_VIEW_NP[view])).view(tdt)


def _check_qkv(t, name):
    """query/key/value/dy must be tensors; float64 is rejected with a message that says why."""
    if not isinstance(t, torch.Tensor):
        raise FagTypeError(f"fag_numba.torch: {name} must be a torch.Tensor, got "
                           f"{type(t).__name__}")
    if t.dtype == torch.float64:
        raise FagTypeError(f"fag_numba.torch: {name} is float64; fag_numba computes in float32 "
                           f"and accepts float32, float16, bfloat16, float8_e4m3fn or "
                           f"float8_e5m2 (cast with .float())")


def _qkv_np(t, name):
    _check_qkv(t, name)
    return tensor_to_numpy(t, name)


def _int_list(x):
    """int[]? arguments: tensors become lists, tuples/lists of tensors or numpy ints become lists
    of ints; anything else passes through (the numpy API validates it)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]
    if isinstance(x, (list, tuple)):
        return [int(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v for v in x]
    return x


def _scale_arg(x, name):
    """d_scale_*: a real, or a float32 tensor -> numpy; anything else passes to validation."""
    if isinstance(x, torch.Tensor):
        return tensor_to_numpy(x, name)
    return x


def _out_dtype_arg(x):
    if isinstance(x, torch.dtype):
        if x not in _OUT_DTYPE_NAMES:
            raise FagValueError(f"fag_numba.torch: out_dtype must be torch.float16, "
                                f"torch.bfloat16 or torch.float32, got {x}")
        return _OUT_DTYPE_NAMES[x]
    return x


def _empty(like: Optional[torch.Tensor] = None) -> torch.Tensor:
    return torch.empty(0, dtype=like.dtype if like is not None else torch.float32)


# ----------------------------------------------------------------------------------------------
# aliases and unsupported arguments
# ----------------------------------------------------------------------------------------------
def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - anything not comparable is a conflict
        return False


def _accepts_aliases(**aliases):
    """Decorator: keyword-only alias parameters (``alias=canonical``) of the wrapped function are
    folded into their canonical parameter.  Both given with different values -> FagValueError.
    The wrapped function's signature (``inspect.signature``) is unchanged."""
    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            given = bound.arguments
            for alias, canon in aliases.items():
                if alias not in given or given[alias] is _UNSET:
                    continue
                value = given.pop(alias)
                if canon in given and not _same(given[canon], value):
                    raise FagValueError(
                        f"{fn.__name__}: {canon}={given[canon]!r} and {alias}={value!r} name the "
                        f"same argument with different values; pass one of them")
                given[canon] = value
            return fn(*bound.args, **bound.kwargs)
        return wrapper
    return deco


def _reject_unsupported(fn_name, **args):
    for name, value in args.items():
        if value is not None:
            raise NotImplementedError(f"{fn_name}: {name} is not supported by fag_numba "
                                      f"(got {_describe(value)}); pass None")


def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return repr(x)


# ----------------------------------------------------------------------------------------------
# options and the autograd function
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Opts:
    """Every non-tensor argument of one attention call (numpy-API names)."""
    head_num: Any
    input_layout: Any
    scale_value: Any = 1.0
    keep_prob: Any = 1.0
    pre_tokens: Any = INT32_MAX
    next_tokens: Any = INT32_MAX
    inner_precise: Any = 0
    prefix: Any = None
    actual_seq_qlen: Any = None
    actual_seq_kvlen: Any = None
    sparse_mode: Any = 0
    pse_type: Any = 1
    q_start_idx: Any = None
    kv_start_idx: Any = None
    softmax_layout: Any = ""
    seed: Any = None
    offset: Any = 0
    d_scale_q: Any = None
    d_scale_k: Any = None
    d_scale_v: Any = None
    out_dtype: Any = None

    def kwargs(self):
        """The numpy API's keyword arguments (everything but head_num and input_layout)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("head_num", "input_layout")}


def _dropout_active(keep_prob) -> bool:
    """float32(keep_prob) < 1, in plain Python (traceable by dynamo): the float32 rounding of x
    is below 1 iff x < 1 - 2**-25 (the tie rounds to even, 1.0).  A bad keep_prob is False here;
    the numpy API reports it."""
    if isinstance(keep_prob, bool) or not isinstance(keep_prob, numbers.Real):
        return False
    return float(keep_prob) < 1.0 - 2.0 ** -25


def _draw_seed(generator=None) -> int:
    """A dropout seed from torch's (default) CPU generator."""
    return int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, generator=generator).item())


def _forward_tensors(query, key, value, pse, atten_mask, drop_mask, opts):
    """fag_numba's forward on tensors: (attention_out, softmax_max, softmax_sum), new tensors."""
    res = fag_numba.flash_attention_score(
        _qkv_np(query, "query"), _qkv_np(key, "key"), _qkv_np(value, "value"),
        opts.head_num, opts.input_layout, pse=tensor_to_numpy(pse, "pse"),
        atten_mask=tensor_to_numpy(atten_mask, "atten_mask"),
        drop_mask=tensor_to_numpy(drop_mask, "dropout_mask"), **opts.kwargs())
    return tuple(numpy_to_tensor(a) for a in res)


def _backward_tensors(dout, query, key, value, out, smax, ssum, pse, atten_mask, drop_mask,
                      opts):
    """fag_numba's grad on tensors with the forward's results: (dq, dk, dv, dpse or None)."""
    if query.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise NotImplementedError(
            "fag_numba.torch: the autograd backward of float8 inputs is not supported (dy "
            "would have to be float8 too); call npu_fusion_attention_grad with a float8 dy "
            "and d_scale_* instead")
    kw = opts.kwargs()
    for name in ("out_dtype", "d_scale_q", "d_scale_k", "d_scale_v"):
        kw.pop(name)
    g = fag_numba.flash_attention_score_grad(
        tensor_to_numpy(query, "query"), tensor_to_numpy(key, "key"),
        tensor_to_numpy(value, "value"), tensor_to_numpy(dout.to(query.dtype), "dy"),
        opts.head_num, opts.input_layout, pse=tensor_to_numpy(pse, "pse"),
        atten_mask=tensor_to_numpy(atten_mask, "atten_mask"),
        drop_mask=tensor_to_numpy(drop_mask, "dropout_mask"),
        softmax_max=tensor_to_numpy(smax), softmax_sum=tensor_to_numpy(ssum),
        attention_in=tensor_to_numpy(out), **kw)
    return tuple(numpy_to_tensor(a) for a in g)


_NO_DPSE = ("fag_numba.torch: the gradient of a compressed ALiBi pse [.,N1,1024,S2] is not "
            "computed (SPEC §4.4); detach the pse or pass the full bias")


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd function over fag_numba's forward and FlashAttentionScoreGrad.

    ``FlashAttentionFunction.apply(query, key, value, pse, atten_mask, drop_mask, opts)`` with
    ``opts`` a ``fag_numba.torch._Opts`` returns ``(attention_out, softmax_max, softmax_sum)``;
    the statistics are marked non-differentiable.  It saves q, k, v, the output, the statistics,
    pse and the masks (``save_for_backward``) and the options (with the dropout seed/offset) on
    ``ctx``; the backward returns dq, dk, dv and dpse (when pse requires grad).  Use
    :func:`flash_attention` rather than calling this directly.
    """

    @staticmethod
    def forward(ctx, query, key, value, pse, atten_mask, drop_mask, opts):  # noqa: D102
        out, smax, ssum = _forward_tensors(query, key, value, pse, atten_mask, drop_mask, opts)
        ctx.mark_non_differentiable(smax, ssum)
        ctx.save_for_backward(query, key, value, out, smax, ssum, pse, atten_mask, drop_mask)
        ctx.opts = opts
        return out, smax, ssum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dmax, _dsum):  # noqa: D102
        query, key, value, out, smax, ssum, pse, atten_mask, drop_mask = ctx.saved_tensors
        dq, dk, dv, dpse = _backward_tensors(dout, query, key, value, out, smax, ssum, pse,
                                             atten_mask, drop_mask, ctx.opts)
        if pse is None or not ctx.needs_input_grad[3]:
            dpse = None
        elif dpse is None:
            raise NotImplementedError(_NO_DPSE)
        return dq, dk, dv, dpse, None, None, None




# ----------------------------------------------------------------------------------------------
# torch.library custom ops (torch.compile / export): fag_numba::flash_attention_fwd / _bwd
# ----------------------------------------------------------------------------------------------
Tensor = torch.Tensor


def _op_opts(head_num, input_layout, scale_value, keep_prob, pre_tokens, next_tokens,
             inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode, pse_type,
             q_start_idx, kv_start_idx, softmax_layout, seed, offset):
    return _Opts(head_num=head_num, input_layout=input_layout, scale_value=scale_value,
                 keep_prob=keep_prob, pre_tokens=pre_tokens, next_tokens=next_tokens,
                 inner_precise=inner_precise, prefix=prefix, actual_seq_qlen=actual_seq_qlen,
                 actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode, pse_type=pse_type,
                 q_start_idx=q_start_idx, kv_start_idx=kv_start_idx,
                 softmax_layout=softmax_layout, seed=seed, offset=offset)


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@torch.library.custom_op("fag_numba::flash_attention_fwd", mutates_args=())
def flash_attention_fwd_op(
        query: Tensor, key: Tensor, value: Tensor, pse: Optional[Tensor],
        atten_mask: Optional[Tensor], drop_mask: Optional[Tensor], head_num: int,
        input_layout: str, scale_value: float, keep_prob: float, pre_tokens: int,
        next_tokens: int, inner_precise: int, prefix: Optional[list[int]],
        actual_seq_qlen: Optional[list[int]], actual_seq_kvlen: Optional[list[int]],
        sparse_mode: int, pse_type: int, q_start_idx: Optional[list[int]],
        kv_start_idx: Optional[list[int]], softmax_layout: str, seed: Optional[int],
        offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.fag_numba.flash_attention_fwd``: fag_numba's forward as a custom op
    (float32/float16/bfloat16; float8 needs out_dtype/d_scale_* and is not in the schema).
    Returns (attention_out, softmax_max, softmax_sum); differentiable through
    ``fag_numba::flash_attention_bwd``.  The dropout seed is an input (draw it outside)."""
    if query.dtype in _FP8:
        raise NotImplementedError("fag_numba::flash_attention_fwd: float8 inputs are not in the "
                                  "custom op's schema; use flash_attention(..., out_dtype=...)")
    opts = _op_opts(head_num, input_layout, scale_value, keep_prob, pre_tokens, next_tokens,
                    inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode,
                    pse_type, q_start_idx, kv_start_idx, softmax_layout, seed, offset)
    return _forward_tensors(query, key, value, pse, atten_mask, drop_mask, opts)


def _fake_shapes(query, key, value, head_num, input_layout):
    """(attention_out shape, statistics shape) without computing (the fake / meta kernel)."""
    lay = input_layout.upper()
    qs = tuple(query.shape)
    if lay == "TND":
        return qs[:-1] + (value.shape[-1],), (qs[0], head_num, 8)
    if lay in ("BSH", "SBH"):
        d = qs[-1] // head_num
        n2 = key.shape[-1] // d if d else 0
        dv = value.shape[-1] // n2 if n2 else 0
        b, s1 = (qs[0], qs[1]) if lay == "BSH" else (qs[1], qs[0])
        return qs[:-1] + (head_num * dv,), (b, head_num, s1, 8)
    b, s1 = (qs[0], qs[1]) if lay == "BSND" else (qs[0], qs[2])
    return qs[:-1] + (value.shape[-1],), (b, head_num, s1, 8)


@flash_attention_fwd_op.register_fake
def _(query, key, value, pse, atten_mask, drop_mask, head_num, input_layout, *args):
    out_shape, st_shape = _fake_shapes(query, key, value, head_num, input_layout)
    return (query.new_empty(out_shape), query.new_empty(st_shape, dtype=torch.float32),
            query.new_empty(st_shape, dtype=torch.float32))


@torch.library.custom_op("fag_numba::flash_attention_bwd", mutates_args=())
def flash_attention_bwd_op(
        dy: Tensor, query: Tensor, key: Tensor, value: Tensor, attention_out: Tensor,
        softmax_max: Tensor, softmax_sum: Tensor, pse: Optional[Tensor],
        atten_mask: Optional[Tensor], drop_mask: Optional[Tensor], head_num: int,
        input_layout: str, scale_value: float, keep_prob: float, pre_tokens: int,
        next_tokens: int, inner_precise: int, prefix: Optional[list[int]],
        actual_seq_qlen: Optional[list[int]], actual_seq_kvlen: Optional[list[int]],
        sparse_mode: int, pse_type: int, q_start_idx: Optional[list[int]],
        kv_start_idx: Optional[list[int]], softmax_layout: str, seed: Optional[int],
        offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``torch.ops.fag_numba.flash_attention_bwd``: (dq, dk, dv, dpse) from the forward's
    results; dpse is an empty tensor without pse or for compressed ALiBi."""
    opts = _op_opts(head_num, input_layout, scale_value, keep_prob, pre_tokens, next_tokens,
                    inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode,
                    pse_type, q_start_idx, kv_start_idx, softmax_layout, seed, offset)
    dq, dk, dv, dpse = _backward_tensors(dy, query, key, value, attention_out, softmax_max,
                                         softmax_sum, pse, atten_mask, drop_mask, opts)
    return dq, dk, dv, dpse if dpse is not None else _empty(query)


def _compressed_alibi(pse, query, head_num, input_layout, pse_type):
    """True when the grad returns no dpse for this pse (SPEC §4.4: [.,N1,1024,S2] form)."""
    if pse is None or pse_type not in (0, 1) or pse.dim() != 4 or pse.shape[2] != 1024:
        return False
    _, st_shape = _fake_shapes(query, query, query, head_num, input_layout)
    return len(st_shape) == 4 and st_shape[2] > 1024


@flash_attention_bwd_op.register_fake
def _(dy, query, key, value, attention_out, softmax_max, softmax_sum, pse, atten_mask,
      drop_mask, head_num, input_layout, scale_value, keep_prob, pre_tokens, next_tokens,
      inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode, pse_type, *args):
    if pse is None or _compressed_alibi(pse, query, head_num, input_layout, pse_type):
        dpse = query.new_empty((0,))
    else:
        dpse = torch.empty_like(pse)
    return (torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), dpse)


_OP_TENSORS = 6          # query, key, value, pse, atten_mask, drop_mask lead the fwd schema


def _op_setup_context(ctx, inputs, output):
    out, smax, ssum = output
    ctx.mark_non_differentiable(smax, ssum)
    ctx.save_for_backward(*inputs[:_OP_TENSORS], out, smax, ssum)
    ctx.attrs = inputs[_OP_TENSORS:]


def _op_backward(ctx, dout, _dmax, _dsum):
    query, key, value, pse, atten_mask, drop_mask, out, smax, ssum = ctx.saved_tensors
    dq, dk, dv, dpse = torch.ops.fag_numba.flash_attention_bwd(
        dout, query, key, value, out, smax, ssum, pse, atten_mask, drop_mask, *ctx.attrs)
    if pse is None or not ctx.needs_input_grad[3]:
        dpse = None
    elif dpse.numel() == 0 and pse.numel() != 0:
        raise NotImplementedError(_NO_DPSE)
    return (dq, dk, dv, dpse) + (None,) * (len(ctx.needs_input_grad) - 4)


flash_attention_fwd_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _op_args(o: _Opts):
    """The custom ops' non-tensor arguments, in schema order, from an _Opts."""
    def ints(x):
        if x is None:
            return None
        if isinstance(x, (list, tuple, np.ndarray)):
            return [int(v) for v in x]
        return [int(x)]
    return (o.head_num, o.input_layout, float(o.scale_value), float(o.keep_prob), o.pre_tokens,
            o.next_tokens, o.inner_precise, ints(o.prefix), ints(o.actual_seq_qlen),
            ints(o.actual_seq_kvlen), o.sparse_mode, o.pse_type, ints(o.q_start_idx),
            ints(o.kv_start_idx), o.softmax_layout, None if o.seed is None else int(o.seed),
            int(o.offset))


def _compiling() -> bool:
    """True while torch.compile traces (then the custom op is used instead of the Function)."""
    return torch.compiler.is_compiling()


def _attention(query, key, value, pse, atten_mask, drop_mask, opts):
    """Run the forward, differentiable when inputs need grad: through FlashAttentionFunction in
    eager mode, through the ``fag_numba::flash_attention_fwd`` custom op under torch.compile
    (float8 inputs always take the Function path)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_qkv(t, name)
    if _compiling() and query.dtype not in _FP8:
        return torch.ops.fag_numba.flash_attention_fwd(query, key, value, pse, atten_mask,
                                                       drop_mask, *_op_args(opts))
    return FlashAttentionFunction.apply(query, key, value, pse, atten_mask, drop_mask, opts)


def _numels(query, key, head_num, input_layout, actual_seq_qlen, actual_seq_kvlen) -> int:
    """B*N1*S1*S2, TND N1*sum S1_b*S2_b (called after the numpy API validated the arguments)."""
    lay = input_layout.upper()
    if lay == "TND":
        from fag_numba.layout import parse_varlen
        sq, sk, _, _ = parse_varlen(actual_seq_qlen, actual_seq_kvlen, query.shape[0],
                                    key.shape[0])
        return int(head_num) * int(np.sum(sq * sk))
    b_ax, s_ax = {"BSH": (0, 1), "SBH": (1, 0), "BSND": (0, 1), "BNSD": (0, 2)}[lay]
    return (int(query.shape[b_ax]) * int(head_num) * int(query.shape[s_ax])
            * int(key.shape[s_ax]))


def _npu_forward(query, key, value, head_num, input_layout, *, pse, atten_mask, scale,
                 keep_prob, pre_tokens, next_tokens, inner_precise, prefix, actual_seq_qlen,
                 actual_seq_kvlen, sparse_mode, pse_type, q_start_idx, kv_start_idx,
                 softmax_layout, dropout_mask, seed, offset):
    """Shared body of npu_fusion_attention(_v2): the 7-tuple."""
    seq_q, seq_k = _int_list(actual_seq_qlen), _int_list(actual_seq_kvlen)
    use_seed = None
    if _dropout_active(keep_prob) and dropout_mask is None:
        if seed == 0 and offset == 0:
            seed = _draw_seed()
        use_seed = seed
    opts = _Opts(head_num=head_num, input_layout=input_layout, scale_value=scale,
                 keep_prob=keep_prob, pre_tokens=pre_tokens, next_tokens=next_tokens,
                 inner_precise=inner_precise, prefix=_int_list(prefix), actual_seq_qlen=seq_q,
                 actual_seq_kvlen=seq_k, sparse_mode=sparse_mode, pse_type=pse_type,
                 q_start_idx=_int_list(q_start_idx), kv_start_idx=_int_list(kv_start_idx),
                 softmax_layout=softmax_layout, seed=use_seed, offset=offset)
    out, smax, ssum = _attention(query, key, value, pse, atten_mask, dropout_mask, opts)
    numels = _numels(query, key, head_num, input_layout, seq_q, seq_k)
    return out, smax, ssum, _empty(query), int(seed), int(offset), numels


def _npu_grad(fn_name, query, key, value, dy, head_num, input_layout, *, pse, atten_mask,
              softmax_max, softmax_sum, attention_in, scale_value, keep_prob, pre_tokens,
              next_tokens, inner_precise, seed, offset, numels, prefix, actual_seq_qlen,
              actual_seq_kvlen, sparse_mode, pse_type, q_start_idx, kv_start_idx,
              softmax_layout):
    """Shared body of npu_fusion_attention_grad(_v2): (dq, dk, dv, dpse)."""
    seq_q, seq_k = _int_list(actual_seq_qlen), _int_list(actual_seq_kvlen)
    qn, kn, vn, yn = (_qkv_np(query, "query"), _qkv_np(key, "key"), _qkv_np(value, "value"),
                      _qkv_np(dy, "dy"))
    if _dropout_active(keep_prob) and numels:
        try:
            want = _numels(qn, kn, head_num, input_layout, seq_q, seq_k)
        except Exception:  # noqa: BLE001 - malformed inputs: the numpy API's message wins
            want = None
        if want is not None and _same(want, numels) is False:
            raise FagValueError(f"{fn_name}: numels must be 0 or the number of dropout elements "
                                f"B*N1*S1*S2 (TND N1*sum S1_b*S2_b) = {want}, got {numels}")
    g = fag_numba.flash_attention_score_grad(
        qn, kn, vn, yn, head_num, input_layout, pse=tensor_to_numpy(pse, "pse"),
        atten_mask=tensor_to_numpy(atten_mask, "atten_mask"),
        softmax_max=tensor_to_numpy(softmax_max, "softmax_max"),
        softmax_sum=tensor_to_numpy(softmax_sum, "softmax_sum"),
        attention_in=tensor_to_numpy(attention_in, "attention_in"),
        scale_value=scale_value, keep_prob=keep_prob, pre_tokens=pre_tokens,
        next_tokens=next_tokens, inner_precise=inner_precise, prefix=_int_list(prefix),
        actual_seq_qlen=seq_q, actual_seq_kvlen=seq_k, sparse_mode=sparse_mode,
        pse_type=pse_type, q_start_idx=_int_list(q_start_idx),
        kv_start_idx=_int_list(kv_start_idx), softmax_layout=softmax_layout,
        seed=seed if _dropout_active(keep_prob) else None, offset=offset)
    dpse = numpy_to_tensor(g.dpse) if g.dpse is not None else _empty(query)
    return numpy_to_tensor(g.dq), numpy_to_tensor(g.dk), numpy_to_tensor(g.dv), dpse


# ----------------------------------------------------------------------------------------------
# torch_npu-compatible functions
# ----------------------------------------------------------------------------------------------
@_accepts_aliases(pre_tokens="pre_tockens", next_tokens="next_tockens", scale_value="scale")
def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                         atten_mask=None, scale=1., keep_prob=1., pre_tockens=2147483647,
                         next_tockens=2147483647, inner_precise=0, prefix=None,
                         actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False, softmax_layout="", sink=None,
                         dropout_mask=None, seed=0, offset=0, *, pre_tokens=_UNSET,
                         next_tokens=_UNSET, scale_value=_UNSET):
    """torch_npu.npu_fusion_attention on the CPU (torch_npu's schema; see the module docstring).

    Returns ``(attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)``:
    attention_out like query (last dim Dv) in the query dtype (float16 for float8 inputs);
    softmax_max/sum float32 ``[B,N1,S1,8]`` (TND ``[T1,N1,8]``); softmax_out an empty tensor;
    seed/offset the dropout generator state used (drawn when keep_prob < 1 and both are 0);
    numels the number of dropout elements.  Differentiable in query/key/value/pse.
    ``pre_tokens``/``next_tokens``/``scale_value`` are accepted as aliases.
    """
    _reject_unsupported("npu_fusion_attention", sink=sink)
    return _npu_forward(query, key, value, head_num, input_layout,
                        pse=pse, atten_mask=atten_mask, scale=scale, keep_prob=keep_prob,
                        pre_tokens=pre_tockens, next_tokens=next_tockens,
                        inner_precise=inner_precise, prefix=prefix,
                        actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
                        sparse_mode=sparse_mode, pse_type=1, q_start_idx=None, kv_start_idx=None,
                        softmax_layout=softmax_layout, dropout_mask=dropout_mask, seed=seed,
                        offset=offset)


@_accepts_aliases(pre_tokens="pre_tockens", next_tokens="next_tockens", scale="scale_value")
def npu_fusion_attention_grad(query, key, value, dy, head_num, input_layout, *, pse=None,
                              padding_mask=None, atten_mask=None, softmax_max=None,
                              softmax_sum=None, softmax_in=None, attention_in=None,
                              scale_value=1., keep_prob=1., pre_tockens=2147483647,
                              next_tockens=2147483647, inner_precise=0, seed=0, offset=0,
                              numels=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                              sparse_mode=0, gen_mask_parallel=True, sync=False,
                              softmax_layout="", sink=None, pre_tokens=_UNSET,
                              next_tokens=_UNSET, scale=_UNSET):
    """torch_npu.npu_fusion_attention_grad on the CPU (torch_npu's schema).

    Returns ``(dq, dk, dv, dpse)``: like query/key/value (dk/dv summed over the GQA group; float16
    for float8 inputs); dpse like pse, the float32 slope gradient for generated ALiBi, or an
    empty tensor without pse.  With ``keep_prob < 1`` the keep bits are regenerated from
    ``(seed, offset)`` (pass the forward's returned values); ``numels`` must be 0 or the
    forward's.  Without softmax_max/softmax_sum/attention_in the forward is recomputed.
    ``pre_tokens``/``next_tokens``/``scale`` are accepted as aliases.
    """
    _reject_unsupported("npu_fusion_attention_grad", sink=sink)
    return _npu_grad("npu_fusion_attention_grad", query, key, value, dy, head_num, input_layout,
                     pse=pse, atten_mask=atten_mask, softmax_max=softmax_max,
                     softmax_sum=softmax_sum, attention_in=attention_in, scale_value=scale_value,
                     keep_prob=keep_prob, pre_tokens=pre_tockens, next_tokens=next_tockens,
                     inner_precise=inner_precise, seed=seed, offset=offset, numels=numels,
                     prefix=prefix, actual_seq_qlen=actual_seq_qlen,
                     actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode, pse_type=1,
                     q_start_idx=None, kv_start_idx=None, softmax_layout=softmax_layout)


@_accepts_aliases(pre_tockens="pre_tokens", next_tockens="next_tokens", scale_value="scale")
def npu_fusion_attention_v2(query, key, value, head_num, input_layout, *, pse=None,
                            padding_mask=None, atten_mask=None, query_rope=None, key_rope=None,
                            scale=1., keep_prob=1., pre_tokens=2147483647,
                            next_tokens=2147483647, inner_precise=0, prefix=None,
                            actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                            gen_mask_parallel=True, sync=False, pse_type=1, q_start_idx=None,
                            kv_start_idx=None, softmax_layout="", sink=None, dropout_mask=None,
                            seed=0, offset=0, pre_tockens=_UNSET, next_tockens=_UNSET,
                            scale_value=_UNSET):
    """torch_npu.npu_fusion_attention_v2 on the CPU: :func:`npu_fusion_attention` plus
    ``pse_type`` (0/1 external pse, 2/3 generated ALiBi from float32 slopes ``[N1]``/``[B,N1]``)
    and ``q_start_idx``/``kv_start_idx``.  ``query_rope``/``key_rope``/``sink`` are not
    supported (NotImplementedError).  ``pre_tockens``/``next_tockens``/``scale_value`` are
    accepted as aliases.  Returns the same 7-tuple as :func:`npu_fusion_attention`."""
    _reject_unsupported("npu_fusion_attention_v2", query_rope=query_rope, key_rope=key_rope,
                        sink=sink)
    return _npu_forward(query, key, value, head_num, input_layout,
                        pse=pse, atten_mask=atten_mask, scale=scale, keep_prob=keep_prob,
                        pre_tokens=pre_tokens, next_tokens=next_tokens,
                        inner_precise=inner_precise, prefix=prefix,
                        actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
                        sparse_mode=sparse_mode, pse_type=pse_type, q_start_idx=q_start_idx,
                        kv_start_idx=kv_start_idx, softmax_layout=softmax_layout,
                        dropout_mask=dropout_mask, seed=seed, offset=offset)


@_accepts_aliases(pre_tockens="pre_tokens", next_tockens="next_tokens", scale="scale_value")
def npu_fusion_attention_grad_v2(query, key, value, dy, head_num, input_layout, *, pse=None,
                                 padding_mask=None, atten_mask=None, softmax_max=None,
                                 softmax_sum=None, softmax_in=None, attention_in=None,
                                 query_rope=None, key_rope=None, scale_value=1., keep_prob=1.,
                                 pre_tokens=2147483647, next_tokens=2147483647, inner_precise=0,
                                 seed=0, offset=0, numels=0, prefix=None, actual_seq_qlen=None,
                                 actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True,
                                 sync=False, pse_type=1, q_start_idx=None, kv_start_idx=None,
                                 softmax_layout="", sink=None, pre_tockens=_UNSET,
                                 next_tockens=_UNSET, scale=_UNSET):
    """torch_npu.npu_fusion_attention_grad_v2 on the CPU.

    Returns ``(dq, dk, dv, dpse, dq_rope, dk_rope, dsink)`` (the newest schema; the last three
    are always empty tensors since rope and sink are not supported).  Callers that destructure
    ``dq, dk, dv, *_`` work with any schema version.
    """
    _reject_unsupported("npu_fusion_attention_grad_v2", query_rope=query_rope,
                        key_rope=key_rope, sink=sink)
    dq, dk, dv, dpse = _npu_grad(
        "npu_fusion_attention_grad_v2", query, key, value, dy, head_num, input_layout, pse=pse,
        atten_mask=atten_mask, softmax_max=softmax_max, softmax_sum=softmax_sum,
        attention_in=attention_in, scale_value=scale_value, keep_prob=keep_prob,
        pre_tokens=pre_tokens, next_tokens=next_tokens, inner_precise=inner_precise, seed=seed,
        offset=offset, numels=numels, prefix=prefix, actual_seq_qlen=actual_seq_qlen,
        actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode, pse_type=pse_type,
        q_start_idx=q_start_idx, kv_start_idx=kv_start_idx, softmax_layout=softmax_layout)
    return dq, dk, dv, dpse, _empty(query), _empty(query), _empty(query)


# ----------------------------------------------------------------------------------------------
# convenience autograd entry point
# ----------------------------------------------------------------------------------------------
def _head_dim(query, head_num, input_layout):
    lay = input_layout.upper() if isinstance(input_layout, str) else input_layout
    if lay in ("BSH", "SBH"):
        if not isinstance(head_num, int) or head_num <= 0 or query.shape[-1] % head_num:
            return None     # let the numpy API raise its message
        return query.shape[-1] // head_num
    return query.shape[-1]


def flash_attention(query, key, value, head_num, input_layout="BNSD", *, atten_mask=None,
                    pse=None, scale=None, keep_prob=1.0, sparse_mode=0, pre_tokens=INT32_MAX,
                    next_tokens=INT32_MAX, actual_seq_qlen=None, actual_seq_kvlen=None,
                    pse_type=1, q_start_idx=None, kv_start_idx=None, prefix=None,
                    inner_precise=0, softmax_layout="", drop_mask=None, seed=None, offset=0,
                    generator=None, d_scale_q=None, d_scale_k=None, d_scale_v=None,
                    out_dtype=None, return_softmax_stats=False):
    """Differentiable fag_numba attention for CPU training (``nn.Module``-friendly).

    Parameters
    ----------
    query, key, value : torch.Tensor
        CPU tensors in ``input_layout`` (BNSD default; BSH, SBH, BSND, TND), float32, float16,
        bfloat16 (or float8 without autograd); any strides.
    head_num : int
        N1.
    atten_mask, sparse_mode, pre_tokens, next_tokens, prefix, actual_seq_qlen, actual_seq_kvlen,
    pse, pse_type, q_start_idx, kv_start_idx, inner_precise, softmax_layout
        As in ``fag_numba.flash_attention_score`` (NPU semantics: mask True = masked).
    scale : float, optional
        Score scale; ``None`` means ``1/sqrt(D)`` (the SDPA / flash-attn convention; the NPU
        functions default to 1.0).
    keep_prob : float
        Dropout keep probability (``1 - dropout_p``).  When < 1 the keep bits come from
        ``drop_mask`` (packed uint8) or from ``(seed, offset)``; with neither, a seed is drawn
        from ``generator`` (default: torch's default CPU generator).  The backward regenerates
        the same bits.
    d_scale_q, d_scale_k, d_scale_v, out_dtype
        float8 inputs only: dequantisation scales and the output dtype (torch.float16 default,
        torch.bfloat16, torch.float32).
    return_softmax_stats : bool
        Also return ``softmax_max`` and ``softmax_sum`` (non-differentiable).

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor, torch.Tensor)
        attention_out like query (last dim Dv); gradients flow to query, key, value and pse.
    """
    if scale is None:
        d = _head_dim(query, head_num, input_layout)
        scale = 1.0 / math.sqrt(d) if d else 1.0
    if _dropout_active(keep_prob) and drop_mask is None and seed is None:
        seed = _draw_seed(generator)
    opts = _Opts(head_num=head_num, input_layout=input_layout, scale_value=scale,
                 keep_prob=keep_prob, pre_tokens=pre_tokens, next_tokens=next_tokens,
                 inner_precise=inner_precise, prefix=_int_list(prefix),
                 actual_seq_qlen=_int_list(actual_seq_qlen),
                 actual_seq_kvlen=_int_list(actual_seq_kvlen), sparse_mode=sparse_mode,
                 pse_type=pse_type, q_start_idx=_int_list(q_start_idx),
                 kv_start_idx=_int_list(kv_start_idx), softmax_layout=softmax_layout,
                 seed=seed if _dropout_active(keep_prob) and drop_mask is None else None,
                 offset=offset, d_scale_q=_scale_arg(d_scale_q, "d_scale_q"),
                 d_scale_k=_scale_arg(d_scale_k, "d_scale_k"),
                 d_scale_v=_scale_arg(d_scale_v, "d_scale_v"), out_dtype=_out_dtype_arg(out_dtype))
    out, smax, ssum = _attention(query, key, value, pse, atten_mask, drop_mask, opts)
    if return_softmax_stats:
        return out, smax, ssum
    return out
