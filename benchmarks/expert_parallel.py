"""Benchmark: the expert-parallel MoE layer, weak scaling over the GPUs of one node.

Launch with torchrun, one process per GPU (NVLink multicast stays off)::

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 8 benchmarks/expert_parallel.py --configs 7b,30b

Tokens per GPU are fixed at the paper's 7B / 30B configurations (T, d, n, E, K); the E experts are
split over the W ranks of the run (so W must divide E). Each rank times, with device synchronisation
between steps (``sonic_learn.parallel.time_steps``), route / dispatch / experts / combine of the
forward and the whole forward+backward (medians), and counts the rows it sent, against the cost model
``alltoall_bytes`` (2*T*K*d*(W-1)/W elements each way). Run it once per W (e.g. --nproc-per-node
1, 2, 4, 8); each run adds its rows to benchmarks/results/expert_parallel_<device>.json (or --out).
``--backend reference`` runs the PyTorch experts (any GPU), ``fast`` (default) the CuTe-DSL kernels.

``--chunks 1,2,4`` times the plain layer (chunks=1) and the overlapped one (the dispatch and combine
split into that many chunks of local experts, communication in flight while earlier chunks' experts
run) side by side in the same run on the same GPUs, one row per chunk count. With chunks > 1 the
step split changes meaning: ``experts`` is the whole overlapped section, ``dispatch`` and ``combine``
only what does not overlap (see ``sonic_learn.parallel.StepTimes``); compare ``fwd_bwd``. At world
size 1 the all-to-all is a local copy, so chunking can only show its overhead; the layer's default
stays chunks=1 until a run on several GPUs shows a win::

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 1 benchmarks/expert_parallel.py --chunks 1,2,4
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from sonic_learn import bench
from sonic_learn.parallel import ExpertParallelMoE, alltoall_bytes, time_steps

CONFIGS = {"7b": (24576, 1536, 256, 128, 8), "30b": (32768, 4096, 1024, 128, 8)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="7b,30b")
    p.add_argument("--backend", choices=("fast", "reference"), default="fast")
    p.add_argument("--backward", choices=("reduced_memory", "standard"), default="reduced_memory")
    p.add_argument("--chunks", default="1", help="comma list of chunk counts, one row each (default 1)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/expert_parallel_<device>.json)")
    args = p.parse_args()
    try:
        chunk_counts = [int(c) for c in args.chunks.split(",")]
    except ValueError:
        p.error(f"--chunks must be a comma list of ints, got {args.chunks!r}")
    if min(chunk_counts) < 1:
        p.error(f"--chunks must all be >= 1, got {args.chunks!r}")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    W, rank = dist.get_world_size(), dist.get_rank()
    dev = torch.device("cuda", local_rank)
    rows = []
    for name in args.configs.split(","):
        T, d, n, E, K = CONFIGS[name]
        if E % W:
            raise SystemExit(f"{name}: E={E} is not divisible by the world size {W}")
        torch.manual_seed(0)  # the replicated router starts equal on every rank
        layer = ExpertParallelMoE(d, n, E, K, backward=args.backward, backend=args.backend, device=dev,
                                  dtype=torch.bfloat16)
        g = torch.Generator(device=dev).manual_seed(1 + rank)  # each rank its own tokens
        x = torch.randn(T, d, device=dev, generator=g).to(torch.bfloat16)
        for chunks in chunk_counts:  # the same layer, weights and tokens for every chunk count
            layer.chunks = chunks
            steps = time_steps(layer, x, reps=args.reps, warmup=3)
            everyone = [None] * W
            dist.all_gather_object(everyone, steps)
            model_rows = alltoall_bytes(T, K, d, W, 1) // (2 * d)
            rows.append({"config": name, "shape": {"T_per_rank": T, "d": d, "n": n, "E": E, "K": K},
                         "world_size": W, "backend": args.backend, "backward": args.backward, "chunks": chunks,
                         "chunks_used": min(chunks, E // W), "per_rank": everyone,
                         "model_rows_out_per_rank": model_rows,
                         "model_bytes_out_per_rank": alltoall_bytes(T, K, d, W, 2)})
            if rank == 0:
                med = {k: sorted(s[k] for s in everyone)[W // 2] for k in ("route", "dispatch", "experts",
                                                                              "combine", "fwd_bwd")}
                print(f"{name} W={W} chunks={chunks}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in med.items())
                      + f"; rows out {everyone[0]['rows_sent']} (model {model_rows})", flush=True)
    if rank == 0:
        env = bench.environment(dev)
        out = Path(args.out or f"benchmarks/results/expert_parallel_{env['device'].replace(' ', '_')}.json")
        doc = json.loads(out.read_text()) if out.exists() else {"benchmark": "expert_parallel", "runs": []}
        doc["runs"] = [r for r in doc["runs"] if r["world_size"] != W] + [{"environment": env, "rows": rows,
                                                                          "world_size": W}]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
        print(f"wrote {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
