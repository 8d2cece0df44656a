"""Which native tile products the CPU and numba's LLVM target allow (checked before compiling).

numba compiles for ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` when set (``generic`` means no
extra features), else for the host.  An intrinsic the target lacks (``vdpbf16ps`` without
AVX512_BF16) makes LLVM abort the whole process during compilation, so the kernels in
``kernels/native.py`` are compiled only after ``target_has`` said yes; the feature must also be
present on the host CPU itself (a target that claims it on a CPU without it would fault).
"""
import functools


@functools.lru_cache(maxsize=None)
def _features():
    """(target features, host features): sets of names like ``"avx512bf16"``."""
    import llvmlite.binding as ll
    from numba.core import config as nconfig

    def parse(text):
        return {f[1:] for f in text.split(",") if f.startswith("+")}

    try:
        host = parse(ll.get_host_cpu_features().flatten())
    except RuntimeError:            # llvmlite cannot read the host features: assume none
        host = set()
    target = host if nconfig.CPU_FEATURES is None else parse(nconfig.CPU_FEATURES)
    return frozenset(target), frozenset(host)


def target_has(*names):
    """Whether numba's target *and* the host CPU have every feature in ``names``."""
    target, host = _features()
    return all(n in target and n in host for n in names)


def native_kind(dtype_is_bf16, d, dv):
    """The native product kind for one call: "amx", "bf16", "f32" or None (the BLAS drivers).

    config.NATIVE: "auto" uses native products where they were measured to help (the bf16
    products of BF16_PRODUCTS), "all" also runs every other dtype through the float32
    micro-kernel, "off" keeps the BLAS drivers.  config.BF16_PRODUCTS for bfloat16 inputs
    (D, Dv even): "amx" takes AMX tiles (``amx_available``), "bf16" the AVX512_BF16 dot
    products, "float32" forces the float32 path (inputs converted on the host, P and dS never
    rounded); "auto" is "amx" where AMX is available, else "bf16" on CPUs without AMX, else
    (AMX present but not granted) "float32" (measured below).  A kind the CPU lacks falls back
    to the float32 path.
    """
    from numba.core import config as nconfig

    from . import config

    # NUMBA_DISABLE_JIT=1 (the coverage lane): the micro-kernels are @intrinsic LLVM code,
    # which pure Python cannot run; the BLAS drivers run with a numpy ``gemm`` there
    if nconfig.DISABLE_JIT:
        return None
    if config.NATIVE == "off" or not target_has("avx512f", "avx512bw", "fma"):
        return None
    mode = config.BF16_PRODUCTS
    if mode == "auto":
        # Measured (1 thread, tile shapes 96x128x64 .. 384x256x64): AMX tiles 620-700 GFLOP/s;
        # vdpbf16ps (4 x 64 block) on AMD Zen 4 runs at 2x the float32 FMA rate (197-217 vs
        # 85-110 GFLOP/s sgemm), on Intel Sapphire Rapids (the CPUs with AMX) at half of it
        # (66-72 vs 119-149 GFLOP/s for the float32 micro-kernel), so without AMX tiles "auto"
        # takes the bf16 dot products only where AMX is absent.
        if amx_available():
            mode = "amx"
        else:
            mode = "float32" if target_has("amx-bf16") else "bf16"
    if dtype_is_bf16 and d % 2 == 0 and dv % 2 == 0:
        if mode == "amx" and target_has("avx512bf16") and amx_available():
            return "amx"
        if mode == "bf16" and target_has("avx512bf16"):
            return "bf16"
    return "f32" if config.NATIVE == "all" else None

_ARCH_GET_XCOMP_PERM = 0x1022
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158          # x86_64


@functools.lru_cache(maxsize=None)
def _amx_permission():
    """Ask Linux for the AMX tile-data state (once per process; threads and forked children
    inherit it).  Without it the first tile instruction raises SIGILL.  False where the
    request is refused or the OS is not x86_64 Linux."""
    import ctypes
    import platform
    import sys

    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
            return False
        perm = ctypes.c_uint64(0)
        if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(perm)) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return bool(perm.value >> _XFEATURE_XTILEDATA & 1)


def amx_available():
    """Whether the AMX bf16 products (kernels/amx.py) may be compiled and run: numba's target
    and the host have amx-tile and amx-bf16, and the OS granted the tile-data permission.
    False under NUMBA_DISABLE_JIT=1 (the kernels are @intrinsic code pure Python cannot run)."""
    from numba.core import config as nconfig

    if nconfig.DISABLE_JIT:
        return False
    return target_has("amx-tile", "amx-bf16") and _amx_permission()
