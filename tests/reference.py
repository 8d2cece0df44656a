"""Independent float64 reference of FlashAttentionScore / FlashAttentionScoreGrad (SPEC.md).

Written from SPEC.md only: nothing here reads or imports ``fag_numba``, so that a misreading of the
SPEC cannot hide in shared code. Dense, untiled, float64, one (sequence, head-block) at a time.

Public functions
----------------
``ref_forward(query, key, value, head_num, input_layout, **kw)``
-> ``(attention_out, softmax_max, softmax_sum)``
``ref_backward(query, key, value, dy, head_num, input_layout, *, softmax_max=None, softmax_sum=None,
attention_in=None, **kw) -> (dq, dk, dv, dpse)``
``ref_computed(sparse_mode, s1, s2, pre_tokens, next_tokens, prefix_b=None, mask2d=None,
role=None)``
-> bool ``[s1, s2]``, the "element is computed" predicate C of SPEC §7 for one sequence and head.

Conventions (all from SPEC.md):
- Everything is converted to float64 first; ``scale_value`` and ``keep_prob`` are rounded to float32
  (SPEC §3) and then used as float64.
- ``keep`` is the dropout keep array **unpacked**: a flat bool/uint8 array of ``numels`` elements in
  SPEC §5 element order; None keeps everything. Dropout is active iff float32(keep_prob) < 1.
- No ``atten_mask`` at all means full attention in every sparse mode (SPEC §6); ``sparse_mode``,
  tokens and prefix then have no effect at all (also on the mode-8 rule for q/kv start indices,
  see ``_alibi_start``).
- Invalid rows (no computed element): attention_out 0, dq 0, softmax_max = -FLT_MAX,
  softmax_sum = +FLT_MAX. All outputs are float64; no validation beyond asserts.
"""

from __future__ import annotations

import numpy as np

FLT_MAX = float(np.finfo(np.float32).max)  # 3.4028234663852886e38
NO_LIMIT = 2147483647
N_LANES = 8
LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")

__all__ = ["ref_forward", "ref_backward", "ref_computed", "tnd_sequences", "FLT_MAX"]


# ------------------------------------------------------------------------------------------------
# The predicate C (SPEC §6, §7)
# ------------------------------------------------------------------------------------------------

def ref_computed(sparse_mode, s1, s2, pre_tokens=NO_LIMIT, next_tokens=NO_LIMIT, prefix_b=None,
                 mask2d=None, role=None):
    """bool [s1, s2], True = element (i, j) is computed, for one sequence (and head).

    This is the SPEC §7 table, read literally, *given that an atten_mask exists* (without any
    atten_mask the caller uses full attention instead). ``mask2d`` is the [s1, s2] slice of a full
    mask (modes 0, 1, 5; non-zero = masked; None = all zeros); compressed modes never read it.
    ``role`` is "band" or "other" for modes 7/8 (is this sequence the band sequence?).
    """
    i = np.arange(s1, dtype=np.int64)[:, None]
    j = np.arange(s2, dtype=np.int64)[None, :]
    delta = s2 - s1
    # exact Python-int tokens, clamped to a range that changes no comparison (|j - i| < s1 + s2)
    # so that tokens near 2**63 cannot overflow the int64 arithmetic below
    lim = s1 + s2 + 1
    pre = max(-lim, min(lim, int(pre_tokens)))
    nxt = max(-lim, min(lim, int(next_tokens)))
    if mask2d is None:
        unmasked = np.ones((s1, s2), dtype=bool)
    else:
        mask2d = np.asarray(mask2d)
        assert mask2d.shape == (s1, s2), (mask2d.shape, s1, s2)
        unmasked = mask2d == 0
    if sparse_mode in (7, 8):
        assert role in ("band", "other"), role
        if role == "band":
            sparse_mode = 4
        else:
            sparse_mode = 3 if sparse_mode == 7 else 2

    if sparse_mode == 0:
        c = unmasked & (i - pre <= j) & (j <= i + nxt)
    elif sparse_mode == 1:
        c = unmasked
    elif sparse_mode == 2:
        c = j <= i
    elif sparse_mode == 3:
        c = j <= i + delta
    elif sparse_mode == 4:
        c = (i + delta - pre <= j) & (j <= i + delta + nxt)
    elif sparse_mode == 5:
        c = unmasked & ((j <= i + delta) | (j < int(prefix_b)))
    elif sparse_mode == 6:
        c = (j <= i + delta) | (j < int(prefix_b))
    else:
        raise AssertionError(f"sparse_mode {sparse_mode}")
    return np.broadcast_to(c, (s1, s2)).copy()


# ------------------------------------------------------------------------------------------------
# Layouts and sequences (SPEC §2, §8)
# ------------------------------------------------------------------------------------------------

def _f64(x):
    return None if x is None else np.asarray(x).astype(np.float64)


def _to_bnsd(x, layout, n):
    """Non-TND tensor in ``layout`` with ``n`` heads -> [B, n, S, d] view."""
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(0, 2, 1, 3)
    if layout == "BSH":
        b, s, h = x.shape
        return x.reshape(b, s, n, h // n).transpose(0, 2, 1, 3)
    if layout == "SBH":
        s, b, h = x.shape
        return x.reshape(s, b, n, h // n).transpose(1, 2, 0, 3)
    raise AssertionError(layout)


def _from_bnsd(x, layout):
    """[B, n, S, d] -> the same tensor in ``layout`` (C-contiguous)."""
    b, n, s, d = x.shape
    if layout == "BNSD":
        y = x
    elif layout == "BSND":
        y = x.transpose(0, 2, 1, 3)
    elif layout == "BSH":
        y = x.transpose(0, 2, 1, 3).reshape(b, s, n * d)
    elif layout == "SBH":
        y = x.transpose(2, 0, 1, 3).reshape(s, b, n * d)
    else:
        raise AssertionError(layout)
    return np.ascontiguousarray(y)


def _canon(x, layout, n):
    """Canonical form: non-TND [B, n, S, d]; TND [n, T, d]."""
    return x.transpose(1, 0, 2) if layout == "TND" else _to_bnsd(x, layout, n)


def _uncanon(x, layout):
    return np.ascontiguousarray(x.transpose(1, 0, 2)) if layout == "TND" else _from_bnsd(x, layout)


def tnd_sequences(actual_seq_qlen, actual_seq_kvlen):
    """Cumulative end offsets (no leading 0) -> list of (q0, q1, k0, k1), one per batch (SPEC §8.1).

    The first index b > 0 at which both lists hold 0 ends the batch list (trailing zeros).
    """
    cq = [int(x) for x in np.asarray(actual_seq_qlen).reshape(-1)]
    ck = [int(x) for x in np.asarray(actual_seq_kvlen).reshape(-1)]
    assert len(cq) == len(ck) >= 1
    nb = len(cq)
    for b in range(1, len(cq)):
        if cq[b] == 0 and ck[b] == 0:
            nb = b
            break
    seqs = []
    for b in range(nb):
        q0 = cq[b - 1] if b else 0
        k0 = ck[b - 1] if b else 0
        assert cq[b] >= q0 and ck[b] >= k0
        seqs.append((q0, cq[b], k0, ck[b]))
    return seqs


class _Seq:
    """One independent attention problem: index tuples into the canonical arrays + metadata."""

    def __init__(self, b, qsel, ksel, s1, s2, q0=0, k0=0):
        self.b, self.qsel, self.ksel = b, qsel, ksel
        self.s1, self.s2, self.q0, self.k0 = s1, s2, q0, k0


def _start(x):
    if x is None:
        return 0
    return int(np.asarray(x).reshape(-1)[0])


class _Problem:
    """Inputs canonicalised once; shared by the forward and the backward."""

    def __init__(self, query, key, value, head_num, input_layout, *, pse=None, keep=None,
                 atten_mask=None, scale_value=1.0, keep_prob=1.0, pre_tokens=NO_LIMIT,
                 next_tokens=NO_LIMIT, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                 sparse_mode=0, pse_type=1, q_start_idx=None, kv_start_idx=None, softmax_layout=""):
        layout = input_layout.upper()
        assert layout in LAYOUTS, layout
        self.layout = layout
        self.n1 = n1 = int(head_num)
        q, k, v = _f64(query), _f64(key), _f64(value)
        if layout in ("BSH", "SBH"):
            d = q.shape[-1] // n1
            assert d > 0, "BSH/SBH need D > 0 to infer N2"
            n2 = k.shape[-1] // d
        else:
            n2 = k.shape[{"TND": 1, "BNSD": 1, "BSND": 2}[layout]]
        assert n2 >= 1 and n1 % n2 == 0, (n1, n2)
        self.n2, self.g = n2, n1 // n2
        self.q = _canon(q, layout, n1)
        self.k = _canon(k, layout, n2)
        self.v = _canon(v, layout, n2)
        self.d, self.dv = self.q.shape[-1], self.v.shape[-1]

        self.scale = float(np.float32(scale_value))
        self.keep_prob = float(np.float32(keep_prob))
        self.dropout = self.keep_prob < 1.0
        self.pre, self.next = int(pre_tokens), int(next_tokens)
        self.sparse_mode = int(sparse_mode)
        self.pse_type = int(pse_type)
        self.softmax_layout = softmax_layout.upper()
        self.has_mask = atten_mask is not None
        self.mask = None if atten_mask is None else np.asarray(atten_mask)
        self.prefix = None if prefix is None else [int(x) for x in np.asarray(prefix).reshape(-1)]
        self.q_start, self.kv_start = _start(q_start_idx), _start(kv_start_idx)

        if layout == "TND":
            self.t1, self.t2 = self.q.shape[1], self.k.shape[1]
            self.seqs = [_Seq(b, (slice(None), slice(q0, q1)), (slice(None), slice(k0, k1)),
                              q1 - q0, k1 - k0, q0, k0)
                         for b, (q0, q1, k0, k1) in enumerate(tnd_sequences(actual_seq_qlen,
                                                                            actual_seq_kvlen))]
            with_rows = [s.b for s in self.seqs if s.s1 > 0]
            self.band_b = None
            if with_rows:
                self.band_b = with_rows[-1] if self.sparse_mode == 7 else with_rows[0]
        else:
            bq, s1 = self.q.shape[0], self.q.shape[2]
            s2 = self.k.shape[2]
            self.seqs = [_Seq(b, (b,), (b,), s1, s2) for b in range(bq)]
            self.band_b = None

        # dropout keep bits, per sequence [N1, S1_b, S2_b]
        self.keep = None
        if self.dropout and keep is not None:
            flat = np.asarray(keep).reshape(-1)
            numels = sum(n1 * s.s1 * s.s2 for s in self.seqs)
            assert flat.size >= numels, (flat.size, numels)
            self.keep, off = [], 0
            for s in self.seqs:
                cnt = n1 * s.s1 * s.s2
                self.keep.append(flat[off:off + cnt].reshape(n1, s.s1, s.s2) != 0)
                off += cnt

        self.pse = None if pse is None else _f64(pse)
        self.pse_form = None
        if self.pse is not None:
            self._classify_pse()

    # ---- pse (SPEC §4) -------------------------------------------------------------------------
    def _classify_pse(self):
        p = self.pse
        if self.pse_type in (2, 3):
            assert p.ndim in (1, 2) and p.shape[-1] == self.n1, p.shape
            self.pse_form = "slopes"
        elif self.layout == "TND":
            assert p.ndim == 1, p.shape
            if p.size == self.t2 * self.n1:  # this reading wins when both lengths coincide
                self.pse_form = "tnd_bn1s"
            else:
                assert p.size == self.n1 * sum(s.s1 * s.s2 for s in self.seqs), p.shape
                self.pse_form = "tnd_bnss"
        else:
            assert p.ndim == 4 and p.shape[1] == self.n1, p.shape
            s1, s2 = self.q.shape[2], self.k.shape[2]
            if p.shape[2] == 1024 and s1 != 1024:
                assert s1 == s2 > 1024, (s1, s2)
                self.pse_form = "alibi_compressed"
            else:
                assert p.shape[2] in (1, s1) and p.shape[3] == s2, p.shape
                self.pse_form = "dense4"

    def pse_block(self, s):
        """External pse values for sequence s as float64 [N1, S1_b, S2_b] (types 0/1)."""
        p, n1, s1, s2 = self.pse, self.n1, s.s1, s.s2
        if self.pse_form == "dense4":
            blk = p[s.b if p.shape[0] > 1 else 0]
            return np.broadcast_to(blk, (n1, s1, s2))
        if self.pse_form == "alibi_compressed":
            h_last = p[s.b if p.shape[0] > 1 else 0, :, 1023, :]          # [N1, S2]
            i = np.arange(s1)[:, None]
            j = np.arange(s2)[None, :]
            col = np.where(j <= i, s1 - 1 - (i - j), 0)   # full[i,j] = H[.,h,1023,S1-1-(i-j)]
            return np.where(j <= i, h_last[:, col], 0.0)
        if self.pse_form == "tnd_bn1s":
            off = s.k0 * n1
            return np.broadcast_to(p[off:off + n1 * s2].reshape(n1, 1, s2), (n1, s1, s2))
        if self.pse_form == "tnd_bnss":
            off = n1 * sum(t.s1 * t.s2 for t in self.seqs[:s.b])
            return p[off:off + n1 * s1 * s2].reshape(n1, s1, s2)
        raise AssertionError(self.pse_form)

    def _alibi_start(self, s):
        """(q_start, kv_start) for sequence s. TND mode 8 (with a mask): only the band sequence."""
        if self.layout == "TND" and self.has_mask and self.sparse_mode == 8 and s.b != self.band_b:
            return 0, 0
        return self.q_start, self.kv_start

    def alibi_dist(self, s):
        """f(|delta|) as float64 [S1_b, S2_b]: |delta| (type 2) or sqrt(|delta|) (type 3)."""
        qs, ks = self._alibi_start(s)
        i = np.arange(s.s1, dtype=np.int64)[:, None]
        j = np.arange(s.s2, dtype=np.int64)[None, :]
        dist = np.abs((j + ks) - (i + qs)).astype(np.float64)
        return dist if self.pse_type == 2 else np.sqrt(dist)

    def slopes(self, s):
        p = self.pse
        return p if p.ndim == 1 else p[s.b]

    # ---- per-sequence logits, predicate, keep --------------------------------------------------
    def kv_heads(self, arr):
        """[N2, S, d] -> [N1, S, d] (query head h uses kv head h // G)."""
        return arr[np.arange(self.n1) // self.g]

    def logits(self, s):
        """Z [N1, S1_b, S2_b] of SPEC §3 for sequence s (float64)."""
        q = self.q[s.qsel]                              # [N1, S1, D]
        k = self.kv_heads(self.k[s.ksel])               # [N1, S2, D]
        x = q @ k.transpose(0, 2, 1)
        sc = self.scale
        if self.pse is None:
            return x * sc
        if self.pse_type == 1:
            return (x + self.pse_block(s)) * sc
        if self.pse_type == 0:
            return x * sc + self.pse_block(s)
        return x * sc - self.slopes(s)[:, None, None] * self.alibi_dist(s)[None]

    def computed(self, s):
        """C as bool [N1, S1_b, S2_b]."""
        n1, s1, s2 = self.n1, s.s1, s.s2
        if not self.has_mask:
            return np.ones((n1, s1, s2), dtype=bool)
        mode = self.sparse_mode
        role = None
        if mode in (7, 8):
            role = "band" if s.b == self.band_b else "other"
        prefix_b = None if self.prefix is None or mode not in (5, 6) else self.prefix[s.b]
        if mode not in (0, 1, 5):        # compressed modes: analytic, the mask is not read
            c = ref_computed(mode, s1, s2, self.pre, self.next, prefix_b, None, role)
            return np.broadcast_to(c, (n1, s1, s2))
        m = self.mask
        if self.layout == "TND":
            m2 = m.reshape(m.shape[-2:])
            c = ref_computed(mode, s1, s2, self.pre, self.next, prefix_b, m2[:s1, :s2], role)
            return np.broadcast_to(c, (n1, s1, s2))
        m4 = m.reshape((1, 1) + m.shape) if m.ndim == 2 else m
        mb = m4[s.b if m4.shape[0] > 1 else 0]
        heads = range(n1) if mb.shape[0] > 1 else range(1)     # [B,N1,..] masks differ per head
        c = np.stack([ref_computed(mode, s1, s2, self.pre, self.next, prefix_b, mb[h], role)
                      for h in heads])
        return np.broadcast_to(c, (n1, s1, s2))

    def keep_bits(self, s):
        """R as bool [N1, S1_b, S2_b], or None when every element is kept / no dropout."""
        if not self.dropout or self.keep is None:
            return None
        return self.keep[s.b]

    def drop(self, x, r):
        """R ? x / keep_prob : 0 (identity without dropout)."""
        if not self.dropout:
            return x
        y = x / self.keep_prob
        return y if r is None else np.where(r, y, 0.0)

    # ---- softmax statistics (SPEC §3, §8.3) ----------------------------------------------------
    def stats_out(self, rows):
        """Canonical per-row values (non-TND [B,N1,S1]; TND [N1,T1]) -> 8-lane output array."""
        if self.layout != "TND":
            return np.repeat(rows[..., None], N_LANES, axis=-1)
        if self.softmax_layout == "TND":
            flat = rows.T                                     # [T1, N1], true order
        else:                                                 # per-sequence head-major memory
            flat = np.full(self.t1 * self.n1, np.nan)
            for s in self.seqs:
                flat[s.q0 * self.n1:(s.q0 + s.s1) * self.n1] = rows[:, s.q0:s.q0 + s.s1].ravel()
            last = self.seqs[-1].q0 + self.seqs[-1].s1
            flat[last * self.n1:] = rows[:, last:].ravel()    # rows past the last offset (invalid)
            flat = flat.reshape(self.t1, self.n1)
        return np.repeat(flat[..., None], N_LANES, axis=-1)

    def stats_in(self, arr):
        """Given softmax_max/sum (8 lanes, 1 lane or none) -> per-sequence [N1, S1_b] getter."""
        a = np.asarray(arr).astype(np.float64)
        base = 2 if self.layout == "TND" else 3
        if a.ndim == base + 1:
            a = a[..., 0]
        assert a.ndim == base, a.shape
        if self.layout != "TND":
            return lambda s: a[s.b]
        flat = a.reshape(-1)
        if self.softmax_layout == "TND":
            rows = flat.reshape(self.t1, self.n1).T            # [N1, T1]
            return lambda s: rows[:, s.q0:s.q0 + s.s1]
        return lambda s: flat[s.q0 * self.n1:(s.q0 + s.s1) * self.n1].reshape(self.n1, s.s1)

    def empty_rows(self):
        """Canonical per-row array filled with 0."""
        if self.layout == "TND":
            return np.zeros((self.n1, self.t1))
        return np.zeros(self.q.shape[:3])


def _row_slice(prob, s):
    """Index of sequence s's rows in a canonical per-row array."""
    return (s.b,) if prob.layout != "TND" else (slice(None), slice(s.q0, s.q0 + s.s1))


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------

def masked_mm(a, b, c):
    """``a @ b`` where only computed elements (``c``) contribute: SPEC §3, a masked element
    contributes exactly 0 even when the other operand is NaN/inf.  The plain product when
    ``b`` is finite (identical then: masked ``a`` elements are 0); otherwise a dense
    [.., y, x, e] sum with IEEE arithmetic for the computed elements (tiny test shapes only)."""
    if np.all(np.isfinite(b)):
        return a @ b
    with np.errstate(invalid="ignore", over="ignore"):
        t = np.where(c[..., None], a[..., None] * b[..., None, :, :], 0.0)
    return t.sum(axis=-2)


def _softmax_stats(z, c):
    """Row max / sum over computed elements; invalid rows get (-FLT_MAX, +FLT_MAX)."""
    valid = c.any(axis=-1)
    m = np.where(c, z, -np.inf).max(axis=-1, initial=-np.inf)
    m_safe = np.where(valid, m, 0.0)
    l = np.exp(np.where(c, z - m_safe[..., None], -np.inf)).sum(axis=-1)
    return np.where(valid, m, -FLT_MAX), np.where(valid, l, FLT_MAX), valid


def ref_forward(query, key, value, head_num, input_layout, *, pse=None, keep=None, atten_mask=None,
                scale_value=1.0, keep_prob=1.0, pre_tokens=NO_LIMIT, next_tokens=NO_LIMIT,
                prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                pse_type=1, q_start_idx=None, kv_start_idx=None, softmax_layout=""):
    """float64 forward of SPEC §3: (attention_out, softmax_max, softmax_sum).

    attention_out has the query's layout with last dim Dv; the statistics are [B,N1,S1,8]
    (TND [T1,N1,8] in the memory order chosen by ``softmax_layout``, SPEC §8.3).
    """
    prob = _Problem(query, key, value, head_num, input_layout, pse=pse, keep=keep,
                    atten_mask=atten_mask, scale_value=scale_value, keep_prob=keep_prob,
                    pre_tokens=pre_tokens, next_tokens=next_tokens, prefix=prefix,
                    actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
                    sparse_mode=sparse_mode, pse_type=pse_type, q_start_idx=q_start_idx,
                    kv_start_idx=kv_start_idx, softmax_layout=softmax_layout)
    out = np.zeros(prob.q.shape[:-1] + (prob.dv,))
    m_rows = prob.empty_rows() - FLT_MAX
    l_rows = prob.empty_rows() + FLT_MAX
    for s in prob.seqs:
        z = prob.logits(s)
        c = prob.computed(s)
        m, l, valid = _softmax_stats(z, c)
        m_safe = np.where(valid, m, 0.0)
        with np.errstate(invalid="ignore"):
            # P = C ? exp(Z - m) / l : 0: a masked element is exactly 0 even when l is NaN
            p = np.where(c, np.exp(np.where(c, z - m_safe[..., None], -np.inf)) / l[..., None],
                         0.0)
        pd = prob.drop(p, prob.keep_bits(s))
        out[s.qsel] = masked_mm(pd, prob.kv_heads(prob.v[s.ksel]), c)   # invalid rows: out 0
        m_rows[_row_slice(prob, s)] = m
        l_rows[_row_slice(prob, s)] = l
    return _uncanon(out, prob.layout), prob.stats_out(m_rows), prob.stats_out(l_rows)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------

def ref_backward(query, key, value, dy, head_num, input_layout, *, softmax_max=None,
                 softmax_sum=None, attention_in=None, pse=None, keep=None, atten_mask=None,
                 scale_value=1.0, keep_prob=1.0, pre_tokens=NO_LIMIT, next_tokens=NO_LIMIT,
                 prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                 pse_type=1, q_start_idx=None, kv_start_idx=None, softmax_layout=""):
    """float64 backward of SPEC §3 with the *given* statistics and attention_in: (dq, dk, dv, dpse).

    If softmax_max / softmax_sum / attention_in are all None, ``ref_forward`` provides them.
    dpse follows SPEC §4.4 (None without pse and for compressed ALiBi).
    """
    kw = dict(pse=pse, keep=keep, atten_mask=atten_mask, scale_value=scale_value,
              keep_prob=keep_prob, pre_tokens=pre_tokens, next_tokens=next_tokens, prefix=prefix,
              actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
              sparse_mode=sparse_mode, pse_type=pse_type, q_start_idx=q_start_idx,
              kv_start_idx=kv_start_idx, softmax_layout=softmax_layout)
    given = [x is None for x in (softmax_max, softmax_sum, attention_in)]
    assert all(given) or not any(given), "softmax_max, softmax_sum, attention_in: all or none"
    if all(given):
        attention_in, softmax_max, softmax_sum = ref_forward(query, key, value, head_num,
                                                             input_layout, **kw)
    prob = _Problem(query, key, value, head_num, input_layout, **kw)
    dyc = _canon(_f64(dy), prob.layout, prob.n1)
    oc = _canon(_f64(attention_in), prob.layout, prob.n1)
    m_of, l_of = prob.stats_in(softmax_max), prob.stats_in(softmax_sum)

    dq, dk, dv = np.zeros_like(prob.q), np.zeros_like(prob.k), np.zeros_like(prob.v)
    dpse = None
    if prob.pse is not None and prob.pse_form != "alibi_compressed":
        dpse = np.zeros_like(prob.pse)
    n2, g, sc = prob.n2, prob.g, prob.scale

    for s in prob.seqs:
        q = prob.q[s.qsel]                                  # [N1, S1, D]
        k = prob.kv_heads(prob.k[s.ksel])                   # [N1, S2, D]
        v = prob.kv_heads(prob.v[s.ksel])                   # [N1, S2, Dv]
        d_y, o = dyc[s.qsel], oc[s.qsel]                    # [N1, S1, Dv]
        z = prob.logits(s)
        c = prob.computed(s)
        m, l = m_of(s), l_of(s)
        r = prob.keep_bits(s)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            p = np.where(c, np.exp(np.where(c, z - m[..., None], -np.inf)) / l[..., None], 0.0)
        pd = prob.drop(p, r)
        dp = d_y @ v.transpose(0, 2, 1)
        dpd = prob.drop(dp, r)
        dsum = (d_y * o).sum(axis=-1)
        with np.errstate(invalid="ignore"):
            ds = np.where(c, p * (dpd - dsum[..., None]), 0.0)   # = dL/dZ; masked: exactly 0
        ct = c.transpose(0, 2, 1)
        dq[s.qsel] = sc * masked_mm(ds, k, c)
        dk_h = sc * masked_mm(ds.transpose(0, 2, 1), q, ct)  # [N1, S2, D]
        dv_h = masked_mm(pd.transpose(0, 2, 1), d_y, ct)     # [N1, S2, Dv]
        dk[s.ksel] += dk_h.reshape(n2, g, s.s2, prob.d).sum(axis=1)
        dv[s.ksel] += dv_h.reshape(n2, g, s.s2, prob.dv).sum(axis=1)

        if dpse is not None:
            _accumulate_dpse(prob, s, ds, dpse)

    return (_uncanon(dq, prob.layout), _uncanon(dk, prob.layout), _uncanon(dv, prob.layout), dpse)


def _accumulate_dpse(prob, s, ds, dpse):
    """Add sequence s's contribution to dpse (SPEC §4.4). ``ds`` = dL/dZ, [N1, S1_b, S2_b]."""
    n1, s1, s2 = prob.n1, s.s1, s.s2
    if prob.pse_type in (2, 3):                             # dZ/dslope = -f(|delta|)
        ds_slope = (ds * -prob.alibi_dist(s)[None]).sum(axis=(1, 2))
        if dpse.ndim == 1:
            dpse += ds_slope
        else:
            dpse[s.b] += ds_slope
        return
    grad = ds if prob.pse_type == 0 else prob.scale * ds    # dZ/dPSE = 1 (type 0) or scale (type 1)
    if prob.pse_form == "dense4":
        bsel = s.b if dpse.shape[0] > 1 else 0
        dpse[bsel] += grad.sum(axis=1, keepdims=True) if dpse.shape[2] == 1 else grad
    elif prob.pse_form == "tnd_bn1s":
        off = s.k0 * n1
        dpse[off:off + n1 * s2] += grad.sum(axis=1).ravel()
    elif prob.pse_form == "tnd_bnss":
        off = n1 * sum(t.s1 * t.s2 for t in prob.seqs[:s.b])
        dpse[off:off + n1 * s1 * s2] += grad.ravel()
    else:
        raise AssertionError(prob.pse_form)
