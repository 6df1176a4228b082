"""Climb the grouped-GEMM ladder: validate each step against the reference, then time it.

    python -m sonic_learn.fast.grouped_gemm [--T 8192] [--d 1024] [--n 512] [--E 64] [--K 8] [--reps 20]

For every step of ``STEPS`` (v1, sm90, ws, pingpong), on one routed bf16 problem: the gathered
up-projection (x (T, d) gathered, w (E, d, 2n)) and the weight gradient (varlen-K, dW = X_e^T B_e)
are checked against ``sonic_learn.reference.grouped_gemm`` in float64 (relative error), then timed
with ``sonic_learn.bench.measure``. A step that fails its check is not timed. Needs a Hopper GPU.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sonic_learn.fast.grouped_gemm", description=__doc__.splitlines()[0])
    for name, default in (("T", 8192), ("d", 1024), ("n", 512), ("E", 64), ("K", 8), ("reps", 20), ("seed", 0)):
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args(argv)
    from sonic_learn.fast._cute import fast_available

    ok, why = fast_available()
    if not ok:
        print(f"the grouped-GEMM ladder needs a Hopper GPU and CuTe-DSL: {why}", file=sys.stderr)
        return 2
    from sonic_learn import bench
    from sonic_learn.fast import grouped_gemm as fast
    from sonic_learn.reference import grouped_gemm as ref
    from sonic_learn.reference.routing import build_metadata, topk_routing

    g = torch.Generator(device="cuda").manual_seed(args.seed)
    T, d, n, E, K = args.T, args.d, args.n, args.E, args.K
    x = torch.randn(T, d, device="cuda", generator=g).to(torch.bfloat16)  # (T, d)
    w = (torch.randn(E, d, 2 * n, device="cuda", generator=g) / d**0.5).to(torch.bfloat16)  # (E, d, 2n)
    meta = build_metadata(topk_routing(torch.randn(T, E, device="cuda", generator=g), K))
    P = meta.gather_idx.numel()
    b = torch.randn(P, 2 * n, device="cuda", generator=g).to(torch.bfloat16)  # (P, 2n) grouped rows
    want_up = ref.gather_fused_grouped_gemm(x.double(), w.double(), meta)  # (P, 2n)
    want_dw = ref.grouped_gemm_varlen_k(x.double(), b.double(), meta, gather_a=True)  # (E, d, 2n)
    flops = 2 * P * d * 2 * n
    tol = 1e-2  # bf16 inputs and output, fp32 accumulation

    def rel_err(got, want):
        return ((got.double() - want).norm() / want.norm()).item()

    print(f"T={T} d={d} 2n={2 * n} E={E} K={K} (P={P}); check vs reference in float64 (tolerance {tol}), then time")
    print(f"{'step':9s} {'up err':>9s} {'up ms':>8s} {'TFLOP/s':>8s} {'dW err':>9s} {'dW ms':>8s}  what it adds")
    for step, adds in fast.STEPS.items():
        config = fast.GemmConfig(kernel=step)
        up = lambda: fast.gather_fused_grouped_gemm(x, w, meta, config=config)  # noqa: E731
        dw = lambda: fast.grouped_gemm_varlen_k(x, b, meta, gather_a=True, config=config)  # noqa: E731
        errs = (rel_err(up(), want_up), rel_err(dw(), want_dw))
        if max(errs) > tol:
            print(f"{step:9s} {errs[0]:9.2e} {'-':>8s} {'-':>8s} {errs[1]:9.2e} {'-':>8s}  FAILED its check: not timed")
            continue
        t_up = bench.measure(up, device="cuda", reps=args.reps).median_ms
        t_dw = bench.measure(dw, device="cuda", reps=args.reps).median_ms
        print(f"{step:9s} {errs[0]:9.2e} {t_up:8.3f} {flops / t_up / 1e9:8.1f} {errs[1]:9.2e} {t_dw:8.3f}  {adds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
