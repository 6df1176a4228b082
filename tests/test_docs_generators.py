"""The build-time generators of the docs: benchmark tables, CLI help, course table, fast-path tables.

They put text generated from data and code into the pages, so they must show what is there and
nothing else: these tests feed them known inputs and check the Markdown they produce.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from script_modules import load_script

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    return load_script(f"docs/{name}.py", f"docs_{name}")


@pytest.fixture(scope="module")
def gen_benchmarks():
    return _load("gen_benchmarks")


@pytest.fixture(scope="module")
def hooks():
    return _load("hooks")


def test_no_results_means_not_yet_measured(gen_benchmarks, tmp_path: Path) -> None:
    text = gen_benchmarks.render_results(tmp_path)
    assert "Not yet measured" in text
    assert not re.search(r"\d+\.\d+ ms", text)


def _moe_row(impl: str, kind: str, tflops: float, speedup: float, saved: int, peak: int, status: str = "PASS") -> dict:
    return {"pair": "moe", "impl": impl, "kind": kind, "status": status, "speedup": speedup, "throughput": tflops,
            "throughput_unit": "TFLOP/s", "saved_bytes": saved, "peak_memory_bytes": peak}


def _suite(command: str, runs: list[tuple[dict, list[dict]]], **extra) -> dict:
    return {"suite": "benchmarks/cli_suite.py", "command": command, "environment": {"device": "NVIDIA H100 80GB HBM3"},
            **extra, "runs": [{"settings": {"problem": p}, "pairs": [{"pair": command, "problem": p, "rows": rows}]}
                              for p, rows in runs]}


SHAPE_A = {"T": 64, "d": 32, "n": 16, "E": 8, "K": 2}
SHAPE_B = {"T": 128, "d": 32, "n": 16, "E": 8, "K": 2}


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    """A tiny results folder: the compare tool's moe and topk suites, dated, without upstream."""
    moe = _suite("moe", [
        (SHAPE_A, [_moe_row("naive PyTorch loop", "baseline", 2.5, 1.0, 3 * 2**30, 4 * 2**30),
                   _moe_row("fast reduced-memory", "fast", 250.0, 100.0, 2**30, 2 * 2**30),
                   _moe_row("upstream sonic-moe", "upstream", None, None, None, None, status="n/a")]),
        (SHAPE_B, [_moe_row("naive PyTorch loop", "baseline", 5.0, 1.0, 6 * 2**30, 8 * 2**30),
                   _moe_row("fast reduced-memory", "fast", 400.0, 80.0, 2**31, 2**32)])], date="2031-01-02")
    topk = _suite("topk", [({**SHAPE_A, "E": e}, [
        {"impl": "torch.topk", "kind": "baseline", "status": "PASS", "speedup": 1.0},
        {"impl": "fast bitonic", "kind": "fast", "status": "PASS", "speedup": s}]) for e, s in ((64, 12.5), (128, 17.25))])
    (tmp_path / "cli_moe_NVIDIA_H100.json").write_text(json.dumps(moe))
    (tmp_path / "cli_topk_NVIDIA_H100.json").write_text(json.dumps(topk))
    return tmp_path


def _without_images(text: str) -> str:
    return re.sub(r"\(data:image/png;base64,[A-Za-z0-9+/=]+\)", "(png)", text)


def test_layer_figure_and_table_come_from_the_run(gen_benchmarks, results: Path) -> None:
    pytest.importorskip("matplotlib")
    text = _without_images(gen_benchmarks.render_results(results))
    assert "| T=64, d=32, n=16, E=8, K=2 | 2.5 (1.0x) | 250.0 (100.0x) | n/a |" in text
    assert "| T=128, d=32, n=16, E=8, K=2 | 5.0 (1.0x) | 400.0 (80.0x) | — |" in text
    # Device and date (the file's own date field) under every section that reads the file.
    assert text.count("*Measured on **NVIDIA H100 80GB HBM3**, 2031-01-02.") == 2  # layer + memory
    assert "[`cli_moe_NVIDIA_H100.json`](benchmarks/raw/cli_moe_NVIDIA_H100.json)" in text
    assert {"layer_tflops_cli_moe_NVIDIA_H100.png", "memory_saved_bytes_cli_moe_NVIDIA_H100.png",
            "memory_peak_memory_bytes_cli_moe_NVIDIA_H100.png", "topk_speedup_cli_topk_NVIDIA_H100.png"} <= set(gen_benchmarks.FIGURES)
    for png in gen_benchmarks.FIGURES.values():
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_topk_speedups_are_the_runs_own(gen_benchmarks, results: Path) -> None:
    pytest.importorskip("matplotlib")
    text = gen_benchmarks.render_results(results)
    assert "| 64 | 64 | 2 | 12.50 |" in text and "| 64 | 128 | 2 | 17.25 |" in text
    assert "time of `torch.topk` / time of the row" in text


def test_missing_files_say_what_writes_them(gen_benchmarks, results: Path) -> None:
    pytest.importorskip("matplotlib")
    text = gen_benchmarks.render_results(results)
    for section, command in (("### Against upstream SonicMoE", "benchmarks/vs_upstream.py"),
                             ("### Grouped GEMM against dense cuBLAS", "benchmarks/grouped_gemm.py"),
                             ("### Token rounding against top-k routing", "benchmarks/token_rounding.py")):
        body = text.split(section, 1)[1].split("\n### ", 1)[0]
        assert "Not measured yet" in body and command in body, section


def test_upstream_file_is_picked_up(gen_benchmarks, results: Path) -> None:
    pytest.importorskip("matplotlib")
    shape = {"T": 1000, "d": 100, "n": 10, "E": 8, "K": 2}
    doc = {"environment": {"device": "NVIDIA H100 80GB HBM3"}, "date": "2031-01-03",
           "rows": [{"config": "tiny", "shape": shape,
                     "sonic_learn": {"fwd_ms": 0.5, "fwdbwd_ms": 2.0, "fwdbwd_peak_bytes": 2**30},
                     "upstream": {"fwd_ms": 0.6, "fwdbwd_ms": 3.0, "fwdbwd_peak_bytes": 2**31}}]}
    (results / "vs_upstream_NVIDIA_H100.json").write_text(json.dumps(doc))
    text = gen_benchmarks.render_results(results)
    body = text.split("### Against upstream SonicMoE", 1)[1].split("\n### ", 1)[0]
    assert "Not measured yet" not in body
    assert "| tiny | T=1000, d=100, n=10, E=8, K=2 | sonic_learn | 0.500 | 2.000 | 1.00 | 1.00 |" in body
    assert "| tiny | T=1000, d=100, n=10, E=8, K=2 | upstream | 0.600 | 3.000 | 1.50 | 2.00 |" in body
    assert {"vs_upstream_vs_upstream_NVIDIA_H100.png", "vs_upstream_memory_vs_upstream_NVIDIA_H100.png"} <= set(gen_benchmarks.FIGURES)
    assert "2031-01-03" in body


def test_upstream_errors_and_other_baselines_are_shown(gen_benchmarks, results: Path) -> None:
    """The layout benchmarks/vs_upstream.py writes: a side may be an error, and other baselines
    (torch's grouped_mm) sit next to ours."""
    pytest.importorskip("matplotlib")
    shape = {"T": 1000, "d": 100, "n": 10, "E": 8, "K": 2}
    doc = {"environment": {"device": "NVIDIA H100 80GB HBM3"}, "rows": [{
        "config": "7b", "shape": shape, "ratios": {},
        "sonic_learn": {"check": {"ok": True}, "fwd_ms": 1.0, "fwdbwd_ms": 4.0, "fwdbwd_peak_bytes": 2**30},
        "grouped_mm": {"check": {"ok": True}, "fwd_ms": 3.0, "fwdbwd_ms": 10.0, "fwdbwd_peak_bytes": 3 * 2**30},
        "upstream": {"error": "upstream worker stopped after 210.0 s"}}]}
    (results / "vs_upstream_NVIDIA_H100_80GB_HBM3.json").write_text(json.dumps(doc))
    body = gen_benchmarks.render_results(results).split("### Against upstream SonicMoE", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in body.splitlines() if line.startswith("| 7b |")]
    assert [line.split("|")[3].strip() for line in lines] == ["sonic_learn", "upstream", "grouped_mm"]
    assert "not measured: upstream worker stopped after 210.0 s" in lines[1]
    assert lines[2].endswith("| 3.000 | 10.000 | 2.50 | 3.00 |")
    assert "Could not read" not in body


def _token_rounding_table(gen_benchmarks, tmp_path: Path, **layer_extra) -> str:
    """The table of a token_rounding file with one timed shape (and ``layer_extra`` speed-ups) and one
    shape that did not run."""
    sp = {"experts_only": {"fwd_time": 1.25, "fwd_bwd_time": 1.125},
          "layer": {"fwd_time": 0.75, "fwd_bwd_time": 1.0, **layer_extra}}
    doc = {"environment": {"device": "H200"}, "shapes": [
        {"T": 1024, "d": 64, "n": 32, "E": 4, "K": 2, "tile_m": 128, "ran": True, "speedup_token_rounding_over_topk": sp,
         "cost_model": {"topk": {"fwd_bwd_padded_flop_fraction": 0.25}}},
        {"T": 1024, "d": 64, "n": 32, "E": 8, "K": 2, "ran": False, "reason": "too big for int32"}]}
    (tmp_path / "token_rounding_H200.json").write_text(json.dumps(doc))
    return gen_benchmarks.token_rounding_table(gen_benchmarks.load_results(tmp_path)[0])


def test_token_rounding_table_reads_the_speedups(gen_benchmarks, tmp_path: Path) -> None:
    table = _token_rounding_table(gen_benchmarks, tmp_path)
    assert "| T=1024, d=64, n=32, E=4, K=2 | 4.0 | 25.0 % | 1.25x | 1.12x | 0.75x | 1.00x |" in table
    assert "not run: too big for int32" in table


@pytest.mark.parametrize("suffix, main, other", [("torch_glue", "fused glue", "torch glue"),
                                                  ("fused_glue", "torch glue", "fused glue")])
def test_token_rounding_table_names_the_glue_of_each_layer_column(gen_benchmarks, tmp_path: Path, suffix, main,
                                                                   other) -> None:
    """A file that timed the layer with both router glues: its default's columns and the other
    glue's column are named (files of today name the torch glue as the other, older ones the fused)."""
    table = _token_rounding_table(gen_benchmarks, tmp_path, **{f"fwd_bwd_time_{suffix}": 0.5})
    assert f"| layer fwd, {main} | layer fwd+bwd, {main} | layer fwd+bwd, {other} |" in table.splitlines()[0]
    assert "| T=1024, d=64, n=32, E=4, K=2 | 4.0 | 25.0 % | 1.25x | 1.12x | 0.75x | 1.00x | 0.50x |" in table
    assert table.splitlines()[1].count("|") == table.splitlines()[0].count("|")
    assert "not run: too big for int32" in table


def test_token_rounding_comparison_puts_ours_next_to_the_paper(gen_benchmarks, tmp_path: Path) -> None:
    text = gen_benchmarks.token_rounding_comparison(tmp_path)
    assert "+16.5 %" in text and "+9.4 %" in text  # the paper's numbers are always there
    assert "No measurement of ours is committed yet" in text
    sp = {"experts_only": {"fwd_time": 1.0, "fwd_bwd_time": 1.0, "fwd_tflops": 1.25, "fwd_bwd_tflops": 1.05},
          "layer": {"fwd_time": 0.5, "fwd_bwd_time": 0.5}}
    shapes = [{"T": 16384, "d": 1536, "n": 1024, "E": 128, "K": 2, "tile_m": 128, "speedup_token_rounding_over_topk": sp},
              {"T": 16384, "d": 1536, "n": 1024, "E": 32, "K": 2, "tile_m": 128, "speedup_token_rounding_over_topk": sp}]
    (tmp_path / "token_rounding_H200.json").write_text(json.dumps({"environment": {"device": "H200"}, "shapes": shapes}))
    text = gen_benchmarks.token_rounding_comparison(tmp_path, docs_root="../")
    row = next(line for line in text.splitlines() if line.startswith("| T=16384, d=1536, n=1024, E=128, K=2"))
    assert row.split("|")[2:7] == [" +16.5 % ", " +6.1 % ", " +9.4 % ", " +25.0 % ", " +5.0 % "]
    assert "| T=16384, d=1536, n=1024, E=32, K=2 | — | — | — | +25.0 % | +5.0 % |" in text
    assert "Ours (H200)" in text and "(../benchmarks/raw/token_rounding_H200.json)" in text


def test_a_file_of_another_layout_is_reported_not_hidden(gen_benchmarks, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "grouped_gemm_H200.json").write_text(json.dumps({"environment": {"device": "H200"}, "shapes": [1, 2]}))
    text = gen_benchmarks.render_results(tmp_path)
    assert "Could not read this file" in text and "`grouped_gemm_H200.json`" in text


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
        assert f"[`{f.name}`]({gen_benchmarks.RAW_URI}/{f.name})" in text
    assert "Could not read this file" not in text


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


# ---------------------------------------------------------------------------------------------
# Executed tutorials (docs/gen_tutorial_outputs.py)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gen_outputs():
    return _load("gen_tutorial_outputs")


TINY_TUTORIAL = '''# %% [markdown]
# A text cell.

# %%
# --8<-- [start:first]
x = 6 * 7
print("x is", x)
# --8<-- [end:first]

# %%
# --8<-- [start:quiet]
y = x + 1
# --8<-- [end:quiet]

# %%
# --8<-- [start:split_a]
print("part a")
# --8<-- [end:split_a]
# --8<-- [start:split_b]
print("part b, y =", y)
# --8<-- [end:split_b]

# %%
# --8<-- [start:gpu]
print("on the cpu")
if torch_cuda_is_available := False:  # GPU only: skipped on a CPU machine (torch.cuda.is_available())
    print("on the gpu")
# --8<-- [end:gpu]

# %%
# --8<-- [start:plot]
import matplotlib.pyplot as plt
plt.plot([0, 1], [1, 0])
# --8<-- [end:plot]
'''


def _page(*sections: str, indent: str = "") -> str:
    return "\n\n".join(f'{indent}```python\n{indent}--8<-- "tutorials/09_tiny.py:{s}"\n{indent}```' for s in sections) + "\n"


@pytest.fixture(scope="module")
def tiny_records(gen_outputs, tmp_path_factory):
    pytest.importorskip("matplotlib")
    path = tmp_path_factory.mktemp("tut") / "09_tiny.py"
    path.write_text(TINY_TUTORIAL)
    return gen_outputs.run_cells(path)


def test_cells_run_in_order_with_their_own_output(tiny_records) -> None:
    assert [r["sections"] for r in tiny_records] == [["first"], ["quiet"], ["split_a", "split_b"], ["gpu"], ["plot"]]
    assert tiny_records[0]["stdout"] == "x is 42\n"
    assert tiny_records[1]["stdout"] == ""
    assert tiny_records[2]["stdout"] == "part a\npart b, y = 43\n"  # the namespace carries over
    assert [r["gpu"] for r in tiny_records] == [False, False, False, True, False]
    assert len(tiny_records[4]["figures"]) == 1 and tiny_records[0]["figures"] == []


def test_outputs_go_under_their_cells(gen_outputs, tiny_records) -> None:
    page = _page("first", "quiet", "split_a", "split_b", "plot")
    text = gen_outputs.insert_outputs(page, {"09_tiny.py": tiny_records})
    first = text.index(':first"')
    assert text.index("x is 42") > first and text.index("x is 42") < text.index(':quiet"')
    # A cell that prints nothing gets no block; a split cell's output goes under its last part.
    between = text[text.index(':quiet"'):text.index(':split_a"')]
    assert "cell-output" not in between
    assert text.index("part a") > text.index(':split_b"')
    assert text.count('<div class="cell-output" markdown>') == 3  # first, split, plot
    assert "data:image/png;base64," in text[text.index(':plot"'):]


def test_output_follows_the_indentation_of_its_cell(gen_outputs, tiny_records) -> None:
    text = gen_outputs.insert_outputs(_page("first", indent="    "), {"09_tiny.py": tiny_records})
    assert '    <div class="cell-output" markdown>' in text and "    x is 42" in text


def test_a_backtick_fence_in_the_output_cannot_close_the_block(gen_outputs) -> None:
    lines = gen_outputs._fenced("```\nnot code\n")
    assert lines[0].startswith("````") and lines[-1] == "````"


def test_gpu_cells_show_the_committed_run_with_its_device(gen_outputs, tiny_records, tmp_path: Path) -> None:
    page = _page("gpu")
    without = gen_outputs.insert_outputs(page, {"09_tiny.py": tiny_records}, [])
    assert "on the cpu" in without and "no GPU run of the tutorials is committed yet" in without
    gpu_records = [dict(r) for r in tiny_records]
    gpu_records[3] = {**gpu_records[3], "stdout": "on the cpu\non the gpu\n"}
    run = {"environment": {"device": "NVIDIA H100 80GB HBM3"}, "date": "2031-02-03",
           "tutorials": {"09_tiny.py": gpu_records}}
    (tmp_path / "tutorials_NVIDIA_H100.json").write_text(json.dumps(run))
    runs = gen_outputs.gpu_runs(tmp_path)
    text = gen_outputs.insert_outputs(page, {"09_tiny.py": tiny_records}, runs)
    assert '=== "NVIDIA H100 80GB HBM3, run of 2031-02-03"' in text and "on the gpu" in text
    assert '=== "CPU, this build (GPU part skipped)"' in text
    assert text.index("NVIDIA H100 80GB HBM3, run of") < text.index("CPU, this build")  # the GPU tab opens first
    assert "earlier version" not in text
    # The cell changed since the GPU run: say so.
    gpu_records[3]["source_sha"] = "0" * 16
    stale = gen_outputs.insert_outputs(page, {"09_tiny.py": tiny_records}, [{**run, "file": "x.json"}])
    assert "Recorded with an earlier version of this cell" in stale


def test_a_failing_cell_fails_with_its_name(gen_outputs, tmp_path: Path) -> None:
    path = tmp_path / "09_broken.py"
    path.write_text("# %%\nprint('fine')\n\n# %%\nraise ValueError('planted')\n")
    with pytest.raises(RuntimeError, match=r"09_broken.py: code cell 2 failed(.|\n)*planted"):
        gen_outputs.run_cells(path)


def test_every_tutorial_is_found_by_the_glob(gen_outputs) -> None:
    found = [p.name for p in gen_outputs.tutorials()]
    assert found == sorted(p.name for p in (REPO / "tutorials").glob("[0-9][0-9]_*.py"))
    assert found[:5] == ["01_topk.py", "02_routing.py", "03_grouped_gemm.py", "04_backward.py", "05_moe_layer.py"]


@pytest.mark.parametrize("script", sorted((REPO / "tutorials").glob("[0-9][0-9]_*.py")), ids=lambda p: p.stem)
def test_code_cells_are_jupytexts(gen_outputs, script: Path) -> None:
    jupytext = pytest.importorskip("jupytext")
    expected = [c.source for c in jupytext.read(script).cells if c.cell_type == "code"]
    assert gen_outputs.code_cells(script.read_text()) == expected


def test_every_tutorial_cell_shown_on_a_page_has_its_output(gen_outputs) -> None:
    """The real thing, on the CPU: each tutorial page gets output blocks (cached between runs)."""
    outputs = gen_outputs.tutorial_outputs()
    for page in sorted((REPO / "docs").rglob("*.md")):
        md = page.read_text()
        files = {m["file"] for m in gen_outputs.CELL_FENCE.finditer(md)}
        if files:
            text = gen_outputs.insert_outputs(md, outputs, gen_outputs.gpu_runs())
            assert text.count('<div class="cell-output" markdown>') >= 3, page


def test_training_summary_is_the_files_own(gen_benchmarks, results: Path) -> None:
    doc = {"benchmark": "train_tiny_moe", "environment": {"device": "NVIDIA H200"}, "date": "2031-01-04",
           "config": {"layers": 4, "d": 256, "experts": 16, "top_k": 2, "tile_m": 128, "steps": 400},
           "summary": [{"routing": "topk", "tokens_per_expert_per_tile": 8, "seeds": 3, "final_val_loss_mean": 1.5,
                        "final_val_loss_min": 1.25, "final_val_loss_max": 1.75},
                       {"routing": "token_rounding", "tokens_per_expert_per_tile": 1, "seeds": 1,
                        "final_val_loss_mean": 2.125, "final_val_loss_min": 2.125, "final_val_loss_max": 2.125}]}
    (results / "train_tiny_moe_NVIDIA_H200.json").write_text(json.dumps(doc))
    body = gen_benchmarks.render_results(results).split("### Does token rounding hurt quality?", 1)[1].split("\n### ", 1)[0]
    assert "| topk | 8 | 3 | 1.5000 | 1.2500 | 1.7500 |" in body
    assert "| token_rounding | 1 | 1 | 2.1250 | 2.1250 | 2.1250 |" in body
    assert "NVIDIA H200" in body and "2031-01-04" in body and "400 steps" in body


def test_expert_parallel_medians_over_ranks(gen_benchmarks, results: Path) -> None:
    def rank(scale: float) -> dict:
        return {"route": 1e-3 * scale, "dispatch": 2e-3 * scale, "experts": 3e-3 * scale, "combine": 4e-3 * scale,
                "fwd_bwd": 10e-3 * scale, "rows_sent": 100, "rows_received": 90}

    rows = [{"config": "7b", "chunks": 2, "per_rank": [rank(1), rank(3), rank(2)], "model_rows_out_per_rank": 96}]
    doc = {"benchmark": "expert_parallel", "runs": [{"environment": {"device": "NVIDIA H100 80GB HBM3"},
                                                      "world_size": 3, "rows": rows}]}
    (results / "expert_parallel_NVIDIA_H100_80GB_HBM3.json").write_text(json.dumps(doc))
    body = gen_benchmarks.render_results(results).split("### Expert parallelism", 1)[1].split("\n## ", 1)[0]
    # the middle rank of three (scale 2), not the first or the mean
    assert "| 3 | 7b | 2 | 2.00 | 4.00 | 6.00 | 8.00 | 20.00 | 100 | 96 |" in body
    assert "NVIDIA H100 80GB HBM3" in body


def test_missing_training_and_parallel_files_say_what_writes_them(gen_benchmarks, results: Path) -> None:
    text = gen_benchmarks.render_results(results)
    for section, command in (("### Does token rounding hurt quality?", "benchmarks/train_tiny_moe.py"),
                             ("### Expert parallelism", "benchmarks/expert_parallel.py")):
        body = text.split(section, 1)[1].split("\n### ", 1)[0]
        assert "Not measured yet" in body and command in body, section
