"""Properties of the reference MoE layer: both backward modes == autograd on the naive loop and
on an independent float64 oracle (its own routing, every scoring, rounding mode and a generator),
the dS identity, and the activation memory each mode holds."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import sonic_learn
from sonic_learn.properties.backward import tensors_alive_after
from sonic_learn.properties.moe import oracle_moe_forward
from sonic_learn.properties.routing import MetaCase, random_routing
from sonic_learn.reference import moe
from sonic_learn.reference.routing import ROUNDING_MODES, SCORINGS, build_metadata


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


def _routing_kwargs(routing, scoring, rounding_mode, tile_m, seed):
    """Router options for moe_forward and the oracle; each call gets a fresh generator with ``seed``."""
    return dict(routing=routing, scoring=scoring, rounding_mode=rounding_mode, tile_m=tile_m,
                generator=torch.Generator().manual_seed(seed))


@settings(max_examples=30)
@given(
    problem=problems,
    backward=st.sampled_from(moe.BACKWARD_MODES),
    routing=st.sampled_from(moe.ROUTINGS),
    scoring=st.sampled_from(SCORINGS),
    rounding_mode=st.sampled_from(ROUNDING_MODES),
    tile_m=st.sampled_from([1, 2, 3, 8]),
    seed=st.integers(0, 2**31 - 1),
)
@example(problem=(48, 8, 4, 6, 2), backward="reduced_memory", routing="token_rounding", scoring="topk_softmax",
         rounding_mode="stochastic", tile_m=8, seed=0)
@example(problem=(48, 8, 4, 6, 2), backward="standard", routing="topk", scoring="topk_softmax",
         rounding_mode="up", tile_m=8, seed=1)
def test_forward_and_grads_match_independent_oracle_float64(problem, backward, routing, scoring, rounding_mode,
                                                            tile_m, seed):
    """moe_forward == oracle_moe_forward (routing of its own) for every router option, values and grads."""
    T, d, n, E, K = problem
    inputs = make_problem(T, d, n, E, seed=seed)
    out, g = grads(lambda *a: moe.moe_forward(*a, K, backward=backward,
                                              **_routing_kwargs(routing, scoring, rounding_mode, tile_m, seed)), inputs)
    out_ref, g_ref = grads(lambda *a: oracle_moe_forward(*a, K, **_routing_kwargs(routing, scoring, rounding_mode,
                                                                                  tile_m, seed)), inputs)
    # float64 on O(1) values: both sum the same few products in a different order (~1e-15 apart).
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(("x", "router_w", "w1", "w2"), g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("routing, scoring, rounding_mode", [
    ("topk", "softmax_topk", "nearest"), ("topk", "topk_softmax", "nearest"),
    *[("token_rounding", s, m) for s in SCORINGS for m in ROUNDING_MODES]])
def test_every_router_option_reaches_the_layer(routing, scoring, rounding_mode):
    """Each option changes the layer's output, and moe_forward follows the oracle on every one of them
    (so a route() that drops scoring, rounding_mode or the generator cannot pass)."""
    T, d, n, E, K, tile_m = 96, 8, 4, 6, 2, 8  # loads ~32 +- a few: every rounding mode moves some expert
    x, router_w, w1, w2 = [t.detach() for t in make_problem(T, d, n, E, seed=21)]

    def layer(fn, **over):
        kw = {**_routing_kwargs(routing, scoring, rounding_mode, tile_m, seed=5), **over}
        return fn(x, router_w, w1, w2, K, **kw)

    out = layer(moe.moe_forward)
    torch.testing.assert_close(out, layer(oracle_moe_forward), rtol=1e-10, atol=1e-10)
    # The option under test matters here: flipping it changes the oracle's output.
    other_scoring = [s for s in SCORINGS if s != scoring][0]
    assert not torch.allclose(out, layer(oracle_moe_forward, scoring=other_scoring))
    if routing == "token_rounding":
        for other_mode in ROUNDING_MODES:
            if other_mode != rounding_mode:
                assert not torch.allclose(out, layer(oracle_moe_forward, rounding_mode=other_mode)), other_mode
    if rounding_mode == "stochastic" and routing == "token_rounding":  # the generator decides the draw
        other_seed = layer(moe.moe_forward, generator=torch.Generator().manual_seed(6))
        torch.testing.assert_close(other_seed, layer(oracle_moe_forward, generator=torch.Generator().manual_seed(6)),
                                   rtol=1e-10, atol=1e-10)
        assert not torch.allclose(out, other_seed)


@pytest.mark.parametrize("backward", moe.BACKWARD_MODES)
@pytest.mark.parametrize("routing", moe.ROUTINGS)
def test_gradcheck_float64(backward, routing):
    inputs = make_problem(9, 5, 3, 4, seed=3)
    fn = lambda *a: moe.moe_forward(*a, 2, backward=backward, routing=routing, tile_m=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def _rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _max_err(a, ref):
    return (a.double() - ref).abs().max().item()


@pytest.mark.parametrize("backward", moe.BACKWARD_MODES)
def test_float32_large_within_2x_of_torch_same_dtype_loop(backward):
    """float32 output and gradients vs a float64 oracle on the SAME (float32-rounded) inputs: the
    largest error is at most 2x that of the plain PyTorch float32 loop, plus 2 ulp of the scale.

    Why not a fixed tolerance: the error is mostly the router's. The float32 logits (|logit| ~ 8)
    carry ~1e-6 absolute error, which the softmax turns into a relative error of the scores: about
    20 float32 ulp of the output's scale here, the same for torch's own loop. A fixed rtol=atol=1e-4
    allowed ~100x more than that."""
    T, d, n, E, K = 256, 64, 32, 16, 4
    x32 = [t.detach().float().requires_grad_(True) for t in make_problem(T, d, n, E, seed=11)]
    out_ref, g_ref = grads(lambda *a: oracle_moe_forward(*a, K), x32)  # float64 on the float32 values
    out, g = grads(lambda *a: moe.moe_forward(*a, K, backward=backward, tile_m=16), x32)
    out_t, g_t = grads(lambda *a: oracle_moe_forward(*a, K, dtype=torch.float32), x32)  # no library code
    eps = torch.finfo(torch.float32).eps
    for name, ours, torchs, ref in zip(("out", "x", "router_w", "w1", "w2"), [out, *g], [out_t, *g_t],
                                       [out_ref, *g_ref]):
        e_ours, e_torch = _max_err(ours, ref), _max_err(torchs, ref)
        floor = 2 * eps * ref.abs().max().item()
        assert e_ours <= 2 * e_torch + floor, f"{name}: ours {e_ours:.2e} vs torch float32 {e_torch:.2e}"


@pytest.mark.parametrize("backward", moe.BACKWARD_MODES)
def test_bfloat16_error_within_2x_of_torch_same_dtype_loop(backward):
    """The tolerance rule: our bf16 error vs a float64 oracle is at most ~2x that of the plain
    PyTorch bf16 loop against the same oracle (relative, on O(1)-scaled inputs)."""
    T, d, n, E, K = 256, 64, 32, 16, 4
    x64 = make_problem(T, d, n, E, seed=5)
    xb = [t.detach().bfloat16().requires_grad_(True) for t in x64]
    # The oracle and torch's bf16 loop share no code with the library (a bug there cannot hide in the
    # baseline); the oracle is float64 on the bf16-rounded values.
    out_ref, g_ref = grads(lambda *a: oracle_moe_forward(*a, K), xb)
    out_b, g_b = grads(lambda *a: moe.moe_forward(*a, K, backward=backward, tile_m=16), xb)
    out_t, g_t = grads(lambda *a: oracle_moe_forward(*a, K, dtype=torch.bfloat16), xb)
    for name, ours, torchs, ref in zip(("out", "x", "router_w", "w1", "w2"), [out_b, *g_b], [out_t, *g_t],
                                       [out_ref, *g_ref]):
        e_ours, e_torch = _rel_err(ours, ref), _rel_err(torchs, ref)
        assert e_ours <= 2 * e_torch, f"{name}: ours {e_ours:.2e} vs torch bf16 {e_torch:.2e}"


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |v| (float64 in, float64 out; the subnormal spacing near zero)."""
    mant = -int(math.log2(torch.finfo(dtype).eps))  # explicit mantissa bits: 7, 10, 23
    _, exponent = torch.frexp(v)  # |v| = m * 2**exponent, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(v), exponent - 1 - mant).clamp_min(torch.finfo(dtype).tiny * 2.0**-mant)


@settings(max_examples=40)
@given(T=st.integers(0, 40), d=st.integers(1, 24), E=st.integers(1, 16), pairs_per_token=st.integers(0, 16),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), seed=st.integers(0, 2**31 - 1))
@example(T=64, d=32, E=16, pairs_per_token=16, dtype=torch.bfloat16, seed=0)
@example(T=64, d=32, E=8, pairs_per_token=1, dtype=torch.bfloat16, seed=1)
def test_aggregate_accumulates_in_float32_and_rounds_once(T, d, E, pairs_per_token, dtype, seed):
    """aggregate() == the exact weighted sum rounded once to the rows' dtype, bounded directly:
    |out - exact| <= ulp(out)/2 + (c + 1) * 2**-24 * sum |s r| for a token with c rows (float32
    products and c - 1 float32 adds, Higham's recursive-summation bound). Accumulating in bf16
    instead rounds every partial sum (and the scores) to 8 bits and breaks it."""
    r = random_routing(MetaCase(T, E, min(pairs_per_token, E), seed))
    meta = build_metadata(r)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(meta.num_rows, d, generator=g, dtype=torch.float64).to(dtype)  # (P, d) grouped order
    weights = torch.rand(meta.num_rows, generator=g, dtype=torch.float32)  # (P,) scores in [0, 1)
    out = moe.aggregate(rows, weights, meta)
    assert out.shape == (T, d) and out.dtype == dtype

    terms = rows.double() * weights.double()[:, None]  # (P, d), exact
    tokens = meta.gather_idx.long()
    exact = torch.zeros(T, d, dtype=torch.float64).index_add_(0, tokens, terms)  # (T, d)
    magnitude = torch.zeros(T, d, dtype=torch.float64).index_add_(0, tokens, terms.abs())  # (T, d)
    rows_per_token = torch.bincount(tokens, minlength=T).double()[:, None]  # (T, 1)
    bound = 0.5 * _ulp(torch.maximum(out.double().abs(), exact.abs()), dtype) + (rows_per_token + 1) * 2.0**-24 * magnitude
    excess = (out.double() - exact).abs() - bound
    assert (excess <= 0).all(), f"{int((excess > 0).sum())} elements off by more than the bound; worst {excess.max():.3e}"


@settings(max_examples=20)
@given(problem=problems, routing=st.sampled_from(moe.ROUTINGS), seed=st.integers(0, 2**31 - 1))
@example(problem=(32, 8, 4, 6, 3), routing="topk", seed=0)
def test_ds_identity(problem, routing, seed):
    """The library's dS = <dA', A> (dh_epilogue, and the whole reduced-memory backward) equals the
    classic dS = <dO, Y> of an independent float64 oracle, pair by pair; so does the standard backward."""
    T, d, n, E, K = problem
    x, router_w, w1, w2 = [t.detach() for t in make_problem(T, d, n, E, seed=seed)]
    r = moe.route(x, router_w, K, routing=routing, tile_m=2)
    meta = build_metadata(r)
    dout = torch.randn(T, d, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)

    # Oracle, in pair order: Y_p = swiglu(x_t @ W1_e) @ W2_e and dS_p = <dO_t, Y_p>.
    t_idx, e_idx = r.token_idx.long(), r.expert_idx.long()  # (P,), (P,)
    h = torch.einsum("pd,pdm->pm", x[t_idx], w1[e_idx])  # (P, 2n)
    y = torch.einsum("pn,pnd->pd", h[:, 1::2] * torch.nn.functional.silu(h[:, 0::2]), w2[e_idx])  # (P, d)
    ds_oracle = (dout[t_idx] * y).sum(1)  # (P,)

    # 1. dh_epilogue on the grouped rows, with dA' = dO[token] @ W2_e^T (the dH GEMM's product).
    rows = meta.pair_of_row.long()  # grouped row -> pair
    dA_prime = torch.einsum("pd,pnd->pn", dout[t_idx[rows]], w2[e_idx[rows]])  # (P, n)
    _, ds_rows, _ = moe.dh_epilogue(h[rows], dA_prime, r.scores[rows].detach())
    torch.testing.assert_close(ds_rows, ds_oracle[rows], rtol=1e-10, atol=1e-10)
    # 2. Each backward's score gradient, back in pair order.
    for experts in (moe.ReducedMemoryExperts, moe.StandardExperts):
        scores = r.scores.detach().requires_grad_(True)  # (P,)
        out = experts.apply(x, w1, w2, scores, meta, 2)
        (ds,) = torch.autograd.grad(out, scores, dout, allow_unused=True) if r.num_pairs else (None,)
        ds = torch.zeros_like(scores) if ds is None else ds  # no pair routed: no gradient
        torch.testing.assert_close(ds, ds_oracle, rtol=1e-10, atol=1e-10, msg=lambda m: f"{experts.__name__}: {m}")


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
    if 2 * P > T:  # standard's two (P, d) tensors outweigh reduced memory's (T, d) X (token rounding can give P <= T/2)
        assert measured["standard"] > measured["reduced_memory"]
    assert measured["standard"] - measured["reduced_memory"] >= 2 * P * d * 2 - T * d * 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("routing", moe.ROUTINGS)
def test_forward_frees_y_and_gathered_x(dtype, routing):
    """After the reduced-memory forward only H (saved) and the output are alive: Y and the gathered
    X are freed, also where saved-tensor hooks cannot see (a tensor kept as ctx.y). The standard
    forward keeps both (P, d) tensors, which shows the weak references do see such tensors."""
    T, d, n, E, K = 16, 12, 4, 4, 3  # d != 2n and P = T*K != T, so every shape below is distinct
    x, router_w, w1, w2 = make_problem(T, d, n, E, dtype=dtype, seed=2)
    r = moe.route(x.detach(), router_w.detach(), K, routing=routing, tile_m=4)
    meta, P = build_metadata(r), r.num_pairs
    for backward, experts in (("reduced_memory", moe.ReducedMemoryExperts), ("standard", moe.StandardExperts)):
        out, alive = tensors_alive_after(lambda: experts.apply(x, w1, w2, r.scores, meta, 4))
        assert out.requires_grad  # the autograd graph (and with it ctx) is alive while we look
        shapes = sorted(shape for shape, _ in alive)
        if backward == "reduced_memory":
            assert shapes == sorted([(P, 2 * n), (T, d)]), alive  # H and the output, nothing (P, d)
        else:
            assert shapes == sorted([(P, d), (P, 2 * n), (P, d), (T, d)]), alive  # + gathered X and Y
        del out


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
