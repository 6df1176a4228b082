"""Benchmark: token rounding vs top-k routing in the fast MoE layer, and the router's share (issue 8).

Run on the GPU machine:  python benchmarks/token_rounding.py [--out DIR] [--reps 30] [--big-reps 12]

**Part 1, the paper's token-rounding experiment** (Section 6.3.3, Fig. 16): for (T, d, n, K) =
(16384, 1536, 1024, 2) with E in {32, 64, 128} and (16384, 4096, 512, 8) with E in {128, 256, 512},
tile_m = 128, bf16, O(1)-scaled inputs (``make_inputs`` of benchmarks/moe.py; the same inputs for
both routings), reduced-memory backward:

* the routing of each kind, once: pair count P and the expert counts f_e; the fast token rounding is
  checked equal to the reference ``token_rounding`` (integer metadata exact, scores) and the fast
  top-k metadata to the reference ``build_metadata`` of ``topk_routing``, on the layer's own logits;
* padded FLOPs from the reference cost model (``io_cost`` for the four varlen-M GEMMs, tile_m = 128;
  ``varlen_k_cost`` for the two weight-gradient GEMMs, tile_k = 64 of the fast kernel): the GEMMs
  run every expert's last, partial M tile as a full tile (masked rows, real MMAs), so top-k executes
  2*(M_pad - M)*K*N FLOPs more per GEMM; token rounding makes every f_e a multiple of 128 and wastes
  none. Reported as the fraction of executed FLOPs that are padding, forward and forward+backward;
* time (medians of ``sonic_learn.bench.measure``, L2 flushed before each rep), forward and
  forward+backward, of (a) the experts alone (``fast.moe.run_experts`` on a routing computed
  beforehand, the paper's measurement: "router excluded") and (b) the whole layer
  (``fast.moe.moe_forward``: router GEMM, routing, metadata and experts; token rounding sizes its
  buffers by the host bound ``max_pairs`` and never synchronizes). ``--layer-only`` times (b) alone. The forward runs with autograd recording, as in training;
* the grouped GEMMs alone (up-proj, down-proj, dA', dX~, dW2, dW1: each GEMM call of one experts
  forward+backward, recorded and then timed alone with the same arguments, on each routing), their sums, and their speed-up next to the cost model's ratio of executed
  FLOPs (top-k / token rounding): the part of the layer where the padded tiles are spent;
* TFLOP/s with each routing's own useful FLOPs, 6*P*n*d forward and 18*P*n*d forward+backward (the
  paper's "model TFLOPS" with P = sum_e f_e), and the speed-up of token rounding over top-k: the
  ratio of times and the ratio of TFLOP/s (the paper's +16.5% forward / +9.4% forward+backward at
  E = 128 of the first shape are TFLOP/s gains measured on an H100 with SonicMoE's own kernels).

Each shape first runs both routings' experts for about a second (compilation, GPU clocks) so
that the first timed routing does not pay for it. A shape the fast layer rejects (its kernels index with 32-bit integers: E*d*2n must be < 2^31, so
E = 512 at d = 4096, n = 512 does not fit) keeps its routing and cost-model numbers and records the
error instead of times.

Before any timing, a small layer (T, d, n, E, K) = (1024, 256, 128, 16, 2) is run through the fast
and the reference ``moe_forward`` for both routings (output and dX relative error).

**Part 2, the router's share of the 7B layer** (T, d, n, E, K) = (24576, 1536, 256, 128, 8): the
fast layer's forward time (top-k) and, for the fast and the reference routing (router GEMM +
top-k + metadata, i.e. everything before the experts; and top-k + metadata from given logits), the
wall time (CUDA events around the call) and the GPU kernel time (torch profiler, the sum of the
kernels' time, as in benchmarks/routing.py), each as a fraction of the forward time, plus the
fast/reference ratio. The wall time of a lone routing call includes the host's launch gaps; inside
the layer the host issues the routing's launches ahead of the GPU while earlier kernels run, so the
kernel time is the routing's cost inside a layer.

JSON: ``benchmarks/results/token_rounding_<device>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from sonic_learn import bench
from sonic_learn.reference import grouped_gemm as ref_gg
from sonic_learn.reference import routing as ref_routing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grouped_gemm_tiles import parse_gemm_option  # noqa: E402  (same folder)
from moe import make_inputs  # noqa: E402  (same folder)
from routing import same_metadata  # noqa: E402  (same folder)

TILE_M = 128  # token-rounding tile = the fast GEMM's M tile
VARLEN_K_TILE = 64  # the fast varlen-K GEMM walks each expert's tokens in chunks of tile_k = 64
SHAPES = [(16384, 1536, 1024, E, 2) for E in (32, 64, 128)] + [(16384, 4096, 512, E, 8) for E in (128, 256, 512)]
SEVEN_B = (24576, 1536, 256, 128, 8)  # (T, d, n, E, K)
SMALL = (1024, 256, 128, 16, 2)
ROUTINGS = ("topk", "token_rounding")
PAPER = {"shape": "(16384, 1536, 1024, E=128, K=2), H100, SonicMoE kernels, router excluded",
         "fwd_tflops_gain": 0.165, "bwd_tflops_gain": 0.061, "fwd_bwd_tflops_gain": 0.094}


# ----------------------------------------------------------------------------------------------
# Cost model: the FLOPs the layer's six grouped GEMMs execute on padded tiles
# ----------------------------------------------------------------------------------------------
def layer_flops(counts: list[int], T: int, d: int, n: int) -> dict:
    """Useful and padded FLOPs of the layer's GEMMs for expert counts f_e (reference cost model).

    Forward: up-proj (P, d) x (d, 2n) and down-proj (P, n) x (n, d), varlen-M with tile_m rows.
    Backward (reduced-memory): dA' (P, d) x (d, n) and dX~ (P, 2n) x (2n, d), varlen-M; dW2 and dW1,
    varlen-K over each expert's f_e tokens in chunks of VARLEN_K_TILE. FLOPs do not depend on the
    variant (gather-fused or not), only bytes do.
    """
    fwd = [ref_gg.io_cost(T, d, 2 * n, counts, tile_m=TILE_M, variant="gather_fused"),  # up-proj
           ref_gg.io_cost(T, n, d, counts, tile_m=TILE_M, variant="gather_fused")]  # down-proj
    bwd = [ref_gg.io_cost(T, d, n, counts, tile_m=TILE_M, variant="gather_fused"),  # dA'
           ref_gg.io_cost(T, 2 * n, d, counts, tile_m=TILE_M, variant="gather_fused"),  # dX~
           ref_gg.varlen_k_cost(T, d, n, counts, tile_k=VARLEN_K_TILE),  # dW2 (as (E, d, n))
           ref_gg.varlen_k_cost(T, d, 2 * n, counts, tile_k=VARLEN_K_TILE)]  # dW1
    out = {"pairs": fwd[0].rows, "padded_rows_tile_m": fwd[0].padded_rows}
    for name, costs in (("fwd", fwd), ("fwd_bwd", fwd + bwd)):
        useful = sum(c.flops_useful for c in costs)
        padded = sum(c.flops_padded for c in costs)
        out[f"{name}_flops_useful"] = useful
        out[f"{name}_flops_padded"] = padded
        out[f"{name}_padded_flop_fraction"] = padded / (useful + padded)  # of the executed FLOPs
    return out


# ----------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------
def time_fwd_and_fwd_bwd(fn, leaves: list[torch.Tensor], gout: torch.Tensor, reps: int, warmup: int = 3) -> dict:
    """Median times of ``fn()`` (forward, autograd recording) and ``fn().backward(gout)``."""

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        fn().backward(gout)

    t_fwd = bench.measure(fn, device="cuda", warmup=warmup, reps=reps)
    t_all = bench.measure(forward_backward, device="cuda", warmup=warmup, reps=reps)
    for leaf in leaves:
        leaf.grad = None
    return {"fwd": t_fwd.as_dict(), "fwd_bwd": t_all.as_dict()}


def warm_up_gpu(routes: dict, x, w1, w2, gout, seconds: float = 1.0) -> None:
    """Run the experts' forward+backward of every routing for about ``seconds`` (compiles the kernels,
    brings the GPU clocks up) so that the first timed routing is not the one paying for it."""
    import time

    from sonic_learn.fast import moe as fast_moe

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for r in routes.values():
            scores = r.scores.detach().clone().requires_grad_(True)
            fast_moe.run_experts(x, w1, w2, dataclasses.replace(r, scores=scores),
                                 "reduced_memory").backward(gout)
        torch.cuda.synchronize()
    for t in (x, w1, w2):
        t.grad = None


def gemm_times(leaves: list[torch.Tensor], gout: torch.Tensor, r, reps: int) -> dict:
    """Median time of each grouped-GEMM call of one experts forward+backward on routing ``r``.

    The calls are recorded, not re-typed: the layer runs once through ``fast.moe.run_experts`` with
    every GEMM of its kernel set (the ``ExpertOps`` fields whose name contains "gemm") wrapped to note
    its arguments, and each noted call is then timed alone with the same arguments. So the list
    follows the layer as it is (fused epilogues, K-major weights...), whatever its current steps."""

    from sonic_learn.fast import moe as fast_moe

    x, w1, w2 = leaves[0], leaves[2], leaves[3]
    base = fast_moe.fast_ops()
    calls: list[tuple[str, str, object, tuple, dict]] = []  # (phase, op name, fn, args, kwargs)
    phase = ["fwd"]

    def recorder(name: str, fn):
        def record(*args, **kwargs):
            calls.append((phase[0], name, fn, args, kwargs))
            return fn(*args, **kwargs)
        return record

    ops = dataclasses.replace(base, **{f.name: recorder(f.name, getattr(base, f.name))
                                       for f in dataclasses.fields(base) if "gemm" in f.name})
    scores = r.scores.detach().clone().requires_grad_(True)
    out = fast_moe.run_experts(x, w1, w2, dataclasses.replace(r, scores=scores),
                               "reduced_memory", ops=ops)
    phase[0] = "bwd"
    out.backward(gout)
    del out
    for t in (x, w1, w2):
        t.grad = None
    times = {}
    for i, (ph, name, fn, args, kwargs) in enumerate(calls):
        times[f"{ph}_{i}_{name}"] = bench.measure(lambda fn=fn, a=args, k=kwargs: fn(*a, **k), device="cuda",
                                                  warmup=3, reps=reps).median_ms
    calls.clear()
    times["gemm_sum_fwd"] = sum(v for k, v in times.items() if k.startswith("fwd_"))
    times["gemm_sum_bwd"] = sum(v for k, v in times.items() if k.startswith("bwd_"))
    times["gemm_sum_fwd_bwd"] = times["gemm_sum_fwd"] + times["gemm_sum_bwd"]
    return times


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def check_small() -> dict:
    """Fast vs reference layer on a small shape, both routings: output and dX relative error."""
    from sonic_learn.fast import moe as fast_moe
    from sonic_learn.reference import moe as ref_moe

    T, d, n, E, K = SMALL
    leaves, gout = make_inputs(T, d, n, E, seed=1)
    out = {"shape": f"T={T} d={d} n={n} E={E} K={K}"}
    for routing in ROUTINGS:
        res = []
        for impl in (fast_moe.moe_forward, ref_moe.moe_forward):
            for leaf in leaves:
                leaf.grad = None
            y = impl(*leaves, K, routing=routing, tile_m=TILE_M)
            y.backward(gout)
            res.append((y.detach(), leaves[0].grad.clone()))
        out[f"{routing}_out_rel_err"] = rel_err(res[0][0], res[1][0])
        out[f"{routing}_dx_rel_err"] = rel_err(res[0][1], res[1][1])
    out["tolerance"] = 2e-2
    out["ok"] = all(v <= out["tolerance"] for k, v in out.items() if k.endswith("rel_err"))
    return out


# ----------------------------------------------------------------------------------------------
# Part 1: one shape of the token-rounding experiment
# ----------------------------------------------------------------------------------------------
def _first_rows(meta, P: int):
    """The metadata of the first P pairs/rows of a (possibly padded) routing."""
    import dataclasses

    return dataclasses.replace(meta, gather_idx=meta.gather_idx[:P], pair_of_row=meta.pair_of_row[:P],
                               row_of_pair=meta.row_of_pair[:P])


def routings_of(x, router_w, K: int) -> tuple[dict, dict]:
    """The fast routing of each kind on the layer's logits, and its agreement with the reference."""
    from sonic_learn.fast import moe as fast_moe

    T, E = x.shape[0], router_w.shape[1]
    logits = (x @ router_w).float()  # (T, E), as both layers compute it
    routes, agree = {}, {}
    for routing in ROUTINGS:
        r = fast_moe.route(x, router_w, K, routing=routing, tile_m=TILE_M)
        if routing == "topk":
            want = ref_routing.topk_routing(logits, K)
        else:
            want = ref_routing.token_rounding(logits, K, tile_m=TILE_M, mode="nearest")
        # Token rounding's fast route is padded to the host bound max_pairs (sync-free): its first P
        # entries are the reference's, P = expert_offsets[E] on the device.
        P = want.num_pairs
        agree[f"{routing}_metadata_equal"] = (
            int(r.meta.expert_offsets[-1]) == P and same_metadata(_first_rows(r.meta, P), ref_routing.build_metadata(want)))
        # Scores in pair order (the fast route returns them in the same pair order as the reference).
        same_len = r.scores.numel() >= P and (routing == "token_rounding" or r.scores.numel() == P)
        agree[f"{routing}_scores_max_abs_diff"] = (
            (r.scores.detach()[:P] - want.scores).abs().max().item() if same_len and P > 0 else (0.0 if same_len else None))
        routes[routing] = r
    return routes, agree


def bench_shape(T: int, d: int, n: int, E: int, K: int, reps: int, layer_only: bool = False,
                breakdown: bool = False, gemm: dict | None = None) -> dict:
    """One shape of Part 1. ``gemm``: {entry: GemmConfig or LayerGemms} (``--gemm``): the whole layer
    of both routings is also timed on each, as the part ``layer[<entry>]``."""
    from sonic_learn.fast import moe as fast_moe

    name = f"T{T}_d{d}_n{n}_E{E}_K{K}"
    row: dict = {"name": name, "T": T, "d": d, "n": n, "E": E, "K": K, "tile_m": TILE_M, "dtype": "bfloat16",
                 "reps": reps}
    leaves, gout = make_inputs(T, d, n, E, seed=E + K)
    x, router_w, w1, w2 = leaves
    with torch.no_grad():
        routes, agree = routings_of(x.detach(), router_w.detach(), K)
    row["agree_with_reference"] = agree

    # Padded FLOPs (cost model) on each routing's expert counts.
    cost = {}
    for routing, r in routes.items():
        counts = r.meta.expert_counts.tolist()  # (E,) f_e
        cost[routing] = {**layer_flops(counts, T, d, n), "experts_with_partial_tile": sum(c % TILE_M != 0 for c in counts)}
    for key in ("fwd", "fwd_bwd"):
        cost["removed"] = cost.get("removed", {})
        cost["removed"][f"{key}_padded_flop_fraction"] = (
            cost["topk"][f"{key}_padded_flop_fraction"] - cost["token_rounding"][f"{key}_padded_flop_fraction"])
    cost["removed"]["pairs_ratio_token_rounding_over_topk"] = cost["token_rounding"]["pairs"] / cost["topk"]["pairs"]
    row["cost_model"] = cost
    print(f"{name}: P topk {cost['topk']['pairs']} / token rounding {cost['token_rounding']['pairs']}; padded FLOPs "
          f"fwd {cost['topk']['fwd_padded_flop_fraction']:.3%} -> {cost['token_rounding']['fwd_padded_flop_fraction']:.3%},"
          f" fwd+bwd {cost['topk']['fwd_bwd_padded_flop_fraction']:.3%} -> "
          f"{cost['token_rounding']['fwd_bwd_padded_flop_fraction']:.3%}; agree {agree}", flush=True)

    integer_ok = all(v for k, v in agree.items() if k.endswith("metadata_equal"))
    scores_ok = all(v is not None and v <= 1e-6 for k, v in agree.items() if k.endswith("scores_max_abs_diff"))
    if not (integer_ok and scores_ok):
        row["ran"] = False
        row["not_timed_because"] = "the fast routing disagrees with the reference (see agree_with_reference)"
        return row
    try:  # the fast layer's own checks (e.g. 32-bit indexing) before any timing
        fast_moe.check_inputs(x, router_w, w1, w2, K, routing="token_rounding", tile_m=TILE_M)
    except ValueError as err:
        row["ran"] = False
        row["not_timed_because"] = f"fast.moe.check_inputs rejects this shape: {err}"
        print(f"  not timed: {row['not_timed_because']}", flush=True)
        return row

    warm_up_gpu(routes, x, w1, w2, gout)
    times: dict = {"experts_only": {}, "layer": {}}
    gemms: dict = {}
    for routing, r in routes.items():
        t = time_fwd_and_fwd_bwd(lambda routing=routing: fast_moe.moe_forward(*leaves, K, routing=routing,
                                                                             tile_m=TILE_M), leaves, gout, reps)
        times["layer"][f"{routing}_fwd"], times["layer"][f"{routing}_fwd_bwd"] = t["fwd"], t["fwd_bwd"]
        for entry, config in (gemm or {}).items():  # the same layer, its grouped GEMMs on other configs
            ops = fast_moe.fast_ops(config)
            t = time_fwd_and_fwd_bwd(lambda routing=routing, ops=ops: fast_moe.moe_forward(
                *leaves, K, routing=routing, tile_m=TILE_M, ops=ops), leaves, gout, reps)
            part = times.setdefault(f"layer[{entry}]", {})
            part[f"{routing}_fwd"], part[f"{routing}_fwd_bwd"] = t["fwd"], t["fwd_bwd"]
        if routing == "token_rounding":  # the same layer with the router glue as torch ops (fused_glue=False)
            t = time_fwd_and_fwd_bwd(lambda: fast_moe.moe_forward(*leaves, K, routing=routing, tile_m=TILE_M,
                                                                  fused_glue=False), leaves, gout, reps)
            times["layer"]["token_rounding_torch_glue_fwd"] = t["fwd"]
            times["layer"]["token_rounding_torch_glue_fwd_bwd"] = t["fwd_bwd"]
        if breakdown:  # where the layer's fwd+bwd device time goes, kernel by kernel (torch profiler)
            glues = {"": True, "_torch_glue": False} if routing == "token_rounding" else {"": True}
            for suffix, fused_glue in glues.items():
                def fwd_bwd(routing=routing, fused_glue=fused_glue):
                    for leaf in leaves:
                        leaf.grad = None
                    fast_moe.moe_forward(*leaves, K, routing=routing, tile_m=TILE_M, fused_glue=fused_glue).backward(gout)
                row.setdefault("layer_fwd_bwd_kernels", {})[routing + suffix] = bench.kernel_breakdown(fwd_bwd, calls=5, top=24)
            for leaf in leaves:
                leaf.grad = None
        if layer_only:
            continue
        # Experts alone on the precomputed routing: scores become a leaf (its dS is computed too).
        scores = r.scores.detach().clone().requires_grad_(True)
        r_leaf = dataclasses.replace(r, scores=scores)
        out = fast_moe.run_experts(x, w1, w2, r_leaf, "reduced_memory")
        if not torch.isfinite(out).all():
            raise RuntimeError(f"{name}: the fast experts' output is not finite ({routing})")
        del out
        t = time_fwd_and_fwd_bwd(lambda: fast_moe.run_experts(x, w1, w2, r_leaf, "reduced_memory"),
                                 [x, w1, w2, scores], gout, reps)
        times["experts_only"][f"{routing}_fwd"], times["experts_only"][f"{routing}_fwd_bwd"] = t["fwd"], t["fwd_bwd"]
        gemms[routing] = gemm_times(leaves, gout, r, reps)
        torch.cuda.empty_cache()
    row["ran"] = True
    if layer_only:
        del times["experts_only"]
    row["times_ms"] = times
    if layer_only:
        return _speedups(row, times, cost, n, d)
    row["gemm_times_ms"] = gemms
    row["gemm_speedup_token_rounding_over_topk"] = {
        f"{key}_time": gemms["topk"][f"gemm_sum_{key}"] / gemms["token_rounding"][f"gemm_sum_{key}"]
        for key in ("fwd", "bwd", "fwd_bwd")}
    # What the cost model predicts for the GEMMs if they ran at the same FLOP rate: executed FLOPs ratio.
    for key in ("fwd", "fwd_bwd"):
        executed = {rt: cost[rt][f"{key}_flops_useful"] + cost[rt][f"{key}_flops_padded"] for rt in ROUTINGS}
        row["gemm_speedup_token_rounding_over_topk"][f"{key}_cost_model_executed_flops_ratio"] = (
            executed["topk"] / executed["token_rounding"])
    print("  GEMMs only   " + " | ".join(
        f"{rt} fwd {g['gemm_sum_fwd']:.3f} bwd {g['gemm_sum_bwd']:.3f} ms" for rt, g in gemms.items())
        + "; speed-up " + ", ".join(f"{k} {v:.3f}" for k, v in row["gemm_speedup_token_rounding_over_topk"].items()),
        flush=True)

    _speedups(row, times, cost, n, d)
    del leaves, gout, routes
    torch.cuda.empty_cache()
    return row


def _speedups(row: dict, times: dict, cost: dict, n: int, d: int) -> dict:
    """TFLOP/s with each routing's useful FLOPs, and token rounding's speed-up, for every timed part."""
    tflops, speedup = {}, {}
    for part, tt in times.items():
        tflops[part], speedup[part] = {}, {}
        for routing in ROUTINGS:
            P = cost[routing]["pairs"]
            for key, flops in (("fwd", 6 * P * n * d), ("fwd_bwd", 18 * P * n * d)):
                tflops[part][f"{routing}_{key}"] = flops / (tt[f"{routing}_{key}"]["median_ms"] * 1e-3) / 1e12
        for key in ("fwd", "fwd_bwd"):
            speedup[part][f"{key}_time"] = tt[f"topk_{key}"]["median_ms"] / tt[f"token_rounding_{key}"]["median_ms"]
            speedup[part][f"{key}_tflops"] = tflops[part][f"token_rounding_{key}"] / tflops[part][f"topk_{key}"]
            other = tt.get(f"token_rounding_torch_glue_{key}")  # the layer with fused_glue=False (same P)
            if other is not None:
                P = cost["token_rounding"]["pairs"]
                flops = (6 if key == "fwd" else 18) * P * n * d
                tflops[part][f"token_rounding_torch_glue_{key}"] = flops / (other["median_ms"] * 1e-3) / 1e12
                speedup[part][f"{key}_time_torch_glue"] = tt[f"topk_{key}"]["median_ms"] / other["median_ms"]
    row["tflops"] = tflops
    row["speedup_token_rounding_over_topk"] = speedup
    for part in times:
        print(f"  {part:12s} " + " | ".join(
            f"{k} {v['median_ms']:.3f} ms {tflops[part][k]:.0f} TF/s" for k, v in times[part].items()), flush=True)
        print(f"  {part:12s} speed-up of token rounding: " + ", ".join(
            f"{k} {v:.3f}x" for k, v in speedup[part].items()), flush=True)
    return row


# ----------------------------------------------------------------------------------------------
# Part 2: routing + metadata as a fraction of the 7B forward
# ----------------------------------------------------------------------------------------------
def router_fraction(reps: int) -> dict:
    from sonic_learn.fast import moe as fast_moe
    from sonic_learn.fast import routing as fast_routing
    from sonic_learn.reference import moe as ref_moe

    T, d, n, E, K = SEVEN_B
    leaves, _ = make_inputs(T, d, n, E)
    x, router_w = (t.detach() for t in leaves[:2])
    logits = (x @ router_w).float()  # (T, E)

    def fwd():
        return fast_moe.moe_forward(*leaves, K)

    def fast_route():  # everything the layer does before the experts (top-k)
        return fast_moe.route(x, router_w, K)

    def fast_topk_meta():  # from given logits
        r = fast_routing.topk_routing(logits, K, check_finite=False)
        return fast_routing.build_metadata(r, check_ids=False)

    def ref_route():
        return ref_routing.build_metadata(ref_moe.route(x, router_w, K))

    def ref_topk_meta():
        return ref_routing.build_metadata(ref_routing.topk_routing(logits, K))

    def fast_tr_route():
        return fast_moe.route(x, router_w, K, routing="token_rounding", tile_m=TILE_M)

    def fast_tr_route_torch_glue():  # the glue between the CuTe calls as torch ops
        return fast_moe.route(x, router_w, K, routing="token_rounding", tile_m=TILE_M, fused_glue=False)

    assert same_metadata(fast_route().meta, ref_route()), "fast top-k routing metadata != reference"
    default, other = fast_tr_route(), fast_tr_route_torch_glue()
    for field in ("expert_counts", "expert_offsets", "gather_idx", "pair_of_row", "row_of_pair"):
        assert torch.equal(getattr(default.meta, field), getattr(other.meta, field)), f"fused_glue: {field} differs"
    assert torch.equal(default.scores, other.scores) and torch.equal(default.token_offsets, other.token_offsets), \
        "fused_glue: scores or token offsets differ"
    fwd_t = bench.measure(fwd, device="cuda", warmup=3, reps=reps).as_dict()
    fwd_kernel_us = bench.kernel_us(fwd)
    pipelines = {
        "fast_route_topk (router GEMM + top-k + metadata)": (fast_route, reps),
        "fast_topk_plus_metadata (from logits)": (fast_topk_meta, reps),
        "fast_route_token_rounding (router GEMM + token rounding + metadata)": (fast_tr_route, reps),
        "fast_route_token_rounding_torch_glue (the same, fused_glue=False)": (fast_tr_route_torch_glue, reps),
        "reference_route_topk (router GEMM + top-k + metadata)": (ref_route, max(3, reps // 3)),
        "reference_topk_plus_metadata (from logits)": (ref_topk_meta, max(3, reps // 3)),
    }
    fwd_ms = fwd_t["median_ms"]
    rows = {}
    for name, (fn, r) in pipelines.items():
        wall = bench.measure(fn, device="cuda", warmup=3, reps=r).as_dict()
        kern = bench.kernel_us(fn)
        rows[name] = {"wall_median_ms": wall["median_ms"], "wall_p20_ms": wall["p20_ms"], "wall_p80_ms": wall["p80_ms"],
                      "gpu_kernel_us": kern, "fraction_of_fwd_wall_by_wall": wall["median_ms"] / fwd_ms,
                      "fraction_of_fwd_wall_by_kernel_time": kern * 1e-3 / fwd_ms,
                      "fraction_of_fwd_kernel_time_by_kernel_time": kern / fwd_kernel_us}
        if name.startswith("fast_route"):  # the router steps kernel by kernel (where the time goes)
            rows[name]["kernels"] = bench.kernel_breakdown(fn, top=24)
        print(f"  {name:70s} wall {wall['median_ms'] * 1e3:8.1f} us, kernels {kern:8.1f} us, "
              f"of the forward's wall time: {rows[name]['fraction_of_fwd_wall_by_kernel_time']:.2%} (kernel time) / "
              f"{rows[name]['fraction_of_fwd_wall_by_wall']:.2%} (wall time)", flush=True)
    ratios = {}
    for what in ("route_topk (router GEMM + top-k + metadata)", "topk_plus_metadata (from logits)"):
        f, rf = rows[f"fast_{what}"], rows[f"reference_{what}"]
        ratios[f"{what}: reference / fast, wall"] = rf["wall_median_ms"] / f["wall_median_ms"]
        ratios[f"{what}: reference / fast, kernel time"] = rf["gpu_kernel_us"] / f["gpu_kernel_us"]
    print(f"  7B fast forward {fwd_ms:.3f} ms (kernels {fwd_kernel_us:.1f} us); ratios {ratios}", flush=True)
    del leaves
    torch.cuda.empty_cache()
    return {
        "T": T, "d": d, "n": n, "E": E, "K": K, "dtype": "bfloat16",
        "fast_layer_fwd_ms": fwd_t, "fast_layer_fwd_gpu_kernel_us": fwd_kernel_us,
        "routing": rows, "reference_over_fast": ratios, "target_fraction": 0.05,
        "which_fraction_counts": (
            "fraction_of_fwd_wall_by_kernel_time is the routing's cost inside the layer: there the host "
            "issues the routing's ~dozen launches while earlier GPU work runs, so the GPU spends only the "
            "kernels' time on it. The wall time of a lone call (fraction_of_fwd_wall_by_wall) adds the host's "
            "launch gaps between small kernels, which a layer mostly hides. fraction_of_fwd_kernel_time_by_"
            "kernel_time divides by the forward's own kernel time (the forward without its host gaps). "
            "Token rounding is sync-free too (buffers sized by the host bound max_pairs), so its host time is "
            "hidden the same way."),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    p.add_argument("--reps", type=int, default=30, help="reps for the first shape and the 7B part")
    p.add_argument("--big-reps", type=int, default=12, help="reps for the d = 4096 shapes")
    p.add_argument("--shapes", default="all", help="'all' or comma-separated indices into SHAPES")
    p.add_argument("--no-router-fraction", action="store_true")
    p.add_argument("--breakdown", action="store_true",
                   help="also record each shape's layer fwd+bwd kernel by kernel (torch profiler), per routing and glue")
    p.add_argument("--layer-only", action="store_true",
                   help="time only the whole layer per shape (skip the experts-alone and per-GEMM timings)")
    p.add_argument("--gemm", default=None,
                   help="comma-separated grouped-GEMM configs (grouped_gemm_tiles.py's parse_layer syntax, e.g. "
                        "dh=ws:128x256x64:auto:pf or ws:128x256x64:auto:sub32): the whole layer of both routings "
                        "is also timed on each, in the same process (the part layer[<entry>] of each shape)")
    args = p.parse_args(argv)
    gemm = parse_gemm_option(p, args.gemm)  # checked before any GPU work
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    env = bench.environment()
    print(f"device: {env['device']}", flush=True)
    small = check_small()
    print(f"small-shape check fast vs reference: {small}", flush=True)
    record = {
        "benchmark": "token_rounding", "issue": 8, "environment": env,
        "settings": {"tile_m": TILE_M, "varlen_k_tile": VARLEN_K_TILE, "rounding_mode": "nearest",
                     "backward": "reduced_memory", "dtype": "bfloat16", "reps": args.reps, "big_reps": args.big_reps,
                     "layer_only": args.layer_only, "breakdown": args.breakdown, "gemm": list(gemm)},
        "small_shape_check": small,
        "paper_h100": PAPER,
        "targets": {"router_fraction_of_7b_fwd_max": 0.05, "fwd_bwd_speedup_on_sparsest_min": 1.05},
        "flops": "useful: fwd 6*P*n*d, fwd+bwd 18*P*n*d (P of each routing); padded: cost model (io_cost, varlen_k_cost)",
        "shapes": [],
    }
    if not small["ok"]:
        record["notes"] = "the fast layer disagrees with the reference on the small shape: nothing timed"
        print("wrote", bench.write_record(record, args.out, "token_rounding"))
        return 1
    picks = range(len(SHAPES)) if args.shapes == "all" else [int(i) for i in args.shapes.split(",")]
    for i in picks:
        T, d, n, E, K = SHAPES[i]
        record["shapes"].append(bench_shape(T, d, n, E, K, args.reps if d == 1536 else args.big_reps,
                                            layer_only=args.layer_only, breakdown=args.breakdown, gemm=gemm))
        bench.write_record(record, args.out, "token_rounding")  # partial results survive a time limit
        torch.cuda.empty_cache()
    if not args.no_router_fraction:
        print("router fraction, 7B configuration:", flush=True)
        record["router_fraction_7b"] = router_fraction(args.reps)
    record["notes"] = (
        "experts_only = fast.moe.run_experts on a routing computed beforehand (the paper's comparison, router "
        "excluded); layer = fast.moe.moe_forward (router GEMM + routing + metadata + experts; token rounding "
        "is sync-free: buffers sized by the host bound max_pairs, the true P on the device). Both routings see the same inputs. The fast GEMMs run each expert's last partial "
        "128-row tile as a full tile (masked), which is the waste token rounding removes; cost_model gives it.")
    print("wrote", bench.write_record(record, args.out, "token_rounding"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
