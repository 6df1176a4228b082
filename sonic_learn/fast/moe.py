"""The whole MoE layer on the fast path (Hopper): router, routing metadata, grouped GEMMs, kernels.

Same signature and semantics as ``sonic_learn.reference.moe.moe_forward`` (paper
Algorithm 1; Section 3.2 and Appendix C for the backward), built from:

* the router GEMM (cuBLAS, ``RouterGemm``: its backward adds the router's part of dX into the
  experts' dX inside the same cuBLAS call) and the token-choice router of
  ``sonic_learn.fast.routing`` (the bitonic top-k kernel of ``sonic_learn.fast.topk`` when E and k
  are in its range, else a stable sort; ties to the lower expert like the reference); the scores
  are recomputed from the logits by torch ops so that dS flows back into the router (a few (T, K)
  elementwise ops);
* routing metadata built on the device without host synchronization (the CuTe-DSL kernels of
  ``sonic_learn.fast.routing``; ``device_metadata``'s torch ops for more than their MAX_EXPERTS);
* the CuTe-DSL grouped GEMMs of ``sonic_learn.fast.grouped_gemm`` (varlen-M with gathered or
  contiguous A, varlen-K for the weight gradients);
* the memory-bound kernels of ``sonic_learn.fast.moe_kernels`` (SwiGLU, dSwiGLU + dS + A',
  gather-and-sum, and the standard backward's gather-scale-dot).

Two autograd Functions mirror the reference:

* ``ReducedMemoryExperts`` (SonicMoE): caches X, H, the scores and the int32 index arrays only;
  dS = <dA', A> comes out of the dSwiGLU pass. No (P, d) tensor is ever cached. It is two
  Functions, ``UpProjection`` and ``DownProjection``, so that autograd frees H and A' between
  their backwards, before the (P, d) rows of dX~ are allocated.
* ``StandardExperts`` (the classic baseline): caches the gathered X, H and Y; dS = <dO, Y> in a
  separate pass over Y.

Fusion (reduced-memory mode): the forward runs SwiGLU in the up-projection GEMM's epilogue
(``grouped_gemm.gather_fused_grouped_gemm_swiglu``: H and A stored from the same registers), and
the backward's dH kernel is one GEMM, dA' = dO W2^T, whose epilogue loads H and the row's score and
produces dH, A' = s*A and dS = <dA', A> (``grouped_gemm.gather_fused_grouped_gemm_dswiglu``); dA'
never reaches memory. The standard baseline keeps every pass separate (the standalone kernels of
``moe_kernels``): the same GEMM kernel without the fused epilogues. With the
production kernels no weight is ever copied transposed (the teaching kernels v1/sm90 fall back to a
torch copy): the backward's ``dY @ W2^T`` and ``dH @ W1^T`` read the stored weights K-major
(``transpose_w=True``), and dW2 is written in W2's (E, n, d) orientation by the varlen-K GEMM's
epilogue (``transpose_out=True``).

Synchronization and CUDA graphs: neither routing issues a device-to-host synchronization in the
forward or the backward (no ``.item()``, no ``bincount``/``nonzero``), so a training step can be
captured in a CUDA graph. With ``routing="topk"`` every size is T*K. With
``routing="token_rounding"`` the pair count P is data dependent but bounded
(``reference.routing.max_pairs``: every rounded count is at most f_e rounded up, capped at T):
every buffer is sized by that bound on the host, the router pads its triples to it
(``fast.routing.token_rounding(pad_to_bound=True)``), and the true P lives on the device only, as
``expert_offsets[E]`` and ``token_offsets[T]``. The grouped GEMMs read the expert offsets from
device memory, the gather-and-sum reads each token's pair range from ``token_offsets``, so no
kernel reads a row past the true P as a real pair's row: padding rows and padding pairs map to
each other (``fast.routing.build_metadata(padded=True)``), and the padding pairs' scores are 0 and
take no gradient. One kernel does read past P: the varlen-K GEMM of the weight gradients loads its
TMA operand by whole k-tiles and multiplies the rows past an expert's end by zeros, so the backward
zeroes the rows after the last expert first (0 * NaN would be NaN): ``ExpertOps.zero_rows_past_end``,
one kernel of ``moe_kernels`` for both operands; ``zero_rows_past_end`` here is its torch version.

Inputs must be CUDA tensors of bf16 or fp16 with d and n multiples of 8; ``tile_m`` is the token
rounding tile (the GEMM's own M tile is fixed at 128 and does not change any result).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sonic_learn import _checks, contracts
from sonic_learn.contracts import (  # noqa: F401  (ROUTINGS, BACKWARD_MODES, ... stay importable from here)
    BACKWARD_MODES, ROUNDING_MODES, ROUTINGS, SCORINGS, RoundingStats, Routing, RoutingMetadata)
from sonic_learn.fast import ops as custom_ops

FAST_DTYPES = (torch.bfloat16, torch.float16)
MAX_ELEMENTS = 2**31  # the kernels index with 32-bit integers (largest index 2^31 - 1)
GEMM_TILE_M = 128  # the fast grouped GEMM's M tile


# ----------------------------------------------------------------------------------------------
# The kernels the experts call, behind one small interface (so the autograd logic can also be
# exercised on the CPU with torch stand-ins, see tests/test_fast_moe_compile.py)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertOps:
    """The ten operations of the experts' forward and backward (contracts as in moe_kernels /
    fast.grouped_gemm).

    The two plain GEMMs serve several of the layer's GEMMs, so their callers name the part each
    call plays with the keyword ``role`` (one of ``grouped_gemm.GEMM_ROLES``; ``fast_ops`` picks
    that role's ``GemmConfig``). The other GEMMs have one role each: ``gather_gemm_swiglu`` is
    "up", ``dh_gemm`` is "dh", ``varlen_k_gemm`` is "dw"."""

    gather_gemm: object  # (x (T, K), w, meta, transpose_w, *, role) -> (P, N), rows x[gather_idx] @ w[e] (or w[e]^T)
    gather_gemm_swiglu: object  # (x (T, d), w1 (E, d, 2n), meta) -> (H (P, 2n), A = SwiGLU(H) (P, n))
    grouped_gemm: object  # (a (P, K), w, meta, transpose_w, *, role) -> (P, N), rows a[r] @ w[e] (or w[e]^T)
    dh_gemm: object  # (dout (T, d), w2 (E, n, d), meta, H, row scores) -> (dH, A', dS in row order)
    varlen_k_gemm: object  # (a, b (P, N), meta, gather_a, transpose_out) -> (E, K, N) (or (E, N, K))
    swiglu: object  # H (P, 2n) -> A (P, n)
    swiglu_backward: object  # (H, dA) -> (dH, A)
    gather_scale_dot: object  # (dO, Y, scores, gather_idx, pair_of_row) -> (dY, dscores)
    gather_sum: object  # (rows, weights | None, row_of_pair, token_offsets) -> (T, d)
    # (a (M, Na), b (M, Nb), expert_offsets (E+1,)) -> None: rows offsets[E] .. + K_TAIL_ROWS - 1 of a and b
    # (those < M) set to 0 in place, offsets[E] read on the device (the torch version: zero_rows_past_end)
    zero_rows_past_end: object


def fast_ops(gemm=None, *, fuse_swiglu: bool = True, fuse_dh: bool = True) -> ExpertOps:
    """The CuTe-DSL kernels behind the experts, configured explicitly (no process-wide switch).

    ``gemm``: the grouped-GEMM step, either one ``sonic_learn.fast.grouped_gemm.GemmConfig`` for every
    GEMM of the layer or a ``grouped_gemm.LayerGemms`` with one config per role (up, down, dh, dx,
    dw: see ``grouped_gemm.GEMM_ROLES``); None = the production kernel everywhere. ``fuse_swiglu`` /
    ``fuse_dh``: SwiGLU in the up-projection GEMM's epilogue and dSwiGLU + dS + A' in the dH GEMM's
    epilogue (default: both; on the persistent kernels only). Unfused, the plain GEMM + the
    standalone kernel of moe_kernels compute the same values (A bit for bit; dH and A' within 1 ulp;
    dS up to the order of its fp32 sum). Pass the result as ``moe_forward(..., ops=...)``.
    """
    from sonic_learn.fast import grouped_gemm as gg
    from sonic_learn.fast import moe_kernels as mk

    _checks.check_bool("fuse_swiglu", fuse_swiglu)
    _checks.check_bool("fuse_dh", fuse_dh)
    cfg = gg.checked_layer_gemms(gemm, "gemm")  # validated before any launch
    if gemm is None and fuse_swiglu and fuse_dh:
        # Production: the same kernels, each behind a torch.library custom op (sonic_learn.fast.ops),
        # so that torch.compile traces the layer through them. Other configurations call the kernels
        # directly (a custom op takes tensors and numbers, not a GemmConfig).
        return custom_ops.expert_ops()
    tile_m = GEMM_TILE_M
    return ExpertOps(
        gather_gemm=lambda x, w, meta, transpose_w=False, *, role: gg.gather_fused_grouped_gemm(
            x, w, meta, tile_m=tile_m, transpose_w=transpose_w, config=cfg.config(role)),
        gather_gemm_swiglu=lambda x, w, meta: gg.gather_fused_grouped_gemm_swiglu(
            x, w, meta, tile_m=tile_m, fused=fuse_swiglu, config=cfg.up),
        grouped_gemm=lambda a, w, meta, transpose_w=False, *, role: gg.contiguous_grouped_gemm(
            a, w, meta, tile_m=tile_m, transpose_w=transpose_w, config=cfg.config(role)),
        dh_gemm=lambda dout, w2, meta, h, row_scores: gg.gather_fused_grouped_gemm_dswiglu(
            dout, w2, meta, h, row_scores, tile_m=tile_m, fused=fuse_dh, config=cfg.dh),
        varlen_k_gemm=lambda a, b, meta, gather_a, transpose_out=False: gg.grouped_gemm_varlen_k(
            a, b, meta, gather_a=gather_a, transpose_out=transpose_out, config=cfg.dw),
        swiglu=mk.swiglu,
        swiglu_backward=mk.swiglu_backward,
        gather_scale_dot=mk.gather_scale_dot,
        gather_sum=mk.gather_sum,
        zero_rows_past_end=mk.zero_rows_past_end,
    )


# ----------------------------------------------------------------------------------------------
# Routing metadata on the device, without host synchronization
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceRouting:
    """Everything the experts need about a routing: the grouped-GEMM metadata, the scores in pair
    order (differentiable) and ``token_offsets`` (T+1,): token t owns pairs token_offsets[t] : [t+1]."""

    meta: RoutingMetadata
    scores: torch.Tensor  # (P,) float32
    token_offsets: torch.Tensor  # (T+1,) int32
    logits: torch.Tensor | None = None  # (T, E) float32, the router's output (for the router losses)
    rounding: RoundingStats | None = None  # token rounding: kept/dropped/added pairs, dropped tokens (device)
    padded: bool = False  # pairs padded to a bound (token rounding): rows past expert_offsets[E] are padding


def device_metadata(token_idx: torch.Tensor, expert_idx: torch.Tensor, num_tokens: int, num_experts: int,
                    pairs_per_token: int | None = None) -> tuple[RoutingMetadata, torch.Tensor]:
    """``build_metadata`` of the reference, with device-only torch ops (no ``bincount``, no ``.item()``).

    ``token_idx`` must be ascending (pair order is token order). With ``pairs_per_token=K`` (top-k)
    the token offsets are simply t*K. Returns (metadata, token_offsets (T+1,) int32).
    """
    device = expert_idx.device
    P = expert_idx.numel()
    T, E = num_tokens, num_experts
    experts = expert_idx.long()  # (P,)
    # Step 1: histogram f_e by a scatter-add of ones (bincount would read its size on the host).
    counts = torch.zeros(E, dtype=torch.int64, device=device).scatter_add_(0, experts, torch.ones_like(experts))
    # Step 2: exclusive prefix sum: expert e owns grouped rows offsets[e] : offsets[e+1].
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=device)  # (E+1,)
    offsets[1:] = torch.cumsum(counts, 0)
    # Step 3: stable grouping by expert, and its inverse permutation.
    pair_of_row = torch.sort(experts, stable=True).indices  # (P,)
    row_of_pair = torch.empty_like(pair_of_row).scatter_(0, pair_of_row, torch.arange(P, device=device))  # (P,)
    # Step 4: the token each grouped row loads.
    gather_idx = token_idx.long().gather(0, pair_of_row)  # (P,)
    i32 = torch.int32
    meta = RoutingMetadata(
        expert_counts=counts.to(i32), expert_offsets=offsets, gather_idx=gather_idx.to(i32),
        pair_of_row=pair_of_row.to(i32), row_of_pair=row_of_pair.to(i32), num_tokens=T, num_experts=E,
    )
    # Step 5: the pairs of each token (for the gather-and-sum).
    return meta, _token_offsets(token_idx, T, pairs_per_token)


def _token_offsets(token_idx: torch.Tensor, num_tokens: int, pairs_per_token: int | None) -> torch.Tensor:
    """(T+1,) int32: token t owns pairs token_offsets[t] : token_offsets[t+1] (``token_idx`` ascending).
    With ``pairs_per_token=K`` (top-k) that is simply t*K (one ``arange`` with step K); otherwise a
    binary search (no host sync)."""
    device, K = token_idx.device, pairs_per_token
    if K is not None:
        return torch.arange(0, (num_tokens + 1) * K, K, dtype=torch.int32, device=device)  # (T+1,) t*K
    tokens = torch.arange(num_tokens + 1, dtype=torch.int32, device=device)  # (T+1,)
    return torch.searchsorted(token_idx.to(torch.int32), tokens, out_int32=True)  # first pair of each token


class RouterGemm(torch.autograd.Function):
    """The router GEMM, logits = x @ router_w (in x's dtype, then float32, as the reference), which
    also hands x on to the experts, so that one backward sees both of x's gradients.

    Autograd would compute x's two gradients apart -- dX from the experts' gather-and-sum, and the
    router's dlogits @ router_w^T -- and add them in a third pass over (T, d) (read two, write one).
    Here the experts' dX arrives as the gradient of the second output and the router's part is
    accumulated into it by the same cuBLAS call (``addmm_``, beta = 1): one rounding, no extra pass.
    In place: the experts' dX is a buffer that only this backward reads (the gather-and-sum wrote
    it). Out of place, ``torch.addmm`` would first copy it into a new (T, d) tensor, one more read
    and write of T * d elements: a 33-35 us device-to-device copy at T = 16384, d = 1536 on an H100
    in the kernel breakdown of ``benchmarks/results/token_rounding_NVIDIA_H100_80GB_HBM3.json`` as
    committed before this change (387bdeb), and absent from the file's next breakdown (session 12).
    Saves x and router_w (x is saved by the experts anyway: same storage, no extra bytes)."""

    @staticmethod
    def forward(ctx, x, router_w):
        ctx.save_for_backward(x, router_w)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
        return (x @ router_w).float(), x.view_as(x)  # (T, E) float32, and x for the experts

    @staticmethod
    def backward(ctx, dlogits, dx_experts):
        x, router_w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        if dlogits is None:  # the routing did not reach the loss
            return dx_experts, None
        g = dlogits.to(x.dtype)  # (T, E), the float32 cast's backward
        dx = None
        if need_x and dx_experts is None:
            dx = g @ router_w.t()  # (T, d)
        elif need_x and _accumulates_in_place(dx_experts, x):
            dx = dx_experts.addmm_(g, router_w.t())  # (T, d) dX_experts += dlogits @ router_w^T, in place
        elif need_x:  # a gradient that is not a plain (T, d) buffer of x's dtype (a broadcast, a view)
            dx = torch.addmm(dx_experts, g, router_w.t())  # (T, d) = dX_experts + dlogits @ router_w^T
        return dx, (x.t() @ g if need_w else None)  # (T, d), (d, E)


def _accumulates_in_place(grad: torch.Tensor, x: torch.Tensor) -> bool:
    """``grad`` can take ``RouterGemm``'s addmm in place: a dense (T, d) tensor of x's dtype that
    owns its storage (not an expanded zero or a view into a larger buffer). Under ``torch.compile``
    the compiler plans the buffers itself, so the out-of-place addmm is left to it."""
    if torch.compiler.is_compiling():
        return False
    return (grad.dtype == x.dtype and grad.shape == x.shape and grad.is_contiguous() and not grad._is_view()
            and grad.untyped_storage().nbytes() == grad.numel() * grad.element_size())


def route(x, router_w, k, *, routing="topk", tile_m=128, scoring="softmax_topk", normalize=False,
          rounding_mode="nearest", generator=None, fused_glue=True) -> DeviceRouting:
    """Router + metadata. Scores are float32 and differentiable w.r.t. x and router_w."""
    return route_layer(x, router_w, k, routing=routing, tile_m=tile_m, scoring=scoring, normalize=normalize,
                       rounding_mode=rounding_mode, generator=generator, fused_glue=fused_glue)[0]


def route_layer(x, router_w, k, *, routing="topk", tile_m=128, scoring="softmax_topk", normalize=False,
                rounding_mode="nearest", generator=None, fused_glue=True) -> tuple[DeviceRouting, torch.Tensor]:
    """The layer's router: ``route``, plus the x that the experts must read (``RouterGemm``'s second
    output), so that x's two gradients meet in one backward and are summed by the router's GEMM.

    ``fused_glue`` (token rounding only; default True): the padded triples, the rounding counts, the
    token offsets and the padded metadata's initialization run inside the CuTe kernels
    (``fast.routing.token_rounding(fused_glue=True)``, ``build_metadata(fused_glue=True)``), 10 launches;
    ``False`` runs that glue as torch ops between the CuTe calls (34 launches, the readable variant,
    see ``fast.routing``'s docstring); the same routing, output and gradients bit for bit."""
    from sonic_learn.fast import routing as fast_routing

    _checks.check_bool("fused_glue", fused_glue)
    T, E = x.shape[0], router_w.shape[1]
    logits, x_experts = RouterGemm.apply(x, router_w)  # (T, E) float32, (T, d)
    if routing == "topk":
        # Token choice: pair p = t*K + j (no host synchronization).
        r = custom_ops.topk_routing(logits, k, scoring, normalize)  # the top-k kernel as a custom op
        meta, token_offsets = _metadata(r.token_idx, r.expert_idx, T, E, pairs_per_token=k)
    else:
        # Token rounding: the fast router ranks only each expert's boundary tile. Its pair count is
        # data dependent, so the triples are padded to the host bound (token T, expert E, score 0)
        # and the true P stays on the device: no synchronization, capturable in a CUDA graph.
        r, token_offsets = fast_routing.layer_token_rounding(
            logits, k, tile_m=tile_m, mode=rounding_mode, generator=generator, scoring=scoring, normalize=normalize,
            fused_glue=fused_glue)  # token_offsets: from the fused glue's kernels, else None
        meta, token_offsets = _metadata(r.token_idx, r.expert_idx, T, E, padded=True, fused_glue=fused_glue,
                                        token_offsets=token_offsets)
    padded = routing != "topk"  # token rounding's triples are padded to the bound (see above)
    return DeviceRouting(meta, r.scores.contiguous(), token_offsets, logits, r.rounding, padded), x_experts


def _metadata(token_idx, expert_idx, T: int, E: int, pairs_per_token: int | None = None, padded: bool = False,
              fused_glue: bool = False, token_offsets: torch.Tensor | None = None):
    """Routing metadata with the CuTe-DSL kernels of ``sonic_learn.fast.routing`` (no sync) when E
    fits them, else ``device_metadata``'s torch ops; plus the per-token pair offsets (unless the
    router wrote them: ``token_offsets``). ``padded``: the routing is padded to a bound (token T,
    expert E; token rounding only, E <= MAX_EXPERTS), so ``token_offsets[T]`` (the binary search
    puts the padding after every token) is the true P; ``fused_glue``: the metadata kernels write
    the padding entries themselves."""
    from sonic_learn.fast import routing as fast_routing

    if E > fast_routing.MAX_EXPERTS:
        return device_metadata(token_idx, expert_idx, T, E, pairs_per_token=pairs_per_token)
    if padded:  # padding pairs (expert E): the kernels' padded layout (token rounding, sync-free)
        scores = torch.empty(expert_idx.numel(), dtype=torch.float32, device=expert_idx.device)  # unused
        meta = fast_routing.build_metadata(
            Routing(token_idx.to(torch.int32), expert_idx.to(torch.int32), scores, T, E), check_ids=False, padded=True,
            fused_glue=fused_glue)
    else:
        meta = custom_ops.metadata(token_idx, expert_idx, T, E)  # the metadata kernels as a custom op
    if token_offsets is None:
        token_offsets = _token_offsets(token_idx, T, pairs_per_token)
    return meta, token_offsets


# ----------------------------------------------------------------------------------------------
# The experts: two autograd Functions
# ----------------------------------------------------------------------------------------------
K_TAIL_ROWS = 128  # at least every varlen-K k-tile (GemmConfig's tile_k is 32 or 64)


def zero_rows_past_end(*tensors: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Zero rows ``end ... end + K_TAIL_ROWS - 1`` of every tensor (those that exist), in place, with
    ``end`` (a 0-dim device tensor) never read on the host. The tensors have the same number of rows
    M, so the rows to zero are computed once for all of them. Returns the tensors.

    The readable torch version (ten launches for two tensors; the CPU stand-in of the tests); the
    layer runs ``moe_kernels.ZeroRowsPastEnd``, one launch (``ExpertOps.zero_rows_past_end``).

    Why: the varlen-K GEMM (the weight gradients) loads its TMA operand b by whole k-tiles from each
    expert's first row, and zeroes the other operand past the expert's f_e rows, so the rows of b
    just after an expert are multiplied by 0. With token rounding's padded layout the rows after
    the last expert (from ``expert_offsets[E]`` on) are padding that no kernel writes, and 0 * NaN
    is NaN: those rows must hold zeros. Rows past the tensor are left alone (TMA zero-fills them)."""
    M = tensors[0].shape[0] if tensors else 0
    if any(t.shape[0] != M for t in tensors):
        raise ValueError(f"tensors must have the same number of rows, got shapes {[tuple(t.shape) for t in tensors]}")
    if M == 0:
        return tensors
    # (R,) int64 (the arange's dtype wins over the 0-dim end's int32): rows past M -> M-1
    rows = (torch.arange(K_TAIL_ROWS, device=tensors[0].device) + end).clamp_(max=M - 1)
    past = rows >= end  # (R,) the target row is padding: zero it
    # Rows clamped onto M-1 all write the same value (zero if M-1 is padding, else its own value).
    for b in tensors:
        b.index_copy_(0, rows, b.index_select(0, rows).masked_fill_(past.view(-1, *([1] * (b.dim() - 1))), 0))
    return tensors


def _meta_from_saved(offsets, gather_idx, pair_of_row, row_of_pair, num_tokens) -> RoutingMetadata:
    return RoutingMetadata(
        expert_counts=offsets[1:] - offsets[:-1], expert_offsets=offsets, gather_idx=gather_idx,
        pair_of_row=pair_of_row, row_of_pair=row_of_pair, num_tokens=num_tokens,
        num_experts=offsets.numel() - 1,
    )


class UpProjection(torch.autograd.Function):
    """Reduced-memory experts, first half: H = X[gather] @ W1 with A = SwiGLU(H) from its epilogue.

    Caches X (not gathered) and the index arrays. Its backward receives dH from
    ``DownProjection``'s backward and computes dX and dW1."""

    @staticmethod
    def forward(ctx, x, w1, meta: RoutingMetadata, token_offsets, ops: ExpertOps):
        # up-projection, X gathered inside the GEMM, SwiGLU in its epilogue: H (P, 2n) and A (P, n)
        h, a = ops.gather_gemm_swiglu(x, w1, meta)
        ctx.mark_non_differentiable(a)  # A's gradient reaches H through DownProjection's dSwiGLU epilogue
        ctx.set_materialize_grads(False)  # so the backward gets None for A, not a (P, n) tensor of zeros
        ctx.save_for_backward(x, w1, meta.expert_offsets, meta.gather_idx, meta.pair_of_row, meta.row_of_pair,
                              token_offsets)
        ctx.ops = ops
        return h, a

    @staticmethod
    def backward(ctx, dh, _da):
        if dh is None:  # H did not reach the loss
            return None, None, None, None, None
        x, w1, offsets, gather_idx, pair_of_row, row_of_pair, token_offsets = ctx.saved_tensors
        ops = ctx.ops
        meta = _meta_from_saved(offsets, gather_idx, pair_of_row, row_of_pair, x.shape[0])
        # Step 4: dX~ = dH @ W1^T, then dX = unweighted gather-and-sum over each token's rows. dX
        # first, so that the (P, d) rows dX~ -- the largest buffer of the backward -- are freed
        # before dW1 is allocated.
        dx_rows = ops.grouped_gemm(dh, w1, meta, True, role="dx")  # (P, d), W1 (E, d, 2n) read K-major
        dx = ops.gather_sum(dx_rows, None, row_of_pair, token_offsets)  # (T, d)
        del dx_rows
        # Step 5: dW1[e] = X_e^T dH_e with X gathered on K.
        dw1 = ops.varlen_k_gemm(x, dh, meta, True)  # (E, d, 2n)
        return dx, dw1, None, None, None


class DownProjection(torch.autograd.Function):
    """Reduced-memory experts, second half: Y = A @ W2, out = weighted gather-and-sum of Y.

    Caches H (not A, not Y), the scores and the index arrays. Its backward is the paper's dH kernel
    plus dW2; it returns dH to ``UpProjection``, and autograd frees what this half cached (H) and
    computed (A') before the up-projection's backward allocates the (P, d) dX~ rows."""

    @staticmethod
    def forward(ctx, h, a, w2, scores, meta: RoutingMetadata, token_offsets, ops: ExpertOps, padded: bool = False):
        y = ops.grouped_gemm(a, w2, meta, role="down")  # (P, d) down-projection
        out = ops.gather_sum(y, scores, meta.row_of_pair, token_offsets)  # (T, d); y, a freed on return
        ctx.save_for_backward(h, w2, scores, meta.expert_offsets, meta.gather_idx, meta.pair_of_row,
                              meta.row_of_pair)
        ctx.ops, ctx.padded = ops, padded
        ctx.num_tokens = out.shape[0]
        return out

    @staticmethod
    def backward(ctx, dout):
        h, w2, scores, offsets, gather_idx, pair_of_row, row_of_pair = ctx.saved_tensors
        ops = ctx.ops
        meta = _meta_from_saved(offsets, gather_idx, pair_of_row, row_of_pair, ctx.num_tokens)
        dout = dout.contiguous()  # (T, d)
        # Steps 1+2, one kernel: dA' = dO[token of row] @ W2^T (dO gathered inside the GEMM, W2 (E, n, d)
        # read K-major), and in its epilogue dS = <dA', A>, A' = s*A, dH = dSwiGLU(H, s*dA'); dA' is
        # never stored.
        row_scores = scores.index_select(0, pair_of_row)  # (P,) the score of each grouped row (int32 index)
        dh, a_scaled, ds_rows = ops.dh_gemm(dout, w2, meta, h, row_scores)  # (P, 2n), (P, n), (P,)
        if ctx.padded:  # the varlen-K operands of dW1 and dW2: zeros after the last expert's rows
            ops.zero_rows_past_end(dh, a_scaled, offsets)
        dscores = ds_rows.index_select(0, row_of_pair)  # (P,) back to pair order (int32 index)
        # Step 3: dW2[e] = A'_e^T dO_e, computed as (dO_e^T A'_e)^T with dO gathered on K.
        dw2 = ops.varlen_k_gemm(dout, a_scaled, meta, True, True)  # (E, n, d), stored transposed
        return dh, None, dw2, dscores.to(scores.dtype), None, None, None, None


class ReducedMemoryExperts:
    """SonicMoE's experts: caches X, H, the scores and the index arrays; dS = <dA', A>.

    Two autograd Functions, as the paper's up- and down-projection: ``DownProjection``'s backward
    (the dH kernel, then dW2) hands dH to ``UpProjection``'s backward (dX, then dW1). Between the
    two, autograd frees H and A', so the backward's peak holds dH, dW2 and the (P, d) rows of dX~,
    never H or A' beside them."""

    @staticmethod
    def apply(x, w1, w2, scores, meta: RoutingMetadata, token_offsets, ops: ExpertOps,
              padded: bool = False) -> torch.Tensor:
        h, a = UpProjection.apply(x, w1, meta, token_offsets, ops)  # (P, 2n), (P, n)
        return DownProjection.apply(h, a, w2, scores, meta, token_offsets, ops, padded)  # (T, d)


class StandardExperts(torch.autograd.Function):
    """The classic experts: caches gathered X, H and Y; dS = <dO, Y> in a separate pass."""

    @staticmethod
    def forward(ctx, x, w1, w2, scores, meta: RoutingMetadata, token_offsets, ops: ExpertOps, padded: bool = False):
        x_gathered = torch.index_select(x, 0, meta.gather_idx)  # (P, d) the explicit gather, cached
        h = ops.grouped_gemm(x_gathered, w1, meta, role="up")  # (P, 2n)
        a = ops.swiglu(h)  # (P, n)
        y = ops.grouped_gemm(a, w2, meta, role="down")  # (P, d), cached
        out = ops.gather_sum(y, scores, meta.row_of_pair, token_offsets)  # (T, d)
        ctx.save_for_backward(x_gathered, w1, w2, h, y, scores, meta.expert_offsets, meta.gather_idx,
                              meta.pair_of_row, meta.row_of_pair, token_offsets)
        ctx.ops, ctx.padded = ops, padded
        ctx.num_tokens = x.shape[0]
        return out

    @staticmethod
    def backward(ctx, dout):
        (x_gathered, w1, w2, h, y, scores, offsets, gather_idx, pair_of_row, row_of_pair,
         token_offsets) = ctx.saved_tensors
        ops = ctx.ops
        meta = _meta_from_saved(offsets, gather_idx, pair_of_row, row_of_pair, ctx.num_tokens)
        dout = dout.contiguous()  # (T, d)
        # Step 1: a separate pass over the cached Y: dS = <dO[token], Y>, dY = s * dO[token].
        dy, dscores = ops.gather_scale_dot(dout, y, scores, gather_idx, pair_of_row)  # (P, d), (P,)
        # Step 2: dA = dY @ W2^T, then dSwiGLU as a separate pass (it also recomputes A for dW2).
        da = ops.grouped_gemm(dy, w2, meta, True, role="dh")  # (P, n), W2 read K-major (the dH GEMM's part)
        dh, a = ops.swiglu_backward(h, da)  # (P, 2n), (P, n)
        if ctx.padded:  # the varlen-K operands of dW2 and dW1: zeros after the last expert's rows
            ops.zero_rows_past_end(dy, dh, offsets)
        # Step 3: weight gradients on the cached, already gathered operands.
        dw2 = ops.varlen_k_gemm(a, dy, meta, False)  # (E, n, d)
        dw1 = ops.varlen_k_gemm(x_gathered, dh, meta, False)  # (E, d, 2n)
        # Step 4: dX~ = dH @ W1^T, dX = unweighted gather-and-sum.
        dx_rows = ops.grouped_gemm(dh, w1, meta, True, role="dx")  # (P, d), W1 read K-major
        dx = ops.gather_sum(dx_rows, None, row_of_pair, token_offsets)  # (T, d)
        return dx, dw1, dw2, dscores.to(scores.dtype), None, None, None, None


def run_experts(x, w1, w2, r: DeviceRouting, backward: str, ops: ExpertOps | None = None) -> torch.Tensor:
    """The experts' part of the layer on a given routing (``ops`` defaults to the CuTe-DSL kernels)."""
    experts = ReducedMemoryExperts if backward == "reduced_memory" else StandardExperts
    return experts.apply(x, w1, w2, r.scores, r.meta, r.token_offsets, ops or fast_ops(), r.padded)


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------
def check_inputs(x, router_w, w1, w2, k, *, routing="topk", tile_m=128, backward="reduced_memory",
                 scoring="softmax_topk", rounding_mode="nearest", generator=None) -> None:
    """Every check of the fast layer, before any work or launch (raises TypeError / ValueError)."""
    # the reference's checks, every option included; no value check (the fast layer never syncs)
    contracts.check_layer_inputs(x, router_w, w1, w2, k, tile_m, routing, backward, scoring, rounding_mode,
                                 generator, check_finite=False)
    for name, t in (("x", x), ("router_w", router_w), ("w1", w1), ("w2", w2)):
        _checks.check_dtype(name, t, FAST_DTYPES)
    T, d = x.shape
    E, _, two_n = w1.shape
    if routing == "token_rounding":
        from sonic_learn.fast.routing import MAX_EXPERTS as max_rounding_experts

        if E > max_rounding_experts:
            raise ValueError(f"router_w.shape[1] (E) must be <= {max_rounding_experts} for the fast token rounding "
                             f"(its counts come from the CuTe histogram kernel), got {E}")
    n = two_n // 2
    if d % 8:
        raise ValueError(f"x.shape[1] (d) must be a multiple of 8 for the fast kernels' 16-byte vectors, got {d}")
    if n % 8:
        raise ValueError(f"w2.shape[1] (n) must be a multiple of 8 for the fast kernels' 16-byte vectors, got {n}")
    P = T * k  # token rounding: its buffers are sized by the bound max_pairs(T, E, K, tile_m)
    if routing == "token_rounding":
        from sonic_learn.reference.routing import max_pairs

        P = max_pairs(T, E, k, tile_m)
    if P * max(d, two_n) > MAX_ELEMENTS or E * d * two_n > MAX_ELEMENTS:
        raise ValueError(f"(P, max(d, 2n)) = ({P}, {max(d, two_n)}) or w1 {tuple(w1.shape)} exceeds 2^31 "
                         "elements (the fast kernels index with 32-bit integers)")
    for name, t in (("x", x), ("router_w", router_w), ("w1", w1), ("w2", w2)):
        _checks.check_cuda(name, t)


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
    ops: ExpertOps | None = None,
    fused_glue: bool = True,
) -> torch.Tensor:
    """The MoE layer on the fast path: x (T, d) -> out (T, d) in x's dtype.

    Same arguments and result as ``sonic_learn.reference.moe.moe_forward``: ``router_w`` (d, E),
    ``w1`` (E, d, 2n) with gate/up interleaved, ``w2`` (E, n, d); gradients flow to x, router_w,
    w1 and w2. CUDA tensors of bf16/fp16 with d and n multiples of 8. ``ops``: the experts' kernels
    (``fast_ops(...)``: another grouped-GEMM step or unfused epilogues; None = production).
    ``fused_glue``: token rounding's router glue inside the CuTe kernels (default; ``False``: as torch
    ops, see ``route_layer``).
    """
    return moe_forward_with_router(x, router_w, w1, w2, k, routing=routing, tile_m=tile_m, backward=backward,
                                   scoring=scoring, normalize=normalize, rounding_mode=rounding_mode,
                                   generator=generator, ops=ops, fused_glue=fused_glue)[0]


def moe_forward_with_router(x, router_w, w1, w2, k, *, routing="topk", tile_m=128, backward="reduced_memory",
                            scoring="softmax_topk", normalize=False, rounding_mode="nearest", generator=None,
                            ops: ExpertOps | None = None, fused_glue: bool = True):
    """``moe_forward``, also returning ``(logits (T, E) float32, expert_counts (E,) int32)`` as the
    reference's ``moe_forward_with_router`` does (no host synchronization added)."""
    if ops is not None and not isinstance(ops, ExpertOps):
        raise TypeError(f"ops must be an ExpertOps (see fast_ops) or None, got {type(ops).__name__}")
    check_inputs(x, router_w, w1, w2, k, routing=routing, tile_m=tile_m, backward=backward, scoring=scoring,
                 rounding_mode=rounding_mode, generator=generator)
    _checks.check_bool("normalize", normalize)
    _checks.check_bool("fused_glue", fused_glue)
    x = x.contiguous()
    r, x_experts = route_layer(x, router_w, k, routing=routing, tile_m=tile_m, scoring=scoring,
                               normalize=normalize, rounding_mode=rounding_mode, generator=generator,
                               fused_glue=fused_glue)
    out = run_experts(x_experts, w1.contiguous(), w2.contiguous(), r, backward, ops)
    return out, r.logits, r.meta.expert_counts


# ----------------------------------------------------------------------------------------------
# Activation memory (the contract's accounting, as the reference: saved-tensor hooks)
# ----------------------------------------------------------------------------------------------
def saved_tensors(x, w1, w2, r: DeviceRouting, backward: str = "reduced_memory", ops: ExpertOps | None = None):
    """Every activation the experts' Function saves for backward, as ``contracts.SavedTensor`` records
    (weights excluded, each storage once). ``r`` is a routing from ``route`` (or built by hand)."""
    _checks.check_choice("backward", backward, BACKWARD_MODES)
    scores = r.scores.detach().requires_grad_(True)
    xr = x.detach().requires_grad_(True)
    return contracts.record_saved_tensors(
        lambda: run_experts(xr, w1, w2, dataclasses.replace(r, scores=scores), backward, ops), exclude=(w1, w2))


def expected_saved_bytes(T: int, d: int, n: int, E: int, P: int, *, dtype=torch.bfloat16,
                         backward: str = "reduced_memory") -> dict[str, int]:
    """Closed form of what the fast experts cache: the reference's terms plus the two extra int32
    index arrays the gather-and-sum kernel reads (row_of_pair (P,), token_offsets (T+1,))."""
    terms = contracts.expected_saved_bytes(T, d, n, E, P, dtype=dtype, backward=backward)
    total = terms.pop("total")
    terms["row_of_pair (P,)"] = P * 4
    terms["token_offsets (T+1,)"] = (T + 1) * 4
    terms["total"] = total + P * 4 + (T + 1) * 4
    return terms


__all__ = [
    "moe_forward", "moe_forward_with_router", "fast_ops", "route", "route_layer", "run_experts", "RouterGemm",
    "device_metadata", "check_inputs", "zero_rows_past_end", "ReducedMemoryExperts",
    "UpProjection", "DownProjection", "StandardExperts", "ExpertOps", "DeviceRouting", "saved_tensors",
    "expected_saved_bytes", "ROUTINGS", "BACKWARD_MODES",
]
