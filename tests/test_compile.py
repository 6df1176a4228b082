"""torch.compile of the reference layer on the CPU: the top-k path is one whole graph (fullgraph=True,
dynamic=True) and matches eager; token rounding breaks the graph only where its pair count P is born."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import sonic_learn


def _step(module, moe, x):
    """Forward + backward with both router losses; returns (out, stats, grads)."""
    out = module(x)
    stats = moe.router_stats
    loss = out.square().sum() + stats.load_balancing_loss + stats.z_loss
    grads = torch.autograd.grad(loss, [x, moe.router_w, moe.w1, moe.w2])
    return out, stats, grads


def _compare_with_eager(backend: str, backward: str, token_counts=(7, 12)):
    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = sonic_learn.MoE(8, 4, 3, 2, backward=backward)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(moe, backend=counter, fullgraph=True, dynamic=True)
    for T in token_counts:
        x = torch.randn(T, 8, requires_grad=True)
        out, stats, grads = _step(compiled, moe, x)
        want_out, want_stats, want_grads = _step(moe, moe, x)
        torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert torch.equal(stats.tokens_per_expert, want_stats.tokens_per_expert)
        torch.testing.assert_close(stats.load_balancing_loss, want_stats.load_balancing_loss)
        torch.testing.assert_close(stats.z_loss, want_stats.z_loss)
    assert counter.frame_count == 1  # one graph, and a new token count did not recompile


@pytest.mark.parametrize("backward", ["reduced_memory", "standard"])
def test_topk_layer_is_one_graph(backward):
    """Dynamo + AOTAutograd (forward and backward traced), no inductor codegen: fast enough for CI."""
    _compare_with_eager("aot_eager", backward)


@pytest.mark.slow
def test_topk_layer_compiles_with_inductor():
    _compare_with_eager("inductor", "reduced_memory", token_counts=(5, 9))


def test_value_checks_run_in_eager():
    moe = sonic_learn.MoE(8, 4, 3, 2)
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="must not contain NaN"):
        moe(x)


def test_token_rounding_breaks_only_at_its_pair_count():
    """The routed pair count P of token rounding depends on the data (nonzero of the keep mask):
    that one op is the only reason dynamo gives for splitting the graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = sonic_learn.MoE(8, 4, 3, 2, routing="token_rounding", tile_m=4)
    x = torch.randn(10, 8)
    explanation = torch._dynamo.explain(moe)(x)
    reasons = {(str(b.reason).split("Explanation")[0].strip(), b.user_stack[-1].name) for b in explanation.break_reasons}
    assert explanation.graph_break_count >= 1
    assert {name for _, name in reasons} == {"token_rounding"}, reasons
    assert all("nonzero" in str(b.reason) for b in explanation.break_reasons), reasons
    torch.testing.assert_close(torch.compile(moe, dynamic=True, backend="aot_eager")(x), moe(x), rtol=1e-5, atol=1e-6)


def test_topk_layer_has_no_graph_break_without_fullgraph():
    """Plain torch.compile (fullgraph=False, what most users write) would split the graph silently
    at any data-dependent op, so count the breaks too."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = sonic_learn.MoE(8, 4, 3, 2)
    explanation = torch._dynamo.explain(moe)(torch.randn(6, 8))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
