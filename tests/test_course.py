"""Tests of the course: the grader scores the library's own implementations 100%, the untouched
starters 0% ("not implemented"), and deliberately broken variants fail the matching task with a
message that names the broken property. Also: JUnit XML, the CLI and its exit codes.

Examples per property are kept small (the pinned edge cases always run), so the file stays fast.
"""

from __future__ import annotations

import textwrap
from xml.etree import ElementTree as ET

import pytest
import torch
from hypothesis import strategies as st

from sonic_learn.course import all_assignments, get_assignment, grade, start, write_junit
from sonic_learn.course.__main__ import main
from sonic_learn.course.assignments import Assignment, Task
from sonic_learn.course.grader import junit_xml, print_report
from sonic_learn.properties import Property, expect

CPU_ASSIGNMENTS = ["topk", "routing", "grouped_gemm", "backward"]
FEW = 3  # drawn examples per property (plus the pinned ones)


def _write(directory, name: str, source: str):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(textwrap.dedent(source))
    return directory


def _task(report, function: str):
    return next(t for t in report.tasks if t.task.function == function)


def _status(report, function: str) -> dict[str, str]:
    return {r.name: r.status for r in _task(report, function).results}


# ----------------------------------------------------------------------------------------------
# The keys score 100%, the starters 0%
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CPU_ASSIGNMENTS)
def test_library_implementation_scores_full_marks(name):
    report = grade(get_assignment(name), reference=True, max_examples=FEW)
    failures = [(t.task.function, r.name, r.message) for t in report.tasks for r in t.results if not r.passed]
    assert failures == []
    assert report.full_marks and report.percent == pytest.approx(100.0)
    assert report.max_score == get_assignment(name).max_points
    if name == "backward":  # the saved bytes are shown, computed with the graded saved_bytes
        assert "reduced_memory" in report.shown and "standard" in report.shown


@pytest.mark.parametrize("name", CPU_ASSIGNMENTS)
def test_untouched_starter_scores_zero_with_not_implemented(tmp_path, name):
    start(name, tmp_path)
    report = grade(get_assignment(name), tmp_path, max_examples=FEW)
    assert report.score == 0 and not report.full_marks
    for t in report.tasks:
        for r in t.results:
            assert r.status == "not_implemented", (t.task.function, r.name, r.message)
            assert r.message.startswith("not implemented:") and "about" in r.message  # the length hint
            assert t.task.function in r.message  # names the function to write


@pytest.mark.compile
def test_gpu_exercise_key_compiles_for_sm90a_and_starter_does_not(tmp_path):
    from sonic_learn.fast._cute import cutlass_available

    ok, why = cutlass_available()  # imports cutlass with the arch pinned (importorskip would not pin it)
    if not ok:
        pytest.skip(why)
    a = get_assignment("cute_swiglu")
    key = grade(a, reference=True, max_examples=1)
    status = _status(key, "swiglu")
    assert status["compiles_for_sm90a"] == "passed" and status["ptx_sanity"] == "passed", [r.message for r in key.tasks[0].results]
    assert key.full_marks
    start("cute_swiglu", tmp_path)
    starter = grade(a, tmp_path, max_examples=1)
    assert _status(starter, "swiglu")["compiles_for_sm90a"] == "not_implemented"
    assert starter.score == 0


# ----------------------------------------------------------------------------------------------
# Broken variants fail the matching task, and the message points at the broken property
# ----------------------------------------------------------------------------------------------

KEY_IMPORTS = {
    "topk": "from sonic_learn.reference.topk import ordered_int_keys, bitonic_topk\n",
    "routing": "from sonic_learn.reference.routing import topk_routing, token_rounding, build_metadata\n",
    "grouped_gemm": "from sonic_learn.reference.grouped_gemm import naive_grouped_gemm, io_cost\n",
    "backward": "from sonic_learn.course.keys.backward import swiglu_backward, reduced_memory_backward, saved_bytes\n",
}

BROKEN = {
    # Ties go to the HIGHER column: sort the reversed row, map the columns back.
    ("topk", "radix_topk", "tie_rule", r"tie rule.*LOWER column"): """
        import torch
        from sonic_learn.reference.topk import radix_topk as _validated

        def radix_topk(x, k):
            _validated(x, k)  # the library's argument checks
            n = x.shape[-1]
            idx = n - 1 - torch.sort(-x.double().flip(-1), dim=-1, stable=True).indices[..., :k]
            return x.gather(-1, idx), idx
    """,
    # 'nearest' rounds exact halves UP (2r >= tile_m instead of 2r > tile_m).
    ("routing", "round_counts", "nearest_halves_down", r"EXACT HALF|exact halves.*DOWN"): """
        import torch
        from sonic_learn.reference.routing import round_counts as _validated

        def round_counts(counts, tile_m, mode="nearest", generator=None, *, num_tokens=None):
            _validated(counts, tile_m, mode, generator, num_tokens=num_tokens)  # the library's checks
            if mode != "nearest":
                return _validated(counts, tile_m, mode, generator, num_tokens=num_tokens)
            f = counts.long()
            lo = (f // tile_m) * tile_m
            r = f - lo
            out = torch.where(2 * r >= tile_m, lo + tile_m, lo)
            if num_tokens is not None:
                out = out.clamp(max=num_tokens)
            return out.to(counts.dtype)
    """,
    # The dH-kernel epilogue forgets the score: dA = dA' instead of s * dA'.
    ("backward", "dh_epilogue", "matches_autograd", r"WITHOUT the score factor"): """
        import torch
        from sonic_learn.reference.moe import swiglu

        def dh_epilogue(h, dA_prime, row_scores):
            acc = torch.float64 if h.dtype == torch.float64 else torch.float32
            a = swiglu(h)
            dS = (dA_prime.to(acc) * a.to(acc)).sum(dim=1)
            dH = swiglu_backward(h, dA_prime)  # BUG: the score factor is missing
            a_scaled = (a.to(acc) * row_scores.to(acc)[:, None]).to(h.dtype)
            return dH, dS, a_scaled
    """,
    # Off by one in the mask of an expert's last tile: its last row is never computed.
    ("grouped_gemm", "gather_fused_grouped_gemm", "agrees_with_oracle", r"never written.*LAST tile"): """
        import torch
        from sonic_learn.reference.grouped_gemm import gather_fused_grouped_gemm as _validated

        def gather_fused_grouped_gemm(x, w, meta, *, tile_m=128, out_dtype=None):
            _validated(x, w, meta, tile_m=tile_m, out_dtype=out_dtype)  # the library's checks
            out_dtype = out_dtype or x.dtype
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            counts, offsets = meta.expert_counts.tolist(), meta.expert_offsets.tolist()
            y = torch.empty(meta.num_rows, w.shape[2], dtype=out_dtype)
            for e in range(w.shape[0]):
                for m0 in range(0, counts[e], tile_m):
                    rows = slice(offsets[e] + m0, offsets[e] + min(m0 + tile_m, counts[e] - 1))  # BUG: - 1
                    y[rows] = (x[meta.gather_idx[rows].long()].to(acc) @ w[e].to(acc)).to(out_dtype)
            return y
    """,
}


@pytest.mark.parametrize("broken", list(BROKEN), ids=lambda b: f"{b[0]}.{b[1]}.{b[2]}")
def test_broken_variant_fails_the_matching_task(tmp_path, broken):
    name, function, prop, pattern = broken
    _write(tmp_path, name, KEY_IMPORTS[name] + textwrap.dedent(BROKEN[broken]))
    report = grade(get_assignment(name), tmp_path, max_examples=FEW)
    assert not report.full_marks
    for t in report.tasks:  # every other task is untouched (the library's functions) and passes
        if t.task.function != function:
            assert all(r.passed for r in t.results), (t.task.function, [r.message for r in t.results if not r.passed])
    broken_task = _task(report, function)
    assert broken_task.score < broken_task.task.points
    result = next(r for r in broken_task.results if r.name == prop)
    assert result.status == "failed"
    assert result.message.startswith(f"[{prop}]")  # the message names the property ...
    import re

    assert re.search(pattern, result.message, re.S), result.message  # ... and explains what broke
    assert "case:" in result.message  # ... on a concrete (shrunk) example


def test_naive_gemm_fails_the_fusion_property():
    """no_gathered_copy can fail: the naive GEMM (which builds the gathered copy) breaks it."""
    from sonic_learn.properties import run_property
    from sonic_learn.properties.grouped_gemm import gemm_properties
    from sonic_learn.reference.grouped_gemm import naive_grouped_gemm

    prop = next(p for p in gemm_properties(fused=True) if p.name == "no_gathered_copy")
    result = run_property(prop, naive_grouped_gemm, max_examples=1)
    assert result.status == "failed" and "gathered copy of x" in result.message


def test_feedback_is_reproducible_by_default_and_seed_changes_examples(tmp_path):
    key = next(b for b in BROKEN if b[0] == "topk")
    _write(tmp_path, "topk", KEY_IMPORTS["topk"] + textwrap.dedent(BROKEN[key]))
    a = get_assignment("topk")
    first = [r.message for r in _task(grade(a, tmp_path, max_examples=FEW), "radix_topk").results]
    again = [r.message for r in _task(grade(a, tmp_path, max_examples=FEW), "radix_topk").results]
    assert first == again  # derandomized: the same counterexample every run
    seeded = _task(grade(a, tmp_path, max_examples=FEW, seed=12345), "radix_topk")
    assert {r.name: r.status for r in seeded.results}["tie_rule"] == "failed"  # still caught on unseen examples


def test_cli_prints_messages_verbatim(tmp_path, capsys):
    """Messages hold brackets ("[tie_rule]", "offsets[e]"); the rich table must not eat them as markup."""
    key = next(b for b in BROKEN if b[0] == "topk")
    _write(tmp_path, "topk", KEY_IMPORTS["topk"] + textwrap.dedent(BROKEN[key]))
    assert main(["grade", "topk", str(tmp_path), "--max-examples", "1"]) == 1
    out = " ".join(capsys.readouterr().out.split())  # undo rich's line wrapping
    assert "[tie_rule] row" in out and "LOWER column" in out


def test_library_function_in_a_submission_is_flagged(tmp_path):
    _write(tmp_path, "topk", "from sonic_learn.reference.topk import ordered_int_keys, radix_topk, bitonic_topk\n")
    report = grade(get_assignment("topk"), tmp_path, max_examples=1)
    assert report.full_marks  # the grader cannot tell correctness apart ...
    assert all("library's own function" in t.warning for t in report.tasks)  # ... but it says so


def test_import_error_and_missing_function_score_zero_with_the_reason(tmp_path):
    _write(tmp_path / "a", "topk", "import not_a_module_at_all\n")
    report = grade(get_assignment("topk"), tmp_path / "a", max_examples=1)
    assert report.score == 0 and "ModuleNotFoundError" in report.import_error
    # The module's own FileNotFoundError or SystemExit is a failed import (score 0), not a missing submission.
    for sub, source, error in (("c", "open('/no/such/file.txt')\n", "FileNotFoundError"), ("d", "raise SystemExit(3)\n", "SystemExit")):
        report = grade(get_assignment("topk"), _write(tmp_path / sub, "topk", source), max_examples=1)
        assert report.score == 0 and report.import_error.startswith(error), report.import_error
    _write(tmp_path / "b", "topk", "from sonic_learn.reference.topk import ordered_int_keys\n")
    report = grade(get_assignment("topk"), tmp_path / "b", max_examples=1)
    assert "missing" in _task(report, "radix_topk").results[0].message
    assert _task(report, "ordered_int_keys").score == 1


# ----------------------------------------------------------------------------------------------
# Scoring of skipped properties, and the instructor's seed (on a synthetic one-function assignment)
# ----------------------------------------------------------------------------------------------


def _synthetic(*task_properties, points=(4, 3, 2)) -> Assignment:
    """An assignment ``synthetic.py`` whose tasks f0, f1, ... are graded by the given property lists."""
    tasks = tuple(Task(f"f{i}", points[i], f"task {i}", lambda props=props: list(props))
                  for i, props in enumerate(task_properties))
    return Assignment(0, "synthetic", "synthetic", "a test double", tasks, key="", page="")


def _passes(name, needs_cuda=False):
    return Property(name, "always holds", st.just(0), lambda fn, case: None, needs_cuda=needs_cuda)


def test_skipped_properties_are_left_out_of_the_score(tmp_path, monkeypatch, capsys):
    """A property that needs CUDA is skipped on a CPU machine: it counts neither for nor against."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fails = Property("fails", "never holds", st.just(0), lambda fn, case: expect(False, "[fails] by design"))
    gpu = _passes("gpu", needs_cuda=True)
    a = _synthetic([_passes("cpu"), gpu],  # f0: 1 of 1 ran, passed -> 4 / 4
                   [gpu],  # f1: nothing ran -> 0 / 0, left out of the total
                   [_passes("cpu"), fails, gpu])  # f2: 1 of 2 ran -> 1 / 2
    _write(tmp_path, "synthetic", "def f0(): pass\ndef f1(): pass\ndef f2(): pass\n")
    report = grade(a, tmp_path, max_examples=1)
    assert [r.status for t in report.tasks for r in t.results] == ["passed", "skipped", "skipped", "passed", "failed",
                                                                    "skipped"]
    assert [(t.score, t.max_score) for t in report.tasks] == [(4, 4), (0, 0), (1, 2)]
    assert (report.score, report.max_score) == (5, 6) and not report.full_marks
    suite = junit_xml([report]).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("6", "1", "3")

    only_cpu_work = _synthetic([_passes("cpu"), gpu], [gpu])  # every property that ran passed
    report = grade(only_cpu_work, tmp_path, max_examples=1)
    assert report.full_marks and report.percent == pytest.approx(100.0) and report.max_score == 4
    print_report(report, verbose=True)
    assert "skipped (needs a CUDA GPU)" in " ".join(capsys.readouterr().out.split())


def test_instructor_seed_changes_the_examples(tmp_path):
    """seed=None: the same examples on every run; an instructor's seed: other examples, reproducibly."""
    seen = []
    record = Property("record", "records its examples", st.integers(0, 2**62), lambda fn, case: seen.append(case))
    a = _synthetic([record])
    _write(tmp_path, "synthetic", "def f0(): pass\n")

    def examples(seed):
        seen.clear()
        report = grade(a, tmp_path, seed=seed, max_examples=20)
        assert report.full_marks and report.seed == seed
        return list(seen)

    derandomized = examples(None)
    assert len(set(derandomized)) > 1 and examples(None) == derandomized
    seeded_1 = examples(1)
    assert examples(1) == seeded_1  # an instructor can reproduce a student's grade
    assert seeded_1 != derandomized and examples(2) != seeded_1  # ... with examples the students have not seen


# ----------------------------------------------------------------------------------------------
# JUnit XML and the command line
# ----------------------------------------------------------------------------------------------


def test_junit_xml_is_written_and_parseable(tmp_path):
    start("topk", tmp_path / "hw")
    starter = grade(get_assignment("topk"), tmp_path / "hw", max_examples=1)
    key = grade(get_assignment("topk"), reference=True, max_examples=1)
    path = tmp_path / "out" / "junit.xml"
    write_junit([starter, key], path)
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 2
    n_props = sum(len(t.results) for t in starter.tasks)
    assert int(suites[0].get("tests")) == n_props and int(suites[0].get("failures")) == n_props
    assert int(suites[1].get("failures")) == 0
    case = suites[0].find("testcase")
    assert case.get("classname") == "topk.ordered_int_keys" and case.get("name") == "keys_preserve_order"
    assert case.find("failure").get("type") == "NotImplementedError"
    props = {p.get("name"): p.get("value") for p in suites[1].find("properties")}
    assert props["percent"] == "100.00" and props["seed"] == "derandomized"


def test_cli_list_start_grade_and_exit_codes(tmp_path, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in all_assignments():
        assert name in out

    hw = tmp_path / "hw"
    assert main(["start", "topk", str(hw)]) == 0
    assert (hw / "topk.py").is_file() and "grade topk" in (hw / "README.md").read_text()
    assert main(["start", "topk", str(hw)]) == 2  # refuses to overwrite the student's work
    assert "--force" in capsys.readouterr().err
    assert main(["start", "topk", str(hw), "--force"]) == 0

    junit = tmp_path / "j.xml"
    assert main(["grade", "topk", str(hw), "--max-examples", "1", "--junit", str(junit)]) == 1  # not full marks
    out = capsys.readouterr().out
    assert "not implemented" in out and "0%" in out
    ET.parse(junit)
    assert main(["grade", "topk", "--reference", "--max-examples", "1", "--seed", "3"]) == 0
    assert "100%" in capsys.readouterr().out

    assert main(["grade", "topk", str(tmp_path / "nowhere")]) == 2  # no topk.py there
    assert "start topk" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["grade", "nonsense", str(hw)])
    assert exc.value.code == 2
    assert "NAME must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["grade", "topk"])  # neither DIR nor --reference


def test_grade_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"directory must be the folder holding topk.py"):
        grade(get_assignment("topk"))
    with pytest.raises(TypeError, match=r"assignment must be an Assignment \(get_assignment\(name\)\), got str"):
        grade("topk", ".")
    with pytest.raises(ValueError, match="NAME must be one of"):
        get_assignment("nonsense")


# ----------------------------------------------------------------------------------------------
# The same property definitions, used the way the library's own tests can use them
# ----------------------------------------------------------------------------------------------

from hypothesis import given  # noqa: E402

from sonic_learn.properties import topk as topk_props  # noqa: E402
from sonic_learn.reference.topk import bitonic_topk, radix_topk  # noqa: E402


@given(case=topk_props.topk_cases(max_n=64))
def test_properties_drive_plain_hypothesis_tests(case):
    """A library test reuses a course property directly: @given(its strategy), then its check."""
    for fn in (radix_topk, bitonic_topk):
        topk_props.check_tie_rule(fn, case)
        topk_props.check_agrees_with_oracle(fn, case)
