"""The whole MoE layer, forward + backward: the naive loop, the references, the fast layer and
upstream sonic-moe side by side.

The upstream row calls two functions, ``upstream_available(setup)`` and ``upstream_build(case)``.
When the module ``sonic_learn.compare.upstream`` exists they delegate to its ``available(setup) ->
(ok, why)`` and ``build(case) -> run``, where ``run()`` returns ``(out, dx, drouter_w, dw1, dw2)``
like every other row of this pair (``case`` carries x, router_w, w1, w2, dout and the problem).
Without it, the row calls an installed ``sonicmoe`` package in this process, and is ``n/a`` with the
reason when there is none.
"""

from __future__ import annotations

import torch

from sonic_learn.compare.pairs import layer
from sonic_learn.compare.pairs.common import Case
from sonic_learn.compare.pairs.layer import LayerRow
from sonic_learn.compare.registry import Impl, Setup
from sonic_learn.compare.runner import PairSpec

try:
    import sonic_learn.compare.upstream as upstream_runner
except ModuleNotFoundError as exc:  # the optional upstream runner is not part of this install
    if exc.name != "sonic_learn.compare.upstream":
        raise
    upstream_runner = None


def _sonicmoe():
    """The installed upstream package, or None."""
    try:
        import sonicmoe  # noqa: PLC0415 - optional, and not ours
    except ImportError:
        return None
    return sonicmoe


def upstream_available(setup: Setup) -> tuple[bool, str]:
    """Whether the upstream sonic-moe row can run here, and why not."""
    if upstream_runner is not None:
        return upstream_runner.available(setup)
    if setup.device.type != "cuda":
        return False, "upstream sonic-moe runs on CUDA (Hopper/Blackwell) only"
    if setup.dtype not in (torch.bfloat16, torch.float16):
        return False, "upstream sonic-moe supports bf16/fp16 only"
    sonicmoe = _sonicmoe()
    if sonicmoe is None:
        return False, "sonicmoe is not installed"
    if not hasattr(sonicmoe, "moe_TC_softmax_topk_layer"):
        return False, "sonicmoe has no moe_TC_softmax_topk_layer (unknown version)"
    return True, ""


def _upstream_forward(case: Case) -> layer.Forward:
    """sonic-moe's layer in this process, converted from our weight layout."""
    sonicmoe, K = _sonicmoe(), case.problem.K

    def fwd(x, rw, w1, w2):
        # sonic-moe takes F.linear-style weights: router (E, d), c_fc (E, 2n, d), c_proj (E, d, n),
        # passed as (2n, d, E) / (d, n, E) views; gate/up interleaved like ours.
        c_fc, c_proj = w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
        out, _, _ = sonicmoe.moe_TC_softmax_topk_layer(
            x, rw.t().contiguous(), c_fc.permute(1, 2, 0), None, c_proj.permute(1, 2, 0), None, K,
            torch.cuda.current_stream().cuda_stream)
        return out

    return fwd


def upstream_build(case: Case):
    """run() -> (out, dx, drouter_w, dw1, dw2) of upstream sonic-moe on this case."""
    if upstream_runner is not None:
        return upstream_runner.build(case)
    return layer.forward_backward(_upstream_forward)(case)


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
               upstream_build, upstream_available),
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
