"""Benchmark: fast grouped GEMMs vs torch on the SonicMoE 7B / 30B expert shapes (issue 6).

Run on the GPU machine:  python benchmarks/grouped_gemm.py [--out DIR] [--shapes 7b-up,30b-down] [--reps 20]

For each configuration (T, d, n, E, K) and each projection (up: GEMM K = d, N = 2n; down: K = n,
N = d) with uniform-random top-K routing (M = T*K grouped rows), in one process and one run:

* ``contiguous``: varlen-M grouped GEMM, A already grouped (M, K);
* ``gather_fused``: rows of x (T, K) gathered inside the GEMM;
* ``naive``: torch.index_select gather + the contiguous grouped GEMM;
* ``varlen_k``: the weight-gradient GEMM out[e] = a[rows]^T b[rows], a gathered (T, K), b (M, N),
  out (E, K, N): same FLOPs as the forward GEMM;
* ``torch_matmul``: one dense (M, K) @ (K, N) torch.matmul, the tensor-core ceiling for the same FLOPs;
* ``torch_grouped_mm``: ``torch._grouped_mm`` on the contiguous problem, where the build has it.

Times are medians of ``sonic_learn.bench.measure`` (L2 flushed before each rep); TFLOP/s use the
useful FLOPs 2*M*K*N. The JSON goes to benchmarks/results/grouped_gemm_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from sonic_learn import bench
from sonic_learn.fast import grouped_gemm as fast
from sonic_learn.reference.routing import Routing, build_metadata

CONFIGS = {"7b": (24576, 1536, 256, 128, 8), "30b": (32768, 4096, 1024, 128, 8)}  # (T, d, n, E, K)
TARGETS = {  # issue 6
    "contiguous_vs_torch_matmul": 0.85,
    "gather_fused_vs_contiguous": 0.90,
    "varlen_k_vs_torch_matmul": 0.80,
    "contiguous_vs_torch_grouped_mm": 1.0,
}


def uniform_routing(T: int, E: int, K: int, gen: torch.Generator):
    device = gen.device
    experts = torch.rand(T, E, generator=gen, device=device).topk(K, dim=1).indices  # (T, K)
    routing = Routing(
        token_idx=torch.arange(T, device=device, dtype=torch.int32).repeat_interleave(K),
        expert_idx=experts.flatten().to(torch.int32),
        scores=torch.full((T * K,), 1.0 / K, device=device),
        num_tokens=T,
        num_experts=E,
    )
    return build_metadata(routing)


def make_inputs(T: int, Kg: int, Ng: int, E: int, topk: int, device: str = "cuda"):
    """One GEMM shape in bf16, seed 0: (meta, x (T, K), w (E, K, N), a = x gathered (M, K), b (M, N))."""
    gen = torch.Generator(device=device).manual_seed(0)
    meta = uniform_routing(T, E, topk, gen)
    M = meta.gather_idx.numel()
    dt = torch.bfloat16
    x = torch.randn(T, Kg, device=device, dtype=dt, generator=gen)  # (T, K)
    w = torch.randn(E, Kg, Ng, device=device, dtype=dt, generator=gen) / Kg**0.5  # (E, K, N)
    a = torch.index_select(x, 0, meta.gather_idx)  # (M, K) grouped copy for the contiguous variant
    b = torch.randn(M, Ng, device=device, dtype=dt, generator=gen)  # (M, N)
    return meta, x, w, a, b


def fp32_reference(a: torch.Tensor, w: torch.Tensor, meta) -> torch.Tensor:
    """(M, N) fp32 per-expert matmul of the grouped rows a: the spot check's oracle."""
    ref = torch.empty(a.shape[0], w.shape[2], device=a.device, dtype=torch.float32)
    offs = meta.expert_offsets.tolist()
    for e in range(w.shape[0]):
        rows = slice(offs[e], offs[e + 1])
        ref[rows] = a[rows].float() @ w[e].float()
    return ref


def bench_shape(name: str, T: int, Kg: int, Ng: int, E: int, topk: int, reps: int,
                config: fast.GemmConfig | None = None) -> dict:
    meta, x, w, a, b = make_inputs(T, Kg, Ng, E, topk)
    M = a.shape[0]
    dt = torch.bfloat16
    flops = 2 * M * Kg * Ng
    impls = {
        "contiguous": lambda: fast.contiguous_grouped_gemm(a, w, meta, config=config),
        "gather_fused": lambda: fast.gather_fused_grouped_gemm(x, w, meta, config=config),
        "naive": lambda: fast.naive_grouped_gemm(x, w, meta, config=config),
        "varlen_k": lambda: fast.grouped_gemm_varlen_k(x, b, meta, gather_a=True, config=config),
        "torch_matmul": lambda: torch.matmul(a, w[0]),
    }
    notes = {}
    if hasattr(torch, "_grouped_mm"):
        offs = meta.expert_offsets[1:].contiguous()  # (E,) cumulative row ends, int32

        def grouped_mm():
            return torch._grouped_mm(a, w, offs=offs, out_dtype=dt)

        try:
            grouped_mm()
            impls["torch_grouped_mm"] = grouped_mm
        except Exception as exc:  # record why, do not fail the benchmark
            notes["torch_grouped_mm"] = f"unavailable: {type(exc).__name__}: {exc}"[:300]
    else:
        notes["torch_grouped_mm"] = "torch._grouped_mm not in this torch build"

    # Correctness spot check of the fast paths against torch on the same inputs, before timing.
    ref = fp32_reference(a, w, meta)
    scale = ref.abs().max().item()
    check = {k: (impls[k]().float() - ref).abs().max().item() / scale for k in ("contiguous", "gather_fused", "naive")}

    results = {}
    for key, fn in impls.items():
        t = bench.measure(fn, device="cuda", warmup=10, reps=reps)
        results[key] = {**t.as_dict(), "tflops": flops / (t.median_ms * 1e-3) / 1e12}
        print(f"  {name:10s} {key:18s} {t.median_ms:8.3f} ms  {results[key]['tflops']:7.1f} TFLOP/s", flush=True)

    def ratio(num, den):
        if num in results and den in results:
            return results[num]["tflops"] / results[den]["tflops"]
        return None

    ratios = {
        "contiguous_vs_torch_matmul": ratio("contiguous", "torch_matmul"),
        "gather_fused_vs_contiguous": ratio("gather_fused", "contiguous"),
        "gather_fused_vs_naive": ratio("gather_fused", "naive"),
        "varlen_k_vs_torch_matmul": ratio("varlen_k", "torch_matmul"),
        "contiguous_vs_torch_grouped_mm": ratio("contiguous", "torch_grouped_mm"),
    }
    return {
        "shape": {"T": T, "K_gemm": Kg, "N_gemm": Ng, "E": E, "topk": topk, "M": M, "flops": flops},
        "results": results,
        "ratios": ratios,
        "max_rel_err_vs_fp32": check,
        "notes": notes,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    p.add_argument("--shapes", default="7b-up,7b-down,30b-up,30b-down")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--config", default=None, help="kernel:tile_m x tile_n x tile_k[:stages], e.g. ws:128x256x64")
    args = p.parse_args(argv)
    config = fast.DEFAULT_CONFIG
    if args.config:
        kernel, tile, *stages = args.config.split(":")
        config = fast.GemmConfig(kernel=kernel, tile=tuple(int(v) for v in tile.split("x")),
                                 stages=int(stages[0]) if stages else None)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    record = {"benchmark": "grouped_gemm", "environment": bench.environment(), "kernel_config": dataclasses.asdict(config),
              "targets": TARGETS, "shapes": {}}
    for shape in args.shapes.split(","):
        cfg, proj = shape.split("-")
        T, d, n, E, K = CONFIGS[cfg]
        Kg, Ng = (d, 2 * n) if proj == "up" else (n, d)
        print(f"{shape}: T={T} E={E} K={K} GEMM K={Kg} N={Ng}", flush=True)
        record["shapes"][shape] = bench_shape(shape, T, Kg, Ng, E, K, args.reps, config)
        torch.cuda.empty_cache()
    print("wrote", bench.write_record(record, args.out, "grouped_gemm"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
