"""``python -m sonic_learn.compare``: every SonicMoE pair side by side (thin CLI over runner/tables).

    python -m sonic_learn.compare                 # quick tour: the four pairs on a small problem
    python -m sonic_learn.compare topk -E 128 -K 8
    python -m sonic_learn.compare moe --config 7B --device cuda --json out.json
    python -m sonic_learn.compare memory -K 8     # which tensors each backward mode saves
    python -m sonic_learn.compare list            # what can run on this machine, and why not

Exit status: 0 when every row agrees with its oracle, 1 when a row FAILs (or crashes), 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

from sonic_learn.compare import configs as cfg
from sonic_learn.compare.pairs import SPECS, TOUR
from sonic_learn.compare import estimate as estimate_mod
from sonic_learn.compare import records, tables
from sonic_learn.compare.registry import Setup
from sonic_learn.compare import runner
from sonic_learn.compare.runner import FAULT_ENV, Settings, fault_target, run_pair

try:  # nicer help when rich-argparse happens to be installed; plain argparse otherwise
    from rich_argparse import RawDescriptionRichHelpFormatter as _Formatter
except ImportError:  # pragma: no cover - depends on the environment
    _Formatter = argparse.RawDescriptionHelpFormatter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

SUBCOMMANDS = {
    "tour": "the four pairs (top-k, routing, grouped GEMM, backward) on one problem (the default)",
    "topk": "pair 1: radix select vs bitonic top-k (the router)",
    "routing": "pair 2: token-choice top-k vs token rounding (padding waste)",
    "grouped-gemm": "pair 3: gather + pad + GEMM vs gather-fused grouped GEMM",
    "backward": "pair 4: standard vs reduced-memory backward (time of the backward, saved bytes)",
    "moe": "the whole MoE layer, forward + backward, every implementation",
    "memory": "which tensors each backward mode saves (saved-tensor hooks vs the closed form)",
    "list": "which implementations can run here, and why the others cannot",
}


EXAMPLES = (
    ("python -m sonic_learn.compare", "the tour: the four pairs on a small problem"),
    ("python -m sonic_learn.compare topk -T 4096 -E 128 -K 8", "one pair, shapes in the paper's notation"),
    ("python -m sonic_learn.compare moe --config 7B --device cuda", "the whole layer on the paper's 7B config"),
    ("python -m sonic_learn.compare memory -K 8", "which tensors each backward mode saves"),
    ("python -m sonic_learn.compare list", "what runs here, and why the rest does not"),
    ("python -m sonic_learn.compare routing --json out.json", "every row as JSON (also --csv, --plot)"),
)


def _add_options(p: argparse.ArgumentParser, *, sub: bool) -> None:
    """Shape and run options; on subparsers their defaults are SUPPRESSed so that options given
    before the subcommand are not overwritten."""
    d = {"default": argparse.SUPPRESS} if sub else {}
    g = p.add_argument_group("problem (paper notation)")
    g.add_argument("--config", metavar="NAME", help="a named config: " + ", ".join(
        list(cfg.CONFIGS) + list(cfg.ALIASES)) + f" (default {cfg.DEFAULT_CONFIG}); shape options override it", **d)
    g.add_argument("-T", "--tokens", type=int, metavar="T", help="tokens in the microbatch", **d)
    g.add_argument("-d", "--d-model", type=int, metavar="d", help="model (hidden) dimension", **d)
    g.add_argument("-n", "--d-expert", type=int, metavar="n", help="intermediate dimension of one expert", **d)
    g.add_argument("-E", "--experts", type=int, metavar="E", help="number of experts", **d)
    g.add_argument("-K", "--top-k", type=int, metavar="K", help="experts per token", **d)
    g.add_argument("--tile-m", type=int, metavar="M", help="GEMM M tile (token rounding multiple), default 128", **d)
    r = p.add_argument_group("run")
    r.add_argument("--dtype", choices=sorted(DTYPES), help="default bfloat16 on CUDA, float32 on CPU", **d)
    r.add_argument("--device", help="cpu, cuda or cuda:N (default cuda when available, else cpu)", **d)
    r.add_argument("--reps", type=int, help="timed repetitions per row (default 5 on CPU, 20 on CUDA)", **d)
    r.add_argument("--warmup", type=int, help="untimed warm-up calls per row (default 1 on CPU, 3 on CUDA)", **d)
    r.add_argument("--seed", type=int, help="seed of the inputs (default 0)", **d)
    r.add_argument("--routing", choices=("topk", "token_rounding"), help="routing for `memory` (default topk)", **d)
    r.add_argument("--allow-large", action="store_true",
                   help="run on the CPU even when the estimated time or memory is past the safety limits "
                        f"(more than {estimate_mod.fmt_seconds(estimate_mod.CPU_MAX_SECONDS)} or half the machine's "
                        "memory)", **d)
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="write every row as JSON ('-' = stdout, instead of tables)", **d)
    o.add_argument("--csv", metavar="PATH", help="write one CSV record per row ('-' = stdout)", **d)
    o.add_argument("--plot", metavar="PATH.png", help="draw each pair's picture with matplotlib", **d)
    o.add_argument("--inject-fault", metavar="NAME",
                   help=f"TESTING ONLY: for every row whose name contains NAME, corrupt each output tensor in turn "
                        f"(floats by {runner.FAULT_MARGIN}x the tolerance, integers by one) and check that the "
                        f"row is reported as FAIL and the command exits 1; a fault the check misses makes the row "
                        f"an ERROR (same as env {FAULT_ENV}=NAME)", **d)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sonic_learn.compare",
        description="SonicMoE's ideas side by side: for each pair (classic vs SonicMoE), every implementation "
                    "on the same input -- do they agree, how long do they take, how much memory, how many "
                    "bytes and FLOPs.",
        epilog="examples:\n" + "\n".join(f"  {cmd:<{max(len(c) for c, _ in EXAMPLES)}}  # {what}"
                                          for cmd, what in EXAMPLES)
               + "\n\nexit status: 0 all rows agree, 1 a row FAILed (or raised), 2 bad arguments or a problem too "
                 "large for this CPU (see --allow-large)"
               + "\n\nupstream sonic-moe: the moe table adds its row when sonicmoe is importable here, or when "
                 "SONIC_UPSTREAM_SITE names its own site (folders holding sonicmoe, quack and their CuTe-DSL, "
                 "os.pathsep-separated); it runs in a subprocess, since it pins another CuTe-DSL version",
        formatter_class=_Formatter,
    )
    _add_options(parser, sub=False)
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_ in SUBCOMMANDS.items():
        sp = subs.add_parser(name, help=help_, description=help_, formatter_class=_Formatter)
        _add_options(sp, sub=True)
    return parser


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Turn the parsed options into (problem, setup, settings); argument errors exit with status 2."""
    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = getattr(args, "dtype", None) or ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        setup = Setup(device=device, dtype=DTYPES[dtype_name])
        problem = cfg.get_config(getattr(args, "config", None) or cfg.DEFAULT_CONFIG)
        problem = problem.with_overrides(T=getattr(args, "tokens", None), d=getattr(args, "d_model", None),
                                         n=getattr(args, "d_expert", None), E=getattr(args, "experts", None),
                                         K=getattr(args, "top_k", None), tile_m=getattr(args, "tile_m", None))
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    for opt in ("reps", "warmup"):
        v = getattr(args, opt, None)
        if v is not None and v < (1 if opt == "reps" else 0):
            parser.error(f"--{opt} must be >= {1 if opt == 'reps' else 0}, got {v}")
    _check_output_paths(args, parser)
    plot = getattr(args, "plot", None)
    if plot:
        try:
            import matplotlib  # noqa: F401, PLC0415
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'sonic_learn[plot]'")
    settings = Settings(reps=getattr(args, "reps", None), warmup=getattr(args, "warmup", None),
                        seed=getattr(args, "seed", None) or 0, fault=getattr(args, "inject_fault", None))
    return problem, setup, settings


def _check_output_paths(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every output path is writable before any work starts (exit 2 otherwise)."""
    for opt in ("json", "csv", "plot"):
        path = getattr(args, opt, None)
        if path is None:
            continue
        if path == "-":
            if opt == "plot":
                parser.error("--plot needs a file name (PATH.png), not '-'")
            continue
        if not path or os.path.isdir(path):
            parser.error(f"--{opt} {path!r} is a directory or empty; expected a file path")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            parser.error(f"--{opt} {path}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            parser.error(f"--{opt} {path}: not writable")


def _check_size(command: str, problem, setup: Setup, settings: Settings, allow_large: bool,
                parser: argparse.ArgumentParser):
    """Estimate the run from the cost model; refuse one too large for this CPU (exit 2) unless allowed."""
    reps, warmup = settings.resolved(setup.device)
    est = estimate_mod.estimate(command, problem, setup, reps, warmup)
    too_large = estimate_mod.refusal(est, setup)
    if too_large and not allow_large:
        parser.error(f"{command} on {problem.name} ({problem.shape_str()}) on the CPU is estimated at "
                     f"{est.describe()}: {too_large}. Pass --allow-large to run it anyway, or choose a smaller "
                     f"problem (e.g. --config tour, or fewer tokens with -T).")
    return est


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
        return
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


@contextlib.contextmanager
def _progress(total: int, est: estimate_mod.Estimate):
    """Progress on stderr; yields the step callback. A rich bar when stderr is a terminal; otherwise
    nothing for a short run, and one plain line per step for a long one (so logs show it is alive)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415

    console = tables.make_console(stderr=True)
    if est.seconds > estimate_mod.LONG_RUN_SECONDS:
        print(f"sonic_learn.compare: estimated {est.describe()}", file=sys.stderr, flush=True)
    if not console.is_terminal and est.seconds > estimate_mod.LONG_RUN_SECONDS:
        start, done = time.perf_counter(), [0]

        def line(msg: str) -> None:
            done[0] += 1
            print(f"[{done[0]}/{total} {time.perf_counter() - start:5.0f} s] {msg}", file=sys.stderr, flush=True)

        yield line
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                  transient=True, disable=not console.is_terminal) as prog:
        task = prog.add_task("compare", total=total)

        def step(msg: str) -> None:
            prog.update(task, description=msg, advance=1)

        yield step


def _list(setup: Setup, out, as_json: str | None, env: dict) -> int:
    entries = []
    for pair, spec in SPECS.items():
        for impl in spec.rows:
            ok, why = impl.available(setup)
            entries.append({"pair": pair, "impl": impl.name, "kind": impl.kind, "algorithm": impl.algorithm,
                            "available": ok, "why": why})
    if as_json:
        _write(as_json, records.to_json({"tool": "sonic_learn.compare", "command": "list", "environment": env,
                                         "device": str(setup.device), "implementations": entries}) + "\n")
    if as_json != "-":
        out.print(tables.list_table(entries, ascii_box=not out.is_terminal))
        out.print(f"device: {env.get('device')} ({setup.device}); " + ", ".join(
            f"{k} {v}" for k, v in env.items() if k != "device" and v))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command or "tour"
    problem, setup, settings = _resolve(args, parser)
    from sonic_learn.bench import environment  # noqa: PLC0415

    env = environment(setup.device)
    as_json, as_csv, plot = getattr(args, "json", None), getattr(args, "csv", None), getattr(args, "plot", None)
    out = tables.make_console()
    quiet = "-" in (as_json, as_csv)  # machine-readable output on stdout replaces the tables

    if command == "list":
        return _list(setup, out, as_json, env)
    est = _check_size(command, problem, setup, settings, getattr(args, "allow_large", False), parser)

    if command == "memory":
        from sonic_learn.compare.memory import memory_report  # noqa: PLC0415

        if est.seconds > estimate_mod.LONG_RUN_SECONDS:
            print(f"sonic_learn.compare: estimated {est.describe()}", file=sys.stderr, flush=True)
        report = memory_report(problem, setup, routing=getattr(args, "routing", None) or "topk", seed=settings.seed)
        if not quiet:
            out.print(tables.memory_table(report, ascii_box=not out.is_terminal))
        if as_json:
            _write(as_json, records.to_json(records.document(
                [], env, command=command, settings=_settings_dict(problem, setup, settings), memory=report)) + "\n")
        if plot:
            from sonic_learn.compare.plots import plot_results  # noqa: PLC0415

            plot_results([], problem, setup, plot, memory=report)
        return 0 if report["ok"] else 1

    keys = TOUR if command == "tour" else (command,)
    total = sum(2 * len(SPECS[k].rows) for k in keys)
    results = []
    with _progress(total, est) as step:
        settings.on_step = step
        for key in keys:
            result = run_pair(SPECS[key], SPECS[key].rows, problem, setup, settings)
            results.append(result)
            if not quiet:
                tables.print_pair(out, result, env)
    ok = all(r.ok for r in results)
    if not quiet:
        failed = [f"{r.pair}/{row.impl}" for r in results for row in r.rows if row.failed]
        out.print("all checked rows agree with their oracle" if ok else "FAILED: " + ", ".join(failed),
                  style="green" if ok else "bold red")
    doc = records.document(results, env, command=command, settings=_settings_dict(problem, setup, settings))
    if as_json:
        _write(as_json, records.to_json(doc) + "\n")
    if as_csv:
        _write(as_csv, records.to_csv(results, env))
    if plot:
        from sonic_learn.compare.plots import plot_results  # noqa: PLC0415

        plot_results(results, problem, setup, plot)
        if not quiet:
            out.print(f"plot written to {plot}")
    return 0 if ok else 1


def _settings_dict(problem, setup, settings) -> dict:
    reps, warmup = settings.resolved(setup.device)
    return {"problem": problem.as_dict(), "device": str(setup.device),
            "dtype": str(setup.dtype).replace("torch.", ""), "reps": reps, "warmup": warmup,
            "min_time_s": settings.min_time(setup.device), "seed": settings.seed,
            "inject_fault": fault_target(settings)}


if __name__ == "__main__":
    sys.exit(main())
