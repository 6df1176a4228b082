"""The build-time generators of the docs: benchmark tables, CLI help, course table, fast-path tables.

They put text generated from data and code into the pages, so they must show what is there and
nothing else: these tests feed them known inputs and check the Markdown they produce.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_{name}", REPO / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen_benchmarks():
    return _load("gen_benchmarks")


@pytest.fixture(scope="module")
def hooks():
    return _load("hooks")


def test_no_results_means_not_yet_measured(gen_benchmarks, tmp_path: Path) -> None:
    text = gen_benchmarks.render_results(tmp_path)
    assert "Not yet measured" in text and "--json" in text
    assert not re.search(r"\d+\.\d+ ms", text)


def test_records_become_a_table_with_the_environment(gen_benchmarks, tmp_path: Path) -> None:
    doc = {
        "environment": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"},
        "pairs": [
            {"pair": "topk", "rows": [{"impl": "torch.topk", "median_ms": 0.125, "status": "PASS"},
                                      {"impl": "fast bitonic", "median_ms": 0.0625, "status": "PASS"}]},
        ],
    }
    (tmp_path / "compare_topk.json").write_text(json.dumps(doc))
    text = gen_benchmarks.render_results(tmp_path)
    assert "compare_topk.json" in text
    assert "**device** NVIDIA H100 80GB HBM3" in text and "**torch** 2.11.0" in text
    assert "| impl | median_ms | status |" in text
    assert "| torch.topk | 0.125 | PASS |" in text and "| fast bitonic | 0.0625 | PASS |" in text


def test_nested_results_keep_every_number_and_invent_none(gen_benchmarks, tmp_path: Path) -> None:
    doc = {"benchmark": "gemm", "environment": {"device": "H200"},
           "shapes": {"a": {"results": {"fused": {"median_ms": 1.25, "tflops": 301.5},
                                        "naive": {"median_ms": 1.5, "tflops": 251.25}}, "notes": {}}}}
    path = tmp_path / "gemm.json"
    path.write_text(json.dumps(doc))
    text = gen_benchmarks.render_file(path)
    assert "| **fused** | 1.25 | 301.5 |" in text and "| **naive** | 1.5 | 251.2 |" in text
    numbers_in = {1.25, 301.5, 1.5, 251.25}
    for cell in re.findall(r"\| ([0-9.]+) ", text):
        assert any(abs(float(cell) - x) <= 1e-3 * x for x in numbers_in), cell
    assert "notes" not in text  # empty objects are left out


def test_bad_file_fails_loudly(gen_benchmarks, tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(json.JSONDecodeError):
        gen_benchmarks.render_results(tmp_path)


def test_committed_results_render(gen_benchmarks) -> None:
    files = sorted(gen_benchmarks.RESULTS_DIR.glob("*.json"))
    text = gen_benchmarks.render_results()
    if not files:
        assert "Not yet measured" in text
    for f in files:
        assert f"`{f.name}`" in text


def test_cli_help_lists_every_subcommand(hooks) -> None:
    text = hooks.cli_help_markdown()
    for sub in ("topk", "routing", "grouped-gemm", "backward", "moe", "list"):
        assert f"## `{sub}`" in text, sub
    assert "--json" in text and "\x1b[" not in text  # plain text, no colour codes


def test_course_table_lists_the_assignments(hooks) -> None:
    import sonic_learn.course as course
    text = hooks.course_markdown(REPO / "docs")
    for a in course.all_assignments().values():
        assert f"`{a.filename}`" in text


def test_fast_path_tables_come_from_the_source(hooks) -> None:
    files = hooks.fast_files_markdown()
    for path in (REPO / "sonic_learn" / "fast").glob("*.py"):
        if path.name != "__init__.py":
            assert f"`sonic_learn/fast/{path.name}`" in files
    twins = hooks.fast_twins_markdown()
    assert "| `sonic_learn.reference.topk.bitonic_topk` | `sonic_learn.fast.topk.bitonic_topk` |" in twins
    assert "| `sonic_learn.reference.grouped_gemm.io_cost` | — |" in twins  # a cost model has no kernel
    phases = hooks.fast_phases_markdown()
    assert "BitonicTopK.kernel" in phases and "<" not in phases.replace("&lt;", "")


def test_timed_tables_get_a_plot(gen_benchmarks, tmp_path: Path) -> None:
    import base64

    pytest.importorskip("matplotlib")
    doc = {"environment": {"device": "H200"},
           "results": {"fused": {"median_ms": 1.25, "p20_ms": 1.2, "p80_ms": 1.3},
                       "naive": {"median_ms": 1.5, "p20_ms": 1.4, "p80_ms": 1.6}},
           "untimed": {"a": {"bytes": 1}, "b": {"bytes": 2}}}
    path = tmp_path / "gemm.json"
    path.write_text(json.dumps(doc))
    text = gen_benchmarks.render_file(path)
    plots = re.findall(r"!\[median time per row: ([^\]]*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    assert [title for title, _ in plots] == ["gemm / results"]  # the untimed table gets none
    assert base64.b64decode(plots[0][1])[:8] == b"\x89PNG\r\n\x1a\n"
