"""Drop-in replacement of the sparse-MoE blocks of Hugging Face ``transformers`` models.

``replace_moe_blocks(model)`` swaps every supported sparse-MoE block for a ``SonicMoEBlock`` that
holds a ``sonic_learn.MoE`` with the same weights, so the model computes the same function (within
floating-point rounding) through sonic_learn's reference or fast path.

Covered (transformers 5.x, where experts are stored as 3-D tensors and a block returns the hidden
states only):

====================  =======================================================================
block                 router weights (softmax over all E experts, then the K largest)
====================  =======================================================================
Mixtral               renormalised to sum to 1 (Mixtral's router always divides by the sum)
OLMoE                 renormalised iff ``config.norm_topk_prob`` (OLMoE-1B-7B: not)
Qwen3-MoE             renormalised iff ``config.norm_topk_prob`` (Qwen3: yes)
Qwen2-MoE             iff ``norm_topk_prob``, plus the shared expert: ``+ sigmoid(x W_g) * MLP(x)``
====================  =======================================================================

Weight layout. A Hugging Face expert stores ``gate_up_proj[e]`` (2n, d), applied as
``x @ gate_up_proj[e].T`` and split into [gate | up] halves, and ``down_proj[e]`` (d, n). sonic_learn
stores ``w1[e]`` (d, 2n) with gate and up *interleaved* (gate = columns 0::2, up = 1::2) and
``w2[e]`` (n, d), and the router as ``router_w`` (d, E) (Hugging Face: ``gate.weight`` (E, d)).
The weights are copied, so the replaced block's parameters are new tensors (names ``mlp.moe.w1``
etc. in the state dict); the shared expert of Qwen2-MoE is kept as the original module.

Router losses: the model's own ``output_router_logits`` records the outputs of the original router
modules, which are gone after the swap; read the losses from each block's ``moe.router_stats``
instead (``router_stats(model)`` lists them in module order).
"""

from __future__ import annotations

import torch
from torch import nn

from sonic_learn import _checks
from sonic_learn.layer import BACKENDS, MoE
from sonic_learn.losses import RouterStats
from sonic_learn.reference.moe import interleave_gate_up

__all__ = ["SonicMoEBlock", "replace_moe_blocks", "router_stats", "supported_blocks"]


def supported_blocks() -> dict[type, str]:
    """The Hugging Face block classes ``replace_moe_blocks`` knows, each with its family name."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    return {
        MixtralSparseMoeBlock: "mixtral",
        OlmoeSparseMoeBlock: "olmoe",
        Qwen3MoeSparseMoeBlock: "qwen3_moe",
        Qwen2MoeSparseMoeBlock: "qwen2_moe",
    }


class SonicMoEBlock(nn.Module):
    """A Hugging Face sparse-MoE block computed by ``sonic_learn.MoE``: hidden states (B, S, d) in,
    hidden states (B, S, d) out, as the block it replaces.

    ``shared_expert`` and ``shared_expert_gate`` (Qwen2-MoE) add ``sigmoid(x @ W_g) * shared_expert(x)``;
    ``jitter_noise`` (Mixtral's ``router_jitter_noise``) multiplies the input by U(1 - eps, 1 + eps)
    in training mode, as the original block does.
    """

    def __init__(self, moe: MoE, *, shared_expert: nn.Module | None = None,
                 shared_expert_gate: nn.Module | None = None, jitter_noise: float = 0.0) -> None:
        super().__init__()
        self.moe = moe
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.jitter_noise = jitter_noise

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        out = self.moe(hidden_states)  # (B, S, d)
        if self.shared_expert is not None:
            gate = torch.sigmoid(self.shared_expert_gate(hidden_states))  # (B, S, 1)
            out = out + gate * self.shared_expert(hidden_states)
        return out


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _convert(block: nn.Module, family: str, backend: str) -> SonicMoEBlock:
    """A SonicMoEBlock with ``block``'s weights, routing semantics and extras."""
    experts, router = block.experts, block.gate
    if not _is_silu(experts.act_fn):
        raise ValueError(f"{type(block).__name__}: sonic_learn's experts are SwiGLU, so the activation must be "
                         f"silu, got {type(experts.act_fn).__name__}")
    gate_up, down = experts.gate_up_proj, experts.down_proj  # (E, 2n, d), (E, d, n)
    E, two_n, d = gate_up.shape
    normalize = True if family == "mixtral" else bool(router.norm_topk_prob)
    moe = MoE(d, two_n // 2, E, router.top_k, backend=backend, scoring="topk_softmax", normalize=normalize,
              device=gate_up.device, dtype=gate_up.dtype)
    with torch.no_grad():
        moe.router_w.copy_(router.weight.t())  # (d, E)
        moe.w1.copy_(interleave_gate_up(gate_up.transpose(1, 2)))  # (E, d, 2n): [gate | up] -> interleaved
        moe.w2.copy_(down.transpose(1, 2))  # (E, n, d)
    moe.train(block.training)
    new = SonicMoEBlock(moe, shared_expert=getattr(block, "shared_expert", None),
                        shared_expert_gate=getattr(block, "shared_expert_gate", None),
                        jitter_noise=float(getattr(block, "jitter_noise", 0.0) or 0.0))
    new.train(block.training)
    return new


def replace_moe_blocks(model: nn.Module, backend: str = "reference") -> int:
    """Swap every supported sparse-MoE block of ``model`` (in place) for a ``SonicMoEBlock`` holding
    the same weights; return how many were replaced.

    ``backend`` is ``"reference"`` (any device and dtype) or ``"fast"`` (the CuTe-DSL kernels: CUDA
    bf16/fp16, hidden and expert sizes multiples of 8). Blocks of other architectures are left alone
    (see the module docstring for the list).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _checks.check_choice("backend", backend, BACKENDS)
    families = supported_blocks()
    targets = [(name, module) for name, module in model.named_modules() if type(module) in families]
    if targets and targets[0][0] == "":
        raise ValueError(f"model must contain the MoE blocks, got a {type(model).__name__} itself (a block cannot "
                         "be replaced in place: wrap it in a module, or build a SonicMoEBlock from its weights)")
    for name, block in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _convert(block, families[type(block)], backend))
    return len(targets)


def router_stats(model: nn.Module) -> list[RouterStats]:
    """The ``router_stats`` of every replaced block, in module order (after a forward), e.g.
    ``loss = lm_loss + 0.01 * sum(s.load_balancing_loss for s in router_stats(model))``."""
    return [m.moe.router_stats for m in model.modules() if isinstance(m, SonicMoEBlock)]
