"""The CuTe-DSL modules whose functions the compare tool's fast rows call, imported in one place.

``sonic_learn.fast`` needs nvidia-cutlass-dsl (the ``gpu`` extra). Without it the modules here are
``None`` and ``MISSING`` says why; every fast row is then ``n/a`` with that reason.
"""

from __future__ import annotations

try:
    from sonic_learn.fast import grouped_gemm, moe, routing, topk
except ImportError as exc:  # pragma: no cover - depends on the install
    grouped_gemm = moe = routing = topk = None
    MISSING = f"sonic_learn.fast does not import here ({exc})"
else:
    MISSING = ""

__all__ = ["MISSING", "grouped_gemm", "moe", "routing", "topk"]
