"""Answer key for the exercises of tutorial 6 (tutorials/06_token_rounding_quality.py).
Run: python tutorials/answers/06_token_rounding_quality.py

Every answer is computed by the library and checked with an assert, so the key cannot go stale.
"""

import warnings

import torch

from sonic_learn.reference.routing import token_rounding, tokens_per_tile, topk_routing


def warns(T: int, E: int, K: int, tile_m: int) -> bool:
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        token_rounding(logits, K, tile_m=tile_m)
    return any("paper's condition" in str(w.message) for w in caught)


# ---------------------------------------------------------------------------------------------
# 1. The condition T*K/(E*tile_m) >= 2 gives T >= 2 * E * tile_m / K = 2 * 64 * 128 / 8 = 2048.
# ---------------------------------------------------------------------------------------------
E, K, TILE = 64, 8, 128
assert warns(2047, E, K, TILE) and not warns(2048, E, K, TILE)
print(f"1. smallest T without the warning: 2048 (T*K/(E*tile) = {tokens_per_tile(2048, E, K, TILE):g})")

# ---------------------------------------------------------------------------------------------
# 2. At a ratio of 0.5 (T = 256, E = 8, K = 2, tile 128: f_e is about 64 = tile/2), 'nearest'
#    drops every expert with f_e <= 64 whole and rounds the others up to a full tile. A token
#    loses all its picks when every expert it picked was dropped, but the experts that round up
#    add their best non-picks, which takes some of those tokens back. 'up' only adds pairs, so it
#    drops no token at all.
# ---------------------------------------------------------------------------------------------
T, E, K, TILE = 256, 8, 2, 128
logits = torch.randn(T, E, generator=torch.Generator().manual_seed(2))
nearest = token_rounding(logits, K, tile_m=TILE, mode="nearest")
up = token_rounding(logits, K, tile_m=TILE, mode="up")
tc = topk_routing(logits, K)
f = torch.bincount(tc.expert_idx.long(), minlength=E)
kept_expert = 2 * f > TILE  # (E,) 'nearest' keeps (a full tile of) only the experts with f_e > tile/2
picks = tc.expert_idx.long().view(T, K)
lost_picks = int((~kept_expert[picks].any(dim=1)).sum())  # tokens whose every pick was dropped
no_expert = T - len(set(nearest.token_idx.tolist()))  # tokens absent from the final routing
assert int(nearest.rounding.dropped_tokens) == no_expert <= lost_picks and int(up.rounding.dropped_tokens) == 0
print(f"2. ratio {tokens_per_tile(T, E, K, TILE):g}: with 'nearest' {lost_picks} tokens lose all their picks, the "
      f"experts that round up take {lost_picks - no_expert} of them back, {no_expert} of {T} get no expert; "
      f"'up' drops 0")

# ---------------------------------------------------------------------------------------------
# 3. The tutorial's layer (T = 64, E = 8, K = 2) with tile_m = 16: the ratio is 64*2/(8*16) = 1.
#    Each expert now moves by less than 16 tokens instead of losing all of them.
# ---------------------------------------------------------------------------------------------
T, E, K = 64, 8, 2
logits = torch.randn(T, E, generator=torch.Generator().manual_seed(0))  # the tutorial's logits
small = token_rounding(logits, K, tile_m=16)
st = small.rounding
assert tokens_per_tile(T, E, K, 16) == 1.0 and int(st.dropped_pairs) < E * 16 and int(st.dropped_tokens) < T
print(f"3. ratio 1.0: dropped {int(st.dropped_pairs)} and added {int(st.added_pairs)} of {T * K} pairs, "
      f"{int(st.dropped_tokens)} of {T} tokens lose every expert (at tile 128: all 128 pairs, all 64 tokens)")
