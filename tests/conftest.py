"""Test configuration shared by the whole suite.

Hypothesis profiles (select with HYPOTHESIS_PROFILE=name, or pytest --hypothesis-profile=name):

- ``ci``: Hypothesis's own built-in profile, loaded automatically when CI=true (derandomized, no
  deadline, no example database). We never redefine it.
- ``dev`` (default on a workstation): 25 examples, no deadline, fast feedback.
- ``gpu``: few, realistic examples; the first call of a CuTe kernel JIT-compiles for seconds.
- ``thorough``: 500 examples, for a long local hunt for counterexamples.

GPU tests carry ``@pytest.mark.gpu`` and are skipped when CUDA is absent.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile(
    "gpu",
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", max_examples=500, deadline=None)

if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
elif not os.environ.get("CI"):
    settings.load_profile("dev")
# else: CI=true, Hypothesis has already loaded its built-in "ci" profile.


def pytest_sessionstart(session):
    """Under CI the kernels MUST compile: a missing or broken CuTe-DSL install fails the run instead
    of silently skipping every compile test."""
    if os.environ.get("CI"):
        from sonic_learn.fast._cute import cutlass_available

        ok, why = cutlass_available()
        if not ok:
            pytest.exit(f"CI needs nvidia-cutlass-dsl to compile the kernels for sm_90a: {why}", returncode=1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (marker: gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
