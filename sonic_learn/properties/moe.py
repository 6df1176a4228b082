"""The whole MoE layer as an oracle: its own routing and one expert MLP per routed pair, in float64.

``oracle_moe_forward`` shares no code with ``sonic_learn.reference.moe``: the routing is
``oracle_routing`` (Python loops and ``sorted`` on the definitions), the experts are a plain
per-pair formula, and autograd differentiates all of it::

    O_t = sum over routed pairs (t, e) of s_te * swiglu(x_t @ W1_e) @ W2_e

So a layer whose ``route()`` ignores ``scoring``, ``rounding_mode`` or ``generator`` disagrees
with it, where an oracle that called the same ``route()`` would not notice.
"""

from __future__ import annotations

import torch

from sonic_learn.properties.backward import swiglu64
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
) -> torch.Tensor:
    """x (T, d) -> out (T, d) float64, arguments as ``sonic_learn.reference.moe.moe_forward``.

    Differentiable w.r.t. x, router_w, w1 and w2 (the scores carry the router's gradient).
    """
    x64, w1_64, w2_64 = x.double(), w1.double(), w2.double()  # (T, d), (E, d, 2n), (E, n, d)
    logits = x64 @ router_w.double()  # (T, E)
    pairs, scores = oracle_routing(logits, k, routing=routing, tile_m=tile_m, scoring=scoring,
                                   mode=rounding_mode, generator=generator)
    out = [x64.new_zeros(x.shape[1]) for _ in range(x.shape[0])]  # T rows of (d,)
    for (t, e), s in zip(pairs, scores):
        y = swiglu64(x64[t] @ w1_64[e]) @ w2_64[e]  # (d,) expert e's output for token t
        out[t] = out[t] + s * y
    return torch.stack(out) if out else x64 * 0.0  # (T, d); T = 0 still hangs off x's graph
