"""Run the tutorials cell by cell and keep what each cell prints: the outputs shown on the docs pages.

The tutorials (``tutorials/NN_name.py``) are jupytext "percent" scripts, and their docs pages show
their code cells through ``pymdownx.snippets`` section markers (``# --8<-- [start:NAME]``). While
the site builds, ``docs/hooks.py`` calls ``tutorial_outputs`` for every tutorial a page includes and
puts each cell's output (its stdout, and any matplotlib figure it left open) under the cell's code,
as the Triton tutorials do.

- Each tutorial runs in its own Python process, with CUDA hidden (``CUDA_VISIBLE_DEVICES=""``): the
  build needs only a CPU, and the cells behind ``if torch.cuda.is_available():`` are skipped.
- The outputs are cached under the system temp folder, keyed by a hash of the tutorial and of
  every file of the ``sonic_learn`` package, so a rebuild with nothing changed runs nothing.
- A cell that fails fails the build, with the cell's traceback.

For the GPU cells, the pages also show a committed GPU run, labelled with its device and date. To
record one, on a GPU machine (with the ``gpu`` extra installed)::

    python docs/gen_tutorial_outputs.py --gpu --json benchmarks/results/tutorials_<device>.json

``python docs/gen_tutorial_outputs.py tutorials/01_topk.py`` prints the CPU outputs of one tutorial.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TUTORIALS_DIR = REPO / "tutorials"
TUTORIAL_GLOB = "[0-9][0-9]_*.py"
RESULTS_DIR = REPO / "benchmarks" / "results"
GPU_GLOB = "tutorials_*.json"  # committed GPU runs, written by --gpu --json
CACHE_DIR = Path(tempfile.gettempdir()) / "sonic_learn-docs-tutorial-outputs"
SECTION_START = re.compile(r"--8<-- \[start:([\w-]+)\]")
GPU_GUARD = "torch.cuda.is_available()"
MAX_OUTPUT_CHARS = 6000  # a cell that prints more is cut, with a note


def tutorials() -> list[Path]:
    """Every tutorial script, in order: ``tutorials/NN_*.py``."""
    return sorted(TUTORIALS_DIR.glob(TUTORIAL_GLOB))


# ---------------------------------------------------------------------------------------------
# Running one tutorial (inside the child process)
# ---------------------------------------------------------------------------------------------
def _open_figures_as_png() -> list[str]:
    """Every open matplotlib figure as a base64 PNG, then closed (nothing if matplotlib is unused)."""
    if "matplotlib.pyplot" not in sys.modules:
        return []
    import matplotlib.pyplot as plt  # noqa: PLC0415

    pngs = []
    for num in plt.get_fignums():
        buf = io.BytesIO()
        plt.figure(num).savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
        pngs.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    plt.close("all")
    return pngs


CELL_MARKER = re.compile(r"^# %%(.*)$")


def code_cells(text: str) -> list[str]:
    """The code cells of a jupytext "percent" script, in order: the lines after each ``# %%``
    marker up to the next, for markers not tagged ``[markdown]`` (what ``jupytext.read`` gives as
    code cells; ``tests/test_docs_generators.py`` checks that they agree on every tutorial, and
    this way the GPU machine needs no jupytext)."""
    cells: list[tuple[bool, list[str]]] = []
    for line in text.splitlines():
        m = CELL_MARKER.match(line)
        if m:
            cells.append(("[markdown]" in m.group(1), []))
        elif cells:
            cells[-1][1].append(line)
    return ["\n".join(lines).strip("\n") for markdown, lines in cells if not markdown]


def run_cells(path: Path) -> list[dict]:
    """Execute the code cells of one tutorial in order, in one namespace.

    Returns one record per code cell: ``sections`` (the snippet sections that start in it),
    ``source_sha`` (a hash of its source), ``gpu`` (whether it has a ``torch.cuda.is_available()`` guard), ``stdout`` and ``figures``
    (base64 PNGs). Raises ``RuntimeError`` naming the cell if one fails.
    """
    os.environ.setdefault("MPLBACKEND", "Agg")
    path = Path(path).resolve()
    namespace = {"__name__": "__main__", "__file__": str(path)}
    records = []
    for number, source in enumerate(code_cells(path.read_text()), start=1):
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(source, f"{path.name} (code cell {number})", "exec"), namespace)  # noqa: S102
        except BaseException as exc:  # report which cell, with what it printed so far
            raise RuntimeError(
                f"{path.name}: code cell {number} failed:\n{out.getvalue()[-2000:]}\n{traceback.format_exc()}"
            ) from exc
        records.append({
            "sections": SECTION_START.findall(source),
            "source_sha": hashlib.sha256(source.encode()).hexdigest()[:16],
            "gpu": GPU_GUARD in source,
            "stdout": out.getvalue(),
            "figures": _open_figures_as_png(),
        })
    return records


# ---------------------------------------------------------------------------------------------
# Running tutorials from the docs build (parent process), with a cache
# ---------------------------------------------------------------------------------------------
def _fingerprint(path: Path) -> str:
    """A hash of the tutorial, of this file, and of every file of the sonic_learn package."""
    h = hashlib.sha256()
    for f in [Path(path), Path(__file__), *sorted((REPO / "sonic_learn").rglob("*.py"))]:
        h.update(str(f.relative_to(REPO) if f.is_relative_to(REPO) else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:32]


def _run_in_child(path: Path, gpu: bool = False) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "MPLBACKEND": "Agg", "PYTHONHASHSEED": "0"}
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"running {Path(path).name} for the docs failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout)


_MEMO: dict[str, list[dict]] = {}


def tutorial_outputs(paths: list[Path] | None = None, *, use_cache: bool = True) -> dict[str, list[dict]]:
    """CPU outputs of each tutorial (file name -> cell records of ``run_cells``), running the ones
    not cached yet, at most two at a time."""
    paths = [Path(p) for p in (tutorials() if paths is None else paths)]
    keys = {p.name: _fingerprint(p) for p in paths}
    result: dict[str, list[dict]] = {}
    todo = []
    for p in paths:
        key = keys[p.name]
        cached = CACHE_DIR / f"{p.stem}-{key}.json"
        if use_cache and key in _MEMO:
            result[p.name] = _MEMO[key]
        elif use_cache and cached.is_file():
            result[p.name] = _MEMO[key] = json.loads(cached.read_text())
        else:
            todo.append(p)
    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        for p, records in zip(todo, pool.map(_run_in_child, todo)):
            key = keys[p.name]
            result[p.name] = _MEMO[key] = records
            if use_cache:
                CACHE_DIR.mkdir(parents=True, exist_ok=True)
                tmp = CACHE_DIR / f".{p.stem}-{key}.{os.getpid()}.tmp"
                tmp.write_text(json.dumps(records))
                tmp.replace(CACHE_DIR / f"{p.stem}-{key}.json")
    return result


# ---------------------------------------------------------------------------------------------
# The committed GPU runs
# ---------------------------------------------------------------------------------------------
def gpu_runs(results_dir: Path = RESULTS_DIR) -> list[dict]:
    """The committed GPU runs (``tutorials_<device>.json``): each has ``environment`` (with
    ``device``), ``date`` and ``tutorials`` (file name -> cell records)."""
    runs = []
    for f in sorted(Path(results_dir).glob(GPU_GLOB)):
        data = json.loads(f.read_text())
        if not isinstance(data.get("tutorials"), dict) or "device" not in data.get("environment", {}):
            raise ValueError(f"{f}: not a tutorial run (expected 'environment.device' and 'tutorials')")
        data["file"] = f.name
        runs.append(data)
    return runs


def record_gpu_run(out: Path) -> Path:
    """Run every tutorial with the GPU visible and write the outputs, the device and the date to ``out``."""
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device (torch.cuda.is_available() is False)")
    environment = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    try:
        from importlib.metadata import version  # noqa: PLC0415

        environment["nvidia-cutlass-dsl"] = version("nvidia-cutlass-dsl")
    except Exception:  # noqa: BLE001 - the kernels are optional; the run says whether they ran
        pass
    data = {"what": "the outputs of every tutorial cell, run on a GPU by docs/gen_tutorial_outputs.py --gpu",
            "environment": environment,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "tutorials": {p.name: _run_in_child(p, gpu=True) for p in tutorials()}}
    for records in data["tutorials"].values():
        for r in records:
            r["figures"] = []  # keep the committed file small: only text comes back from the GPU run
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# Putting the outputs on a page
# ---------------------------------------------------------------------------------------------
# A code cell on a page: a python fence holding one snippet line of a tutorial section.
CELL_FENCE = re.compile(
    r'^(?P<indent>[ \t]*)```python[^\n]*\n(?P=indent)--8<-- "tutorials/(?P<file>\d\d_[\w]+\.py):(?P<section>[\w-]+)"\n'
    r"(?P=indent)```[ \t]*$", re.MULTILINE)


def _fenced(text: str, title: str | None = None) -> list[str]:
    """A text code block holding ``text`` verbatim (the fence is longer than any backtick run in it)."""
    if len(text) > MAX_OUTPUT_CHARS:
        text = text[:MAX_OUTPUT_CHARS] + f"\n... ({len(text) - MAX_OUTPUT_CHARS} more characters not shown)\n"
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    head = fence + "text" + (f' title="{title}"' if title else "")
    return [head, *text.rstrip("\n").split("\n"), fence]


def _output_block(record: dict, gpu_records: list[tuple[dict, dict | None]]) -> list[str]:
    """The Markdown shown under one cell: its CPU output, and for a GPU cell the committed GPU runs."""
    body: list[str] = []
    cpu_text = record["stdout"]
    if record["gpu"] and gpu_records:  # the committed GPU runs first: the cell is about the GPU
        for run, rec in gpu_records:
            device, date = run["environment"]["device"], run.get("date", "date not recorded")
            body += [f'=== "{device}, run of {date}"', ""]
            if rec is None:
                text = "(this cell is not in the committed GPU run)\n"
            else:
                text = rec["stdout"] or "(nothing printed)\n"
                if rec.get("source_sha") != record.get("source_sha"):
                    body += [f"    *Recorded with an earlier version of this cell ({run['file']}).*", ""]
            body += ["    " + line if line else "" for line in _fenced(text)] + [""]
        body += ['=== "CPU, this build (GPU part skipped)"', ""]
        body += ["    " + line if line else "" for line in _fenced(cpu_text or "(nothing printed)\n")]
    else:
        if cpu_text:
            title = "Output (CPU, this build; the GPU part of this cell was skipped)" if record["gpu"] else "Output"
            body += _fenced(cpu_text, title)
        if record["gpu"]:
            body += ["", "*This cell has a GPU part, skipped on the CPU that built this page, and no GPU run of "
                     "the tutorials is committed yet (`python docs/gen_tutorial_outputs.py --gpu --json "
                     "benchmarks/results/tutorials_<device>.json` on a GPU machine records one).*"]
    for i, png in enumerate(record.get("figures", []), start=1):
        body += ["", f"![Figure {i} drawn by this cell](data:image/png;base64,{png})"]
    if not body:
        return []
    return ['<div class="cell-output" markdown>', "", *body, "", "</div>"]


def insert_outputs(markdown: str, outputs: dict[str, list[dict]], runs: list[dict] | None = None) -> str:
    """Put each tutorial cell's output under its code on a page.

    ``outputs`` maps a tutorial file name to its cell records (``run_cells``); ``runs`` are the
    committed GPU runs (``gpu_runs``). A cell whose code is split over several sections gets its
    output under the last of them that the page shows; a cell that prints nothing gets nothing.
    """
    runs = runs or []
    matches = list(CELL_FENCE.finditer(markdown))
    shown = {(m["file"], m["section"]) for m in matches}

    def cell_of(file: str, section: str) -> tuple[int, dict] | None:
        for i, rec in enumerate(outputs.get(file, [])):
            if section in rec["sections"]:
                return i, rec
        return None

    pieces, last = [], 0
    for m in matches:
        found = cell_of(m["file"], m["section"])
        if found is None:
            continue
        index, rec = found
        later = rec["sections"][rec["sections"].index(m["section"]) + 1:]
        if any((m["file"], s) in shown for s in later):
            continue  # the output goes under the last part of this cell on the page
        gpu_records = []
        for run in runs:
            cells = run["tutorials"].get(m["file"])
            gpu_records.append((run, cells[index] if cells and index < len(cells)
                                and cells[index]["sections"] == rec["sections"] else None))
        block = _output_block(rec, gpu_records if rec["gpu"] else [])
        if not block:
            continue
        indent = m["indent"]
        pieces += [markdown[last:m.end()], "\n\n", "\n".join(indent + line if line else "" for line in block)]
        last = m.end()
    pieces.append(markdown[last:])
    return "".join(pieces)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tutorials", nargs="*", type=Path, help="tutorial scripts (default: tutorials/NN_*.py)")
    parser.add_argument("--gpu", action="store_true", help="run with the GPU visible (needs CUDA)")
    parser.add_argument("--json", type=Path, help="with --gpu: write the run here (benchmarks/results/tutorials_<device>.json)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one tutorial, JSON on stdout
    args = parser.parse_args(argv)
    if args.child:
        (path,) = args.tutorials
        records = run_cells(path)
        sys.stdout.write(json.dumps(records))
        return
    if args.gpu:
        if args.json is None:
            parser.error("--gpu needs --json PATH (e.g. benchmarks/results/tutorials_NVIDIA_H100.json)")
        print(record_gpu_run(args.json))
        return
    for name, records in tutorial_outputs(args.tutorials or None, use_cache=False).items():
        for r in records:
            print(f"--- {name} {r['sections']}{' (GPU cell)' if r['gpu'] else ''}")
            print(r["stdout"], end="")


if __name__ == "__main__":
    main()
