"""Pair 2, routing: token-choice top-k vs token rounding (Algorithm 4: round each expert's count
f_e to a multiple of the GEMM tile, so no tile is padded).

Token-choice rows are checked against a float64 top-k + softmax; token-rounding rows against
Algorithm 4's counts (computed here, independently of the reference) and its invariants, and the
fast kernels must reproduce the reference's pairs exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sonic_learn.compare import fast_kernels
from sonic_learn.compare.configs import Problem
from sonic_learn.compare.pairs.common import F64, Case, generator, padded_rows, score_dtype, spread_logits
from sonic_learn.compare.registry import Impl, Setup, UnsupportedProblem, fast_ready
from sonic_learn.compare.runner import Agreement, Cost, PairSpec, Work, mismatch, rel_err
from sonic_learn.reference import routing as ref_routing

ROUNDING_MODES = ("nearest", "up", "down")


@dataclass(frozen=True)
class RoutingRow:
    """A routing row: where it comes from and, for token rounding, the rounding mode."""

    source: str  # "torch", "reference" or "fast"
    mode: str | None = None  # None: token-choice top-k; else token rounding with this mode

    @property
    def module(self):
        return fast_kernels.routing if self.source == "fast" else ref_routing


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


def make_case(p: Problem, s: Setup, seed: int) -> Case:
    sd = score_dtype(s.dtype)
    logits = spread_logits(p.T, p.E, sd, generator(seed)).to(s.device)  # (T, E)
    top = torch.sort(logits.double(), dim=-1, descending=True, stable=True)
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
        "reference_pairs": {},  # mode -> (token_idx, expert_idx) of the reference rounding
    }, [f"router logits in {str(sd).replace('torch.', '')}, tie-free; token rounding to tile_m={p.tile_m}"])


def compare(case: Case, impl: Impl, out: dict) -> Agreement:
    p, row = case.problem, impl.spec
    a = Agreement()
    tok, exp_, sc = out["token_idx"].long(), out["expert_idx"].long(), out["scores"]
    if row.mode is None:
        a.mismatches["expert_idx"] = mismatch(exp_, case.expert_idx)
        a.mismatches["token_idx"] = mismatch(tok, case.token_idx)
        a.mismatches["gather_idx"] = mismatch(out["gather_idx"], case.gather_idx)
        a.mismatches["counts"] = mismatch(out["counts"], case.counts)
        a.errors["scores"] = rel_err(sc, case.scores)
        return a
    # (1) every expert's count is f_e rounded as Algorithm 4 says (checked against our own rounding)
    want = expected_rounded_counts(case.counts, p.tile_m, row.mode, p.T)
    a.mismatches["counts"] = mismatch(out["counts"], want)
    # (2) triples sorted by token; (3) only the last tile changes: rounding up keeps every pick,
    # rounding down keeps only picks; (4) a kept pick keeps its token-choice score.
    if tok.numel() and bool((tok[1:] < tok[:-1]).any()):
        a.violations.append("token_idx not ascending")
    kept = torch.zeros(p.T, p.E, dtype=torch.bool, device=tok.device)
    in_range = bool(((tok >= 0) & (tok < p.T) & (exp_ >= 0) & (exp_ < p.E)).all()) if tok.numel() else True
    if not in_range:
        a.violations.append("a token or expert id is out of range")
        return a
    if tok.numel():
        kept[tok, exp_] = True
    # the pairs agree with the counts and the metadata: f_e pairs per expert, gathered expert-major
    a.mismatches["pairs per expert"] = mismatch(torch.bincount(exp_, minlength=p.E), want)
    a.mismatches["gather_idx"] = mismatch(out["gather_idx"], tok[torch.sort(exp_, stable=True).indices])
    if int(kept.sum()) != tok.numel():
        a.violations.append("a (token, expert) pair appears twice")
    grew = (want >= case.counts)[None, :]  # (1, E)
    lost_pick = case.tc_mask & ~kept & grew  # expert rounded up but dropped a pick
    extra = kept & ~case.tc_mask & ~grew  # expert rounded down but added a non-pick
    if bool(lost_pick.any()) or bool(extra.any()):
        a.violations.append(f"{int(lost_pick.any(0).sum() + extra.any(0).sum())} experts changed more than their last tile")
    picks = case.tc_mask[tok, exp_]  # (P,) which kept pairs are token-choice picks
    a.errors["scores"] = rel_err(sc[picks], case.tc_scores[tok, exp_][picks])
    ref = case.reference_pairs.get(row.mode)
    if row.source != "reference" and ref is not None:  # kernels must reproduce the reference exactly
        a.mismatches["pairs vs reference"] = mismatch(torch.stack([tok, exp_]), torch.stack(ref))
    return a


def cost(case: Case, impl: Impl, out: dict) -> Cost:
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


def work(p: Problem, dtype: torch.dtype, n_rows: int, calls: int) -> Work:
    """The whole run: the float64 top-k once, then every row's calls over the (T, E) logits (several
    passes: counted as 8), and the (T, E) masks of the check."""
    b, logits = score_dtype(dtype).itemsize, p.T * p.E
    return Work(bytes_moved=4 * logits * F64 + n_rows * calls * 8 * logits * b,
                held_bytes=logits * (b + 3 * F64 + 1) + n_rows * p.T * p.K * 5 * F64)


def _torch_routing(case: Case):
    p = case.problem

    def run():
        v, idx = torch.topk(case.logits, p.K, dim=-1)  # (T, K)
        scores = torch.softmax(v.to(score_dtype(case.setup.dtype)), dim=-1)  # (T, K)
        token = torch.arange(p.T, device=idx.device).repeat_interleave(p.K)  # (T*K,)
        expert = idx.reshape(-1)
        counts = torch.bincount(expert, minlength=p.E)
        gather = token[torch.argsort(expert, stable=True)]
        return {"token_idx": token, "expert_idx": expert, "scores": scores.reshape(-1), "counts": counts,
                "gather_idx": gather}

    return run


def fast_limits(problem: Problem) -> None:
    """Raise UnsupportedProblem outside the fast routing kernels' documented range."""
    limit = fast_kernels.routing.MAX_EXPERTS
    if problem.E > limit:
        raise UnsupportedProblem(f"the fast routing kernels take E <= {limit} experts, got E={problem.E}")


def _routing_build(row: RoutingRow):
    def build(case: Case):
        p = case.problem
        if row.source == "fast":
            fast_limits(p)
        module = row.module
        route_kw, meta_kw = {}, {}
        if row.mode is not None:
            route_kw = {"tile_m": p.tile_m, "mode": row.mode}
        if row.source == "fast":  # the kernel path, without the NaN / id-range check syncs (see topk.KERNEL_PATH)
            route_kw["check_finite"] = False
            meta_kw["check_ids"] = False
        route_fn = module.topk_routing if row.mode is None else module.token_rounding

        def run():
            r = route_fn(case.logits, p.K, **route_kw)
            meta = module.build_metadata(r, **meta_kw)
            return {"token_idx": r.token_idx, "expert_idx": r.expert_idx, "scores": r.scores,
                    "counts": meta.expert_counts, "gather_idx": meta.gather_idx}

        if row.mode is not None and row.source == "reference":
            ref = run()
            case.reference_pairs[row.mode] = (ref["token_idx"].long(), ref["expert_idx"].long())
        return run

    return build


def _row(name: str, kind: str, row: RoutingRow) -> Impl:
    algorithm = "token-choice" if row.mode is None else f"token rounding ({row.mode})"
    build = _torch_routing if row.source == "torch" else _routing_build(row)
    return Impl(name, kind, algorithm, row, build, *((fast_ready,) if row.source == "fast" else ()))


ROWS = (
    _row("torch.topk + argsort", "baseline", RoutingRow("torch")),
    _row("reference top-k", "reference", RoutingRow("reference")),
    *(_row(f"reference rounding {mode}", "reference", RoutingRow("reference", mode)) for mode in ROUNDING_MODES),
    _row("fast top-k", "fast", RoutingRow("fast")),
    _row("fast rounding nearest", "fast", RoutingRow("fast", "nearest")),
)

SPEC = PairSpec(
    key="routing",
    title="routing: token-choice top-k vs token rounding",
    oracle="float64 top-k + softmax (token choice); Algorithm 4's counts and invariants (token rounding)",
    make_case=make_case,
    compare=compare,
    cost=cost,
    timed="router scores + routing metadata from the (T, E) logits (fast rows: without the NaN/id-check syncs)",
    rows=ROWS,
    work=work,
)
