"""Tests of ``python -m sonic_learn.compare``: exit codes, JSON/CSV records, forced disagreements.

The CLI is called in-process (``main([...])``) on the tiny config with 2 repetitions; two
subprocess tests check ``--help`` and the default tour (no subcommand) end to end. Timings are
recorded, never asserted.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from sonic_learn.compare import CONFIGS, REGISTRY, get_config, run
from sonic_learn.compare.__main__ import main
from sonic_learn.compare.runner import FAULT_ENV

FAST = ["--config", "tiny", "--reps", "2", "--warmup", "0"]


def _run_json(tmp_path, *args) -> tuple[int, dict]:
    path = tmp_path / "out.json"
    code = main([*args, *FAST, "--json", str(path)])
    return code, json.loads(path.read_text())


def _rows(doc: dict, pair: str) -> dict[str, dict]:
    (p,) = [p for p in doc["pairs"] if p["pair"] == pair]
    return {r["impl"]: r for r in p["rows"]}


def _assert_checked_rows_pass(rows: dict[str, dict]) -> None:
    for name, r in rows.items():
        if r["status"] == "n/a":
            assert r["why"], f"{name}: an unavailable row must say why"
            continue
        assert r["status"] == "PASS", (name, r)
        a = r["agreement"]
        assert a["passed"] is True
        for k, err in a["max_rel_err"].items():
            assert err <= a["tolerance"][k], (name, k, err)
        assert all(m["differ"] == 0 for m in a["mismatches"].values()), (name, a["mismatches"])
        t = r["timing"]
        assert t["reps"] >= 2 and t["median_ms"] > 0 and t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]
        assert r["speedup"] is not None and r["speedup"] > 0


@pytest.mark.parametrize(
    ("pair", "expected"),
    [
        ("topk", {"torch.topk", "reference radix", "reference bitonic", "fast radix", "fast bitonic"}),
        ("routing", {"torch.topk + argsort", "reference top-k", "reference rounding nearest",
                     "reference rounding up", "reference rounding down"}),
        ("grouped-gemm", {"torch.matmul per-expert loop", "reference naive", "reference gather-fused"}),
        ("backward", {"naive PyTorch loop", "reference standard", "reference reduced-memory"}),
        ("moe", {"naive PyTorch loop", "reference standard", "reference reduced-memory",
                 "reference reduced-memory + token rounding", "upstream sonic-moe"}),
    ],
)
def test_pair_json_rows_agree(tmp_path, pair, expected):
    code, doc = _run_json(tmp_path, pair)
    assert code == 0
    assert doc["ok"] is True and doc["command"] == pair
    env = doc["environment"]
    assert env["device"] and env["torch"] == torch.__version__ and env["sonic_learn"]
    rows = _rows(doc, pair)
    assert expected <= set(rows)
    baseline = [r for r in rows.values() if r["kind"] == "baseline"]
    assert len(baseline) == 1 and baseline[0]["status"] == "PASS" and baseline[0]["speedup"] == pytest.approx(1.0)
    _assert_checked_rows_pass(rows)
    # every reference row ran here (the references run on the CPU)
    assert all(r["status"] == "PASS" for r in rows.values() if r["kind"] == "reference")
    if not torch.cuda.is_available():
        assert all(r["status"] == "n/a" for r in rows.values() if r["kind"] in ("fast", "upstream"))


def test_cost_columns_follow_the_cost_model(tmp_path):
    code, doc = _run_json(tmp_path, "grouped-gemm")
    assert code == 0
    rows = _rows(doc, "grouped-gemm")
    naive, fused = rows["reference naive"], rows["reference gather-fused"]
    p = get_config("tiny")
    # Both variants do the same useful FLOPs; gather fusion saves the gathered copy's traffic.
    assert naive["flops"] == fused["flops"] == 2 * p.T * p.K * p.d * 2 * p.n
    assert fused["bytes_moved"] < naive["bytes_moved"]
    assert naive["throughput_unit"] == "TFLOP/s" and naive["throughput"] > 0
    # issue 6's yardsticks: a dense GEMM and the weight-gradient loop, each checked on its own oracle
    dense, dw_loop = rows["torch.matmul dense (same M x K x N)"], rows["torch.matmul per-expert dW loop"]
    assert dense["kind"] == dw_loop["kind"] == "torch"
    assert dense["status"] == dw_loop["status"] == "PASS"
    assert dense["flops"] == dw_loop["flops"] == naive["flops"]
    assert set(dense["agreement"]["max_rel_err"]) == {"dense out"} and set(dw_loop["agreement"]["max_rel_err"]) == {"dW"}


def test_token_rounding_removes_padding(tmp_path):
    code, doc = _run_json(tmp_path, "routing", "--tile-m", "8")
    assert code == 0
    rows = _rows(doc, "routing")
    topk, rounded = rows["reference top-k"], rows["reference rounding nearest"]
    assert topk["cost_extra"]["pairs"] == 64 * 2
    assert rounded["wasted_flops"] == 0 and rounded["cost_extra"]["padded_rows"] == rounded["cost_extra"]["pairs"]
    assert rows["reference rounding up"]["cost_extra"]["pairs"] >= topk["cost_extra"]["pairs"]
    assert rows["reference rounding down"]["cost_extra"]["pairs"] <= topk["cost_extra"]["pairs"]


@pytest.mark.parametrize(("pair", "target"), [("topk", "reference bitonic"), ("grouped-gemm", "reference naive"),
                                              ("backward", "reference reduced-memory"),
                                              ("grouped-gemm", "torch.matmul per-expert dW loop"),
                                              ("grouped-gemm", "torch.matmul dense (same M x K x N)")])
def test_forced_disagreement_fails_and_is_not_timed(tmp_path, pair, target):
    code, doc = _run_json(tmp_path, pair, "--inject-fault", target)
    assert code == 1
    assert doc["ok"] is False
    rows = _rows(doc, pair)
    bad = rows[target]
    assert bad["status"] == "FAIL" and bad["agreement"]["passed"] is False
    assert bad["timing"] is None and bad["speedup"] is None
    others = {k: v for k, v in rows.items() if k != target}
    _assert_checked_rows_pass(others)


def test_forced_disagreement_through_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(FAULT_ENV, "reference rounding down")
    code = main(["routing", *FAST])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in out and "FAILED: routing/reference rounding down" in out


def test_memory_measured_equals_closed_form(tmp_path):
    path = tmp_path / "mem.json"
    assert main(["memory", "--config", "tiny", "--json", str(path)]) == 0
    mem = json.loads(path.read_text())["memory"]
    assert mem["ok"] is True
    totals = {m["backward"]: m for m in mem["modes"]}
    for m in totals.values():
        assert m["measured_total"] == m["expected_total"] > 0
        assert all(t["measured_bytes"] == t["expected_bytes"] for t in m["tensors"])
    p = get_config("tiny")
    b = torch.empty((), dtype=getattr(torch, mem["dtype"])).element_size()  # float32 on CPU, bf16 on CUDA
    # the standard backward additionally holds gathered X and Y, both (P, d), and not X (T, d)
    gap = totals["standard"]["measured_total"] - totals["reduced_memory"]["measured_total"]
    assert gap == 2 * p.T * p.K * p.d * b - p.T * p.d * b


def test_list_says_why_rows_are_unavailable(tmp_path):
    path = tmp_path / "list.json"
    assert main(["list", "--device", "cpu", "--json", str(path)]) == 0
    entries = json.loads(path.read_text())["implementations"]
    assert {e["pair"] for e in entries} == set(REGISTRY)
    for e in entries:
        if e["kind"] == "fast":
            assert e["available"] is False and "CUDA" in e["why"]
        if e["kind"] == "reference":
            assert e["available"] is True


def test_json_to_stdout_and_csv(tmp_path, capsys):
    csv_path = tmp_path / "rows.csv"
    assert main(["topk", *FAST, "--json", "-", "--csv", str(csv_path)]) == 0
    doc = json.loads(capsys.readouterr().out)  # stdout holds only the JSON document
    assert doc["pairs"][0]["pair"] == "topk"
    records = list(csv.DictReader(csv_path.open()))
    assert [r["impl"] for r in records] == [r["impl"] for r in doc["pairs"][0]["rows"]]
    for r in records:
        assert r["device_name"] and r["torch"] == torch.__version__ and r["T"] == "64"


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["topk", "-E", "8", "-K", "9"], "K .*must satisfy 1 <= K"),
        (["topk", "-T", "0"], "T .*must satisfy 1 <= T"),
        (["topk", "--config", "nope"], "config must be one of"),
        (["topk", "--dtype", "int8"], "invalid choice"),
        (["topk", "--reps", "0"], "--reps must be >= 1"),
        (["topk", "--device", "tpu"], "--device"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_a_gpu_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["topk", "--device", "cuda"])
    assert exc.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "routing.png"
    assert main(["routing", *FAST, "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_named_configs_come_from_the_paper():
    assert get_config("7B") == CONFIGS["7B-n256"]
    p = get_config("7b-n256")
    assert (p.T, p.d, p.n, p.E, p.K) == (24576, 1536, 256, 128, 8)
    q = get_config("qwen3-next-80b")
    assert (q.T, q.d, q.n, q.E, q.K) == (32768, 2048, 512, 512, 10)
    with pytest.raises(ValueError, match="config must be one of"):
        get_config("8B")
    with pytest.raises(ValueError, match="pair must be one of"):
        run("nope", p)


def _env():
    env = dict(os.environ)
    env.pop(FAULT_ENV, None)
    env["NO_COLOR"] = "1"
    return env


def test_help_subprocess():
    res = subprocess.run([sys.executable, "-m", "sonic_learn.compare", "--help"], capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert res.returncode == 0
    for word in ("topk", "routing", "grouped-gemm", "backward", "moe", "memory", "list", "--inject-fault",
                 "--tokens", "--config", "--allow-large"):
        assert word in res.stdout
    assert res.stdout.count("pair 1: radix select vs bitonic top-k") == 1  # each subcommand listed once
    examples = res.stdout[res.stdout.index("examples:"):]
    assert "python -m sonic_learn.compare topk -T 4096 -E 128 -K 8" in examples


def test_default_tour_subprocess():
    """The tour (no subcommand) prints the four pairs' tables as plain text (not a TTY)."""
    res = subprocess.run([sys.executable, "-m", "sonic_learn.compare", *FAST], capture_output=True, text=True,
                         env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    for title in ("top-k: radix select vs bitonic", "routing: token-choice top-k vs token rounding",
                  "grouped GEMM: gather + pad + GEMM vs gather-fused", "backward: standard vs reduced-memory"):
        assert title in res.stdout
    assert "all checked rows agree" in res.stdout
    assert "\x1b[" not in res.stdout  # no ANSI escapes when not a terminal
    assert res.stderr.strip() == ""  # no progress bar when stderr is not a terminal


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(device="tpu"), ValueError, r"device \(--device\) must be cpu, cuda or cuda:N"),
        (dict(device=3.5), TypeError, r"device \(--device\) must be a str or torch.device"),
        (dict(dtype=torch.int8), ValueError, r"dtype \(--dtype\) must be one of"),
        (dict(settings="fast"), TypeError, "settings must be a sonic_learn.compare.Settings"),
    ],
)
def test_run_rejects_bad_arguments_before_any_work(kwargs, exc, match):
    from sonic_learn import compare

    with pytest.raises(exc, match=match):
        compare.run("topk", compare.get_config("tiny"), **kwargs)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(reps=0), ValueError, r"reps \(--reps\) must satisfy 1 <= reps"),
        (dict(warmup=-1), ValueError, r"warmup \(--warmup\) must satisfy 0 <= warmup"),
        (dict(seed=1.5), TypeError, r"seed \(--seed\) must be an int"),
        (dict(min_time_s=-1.0), ValueError, "min_time_s must be a number of seconds >= 0"),
    ],
)
def test_settings_reject_bad_values(kwargs, exc, match):
    from sonic_learn.compare import Settings

    with pytest.raises(exc, match=match):
        Settings(**kwargs)


# ----------------------------------------------------------------------------------------------
# Rows: unsupported problems are n/a, anything else a row raises is a failure
# ----------------------------------------------------------------------------------------------
def _topk_rows_with(extra):
    from sonic_learn.compare.pairs import topk

    return [topk.ROWS[0], extra]  # the baseline (torch.topk) and the row under test


def test_a_row_that_raises_valueerror_fails_and_unsupported_is_na():
    """A kernel that rejects a problem it covers (ValueError) is a failing row, never a silent n/a;
    only UnsupportedProblem (outside the row's stated limits) makes a row n/a."""
    from sonic_learn.compare import Impl, Setup, UnsupportedProblem
    from sonic_learn.compare.pairs import topk
    from sonic_learn.compare.runner import run_pair

    def rejects(case):
        def run():
            raise ValueError("E must be a multiple of 8")
        return run

    def unsupported(case):
        raise UnsupportedProblem("takes E <= 4")

    setup, problem = Setup("cpu", torch.float32), get_config("tiny")
    for kind in ("fast", "reference", "upstream"):
        bad = Impl("rejects", kind, "bitonic", topk.TopkRow(select=None), rejects)
        res = run_pair(topk.SPEC, _topk_rows_with(bad), problem, setup)
        row = res.rows[1]
        assert row.status == "ERROR" and row.failed and "ValueError: E must be a multiple of 8" in row.why
        assert not res.ok
    skipped = Impl("unsupported", "fast", "bitonic", topk.TopkRow(select=None), unsupported)
    res = run_pair(topk.SPEC, _topk_rows_with(skipped), problem, setup)
    assert res.rows[1].status == "n/a" and "takes E <= 4" in res.rows[1].why and res.ok


def test_fast_rows_state_their_limits_as_unsupported_problem():
    from sonic_learn.compare import UnsupportedProblem, fast_kernels
    from sonic_learn.compare.pairs import grouped_gemm, layer, topk

    if fast_kernels.MISSING:
        pytest.skip(fast_kernels.MISSING)
    p = get_config("tiny")
    topk.fast_limits(p, torch.bfloat16, 16)  # E=8, K=2: inside the range
    with pytest.raises(UnsupportedProblem, match="E a multiple of 8"):
        topk.fast_limits(p.with_overrides(E=12), torch.bfloat16, 16)
    with pytest.raises(UnsupportedProblem, match="K <= 1"):
        topk.fast_limits(p, torch.bfloat16, 1)
    with pytest.raises(UnsupportedProblem, match="M tile"):
        grouped_gemm.fast_limits(p.with_overrides(tile_m=64), torch.bfloat16, "naive")
    with pytest.raises(UnsupportedProblem, match="bf16/fp16"):
        layer.fast_limits(p, torch.float32, "topk")
    assert not issubclass(UnsupportedProblem, ValueError)


def test_rows_are_keyed_by_typed_specs():
    from sonic_learn.compare import SPECS

    for key, spec in SPECS.items():
        assert spec.rows, key
        for impl in spec.rows:
            assert dataclasses.is_dataclass(impl.spec) and impl.spec.__dataclass_params__.frozen, (key, impl.name)


# ----------------------------------------------------------------------------------------------
# Before any work: output paths, the size of the problem
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the CLI starts comparing anything."""
    import sonic_learn.compare.__main__ as cli

    def boom(*args, **kwargs):
        raise AssertionError("the comparison started")

    monkeypatch.setattr(cli, "run_pair", boom)


@pytest.mark.parametrize("opt", ["--json", "--csv", "--plot"])
def test_unwritable_output_path_exits_2_before_any_work(opt, no_work, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["topk", *FAST, opt, "/nonexistent/dir/out.x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert opt in err and "/nonexistent/dir" in err and "does not exist" in err


def test_output_path_that_is_a_directory_exits_2(tmp_path, no_work, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["topk", *FAST, "--json", str(tmp_path)])
    assert exc.value.code == 2 and "--json" in capsys.readouterr().err


def test_paper_sized_problem_on_cpu_is_refused_with_the_estimate(no_work, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["moe", "--config", "7B", "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "estimated" in err and "GiB" in err and "TFLOP" in err and "--allow-large" in err


def test_estimate_follows_the_cost_model():
    from sonic_learn.compare import Setup, estimate

    setup = Setup("cpu", torch.float32)
    small, big = get_config("tiny"), get_config("7B")
    e_small = estimate.estimate("moe", small, setup, reps=5, warmup=1)
    e_big = estimate.estimate("moe", big, setup, reps=5, warmup=1)
    # 4 CPU rows x 7 calls x 18 P n d, plus the float64 oracle (2 routings x 18 P n d)
    P = big.T * big.K
    assert e_big.flops == pytest.approx((4 * 7 + 2) * 18 * P * big.n * big.d)
    assert e_big.memory_bytes > 8 * 2**30 > e_small.memory_bytes  # the 7B layer in float64 is many GiB
    assert estimate.refusal(e_big, setup) and estimate.refusal(e_small, setup) is None
    assert estimate.refusal(e_big, Setup("cpu", torch.float32)) is not None


def test_long_runs_report_progress_on_stderr_when_not_a_terminal(monkeypatch, capsys):
    from sonic_learn.compare import estimate

    monkeypatch.setattr(estimate, "LONG_RUN_SECONDS", 0.0)  # every run counts as long
    assert main(["topk", *FAST]) == 0
    err = capsys.readouterr().err
    assert "estimated" in err
    assert re.search(r"\[1/\d+ +\d+ s\] topk: check torch.topk", err)
    assert "topk: time reference bitonic" in err


# ----------------------------------------------------------------------------------------------
# What the records say about the machine and the timer
# ----------------------------------------------------------------------------------------------
def test_cpu_records_describe_the_cpu_timer(tmp_path, capsys):
    code, doc = _run_json(tmp_path, "topk", "--device", "cpu")
    assert code == 0
    assert "perf_counter" in doc["environment"]["timer"] and "cuda" not in doc["environment"]["timer"]
    assert main(["topk", *FAST, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "cuda-events" not in out and "timer perf_counter" in out
    device_line = next(line.rstrip() for line in out.splitlines() if line.startswith("device: "))
    assert "  " not in device_line and "(cpu)" in device_line


def test_cuda_index_is_reported_as_given(monkeypatch):
    """--device cuda:1 runs and is reported as cuda:1 (CUDA faked: this checks the bookkeeping)."""
    from sonic_learn import bench
    from sonic_learn.compare import Setup

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: f"GPU{torch.device(d).index}")
    assert str(Setup("cuda:1", torch.bfloat16).device) == "cuda:1"
    assert str(Setup("cuda", torch.bfloat16).device) == "cuda:0"
    env = bench.environment("cuda:1")
    assert env["device"] == "GPU1" and "cuda-events" in env["timer"]
    with pytest.raises(ValueError, match="sees 2 CUDA device"):
        Setup("cuda:5", torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Fault injection: small faults in every output must be caught
# ----------------------------------------------------------------------------------------------
def _cpu_rows():
    from sonic_learn.compare import SPECS, Setup

    setup = Setup("cpu", torch.float32)
    return [(key, impl.name) for key, spec in SPECS.items() for impl in spec.rows if impl.available(setup)[0]]


def _faulted(pair: str, target: str, spec=None):
    from sonic_learn.compare import SPECS, Settings, Setup
    from sonic_learn.compare.runner import run_pair

    spec = spec or SPECS[pair]
    res = run_pair(spec, spec.rows, get_config("tiny"), Setup("cpu", torch.float32),
                   Settings(reps=1, warmup=0, min_time_s=0.0, fault=target))
    return {r.impl: r for r in res.rows}[target], res


@pytest.mark.parametrize(("pair", "target"), _cpu_rows())
def test_a_small_fault_in_any_output_of_any_row_is_caught(pair, target):
    """Every output tensor of the row is corrupted in turn, floats by 2.5x the tolerance, integers by
    one; the check must catch each (else the row is an ERROR naming the missed output)."""
    row, res = _faulted(pair, target)
    assert row.status == "FAIL", (row.status, row.why)
    assert row.timing is None and not res.ok


def test_fault_is_just_above_the_tolerance():
    from sonic_learn.compare.runner import FAULT_MARGIN, corrupt_tensor, rel_err

    x = torch.randn(50, 7, dtype=torch.float64)
    for tol in (1e-10, 1e-5, 1.6e-2):
        err = rel_err(corrupt_tensor(x, tol), x)
        assert err == pytest.approx(FAULT_MARGIN * tol, rel=1e-6)
    idx = torch.arange(10)
    assert (corrupt_tensor(idx, 1e-5) != idx).sum() == 1


def test_planted_loose_judgement_lets_the_fault_through(monkeypatch):
    """The planted bug: errors judged against 20x their tolerance. The injected fault must then go
    unnoticed (ERROR, 'NOT caught'), where the real judgement reports FAIL."""
    from sonic_learn.compare import runner

    assert _faulted("grouped-gemm", "reference gather-fused")[0].status == "FAIL"

    def loose(a):
        a.passed = all(a.errors[k] <= 20 * a.tolerances[k] for k in a.errors) and not a.violations \
            and all(w == 0 for w, _ in a.mismatches.values())

    monkeypatch.setattr(runner, "_judge_agreement", loose)
    row, _ = _faulted("grouped-gemm", "reference gather-fused")
    assert row.status == "ERROR" and "NOT caught" in row.why


# the documented floors (README / TOLERANCE_RULE), written here independently of the runner
FLOORS = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("pair", ["topk", "grouped-gemm", "backward"])
def test_tolerances_are_twice_torchs_error_or_the_floor(pair):
    """Recompute every non-torch row's tolerance from the torch rows' errors: a rule made 20x too
    loose (the planted bug TOLERANCE_FACTOR = 40) fails here."""
    from sonic_learn.compare import Settings, run

    res = run(pair, get_config("tiny"), device="cpu", dtype=torch.float32, settings=Settings(reps=1, warmup=0))
    torch_rows = [r for r in res.rows if r.kind in ("baseline", "torch") and r.status == "PASS"]
    for r in res.rows:
        if r.kind in ("baseline", "torch") or r.agreement is None:
            continue
        for k, tol in r.agreement.tolerances.items():
            yard = max((q.agreement.errors[k] for q in torch_rows if k in q.agreement.errors), default=0.0)
            assert tol == pytest.approx(max(2 * yard, FLOORS[torch.float32])), (r.impl, k)


def test_planted_topk_check_that_ignores_indices_is_caught():
    from sonic_learn.compare.pairs import topk
    from sonic_learn.compare.runner import Agreement, rel_err

    def values_only(case, impl, out):  # the planted bug: the indices are never looked at
        return Agreement(errors={"values": rel_err(out[0], case.values)})

    row, _ = _faulted("topk", "reference bitonic", dataclasses.replace(topk.SPEC, compare=values_only))
    assert row.status == "ERROR" and "NOT caught" in row.why and "output[1] (int64)" in row.why
    assert _faulted("topk", "reference bitonic")[0].status == "FAIL"


def test_speedup_arithmetic_from_known_times(monkeypatch):
    """Times injected for the baseline and the rows: the speed-up and the rate follow exactly."""
    from sonic_learn.bench import Timing
    from sonic_learn.compare import Settings, Setup
    from sonic_learn.compare import runner
    from sonic_learn.compare.pairs import grouped_gemm

    known = {"torch.matmul per-expert loop": 6.0, "reference naive": 2.0, "reference gather-fused": 1.5}
    calls = []

    def fake_measure(fn, **kwargs):
        name = next(n for n, f in fns_by_id.items() if f is fn)
        calls.append(name)
        ms = known.get(name, 3.0)
        return Timing(median_ms=ms, p20_ms=ms, p80_ms=ms, reps=1, timer="fake")

    fns_by_id = {}
    real_build = {impl.name: impl.build for impl in grouped_gemm.ROWS}

    def recording(name):
        def build(case):
            fn = real_build[name](case)
            fns_by_id[name] = fn
            return fn
        return build

    rows = [dataclasses.replace(impl, build=recording(impl.name)) for impl in grouped_gemm.ROWS]
    monkeypatch.setattr(runner, "measure", fake_measure)
    res = runner.run_pair(grouped_gemm.SPEC, rows, get_config("tiny"), Setup("cpu", torch.float32),
                          Settings(reps=1, warmup=0))
    by = {r.impl: r for r in res.rows}
    assert by["torch.matmul per-expert loop"].speedup == 1.0
    assert by["reference naive"].speedup == 3.0 and by["reference gather-fused"].speedup == 4.0
    naive = by["reference naive"]
    assert naive.throughput == pytest.approx(naive.cost.flops / 2e-3 / 1e12)
    assert runner.speedup(6.0, 0.0) is None


# ----------------------------------------------------------------------------------------------
# On a GPU
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("pair", ["topk", "routing", "grouped-gemm", "backward", "moe"])
def test_gpu_fast_rows_pass_on_problems_they_cover(tmp_path, pair):
    """No fast row may fail or raise on the tiny and tour problems. On the tour (tile_m = 128) every
    kernel covers the problem, so every fast row PASSes; the tiny config's tile_m = 8 is outside the
    fast grouped GEMM's 128-row tile, so those rows may be n/a (UnsupportedProblem), never FAIL/ERROR."""
    for config in ("tiny", "tour"):
        path = tmp_path / f"{config}.json"
        code = main([pair, "--config", config, "--device", "cuda", "--reps", "2", "--json", str(path)])
        rows = _rows(json.loads(path.read_text()), pair)
        assert code == 0, {k: (r["status"], r["why"]) for k, r in rows.items() if r["status"] != "PASS"}
        fast = {k: r for k, r in rows.items() if r["kind"] == "fast"}
        allowed = ("PASS",) if config == "tour" else ("PASS", "n/a")
        assert fast and any(r["status"] == "PASS" for r in fast.values()), fast
        assert all(r["status"] in allowed for r in fast.values()), {k: (r["status"], r["why"]) for k, r in fast.items()}
        if config == "tiny":
            assert all("M tile is 128" in r["why"] for r in fast.values() if r["status"] == "n/a"), fast


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_second_device_is_used_and_reported(tmp_path):
    code, doc = _run_json(tmp_path, "topk", "--device", "cuda:1")
    assert code == 0
    assert doc["settings"]["device"] == "cuda:1" and doc["pairs"][0]["device"] == "cuda:1"
    assert doc["environment"]["device"] == torch.cuda.get_device_name(1)
    assert "cuda-events" in doc["environment"]["timer"]
