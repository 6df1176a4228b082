"""Pair 1, top-k (the router): radix select (what ``torch.topk`` does) vs bitonic top-k.

Rows: ``torch.topk`` (the baseline), the references and the CuTe-DSL kernels. The oracle is a
float64 stable sort of tie-free logits, so every correct row selects the same indices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sonic_learn.compare import fast_kernels
from sonic_learn.compare.configs import Problem
from sonic_learn.compare.pairs.common import F64, Case, distinct_logits, generator
from sonic_learn.compare.registry import Impl, Setup, UnsupportedProblem, fast_ready
from sonic_learn.compare.runner import Agreement, Cost, PairSpec, Work, mismatch, rel_err
from sonic_learn.reference import topk as ref_topk


@dataclass(frozen=True)
class TopkRow:
    """A top-k row: ``select(logits, K, **kwargs) -> (values, indices)``."""

    select: Callable
    kwargs: tuple[tuple[str, object], ...] = ()
    max_k: int | None = None  # a kernel's largest K (None: no limit)


def make_case(p: Problem, s: Setup, seed: int) -> Case:
    logits = distinct_logits(p.T, p.E, s.dtype, generator(seed)).to(s.device)  # (T, E)
    ordered = torch.sort(logits.double(), dim=-1, descending=True, stable=True)  # float64 oracle
    return Case(p, s, {"logits": logits, "values": ordered.values[:, : p.K], "indices": ordered.indices[:, : p.K]},
                ["logits: each row a random permutation of E distinct values (no ties)"])


def compare(case: Case, impl: Impl, out) -> Agreement:
    values, indices = out[0], out[1]
    return Agreement(errors={"values": rel_err(values, case.values)},
                     mismatches={"indices": mismatch(indices, case.indices)})


def cost(case: Case, impl: Impl, out) -> Cost:
    p, b = case.problem, case.logits.element_size()
    # Read the logits once, write K values and K int32 indices per token.
    return Cost(bytes_moved=p.T * p.E * b + p.T * p.K * (b + 4), throughput_from="bytes")


def work(p: Problem, dtype: torch.dtype, n_rows: int, calls: int) -> Work:
    """The whole run: the float64 sort once, then every row's calls over the (T, E) logits (the
    references make several passes; counted as 8)."""
    b, logits = torch.empty((), dtype=dtype).element_size(), p.T * p.E
    return Work(bytes_moved=4 * logits * F64 + n_rows * calls * 8 * logits * b,
                held_bytes=logits * (b + 4 * F64) + n_rows * p.T * p.K * 3 * F64)


def fast_limits(problem: Problem, dtype: torch.dtype, max_k: int) -> None:
    """Raise UnsupportedProblem outside the fast top-k kernels' documented range (rows of N = E
    values read in 16-byte vectors, held by one warp; K up to ``max_k``)."""
    kt = fast_kernels.topk
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise UnsupportedProblem(f"the fast top-k kernels take bf16/fp16/fp32 logits, not {dtype}")
    if not (kt.MIN_N <= problem.E <= kt.MAX_N and problem.E % kt.N_MULTIPLE == 0):
        raise UnsupportedProblem(f"the fast top-k kernels need E a multiple of {kt.N_MULTIPLE} in "
                                 f"[{kt.MIN_N}, {kt.MAX_N}], got E={problem.E}")
    if problem.K > max_k:
        raise UnsupportedProblem(f"this fast top-k kernel takes K <= {max_k}, got K={problem.K}")


def _build(spec: TopkRow, fast: bool):
    def build(case: Case):
        if fast:
            fast_limits(case.problem, case.setup.dtype, spec.max_k)
        kwargs = dict(spec.kwargs)
        return lambda: spec.select(case.logits, case.problem.K, **kwargs)

    return build


# The fast rows time the kernel path, as the MoE layer calls it: their default NaN check of the input
# (``check_finite``) is a device-to-host sync. The inputs here are finite by construction, and every
# row's output is checked against the oracle before it is timed, so the timed call is the checked one.
KERNEL_PATH = (("check_finite", False),)


def _row(name: str, kind: str, algorithm: str, spec: TopkRow) -> Impl:
    fast = kind == "fast"
    return Impl(name, kind, algorithm, spec, _build(spec, fast), *((fast_ready,) if fast else ()))


def _fast_row(algorithm: str) -> Impl:
    kt = fast_kernels.topk
    if kt is None:  # CuTe-DSL is not installed: the row is n/a (fast_ready says why)
        spec = TopkRow(select=lambda x, k, **kw: None)
    elif algorithm == "radix":
        spec = TopkRow(kt.radix_topk, KERNEL_PATH, kt.MAX_K_RADIX)
    else:
        spec = TopkRow(kt.bitonic_topk, KERNEL_PATH, kt.MAX_K_BITONIC)
    return _row(f"fast {algorithm}", "fast", algorithm, spec)


ROWS = (
    _row("torch.topk", "baseline", "radix", TopkRow(lambda x, k: torch.topk(x, k, dim=-1))),
    _row("reference radix", "reference", "radix", TopkRow(ref_topk.radix_topk)),
    _row("reference bitonic", "reference", "bitonic", TopkRow(ref_topk.bitonic_topk)),
    _fast_row("radix"),
    _fast_row("bitonic"),
)

SPEC = PairSpec(
    key="topk",
    title="top-k: radix select vs bitonic (the router)",
    oracle="float64 stable sort of the logits (ties would go to the lower column)",
    make_case=make_case,
    compare=compare,
    cost=cost,
    timed="top-k of the (T, E) logits (fast rows: the kernel path, without the NaN-check sync)",
    rows=ROWS,
    work=work,
)
