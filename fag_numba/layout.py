"""Layouts: parse ``input_layout`` and describe every tensor without copying it.

All five layouts (BSH, SBH, BSND, BNSD, TND) reduce to one addressing formula: element
(b, h, i, e) of a tensor with last dim L lives at flat index ``boff[b] + h * hs + i * rs + e``:

=======  =======================  ===========  ========  ==========
layout   shape                    boff[b]      hs        rs
=======  =======================  ===========  ========  ==========
BNSD     [B, N, S, L]             b*N*S*L      S*L       L
BSND     [B, S, N, L]             b*S*N*L      L         N*L
BSH      [B, S, N*L]              b*S*N*L      L         N*L
SBH      [S, B, N*L]              b*N*L        L         B*N*L
TND      [T, N, L]                cu[b]*N*L    L         N*L
=======  =======================  ===========  ========  ==========

(``cu[b]`` = start row of varlen sequence b.)  The kernels take these numbers from the
``seqtab``/``gp`` tables (``kernels/desc.py``), so float32 inputs in any layout are read in
place, with zero copies, and outputs are written straight into arrays of the input layout.
"""
import dataclasses

import numpy as np

from . import memory
from .errors import FagTypeError, FagValueError
from .validation import is_int


@dataclasses.dataclass(frozen=True)
class Dims:
    """Problem sizes after validation (symbols of SPEC.md).

    seq_q / seq_k: int64 [B] per-sequence lengths (all S1 / S2 outside TND);
    cu_q / cu_k: int64 [B + 1] start rows of each sequence (TND only; zeros otherwise).
    S1 / S2 are the maxima over sequences; T1 / T2 the packed token counts (TND).
    """
    layout: str
    B: int
    N1: int
    N2: int
    G: int
    S1: int
    S2: int
    D: int
    Dv: int
    seq_q: np.ndarray
    seq_k: np.ndarray
    cu_q: np.ndarray
    cu_k: np.ndarray
    T1: int = 0
    T2: int = 0

    @property
    def tnd(self):
        return self.layout == "TND"


def axis_meaning(layout):
    """Return ``(batch_axis, seq_axis)`` of a 3/4-D layout (None where absent)."""
    return {"BSH": (0, 1), "SBH": (1, 0), "BSND": (0, 1), "BNSD": (0, 2), "TND": (None, 0)}[layout]


def _check_heads(layout, head_num, n1, d, key_d, n2, value_n, qs, ks, vs):
    """head_num == N1, key's D == query's D, value's head count == key's (4-D layouts, TND)."""
    if n1 != head_num:
        raise FagValueError(f"head_num: must equal the query head axis N1={n1} for layout "
                            f"{layout}, got {head_num} (query shape {qs})")
    if key_d != d:
        raise FagValueError(f"key: head dim {key_d} must equal query's D={d} "
                            f"(key shape {ks}, query shape {qs})")
    if value_n != n2:
        raise FagValueError(f"value: head count {value_n} must equal key's N2={n2} "
                            f"(value shape {vs}, key shape {ks})")


def parse_dims(query, key, value, head_num, layout, seq_q=None, seq_k=None, cu_q=None,
               cu_k=None):
    """Read B, N1, N2, S1, S2, D, Dv from the shapes of query/key/value (already rank-checked).

    For TND the caller passes the validated per-sequence lengths and start rows.
    Raises FagValueError for inconsistent shapes (messages name the argument).
    """
    qs, ks, vs = query.shape, key.shape, value.shape
    if layout in ("BSH", "SBH"):
        bax, sax = axis_meaning(layout)
        B, S1, H1 = qs[bax], qs[sax], qs[2]
        S2, H2, Hv = ks[sax], ks[2], vs[2]
        if ks[bax] != B:
            raise FagValueError(f"key: batch size {ks[bax]} differs from query's {B} "
                                f"(key shape {ks}, query shape {qs}, layout {layout})")
        if H1 % head_num != 0:
            raise FagValueError(f"head_num: query hidden size H1={H1} must be a multiple of "
                                f"head_num={head_num} (query shape {qs})")
        D = H1 // head_num
        N1 = head_num
        if D == 0:
            # H1 == 0: empty head dim; kv heads cannot be derived, take N2 = N1 (outputs empty)
            if H2 != 0 or Hv != 0:
                raise FagValueError(f"key: query hidden size is 0 (shape {qs}) but key/value "
                                    f"hidden sizes are {H2}/{Hv}")
            N2, Dv = N1, 0
        else:
            if H2 % D != 0 or H2 == 0:
                raise FagValueError(f"key: hidden size H2={H2} must be a positive multiple of "
                                    f"D=H1/head_num={D} (key shape {ks}, query shape {qs})")
            N2 = H2 // D
            if Hv % N2 != 0:
                raise FagValueError(f"value: hidden size {Hv} must be a multiple of N2={N2} "
                                    f"(value shape {vs})")
            Dv = Hv // N2
    elif layout in ("BSND", "BNSD"):
        nax = 2 if layout == "BSND" else 1
        sax = 1 if layout == "BSND" else 2
        B, S1, N1, D = qs[0], qs[sax], qs[nax], qs[3]
        S2, N2, Dv = ks[sax], ks[nax], vs[3]
        if ks[0] != B:
            raise FagValueError(f"key: batch size {ks[0]} differs from query's {B} "
                                f"(key shape {ks}, query shape {qs})")
        _check_heads(layout, head_num, N1, D, ks[3], N2, vs[nax], qs, ks, vs)
    else:  # TND
        T1, N1, D = qs
        T2, N2, Dv = ks[0], ks[1], vs[2]
        _check_heads(layout, head_num, N1, D, ks[2], N2, vs[1], qs, ks, vs)
        B = int(seq_q.size)
        S1 = int(seq_q.max()) if B else 0
        S2 = int(seq_k.max()) if B else 0
    if layout != "TND":
        if vs[:-1] != ks[:-1] and layout in ("BSND", "BNSD"):
            raise FagValueError(f"value: shape {vs} must equal key's {ks} in every dim but the "
                                f"last")
        if layout in ("BSH", "SBH") and vs[:2] != ks[:2]:
            raise FagValueError(f"value: shape {vs} must equal key's {ks} in every dim but the "
                                f"last")
    elif vs[0] != T2:
        raise FagValueError(f"value: token count {vs[0]} must equal key's T2={T2} "
                            f"(value shape {vs}, key shape {ks})")
    if N2 <= 0 or N1 % N2 != 0:
        raise FagValueError(f"key: N1={N1} query heads must be a multiple of N2={N2} kv heads "
                            f"(GQA; key shape {ks}, query shape {qs})")
    if Dv > D:
        raise FagValueError(f"value: head dim Dv={Dv} must be <= D={D} (value shape {vs}, "
                            f"query shape {qs})")
    # the per-sequence tables are the first allocation of size B (B = 2**33 of an empty
    # tensor would be 64 GiB of tables): refuse before making them
    memory.require(int(B) * memory.PER_SEQ_BYTES, f"a batch of B={B} sequences (per-sequence "
                   f"descriptor tables, {memory.PER_SEQ_BYTES} bytes each)")
    if layout != "TND":
        seq_q = np.full(B, S1, np.int64)
        seq_k = np.full(B, S2, np.int64)
        cu_q = np.zeros(B + 1, np.int64)
        cu_k = np.zeros(B + 1, np.int64)
        T1 = T2 = 0
    return Dims(layout=layout, B=int(B), N1=int(N1), N2=int(N2), G=int(N1 // N2), S1=int(S1),
                S2=int(S2), D=int(D), Dv=int(Dv), seq_q=seq_q, seq_k=seq_k, cu_q=cu_q,
                cu_k=cu_k, T1=int(T1), T2=int(T2))


def tensor_desc(dims, which):
    """Addressing of one tensor: ``(boff int64 [B], hs, rs)`` for the table above.

    which: "q" (query, dq), "k" (key, dk), "v" (value, dv), "dy" (dy, attention_in/out).
    """
    L = {"q": dims.D, "k": dims.D, "v": dims.Dv, "dy": dims.Dv}[which]
    N = dims.N1 if which in ("q", "dy") else dims.N2
    S = dims.S1 if which in ("q", "dy") else dims.S2
    b = np.arange(dims.B, dtype=np.int64)
    lay = dims.layout
    if lay == "BNSD":
        return b * (N * S * L), S * L, L
    if lay in ("BSND", "BSH"):
        return b * (S * N * L), L, N * L
    if lay == "SBH":
        return b * (N * L), L, dims.B * N * L
    cu = dims.cu_q if which in ("q", "dy") else dims.cu_k
    return cu[:-1] * (N * L), L, N * L


def stats_desc(dims, softmax_layout):
    """Per-row statistics addressing: ``(st_off int64 [B], st_hs int64 [B], st_rs, n_rows)``.

    Row (b, h, i) of softmax_max / softmax_sum (lane 0) in memory order:
    non-TND ``[B, N1, S1]``; TND "" per-sequence head-major ``cu[b]*N1 + h*S1_b + i``;
    TND "TND" true order ``(cu[b] + i)*N1 + h`` (SPEC §8.3).
    """
    if not dims.tnd:
        b = np.arange(dims.B, dtype=np.int64)
        return (b * (dims.N1 * dims.S1), np.full(dims.B, dims.S1, np.int64), 1,
                dims.B * dims.N1 * dims.S1)
    off = dims.cu_q[:-1] * dims.N1
    if softmax_layout == "TND":
        return off, np.ones(dims.B, np.int64), dims.N1, dims.T1 * dims.N1
    return off, dims.seq_q.copy(), 1, dims.T1 * dims.N1


def stats_shape(dims):
    """Declared shape of softmax_max / softmax_sum outputs."""
    if dims.tnd:
        return (dims.T1, dims.N1, 8)
    return (dims.B, dims.N1, dims.S1, 8)


def parse_varlen(actual_seq_qlen, actual_seq_kvlen, T1, T2, fn=""):
    """Validate TND cumulative end offsets (SPEC §8.1) -> (seq_q, seq_k, cu_q, cu_k) int64.

    Offsets have no leading 0; equal neighbours are empty sequences; the first index b > 0
    where both lists hold 0 ends the batch list (every later entry of both must be 0).
    """
    vals = []
    for name, x in (("actual_seq_qlen", actual_seq_qlen), ("actual_seq_kvlen", actual_seq_kvlen)):
        if x is None:
            raise FagValueError(f"{fn}{name} is required for input_layout TND")
        if isinstance(x, np.ndarray):
            if x.ndim == 1 and x.size == 0:
                raise FagValueError(f"{fn}{name} must hold at least one offset, got an empty "
                                    f"array")
            if x.ndim != 1 or not (np.issubdtype(x.dtype, np.integer)):
                raise FagTypeError(f"{fn}{name} must be a 1-D sequence of ints, got array of "
                                   f"shape {x.shape} and dtype {x.dtype}")
            x = [int(v) for v in x]
        elif isinstance(x, (list, tuple)):
            if not all(is_int(v) for v in x):
                raise FagTypeError(f"{fn}{name} must be a sequence of ints, got {x!r}")
            x = [int(v) for v in x]
        else:
            raise FagTypeError(f"{fn}{name} must be a sequence of ints, got "
                               f"{type(x).__name__}")
        if len(x) < 1:
            raise FagValueError(f"{fn}{name} must hold at least one offset, got {x!r}")
        vals.append(x)
    cq, ck = vals
    if len(cq) != len(ck):
        raise FagValueError(f"{fn}actual_seq_qlen and actual_seq_kvlen must have equal lengths, "
                            f"got {len(cq)} and {len(ck)}")
    nb = len(cq)
    for b in range(1, nb):
        if cq[b] == 0 and ck[b] == 0:
            if any(v != 0 for v in cq[b:]) or any(v != 0 for v in ck[b:]):
                raise FagValueError(f"{fn}actual_seq_qlen/actual_seq_kvlen: after the trailing "
                                    f"zeros that start at index {b} every entry must be 0, got "
                                    f"{cq!r} and {ck!r}")
            nb = b
            break
    cq, ck = cq[:nb], ck[:nb]
    for name, x, T in (("actual_seq_qlen", cq, T1), ("actual_seq_kvlen", ck, T2)):
        prev = 0
        for b, v in enumerate(x):
            if v < prev:
                raise FagValueError(f"{fn}{name} must be non-decreasing cumulative end offsets "
                                    f"(no leading 0), got {x!r} (entry {b} = {v} < {prev})")
            prev = v
        if x and x[-1] > T:
            which = "query" if name == "actual_seq_qlen" else "key"
            raise FagValueError(f"{fn}{name}: last offset {x[-1]} exceeds the {which} token "
                                f"count {T}")
    cu_q = np.zeros(nb + 1, np.int64)
    cu_k = np.zeros(nb + 1, np.int64)
    cu_q[1:] = cq
    cu_k[1:] = ck
    return np.diff(cu_q), np.diff(cu_k), cu_q, cu_k
