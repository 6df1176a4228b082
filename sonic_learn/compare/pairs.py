"""The four SonicMoE pairs (and the whole layer) as comparisons: inputs, oracle, rows, cost model.

Each ``PairSpec`` says how to build one problem's inputs and its float64 oracle, how to compare a
row's output with the oracle, and the analytic cost of the row. The rows are ``Impl`` entries in
``sonic_learn.compare.registry.REGISTRY``: the baseline a user would otherwise pick, the readable
references, the CuTe-DSL kernels (``sonic_learn.fast``, Hopper only) and upstream sonic-moe.

Inputs are chosen so that the comparison measures the implementations, not rounding noise:

- top-k and routing logits are **tie-free** (each row a random permutation of E distinct values
  that the dtype represents exactly), so every correct implementation selects the same indices;
- the MoE layer's router is a scaled identity on the first E features of x (``router_w[e % d, e] =
  2^-(e // d)``), so the logits are exact in every dtype and the bf16 layer routes exactly the
  tokens the float64 oracle routes (otherwise a rounding flip of a near-tie top-k choice would make
  the outputs differ by a whole expert).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sonic_learn.compare.configs import Problem
from sonic_learn.compare.registry import (
    REGISTRY,
    Impl,
    Setup,
    always,
    fast_has,
    has,
    register,
    resolve,
    upstream_available,
)
from sonic_learn.compare.runner import Agreement, Cost, PairSpec, mismatch, rel_err

REF_TOPK = "sonic_learn.reference.topk"
REF_ROUTING = "sonic_learn.reference.routing"
REF_GEMM = "sonic_learn.reference.grouped_gemm"
REF_MOE = "sonic_learn.reference.moe"
FAST_TOPK = "sonic_learn.fast.topk"
FAST_ROUTING = "sonic_learn.fast.routing"
FAST_GEMM = "sonic_learn.fast.grouped_gemm"
FAST_MOE = "sonic_learn.fast.moe"

PAIRS = ("topk", "routing", "grouped-gemm", "backward", "moe")
TOUR = ("topk", "routing", "grouped-gemm", "backward")  # the four pairs of the paper


# ----------------------------------------------------------------------------------------------
# Inputs shared by the pairs
# ----------------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _row_permutations(T: int, E: int, g: torch.Generator) -> torch.Tensor:
    return torch.argsort(torch.rand(T, E, generator=g), dim=1)  # (T, E) int64, a permutation per row


def distinct_logits(T: int, E: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """(T, E) logits, every row a random permutation of E consecutive values of a 16-bit float
    format around 1.0 (bfloat16 for bf16, float16 otherwise), so the values are exact in ``dtype``
    and in float32, and no row has a tie. float32 copies have their low 13+ mantissa bits zero, so
    the bitonic top-k's index packing stays exact (E <= 8192)."""
    perm = _row_permutations(T, E, g)  # (T, E)
    if dtype == torch.bfloat16:
        base, limit, fmt = 0x3F80, 0x7F7F, torch.bfloat16  # bf16 bits of 1.0, largest finite
    else:
        base, limit, fmt = 0x3C00, 0x7BFF, torch.float16  # fp16 bits of 1.0, largest finite
    lo = base - E // 2
    if lo < 1 or lo + E - 1 > limit:
        raise ValueError(f"E must be at most {2 * (limit - base)} for tie-free {fmt} logits, got {E}")
    bits = (lo + perm).to(torch.int16)  # (T, E) positive floats' bits: order of bits = order of values
    return bits.view(fmt).to(dtype)  # (T, E)


def spread_logits(T: int, E: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """(T, E) tie-free router logits in about [-4, 4]: each row a permutation of (j - E/2) * delta
    with delta a power of two (exact in float32/float64)."""
    perm = _row_permutations(T, E, g)  # (T, E)
    delta = 2.0 ** math.floor(math.log2(8.0 / E))
    return ((perm - E // 2).to(torch.float64) * delta).to(dtype)  # (T, E)


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def padded_rows(counts: torch.Tensor, tile_m: int) -> int:
    """Rows of a tiled grouped GEMM: every expert's f_e rows padded up to a multiple of ``tile_m``."""
    return int((-(-counts.long() // tile_m) * tile_m).sum())  # sum_e ceil(f_e / tile_m) * tile_m


@dataclass
class Case:
    """Inputs and oracle outputs of one pair on one problem (a plain bag of tensors)."""

    problem: Problem
    setup: Setup
    data: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __getattr__(self, name):
        try:
            return self.__dict__["data"][name]
        except KeyError:
            raise AttributeError(name) from None


# ----------------------------------------------------------------------------------------------
# Pair 1: top-k (radix select vs bitonic)
# ----------------------------------------------------------------------------------------------
def _topk_case(p: Problem, s: Setup, seed: int) -> Case:
    logits = distinct_logits(p.T, p.E, s.dtype, _gen(seed)).to(s.device)  # (T, E)
    ordered = torch.sort(logits.double(), dim=-1, descending=True, stable=True)  # float64 oracle
    return Case(p, s, {"logits": logits, "values": ordered.values[:, : p.K], "indices": ordered.indices[:, : p.K]},
                ["logits: each row a random permutation of E distinct values (no ties)"])


def _topk_compare(case: Case, impl: Impl, out) -> Agreement:
    values, indices = out[0], out[1]
    return Agreement(errors={"values": rel_err(values, case.values)},
                     mismatches={"indices": mismatch(indices, case.indices)})


def _topk_cost(case: Case, impl: Impl, out) -> Cost:
    p, b = case.problem, case.logits.element_size()
    # Read the logits once, write K values and K int32 indices per token.
    return Cost(bytes_moved=p.T * p.E * b + p.T * p.K * (b + 4), throughput_from="bytes")


# The fast rows time the kernel path, as the MoE layer calls it: their default NaN check of the input
# (``check_finite``) and the id range check of ``build_metadata`` (``check_ids``) are device-to-host
# syncs. The inputs here are finite by construction, and every row's output is checked against the
# oracle before it is timed, so the timed call is the checked one.
_KERNEL_PATH = {"check_finite": False}


def _topk_impl(module: str, fname: str, **kwargs):
    return lambda case: (lambda: resolve(module, fname)(case.logits, case.problem.K, **kwargs))


TOPK = PairSpec(
    key="topk",
    title="top-k: radix select vs bitonic (the router)",
    oracle="float64 stable sort of the logits (ties would go to the lower column)",
    make_case=_topk_case,
    compare=_topk_compare,
    cost=_topk_cost,
    timed="top-k of the (T, E) logits (fast rows: the kernel path, without the NaN-check sync)",
)

register("topk", Impl("torch.topk", "baseline", "radix", always,
                      lambda case: (lambda: torch.topk(case.logits, case.problem.K, dim=-1))))
register("topk", Impl("reference radix", "reference", "radix", has(REF_TOPK, "radix_topk"),
                      _topk_impl(REF_TOPK, "radix_topk")))
register("topk", Impl("reference bitonic", "reference", "bitonic", has(REF_TOPK, "bitonic_topk"),
                      _topk_impl(REF_TOPK, "bitonic_topk")))
register("topk", Impl("fast radix", "fast", "radix", fast_has(FAST_TOPK, "radix_topk"),
                      _topk_impl(FAST_TOPK, "radix_topk", **_KERNEL_PATH)))
register("topk", Impl("fast bitonic", "fast", "bitonic", fast_has(FAST_TOPK, "bitonic_topk"),
                      _topk_impl(FAST_TOPK, "bitonic_topk", **_KERNEL_PATH)))


# ----------------------------------------------------------------------------------------------
# Pair 2: routing (token-choice top-k vs token rounding)
# ----------------------------------------------------------------------------------------------
def expected_rounded_counts(counts: torch.Tensor, tile_m: int, mode: str, T: int) -> torch.Tensor:
    """Algorithm 4's rounding of every f_e, written independently of the reference (for the check)."""
    f = counts.long()
    down = (f // tile_m) * tile_m
    rem = f - down
    up = down + tile_m * (rem > 0)
    if mode == "down":
        r = down
    elif mode == "up":
        r = up
    else:  # nearest: strictly closer to the ceiling goes up; exact halves go down
        r = torch.where(2 * rem > tile_m, up, down)
    return r.clamp(max=T)


def _routing_case(p: Problem, s: Setup, seed: int) -> Case:
    sd = _score_dtype(s.dtype)
    logits = spread_logits(p.T, p.E, sd, _gen(seed)).to(s.device)  # (T, E)
    l64 = logits.double()
    top = torch.sort(l64, dim=-1, descending=True, stable=True)
    experts = top.indices[:, : p.K]  # (T, K)
    scores = torch.softmax(top.values[:, : p.K], dim=-1)  # (T, K) float64
    token = torch.arange(p.T, device=s.device).repeat_interleave(p.K)  # (T*K,)
    expert = experts.reshape(-1)  # (T*K,)
    counts = torch.bincount(expert, minlength=p.E)  # (E,) f_e
    order = torch.sort(expert, stable=True).indices
    tc_mask = torch.zeros(p.T, p.E, dtype=torch.bool, device=s.device).scatter_(1, experts, True)
    tc_scores = torch.zeros(p.T, p.E, dtype=torch.float64, device=s.device).scatter_(1, experts, scores)
    return Case(p, s, {
        "logits": logits, "token_idx": token, "expert_idx": expert, "scores": scores.reshape(-1),
        "counts": counts, "gather_idx": token[order], "tc_mask": tc_mask, "tc_scores": tc_scores,
    }, [f"router logits in {str(sd).replace('torch.', '')}, tie-free; token rounding to tile_m={p.tile_m}"])


def _routing_out(r, meta) -> dict:
    return {"token_idx": r.token_idx, "expert_idx": r.expert_idx, "scores": r.scores,
            "counts": meta.expert_counts, "gather_idx": meta.gather_idx}


def _routing_compare(case: Case, impl: Impl, out: dict) -> Agreement:
    p = case.problem
    a = Agreement()
    tok, exp_, sc = out["token_idx"].long(), out["expert_idx"].long(), out["scores"]
    if impl.algorithm == "token-choice":
        a.mismatches["expert_idx"] = mismatch(exp_, case.expert_idx)
        a.mismatches["token_idx"] = mismatch(tok, case.token_idx)
        a.mismatches["gather_idx"] = mismatch(out["gather_idx"], case.gather_idx)
        a.mismatches["counts"] = mismatch(out["counts"], case.counts)
        a.errors["scores"] = rel_err(sc, case.scores)
        return a
    mode = impl.algorithm.split("(")[1].rstrip(")")
    # (1) every expert's count is f_e rounded as Algorithm 4 says (checked against our own rounding)
    want = expected_rounded_counts(case.counts, p.tile_m, mode, p.T)
    a.mismatches["counts"] = mismatch(out["counts"], want)
    # (2) triples sorted by token; (3) only the last tile changes: rounding up keeps every pick,
    # rounding down keeps only picks; (4) a kept pick keeps its token-choice score.
    if tok.numel() and bool((tok[1:] < tok[:-1]).any()):
        a.violations.append("token_idx not ascending")
    kept = torch.zeros(p.T, p.E, dtype=torch.bool, device=tok.device)
    if tok.numel():
        kept[tok, exp_] = True
    if int(kept.sum()) != tok.numel():
        a.violations.append("a (token, expert) pair appears twice")
    grew = (want >= case.counts)[None, :]  # (1, E)
    lost_pick = case.tc_mask & ~kept & grew  # expert rounded up but dropped a pick
    extra = kept & ~case.tc_mask & ~grew  # expert rounded down but added a non-pick
    if bool(lost_pick.any()) or bool(extra.any()):
        a.violations.append(f"{int(lost_pick.any(0).sum() + extra.any(0).sum())} experts changed more than their last tile")
    picks = case.tc_mask[tok, exp_]  # (P,) which kept pairs are token-choice picks
    a.errors["scores"] = rel_err(sc[picks], case.tc_scores[tok, exp_][picks])
    ref = case.data.get(f"ref:{mode}")
    if impl.kind != "reference" and ref is not None:  # kernels must reproduce the reference exactly
        a.mismatches["pairs vs reference"] = mismatch(torch.stack([tok, exp_]), torch.stack(ref))
    return a


def _routing_cost(case: Case, impl: Impl, out: dict) -> Cost:
    p = case.problem
    counts = out["counts"].long()
    P = int(counts.sum())
    m_pad = padded_rows(counts, p.tile_m)
    per_row = 6 * p.n * p.d  # forward FLOPs of one routed row: up-proj 2*d*2n + down-proj 2*n*d
    logit_bytes = case.logits.element_size()
    nbytes = p.T * p.E * logit_bytes + P * (4 + 4 + 4) + P * 2 * 4 + (p.E + 1) * 4
    return Cost(
        flops=P * per_row, bytes_moved=nbytes, wasted_flops=(m_pad - P) * per_row, throughput_from="bytes",
        extra={"pairs": P, "padded_rows": m_pad, "padding_pct": 100.0 * (m_pad - P) / max(m_pad, 1),
               "pairs_vs_topk": P - p.T * p.K},
    )


def _torch_routing(case: Case):
    p = case.problem

    def run():
        v, idx = torch.topk(case.logits, p.K, dim=-1)  # (T, K)
        scores = torch.softmax(v.to(_score_dtype(case.setup.dtype)), dim=-1)  # (T, K)
        token = torch.arange(p.T, device=idx.device).repeat_interleave(p.K)  # (T*K,)
        expert = idx.reshape(-1)
        counts = torch.bincount(expert, minlength=p.E)
        gather = token[torch.argsort(expert, stable=True)]
        return {"token_idx": token, "expert_idx": expert, "scores": scores.reshape(-1), "counts": counts,
                "gather_idx": gather}

    return run


def _routing_impl(module: str, mode: str | None):
    def build(case: Case):
        p = case.problem
        route_fn = resolve(module, "topk_routing" if mode is None else "token_rounding")
        meta_fn = resolve(module, "build_metadata")
        route_kw = {} if mode is None else {"tile_m": p.tile_m, "mode": mode}
        meta_kw = {}
        if module == FAST_ROUTING:  # the kernel path (see _KERNEL_PATH)
            route_kw |= _KERNEL_PATH
            meta_kw["check_ids"] = False

        def run():
            r = route_fn(case.logits, p.K, **route_kw)
            return _routing_out(r, meta_fn(r, **meta_kw))

        if mode is not None and module == REF_ROUTING:
            ref = run()
            case.data[f"ref:{mode}"] = (ref["token_idx"].long(), ref["expert_idx"].long())
        return run

    return build


ROUTING = PairSpec(
    key="routing",
    title="routing: token-choice top-k vs token rounding",
    oracle="float64 top-k + softmax (token choice); Algorithm 4's counts and invariants (token rounding)",
    make_case=_routing_case,
    compare=_routing_compare,
    cost=_routing_cost,
    timed="router scores + routing metadata from the (T, E) logits (fast rows: without the NaN/id-check syncs)",
)

register("routing", Impl("torch.topk + argsort", "baseline", "token-choice", always, _torch_routing))
register("routing", Impl("reference top-k", "reference", "token-choice",
                         has(REF_ROUTING, "topk_routing", "build_metadata"), _routing_impl(REF_ROUTING, None)))
for _mode in ("nearest", "up", "down"):
    register("routing", Impl(f"reference rounding {_mode}", "reference", f"token-rounding({_mode})",
                             has(REF_ROUTING, "token_rounding", "build_metadata"), _routing_impl(REF_ROUTING, _mode)))
register("routing", Impl("fast top-k", "fast", "token-choice",
                         fast_has(FAST_ROUTING, "topk_routing", "build_metadata"), _routing_impl(FAST_ROUTING, None)))
register("routing", Impl("fast rounding nearest", "fast", "token-rounding(nearest)",
                         fast_has(FAST_ROUTING, "token_rounding", "build_metadata"),
                         _routing_impl(FAST_ROUTING, "nearest")))


# ----------------------------------------------------------------------------------------------
# Pair 3: grouped GEMM (gather + pad + GEMM vs gather-fused)
# ----------------------------------------------------------------------------------------------
def _gemm_case(p: Problem, s: Setup, seed: int) -> Case:
    g = _gen(seed)
    routing = resolve(REF_ROUTING, "topk_routing")
    build_metadata = resolve(REF_ROUTING, "build_metadata")
    logits = spread_logits(p.T, p.E, torch.float32, g).to(s.device)  # (T, E)
    meta = build_metadata(routing(logits, p.K))  # top-k routing's metadata, on the device
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


GEMM_ORACLE = {"dense": ("dense out", "y_dense"), "varlen-K": ("dW", "dw")}  # algorithm -> (error name, oracle)


def _gemm_compare(case: Case, impl: Impl, out) -> Agreement:
    name, oracle = GEMM_ORACLE.get(impl.algorithm, ("out", "y"))
    return Agreement(errors={name: rel_err(out, getattr(case, oracle))})


def _gemm_cost(case: Case, impl: Impl, out) -> Cost:
    p = case.problem
    io_cost = resolve(REF_GEMM, "io_cost")
    counts = case.meta.expert_counts.cpu()
    nbytes = case.x.element_size()
    P, N = case.meta.num_rows, 2 * p.n
    if impl.algorithm == "varlen-K":
        c = resolve(REF_GEMM, "varlen_k_cost")(p.T, p.d, N, counts, dtype_bytes=nbytes)
        return Cost(flops=c.flops_useful, bytes_moved=c.bytes_moved, wasted_flops=c.flops_padded)
    if impl.algorithm in ("dense", "contiguous"):  # A read once in place, B once (dense: one matrix), C written
        b_elems = p.d * N * (1 if impl.algorithm == "dense" else p.E)
        return Cost(flops=2 * P * p.d * N, bytes_moved=(P * p.d + b_elems + P * N) * nbytes)
    if impl.algorithm == "per-expert loop":  # gathers a copy per expert, no tile padding
        c = io_cost(p.T, p.d, 2 * p.n, counts, tile_m=1, dtype_bytes=case.x.element_size(), variant="naive")
    else:
        c = io_cost(p.T, p.d, 2 * p.n, counts, tile_m=p.tile_m, dtype_bytes=case.x.element_size(),
                    variant="naive" if impl.algorithm == "naive" else "gather_fused")
    return Cost(flops=c.flops_useful, bytes_moved=c.bytes_moved, wasted_flops=c.flops_padded,
                extra={"padded_rows": c.padded_rows, "rows": c.rows})


def _torch_gemm_loop(case: Case):
    def run():
        y = torch.empty(case.meta.num_rows, case.w.shape[2], dtype=case.x.dtype, device=case.x.device)
        for e in range(case.problem.E):
            rows = slice(case.offsets[e], case.offsets[e + 1])
            y[rows] = case.x[case.gather[rows]] @ case.w[e]  # (f_e, 2n)
        return y

    return run


def _gemm_impl(module: str, fname: str):
    return lambda case: (lambda: resolve(module, fname)(case.x, case.w, case.meta, tile_m=case.problem.tile_m))


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


def _fast_contiguous(case: Case):
    fn = resolve(FAST_GEMM, "contiguous_grouped_gemm")
    return lambda: fn(case.x_grouped, case.w, case.meta, tile_m=case.problem.tile_m)


def _torch_varlen_k_loop(case: Case):
    def run():
        dw = torch.empty(case.problem.E, case.x.shape[1], case.b.shape[1], dtype=case.x.dtype, device=case.x.device)
        for e in range(case.problem.E):
            rows = slice(case.offsets[e], case.offsets[e + 1])
            dw[e] = case.x[case.gather[rows]].T @ case.b[rows]  # (d, 2n)
        return dw

    return run


def _fast_varlen_k(case: Case):
    fn = resolve(FAST_GEMM, "grouped_gemm_varlen_k")
    return lambda: fn(case.x, case.b, case.meta, gather_a=True)


GEMM = PairSpec(
    key="grouped-gemm",
    title="grouped GEMM: gather + pad + GEMM vs gather-fused (up-projection)",
    oracle="float64 per-expert matmul of the gathered rows",
    make_case=_gemm_case,
    compare=_gemm_compare,
    cost=_gemm_cost,
    timed="the grouped GEMM (x, w, routing metadata) -> (P, 2n)",
)

register("grouped-gemm", Impl("torch.matmul per-expert loop", "baseline", "per-expert loop", always,
                              _torch_gemm_loop))
register("grouped-gemm", Impl("reference naive", "reference", "naive", has(REF_GEMM, "naive_grouped_gemm"),
                              _gemm_impl(REF_GEMM, "naive_grouped_gemm")))
register("grouped-gemm", Impl("reference gather-fused", "reference", "gather-fused",
                              has(REF_GEMM, "gather_fused_grouped_gemm"), _gemm_impl(REF_GEMM, "gather_fused_grouped_gemm")))
register("grouped-gemm", Impl("fast naive", "fast", "naive", fast_has(FAST_GEMM, "naive_grouped_gemm"),
                              _gemm_impl(FAST_GEMM, "naive_grouped_gemm")))
register("grouped-gemm", Impl("fast gather-fused", "fast", "gather-fused",
                              fast_has(FAST_GEMM, "gather_fused_grouped_gemm"),
                              _gemm_impl(FAST_GEMM, "gather_fused_grouped_gemm")))
# Issue 6's yardsticks, each timed in the same run: one dense GEMM of the same size, torch's own
# grouped GEMM on the same contiguous problem, and the weight-gradient (varlen-K) form.
register("grouped-gemm", Impl("torch.matmul dense (same M x K x N)", "torch", "dense", always, _torch_dense,
                              note="speed of light: no experts, checked against its own float64 oracle"))
register("grouped-gemm", Impl("torch._grouped_mm (contiguous A)", "torch", "contiguous", _grouped_mm_available,
                              _torch_grouped_mm))
register("grouped-gemm", Impl("fast contiguous", "fast", "contiguous", fast_has(FAST_GEMM, "contiguous_grouped_gemm"),
                              _fast_contiguous))
register("grouped-gemm", Impl("torch.matmul per-expert dW loop", "torch", "varlen-K", always, _torch_varlen_k_loop))
register("grouped-gemm", Impl("fast varlen-K (dW, x gathered)", "fast", "varlen-K",
                              fast_has(FAST_GEMM, "grouped_gemm_varlen_k"), _fast_varlen_k))


# ----------------------------------------------------------------------------------------------
# The MoE layer: pair 4 (standard vs reduced-memory backward) and the whole layer
# ----------------------------------------------------------------------------------------------
GRAD_NAMES = ("dx", "drouter_w", "dw1", "dw2")


def exact_router(d: int, E: int) -> torch.Tensor:
    """(d, E) router whose logits x @ router_w are exact in any dtype: column e reads feature e % d,
    scaled by 2^-(e // d) so that columns stay distinct even when E > d."""
    w = torch.zeros(d, E, dtype=torch.float64)
    e = torch.arange(E)
    w[e % d, e] = 2.0 ** (-(e // d)).double()
    return w


def _layer_case(p: Problem, s: Setup, seed: int) -> Case:
    g = _gen(seed)
    x = torch.randn(p.T, p.d, generator=g)  # (T, d)
    rw = exact_router(p.d, p.E)  # (d, E)
    w1 = torch.randn(p.E, p.d, 2 * p.n, generator=g) / math.sqrt(p.d)  # (E, d, 2n), gate/up interleaved
    w2 = torch.randn(p.E, p.n, p.d, generator=g) / math.sqrt(p.n)  # (E, n, d)
    dout = torch.randn(p.T, p.d, generator=g)  # (T, d) upstream gradient
    to = dict(device=s.device, dtype=s.dtype)
    return Case(p, s, {
        "x": x.to(**to), "router_w": rw.to(**to), "w1": w1.to(**to), "w2": w2.to(**to), "dout": dout.to(**to),
    }, ["router_w = scaled identity on the first E features (exact logits in every dtype, same routing as the oracle)"])


def _leaves(case: Case):
    return [t.detach().clone().requires_grad_(True) for t in (case.x, case.router_w, case.w1, case.w2)]


def _oracle(case: Case, routing: str) -> dict:
    """float64 naive per-expert loop, differentiated by autograd (cached per routing)."""
    key = f"oracle:{routing}"
    if key not in case.data:
        naive = resolve(REF_MOE, "naive_moe_forward")
        leaves = [t.detach().double().requires_grad_(True) for t in (case.x, case.router_w, case.w1, case.w2)]
        out = naive(*leaves, case.problem.K, routing=routing, tile_m=case.problem.tile_m)
        grads = torch.autograd.grad(out, leaves, case.dout.double())
        case.data[key] = {"out": out.detach(), **dict(zip(GRAD_NAMES, grads))}
    return case.data[key]


@dataclass(frozen=True)
class LayerImpl:
    """How to call one MoE layer implementation: forward(x, router_w, w1, w2) -> out."""

    routing: str  # "topk" or "token_rounding"
    backward: str | None  # "standard" / "reduced_memory" / None (autograd of a plain loop)


def _layer_forward(impl: Impl, case: Case):
    """(forward(x, rw, w1, w2) -> out) for a row; the upstream row converts to sonic-moe's layout."""
    p = case.problem
    spec: LayerImpl = LAYER_IMPLS[impl.name]
    if impl.kind == "baseline":
        naive = resolve(REF_MOE, "naive_moe_forward")
        return lambda x, rw, w1, w2: naive(x, rw, w1, w2, p.K, routing=spec.routing, tile_m=p.tile_m)
    if impl.kind == "upstream":
        import sonicmoe  # noqa: PLC0415 - optional, checked by upstream_available

        def upstream(x, rw, w1, w2):
            # sonic-moe takes F.linear-style weights: router (E, d), c_fc (E, 2n, d), c_proj (E, d, n),
            # passed as (2n, d, E) / (d, n, E) views; gate/up interleaved like ours.
            c_fc, c_proj = w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
            out, _, _ = sonicmoe.moe_TC_softmax_topk_layer(
                x, rw.t().contiguous(), c_fc.permute(1, 2, 0), None, c_proj.permute(1, 2, 0), None, p.K,
                torch.cuda.current_stream().cuda_stream)
            return out

        return upstream
    module = REF_MOE if impl.kind == "reference" else FAST_MOE
    fwd = resolve(module, "moe_forward")
    return lambda x, rw, w1, w2: fwd(x, rw, w1, w2, p.K, routing=spec.routing, tile_m=p.tile_m,
                                     backward=spec.backward)


def _layer_compare(case: Case, impl: Impl, out) -> Agreement:
    ref = _oracle(case, LAYER_IMPLS[impl.name].routing)
    names = ("out", *GRAD_NAMES) if len(out) == 5 else GRAD_NAMES
    return Agreement(errors={n: rel_err(o, ref[n]) for n, o in zip(names, out)})


def _routed_pairs(case: Case, routing: str) -> int:
    """P, the (token, expert) pairs the layer computes: T*K for top-k, sum of f_e after rounding."""
    if routing == "topk":
        return case.problem.T * case.problem.K
    return int(_counts(case, routing).sum())


def _layer_cost(flops_per_pair_nd: int):
    """Useful FLOPs = flops_per_pair_nd * P * n * d (6 forward, 12 backward, 18 both, for SwiGLU);
    wasted = the same for the rows that pad each expert's last M tile (tiled kernels only: the
    naive loop has no tiles)."""

    def cost(case: Case, impl: Impl, out) -> Cost:
        p = case.problem
        spec = LAYER_IMPLS[impl.name]
        P = _routed_pairs(case, spec.routing)
        m_pad = padded_rows(_counts(case, spec.routing), p.tile_m)
        wasted = 0 if impl.kind == "baseline" else (m_pad - P) * flops_per_pair_nd * p.n * p.d
        return Cost(flops=flops_per_pair_nd * P * p.n * p.d, wasted_flops=wasted,
                    extra={"pairs": P, "padded_rows": m_pad})

    return cost


def _counts(case: Case, routing: str) -> torch.Tensor:
    """(E,) f_e of the layer's routing (the reference router on this case's x, cached)."""
    key = f"counts:{routing}"
    if key not in case.data:
        route = resolve(REF_MOE, "route")
        with torch.no_grad():
            r = route(case.x, case.router_w, case.problem.K, routing=routing, tile_m=case.problem.tile_m)
        case.data[key] = torch.bincount(r.expert_idx.long(), minlength=case.problem.E).cpu()
    return case.data[key]


def held_activation_bytes(forward, leaves, weights) -> int:
    """Bytes of every storage autograd keeps for backward during ``forward(*leaves)`` (router
    included), each storage once, the weights left out (they are parameters, not activations)."""
    weight_ptrs = {w.untyped_storage().data_ptr() for w in weights}
    held: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in weight_ptrs:
            held[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(*leaves)
    del out
    return sum(held.values())


def _layer_saved(case: Case, impl: Impl) -> tuple[int | None, int | None]:
    p = case.problem
    spec = LAYER_IMPLS[impl.name]
    leaves = _leaves(case)
    measured = held_activation_bytes(_layer_forward(impl, case), leaves, leaves[1:])
    expected = None
    if spec.backward is not None and impl.kind in ("reference", "fast"):
        closed = resolve(REF_MOE, "expected_saved_bytes")
        expected = closed(p.T, p.d, p.n, p.E, _routed_pairs(case, spec.routing), dtype=case.setup.dtype,
                          backward=spec.backward, score_dtype=_score_dtype(case.setup.dtype))["total"]
    return measured, expected


def _fwd_bwd_impl(impl_name: str):
    """The whole layer: forward + backward, returns (out, dx, drouter_w, dw1, dw2)."""

    def build(case: Case):
        impl = _impl_by_name(impl_name)
        forward = _layer_forward(impl, case)

        def run():
            leaves = _leaves(case)
            out = forward(*leaves)
            grads = torch.autograd.grad(out, leaves, case.dout)
            return (out.detach(), *grads)

        return run

    return build


def _bwd_only_impl(impl_name: str):
    """Backward only: one forward at build time, then every call re-runs the backward on its graph."""

    def build(case: Case):
        impl = _impl_by_name(impl_name)
        leaves = _leaves(case)
        out = _layer_forward(impl, case)(*leaves)
        return lambda: torch.autograd.grad(out, leaves, case.dout, retain_graph=True)

    return build


def _impl_by_name(name: str) -> Impl:
    for pair in ("moe", "backward"):
        for impl in REGISTRY.get(pair, []):
            if impl.name == name:
                return impl
    raise LookupError(name)


LAYER_IMPLS: dict[str, LayerImpl] = {
    "naive PyTorch loop": LayerImpl("topk", None),
    "reference standard": LayerImpl("topk", "standard"),
    "reference reduced-memory": LayerImpl("topk", "reduced_memory"),
    "reference reduced-memory + token rounding": LayerImpl("token_rounding", "reduced_memory"),
    "fast standard": LayerImpl("topk", "standard"),
    "fast reduced-memory": LayerImpl("topk", "reduced_memory"),
    "fast reduced-memory + token rounding": LayerImpl("token_rounding", "reduced_memory"),
    "upstream sonic-moe": LayerImpl("topk", "reduced_memory"),
}

BACKWARD = PairSpec(
    key="backward",
    title="backward: standard vs reduced-memory (SonicMoE)",
    oracle="float64 naive per-expert loop differentiated by autograd",
    make_case=_layer_case,
    compare=_layer_compare,
    cost=_layer_cost(12),
    timed="the backward pass only (re-run on one retained graph)",
    saved=_layer_saved,
)

MOE = PairSpec(
    key="moe",
    title="MoE layer: forward + backward",
    oracle="float64 naive per-expert loop differentiated by autograd (same routing)",
    make_case=_layer_case,
    compare=_layer_compare,
    cost=_layer_cost(18),
    timed="forward + backward of the whole layer",
    saved=_layer_saved,
)


def _layer_available(impl_kind: str, name: str):
    spec = LAYER_IMPLS[name]
    if impl_kind == "baseline":
        return has(REF_MOE, "naive_moe_forward")
    if impl_kind == "reference":
        return has(REF_MOE, "moe_forward")
    if impl_kind == "fast":
        return fast_has(FAST_MOE, "moe_forward")
    return upstream_available if spec.routing == "topk" else (lambda s: (False, "upstream has no token rounding"))


def _register_layer(pair: str, names: list[tuple[str, str]], builder) -> None:
    for name, kind in names:
        spec = LAYER_IMPLS[name]
        algorithm = spec.backward or "autograd"
        if spec.routing == "token_rounding":
            algorithm += " + TR"
        register(pair, Impl(name, kind, algorithm, _layer_available(kind, name), builder(name)))


_register_layer("backward", [
    ("naive PyTorch loop", "baseline"),
    ("reference standard", "reference"),
    ("reference reduced-memory", "reference"),
    ("fast standard", "fast"),
    ("fast reduced-memory", "fast"),
], _bwd_only_impl)
_register_layer("moe", [
    ("naive PyTorch loop", "baseline"),
    ("reference standard", "reference"),
    ("reference reduced-memory", "reference"),
    ("reference reduced-memory + token rounding", "reference"),
    ("fast standard", "fast"),
    ("fast reduced-memory", "fast"),
    ("fast reduced-memory + token rounding", "fast"),
    ("upstream sonic-moe", "upstream"),
], _fwd_bwd_impl)


SPECS: dict[str, PairSpec] = {s.key: s for s in (TOPK, ROUTING, GEMM, BACKWARD, MOE)}
