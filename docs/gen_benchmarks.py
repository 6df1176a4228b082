"""Render the measured benchmark results (``benchmarks/results/*.json``) as Markdown tables.

The Benchmarks page shows only numbers that a measurement wrote to ``benchmarks/results/`` (the
comparison tool's ``--json`` output, or a script under ``benchmarks/``): nothing is typed in by
hand. ``docs/hooks.py`` calls ``render_results`` while the site builds and puts the tables where the
page says ``<!-- benchmark-tables -->``; ``python docs/gen_benchmarks.py`` prints the same Markdown.

The files do not share one schema, so the renderer is generic and shows every value it finds:

- the ``"environment"`` object (device, versions) becomes the file's "Measured on" line;
- an object whose values are all flat objects (e.g. implementation -> {median_ms, p20_ms, ...})
  becomes one table, a row per key;
- a list of flat objects (e.g. one record per table row) becomes one table, a row per item;
- an object of plain values becomes one line, ``key value · key value``;
- a table whose rows have a ``median_ms`` also gets a bar chart of it (with the p20-p80 range),
  drawn with matplotlib and embedded in the page;
- any other object shows its plain values on one line, then a sub-section for each nested value.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"

NOT_MEASURED = """\
!!! warning "Not yet measured"
    There are no results files in `benchmarks/results/` yet, so this page shows no numbers.
    To produce them, run the comparison tool on a Hopper GPU (H100/H200) with `--json`, e.g.

    ```bash
    python -m sonic_learn.compare moe --config 7B --device cuda --json benchmarks/results/moe.json
    ```

    commit the JSON files, and rebuild the docs: the tables appear here.
"""

_SCALARS = (str, int, float, bool, type(None))


def _cell(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(", ", ": "), sort_keys=True)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _is_flat(obj: object) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(v, _SCALARS) or (isinstance(v, list) and all(isinstance(x, _SCALARS) for x in v))
                   for v in obj.values())
    return False


def _table(rows: list[tuple[str | None, dict]], first: str | None) -> list[str]:
    """A Markdown table; ``first`` names a leading column holding each row's key (None: no such column)."""
    columns: list[str] = []
    for _, rec in rows:
        columns += [k for k in rec if k not in columns]
    head = ([first] if first is not None else []) + columns
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, rec in rows:
        cells = ([f"**{_cell(key)}**"] if first is not None else []) + [_cell(rec.get(c)) for c in columns]
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def _time_plot(rows: list[tuple[str | None, dict]], title: str) -> list[str]:
    """A bar chart of the rows' ``median_ms`` (whiskers from ``p20_ms`` to ``p80_ms`` when present),
    embedded in the page as a PNG data URI; nothing when matplotlib is missing or fewer than 2 rows
    have a median."""
    timed = [(str(key if key is not None else rec.get("impl", rec.get("name", i))), rec)
             for i, (key, rec) in enumerate(rows) if isinstance(rec.get("median_ms"), (int, float))]
    if len(timed) < 2:
        return []
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return []
    labels = [k for k, _ in timed]
    med = [float(r["median_ms"]) for _, r in timed]
    lo = [m - float(r.get("p20_ms", m)) for m, (_, r) in zip(med, timed)]
    hi = [float(r.get("p80_ms", m)) - m for m, (_, r) in zip(med, timed)]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(timed) + 0.9))
    ax.barh(range(len(timed)), med, xerr=[lo, hi], color="tab:blue", ecolor="0.3", capsize=3)
    ax.set_yticks(range(len(timed)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median time (ms), whiskers p20-p80")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return [f"![median time per row: {title}](data:image/png;base64,{data})", ""]


def _heading(title: str, depth: int) -> list[str]:
    if depth <= 3:
        return ["#" * (depth + 2) + " " + title, ""]
    return [f"**{title}**", ""]


def _render(title: str | None, obj: object, depth: int, trail: str = "") -> list[str]:
    if isinstance(obj, (dict, list)) and not obj:
        return []  # nothing measured under this key
    out = _heading(title, depth) if title else []
    trail = f"{trail} / {title}" if trail and title else (title or trail)
    if isinstance(obj, list):
        if obj and all(_is_flat(x) for x in obj):
            rows = [(None, x) for x in obj]
            return out + _table(rows, None) + _time_plot(rows, trail)
        if all(isinstance(x, _SCALARS) for x in obj):
            return out + [", ".join(_cell(x) for x in obj), ""]
        for i, item in enumerate(obj):
            name = None
            if isinstance(item, dict):
                name = next((str(item[k]) for k in ("pair", "name", "impl", "label") if k in item), None)
            out += _render(name or f"{title or 'item'} {i}", item, depth + 1, trail)
        return out
    if not isinstance(obj, dict):
        return out + [_cell(obj), ""]
    if obj and all(_is_flat(v) for v in obj.values()):
        rows = list(obj.items())
        return out + _table(rows, "") + _time_plot(rows, trail)
    plain = {k: v for k, v in obj.items() if not isinstance(v, (dict, list)) or _is_flat_list(v)}
    if plain:  # the plain values on one line: "key value · key value"
        out += [" · ".join(f"{k} **{_cell(v)}**" for k, v in plain.items()), ""]
    for k, v in obj.items():
        if k in plain:
            continue
        if isinstance(v, dict) and v and all(isinstance(x, _SCALARS) for x in v.values()):
            out += [f"*{k}*: " + " · ".join(f"{kk} **{_cell(vv)}**" for kk, vv in v.items()), ""]
        else:
            out += _render(str(k), v, depth + 1, trail)
    return out


def _is_flat_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, _SCALARS) for x in v)


def render_file(path: Path) -> str:
    """One results file as Markdown: a heading, the environment it was measured in, its tables."""
    data = json.loads(Path(path).read_text())
    out = [f"### `{Path(path).name}`", ""]
    if isinstance(data, dict) and isinstance(data.get("environment"), dict):
        env = data["environment"]
        out += ["Measured on: " + "; ".join(f"**{k}** {_cell(v)}" for k, v in env.items()) + ".", ""]
        data = {k: v for k, v in data.items() if k != "environment"}
    body = _render(None, data, 1, Path(path).stem)
    return "\n".join(out + body) + "\n"


def render_results(results_dir: Path = RESULTS_DIR) -> str:
    """Every ``*.json`` in ``results_dir`` as Markdown, or the "not yet measured" note."""
    files = sorted(Path(results_dir).glob("*.json"))
    if not files:
        return NOT_MEASURED
    return "\n".join(render_file(f) for f in files)


if __name__ == "__main__":
    print(render_results())
