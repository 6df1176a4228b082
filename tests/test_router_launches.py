"""How many launches the fast token-rounding router step issues, counted on the CPU.

The router step of the layer with ``routing="token_rounding"`` (``fast.moe.route_layer``: the router
GEMM, token rounding with ``pad_to_bound=True``, the padded metadata) is a chain of CuTe kernels and
torch ops. This file runs the step's Python glue on the CPU with torch stand-ins for the CuTe
launches and counts its launches per phase (the harness, and what counts as a launch:
``tests/launch_counting.py``). The restructured glue never trades two ops for one composite op
that runs the same two kernels.

The same harness checks the glue itself: with the stand-ins, the step's routing, metadata, token
offsets, counts and gradients must be the reference's (``sonic_learn.reference.routing``), for the
torch glue (``fused_glue=False``) and for the layer's default ``fused_glue=True``. The stand-ins of the fused kernels
(``PaddedTriplesKernel``, the metadata scatter's padding fill) model them step by step and write
only what the kernels write, into poisoned buffers, so a missed entry shows up; the kernels
themselves are checked on a GPU by ``tests/test_fused_router_glue.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sonic_learn.fast._cute import cutlass_available  # pins sm_90a before cutlass loads

_ok, _why = cutlass_available()
if not _ok:
    pytest.skip(_why, allow_module_level=True)

from launch_counting import Launches, counting_launches, private_warning_registry  # noqa: E402

from sonic_learn.fast import moe as fast_moe  # noqa: E402
from sonic_learn.fast import routing as fast  # noqa: E402
from sonic_learn.reference import routing as ref  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------
def layer_router_step(T=512, d=64, E=32, K=4, tile_m=16, mode="nearest", scoring="softmax_topk", normalize=False,
                      seed=0, grad=True, fused_glue=False):
    """Inputs of the layer's router step (``fast.moe.route_layer``) on the CPU."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(torch.bfloat16).requires_grad_(grad)
    router_w = (torch.randn(d, E, generator=g) / d**0.5).to(torch.bfloat16).requires_grad_(grad)
    kwargs = dict(routing="token_rounding", tile_m=tile_m, scoring=scoring, normalize=normalize, rounding_mode=mode,
                  fused_glue=fused_glue,
                  generator=torch.Generator().manual_seed(seed + 1) if mode == "stochastic" else None)
    return x, router_w, K, kwargs


def count_router_step(monkeypatch, **shape) -> tuple[Launches, fast_moe.DeviceRouting]:
    """Launches of one call of the layer's token-rounding router step (after a warm-up call)."""
    x, router_w, K, kwargs = layer_router_step(**shape)
    with counting_launches(monkeypatch) as warmup:
        fast_moe.route_layer(x, router_w, K, **kwargs)
    kwargs["generator"] = layer_router_step(**shape)[3]["generator"]  # the same draw again
    with counting_launches(monkeypatch) as launches:
        r = fast_moe.route_layer(x, router_w, K, **kwargs)[0]
    assert warmup.total >= launches.total
    return launches, r


# ---------------------------------------------------------------------------------------------
# The glue gives the reference's routing, metadata and gradients (kernels stood in for)
# ---------------------------------------------------------------------------------------------
def _reference_offsets(token_idx: torch.Tensor, T: int) -> torch.Tensor:
    """(T+1,) first pair of each token (and T's: the true P), by brute force."""
    return torch.tensor([int((token_idx < t).sum()) for t in range(T + 1)], dtype=torch.int32)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(0, 300), E=st.sampled_from([4, 8, 16, 24, 64]), K=st.sampled_from([1, 2, 4]),
       tile_m=st.sampled_from([1, 3, 16, 64]), mode=st.sampled_from(ref.ROUNDING_MODES),
       scoring=st.sampled_from([("softmax_topk", False), ("topk_softmax", False), ("topk_softmax", True)]),
       ties=st.booleans(), seed=st.integers(0, 2**31 - 1))
@example(T=200, E=8, K=2, tile_m=16, mode="down", scoring=("softmax_topk", False), ties=True, seed=0)
@example(T=5, E=8, K=2, tile_m=64, mode="down", scoring=("topk_softmax", True), ties=False, seed=1)  # all dropped
@example(T=0, E=8, K=2, tile_m=16, mode="up", scoring=("softmax_topk", False), ties=False, seed=2)
@example(T=2100, E=360, K=2, tile_m=16, mode="down", scoring=("softmax_topk", False), ties=False, seed=3)  # tiles of 3 tokens over 2 word steps
@pytest.mark.parametrize("fused_glue", [False, True])
def test_layer_router_step_equals_the_reference(fused_glue, T, E, K, tile_m, mode, scoring, ties, seed):
    """route_layer's glue (kernels stood in for) = the reference: padded triples and scores bit for
    bit, the padded metadata, the token offsets, the rounding counts, and the gradients of x and
    router_w through the scores."""
    K = min(K, E)
    g = torch.Generator().manual_seed(seed)
    d = 16
    x = torch.randn(T, d, generator=g)
    if ties:
        x = x.round()
    x = x.to(torch.bfloat16).requires_grad_(True)
    router_w = torch.randn(d, E, generator=g).round().to(torch.bfloat16).requires_grad_(True)
    scoring, normalize = scoring
    kwargs = dict(tile_m=tile_m, scoring=scoring, normalize=normalize)

    def generator():
        return torch.Generator().manual_seed(seed + 1) if mode == "stochastic" else None

    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("ignore")  # below the paper's condition (not the point here)
        private_warning_registry(mp)
        with counting_launches(mp) as launches:
            r, x_experts = fast_moe.route_layer(x, router_w, K, routing="token_rounding", rounding_mode=mode,
                                                generator=generator(), fused_glue=fused_glue, **kwargs)
        x_ref, w_ref = (t.detach().clone().requires_grad_(True) for t in (x, router_w))
        logits_ref = (x_ref @ w_ref).float()
        want = ref.token_rounding(logits_ref, K, mode=mode, generator=generator(), pad_to_bound=True, **kwargs)
    assert not launches.syncs, f"the router step read the device on the host: {launches.syncs}"
    want_meta = ref.build_padded_metadata(want)
    for name in ("expert_counts", "expert_offsets", "gather_idx", "pair_of_row", "row_of_pair"):
        got_t, want_t = getattr(r.meta, name), getattr(want_meta, name)
        assert got_t.dtype == torch.int32 and torch.equal(got_t, want_t.to(torch.int32)), name
    assert r.scores.dtype == want.scores.dtype and torch.equal(r.scores, want.scores), "scores differ"
    assert torch.equal(r.scores.view(torch.int32), want.scores.view(torch.int32)), "scores differ in their bits"
    assert r.token_offsets.dtype == torch.int32
    assert torch.equal(r.token_offsets, _reference_offsets(want.token_idx, T))
    for name in ("kept_pairs", "dropped_pairs", "added_pairs", "dropped_tokens"):
        got_n, want_n = getattr(r.rounding, name), getattr(want.rounding, name)
        assert got_n.shape == () and got_n.dtype == torch.int64 and int(got_n) == int(want_n), name
    assert r.rounding.tokens_per_tile == want.rounding.tokens_per_tile
    # The gradients through the scores, then through the router GEMM in bf16.
    r.logits.retain_grad()
    logits_ref.retain_grad()
    gout = torch.randn(r.scores.shape, generator=g)
    (r.scores * gout).sum().backward()
    (want.scores * gout).sum().backward()
    if scoring == "softmax_topk":  # the reference's ops: the very same gradients
        assert torch.equal(r.logits.grad, logits_ref.grad)
        torch.testing.assert_close(x.grad, x_ref.grad)
        torch.testing.assert_close(router_w.grad, w_ref.grad)
        return
    # topk_softmax: the weights share the ranking key's softmax (one softmax backward; the reference
    # has two, summed), another rounding order: where entries cancel, either side is a few float32
    # ulps of the row's scale off. Both against the float64 oracle at the same pairs: the fast
    # gradient at most twice as far as the reference's (entry-wise at worst, and in norm).
    exact = _oracle_logits_grad(logits_ref.detach(), want, K, scoring, normalize, gout)
    assert_within_twice_the_references_error(r.logits.grad, logits_ref.grad, exact)
    # x and router_w: the router GEMM's backward of that logits' gradient (a bf16 rounding of two
    # nearby float32 gradients may differ by an ulp, amplified where the GEMM cancels: not compared)
    x_chk, w_chk = (t.detach().clone().requires_grad_(True) for t in (x, router_w))
    torch.autograd.backward((x_chk @ w_chk).float(), r.logits.grad)
    torch.testing.assert_close(x.grad, x_chk.grad)
    torch.testing.assert_close(router_w.grad, w_chk.grad)


def _largest(t: torch.Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0


def assert_within_twice_the_references_error(got: torch.Tensor, want: torch.Tensor, exact: torch.Tensor) -> None:
    """``got`` (a fast gradient) is at most twice as far from the float64 ``exact`` as ``want`` (the
    reference's, same dtype), entry-wise at worst and in norm, plus 8 float32 ulps of the largest
    entry (where entries cancel, either side may be a few ulps of the row's scale off)."""
    err_got, err_want = (got.double() - exact).abs(), (want.double() - exact).abs()
    slack = 8 * torch.finfo(torch.float32).eps * _largest(exact.abs())
    assert _largest(err_got) <= 2 * _largest(err_want) + slack, (_largest(err_got), _largest(err_want))
    assert float(err_got.norm()) <= 2 * float(err_want.norm()) + slack


def _oracle_logits_grad(logits: torch.Tensor, routing, k: int, scoring: str, normalize: bool,
                        gout: torch.Tensor) -> torch.Tensor:
    """(T, E) float64: the gradient of sum(gout * weights) w.r.t. the logits at ``routing``'s kept
    pairs (the routing pinned, so float64 cannot rank a near tie differently), with the reference's
    formulas: the token-choice weights at the picks (the same picks: the float32 values are exact in
    float64), the router probability p elsewhere."""
    T, E = logits.shape
    l64 = logits.double().requires_grad_(True)
    tc = ref.topk_routing(l64, k, scoring=scoring, normalize=normalize)
    weights = ref.pair_weights(ref.router_probabilities(l64), tc.expert_idx.long().view(T, k), tc.scores.view(T, k))
    P = int(routing.rounding.kept_pairs)
    kept = weights[routing.token_idx[:P].long(), routing.expert_idx[:P].long()]  # (P,)
    (grad,) = torch.autograd.grad((kept * gout[:P].double()).sum(), l64, allow_unused=True)
    return torch.zeros_like(l64) if grad is None else grad


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 200), E=st.sampled_from([4, 8, 24, 64]), K=st.sampled_from([1, 2, 4]),
       tile_m=st.sampled_from([1, 3, 16, 64]), mode=st.sampled_from(ref.ROUNDING_MODES),
       scoring=st.sampled_from(["softmax_topk", "topk_softmax"]), fused_glue=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
@example(T=200, E=64, K=4, tile_m=64, mode="up", scoring="softmax_topk", fused_glue=True, seed=0)  # > 32 pairs a token
@example(T=5, E=8, K=2, tile_m=64, mode="down", scoring="softmax_topk", fused_glue=False, seed=1)  # every pair dropped
def test_the_scores_backward_kernels_algorithm_is_as_close_to_float64_as_the_reference(
        T, E, K, tile_m, mode, scoring, fused_glue, seed):
    """``ScoresBackwardKernel``'s algorithm (its stand-in follows it lane by lane in float32: chunks of
    32 pairs, the picks' lowest holding lane, the butterfly sums, the row then its rewrites), run by
    the layer's router step with autograd: the logits' gradient against the float64 oracle at the same
    pairs, at most twice as far as the reference's own, entry-wise at worst and in norm."""
    K = min(K, E)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, 16, generator=g).to(torch.bfloat16)
    router_w = torch.randn(16, E, generator=g).to(torch.bfloat16).requires_grad_(True)

    def generator():
        return torch.Generator().manual_seed(seed + 1) if mode == "stochastic" else None

    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("ignore")  # below the paper's condition (not the point here)
        private_warning_registry(mp)
        with counting_launches(mp):
            r, _ = fast_moe.route_layer(x, router_w, K, routing="token_rounding", rounding_mode=mode, tile_m=tile_m,
                                        scoring=scoring, generator=generator(), fused_glue=fused_glue)
        r.logits.retain_grad()
        gout = torch.randn(r.scores.shape, generator=g)
        with counting_launches(mp) as backward:
            (r.scores * gout).sum().backward()
        logits = r.logits.detach().clone().requires_grad_(True)
        want = ref.token_rounding(logits, K, tile_m=tile_m, mode=mode, generator=generator(), scoring=scoring,
                                  pad_to_bound=True)
    assert sum(backward.cute_calls.values()) >= 1, "the backward ran the torch ops, not the kernel's stand-in"
    assert torch.equal(r.scores, want.scores), "not the same routing"
    (want.scores * gout).sum().backward()
    exact = _oracle_logits_grad(logits.detach(), want, K, scoring, False, gout)
    assert_within_twice_the_references_error(r.logits.grad, logits.grad, exact)


SCORINGS = [("softmax_topk", False), ("topk_softmax", False), ("topk_softmax", True)]


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("scoring, normalize", SCORINGS)
def test_token_rounding_scores_gradient_passes_gradcheck(scoring, normalize, pad):
    """The weights' one autograd node (``fast.routing.TokenRoundingScores``) against finite
    differences, float64 logits (the torch-op selection), with pairs added and dropped by the
    rounding, padded or not (the padding's weights 0, no gradient). The logits are far apart: a
    step of 1e-6 changes no routing decision."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(40, 8, generator=g, dtype=torch.float64) * 2).requires_grad_(True)

    def scores(lg):
        return fast.token_rounding(lg, 2, tile_m=4, scoring=scoring, normalize=normalize, check_finite=False,
                                   pad_to_bound=pad).scores

    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp, counting_launches(mp):
        warnings.simplefilter("ignore")  # below the paper's condition (not the point here)
        private_warning_registry(mp)
        r = fast.token_rounding(logits, 2, tile_m=4, check_finite=False)
        assert int(r.rounding.added_pairs) > 0 and int(r.rounding.dropped_pairs) > 0  # both sides of the rule
        assert torch.autograd.gradcheck(scores, (logits,), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=["bf16", "fp32", "fp64"])
def test_token_rounding_softmax_topk_gradient_is_the_references_bit_for_bit(dtype):
    """softmax_topk: the weights' backward runs the ops autograd runs on the reference's graph
    (the casts of 16-bit logits included), so the logits' gradient is the reference's, bit for bit,
    padded (the layer) and unpadded."""
    g = torch.Generator().manual_seed(1)
    T, E, K = 300, 16, 2
    for pad in (False, True):
        logits = torch.randn(T, E, generator=g).to(dtype)
        gout = torch.randn(ref.max_pairs(T, E, K, 16), generator=g).to(torch.float64 if dtype == torch.float64
                                                                         else torch.float32)
        grads = []
        with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp, counting_launches(mp):
            warnings.simplefilter("ignore")
            private_warning_registry(mp)
            for impl, extra in ((fast.token_rounding, {"check_finite": False}), (ref.token_rounding, {})):
                lg = logits.clone().requires_grad_(True)
                r = impl(lg, K, tile_m=16, mode="up", pad_to_bound=pad, **extra)
                (r.scores * gout[: r.num_pairs]).sum().backward()
                grads.append(lg.grad)
        assert grads[0].dtype == dtype and torch.equal(grads[0], grads[1]), pad


@settings(max_examples=20, deadline=None)
@given(T=st.integers(0, 200), E=st.sampled_from([8, 13, 32]), K=st.sampled_from([1, 2, 4]),
       tile_m=st.sampled_from([1, 16, 64]), mode=st.sampled_from(ref.ROUNDING_MODES),
       scoring=st.sampled_from(["softmax_topk", "topk_softmax"]), pad=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_token_rounding_without_autograd_equals_the_reference(T, E, K, tile_m, mode, scoring, pad, seed):
    """token_rounding under no_grad (the weights overwrite the probabilities in place), padded or
    not, gives the reference's triples and counts bit for bit."""
    K = min(K, E)
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed)) * 3

    def generator():
        return torch.Generator().manual_seed(seed + 1) if mode == "stochastic" else None

    kwargs = dict(tile_m=tile_m, mode=mode, scoring=scoring, pad_to_bound=pad)
    with warnings.catch_warnings(), torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("ignore")
        private_warning_registry(mp)
        with counting_launches(mp) as launches:
            got = fast.token_rounding(logits, K, generator=generator(), check_finite=False, **kwargs)
        want = ref.token_rounding(logits, K, generator=generator(), **kwargs)
    assert (launches.syncs == []) == pad, launches.syncs  # unpadded: nonzero sizes the triples on the host
    for name in ("token_idx", "expert_idx", "scores"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    for name in ("kept_pairs", "dropped_pairs", "added_pairs", "dropped_tokens"):
        assert int(getattr(got.rounding, name)) == int(getattr(want.rounding, name)), name


# ---------------------------------------------------------------------------------------------
# The count
# ---------------------------------------------------------------------------------------------
# The bound per phase, (torch launches, CuTe compiled calls), of the layer's router step with autograd
# on, nearest rounding, softmax_topk weights. Before the glue was restructured the step took 40
# launches: stats 12 torch, compaction 11, metadata 6, the others as below. Why what is left remains:
# see "Launches of the router step" in sonic_learn/fast/routing.py's docstring.
MAX_LAUNCHES = {
    "router GEMM": (2, 0),  # cuBLAS GEMM, then the float32 cast (the reference rounds to x's dtype first)
    "top-k": (0, 1),  # the bitonic kernel
    "scores/softmax": (3, 0),  # softmax over E (the ranking key), gather + softmax over K (the weights)
    "counts f_e": (0, 1),  # the histogram kernels
    "keys+select": (0, 1),  # the two token-rounding kernels
    "pair weights": (3, 0),  # w over p in place: the picks' p saved (gather), w (scatter_), p put back (scatter_)
    "stats": (8, 0),  # one (3, E) reduction (5 launches), the tokens left with no expert (3)
    "compaction": (8, 0),  # nonzero_static, two remainders into int32, the flat index (add, clamp_), index_select, ge, where
    "metadata": (5, 1),  # the padded rows' init (3), the metadata kernels, the token offsets (2)
    "other": (1, 0),  # the int32 copy of the top-k experts (the kernels' index type)
}


# The same step with ``fused_glue=True`` (the layer's default, GPU-verified): the triples, their
# weights, the rounding counts and the token offsets come out of the token-rounding compiled call
# (the keep bytes name where each kept pair's weight is), the padded metadata's initialization out
# of the scatter kernel. No "pair weights" and no "compaction" phase: their 5 torch launches went
# into the triples' write kernel.
MAX_LAUNCHES_FUSED = {
    **{phase: MAX_LAUNCHES[phase] for phase in ("router GEMM", "top-k", "scores/softmax", "counts f_e", "other")},
    "keys+select+triples": (0, 1),  # keys, select, then the triples' count, scan and write kernels
    "metadata": (0, 1),  # the metadata kernels alone
}


SHAPES = {"small": dict(T=512, d=64, E=32, K=4, tile_m=16),
          "7B-like": dict(T=4096, d=64, E=128, K=8, tile_m=128)}  # the 7B router's E, K and tile, T/6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fused_glue, bound, total", [(False, MAX_LAUNCHES, 34), (True, MAX_LAUNCHES_FUSED, 10)])
def test_the_router_step_stays_within_its_launch_bound(monkeypatch, shape, fused_glue, bound, total):
    """The count per phase does not depend on the shape; ``pytest -s`` prints it."""
    launches, _ = count_router_step(monkeypatch, fused_glue=fused_glue, **SHAPES[shape])
    print(f"\n{shape}, fused_glue={fused_glue}\n{launches.table()}")
    assert not launches.syncs, f"the router step read the device on the host: {launches.syncs}"
    for phase, (torch_ops, cute_calls) in launches.per_phase().items():
        most = bound.get(phase, (0, 0))
        assert torch_ops <= most[0] and cute_calls <= most[1], (
            f"{phase}: {torch_ops} torch launches and {cute_calls} CuTe calls, bound {most}\n{launches.table()}\n"
            f"{[op for ph, op in launches.ops if ph == phase]}")
    # Exactly the bound: fewer launches are welcome, but then the bound and the module docstring's
    # count are updated with them (and the torch-glue path must not slip into the fused kernels).
    assert launches.per_phase() == bound, launches.table()
    assert launches.total == sum(t + c for t, c in bound.values()) == total


@pytest.mark.parametrize("scoring, normalize, mode, grad, extra", [
    ("topk_softmax", True, "nearest", True, -1),  # the weights gather from the ranking key's softmax
    ("softmax_topk", False, "stochastic", True, 1),  # + the uniform draw (torch.rand, on the device)
    ("softmax_topk", False, "up", False, -2),  # no autograd: w over p for good (one scatter_), p not kept
])
def test_other_configurations_of_the_step(monkeypatch, scoring, normalize, mode, grad, extra):
    launches, _ = count_router_step(monkeypatch, scoring=scoring, normalize=normalize, mode=mode, grad=grad)
    assert not launches.syncs
    normalize_ops = 2 if normalize else 0  # sum and divide
    assert launches.total == sum(t + c for t, c in MAX_LAUNCHES.values()) + extra + normalize_ops, launches.table()
