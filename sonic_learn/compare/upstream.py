"""Upstream sonic-moe, run in its own process beside sonic_learn, on the same inputs, timer and accounting.

Upstream ``sonic-moe`` pins another CuTe-DSL version than sonic_learn, so the two cannot share a
Python process. This module runs upstream's layer in a subprocess whose ``PYTHONPATH`` starts with
upstream's own site (named by the ``SONIC_UPSTREAM_SITE`` environment variable, or passed
explicitly), followed by this checkout, so the subprocess times upstream with *this* project's
timer (``sonic_learn.bench.measure``) and memory accounting (``measure_layer`` below).

The protocol is files in a temporary folder:

1. the parent writes one ``torch.save`` file per problem: the inputs in sonic_learn's layout
   (``x`` (T, d), ``router_w`` (d, E), ``w1`` (E, d, 2n) gate/up interleaved, ``w2`` (E, n, d), the
   output gradient ``dout`` (T, d)) and ``k``;
2. the worker (``python -c`` running this file with ``--worker``) converts them to upstream's
   layout, runs one forward + backward and saves the output and the four gradients *in
   sonic_learn's layout* (so the parent checks them against its own oracle), then times the layer;
3. it appends one JSON line per problem (timings, memory, versions, or the error) to a results
   file, so a run stopped by a time limit still returns the problems it finished.

The compare CLI's ``upstream sonic-moe`` row goes through ``available(setup)`` and ``build(case)``
below: ``build`` runs the worker once on the row's inputs and returns a ``MeasuredRun``, a callable
that gives back upstream's outputs (for the CLI's own oracle check) and carries the timing and peak
memory the worker measured with the same ``bench.measure``; the CLI's runner uses those instead
of timing the callable in this process.

``SONIC_UPSTREAM_SITE`` is a ``PYTHONPATH``-style list (``os.pathsep``-separated) of the folders
that hold upstream's packages: ``sonicmoe``, ``quack`` and its CuTe-DSL. Without it, a ``sonicmoe``
installed in this Python environment is used (its own folder on ``PYTHONPATH``, still in its own
process). Upstream's first call JIT-compiles its kernels for minutes; later shapes take seconds to a
minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

SITE_ENV = "SONIC_UPSTREAM_SITE"
RESULT_FIELDS = ("fwd_ms", "fwdbwd_ms", "fwd_peak_bytes", "held_after_fwd_bytes", "fwdbwd_peak_bytes")
GRAD_NAMES = ("dx", "drouter_w", "dw1", "dw2")


# ----------------------------------------------------------------------------------------------
# The measurement both processes share
# ----------------------------------------------------------------------------------------------
def measure_layer(forward: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], dout: torch.Tensor, *,
                  warmup: int = 3, reps: int = 20, kernels: bool = False) -> dict:
    """Time and account one MoE layer: ``forward()`` -> out (T, d) with autograd recording.

    Returns ``fwd_ms`` and ``fwdbwd_ms`` (medians of ``sonic_learn.bench.measure``, L2 flushed,
    device time only) with their ``*_p20_ms`` / ``*_p80_ms``, and three memory figures in bytes
    above what was allocated before the call (inputs, weights and ``dout`` are not counted):
    ``fwd_peak_bytes`` (peak over one forward), ``held_after_fwd_bytes`` (still allocated after the
    forward while its output and graph are alive: the activations the backward will read, plus the
    output) and ``fwdbwd_peak_bytes`` (peak over one forward + backward, which also holds the
    weight gradients). ``kernels``: also ``kernels_fwdbwd``, where one forward + backward spends its
    device time, kernel by kernel (``bench.kernel_breakdown``, the 24 largest; profiled after the
    timing, so the profiler does not slow the timed calls).
    """
    from sonic_learn import bench

    def clear_grads() -> None:
        for leaf in leaves:
            leaf.grad = None

    def forward_backward() -> None:
        clear_grads()
        forward().backward(dout)

    t_fwd = bench.measure(forward, device=dout.device, warmup=warmup, reps=reps)
    t_all = bench.measure(forward_backward, device=dout.device, warmup=warmup, reps=reps)
    clear_grads()
    fwd_peak = bench.peak_memory_bytes(forward, dout.device)
    sync = torch.cuda.synchronize if dout.device.type == "cuda" else (lambda *_: None)
    sync()
    before = torch.cuda.memory_allocated() if dout.device.type == "cuda" else 0
    out = forward()
    sync()
    held = (torch.cuda.memory_allocated() - before) if dout.device.type == "cuda" else None
    del out
    fwdbwd_peak = bench.peak_memory_bytes(forward_backward, dout.device)
    clear_grads()
    record = {
        "fwd_ms": t_fwd.median_ms, "fwd_p20_ms": t_fwd.p20_ms, "fwd_p80_ms": t_fwd.p80_ms,
        "fwdbwd_ms": t_all.median_ms, "fwdbwd_p20_ms": t_all.p20_ms, "fwdbwd_p80_ms": t_all.p80_ms,
        "fwd_peak_bytes": fwd_peak, "held_after_fwd_bytes": held, "fwdbwd_peak_bytes": fwdbwd_peak,
        "timer": t_all.timer, "reps": t_all.reps,
    }
    if kernels:
        record["kernels_fwdbwd"] = bench.kernel_breakdown(forward_backward, calls=5, top=24, device=dout.device)
        clear_grads()
    return record


def run_once(forward: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], dout: torch.Tensor) -> dict:
    """One forward + backward: {"out", "dx", "drouter_w", "dw1", "dw2"} (leaves in sonic_learn's order)."""
    for leaf in leaves:
        leaf.grad = None
    out = forward()
    out.backward(dout)
    result = {"out": out.detach(), **{n: leaf.grad for n, leaf in zip(GRAD_NAMES, leaves)}}
    for leaf in leaves:
        leaf.grad = None
    return result


# ----------------------------------------------------------------------------------------------
# Upstream's layer, in upstream's process
# ----------------------------------------------------------------------------------------------
def upstream_layer(x: torch.Tensor, router_w: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, k: int):
    """Upstream's leaves and forward for inputs in sonic_learn's layout (call in upstream's process).

    Upstream takes F.linear-style weights: router (E, d), w1 (E, 2n, d) with the same gate/up
    interleaving as ours, w2 (E, d, n), each passed as an (.., .., E) view. Returns
    ``(forward, leaves, to_ours)`` where ``to_ours(grads)`` maps upstream's leaf gradients back to
    sonic_learn's layout, in the order of ``GRAD_NAMES``.
    """
    from sonicmoe.enums import ActivationType
    from sonicmoe.functional import moe_TC_softmax_topk_layer

    xs = x.detach().clone().requires_grad_(True)  # (T, d)
    rw = router_w.detach().t().contiguous().requires_grad_(True)  # (E, d)
    w1u = w1.detach().transpose(1, 2).contiguous().requires_grad_(True)  # (E, 2n, d)
    w2u = w2.detach().transpose(1, 2).contiguous().requires_grad_(True)  # (E, d, n)

    stream = torch.cuda.current_stream().cuda_stream if x.is_cuda else 0

    def forward() -> torch.Tensor:
        return moe_TC_softmax_topk_layer(xs, rw, w1u.permute(1, 2, 0), None, w2u.permute(1, 2, 0), None, k,
                                         stream, ActivationType.SWIGLU, False)[0]

    def to_ours(grads: dict) -> dict:
        return {**grads, "drouter_w": grads["drouter_w"].t(), "dw1": grads["dw1"].transpose(1, 2),
                "dw2": grads["dw2"].transpose(1, 2)}

    return forward, [xs, rw, w1u, w2u], to_ours


def _versions() -> dict:
    import importlib.metadata as md

    found = {}
    for name in ("sonic-moe", "quack-kernels", "nvidia-cutlass-dsl"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


def worker(paths: Sequence[str], results: str, *, warmup: int, reps: int, time_it: bool = True,
           kernels: bool = False) -> None:
    """Upstream's side: for each input file, one checked run (outputs saved beside it), then timing
    (and with ``kernels`` the per-kernel table, ``measure_layer``)."""
    from sonic_learn import bench

    versions = _versions()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for path in paths:
        record: dict = {"inputs": path, "versions": versions, "device": bench.environment()["device"]}
        try:
            case = torch.load(path, map_location=device)
            forward, leaves, to_ours = upstream_layer(case["x"], case["router_w"], case["w1"], case["w2"], case["k"])
            dout = case["dout"]
            del case
            outputs = to_ours(run_once(forward, leaves, dout))
            torch.save({n: t.cpu() for n, t in outputs.items()}, outputs_path(path))
            del outputs
            if time_it:
                record.update(measure_layer(forward, leaves, dout, warmup=warmup, reps=reps, kernels=kernels))
            record["timer_env"] = bench.environment()["timer"]
            del forward, leaves, dout
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
            record["error"] = f"{type(exc).__name__}: {exc}"
        if device == "cuda":
            torch.cuda.empty_cache()
        with open(results, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def outputs_path(inputs_path: str) -> str:
    return inputs_path[: -len(".pt")] + ".out.pt" if inputs_path.endswith(".pt") else inputs_path + ".out"


# ----------------------------------------------------------------------------------------------
# The parent's side
# ----------------------------------------------------------------------------------------------
def upstream_site(site: str | None = None) -> tuple[str | None, str]:
    """Upstream's site: ``site`` if given, else ``$SONIC_UPSTREAM_SITE``, else the folder of a
    ``sonicmoe`` installed in this environment; (None, reason) when there is none."""
    site = site if site is not None else os.environ.get(SITE_ENV)
    if not site:
        import importlib.util

        spec = importlib.util.find_spec("sonicmoe")
        if spec is None or not spec.submodule_search_locations:
            return None, (f"upstream sonic-moe is not installed here and {SITE_ENV} names no site "
                          "(set it to the folder(s) holding sonicmoe and its CuTe-DSL)")
        site = os.path.dirname(list(spec.submodule_search_locations)[0])
    folders = [p for p in site.split(os.pathsep) if p]
    if not any(os.path.isdir(os.path.join(p, "sonicmoe")) for p in folders):
        return None, f"{SITE_ENV}={site!r} holds no 'sonicmoe' package folder"
    return site, ""


def checkout_root() -> str:
    """The folder that holds the ``sonic_learn`` package this process imported."""
    import sonic_learn

    return os.path.dirname(os.path.dirname(os.path.abspath(sonic_learn.__file__)))


@dataclass
class UpstreamRun:
    """What the worker sent back for one problem: its record, and the outputs (sonic_learn's layout)."""

    record: dict
    outputs: dict | None = field(default=None, repr=False)

    @property
    def error(self) -> str | None:
        return self.record.get("error")


def worker_command(paths: Sequence[str], results: str, *, warmup: int, reps: int, time_it: bool,
                   kernels: bool = False) -> list[str]:
    """The subprocess's command line: this file run as ``__main__`` from a neutral folder."""
    script = os.path.abspath(__file__)
    argv = [script, "--worker", "--results", results, "--warmup", str(warmup), "--reps", str(reps)]
    if not time_it:
        argv.append("--no-time")
    if kernels:
        argv.append("--kernels")
    code = f"import runpy, sys; sys.argv = {argv + list(paths)!r}; runpy.run_path({script!r}, run_name='__main__')"
    return [sys.executable, "-c", code]


def worker_env(site: str) -> dict:
    """The subprocess's environment: upstream's site first, then this checkout (for the shared timer)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([site, checkout_root()])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_upstream(cases: Sequence[dict], *, site: str | None = None, warmup: int = 3, reps: int = 20,
                 time_it: bool = True, timeout_s: float | None = None, workdir: str | None = None,
                 kernels: bool = False) -> tuple[list[UpstreamRun | None], str]:
    """Run upstream's layer on each case (dict of CPU or CUDA tensors ``x, router_w, w1, w2, dout`` in
    sonic_learn's layout, and ``k``) in one subprocess. Returns one ``UpstreamRun`` per case (None
    for a case the worker did not reach before ``timeout_s``) and a note ('' or why runs are missing).
    ``kernels``: each timed record also gets upstream's per-kernel table (``measure_layer``).
    Raises ``ValueError`` when no upstream site is named."""
    site, why = upstream_site(site)
    if site is None:
        raise ValueError(why)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        paths = []
        for i, case in enumerate(cases):
            path = os.path.join(tmp, f"case{i}.pt")
            torch.save({n: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for n, v in case.items()}, path)
            paths.append(path)
        results = os.path.join(tmp, "results.jsonl")
        note = ""
        try:
            proc = subprocess.run(worker_command(paths, results, warmup=warmup, reps=reps, time_it=time_it,
                                                 kernels=kernels),
                                  env=worker_env(site), cwd=tmp, timeout=timeout_s, capture_output=True, text=True)
            if proc.returncode != 0:
                note = f"upstream worker exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}"
        except subprocess.TimeoutExpired:
            note = f"upstream worker stopped after {timeout_s} s"
        return collect(paths, results), note


def collect(paths: Sequence[str], results: str) -> list[UpstreamRun | None]:
    """Read the worker's JSON lines and saved outputs back, in the order of ``paths``."""
    records = {}
    if os.path.exists(results):
        with open(results, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    records[rec["inputs"]] = rec
    runs: list[UpstreamRun | None] = []
    for path in paths:
        rec = records.get(path)
        if rec is None:
            runs.append(None)
            continue
        out_path = outputs_path(path)
        outputs = torch.load(out_path) if os.path.exists(out_path) and "error" not in rec else None
        runs.append(UpstreamRun(rec, outputs))
    return runs


# ----------------------------------------------------------------------------------------------
# The compare CLI's upstream row
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    """Timing and peak memory measured in the worker's process (what the CLI reports for the row)."""

    timing: object  # sonic_learn.bench.Timing of one forward + backward
    peak_memory_bytes: int | None


class MeasuredRun:
    """The CLI row's callable: returns upstream's (out, dx, drouter_w, dw1, dw2) as computed in the
    worker, and carries ``measured`` so that the runner reports the worker's numbers instead of
    timing this call."""

    def __init__(self, outputs: tuple, measured: Measured):
        self._outputs = outputs
        self.measured = measured

    def __call__(self) -> tuple:
        return self._outputs


def available(setup) -> tuple[bool, str]:
    """Whether the upstream row can run on ``setup`` (a compare ``Setup``), and why not."""
    if setup.device.type != "cuda":
        return False, "upstream sonic-moe runs on CUDA (Hopper/Blackwell) only"
    if setup.dtype not in (torch.bfloat16, torch.float16):
        return False, "upstream sonic-moe supports bf16/fp16 only"
    site, why = upstream_site()
    return (site is not None), why


def build(case, *, warmup: int = 3, reps: int = 20) -> MeasuredRun:
    """Run upstream's layer on a compare ``Case`` of the moe pair (x, router_w, w1, w2, dout and
    ``problem.K``) in the worker: one checked forward + backward, then the timing of forward + backward."""
    from sonic_learn import bench

    inputs = {"x": case.x, "router_w": case.router_w, "w1": case.w1, "w2": case.w2, "dout": case.dout,
              "k": case.problem.K}
    runs, note = run_upstream([inputs], warmup=warmup, reps=reps)
    run = runs[0]
    if run is None:
        raise RuntimeError(note or "the upstream worker returned nothing")
    if run.error:
        raise RuntimeError(f"upstream sonic-moe failed in its process: {run.error}")
    rec = run.record
    device = case.x.device
    outputs = tuple(run.outputs[n].to(device) for n in ("out", *GRAD_NAMES))
    timing = bench.Timing(median_ms=rec["fwdbwd_ms"], p20_ms=rec["fwdbwd_p20_ms"], p80_ms=rec["fwdbwd_p80_ms"],
                          reps=rec["reps"], timer=rec["timer"] + " (in upstream's process)")
    return MeasuredRun(outputs, Measured(timing, rec.get("fwdbwd_peak_bytes")))


def _main(argv: Sequence[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description="upstream sonic-moe worker (run by run_upstream, not by hand)")
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-time", action="store_true")
    p.add_argument("--kernels", action="store_true")
    p.add_argument("inputs", nargs="+")
    args = p.parse_args(argv)
    worker(args.inputs, args.results, warmup=args.warmup, reps=args.reps, time_it=not args.no_time,
           kernels=args.kernels)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
