"""Key for assignment 5: an elementwise SwiGLU kernel in CuTe-DSL (the GEMM epilogue, on its own).

SonicMoE applies SwiGLU in the epilogue of the up-projection GEMM (paper Section 3.1): the
accumulator tile holds H = X W1 with gate and up interleaved (gate = H[:, 0::2], up = H[:, 1::2]),
and the epilogue writes A = up * silu(gate) (and keeps H for the backward). This kernel does just
that epilogue math, one thread per output element, so the first CuTe-DSL program stays small:

1. **index**: global thread id i = block * THREADS + thread; row = i // n, col = i % n;
2. **mask**: threads past M * n (the last block's tail) do nothing;
3. **math** in float32: sigmoid(g) = 1 / (1 + exp(-g)), a = up * g * sigmoid(g);
4. **store** converted to A's dtype.
"""

from __future__ import annotations

from sonic_learn.fast._cute import import_cutlass

cutlass = import_cutlass()
import cutlass.cute as cute  # noqa: E402
from cutlass import Float32  # noqa: E402

THREADS = 128  # threads per block (4 warps)


@cute.kernel
def swiglu_kernel(gH: cute.Tensor, gA: cute.Tensor):
    """One thread per element of A (M, n): A[row, col] = up * silu(gate)."""
    tidx, _, _ = cute.arch.thread_idx()
    bidx, _, _ = cute.arch.block_idx()
    i = bidx * THREADS + tidx  # global element id
    m, n = gA.shape
    if i < m * n:  # mask the tail of the last block
        row = i // n
        col = i % n
        gate = gH[row, 2 * col].to(Float32)  # interleaved layout: gate at even columns ...
        up = gH[row, 2 * col + 1].to(Float32)  # ... up at odd columns
        sigmoid = 1.0 / (1.0 + cute.math.exp(-gate))
        gA[row, col] = (up * gate * sigmoid).to(gA.element_type)


@cute.jit
def swiglu(mH: cute.Tensor, mA: cute.Tensor):
    """Launch ceil(M * n / THREADS) blocks of THREADS threads."""
    m, n = mA.shape
    swiglu_kernel(mH, mA).launch(grid=((m * n + THREADS - 1) // THREADS, 1, 1), block=(THREADS, 1, 1))
