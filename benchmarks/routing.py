"""Benchmark: fast routing (CuTe-DSL metadata, boundary-only token rounding kernels) vs the reference (issue 8).

Run on the GPU machine:  python benchmarks/routing.py [--out DIR] [--reps 30]

In one process and one run, for bf16 router logits at the 7B configuration (T = 24576, E = 128,
K = 8, tile_m = 128) and the router shapes of the paper's token-rounding experiment
(T = 16384: (E, K) = (128, 2) and (512, 8)):

* metadata alone: ``fast.build_metadata(check_ids=False)`` vs the reference ``build_metadata``
  (which validates ids: one sync) and a lean torch-op baseline (bincount, cumsum, stable argsort,
  inverse scatter, gather; no checks);
* routing + metadata, top-k: fast ``topk_routing`` + ``build_metadata`` (no sync) vs the
  reference pair and a torch-op baseline (``torch.topk``, softmax, flatten, the lean metadata);
* routing + metadata, token rounding (nearest; up and down at 7B): fast (the two CuTe
  token-rounding kernels) vs the previous fast design timed in the same run (steps 2-4 as torch
  ops: ``torch.topk`` with k < tile_m over (E, T) keys, cumsum, where; ``selection="torch"``) vs
  the reference;
* the host time of one fast ``build_metadata`` call (no sync per call);
* the GPU kernel time per call (torch profiler: the sum of kernel times), for fast and reference,
  and at the 7B shape the per-kernel breakdown of one fast token-rounding call.
  The wall times above include host launch gaps (the GPU idles while Python issues ~50 small torch
  ops); inside a layer the host runs ahead, so the kernel time is the cost to compare with the
  layer's forward time.

Every fast result is checked equal to the reference on the same input before it is timed. Times
are medians of ``sonic_learn.bench.measure`` (L2 flushed before each rep). The fraction of a layer's
forward time needs the fast layer; the absolute times here are what to divide. JSON:
``benchmarks/results/routing_<device>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse

import torch

from sonic_learn import bench
from sonic_learn.fast import routing as fast
from sonic_learn.reference import routing as ref

SEVEN_B = (24576, 128, 8)  # (T, E, K)
TR_SHAPES = [(16384, 128, 2), (16384, 512, 8)]
TILE_M = 128


def timed(fn, reps: int) -> dict:
    return bench.measure(fn, device="cuda", warmup=3, reps=reps).as_dict()


def torch_ops_metadata(r: ref.Routing):
    """The classic metadata with plain torch ops and no validation (the torch-op baseline)."""
    e = r.expert_idx.long()  # (P,)
    counts = torch.bincount(e, minlength=r.num_experts)  # (E,)
    offsets = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))  # (E+1,)
    pair_of_row = torch.argsort(e, stable=True)  # (P,)
    row_of_pair = torch.empty_like(pair_of_row)
    row_of_pair[pair_of_row] = torch.arange(e.numel(), device=e.device)
    return counts, offsets, r.token_idx[pair_of_row], pair_of_row, row_of_pair


def torch_ops_topk_routing(logits: torch.Tensor, k: int):
    """torch.topk + softmax over the picks + flatten (ties not guaranteed to the lower expert)."""
    vals, experts = torch.topk(logits, k, dim=-1)  # (T, K)
    scores = torch.softmax(vals.float(), dim=-1)  # (T, K)
    T = logits.shape[0]
    token_idx = torch.arange(T, device=logits.device, dtype=torch.int32).repeat_interleave(k)
    return ref.Routing(token_idx, experts.reshape(-1).int(), scores.reshape(-1), T, logits.shape[1])


def same_metadata(a: ref.RoutingMetadata, b: ref.RoutingMetadata) -> bool:
    return all(torch.equal(getattr(a, n), getattr(b, n)) for n in
               ("expert_counts", "expert_offsets", "gather_idx", "pair_of_row", "row_of_pair"))


def same_routing(a: ref.Routing, b: ref.Routing) -> bool:
    return all(torch.equal(getattr(a, n), getattr(b, n)) for n in ("token_idx", "expert_idx", "scores"))


def bench_shape(T: int, E: int, K: int, reps: int, modes: tuple[str, ...]) -> dict:
    g = torch.Generator(device="cuda").manual_seed(T + E + K)
    logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16, generator=g)  # (T, E)
    tc = ref.topk_routing(logits, K)
    row: dict = {"T": T, "E": E, "K": K, "tile_m": TILE_M, "dtype": "bfloat16", "pairs": tc.num_pairs}

    # Metadata alone.
    row["agree"] = {
        "topk_routing": same_routing(fast.topk_routing(logits, K), tc),
        "build_metadata": same_metadata(fast.build_metadata(tc), ref.build_metadata(tc)),
    }
    row["metadata"] = {
        "fast": timed(lambda: fast.build_metadata(tc, check_ids=False), reps),
        "fast_with_id_check": timed(lambda: fast.build_metadata(tc), reps),
        "torch_ops": timed(lambda: torch_ops_metadata(tc), reps),
        "reference": timed(lambda: ref.build_metadata(tc), reps),
    }

    # Top-k routing + metadata.
    def fast_topk():
        r = fast.topk_routing(logits, K, check_finite=False)
        return fast.build_metadata(r, check_ids=False)

    def torch_topk():
        return torch_ops_metadata(torch_ops_topk_routing(logits, K))

    row["topk_routing_plus_metadata"] = {
        "fast": timed(fast_topk, reps),
        "torch_ops": timed(torch_topk, reps),
        "reference": timed(lambda: ref.build_metadata(ref.topk_routing(logits, K)), max(3, reps // 3)),
        "fast_routing_only": timed(lambda: fast.topk_routing(logits, K, check_finite=False), reps),
    }

    # Token rounding + metadata.
    row["token_rounding_plus_metadata"] = {}
    for mode in modes:
        want = ref.token_rounding(logits, K, tile_m=TILE_M, mode=mode)
        got = fast.token_rounding(logits, K, tile_m=TILE_M, mode=mode)
        row["agree"][f"token_rounding_{mode}"] = same_routing(got, want) and same_metadata(
            fast.build_metadata(got), ref.build_metadata(want))

        def fast_tr(mode=mode):
            r = fast.token_rounding(logits, K, tile_m=TILE_M, mode=mode, check_finite=False)
            return fast.build_metadata(r, check_ids=False)

        def torch_selection_tr(mode=mode):
            r = fast.token_rounding(logits, K, tile_m=TILE_M, mode=mode, check_finite=False, selection="torch")
            return fast.build_metadata(r, check_ids=False)

        def ref_tr(mode=mode):
            return ref.build_metadata(ref.token_rounding(logits, K, tile_m=TILE_M, mode=mode))

        row["agree"][f"token_rounding_{mode}_torch_selection"] = same_routing(
            fast.token_rounding(logits, K, tile_m=TILE_M, mode=mode, check_finite=False, selection="torch"), want)
        row["token_rounding_plus_metadata"][mode] = {
            "fast": timed(fast_tr, reps),
            "fast_torch_selection": timed(torch_selection_tr, reps),
            "reference": timed(ref_tr, max(3, reps // 3)),
            "fast_routing_only": timed(
                lambda mode=mode: fast.token_rounding(logits, K, tile_m=TILE_M, mode=mode, check_finite=False), reps),
        }

    row["gpu_kernel_us_per_call"] = {
        "metadata_fast": bench.kernel_us(lambda: fast.build_metadata(tc, check_ids=False)),
        "metadata_reference": bench.kernel_us(lambda: ref.build_metadata(tc)),
        "topk_routing_plus_metadata_fast": bench.kernel_us(fast_topk),
        "topk_routing_plus_metadata_reference": bench.kernel_us(lambda: ref.build_metadata(ref.topk_routing(logits, K))),
        "token_rounding_nearest_plus_metadata_fast": bench.kernel_us(lambda: fast.build_metadata(
            fast.token_rounding(logits, K, tile_m=TILE_M, check_finite=False), check_ids=False)),
        "token_rounding_nearest_plus_metadata_fast_torch_selection": bench.kernel_us(lambda: fast.build_metadata(
            fast.token_rounding(logits, K, tile_m=TILE_M, mode="nearest", check_finite=False, selection="torch"),
            check_ids=False)),
        "token_rounding_nearest_plus_metadata_reference": bench.kernel_us(lambda: ref.build_metadata(
            ref.token_rounding(logits, K, tile_m=TILE_M))),
    }
    if (T, E, K) == SEVEN_B:
        row["fast_token_rounding_nearest_kernels"] = bench.kernel_breakdown(
            lambda: fast.token_rounding(logits, K, tile_m=TILE_M, check_finite=False))

    def ratio(d: dict) -> dict:
        return {n: d[n]["median_ms"] / d["fast"]["median_ms"] for n in d if n != "fast" and "median_ms" in d[n]}

    row["speedup_of_fast"] = {
        "metadata": ratio(row["metadata"]),
        "topk_routing_plus_metadata": ratio(row["topk_routing_plus_metadata"]),
        **{f"token_rounding_{m}_plus_metadata": ratio(v) for m, v in row["token_rounding_plus_metadata"].items()},
    }
    return row


def host_overhead_us(calls: int = 500) -> float:
    """Host time of one fast build_metadata call (validation, allocation, TVM-FFI launch), no sync."""
    logits = torch.randn(4096, 128, device="cuda", dtype=torch.bfloat16)
    r = fast.topk_routing(logits, 8)
    return bench.host_time_us(lambda: fast.build_metadata(r, check_ids=False), calls=calls, warmup=20)


def _ms(d: dict) -> str:
    return f"{d['median_ms'] * 1e3:8.1f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON file")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    env = bench.environment()
    print(f"device: {env['device']}", flush=True)
    rows = []
    for (T, E, K), modes in [(SEVEN_B, ("nearest", "up", "down"))] + [(s, ("nearest",)) for s in TR_SHAPES]:
        row = bench_shape(T, E, K, args.reps, modes)
        rows.append(row)
        print(f"T={T} E={E} K={K} agree={row['agree']}", flush=True)
        for what in ("metadata", "topk_routing_plus_metadata"):
            print(f"  {what:28s} " + " | ".join(f"{n} {_ms(v)}" for n, v in row[what].items()), flush=True)
        for mode, d in row["token_rounding_plus_metadata"].items():
            print(f"  token_rounding[{mode:7s}]+meta  " + " | ".join(f"{n} {_ms(v)}" for n, v in d.items()), flush=True)
        print("  GPU kernel time per call (us): " + ", ".join(
            f"{n} {v:.1f}" for n, v in row["gpu_kernel_us_per_call"].items()), flush=True)
        for k in row.get("fast_token_rounding_nearest_kernels", []):
            print(f"    {k['us_per_call']:7.1f} us x{k['launches_per_call']:.0f}  {k['kernel']}", flush=True)
    host = host_overhead_us()
    print(f"host time of one fast build_metadata call: {host:.1f} us", flush=True)
    record = {
        "benchmark": "routing",
        "issue": 8,
        "environment": env,
        "reps": args.reps,
        "shapes": rows,
        "host_us_per_build_metadata_call": host,
        "notes": (
            "fast = CuTe-DSL metadata kernels (+ CuTe bitonic top-k); token rounding: CuTe histogram "
            "for f_e, then two CuTe kernels (BoundaryKeysKernel: (E, T) key rows with the pick bit and "
            "the (T, E) pick mask; BoundarySelectKernel: rounding rule + per-expert radix select of "
            "the |delta_e| boundary tokens + tie rule), the scores by the reference's torch formula, "
            "torch nonzero (the one host sync) and gathers. fast_torch_selection = the previous "
            "design (steps 2-4 as torch ops: torch.topk with k < tile_m over (E, T) keys, cumsum), "
            "timed in the same run. Reference = "
            "sonic_learn.reference.routing (validates ids: one sync). Fraction of the layer "
            "forward: divide these absolute times (gpu_kernel_us_per_call when the host runs ahead) by "
            "the fast layer's forward time."
        ),
    }
    print(f"wrote {bench.write_record(record, args.out, 'routing')}", flush=True)


if __name__ == "__main__":
    main()
