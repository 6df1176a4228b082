"""Control flow in a CuTe-DSL kernel (nvidia-cutlass-dsl 4.8.1): what is a loop or a branch on the
GPU, and what is decided while the kernel is traced.

Run it with ``python tutorials/cute_control_flow.py``. A CPU is enough: it only *compiles* a tiny
kernel for sm_90a, twice, and prints the kernel's IR as the tracer produced it, before any
compiler pass (``CUTE_DSL_KEEP=ir-debug``). The docs page "Reading a CuTe-DSL kernel" shows the
kernel and this output.

The kernel sums 4 values per thread, then doubles the sum if a flag is set. Written two ways:

- ``dynamic``: ``for i in range(4)`` and ``if self.double:``. The tracer turns the loop into an
  ``scf.for`` and the ``if`` into an ``scf.if`` of the kernel, even though the trip count and the
  flag are plain Python values known at compile time.
- ``trace_time``: ``for i in cutlass.range_constexpr(4)`` and ``if cutlass.const_expr(self.double):``.
  Python runs the loop and the test while tracing: the IR holds four copies of the loop body and
  no branch.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

# The IR is dumped only if asked for before cutlass is imported.
DUMP_DIR = tempfile.mkdtemp(prefix="sonic_learn_ir_")
os.environ["CUTE_DSL_KEEP"] = "ir-debug"  # the IR as traced, before any compiler pass
os.environ["CUTE_DSL_DUMP_DIR"] = DUMP_DIR

from sonic_learn.fast._cute import import_cutlass  # noqa: E402  (pins sm_90a, then imports cutlass)

cutlass = import_cutlass()
import cutlass.cute as cute  # noqa: E402
from cutlass.cute.runtime import make_fake_compact_tensor  # noqa: E402


# --8<-- [start:kernels]
class SumFour:
    """Each of 32 threads sums g[4t : 4t+4] into g[4t], doubled if ``double``."""

    def __init__(self, trace_time: bool, double: bool):
        self.trace_time = trace_time  # Python values: known while tracing
        self.double = double

    @cute.kernel
    def kernel(self, g: cute.Tensor):
        tid, _, _ = cute.arch.thread_idx()
        acc = cutlass.Float32(0.0)
        if cutlass.const_expr(self.trace_time):
            for i in cutlass.range_constexpr(4):  # unrolled while tracing: 4 copies of the body
                acc = acc + g[tid * 4 + i]
            if cutlass.const_expr(self.double):  # decided while tracing: no branch in the kernel
                acc = acc * 2.0
        else:
            for i in range(4):  # becomes a loop of the kernel (scf.for)
                acc = acc + g[tid * 4 + i]
            if self.double:  # becomes a branch of the kernel (scf.if), on a constant condition
                acc = acc * 2.0
        g[tid * 4] = acc

    @cute.jit
    def __call__(self, g: cute.Tensor):
        self.kernel(g).launch(grid=(1, 1, 1), block=(32, 1, 1))
# --8<-- [end:kernels]


def kernel_ir(trace_time: bool) -> str:
    """Compile ``SumFour`` for sm_90a on fake tensors and return the device function's IR as traced."""
    for old in Path(DUMP_DIR).rglob("*.mlir"):  # both variants dump to the same file name
        old.unlink()
    g = make_fake_compact_tensor(cutlass.Float32, (128,))
    cute.compile(SumFour(trace_time, double=True), g)
    (dumped,) = Path(DUMP_DIR).rglob("*.mlir")
    text = dumped.read_text()
    start = text.index("cuda.kernel @")  # the device function ...
    end = text.index("func.func @", start)  # ... ends where the host function starts
    return text[start:end]


def ops(ir: str) -> dict[str, int]:
    """How many loops, branches and loads of global memory the traced kernel holds."""
    return {op: len(re.findall(rf"\b{re.escape(op)}\b", ir)) for op in ("scf.for", "scf.if", "cute.memref.load")}


if __name__ == "__main__":
    counts = {}
    for trace_time in (False, True):
        name = "trace_time" if trace_time else "dynamic"
        ir = kernel_ir(trace_time)
        counts[name] = ops(ir)
        print(f"--- {name}: {counts[name]}")
        for line in ir.splitlines():  # the lines that show the difference
            if re.search(r"scf\.(for|if|yield)|memref\.load|arith\.constant true", line):
                print("   ", line.strip()[:110])
    assert counts["dynamic"] == {"scf.for": 1, "scf.if": 1, "cute.memref.load": 1}, counts
    assert counts["trace_time"] == {"scf.for": 0, "scf.if": 0, "cute.memref.load": 4}, counts
    print("range() -> scf.for, plain if -> scf.if; range_constexpr / const_expr -> unrolled, no branch")
    sys.exit(0)
