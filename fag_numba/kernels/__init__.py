"""Numba kernels of fag_numba: FlashAttention-2 forward and backward on tiles.

Source of the algorithm: FlashAttention-2 (Dao, 2023) forward with online softmax and the
backward that recomputes P from the saved statistics; tiling mirrors the NPU operator
(work items over (b, n2), inner loops over S2 and S1 blocks, see ASCEND_FAG_NOTES §12).

Data flow: the Python layer (``api`` -> ``validation`` -> ``layout`` / ``masks`` / ``pse`` /
``dropout`` -> ``planning``) turns every option into two integer tables and one float table
(``desc.py``); the kernels never see layouts, sparse modes or ``None``.

Deviations from the Ascend operator (documented in the README too):
- P and dS are not rounded to the input dtype before the products (more accurate), except
  on the native bf16 path (``native.py``), which rounds them to bf16 like the NPU.
- Invalid rows (no computed element) always get the ``inner_precise=2`` treatment.
- Tile skipping is exact (element granularity), not the NPU's coarse 64-column blocks.

Limitations: float32 math (fp16/fp8, and bf16 off the native bf16 path, are converted on
the host); ``native.py`` runs the tile products through its own AVX-512 micro-kernel instead of
BLAS when ``fag_numba.isa.native_kind`` allows it.
"""
