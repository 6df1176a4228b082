"""Render the measured benchmark results (``benchmarks/results/*.json``) as Markdown tables.

The Benchmarks page shows only numbers that a run of ``python -m sonic_learn.compare ... --json``
wrote to ``benchmarks/results/``: nothing is typed in by hand. ``docs/hooks.py`` calls
``render_results`` while the site builds and puts the tables where the page says
``<!-- benchmark-tables -->``; ``python docs/gen_benchmarks.py`` prints the same Markdown.

A results file is either a list of records (one per table row) or an object with a list of records
under ``"records"`` (or ``"rows"``) and the machine description under ``"environment"``. Each record
is a flat object; nested values are shown as compact JSON. Records that carry their own
``"environment"`` (or ``"device"``) have it lifted into the file's description.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"

NOT_MEASURED = """\
!!! warning "Not yet measured"
    There are no results files in `benchmarks/results/` yet, so this page shows no numbers.
    To produce them, run on a Hopper GPU (H100/H200):

    ```bash
    python -m sonic_learn.compare moe --json benchmarks/results/moe.json
    ```

    (one file per subcommand: `topk`, `routing`, `grouped-gemm`, `backward`, `moe`), commit the
    JSON files, and rebuild the docs: the tables appear here.
"""


def _cell(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _split(data: object, name: str) -> tuple[list[dict], dict]:
    """Return (records, environment) of one results file."""
    env: dict = {}
    if isinstance(data, dict):
        env = dict(data.get("environment") or {})
        records = data.get("records", data.get("rows"))
    else:
        records = data
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{name}: expected a list of records (objects), or an object with 'records'")
    flat = []
    for rec in records:
        rec = dict(rec)
        rec_env = rec.pop("environment", None)
        if isinstance(rec_env, dict):
            env.update(rec_env)
        flat.append(rec)
    return flat, env


def render_file(path: Path) -> str:
    """One results file as Markdown: a heading, the environment it was measured in, the table."""
    records, env = _split(json.loads(path.read_text()), path.name)
    out = [f"### `{path.name}`", ""]
    if env:
        out.append("Measured on: " + "; ".join(f"**{k}** {_cell(v)}" for k, v in sorted(env.items())) + ".")
        out.append("")
    if not records:
        out.append("(no records in this file)")
        return "\n".join(out) + "\n"
    columns: list[str] = []
    for rec in records:
        columns += [k for k in rec if k not in columns]
    out.append("| " + " | ".join(columns) + " |")
    out.append("|" + "---|" * len(columns))
    for rec in records:
        out.append("| " + " | ".join(_cell(rec.get(c)) for c in columns) + " |")
    return "\n".join(out) + "\n"


def render_results(results_dir: Path = RESULTS_DIR) -> str:
    """Every ``*.json`` in ``results_dir`` as Markdown, or the "not yet measured" note."""
    files = sorted(Path(results_dir).glob("*.json"))
    if not files:
        return NOT_MEASURED
    return "\n".join(render_file(f) for f in files)


if __name__ == "__main__":
    print(render_results())
