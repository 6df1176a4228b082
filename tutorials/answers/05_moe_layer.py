"""Answer key for the exercises of tutorial 5 (tutorials/05_moe_layer.py). Run: python tutorials/answers/05_moe_layer.py

Every answer is computed by the library and checked with an assert, so the key cannot go stale.
"""

import torch

import sonic_learn
from sonic_learn.reference.moe import (
    ReducedMemoryExperts,
    concat_gate_up,
    expected_saved_bytes,
    interleave_gate_up,
    moe_forward,
    route,
    swiglu,
)
from sonic_learn.reference.routing import build_metadata, topk_routing

torch.manual_seed(0)
T, d, n, E, K = 8, 16, 8, 4, 2

# ---------------------------------------------------------------------------------------------
# 1. A token with more experts. Token rounding with tile_m = 4 rounds every expert's count to a
#    multiple of 4, so some expert takes a token that did not pick it: that token has > K experts.
#    Its output is still the score-weighted sum over *all* its pairs.
# ---------------------------------------------------------------------------------------------
layer = sonic_learn.MoE(d, n, E, K, routing="token_rounding", tile_m=4, dtype=torch.float64)
x = torch.randn(T, d, dtype=torch.float64)
with torch.no_grad():
    out = layer(x)
    r = route(x, layer.router_w, K, routing="token_rounding", tile_m=4)
    per_token = torch.bincount(r.token_idx.long(), minlength=T)
    t = int(torch.argmax(per_token))
    assert per_token[t] > K
    o_t = torch.zeros(d, dtype=torch.float64)
    for p in torch.nonzero(r.token_idx == t).squeeze(1).tolist():
        e = int(r.expert_idx[p])
        y = swiglu((x[t] @ layer.w1[e])[None])[0] @ layer.w2[e]  # H -> A -> Y for this pair
        o_t += r.scores[p] * y
    assert torch.allclose(o_t, out[t], atol=1e-12)
print(f"1. token {t} has {int(per_token[t])} experts {r.expert_idx[r.token_idx == t].tolist()}; "
      "its output is the weighted sum over all of them")

# ---------------------------------------------------------------------------------------------
# 2. The router's gradient. sonic_learn.MoE has no scoring argument; moe_forward has. With
#    softmax_topk the scores depend only on the K chosen logits, so every other column of
#    d logits is exactly 0. With topk_softmax the softmax runs over all E logits, so every column
#    gets a gradient.
# ---------------------------------------------------------------------------------------------
w = [p.detach() for p in (layer.router_w, layer.w1, layer.w2)]
dO = torch.randn(T, d, dtype=torch.float64)
zero_columns = {}
for scoring in ("softmax_topk", "topk_softmax"):
    # moe_forward = route + metadata + experts; run the same three steps with the logits as a leaf
    # tensor, so autograd hands us d logits directly.
    logits = (x @ w[0]).requires_grad_(True)  # (T, E)
    r = topk_routing(logits, K, scoring=scoring)
    out_s = ReducedMemoryExperts.apply(x, w[1], w[2], r.scores, build_metadata(r), 128)
    assert torch.allclose(out_s, moe_forward(x, w[0], w[1], w[2], K, scoring=scoring), atol=1e-12)
    (d_logits,) = torch.autograd.grad(out_s, logits, dO)  # (T, E)
    zero_columns[scoring] = int((d_logits == 0).sum(1).min())
    print(f"2. {scoring}: at least {zero_columns[scoring]} of {E} columns of d logits are 0 in every row")
assert zero_columns["softmax_topk"] == E - K  # only the K chosen logits get a gradient
assert zero_columns["topk_softmax"] == 0  # the full softmax reaches every logit

# ---------------------------------------------------------------------------------------------
# 3. Memory of a real layer: sonic_learn.MoE(1536, 256, 128, 8) on T = 24576 tokens, bf16 (the
#    paper's 7B configuration). Reduced memory caches X and H: 2Td + 4TKn = 72 + 192 MiB (plus the
#    routing); the standard backward adds the gathered X and Y, 2TKd = 576 MiB each.
# ---------------------------------------------------------------------------------------------
T7, d7, n7, E7, K7 = 24576, 1536, 256, 128, 8
P7 = T7 * K7
red = expected_saved_bytes(T7, d7, n7, E7, P7, backward="reduced_memory")
std = expected_saved_bytes(T7, d7, n7, E7, P7, backward="standard")
routing_bytes = red["total"] - 2 * T7 * d7 - 4 * P7 * n7
assert 0 < routing_bytes < 4 * 2**20  # a few MiB of scores and index arrays
assert std["total"] - red["total"] == 2 * 2 * P7 * d7 - 2 * T7 * d7  # + gathered X + Y - X
print(f"3. reduced memory {red['total'] / 2**20:.0f} MiB, standard {std['total'] / 2**20:.0f} MiB per layer")

# ---------------------------------------------------------------------------------------------
# 4. From the HF layout. A checkpoint's W1 = [gate | up] is converted to the interleaved layout with
#    interleave_gate_up; the converted weights give exactly the same layer output.
# ---------------------------------------------------------------------------------------------
w1_hf = concat_gate_up(layer.w1.detach())  # what a Hugging Face checkpoint would hold
assert torch.equal(w1_hf[..., :n], layer.w1.detach()[..., 0::2])  # gate first, then up
loaded = sonic_learn.MoE(d, n, E, K, routing="token_rounding", tile_m=4, dtype=torch.float64)
loaded.load_state_dict(layer.state_dict())
with torch.no_grad():
    loaded.w1.copy_(interleave_gate_up(w1_hf))
    assert torch.equal(loaded(x), out)
print("4. interleave_gate_up(W1 as [gate | up]) gives the same output")
