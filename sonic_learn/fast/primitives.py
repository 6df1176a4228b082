"""Device building blocks shared by the CuTe-DSL kernels (inlined into every kernel that calls them).

One home for the small ``@cute.jit`` helpers more than one kernel needs, so each is written once:

* **Warp scans and reductions**: ``warp_exclusive_sum`` / ``warp_suffix_sum`` /
  ``warp_exclusive_max`` (shuffle scans over the 32 lanes), ``warp_sum`` (butterfly reduction),
  ``warp_exclusive_scan`` (a warp scans a whole array in chunks), ``lane_bins_and_keys_above`` (a
  warp reads a radix histogram, highest bins first). Used by the top-k kernels (``fast.topk``),
  the routing metadata and token-rounding kernels (``fast.routing``) and the memory-bound MoE
  kernels (``fast.moe_kernels``).
* **Keys**: a float's bits turned into an integer with the float's order (``to_ordered``), and the
  top-k key that also carries the column (``pack_key``, ``pack_key16``, ``unpack_key``; the radix
  select's ``radix_key``). ``sonic_learn.fast.topk``'s docstring explains the design.
* **Cache hints**: ``prefetch_l2`` (a bulk prefetch of a contiguous byte range into L2, e.g. a
  fused epilogue's input fetched while the mainloop still runs).
* **SwiGLU in fp32**: ``swiglu_parts`` and ``dswiglu``, the one SwiGLU formula of the kernels, used
  by the standalone passes (``fast.moe_kernels``) and the fused GEMM epilogues (``fast.grouped_gemm.epilogues``)
  alike, so fused and unfused results agree bit for bit.
"""

from __future__ import annotations

from sonic_learn.fast._cute import import_cutlass

cutlass = import_cutlass()
import cutlass.cute as cute  # noqa: E402  (after the arch is pinned by import_cutlass)
from cutlass import Float32, Int32, Int64, Uint32, const_expr  # noqa: E402
from cutlass._mlir.dialects import llvm, nvvm  # noqa: E402
from cutlass.cutlass_dsl import T, dsl_user_op  # noqa: E402

__all__ = [
    "warp_exclusive_sum", "warp_exclusive_max", "warp_suffix_sum", "warp_sum", "warp_exclusive_scan",
    "lane_bins_and_keys_above",
    "IDX_BITS", "IDX_MASK", "value_word", "to_ordered", "from_ordered", "pack_key", "pack_key16", "unpack_key",
    "radix_key", "sigmoid", "swiglu_parts", "dswiglu", "prefetch_l2",
]


# ---------------------------------------------------------------------------------------------
# Warp scans and reductions
# ---------------------------------------------------------------------------------------------
@cute.jit
def warp_exclusive_sum(x: Int32, lane: Int32):
    """Exclusive prefix sum over the 32 lanes of a warp, and the warp total (Hillis-Steele)."""
    inclusive = x
    for step in cutlass.range_constexpr(5):
        offset = 1 << step
        from_below = cute.arch.shuffle_sync_up(inclusive, offset)
        if lane >= offset:
            inclusive = inclusive + from_below
    total = cute.arch.shuffle_sync(inclusive, 31)
    return inclusive - x, total


@cute.jit
def warp_exclusive_max(x: Int32, lane: Int32, identity: Int32):
    """Exclusive prefix maximum over the 32 lanes (lane 0 gets ``identity``), and the warp's maximum."""
    inclusive = x
    for step in cutlass.range_constexpr(5):
        offset = 1 << step
        from_below = cute.arch.shuffle_sync_up(inclusive, offset)
        if lane >= offset and from_below > inclusive:
            inclusive = from_below
    exclusive = cute.arch.shuffle_sync_up(inclusive, 1)
    if lane == 0:
        exclusive = identity
    return exclusive, cute.arch.shuffle_sync(inclusive, 31)


@cute.jit
def lane_bins_and_keys_above(hist: cute.Tensor, lane: Int32, bins: cutlass.Constexpr[int]):
    """A radix pass's shared-memory histogram read by one warp: lane l owns bins
    (bins/32)*l ... (bins/32)*(l+1) - 1. Returns the lane's bin counts (registers) and how many keys
    lie in the bins above all of them (the higher lanes' bins), i.e. the start of a descending scan."""
    per_lane = bins // 32
    counts = cute.make_rmem_tensor(per_lane, Int32)
    lane_total = Int32(0)
    for b in cutlass.range_constexpr(per_lane):
        counts[b] = hist[lane * per_lane + b]
        lane_total = lane_total + counts[b]
    return counts, warp_suffix_sum(lane_total, lane) - lane_total


@cute.jit
def warp_suffix_sum(x: Int32, lane: Int32) -> Int32:
    """Inclusive suffix sum: sum of x over lanes >= this lane."""
    inclusive = x
    for step in cutlass.range_constexpr(5):
        offset = 1 << step
        from_above = cute.arch.shuffle_sync_down(inclusive, offset)
        if lane + offset < 32:
            inclusive = inclusive + from_above
    return inclusive


@cute.jit
def warp_sum(x: Float32) -> Float32:
    """Butterfly reduction: after 5 steps every lane holds the sum over the warp's 32 lanes."""
    for step in cutlass.range_constexpr(5):
        x = x + cute.arch.shuffle_sync_bfly(x, offset=1 << (4 - step))
    return x


@cute.jit
def warp_exclusive_scan(src: cute.Tensor, dst: cute.Tensor, n: Int32, lane: Int32,
                        unroll: cutlass.Constexpr[int]) -> Int32:
    """dst[i] = src[0] + ... + src[i-1] for i < n (dst may alias src); returns the total.

    Lane l handles ``unroll`` consecutive entries of each 32 * unroll chunk: it loads them all first,
    the warp scans the 32 lane sums, then each lane writes its running prefixes.
    """
    carry = Int32(0)
    for start in cutlass.range(0, n, 32 * unroll):
        vals = cute.make_rmem_tensor(unroll, Int32)
        lane_sum = Int32(0)
        for u in cutlass.range_constexpr(unroll):
            i = start + lane * unroll + u
            v = Int32(0)
            if i < n:
                v = src[i]
            vals[u] = v
            lane_sum = lane_sum + v
        before, chunk_total = warp_exclusive_sum(lane_sum, lane)
        running = carry + before
        for u in cutlass.range_constexpr(unroll):
            i = start + lane * unroll + u
            if i < n:
                dst[i] = running
            running = running + vals[u]
        carry = carry + chunk_total
    return carry


# ---------------------------------------------------------------------------------------------
# Keys: float bits <-> order-preserving integers
# ---------------------------------------------------------------------------------------------
IDX_BITS = 16  # the low 16 bits of a top-k key hold the inverted column, 0xFFFF - col
IDX_MASK = (1 << IDX_BITS) - 1


@cute.jit
def value_word(words: cute.Tensor, i: cutlass.Constexpr[int], width: cutlass.Constexpr[int]) -> Int32:
    """Element i's bits placed in the top ``width`` bits of an int32 (the low bits are zero).

    ``words`` is the lane's registers read as int32. A 32-bit word holds two 16-bit values, the
    even element in its low half. Moving a bf16's bits to the top half gives exactly its float32
    bit pattern, so "the low 16 bits of the key" are the low mantissa bits of a float32.
    """
    if const_expr(width == 32):
        return words[i]
    elif const_expr(i % 2 == 0):
        return words[i // 2] << 16
    else:
        return words[i // 2] & Int32(-65536)  # 0xFFFF0000


@cute.jit
def to_ordered(word: Int32, width: cutlass.Constexpr[int]) -> Int32:
    """Signed integer with the float order, -0.0 and +0.0 both 0 (they tie, as torch compares them).

    A non-negative float's bits already grow with its value. A negative float's bits grow with
    its *magnitude*; flipping the magnitude bits and adding one unit turns them into -magnitude.
    """
    unit = 1 << (32 - width)  # the lowest bit of the value field
    magnitude = 0x7FFFFFFF & ~(unit - 1)
    sign = word >> 31  # 0 for a non-negative value, -1 (all ones) for a negative one
    return (word ^ (sign & magnitude)) + (sign & unit)


@cute.jit
def from_ordered(ordered: Int32, width: cutlass.Constexpr[int]) -> Int32:
    """Inverse of ``to_ordered`` (a -0.0 comes back as +0.0: the caller re-reads zeros from x)."""
    unit = 1 << (32 - width)
    magnitude = 0x7FFFFFFF & ~(unit - 1)
    sign = ordered >> 31
    return (ordered - (sign & unit)) ^ (sign & magnitude)


@cute.jit
def pack_key(word: Int32, col: Int32) -> Int64:
    """The bitonic key of a float32 value: its ordered bits on top, ``0xFFFF - col`` in the low 16.

    The definition, for every width: key = ordered(bits) << 16 | (0xFFFF - col). A float32 needs all
    32 bits, so its key is an int64. A bf16/fp16 value's ordered bits already sit in the top half of
    an int32 (``value_word``), so its key is an int32: ``pack_key16`` builds it in fewer ALU instructions.
    """
    return (Int64(to_ordered(word, 32)) << IDX_BITS) | Int64(IDX_MASK - col)


@dsl_user_op
def sign_mask(word: Int32, byte: int, *, loc=None, ip=None) -> Int32:
    """-1 if the top bit of byte ``byte`` (0..3) of ``word`` is set, else 0: one PRMT (byte
    permute) whose selector copies that byte's sign bit into all four bytes."""
    selector = (8 | byte) * 0x1111  # 4 nibbles: "byte `byte`, sign-replicated"
    asm = f"prmt.b32 $0, $1, 0, {selector:#x};"
    return Int32(llvm.inline_asm(T.i32(), [Int32(word).ir_value(loc=loc, ip=ip)], asm, "=r,r",
                                 has_side_effects=False, is_align_stack=False,
                                 asm_dialect=llvm.AsmDialect.AD_ATT))


@cute.jit
def pack_key16(word: Int32, half: cutlass.Constexpr[int], tag: Int32) -> Int32:
    """``pack_key`` for the 16-bit value in half ``half`` of ``word`` (0: the low half, the even
    element), with ``tag = 0xFFFF - col``: the same int32, in fewer integer-ALU instructions.

    The ordered form of a value is +magnitude or -magnitude (two's complement), so the key is
    ``magnitude << 16`` times +1 or -1, plus the tag; -0.0 (magnitude 0) gets the key of +0.0.
    Why not the definition: the integer ALU is this kernel's bottleneck (it also runs every
    compare-exchange), and the definition costs ~6 ALU instructions per element. Here the ALU does
    three (mask the magnitude, one PRMT for the sign, ``| 1``); the multiply-add runs on the FMA pipe.
    """
    if const_expr(half == 0):  # move the low half up by 16 inside the multiply
        return (word & Int32(0x7FFF)) * ((sign_mask(word, 1) | 1) << 16) + tag
    else:
        return (word & Int32(0x7FFF0000)) * (sign_mask(word, 3) | 1) + tag


@cute.jit
def unpack_key(key, width: cutlass.Constexpr[int]):
    """Inverse of ``pack_key``: return (the value's word, column)."""
    col = IDX_MASK - Int32(key & IDX_MASK)
    if const_expr(width == 16):
        ordered = key & Int32(-65536)
    else:
        ordered = Int32(key >> IDX_BITS)
    return from_ordered(ordered, width), col


@cute.jit
def radix_key(word: Int32, width: cutlass.Constexpr[int]) -> Uint32:
    """Unsigned order-preserving key of the value alone, top-aligned (radix select reads digits)."""
    return Uint32(to_ordered(word, width)) ^ Uint32(0x80000000)  # flip the sign: signed -> unsigned order


# ---------------------------------------------------------------------------------------------
# SwiGLU in fp32 (the standalone passes and the fused GEMM epilogues)
# ---------------------------------------------------------------------------------------------
@cute.jit
def sigmoid(g: Float32) -> Float32:
    return Float32(1.0) / (Float32(1.0) + cute.math.exp(-g, fastmath=True))


@cute.jit
def swiglu_parts(g: Float32, u: Float32):
    """One (gate, up) pair in fp32: (sigmoid(g), silu(g) = g * sigmoid(g), A = u * silu(g)). The one
    SwiGLU formula of the library's kernels (standalone passes and fused GEMM epilogues alike)."""
    sig = sigmoid(g)
    silu = g * sig
    return sig, silu, u * silu


@cute.jit
def dswiglu(g: Float32, u: Float32, sig: Float32, silu: Float32, grad: Float32):
    """(d gate, d up) of A = u * silu(g) for the output gradient ``grad`` (parts from ``swiglu_parts``):
    d gate = grad * u * sig * (1 + g * (1 - sig)), d up = grad * silu."""
    return grad * u * sig * (Float32(1.0) + g * (Float32(1.0) - sig)), grad * silu


# ---------------------------------------------------------------------------------------------
# Cache hints
# ---------------------------------------------------------------------------------------------
@dsl_user_op
def prefetch_l2(ptr: cute.Pointer, num_bytes: Int32, *, loc=None, ip=None) -> None:
    """Ask the copy engine to bring ``num_bytes`` of global memory from ``ptr`` into L2, without
    waiting (``cp.async.bulk.prefetch.L2.global``: no registers, no barrier, no data to the SM).
    ``ptr`` must be 16-byte aligned and ``num_bytes`` a multiple of 16, the whole range inside one
    allocation. It only changes where later loads find the data, never their values."""
    nvvm.cp_async_bulk_prefetch(ptr.llvm_ptr, Int32(num_bytes).ir_value(loc=loc, ip=ip), loc=loc, ip=ip)
