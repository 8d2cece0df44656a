"""Column indices of the descriptor tables the kernels read (one place for this fact).

``seqtab`` is an int64 array ``[B, NSEQ]``: one row per sequence b (batch entry, or varlen
sequence in TND).  ``gp`` is an int64 array ``[NGP]`` of global integers, ``fp`` a float32
array ``[NFP]`` of global floats.  Element (b, h, i, d) of a tensor X lives at
``X_flat[seqtab[b, X_OFF] + h * gp[X_HS] + i * gp[X_RS] + d]``; this single formula covers
BSH, SBH, BSND, BNSD and TND with zero copies (``layout.py`` fills the tables).
"""
# ---- seqtab columns (per sequence) ----
S1 = 0            # query length of the sequence
S2 = 1            # key length
Q_OFF = 2         # element offset of (b, h=0, i=0) in q / dq
K_OFF = 3         # ... in k / dk
V_OFF = 4         # ... in v / dv
DY_OFF = 5        # ... in dy / attention_in / attention_out
ST_OFF = 6        # offset of row (b, h=0, i=0) in the per-row statistics arrays
ST_HS = 7         # head stride of the statistics (per sequence: TND "" layout is head-major per sequence)
LO = 8            # band: element computed iff LO <= j - i <= HI ...
HI = 9
PREFIX = 10       # ... or j < PREFIX
MASK_OFF = 11     # dense mask offset of (b, h=0, i=0, j=0)
PSE_OFF = 12      # external pse offset of (b, h=0, i=0, j=0)
PSE_HS = 13       # external pse head stride
PSE_RS = 14       # external pse row stride (0 = broadcast over rows)
DROP_OFF = 15     # dropout element index of (b, h=0, i=0, j=0); see DROP_HS / DROP_RS
QSTART = 16       # ALiBi q_start_idx for this sequence
KVSTART = 17      # ALiBi kv_start_idx for this sequence
SLOPE_OFF = 18    # index of slope (b, h=0) in the slopes array
DPSE_OFF = 19     # dpse offset of (b, h=0, i=0, j=0) (same strides as pse)
DROP_HS = 20      # dropout element index strides: e = DROP_OFF + h*DROP_HS + i*DROP_RS + j;
DROP_RS = 21      # S1*S2 and S2 for a plain call, the global ones for a chunk pair (chunks.py)
NSEQ = 22

# ---- gp entries (global ints) ----
N1 = 0
N2 = 1
G = 2
D = 3
DV = 4
Q_HS = 5
Q_RS = 6
K_HS = 7
K_RS = 8
V_HS = 9
V_RS = 10
DY_HS = 11
DY_RS = 12
ST_RS = 13
MASK_KIND = 14    # 0: no masking at all, 1: band/prefix only, 2: band/prefix and a dense mask
MASK_HS = 15
MASK_RS = 16
PSE_KIND = 17     # see PSE_* below
DROP_KIND = 18    # see DROP_* below
SEED_LO = 19
SEED_HI = 20
DROP_THRESHOLD = 21   # keep iff philox word < threshold (uint32 range)
BLOCK_M = 22
BLOCK_N = 23
NSPLIT = 24
DPSE_KIND = 25    # 0: no dpse; 1: dense per element (same offsets as pse); 2: reduce over rows; 3: slopes
OFFSET_LO = 26    # dropout counter offset (low / high 32 bits)
OFFSET_HI = 27
# non-finite inputs (SPEC §3: a masked element contributes exactly 0 even with NaN/inf inputs):
# NONFINITE = 1 when some row of q/k/v/dy/dsum holds a NaN/inf; then the uint8 ``bad`` array
# flags rows (row index = element offset // row length) from these bases, and only tiles that
# touch a flagged row take the careful path of ``kernels/guard.py``
NONFINITE = 28
BAD_Q = 29
BAD_K = 30
BAD_V = 31
BAD_DY = 32
BAD_DSUM = 33     # statistics rows (dsum non-finite, lse NaN or -inf), indexed by statistics row
# backward: up to this many whole tiles of consecutive query blocks share one score product
# and one dy v^T product (0 or 1: tile by tile); planning.backward_group
BWD_GROUP = 34
# forward: P @ V as sub-products of PV_ROWS query rows x PV_KEYS keys when PV_ROWS > 0
# (planning.forward_pv_split), else one product per tile
PV_ROWS = 35
PV_KEYS = 36
# the BLAS drivers' float32 products: the address of an LP64 Fortran ``sgemm_`` to call
# (torch's bundled MKL, ``fag_numba/mkl.py``), or 0 for SciPy's OpenBLAS (``tile.gemm``)
SGEMM = 37
NGP = 38

# ---- fp entries (global float32) ----
SCALE = 0
INV_KEEP = 1       # 1 / keep_prob (keep_prob rounded to float32 first)
NFP = 2

# ---- kinds ----
PSE_NONE = 0
PSE_ADD_THEN_SCALE = 1   # pse_type 1 external: Z = (X + pse) * scale
PSE_SCALE_THEN_ADD = 2   # pse_type 0 external: Z = X * scale + pse
PSE_ALIBI_ABS = 3        # pse_type 2: Z = X*scale - slope*|delta|
PSE_ALIBI_SQRT = 4       # pse_type 3: Z = X*scale - slope*sqrt(|delta|)
PSE_COMPRESSED = 5       # compressed ALiBi [.,N1,1024,S2], type 1 semantics: Z = (X + H) * scale
PSE_COMPRESSED_0 = 6     # compressed ALiBi with pse_type 0: Z = X*scale + H

DROP_NONE = 0
DROP_MASK = 1            # user drop_mask bit stream
DROP_PHILOX = 2          # in-kernel counter-based generator

MASK_NONE = 0
MASK_BAND = 1
MASK_DENSE = 2

EMPTY = 0
FULL = 1
PARTIAL = 2
