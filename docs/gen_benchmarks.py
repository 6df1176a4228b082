"""The Benchmarks page: a few figures and tables drawn from ``benchmarks/results/*.json``.

Every number on the page comes from a measured JSON file in ``benchmarks/results/``, written on a
GPU by the comparison tool (``benchmarks/cli_suite.py`` runs it for each pair) or by a script under
``benchmarks/``. ``docs/hooks.py`` calls ``render_results`` while the site builds and puts the
result where the page says ``<!-- benchmark-tables -->``; it also copies every JSON file into the
site, so each figure links to its raw data. ``python docs/gen_benchmarks.py --out DIR`` writes the
Markdown and the figures as files, to look at them.

Rules the page keeps:

- a figure or table shows one results file, and names the device and the date it was measured
  (the file's ``date`` field, else the date of the commit that last changed it);
- a ratio is only ever taken between two rows of the same run (same file, same shape);
- a section whose file is missing says so and names the command that writes it; a file whose
  layout it cannot read is reported on the page, not skipped in silence.

The sections and the files they read:

=====================================  ==============================================
layer TFLOP/s, naive loop → fast        ``cli_moe_<device>.json`` (the ``moe`` pair)
against upstream SonicMoE               ``vs_upstream_<device>.json``
activation and peak memory              ``cli_moe_<device>.json``, ``vs_upstream_<device>.json``
top-k speed-up over ``torch.topk``      ``cli_topk_<device>.json``
grouped GEMM against dense cuBLAS       ``grouped_gemm_<device>.json``
token rounding against top-k            ``token_rounding_<device>.json``
does token rounding hurt quality?       ``train_tiny_moe_<device>.json``
expert parallelism                      ``expert_parallel_<device>.json``
=====================================  ==============================================
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
RAW_URI = "benchmarks/raw"  # where the site serves the JSON files (docs/hooks.py copies them)

NOT_MEASURED = """\
!!! warning "Not yet measured"
    There are no results files in `benchmarks/results/` yet, so this page shows no numbers.
    To produce them, run `bash benchmarks/run_all_gpu.sh` on a Hopper GPU (H100/H200), commit the
    JSON files it writes, and rebuild the docs.
"""


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
class Result:
    """One results file: its path and its parsed JSON object."""

    def __init__(self, path: Path, data: dict) -> None:
        self.path, self.data = Path(path), data

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def device(self) -> str:
        env = self.data.get("environment") if isinstance(self.data, dict) else None
        return str(env.get("device", "device not recorded")) if isinstance(env, dict) else "device not recorded"

    @property
    def date(self) -> str:
        """The file's own ``date`` field, else the day of the last commit that changed it."""
        if isinstance(self.data.get("date"), str):
            return self.data["date"][:10]
        try:
            out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", self.path.name], cwd=self.path.parent,
                                 capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        return out or "not committed yet"

    @property
    def label(self) -> str:
        return f"{self.device}, {self.date}"


def load_results(results_dir: Path = RESULTS_DIR) -> list[Result]:
    """Every ``*.json`` of the folder (not its subfolders), parsed; a broken file raises."""
    results = []
    for f in sorted(Path(results_dir).glob("*.json")):
        data = json.loads(f.read_text())
        results.append(Result(f, data if isinstance(data, dict) else {"value": data}))
    return results


def _pick(results: list[Result], prefix: str) -> list[Result]:
    """The files named ``<prefix>_<device>.json`` (one per device)."""
    return [r for r in results if r.name.startswith(prefix + "_") and r.name[len(prefix) + 1:-5][:1].isupper()]


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------
def _plt():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


FIGURES: dict[str, bytes] = {}  # the PNGs of the last render_results, by file name (for --out)


def _figure(fig, name: str, alt: str) -> list[str]:
    """The figure as a Markdown image (a PNG data URI), remembered under ``name``."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    FIGURES[name] = buf.getvalue()
    return [f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')})", ""]


def _bars(groups: list[str], series: dict[str, list[float | None]], *, ylabel: str, title: str,
          log: bool = False, hline: float | None = None, fmt: str = "{:.0f}"):
    """Grouped bars: one group per entry of ``groups``, one bar per series (None: no bar)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(9.5, max(6.5, 1.2 + 0.55 * len(groups) * len(series))), 3.9))
    width = 0.8 / max(1, len(series))
    for j, (label, values) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        pts = [(x, v) for x, v in zip(xs, values) if v is not None]
        if not pts:
            continue
        bars = ax.bar([x for x, _ in pts], [v for _, v in pts], width, label=label)
        ax.bar_label(bars, [fmt.format(v) for _, v in pts], fontsize=7, padding=1)
    if hline is not None:
        ax.axhline(hline, color="black", lw=0.8)
    if log:
        ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncols=min(3, len(series)), loc="upper center", bbox_to_anchor=(0.5, -0.22 if "\n" in groups[0] else -0.12))
    ax.grid(alpha=0.3, axis="y")
    ax.margins(y=0.12)
    return fig


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "—" if v is None else format(v, spec)


def _gib(b: float | None) -> float | None:
    return None if b is None else b / 2**30


def _source(r: Result, docs_root: str = "") -> str:
    """The line under a figure or table: device, date, raw data (``docs_root``: the way from the
    page's folder to docs/, e.g. ``"../"`` for a page in docs/tutorials/)."""
    return f"*Measured on **{r.device}**, {r.date}. Raw data: [`{r.name}`]({docs_root}{RAW_URI}/{r.name}).*"


def _missing(what: str, command: str) -> list[str]:
    return [f'!!! note "Not measured yet"', f"    No {what} is committed. `{command}` on a Hopper GPU writes it.", ""]


def _unreadable(r: Result, exc: Exception) -> list[str]:
    return ['!!! failure "Could not read this file"',
            f"    `{r.name}` does not have the layout this section expects ({type(exc).__name__}: {exc}).",
            f"    Its numbers are in the [raw JSON]({RAW_URI}/{r.name}).", ""]


_LAYOUT_ERRORS = (KeyError, TypeError, ValueError, AttributeError, StopIteration, IndexError)


def _section(results: list[Result], title: str, prefix: str, what: str, command: str, body) -> list[str]:
    """A section: ``body(result)`` for each ``<prefix>_<device>.json``, or a note naming ``command``
    when there is none; a file ``body`` cannot read is reported on the page."""
    out = [f"### {title}", ""]
    files = _pick(results, prefix)
    if not files:
        return out + _missing(what, command)
    for r in files:
        try:
            out += body(r)
        except _LAYOUT_ERRORS as exc:
            out += _unreadable(r, exc)
    return out


def _shape(p: dict) -> str:
    return ", ".join(f"{k}={p[k]}" for k in ("T", "d", "n", "E", "K") if k in p)


# ---------------------------------------------------------------------------------------------
# Compare-tool suites (benchmarks/cli_suite.py): runs[] of pairs[] of rows[]
# ---------------------------------------------------------------------------------------------
def suite_runs(r: Result, pair: str) -> list[tuple[dict, list[dict]]]:
    """(problem, rows) of each run of a compare-tool suite file, for one pair."""
    out = []
    for run in r.data["runs"]:
        for p in run["pairs"]:
            if p["pair"] == pair:
                out.append((p.get("problem") or run["settings"]["problem"], p["rows"]))
    return out


def _measured(row: dict, key: str) -> float | None:
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and row.get("status", "PASS") == "PASS" else None


def _impls(runs: list[tuple[dict, list[dict]]], keep=lambda row: True) -> list[str]:
    """The implementations of the runs' rows, in first-seen order."""
    names = [row["impl"] for _, rows in runs for row in rows if keep(row)]
    return [name for i, name in enumerate(names) if name not in names[:i]]


def _column(runs: list[tuple[dict, list[dict]]], impl: str, key: str) -> list[float | None]:
    """One implementation's measured ``key`` in each run (None where it has none)."""
    return [next((_measured(row, key) for row in rows if row["impl"] == impl), None) for _, rows in runs]


def _groups(runs: list[tuple[dict, list[dict]]]) -> list[str]:
    return [_shape(p).replace(", E", "\nE") for p, _ in runs]


def layer_section(results: list[Result]) -> list[str]:
    def body(r: Result) -> list[str]:
        runs = suite_runs(r, "moe")
        impls = _impls(runs)
        series = {i: _column(runs, i, "throughput") for i in impls}
        series = {i: v for i, v in series.items() if any(x is not None for x in v)}
        out = _figure(_bars(_groups(runs), series, ylabel="TFLOP/s (18·T·K·n·d / time), log scale", log=True,
                            title=f"MoE layer forward + backward, bf16 — {r.label}"),
                      f"layer_tflops_{r.path.stem}.png", f"MoE layer TFLOP/s per implementation, {r.label}")
        out += ["TFLOP/s, and in brackets the speed-up over the naive PyTorch loop of the same run:", "",
                "| Problem | " + " | ".join(impls) + " |", "|---|" + "---:|" * len(impls)]
        for p, rows in runs:
            cells = []
            for i in impls:
                row = next((x for x in rows if x["impl"] == i), None)
                if row is None or _measured(row, "throughput") is None:
                    cells.append("—" if row is None else str(row.get("status", "")))
                else:
                    cells.append(f"{row['throughput']:.1f} ({row['speedup']:.1f}x)")
            out.append(f"| {_shape(p)} | " + " | ".join(cells) + " |")
        return out + ["", _source(r), ""]

    return _section(results, "The MoE layer: forward + backward throughput", "cli_moe",
                    "compare-tool run of the `moe` pair", "python benchmarks/cli_suite.py --only moe", body)


def memory_section(results: list[Result]) -> list[str]:
    def body(r: Result) -> list[str]:
        runs = suite_runs(r, "moe")
        impls = _impls(runs, lambda row: _measured(row, "saved_bytes") is not None)
        out = []
        for key, what in (("saved_bytes", "activations cached for backward"),
                          ("peak_memory_bytes", "peak memory of forward + backward")):
            series = {i: [_gib(v) for v in _column(runs, i, key)] for i in impls}
            out += _figure(_bars(_groups(runs), series, ylabel="GiB", fmt="{:.2f}", title=f"{what}, bf16 — {r.label}"),
                           f"memory_{key}_{r.path.stem}.png", f"{what} per implementation, {r.label}")
        return out + [_source(r), ""]

    return _section(results, "Activation and peak memory per backward mode", "cli_moe",
                    "compare-tool run of the `moe` pair", "python benchmarks/cli_suite.py --only moe", body)


def topk_section(results: list[Result]) -> list[str]:
    def body(r: Result) -> list[str]:
        runs = suite_runs(r, "topk")
        base = {next(row["impl"] for row in rows if row.get("kind") == "baseline" or row.get("speedup") == 1.0)
                for _, rows in runs}
        if len(base) != 1:
            raise ValueError(f"the runs do not share one baseline row: {sorted(base)}")
        (base_name,) = base
        impls = _impls(runs, lambda row: row["impl"] != base_name)
        groups = [f"T={p['T']}\nE={p['E']}, K={p['K']}" for p, _ in runs]
        series = {i: _column(runs, i, "speedup") for i in impls}
        out = _figure(_bars(groups, series, ylabel=f"speed-up over {base_name} (same run), log scale", log=True,
                            hline=1.0, fmt="{:.1f}", title=f"Top-k of the (T, E) router logits, bf16 — {r.label}"),
                      f"topk_speedup_{r.path.stem}.png", f"top-k speed-up over torch.topk, {r.label}")
        out += ["| T | E | K | " + " | ".join(impls) + " |", "|---:|---:|---:|" + "---:|" * len(impls)]
        for n, (p, _) in enumerate(runs):
            out.append(f"| {p['T']} | {p['E']} | {p['K']} | " + " | ".join(_fmt(series[i][n], ".2f") for i in impls) + " |")
        return out + ["", f"Speed-up = time of `{base_name}` / time of the row, both from the same run.", "", _source(r), ""]

    return _section(results, "Top-k: speed-up over `torch.topk` across E and T", "cli_topk",
                    "compare-tool run of the `topk` pair", "python benchmarks/cli_suite.py --only topk", body)


# ---------------------------------------------------------------------------------------------
# Dedicated scripts
# ---------------------------------------------------------------------------------------------
GEMM_IMPLS = {  # key in grouped_gemm_<device>.json -> label
    "torch_matmul": "dense cuBLAS (torch.matmul, same M×K×N)",
    "torch_grouped_mm": "torch._grouped_mm",
    "naive": "fast naive (gather + pad + GEMM)",
    "contiguous": "fast grouped GEMM (contiguous rows)",
    "gather_fused": "fast gather-fused",
    "varlen_k": "fast varlen-K (dW)",
}


def grouped_gemm_section(results: list[Result]) -> list[str]:
    def body(r: Result) -> list[str]:
        out: list[str] = []
        shapes = r.data["shapes"]
        names = list(shapes)
        impls = [k for k in GEMM_IMPLS if any(k in s["results"] for s in shapes.values())]
        series = {GEMM_IMPLS[k]: [s["results"].get(k, {}).get("tflops") for s in shapes.values()] for k in impls}
        out += _figure(_bars(names, series, ylabel="TFLOP/s", title=f"Grouped GEMMs of the MoE layer, bf16 — {r.label}"),
                       f"grouped_gemm_{r.path.stem}.png", f"grouped GEMM TFLOP/s against dense cuBLAS, {r.label}")
        others = [k for k in impls if k != "torch_matmul"]
        out += ["Fraction of dense cuBLAS (`torch.matmul` on one GEMM of the same M×K×N, same shape, same run):", "",
                "| GEMM | M | K | N | E | " + " | ".join(GEMM_IMPLS[k] for k in others) + " |",
                "|---|---:|---:|---:|---:|" + "---:|" * len(others)]
        for name, s in shapes.items():
            dense = s["results"].get("torch_matmul", {}).get("median_ms")
            cells = []
            for k in others:
                ms = s["results"].get(k, {}).get("median_ms")
                cells.append(_fmt(dense / ms if dense and ms else None, ".2f"))
            sh = s["shape"]
            out.append(f"| {name} | {sh.get('M', '—')} | {sh.get('K_gemm', '—')} | {sh.get('N_gemm', '—')} | "
                       f"{sh.get('E', '—')} | " + " | ".join(cells) + " |")
        out += ["", _source(r), ""]
        return out

    return _section(results, 'Grouped GEMM against dense cuBLAS', 'grouped_gemm',
                    'grouped-GEMM benchmark', 'python benchmarks/grouped_gemm.py', body)


def token_rounding_rows(r: Result) -> list[dict]:
    """Per shape of ``token_rounding_<device>.json``: the shape and the speed-ups of token rounding
    over top-k (time of top-k / time of token rounding, both from that shape's run)."""
    rows = []
    for s in r.data["shapes"]:
        if not s.get("ran", True) or "speedup_token_rounding_over_topk" not in s:
            rows.append({"shape": _shape(s), "E": s.get("E"), "ran": False, "why": s.get("reason", s.get("why", "not run"))})
            continue
        sp = s["speedup_token_rounding_over_topk"]
        cm = s.get("cost_model", {}).get("topk", {})
        # The same layer with the router glue the other way, when the file timed it: the torch glue
        # (fused_glue=False; files where the fused glue is the default), or the fused glue (older
        # files, where it was the opt-in and the torch glue the default).
        other = next(((label, sp["layer"][f"fwd_bwd_time_{suffix}"]) for suffix, label in
                      (("torch_glue", "torch glue"), ("fused_glue", "fused glue"))
                      if f"fwd_bwd_time_{suffix}" in sp.get("layer", {})), (None, None))
        rows.append({"shape": _shape(s), "E": s["E"], "ran": True,
                     "tokens_per_expert_per_tile": s["T"] * s["K"] / s["E"] / s.get("tile_m", 128),
                     "padded_fraction_topk": cm.get("fwd_bwd_padded_flop_fraction"),
                     "experts_fwd": sp["experts_only"]["fwd_time"], "experts_fwd_bwd": sp["experts_only"]["fwd_bwd_time"],
                     "layer_fwd": sp["layer"]["fwd_time"], "layer_fwd_bwd": sp["layer"]["fwd_bwd_time"],
                     "experts_fwd_tflops": sp["experts_only"].get("fwd_tflops"),
                     "experts_fwd_bwd_tflops": sp["experts_only"].get("fwd_bwd_tflops"),
                     "layer_fwd_bwd_other_glue": other[1], "other_glue": other[0],
                     "key": (s["T"], s["d"], s["n"], s["E"], s["K"])})
    return rows


def token_rounding_section(results: list[Result]) -> list[str]:
    def body(r: Result) -> list[str]:
        out: list[str] = []
        rows = token_rounding_rows(r)
        ran = [x for x in rows if x["ran"]]
        groups = [x["shape"].replace(", E", "\nE") for x in ran]
        series = {"experts only, forward": [x["experts_fwd"] for x in ran],
                  "experts only, fwd + bwd": [x["experts_fwd_bwd"] for x in ran],
                  "whole layer, forward": [x["layer_fwd"] for x in ran],
                  "whole layer, fwd + bwd": [x["layer_fwd_bwd"] for x in ran]}
        glue = {x["other_glue"] for x in ran} - {None}
        if len(glue) == 1 and all(x["layer_fwd_bwd_other_glue"] is not None for x in ran):
            other = glue.pop()  # the glue the file timed besides its default: name both layer series
            main = "torch glue" if other == "fused glue" else "fused glue"
            series[f"whole layer, forward ({main})"] = series.pop("whole layer, forward")
            series[f"whole layer, fwd + bwd ({main})"] = series.pop("whole layer, fwd + bwd")
            series[f"whole layer, fwd + bwd ({other})"] = [x["layer_fwd_bwd_other_glue"] for x in ran]
        out += _figure(_bars(groups, series, ylabel="speed-up of token rounding over top-k", hline=1.0, fmt="{:.2f}",
                             title=f"Token rounding vs top-k routing (tile_m = 128), bf16 — {r.label}"),
                       f"token_rounding_{r.path.stem}.png", f"token rounding speed-up over top-k, {r.label}")
        out += [token_rounding_table(r), "", _source(r), ""]
        return out

    return _section(results, 'Token rounding against top-k routing', 'token_rounding',
                    'token-rounding benchmark', 'python benchmarks/token_rounding.py', body)


def token_rounding_table(r: Result) -> str:
    """The speed-ups of token rounding over top-k of one file, as a Markdown table."""
    rows = token_rounding_rows(r)
    glue = next((x["other_glue"] for x in rows if x["ran"] and x.get("other_glue")), None)
    main = "" if not glue else f", {'torch glue' if glue == 'fused glue' else 'fused glue'}"
    extra = f" | layer fwd+bwd, {glue}" if glue else ""
    lines = ["| Shape | tokens per expert / tile | top-k FLOPs on padding | experts fwd | experts fwd+bwd | "
             f"layer fwd{main} | layer fwd+bwd{main}{extra} |",
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if glue else "")]
    for x in rows:
        if not x["ran"]:
            lines.append(f"| {x['shape']} | not run: {x['why']} |||||| " + ("|" if glue else ""))
            continue
        pad = "—" if x["padded_fraction_topk"] is None else f"{100 * x['padded_fraction_topk']:.1f} %"
        cell = (f" | {_fmt(x['layer_fwd_bwd_other_glue'], '.2f')}x" if x["layer_fwd_bwd_other_glue"] is not None
                else " | —") if glue else ""
        lines.append(f"| {x['shape']} | {x['tokens_per_expert_per_tile']:.1f} | {pad} | {x['experts_fwd']:.2f}x | "
                     f"{x['experts_fwd_bwd']:.2f}x | {x['layer_fwd']:.2f}x | {x['layer_fwd_bwd']:.2f}x{cell} |")
    return "\n".join(lines)


# The paper's token-rounding throughput results (SonicMoE, arXiv 2512.14080, Section 6.3.3; H100,
# SonicMoE's kernels, router excluded; gains in "model TFLOPS" over token-choice top-k, tile 128).
PAPER_TOKEN_ROUNDING = [
    {"config": "T=16384, d=1536, n=1024, E=128, K=2", "key": (16384, 1536, 1024, 128, 2),
     "fwd": 0.165, "bwd": 0.061, "fwd_bwd": 0.094},
    {"config": "the paper's \"256 experts\" case (Fig. 16, bottom row; its exact shape is not stated consistently)",
     "key": None, "fwd": 0.257, "bwd": 0.118, "fwd_bwd": 0.159},
    {"config": "Qwen3-Next-80B-A3B layer (K/E = 10/512)", "key": None, "fwd": 0.196, "bwd": 0.079, "fwd_bwd": None},
]


def _gain(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f} %"


def token_rounding_comparison(results_dir: Path = RESULTS_DIR, docs_root: str = "") -> str:
    """The paper's token-rounding speed-ups next to ours (``token_rounding_<device>.json``), as
    TFLOP/s gains of the expert computation over top-k routing (router excluded, as in the paper)."""
    files = _pick(load_results(results_dir), "token_rounding")
    lines = ["| Shape | Paper (H100): forward | backward | fwd + bwd |"]
    ours = []
    for r in files:
        try:
            ours.append((r, {x["key"]: x for x in token_rounding_rows(r) if x["ran"]}))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    for r, _ in ours:
        lines[0] += f" Ours ({r.device}): forward | fwd + bwd |"
    lines.append("|---|---:|---:|---:|" + "---:|---:|" * len(ours))
    keys_shown = set()
    for p in PAPER_TOKEN_ROUNDING:
        cells = [_gain(p["fwd"]), _gain(p["bwd"]), _gain(p["fwd_bwd"])]
        for _, rows in ours:
            x = rows.get(p["key"]) if p["key"] else None
            cells += [_gain(x["experts_fwd_tflops"] - 1 if x and x["experts_fwd_tflops"] else None),
                      _gain(x["experts_fwd_bwd_tflops"] - 1 if x and x["experts_fwd_bwd_tflops"] else None)]
        keys_shown.add(p["key"])
        lines.append(f"| {p['config']} | " + " | ".join(cells) + " |")
    extra = sorted({k for _, rows in ours for k in rows} - keys_shown)
    for k in extra:  # our other shapes: no paper number to put next to them
        cells = ["—", "—", "—"]
        for _, rows in ours:
            x = rows.get(k)
            cells += [_gain(x["experts_fwd_tflops"] - 1 if x and x["experts_fwd_tflops"] else None),
                      _gain(x["experts_fwd_bwd_tflops"] - 1 if x and x["experts_fwd_bwd_tflops"] else None)]
        lines.append(f"| T={k[0]}, d={k[1]}, n={k[2]}, E={k[3]}, K={k[4]} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if not ours:
        text += "\n*No measurement of ours is committed yet: `python benchmarks/token_rounding.py` on a Hopper GPU writes one.*\n"
    for r, _ in ours:
        text += f"\n*Ours: {_source(r, docs_root)[1:-1]} Gains are TFLOP/s of the expert computation (router excluded), each routing counting its own pairs, both routings timed in the same run.*\n"
    return text


def upstream_section(results: list[Result]) -> list[str]:
    """sonic_learn's fast layer against upstream SonicMoE (and any other baseline of the file), from
    ``vs_upstream_<device>.json``: ``rows`` with ``config``, ``shape`` and, per implementation
    (``sonic_learn``, ``upstream``, ...), ``fwd_ms``, ``fwdbwd_ms``, ``fwdbwd_peak_bytes`` (or an
    ``error``), all measured in the same run."""

    def sides_of(row: dict) -> list[str]:
        found = [k for k, v in row.items() if isinstance(v, dict) and ("fwd_ms" in v or "error" in v)]
        return sorted(found, key=lambda k: (k != "sonic_learn", k != "upstream", found.index(k)))

    def tflops(row: dict, side: str, key: str, mult: int) -> float | None:
        sh, ms = row.get("shape"), row.get(side, {}).get(key)
        if not isinstance(sh, dict) or not all(k in sh for k in "TKnd") or not ms:
            return None
        return mult * sh["T"] * sh["K"] * sh["n"] * sh["d"] / (ms * 1e-3) / 1e12

    def body(r: Result) -> list[str]:
        rows = r.data["rows"]
        sides: list[str] = []
        for row in rows:
            sides += [side for side in sides_of(row) if side not in sides]
        groups = [str(row["config"]) for row in rows]
        out: list[str] = []
        series = {f"{what}, {side}": [tflops(row, side, key, mult) for row in rows]
                  for what, key, mult in (("forward", "fwd_ms", 6), ("fwd + bwd", "fwdbwd_ms", 18)) for side in sides}
        series = {k: v for k, v in series.items() if any(x is not None for x in v)}
        if series:
            out += _figure(_bars(groups, series, ylabel="TFLOP/s", title=f"sonic_learn vs upstream SonicMoE, bf16 — {r.label}"),
                           f"vs_upstream_{r.path.stem}.png", f"sonic_learn against upstream SonicMoE, {r.label}")
        peaks = {side: [_gib(row.get(side, {}).get("fwdbwd_peak_bytes")) for row in rows] for side in sides}
        peaks = {k: v for k, v in peaks.items() if any(x is not None for x in v)}
        if peaks:
            out += _figure(_bars(groups, peaks, ylabel="GiB", fmt="{:.2f}",
                                 title=f"peak memory of forward + backward, bf16 — {r.label}"),
                           f"vs_upstream_memory_{r.path.stem}.png", f"peak memory against upstream SonicMoE, {r.label}")
        out += ["| Config | Shape | Implementation | fwd ms | fwd+bwd ms | fwd+bwd time / sonic_learn's | "
                "peak GiB, fwd+bwd |", "|---|---|---|---:|---:|---:|---:|"]
        for row in rows:
            sh = row.get("shape")
            ours = row.get("sonic_learn", {}).get("fwdbwd_ms")
            for side in sides_of(row):
                v = row[side]
                if "error" in v and "fwd_ms" not in v:
                    out.append(f"| {row['config']} | {_shape(sh) if isinstance(sh, dict) else sh} | {side} | "
                               f"not measured: {str(v['error']).replace('|', '/')} |||| ")
                    continue
                rel = v["fwdbwd_ms"] / ours if ours and v.get("fwdbwd_ms") else None
                out.append(f"| {row['config']} | {_shape(sh) if isinstance(sh, dict) else sh} | {side} | "
                           f"{_fmt(v.get('fwd_ms'), '.3f')} | {_fmt(v.get('fwdbwd_ms'), '.3f')} | {_fmt(rel, '.2f')} | "
                           f"{_fmt(_gib(v.get('fwdbwd_peak_bytes')), '.2f')} |")
        return out + ["", _source(r), ""]

    return _section(results, "Against upstream SonicMoE", "vs_upstream",
                    "side-by-side run against upstream SonicMoE (`vs_upstream_<device>.json`)",
                    "python benchmarks/vs_upstream.py", body)


def training_section(results: list[Result]) -> list[str]:
    """The tiny MoE language model of ``train_tiny_moe_<device>.json``: final validation loss per
    routing and tokens-per-tile ratio, mean and spread over the seeds (the file's ``summary``)."""

    def body(r: Result) -> list[str]:
        cfg = r.data["config"]
        out = [f"A {cfg['layers']}-layer byte-level MoE language model (d = {cfg['d']}, E = {cfg['experts']}, "
               f"K = {cfg['top_k']}, tile {cfg['tile_m']}), {cfg['steps']} steps per run, evaluated with top-k routing. "
               "Lower is better; the spread is min to max over the seeds.", "",
               "| Routing | tokens per expert / tile | seeds | final validation loss (mean) | min | max |",
               "|---|---:|---:|---:|---:|---:|"]
        for x in r.data["summary"]:
            out.append(f"| {x['routing']} | {x['tokens_per_expert_per_tile']:g} | {x['seeds']} | "
                       f"{x['final_val_loss_mean']:.4f} | {x['final_val_loss_min']:.4f} | {x['final_val_loss_max']:.4f} |")
        return out + ["", _source(r), ""]

    return _section(results, "Does token rounding hurt quality?", "train_tiny_moe",
                    "training run (`train_tiny_moe_<device>.json`)", "python benchmarks/train_tiny_moe.py", body)


def expert_parallel_section(results: list[Result]) -> list[str]:
    """``expert_parallel_<device>.json``: per world size and config, the median over the ranks of each
    forward step and of forward + backward, and the rows sent against the cost model."""

    def body(r: Result) -> list[str]:
        out = ["Each step is separated by a device synchronisation (so the steps add up to a little more "
               "than an unsynchronised forward). With one GPU the all-to-alls are local copies.", "",
               "| GPUs (EP) | Config | chunks | route ms | dispatch ms | experts ms | combine ms | fwd+bwd ms | "
               "rows sent / rank | cost model |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        devices = set()
        for run in sorted(r.data["runs"], key=lambda run: run["world_size"]):
            devices.add(run.get("environment", {}).get("device", "device not recorded"))
            for row in run["rows"]:
                ranks = row["per_rank"]

                def med(key: str) -> float:
                    return sorted(x[key] for x in ranks)[len(ranks) // 2] * 1e3

                out.append(f"| {run['world_size']} | {row['config']} | {row.get('chunks', 1)} | {med('route'):.2f} | "
                           f"{med('dispatch'):.2f} | {med('experts'):.2f} | {med('combine'):.2f} | {med('fwd_bwd'):.2f} | "
                           f"{ranks[0]['rows_sent']} | {row['model_rows_out_per_rank']} |")
        return out + ["", f"*Devices: {', '.join(sorted(devices))}.* " + _source(r), ""]

    return _section(results, "Expert parallelism", "expert_parallel",
                    "expert-parallel run (`expert_parallel_<device>.json`)",
                    "NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node <GPUs> benchmarks/expert_parallel.py", body)


def raw_section(results: list[Result]) -> list[str]:
    out = ["| File | What | Device | Date |", "|---|---|---|---|"]
    for r in results:
        what = r.data.get("benchmark") or r.data.get("command") or r.data.get("what") or ""
        out.append(f"| [`{r.name}`]({RAW_URI}/{r.name}) | {str(what)[:80]} | {r.device} | {r.date} |")
    return out + [""]


SECTIONS = (layer_section, upstream_section, memory_section, topk_section, grouped_gemm_section, token_rounding_section,
            training_section, expert_parallel_section)


def render_results(results_dir: Path = RESULTS_DIR) -> str:
    """The page's figures and tables, then the list of every raw file; or the "not yet measured" note."""
    results = load_results(results_dir)
    if not results:
        return NOT_MEASURED
    FIGURES.clear()
    out: list[str] = []
    for section in SECTIONS:
        out += section(results)
    out += ["## Every results file", "",
            "Each file as the measurement wrote it (JSON), with the device it ran on and its date:", "",
            *raw_section(results)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="results folder (default: benchmarks/results)")
    parser.add_argument("--out", type=Path, help="write benchmarks.md and the PNGs here instead of printing the Markdown")
    args = parser.parse_args()
    text = render_results(args.results)
    if args.out is None:
        print(text)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "benchmarks.md").write_text(text)
        for name, png in FIGURES.items():
            (args.out / name).write_bytes(png)
            print(args.out / name)
