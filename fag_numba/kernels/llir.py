"""LLVM IR building blocks shared by the ``@intrinsic`` kernels (tile.py's vector exp and row
max, native.py's AVX-512 micro-kernel, amx.py's tile products): one definition of the types and
helpers each of them used to spell out again."""
import llvmlite.ir as ir
from numba.core import cgutils


class BFloat(ir.Type):
    """LLVM's ``bfloat`` (llvmlite has no class for it; the IR is text, so its name suffices)."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, BFloat)

    def __hash__(self):
        return hash("bfloat")


F32 = ir.FloatType()
I1 = ir.IntType(1)
I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
VOID = ir.VoidType()
VF = ir.VectorType(F32, 16)          # 16 float32 lanes: one zmm
VI = ir.VectorType(I32, 16)
VM = ir.VectorType(I1, 16)
VB16 = ir.VectorType(BFloat(), 16)
VB32 = ir.VectorType(BFloat(), 32)
VH16 = ir.VectorType(I16, 16)
VH32 = ir.VectorType(I16, 32)


def fn(mod, name, ret, args):
    """Declare (once per module) and return the function or LLVM intrinsic ``name``."""
    return cgutils.get_or_insert_function(mod, ir.FunctionType(ret, args), name)


def splat(builder, val, vty):
    """Broadcast a scalar to every lane of the vector type ``vty``."""
    n = vty.count
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), val, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined),
                                  ir.Constant(ir.VectorType(I32, n), [0] * n))


def data(context, builder, aty, val):
    """The data pointer of a numba array value of type ``aty``."""
    return context.make_array(aty)(context, builder, val).data


def rounded(builder, v):
    """``v`` as its own rounded value (``llvm.arithmetic.fence``): the kernels' fast-math flags
    (``contract``) must not fuse the product that makes ``v`` into a following add or subtract,
    so a fused pass gives the bits of the separate passes it replaces (x86 only: the callers
    are the AVX-512 kernels)."""
    f = fn(builder.module, f"llvm.arithmetic.fence.v{v.type.count}f32", v.type, [v.type])
    return builder.call(f, [v])


def store(builder, v, ptr, align, mask=None):
    """Store the vector ``v`` at ``ptr``: all lanes, or those of the <n x i1> ``mask`` (LLVM's
    masked store, named after v's type: v16f32, v16i16, v16i32, ...)."""
    if mask is None:
        builder.store(v, ptr, align=align)
        return
    el = v.type.element
    tag = "f32" if isinstance(el, ir.FloatType) else f"i{el.width}"
    f = fn(builder.module, f"llvm.masked.store.v{v.type.count}{tag}.p0", VOID,
           [v.type, ptr.type, I32, mask.type])
    builder.call(f, [v, ptr, ir.Constant(I32, align), mask])


def bf16_pairs(builder, x0, x1):
    """Two <16 x float> rows as one <16 x i32> of bf16 pairs: lane c holds (bf16(x0[c]),
    bf16(x1[c])) (round to nearest even), the "VNNI" dword of rows 2p, 2p + 1."""
    idx = []
    for c in range(16):
        idx += [c, 16 + c]
    z = builder.shuffle_vector(builder.fptrunc(x0, VB16), builder.fptrunc(x1, VB16),
                               ir.Constant(ir.VectorType(I32, 32), idx))
    return builder.bitcast(z, VI)


def loop_entry(builder, count, name):
    """Enter a counted loop: new blocks ``name.loop`` and ``name.done``, a branch to the loop
    when ``count`` (i64) > 0 (else past it), the builder left at the loop's start.  Returns
    (pre, loop, done): pre is the block the phis' initial values come from."""
    pre = builder.block
    loop = builder.append_basic_block(f"{name}.loop")
    done = builder.append_basic_block(f"{name}.done")
    builder.cbranch(builder.icmp_signed(">", count, ir.Constant(I64, 0)), loop, done)
    builder.position_at_end(loop)
    return pre, loop, done


def lanes(builder, n):
    """<16 x i1>: lane < n (n: i64; every lane for n >= 16, none for n <= 0)."""
    return builder.icmp_signed("<", ir.Constant(VI, list(range(16))),
                               splat(builder, builder.trunc(n, I32), VI))


def edges(builder, nrows, ncols):
    """(mask of the block's columns < ncols, its last row index clamped to >= 0): rows past
    nrows are addressed as that row (never outside the operand) and masked off."""
    colmask = lanes(builder, ncols)
    last = builder.sub(nrows, ir.Constant(I64, 1))
    last = builder.select(builder.icmp_signed("<", last, ir.Constant(I64, 0)),
                          ir.Constant(I64, 0), last)
    return colmask, last


def transpose16(builder, vec):
    """vec[p][j] -> vec[j][p] for 16 <16 x i32>: stage b swaps bit b of the row index with bit
    b of the lane (4 stages of 16 two-source shuffles), in place."""
    for b in (8, 4, 2, 1):
        for i in range(16):
            if i & b:
                continue
            x, y = vec[i], vec[i + b]
            lo = [l if not l & b else 16 + l - b for l in range(16)]
            hi = [l + b if not l & b else 16 + l for l in range(16)]
            vec[i] = builder.shuffle_vector(x, y, ir.Constant(VI, lo))
            vec[i + b] = builder.shuffle_vector(x, y, ir.Constant(VI, hi))
