"""Token rounding's rules that a hand computation can pin (reference and the fast path's CPU-runnable parts)."""

from __future__ import annotations

import math

import pytest
import torch

from sonic_learn.reference import routing as ref

# Three tokens, E = 3, K = 1, tile_m = 2, mode "up". Token-choice: tokens 0 and 1 pick expert 0
# (f_0 = 2), token 2 picks expert 1 (f_1 = 1 -> rounded up to 2: one token must be added).
# The candidates for expert 1 are tokens 0 and 1:
#   softmax over ALL E (the paper's S):  token 0: 1 / (e + 1 + e^0.9)      = 0.1619
#                                        token 1: 1 / (e^1.2 + 1 + e^-10)  = 0.2315  <- the paper adds token 1
#   softmax over the token's K = 1 pick: token 0: e^(0 - 1)   = 0.3679  (a rule that would add token 0)
#                                        token 1: e^(0 - 1.2) = 0.3012
THREE_TOKENS = [[1.0, 0.0, 0.9], [1.2, 0.0, -10.0], [0.0, 2.0, 0.0]]
P_TOKEN0 = 1 / (math.e + 1 + math.exp(0.9))
P_TOKEN1 = 1 / (math.exp(1.2) + 1 + math.exp(-10.0))


@pytest.mark.parametrize("scoring,normalize", [("softmax_topk", False), ("topk_softmax", False),
                                                ("topk_softmax", True)])
def test_added_token_is_ranked_and_weighted_by_the_softmax_over_all_experts(scoring, normalize):
    assert P_TOKEN1 > P_TOKEN0 and math.exp(-1.0) > math.exp(-1.2)  # the two rules disagree here
    logits = torch.tensor(THREE_TOKENS, dtype=torch.float64)
    r = ref.token_rounding(logits, 1, tile_m=2, mode="up", scoring=scoring, normalize=normalize)
    pairs = list(zip(r.token_idx.tolist(), r.expert_idx.tolist()))
    assert pairs == [(0, 0), (1, 0), (1, 1), (2, 1)]  # expert 1 got token 1, not token 0
    added = r.scores[pairs.index((1, 1))].item()
    assert added == pytest.approx(P_TOKEN1, rel=1e-12)  # weighted by p, not by e^-1.2
    # The picks keep their token-choice weights (K = 1: 1.0 for softmax_topk and normalize=True).
    pick_w = [r.scores[pairs.index(p)].item() for p in [(0, 0), (1, 0), (2, 1)]]
    if scoring == "softmax_topk" or normalize:
        assert pick_w == pytest.approx([1.0, 1.0, 1.0], rel=1e-12)
    else:
        want = torch.softmax(logits, dim=1)[[0, 1, 2], [0, 0, 1]].tolist()
        assert pick_w == pytest.approx(want, rel=1e-12)


def test_rounding_down_drops_the_pick_of_lowest_probability():
    # Expert 0 has 3 picks, tile 2, "down" keeps 2. Under softmax_topk every pick weighs 1.0 (K = 1),
    # so only p (softmax over all E) tells them apart: token 0's p for expert 0 is the smallest
    # (ranking by those equal weights would fall to the tie rule and drop the highest token, 2).
    logits = torch.tensor([[0.5, 0.0], [3.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    r = ref.token_rounding(logits, 1, tile_m=2, mode="down")
    assert list(zip(r.token_idx.tolist(), r.expert_idx.tolist())) == [(1, 0), (2, 0)]


def test_fast_float64_selection_follows_the_same_ranking():
    """The fast path's torch-op selection (float64, runs on CPU) on the three-token example."""
    fast = pytest.importorskip("sonic_learn.fast.routing")
    logits = torch.tensor(THREE_TOKENS, dtype=torch.float64)
    experts = torch.tensor([[0], [0], [1]])
    keep = fast._boundary_keep_torch(ref._router_probabilities(logits), experts, torch.tensor([2, 1, 0]),
                                     None, "up", 2)
    assert keep.nonzero().tolist() == [[0, 0], [1, 0], [1, 1], [2, 1]]
