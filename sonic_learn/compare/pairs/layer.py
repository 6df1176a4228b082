"""The MoE layer as a comparison: inputs, float64 oracle, the rows' forward, cost and saved bytes.

Shared by pair 4 (``backward``: standard vs reduced-memory backward) and the whole layer (``moe``).
The router is a scaled identity on the first E features of x (``router_w[e % d, e] = 2^-(e // d)``),
so the logits are exact in every dtype and the bf16 layer routes exactly the tokens the float64
oracle routes (otherwise a rounding flip of a near-tie top-k choice would make the outputs differ
by a whole expert).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sonic_learn.compare import fast_kernels
from sonic_learn.compare.configs import Problem
from sonic_learn.compare.pairs.common import F64, Case, generator, padded_rows, score_dtype
from sonic_learn.compare.registry import Impl, Setup, UnsupportedProblem, fast_ready
from sonic_learn.compare.runner import Agreement, Cost, Work, rel_err
from sonic_learn.reference import moe as ref_moe

GRAD_NAMES = ("dx", "drouter_w", "dw1", "dw2")
FORWARD_FLOPS = 6  # per routed pair, times n * d: up-projection 2 d 2n + down-projection 2 n d (backward: twice)
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, rw, w1, w2) -> out


@dataclass(frozen=True)
class LayerRow:
    """A layer row: where it comes from, its routing, and its backward mode."""

    source: str  # "naive" (the per-expert loop + autograd), "reference", "fast" or "upstream"
    routing: str = "topk"  # "topk" or "token_rounding"
    backward: str | None = None  # "standard" / "reduced_memory"; None: autograd of the naive loop

    @property
    def algorithm(self) -> str:
        return (self.backward or "autograd") + (" + TR" if self.routing == "token_rounding" else "")


def exact_router(d: int, E: int) -> torch.Tensor:
    """(d, E) router whose logits x @ router_w are exact in any dtype: column e reads feature e % d,
    scaled by 2^-(e // d) so that columns stay distinct even when E > d."""
    w = torch.zeros(d, E, dtype=torch.float64)
    e = torch.arange(E)
    w[e % d, e] = 2.0 ** (-(e // d)).double()
    return w


def make_case(p: Problem, s: Setup, seed: int) -> Case:
    g = generator(seed)
    x = torch.randn(p.T, p.d, generator=g)  # (T, d)
    rw = exact_router(p.d, p.E)  # (d, E)
    w1 = torch.randn(p.E, p.d, 2 * p.n, generator=g) / math.sqrt(p.d)  # (E, d, 2n), gate/up interleaved
    w2 = torch.randn(p.E, p.n, p.d, generator=g) / math.sqrt(p.n)  # (E, n, d)
    dout = torch.randn(p.T, p.d, generator=g)  # (T, d) upstream gradient
    to = dict(device=s.device, dtype=s.dtype)
    return Case(p, s, {
        "x": x.to(**to), "router_w": rw.to(**to), "w1": w1.to(**to), "w2": w2.to(**to), "dout": dout.to(**to),
    }, ["router_w = scaled identity on the first E features (exact logits in every dtype, same routing as the oracle)"])


def leaves(case: Case) -> list[torch.Tensor]:
    """Fresh leaf copies of (x, router_w, w1, w2) that require grad."""
    return [t.detach().clone().requires_grad_(True) for t in (case.x, case.router_w, case.w1, case.w2)]


def oracle(case: Case, routing: str) -> dict:
    """float64 naive per-expert loop, differentiated by autograd (cached per routing)."""
    key = f"oracle:{routing}"
    if key not in case.data:
        ls = [t.detach().double().requires_grad_(True) for t in (case.x, case.router_w, case.w1, case.w2)]
        out = ref_moe.naive_moe_forward(*ls, case.problem.K, routing=routing, tile_m=case.problem.tile_m)
        grads = torch.autograd.grad(out, ls, case.dout.double())
        case.data[key] = {"out": out.detach(), **dict(zip(GRAD_NAMES, grads))}
    return case.data[key]


def routed_counts(case: Case, routing: str) -> torch.Tensor:
    """(E,) f_e of the layer's routing (the reference router on this case's x, cached)."""
    key = f"counts:{routing}"
    if key not in case.data:
        with torch.no_grad():
            r = ref_moe.route(case.x, case.router_w, case.problem.K, routing=routing, tile_m=case.problem.tile_m)
        case.data[key] = torch.bincount(r.expert_idx.long(), minlength=case.problem.E).cpu()
    return case.data[key]


def routed_pairs(case: Case, routing: str) -> int:
    """P, the (token, expert) pairs the layer computes: T*K for top-k, sum of f_e after rounding."""
    if routing == "topk":
        return case.problem.T * case.problem.K
    return int(routed_counts(case, routing).sum())


def fast_limits(problem: Problem, dtype: torch.dtype, routing: str) -> None:
    """Raise UnsupportedProblem outside the fast layer's documented range: bf16/fp16, 16-byte rows
    (d and n multiples of 8), 32-bit indexing, and (token rounding) the fast routing's expert limit."""
    fm = fast_kernels.moe
    if dtype not in fm.FAST_DTYPES:
        raise UnsupportedProblem(f"the fast layer runs bf16/fp16, not {dtype}")
    for name, value in (("d", problem.d), ("n", problem.n)):
        if value % 8:
            raise UnsupportedProblem(f"the fast layer reads 16-byte rows: {name} must be a multiple of 8, got {value}")
    two_n, P = 2 * problem.n, problem.T * problem.K
    if P * max(problem.d, two_n) > fm.MAX_ELEMENTS or problem.E * problem.d * two_n > fm.MAX_ELEMENTS:
        raise UnsupportedProblem(f"the fast layer indexes with 32 bits: (T*K, max(d, 2n)) = ({P}, "
                                 f"{max(problem.d, two_n)}) or w1 exceeds {fm.MAX_ELEMENTS} elements")
    if routing == "token_rounding" and problem.E > fast_kernels.routing.MAX_EXPERTS:
        raise UnsupportedProblem(f"the fast token rounding takes E <= {fast_kernels.routing.MAX_EXPERTS}, "
                                 f"got E={problem.E}")


def forward(row: LayerRow, case: Case) -> Forward:
    """forward(x, rw, w1, w2) -> out of a naive, reference or fast row."""
    p = case.problem
    if row.source == "naive":
        return lambda x, rw, w1, w2: ref_moe.naive_moe_forward(x, rw, w1, w2, p.K, routing=row.routing, tile_m=p.tile_m)
    if row.source == "fast":
        fast_limits(p, case.setup.dtype, row.routing)
        module = fast_kernels.moe
    elif row.source == "reference":
        module = ref_moe
    else:
        raise ValueError(f"row.source must be naive, reference or fast here, got {row.source!r}")
    return lambda x, rw, w1, w2: module.moe_forward(x, rw, w1, w2, p.K, routing=row.routing, tile_m=p.tile_m,
                                                    backward=row.backward)


def forward_backward(fwd_of_case: Callable[[Case], Forward]):
    """build(case) of a whole-layer row: forward + backward, returns (out, dx, drouter_w, dw1, dw2)."""

    def build(case: Case):
        fwd = fwd_of_case(case)

        def run():
            ls = leaves(case)
            out = fwd(*ls)
            grads = torch.autograd.grad(out, ls, case.dout)
            return (out.detach(), *grads)

        return run

    return build


def backward_only(fwd_of_case: Callable[[Case], Forward]):
    """build(case) of a backward row: one forward at build time, then every call re-runs the backward."""

    def build(case: Case):
        ls = leaves(case)
        out = fwd_of_case(case)(*ls)
        return lambda: torch.autograd.grad(out, ls, case.dout, retain_graph=True)

    return build


def compare(case: Case, impl: Impl, out) -> Agreement:
    ref = oracle(case, impl.spec.routing)
    names = ("out", *GRAD_NAMES) if len(out) == 5 else GRAD_NAMES
    return Agreement(errors={n: rel_err(o, ref[n]) for n, o in zip(names, out)})


def layer_cost(flops_per_pair_nd: int):
    """Useful FLOPs = flops_per_pair_nd * P * n * d (6 forward, 12 backward, 18 both, for SwiGLU);
    wasted = the same for the rows that pad each expert's last M tile (tiled kernels only: the
    naive loop has no tiles)."""

    def cost(case: Case, impl: Impl, out) -> Cost:
        p, row = case.problem, impl.spec
        P = routed_pairs(case, row.routing)
        m_pad = padded_rows(routed_counts(case, row.routing), p.tile_m)
        wasted = 0 if row.source == "naive" else (m_pad - P) * flops_per_pair_nd * p.n * p.d
        return Cost(flops=flops_per_pair_nd * P * p.n * p.d, wasted_flops=wasted,
                    extra={"pairs": P, "padded_rows": m_pad})

    return cost


def sizes(p: Problem) -> tuple[int, int]:
    """(weight elements, activation elements of one forward) of the layer: w1 (E, d, 2n) + w2 (E, n, d);
    gathered x and Y (P, d), H (P, 2n), A (P, n), x and out (T, d), the logits (T, E)."""
    P = p.T * p.K
    return p.E * p.d * 3 * p.n, P * (2 * p.d + 3 * p.n) + 2 * p.T * p.d + p.T * p.E


def layer_work(oracle_routings: int, backward_only: bool):
    """The cost model of a whole layer comparison: the float64 oracle (forward + backward, per routing
    checked), then every row's calls; backward rows keep their graphs alive between calls."""

    def work(p: Problem, dtype: torch.dtype, n_rows: int, calls: int) -> Work:
        b = torch.empty((), dtype=dtype).element_size()
        weights, acts = sizes(p)
        fwd = FORWARD_FLOPS * p.T * p.K * p.n * p.d
        oracle = oracle_routings * 3 * fwd
        held = (3 * weights + acts + 2 * p.T * p.d) * F64 + 4 * weights * b
        if backward_only:  # one forward at build time, then every call a backward (2 x forward FLOPs)
            rows, held = n_rows * (fwd + calls * 2 * fwd), held + n_rows * (acts + weights) * b
        else:
            rows, held = n_rows * calls * 3 * fwd, held + (acts + 2 * weights) * b
        if dtype == torch.float64:
            return Work(flops_f64=oracle + rows, held_bytes=held)
        return Work(flops=rows, flops_f64=oracle, held_bytes=held)

    return work


def held_activation_bytes(fwd: Forward, ls, weights) -> int:
    """Bytes of every storage autograd keeps for backward during ``fwd(*ls)`` (router included),
    each storage once, the weights left out (they are parameters, not activations)."""
    weight_ptrs = {w.untyped_storage().data_ptr() for w in weights}
    held: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in weight_ptrs:
            held[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fwd(*ls)
    del out
    return sum(held.values())


def saved(case: Case, impl: Impl) -> tuple[int | None, int | None]:
    """(measured, closed-form) activation bytes of a naive / reference / fast row."""
    p, row = case.problem, impl.spec
    if row.source == "upstream":
        return None, None
    ls = leaves(case)
    measured = held_activation_bytes(forward(row, case), ls, ls[1:])
    expected = None
    if row.backward is not None:
        expected = ref_moe.expected_saved_bytes(
            p.T, p.d, p.n, p.E, routed_pairs(case, row.routing), dtype=case.setup.dtype, backward=row.backward,
            score_dtype=score_dtype(case.setup.dtype))["total"]
    return measured, expected


def row(name: str, kind: str, spec: LayerRow, build_of, available=None) -> Impl:
    """An Impl for a layer row; ``build_of`` is forward_backward or backward_only."""
    if available is None and spec.source == "fast":
        available = fast_ready
    build = build_of(lambda case: forward(spec, case))
    return Impl(name, kind, spec.algorithm, spec, build, *((available,) if available else ()))
