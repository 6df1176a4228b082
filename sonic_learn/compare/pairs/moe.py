"""The whole MoE layer, forward + backward: the naive loop, the references, the fast layer and
upstream sonic-moe side by side.

The upstream row calls ``sonic_learn.compare.upstream``: ``available(setup) -> (ok, why)`` (n/a with
the reason when upstream is absent or the setup is not CUDA bf16/fp16) and ``build(case)``, which runs
upstream's layer in its own process on this case's inputs and returns a callable giving
``(out, dx, drouter_w, dw1, dw2)`` like every other row of this pair, carrying the timing measured
there (the runner reports it instead of timing the callable).
"""

from __future__ import annotations

from sonic_learn.compare import upstream
from sonic_learn.compare.pairs import layer
from sonic_learn.compare.pairs.layer import LayerRow
from sonic_learn.compare.registry import Impl
from sonic_learn.compare.runner import PairSpec

ROWS = (
    layer.row("naive PyTorch loop", "baseline", LayerRow("naive"), layer.forward_backward),
    layer.row("reference standard", "reference", LayerRow("reference", backward="standard"), layer.forward_backward),
    layer.row("reference reduced-memory", "reference", LayerRow("reference", backward="reduced_memory"),
              layer.forward_backward),
    layer.row("reference reduced-memory + token rounding", "reference",
              LayerRow("reference", "token_rounding", "reduced_memory"), layer.forward_backward),
    layer.row("fast standard", "fast", LayerRow("fast", backward="standard"), layer.forward_backward),
    layer.row("fast reduced-memory", "fast", LayerRow("fast", backward="reduced_memory"), layer.forward_backward),
    layer.row("fast reduced-memory + token rounding", "fast", LayerRow("fast", "token_rounding", "reduced_memory"),
              layer.forward_backward),
    Impl("upstream sonic-moe", "upstream", "reduced_memory", LayerRow("upstream", backward="reduced_memory"),
         upstream.build, upstream.available),
)

SPEC = PairSpec(
    key="moe",
    title="MoE layer: forward + backward",
    oracle="float64 naive per-expert loop differentiated by autograd (same routing)",
    make_case=layer.make_case,
    compare=layer.compare,
    cost=layer.layer_cost(3 * layer.FORWARD_FLOPS),
    timed="forward + backward of the whole layer",
    saved=layer.saved,
    rows=ROWS,
    work=layer.layer_work(oracle_routings=2, backward_only=False),  # top-k and token rounding
)
