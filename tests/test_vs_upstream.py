"""CPU tests of the side-by-side benchmark's pure parts (benchmarks/vs_upstream.py) and of the
upstream subprocess protocol (sonic_learn.compare.upstream), with a fake upstream package.

The fake ``sonicmoe`` takes upstream's layout (router (E, d), w1 as a (2n, d, E) view, w2 as a
(d, n, E) view), turns it back into ours and runs the reference layer: a run through the whole
protocol then checks our layout conversions, the file exchange and the oracle check.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from script_modules import load_script

from sonic_learn.compare import upstream as up
from sonic_learn.reference import moe as ref_moe


@pytest.fixture(scope="module")
def vs():
    return load_script("benchmarks/vs_upstream.py", "vs_upstream")


FAKE_SONICMOE = {
    "__init__.py": "",
    "enums.py": "import enum\nclass ActivationType(enum.Enum):\n    SWIGLU = 'swiglu'\n",
    "functional.py": textwrap.dedent("""
        from sonic_learn.reference.moe import moe_forward

        def moe_TC_softmax_topk_layer(x, router_w_EH, w1_2ndE, b1, w2_dnE, b2, k, stream, activation, flag):
            assert b1 is None and b2 is None and activation.value == "swiglu"
            # upstream's layout -> ours: (E, d) -> (d, E), (2n, d, E) -> (E, d, 2n), (d, n, E) -> (E, n, d)
            out = moe_forward(x, router_w_EH.t(), w1_2ndE.permute(2, 1, 0), w2_dnE.permute(2, 1, 0), k)
            return out, None, None
    """),
}


@pytest.fixture(scope="module")
def fake_site(tmp_path_factory) -> str:
    site = tmp_path_factory.mktemp("fake_upstream_site")
    (site / "sonicmoe").mkdir()
    for name, text in FAKE_SONICMOE.items():
        (site / "sonicmoe" / name).write_text(text)
    return str(site)


SHAPE = (24, 16, 8, 6, 2)  # (T, d, n, E, K)


def _case(vs, shape=SHAPE, seed=0) -> dict:
    return vs.make_inputs(shape, seed=seed, device="cpu", dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------
def test_parse_args_defaults_and_choices(vs):
    args = vs.parse_args([])
    assert args.config_names == ["7b", "30b", "e256"] and args.skip_impls == []
    args = vs.parse_args(["--configs", "1.4B, 120b", "--skip", "grouped_mm", "--reps", "5"])
    assert args.config_names == ["1.4b", "120b"] and args.skip_impls == ["grouped_mm"] and args.reps == 5
    assert vs.CONFIGS["30b"] == (32768, 4096, 1024, 128, 8)


def test_parse_args_gemm_variants(vs):
    """--gemm: one extra row per entry, a GemmConfig (every GEMM) or a LayerGemms (by role)."""
    from sonic_learn.fast import grouped_gemm as gg

    args = vs.parse_args(["--gemm", "ws:128x256x64:auto:sub32, up/dh=pingpong:128x128x64:auto"])
    assert list(args.gemm_variants) == ["ws:128x256x64:auto:sub32", "up/dh=pingpong:128x128x64:auto"]
    every, by_role = args.gemm_variants.values()
    assert isinstance(every, gg.GemmConfig) and every.epi_subtile == 32
    assert isinstance(by_role, gg.LayerGemms) and by_role.up.kernel == "pingpong" and by_role.dh.kernel == "pingpong"
    assert by_role.down == gg.DEFAULT_CONFIG
    assert vs.parse_args([]).gemm_variants == {}
    # upstream's own dH configuration (ping-pong, clusters of 2 along M) as a per-role row
    dh_c2 = vs.parse_args(["--gemm", "dh=pingpong:128x128x64:auto:c2"]).gemm_variants["dh=pingpong:128x128x64:auto:c2"]
    assert dh_c2.dh == gg.GemmConfig(kernel="pingpong", cluster_m=2) and dh_c2.up == gg.DEFAULT_CONFIG


def test_build_record_gives_every_variant_its_ratios(vs):
    def side(fwd, fwdbwd, peak):
        return {"fwd_ms": fwd, "fwdbwd_ms": fwdbwd, "fwd_peak_bytes": peak, "held_after_fwd_bytes": peak,
                "fwdbwd_peak_bytes": peak}

    row = {"config": "7b", "shape": {}, "sonic_learn": side(2.0, 4.0, 10), "sonic_learn[x]": side(1.0, 5.0, 20),
           "sonic_learn[repeat]": {"error": "boom"}, "grouped_mm": {"error": "skipped"},
           "upstream": side(1.5, 4.5, 10)}
    record = vs.build_record([row], {})
    r = record["rows"][0]
    assert r["ratios"]["fwd_upstream_over_ours"] == pytest.approx(0.75)
    assert r["ratios[x]"]["fwd_upstream_over_ours"] == pytest.approx(1.5)
    assert r["ratios[x]"]["fwdbwd_upstream_over_ours"] == pytest.approx(0.9)
    assert r["ratios[x]"]["fwdbwd_peak_ours_over_upstream"] == pytest.approx(2.0)
    assert r["ratios[repeat]"] == {}
    text = vs.summary(record)
    assert "sonic_learn[x]" in text and "ratios[x]" in text and "boom" in text


def test_local_rows_take_the_layers_in_turn_over_rounds(vs, monkeypatch):
    """Rounds alternate the layers (A B A B ...), times are medians over the rounds, and a layer
    that fails the oracle or raises is reported and never measured."""
    case = _case(vs)
    ref = vs.oracle(case)
    order, profiled, fake_ms = [], [], iter(range(1, 100))

    def measure(forward, leaves, dout, *, warmup, reps, kernels=False):
        order.append(forward.__defaults__[0].__name__)
        profiled.append(kernels)
        ms = float(next(fake_ms))
        return {"fwd_ms": ms, "fwdbwd_ms": 10 * ms, "fwd_peak_bytes": 1, "held_after_fwd_bytes": 1,
                "fwdbwd_peak_bytes": 1}

    monkeypatch.setattr(up, "measure_layer", measure)

    def good(x, rw, w1, w2, k):
        return ref_moe.moe_forward(x, rw, w1, w2, k)

    def wrong(x, rw, w1, w2, k):  # a planted bug: the output is off by 10%
        return 1.1 * ref_moe.moe_forward(x, rw, w1, w2, k)

    def broken(x, rw, w1, w2, k):
        raise RuntimeError("no kernel")

    good2 = lambda x, rw, w1, w2, k: good(x, rw, w1, w2, k)  # noqa: E731
    good2.__name__ = "good2"
    rows = vs.local_rows([("a", good), ("bug", wrong), ("err", broken), ("b", good2)], case, ref, warmup=1, reps=1,
                         rounds=3)
    assert order == ["good", "good2"] * 3
    assert rows["a"]["round_fwd_ms"] == [1.0, 3.0, 5.0] and rows["a"]["fwd_ms"] == 3.0
    assert rows["b"]["round_fwdbwd_ms"] == [20.0, 40.0, 60.0] and rows["b"]["fwdbwd_ms"] == 40.0
    assert rows["a"]["check"]["ok"] and rows["a"]["rounds"] == 3
    assert "tolerance" in rows["bug"]["error"] and "fwd_ms" not in rows["bug"]
    assert rows["err"]["error"] == "RuntimeError: no kernel"
    one = vs.local_rows([("a", good)], case, ref, warmup=1, reps=1)
    assert "round_fwd_ms" not in one["a"] and one["a"]["fwd_ms"] == 7.0
    assert not any(profiled)
    profiled.clear()
    vs.local_rows([("a", good), ("b", good2)], case, ref, warmup=1, reps=1, rounds=2, kernels=True)
    assert profiled == [True, True, False, False]  # --kernels: each row profiled once, in the first round


def test_kernel_table_counts_each_op_per_call():
    """``measure_layer(kernels=True)`` on the CPU (ATen ops stand in for kernels): one forward +
    backward of y = x @ w runs three matrix products (y, dx, dw), so ``aten::mm`` shows 3 launches
    per call, whatever the number of profiled calls; entries come largest first."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g).requires_grad_(True)
    w = torch.randn(32, 48, generator=g).requires_grad_(True)
    rec = up.measure_layer(lambda: x @ w, [x, w], torch.randn(64, 48, generator=g), warmup=1, reps=2, kernels=True)
    table = rec["kernels_fwdbwd"]
    by_name = {row["kernel"]: row for row in table}
    assert by_name["aten::mm"]["launches_per_call"] == 3 and by_name["aten::mm"]["us_per_call"] > 0
    assert [r["us_per_call"] for r in table] == sorted((r["us_per_call"] for r in table), reverse=True)
    assert x.grad is None and w.grad is None  # measure_layer leaves no gradients behind
    assert "kernels_fwdbwd" not in up.measure_layer(lambda: x @ w, [x, w], torch.randn(64, 48), warmup=1, reps=1)


@pytest.mark.parametrize("argv", [["--configs", "7b,13b"], ["--rounds", "0"], ["--configs", ","], ["--skip", "ours"], ["--reps", "0"],
                                  ["--gemm", "ws:128x256x64:auto,ws:128x256x64:auto"], ["--gemm", "up=nope:1x2x3:4"],
                                  ["--gemm", "upp=ws:128x256x64:auto"]])
def test_parse_args_rejects_bad_values(vs, argv, capsys):
    with pytest.raises(SystemExit):
        vs.parse_args(argv)
    assert "--" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The oracle and the check
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_matches_the_reference_loop_in_float64(vs, seed):
    """The float32 oracle against sonic_learn's float64 reference loop (independent code) on inputs
    whose router logits are exact in bf16 (so the bf16 rounding of the logits changes nothing)."""
    case = _case(vs, seed=seed)
    T, d, n, E, K = SHAPE
    case["x"] = case["x"].to(torch.bfloat16).float()
    case["router_w"] = torch.zeros(d, E)
    case["router_w"][torch.arange(E), torch.arange(E)] = 1.0  # logits = x[:, :E], exact
    ref = vs.oracle(case)
    leaves = [case[n].double().requires_grad_(True) for n in ("x", "router_w", "w1", "w2")]
    out = ref_moe.naive_moe_forward(*leaves, K)
    grads = torch.autograd.grad(out, leaves, case["dout"].double())
    for name, want in zip(("out", *up.GRAD_NAMES), (out, *grads)):
        assert vs.rel_err(ref[name], want) < 1e-5, name


def test_check_flags_a_wrong_gradient_and_nan(vs):
    case = _case(vs)
    ref = vs.oracle(case)
    good = {k: v.clone() for k, v in ref.items()}
    assert vs.check(good, ref)["ok"]
    bad = dict(good, dw1=good["dw1"] * 1.05)
    verdict = vs.check(bad, ref)
    assert not verdict["ok"] and verdict["errors"]["dw1"] == pytest.approx(0.05, rel=1e-3)
    nan = dict(good, out=good["out"].clone().index_fill_(0, torch.tensor([3]), float("nan")))
    assert vs.check(nan, ref)["errors"]["out"] == float("inf")


def test_grouped_mm_layer_matches_the_oracle_when_available(vs):
    """The torch._grouped_mm row's layer on the CPU (where this torch build runs it)."""
    case = _case(vs)
    try:
        leaves = vs._leaves(case)
        outputs = up.run_once(lambda: vs.grouped_mm_moe(*leaves, case["k"]), leaves, case["dout"])
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        pytest.skip(f"torch._grouped_mm does not run on this CPU build: {exc}")
    assert vs.check(outputs, vs.oracle(case), tol=1e-4)["ok"]


# ----------------------------------------------------------------------------------------------
# The subprocess protocol and the JSON, with a fake upstream
# ----------------------------------------------------------------------------------------------
def test_upstream_site_reasons(tmp_path, monkeypatch):
    monkeypatch.delenv(up.SITE_ENV, raising=False)
    site, why = up.upstream_site()
    assert site is None and up.SITE_ENV in why
    site, why = up.upstream_site(str(tmp_path))
    assert site is None and "no 'sonicmoe'" in why
    with pytest.raises(ValueError, match=up.SITE_ENV):
        up.run_upstream([], site=None)


def test_fake_upstream_end_to_end_json_layout(vs, fake_site, tmp_path):
    """Two problems through the worker subprocess: outputs come back in our layout and pass the
    oracle; timings and versions arrive; the record has the documented fields and ratios."""
    shapes = [SHAPE, (10, 8, 8, 4, 3)]
    cases = [_case(vs, s, seed=i) for i, s in enumerate(shapes)]
    runs, note = up.run_upstream(cases, site=fake_site, warmup=1, reps=2, timeout_s=600, workdir=str(tmp_path))
    assert note == "", note
    rows = []
    for shape, case, run in zip(shapes, cases, runs):
        ref = vs.oracle(case)
        row = vs.upstream_row(run, ref, note)
        assert "error" not in row, row
        assert row["check"]["ok"] and max(row["check"]["errors"].values()) < 1e-5
        assert set(up.RESULT_FIELDS) <= set(row) and row["fwd_ms"] > 0 and row["fwdbwd_ms"] > 0
        assert "sonic-moe" in row["versions"]
        ours = {"fwd_ms": row["fwd_ms"] * 2, "fwdbwd_ms": row["fwdbwd_ms"] / 2, "fwd_peak_bytes": 10,
                "held_after_fwd_bytes": 5, "fwdbwd_peak_bytes": 20}
        rows.append({"config": f"c{len(rows)}", "shape": dict(zip(("T", "d", "n", "E", "K"), shape)),
                     "sonic_learn": ours, "upstream": dict(row, fwd_peak_bytes=20, held_after_fwd_bytes=5,
                                                           fwdbwd_peak_bytes=40),
                     "grouped_mm": {"error": "skipped"}})
    record = vs.build_record(rows, {"sonic_learn": "x", "upstream": runs[0].record["versions"]})
    path = tmp_path / "out.json"
    path.write_text(json.dumps(record))
    back = json.loads(path.read_text())
    assert back["benchmark"] == "vs_upstream" and "device" in back["environment"]
    r0 = back["rows"][0]
    assert r0["ratios"]["fwd_upstream_over_ours"] == pytest.approx(0.5)
    assert r0["ratios"]["fwdbwd_upstream_over_ours"] == pytest.approx(2.0)
    assert r0["ratios"]["fwdbwd_peak_ours_over_upstream"] == pytest.approx(0.5)
    assert "check" in r0["upstream"] and "inputs" not in r0["upstream"]
    assert "upstream" in vs.summary(back)
    back["rows"][0]["upstream"]["kernels_fwdbwd"] = [{"kernel": "quack_gemm", "us_per_call": 12.5, "launches_per_call": 2}]
    assert "upstream kernel      12.5 us x2  quack_gemm" in vs.summary(back)


def test_fake_upstream_kernel_table_comes_back_from_the_worker(vs, fake_site, tmp_path):
    """``run_upstream(kernels=True)``: upstream's per-kernel table is measured in its own process
    (here the fake's ATen ops on the CPU) and arrives in the record; without it, no table."""
    runs, note = up.run_upstream([_case(vs)], site=fake_site, warmup=1, reps=1, workdir=str(tmp_path), kernels=True)
    assert note == "", note
    table = runs[0].record["kernels_fwdbwd"]
    assert table and all(set(r) == {"kernel", "us_per_call", "launches_per_call"} for r in table)
    assert any(r["kernel"].startswith("aten::") for r in table)
    runs, _ = up.run_upstream([_case(vs)], site=fake_site, warmup=1, reps=1, workdir=str(tmp_path))
    assert "kernels_fwdbwd" not in runs[0].record


def test_fake_upstream_with_a_layout_bug_fails_the_check(vs, fake_site, tmp_path, monkeypatch):
    """If the gradients were mapped back without the transpose, the oracle check must catch it."""
    case = _case(vs)
    runs, _ = up.run_upstream([case], site=fake_site, time_it=False, workdir=str(tmp_path))
    wrong = dict(runs[0].outputs, dw1=runs[0].outputs["dw1"].flip(0))  # experts shuffled
    verdict = vs.check(wrong, vs.oracle(case))
    assert not verdict["ok"] and verdict["errors"]["dw1"] > 0.1


def test_worker_error_and_missing_runs_are_reported(vs, tmp_path):
    broken = tmp_path / "broken_site"
    (broken / "sonicmoe").mkdir(parents=True)
    (broken / "sonicmoe" / "__init__.py").write_text("")  # no functional / enums modules
    runs, note = up.run_upstream([_case(vs)], site=str(broken), time_it=False, workdir=str(tmp_path))
    row = vs.upstream_row(runs[0], vs.oracle(_case(vs)), note)
    assert "ModuleNotFoundError" in row["error"]
    assert "did not reach" in vs.upstream_row(None, {}, "")["error"]
    assert vs.upstream_row(None, {}, "stopped after 5 s")["error"] == "stopped after 5 s"


# ----------------------------------------------------------------------------------------------
# The compare CLI's hook: available(setup) / build(case)
# ----------------------------------------------------------------------------------------------
def test_cli_hook_available_reasons(monkeypatch, fake_site):
    from types import SimpleNamespace

    cpu = SimpleNamespace(device=torch.device("cpu"), dtype=torch.bfloat16)
    assert up.available(cpu) == (False, "upstream sonic-moe runs on CUDA (Hopper/Blackwell) only")
    fp32 = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    assert up.available(fp32)[1] == "upstream sonic-moe supports bf16/fp16 only"
    bf16 = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    monkeypatch.delenv(up.SITE_ENV, raising=False)
    ok, why = up.available(bf16)
    assert not ok and up.SITE_ENV in why  # this test environment has no sonicmoe installed
    monkeypatch.setenv(up.SITE_ENV, fake_site)
    assert up.available(bf16) == (True, "")


def test_cli_hook_build_returns_upstream_outputs_and_its_own_timing(vs, monkeypatch, fake_site):
    from types import SimpleNamespace

    monkeypatch.setenv(up.SITE_ENV, fake_site)
    case = _case(vs)
    cli_case = SimpleNamespace(problem=SimpleNamespace(K=case["k"]), **{n: case[n] for n in ("x", "router_w", "w1", "w2", "dout")})
    run = up.build(cli_case, warmup=1, reps=2)
    out = run()
    assert len(out) == 5
    ref = vs.oracle(case)
    for name, got in zip(("out", *up.GRAD_NAMES), out):
        assert vs.rel_err(got, ref[name]) < 1e-5, name
    assert run.measured.timing.median_ms > 0 and run.measured.timing.reps == 2
    assert "upstream's process" in run.measured.timing.timer
