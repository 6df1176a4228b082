"""MkDocs hooks of the sonic_learn site.

``on_page_markdown`` fills pages with text generated from the code and the measured results at
build time, so none can drift from them:

- the Benchmarks page: figures and tables drawn from the measured JSON files in
  ``benchmarks/results/`` (``docs/gen_benchmarks.py``), never a hand-typed number; the JSON files
  themselves are published next to it (``on_files``); and the token-rounding speed-ups, ours next
  to the paper's, wherever a page says ``<!-- token-rounding-speedups -->``;
- the CLI reference: the ``--help`` of ``python -m sonic_learn.compare`` and of each subcommand,
  from the tool's own argument parser;
- the Course page: the table of assignments defined in ``sonic_learn.course``;
- "Reading a CuTe-DSL kernel": the files of ``sonic_learn/fast`` with their docstrings' summaries,
  and which reference functions have a fast twin, read from the source with ``ast``;
- every page that shows cells of a tutorial (``tutorials/NN_*.py``): the output of each cell,
  executed on the CPU while the site builds (``docs/gen_tutorial_outputs.py``), and for GPU cells
  the committed GPU run, labelled with its device.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
from pathlib import Path

BENCHMARK_MARKER = "<!-- benchmark-tables -->"
TOKEN_ROUNDING_MARKER = "<!-- token-rounding-speedups -->"
CLI_MARKER = "<!-- cli-help -->"
COURSE_MARKER = "<!-- course-assignments -->"
FAST_FILES_MARKER = "<!-- fast-path-files -->"
FAST_TWINS_MARKER = "<!-- fast-path-twins -->"
FAST_PHASES_MARKER = "<!-- fast-path-phases -->"
REPO = Path(__file__).resolve().parent.parent


_GENERATORS: dict[str, object] = {}


def _generator(name: str):
    """A generator script of docs/ (``gen_benchmarks``, ``gen_tutorial_outputs``), loaded once."""
    if name not in _GENERATORS:
        path = Path(__file__).with_name(f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"sonic_learn_docs_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _GENERATORS[name] = module
    return _GENERATORS[name]


def tutorial_outputs_markdown(markdown: str) -> str:
    """The page with each included tutorial cell followed by its output (nothing to do on a page
    that shows no tutorial cell)."""
    gen = _generator("gen_tutorial_outputs")
    files = sorted({m["file"] for m in gen.CELL_FENCE.finditer(markdown)})
    if not files:
        return markdown
    outputs = gen.tutorial_outputs([gen.TUTORIALS_DIR / f for f in files])
    return gen.insert_outputs(markdown, outputs, gen.gpu_runs())


def cli_help_markdown() -> str:
    """The help of the compare tool and of every subcommand, as Markdown sections."""
    try:
        cli = importlib.import_module("sonic_learn.compare.__main__")
    except ModuleNotFoundError as exc:
        if exc.name not in ("sonic_learn.compare", "sonic_learn.compare.__main__"):
            raise  # the tool exists but a dependency is missing: say so, do not hide it
        cli = None
    build_parser = getattr(cli, "build_parser", None)
    if build_parser is None:
        return (
            '!!! warning "Not in this version"\n'
            "    `python -m sonic_learn.compare` is not available in this version of sonic_learn.\n"
        )
    old = {k: os.environ.get(k) for k in ("COLUMNS", "NO_COLOR", "TERM")}
    os.environ.update({"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"})  # plain, fixed-width help
    try:
        parser = build_parser()
        parser.prog = "python -m sonic_learn.compare"
        sections = ["## `python -m sonic_learn.compare`", "", "```text", parser.format_help().rstrip(), "```", ""]
        for action in parser._actions:  # argparse keeps subcommands in a _SubParsersAction
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    sub.prog = f"python -m sonic_learn.compare {name}"
                    sections += [f"## `{name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return "\n".join(sections)


def course_markdown(docs_dir: Path) -> str:
    """The assignments that ``sonic_learn.course`` defines, as a table (or a note if there are none)."""
    try:
        course = importlib.import_module("sonic_learn.course")
    except ModuleNotFoundError as exc:
        if exc.name != "sonic_learn.course":
            raise  # e.g. Hypothesis missing: the course exists, so the build must not pretend otherwise
        return '!!! warning "Not in this version"\n    `sonic_learn.course` is not available in this version.\n'
    rows = ["| # | Assignment | Your module | Tasks (points) | Needs |", "|---|---|---|---|---|"]
    for a in sorted(course.all_assignments().values(), key=lambda a: a.number):
        title = f"[{a.title}]({a.page})" if (docs_dir / a.page).is_file() else a.title
        tasks = ", ".join(f"`{t.function}` ({t.points})" for t in a.tasks)
        needs = "CuTe-DSL (compiles on a CPU, runs on a Hopper GPU)" if a.gpu else "a CPU"
        rows.append(f"| {a.number} | {title} | `{a.filename}` | {tasks} | {needs} |")
    return "\n".join(rows) + "\n"


def _module_info(path: Path) -> tuple[str, set[str]]:
    """(first paragraph of the docstring, public top-level names) of a module, read without importing
    it (the kernel modules import CuTe-DSL, which the docs build does not need)."""
    import ast  # noqa: PLC0415

    tree = ast.parse(path.read_text())
    doc = (ast.get_docstring(tree) or "").split("\n\n")[0].replace("\n", " ").strip()
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")}
    return doc, names


def fast_files_markdown() -> str:
    """One row per module of sonic_learn/fast: its file and the first paragraph of its docstring."""
    rows = ["| File | What it says it holds |", "|---|---|"]
    for path in sorted((REPO / "sonic_learn" / "fast").glob("*.py")):
        if path.name == "__init__.py":
            continue
        doc, _ = _module_info(path)
        doc = doc.replace("|", "\\|")
        rows.append(f"| `sonic_learn/fast/{path.name}` | {doc} |")
    return "\n".join(rows) + "\n"


def fast_twins_markdown() -> str:
    """For each public function of the references, whether a function of the same name exists in
    the fast module of the same name."""
    rows = ["| Reference function | Fast twin in this version |", "|---|---|"]
    for name in ("topk", "routing", "grouped_gemm", "moe"):
        _, ref_names = _module_info(REPO / "sonic_learn" / "reference" / f"{name}.py")
        fast_path = REPO / "sonic_learn" / "fast" / f"{name}.py"
        fast_names = _module_info(fast_path)[1] if fast_path.is_file() else set()
        import ast  # noqa: PLC0415

        ref_funcs = [n.name for n in ast.parse((REPO / "sonic_learn" / "reference" / f"{name}.py").read_text()).body
                     if isinstance(n, ast.FunctionDef) and n.name in ref_names]
        for func in ref_funcs:
            twin = f"`sonic_learn.fast.{name}.{func}`" if func in fast_names else "—"
            rows.append(f"| `sonic_learn.reference.{name}.{func}` | {twin} |")
    return "\n".join(rows) + "\n"


def _md_text(text: str) -> str:
    """Plain text for a Markdown page: no HTML, no emphasis, no links."""
    import html  # noqa: PLC0415

    text = html.escape(text, quote=False)
    for ch in "\\`*_[]$":
        text = text.replace(ch, "\\" + ch)
    return text


def fast_phases_markdown() -> str:
    """The named phases of every kernel and launcher in sonic_learn/fast: the ``# Phase N: ...`` and
    ``# Step N: ...`` comments, grouped by the function (or method) they sit in."""
    import ast  # noqa: PLC0415
    import re  # noqa: PLC0415

    phase = re.compile(r"^\s*#\s*(?:-+\s*)?((?:Phase|Step)\s+\d+\b.*?)\s*-*\s*$")
    out = []
    for path in sorted((REPO / "sonic_learn" / "fast").glob("*.py")):
        lines = path.read_text().splitlines()
        funcs = []  # (start, end, qualified name), innermost last
        def visit(node, prefix=""):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = prefix + child.name
                    if not isinstance(child, ast.ClassDef):
                        funcs.append((child.lineno, child.end_lineno, name))
                    visit(child, name + ".")
        visit(ast.parse("\n".join(lines)))
        groups: dict[str, list[str]] = {}
        for i, line in enumerate(lines, start=1):
            m = phase.match(line)
            if not m:
                continue
            inside = [f for f in funcs if f[0] <= i <= f[1]]
            if not inside:
                continue  # a section banner at module level, not a step of one function
            text = m.group(1).rstrip(" -")
            for more in lines[i:]:  # the comment may go on over the next lines
                stripped = more.strip()
                if not stripped.startswith("#") or phase.match(more) or stripped.strip("#- ") == "":
                    break
                text += " " + stripped.lstrip("#").strip()
            name = max(inside, key=lambda f: f[0])[2]
            groups.setdefault(name, []).append(_md_text(text))
        for name, steps in groups.items():
            out.append(f"- **`{name}`** (`sonic_learn/fast/{path.name}`)")
            out += [f"    - {step}" for step in steps]
    return "\n".join(out) + "\n" if out else "(no named phases found)\n"


def on_files(files, config):
    """Publish every results file under ``benchmarks/raw/``, so the Benchmarks page links its raw JSON."""
    from mkdocs.structure.files import File  # noqa: PLC0415

    gen = _generator("gen_benchmarks")
    for path in sorted(gen.RESULTS_DIR.glob("*.json")):
        files.append(File.generated(config, f"{gen.RAW_URI}/{path.name}", abs_src_path=str(path)))
    return files


def on_pre_build(config) -> None:
    """Run the tutorials not cached yet, two at a time, before the pages ask for them one by one."""
    _generator("gen_tutorial_outputs").tutorial_outputs()


def on_page_markdown(markdown: str, page, config, files) -> str:
    if BENCHMARK_MARKER in markdown:
        markdown = markdown.replace(BENCHMARK_MARKER, _generator("gen_benchmarks").render_results())
    if TOKEN_ROUNDING_MARKER in markdown:
        docs_root = "../" * page.file.src_uri.count("/")
        markdown = markdown.replace(TOKEN_ROUNDING_MARKER,
                                    _generator("gen_benchmarks").token_rounding_comparison(docs_root=docs_root))
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_help_markdown())
    if FAST_FILES_MARKER in markdown:
        markdown = markdown.replace(FAST_FILES_MARKER, fast_files_markdown())
    if FAST_TWINS_MARKER in markdown:
        markdown = markdown.replace(FAST_TWINS_MARKER, fast_twins_markdown())
    if FAST_PHASES_MARKER in markdown:
        markdown = markdown.replace(FAST_PHASES_MARKER, fast_phases_markdown())
    if COURSE_MARKER in markdown:
        markdown = markdown.replace(COURSE_MARKER, course_markdown(Path(config["docs_dir"])))
    return tutorial_outputs_markdown(markdown)
