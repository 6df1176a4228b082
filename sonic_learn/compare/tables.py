"""Rich tables for the compare tool (and for tutorials that want the same picture).

One table per pair, one row per implementation; the caption under it says what was compared with
what, on which device, in which dtype, with which timer and how many repetitions. ``NO_COLOR`` and
output that is not a terminal give plain text (rich turns styles off; we switch to ASCII borders).
"""

from __future__ import annotations

import math
import os
import sys

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sonic_learn.compare.runner import TOLERANCE_RULE, PairResult, Row

STATUS_STYLE = {"PASS": "bold green", "FAIL": "bold red", "ERROR": "bold red", "n/a": "dim"}
KIND_STYLE = {"baseline": "cyan", "torch": "cyan", "reference": "", "fast": "magenta", "upstream": "yellow"}


def make_console(file=None, *, stderr: bool = False) -> Console:
    """A console that prints plain text when NO_COLOR is set or the output is not a terminal."""
    file = file if file is not None else (sys.stderr if stderr else sys.stdout)
    probe = Console(file=file)
    if probe.is_terminal:
        return probe
    width = int(os.environ.get("COLUMNS", "0") or 0) or 160
    return Console(file=file, width=width, no_color=True, highlight=False, emoji=False, soft_wrap=False)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def fmt_count(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".strip()


def fmt_time(timing: dict | None) -> str:
    if not timing:
        return "-"
    m, lo, hi = timing["median_ms"], timing["p20_ms"], timing["p80_ms"]
    digits = 3 if m < 10 else 1
    return f"{m:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def fmt_speedup(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.3f}x"


def fmt_num(x: float | None, spec: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def _memory_cell(r: Row) -> str:
    if r.saved_bytes is not None:
        closed = fmt_bytes(r.expected_saved_bytes) if r.expected_saved_bytes is not None else "-"
        return f"{fmt_bytes(r.saved_bytes)} / {closed}"
    return fmt_bytes(r.peak_memory_bytes)


def pair_table(result: PairResult, env: dict | None = None, *, ascii_box: bool = False) -> Table:
    """The rich Table of one pair."""
    layer = result.pair in ("backward", "moe")
    unit = next((r.throughput_unit for r in result.rows if r.throughput_unit), "")
    table = Table(
        title=f"{result.title}  [{result.problem.name}: {result.problem.shape_str()}, {result.dtype}]",
        box=box.ASCII if ascii_box else box.SIMPLE_HEAVY,
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("implementation", no_wrap=True)
    table.add_column("kind")
    table.add_column("check", no_wrap=True)
    table.add_column("agreement", max_width=44)
    table.add_column("ms median [p20-p80]", justify="right", no_wrap=True)
    table.add_column("speed-up", justify="right")
    table.add_column(unit or "rate", justify="right")
    table.add_column("saved / closed form" if layer else "peak mem", justify="right")
    table.add_column("bytes moved", justify="right")
    table.add_column("wasted FLOP", justify="right")
    for r in result.rows:
        if r.status == "n/a":
            agreement = Text(r.why, style="dim")
        elif r.status == "ERROR":
            agreement = Text(r.why, style="red")
        else:
            agreement = Text(r.agreement.summary() if r.agreement else "-")
            if r.status == "FAIL":
                agreement.append("  (not timed)", style="red")
        cost = r.cost
        table.add_row(
            Text(r.impl, style=KIND_STYLE.get(r.kind, "")),
            r.kind,
            Text(r.status, style=STATUS_STYLE.get(r.status, "")),
            agreement,
            fmt_time(r.timing),
            fmt_speedup(r.speedup),
            fmt_num(r.throughput, ".1f" if unit == "GB/s" else ".3f"),
            _memory_cell(r),
            fmt_bytes(cost.bytes_moved) if cost else "-",
            fmt_count(cost.wasted_flops) if cost and cost.wasted_flops is not None else "-",
        )
    table.caption = caption(result, env)
    return table


def caption(result: PairResult, env: dict | None) -> str:
    lines = [
        f"oracle: {result.oracle}; pass rule: {TOLERANCE_RULE}",
        f"time: {result.timed}; timer {result.timer}, median of >= {result.reps} runs"
        + (f" (and >= {result.min_time_s * 1e3:.0f} ms measured)" if result.min_time_s else "")
        + f" after {result.warmup} warm-up"
        + ("; L2 flushed before each run, device work timed (host held ahead)" if result.timer == "cuda-events" else "")
        + "; FAIL rows are not timed",
    ]
    if result.pair in ("backward", "moe"):
        lines.append("saved: activation bytes autograd holds for backward, whole layer (router included, weights "
                     "excluded), measured with saved-tensor hooks; closed form: the experts' cached tensors "
                     "(expected_saved_bytes), see the `memory` command")
    lines.extend(result.notes)
    if env:
        versions = ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("device", "timer") and v)
        lines.append(f"device: {env.get('device')} ({result.device}); {versions}")
    return "\n".join(lines)


def print_pair(console: Console, result: PairResult, env: dict | None = None) -> None:
    console.print(pair_table(result, env, ascii_box=not console.is_terminal))
    console.print()


def list_table(entries: list[dict], *, ascii_box: bool = False) -> Table:
    """What exists on this machine: one row per (pair, implementation), with the reason when not."""
    table = Table(title="implementations on this machine", box=box.ASCII if ascii_box else box.SIMPLE_HEAVY,
                  title_justify="left")
    for col in ("pair", "implementation", "kind", "algorithm", "available", "why not"):
        table.add_column(col)
    for e in entries:
        table.add_row(e["pair"], Text(e["impl"], style=KIND_STYLE.get(e["kind"], "")), e["kind"], e["algorithm"],
                      Text("yes", style="green") if e["available"] else Text("no", style="dim"), e["why"])
    return table


def memory_table(report: dict, *, ascii_box: bool = False) -> Table:
    """Saved tensors per backward mode: measured (hooks) vs the closed form, term by term."""
    table = Table(
        title=f"saved activations per backward mode  [{report['problem']}, {report['dtype']}, P={report['pairs']}]",
        box=box.ASCII if ascii_box else box.SIMPLE_HEAVY, title_justify="left", caption_justify="left",
    )
    for col, just in (("backward", "left"), ("tensor (closed-form term)", "left"), ("measured shape", "left"),
                      ("dtype", "left"), ("measured", "right"), ("closed form", "right"), ("check", "left")):
        table.add_column(col, justify=just)
    for mode in report["modes"]:
        for t in mode["tensors"]:
            ok = t["measured_bytes"] == t["expected_bytes"]
            table.add_row(mode["backward"], t["name"], str(t["shape"]) if t["shape"] else "-", t["dtype"] or "-",
                          fmt_bytes(t["measured_bytes"]), fmt_bytes(t["expected_bytes"]),
                          Text("ok" if ok else "MISMATCH", style="green" if ok else "bold red"))
        ok = mode["measured_total"] == mode["expected_total"]
        table.add_row(Text(mode["backward"], style="bold"), Text("total", style="bold"), "", "",
                      Text(fmt_bytes(mode["measured_total"]), style="bold"),
                      Text(fmt_bytes(mode["expected_total"]), style="bold"),
                      Text("PASS" if ok else "FAIL", style="bold green" if ok else "bold red"), end_section=True)
    table.caption = report["caption"]
    return table
