"""Where the fast MoE layer's memory and time go: what is alive at the peak of one forward + backward,
and a per-kernel device-time table.

Run on the GPU machine:  python benchmarks/moe_memory.py [--configs 7b] [--before PATH] [--profile] [--out DIR]

For each config (names of ``vs_upstream.CONFIGS``), on the seeded inputs of ``vs_upstream.py``:

* ``measure_layer`` (the accounting of vs_upstream.py: fwd / fwd+bwd time, peak over the forward,
  bytes held after it, peak over forward + backward);
* the allocator's history of one forward + backward (``torch.cuda.memory._record_memory_history``),
  replayed to the moment the bytes allocated *during* the step peak; every block alive then is
  listed with the line of sonic_learn that allocated it (grouped by that line), so the peak reads as
  "H (P, 2n) from the up-projection + dX~ (P, d) + ...";
* with ``--profile``: ``torch.profiler`` over a few forward + backward steps, device time per kernel
  and step.

``--before PATH`` loads another version of ``sonic_learn/fast/moe.py`` (e.g. ``git show
main:sonic_learn/fast/moe.py > PATH``) as a second layer, measured the same way in the same process
on the same compiled kernels: the before/after of a change to the layer's glue.
JSON: ``moe_memory_<device>.json`` (or in --out), plus ``moe_profile_<device>.txt`` with --profile.
"""

from __future__ import annotations

import argparse
import importlib.util
import linecache
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_upstream  # noqa: E402  (the configs, inputs and oracle of the side-by-side benchmark)

from sonic_learn import bench  # noqa: E402
from sonic_learn.compare import upstream as up  # noqa: E402


def load_layer(path: str | None):
    """``moe_forward`` of sonic_learn.fast.moe, or of the file at ``path`` (another version of it)."""
    if path is None:
        from sonic_learn.fast import moe

        return moe.moe_forward
    spec = importlib.util.spec_from_file_location("fast_moe_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module.moe_forward


def _origin(frames: list[dict]) -> str:
    """The innermost frame in sonic_learn (or the benchmark), as 'file:line function | source'."""
    for fr in frames:
        name = fr.get("filename", "")
        if ("sonic_learn" in name or "fast_moe_before" in name or name.endswith("moe.py")) and "compare/upstream" not in name:
            src = linecache.getline(name, fr.get("line", 0)).strip()
            return f"{os.path.basename(name)}:{fr.get('line')} {fr.get('name')} | {src[:90]}"
    for fr in frames:  # else the innermost Python frame at all
        if fr.get("filename", "").endswith(".py"):
            return f"{os.path.basename(fr['filename'])}:{fr.get('line')} {fr.get('name')}"
    return "?"


def peak_breakdown(snapshot: dict, device: int = 0) -> dict:
    """Replay the allocator trace: the largest sum of live blocks allocated during the trace, and
    those blocks grouped by the line that allocated them (largest first)."""
    trace = snapshot["device_traces"][device]
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    peak_set: dict[int, tuple[int, str]] = {}
    for ev in trace:
        action = ev["action"]
        if action == "alloc":
            live[ev["addr"]] = (ev["size"], _origin(ev.get("frames", [])))
            total += ev["size"]
            if total > peak:
                peak, peak_set = total, dict(live)
        elif action in ("free_requested", "free_completed"):
            block = live.pop(ev["addr"], None)
            if block is not None:
                total -= block[0]
    groups: dict[str, dict] = {}
    for size, origin in peak_set.values():
        g = groups.setdefault(origin, {"origin": origin, "bytes": 0, "blocks": 0})
        g["bytes"] += size
        g["blocks"] += 1
    rows = sorted(groups.values(), key=lambda g: -g["bytes"])
    return {"peak_bytes_allocated_in_step": peak, "alive_at_peak": rows}


def record_step(forward, leaves, dout) -> dict:
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    try:
        forward().backward(dout)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    for leaf in leaves:
        leaf.grad = None
    return peak_breakdown(snap, torch.cuda.current_device())


def profile_table(forward, leaves, dout, steps: int = 3) -> str:
    from torch.profiler import ProfilerActivity, profile

    def step():
        for leaf in leaves:
            leaf.grad = None
        forward().backward(dout)

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None)
        if t is None:
            t = getattr(evt, "cuda_time_total", 0)
        if t:
            rows.append((t / steps, evt.count / steps, evt.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    lines = [f"device time per forward+backward step (mean of {steps}): {total:.1f} us", f"{'us/step':>9s} {'calls':>6s}  kernel"]
    lines += [f"{t:9.1f} {c:6.1f}  {k[:140]}" for t, c, k in rows[:40]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="7b")
    p.add_argument("--before", default=None, help="path of another version of sonic_learn/fast/moe.py")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_memory needs a CUDA GPU", file=sys.stderr)
        return 2
    layers = {"after": load_layer(None)}
    if args.before:
        layers["before"] = load_layer(args.before)
    record = {"benchmark": "moe_memory", "environment": bench.environment(), "configs": {}}
    profiles = []
    for name in [c.strip().lower() for c in args.configs.split(",") if c.strip()]:
        shape = vs_upstream.CONFIGS[name]
        case = vs_upstream.make_inputs(shape, seed=args.seed)
        ref = vs_upstream.oracle(case)
        torch.cuda.empty_cache()
        per = record["configs"][name] = {"shape": dict(zip(("T", "d", "n", "E", "K"), shape))}
        for label, layer in layers.items():
            leaves = vs_upstream._leaves(case)
            forward = lambda layer=layer, leaves=leaves: layer(*leaves, case["k"])  # noqa: E731
            verdict = vs_upstream.check(up.run_once(forward, leaves, case["dout"]), ref)
            entry = per[label] = {"check": verdict}
            if not verdict["ok"]:
                entry["error"] = "outside the oracle's tolerance"
                continue
            entry.update(up.measure_layer(forward, leaves, case["dout"], reps=args.reps))
            entry["memory_history"] = record_step(forward, leaves, case["dout"])
            if args.profile and label == "after":
                profiles.append(f"== {name} {shape}\n" + profile_table(forward, leaves, case["dout"]))
            print(f"{name} {label}: fwd {entry['fwd_ms']:.3f} ms, fwd+bwd {entry['fwdbwd_ms']:.3f} ms, peak "
                  f"{entry['fwdbwd_peak_bytes'] / 1e9:.3f} GB, held after fwd {entry['held_after_fwd_bytes'] / 1e9:.3f} GB",
                  flush=True)
            for g in entry["memory_history"]["alive_at_peak"][:12]:
                print(f"    {g['bytes'] / 1e6:9.1f} MB  x{g['blocks']:<3d} {g['origin']}")
            del leaves, forward
            torch.cuda.empty_cache()
        del case, ref
        torch.cuda.empty_cache()
    path = bench.write_record(record, args.out, "moe_memory")
    print(f"wrote {path}")
    if profiles:
        slug = os.path.basename(path)[len("moe_memory_"):-len(".json")]
        prof_path = os.path.join(args.out, f"moe_profile_{slug}.txt")
        with open(prof_path, "w", encoding="utf-8") as f:
            f.write("\n\n".join(profiles) + "\n")
        print("\n\n".join(profiles))
    return 0


if __name__ == "__main__":
    sys.exit(main())
