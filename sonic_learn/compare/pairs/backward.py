"""Pair 4, the backward: standard (cache Y, dS = <dO, Y>) vs reduced-memory (cache X and H,
dS = <dA', A>). Timed: the backward pass only, re-run on one retained graph; the table adds the
activation bytes each row holds for backward, measured and in closed form."""

from __future__ import annotations

from sonic_learn.compare.pairs import layer
from sonic_learn.compare.pairs.layer import LayerRow
from sonic_learn.compare.runner import PairSpec

ROWS = (
    layer.row("naive PyTorch loop", "baseline", LayerRow("naive"), layer.backward_only),
    layer.row("reference standard", "reference", LayerRow("reference", backward="standard"), layer.backward_only),
    layer.row("reference reduced-memory", "reference", LayerRow("reference", backward="reduced_memory"),
              layer.backward_only),
    layer.row("fast standard", "fast", LayerRow("fast", backward="standard"), layer.backward_only),
    layer.row("fast reduced-memory", "fast", LayerRow("fast", backward="reduced_memory"), layer.backward_only),
)

SPEC = PairSpec(
    key="backward",
    title="backward: standard vs reduced-memory (SonicMoE)",
    oracle="float64 naive per-expert loop differentiated by autograd",
    make_case=layer.make_case,
    compare=layer.compare,
    cost=layer.layer_cost(2 * layer.FORWARD_FLOPS),
    timed="the backward pass only (re-run on one retained graph)",
    saved=layer.saved,
    rows=ROWS,
    work=layer.layer_work(oracle_routings=1, backward_only=True),
)
