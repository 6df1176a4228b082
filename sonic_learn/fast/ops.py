"""The fast layer's kernels as ``torch.library`` custom ops, so ``torch.compile`` can see them.

A CuTe-DSL launch is an opaque Python call to the compiler: dynamo cannot trace into it (a graph
break at every kernel) and does not know the shapes it returns. Each kernel the fast MoE layer
calls is registered here as ``sonic_learn::<name>`` with

* the real implementation: the kernel of ``fast.grouped_gemm`` (the production step, fused
  epilogues) / ``fast.moe_kernels`` / ``fast.routing`` / ``fast.topk``, unchanged;
* a fake (meta) implementation: empty tensors of the output shapes and dtypes, which is all that
  ``torch.compile`` (and ``torch.library.opcheck``) needs to trace the layer without running it;
* where the op itself is differentiable on its own (``swiglu``, ``gather_sum``), an autograd
  formula (``torch.library.register_autograd``) built from the other ops. The grouped GEMMs are
  differentiated by the layer's autograd Functions (``fast.moe``: their backward calls these ops),
  which dynamo traces as a whole, so they carry no autograd formula of their own.

Every op returns new tensors but one: ``zero_rows_past_end`` (token rounding's backward) writes
zeros into its two inputs and returns nothing. It says so (``mutates_args``), so that
``torch.compile``'s functionalization keeps the write and orders it before the GEMMs that read
those rows.

Custom ops take tensors and plain numbers, not dataclasses: the routing metadata travels as its
index tensors and is rebuilt inside the real implementation. ``expert_ops()`` wraps the ops in the
``fast.moe.ExpertOps`` interface the layer uses; ``topk_experts`` and ``routing_metadata`` are the
router's two kernels.
"""

from __future__ import annotations

import torch

from sonic_learn.contracts import RoutingMetadata

GEMM_TILE_M = 128  # the fast grouped GEMM's M tile (as fast.moe)


def _meta(offsets, gather_idx, pair_of_row, row_of_pair, num_tokens: int) -> RoutingMetadata:
    """The RoutingMetadata the kernels take, from the index tensors a custom op receives."""
    return RoutingMetadata(
        expert_counts=(offsets[1:] - offsets[:-1]).to(torch.int32), expert_offsets=offsets, gather_idx=gather_idx,
        pair_of_row=pair_of_row, row_of_pair=row_of_pair, num_tokens=num_tokens, num_experts=offsets.numel() - 1,
    )


# ----------------------------------------------------------------------------------------------
# Grouped GEMMs (fast.grouped_gemm)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("sonic_learn::gather_gemm", mutates_args=())
def gather_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, gather_idx: torch.Tensor,
                transpose_w: bool) -> torch.Tensor:
    """(P, N): row r = x[gather_idx[r]] @ w[e(r)] (w[e]^T with transpose_w)."""
    from sonic_learn.fast import grouped_gemm as gg

    meta = _meta(offsets, gather_idx, gather_idx, gather_idx, x.shape[0])
    return gg.gather_fused_grouped_gemm(x, w, meta, tile_m=GEMM_TILE_M, transpose_w=transpose_w)


@gather_gemm.register_fake
def _(x, w, offsets, gather_idx, transpose_w):
    return x.new_empty(gather_idx.shape[0], w.shape[1] if transpose_w else w.shape[2])


@torch.library.custom_op("sonic_learn::gather_gemm_swiglu", mutates_args=())
def gather_gemm_swiglu(x: torch.Tensor, w1: torch.Tensor, offsets: torch.Tensor,
                       gather_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H (P, 2n), A = SwiGLU(H) (P, n)): the up-projection, SwiGLU in the epilogue."""
    from sonic_learn.fast import grouped_gemm as gg

    meta = _meta(offsets, gather_idx, gather_idx, gather_idx, x.shape[0])
    return gg.gather_fused_grouped_gemm_swiglu(x, w1, meta, tile_m=GEMM_TILE_M, fused=True)


@gather_gemm_swiglu.register_fake
def _(x, w1, offsets, gather_idx):
    P, two_n = gather_idx.shape[0], w1.shape[2]
    return x.new_empty(P, two_n), x.new_empty(P, two_n // 2)


@torch.library.custom_op("sonic_learn::grouped_gemm", mutates_args=())
def grouped_gemm(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, gather_idx: torch.Tensor,
                 transpose_w: bool) -> torch.Tensor:
    """(P, N): row r = a[r] @ w[e(r)] (A already in expert-grouped row order)."""
    from sonic_learn.fast import grouped_gemm as gg

    meta = _meta(offsets, gather_idx, gather_idx, gather_idx, a.shape[0])
    return gg.contiguous_grouped_gemm(a, w, meta, tile_m=GEMM_TILE_M, transpose_w=transpose_w)


@grouped_gemm.register_fake
def _(a, w, offsets, gather_idx, transpose_w):
    return a.new_empty(a.shape[0], w.shape[1] if transpose_w else w.shape[2])


@torch.library.custom_op("sonic_learn::dh_gemm", mutates_args=())
def dh_gemm(dout: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor, gather_idx: torch.Tensor,
            h: torch.Tensor, row_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dH (P, 2n), A' = s*A (P, n), dS (P,) float32 in row order): the reduced-memory dH kernel."""
    from sonic_learn.fast import grouped_gemm as gg

    meta = _meta(offsets, gather_idx, gather_idx, gather_idx, dout.shape[0])
    return gg.gather_fused_grouped_gemm_dswiglu(dout, w2, meta, h, row_scores, tile_m=GEMM_TILE_M,
                                                fused=True)


@dh_gemm.register_fake
def _(dout, w2, offsets, gather_idx, h, row_scores):
    P, n = h.shape[0], w2.shape[1]
    return torch.empty_like(h), h.new_empty(P, n), row_scores.new_empty(P, dtype=torch.float32)


@torch.library.custom_op("sonic_learn::varlen_k_gemm", mutates_args=())
def varlen_k_gemm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, gather_idx: torch.Tensor,
                  gather_a: bool, transpose_out: bool) -> torch.Tensor:
    """(E, K, N) (or (E, N, K)): out[e] = a[rows of e]^T @ b[rows of e], the weight gradients."""
    from sonic_learn.fast import grouped_gemm as gg

    meta = _meta(offsets, gather_idx, gather_idx, gather_idx, a.shape[0])
    return gg.grouped_gemm_varlen_k(a, b, meta, gather_a=gather_a, transpose_out=transpose_out)


@varlen_k_gemm.register_fake
def _(a, b, offsets, gather_idx, gather_a, transpose_out):
    E, K, N = offsets.shape[0] - 1, a.shape[1], b.shape[1]
    return a.new_empty(E, N, K) if transpose_out else a.new_empty(E, K, N)


# ----------------------------------------------------------------------------------------------
# Memory-bound kernels (fast.moe_kernels)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("sonic_learn::swiglu_backward", mutates_args=())
def swiglu_backward(h: torch.Tensor, da: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dH (P, 2n), A (P, n)) from H and dA."""
    from sonic_learn.fast import moe_kernels as mk

    return mk.swiglu_backward(h, da)


@swiglu_backward.register_fake
def _(h, da):
    return torch.empty_like(h), torch.empty_like(da)


@torch.library.custom_op("sonic_learn::swiglu", mutates_args=())
def swiglu(h: torch.Tensor) -> torch.Tensor:
    """A (P, n) = up * silu(gate) from H (P, 2n), gate/up interleaved."""
    from sonic_learn.fast import moe_kernels as mk

    return mk.swiglu(h)


@swiglu.register_fake
def _(h):
    return h.new_empty(h.shape[0], h.shape[1] // 2)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_grad(ctx, da):
    (h,) = ctx.saved_tensors
    return swiglu_backward(h, da.contiguous())[0]


torch.library.register_autograd("sonic_learn::swiglu", _swiglu_grad, setup_context=_swiglu_setup)


@torch.library.custom_op("sonic_learn::gather_scale_dot", mutates_args=())
def gather_scale_dot(dout: torch.Tensor, y: torch.Tensor, scores: torch.Tensor, gather_idx: torch.Tensor,
                     pair_of_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dY = s * dO[token] (P, d), dS (P,) float32 = <dO[token], Y> in pair order)."""
    from sonic_learn.fast import moe_kernels as mk

    return mk.gather_scale_dot(dout, y, scores, gather_idx, pair_of_row)


@gather_scale_dot.register_fake
def _(dout, y, scores, gather_idx, pair_of_row):
    return torch.empty_like(y), scores.new_empty(scores.shape[0], dtype=torch.float32)


@torch.library.custom_op("sonic_learn::gather_sum", mutates_args=())
def gather_sum(rows: torch.Tensor, weights: torch.Tensor | None, row_of_pair: torch.Tensor,
               token_offsets: torch.Tensor) -> torch.Tensor:
    """out[t] = sum over the pairs p of token t of weights[p] * rows[row_of_pair[p]], (T, d)."""
    from sonic_learn.fast import moe_kernels as mk

    return mk.gather_sum(rows, weights, row_of_pair, token_offsets)


@gather_sum.register_fake
def _(rows, weights, row_of_pair, token_offsets):
    return rows.new_empty(token_offsets.shape[0] - 1, rows.shape[1])


def _gather_sum_setup(ctx, inputs, output):
    rows, weights, row_of_pair, token_offsets = inputs
    ctx.save_for_backward(rows, weights, row_of_pair, token_offsets)
    ctx.weighted = weights is not None


def _gather_sum_grad(ctx, dout):
    """d rows[r] = w[p] * dO[token of p] and d w[p] = <dO[token of p], rows[r]> (r = row_of_pair[p]):
    the standard backward's gather_scale_dot, with rows in pair order's inverse permutation."""
    rows, weights, row_of_pair, token_offsets = ctx.saved_tensors
    P = row_of_pair.shape[0]
    pair_ids = torch.arange(P, device=rows.device)  # (P,)
    # the token of each pair (pairs are token-sorted: token t owns token_offsets[t] : [t+1])
    token_of_pair = torch.searchsorted(token_offsets[1:].long(), pair_ids, right=True)  # (P,)
    pair_of_row = torch.empty_like(row_of_pair).scatter_(0, row_of_pair.long(), pair_ids.to(row_of_pair.dtype))
    token_of_row = token_of_pair.gather(0, pair_of_row.long()).to(torch.int32)  # (P,)
    scores = weights if ctx.weighted else torch.ones(P, dtype=torch.float32, device=rows.device)
    drows, dweights = gather_scale_dot(dout.contiguous(), rows, scores, token_of_row, pair_of_row)
    return drows, (dweights.to(weights.dtype) if ctx.weighted else None), None, None


torch.library.register_autograd("sonic_learn::gather_sum", _gather_sum_grad, setup_context=_gather_sum_setup)


@torch.library.custom_op("sonic_learn::zero_rows_past_end", mutates_args=("a", "b"))
def zero_rows_past_end(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> None:
    """In place: rows offsets[E] .. offsets[E] + K_TAIL_ROWS - 1 of a and b (M rows each) become 0."""
    from sonic_learn.fast import moe_kernels as mk

    mk.zero_rows_past_end(a, b, offsets)


@zero_rows_past_end.register_fake
def _(a, b, offsets):
    return None


# ----------------------------------------------------------------------------------------------
# The router's kernels (fast.topk, fast.routing)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("sonic_learn::topk_experts", mutates_args=())
def topk_experts(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(T, K) int64: each token's K best experts, descending, ties to the lower expert (bitonic kernel)."""
    from sonic_learn.fast import routing as fast_routing

    return fast_routing.token_choice_experts(logits, k).contiguous()  # (the sort fallback returns a slice)


@topk_experts.register_fake
def _(logits, k):
    return logits.new_empty(logits.shape[0], k, dtype=torch.int64)


@torch.library.custom_op("sonic_learn::routing_metadata", mutates_args=())
def routing_metadata(token_idx: torch.Tensor, expert_idx: torch.Tensor, num_tokens: int,
                     num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts (E,), offsets (E+1,), gather_idx, pair_of_row, row_of_pair (P,)), all int32 (metadata kernels)."""
    from sonic_learn.contracts import Routing
    from sonic_learn.fast import routing as fast_routing

    scores = torch.empty(expert_idx.shape[0], dtype=torch.float32, device=expert_idx.device)  # unused
    meta = fast_routing.build_metadata(Routing(token_idx.to(torch.int32), expert_idx.to(torch.int32), scores,
                                               num_tokens, num_experts), check_ids=False)
    return (meta.expert_counts, meta.expert_offsets, meta.gather_idx, meta.pair_of_row, meta.row_of_pair)


@routing_metadata.register_fake
def _(token_idx, expert_idx, num_tokens, num_experts):
    P = expert_idx.shape[0]
    i32 = {"dtype": torch.int32}
    return (expert_idx.new_empty(num_experts, **i32), expert_idx.new_empty(num_experts + 1, **i32),
            expert_idx.new_empty(P, **i32), expert_idx.new_empty(P, **i32), expert_idx.new_empty(P, **i32))


# ----------------------------------------------------------------------------------------------
# The ExpertOps interface of fast.moe, on the custom ops
# ----------------------------------------------------------------------------------------------
def expert_ops():
    """``fast.moe.ExpertOps`` whose every operation is one of the custom ops above. Every GEMM runs
    the production kernel, whatever its ``role``."""
    from sonic_learn.fast.moe import ExpertOps

    return ExpertOps(
        gather_gemm=lambda x, w, meta, transpose_w=False, *, role: gather_gemm(
            x, w, meta.expert_offsets, meta.gather_idx, transpose_w),
        gather_gemm_swiglu=lambda x, w, meta: gather_gemm_swiglu(x, w, meta.expert_offsets, meta.gather_idx),
        grouped_gemm=lambda a, w, meta, transpose_w=False, *, role: grouped_gemm(
            a, w, meta.expert_offsets, meta.gather_idx, transpose_w),
        dh_gemm=lambda dout, w2, meta, h, row_scores: dh_gemm(dout, w2, meta.expert_offsets, meta.gather_idx, h,
                                                             row_scores),
        varlen_k_gemm=lambda a, b, meta, gather_a, transpose_out=False: varlen_k_gemm(
            a, b, meta.expert_offsets, meta.gather_idx, gather_a, transpose_out),
        swiglu=swiglu,
        swiglu_backward=swiglu_backward,
        gather_scale_dot=gather_scale_dot,
        gather_sum=gather_sum,
        zero_rows_past_end=zero_rows_past_end,
    )


def metadata(token_idx: torch.Tensor, expert_idx: torch.Tensor, num_tokens: int, num_experts: int) -> RoutingMetadata:
    """``fast.routing.build_metadata`` (unchecked ids) through the ``routing_metadata`` op."""
    counts, offsets, gather_idx, pair_of_row, row_of_pair = routing_metadata(token_idx, expert_idx, num_tokens,
                                                                             num_experts)
    return RoutingMetadata(expert_counts=counts, expert_offsets=offsets, gather_idx=gather_idx,
                           pair_of_row=pair_of_row, row_of_pair=row_of_pair, num_tokens=num_tokens,
                           num_experts=num_experts)


def topk_routing(logits: torch.Tensor, k: int, scoring: str, normalize: bool):
    """``fast.routing.topk_routing`` (no checks: the layer has made them) with the top-k kernel as
    the ``topk_experts`` op; the scores are torch ops on the logits (differentiable)."""
    from sonic_learn.contracts import Routing
    from sonic_learn.fast import routing as fast_routing

    T, E = logits.shape
    experts = topk_experts(logits.detach(), k)  # (T, K)
    scores = fast_routing.scores_from_experts(logits, experts, scoring, normalize)  # (T, K)
    token_idx = torch.arange(T, device=logits.device, dtype=torch.int32).repeat_interleave(k)  # (T*K,)
    return Routing(token_idx=token_idx, expert_idx=experts.reshape(-1).to(torch.int32), scores=scores.reshape(-1),
                   num_tokens=T, num_experts=E)
