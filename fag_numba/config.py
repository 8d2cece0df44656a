"""Tunables and layout constants of fag_numba: the one place for each of these facts.

Tests patch the block sizes small (``unittest.mock.patch("fag_numba.config.BLOCK_M", 4)``) so
tiny inputs still span many tiles; the kernels receive block sizes as arguments, so patching
never triggers a recompile.  ``_reset()`` restores the defaults.
"""
import os

DEFAULTS = {
    # Query rows per backward tile.  A/B medians on the 2-core AVX-512 EPYC (fp32, BNSD):
    # 96 x 128 gave 268 / 258 / 254 ms at (1,8,2048,128) / (1,4,4096,64) / (1,1,8192,64) vs
    # 284 / 264 / 263 for 64 x 128; 128 x 128 helps D=128 but hurts D=64 (noise ~5%).
    "BLOCK_M": 96,
    # Key rows per backward tile.
    "BLOCK_N": 128,
    # Backward tiles for D >= WIDE_D: the GEMMs' inner dimension is long enough that bigger
    # tiles amortise OpenBLAS's packing: 128 x 256 measured 256 vs 271 ms at (1,8,2048,128) and
    # 245 vs 269 ms at (1,4,2048,256); at D = 64 it is 11% slower, hence the switch.
    "BLOCK_M_WIDE": 128,
    "BLOCK_N_WIDE": 256,
    "WIDE_D": 128,
    # AMX backward (native kind "amx") below WIDE_D: query rows per tile are BLOCK_M times this
    # factor (a factor, not a size, so tests that patch BLOCK_M small keep small AMX tiles).
    # The products accumulate dK, dV through C tile loads and stores once per query tile, so
    # taller tiles move less C per flop; for tiles of whole 16-pair chunks (32-row multiples,
    # as 96 and 192) the result is bitwise the same for any factor (the tile products add the
    # same chunks in the same order).  Same-process A/B, bf16
    # backward, 2 threads: 192 rows (1,4,4096,64) 0.85 / 0.89, (1,1,8192,64) 0.94,
    # (2,16,512,64) 0.99 of the 96-row time; 256 rows 0.98; at D = 128 (BLOCK_M_WIDE) 192 or
    # 256 rows measured no gain (1.03 / 1.05).
    "BWD_AMX_ROWS_FACTOR": 2,
    # Backward: consecutive whole tiles (same key block, FULL, untrimmed) compute their scores
    # Q K^T and dY V^T as one product of up to this many query rows; the other three products
    # stay per tile.  The inner dimension of those two is D, and OpenBLAS's packed path runs a
    # 96 x 128 x 64 product at ~125 GFLOP/s vs ~155 for 384 x 128 x 64 (1 thread).
    "BWD_SCORE_ROWS": 384,
    # The backward splits S2 into this many independent dQ partials when B*N2 is small, so one
    # long head keeps every core busy.  The count depends on the shape only (never on the
    # thread count) so results stay bitwise identical across thread counts (SPEC §9b).  Each
    # extra split costs one dq-sized float32 buffer: 2 keeps the backward at ~1 KB/token
    # (S=32768, N=1, D=64) and measured as fast as 4 on 2 cores.
    "SPLIT_TARGET": 2,
    # Forward work items are (b, h, q-block).  A/B medians vs 128 x 256 (2 threads, fp32):
    # (1,8,2048,128) 107 vs 123 ms, (1,4,4096,64) 121 vs 133 ms (torch: 96 / 106).  512 vs
    # 384 rows (A/B, 7 rounds, 2 threads, loaded machine): (2,16,512,64) 0.88 (384 split each
    # head 384 + 128: unequal items and a small, inefficient one), (1,8,2048,128) 0.945, the
    # causal (1,8,2048,128) / (1,4,4096,64) 0.985 / 0.98, (1,1,8192,64) 1.00: OpenBLAS packs
    # the key and value blocks (its expensive A-side copy) once per item, so fewer, taller
    # items pack them less often.  A single head with S1 <= 512 is one item (one thread).
    "FWD_BLOCK_M": 512,
    "FWD_BLOCK_N": 256,
    # Forward tile of the native kind "amx".  Measured again once the tile scratch sat on
    # 64-byte lines (tile.scratch; before, half of the runs had split-line tiles, and 384 x 384
    # had measured 0.71-0.93 of 512 x 256): same-process A/B, bf16 forward, 2 threads, 7-9
    # rounds, 512 x 256 vs 384 x 384: (1,8,2048,128) 0.93, (1,4,4096,64) 0.975, (1,8,1024,64)
    # 0.96, (2,16,512,64) 0.92, (1,1,8192,64) 0.95; causal (1,8,2048,128) / (1,4,4096,64)
    # 1.01 / 1.02.  768 x 256 0.94 / 0.94 (at S = 2048 / 512), 512 x 192 0.95 / 0.97,
    # 512 x 128 1.01, 512 x 384 1.08 / 1.04.  So the same as FWD_BLOCK_M/N, kept separate to
    # tune per kind (the "bf16" kind, Zen 4, is unmeasured and uses FWD_BLOCK_M/N).
    "FWD_BLOCK_M_AMX": 512,
    "FWD_BLOCK_N_AMX": 256,
    # Forward P @ V split into sub-products that OpenBLAS runs through its small-matrix kernel
    # (SkylakeX and later: M*N*K <= 100**3, no packing): PV_KEYS keys and as many rows (a
    # multiple of 16) as fit FWD_PV_MNK, when that is at least FWD_PV_MIN_ROWS
    # (planning.forward_pv_split).  1 thread, 512 x 256 tiles, Dv = 64: sub-products of
    # 112 x 128 keys ran at 190 GFLOP/s vs 163 for one product; at Dv = 128 (48 rows) slower.
    "FWD_PV_KEYS": 128,
    "FWD_PV_MNK": 1000000,
    "FWD_PV_MIN_ROWS": 96,
    # Native tile products (kernels/native.py: a 4 x 64 AVX-512 register-block micro-kernel in
    # place of OpenBLAS sgemm), used when numba's target has AVX-512 and the inputs are finite.
    # "auto": where measured to help, i.e. the bf16 dot products chosen by BF16_PRODUCTS;
    # "all": also every other dtype through the float32 micro-kernel; "off": BLAS drivers
    # only (env FAG_NUMBA_NATIVE).  The float32 micro-kernel is not the default: on the shared
    # 2-core Xeon it measured 0.9-1.4x OpenBLAS's time end to end (A/B, 5 rounds, heavy load).
    "NATIVE": os.environ.get("FAG_NUMBA_NATIVE", "auto"),
    # bfloat16 inputs (D, Dv even), env FAG_NUMBA_BF16: "amx" runs the tile products on Intel
    # AMX tiles (kernels/amx.py: tdpbf16ps, float32 accumulation, P and dS rounded to bf16;
    # SPEC §3) when isa.amx_available() (amx-tile/amx-bf16 in numba's target and the host, and
    # Linux granted the tile-data permission); "bf16" as AVX512_BF16 dot products (vdpbf16ps,
    # same rounding); "float32" forces the float32 path (inputs converted on the host, P and dS
    # never rounded; the fallback).  "auto" = "amx" where available, else "bf16" on CPUs
    # without AMX (Zen 4: vdpbf16ps at 2x the FMA rate), else "float32" (an AMX CPU without the
    # permission: there vdpbf16ps runs at half the FMA rate).  isa.native_kind decides.
    "BF16_PRODUCTS": os.environ.get("FAG_NUMBA_BF16", "auto"),
    # The BLAS drivers' float32 products (float32, fp16, fp8 inputs; bf16 without a native
    # kind), env FAG_NUMBA_FLOAT32_BLAS: "openblas" (SciPy's), "mkl" (the MKL that torch's CPU
    # wheel bundles, ``sgemm_`` of libtorch_cpu.so; an error when torch is not imported or has
    # none), "auto" = "mkl" when the process has imported torch by its first float32 call
    # (decided once per process, so repeated calls stay bitwise identical), else "openblas"
    # (fag_numba never imports torch for this).  One thread, at the kernels' tile shapes, MKL
    # ran at 1.16-1.35x OpenBLAS's GFLOP/s (benchmarks/blas_peer.py), the float32 calls at
    # 0.83-0.93 of their OpenBLAS time (A/B).  The two libraries may round differently
    # (bitwise equal at D = 64 here, ~1e-6 apart at D = 128).
    "FLOAT32_BLAS": os.environ.get("FAG_NUMBA_FLOAT32_BLAS", "auto"),
    # Host float32 <-> bf16/fp16 conversions (kernels/convert.py) of at least this many
    # elements run one chunk per thread; smaller ones on the calling thread.  Best of 30,
    # output allocated per call, 1 vs 2 threads (2-core Xeon, load 0.9), in us:
    #   elements  f32->bf16  f32->fp16  bf16->f32  fp16->f32
    #   512K      122 / 147  109 / 169  104 / 143  106 / 148
    #   1M        252 / 235  233 / 228  229 / 195  234 / 218
    #   2M        511 / 389  483 / 316  443 / 335  453 / 347
    #   4M        892 / 584  880 / 568  868 / 551  876 / 553
    # (the hand-off to a pool thread costs 20-70 us; below ~1M one thread is faster)
    "CONVERT_THREAD_MIN": 1 << 20,
    # Where a call's chunks run (omp.py), env FAG_NUMBA_CHUNK_RUNNER: "threads" = fag_numba's
    # own pool of Python threads; "openmp" / "auto" = on the calling thread's GNU OpenMP team
    # (torch's, from its bundled libgomp) when torch is imported and the caller is the main
    # thread, else the pool.  torch's workers spin after each op; on the team they run our
    # chunks instead of competing with them for the cores.
    "CHUNK_RUNNER": os.environ.get("FAG_NUMBA_CHUNK_RUNNER", "auto"),
    # Small calls run on the calling thread alone (planning.chunk_count): when the call's work
    # N1 * sum_b S1_b * S2_b * (D + Dv) is at most this (forward / backward).  Same plans and
    # results, only chunked once.  1 vs 2 threads, fp32 BNSD D=64, medians of 7 x 7 alternating
    # calls (2-core Xeon, load ~1), ms: forward (1,2,128) 0.27 / 0.37, (1,2,256) 0.49 / 0.52,
    # (1,4,256) 0.81 / 0.71; backward (1,2,128) 0.44 / 0.55, (1,2,256) 0.92 / 0.84.  (bf16 on
    # the amx kind measured 1 thread faster up to (1,8,1024) in that run: not used, see README.)
    "SERIAL_WORK_FWD": 1 << 24,
    "SERIAL_WORK_BWD": 1 << 23,
    # planning.py caches the plans of calls with at most PLAN_CACHE_SEQS sequences (the key
    # holds their lengths and bands; decode loops repeat a few shapes) and at most
    # PLAN_CACHE_ITEMS work items (<= 128 KB each), up to PLAN_CACHE_SIZE plans (then
    # emptied: <= 32 MB).  A cached plan skips ~10-20 us of numpy per call.
    # glibc malloc (Linux): at the first call, ``memory.keep_freed_memory`` sets
    # M_MMAP_THRESHOLD to 32 MB (glibc's own adaptive ceiling) and M_TRIM_THRESHOLD to
    # MALLOC_TRIM_MB, so the call's MB-sized buffers are reused from the heap instead of mapped
    # and unmapped per call.  Once torch had run in the process, every bf16 backward
    # (1,8,2048,128) took ~4000 page faults and 45 -> 92 ms (2 threads: unmaps shoot down the
    # other core's TLB).  Env FAG_NUMBA_MALLOC_TUNE=0 leaves malloc alone.
    "MALLOC_TUNE": os.environ.get("FAG_NUMBA_MALLOC_TUNE", "1").strip().lower()
    not in ("0", "false", "no", "off"),
    "MALLOC_TRIM_MB": 128,
    "PLAN_CACHE_SEQS": 64,
    "PLAN_CACHE_ITEMS": 4096,
    "PLAN_CACHE_SIZE": 256,
}

BLOCK_M = DEFAULTS["BLOCK_M"]
BLOCK_N = DEFAULTS["BLOCK_N"]
BLOCK_M_WIDE = DEFAULTS["BLOCK_M_WIDE"]
BLOCK_N_WIDE = DEFAULTS["BLOCK_N_WIDE"]
WIDE_D = DEFAULTS["WIDE_D"]
SPLIT_TARGET = DEFAULTS["SPLIT_TARGET"]
BWD_AMX_ROWS_FACTOR = DEFAULTS["BWD_AMX_ROWS_FACTOR"]
BWD_SCORE_ROWS = DEFAULTS["BWD_SCORE_ROWS"]
FWD_BLOCK_M = DEFAULTS["FWD_BLOCK_M"]
FWD_BLOCK_N = DEFAULTS["FWD_BLOCK_N"]
FWD_BLOCK_M_AMX = DEFAULTS["FWD_BLOCK_M_AMX"]
FWD_BLOCK_N_AMX = DEFAULTS["FWD_BLOCK_N_AMX"]
FWD_PV_KEYS = DEFAULTS["FWD_PV_KEYS"]
FWD_PV_MNK = DEFAULTS["FWD_PV_MNK"]
FWD_PV_MIN_ROWS = DEFAULTS["FWD_PV_MIN_ROWS"]
NATIVE = DEFAULTS["NATIVE"]
FLOAT32_BLAS = DEFAULTS["FLOAT32_BLAS"]
BF16_PRODUCTS = DEFAULTS["BF16_PRODUCTS"]
CONVERT_THREAD_MIN = DEFAULTS["CONVERT_THREAD_MIN"]
CHUNK_RUNNER = DEFAULTS["CHUNK_RUNNER"]
SERIAL_WORK_FWD = DEFAULTS["SERIAL_WORK_FWD"]
SERIAL_WORK_BWD = DEFAULTS["SERIAL_WORK_BWD"]
MALLOC_TUNE = DEFAULTS["MALLOC_TUNE"]
MALLOC_TRIM_MB = DEFAULTS["MALLOC_TRIM_MB"]
PLAN_CACHE_SEQS = DEFAULTS["PLAN_CACHE_SEQS"]
PLAN_CACHE_ITEMS = DEFAULTS["PLAN_CACHE_ITEMS"]
PLAN_CACHE_SIZE = DEFAULTS["PLAN_CACHE_SIZE"]

# Numba policy (STYLE b4): never the blanket fastmath flag.  'reassoc' lets row reductions vectorise,
# 'contract' allows FMA; nnan/ninf are excluded because masking relies on -inf.
FASTMATH_FLAGS = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})
# On-disk caching of compiled kernels: on by default (the cold compile costs ~10-20 s per
# process; a warm start ~0.5 s), FAG_NUMBA_CACHE=0 turns it off.  _jit.py says why it is safe
# (STYLE c: parallel + cache has a history) and how stale or broken entries are avoided.
CACHE = os.environ.get("FAG_NUMBA_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> str:
    """Root directory of the kernel cache (read at each call, so tests can redirect it).

    First match wins: ``FAG_NUMBA_CACHE_DIR``; ``NUMBA_CACHE_DIR`` (numba's own setting, so a
    site that already points numba's caches somewhere keeps everything there), in a
    ``fag_numba-<version>`` subdirectory; ``$XDG_CACHE_HOME/fag_numba/<version>``;
    ``~/.cache/fag_numba/<version>``.  The version in the path keeps installed versions apart
    (entries are also stamped with a hash of the sources, so a local edit recompiles too).
    """
    explicit = os.environ.get("FAG_NUMBA_CACHE_DIR")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    from . import __version__
    numba_dir = os.environ.get("NUMBA_CACHE_DIR")
    if numba_dir:
        return os.path.join(os.path.abspath(os.path.expanduser(numba_dir)),
                            f"fag_numba-{__version__}")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fag_numba", __version__)

# memory.require skips its MemAvailable / cgroup reading for requests below this size (SPEC §9
# refusals are about sizes that cannot fit; the reading costs ~0.1 ms per call, noticeable on
# small calls such as decode steps)
MEMCHECK_MIN_BYTES = 64 << 20

FLT_MAX = 3.4028234663852886e38
# "no limit" for band bounds: far outside any int64 index difference we can meet (S <= 2**40).
BAND_INF = 1 << 62

# Capabilities, stated once (validation and test generators read them).
LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")


def _reset():
    """Restore every tunable to its default (tests call this after patching)."""
    g = globals()
    for key, value in DEFAULTS.items():
        g[key] = value
