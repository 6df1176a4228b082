"""The kernel ladders of top-k and token rounding: every step runs and gives the reference's answer.

* CPU: the ladder runner (``sonic_learn.fast.ladder.climb``) validates before it times and reports
  a wrong step as a failure; a bad ``step`` / ``selection`` is refused before any compile or launch.
* compile (CPU, sm_90a): step 1 of the top-k ladder (``RowwiseTopK``) compiles, without local-memory
  spills and without shared memory (it is one thread per row).
* GPU (marker ``gpu``): every step of both ladders equals the reference exactly, on data with ties,
  -0.0 next to +0.0 and infinities. ``python -m sonic_learn.fast.topk`` and
  ``python -m sonic_learn.fast.routing`` run the same checks and time each step.
"""

from __future__ import annotations

import re

import pytest
import torch

from sonic_learn.fast._cute import cutlass_available  # pins sm_90a before cutlass loads

_ok, _why = cutlass_available()
if not _ok:
    pytest.skip(_why, allow_module_level=True)

from sonic_learn.fast import ladder  # noqa: E402
from sonic_learn.fast import routing as fast_routing  # noqa: E402
from sonic_learn.fast import topk as fast_topk  # noqa: E402
from sonic_learn.reference import routing as ref_routing  # noqa: E402
from sonic_learn.reference import topk as ref_topk  # noqa: E402


# ---------------------------------------------------------------------------------------------
# CPU: the runner and the argument checks
# ---------------------------------------------------------------------------------------------
def _cpu_problem():
    return [ladder.Problem("rows of 16", lambda: (torch.randn(32, 16, generator=torch.Generator().manual_seed(0)),))]


def _exact(got, want):
    assert torch.equal(got, want), "differs from the reference"


def test_climb_validates_every_step_then_times_it(monkeypatch, capsys):
    monkeypatch.setattr(ladder, "fast_available", lambda: (True, "test"))
    steps = [ladder.Step("good", "the answer", lambda x: x.sort(dim=1).values),
             ladder.Step("wrong", "off by one in the last column", lambda x: x.sort(dim=1).values[:, :-1])]
    status = ladder.climb("demo", steps, reference=lambda x: x.sort(dim=1).values, agree=_exact,
                          problems=_cpu_problem(), argv=["--reps", "2"])
    out = capsys.readouterr().out
    assert status == 1
    assert re.search(r"good\s+ok\s+\d", out), out  # validated, then timed
    assert re.search(r"wrong\s+FAIL\s+differs from the reference", out), out
    assert "timer: bench.measure" in out


def test_climb_without_a_gpu_says_so(monkeypatch, capsys):
    monkeypatch.setattr(ladder, "fast_available", lambda: (False, "no CUDA device"))
    steps = [ladder.Step("only", "everything", lambda x: x)]
    assert ladder.climb("demo", steps, reference=lambda x: x, agree=_exact, problems=_cpu_problem(), argv=[]) == 2
    assert "Hopper GPU (sm_90): no CUDA device" in capsys.readouterr().out


def test_every_step_is_described():
    assert list(fast_topk.STEPS) == ["rowwise", "bitonic"]
    assert list(fast_routing.SELECTIONS) == ["torch", "kernels"]
    assert all(desc for desc in (*fast_topk.STEPS.values(), *fast_routing.SELECTIONS.values()))


def test_unknown_steps_are_refused_before_any_launch(monkeypatch):
    def _fail(*args, **kwargs):
        raise AssertionError("a kernel was compiled or launched for bad input")

    monkeypatch.setattr(fast_topk, "compiled", _fail)
    monkeypatch.setattr(fast_routing, "compiled", _fail)
    with pytest.raises(ValueError, match=r"step must be one of \('rowwise', 'bitonic'\), got 'insertion'"):
        fast_topk.bitonic_topk(torch.randn(4, 64), 8, step="insertion")
    with pytest.raises(ValueError, match=r"selection must be one of \('torch', 'kernels'\), got 'sort'"):
        fast_routing.token_rounding(torch.randn(4, 64), 2, selection="sort")


# ---------------------------------------------------------------------------------------------
# compile: step 1 of the top-k ladder
# ---------------------------------------------------------------------------------------------
@pytest.mark.compile
@pytest.mark.parametrize("dtype,n,k", [(torch.bfloat16, 128, 8), (torch.float16, 200, 3), (torch.float32, 64, 16)])
def test_rowwise_step_compiles_for_sm90a(dtype, n, k, tmp_path):
    ptx = fast_topk.compile_kernel("rowwise", dtype, n, k, extra_options=f"--keep-ptx --dump-dir={tmp_path}").__ptx__
    assert re.search(r"^\.target sm_90a\b", ptx, re.MULTILINE)
    assert ".local" not in ptx, "the k running keys must stay in registers"
    assert ".shared" not in ptx and "shfl" not in ptx, "step 1 is one thread per row: no sharing"


# ---------------------------------------------------------------------------------------------
# GPU: every step equals the reference
# ---------------------------------------------------------------------------------------------
def _rows_with_ties(rows, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (rows, n), generator=g).to(torch.float32) * 0.5  # few values: many ties
    u = torch.rand((rows, n), generator=g)
    x = torch.where((x == 0) & (u < 0.5), torch.tensor(-0.0), x)
    x = torch.where(u > 0.99, torch.tensor(float("inf")), x)
    x = torch.where(u < 0.01, torch.tensor(float("-inf")), x)
    return x.to(dtype).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("step", list(fast_topk.STEPS))
@pytest.mark.parametrize("dtype,n,k", [(torch.bfloat16, 128, 8), (torch.float16, 200, 3), (torch.float32, 64, 16),
                                       (torch.bfloat16, 4096, 16), (torch.float32, 8, 1)])
@pytest.mark.parametrize("style", ["ties", "normal"])
def test_topk_steps_equal_the_reference(step, dtype, n, k, style):
    x = _rows_with_ties(1000, n, dtype, 7) if style == "ties" else torch.randn(1000, n, dtype=dtype, device="cuda")
    values, indices = fast_topk.bitonic_topk(x, k, step=step)
    want_values, want_indices = ref_topk.radix_topk(x, k)
    assert torch.equal(indices, want_indices)
    bits = torch.int16 if x.element_size() == 2 else torch.int32
    assert torch.equal(values.view(bits), x.gather(-1, indices).view(bits))  # -0.0 comes back as -0.0
    assert torch.equal(values, want_values)


@pytest.mark.gpu
@pytest.mark.parametrize("selection", list(fast_routing.SELECTIONS))
@pytest.mark.parametrize("mode", ["nearest", "up", "down"])
def test_token_rounding_steps_equal_the_reference(selection, mode):
    logits = torch.randn(3000, 64, generator=torch.Generator().manual_seed(3)).cuda()
    got = fast_routing.token_rounding(logits, 4, tile_m=128, mode=mode, selection=selection)
    want = ref_routing.token_rounding(logits, 4, tile_m=128, mode=mode)
    for name in ("token_idx", "expert_idx", "scores"):
        assert torch.equal(getattr(got, name).to(getattr(want, name).dtype), getattr(want, name)), name
