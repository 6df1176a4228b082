"""``python -m sonic_learn.parallel`` (this module's ``main``): watch expert parallelism work on a CPU.

It starts W gloo processes on this machine, gives each rank its share of the experts and of the
tokens, checks the expert-parallel layer's output and gradients against the single-process layer on
the same global weights, then times each step (route, dispatch, experts, combine) and counts the rows
that crossed between ranks against the cost model 2*T*K*d*(W-1)/W elements per rank.

    python -m sonic_learn.parallel                      # 2 ranks, top-k, reduced-memory backward
    python -m sonic_learn.parallel -W 4 --routing token_rounding --tile-m 8
    python -m sonic_learn.parallel --chunks 2          # dispatch/combine overlapped with the experts

CPU timings over gloo say where time goes in this toy, not what NCCL on GPUs does: see
benchmarks/expert_parallel.py (torchrun) for that.
"""

from __future__ import annotations

import argparse

import torch

from sonic_learn import contracts
from sonic_learn.parallel.launch import launch
from sonic_learn.parallel.moe import ExpertParallelMoE, alltoall_bytes, time_steps
from sonic_learn.reference.moe import moe_forward


def _worker(rank: int, world: int, args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    f64 = torch.float64
    g = torch.Generator().manual_seed(args.seed)  # the same global problem on every rank
    T, d, n, E, K = args.tokens, args.d_model, args.d_expert, args.experts, args.top_k
    router_w = torch.randn(d, E, generator=g, dtype=f64) / d**0.5
    w1 = torch.randn(E, d, 2 * n, generator=g, dtype=f64) / d**0.5
    w2 = torch.randn(E, n, d, generator=g, dtype=f64) / n**0.5
    xs = [torch.randn(T, d, generator=g, dtype=f64) for _ in range(world)]

    torch.manual_seed(args.seed)
    layer = ExpertParallelMoE(d, n, E, K, routing=args.routing, tile_m=args.tile_m, backward=args.backward,
                              chunks=args.chunks, dtype=f64)
    lo = rank * layer.experts_per_rank
    with torch.no_grad():
        layer.router_w.copy_(router_w)
        layer.w1.copy_(w1[lo:lo + layer.experts_per_rank])
        layer.w2.copy_(w2[lo:lo + layer.experts_per_rank])

    # Agreement with the single-process layer on this rank's tokens and all experts.
    x = xs[rank].clone().requires_grad_(True)
    out = layer(x)
    out.sum().backward()
    xr = xs[rank].clone().requires_grad_(True)
    ref = moe_forward(xr, router_w, w1, w2, K, routing=args.routing, tile_m=args.tile_m)
    ref.sum().backward()
    err_out = ((out - ref).abs().max() / ref.abs().max()).item()
    err_dx = ((x.grad - xr.grad).abs().max() / xr.grad.abs().max()).item()
    # (weight gradients mix every rank's tokens: tests/test_parallel.py compares those too)

    steps = time_steps(layer, xs[rank], reps=args.reps)
    return {"err_out": err_out, "err_dx": err_dx, **steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sonic_learn.parallel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-W", "--world-size", type=int, default=2, help="gloo processes (ranks), default 2")
    p.add_argument("-T", "--tokens", type=int, default=256, help="tokens per rank (T_r), default 256")
    p.add_argument("-d", "--d-model", type=int, default=64)
    p.add_argument("-n", "--d-expert", type=int, default=32)
    p.add_argument("-E", "--experts", type=int, default=8, help="experts in all (a multiple of W)")
    p.add_argument("-K", "--top-k", type=int, default=2)
    p.add_argument("--tile-m", type=int, default=16, help="token rounding's tile (default 16)")
    p.add_argument("--routing", choices=contracts.ROUTINGS, default="topk")
    p.add_argument("--backward", choices=contracts.BACKWARD_MODES, default="reduced_memory")
    p.add_argument("--chunks", type=int, default=1,
                   help="overlap communication with the experts in this many chunks of local experts (default 1)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("world_size", "tokens", "d_model", "d_expert", "experts", "top_k", "tile_m", "chunks", "reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.experts % args.world_size:
        p.error(f"--experts ({args.experts}) must be a multiple of --world-size ({args.world_size})")
    if args.top_k > args.experts:
        p.error(f"--top-k ({args.top_k}) must be <= --experts ({args.experts})")

    results = launch(_worker, args.world_size, args, timeout_s=600)
    W, T, K, d = args.world_size, args.tokens, args.top_k, args.d_model
    worst = max(max(r["err_out"], r["err_dx"]) for r in results)
    ok = worst < 1e-10
    print(f"expert parallelism on {W} gloo ranks (CPU), T_r={T} d={d} n={args.d_expert} E={args.experts} K={K}, "
          f"{args.routing}, {args.backward} backward, chunks={args.chunks}, float64")
    print(f"agreement with the single-process layer: max rel error {worst:.1e}  {'PASS' if ok else 'FAIL'}")
    print(f"{'rank':>4} {'route ms':>9} {'dispatch':>9} {'experts':>9} {'combine':>9} {'fwd+bwd':>9} "
          f"{'rows out':>9} {'rows in':>8} {'model out':>9}")
    model_rows = alltoall_bytes(T, K, d, W, 1) // (2 * d)  # rows leaving one rank under a uniform routing
    for rank, r in enumerate(results):
        print(f"{rank:>4} {r['route'] * 1e3:>9.2f} {r['dispatch'] * 1e3:>9.2f} {r['experts'] * 1e3:>9.2f} "
              f"{r['combine'] * 1e3:>9.2f} {r['fwd_bwd'] * 1e3:>9.2f} {r['rows_sent']:>9d} {r['rows_received']:>8d} "
              f"{model_rows:>9d}")
    print("(medians; each step is synchronised on its own. 'rows out' = pair rows sent to other ranks in the "
          "dispatch; the combine sends as many back)")
    return 0 if ok else 1
