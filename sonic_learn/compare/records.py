"""Machine-readable results: one JSON document per run, one CSV record per table row.

Every record carries the device and library versions (``sonic_learn.bench.environment()``), so
numbers from different machines can sit in one file without being confused.
"""

from __future__ import annotations

import csv
import io
import json
import math

from sonic_learn.compare.runner import PairResult

CSV_FIELDS = [
    "pair", "impl", "kind", "algorithm", "status", "max_rel_err", "ints_differ", "median_ms", "p20_ms", "p80_ms",
    "reps", "timer", "speedup", "throughput", "throughput_unit", "peak_memory_bytes", "saved_bytes",
    "expected_saved_bytes", "flops", "bytes_moved", "wasted_flops", "config", "T", "d", "n", "E", "K", "tile_m",
    "dtype", "device", "device_name", "torch", "sonic_learn", "nvidia-cutlass-dsl", "cuda", "python", "why",
]


def _clean(x):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def document(results: list[PairResult], env: dict, *, command: str, settings: dict, memory: dict | None = None) -> dict:
    ok = all(r.ok for r in results) and (memory is None or memory["ok"])
    versions = {k: v for k, v in env.items() if k != "device"}
    pair_dicts = []
    for r in results:
        d = r.as_dict()
        for row in d["rows"]:  # every record names its machine, so records can be merged across runs
            row["device_name"] = env.get("device")
            row["versions"] = versions
        pair_dicts.append(d)
    doc = {
        "tool": "sonic_learn.compare",
        "command": command,
        "ok": ok,
        "environment": env,
        "settings": settings,
        "pairs": pair_dicts,
    }
    if memory is not None:
        doc["memory"] = memory
    return _clean(doc)


def to_json(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=False)


def csv_records(results: list[PairResult], env: dict) -> list[dict]:
    out = []
    for res in results:
        p = res.problem
        for r in res.rows:
            a = r.agreement
            t = r.timing or {}
            c = r.cost
            errs = [v for v in (a.errors.values() if a else []) if v is not None]
            out.append({
                "pair": r.pair, "impl": r.impl, "kind": r.kind, "algorithm": r.algorithm, "status": r.status,
                "max_rel_err": max(errs) if errs else "",
                "ints_differ": sum(w for w, _ in a.mismatches.values()) if a and a.mismatches else "",
                "median_ms": t.get("median_ms", ""), "p20_ms": t.get("p20_ms", ""), "p80_ms": t.get("p80_ms", ""),
                "reps": t.get("reps", ""), "timer": t.get("timer", ""),
                "speedup": r.speedup if r.speedup is not None else "",
                "throughput": r.throughput if r.throughput is not None else "",
                "throughput_unit": r.throughput_unit,
                "peak_memory_bytes": r.peak_memory_bytes if r.peak_memory_bytes is not None else "",
                "saved_bytes": r.saved_bytes if r.saved_bytes is not None else "",
                "expected_saved_bytes": r.expected_saved_bytes if r.expected_saved_bytes is not None else "",
                "flops": c.flops if c and c.flops is not None else "",
                "bytes_moved": c.bytes_moved if c and c.bytes_moved is not None else "",
                "wasted_flops": c.wasted_flops if c and c.wasted_flops is not None else "",
                "config": p.name, "T": p.T, "d": p.d, "n": p.n, "E": p.E, "K": p.K, "tile_m": p.tile_m,
                "dtype": res.dtype, "device": res.device, "device_name": env.get("device", ""),
                "torch": env.get("torch", ""), "sonic_learn": env.get("sonic_learn", ""),
                "nvidia-cutlass-dsl": env.get("nvidia-cutlass-dsl") or "", "cuda": env.get("cuda") or "",
                "python": env.get("python", ""), "why": r.why,
            })
    return out


def to_csv(results: list[PairResult], env: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for rec in csv_records(results, env):
        w.writerow(rec)
    return buf.getvalue()
