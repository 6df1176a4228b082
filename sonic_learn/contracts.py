"""The contract every implementation of the MoE layer shares: names, data types, checks, accounting.

``sonic_learn.reference`` (PyTorch) and ``sonic_learn.fast`` (CuTe-DSL) implement the same
functions with the same arguments and results. What they agree on lives here, once, and both
import it; neither imports the other's private helpers::

    sonic_learn._checks     generic argument checks (is it a tensor, which dtype, which range)
          ^
    sonic_learn.contracts   this module: what the MoE arguments must be, and the routing types
          ^          ^
    reference/     fast/    the two implementations, side by side
          ^          ^
    sonic_learn.layer       ``sonic_learn.MoE``, which picks one of them

What is here:

* **Names** of the choices a caller makes: ``SCORINGS``, ``ROUNDING_MODES``, ``ROUTINGS``,
  ``BACKWARD_MODES``.
* **Routing data types**: ``Routing`` (the router's (token, expert, score) triples) and
  ``RoutingMetadata`` (the index arrays a grouped GEMM reads).
* **Host-side argument checks** shared by both paths: ``check_router_args``, ``check_generator``,
  ``check_routing_structure``, ``check_metadata``, ``check_layer_inputs``. A fast function runs
  the same check as its reference twin, then adds its own limits (CUDA, sizes, dtypes).
* **Value checks** (``check_finite_values``, ``check_routing_values``, the value part of
  ``check_metadata``): they read tensor values on the host. ``value_checks_enabled`` is the one
  switch that skips them (under ``torch.compile``).
* **Saved-tensor accounting**: ``SavedTensor``, ``record_saved_tensors`` (what autograd really
  keeps for the backward) and ``expected_saved_bytes`` (the closed form it must match).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sonic_learn import _checks

__all__ = [
    "SCORINGS", "ROUNDING_MODES", "ROUTINGS", "BACKWARD_MODES",
    "Routing", "RoutingMetadata",
    "value_checks_enabled", "check_finite_values",
    "check_router_args", "check_generator", "check_routing_structure", "check_routing_values", "check_metadata",
    "check_layer_inputs", "MAX_TILE_M",
    "SavedTensor", "record_saved_tensors", "expected_saved_bytes",
]

# ---------------------------------------------------------------------------------------------
# Names of the choices
# ---------------------------------------------------------------------------------------------
SCORINGS = ("softmax_topk", "topk_softmax")  # softmax over the K picks (Mixtral) / over all E (Qwen)
ROUNDING_MODES = ("nearest", "up", "down", "stochastic")  # token rounding's rule for f_e
ROUTINGS = ("topk", "token_rounding")  # token-choice top-k / SonicMoE's token rounding
BACKWARD_MODES = ("reduced_memory", "standard")  # SonicMoE's backward / the classic one

# ``tile_m`` is one idea everywhere: the M tile, the rows of one grouped-GEMM tile. Token rounding
# rounds every expert's count to a multiple of it, so that expert's tiles are full (paper Section 5).
# The fast grouped GEMM is built for one M tile, 128 (its functions accept only tile_m=128); in the
# fast layer tile_m is token rounding's multiple, and the GEMM's own tile changes no result.
# Hopper kernels use 64-256 rows; the bound only stops a typo from padding to billions of rows.
MAX_TILE_M = 2**16


# ---------------------------------------------------------------------------------------------
# Routing data types
# ---------------------------------------------------------------------------------------------
# --8<-- [start:routing_types]
@dataclass(frozen=True)
class Routing:
    """A routing as flat triples, sorted by token: pair p sends token ``token_idx[p]`` to expert
    ``expert_idx[p]`` with weight ``scores[p]``.

    With token-choice top-k every token has exactly K pairs (pair p = t*K + k). With token rounding
    a token may have fewer or more than K pairs, so the triples carry the token explicitly.
    """

    token_idx: torch.Tensor  # (P,) int32, ascending
    expert_idx: torch.Tensor  # (P,) int32, in [0, E)
    scores: torch.Tensor  # (P,) float32 (float64 for float64 logits), differentiable
    num_tokens: int  # T
    num_experts: int  # E

    @property
    def num_pairs(self) -> int:
        return int(self.token_idx.numel())


@dataclass(frozen=True)
class RoutingMetadata:
    """The index arrays of a routing, grouped by expert (the order of rows in the grouped GEMM).

    Row r of the grouped GEMM holds pair ``pair_of_row[r]``, i.e. token ``gather_idx[r]``; the rows
    of expert e are ``expert_offsets[e] : expert_offsets[e + 1]``; ``row_of_pair`` inverts
    ``pair_of_row``. Inside one expert, rows keep pair order (a stable grouping).
    """

    expert_counts: torch.Tensor  # (E,) int32, f_e
    expert_offsets: torch.Tensor  # (E+1,) int32, exclusive cumsum of f_e, offsets[0] = 0
    gather_idx: torch.Tensor  # (P,) int32, token of each grouped row
    pair_of_row: torch.Tensor  # (P,) int32, grouped row -> pair
    row_of_pair: torch.Tensor  # (P,) int32, pair -> grouped row
    num_tokens: int  # T
    num_experts: int  # E

    @property
    def num_rows(self) -> int:
        return int(self.gather_idx.numel())
# --8<-- [end:routing_types]


# ---------------------------------------------------------------------------------------------
# Value checks: the one switch that skips them
# ---------------------------------------------------------------------------------------------
def value_checks_enabled() -> bool:
    """Whether checks that read tensor *values* run (NaN/inf scans, index ranges, min/max).

    Such a check copies a result to the host: a device-to-host sync on a GPU, and under
    ``torch.compile`` a graph break (``fullgraph=True`` fails). So every value check of the library
    asks this function first, and they are all skipped while ``torch.compile`` traces
    (``torch.compiler.is_compiling()``). Shape, dtype, device and option checks never read values
    and always run. Run the function eagerly once to get the value checks.
    """
    return not torch.compiler.is_compiling()


def check_finite_values(name: str, t: torch.Tensor, allow_inf: bool = False) -> None:
    """Raise ValueError if ``t`` holds NaN (and, unless ``allow_inf``, +-inf). A value check."""
    if not value_checks_enabled() or t.numel() == 0:
        return
    if torch.isnan(t).any():
        raise ValueError(f"{name} must not contain NaN")
    if not allow_inf and torch.isinf(t).any():
        raise ValueError(f"{name} must be finite, got +-inf values")


# ---------------------------------------------------------------------------------------------
# Router arguments
# ---------------------------------------------------------------------------------------------
def check_router_args(logits: object, k: object, scoring: object, normalize: object,
                      check_finite: bool = True) -> torch.Tensor:
    """Validate a router's arguments: ``logits`` (T, E) float, 1 <= k <= E, a known ``scoring``, a bool
    ``normalize``, and (``check_finite``) no NaN/inf. Returns ``logits``. (The fast routers call it
    with ``check_finite=False``, then add their device checks.)"""
    logits = _checks.check_tensor("logits", logits)
    _checks.check_ndim("logits", logits, 2, "(T tokens, E experts)")
    _checks.check_dtype("logits", logits, _checks.FLOAT_DTYPES)
    E = logits.shape[1]
    if E < 1:
        raise ValueError(f"logits must have at least one expert column (E >= 1), got shape {tuple(logits.shape)}")
    _checks.check_int_range("k", k, 1, E, "E, the number of experts = logits.shape[1]")
    _checks.check_choice("scoring", scoring, SCORINGS)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    if check_finite:
        check_finite_values("logits", logits)
    return logits


def check_generator(generator: object, device: torch.device) -> None:
    """``generator`` is None or a torch.Generator on the device type of the data it draws for."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator must live on the device of the logits ({device.type}), got {generator.device}")


# ---------------------------------------------------------------------------------------------
# A Routing handed in by the caller
# ---------------------------------------------------------------------------------------------
def check_routing_structure(routing: object) -> Routing:
    """What the host knows about a Routing without reading the device: types, dims, dtypes,
    lengths, one device. (The fast path runs only this part, to stay free of syncs.)"""
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a sonic_learn.reference.routing.Routing, got {type(routing).__name__}")
    _checks.check_int_range("routing.num_tokens", routing.num_tokens, 0)
    _checks.check_int_range("routing.num_experts", routing.num_experts, 1)
    for name in ("token_idx", "expert_idx", "scores"):
        _checks.check_tensor(f"routing.{name}", getattr(routing, name))
        _checks.check_ndim(f"routing.{name}", getattr(routing, name), 1, "(P,) one entry per pair")
    for name in ("token_idx", "expert_idx"):
        _checks.check_dtype(f"routing.{name}", getattr(routing, name), (torch.int32, torch.int64))
    P = routing.token_idx.numel()
    for name in ("expert_idx", "scores"):
        if getattr(routing, name).numel() != P:
            raise ValueError(
                f"routing.{name} must have P = {P} entries (one per pair, like routing.token_idx), "
                f"got {getattr(routing, name).numel()}"
            )
    _checks.check_same_device(
        token_idx=routing.token_idx, expert_idx=routing.expert_idx, scores=routing.scores
    )
    return routing


def check_routing_values(routing: Routing) -> None:
    """What only the values can tell about a Routing: ids in range (a wrong expert id would silently
    grow the histogram), ``token_idx`` ascending (pair order is token order), and no (token, expert)
    pair twice (it would send a token through one expert twice). A value check (reads the device),
    so the fast path makes it optional."""
    if not value_checks_enabled() or routing.token_idx.numel() == 0:
        return
    T, E = routing.num_tokens, routing.num_experts
    for name, hi in (("token_idx", T), ("expert_idx", E)):
        t = getattr(routing, name)
        lo_v, hi_v = int(t.min()), int(t.max())
        if lo_v < 0 or hi_v >= hi:
            raise ValueError(f"routing.{name} must lie in [0, {hi}), got values in [{lo_v}, {hi_v}]")
    tokens = routing.token_idx.long()  # (P,)
    steps = tokens.diff()  # (P-1,)
    if bool((steps < 0).any()):
        p = int((steps < 0).nonzero()[0]) + 1
        raise ValueError(f"routing.token_idx must be ascending (pairs sorted by token), but pair {p} has token "
                         f"{int(tokens[p])} after token {int(tokens[p - 1])}")
    pair_keys = tokens * E + routing.expert_idx.long()  # (P,) one key per (token, expert)
    if torch.unique(pair_keys).numel() != pair_keys.numel():
        sorted_keys = torch.sort(pair_keys).values
        twice = int(sorted_keys[1:][sorted_keys[1:] == sorted_keys[:-1]][0])
        raise ValueError(f"routing must not hold a (token, expert) pair twice, got token {twice // E} -> "
                         f"expert {twice % E} more than once")


check_routing_ids = check_routing_values  # its first name (it checked only the ids), for code written meanwhile


# ---------------------------------------------------------------------------------------------
# RoutingMetadata handed to a grouped GEMM
# ---------------------------------------------------------------------------------------------
def check_metadata(meta: object, data_name: str, data: torch.Tensor, num_tokens: int | None,
                   num_experts: int | None) -> RoutingMetadata:
    """Check that ``meta`` is a consistent RoutingMetadata for T = num_tokens, E = num_experts, on the
    device of the data tensor ``data`` (named ``data_name`` in messages). ``None`` skips the
    corresponding comparison (the caller checks it against a tensor shape itself).

    Structure (always): types, shapes, integer dtypes, one device. Values (``value_checks_enabled``):
    offsets start at 0, end at M and never decrease (every count f_e >= 0), counts are their
    differences, gather_idx holds token indices in [0, T).
    """
    if not isinstance(meta, RoutingMetadata):
        raise TypeError(
            f"meta must be a sonic_learn.reference.routing.RoutingMetadata (from build_metadata), "
            f"got {type(meta).__name__}"
        )
    E = meta.num_experts
    if num_experts is not None and E != num_experts:
        raise ValueError(
            f"meta.num_experts must equal the number of experts E = {num_experts} (w.shape[0]), got {E}"
        )
    if num_tokens is not None and meta.num_tokens != num_tokens:
        raise ValueError(
            f"meta.num_tokens must equal the number of tokens T = {num_tokens} ({data_name}.shape[0]), "
            f"got {meta.num_tokens}"
        )
    _checks.check_shape("meta.expert_offsets", meta.expert_offsets, (E + 1,), "(E + 1 offsets)")
    _checks.check_shape("meta.expert_counts", meta.expert_counts, (E,), "(one count per expert)")
    _checks.check_ndim("meta.gather_idx", meta.gather_idx, 1)
    for name in ("expert_offsets", "expert_counts", "gather_idx"):
        t = getattr(meta, name)
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"meta.{name} must be an int32 or int64 tensor, got {t.dtype}")
    _checks.check_same_device(
        **{data_name: data, "meta.gather_idx": meta.gather_idx, "meta.expert_offsets": meta.expert_offsets}
    )
    if not value_checks_enabled():
        return meta
    M = meta.gather_idx.numel()
    first, last = int(meta.expert_offsets[0]), int(meta.expert_offsets[-1])
    if first != 0 or last != M:
        raise ValueError(
            f"meta.expert_offsets must start at 0 and end at the number of rows M = {M} "
            f"(len(meta.gather_idx)), got offsets[0] = {first}, offsets[-1] = {last}"
        )
    if not torch.equal(meta.expert_offsets.long().diff(), meta.expert_counts.long()):
        raise ValueError(
            "meta.expert_counts must equal the differences of meta.expert_offsets "
            "(counts[e] = offsets[e+1] - offsets[e])"
        )
    if E > 0 and int(meta.expert_counts.min()) < 0:
        e = int((meta.expert_counts < 0).nonzero()[0])
        raise ValueError(f"meta.expert_counts must be >= 0 (meta.expert_offsets non-decreasing), got "
                         f"expert_counts[{e}] = {int(meta.expert_counts[e])}")
    if M > 0 and num_tokens is not None:
        lo, hi = int(meta.gather_idx.min()), int(meta.gather_idx.max())
        if lo < 0 or hi >= num_tokens:
            raise ValueError(
                f"meta.gather_idx must hold token indices in [0, {num_tokens}), got values in [{lo}, {hi}]"
            )
    return meta


# ---------------------------------------------------------------------------------------------
# The layer's arguments
# ---------------------------------------------------------------------------------------------
def check_layer_inputs(x, router_w, w1, w2, k, tile_m, routing, backward, scoring="softmax_topk",
                       rounding_mode="nearest", generator=None, *, normalize: bool = False,
                       check_finite: bool = True) -> None:
    """Every argument of ``moe_forward``, including those the chosen routing does not use (a typo in
    ``rounding_mode`` is an error even with ``routing="topk"``):

    x (T, d), router_w (d, E), w1 (E, d, 2n), w2 (E, n, d), one float dtype, one device;
    1 <= k <= E; 1 <= tile_m <= MAX_TILE_M; known routing, backward, scoring and rounding_mode;
    a bool normalize; generator None or a torch.Generator on x's device type. With ``check_finite`` (a value check),
    x must hold no NaN or inf: the error names ``x``, not the router logits computed from it.
    """
    for name, t in (("x", x), ("router_w", router_w), ("w1", w1), ("w2", w2)):
        _checks.check_tensor(name, t)
        _checks.check_dtype(name, t, _checks.FLOAT_DTYPES)
    _checks.check_ndim("x", x, 2, "(T, d)")
    _checks.check_ndim("router_w", router_w, 2, "(d, E)")
    _checks.check_ndim("w1", w1, 3, "(E, d, 2n)")
    _checks.check_ndim("w2", w2, 3, "(E, n, d)")
    T, d = x.shape
    E = router_w.shape[1]
    _checks.check_shape("router_w", router_w, (d, E), "(d, E) with d = x.shape[1]")
    if w1.shape[2] % 2:
        raise ValueError(f"w1 must have an even last dim 2n (gate and up interleaved), got shape {tuple(w1.shape)}")
    n = w1.shape[2] // 2
    _checks.check_shape("w1", w1, (E, d, 2 * n), "(E, d, 2n) with E = router_w.shape[1], d = x.shape[1]")
    _checks.check_shape("w2", w2, (E, n, d), "(E, n, d) with n = w1.shape[2] // 2")
    for name, t in (("router_w", router_w), ("w1", w1), ("w2", w2)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    _checks.check_same_device(x=x, router_w=router_w, w1=w1, w2=w2)
    _checks.check_int_range("k", k, 1, E, "the number of experts E = router_w.shape[1]")
    _checks.check_int_range("tile_m", tile_m, 1, MAX_TILE_M, "rows per GEMM tile, token rounding's multiple")
    _checks.check_choice("routing", routing, ROUTINGS)
    _checks.check_choice("backward", backward, BACKWARD_MODES)
    _checks.check_choice("scoring", scoring, SCORINGS)
    _checks.check_choice("rounding_mode", rounding_mode, ROUNDING_MODES)
    _checks.check_bool("normalize", normalize)
    check_generator(generator, x.device)  # it draws for the router, on the logits' device = x's
    _checks.check_bool("check_finite", check_finite)
    if check_finite:
        check_finite_values("x", x)


# ---------------------------------------------------------------------------------------------
# Activation memory: measured with saved-tensor hooks, and the closed form
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SavedTensor:
    """One tensor that autograd keeps for the backward pass."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


def record_saved_tensors(run, exclude: tuple[torch.Tensor, ...] = ()) -> list[SavedTensor]:
    """Call ``run()`` and list every tensor autograd saves for backward meanwhile.

    Measured with ``torch.autograd.graph.saved_tensors_hooks``. Tensors sharing storage with one in
    ``exclude`` (the weights: parameters, not activations) are left out; each storage is counted
    once (an input saved by two ops costs its bytes once); empty tensors are listed with 0 bytes.
    """
    excluded = {t.data_ptr() for t in exclude}
    seen: set[tuple] = set()
    found: list[SavedTensor] = []

    def pack(t: torch.Tensor):
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() == 0:  # empty tensors share data_ptr 0: count each one (they hold 0 bytes)
            found.append(SavedTensor(tuple(t.shape), t.dtype, 0))
        elif t.data_ptr() not in excluded and key not in seen:
            seen.add(key)
            found.append(SavedTensor(tuple(t.shape), t.dtype, t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return found


def expected_saved_bytes(T: int, d: int, n: int, E: int, P: int, *, dtype=torch.bfloat16,
                         backward: str = "reduced_memory", score_dtype=torch.float32) -> dict[str, int]:
    """The closed form of what each backward mode caches, term by term (P = routed pairs, T*K for top-k).

    reduced_memory: X (T*d) + H (P*2n) elements -> 2Td + 4Pn bytes in bf16, plus the routing:
    scores (P, fp32) and three int32 index arrays (expert_offsets (E+1), gather_idx (P), pair_of_row (P)).
    standard: gathered X (P*d) + H (P*2n) + Y (P*d) + the same routing.
    """
    for name, value, lo in (("T", T, 0), ("d", d, 1), ("n", n, 1), ("E", E, 1), ("P", P, 0)):
        _checks.check_int_range(name, value, lo)
    for name, dt in (("dtype", dtype), ("score_dtype", score_dtype)):
        if not isinstance(dt, torch.dtype):
            raise TypeError(f"{name} must be a torch.dtype, got {type(dt).__name__}")
    _checks.check_choice("backward", backward, BACKWARD_MODES)
    b = torch.empty((), dtype=dtype).element_size()
    sb = torch.empty((), dtype=score_dtype).element_size()
    terms = {
        "H (P, 2n)": P * 2 * n * b,
        "scores (P,)": P * sb,
        "expert_offsets (E+1,)": (E + 1) * 4,
        "gather_idx (P,)": P * 4,
        "pair_of_row (P,)": P * 4,
    }
    if backward == "reduced_memory":
        terms = {"X (T, d)": T * d * b, **terms}
    else:
        terms = {"gathered X (P, d)": P * d * b, **terms, "Y (P, d)": P * d * b}
    terms["total"] = sum(terms.values())
    return terms
