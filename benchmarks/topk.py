"""Benchmark: fast top-k kernels vs torch.topk and the reference (issue 5).

Run on the GPU machine:  python benchmarks/topk.py [--out DIR] [--reps 30]

In one process and one run:

* T = 32768 bf16 router logits, (E, K) in {(64, 8), (128, 8), (256, 16), (512, 10)}: fast bitonic,
  fast radix, ``torch.topk``, the fused fast ``softmax_topk`` against torch's top-k + softmax, and
  the readable reference (``sonic_learn.reference.topk.radix_topk``);
* T = 262144, E = 128, K = 8: the bitonic kernel's achieved bandwidth (bytes read + written over
  its time) against ``sonic_learn.bench.copy_bandwidth_gbs``, measured in the same run;
* the host time of one call (TVM-FFI launch path), no sync per call.

Fast kernels are timed with ``check_finite=False`` (the kernel alone, as the MoE layer calls it);
the default public call, which first checks for NaN (one extra read and a device-to-host sync), is
timed too and reported separately. Times are medians of ``sonic_learn.bench.measure`` (L2 flushed
before each rep). The JSON goes to ``benchmarks/results/topk_<device>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse

import torch

from sonic_learn import bench
from sonic_learn.fast import topk as fast
from sonic_learn.reference import topk as ref

SHAPES = [(64, 8), (128, 8), (256, 16), (512, 10)]  # (E, K) at T = 32768
T_ROUTER = 32768
BANDWIDTH_SHAPE = (262144, 128, 8)  # (T, E, K)
TARGETS = {  # issue 5
    "bitonic_speedup_vs_torch_topk": 5.0,
    "radix_speedup_vs_torch_topk": 1.0,
    "bitonic_fraction_of_copy_bandwidth": 0.60,
}


def timed(fn, reps: int) -> dict:
    return bench.measure(fn, device="cuda", warmup=5, reps=reps).as_dict()


def bench_router_shape(E: int, K: int, reps: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(E * 100 + K)
    x = torch.randn(T_ROUTER, E, device="cuda", dtype=torch.bfloat16, generator=g)  # (T, E)
    # the fast results must agree with torch.topk before they are timed (random logits: few ties)
    v, i = fast.bitonic_topk(x, K)
    rv, ri = fast.radix_topk(x, K)
    tv, _ = torch.topk(x, K)
    agree = bool(torch.equal(v, tv) and torch.equal(rv, tv) and torch.equal(i, ri))
    row = {
        "T": T_ROUTER, "E": E, "K": K, "dtype": "bfloat16", "agree_with_torch_topk": agree,
        "torch_topk": timed(lambda: torch.topk(x, K), reps),
        "fast_bitonic": timed(lambda: fast.bitonic_topk(x, K, check_finite=False), reps),
        "fast_radix": timed(lambda: fast.radix_topk(x, K, check_finite=False), reps),
        "fast_bitonic_with_nan_check": timed(lambda: fast.bitonic_topk(x, K), reps),
        "torch_topk_then_softmax": timed(
            lambda: torch.softmax(torch.topk(x, K).values.float(), dim=-1), reps),
        "fast_softmax_topk": timed(lambda: fast.softmax_topk(x, K, check_finite=False), reps),
        "reference_radix": timed(lambda: ref.radix_topk(x, K), max(3, reps // 5)),
    }
    base = row["torch_topk"]["median_ms"]
    row["speedup_vs_torch_topk"] = {
        name: base / row[name]["median_ms"]
        for name in ("fast_bitonic", "fast_radix", "fast_bitonic_with_nan_check", "reference_radix")
    }
    row["fused_softmax_speedup"] = row["torch_topk_then_softmax"]["median_ms"] / row["fast_softmax_topk"]["median_ms"]
    return row


def bench_bandwidth(reps: int) -> dict:
    T, E, K = BANDWIDTH_SHAPE
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(T, E, device="cuda", dtype=torch.bfloat16, generator=g)  # (T, E)
    copy_gbs = bench.copy_bandwidth_gbs("cuda")
    t_bitonic = timed(lambda: fast.bitonic_topk(x, K, check_finite=False), reps)
    t_torch = timed(lambda: torch.topk(x, K), reps)
    t_radix = timed(lambda: fast.radix_topk(x, K, check_finite=False), reps)
    bytes_moved = T * E * 2 + T * K * (2 + 8)  # read bf16 logits; write bf16 values + int64 indices
    achieved = bytes_moved / (t_bitonic["median_ms"] * 1e-3) / 1e9
    return {
        "T": T, "E": E, "K": K, "dtype": "bfloat16", "bytes_moved": bytes_moved,
        "copy_bandwidth_gbs": copy_gbs, "fast_bitonic": t_bitonic, "fast_radix": t_radix,
        "torch_topk": t_torch, "bitonic_gbs": achieved, "bitonic_fraction_of_copy": achieved / copy_gbs,
        "bitonic_speedup_vs_torch_topk": t_torch["median_ms"] / t_bitonic["median_ms"],
    }


def host_overhead_us(calls: int = 2000) -> dict:
    """Host time per call (no sync per call): validation, allocation, TVM-FFI launch."""
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    values = torch.empty(64, 8, device="cuda", dtype=torch.bfloat16)
    indices = torch.empty(64, 8, device="cuda", dtype=torch.int64)
    kernel = fast._compiled("bitonic", torch.bfloat16, 128, 8, "values")
    return {name: bench.host_time_us(fn, calls=calls, warmup=50) for name, fn in {
        "bitonic_topk(check_finite=False)": lambda: fast.bitonic_topk(x, 8, check_finite=False),
        "compiled kernel call only (TVM-FFI)": lambda: kernel(x, values, indices),
        "argument checks only": lambda: fast._check_inputs("x", x, 8, 16, "bitonic"),
        "two torch.empty outputs only": lambda: (torch.empty(64, 8, device="cuda", dtype=torch.bfloat16),
                                                 torch.empty(64, 8, device="cuda", dtype=torch.int64)),
        "torch.topk": lambda: torch.topk(x, 8),
    }.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON file")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()

    env = bench.environment()
    print(f"device: {env['device']}", flush=True)
    shapes = []
    for E, K in SHAPES:
        row = bench_router_shape(E, K, args.reps)
        shapes.append(row)
        sp = row["speedup_vs_torch_topk"]
        print(
            f"T={T_ROUTER} E={E:4d} K={K:2d}  torch.topk {row['torch_topk']['median_ms'] * 1e3:7.1f} us | "
            f"bitonic {row['fast_bitonic']['median_ms'] * 1e3:6.1f} us ({sp['fast_bitonic']:5.1f}x) | "
            f"radix {row['fast_radix']['median_ms'] * 1e3:6.1f} us ({sp['fast_radix']:5.1f}x) | "
            f"bitonic+NaN check {row['fast_bitonic_with_nan_check']['median_ms'] * 1e3:6.1f} us | "
            f"softmax_topk {row['fast_softmax_topk']['median_ms'] * 1e3:6.1f} us vs torch "
            f"{row['torch_topk_then_softmax']['median_ms'] * 1e3:6.1f} us | "
            f"reference radix {row['reference_radix']['median_ms'] * 1e3:8.1f} us | agree={row['agree_with_torch_topk']}",
            flush=True,
        )
    bw = bench_bandwidth(args.reps)
    print(
        f"T={bw['T']} E={bw['E']} K={bw['K']}: bitonic {bw['fast_bitonic']['median_ms'] * 1e3:.1f} us = "
        f"{bw['bitonic_gbs']:.0f} GB/s = {100 * bw['bitonic_fraction_of_copy']:.1f}% of copy "
        f"({bw['copy_bandwidth_gbs']:.0f} GB/s); torch.topk {bw['torch_topk']['median_ms'] * 1e3:.1f} us; "
        f"radix {bw['fast_radix']['median_ms'] * 1e3:.1f} us",
        flush=True,
    )
    host = host_overhead_us()
    print("host time per call (us): " + ", ".join(f"{k} {v:.1f}" for k, v in host.items()), flush=True)

    record = {
        "benchmark": "topk",
        "environment": env,
        "method": "sonic_learn.bench.measure: median/p20/p80 of CUDA-event times, L2 flushed before each rep",
        "targets": TARGETS,
        "router_shapes": shapes,
        "bandwidth": bw,
        "host_overhead_us": host,
        "targets_met": {
            "bitonic_speedup_vs_torch_topk": all(r["speedup_vs_torch_topk"]["fast_bitonic"] >= 5.0 for r in shapes),
            "radix_speedup_vs_torch_topk": all(r["speedup_vs_torch_topk"]["fast_radix"] >= 1.0 for r in shapes),
            "bitonic_fraction_of_copy_bandwidth": bw["bitonic_fraction_of_copy"] >= 0.60,
        },
    }
    print(f"wrote {bench.write_record(record, args.out, 'topk')}")


if __name__ == "__main__":
    main()
