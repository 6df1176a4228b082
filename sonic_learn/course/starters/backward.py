"""Assignment 4: the reduced-memory MoE backward. Derive dS = <dA', A> and never cache Y.

Fill in the four functions below. The page docs/course/backward.md has the derivation to do and hints.
Grade yourself with:  python -m sonic_learn.course grade backward <this folder>

Forward of the experts for one routed pair (token t, expert e, score s), row r of the grouped GEMM:
    H_r = X_t @ W1_e  (2n,)     A_r = SwiGLU(H_r) (n,)     Y_r = A_r @ W2_e  (d,)     O_t += s * Y_r
SwiGLU on the interleaved layout: gate = H[:, 0::2], up = H[:, 1::2], A = up * silu(gate).
The reduced-memory forward caches only X, H, the scores and the routing metadata.
"""

from __future__ import annotations

import torch

from sonic_learn import _checks  # check_int_range, check_choice, ...
from sonic_learn.reference.grouped_gemm import gather_fused_grouped_gemm, grouped_gemm_varlen_k  # the GEMMs you may use
from sonic_learn.reference.moe import aggregate, swiglu  # gather-and-sum, and the forward SwiGLU
from sonic_learn.reference.routing import RoutingMetadata

BACKWARD_MODES = ("reduced_memory", "standard")


def swiglu_backward(h: torch.Tensor, dA: torch.Tensor) -> torch.Tensor:
    """dH for A = up * silu(gate), gate = h[:, 0::2], up = h[:, 1::2].

    d up = dA * silu(gate);  d gate = dA * up * silu'(gate), with silu'(g) derived by you.
    Compute in float32 (float64 for float64 h) and return dH (M, 2n), interleaved like h, in h's dtype.
    """
    raise NotImplementedError("swiglu_backward: about 8 lines")


def dh_epilogue(h: torch.Tensor, dA_prime: torch.Tensor, row_scores: torch.Tensor):
    """The epilogue of SonicMoE's dH kernel, for every grouped row r.

    Inputs: H (P, 2n) cached, dA' = dO[token of r] @ W2_e^T (P, n) just computed by the GEMM,
    s (P,) the score of each row. Recompute A = swiglu(H) (it is not cached), then return

        dH (P, 2n)  = the gradient w.r.t. H     (derive: where does s enter?)
        dS (P,)     = the gradient w.r.t. s     (derive: it must not need Y = A @ W2)
        A' (P, n)   = s * A                     (the operand of the dW2 GEMM)

    dH and A' in h's dtype; dS accumulated in float32 (float64 for float64 h).
    """
    raise NotImplementedError("dh_epilogue: about 8 lines")


def reduced_memory_backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    h: torch.Tensor,
    scores: torch.Tensor,
    meta: RoutingMetadata,
    tile_m: int,
):
    """The whole expert backward from what the reduced-memory forward cached.

    Args:
        dout (T, d): dL/dO.  x (T, d).  w1 (E, d, 2n).  w2 (E, n, d).
        h (P, 2n): H in grouped-row order.  scores (P,): in PAIR order (row r holds pair meta.pair_of_row[r]).
        meta: the routing metadata (gather_idx, expert_offsets, pair_of_row).  tile_m: GEMM tile rows.

    Returns:
        (dx (T, d), dw1 (E, d, 2n), dw2 (E, n, d), dscores (P,) in PAIR order), dtypes of x, w1, w2, scores.

    Building blocks: gather_fused_grouped_gemm(a, w, meta, tile_m=...) computes row r = a[gather_idx[r]] @ w[e];
    grouped_gemm_varlen_k(a, b, meta, gather_a=True) computes a[rows of e]^T @ b[rows of e] per expert;
    aggregate(rows, None, meta) sums rows back onto their tokens.
    """
    raise NotImplementedError("reduced_memory_backward: about 15 lines (dA' GEMM, epilogue, dW2, dX, dW1, scatter dS)")


def saved_bytes(T: int, d: int, n: int, E: int, P: int, *, dtype_bytes: int = 2, backward: str = "reduced_memory") -> int:
    """Bytes of activations the experts cache for backward (weights excluded).

    Both modes cache H (P, 2n) in the activation dtype, the scores (P,) in float32 and three int32
    index arrays: expert_offsets (E + 1), gather_idx (P) and pair_of_row (P).
    ``"reduced_memory"`` also caches X (T, d); ``"standard"`` caches the gathered X (P, d) and Y (P, d).

    Raises:
        ValueError/TypeError naming the argument: T or P < 0, d, n or E < 1, dtype_bytes not in {1, 2, 4, 8},
        backward not in BACKWARD_MODES.
    """
    raise NotImplementedError("saved_bytes: about 10 lines")
