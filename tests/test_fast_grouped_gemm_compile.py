"""CPU (CI) checks: every fast grouped-GEMM variant compiles for sm_90a from fake tensors.

No GPU is needed: CuTe-DSL builds the kernel ahead of time from symbolic shapes. The PTX must
target sm_90a, use Hopper's ``wgmma.mma_async`` tensor-core instructions and load the operands with
non-bulk ``cp.async`` (16-byte copies with per-row addresses, which is what makes the gather fusable).
The v1 kernel uses no TMA (``cp.async.bulk``); when the production kernel lands, its TMA loads get
checked here too.
"""

from __future__ import annotations

import re

import pytest
import torch

from sonic_learn.fast._cute import cutlass_available

pytestmark = pytest.mark.compile

OK, WHY = cutlass_available()

VARIANTS = ["varlen_m", "varlen_m_gather", "varlen_k", "varlen_k_gather"]


@pytest.mark.skipif(not OK, reason=f"CuTe-DSL not importable: {WHY}")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_variant_compiles_for_sm90a(variant, dtype):
    from sonic_learn.fast.grouped_gemm import compile_grouped_gemm

    fn = compile_grouped_gemm(variant, dtype, dtype, keep_ptx=True)
    ptx = fn.__ptx__
    assert isinstance(ptx, str) and ".target sm_90a" in ptx
    assert "wgmma.mma_async" in ptx
    assert re.search(r"cp\.async\.c[ga]\.shared\.global", ptx), "operands must be loaded with non-bulk cp.async"
    # bf16 vs fp16 really changes the MMA instruction.
    assert (".bf16" in ptx) == (dtype == torch.bfloat16)


@pytest.mark.skipif(not OK, reason=f"CuTe-DSL not importable: {WHY}")
def test_fp32_output_compiles():
    from sonic_learn.fast.grouped_gemm import compile_grouped_gemm

    ptx = compile_grouped_gemm("varlen_m_gather", torch.bfloat16, torch.float32, keep_ptx=True).__ptx__
    assert "wgmma.mma_async" in ptx and ".target sm_90a" in ptx


def test_cpu_tensor_rejected_before_launch():
    from sonic_learn.fast import grouped_gemm as fast

    x = torch.randn(4, 16, dtype=torch.bfloat16)
    w = torch.randn(2, 16, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        fast.gather_fused_grouped_gemm(x, w, None)
    with pytest.raises(ValueError, match="a must be a CUDA tensor"):
        fast.grouped_gemm_varlen_k(x, x, None)
