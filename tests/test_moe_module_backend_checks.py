"""``sonic_learn.MoE(backend="fast")``: a placement the kernels cannot run is refused at construction
when it is given, and the device is named before the dtype."""

from __future__ import annotations

import pytest
import torch

import sonic_learn


def test_fast_backend_on_cpu_is_refused_at_construction_device_first():
    with pytest.raises(ValueError, match=r"backend='fast' runs the CuTe-DSL kernels on a CUDA .*device=cpu"):
        sonic_learn.MoE(16, 8, 4, 2, backend="fast", device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="device=cpu"):
        sonic_learn.MoE(16, 8, 4, 2, backend="fast", device="cpu")


def test_fast_backend_forward_on_cpu_float32_names_the_device_not_the_dtype():
    layer = sonic_learn.MoE(16, 8, 4, 2, backend="fast")  # placement not given: built on the CPU, moved later
    with pytest.raises(ValueError, match="CUDA") as exc:
        layer(torch.randn(3, 16))
    assert "dtype" not in str(exc.value) and "float32" not in str(exc.value)


@pytest.mark.gpu
def test_fast_backend_float32_on_cuda_is_refused_at_construction():
    with pytest.raises(ValueError, match="bfloat16 or float16, got dtype=torch.float32"):
        sonic_learn.MoE(16, 8, 4, 2, backend="fast", device="cuda", dtype=torch.float32)
