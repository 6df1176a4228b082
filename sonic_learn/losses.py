"""Router losses and statistics: what a training loop adds to its loss to keep an MoE router healthy.

Notation as in the rest of the package: T tokens, E experts, K experts per token, ``logits`` (T, E)
the router's output ``x @ W_r``, and the routed (token, expert) pairs, P of them (P = T*K for
token-choice top-k).

* ``tokens_per_expert``: c_e, how many routed pairs go to expert e.
* ``load_balancing_loss``: the Switch Transformer auxiliary loss (Fedus et al. 2021, eq. 4)
  ``E * sum_e f_e * P_e``, with

  - f_e = c_e / P, the fraction of routed pairs that go to expert e (sum_e f_e = 1), and
  - P_e = (1/T) * sum_t softmax(logits[t])[e], the router probability of expert e averaged over
    the tokens (softmax over all E experts).

  It is 1 when both are uniform (f_e = P_e = 1/E) and grows as the router concentrates tokens on
  few experts. Only P_e carries a gradient (f_e comes from an argmax). Hugging Face's
  ``load_balancing_loss_func`` (Mixtral, OLMoE, Qwen-MoE) divides c_e by T instead of P = T*K, so
  for top-k routing its value is K times this one.
* ``router_z_loss``: the ST-MoE z-loss (Zoph et al. 2022, eq. 5)
  ``(1/T) * sum_t (logsumexp_e logits[t, e])^2``, which keeps the logits small.

In a training loop, with your own router (``logits`` (T, E), ``topk_idx`` (T, K)) or with
``sonic_learn.MoE``, whose ``router_stats`` carries the same two losses after every forward::

    out = moe(x)
    aux = moe.router_stats  # or: load_balancing_loss(logits, topk_idx), router_z_loss(logits)
    loss = task_loss(out) + 0.01 * aux.load_balancing_loss + 0.001 * aux.z_loss
    loss.backward(); opt.step(); opt.zero_grad()

All three run on the device with static shapes (no ``.item()``, no ``bincount``): they add no host
synchronization and can be captured in a CUDA graph or compiled with ``torch.compile(fullgraph=True)``.
With no tokens (T = 0) or no pairs, both losses are 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sonic_learn import _checks

__all__ = ["RouterStats", "load_balancing_loss", "router_stats", "router_z_loss", "tokens_per_expert"]


def _check_logits(logits: object) -> torch.Tensor:
    logits = _checks.check_tensor("logits", logits)
    _checks.check_ndim("logits", logits, 2, "(T tokens, E experts)")
    _checks.check_dtype("logits", logits, _checks.FLOAT_DTYPES)
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one expert column (E >= 1), got shape {tuple(logits.shape)}")
    return logits


def tokens_per_expert(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """c_e: how many entries of ``expert_idx`` (any shape, e.g. (T, K) or (P,)) name expert e; (E,) int64.

    A scatter-add of ones, so the size is E whatever the data (``bincount`` would read it on the host).
    """
    _checks.check_tensor("expert_idx", expert_idx)
    _checks.check_dtype("expert_idx", expert_idx, (torch.int32, torch.int64))
    _checks.check_int_range("num_experts", num_experts, 1)
    flat = expert_idx.reshape(-1).long()  # (P,)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)  # (E,)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def load_balancing_loss(logits: torch.Tensor, expert_idx: torch.Tensor | None = None, *,
                        counts: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style load-balancing loss ``E * sum_e f_e * P_e`` (see the module docstring).

    Args:
        logits: (T, E) router logits (any float dtype; the softmax runs in float32, float64 for float64).
        expert_idx: the routed experts, e.g. (T, K) from a top-k or (P,) from a ``Routing``; or
        counts: (E,) c_e directly (pass exactly one of the two).

    Returns a 0-d tensor (float32, float64 for float64 logits), differentiable w.r.t. ``logits``.
    """
    logits = _check_logits(logits)
    T, E = logits.shape
    if (expert_idx is None) == (counts is None):
        raise ValueError("pass exactly one of expert_idx (the routed experts) and counts (tokens per expert)")
    if counts is None:
        counts = tokens_per_expert(expert_idx, E)  # (E,)
    else:
        _checks.check_tensor("counts", counts)
        _checks.check_shape("counts", counts, (E,), "(E,) with E = logits.shape[1]")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    num_pairs = counts.sum().to(acc).clamp(min=1)  # P (1 when there are none: the loss is then 0)
    f = counts.to(acc) / num_pairs  # (E,) fraction of routed pairs per expert, no gradient
    probs = torch.softmax(logits.to(acc), dim=1)  # (T, E)
    p = probs.sum(dim=0) / max(T, 1)  # (E,) mean router probability per expert
    return E * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``(1/T) * sum_t logsumexp(logits[t])^2``.

    ``logits`` (T, E); returns a 0-d tensor (float32, float64 for float64 logits), differentiable.
    """
    logits = _check_logits(logits)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(logits.to(acc), dim=1)  # (T,)
    return (lse * lse).sum() / max(logits.shape[0], 1)


@dataclass(frozen=True)
class RouterStats:
    """What ``sonic_learn.MoE`` records about its router after each forward (``moe.router_stats``).

    Every field is a tensor on the layer's device: reading one (``.item()``, ``print``) is the only
    host synchronization, and it happens when you ask, not in the forward.

    Attributes:
        tokens_per_expert: (E,) int64, c_e = routed pairs per expert (after token rounding).
        pairs_dropped: () int64, token-choice pairs that token rounding removed (0 for top-k).
        pairs_added: () int64, pairs that token rounding added beyond token choice (0 for top-k).
        load_balancing_loss: () float, ``E * sum_e f_e * P_e`` (``load_balancing_loss``), differentiable.
        z_loss: () float, ``mean_t logsumexp(logits[t])^2`` (``router_z_loss``), differentiable.
    """

    tokens_per_expert: torch.Tensor
    pairs_dropped: torch.Tensor
    pairs_added: torch.Tensor
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor


def router_stats(logits: torch.Tensor, expert_counts: torch.Tensor, k: int, *, rounded: bool) -> RouterStats:
    """The ``RouterStats`` of one forward from the router ``logits`` (T, E) and the routed pairs per
    expert ``expert_counts`` (E,). With ``rounded=True`` (token rounding) the token-choice counts are
    recomputed from the logits (the K largest per token, the lower expert first on ties, as the
    routers pick) to count the pairs rounding dropped and added: expert e loses max(tc_e - c_e, 0)
    of its picks or gains max(c_e - tc_e, 0) tokens."""
    counts = expert_counts.long()  # (E,)
    if rounded:
        picks = torch.sort(logits.detach(), dim=1, descending=True, stable=True).indices[:, :k]  # (T, K)
        change = counts - tokens_per_expert(picks, logits.shape[1])  # (E,) c_e - tc_e
        dropped, added = (-change).clamp(min=0).sum(), change.clamp(min=0).sum()
    else:
        dropped = added = torch.zeros((), dtype=torch.int64, device=counts.device)
    return RouterStats(
        tokens_per_expert=counts,
        pairs_dropped=dropped,
        pairs_added=added,
        load_balancing_loss=load_balancing_loss(logits, counts=counts),
        z_loss=router_z_loss(logits),
    )
