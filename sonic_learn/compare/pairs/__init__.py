"""The four SonicMoE pairs (and the whole layer) as comparisons, one module each.

Each module defines ``SPEC``, a ``PairSpec``: how to build a problem's inputs and float64 oracle,
how to compare a row's output with the oracle, the analytic cost of a row, and its rows (``Impl``
entries: the baseline a user would otherwise pick, torch yardsticks, the readable references, the
CuTe-DSL kernels and upstream sonic-moe), each keyed by a typed row spec of its pair.

- ``topk``: pair 1, radix select vs bitonic top-k;
- ``routing``: pair 2, token-choice top-k vs token rounding;
- ``grouped_gemm``: pair 3, gather + pad + GEMM vs gather-fused grouped GEMM;
- ``backward``: pair 4, standard vs reduced-memory backward (``layer`` holds what it shares with ``moe``);
- ``moe``: the whole layer, forward + backward.
"""

from __future__ import annotations

from sonic_learn.compare.pairs import backward, grouped_gemm, moe, routing, topk
from sonic_learn.compare.registry import Impl, rows_by_name
from sonic_learn.compare.runner import PairSpec

SPECS: dict[str, PairSpec] = {m.SPEC.key: m.SPEC for m in (topk, routing, grouped_gemm, backward, moe)}
PAIRS = tuple(SPECS)  # ("topk", "routing", "grouped-gemm", "backward", "moe")
TOUR = ("topk", "routing", "grouped-gemm", "backward")  # the four pairs of the paper, in the project's numbering
REGISTRY: dict[str, tuple[Impl, ...]] = {key: spec.rows for key, spec in SPECS.items()}

for _spec in SPECS.values():  # row names are unique within a pair
    rows_by_name(_spec.rows)

__all__ = ["PAIRS", "REGISTRY", "SPECS", "TOUR"]
