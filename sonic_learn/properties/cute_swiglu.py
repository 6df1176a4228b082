"""Properties of a CuTe-DSL SwiGLU kernel (course assignment 5, the GPU exercise).

The implementation is a ``@cute.jit`` launcher ``swiglu(mH, mA)`` that writes
``A[i, j] = up * silu(gate)`` with ``gate = H[i, 2j]``, ``up = H[i, 2j + 1]`` (SonicMoE's interleaved
layout), computed in float32 and stored in A's dtype. Checked:

* on any machine: it compiles ahead of time for Hopper (``.target sm_90a`` in the PTX) with dynamic
  M and n, reads and writes global memory and keeps nothing in local memory (no spills);
* on a CUDA machine: it agrees with ``sonic_learn.reference.moe.swiglu`` on shapes whose element
  count is not a multiple of the block (the tail must be masked).
"""

from __future__ import annotations

import tempfile
from typing import NamedTuple

import torch
from hypothesis import strategies as st

from sonic_learn.properties import Property, expect, seeded


class KernelCase(NamedTuple):
    dtype: str  # "bfloat16" or "float32"


class RunCase(NamedTuple):
    M: int
    n: int
    dtype: torch.dtype
    seed: int


def _not_implemented_inside(exc: BaseException) -> bool:
    """CuTe-DSL wraps exceptions raised while tracing; look for a NotImplementedError in the chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, NotImplementedError) or "NotImplementedError" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def compile_for_hopper(launcher, dtype: str) -> str:
    """Compile ``launcher(mH, mA)`` for sm_90a with fake tensors (no GPU needed); return the PTX text."""
    from sonic_learn.fast._cute import import_cutlass

    cutlass = import_cutlass()
    import cutlass.cute as cute  # noqa: PLC0415
    from cutlass.cute.runtime import make_fake_compact_tensor  # noqa: PLC0415

    elem = {"bfloat16": cutlass.BFloat16, "float32": cutlass.Float32}[dtype]
    M, two_n, n = cute.sym_int32(), cute.sym_int32(), cute.sym_int32()
    h = make_fake_compact_tensor(elem, (M, two_n), stride_order=(1, 0), assumed_align=16)
    a = make_fake_compact_tensor(elem, (M, n), stride_order=(1, 0), assumed_align=16)
    try:
        # --keep-ptx writes a .ptx file: into a temporary folder, never the working directory.
        with tempfile.TemporaryDirectory(prefix="sonic_learn_ptx_") as dump_dir:
            compiled = cute.compile(launcher, h, a, options=f"--keep-ptx --dump-dir={dump_dir}")
            ptx = compiled.__ptx__
    except NotImplementedError:
        raise
    except Exception as exc:
        if _not_implemented_inside(exc):
            raise NotImplementedError("the kernel or its launcher still raises NotImplementedError") from None
        raise AssertionError(f"[compiles_for_sm90a] cute.compile failed for {dtype}: {type(exc).__name__}: {exc}") from None
    expect(isinstance(ptx, str) and ".target" in ptx, "[compiles_for_sm90a] no PTX came out of cute.compile")
    return ptx


def check_compiles(fn, case: KernelCase) -> None:
    ptx = compile_for_hopper(fn, case.dtype)
    targets = [line.split()[1] for line in ptx.splitlines() if line.startswith(".target")]
    expect(targets == ["sm_90a"], f"[compiles_for_sm90a] the PTX must target sm_90a (Hopper), got {targets}: import cutlass "
           "through sonic_learn.fast._cute.import_cutlass() so the arch is pinned before cutlass is imported")


def check_ptx(fn, case: KernelCase) -> None:
    ptx = compile_for_hopper(fn, case.dtype)
    expect("ld.global" in ptx, "[ptx_sanity] the kernel never loads from global memory (H is not read)")
    expect("st.global" in ptx, "[ptx_sanity] the kernel never stores to global memory (A is not written)")
    expect(".local" not in ptx, "[ptx_sanity] the PTX uses local memory (a per-thread array or spills); an elementwise "
           "kernel needs only a few registers")


def check_runs(fn, case: RunCase) -> None:
    from cutlass.cute.runtime import from_dlpack  # noqa: PLC0415

    import cutlass.cute as cute  # noqa: PLC0415
    from sonic_learn.reference.moe import swiglu

    g = seeded(case.seed)
    h = (torch.randn(case.M, 2 * case.n, generator=g) * 3).to(case.dtype).cuda()
    a = torch.full((case.M, case.n), float("nan"), dtype=case.dtype, device="cuda")
    compiled = cute.compile(fn, from_dlpack(h), from_dlpack(a))
    compiled(from_dlpack(h), from_dlpack(a))
    torch.cuda.synchronize()
    want = swiglu(h.double()).to(case.dtype)
    tol = 2e-2 if case.dtype == torch.bfloat16 else 1e-5
    err = (a.double() - want.double()).abs()
    bad = ~(err <= tol * (1 + want.double().abs()))
    if bad.any():
        r, c = (int(v) for v in bad.nonzero()[0])
        raise AssertionError(f"[matches_reference_on_gpu] A[{r}, {c}] = {a[r, c].item()}, expected {want[r, c].item()} "
                             f"({int(bad.sum())} wrong of {a.numel()}; NaN = never written: check the tail mask)")


def cute_swiglu_properties() -> list[Property]:
    return [
        Property("compiles_for_sm90a", "compiles ahead of time for Hopper (PTX .target sm_90a), no GPU needed",
                 st.sampled_from([KernelCase("bfloat16"), KernelCase("float32")]), check_compiles,
                 examples=(KernelCase("bfloat16"),), max_examples=1),
        Property("ptx_sanity", "reads H and writes A in global memory, no local memory (no spills)",
                 st.just(KernelCase("bfloat16")), check_ptx, max_examples=1),
        Property("matches_reference_on_gpu", "on a CUDA GPU: equals reference swiglu, tails masked (skipped without CUDA)",
                 st.builds(RunCase, st.integers(1, 300), st.integers(1, 200), st.sampled_from((torch.bfloat16, torch.float32)),
                           st.integers(0, 2**31 - 1)),
                 check_runs, max_examples=4, needs_cuda=True,
                 examples=(RunCase(4096, 1024, torch.bfloat16, 0), RunCase(3, 5, torch.float32, 1), RunCase(1, 1, torch.bfloat16, 2))),
    ]
