"""Pair 3, the expert GEMMs: naive (gather rows into a copy, pad, GEMM) vs gather-fused grouped GEMM.

The problem is the up-projection: x (T, d) gathered through top-k routing, w (E, d, 2n). Yardsticks
timed in the same run: one dense GEMM of the same size, torch's own grouped GEMM on the already
gathered rows, and the weight-gradient (varlen-K) form. Each row is checked against a float64
oracle of what it computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sonic_learn.compare import fast_kernels
from sonic_learn.compare.configs import Problem
from sonic_learn.compare.pairs.common import F64, Case, generator, spread_logits
from sonic_learn.compare.registry import Impl, Setup, UnsupportedProblem, fast_ready
from sonic_learn.compare.runner import Agreement, Cost, PairSpec, Work, rel_err
from sonic_learn.reference import grouped_gemm as ref_gemm
from sonic_learn.reference import routing as ref_routing

VARIANTS = ("per-expert loop", "naive", "gather-fused", "dense", "contiguous", "varlen-K")


@dataclass(frozen=True)
class GemmRow:
    """A grouped-GEMM row: what it computes (``variant``, one of VARIANTS) and where it comes from."""

    variant: str
    source: str  # "torch", "reference" or "fast"

    @property
    def oracle(self) -> tuple[str, str]:
        """(error name, case field) of the float64 result this row is checked against."""
        return {"dense": ("dense out", "y_dense"), "varlen-K": ("dW", "dw")}.get(self.variant, ("out", "y"))


def make_case(p: Problem, s: Setup, seed: int) -> Case:
    g = generator(seed)
    logits = spread_logits(p.T, p.E, torch.float32, g).to(s.device)  # (T, E)
    meta = ref_routing.build_metadata(ref_routing.topk_routing(logits, p.K))  # top-k routing's metadata
    N = 2 * p.n
    x = torch.randn(p.T, p.d, generator=g).to(s.dtype).to(s.device)  # (T, d)
    w = (torch.randn(p.E, p.d, N, generator=g) / math.sqrt(p.d)).to(s.dtype).to(s.device)  # (E, d, 2n)
    # float64 oracle: one plain matmul per expert on the gathered rows
    x64, w64 = x.double(), w.double()
    off = meta.expert_offsets.tolist()
    gather = meta.gather_idx.long()
    y = torch.empty(meta.num_rows, N, dtype=torch.float64, device=s.device)  # (P, 2n)
    # The weight-gradient (varlen-K) rows: dW[e] = X_e^T B_e with B (P, 2n) in grouped row order.
    b = torch.randn(meta.num_rows, N, generator=g).to(s.dtype).to(s.device)  # (P, 2n), e.g. dH
    b64 = b.double()
    dw = torch.zeros(p.E, p.d, N, dtype=torch.float64, device=s.device)  # (E, d, 2n)
    for e in range(p.E):
        rows = slice(off[e], off[e + 1])
        y[rows] = x64[gather[rows]] @ w64[e]
        dw[e] = x64[gather[rows]].T @ b64[rows]
    x_grouped = x[gather].contiguous()  # (P, d): the gathered copy, for the contiguous-A rows
    # Speed-of-light reference: ONE dense GEMM with the same M x K x N (weights of expert 0).
    y_dense = x_grouped.double() @ w64[0]  # (P, 2n)
    return Case(p, s, {"x": x, "w": w, "meta": meta, "y": y, "offsets": off, "gather": gather,
                       "x_grouped": x_grouped, "b": b, "dw": dw, "y_dense": y_dense},
                ["up-projection shape: x (T, d) gathered through the top-k routing, w (E, d, 2n)",
                 "contiguous rows: A = x already gathered into expert order (the gather is not timed)",
                 "dense row: one (P, d) @ (d, 2n) GEMM, the same FLOPs without experts (speed of light)",
                 "varlen-K rows: dW_e = x_e^T b_e for every expert e, (E, d, 2n), x gathered on K"])


def compare(case: Case, impl: Impl, out) -> Agreement:
    name, oracle = impl.spec.oracle
    return Agreement(errors={name: rel_err(out, getattr(case, oracle))})


def cost(case: Case, impl: Impl, out) -> Cost:
    p, variant = case.problem, impl.spec.variant
    counts = case.meta.expert_counts.cpu()
    nbytes = case.x.element_size()
    P, N = case.meta.num_rows, 2 * p.n
    if variant == "varlen-K":
        c = ref_gemm.varlen_k_cost(p.T, p.d, N, counts, dtype_bytes=nbytes)
        return Cost(flops=c.flops_useful, bytes_moved=c.bytes_moved, wasted_flops=c.flops_padded)
    if variant in ("dense", "contiguous"):  # A read once in place, B once (dense: one matrix), C written
        b_elems = p.d * N * (1 if variant == "dense" else p.E)
        return Cost(flops=2 * P * p.d * N, bytes_moved=(P * p.d + b_elems + P * N) * nbytes)
    if variant == "per-expert loop":  # gathers a copy per expert, no tile padding
        c = ref_gemm.io_cost(p.T, p.d, N, counts, tile_m=1, dtype_bytes=nbytes, variant="naive")
    else:
        c = ref_gemm.io_cost(p.T, p.d, N, counts, tile_m=p.tile_m, dtype_bytes=nbytes,
                             variant="naive" if variant == "naive" else "gather_fused")
    return Cost(flops=c.flops_useful, bytes_moved=c.bytes_moved, wasted_flops=c.flops_padded,
                extra={"padded_rows": c.padded_rows, "rows": c.rows})


def work(p: Problem, dtype: torch.dtype, n_rows: int, calls: int) -> Work:
    """The whole run: the float64 oracle (y and dW) once, then every row's calls of a 2 P d 2n GEMM;
    held: the inputs, the float64 copies and oracles, one output per row."""
    b, P, N = torch.empty((), dtype=dtype).element_size(), p.T * p.K, 2 * p.n
    gemm = 2.0 * P * p.d * N
    rows = n_rows * calls * gemm
    held = (p.T * p.d + p.E * p.d * N + 2 * P * N + P * p.d + n_rows * P * N) * b \
        + (p.T * p.d + 2 * p.E * p.d * N + 3 * P * N) * F64
    if dtype == torch.float64:
        return Work(flops_f64=2 * gemm + rows, held_bytes=held)
    return Work(flops=rows, flops_f64=2 * gemm, held_bytes=held)


# ----------------------------------------------------------------------------------------------
# The rows
# ----------------------------------------------------------------------------------------------
def _torch_gemm_loop(case: Case):
    def run():
        y = torch.empty(case.meta.num_rows, case.w.shape[2], dtype=case.x.dtype, device=case.x.device)
        for e in range(case.problem.E):
            rows = slice(case.offsets[e], case.offsets[e + 1])
            y[rows] = case.x[case.gather[rows]] @ case.w[e]  # (f_e, 2n)
        return y

    return run


def _torch_dense(case: Case):
    return lambda: case.x_grouped @ case.w[0]  # (P, 2n)


def _torch_grouped_mm(case: Case):
    offs = case.meta.expert_offsets[1:].to(torch.int32)  # (E,) end row of each expert
    return lambda: torch._grouped_mm(case.x_grouped, case.w, offs=offs)


def _grouped_mm_available(setup: Setup) -> tuple[bool, str]:
    if not hasattr(torch, "_grouped_mm"):
        return False, f"torch {torch.__version__} has no torch._grouped_mm"
    if setup.device.type != "cuda" or setup.dtype != torch.bfloat16:
        return False, "torch._grouped_mm runs bf16 on CUDA (Hopper) only"
    return True, ""


def _torch_varlen_k_loop(case: Case):
    def run():
        dw = torch.empty(case.problem.E, case.x.shape[1], case.b.shape[1], dtype=case.x.dtype, device=case.x.device)
        for e in range(case.problem.E):
            rows = slice(case.offsets[e], case.offsets[e + 1])
            dw[e] = case.x[case.gather[rows]].T @ case.b[rows]  # (d, 2n)
        return dw

    return run


def _reference(fn):
    return lambda case: (lambda: fn(case.x, case.w, case.meta, tile_m=case.problem.tile_m))


def fast_limits(problem: Problem, dtype: torch.dtype, variant: str) -> None:
    """Raise UnsupportedProblem outside the fast grouped GEMM's documented range: bf16/fp16 operands,
    its M tile (tile_m), 16-byte rows (d and 2n multiples of 8), 32-bit indexing."""
    gg = fast_kernels.grouped_gemm
    if dtype not in gg.IN_DTYPES:
        raise UnsupportedProblem(f"the fast grouped GEMM takes bf16/fp16 operands, not {dtype}")
    if variant != "varlen-K" and problem.tile_m != gg.TILE[0]:
        raise UnsupportedProblem(f"the fast grouped GEMM's M tile is {gg.TILE[0]}, got --tile-m {problem.tile_m}")
    for name, value in (("d", problem.d), ("2n", 2 * problem.n)):
        if value % 8:
            raise UnsupportedProblem(f"the fast grouped GEMM reads 16-byte rows: {name} must be a multiple of 8, "
                                     f"got {value}")
    biggest = max(problem.T * problem.K * max(problem.d, 2 * problem.n), problem.E * problem.d * 2 * problem.n)
    if biggest > gg.MAX_ELEMENTS:
        raise UnsupportedProblem(f"the fast grouped GEMM indexes with 32 bits: an operand of {biggest} elements "
                                 f"exceeds {gg.MAX_ELEMENTS}")


def _fast(variant: str):
    def build(case: Case):
        fast_limits(case.problem, case.setup.dtype, variant)
        gg, p = fast_kernels.grouped_gemm, case.problem
        if variant == "naive":
            return lambda: gg.naive_grouped_gemm(case.x, case.w, case.meta, tile_m=p.tile_m)
        if variant == "gather-fused":
            return lambda: gg.gather_fused_grouped_gemm(case.x, case.w, case.meta, tile_m=p.tile_m)
        if variant == "contiguous":
            return lambda: gg.contiguous_grouped_gemm(case.x_grouped, case.w, case.meta, tile_m=p.tile_m)
        return lambda: gg.grouped_gemm_varlen_k(case.x, case.b, case.meta, gather_a=True)

    return build


def _row(name: str, kind: str, row: GemmRow, build, available=None, note: str = "") -> Impl:
    if available is None and row.source == "fast":
        available = fast_ready
    return Impl(name, kind, row.variant, row, build, *((available,) if available else ()), note=note)


ROWS = (
    _row("torch.matmul per-expert loop", "baseline", GemmRow("per-expert loop", "torch"), _torch_gemm_loop),
    _row("reference naive", "reference", GemmRow("naive", "reference"), _reference(ref_gemm.naive_grouped_gemm)),
    _row("reference gather-fused", "reference", GemmRow("gather-fused", "reference"),
         _reference(ref_gemm.gather_fused_grouped_gemm)),
    _row("fast naive", "fast", GemmRow("naive", "fast"), _fast("naive")),
    _row("fast gather-fused", "fast", GemmRow("gather-fused", "fast"), _fast("gather-fused")),
    # yardsticks, each timed in the same run: one dense GEMM of the same size, torch's own grouped
    # GEMM on the same contiguous problem, and the weight-gradient (varlen-K) form
    _row("torch.matmul dense (same M x K x N)", "torch", GemmRow("dense", "torch"), _torch_dense,
         note="speed of light: no experts, checked against its own float64 oracle"),
    _row("torch._grouped_mm (contiguous A)", "torch", GemmRow("contiguous", "torch"), _torch_grouped_mm,
         _grouped_mm_available),
    _row("fast contiguous", "fast", GemmRow("contiguous", "fast"), _fast("contiguous")),
    _row("torch.matmul per-expert dW loop", "torch", GemmRow("varlen-K", "torch"), _torch_varlen_k_loop),
    _row("fast varlen-K (dW, x gathered)", "fast", GemmRow("varlen-K", "fast"), _fast("varlen-K")),
)

SPEC = PairSpec(
    key="grouped-gemm",
    title="grouped GEMM: gather + pad + GEMM vs gather-fused (up-projection)",
    oracle="float64 per-expert matmul of the gathered rows",
    make_case=make_case,
    compare=compare,
    cost=cost,
    timed="the grouped GEMM (x, w, routing metadata) -> (P, 2n)",
    rows=ROWS,
    work=work,
)
