"""A driver for Nsight Compute: the fast MoE layer's forward + backward, one NVTX range per routing and step.

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
"""

from __future__ import annotations

import argparse
import sys

import torch

from sonic_learn.bench import layer_inputs, parse_layer_shape

ROUTINGS = ("topk", "token_rounding")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="16384,1536,1024,32,2", help="T,d,n,E,K")
    p.add_argument("--routings", default=",".join(ROUTINGS), help=f"comma-separated, from {ROUTINGS}")
    p.add_argument("--steps", type=int, default=2, help="forward + backward steps per routing (>= 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    shape = parse_layer_shape(p, args.shape)
    routings = [r.strip() for r in args.routings.split(",") if r.strip()]
    if not routings or any(r not in ROUTINGS for r in routings):
        p.error(f"--routings: choose from {ROUTINGS}, got {args.routings!r}")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    args.shape, args.routings = shape, routings
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("layer_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    from sonic_learn.fast import moe as fast_moe

    K = args.shape[4]
    x, router_w, w1, w2, dout = layer_inputs(args.shape, args.seed)
    for routing in args.routings:
        for step in range(args.steps):
            leaves = [t.detach().requires_grad_(True) for t in (x, router_w, w1, w2)]
            torch.cuda.nvtx.range_push(f"{routing}-step{step}")
            fast_moe.moe_forward(*leaves, K, routing=routing).backward(dout)
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()
        print(f"{routing}: {args.steps} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
