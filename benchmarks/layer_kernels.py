"""A driver for Nsight Compute: an MoE layer's forward + backward, one NVTX range per routing and step.

Timings belong to the other benchmarks (``token_rounding.py``, ``vs_upstream.py``); this script only
runs the layer so that a profiler can look inside its kernels, for example at why one kernel is
slower under token rounding than under top-k on the same shape. One routing per process, and pick
the kernel by name and launch (the first step JIT-compiles and warms up; ``--launch-skip 1`` takes
the second step's launch)::

    ncu --kernel-name regex:DSwiGLU --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        python benchmarks/layer_kernels.py --shape 16384,1536,1024,32,2 --routings token_rounding

Each routing runs ``--steps`` forward + backward steps on the same seeded bf16 inputs, each step
inside the NVTX push/pop range ``<routing>-step<i>``. Those ranges hold the *forward's* kernels
only: autograd runs the backward on its own thread, and NVTX ranges are per thread, so
``--nvtx-include "<routing>-step1/"`` matches no backward kernel (it profiled nothing for the dH
GEMM, H100, 2026-12-07). Nsight Compute locks the clocks by default (base clock); add
``--clock-control none`` to profile at the clocks a timed run sees.

**Every kernel of one step, both layers.** ``--profile-last`` brackets the last step with
``cudaProfilerStart`` / ``cudaProfilerStop``, which hold for the whole process, autograd's thread
included: ``ncu --profile-from-start off`` then profiles exactly that step's forward and backward
kernels, whatever their names. ``--impl upstream`` runs upstream sonic-moe's layer instead of ours
(top-k routing only; the same seeded inputs, converted by ``sonic_learn.compare.upstream``), in a
process whose ``PYTHONPATH`` starts with upstream's site (its CuTe-DSL differs from ours)::

    PYTHONPATH=$SONIC_UPSTREAM_SITE:$PWD ncu --profile-from-start off --section SpeedOfLight \\
        python benchmarks/layer_kernels.py --impl upstream --shape 24576,1536,256,128,8 \\
        --routings topk --profile-last

so that our dH kernel and upstream's can be read side by side on the same shape.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

import torch

from sonic_learn.bench import layer_inputs, parse_layer_shape

ROUTINGS = ("topk", "token_rounding")
IMPLS = ("sonic_learn", "upstream")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="16384,1536,1024,32,2", help="T,d,n,E,K")
    p.add_argument("--routings", default=None, help=f"comma-separated, from {ROUTINGS} (upstream: topk)")
    p.add_argument("--steps", type=int, default=2, help="forward + backward steps per routing (>= 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", default="sonic_learn", help=f"whose layer runs, one of {IMPLS}")
    p.add_argument("--profile-last", action="store_true",
                   help="bracket the last step with cudaProfilerStart/Stop (ncu --profile-from-start off)")
    args = p.parse_args(argv)
    shape = parse_layer_shape(p, args.shape)
    if args.impl not in IMPLS:
        p.error(f"--impl: choose from {IMPLS}, got {args.impl!r}")
    allowed = ROUTINGS if args.impl == "sonic_learn" else ("topk",)  # upstream's layer routes top-k only
    text = args.routings if args.routings is not None else ",".join(allowed)
    routings = [r.strip() for r in text.split(",") if r.strip()]
    if not routings or any(r not in allowed for r in routings):
        p.error(f"--routings: choose from {allowed} for --impl {args.impl}, got {text!r}")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    args.shape, args.routings = shape, routings
    return args


def layer_step(impl: str, routing: str, inputs, k: int):
    """A function running one forward + backward of ``impl``'s layer on ``inputs`` (x, router_w, w1,
    w2, dout in sonic_learn's layout). Upstream's layer comes from ``sonic_learn/compare/upstream.py``
    run as a file, so that this process imports no module that needs our CuTe-DSL."""
    x, router_w, w1, w2, dout = inputs
    if impl == "upstream":
        here = os.path.dirname(os.path.abspath(__file__))
        upstream = runpy.run_path(os.path.join(here, "..", "sonic_learn", "compare", "upstream.py"))
        forward, leaves, _ = upstream["upstream_layer"](x, router_w, w1, w2, k)
        return lambda: upstream["run_once"](forward, leaves, dout)
    from sonic_learn.fast import moe as fast_moe

    def step():
        leaves = [t.detach().requires_grad_(True) for t in (x, router_w, w1, w2)]
        fast_moe.moe_forward(*leaves, k, routing=routing).backward(dout)

    return step


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("layer_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    K = args.shape[4]
    inputs = layer_inputs(args.shape, args.seed)
    for routing in args.routings:
        step_fn = layer_step(args.impl, routing, inputs, K)
        for step in range(args.steps):
            profiled = args.profile_last and step == args.steps - 1
            if profiled:
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
            torch.cuda.nvtx.range_push(f"{routing}-step{step}")
            step_fn()
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()
            if profiled:
                torch.cuda.profiler.stop()
        print(f"{args.impl} {routing}: {args.steps} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
