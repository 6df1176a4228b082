"""The MoE layer's memory-bound kernels on Hopper (CuTe-DSL): SwiGLU, dSwiGLU + dS, gather-and-sum.

What this teaches (paper Section 3 and Appendix C; reference: ``sonic_learn.reference.moe``):
the two grouped GEMMs do the FLOPs, but a MoE layer also has *elementwise and reduction* work
between them. Every such pass reads and writes (P, n) or (P, d) activations (P = routed pairs),
so its cost is bytes, not FLOPs. Five kernels here, one per job:

* ``SwiGLUForward``: A = up * silu(gate) from H on the interleaved layout (gate = H[:, 0::2],
  up = H[:, 1::2]), fp32 math. One thread turns one 16-byte chunk of H (4 gate/up pairs) into
  4 values of A.
* ``SwiGLUBackward`` (the reduced-memory "dH" pass, Appendix C): given H, dA' = dO @ W2^T and the
  row's score s, one warp per row computes ``dS = <dA', A>`` (fp32 row reduction, written straight
  to pair order through ``pair_of_row``), ``A' = s * A`` (for dW2) and ``dH = dSwiGLU(H, s * dA')``.
  A is recomputed from H in registers: it is never cached. With ``scaled=False`` (the standard
  backward) it is the plain dSwiGLU pass: dH from (H, dA) and A for dW2.
* ``GatherScaleDot`` (the standard backward's extra pass): ``dS = <dO[token], Y[row]>`` and
  ``dY = s * dO[token]``; it must read the cached Y, the (P, d) tensor SonicMoE never keeps.
* ``GatherSum``: ``out[t] = sum over the pairs p of token t of w[p] * rows[row_of_pair[p]]``, fp32
  accumulation, used weighted (the forward output O) and unweighted (dX). Each token *pulls* its
  rows, so there are no atomics and the sum order is fixed: the result is deterministic.
* ``ZeroRowsPastEnd`` (token rounding's padded layout only): zeroes the K_TAIL_ROWS rows after the
  last expert of the two operands the weight-gradient GEMMs read by whole k-tiles, with the end
  read on the device from ``expert_offsets[E]`` (no host sync). One launch for what takes ten torch
  ops (``fast.moe.zero_rows_past_end``, the readable version, which says why the rows must be 0).

No transposed copy of a weight is made anywhere: the grouped GEMM reads K-major weights for the
backward's W1^T and W2^T and stores dW2 transposed itself.

**Fused and unfused.** SonicMoE runs SwiGLU inside the up-projection's epilogue and the
dSwiGLU/dS pass inside the dH GEMM's epilogue, on the accumulator tile still in registers; so does
the reduced-memory fast layer (``grouped_gemm.epilogues.SwiGLUEpilogue`` / ``DSwiGLUEpilogue``, the same
arithmetic as the two kernels here). Fusion saves, in bytes for 16-bit activations:

* forward: the separate SwiGLU pass re-reads H (4Pn) after the GEMM wrote it; fused, H and A are
  written from the same registers;
* reduced-memory backward: unfused, the dA' GEMM writes dA' (2Pn) and this pass re-reads it plus
  H (4Pn); fused, dA' never exists in memory: 4Pn bytes and one launch saved.

Measured on an H200 (``benchmarks/moe.py``), the fused layer is within noise of the unfused one:
the epilogue runs while the tensor cores of its SM idle (the cooperative kernel does not overlap
epilogue and mainloop), which eats what the saved bytes gain. These kernels stay for the standard
backward (the baseline, unfused by design: its extra pass over (P, d) tensors is the point) and
for ``sonic_learn.fast.moe.fast_ops(fuse_swiglu=False, fuse_dh=False)``.

Every kernel is compiled once per (dtype, variant) from fake tensors with symbolic sizes and is
called through TVM-FFI on the current torch stream (no host synchronization; CUDA-graph safe).
Sizes: column counts (d, n) must be multiples of 8 (16-byte vectors of bf16/fp16); the callers in
``sonic_learn.fast.moe`` validate that before any launch.
"""

from __future__ import annotations

import torch

from sonic_learn.fast._cute import compile_options, compiled, cutlass_dtype, import_cutlass, launch

cutlass = import_cutlass()
import cutlass.cute as cute  # noqa: E402  (after the arch is pinned by import_cutlass)
from cutlass import Float32, Int32, const_expr  # noqa: E402
from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream  # noqa: E402

from sonic_learn.fast.moe import K_TAIL_ROWS  # noqa: E402
from sonic_learn.fast.primitives import dswiglu, swiglu_parts, warp_sum  # noqa: E402

THREADS = 128  # threads per CTA for every kernel here
WARP = 32
ROWS_PER_CTA = THREADS // WARP  # the row kernels give one warp to one row
VEC = 8  # 16-bit elements per 16-byte vector
PAIRS = VEC // 2  # gate/up pairs in one 16-byte chunk of H
GATHER_GROUP = 4  # pairs whose rows GatherSum loads before it adds them (16-byte loads in flight per thread)


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@cute.jit
def _load_vec(m: cute.Tensor, row: Int32, chunk: Int32, width: cutlass.Constexpr[int]) -> cute.Tensor:
    """Registers holding m[row, chunk*width : (chunk+1)*width], read with one vector load."""
    frag = cute.make_rmem_tensor((1, width), m.element_type)
    cute.autovec_copy(cute.local_tile(m, (1, width), (row, chunk)), frag)
    return frag


@cute.jit
def _store_vec(frag: cute.Tensor, m: cute.Tensor, row: Int32, chunk: Int32, width: cutlass.Constexpr[int]):
    cute.autovec_copy(frag, cute.local_tile(m, (1, width), (row, chunk)))


# ----------------------------------------------------------------------------------------------
# SwiGLU forward: H (M, 2n) -> A (M, n)
# ----------------------------------------------------------------------------------------------
class SwiGLUForward:
    """A[r, j] = H[r, 2j+1] * silu(H[r, 2j]); one thread per 16-byte chunk of H."""

    @cute.jit
    def __call__(self, h: cute.Tensor, a: cute.Tensor, stream):
        chunks = a.shape[0] * (a.shape[1] // PAIRS)
        self.kernel(h, a).launch(grid=((chunks + THREADS - 1) // THREADS, 1, 1), block=(THREADS, 1, 1),
                                 stream=stream)

    @cute.kernel
    def kernel(self, h: cute.Tensor, a: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        per_row = a.shape[1] // PAIRS  # chunks of H per row
        idx = bidx * THREADS + tidx
        row = idx // per_row
        c = idx % per_row
        if row < a.shape[0]:
            rh = _load_vec(h, row, c, VEC)  # 4 (gate, up) pairs
            ra = cute.make_rmem_tensor((1, PAIRS), a.element_type)
            for j in cutlass.range_constexpr(PAIRS):
                g = rh[0, 2 * j].to(Float32)
                u = rh[0, 2 * j + 1].to(Float32)
                ra[0, j] = swiglu_parts(g, u)[2].to(a.element_type)  # same rounding as the backward's A
            _store_vec(ra, a, row, c, PAIRS)


# ----------------------------------------------------------------------------------------------
# SwiGLU backward (+ dS and A' when scaled): one warp per row
# ----------------------------------------------------------------------------------------------
class SwiGLUBackward:
    """Per grouped row r (one warp), with s = scores[pair_of_row[r]] when ``scaled``:

    * scaled (reduced-memory): inputs H, dA'; outputs dS[pair] = <dA', A>, A' = s*A, dH = dSwiGLU(H, s*dA').
    * not scaled (standard): inputs H, dA; outputs A and dH = dSwiGLU(H, dA).

    dSwiGLU: d gate = dA * up * sig(g) * (1 + g * (1 - sig(g))), d up = dA * silu(g).
    """

    def __init__(self, scaled: bool):
        self.scaled = scaled

    @cute.jit
    def __call__(self, h: cute.Tensor, da: cute.Tensor, scores: cute.Tensor, pair_of_row: cute.Tensor,
                 dh: cute.Tensor, a_out: cute.Tensor, dscores: cute.Tensor, stream):
        rows = h.shape[0]
        self.kernel(h, da, scores, pair_of_row, dh, a_out, dscores).launch(
            grid=((rows + ROWS_PER_CTA - 1) // ROWS_PER_CTA, 1, 1), block=(THREADS, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, h: cute.Tensor, da: cute.Tensor, scores: cute.Tensor, pair_of_row: cute.Tensor,
               dh: cute.Tensor, a_out: cute.Tensor, dscores: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = tidx % WARP
        row = bidx * ROWS_PER_CTA + tidx // WARP
        dtype = h.element_type
        if row < h.shape[0]:
            # Phase 1: the row's score (pair order -> grouped row order through pair_of_row).
            s = Float32(1.0)
            pair = Int32(0)
            if const_expr(self.scaled):
                pair = pair_of_row[row]
                s = scores[pair]
            # Phase 2: the lanes stride over the row's chunks (4 gate/up pairs each), coalesced.
            dot = Float32(0.0)
            for c in cutlass.range(lane, da.shape[1] // PAIRS, WARP, unroll=1):
                rh = _load_vec(h, row, c, VEC)
                rda = _load_vec(da, row, c, PAIRS)
                rdh = cute.make_rmem_tensor((1, VEC), dtype)
                ra = cute.make_rmem_tensor((1, PAIRS), dtype)
                for j in cutlass.range_constexpr(PAIRS):
                    g = rh[0, 2 * j].to(Float32)
                    u = rh[0, 2 * j + 1].to(Float32)
                    sig, silu, act = swiglu_parts(g, u)  # A, recomputed from H
                    grad = rda[0, j].to(Float32)  # dA' (scaled) or dA
                    if const_expr(self.scaled):
                        dot = dot + grad * act  # dS partial: <dA', A>
                        grad = grad * s  # dA = s * dA'
                        act = act * s  # A' = s * A
                    dgate, dup = dswiglu(g, u, sig, silu, grad)
                    rdh[0, 2 * j] = dgate.to(dtype)
                    rdh[0, 2 * j + 1] = dup.to(dtype)
                    ra[0, j] = act.to(dtype)
                _store_vec(rdh, dh, row, c, VEC)
                _store_vec(ra, a_out, row, c, PAIRS)
            # Phase 3: reduce dS over the warp; lane 0 writes it in pair order.
            if const_expr(self.scaled):
                dot = warp_sum(dot)
                if lane == 0:
                    dscores[pair] = dot


# ----------------------------------------------------------------------------------------------
# Standard backward's extra pass: dS = <dO[token], Y[row]>, dY = s * dO[token]; one warp per row
# ----------------------------------------------------------------------------------------------
class GatherScaleDot:
    """Per grouped row r: t = gather_idx[r], p = pair_of_row[r]; dscores[p] = <dO[t], Y[r]>, dY[r] = s_p * dO[t]."""

    @cute.jit
    def __call__(self, dout: cute.Tensor, y: cute.Tensor, scores: cute.Tensor, gather_idx: cute.Tensor,
                 pair_of_row: cute.Tensor, dy: cute.Tensor, dscores: cute.Tensor, stream):
        rows = y.shape[0]
        self.kernel(dout, y, scores, gather_idx, pair_of_row, dy, dscores).launch(
            grid=((rows + ROWS_PER_CTA - 1) // ROWS_PER_CTA, 1, 1), block=(THREADS, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, dout: cute.Tensor, y: cute.Tensor, scores: cute.Tensor, gather_idx: cute.Tensor,
               pair_of_row: cute.Tensor, dy: cute.Tensor, dscores: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = tidx % WARP
        row = bidx * ROWS_PER_CTA + tidx // WARP
        dtype = y.element_type
        if row < y.shape[0]:
            token = gather_idx[row]
            pair = pair_of_row[row]
            s = scores[pair]
            dot = Float32(0.0)
            for c in cutlass.range(lane, y.shape[1] // VEC, WARP, unroll=1):
                rdo = _load_vec(dout, token, c, VEC)
                ry = _load_vec(y, row, c, VEC)
                rdy = cute.make_rmem_tensor((1, VEC), dtype)
                for j in cutlass.range_constexpr(VEC):
                    g = rdo[0, j].to(Float32)
                    dot = dot + g * ry[0, j].to(Float32)
                    rdy[0, j] = (g * s).to(dtype)
                _store_vec(rdy, dy, row, c, VEC)
            dot = warp_sum(dot)
            if lane == 0:
                dscores[pair] = dot


# ----------------------------------------------------------------------------------------------
# Gather-and-sum: out[t] = sum_p w[p] * rows[row_of_pair[p]]; one thread per (token, 16-byte chunk)
# ----------------------------------------------------------------------------------------------
class GatherSum:
    """Deterministic per-token reduction over its rows (pairs ``token_offsets[t] : token_offsets[t+1]``).

    One thread per (token, 16-byte chunk of d): neighbouring threads read neighbouring chunks of the
    same rows. A token's rows are scattered (``row_of_pair``), so each load waits on the index load
    before it; the thread therefore loads the chunks of ``GATHER_GROUP`` pairs at once and adds them
    afterwards, in pair order (the same fp32 sums as pair by pair), to keep several loads in flight."""

    def __init__(self, weighted: bool):
        self.weighted = weighted

    @cute.jit
    def __call__(self, rows: cute.Tensor, weights: cute.Tensor, row_of_pair: cute.Tensor,
                 token_offsets: cute.Tensor, out: cute.Tensor, stream):
        chunks = out.shape[0] * (out.shape[1] // VEC)
        self.kernel(rows, weights, row_of_pair, token_offsets, out).launch(
            grid=((chunks + THREADS - 1) // THREADS, 1, 1), block=(THREADS, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, rows: cute.Tensor, weights: cute.Tensor, row_of_pair: cute.Tensor,
               token_offsets: cute.Tensor, out: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        per_row = out.shape[1] // VEC
        idx = bidx * THREADS + tidx
        t = idx // per_row  # neighbouring threads read neighbouring chunks of the same rows
        c = idx % per_row
        if t < out.shape[0]:
            acc = cute.make_rmem_tensor((1, VEC), Float32)
            acc.fill(0.0)
            hi = token_offsets[t + 1]
            # The token's pairs in groups of GATHER_GROUP: first every load of the group (its rows'
            # indices, then their chunks: GATHER_GROUP 16-byte loads in flight per thread instead
            # of one), then the sums, in pair order (the same fp32 sum as one pair at a time).
            for base in cutlass.range(token_offsets[t], hi, GATHER_GROUP, unroll=1):
                w = cute.make_rmem_tensor(GATHER_GROUP, Float32)
                rv = cute.make_rmem_tensor(cute.make_layout((GATHER_GROUP, VEC), stride=(VEC, 1)), rows.element_type)
                for u in cutlass.range_constexpr(GATHER_GROUP):
                    w[u] = Float32(1.0)
                    if base + u < hi:
                        if const_expr(self.weighted):
                            w[u] = weights[base + u]
                        cute.autovec_copy(cute.local_tile(rows, (1, VEC), (row_of_pair[base + u], c)),
                                          cute.local_tile(rv, (1, VEC), (u, 0)))
                for u in cutlass.range_constexpr(GATHER_GROUP):
                    if base + u < hi:
                        for j in cutlass.range_constexpr(VEC):
                            acc[0, j] = acc[0, j] + w[u] * rv[u, j].to(Float32)
            res = cute.make_rmem_tensor((1, VEC), out.element_type)
            for j in cutlass.range_constexpr(VEC):
                res[0, j] = acc[0, j].to(out.element_type)
            _store_vec(res, out, t, c, VEC)


# ----------------------------------------------------------------------------------------------
# Token rounding's padded tail: zero K_TAIL_ROWS rows of two tensors after the last expert; one CTA per row
# ----------------------------------------------------------------------------------------------
class ZeroRowsPastEnd:
    """Rows end .. min(end + K_TAIL_ROWS, M) - 1 of a (M, Na) and b (M, Nb) become 0, with
    end = offsets[E] read on the device (``fast.moe.zero_rows_past_end`` is the torch version and
    says why). CTA i zeroes row end + i of both tensors, its threads striding over 16-byte chunks."""

    @cute.jit
    def __call__(self, a: cute.Tensor, b: cute.Tensor, offsets: cute.Tensor, stream):
        self.kernel(a, b, offsets).launch(grid=(K_TAIL_ROWS, 1, 1), block=(THREADS, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, a: cute.Tensor, b: cute.Tensor, offsets: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        # Phase 1: this CTA's row, after the last expert's rows (offsets[E] = the true pair count).
        row = offsets[offsets.shape[0] - 1] + bidx
        if row < a.shape[0]:  # rows past the tensors stay untouched (the GEMM's TMA reads them as 0)
            # Phase 2: one register vector of zeros, stored over the row of a, then of b.
            zeros = cute.make_rmem_tensor((1, VEC), a.element_type)
            zeros.fill(0.0)
            for c in cutlass.range(tidx, a.shape[1] // VEC, THREADS, unroll=1):
                _store_vec(zeros, a, row, c, VEC)
            for c in cutlass.range(tidx, b.shape[1] // VEC, THREADS, unroll=1):
                _store_vec(zeros, b, row, c, VEC)


# ----------------------------------------------------------------------------------------------
# Compile (fake tensors, symbolic sizes: one compile per dtype and variant) and launch helpers
# ----------------------------------------------------------------------------------------------
KERNELS = ("swiglu_fwd", "swiglu_bwd_scaled", "swiglu_bwd", "gather_scale_dot", "gather_sum_weighted",
           "gather_sum", "zero_rows_past_end")


def compile_kernel(name: str, dtype: torch.dtype, *, keep_ptx: bool = False):
    """Compile one kernel for sm_90a from fake tensors (no GPU needed); returns the TVM-FFI callable."""
    if name not in KERNELS:
        raise ValueError(f"name must be one of {KERNELS}, got {name!r}")
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float16 (16-byte vectors of 8 elements), got {dtype}")
    dt = cutlass_dtype(dtype)

    def mat(elem):  # (rows, cols) row-major, cols a multiple of 8, 16-byte aligned base
        return make_fake_compact_tensor(elem, (cute.sym_int(), cute.sym_int(divisibility=8)),
                                        stride_order=(1, 0), assumed_align=16)

    def vec(elem):  # (len,) index or score vector
        return make_fake_compact_tensor(elem, (cute.sym_int(),), assumed_align=4)

    stream = make_fake_stream(use_tvm_ffi_env_stream=True)
    opts = compile_options(keep_ptx)
    if name == "swiglu_fwd":
        return cute.compile(SwiGLUForward(), mat(dt), mat(dt), stream, options=opts)
    if name.startswith("swiglu_bwd"):
        op = SwiGLUBackward(scaled=name.endswith("scaled"))
        return cute.compile(op, mat(dt), mat(dt), vec(Float32), vec(Int32), mat(dt), mat(dt), vec(Float32),
                            stream, options=opts)
    if name == "gather_scale_dot":
        return cute.compile(GatherScaleDot(), mat(dt), mat(dt), vec(Float32), vec(Int32), vec(Int32), mat(dt),
                            vec(Float32), stream, options=opts)
    if name == "zero_rows_past_end":
        return cute.compile(ZeroRowsPastEnd(), mat(dt), mat(dt), vec(Int32), stream, options=opts)
    op = GatherSum(weighted=name == "gather_sum_weighted")
    return cute.compile(op, mat(dt), vec(Float32), vec(Int32), vec(Int32), mat(dt), stream, options=opts)


# The launchers below assume validated inputs (``sonic_learn.fast.moe`` checks dtypes, devices,
# contiguity and multiples of 8 before any launch) and never synchronize with the host.
def _dummy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(1, dtype=dtype, device=t.device)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """A (M, n) from H (M, 2n), interleaved gate/up."""
    M, two_n = h.shape
    a = torch.empty(M, two_n // 2, dtype=h.dtype, device=h.device)  # (M, n)
    if M > 0 and two_n > 0:
        launch(compiled(compile_kernel, "swiglu_fwd", h.dtype), h.device, h, a)
    return a


def swiglu_backward_scaled(h: torch.Tensor, da_prime: torch.Tensor, scores: torch.Tensor,
                           pair_of_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced-memory dH pass: returns (dH (M, 2n), A' = s*A (M, n), dscores (P,) fp32 in pair order)."""
    M = h.shape[0]
    dh = torch.empty_like(h)  # (M, 2n)
    a_scaled = torch.empty_like(da_prime)  # (M, n)
    dscores = torch.zeros(scores.shape[0], dtype=torch.float32, device=h.device)  # (P,)
    if M > 0:
        launch(compiled(compile_kernel, "swiglu_bwd_scaled", h.dtype), h.device, h, da_prime, scores, pair_of_row, dh,
               a_scaled, dscores)
    return dh, a_scaled, dscores


def swiglu_backward(h: torch.Tensor, da: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard dSwiGLU pass: returns (dH (M, 2n), A (M, n))."""
    M = h.shape[0]
    dh = torch.empty_like(h)
    a = torch.empty_like(da)
    if M > 0:
        f32, i32 = _dummy(h, torch.float32), _dummy(h, torch.int32)
        launch(compiled(compile_kernel, "swiglu_bwd", h.dtype), h.device, h, da, f32, i32, dh, a, f32)
    return dh, a


def gather_scale_dot(dout: torch.Tensor, y: torch.Tensor, scores: torch.Tensor, gather_idx: torch.Tensor,
                     pair_of_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard backward: returns (dY = s * dO[token] (M, d), dscores (P,) fp32 = <dO[token], Y>)."""
    dy = torch.empty_like(y)
    dscores = torch.zeros(scores.shape[0], dtype=torch.float32, device=y.device)
    if y.shape[0] > 0:
        launch(compiled(compile_kernel, "gather_scale_dot", y.dtype), y.device, dout, y, scores, gather_idx, pair_of_row,
               dy, dscores)
    return dy, dscores


def gather_sum(rows: torch.Tensor, weights: torch.Tensor | None, row_of_pair: torch.Tensor,
               token_offsets: torch.Tensor) -> torch.Tensor:
    """out[t] = sum over pairs p of token t of weights[p] * rows[row_of_pair[p]] (fp32 accumulate)."""
    T = token_offsets.shape[0] - 1
    out = torch.empty(T, rows.shape[1], dtype=rows.dtype, device=rows.device)  # (T, d)
    if T > 0 and rows.shape[1] > 0:
        if row_of_pair.numel() == 0:  # no pairs at all: every token sums nothing
            return out.zero_()
        name = "gather_sum" if weights is None else "gather_sum_weighted"
        w = _dummy(rows, torch.float32) if weights is None else weights
        launch(compiled(compile_kernel, name, rows.dtype), rows.device, rows, w, row_of_pair, token_offsets, out)
    return out


def zero_rows_past_end(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> None:
    """In place: rows offsets[E] .. offsets[E] + K_TAIL_ROWS - 1 of a and b (those below their
    common row count M) become 0; ``offsets`` (E+1,) int32 is read on the device only. The kernel
    indexes both tensors with a's row count and dtype, so a mismatch is an error here, not a wild store."""
    if a.shape[0] != b.shape[0] or a.dtype != b.dtype:
        raise ValueError(f"a and b must have the same number of rows and dtype, got a {tuple(a.shape)} {a.dtype} "
                         f"and b {tuple(b.shape)} {b.dtype}")
    if a.shape[0] > 0:
        launch(compiled(compile_kernel, "zero_rows_past_end", a.dtype), a.device, a, b, offsets)


__all__ = [
    "SwiGLUForward", "SwiGLUBackward", "GatherScaleDot", "GatherSum", "ZeroRowsPastEnd", "KERNELS", "compile_kernel",
    "swiglu", "swiglu_backward_scaled", "swiglu_backward", "gather_scale_dot", "gather_sum", "zero_rows_past_end",
]
