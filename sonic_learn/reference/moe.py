"""The whole MoE layer, and pair 4 of SonicMoE: the standard vs the reduced-memory backward.

Forward (paper Algorithm 1; notation T tokens, d model dim, n expert dim, E experts,
K experts per token, P routed (token, expert) pairs, P = T*K for token-choice top-k)::

    logits = X @ W_r                          (T, E)     router
    (t, e, s) triples = route(logits)         (P,)       top-k or token rounding, scores s in fp32
    H_e = X[tokens of e] @ W1_e               (f_e, 2n)  up-projection, gather fused
    A_e = SwiGLU(H_e)                         (f_e, n)   gate = H[:, 0::2], up = H[:, 1::2]
    Y_e = A_e @ W2_e                          (f_e, d)   down-projection
    O_t = sum over pairs (t, e, s) of s * Y_e[t]   (T, d)  aggregation (gather-and-sum)

Backward. Both modes give the same gradients; they differ in what they cache and how they get dS,
the gradient of the routing score s of a pair (token t, expert e):

* **standard** (ScatterMoE, MoMoE, most PyTorch MoEs): cache the gathered X, H and Y, and use
  ``dS = <dO_t, Y_e[t]>``. Y and gathered X are (P, d) tensors: at fine granularity (large K)
  they dominate activation memory.
* **reduced memory** (SonicMoE, paper Section 3.2 and Appendix C): cache only X, H and the
  routing. Since ``Y = A @ W2``, ``<dO, Y> = <dO @ W2^T, A> = <dA', A>`` with ``dA' = dO @ W2^T``,
  a product the backward computes anyway, and A is recomputed from H in registers. Nothing of size
  (P, d) is ever cached: activation memory is ``2Td + 4Pn`` bytes in bf16 (plus routing metadata),
  the same as a dense MLP with the same active parameters.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from sonic_learn import _checks
from sonic_learn.contracts import (  # noqa: F401  (the shared contract, re-exported under its old names here)
    BACKWARD_MODES, ROUTINGS, Routing, RoutingMetadata, SavedTensor, check_layer_inputs, expected_saved_bytes,
    record_saved_tensors)
from sonic_learn.reference import grouped_gemm as _grouped_gemm
from sonic_learn.reference.routing import build_metadata, token_rounding, topk_routing


# ----------------------------------------------------------------------------------------------
# SwiGLU on the interleaved layout, and its derivative
# ----------------------------------------------------------------------------------------------
# --8<-- [start:swiglu]
def swiglu(h: torch.Tensor) -> torch.Tensor:
    """A = up * silu(gate) with gate = h[:, 0::2] and up = h[:, 1::2] (SonicMoE's interleaved layout).

    Computed in float32 (float64 for float64 input) and returned in h's dtype, as the kernel's
    epilogue does.
    """
    hf = h.float() if h.dtype != torch.float64 else h
    gate, up = hf[..., 0::2], hf[..., 1::2]  # (M, n), (M, n)
    return (up * F.silu(gate)).to(h.dtype)  # (M, n)


def swiglu_backward(h: torch.Tensor, dA: torch.Tensor) -> torch.Tensor:
    """dH from dA for A = up * silu(gate):  d/d(up) = silu(gate),  d/d(gate) = up * silu'(gate).

    silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g))). Returns dH interleaved like h, in h's dtype.
    """
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    hf, dAf = h.to(acc), dA.to(acc)
    gate, up = hf[..., 0::2], hf[..., 1::2]  # (M, n), (M, n)
    sig = torch.sigmoid(gate)  # (M, n)
    dH = torch.empty_like(hf)  # (M, 2n)
    dH[..., 0::2] = dAf * up * sig * (1 + gate * (1 - sig))  # d gate
    dH[..., 1::2] = dAf * gate * sig  # d up = dA * silu(gate)
    return dH.to(h.dtype)
# --8<-- [end:swiglu]


# ----------------------------------------------------------------------------------------------
# Small pieces shared by both autograd Functions
# ----------------------------------------------------------------------------------------------
def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _contiguous_meta(meta: RoutingMetadata) -> RoutingMetadata:
    """Metadata for an A operand that is already in expert-grouped row order (row r reads row r)."""
    rows = torch.arange(meta.num_rows, dtype=torch.int32, device=meta.gather_idx.device)
    return dataclasses.replace(meta, gather_idx=rows, num_tokens=meta.num_rows)


def _meta_from_saved(offsets, gather_idx, pair_of_row, num_tokens) -> RoutingMetadata:
    """Rebuild the metadata the backward needs from the few index tensors it saved."""
    counts = (offsets[1:] - offsets[:-1]).to(torch.int32)
    empty = torch.empty(0, dtype=torch.int32, device=offsets.device)
    return RoutingMetadata(
        expert_counts=counts,
        expert_offsets=offsets,
        gather_idx=gather_idx,
        pair_of_row=pair_of_row,
        row_of_pair=empty,  # not needed by the backward, so not cached
        num_tokens=num_tokens,
        num_experts=offsets.numel() - 1,
    )


# --8<-- [start:aggregate]
def aggregate(rows: torch.Tensor, weights: torch.Tensor | None, meta: RoutingMetadata) -> torch.Tensor:
    """Gather-and-sum: out[t] = sum over rows r of token t of weights[r] * rows[r].

    ``rows`` is (P, d) in expert-grouped order, ``weights`` (P,) in the same order (or None for an
    unweighted sum, as in dX). Accumulates in float32 and returns rows' dtype. Each token *pulls*
    its rows (no scatter from the GEMM epilogue), so the result does not depend on thread timing.
    """
    acc = _acc_dtype(rows)
    contrib = rows.to(acc)  # (P, d)
    if weights is not None:
        contrib = contrib * weights.to(acc)[:, None]  # (P, d)
    out = torch.zeros(meta.num_tokens, rows.shape[1], dtype=acc, device=rows.device)  # (T, d)
    out.index_add_(0, meta.gather_idx.long(), contrib)
    return out.to(rows.dtype)
# --8<-- [end:aggregate]


# --8<-- [start:dh_epilogue]
def dh_epilogue(h: torch.Tensor, dA_prime: torch.Tensor, row_scores: torch.Tensor):
    """The epilogue of SonicMoE's dH kernel, row by row: (dH, dS, A') from H and dA' = dO @ W2^T.

    A is recomputed from H (never cached); dS = <dA', A> is the score gradient; dA = s * dA' feeds
    dSwiGLU; A' = s * A is what the dW2 GEMM needs. Reductions in float32 (float64 for float64).
    """
    acc = _acc_dtype(h)
    a = swiglu(h)  # (P, n)  recomputed, never cached
    dS = (dA_prime.to(acc) * a.to(acc)).sum(dim=1)  # (P,)  dS = <dA', A>
    dA = (dA_prime.to(acc) * row_scores.to(acc)[:, None]).to(h.dtype)  # (P, n)  dA = s * dA'
    dH = swiglu_backward(h, dA)  # (P, 2n)
    a_scaled = (a.to(acc) * row_scores.to(acc)[:, None]).to(h.dtype)  # (P, n)  A' = s * A
    return dH, dS, a_scaled
# --8<-- [end:dh_epilogue]


# ----------------------------------------------------------------------------------------------
# The grouped GEMMs the experts call, and their static-shape twins for torch.compile
# ----------------------------------------------------------------------------------------------
# The reference grouped GEMMs walk the (expert, tile) grid with sizes read on the host (``tolist``),
# as a tile scheduler does; torch.compile cannot trace sizes that depend on the routing. While
# compiling, the experts use the twins below instead: the same products with static shapes, every
# row multiplied by EVERY expert's weight and the result of its own expert kept (E times the
# FLOPs: a compile-friendly oracle for small problems, not a fast path).
def _expert_of_row(meta: RoutingMetadata) -> torch.Tensor:
    """(P,) int64: the expert that owns each grouped row (rows of e are offsets[e] : offsets[e+1])."""
    rows = torch.arange(meta.num_rows, device=meta.expert_offsets.device)  # (P,)
    return torch.searchsorted(meta.expert_offsets[1:].long(), rows, right=True)  # (P,) #ends <= r


def gather_fused_grouped_gemm(a: torch.Tensor, w: torch.Tensor, meta: RoutingMetadata, *, tile_m: int) -> torch.Tensor:
    """Row r of the result = a[gather_idx[r]] @ w[e(r)]: ``reference.grouped_gemm``'s (its static twin
    while compiling). ``w`` (E, K, N), may be a transposed view."""
    if not torch.compiler.is_compiling():
        return _grouped_gemm.gather_fused_grouped_gemm(a, w, meta, tile_m=tile_m)
    acc = _acc_dtype(a)
    a_rows = a[meta.gather_idx.long()].to(acc)  # (P, K)
    owner = _expert_of_row(meta)[:, None]  # (P, 1)
    out = torch.zeros(a_rows.shape[0], w.shape[2], dtype=acc, device=a.device)  # (P, N)
    for e in range(w.shape[0]):
        out = torch.where(owner == e, a_rows @ w[e].to(acc), out)
    return out.to(a.dtype)


def grouped_gemm_varlen_k(a: torch.Tensor, b: torch.Tensor, meta: RoutingMetadata, *, gather_a: bool) -> torch.Tensor:
    """out[e] = a[rows of e]^T @ b[rows of e], (E, K, N): ``reference.grouped_gemm``'s (its static twin
    while compiling)."""
    if not torch.compiler.is_compiling():
        return _grouped_gemm.grouped_gemm_varlen_k(a, b, meta, gather_a=gather_a)
    acc = _acc_dtype(a)
    a_rows = (a[meta.gather_idx.long()] if gather_a else a).to(acc)  # (P, K)
    owner = _expert_of_row(meta)[:, None]  # (P, 1)
    mine = [torch.where(owner == e, a_rows, 0).T @ b.to(acc) for e in range(meta.num_experts)]  # E x (K, N)
    return torch.stack(mine).to(a.dtype)  # (E, K, N)


# ----------------------------------------------------------------------------------------------
# Reduced-memory experts (SonicMoE)
# ----------------------------------------------------------------------------------------------
# --8<-- [start:reduced_memory]
class ReducedMemoryExperts(torch.autograd.Function):
    """Experts with SonicMoE's backward: caches X, H and the routing; dS = <dA', A>."""

    @staticmethod
    def forward(ctx, x, w1, w2, scores, meta: RoutingMetadata, tile_m: int):
        row_scores = scores[meta.pair_of_row.long()]  # (P,) score of each grouped row
        h = gather_fused_grouped_gemm(x, w1, meta, tile_m=tile_m)  # (P, 2n) up-proj, X gathered
        a = swiglu(h)  # (P, n)
        y = gather_fused_grouped_gemm(a, w2, _contiguous_meta(meta), tile_m=tile_m)  # (P, d) down-proj
        out = aggregate(y, row_scores, meta)  # (T, d); y is freed when forward returns
        # Cache only X, H and the routing: no (P, d) tensor.
        ctx.save_for_backward(x, w1, w2, h, scores, meta.expert_offsets, meta.gather_idx, meta.pair_of_row)
        ctx.tile_m = tile_m
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w1, w2, h, scores, offsets, gather_idx, pair_of_row = ctx.saved_tensors
        meta = _meta_from_saved(offsets, gather_idx, pair_of_row, x.shape[0])
        grouped = _contiguous_meta(meta)
        tile_m = ctx.tile_m
        row_scores = scores[pair_of_row.long()]  # (P,)

        # Step 1 (the "dH kernel"): dA' = dO[token of row] @ W2^T, dO gathered inside the GEMM.
        w2_t = w2.transpose(1, 2)  # (E, d, n)
        dA_prime = gather_fused_grouped_gemm(dout, w2_t, meta, tile_m=tile_m)  # (P, n)
        #   ... and its epilogue gives dH, dS and A' from H (see dh_epilogue).
        dH, dS_rows, a_scaled = dh_epilogue(h, dA_prime, row_scores)  # (P, 2n), (P,), (P, n)

        # Step 2: dW2[e] = A'_e^T @ dO_e, computed as (dO_e^T @ A'_e)^T with dO gathered on K.
        dw2 = grouped_gemm_varlen_k(dout, a_scaled, meta, gather_a=True).transpose(1, 2)  # (E, n, d)
        # Step 3: dX~ = dH @ W1^T (contiguous rows), then dX = unweighted gather-and-sum.
        dx_rows = gather_fused_grouped_gemm(dH, w1.transpose(1, 2), grouped, tile_m=tile_m)  # (P, d)
        dx = aggregate(dx_rows, None, meta)  # (T, d)
        # Step 4: dW1[e] = X_e^T @ dH_e with X gathered on K.
        dw1 = grouped_gemm_varlen_k(x, dH, meta, gather_a=True)  # (E, d, 2n)
        # Step 5: route dS back from grouped-row order to pair order.
        dscores = torch.zeros_like(scores)  # (P,)
        dscores[pair_of_row.long()] = dS_rows.to(scores.dtype)
        return dx, dw1.to(w1.dtype), dw2.to(w2.dtype), dscores, None, None
# --8<-- [end:reduced_memory]


# ----------------------------------------------------------------------------------------------
# Standard experts (the baseline the paper compares against)
# ----------------------------------------------------------------------------------------------
# --8<-- [start:standard]
class StandardExperts(torch.autograd.Function):
    """Experts with the classic backward: caches gathered X, H and Y; dS = <dO, Y>."""

    @staticmethod
    def forward(ctx, x, w1, w2, scores, meta: RoutingMetadata, tile_m: int):
        row_scores = scores[meta.pair_of_row.long()]  # (P,)
        x_gathered = x[meta.gather_idx.long()]  # (P, d)  an explicit copy, cached below
        grouped = _contiguous_meta(meta)
        h = gather_fused_grouped_gemm(x_gathered, w1, grouped, tile_m=tile_m)  # (P, 2n)
        a = swiglu(h)  # (P, n)
        y = gather_fused_grouped_gemm(a, w2, grouped, tile_m=tile_m)  # (P, d)
        out = aggregate(y, row_scores, meta)  # (T, d)
        ctx.save_for_backward(x_gathered, w1, w2, h, y, scores, meta.expert_offsets, meta.gather_idx, meta.pair_of_row)
        ctx.tile_m = tile_m
        ctx.num_tokens = x.shape[0]
        return out

    @staticmethod
    def backward(ctx, dout):
        x_gathered, w1, w2, h, y, scores, offsets, gather_idx, pair_of_row = ctx.saved_tensors
        meta = _meta_from_saved(offsets, gather_idx, pair_of_row, ctx.num_tokens)
        grouped = _contiguous_meta(meta)
        tile_m = ctx.tile_m
        acc = _acc_dtype(h)
        row_scores = scores[pair_of_row.long()]  # (P,)

        # Step 1: gather dO into row order (a separate gather kernel in ScatterMoE / MoMoE).
        dout_rows = dout[gather_idx.long()]  # (P, d)
        # Step 2: dS = <dO, Y>, a separate reduction over the cached Y.
        dS_rows = (dout_rows.to(acc) * y.to(acc)).sum(dim=1)  # (P,)
        # Step 3: dY = s * dO; dA = dY @ W2^T; dW2 = A^T @ dY.
        dy = (dout_rows.to(acc) * row_scores.to(acc)[:, None]).to(h.dtype)  # (P, d)
        dA = gather_fused_grouped_gemm(dy, w2.transpose(1, 2), grouped, tile_m=tile_m)  # (P, n)
        a = swiglu(h)  # (P, n)
        dw2 = grouped_gemm_varlen_k(a, dy, grouped, gather_a=False)  # (E, n, d)
        # Step 4: dSwiGLU as a separate pass.
        dH = swiglu_backward(h, dA)  # (P, 2n)
        # Step 5: dW1 = Xg^T @ dH on the cached gathered X; dX~ = dH @ W1^T; dX = scatter-add.
        dw1 = grouped_gemm_varlen_k(x_gathered, dH, grouped, gather_a=False)  # (E, d, 2n)
        dx_rows = gather_fused_grouped_gemm(dH, w1.transpose(1, 2), grouped, tile_m=tile_m)  # (P, d)
        dx = aggregate(dx_rows, None, meta)  # (T, d)
        dscores = torch.zeros_like(scores)  # (P,)
        dscores[pair_of_row.long()] = dS_rows.to(scores.dtype)
        return dx, dw1.to(w1.dtype), dw2.to(w2.dtype), dscores, None, None
# --8<-- [end:standard]


# ----------------------------------------------------------------------------------------------
# The layer's forward
# ----------------------------------------------------------------------------------------------
def router_logits(x: torch.Tensor, router_w: torch.Tensor) -> torch.Tensor:
    """The router GEMM: logits = x @ router_w, (T, E), in float32 (float64 for float64 x)."""
    score_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x @ router_w).to(score_dtype)  # (T, E)


def route_logits(
    logits: torch.Tensor,
    k: int,
    *,
    routing: str = "topk",
    tile_m: int = 128,
    scoring: str = "softmax_topk",
    normalize: bool = False,
    rounding_mode: str = "nearest",
    generator: torch.Generator | None = None,
) -> Routing:
    """Top-k or token-rounding triples from the router logits (scores in float32)."""
    if routing == "topk":
        return topk_routing(logits, k, scoring=scoring, normalize=normalize)
    return token_rounding(logits, k, tile_m=tile_m, mode=rounding_mode, generator=generator, scoring=scoring,
                          normalize=normalize)


def route(
    x: torch.Tensor,
    router_w: torch.Tensor,
    k: int,
    *,
    routing: str = "topk",
    tile_m: int = 128,
    scoring: str = "softmax_topk",
    normalize: bool = False,
    rounding_mode: str = "nearest",
    generator: torch.Generator | None = None,
) -> Routing:
    """Router: logits = x @ router_w, then top-k or token-rounding triples (scores in float32)."""
    return route_logits(router_logits(x, router_w), k, routing=routing, tile_m=tile_m, scoring=scoring,
                        normalize=normalize, rounding_mode=rounding_mode, generator=generator)


# --8<-- [start:moe_forward]
def moe_forward(
    x: torch.Tensor,
    router_w: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    k: int,
    *,
    routing: str = "topk",
    tile_m: int = 128,
    backward: str = "reduced_memory",
    scoring: str = "softmax_topk",
    normalize: bool = False,
    rounding_mode: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The MoE layer: x (T, d) -> out (T, d) in x's dtype.

    Weights in the paper's orientation: ``router_w`` (d, E), ``w1`` (E, d, 2n) with gate/up
    interleaved (gate = columns 0::2, up = 1::2), ``w2`` (E, n, d). ``routing`` is token-choice
    ``"topk"`` or ``"token_rounding"`` (to multiples of ``tile_m``); ``scoring``/``normalize`` pick
    the router's weights (see ``topk_routing``); ``backward`` picks ``"reduced_memory"`` (SonicMoE)
    or ``"standard"``. Gradients flow to x, router_w, w1 and w2.
    """
    return moe_forward_with_router(x, router_w, w1, w2, k, routing=routing, tile_m=tile_m, backward=backward,
                                   scoring=scoring, normalize=normalize, rounding_mode=rounding_mode,
                                   generator=generator)[0]


def moe_forward_with_router(x, router_w, w1, w2, k, *, routing: str = "topk", tile_m: int = 128,
                            backward: str = "reduced_memory", scoring: str = "softmax_topk",
                            normalize: bool = False, rounding_mode: str = "nearest",
                            generator: torch.Generator | None = None):
    """``moe_forward``, also returning what the router losses need: ``(out (T, d), logits (T, E)
    float32 and differentiable, expert_counts (E,) int32 routed pairs per expert)``."""
    check_layer_inputs(x, router_w, w1, w2, k, tile_m, routing, backward, scoring, rounding_mode, generator,
                       normalize=normalize)
    # Step 1: route. Scores stay differentiable: dS flows back into the router.
    logits = router_logits(x, router_w)  # (T, E)
    r = route_logits(logits, k, routing=routing, tile_m=tile_m, scoring=scoring, normalize=normalize,
                     rounding_mode=rounding_mode, generator=generator)
    # Step 2: routing metadata (integer index arrays, no gradient).
    meta = build_metadata(r)
    # Step 3: the experts, with the chosen backward.
    experts = ReducedMemoryExperts if backward == "reduced_memory" else StandardExperts
    return experts.apply(x, w1, w2, r.scores, meta, tile_m), logits, meta.expert_counts
# --8<-- [end:moe_forward]


# --8<-- [start:naive]
def naive_moe_forward(x, router_w, w1, w2, k, *, routing: str = "topk", tile_m: int = 128,
                      scoring: str = "softmax_topk", normalize: bool = False, rounding_mode: str = "nearest",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The oracle: a plain per-expert Python loop, differentiated by autograd (no custom backward)."""
    check_layer_inputs(x, router_w, w1, w2, k, tile_m, routing, "standard", scoring, rounding_mode, generator)
    r = route(x, router_w, k, routing=routing, tile_m=tile_m, scoring=scoring, normalize=normalize,
              rounding_mode=rounding_mode, generator=generator)
    acc = _acc_dtype(x)
    out = torch.zeros(x.shape, dtype=acc, device=x.device)  # (T, d)
    for e in range(router_w.shape[1]):
        mine = (r.expert_idx == e).nonzero().squeeze(1)  # pairs routed to expert e
        tokens = r.token_idx[mine].long()  # (f_e,)
        h = x[tokens] @ w1[e]  # (f_e, 2n)
        a = swiglu(h)  # (f_e, n)
        y = a @ w2[e]  # (f_e, d)
        out = out.index_add(0, tokens, y.to(acc) * r.scores[mine].to(acc)[:, None])
    return out.to(x.dtype)
# --8<-- [end:naive]


# ----------------------------------------------------------------------------------------------
# Activation memory, measured (the hooks and the closed form are in sonic_learn.contracts)
# ----------------------------------------------------------------------------------------------
def saved_tensors(x, router_w, w1, w2, k, *, backward: str = "reduced_memory", routing: str = "topk",
                  tile_m: int = 128, scoring: str = "softmax_topk", rounding_mode: str = "nearest",
                  generator: torch.Generator | None = None) -> list[SavedTensor]:
    """Run the experts' forward once and list every *activation* it saves for backward (weights
    excluded, see ``record_saved_tensors``). Arguments as ``moe_forward``."""
    check_layer_inputs(x, router_w, w1, w2, k, tile_m, routing, backward, scoring, rounding_mode, generator)
    with torch.no_grad():
        r = route(x, router_w, k, routing=routing, tile_m=tile_m, scoring=scoring,
                  rounding_mode=rounding_mode, generator=generator)
    meta = build_metadata(r)
    scores = r.scores.detach().requires_grad_(True)  # (P,) a leaf, as the router's output would be
    xr = x.detach().requires_grad_(True)  # (T, d)
    experts = ReducedMemoryExperts if backward == "reduced_memory" else StandardExperts
    return record_saved_tensors(lambda: experts.apply(xr, w1, w2, scores, meta, tile_m), exclude=(w1, w2))


def saved_activation_bytes(x, router_w, w1, w2, k, **kwargs) -> int:
    """Bytes of activations the experts cache for backward (measured, see ``saved_tensors``)."""
    return sum(s.nbytes for s in saved_tensors(x, router_w, w1, w2, k, **kwargs))


# ----------------------------------------------------------------------------------------------
# Weight layout helper
# ----------------------------------------------------------------------------------------------
def interleave_gate_up(w1_concat: torch.Tensor) -> torch.Tensor:
    """Convert w1 (E, d, 2n) from the concatenated [gate | up] layout of Hugging Face checkpoints
    (gate = columns :n, up = n:) to SonicMoE's interleaved layout (gate = 0::2, up = 1::2)."""
    _checks.check_tensor("w1_concat", w1_concat)
    _checks.check_ndim("w1_concat", w1_concat, 3, "(E, d, 2n)")
    if w1_concat.shape[2] % 2:
        raise ValueError(f"w1_concat must have an even last dim 2n, got shape {tuple(w1_concat.shape)}")
    n = w1_concat.shape[2] // 2
    gate, up = w1_concat[..., :n], w1_concat[..., n:]  # (E, d, n) each
    return torch.stack((gate, up), dim=-1).reshape(w1_concat.shape).contiguous()  # (E, d, 2n)


def concat_gate_up(w1_interleaved: torch.Tensor) -> torch.Tensor:
    """The inverse of ``interleave_gate_up``."""
    _checks.check_tensor("w1_interleaved", w1_interleaved)
    _checks.check_ndim("w1_interleaved", w1_interleaved, 3, "(E, d, 2n)")
    return torch.cat((w1_interleaved[..., 0::2], w1_interleaved[..., 1::2]), dim=-1).contiguous()
