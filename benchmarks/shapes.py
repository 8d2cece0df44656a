"""Benchmark shape table: one ``Row`` per scenario, each with a comment naming it.

A row is ``(B, N1, N2, S1, S2, D, layout, sparse_mode)`` plus keyword extras (tokens, dropout,
pse, varlen lengths, the torch peer, rounds, tags).  The issue's shapes are tagged ``"issue"``;
``compare.py --shapes issue`` and the pytest cases read this table only.

Conventions used by every benchmark:

* ``scale = 1 / sqrt(D)`` for fag_numba (``scale_value``) and torch (``scale``).
* Masked rows (sparse_mode 2, 3, 4) pass the compressed ``[2048, 2048]`` mask
  ``np.triu(np.ones((2048, 2048), bool), 1)`` to fag_numba (SPEC section 6); without a mask
  fag_numba computes full attention in every mode.
* ``peer`` names what torch runs for the same row:

  - ``"flash"``: ``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` and its
    ``_backward`` on ``(B, N, S, D)`` tensors (PERF.md); ``is_causal=True`` for modes 2/3
    (top-left aligned, equal to modes 2 and 3 when S1 == S2).  GQA rows give torch K/V
    expanded to N1 heads (outside the timing), since the flash op has no GQA.
  - ``"math"``: ``torch.ops.aten._scaled_dot_product_attention_math`` forward and its autograd
    backward, the O(S^2) fallback torch uses for features its flash kernel lacks (dropout, bias).
  - ``None``: torch has nothing comparable (band / sliding window, varlen): no peer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# The fixed shape of the compressed causal mask that modes 2, 3, 4, 7, 8 take (SPEC section 6).
COMPRESSED_MASK_SIZE = 2048
INF_TOKENS = 2147483647


@dataclass(frozen=True)
class Row:
    """One benchmark scenario (see the module docstring for the conventions)."""

    B: int
    N1: int
    N2: int
    S1: int
    S2: int
    D: int
    layout: str
    sparse_mode: int
    name: str = ""
    pre_tokens: int = INF_TOKENS
    next_tokens: int = INF_TOKENS
    keep_prob: float = 1.0
    pse: str | None = None            # None, or "alibi" (generated ALiBi, pse_type 2, slopes [N1])
    seqlens: tuple | None = None      # TND only: ((S1_b, S2_b), ...), one pair per sequence
    peer: str | None = "flash"        # "flash", "math" or None (module docstring)
    dtypes: tuple = ("fp32",)
    rounds: int = 5                   # timed rounds per pytest case (after 1 warm-up round)
    tags: frozenset = field(default_factory=frozenset)

    @property
    def has_mask(self) -> bool:
        """Whether fag_numba gets the compressed atten_mask (modes that need one)."""
        return self.sparse_mode in (2, 3, 4)

    @property
    def is_causal(self) -> bool:
        """torch's ``is_causal`` for this row (modes 2/3 with S1 == S2)."""
        return self.sparse_mode in (2, 3) and self.has_mask

    @property
    def features(self) -> tuple:
        """Names of the non-baseline features this row needs (for skip messages)."""
        out = []
        if self.has_mask:
            out.append({2: "causal mask (sparse_mode 2)", 3: "causal mask (sparse_mode 3)",
                        4: "band mask (sparse_mode 4)"}[self.sparse_mode])
        if self.keep_prob < 1.0:
            out.append("dropout (keep_prob < 1, seed)")
        if self.pse == "alibi":
            out.append("generated ALiBi pse (pse_type 2)")
        if self.layout == "TND":
            out.append("TND varlen layout")
        return tuple(out)

    def describe(self) -> str:
        """Compact shape text, e.g. ``B1 N8 S2048 D128 BNSD sm3``."""
        heads = f"N{self.N1}" if self.N1 == self.N2 else f"N{self.N1}/{self.N2}"
        seq = f"S{self.S1}" if self.S1 == self.S2 else f"S{self.S1}x{self.S2}"
        text = f"B{self.B} {heads} {seq} D{self.D} {self.layout} sm{self.sparse_mode}"
        if self.sparse_mode in (0, 4) and self.has_mask:
            text += f" pre{self.pre_tokens} next{self.next_tokens}"
        if self.keep_prob < 1.0:
            text += f" keep{self.keep_prob:g}"
        if self.pse:
            text += f" {self.pse}"
        return text


def _row(B, N1, N2, S1, S2, D, layout, sparse_mode, name, **kw) -> Row:
    return Row(B, N1, N2, S1, S2, D, layout, sparse_mode, name=name, **kw)


_ISSUE = frozenset({"issue", "big"})
_CAUSAL = frozenset({"causal", "big"})

ROWS: tuple[Row, ...] = (
    # ---- the issue's four dense shapes, fp32 and bf16 ----------------------------------------
    # LLaMA-7B-like attention slice: 8 heads of 128, 2k context (torch fp32 ref: 127 ms, PERF.md).
    _row(1, 8, 8, 2048, 2048, 128, "BNSD", 0, "b1n8s2048d128", dtypes=("fp32", "bf16"),
         tags=_ISSUE),
    # GPT-2/BERT-style head dim 64 at 4k context (torch fp32 ref: 126 ms).
    _row(1, 4, 4, 4096, 4096, 64, "BNSD", 0, "b1n4s4096d64", dtypes=("fp32", "bf16"),
         tags=_ISSUE),
    # BERT-large encoder block: 16 heads of 64, 512 tokens, batch 2 (many short heads; 17 ms).
    _row(2, 16, 16, 512, 512, 64, "BNSD", 0, "b2n16s512d64", dtypes=("fp32", "bf16"),
         tags=_ISSUE),
    # One long head (B*N = 1): only an S2 split can use both cores (torch: 207 GFLOP/s).
    _row(1, 1, 1, 8192, 8192, 64, "BNSD", 0, "b1n1s8192d64", dtypes=("fp32", "bf16"),
         tags=_ISSUE),
    # ---- causal versions (decoder training); fag: mode 3 + compressed mask, torch: is_causal --
    # LLaMA-7B-like decoder slice, causal (torch fp32 ref: 83 ms).
    _row(1, 8, 8, 2048, 2048, 128, "BNSD", 3, "b1n8s2048d128-causal", dtypes=("fp32", "bf16"),
         tags=_CAUSAL),
    # GPT-2-style decoder at 4k, causal (torch fp32 ref: 73 ms).
    _row(1, 4, 4, 4096, 4096, 64, "BNSD", 3, "b1n4s4096d64-causal", dtypes=("fp32", "bf16"),
         tags=_CAUSAL),
    # ---- band: sliding-window attention (Mistral / Longformer local window), mode 4 ----------
    # 16k tokens, window 256 each side: ~3% of the S x S elements; torch has no band kernel.
    _row(1, 1, 1, 16384, 16384, 64, "BNSD", 4, "b1n1s16384d64-band256", pre_tokens=256,
         next_tokens=256, peer=None, tags=frozenset({"band", "big"})),
    # ---- features torch's flash kernel lacks (torch peer: its MATH fallback) -----------------
    # Dropout 0.1 in training (BERT/GPT default attention dropout) on the LLaMA-like slice.
    _row(1, 8, 8, 2048, 2048, 128, "BNSD", 0, "b1n8s2048d128-dropout", keep_prob=0.9,
         peer="math", rounds=3, tags=frozenset({"feature", "dropout", "big"})),
    # BLOOM/MPT-style ALiBi (generated slopes, pse_type 2), causal, 16 heads of 64 at 2k.
    _row(1, 16, 16, 2048, 2048, 64, "BNSD", 3, "b1n16s2048d64-alibi-causal", pse="alibi",
         peer="math", rounds=3, tags=frozenset({"feature", "alibi", "big"})),
    # Packed varlen batch (TND): 4 sequences of 1536/1024/512/1024 tokens, 8 heads of 128.
    _row(4, 8, 8, 1536, 1536, 128, "TND", 0, "tnd-4seq-n8d128",
         seqlens=((1536, 1536), (1024, 1024), (512, 512), (1024, 1024)), peer=None,
         tags=frozenset({"feature", "varlen", "big"})),
    # ---- small smoke rows: quick end-to-end check of every code path ------------------------
    # Tiny dense attention, two heads.
    _row(1, 2, 2, 256, 256, 64, "BNSD", 0, "smoke-b1n2s256d64", dtypes=("fp32", "bf16"),
         rounds=20, tags=frozenset({"smoke"})),
    # Causal smoke (mode 3 with the compressed mask).
    _row(1, 2, 2, 256, 256, 64, "BNSD", 3, "smoke-b1n2s256d64-causal", rounds=20,
         tags=frozenset({"smoke", "causal"})),
    # BSH layout (Ascend's default for LLMs): exercises the layout path, 4 heads of 32.
    _row(2, 4, 4, 128, 128, 32, "BSH", 0, "smoke-bsh-b2n4s128d32", rounds=20,
         tags=frozenset({"smoke"})),
    # GQA 4:1 in BSND (LLaMA-2-70B-style grouping, 8 query heads over 2 kv heads).
    _row(1, 8, 2, 512, 512, 64, "BSND", 0, "smoke-gqa-b1n8g4s512d64", rounds=20,
         tags=frozenset({"smoke", "gqa"})),
    # Band smoke: mode 4, window 64 each side over 1024 tokens.
    _row(1, 1, 1, 1024, 1024, 64, "BNSD", 4, "smoke-band-s1024w64", pre_tokens=64,
         next_tokens=64, peer=None, rounds=20, tags=frozenset({"smoke", "band"})),
    # ---- sequence-length sweep for ``compare.py --plot`` (not in ``all``) ----------------------
    # 8 heads of 64 (a 512-wide attention block) at S = 512 .. 4096, dense and causal.
    *(_row(1, 8, 8, s, s, 64, "BNSD", mode, f"sweep-b1n8s{s}d64" + ("-causal" if mode else ""),
           dtypes=("fp32", "bf16"), rounds=3, tags=frozenset({"sweep"}))
      for mode in (0, 3) for s in (512, 1024, 2048, 4096)),
)

BY_NAME = {row.name: row for row in ROWS}
assert len(BY_NAME) == len(ROWS), "row names must be unique"


def select(specs) -> list[Row]:
    """Rows matching any of ``specs``: a row name, a tag (``issue``, ``causal``, ``smoke``, ...)
    or ``all`` (every row except the ``sweep`` rows).  Order follows the table; unknown specs raise ``KeyError`` listing the names."""
    if isinstance(specs, str):
        specs = [specs]
    chosen = []
    for spec in specs:
        if spec == "all":             # the sweep is for plots only: opt in with --shapes sweep
            hits = [row for row in ROWS if "sweep" not in row.tags]
        elif spec in BY_NAME:
            hits = [BY_NAME[spec]]
        else:
            hits = [row for row in ROWS if spec in row.tags]
        if not hits:
            tags = sorted({t for row in ROWS for t in row.tags})
            raise KeyError(f"unknown shape spec {spec!r}; names: {sorted(BY_NAME)}; tags: {tags}")
        chosen.extend(h for h in hits if h not in chosen)
    return [row for row in ROWS if row in chosen]
