"""Router losses and statistics: hand-computed examples, gradient checks, and the layer's record."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sonic_learn
from sonic_learn import losses
from sonic_learn.reference.routing import token_rounding, topk_routing

# logits chosen so the softmax is exact by hand: row 0 -> (1/2, 1/2), row 1 -> (3/4, 1/4).
HAND_LOGITS = [[0.0, 0.0], [math.log(3.0), 0.0]]


def test_tokens_per_expert_counts_every_entry():
    idx = torch.tensor([[2, 0], [2, 1], [2, 0]])
    assert losses.tokens_per_expert(idx, 4).tolist() == [2, 1, 3, 0]
    assert losses.tokens_per_expert(torch.empty(0, dtype=torch.int32), 3).tolist() == [0, 0, 0]


def test_load_balancing_loss_hand_computed():
    logits = torch.tensor(HAND_LOGITS, dtype=torch.float64)
    # P_e = mean of the rows (1/2, 1/2) and (3/4, 1/4) = (5/8, 3/8).
    # K=1, both tokens to expert 0: f = (1, 0)  ->  E * sum f_e P_e = 2 * 5/8 = 1.25
    assert losses.load_balancing_loss(logits, torch.tensor([[0], [0]])).item() == pytest.approx(1.25, abs=1e-12)
    # K=1, one token each: f = (1/2, 1/2)  ->  2 * (5/16 + 3/16) = 1.0
    assert losses.load_balancing_loss(logits, torch.tensor([[0], [1]])).item() == pytest.approx(1.0, abs=1e-12)
    # K=1, both to expert 1: f = (0, 1)  ->  2 * 3/8 = 0.75
    assert losses.load_balancing_loss(logits, counts=torch.tensor([0, 2])).item() == pytest.approx(0.75, abs=1e-12)
    # K=2 on E=2: every token takes both experts, f = (1/2, 1/2) (a fraction of pairs, not of tokens)
    assert losses.load_balancing_loss(logits, torch.tensor([[0, 1], [1, 0]])).item() == pytest.approx(1.0, abs=1e-12)


def test_router_z_loss_hand_computed():
    logits = torch.tensor(HAND_LOGITS, dtype=torch.float64)
    # logsumexp row 0 = log 2, row 1 = log(3 + 1) = 2 log 2  ->  mean of squares = (1 + 4)/2 * log(2)^2
    assert losses.router_z_loss(logits).item() == pytest.approx(2.5 * math.log(2.0) ** 2, abs=1e-12)
    # large logits: log(e^100 + e^100) = 100 + log 2, no overflow
    big = torch.tensor([[100.0, 100.0]], dtype=torch.float32)
    assert losses.router_z_loss(big).item() == pytest.approx((100 + math.log(2.0)) ** 2, rel=1e-6)


def test_losses_with_no_tokens_are_zero():
    empty = torch.empty(0, 4)
    assert losses.router_z_loss(empty).item() == 0.0
    assert losses.load_balancing_loss(empty, torch.empty(0, 2, dtype=torch.int64)).item() == 0.0


@settings(deadline=None, max_examples=10)
@given(T=st.integers(1, 6), E=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_loss_gradients(T, E, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(T, E, generator=g, dtype=torch.float64)).requires_grad_(True)
    idx = torch.randint(0, E, (T, 1), generator=g)
    assert torch.autograd.gradcheck(lambda lg: losses.load_balancing_loss(lg, idx), (logits,))
    assert torch.autograd.gradcheck(losses.router_z_loss, (logits,))


def test_load_balancing_gradient_hand_computed():
    # E=2, T=1, f = (1, 0): loss = 2 * softmax(l)_0, d/dl_0 = 2 p0 (1 - p0), d/dl_1 = -2 p0 p1.
    logits = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64, requires_grad=True)
    losses.load_balancing_loss(logits, torch.tensor([[0]])).backward()
    assert logits.grad.tolist() == [[pytest.approx(2 * 0.75 * 0.25), pytest.approx(-2 * 0.75 * 0.25)]]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="exactly one of expert_idx"):
        losses.load_balancing_loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="counts must have shape"):
        losses.load_balancing_loss(torch.zeros(2, 3), counts=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="logits must be 2-D"):
        losses.router_z_loss(torch.zeros(3))
    with pytest.raises(TypeError, match="expert_idx must have dtype"):
        losses.tokens_per_expert(torch.zeros(3), 2)


def _layer(routing="topk", tile_m=128, dtype=torch.float64):
    torch.manual_seed(0)
    return sonic_learn.MoE(16, 8, 6, 2, routing=routing, tile_m=tile_m, dtype=dtype)


def test_layer_router_stats_match_the_routing():
    moe = _layer()
    assert moe.router_stats is None
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    moe(x)
    logits = x.reshape(-1, 16) @ moe.router_w
    r = topk_routing(logits, 2)
    s = moe.router_stats
    assert s.tokens_per_expert.tolist() == torch.bincount(r.expert_idx.long(), minlength=6).tolist()
    assert s.pairs_dropped.item() == 0 and s.pairs_added.item() == 0
    assert torch.allclose(s.load_balancing_loss, losses.load_balancing_loss(logits, r.expert_idx))
    assert torch.allclose(s.z_loss, losses.router_z_loss(logits))
    # the losses reach the router weight
    (s.load_balancing_loss + s.z_loss).backward()
    assert moe.router_w.grad is not None and moe.router_w.grad.abs().sum() > 0


@settings(deadline=None, max_examples=10)
@given(T=st.integers(1, 40), tile_m=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_layer_router_stats_count_token_rounding_changes(T, tile_m, seed):
    moe = _layer("token_rounding", tile_m)
    x = torch.randn(T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    moe(x)
    logits = x @ moe.router_w
    tc = topk_routing(logits, 2)
    tr = token_rounding(logits, 2, tile_m=tile_m)
    tc_pairs = set(zip(tc.token_idx.tolist(), tc.expert_idx.tolist()))
    tr_pairs = set(zip(tr.token_idx.tolist(), tr.expert_idx.tolist()))
    s = moe.router_stats
    assert s.pairs_dropped.item() == len(tc_pairs - tr_pairs)
    assert s.pairs_added.item() == len(tr_pairs - tc_pairs)
    assert s.tokens_per_expert.sum().item() == len(tr_pairs)
