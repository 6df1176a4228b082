"""Profile target for Nsight Compute: one fast grouped GEMM and cuBLAS on the same FLOPs (issue 6).

    ncu --clock-control none --profile-from-start off --section SpeedOfLight ... \
        python benchmarks/profile_grouped_gemm.py --shapes 7b-up,7b-down [--variant contiguous] [--cluster-m 2]

Everything is built and warmed up first (compilation, caches, routing metadata); only then the
profiler range opens (cudaProfilerStart) and each shape runs exactly once: the fast kernel (after
its small tile-offset kernels) and one dense ``torch.matmul`` of the same M x K x N, so the report
compares the two kernels side by side on the same counters (tensor-pipe activity, L2 and DRAM
throughput, warp stall reasons). Without ncu it just runs; it prints nothing to compare.
"""

from __future__ import annotations

import argparse

import torch

from sonic_learn.fast import grouped_gemm as fast

from grouped_gemm import CONFIGS, make_inputs  # noqa: E402  (same folder)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="7b-up,7b-down")
    p.add_argument("--variant", default="contiguous", choices=("contiguous", "gather_fused", "varlen_k"))
    p.add_argument("--cluster-m", type=int, default=None, help="1 or 2 (default: the library's choice)")
    args = p.parse_args()
    config = fast.GemmConfig(cluster_m=args.cluster_m)
    runs = []
    for shape in args.shapes.split(","):
        cfg, proj = shape.split("-")
        T, d, n, E, K = CONFIGS[cfg]
        Kg, Ng = (d, 2 * n) if proj == "up" else (n, d)
        meta, x, w, a, b = make_inputs(T, Kg, Ng, E, K)
        # (default arguments bind this shape's tensors: the calls run after the loop)
        fn = {"contiguous": lambda a=a, w=w, meta=meta: fast.contiguous_grouped_gemm(a, w, meta, config=config),
              "gather_fused": lambda x=x, w=w, meta=meta: fast.gather_fused_grouped_gemm(x, w, meta, config=config),
              "varlen_k": lambda x=x, b=b, meta=meta: fast.grouped_gemm_varlen_k(x, b, meta, config=config)}[args.variant]
        dense = lambda a=a, w=w: torch.matmul(a, w[0])  # noqa: E731
        for _ in range(3):  # compile + warm up
            fn()
            dense()
        runs.append((shape, fn, dense))
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for shape, fn, dense in runs:
        torch.cuda.nvtx.range_push(f"{shape} fast {args.variant}")
        fn()
        torch.cuda.nvtx.range_pop()
        torch.cuda.nvtx.range_push(f"{shape} torch.matmul")
        dense()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled:", ", ".join(s for s, _, _ in runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
