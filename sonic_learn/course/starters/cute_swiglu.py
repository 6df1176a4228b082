"""Assignment 5 (GPU): the SwiGLU epilogue as a CuTe-DSL kernel, compiled for Hopper (sm_90a).

Write ``swiglu_kernel`` (one thread per output element) and the ``swiglu`` launcher. The page
docs/course/cute-swiglu.md has the problem statement and hints. Needs pip install 'sonic_learn[gpu]'.
Grade yourself with:  python -m sonic_learn.course grade cute_swiglu <this folder>
(on a CPU-only machine: compilation for sm_90a is graded; on a GPU the kernel also runs.)

Contract: H (M, 2n) with gate = H[:, 0::2] and up = H[:, 1::2]; A (M, n) with
A[i, j] = up * silu(gate) = H[i, 2j+1] * g * sigmoid(g), g = H[i, 2j], computed in float32 and
stored in A's dtype (bfloat16 or float32). M and n are dynamic (one compile serves every shape).
"""

from __future__ import annotations

from sonic_learn.fast._cute import import_cutlass

cutlass = import_cutlass()  # pins CUTE_DSL_ARCH=sm_90a BEFORE cutlass is imported
import cutlass.cute as cute  # noqa: E402
from cutlass import Float32  # noqa: E402, F401  (convert with value.to(Float32))

THREADS = 128  # threads per block


@cute.kernel
def swiglu_kernel(gH: cute.Tensor, gA: cute.Tensor):
    """Thread i = block * THREADS + thread computes A[i // n, i % n]; threads with i >= M * n do nothing."""
    raise NotImplementedError("swiglu_kernel: about 12 lines (thread index, tail mask, load, math in fp32, store)")


@cute.jit
def swiglu(mH: cute.Tensor, mA: cute.Tensor):
    """Launch swiglu_kernel on ceil(M * n / THREADS) blocks of THREADS threads."""
    raise NotImplementedError("swiglu: about 3 lines (read the shape, launch with grid and block)")
