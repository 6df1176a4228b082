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
- any other object shows its plain values on one line, then a sub-section for each nested value.
"""

from __future__ import annotations

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


def _heading(title: str, depth: int) -> list[str]:
    if depth <= 3:
        return ["#" * (depth + 2) + " " + title, ""]
    return [f"**{title}**", ""]


def _render(title: str | None, obj: object, depth: int) -> list[str]:
    if isinstance(obj, (dict, list)) and not obj:
        return []  # nothing measured under this key
    out = _heading(title, depth) if title else []
    if isinstance(obj, list):
        if obj and all(_is_flat(x) for x in obj):
            return out + _table([(None, x) for x in obj], None)
        if all(isinstance(x, _SCALARS) for x in obj):
            return out + [", ".join(_cell(x) for x in obj), ""]
        for i, item in enumerate(obj):
            name = None
            if isinstance(item, dict):
                name = next((str(item[k]) for k in ("pair", "name", "impl", "label") if k in item), None)
            out += _render(name or f"{title or 'item'} {i}", item, depth + 1)
        return out
    if not isinstance(obj, dict):
        return out + [_cell(obj), ""]
    if obj and all(_is_flat(v) for v in obj.values()):
        return out + _table(list(obj.items()), "")
    plain = {k: v for k, v in obj.items() if not isinstance(v, (dict, list)) or _is_flat_list(v)}
    if plain:  # the plain values on one line: "key value · key value"
        out += [" · ".join(f"{k} **{_cell(v)}**" for k, v in plain.items()), ""]
    for k, v in obj.items():
        if k in plain:
            continue
        if isinstance(v, dict) and v and all(isinstance(x, _SCALARS) for x in v.values()):
            out += [f"*{k}*: " + " · ".join(f"{kk} **{_cell(vv)}**" for kk, vv in v.items()), ""]
        else:
            out += _render(str(k), v, depth + 1)
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
    body = _render(None, data, 1)
    return "\n".join(out + body) + "\n"


def render_results(results_dir: Path = RESULTS_DIR) -> str:
    """Every ``*.json`` in ``results_dir`` as Markdown, or the "not yet measured" note."""
    files = sorted(Path(results_dir).glob("*.json"))
    if not files:
        return NOT_MEASURED
    return "\n".join(render_file(f) for f in files)


if __name__ == "__main__":
    print(render_results())
