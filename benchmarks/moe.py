"""Benchmark: the fast MoE layer (both backward modes) vs the naive PyTorch loop (issue 7).

Run on the GPU machine:  python benchmarks/moe.py [--out DIR] [--configs 7b,30b,e256] [--reps 10]

For each configuration (T, d, n, E, K), bf16, O(1)-scaled inputs, token-choice top-K routing:

* ``fast_reduced_memory`` / ``fast_standard``: ``sonic_learn.fast.moe.moe_forward`` (CuTe-DSL grouped
  GEMMs + the MoE kernels), the two backward modes;
* ``naive_loop``: ``sonic_learn.reference.moe.naive_moe_forward`` in bf16 on the GPU (a per-expert
  Python loop differentiated by autograd).

Measured per implementation: forward and forward+backward time (medians of
``sonic_learn.bench.measure``, L2 flushed before each rep; the forward runs with autograd recording,
as in training) and TFLOP/s with the useful FLOPs 6*T*K*n*d (forward) and 18*T*K*n*d
(forward+backward); the activation bytes still allocated after the forward (X counted, output not:
compare with 2Td + 4TKn + metadata); and the peak allocation above the inputs during one
forward+backward (which also holds the weight gradients). Upstream SonicMoE is compared in
``benchmarks/vs_upstream.py``, in the same run (never against numbers from notes).
JSON: benchmarks/results/moe_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from sonic_learn import bench

CONFIGS = {"7b": (24576, 1536, 256, 128, 8), "30b": (32768, 4096, 1024, 128, 8), "e256": (16384, 4096, 512, 256, 16)}


def make_inputs(T, d, n, E, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf = torch.bfloat16
    x = torch.randn(T, d, device="cuda", generator=g).to(bf)
    router_w = (torch.randn(d, E, device="cuda", generator=g) / d**0.5).to(bf)
    w1 = (torch.randn(E, d, 2 * n, device="cuda", generator=g) / d**0.5).to(bf)
    w2 = (torch.randn(E, n, d, device="cuda", generator=g) / n**0.5).to(bf)
    gout = torch.randn(T, d, device="cuda", generator=g).to(bf)
    return [t.requires_grad_(True) for t in (x, router_w, w1, w2)], gout


def bench_impl(fn, leaves, gout, k, reps, warmup):
    T, d = leaves[0].shape

    def forward():
        return fn(*leaves, k)

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        fn(*leaves, k).backward(gout)

    t_fwd = bench.measure(forward, device="cuda", warmup=warmup, reps=reps)
    t_all = bench.measure(forward_backward, device="cuda", warmup=warmup, reps=reps)
    for leaf in leaves:
        leaf.grad = None
    # Activation bytes: allocated after the forward (graph alive), minus the output, plus X.
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = forward()
    torch.cuda.synchronize()
    act = torch.cuda.memory_allocated() - before - out.numel() * out.element_size() + T * d * 2
    del out
    peak_fwd = bench.peak_memory_bytes(forward, "cuda")
    peak_all = bench.peak_memory_bytes(forward_backward, "cuda")
    for leaf in leaves:
        leaf.grad = None
    return {"fwd": t_fwd.as_dict(), "fwd_bwd": t_all.as_dict(), "activation_bytes_after_fwd": act,
            "peak_bytes_fwd": peak_fwd, "peak_bytes_fwd_bwd": peak_all}


def breakdown(leaves, gout, k, reps):
    """Median time of each step of the reduced-memory layer, run one by one (where the time goes)."""
    from sonic_learn.fast import grouped_gemm as gg
    from sonic_learn.fast import moe as fast_moe
    from sonic_learn.fast import moe_kernels as mk

    x, router_w, w1, w2 = (t.detach() for t in leaves)
    r = fast_moe.route(x, router_w, k)
    meta, scores, toff = r.meta, r.scores.detach(), r.token_offsets
    h = gg.gather_fused_grouped_gemm(x, w1, meta)
    a = mk.swiglu(h)
    y = gg.contiguous_grouped_gemm(a, w2, meta)
    dout = gout.detach()
    dap = gg.gather_fused_grouped_gemm(dout, w2, meta, transpose_w=True)
    dh, a_s, _ = mk.swiglu_backward_scaled(h, dap, scores, meta.pair_of_row)
    row_scores = scores.float()[meta.pair_of_row.long()]
    steps = {  # the layer's kernels in order; "(unfused)" rows are what the fused kernel replaces
        "fwd: router + top-k + metadata": lambda: fast_moe.route(x, router_w, k),
        "fwd: up-proj GEMM + SwiGLU epilogue": lambda: gg.gather_fused_grouped_gemm_swiglu(x, w1, meta),
        "fwd: (unfused) up-proj GEMM": lambda: gg.gather_fused_grouped_gemm(x, w1, meta),
        "fwd: (unfused) SwiGLU kernel": lambda: mk.swiglu(h),
        "fwd: down-proj GEMM": lambda: gg.contiguous_grouped_gemm(a, w2, meta),
        "fwd: gather-and-sum (weighted)": lambda: mk.gather_sum(y, scores, meta.row_of_pair, toff),
        "bwd: dH kernel (dA' GEMM + dSwiGLU/dS/A' epilogue)": lambda: gg.gather_fused_grouped_gemm_dswiglu(
            dout, w2, meta, h, row_scores),
        "bwd: (unfused) dA' GEMM": lambda: gg.gather_fused_grouped_gemm(dout, w2, meta, transpose_w=True),
        "bwd: (unfused) dSwiGLU + dS + A' kernel": lambda: mk.swiglu_backward_scaled(h, dap, scores,
                                                                                   meta.pair_of_row),
        "bwd: dW2 varlen-K GEMM (dO gathered, stored (E, n, d))": lambda: gg.grouped_gemm_varlen_k(
            dout, a_s, meta, gather_a=True, transpose_out=True),
        "bwd: dX~ GEMM (W1 K-major)": lambda: gg.contiguous_grouped_gemm(dh, w1, meta, transpose_w=True),
        "bwd: gather-and-sum (dX)": lambda: mk.gather_sum(y, None, meta.row_of_pair, toff),
        "bwd: dW1 varlen-K GEMM (X gathered)": lambda: gg.grouped_gemm_varlen_k(x, dh, meta, gather_a=True),
    }
    out = {}
    for name, fn in steps.items():
        out[name] = bench.measure(fn, device="cuda", warmup=2, reps=reps).median_ms
        print(f"    {name:56s} {out[name]:7.3f} ms", flush=True)
    return out


def max_rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    p.add_argument("--configs", default="7b,30b,e256")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--naive-reps", type=int, default=3)
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--cluster-ab", action="store_true",
                   help="also time the reduced-memory layer with clusters of 2 CTAs in the grouped GEMMs, then the "
                        "default again (A-B-A: the repeat shows the drift between rows)")
    p.add_argument("--gemm", default=None,
                   help="comma-separated grouped-GEMM configs in grouped_gemm_tiles.py's syntax "
                        "(kernel:MxNxK:stages[:flags], e.g. ws:128x256x64:3,ws:128x256x64:4:sub64); each adds a "
                        "reduced-memory row fast_reduced_memory[<config>] that calls the kernels with that config "
                        "directly, timed in the same process as the default rows (an A/B of GEMM configs). An "
                        "entry may give the layer's GEMMs their own configs by role (up, down, dh, dx, dw): "
                        "parts joined by '+', each role[/role...]=config, unnamed roles on the default, e.g. "
                        "up/dh=pingpong:128x128x64:auto+down/dx=ws:128x256x64:auto:sub32 (parse_layer)")
    p.add_argument("--rows", default="reduced,unfused,standard",
                   help="which default rows to time, from reduced,unfused,standard (the naive loop: --no-naive)")
    args = p.parse_args(argv)
    from sonic_learn.fast import grouped_gemm as gg

    from grouped_gemm_tiles import parse_gemm_option  # noqa: E402  (same folder)

    gemm = gg.DEFAULT_CONFIG
    ab = parse_gemm_option(p, args.gemm)  # {entry: a GemmConfig (every GEMM) or a LayerGemms (by role)}
    rows = set(args.rows.split(","))
    if rows - {"reduced", "unfused", "standard"}:
        p.error(f"--rows: choose from reduced, unfused, standard; got {args.rows}")
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from sonic_learn.fast import moe as fast_moe
    from sonic_learn.reference import moe as ref_moe

    env = bench.environment()

    record = {
        "benchmark": "moe", "environment": env,
        "notes": ("fast = sonic_learn.fast.moe (grouped GEMMs of sonic_learn.fast.grouped_gemm as of this run; "
                  "reduced-memory mode: SwiGLU fused into the up-projection epilogue, the dH kernel = dA' GEMM with "
                  "the dSwiGLU/dS/A' epilogue; standard mode: unfused kernels; weights read K-major, no W^T copies). "
                  "naive_loop = reference naive_moe_forward in bf16."),
        "grouped_gemm_kernel": dataclasses.asdict(gemm),
        "gemm_ab": {cfg: dataclasses.asdict(c) for cfg, c in ab.items()},
        "flops": "fwd 6*T*K*n*d, fwd+bwd 18*T*K*n*d", "configs": {},
    }
    def layer(backward: str, ops):
        return lambda *a: fast_moe.moe_forward(*a, backward=backward, ops=ops)

    ops = fast_moe.fast_ops(gemm)
    impls = {
        "fast_reduced_memory": layer("reduced_memory", ops),
        # same layer, SwiGLU and dH epilogues as separate kernels
        "fast_reduced_memory_unfused": layer("reduced_memory",
                                             fast_moe.fast_ops(gemm, fuse_swiglu=False, fuse_dh=False)),
        "fast_standard": layer("standard", ops),
    }
    keep = {"reduced": "fast_reduced_memory", "unfused": "fast_reduced_memory_unfused", "standard": "fast_standard"}
    impls = {name: fn for name, fn in impls.items() if name in {keep[r] for r in rows}}
    for cfg, c in ab.items():  # the A/B rows: the reduced-memory layer on each --gemm entry, kernels called directly
        impls[f"fast_reduced_memory[{cfg}]"] = layer("reduced_memory", fast_moe.fast_ops(c))
    if args.cluster_ab:  # the grouped GEMMs of the forward AND backward in clusters of 2, then the default again
        impls["fast_reduced_memory_cluster2"] = layer(
            "reduced_memory", fast_moe.fast_ops(dataclasses.replace(gemm, cluster_m=2)))
        impls["fast_reduced_memory_repeat"] = impls["fast_reduced_memory"]
    if not args.no_naive:
        impls["naive_loop"] = ref_moe.naive_moe_forward
    for name in args.configs.split(","):
        T, d, n, E, K = CONFIGS[name]
        leaves, gout = make_inputs(T, d, n, E)
        P = T * K
        flops_fwd, flops_all = 6 * P * n * d, 18 * P * n * d
        expected = fast_moe.expected_saved_bytes(T, d, n, E, P)["total"]
        router = T * E * 4 + P * 8  # what the router's autograd keeps: fp32 logits and int64 top-k ids
        cfg = {"T": T, "d": d, "n": n, "E": E, "K": K, "expected_reduced_memory_bytes": expected,
               "expected_reduced_memory_plus_router_bytes": expected + router,
               "two_Td_plus_4TKn_bytes": 2 * T * d + 4 * P * n, "results": {}}
        print(f"{name}: T={T} d={d} n={n} E={E} K={K}", flush=True)
        with torch.no_grad():
            fast_out = fast_moe.moe_forward(*leaves, K)
            ref_out = ref_moe.naive_moe_forward(*leaves, K) if not args.no_naive else None
        if ref_out is not None:
            cfg["fast_vs_naive_out_max_rel_err"] = max_rel_err(fast_out, ref_out)
        del fast_out, ref_out
        for impl, fn in impls.items():
            naive = impl == "naive_loop"
            r = bench_impl(fn, leaves, gout, K, args.naive_reps if naive else args.reps, 1 if naive else 3)
            r["fwd_tflops"] = flops_fwd / (r["fwd"]["median_ms"] * 1e-3) / 1e12
            r["fwd_bwd_tflops"] = flops_all / (r["fwd_bwd"]["median_ms"] * 1e-3) / 1e12
            cfg["results"][impl] = r
            print(f"  {impl:20s} fwd {r['fwd']['median_ms']:8.2f} ms {r['fwd_tflops']:6.1f} TF/s | fwd+bwd "
                  f"{r['fwd_bwd']['median_ms']:8.2f} ms {r['fwd_bwd_tflops']:6.1f} TF/s | act "
                  f"{r['activation_bytes_after_fwd'] / 1e9:.3f} GB (expected reduced {expected / 1e9:.3f}) | "
                  f"peak fwd+bwd {r['peak_bytes_fwd_bwd'] / 1e9:.2f} GB", flush=True)
            torch.cuda.empty_cache()
        if not args.no_breakdown:
            cfg["reduced_memory_breakdown_ms"] = breakdown(leaves, gout, K, args.reps)
        res = cfg["results"]
        ratios = {}
        if "naive_loop" in res and "fast_reduced_memory" in res:
            for m in ("fwd_tflops", "fwd_bwd_tflops"):
                ratios[f"fast_reduced_vs_naive_{m}"] = res["fast_reduced_memory"][m] / res["naive_loop"][m]
        cfg["ratios"] = ratios
        print("  ratios:", {k: round(v, 3) for k, v in ratios.items()}, flush=True)
        record["configs"][name] = cfg
        del leaves, gout
        torch.cuda.empty_cache()
    print("wrote", bench.write_record(record, args.out, "moe"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
