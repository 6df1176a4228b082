"""How many launches the fast token-rounding router step issues, counted on the CPU.

The router step of the layer with ``routing="token_rounding"`` (``fast.moe.route_layer``: the router
GEMM, token rounding with ``pad_to_bound=True``, the padded metadata) is a chain of CuTe kernels and
torch ops. Every launch costs a few microseconds of GPU time however small its work, so their
number is a cost that can be measured without a GPU: this file runs the step's Python glue on the
CPU, with every CuTe launch replaced by a torch stand-in that fills the same output buffers
(``STANDINS``; the GPU tests check the kernels themselves), and counts

* **torch launches**: the ATen ops dispatched on the step's tensors (a ``TorchDispatchMode``, which
  sees every op below autograd), *except* the ops that launch nothing on a GPU:

  - views: every op whose schema returns an alias of its input (``OpOverload.is_view``: ``view``,
    ``t``, ``expand``, ``select``, ``slice``, ``detach``, ``as_strided``, ...);
  - allocations: ``empty``, ``empty_strided``, ``empty_like``, ``new_empty`` (the caching
    allocator hands out memory without a kernel);
  - host-side scalars: ``lift_fresh``, ``scalar_tensor`` (Python numbers wrapped into CPU 0-d
    tensors; on a GPU they are kernel arguments).

  Everything else counts as one launch: casts (``_to_copy``), ``copy_``, ``clone``, fills
  (``zero_``, ``fill_``), ``arange``, reductions, elementwise ops, ``nonzero_static``, ... One ATen
  op launches at least one kernel on a GPU; a few launch more than one (``nonzero_static`` is a
  CUB select plus its fill, an out-of-place ``scatter`` copies first), so the count is a lower
  bound on the kernels torch launches. The restructured glue never trades two ops for one
  composite op that runs the same two kernels.
* **CuTe launches**: the compiled calls of ``sonic_learn.fast._cute.launch`` (one host call each,
  several kernels in order on the stream: ``CUTE_KERNELS``).
* **host syncs**: ``_local_scalar_dense`` and ``nonzero`` (they read the device on the host).

Each op is charged to a *phase* of the step by the outermost function of the step on the Python
stack when it is dispatched (``PHASES``). Counts are taken on the second call (the first fills the
per-device caches of placeholders).

The same harness checks the glue itself: with the stand-ins, the step's routing, metadata, token
offsets, counts and gradients must be the reference's (``sonic_learn.reference.routing``), for the
default path and for the opt-in ``fused_glue=True``. The stand-ins of the opt-in's kernels
(``PaddedTriplesKernel``, the metadata scatter's padding fill) model them step by step and write
only what the kernels write, into poisoned buffers, so a missed entry shows up; the kernels
themselves are checked on a GPU by ``tests/test_fused_router_glue.py``.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from sonic_learn.fast._cute import cutlass_available  # pins sm_90a before cutlass loads

_ok, _why = cutlass_available()
if not _ok:
    pytest.skip(_why, allow_module_level=True)

from sonic_learn import _checks  # noqa: E402
from sonic_learn.fast import moe as fast_moe  # noqa: E402
from sonic_learn.fast import routing as fast  # noqa: E402
from sonic_learn.fast import topk as fast_topk  # noqa: E402
from sonic_learn.reference import routing as ref  # noqa: E402

# ---------------------------------------------------------------------------------------------
# What counts
# ---------------------------------------------------------------------------------------------
ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
HOST_SCALARS = {"lift_fresh", "scalar_tensor"}
SYNCS = {"_local_scalar_dense", "nonzero"}

# (file, function) -> phase. The outermost of these on the stack names the phase of an op.
PHASES = {
    ("fast/moe.py", "forward"): "router GEMM",  # RouterGemm.forward
    ("fast/routing.py", "token_choice_experts"): "top-k",
    ("fast/routing.py", "scores_from_experts"): "scores/softmax",
    ("reference/routing.py", "router_probabilities"): "scores/softmax",
    ("fast/routing.py", "_launch_metadata"): "counts f_e",  # under _metadata: "metadata" (outermost)
    ("fast/routing.py", "_launch_boundary_kernels"): "keys+select",
    ("fast/routing.py", "_launch_token_rounding_triples"): "keys+select+triples",  # fused_glue=True
    ("fast/routing.py", "_pair_weights"): "pair weights",
    ("fast/routing.py", "_rounding_stats"): "stats",
    ("reference/routing.py", "padded_triples"): "compaction",
    ("fast/routing.py", "_padded_triples"): "compaction",
    ("fast/routing.py", "_pair_scores"): "compaction",  # fused_glue=True: the weights of the kernel's triples
    ("fast/moe.py", "_metadata"): "metadata",
}
PHASE_ORDER = ["router GEMM", "top-k", "scores/softmax", "counts f_e", "keys+select", "keys+select+triples",
               "pair weights", "stats", "compaction", "metadata", "other"]

# Kernels each compiled call runs (compile function -> kernels), for the report.
CUTE_KERNELS = {"compile_kernel": 1, "compile_metadata_kernel": None, "compile_token_rounding_kernels": 2,
                "compile_token_rounding_triples_kernels": 5}


def _phase() -> str:
    """The phase of the op being dispatched: the outermost PHASES function on the stack."""
    found = "other"
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        for (path, name), phase in PHASES.items():
            if code.co_name == name and code.co_filename.replace("\\", "/").endswith(path):
                found = phase
        frame = frame.f_back
    return found


@dataclass
class Launches:
    """What one run of the step issued, per phase."""

    torch_ops: collections.Counter = field(default_factory=collections.Counter)  # phase -> ATen launches
    cute_calls: collections.Counter = field(default_factory=collections.Counter)  # phase -> compiled calls
    cute_kernels: collections.Counter = field(default_factory=collections.Counter)  # phase -> kernels
    syncs: list = field(default_factory=list)  # ops that read the device on the host
    ops: list = field(default_factory=list)  # (phase, op name), in dispatch order

    @property
    def total(self) -> int:
        """torch launches + CuTe compiled calls (host launches of the step)."""
        return sum(self.torch_ops.values()) + sum(self.cute_calls.values())

    def per_phase(self) -> dict[str, tuple[int, int]]:
        """phase -> (torch launches, CuTe compiled calls), phases in step order, empty ones left out."""
        return {p: (self.torch_ops[p], self.cute_calls[p]) for p in PHASE_ORDER
                if self.torch_ops[p] or self.cute_calls[p]}

    def table(self) -> str:
        rows = [f"{p:20s} torch {t:3d}  cute {c} ({self.cute_kernels[p]} kernels)" for p, (t, c) in
                self.per_phase().items()]
        return "\n".join(rows + [f"{'total':20s} {self.total} launches "
                                 f"({sum(self.torch_ops.values())} torch + {sum(self.cute_calls.values())} CuTe)"])


class _Counter(TorchDispatchMode):
    def __init__(self, launches: Launches):
        super().__init__()
        self.launches = launches
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and not func.is_view and name not in ALLOCATIONS | HOST_SCALARS:
            phase = _phase()
            if name in SYNCS:
                self.launches.syncs.append(name)
            if name != "_local_scalar_dense":
                self.launches.torch_ops[phase] += 1
                self.launches.ops.append((phase, name))
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------
# Torch stand-ins for the CuTe launches: the same outputs, written into the same buffers
# ---------------------------------------------------------------------------------------------
POISON = -7  # what the stand-ins write first into buffers the kernels get uninitialized (torch.empty)


def _topk_standin(variant, x, out, idx):
    kind, dtype, n, k, epilogue = variant
    assert epilogue == "values", "the token-rounding router asks the bitonic kernel for values only"
    idx.copy_(torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k])  # ties to the lower column
    out.copy_(x.gather(1, idx))


def _metadata_standin(variant, expert, token, tile_counts, counts, offsets, gather, pair_of_row, row_of_pair,
                      chunks_per_tile):
    bucket, scatter, fill_padding = variant
    E = counts.numel()
    valid = ((expert >= 0) & (expert < E)).nonzero().squeeze(1)  # pairs the kernels do not skip
    counts.copy_(torch.bincount(expert[valid].long(), minlength=E))
    offsets.copy_(torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]))
    if not scatter:
        return
    if fill_padding:  # buffers from torch.empty: write only what the kernel writes
        for out in (gather, pair_of_row, row_of_pair):
            out.fill_(POISON)
    # stable grouping by expert: rows of one expert in pair order
    order = valid[torch.sort(expert[valid], stable=True).indices]  # (true P,) pair of each row
    rows = torch.arange(order.numel(), dtype=torch.int32)
    pair_of_row[: order.numel()] = order.to(torch.int32)
    row_of_pair[order] = rows
    gather[: order.numel()] = token[order]
    if fill_padding:  # per pair p: a skipped pair maps to row p; p >= offsets[E] is a padding row
        p = torch.arange(expert.numel(), dtype=torch.int32)
        skipped = (expert < 0) | (expert >= E)
        row_of_pair[skipped] = p[skipped]
        past = p >= offsets[E]
        gather[past], pair_of_row[past] = 0, p[past]


def _token_rounding_standin(variant, scores_bits, experts, keys, keep, counts, uniform, mode, tile_m):
    mode_name = {code: name for name, code in fast.ROUNDING_CODES.items()}[mode]
    scores = scores_bits.view(torch.float32)
    picked = torch.zeros_like(keep, dtype=torch.bool).scatter_(1, experts.long(), True)  # (T, E)
    keys.copy_(torch.where(picked, scores_bits | fast.PICK_BIT, scores_bits).t())
    keep.copy_(fast._boundary_keep_torch(scores, experts.long(), counts, uniform if mode_name == "stochastic" else None,
                                         mode_name, tile_m))


def _rounding_delta(f: int, u: float, mode: str, tile_m: int, T: int) -> int:
    """rounded_e - f_e as the kernels' ``rounding_delta`` computes it (integer rule, capped at T)."""
    floor_f = f // tile_m * tile_m
    rem = f - floor_f
    go_up = {"down": False, "up": rem > 0, "nearest": 2 * rem > tile_m}.get(mode)
    if go_up is None:
        go_up = u * float(tile_m) < float(rem)
    return min(floor_f + tile_m if go_up and rem > 0 else floor_f, T) - f


def _triples_standin(variant, scores_bits, experts, keys, keep, counts, uniform, mode, tile_m, tile_pairs, tile_empty,
                     token_idx, expert_idx, pair_index, is_pair, token_offsets, counts4, tokens_per_tile):
    """The selection (as above), then ``PaddedTriplesKernel`` step by step: per-tile counts from
    32-expert ballots, the one-warp scan and counts, the per-token writes at ballot ranks, the
    padding's grid-stride fill. Writes only what the kernels write, into poisoned buffers."""
    _token_rounding_standin((), scores_bits, experts, keys, keep, counts, uniform, mode, tile_m)
    for out in (tile_pairs, tile_empty, token_idx, expert_idx, pair_index, is_pair, token_offsets, counts4):
        out.fill_(POISON if out.dtype != torch.uint8 else 255)
    mode_name = {code: name for name, code in fast.ROUNDING_CODES.items()}[mode]
    T, E = keep.shape
    kept_experts = [[e for e, k in enumerate(row) if k] for row in keep.tolist()]
    num_tiles = tile_pairs.numel()

    def ballots(t):  # per 32-expert chunk c: the lanes whose expert c + lane is kept
        return [[e - c for e in kept_experts[t] if c <= e < c + 32] for c in range(0, E, 32)]

    def tile_tokens(tile):
        return [t for t in range(tile * tokens_per_tile, (tile + 1) * tokens_per_tile) if t < T]

    for tile in range(num_tiles):  # 1. count
        per_token = [sum(len(b) for b in ballots(t)) for t in tile_tokens(tile)]
        tile_pairs[tile], tile_empty[tile] = sum(per_token), per_token.count(0)
    starts = [0] + torch.cumsum(tile_pairs, 0).tolist()[:-1]  # 2. scan (exclusive, in place)
    kept, empty = int(tile_pairs.sum()), int(tile_empty.sum())
    tile_pairs.copy_(torch.tensor(starts))
    deltas = [_rounding_delta(int(counts[e]), float(uniform[e]) if mode_name == "stochastic" else 0.0, mode_name,
                              tile_m, T) for e in range(E)]
    counts4.copy_(torch.tensor([kept, sum(-d for d in deltas if d < 0), sum(d for d in deltas if d > 0), empty]))
    outs = {name: out.tolist() for name, out in
            (("token", token_idx), ("expert", expert_idx), ("index", pair_index), ("is_pair", is_pair),
             ("offsets", token_offsets))}
    outs["offsets"][T] = kept
    for tile in range(num_tiles):  # 3. write
        running = starts[tile]
        for t in tile_tokens(tile):
            outs["offsets"][t] = running
            for c, lanes in zip(range(0, E, 32), ballots(t)):
                for rank, lane in enumerate(lanes):  # rank = popc(ballot & lanemask_lt)
                    pos = running + rank
                    outs["token"][pos], outs["expert"][pos] = t, c + lane
                    outs["index"][pos], outs["is_pair"][pos] = t * E + c + lane, 1
                running += len(lanes)
    for pos in range(kept, token_idx.numel()):  # the padding (grid-stride)
        outs["token"][pos], outs["expert"][pos], outs["index"][pos], outs["is_pair"][pos] = T, E, 0, 0
    for name, out in (("token", token_idx), ("expert", expert_idx), ("index", pair_index), ("is_pair", is_pair),
                      ("offsets", token_offsets)):
        out.copy_(torch.tensor(outs[name], dtype=out.dtype))


STANDINS = {"compile_kernel": _topk_standin, "compile_metadata_kernel": _metadata_standin,
            "compile_token_rounding_kernels": _token_rounding_standin,
            "compile_token_rounding_triples_kernels": _triples_standin}


@dataclass(frozen=True)
class _FakeCompiled:
    name: str  # the compile function
    variant: tuple  # its compile-time arguments


def _private_warning_registry(monkeypatch) -> None:
    """The shapes warned about below the paper's condition are remembered process-wide (once per
    shape): the shapes these tests draw must not silence another test's expected warning."""
    monkeypatch.setattr(ref, "_warned_shapes", set(ref._warned_shapes))


@contextlib.contextmanager
def counting_launches(monkeypatch):
    """Within the block, the fast routing runs on CPU tensors with torch stand-ins for the CuTe
    launches, and every launch is counted into the yielded ``Launches``."""
    launches = Launches()
    mode = _Counter(launches)

    def fake_compiled(compile_fn, *args, **kwargs):
        return _FakeCompiled(compile_fn.__name__, args)

    def fake_launch(kernel, device, *args):
        phase = _phase()
        launches.cute_calls[phase] += 1
        kernels = CUTE_KERNELS[kernel.name]
        if kernels is None:  # the metadata call: three kernels, four with the scatter
            kernels = 4 if kernel.variant[1] else 3
        launches.cute_kernels[phase] += kernels
        mode.paused += 1
        try:
            STANDINS[kernel.name](kernel.variant, *args)
        finally:
            mode.paused -= 1

    for module in (fast, fast_topk):
        monkeypatch.setattr(module, "compiled", fake_compiled)
        monkeypatch.setattr(module, "launch", fake_launch)
    monkeypatch.setattr(_checks, "check_cuda", lambda name, t: None)  # CPU tensors stand in for CUDA ones
    _private_warning_registry(monkeypatch)
    with mode:
        yield launches


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------
def layer_router_step(T=512, d=64, E=32, K=4, tile_m=16, mode="nearest", scoring="softmax_topk", normalize=False,
                      seed=0, grad=True, fused_glue=False):
    """Inputs of the layer's router step (``fast.moe.route_layer``) on the CPU."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(torch.bfloat16).requires_grad_(grad)
    router_w = (torch.randn(d, E, generator=g) / d**0.5).to(torch.bfloat16).requires_grad_(grad)
    kwargs = dict(routing="token_rounding", tile_m=tile_m, scoring=scoring, normalize=normalize, rounding_mode=mode,
                  fused_glue=fused_glue,
                  generator=torch.Generator().manual_seed(seed + 1) if mode == "stochastic" else None)
    return x, router_w, K, kwargs


def count_router_step(monkeypatch, **shape) -> tuple[Launches, fast_moe.DeviceRouting]:
    """Launches of one call of the layer's token-rounding router step (after a warm-up call)."""
    x, router_w, K, kwargs = layer_router_step(**shape)
    with counting_launches(monkeypatch) as warmup:
        fast_moe.route_layer(x, router_w, K, **kwargs)
    kwargs["generator"] = layer_router_step(**shape)[3]["generator"]  # the same draw again
    with counting_launches(monkeypatch) as launches:
        r = fast_moe.route_layer(x, router_w, K, **kwargs)[0]
    assert warmup.total >= launches.total
    return launches, r


# ---------------------------------------------------------------------------------------------
# The glue gives the reference's routing, metadata and gradients (kernels stood in for)
# ---------------------------------------------------------------------------------------------
def _reference_offsets(token_idx: torch.Tensor, T: int) -> torch.Tensor:
    """(T+1,) first pair of each token (and T's: the true P), by brute force."""
    return torch.tensor([int((token_idx < t).sum()) for t in range(T + 1)], dtype=torch.int32)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(0, 300), E=st.sampled_from([4, 8, 16, 24, 64]), K=st.sampled_from([1, 2, 4]),
       tile_m=st.sampled_from([1, 3, 16, 64]), mode=st.sampled_from(ref.ROUNDING_MODES),
       scoring=st.sampled_from([("softmax_topk", False), ("topk_softmax", False), ("topk_softmax", True)]),
       ties=st.booleans(), seed=st.integers(0, 2**31 - 1))
@example(T=200, E=8, K=2, tile_m=16, mode="down", scoring=("softmax_topk", False), ties=True, seed=0)
@example(T=5, E=8, K=2, tile_m=64, mode="down", scoring=("topk_softmax", True), ties=False, seed=1)  # all dropped
@example(T=0, E=8, K=2, tile_m=16, mode="up", scoring=("softmax_topk", False), ties=False, seed=2)
@pytest.mark.parametrize("fused_glue", [False, True])
def test_layer_router_step_equals_the_reference(fused_glue, T, E, K, tile_m, mode, scoring, ties, seed):
    """route_layer's glue (kernels stood in for) = the reference: padded triples and scores bit for
    bit, the padded metadata, the token offsets, the rounding counts, and the gradients of x and
    router_w through the scores."""
    K = min(K, E)
    g = torch.Generator().manual_seed(seed)
    d = 16
    x = torch.randn(T, d, generator=g)
    if ties:
        x = x.round()
    x = x.to(torch.bfloat16).requires_grad_(True)
    router_w = torch.randn(d, E, generator=g).round().to(torch.bfloat16).requires_grad_(True)
    scoring, normalize = scoring
    kwargs = dict(tile_m=tile_m, scoring=scoring, normalize=normalize)

    def generator():
        return torch.Generator().manual_seed(seed + 1) if mode == "stochastic" else None

    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("ignore")  # below the paper's condition (not the point here)
        _private_warning_registry(mp)
        with counting_launches(mp) as launches:
            r, x_experts = fast_moe.route_layer(x, router_w, K, routing="token_rounding", rounding_mode=mode,
                                                generator=generator(), fused_glue=fused_glue, **kwargs)
        x_ref, w_ref = (t.detach().clone().requires_grad_(True) for t in (x, router_w))
        logits_ref = (x_ref @ w_ref).float()
        want = ref.token_rounding(logits_ref, K, mode=mode, generator=generator(), pad_to_bound=True, **kwargs)
    assert not launches.syncs, f"the router step read the device on the host: {launches.syncs}"
    want_meta = ref.build_padded_metadata(want)
    for name in ("expert_counts", "expert_offsets", "gather_idx", "pair_of_row", "row_of_pair"):
        got_t, want_t = getattr(r.meta, name), getattr(want_meta, name)
        assert got_t.dtype == torch.int32 and torch.equal(got_t, want_t.to(torch.int32)), name
    assert r.scores.dtype == want.scores.dtype and torch.equal(r.scores, want.scores), "scores differ"
    assert torch.equal(r.scores.view(torch.int32), want.scores.view(torch.int32)), "scores differ in their bits"
    assert r.token_offsets.dtype == torch.int32
    assert torch.equal(r.token_offsets, _reference_offsets(want.token_idx, T))
    for name in ("kept_pairs", "dropped_pairs", "added_pairs", "dropped_tokens"):
        got_n, want_n = getattr(r.rounding, name), getattr(want.rounding, name)
        assert got_n.shape == () and got_n.dtype == torch.int64 and int(got_n) == int(want_n), name
    assert r.rounding.tokens_per_tile == want.rounding.tokens_per_tile
    # The gradients through the scores: the same formulas, summed in another order where the
    # topk_softmax weights share the softmax of the ranking key (float32 round-off of the logits'
    # gradient), then through the router GEMM in bf16.
    r.logits.retain_grad()
    logits_ref.retain_grad()
    gout = torch.randn(r.scores.shape, generator=g)
    (r.scores * gout).sum().backward()
    (want.scores * gout).sum().backward()
    torch.testing.assert_close(r.logits.grad, logits_ref.grad, rtol=1e-5, atol=1e-7)
    if scoring == "softmax_topk":  # no shared softmax: the very same gradient
        assert torch.equal(r.logits.grad, logits_ref.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(router_w.grad, w_ref.grad)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(0, 200), E=st.sampled_from([8, 13, 32]), K=st.sampled_from([1, 2, 4]),
       tile_m=st.sampled_from([1, 16, 64]), mode=st.sampled_from(ref.ROUNDING_MODES),
       scoring=st.sampled_from(["softmax_topk", "topk_softmax"]), pad=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_token_rounding_without_autograd_equals_the_reference(T, E, K, tile_m, mode, scoring, pad, seed):
    """token_rounding under no_grad (the weights overwrite the probabilities in place), padded or
    not, gives the reference's triples and counts bit for bit."""
    K = min(K, E)
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed)) * 3

    def generator():
        return torch.Generator().manual_seed(seed + 1) if mode == "stochastic" else None

    kwargs = dict(tile_m=tile_m, mode=mode, scoring=scoring, pad_to_bound=pad)
    with warnings.catch_warnings(), torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("ignore")
        _private_warning_registry(mp)
        with counting_launches(mp) as launches:
            got = fast.token_rounding(logits, K, generator=generator(), check_finite=False, **kwargs)
        want = ref.token_rounding(logits, K, generator=generator(), **kwargs)
    assert (launches.syncs == []) == pad, launches.syncs  # unpadded: nonzero sizes the triples on the host
    for name in ("token_idx", "expert_idx", "scores"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    for name in ("kept_pairs", "dropped_pairs", "added_pairs", "dropped_tokens"):
        assert int(getattr(got.rounding, name)) == int(getattr(want.rounding, name)), name


# ---------------------------------------------------------------------------------------------
# The count
# ---------------------------------------------------------------------------------------------
# The bound per phase, (torch launches, CuTe compiled calls), of the layer's router step with autograd
# on, nearest rounding, softmax_topk weights. Before the glue was restructured the step took 40
# launches: stats 12 torch, compaction 11, metadata 6, the others as below. Why what is left remains:
# see "Launches of the router step" in sonic_learn/fast/routing.py's docstring.
MAX_LAUNCHES = {
    "router GEMM": (2, 0),  # cuBLAS GEMM, then the float32 cast (the reference rounds to x's dtype first)
    "top-k": (0, 1),  # the bitonic kernel
    "scores/softmax": (3, 0),  # softmax over E (the ranking key), gather + softmax over K (the weights)
    "counts f_e": (0, 1),  # the histogram kernels
    "keys+select": (0, 1),  # the two token-rounding kernels
    "pair weights": (1, 0),  # one scatter
    "stats": (8, 0),  # one (3, E) reduction (5 launches), the tokens left with no expert (3)
    "compaction": (6, 0),  # nonzero_static, two remainders into int32, the score gather, ge, where
    "metadata": (5, 1),  # the padded rows' init (3), the metadata kernels, the token offsets (2)
    "other": (1, 0),  # the int32 copy of the top-k experts (the kernels' index type)
}


# The same step with ``fused_glue=True`` (opt-in, GPU-verification pending): the triples, the
# rounding counts and the token offsets come out of the token-rounding compiled call, the padded
# metadata's initialization out of the scatter kernel.
MAX_LAUNCHES_FUSED = {
    **{phase: MAX_LAUNCHES[phase] for phase in ("router GEMM", "top-k", "scores/softmax", "counts f_e", "pair weights",
                                                 "other")},
    "keys+select+triples": (0, 1),  # keys, select, then the triples' count, scan and write kernels
    "compaction": (2, 0),  # the weights at the kernel's flat indices (index_select), 0 for the padding (where)
    "metadata": (0, 1),  # the metadata kernels alone
}


SHAPES = {"small": dict(T=512, d=64, E=32, K=4, tile_m=16),
          "7B-like": dict(T=4096, d=64, E=128, K=8, tile_m=128)}  # the 7B router's E, K and tile, T/6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fused_glue, bound, total", [(False, MAX_LAUNCHES, 30), (True, MAX_LAUNCHES_FUSED, 13)])
def test_the_router_step_stays_within_its_launch_bound(monkeypatch, shape, fused_glue, bound, total):
    """The count per phase does not depend on the shape; ``pytest -s`` prints it."""
    launches, _ = count_router_step(monkeypatch, fused_glue=fused_glue, **SHAPES[shape])
    print(f"\n{shape}, fused_glue={fused_glue}\n{launches.table()}")
    assert not launches.syncs, f"the router step read the device on the host: {launches.syncs}"
    for phase, (torch_ops, cute_calls) in launches.per_phase().items():
        most = bound.get(phase, (0, 0))
        assert torch_ops <= most[0] and cute_calls <= most[1], (
            f"{phase}: {torch_ops} torch launches and {cute_calls} CuTe calls, bound {most}\n{launches.table()}\n"
            f"{[op for ph, op in launches.ops if ph == phase]}")
    # Exactly the bound: fewer launches are welcome, but then the bound and the module docstring's
    # count are updated with them (and the default path must not slip into the opt-in kernels).
    assert launches.per_phase() == bound, launches.table()
    assert launches.total == sum(t + c for t, c in bound.values()) == total


@pytest.mark.parametrize("scoring, normalize, mode, grad, extra", [
    ("topk_softmax", True, "nearest", True, -1),  # the weights gather from the ranking key's softmax
    ("softmax_topk", False, "stochastic", True, 1),  # + the uniform draw (torch.rand, on the device)
    ("softmax_topk", False, "up", False, 0),  # no autograd: the scatter runs in place, same count
])
def test_other_configurations_of_the_step(monkeypatch, scoring, normalize, mode, grad, extra):
    launches, _ = count_router_step(monkeypatch, scoring=scoring, normalize=normalize, mode=mode, grad=grad)
    assert not launches.syncs
    normalize_ops = 2 if normalize else 0  # sum and divide
    assert launches.total == sum(t + c for t, c in MAX_LAUNCHES.values()) + extra + normalize_ops, launches.table()
