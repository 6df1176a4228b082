"""``sonic_learn.MoE``: the Mixture-of-Experts layer as a ``torch.nn.Module``.

It owns the parameters (in the paper's orientation, see ``sonic_learn.reference.moe``) and calls
the reference implementation (``backend="reference"``, any device) or the CuTe-DSL kernels
(``backend="fast"``, Hopper GPUs, when ``sonic_learn.fast.moe`` is available).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sonic_learn import _checks
from sonic_learn.losses import RouterStats, router_stats
from sonic_learn.reference import moe as reference_moe
from sonic_learn.reference.routing import SCORINGS

BACKENDS = ("reference", "fast")
FAST_DTYPES = (torch.bfloat16, torch.float16)  # what backend="fast" runs in


def _fast_moe_forward():
    """The fast layer's forward with its router outputs (imported on first use; its kernels need
    CuTe-DSL and a Hopper GPU, and say so when called without them)."""
    from sonic_learn.fast import moe as fast_moe  # a plain import: torch.compile traces it (importlib it cannot)

    return fast_moe.moe_forward_with_router


class MoE(nn.Module):
    """A SonicMoE-style MoE layer with SwiGLU experts.

    Quickstart (build, forward and backward with the router losses, an optimizer step, the stats)::

        import torch, sonic_learn
        moe = sonic_learn.MoE(d_model=64, d_expert=32, num_experts=8, top_k=2)
        opt = torch.optim.AdamW(moe.parameters(), lr=1e-3)
        out = moe(torch.randn(4, 16, 64)); stats = moe.router_stats  # tokens per expert, losses
        loss = out.square().mean() + 0.01 * stats.load_balancing_loss + 0.001 * stats.z_loss
        loss.backward(); opt.step(); opt.zero_grad(); print(stats.tokens_per_expert.tolist())

    Args:
        d_model: d, the model (hidden) dimension.
        d_expert: n, each expert's intermediate dimension.
        num_experts: E.
        top_k: K, experts per token.
        routing: ``"topk"`` (token choice) or ``"token_rounding"``.
        tile_m: the GEMM M tile, used by token rounding and the tiled kernels.
        backward: ``"reduced_memory"`` (SonicMoE) or ``"standard"``.
        backend: ``"reference"`` (PyTorch, any device and float dtype) or ``"fast"`` (CuTe-DSL
            kernels: CUDA bf16/fp16 on Hopper, d and n multiples of 8).
        scoring: the router's weights: ``"softmax_topk"`` (Mixtral: softmax over the K picked
            logits) or ``"topk_softmax"`` (Qwen/OLMoE: softmax over all E, keep the K largest).
        normalize: with ``"topk_softmax"``, rescale each token's K weights to sum to 1.
        device: where the parameters are created (``torch.device`` or string; default: torch's
            default device, usually the CPU). Inputs must live on the same device.
        dtype: the parameters' dtype (default: torch's default dtype, usually float32). Inputs must
            have the same dtype; router scores and the losses are computed in float32 (float64 for
            float64) whatever it is.

    Parameters: ``router_w`` (d, E), ``w1`` (E, d, 2n) with gate/up interleaved (gate = columns
    0::2, up = 1::2), ``w2`` (E, n, d).
    Init: the router and w1 use std 1/sqrt(d), w2 uses std 1/sqrt(n), so a unit-variance input gives
    O(1) pre-activations (good for tests that must see a wrong SwiGLU).

    After each forward, ``router_stats`` holds a ``sonic_learn.losses.RouterStats``: tokens per
    expert, the pairs token rounding dropped and added, the load-balancing loss and the z-loss (both
    differentiable; a training loop adds them with its own coefficients). It is computed on the
    device without host synchronization. ``router_stats`` is None before the first forward.
    """

    router_stats: RouterStats | None

    def __init__(self, d_model: int, d_expert: int, num_experts: int, top_k: int, *, routing: str = "topk",
                 tile_m: int = 128, backward: str = "reduced_memory", backend: str = "reference",
                 scoring: str = "softmax_topk", normalize: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Create the parameters on ``device`` (default: torch's default device) in ``dtype`` (default:
        torch's default dtype); inputs must then match both. Every argument: see the class docstring."""
        super().__init__()
        if dtype is not None and dtype not in _checks.FLOAT_DTYPES:  # before torch.empty gives a confusing error
            raise TypeError(f"dtype must be None or a float dtype {_checks.FLOAT_DTYPES}, got {dtype!r}")
        _checks.check_int_range("d_model", d_model, 1)
        _checks.check_int_range("d_expert", d_expert, 1)
        _checks.check_int_range("num_experts", num_experts, 1)
        _checks.check_int_range("top_k", top_k, 1, num_experts, "the number of experts num_experts")
        _checks.check_int_range("tile_m", tile_m, 1)
        _checks.check_choice("routing", routing, reference_moe.ROUTINGS)
        _checks.check_choice("backward", backward, reference_moe.BACKWARD_MODES)
        _checks.check_choice("backend", backend, BACKENDS)
        _checks.check_choice("scoring", scoring, SCORINGS)
        _checks.check_bool("normalize", normalize)
        self.d_model, self.d_expert, self.num_experts, self.top_k = d_model, d_expert, num_experts, top_k
        self.routing, self.tile_m, self.backward, self.backend = routing, tile_m, backward, backend
        self.scoring, self.normalize = scoring, normalize
        kw = {"device": device, "dtype": dtype}
        self.router_w = nn.Parameter(torch.empty(d_model, num_experts, **kw))
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, 2 * d_expert, **kw))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_expert, d_model, **kw))
        self.router_stats = None
        if backend == "fast":  # when the placement is given, check it now: the device first, then the dtype
            if device is not None and self.w1.device.type != "cuda":
                raise ValueError(f"backend='fast' runs the CuTe-DSL kernels on a CUDA (Hopper) GPU, got device="
                                 f"{self.w1.device}; pass device='cuda' or use backend='reference'")
            if dtype is not None and dtype not in FAST_DTYPES:
                raise ValueError(f"backend='fast' runs in bfloat16 or float16, got dtype={dtype}; "
                                 "pass dtype=torch.bfloat16 or use backend='reference'")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.router_w, std=1 / math.sqrt(self.d_model))
        nn.init.normal_(self.w1, std=1 / math.sqrt(self.d_model))
        nn.init.normal_(self.w2, std=1 / math.sqrt(self.d_expert))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> (..., d); also sets ``self.router_stats``."""
        _checks.check_tensor("x", x)
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dim d_model={self.d_model}, got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.d_model)  # (T, d)
        if self.backend == "fast":  # the device before any dtype complaint of the fast path
            _checks.check_cuda("x", flat)
            _checks.check_cuda("MoE parameters (move the module with .cuda())", self.w1)
        forward = reference_moe.moe_forward_with_router if self.backend == "reference" else _fast_moe_forward()
        out, logits, counts = forward(flat, self.router_w, self.w1, self.w2, self.top_k, routing=self.routing,
                                      tile_m=self.tile_m, backward=self.backward, scoring=self.scoring,
                                      normalize=self.normalize)
        self.router_stats = router_stats(logits, counts, self.top_k, rounded=self.routing == "token_rounding")
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_expert={self.d_expert}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, routing={self.routing!r}, tile_m={self.tile_m}, "
                f"backward={self.backward!r}, backend={self.backend!r}, scoring={self.scoring!r}, "
                f"normalize={self.normalize}")
