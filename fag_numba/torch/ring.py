"""Ring attention over torch.distributed (SPEC §12): one sequence sharded over the ranks.

Every rank of ``group`` holds a shard of the sequence of q, k and v.  K/V shards travel around
the ring (rank r sends to r+1 and receives from r-1); at step t rank r computes its queries
against the K/V shard of rank ``(r - t) mod W``, one (q-block, kv-block) pair at a time through
``fag_numba.chunks`` (the chunked driver's schedule and pair runner: a pair is a pair, whether
its K/V came from disk or from a neighbour).  The forward merges the partial outputs in float32
(SPEC §10); the backward recomputes the same pairs with the merged statistics and output, keeps
dQ in float32 on the rank and sends the float32 dK/dV accumulator of each K/V shard along with
it, so that after W steps (and one last hop) every rank holds the complete dK/dV of its shard.

Splits (``split``): ``"contiguous"``: rank r holds tokens ``[r*S/W, (r+1)*S/W)``;
``"zigzag"``: the sequence is cut into 2W equal chunks and rank r holds chunks r and 2W-1-r,
in that order (every rank then does the same causal work).  :func:`shard_sequence` and
:func:`unshard_sequence` convert between a full tensor and the shards.

Decisions
---------
- Communication: plain ``isend``/``irecv`` pairs (``batch_isend_irecv`` can hang on gloo),
  distinct tags for K, V, dK, dV and for every step, never a send to self.  The next step's K/V
  transfer is posted before the current step's compute and waited for after it; the dK/dV
  accumulator of step t travels while step t+1 computes (it is added after that compute).
  :data:`last_ring_stats` records bytes sent, compute and wait seconds per call.
- Validation on every rank before anything is sent: each rank checks its own arguments, then
  the ranks exchange a small description (``all_gather_object``: shapes, dtype, options, the
  local error if any).  Any local error or any difference between ranks raises on every rank
  (``FagValueError`` naming the argument and the ranks; a rank's own type error stays a
  ``FagTypeError`` there), so no rank is left waiting in a send.
- Global positions: causal is the global ``j <= i`` (S1 == S2), ALiBi (``alibi_slopes``,
  flash-attn's ``-slope * |i - j|`` added to the scaled score, fag_numba pse_type 2) and the
  dropout bits use global indices, so results equal a one-process fag_numba call on the
  unsharded tensors with the same ``seed`` (SPEC §5 bit definition, offset 0).  With dropout
  and ``seed=None`` every rank draws a seed from torch's default generator and rank 0's is
  used by all.
- dtypes: float32, float16, bfloat16.  Partial results are float32 (``out_dtype=float32``);
  outputs and gradients are rounded to the input dtype once.  The backward uses the float32
  merged output for ``rowsum(dy * O)``.
- A group of one rank is the plain call (one pair, no communication).
- Layouts BSH, SBH, BSND (default), BNSD; TND is not supported (a ``FagValueError``).
"""
import math
import time

import numpy as np
import torch
import torch.distributed as dist

from .. import api, config, dtypes, validation
from ..chunks import PairRunner, _lse_rows, bnsd, finish_merge, merge_into, plan_pair, take
from ..errors import FagError, FagTypeError, FagValueError
from .npu import numpy_to_tensor, tensor_to_numpy

__all__ = ["ring_attention", "shard_sequence", "unshard_sequence", "last_ring_stats"]

SPLITS = ("contiguous", "zigzag")
_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD")
_SEQ_AXIS = {"BNSD": 2, "BSND": 1, "BSH": 1, "SBH": 0}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# message tags: kind + _NKIND * step (distinct per kind and per step)
_TAG_K, _TAG_V, _TAG_DK, _TAG_DV, _NKIND = 1, 2, 3, 4, 8
_INF = config.BAND_INF
_FN = "ring_attention"

#: Timing and volume of the last ring_attention forward / backward on this rank: ``steps``,
#: ``bytes_sent`` (per step, list), ``compute_s`` (per step), ``wait_s`` (per step: time blocked
#: in ``wait()`` after the compute, i.e. communication not hidden by compute), ``total_s``.
last_ring_stats = {"forward": {}, "backward": {}}


# ----------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------
def _check_split(split, fn):
    if not isinstance(split, str) or split not in SPLITS:
        raise FagValueError(f"{fn}: split must be one of {', '.join(SPLITS)}, got {split!r}")


def _check_layout(input_layout, fn):
    lay = validation.check_layout(input_layout, fn + ": ")
    if lay not in _LAYOUTS:
        raise FagValueError(f"{fn}: input_layout {lay} is not supported by the ring (one of "
                            f"{', '.join(_LAYOUTS)}), got {input_layout!r}")
    return lay


def _blocks(rank, world, s_local, split):
    """Global blocks of a shard: ``[(g0, g1, l0), ...]`` (global range, local start)."""
    if split == "contiguous" or world == 1:     # one rank: chunks 0 and 1 in order = all
        return [(rank * s_local, (rank + 1) * s_local, 0)]
    c = s_local // 2
    return [(rank * c, (rank + 1) * c, 0), ((2 * world - 1 - rank) * c, (2 * world - rank) * c, c)]


def _narrow(x, axis, a, b):
    if isinstance(x, torch.Tensor):
        return x.narrow(axis, a, b - a)
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(a, b)
    return x[tuple(idx)]


def shard_sequence(x, input_layout, rank, world, split="zigzag"):
    """This rank's shard of a full tensor (or numpy array) along the sequence axis.

    Parameters
    ----------
    x : torch.Tensor or ndarray
        A full q/k/v/dy in ``input_layout`` (BSH, SBH, BSND, BNSD), S positions.
    rank, world : int
        ``0 <= rank < world``.
    split : str
        ``"contiguous"`` (S divisible by world) or ``"zigzag"`` (S divisible by 2*world; chunks
        ``rank`` and ``2*world-1-rank``, in that order).

    Returns
    -------
    torch.Tensor or ndarray
        A contiguous copy of the shard (S/world positions), same type as ``x``.
    """
    fn = "shard_sequence"
    lay = _check_layout(input_layout, fn)
    _check_split(split, fn)
    world = validation.check_int("world", world, 1, None, fn + ": ")
    rank = validation.check_int("rank", rank, 0, world - 1, fn + ": ")
    if x.ndim != len(lay):
        raise FagValueError(f"{fn}: x must have rank {len(lay)} for layout {lay}, got shape "
                            f"{tuple(x.shape)}")
    ax = _SEQ_AXIS[lay]
    s = x.shape[ax]
    parts = world if split == "contiguous" else 2 * world
    if s % parts:
        raise FagValueError(f"{fn}: the sequence length {s} must be divisible by "
                            f"{parts} for split {split!r} over {world} ranks")
    pieces = [_narrow(x, ax, g0, g1) for g0, g1, _ in _blocks(rank, world, s // world, split)]
    if isinstance(x, torch.Tensor):
        return torch.cat(pieces, dim=ax).contiguous()
    return np.ascontiguousarray(np.concatenate(pieces, axis=ax))


def unshard_sequence(shards, input_layout, split="zigzag"):
    """The full tensor from the shards of every rank (a list in rank order); the inverse of
    :func:`shard_sequence`."""
    fn = "unshard_sequence"
    lay = _check_layout(input_layout, fn)
    _check_split(split, fn)
    if not isinstance(shards, (list, tuple)) or not shards:
        raise FagValueError(f"{fn}: shards must be a non-empty list of the ranks' shards, got "
                            f"{type(shards).__name__}")
    world = len(shards)
    ax = _SEQ_AXIS[lay]
    shape0 = tuple(shards[0].shape)
    for k, x in enumerate(shards):
        if tuple(x.shape) != shape0:
            raise FagValueError(f"{fn}: shards[{k}] shape {tuple(x.shape)} differs from "
                                f"shards[0] shape {shape0}")
    if len(shape0) != len(lay):
        raise FagValueError(f"{fn}: shards must have rank {len(lay)} for layout {lay}, got "
                            f"shape {shape0}")
    s_local = shape0[ax]
    if split == "zigzag" and s_local % 2:
        raise FagValueError(f"{fn}: zigzag shards hold two equal chunks, got an odd length "
                            f"{s_local}")
    pieces = [None] * (world if split == "contiguous" else 2 * world)
    for r, x in enumerate(shards):
        for g0, g1, l0 in _blocks(r, world, s_local, split):
            pieces[g0 // (g1 - g0)] = _narrow(x, ax, l0, l0 + g1 - g0)
    if isinstance(shards[0], torch.Tensor):
        return torch.cat(pieces, dim=ax)
    return np.concatenate(pieces, axis=ax)


# ----------------------------------------------------------------------------------------------
# Validation (every rank, before any K/V is sent)
# ----------------------------------------------------------------------------------------------
class _Plan:
    """The validated ring problem of this rank (plain attributes)."""


def _local_plan(query, key, value, head_num, input_layout, causal, split, scale, keep_prob,
                seed, alibi_slopes, world):
    """Every check that needs only this rank's arguments; returns a _Plan."""
    f = _FN + ": "
    P = _Plan()
    P.layout = _check_layout(input_layout, _FN)
    _check_split(split, _FN)
    P.split = split
    if not isinstance(causal, (bool, np.bool_)):
        raise FagTypeError(f"{f}causal must be a bool, got {type(causal).__name__}")
    P.causal = bool(causal)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise FagTypeError(f"{f}{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise FagTypeError(f"{f}{name} dtype must be torch.float32, torch.float16 or "
                               f"torch.bfloat16, got {t.dtype}")
        if t.device.type != "cpu":
            raise FagValueError(f"{f}{name} must be a CPU tensor, got device {t.device}")
    P.head_num = validation.check_int("head_num", head_num, 1, None, f)
    q, k, v = (tensor_to_numpy(t, n) for t, n in ((query, "query"), (key, "key"),
                                                  (value, "value")))
    ax = _SEQ_AXIS[P.layout]
    if q.ndim != len(P.layout) or k.ndim != len(P.layout) or v.ndim != len(P.layout):
        raise FagValueError(f"{f}query, key, value must have rank {len(P.layout)} for layout "
                            f"{P.layout}, got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                            f"{tuple(v.shape)}")
    s = q.shape[ax]
    if k.shape[ax] != s:
        raise FagValueError(f"{f}key shard length {k.shape[ax]} must equal the query shard "
                            f"length {s} (self-attention over one sharded sequence)")
    if split == "zigzag" and s % 2:
        raise FagValueError(f"{f}zigzag shards hold two equal chunks: the shard length must be "
                            f"even, got {s}")
    kp = validation.check_real("keep_prob", keep_prob, f)
    if not (kp > 0 and kp <= 1):
        raise FagValueError(f"{f}keep_prob must be in (0, 1], got {keep_prob!r}")
    P.keep_prob = float(keep_prob)
    P.dropout = kp < 1
    if seed is not None:
        validation.check_int("seed", seed, 0, 2**64 - 1, f)
    elif P.dropout:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    P.seed = seed if P.dropout else None
    P.seed_given = seed is not None
    P.slopes = None
    if alibi_slopes is not None:
        sl = tensor_to_numpy(alibi_slopes, "alibi_slopes") if isinstance(
            alibi_slopes, torch.Tensor) else alibi_slopes
        if not isinstance(sl, np.ndarray) or sl.dtype != np.float32:
            raise FagTypeError(f"{f}alibi_slopes must be a float32 tensor [N1], got "
                               f"{getattr(sl, 'dtype', type(sl).__name__)}")
        if sl.shape != (P.head_num,):
            raise FagValueError(f"{f}alibi_slopes must have shape ({P.head_num},), got "
                                f"{tuple(sl.shape)}")
        P.slopes = np.ascontiguousarray(sl).copy()
    # the shard problem itself, validated by the numpy layer (head_num, D, Dv, GQA, ...)
    api._prepare(_FN, q, k, v, None, P.head_num, P.layout, P.slopes, None, None, 1.0, 1.0,
                 api.INT32_MAX, api.INT32_MAX, 0, None, None, None, 0,
                 2 if P.slopes is not None else 1, None, None, "", None, 0, {}, None)
    d = q.shape[-1] if P.layout in ("BSND", "BNSD") else q.shape[-1] // P.head_num
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d else 1.0
    P.scale = float(validation.check_real("scale", scale, f))
    P.s_local = s
    P.S = s * world
    P.np = (q, k, v)
    P.dtype = query.dtype
    P.desc = dict(shapes=(tuple(q.shape), tuple(k.shape), tuple(v.shape)), dtype=str(query.dtype),
                  layout=P.layout, split=split, causal=P.causal, head_num=P.head_num,
                  scale=P.scale, keep_prob=P.keep_prob, seed=P.seed,
                  seed_given=P.seed_given, alibi=P.slopes is not None)
    return P


def _group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise FagValueError(f"{_FN}: torch.distributed is not initialized (call "
                            f"torch.distributed.init_process_group first, e.g. backend 'gloo')")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    ranks = [dist.get_global_rank(group, r) if group is not None else r for r in range(world)]
    return rank, world, ranks


def _agree(P, err, rank, world, group):
    """Exchange the ranks' descriptions; raise on every rank unless all are valid and equal."""
    mine = {"error": None if err is None else f"{type(err).__name__}: {err}",
            "desc": None if P is None else P.desc}
    every = [None] * world
    if world > 1:
        dist.all_gather_object(every, mine, group=group)
    else:
        every = [mine]
    if err is not None:
        raise err
    bad = [(r, e["error"]) for r, e in enumerate(every) if e["error"] is not None]
    if bad:
        raise FagValueError(f"{_FN}: rank {bad[0][0]} rejected its arguments ({bad[0][1]}); "
                            f"every rank raises so that none waits for it")
    d0 = every[0]["desc"]
    for key in ("shapes", "dtype", "layout", "split", "causal", "head_num", "scale",
                "keep_prob", "alibi"):
        vals = [e["desc"][key] for e in every]
        if any(v != vals[0] for v in vals):
            what = {"shapes": "query/key/value shard shapes"}.get(key, key)
            listing = ", ".join(f"rank {r}: {v}" for r, v in enumerate(vals))
            raise FagValueError(f"{_FN}: {what} differ across ranks ({listing}); every rank "
                                f"must pass the same options and equal shards")
    if P.dropout:
        seeds = [e["desc"]["seed"] for e in every]
        if any(e["desc"]["seed_given"] for e in every) and any(s != seeds[0] for s in seeds):
            raise FagValueError(f"{_FN}: seed differs across ranks ({seeds}); dropout needs one "
                                f"seed for the whole sequence")
        P.seed = d0["seed"]            # drawn: rank 0's


# ----------------------------------------------------------------------------------------------
# The ring
# ----------------------------------------------------------------------------------------------
def _as_np(t):
    return tensor_to_numpy(t)


def _sendrecv(tensors, dst, src, group, tags):
    """Post isend of ``tensors`` to dst and irecv of same-shaped buffers from src."""
    bufs = [torch.empty_like(t) for t in tensors]
    reqs = []
    for t, b, tag in zip(tensors, bufs, tags):
        reqs.append(dist.irecv(b, src=src, group=group, tag=tag))
        reqs.append(dist.isend(t, dst=dst, group=group, tag=tag))
    return bufs, reqs


def _wait(reqs):
    t0 = time.perf_counter()
    for r in reqs:
        r.wait()
    return time.perf_counter() - t0


def _wire(t):
    """A tensor gloo can carry: bfloat16 travels as its int16 bits."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _unwire(t, dtype):
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _runner(P):
    opts = dict(scale_value=P.scale, keep_prob=P.keep_prob, seed=P.seed, offset=0)
    if P.slopes is not None:
        opts.update(pse=P.slopes, pse_type=2)
    lo, hi = (-_INF, 0) if P.causal else (-_INF, _INF)
    return PairRunner(_FN, P.head_num, P.layout, P.S, P.S, lo, hi, 0, 0, opts)


def _pairs(P, rank, src):
    """(pair, local q rows start, local kv rows start) of this rank's queries x src's K/V."""
    out = []
    for qg0, qg1, ql0 in _blocks(rank, P.world, P.s_local, P.split):
        for kg0, kg1, kl0 in _blocks(src, P.world, P.s_local, P.split):
            p = plan_pair(qg0, qg1, kg0, kg1, P.lo, P.hi)
            if p is not None:
                out.append((p, p.i0 - qg0 + ql0, p.j0 - kg0 + kl0))
    return out


def _ring_forward(P, query, key, value):
    """float32 merged (out in the query layout with last dim Dv, lse [B, N1, s])."""
    t_start = time.perf_counter()
    lay, run = P.layout, P.run
    q = P.np[0]
    dims = P.dims
    acc = np.zeros((dims.B, dims.N1, P.s_local, dims.Dv), np.float32)
    mrun = np.full((dims.B, dims.N1, P.s_local), -np.inf, np.float32)
    lrun = np.zeros((dims.B, dims.N1, P.s_local), np.float32)
    nxt, prv = P.ranks[(P.rank + 1) % P.world], P.ranks[(P.rank - 1) % P.world]
    kv = [_wire(key.detach().contiguous()), _wire(value.detach().contiguous())]
    stats = {"steps": P.world, "bytes_sent": [], "compute_s": [], "wait_s": []}
    parts = []
    for t in range(P.world):
        src = (P.rank - t) % P.world
        reqs = []
        if t < P.world - 1:               # the next K/V travels while this step computes
            new, reqs = _sendrecv(kv, nxt, prv, P.group,
                                  [_TAG_K + _NKIND * t, _TAG_V + _NKIND * t])
        stats["bytes_sent"].append(sum(x.numel() * x.element_size() for x in kv) if reqs else 0)
        t0 = time.perf_counter()
        k = _as_np(_unwire(kv[0], P.dtype))
        v = _as_np(_unwire(kv[1], P.dtype))
        for p, qi, kj in _pairs(P, P.rank, src):
            n1, n2 = p.i1 - p.i0, p.j1 - p.j0
            o, m, l = run.forward(p, take(q, lay, qi, qi + n1), take(k, lay, kj, kj + n2),
                                  take(v, lay, kj, kj + n2))
            r = slice(qi, qi + n1)
            merge_into(acc[:, :, r], mrun[:, :, r], lrun[:, :, r], o, m, l)
            if P.world == 1:
                parts.append(((o, m, l), r))
        stats["compute_s"].append(time.perf_counter() - t0)
        stats["wait_s"].append(_wait(reqs))
        if reqs:
            kv = new
    if P.world == 1 and len(parts) == 1 and parts[0][1] == slice(0, P.s_local):
        out4, m, l = parts[0][0]          # one pair: exactly the plain call, no merge rounding
    else:
        out4, m, l = finish_merge(acc, mrun, lrun)
    out = np.zeros(P.dy_shape, np.float32)
    bnsd(out, lay, dims.N1)[...] = out4
    lse = np.empty(m.shape, np.float32)
    if lse.size:
        _lse_rows(m.reshape(-1), l.reshape(-1), lse.reshape(-1))
    stats["total_s"] = time.perf_counter() - t_start
    last_ring_stats["forward"] = stats
    return out, lse


def _ring_backward(P, key, value, dy, out32, lse):
    """float32 (dq, dk, dv) of this rank's shards."""
    t_start = time.perf_counter()
    lay, run, dims = P.layout, P.run, P.dims
    q = P.np[0]
    dq = np.zeros(q.shape, np.float32)
    nxt, prv = P.ranks[(P.rank + 1) % P.world], P.ranks[(P.rank - 1) % P.world]
    kv = [_wire(key.detach().contiguous()), _wire(value.detach().contiguous())]
    kshape, vshape = tuple(key.shape), tuple(value.shape)
    acc = None                          # (dk, dv) float32 torch tensors of the block in hand
    acc_reqs, acc_in = [], None
    sends = []
    stats = {"steps": P.world, "bytes_sent": [], "compute_s": [], "wait_s": []}
    for t in range(P.world):
        src = (P.rank - t) % P.world
        reqs = []
        if t < P.world - 1:
            new, reqs = _sendrecv(kv, nxt, prv, P.group,
                                  [_TAG_K + _NKIND * t, _TAG_V + _NKIND * t])
        sent = sum(x.numel() * x.element_size() for x in kv) if reqs else 0
        t0 = time.perf_counter()
        k = _as_np(_unwire(kv[0], P.dtype))
        v = _as_np(_unwire(kv[1], P.dtype))
        pdk = np.zeros(kshape, np.float32)
        pdv = np.zeros(vshape, np.float32)
        for p, qi, kj in _pairs(P, P.rank, src):
            n1, n2 = p.i1 - p.i0, p.j1 - p.j0
            gq, gk, gv, _ = run.backward(p, take(q, lay, qi, qi + n1), take(k, lay, kj, kj + n2),
                                         take(v, lay, kj, kj + n2), take(dy, lay, qi, qi + n1),
                                         take(out32, lay, qi, qi + n1),
                                         lse[:, :, qi:qi + n1])
            bnsd(dq, lay, dims.N1)[:, :, qi:qi + n1] += bnsd(gq, lay, dims.N1)
            bnsd(pdk, lay, dims.N2)[:, :, kj:kj + n2] += bnsd(gk, lay, dims.N2)
            bnsd(pdv, lay, dims.N2)[:, :, kj:kj + n2] += bnsd(gv, lay, dims.N2)
        compute = time.perf_counter() - t0
        # the accumulator of this K/V block arrives from the previous rank (it had the block
        # one step earlier); it travelled while we computed
        waited = _wait(acc_reqs)
        if acc_in is not None:
            pdk += acc_in[0].numpy()
            pdv += acc_in[1].numpy()
        acc = [torch.from_numpy(pdk), torch.from_numpy(pdv)]
        if P.world > 1:
            # pass it on: to the next rank (which holds this block next step), and after the
            # last step to the block's owner, which is also the next rank
            tag = _NKIND * t
            acc_in, acc_reqs = _sendrecv(acc, nxt, prv, P.group, [_TAG_DK + tag, _TAG_DV + tag])
            sends.extend(acc_reqs)
            sent += sum(x.numel() * x.element_size() for x in acc)
        waited += _wait(reqs)
        stats["bytes_sent"].append(sent)
        stats["compute_s"].append(compute)
        stats["wait_s"].append(waited)
        if reqs:
            kv = new
    if P.world > 1:
        stats["wait_s"][-1] += _wait(acc_reqs)
        dk, dv = acc_in[0].numpy(), acc_in[1].numpy()
    else:
        dk, dv = acc[0].numpy(), acc[1].numpy()
    stats["total_s"] = time.perf_counter() - t_start
    last_ring_stats["backward"] = stats
    return dq, dk, dv


def _to_tensor(x32, dtype):
    npdt = {torch.float32: np.float32, torch.float16: np.float16,
            torch.bfloat16: dtypes.BFLOAT16}[dtype]
    return numpy_to_tensor(np.ascontiguousarray(dtypes.cast(x32, npdt)))


class RingAttentionFunction(torch.autograd.Function):
    """Autograd of :func:`ring_attention` (the backward is a ring pass of its own)."""

    @staticmethod
    def forward(ctx, query, key, value, plan):  # noqa: D102
        out32, lse = _ring_forward(plan, query, key, value)
        ctx.plan = plan
        ctx.out32, ctx.lse = out32, lse
        ctx.save_for_backward(key, value)
        return _to_tensor(out32, plan.dtype)

    @staticmethod
    def backward(ctx, dout):  # noqa: D102
        key, value = ctx.saved_tensors
        P = ctx.plan
        dy = tensor_to_numpy(dout.to(P.dtype), "dout")
        dq, dk, dv = _ring_backward(P, key, value, dy, ctx.out32, ctx.lse)
        return _to_tensor(dq, P.dtype), _to_tensor(dk, P.dtype), _to_tensor(dv, P.dtype), None


def ring_attention(query, key, value, head_num, input_layout="BSND", *, group=None,
                   causal=False, split="zigzag", scale=None, keep_prob=1.0, seed=None,
                   alibi_slopes=None):
    """Attention over a sequence sharded across the ranks of ``group`` (differentiable).

    Parameters
    ----------
    query, key, value : torch.Tensor
        This rank's shards (CPU; float32, float16 or bfloat16) in ``input_layout``: query
        ``[B, S/W, N1, D]`` (BSND), key/value with N2 heads (GQA: N1 % N2 == 0), value head dim
        Dv <= D.  Every rank passes shards of equal shapes (:func:`shard_sequence`).
    head_num : int
        N1.
    input_layout : str
        BSND (default), BNSD, BSH or SBH; the sequence axis is the sharded one.
    group : ProcessGroup, optional
        Default: the world.  W = its size; a group of one rank is the plain call.
    causal : bool
        Causal attention over the global sequence (``j <= i``).
    split : str
        How the sequence is sharded: ``"zigzag"`` (default; chunks r and 2W-1-r of 2W) or
        ``"contiguous"``.
    scale : float, optional
        Score scale, default ``1/sqrt(D)``.
    keep_prob : float
        Dropout keep probability; the bits are those of a one-process fag_numba call with the
        same ``seed`` (global element indices, offset 0).
    seed : int, optional
        Dropout seed (the same on every rank); None draws one (rank 0's is used).
    alibi_slopes : torch.Tensor, optional
        float32 ``[N1]``: flash-attn's ALiBi ``-slope * |i - j|`` over global positions.

    Returns
    -------
    torch.Tensor
        This rank's shard of attention_out (query's shape with last dim Dv), input dtype.
    """
    rank, world, ranks = _group_info(group)
    P, err = None, None
    try:
        P = _local_plan(query, key, value, head_num, input_layout, causal, split, scale,
                        keep_prob, seed, alibi_slopes, world)
    except FagError as e:
        err = e
    _agree(P, err, rank, world, group)
    P.rank, P.world, P.ranks, P.group = rank, world, ranks, group
    P.lo, P.hi = (-_INF, 0) if P.causal else (-_INF, _INF)
    q, k, v = P.np
    prep = api._prepare(_FN, q, k, v, None, P.head_num, P.layout, None, None, None, 1.0, 1.0,
                        api.INT32_MAX, api.INT32_MAX, 0, None, None, None, 0, 1, None, None, "",
                        None, 0, {}, None)
    P.dims, P.dy_shape = prep.dims, prep.dy_shape
    P.run = _runner(P)
    return RingAttentionFunction.apply(query, key, value, P)
