"""Run ``python -m sonic_learn.compare`` at the shapes the issues name, in ONE process (one device
run), and keep the CLI's own JSON: ``benchmarks/results/cli_<command>_<device>.json``.

Every ratio quoted from these files comes from rows measured in the same run (the CLI times the
baseline row next to the others). For top-k it also measures the device-to-device copy rate in the
same run, so the bitonic kernel's bandwidth can be put against it.

    python benchmarks/cli_suite.py --out benchmarks/results [--only topk,moe]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from sonic_learn import bench
from sonic_learn.compare.__main__ import main as compare_main

# The issues' configurations, spelled out (the CLI's "--config 30B" alias is the paper's 30B-n256
# granularity row, not the (32768, 4096, 1024, 128, 8) layer the issues benchmark).
_7B = ["-T", "24576", "-d", "1536", "-n", "256", "-E", "128", "-K", "8"]
_30B = ["-T", "32768", "-d", "4096", "-n", "1024", "-E", "128", "-K", "8"]
_E256 = ["-T", "16384", "-d", "4096", "-n", "512", "-E", "256", "-K", "16"]
SUITE = {
    "topk": [["-T", "32768", "-E", str(e), "-K", str(k)] for e, k in ((64, 8), (128, 8), (256, 16), (512, 10))]
    + [["-T", "262144", "-E", "128", "-K", "8"]],
    "routing": [_7B],
    "grouped-gemm": [_7B, _30B],
    "moe": [[*_7B, "--reps", "10"], [*_30B, "--reps", "5"], [*_E256, "--reps", "5"]],
}


def run_command(command: str, shapes: list[list[str]], dtype: str) -> tuple[list[dict], int]:
    runs, worst = [], 0
    for shape in shapes:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "out.json")
            rc = compare_main([command, *shape, "--dtype", dtype, "--json", path])
            worst = max(worst, rc)
            with open(path) as f:
                record = json.load(f)
        record["argv"] = [command, *shape, "--dtype", dtype]
        record["exit_code"] = rc
        runs.append(record)
    return runs, worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--only", default=",".join(SUITE), help="comma-separated subset of " + ",".join(SUITE))
    p.add_argument("--dtype", default="bf16")
    args = p.parse_args()
    env = bench.environment()
    worst = 0
    for command in args.only.split(","):
        runs, rc = run_command(command, SUITE[command], args.dtype)
        worst = max(worst, rc)
        doc = {"suite": "benchmarks/cli_suite.py", "command": command, "environment": env, "runs": runs}
        if command == "topk" and torch.cuda.is_available():
            doc["copy_bandwidth_gbs"] = bench.copy_bandwidth_gbs("cuda")
        path = bench.write_record(doc, args.out, f"cli_{command.replace('-', '_')}")
        print(f"wrote {path} (worst exit code {rc})", flush=True)
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
