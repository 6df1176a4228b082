"""MkDocs hooks of the sonic_learn site.

``on_page_markdown`` fills the Benchmarks page with tables rendered from the measured JSON files in
``benchmarks/results/`` (see ``docs/gen_benchmarks.py``), so the page never holds a hand-typed number.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

MARKER = "<!-- benchmark-tables -->"


def _gen_benchmarks():
    path = Path(__file__).with_name("gen_benchmarks.py")
    spec = importlib.util.spec_from_file_location("sonic_learn_docs_gen_benchmarks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, _gen_benchmarks().render_results())
