"""How many launches the fast layer's default path issues around its kernels, counted on the CPU.

The default layer (``fast.moe.moe_forward``: ``routing="topk"``, the reduced-memory backward, the
production kernels behind the ``fast.ops`` custom ops) runs on the CPU with torch stand-ins for
every CuTe launch -- the bitonic top-k, the metadata kernels, the grouped GEMMs with their fused
epilogues, the gather-and-sum (``tests/launch_counting.py``) -- and its launches are counted

* for the top-k router step alone (``fast.moe.route_layer``), per phase of the step;
* for the whole layer, forward and backward apart, per phase: router, experts forward, experts
  backward, the router GEMM's backward, and the autograd engine's nodes between them.

The bounds are exact: a regression fails, and so does an unnoticed improvement (then the bound
and its comment are updated with it).

The same stand-ins check that the glue computes what it should, bit for bit: the layer's output
and all four gradients equal an oracle that composes the same kernel arithmetic
(``launch_counting.expert_gemm``, ...) on the reference router and metadata
(``sonic_learn.reference.routing``), written without the layer's glue.
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

import launch_counting as lc  # noqa: E402

from sonic_learn.fast import grouped_gemm as gg  # noqa: E402
from sonic_learn.fast import moe as fast_moe  # noqa: E402
from sonic_learn.reference import moe as ref_moe  # noqa: E402
from sonic_learn.reference import routing as ref  # noqa: E402


def layer_inputs(T=512, d=64, n=32, E=32, K=4, seed=0, ties=False):
    """bf16 CPU inputs of the layer: x (T, d), router_w (d, E), w1 (E, d, 2n), w2 (E, n, d), K."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    if ties:  # integer logits: many exact ties for the top-k to break
        x = x.round()
    router_w = torch.randn(d, E, generator=g) / d**0.5
    if ties:
        router_w = router_w.round()
    w1 = torch.randn(E, d, 2 * n, generator=g) / d**0.5
    w2 = torch.randn(E, n, d, generator=g) / n**0.5
    return [t.to(torch.bfloat16).requires_grad_(True) for t in (x, router_w, w1, w2)] + [K]


def count_layer(monkeypatch, routing="topk", tile_m=16, fused_glue=True,
                **shape) -> tuple[lc.Launches, lc.Launches, lc.Launches]:
    """Launches of the router step, of the layer's forward and of its backward (each on a second
    call: the first fills the placeholders' caches)."""
    x, router_w, w1, w2, K = layer_inputs(**shape)
    kwargs = dict(routing=routing, tile_m=tile_m, fused_glue=fused_glue)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # token rounding below the paper's condition (not the point here)
        for _ in range(2):
            with lc.counting_launches(monkeypatch) as router:
                fast_moe.route_layer(x, router_w, K, **kwargs)
        for _ in range(2):
            for p in (x, router_w, w1, w2):
                p.grad = None
            with lc.counting_launches(monkeypatch, lc.LAYER_PHASES, lc.LAYER_PHASE_ORDER) as forward:
                out = fast_moe.moe_forward(x, router_w, w1, w2, K, **kwargs)
            gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
            with lc.counting_launches(monkeypatch, lc.LAYER_PHASES, lc.LAYER_PHASE_ORDER) as backward:
                out.backward(gout)
    return router, forward, backward


# ---------------------------------------------------------------------------------------------
# The glue computes what it should (kernels stood in for): bit for bit against an oracle
# ---------------------------------------------------------------------------------------------
def oracle_layer(x, router_w, w1, w2, K, gout):
    """The layer's output and the gradients of x, router_w, w1, w2 from the reference router and
    metadata and the kernels' arithmetic (the stand-ins' functions), composed step by step."""
    x, router_w, w1, w2 = (t.detach() for t in (x, router_w, w1, w2))
    bf16, T = x.dtype, x.shape[0]
    rw = router_w.clone().requires_grad_(True)
    logits = (x @ rw).float()  # (T, E)
    r = ref.topk_routing(logits, K)
    meta = ref.build_metadata(r)
    offsets, gather = meta.expert_offsets, meta.gather_idx.long()
    row_of_pair, pair_of_row = meta.row_of_pair.long(), meta.pair_of_row.long()
    token_offsets = torch.tensor([t * K for t in range(T + 1)], dtype=torch.int32)
    scores = r.scores.detach()  # (P,) pair order
    # forward
    h = lc.expert_gemm(x[gather], w1, offsets).to(bf16)  # (P, 2n)
    y = lc.expert_gemm(ref_moe.swiglu(h), w2, offsets).to(bf16)  # (P, d)
    out = lc.gather_sum_rows(y, scores, row_of_pair, token_offsets)  # (T, d)
    # backward: the dH GEMM (dA' = dO[token] W2^T, its epilogue), dW2, dX~, dX, dW1
    dout = gout[gather]  # (P, d)
    da_prime = lc.expert_gemm(dout, w2.transpose(1, 2), offsets)  # (P, n) float32
    dh, a_scaled, ds_part = lc.dswiglu_epilogue(da_prime, h, scores[pair_of_row], gg.checked_config(None).tile[1])
    dscores = ds_part.sum(1)[row_of_pair]  # (P,) pair order
    dw2 = lc.expert_weight_grad(dout, a_scaled, offsets).transpose(1, 2).to(bf16)  # (E, n, d)
    dx_rows = lc.expert_gemm(dh, w1.transpose(1, 2), offsets).to(bf16)  # (P, d)
    dx_experts = lc.gather_sum_rows(dx_rows, None, row_of_pair, token_offsets)  # (T, d)
    dw1 = lc.expert_weight_grad(x[gather], dh, offsets).to(bf16)  # (E, d, 2n)
    # the router: dS through the reference scores to the logits, then the router GEMM
    (dlogits,) = torch.autograd.grad(r.scores, logits, dscores)
    g = dlogits.to(bf16)
    return out, torch.addmm(dx_experts, g, router_w.t()), x.t() @ g, dw1, dw2, meta, token_offsets


@settings(max_examples=25, deadline=None)
@given(T=st.integers(0, 70), E=st.sampled_from([8, 12, 16, 32]), K=st.sampled_from([1, 2, 3, 8]),
       d=st.sampled_from([8, 16]), n=st.sampled_from([8, 16]), ties=st.booleans(), seed=st.integers(0, 2**31 - 1))
@example(T=0, E=8, K=2, d=8, n=8, ties=False, seed=0)
@example(T=1, E=8, K=8, d=8, n=8, ties=True, seed=1)
@example(T=33, E=32, K=8, d=16, n=16, ties=True, seed=2)
def test_default_layer_equals_the_oracle_bit_for_bit(T, E, K, d, n, ties, seed):
    """With the kernels stood in for, the default layer's routing metadata, token offsets, output
    and four gradients are the oracle's, bit for bit (the glue only moves, casts and indexes)."""
    K = min(K, E)
    x, router_w, w1, w2, K = layer_inputs(T, d, n, E, K, seed, ties)
    gout = torch.randn(T, d, generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)
    with pytest.MonkeyPatch.context() as mp, lc.counting_launches(mp) as launches:
        r, _ = fast_moe.route_layer(x, router_w, K)
        out = fast_moe.moe_forward(x, router_w, w1, w2, K)
        out.backward(gout)
    assert not launches.syncs, launches.syncs
    want_out, want_dx, want_drw, want_dw1, want_dw2, want_meta, want_offsets = oracle_layer(
        x, router_w, w1, w2, K, gout)
    for name in ("expert_counts", "expert_offsets", "gather_idx", "pair_of_row", "row_of_pair"):
        got, want = getattr(r.meta, name), getattr(want_meta, name)
        assert got.dtype == torch.int32 and torch.equal(got, want.to(torch.int32)), name
    assert r.token_offsets.dtype == torch.int32 and torch.equal(r.token_offsets, want_offsets)
    for name, got, want in (("out", out, want_out), ("dx", x.grad, want_dx), ("drouter_w", router_w.grad, want_drw),
                            ("dw1", w1.grad, want_dw1), ("dw2", w2.grad, want_dw2)):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"{name} differs in its bits"


# ---------------------------------------------------------------------------------------------
# The counts
# ---------------------------------------------------------------------------------------------
# The top-k router step, per phase: (torch launches, CuTe compiled calls). Before the glue was cut
# it took 11 launches: metadata 2 torch (the token offsets were an arange times K).
TOPK_ROUTER_LAUNCHES = {
    "router GEMM": (2, 0),  # cuBLAS GEMM, then the float32 cast (the reference rounds to x's dtype first)
    "top-k": (0, 1),  # the bitonic kernel (values and int64 indices)
    "scores/softmax": (2, 0),  # softmax_topk: gather the K logits, softmax over K (autograd sees both)
    "metadata": (1, 1),  # the metadata kernels (one call of four); the token offsets t*K (one arange)
    "other": (3, 0),  # the flat triples: token_idx (arange + repeat_interleave's copy), the experts' int32 copy
}

# The whole layer, forward and backward apart, per phase. Before the glue was cut: forward 16
# launches (router 9 torch), backward 23 (experts backward 12 torch: the two score gathers each
# took an int64 copy of their int32 index first).
LAYER_FORWARD_LAUNCHES = {
    "router": (8, 2),  # TOPK_ROUTER_LAUNCHES
    # the up-projection GEMM with its SwiGLU epilogue, the down-projection GEMM, the weighted
    # gather-and-sum; torch: expert_counts = offsets[1:] - offsets[:-1] inside each GEMM custom op
    # (fast.ops rebuilds a RoutingMetadata from the offsets it receives)
    "experts forward": (2, 3),
}
LAYER_BACKWARD_LAUNCHES = {
    # CuTe: the dH GEMM (dSwiGLU, A', dS in its epilogue), dW2, dX~, the gather-and-sum of dX, dW1.
    # torch (10): the expert counts of the saved metadata, twice (one per Function), and once in each
    # of the four GEMM custom ops; the rows' scores (index_select); dS's sum over the n-tiles of the
    # dH epilogue and its gather back to pair order (index_select); the unweighted gather-and-sum's
    # placeholder weights (a zeros(1))
    "experts backward": (10, 5),
    "router backward": (3, 0),  # dlogits' cast to x's dtype, dX += dlogits W_r^T (addmm), dW_r = x^T dlogits
    "other": (3, 0),  # the autograd nodes of the scores: softmax backward, the gather's backward (zeros, scatter_add)
}


# The layer with token rounding (its router step: tests/test_router_launches.py), forward and
# backward. Before the glue was cut the backward took 47 launches: experts backward 30 torch (the
# two score gathers' int64 copies, and 18 to zero the varlen-K operands' rows past the last expert:
# two calls of 9); then 38, experts backward (20, 5): that zeroing as torch ops, 10 launches (the
# rows once: arange, add, clamp, ge; per tensor index_select, masked_fill_, index_copy_), and
# "other" (10, 0): one autograd node per op of the scores.
TOKEN_ROUNDING_FORWARD_LAUNCHES = {  # the default router glue (fused_glue=True)
    "router": (6, 4),  # test_router_launches.MAX_LAUNCHES_FUSED (11 torch before the weights moved into the triples kernel)
    "experts forward": (2, 3),  # as top-k
}
TORCH_GLUE_FORWARD_LAUNCHES = {  # fused_glue=False: the glue between the CuTe calls as torch ops
    "router": (30, 4),  # test_router_launches.MAX_LAUNCHES
    "experts forward": (2, 3),
}
TOKEN_ROUNDING_BACKWARD_LAUNCHES = {
    # top-k's, and one CuTe call zeroing the rows past the last expert in dH and A'
    # (ExpertOps.zero_rows_past_end: moe_kernels.ZeroRowsPastEnd, end read from expert_offsets[E])
    "experts backward": (10, 6),
    "router backward": (3, 0),
    # token rounding's scores, one autograd node (fast.routing.TokenRoundingScores) whose backward is
    # one kernel (ScoresBackwardKernel: each token's pairs from the token offsets the router wrote).
    # Before it, 9 torch launches: the padding sent to a spare entry (where, int64 copy), the
    # triples' gradient into (T, E) (zeros, index_copy_), the picks' part (gather) and the rest
    # (scatter_ of zeros), the two softmax backwards (over E, over K), the picks' part added
    # (scatter_add_); before that node, 10: one node per op of the scores.
    "other": (0, 1),
}  # (fused_glue=False: both glues read their weights through the same node)
# The torch glue wrote no token offsets: the backward finds them first (arange, searchsorted).
TORCH_GLUE_BACKWARD_LAUNCHES = {**TOKEN_ROUNDING_BACKWARD_LAUNCHES, "other": (2, 1)}


SHAPES = {"small": dict(T=512, d=64, n=32, E=32, K=4),
          "7B-like": dict(T=1024, d=64, n=32, E=128, K=8, tile_m=128)}  # the 7B router's E, K and tile


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("routing, extra, bounds, totals", [
    ("topk", {}, (TOPK_ROUTER_LAUNCHES, LAYER_FORWARD_LAUNCHES, LAYER_BACKWARD_LAUNCHES), (10, 15, 21)),
    ("token_rounding", {}, (None, TOKEN_ROUNDING_FORWARD_LAUNCHES, TOKEN_ROUNDING_BACKWARD_LAUNCHES), (10, 15, 20)),
    ("token_rounding", {"fused_glue": False}, (None, TORCH_GLUE_FORWARD_LAUNCHES, TORCH_GLUE_BACKWARD_LAUNCHES),
     (34, 39, 22)),
], ids=["topk", "token_rounding", "token_rounding_torch_glue"])
def test_the_layer_stays_within_its_launch_bounds(monkeypatch, shape, routing, extra, bounds, totals):
    """The counts per phase do not depend on the shape; ``pytest -s`` prints them. (The token-rounding
    router step's phases are test_router_launches' bound.)"""
    counted = count_layer(monkeypatch, routing=routing, **extra, **SHAPES[shape])
    for what, launches, bound in zip(("router step", "layer forward", "layer backward"), counted, bounds):
        print(f"\n{shape}, {routing}, {what}\n{launches.table()}")
        assert not launches.syncs, f"{what} read the device on the host: {launches.syncs}"
        # Exactly the bound: fewer launches are welcome, but then the bound and its comment are
        # updated with them.
        if bound is not None:
            assert launches.per_phase() == bound, f"{what}\n{launches.table()}\n{launches.ops}"
    assert tuple(launches.total for launches in counted) == totals, [launches.table() for launches in counted]
