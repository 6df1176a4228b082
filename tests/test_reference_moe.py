"""Properties of the reference MoE layer: both backward modes == autograd on the naive loop,
the dS identity, and the activation memory each mode holds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import sonic_learn
from sonic_learn.reference import moe
from sonic_learn.reference.routing import build_metadata


def make_problem(T, d, n, E, dtype=torch.float64, seed=0, requires_grad=True):
    """O(1)-scaled inputs and weights (so a wrong SwiGLU or a missing factor shows up)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    router_w = torch.randn(d, E, generator=g, dtype=torch.float64)
    w1 = torch.randn(E, d, 2 * n, generator=g, dtype=torch.float64) / d**0.5
    w2 = torch.randn(E, n, d, generator=g, dtype=torch.float64) / n**0.5
    ts = [t.to(dtype).requires_grad_(requires_grad) for t in (x, router_w, w1, w2)]
    return ts


def grads(fn, inputs, seed=1):
    out = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    gs = torch.autograd.grad(out, inputs, dout, allow_unused=True)
    return out, [torch.zeros_like(i) if gi is None else gi for i, gi in zip(inputs, gs)]


problems = st.tuples(
    st.integers(0, 40),  # T
    st.integers(1, 12),  # d
    st.integers(1, 6),  # n
    st.integers(1, 6),  # E
).flatmap(lambda s: st.tuples(*(st.just(v) for v in s), st.integers(1, s[3])))  # K <= E


@settings(max_examples=30)
@given(
    problem=problems,
    backward=st.sampled_from(moe.BACKWARD_MODES),
    routing=st.sampled_from(moe.ROUTINGS),
    tile_m=st.sampled_from([1, 2, 3, 8]),
    seed=st.integers(0, 2**31 - 1),
)
@example(problem=(64, 16, 8, 8, 2), backward="reduced_memory", routing="topk", tile_m=4, seed=0)
@example(problem=(64, 16, 8, 8, 2), backward="standard", routing="token_rounding", tile_m=4, seed=0)
@example(problem=(0, 4, 2, 3, 2), backward="reduced_memory", routing="topk", tile_m=2, seed=0)
def test_both_backwards_match_autograd_on_naive_loop_float64(problem, backward, routing, tile_m, seed):
    T, d, n, E, K = problem
    inputs = make_problem(T, d, n, E, seed=seed)
    kw = dict(routing=routing, tile_m=tile_m)
    out, g = grads(lambda *a: moe.moe_forward(*a, K, backward=backward, **kw), inputs)
    out_ref, g_ref = grads(lambda *a: moe.naive_moe_forward(*a, K, **kw), inputs)
    assert out.shape == (T, d) and out.dtype == torch.float64
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(("x", "router_w", "w1", "w2"), g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backward", moe.BACKWARD_MODES)
@pytest.mark.parametrize("routing", moe.ROUTINGS)
def test_gradcheck_float64(backward, routing):
    inputs = make_problem(9, 5, 3, 4, seed=3)
    fn = lambda *a: moe.moe_forward(*a, 2, backward=backward, routing=routing, tile_m=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backward", moe.BACKWARD_MODES)
def test_float32_large_matches_float64_oracle(backward):
    T, d, n, E, K = 256, 64, 32, 16, 4
    x64 = make_problem(T, d, n, E, seed=11)
    x32 = [t.detach().float().requires_grad_(True) for t in x64]
    out, g = grads(lambda *a: moe.moe_forward(*a, K, backward=backward, tile_m=16), x32)
    out_ref, g_ref = grads(lambda *a: moe.naive_moe_forward(*a, K), x64)
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def _rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backward", moe.BACKWARD_MODES)
def test_bfloat16_error_within_2x_of_torch_same_dtype_loop(backward):
    """The tolerance rule: our bf16 error vs a float64 oracle is at most ~2x that of the plain
    PyTorch bf16 loop against the same oracle (relative, on O(1)-scaled inputs)."""
    T, d, n, E, K = 256, 64, 32, 16, 4
    x64 = make_problem(T, d, n, E, seed=5)
    xb = [t.detach().bfloat16().requires_grad_(True) for t in x64]
    # Same routing for all three: route with float64 logits computed from the bf16-rounded weights.
    xb64 = [t.detach().double().requires_grad_(True) for t in xb]
    out_ref, g_ref = grads(lambda *a: moe.naive_moe_forward(*a, K), xb64)
    out_b, g_b = grads(lambda *a: moe.moe_forward(*a, K, backward=backward, tile_m=16), xb)
    out_t, g_t = grads(lambda *a: moe.naive_moe_forward(*a, K), xb)
    for name, ours, torchs, ref in zip(("out", "x", "router_w", "w1", "w2"), [out_b, *g_b], [out_t, *g_t],
                                       [out_ref, *g_ref]):
        e_ours, e_torch = _rel_err(ours, ref), _rel_err(torchs, ref)
        assert e_ours <= 2 * e_torch + 1e-3, f"{name}: ours {e_ours:.2e} vs torch bf16 {e_torch:.2e}"


@settings(max_examples=20)
@given(problem=problems, seed=st.integers(0, 2**31 - 1))
def test_ds_identity(problem, seed):
    """<dO, Y> == <dA', A> for every routed row: the reduced-memory backward's key identity."""
    T, d, n, E, K = problem
    x, router_w, w1, w2 = [t.detach() for t in make_problem(T, d, n, E, seed=seed)]
    meta = build_metadata(moe.route(x, router_w, K))
    dout = torch.randn(T, d, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    rows, experts = meta.gather_idx.long(), torch.repeat_interleave(
        torch.arange(E), (meta.expert_offsets[1:] - meta.expert_offsets[:-1]).long())
    a = moe.swiglu(torch.einsum("pd,pdm->pm", x[rows], w1[experts]))  # (P, n)
    y = torch.einsum("pn,pnd->pd", a, w2[experts])  # (P, d)
    dA_prime = torch.einsum("pd,pnd->pn", dout[rows], w2[experts])  # (P, n)
    torch.testing.assert_close((dout[rows] * y).sum(1), (dA_prime * a).sum(1), rtol=1e-10, atol=1e-10)


def test_swiglu_backward_matches_autograd():
    h = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    dA = torch.randn(7, 5, dtype=torch.float64)
    (ref,) = torch.autograd.grad(moe.swiglu(h), h, dA)
    torch.testing.assert_close(moe.swiglu_backward(h.detach(), dA), ref)


@settings(max_examples=15)
@given(problem=problems, routing=st.sampled_from(moe.ROUTINGS), seed=st.integers(0, 2**31 - 1))
@example(problem=(128, 32, 16, 8, 4), routing="topk", seed=0)
def test_saved_bytes_match_closed_form(problem, routing, seed):
    T, d, n, E, K = problem
    x, router_w, w1, w2 = [t.detach().bfloat16() for t in make_problem(T, d, n, E, seed=seed)]
    P = moe.route(x, router_w, K, routing=routing, tile_m=2).num_pairs
    measured = {}
    for mode in moe.BACKWARD_MODES:
        saved = moe.saved_tensors(x, router_w, w1, w2, K, backward=mode, routing=routing, tile_m=2)
        measured[mode] = sum(s.nbytes for s in saved)
        expected = moe.expected_saved_bytes(T, d, n, E, P, backward=mode)["total"]
        assert measured[mode] == expected, (mode, saved)
        shapes = sorted(s.shape for s in saved)
        if mode == "reduced_memory":  # exactly X, H and the routing: no (P, d) tensor
            assert shapes == sorted([(T, d), (P, 2 * n), (P,), (E + 1,), (P,), (P,)]), saved
        else:  # gathered X and Y are (P, d)
            assert shapes == sorted([(P, d), (P, 2 * n), (P, d), (P,), (E + 1,), (P,), (P,)]), saved
    if P > 0:
        assert measured["standard"] > measured["reduced_memory"]
        assert measured["standard"] - measured["reduced_memory"] >= 2 * P * d * 2 - T * d * 2


def test_saved_bytes_paper_formula_7b_shape_scaled():
    """2Td + 4TKn bytes (bf16) plus routing, on a scaled-down 7B-like shape."""
    T, d, n, E, K = 512, 96, 16, 16, 4
    terms = moe.expected_saved_bytes(T, d, n, E, T * K)
    assert terms["X (T, d)"] + terms["H (P, 2n)"] == 2 * T * d + 4 * T * K * n


def test_moe_module_runs_and_matches_functional():
    torch.manual_seed(0)
    layer = sonic_learn.MoE(16, 8, 4, 2, tile_m=4, dtype=torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    out = layer(x)
    assert out.shape == x.shape
    ref = moe.naive_moe_forward(x.reshape(-1, 16), layer.router_w, layer.w1, layer.w2, 2)
    torch.testing.assert_close(out.reshape(-1, 16), ref)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_moe_module_fast_backend_refuses_clearly_without_cuda():
    layer = sonic_learn.MoE(16, 8, 4, 2, backend="fast", dtype=torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA"):  # on CPU tensors it must refuse clearly, never run silently
        layer(x)


def test_interleave_round_trip_and_meaning():
    E, d, n = 3, 4, 5
    w_concat = torch.randn(E, d, 2 * n, dtype=torch.float64)
    w_inter = moe.interleave_gate_up(w_concat)
    torch.testing.assert_close(moe.concat_gate_up(w_inter), w_concat)
    x = torch.randn(6, d, dtype=torch.float64)
    gate, up = (x @ w_concat[0])[:, :n], (x @ w_concat[0])[:, n:]
    torch.testing.assert_close(moe.swiglu(x @ w_inter[0]), up * torch.nn.functional.silu(gate))


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(k=0), ValueError, "k must satisfy 1 <= k <= 4"),
        (dict(k=5), ValueError, "k must satisfy"),
        (dict(tile_m=0), ValueError, "tile_m must satisfy 1 <= tile_m"),
        (dict(routing="expert_choice"), ValueError, "routing must be one of"),
        (dict(backward="fused"), ValueError, "backward must be one of"),
        (dict(x=torch.randn(5, 7, dtype=torch.float64)), ValueError, "router_w must have shape"),
        (dict(x=torch.randn(5, 8)), TypeError, "router_w must have the dtype of x"),
        (dict(x=torch.randn(5, 8, 2, dtype=torch.float64)), ValueError, "x must be 2-D"),
        (dict(x=torch.ones(5, 8, dtype=torch.int64)), TypeError, "x must have dtype in"),
        (dict(w2=torch.randn(4, 2, 8, dtype=torch.float64)), ValueError, "w2 must have shape"),
        (dict(w1=torch.randn(4, 8, 5, dtype=torch.float64)), ValueError, "w1 must have an even last dim"),
        (dict(x="not a tensor"), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, exc, match):
    x, router_w, w1, w2 = [t.detach() for t in make_problem(5, 8, 3, 4)]
    args = dict(x=x, router_w=router_w, w1=w1, w2=w2, k=2)
    kwargs = {}
    for key, v in change.items():
        (args if key in args else kwargs)[key] = v
    with pytest.raises(exc, match=match):
        moe.moe_forward(args["x"], args["router_w"], args["w1"], args["w2"], args["k"], **kwargs)


def test_nonfinite_input_rejected():
    x, router_w, w1, w2 = [t.detach() for t in make_problem(5, 8, 3, 4)]
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        moe.moe_forward(x, router_w, w1, w2, 2)
