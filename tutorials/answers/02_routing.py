"""Answer key for the exercises of tutorial 2 (tutorials/02_routing.py). Run: python tutorials/answers/02_routing.py

Every answer is computed by the library and checked with an assert, so the key cannot go stale.
"""

import inspect

import torch

from sonic_learn.reference.routing import build_metadata, round_counts, token_rounding, topk_routing

gen = torch.Generator().manual_seed(0)
TILE = 128


def padding_fraction(counts: torch.Tensor, tile_m: int) -> float:
    padded = ((counts + tile_m - 1) // tile_m) * tile_m
    return float((padded - counts).sum() / padded.sum())


# ---------------------------------------------------------------------------------------------
# 1. Waste vs granularity. With TK = 16384 fixed and K = E/8, the mean count per expert is
#    TK/E = 2048, 512, 128 rows. The partial last tile (on average about half a tile, whatever f_e)
#    is a growing share of fewer and fewer full tiles, so the padding fraction grows with E.
# ---------------------------------------------------------------------------------------------
fractions = []
for E in (8, 32, 128):
    K = E // 8
    T = 16384 // K
    counts = build_metadata(topk_routing(torch.randn(T, E, generator=gen), K)).expert_counts.long()
    fractions.append(padding_fraction(counts, TILE))
    print(f"1. E = {E:>3}, K = {K:>2}, T = {T:>5}: mean f_e = {T * K // E:>4}, padding {100 * fractions[-1]:.1f}%")
assert fractions[0] < fractions[1] < fractions[2]
# (To plot it: matplotlib's plt.plot([8, 32, 128], fractions) with a log x axis.)

# ---------------------------------------------------------------------------------------------
# 2. Stochastic rounding is unbiased: over many seeds the mean rounded count approaches f_e.
#    Each draw is off by at most TILE, so the mean of 2000 draws is within a few TILE/sqrt(2000).
# ---------------------------------------------------------------------------------------------
counts = torch.tensor([0, 1, 63, 64, 65, 127, 128, 200, 300])
draws = torch.stack([round_counts(counts, TILE, "stochastic", torch.Generator().manual_seed(s))
                     for s in range(2000)]).double()  # (2000, E)
assert bool(((draws == (counts // TILE) * TILE) | (draws == -(-counts // TILE) * TILE)).all())
error = (draws.mean(0) - counts).abs().max().item()
assert error < 4 * (TILE / 2) / 2000**0.5, error
print(f"2. mean of 2000 stochastic roundings differs from f_e by at most {error:.2f} rows")

# ---------------------------------------------------------------------------------------------
# 3. Exact halves. f_e = 64 with a tile of 128 is exactly half way: "nearest" rounds it DOWN, to 0,
#    because the rule is strict (round up only if the distance up is smaller), as the paper's NR-f.
# ---------------------------------------------------------------------------------------------
assert round_counts(torch.tensor([64]), TILE, "nearest").tolist() == [0]
assert round_counts(torch.tensor([65]), TILE, "nearest").tolist() == [128]
sentence = "an exact half (2 r_e == tile_m) rounds DOWN"
assert sentence in " ".join(inspect.getdoc(round_counts).split())
print(f"3. nearest(64, 128) = 0: the docstring says '{sentence}'")

# ---------------------------------------------------------------------------------------------
# 4. Scores of added tokens. With mode="up" an expert fills its last tile with tokens that did not
#    pick it, so such a token can end up with more than K experts. Its own K token-choice pairs keep
#    the scores token choice gave them; only the added pairs are new.
# ---------------------------------------------------------------------------------------------
T, E, K = 512, 16, 2
logits = torch.randn(T, E, generator=gen)
tc = topk_routing(logits, K)
up = token_rounding(logits, K, tile_m=32, mode="up")
per_token = torch.bincount(up.token_idx.long(), minlength=T)
t = int(torch.nonzero(per_token > K)[0])
tc_scores = {int(e): float(s) for e, s in zip(tc.expert_idx[tc.token_idx == t], tc.scores[tc.token_idx == t])}
up_scores = {int(e): float(s) for e, s in zip(up.expert_idx[up.token_idx == t], up.scores[up.token_idx == t])}
assert set(tc_scores) < set(up_scores)
for e, s in tc_scores.items():
    assert abs(up_scores[e] - s) < 1e-6, (t, e, s, up_scores[e])
added = sorted(set(up_scores) - set(tc_scores))
print(f"4. token {t} has {len(up_scores)} experts under mode='up'; its token-choice scores {tc_scores} are "
      f"unchanged; added experts {added}")
