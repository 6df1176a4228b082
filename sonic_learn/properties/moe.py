"""The whole MoE layer as an oracle: its own routing and one expert MLP per routed pair, in float64.

``oracle_moe_forward`` shares no code with ``sonic_learn.reference.moe``: the routing is
``oracle_routing`` (Python loops and ``sorted`` on the definitions), the experts are the plain
formula, and autograd differentiates all of it::

    O_t = sum over routed pairs (t, e) of s_te * swiglu(x_t @ W1_e) @ W2_e   (one expert at a time)

So a layer whose ``route()`` ignores ``scoring``, ``rounding_mode`` or ``generator`` disagrees
with it, where an oracle that called the same ``route()`` would not notice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sonic_learn.properties.routing import oracle_routing


def oracle_moe_forward(
    x: torch.Tensor,
    router_w: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    k: int,
    *,
    routing: str = "topk",
    tile_m: int = 128,
    scoring: str = "softmax_topk",
    rounding_mode: str = "nearest",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """x (T, d) -> out (T, d) in ``dtype``, arguments as ``sonic_learn.reference.moe.moe_forward``.

    ``dtype`` is what the logits, GEMMs and SwiGLU are computed in: float64 for the oracle, or the
    inputs' own dtype for a plain PyTorch loop in that dtype (the "torch's own same-dtype error"
    that a tolerance is measured against; the scores and the sum over a token's experts are then
    float32). Differentiable w.r.t. x, router_w, w1 and w2 (the scores carry the router's gradient).
    """
    acc = torch.promote_types(dtype, torch.float32)  # scores and the per-token sum
    x_, w1_, w2_ = x.to(dtype), w1.to(dtype), w2.to(dtype)  # (T, d), (E, d, 2n), (E, n, d)
    logits = x_ @ router_w.to(dtype)  # (T, E)
    pairs, scores = oracle_routing(logits, k, routing=routing, tile_m=tile_m, scoring=scoring,
                                   mode=rounding_mode, generator=generator)
    out = x_.to(acc) * 0.0  # (T, d), on x's graph even when no pair is routed
    for e in range(w1.shape[0]):
        mine = [i for i, (_, expert) in enumerate(pairs) if expert == e]  # the pairs routed to e
        if mine:
            tokens = torch.tensor([pairs[i][0] for i in mine])  # (T_e,)
            h = x_[tokens] @ w1_[e]  # (T_e, 2n) gate and up interleaved
            y = (h[:, 1::2] * F.silu(h[:, 0::2])) @ w2_[e]  # (T_e, d)
            out = out.index_add(0, tokens, scores[mine].to(acc)[:, None] * y.to(acc))
    return out.to(dtype)  # (T, d)
