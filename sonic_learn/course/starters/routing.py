"""Assignment 2: routing, token-choice top-k vs SonicMoE's token rounding, and the routing metadata.

Fill in the four functions below. The page docs/course/routing.md has the problem statement and hints.
Grade yourself with:  python -m sonic_learn.course grade routing <this folder>

Notation: T tokens, E experts, K experts per token, f_e = number of tokens that picked expert e,
tile_m = rows per GEMM tile. A routing is a list of (token, expert, score) triples (``Routing``).
"""

from __future__ import annotations

import torch

from sonic_learn import _checks  # check_tensor, check_ndim, check_dtype, check_int_range, check_choice, ...
from sonic_learn.reference.routing import Routing, RoutingMetadata  # the result types (dataclasses)

SCORINGS = ("softmax_topk", "topk_softmax")
ROUNDING_MODES = ("nearest", "up", "down", "stochastic")


def topk_routing(logits: torch.Tensor, k: int, *, scoring: str = "softmax_topk", normalize: bool = False) -> Routing:
    """Token-choice top-k: every token t picks the K experts with the largest logits.

    Pairs come in order p = t*K + j: ``token_idx[p] = t``, ``expert_idx[p]`` = the token's j-th best
    expert (descending logit; on equal logits the lower expert first), ``scores[p]`` its weight:

    - ``"softmax_topk"`` (Mixtral): softmax over the token's K selected logits;
    - ``"topk_softmax"`` (Qwen): softmax over all E logits, then the K selected probabilities;
      ``normalize=True`` rescales them to sum to 1.

    Scores are float32 (float64 for float64 logits) and differentiable w.r.t. ``logits`` (do not
    detach them). token_idx and expert_idx are int32. You may use ``torch.sort(..., stable=True)``
    (or your radix_topk from assignment 1) for the selection.

    Raises:
        ValueError/TypeError naming the argument: logits not 2-D (T, E) float or holding NaN/inf,
        k not in [1, E], scoring unknown, normalize not a bool.
    """
    raise NotImplementedError("topk_routing: about 20 lines (checks, select, score, flatten)")


def round_counts(
    counts: torch.Tensor,
    tile_m: int,
    mode: str = "nearest",
    generator: torch.Generator | None = None,
    *,
    num_tokens: int | None = None,
) -> torch.Tensor:
    """Round every expert's count f_e to a multiple of ``tile_m``.

    With lo_e = floor(f_e / tile_m) * tile_m, hi_e = ceil(f_e / tile_m) * tile_m, r_e = f_e - lo_e:

    - ``"down"``: lo_e;  ``"up"``: hi_e;
    - ``"nearest"``: hi_e iff 2 * r_e > tile_m (strict: an exact half rounds DOWN);
    - ``"stochastic"``: draw ``u = torch.rand(E, generator=generator, dtype=torch.float64)`` (exactly
      these E uniforms) and take hi_e iff u_e * tile_m < r_e, so E[result] = f_e.

    With ``num_tokens=T`` the result is capped at T (an expert cannot take more tokens than exist).

    Args:
        counts: (E,) int32 or int64, >= 0 (and <= num_tokens when given).
        tile_m: >= 1.
    Returns:
        (E,) in the dtype of counts.
    Raises:
        ValueError/TypeError naming the argument for bad counts, tile_m, mode, generator, num_tokens.
    """
    raise NotImplementedError("round_counts: about 20 lines (checks, floor/ceil/remainder, the mode rule, cap)")


def token_rounding(
    logits: torch.Tensor,
    k: int,
    *,
    tile_m: int = 128,
    mode: str = "nearest",
    generator: torch.Generator | None = None,
    scoring: str = "softmax_topk",
    normalize: bool = False,
) -> Routing:
    """Token rounding (SonicMoE, paper Algorithm 4): expert loads become multiples of tile_m.

    1. token-choice top-k (``topk_routing``) gives every expert its count f_e;
    2. ``round_counts(f, tile_m, mode, generator, num_tokens=T)`` gives the new load of every expert;
    3. every expert ranks ALL tokens by p[t, e] = softmax of the token's logits over all E experts
       (whatever ``scoring`` is): its token-choice picks first, then the other tokens, each group
       by p descending; the lower token first on exact ties; it keeps the first load_e.

    A kept token-choice pick keeps its token-choice score exactly; an added token gets p[t, e]. Returns the kept triples sorted by
    token, then by expert (a token may now have fewer or more than K experts). tile_m = 1 gives
    exactly the pairs of topk_routing.

    Raises: as topk_routing, plus tile_m < 1, an unknown mode, a generator that is not a torch.Generator.
    """
    raise NotImplementedError("token_rounding: about 30 lines (route, count, round, rank per expert, keep)")


def build_metadata(routing: Routing) -> RoutingMetadata:
    """Group the pairs by expert: the index arrays a grouped GEMM needs.

    - ``expert_counts`` (E,): f_e;  ``expert_offsets`` (E+1,): exclusive prefix sum, offsets[0] = 0;
    - ``pair_of_row`` (P,): the pairs sorted by expert, STABLY (pair order kept inside an expert);
    - ``row_of_pair`` (P,): its inverse permutation;  ``gather_idx`` (P,): the token of each row.

    All int32; num_tokens and num_experts copied from the routing.

    Raises:
        TypeError if routing is not a Routing; ValueError if an expert index is outside [0, E).
    """
    raise NotImplementedError("build_metadata: about 15 lines (bincount, cumsum, stable sort, inverse)")
