"""Expert parallelism: the MoE layer with its experts split over the ranks of a process group.

With W ranks and E experts, rank r owns the E_local = E / W experts ``r*E_local ... (r+1)*E_local - 1``
(their ``w1``, ``w2``); the router ``router_w`` (d, E) is replicated. Each rank holds its own T_r
tokens. A forward is six named steps:

1. **Route locally.** The rank's tokens pick their experts (top-k or token rounding), exactly as on
   one GPU. Grouping the pairs by expert also groups them by destination rank, because each rank
   owns a contiguous range of experts.
2. **Exchange counts.** One small all-to-all of (W, E_local) integers: how many rows each rank
   will send to each of this rank's experts.
3. **Dispatch.** ``all_to_all_single`` with uneven splits sends every pair's row of X (and its
   score) to the rank that owns the pair's expert.
4. **Local experts.** The received rows run through the single-GPU experts (the reference on any
   device, or the CuTe-DSL kernels on Hopper): each received row is one "token" with one pair. The
   experts scale each output row by its score, as on one GPU, so dS = <dA', A> is computed where A
   lives.
5. **Combine.** The reverse all-to-all brings each weighted output row home.
6. **Sum at home.** Each token adds up its K returned rows (an unweighted gather-and-sum).

Why the score is applied on the expert's rank (step 4) and not in the home rank's sum: a weighted sum
at home would need Y's rows for dS = <dO, Y>, i.e. a (P, d) cache on the home rank. Applied on the
expert side, dS = <dA', A> needs only H, which the reduced-memory backward caches anyway.

**Backward.** Autograd runs the steps in reverse; each all-to-all's gradient is the all-to-all with the
splits swapped (``comm.AllToAll``). With ``backward="reduced_memory"`` nothing of size (P, d) is
cached on either side: the received rows of X are *not* kept for dW1 = X_e^T dH; the backward sends
them again (one more all-to-all of the same size as the dispatch: reduced memory trades activation
bytes for communication here). ``backward="standard"`` caches them, as the classic backward caches
the gathered X.

**Gradients in a data-parallel setting.** Each rank's ``w1``/``w2`` gradients are complete: every
row that touched a local expert came here. The router is replicated but each rank only saw its own
tokens, so its gradient is a partial sum: call ``ExpertParallelMoE.all_reduce_router_grad()`` (a SUM
over the group) after ``backward()`` and before the optimizer step. If the EP group is also your
data-parallel group, that is the only all-reduce the layer needs; expert gradients are never reduced.

**Overlapping communication with computation** (``chunks=C > 1``). Steps 3-5 can be split over C
contiguous groups of this rank's local experts (C is capped at E_local). All C dispatches are launched
asynchronously up front; then, for chunk c in order, the loop waits for chunk c's rows only, runs
chunk c's experts while the later chunks are still in flight (on NCCL they travel on NCCL's stream
while the GEMMs run on the compute stream), and launches chunk c's combine at once. The combines are
waited for before the sum at home. The output equals ``chunks=1``'s. This can win only with several
GPUs: on one GPU the all-to-all is a local copy, so chunking adds launches and smaller GEMMs and
cannot hide anything. The overlap is a forward-only optimisation (the backward's all-to-alls are
synchronous), and the default stays ``chunks=1`` until a multi-GPU measurement shows a win
(``benchmarks/expert_parallel.py --chunks 1,2,4``).

**Token rounding under EP** rounds on the home rank: each rank rounds *its own* count for every expert
to a multiple of the tile, so every expert receives a multiple of the tile from each rank (and so in
total). The guard's tokens-per-expert-per-tile ratio is then the *local* one, T_r*K/(E*tile), which is
W times smaller than the global one: rounding becomes coarser as W grows at fixed tokens per GPU.
"""

from __future__ import annotations

import math
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sonic_learn import _checks, contracts
from sonic_learn.contracts import Routing
from sonic_learn.parallel.comm import AllToAll, all_to_all_rows, all_to_all_start, all_to_all_wait, exchange_counts
from sonic_learn.reference import moe as reference_moe
from sonic_learn.reference.routing import build_metadata

__all__ = ["ExpertParallelMoE", "expert_parallel_forward", "StepTimes", "alltoall_bytes", "time_steps"]

BACKENDS = ("reference", "fast")


@dataclass
class StepTimes:
    """Seconds spent in each named step of the last forward (host clock, synchronised per step only
    when ``time_steps=True`` is passed; otherwise left at zero).

    With ``chunks=1``: ``dispatch`` = steps 2-3, ``experts`` = step 4, ``combine`` = steps 5-6. With
    ``chunks > 1`` the steps overlap, so the split is by what runs alone: ``dispatch`` = the count
    exchange and *launching* the dispatches, ``experts`` = the whole overlapped section (waiting for
    each chunk's rows, its experts, launching its combine), ``combine`` = waiting for the combines
    that are still in flight after the last chunk's experts, and the sum at home. The synchronisation
    between steps is of the compute stream only, so it does not wait for transfers in flight.
    """

    route: float = 0.0
    dispatch: float = 0.0
    experts: float = 0.0
    combine: float = 0.0
    rows_sent: int = 0
    rows_received: int = 0


def alltoall_bytes(T: int, K: int, d: int, world: int, elem_bytes: int) -> int:
    """The cost model of one layer's forward traffic leaving one rank, in bytes: each of the T*K pair
    rows goes out once (dispatch) and comes back once (combine), 2*T*K*d elements, less the share
    that stays on this rank (1/W of the pairs under a uniform routing)."""
    return int(2 * T * K * d * elem_bytes * (world - 1) / world)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Laps:
    """The step timer: ``lap("dispatch")`` adds the time since the previous lap to that step of
    ``times`` (a no-op without ``times``). It synchronises the current stream only: a synchronous
    collective has joined it already, an asynchronous one in flight is not waited for."""

    def __init__(self, times: StepTimes | None, device: torch.device):
        self.times, self.device, self.t0 = times, device, time.perf_counter()

    def __call__(self, step: str) -> None:
        if self.times is None:
            return
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        now = time.perf_counter()
        setattr(self.times, step, getattr(self.times, step) + now - self.t0)
        self.t0 = now


@contextmanager
def _resend_instead_of_saving(x_recv: torch.Tensor, resend):
    """While the experts run, autograd would cache the received rows ``x_recv`` (P_recv, d) for dW1.
    This saved-tensor hook caches nothing for them and calls ``resend()`` (the dispatch again) when
    the backward needs them. Every other saved tensor is kept as is."""

    target = weakref.ref(x_recv)  # a strong reference here would itself keep the rows alive

    def pack(t):
        return _Resend if t is target() else t

    def unpack(t):
        return resend() if t is _Resend else t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class _Resend:
    """Placeholder kept in the autograd graph instead of the received rows (see above)."""


def _route(x, router_w, k, **route_kw) -> Routing:
    """Step 1's router: the reference router (torch ops, any device) for both backends. Its pairs
    are unpadded and token-sorted, which the count exchange needs; the fast backend's router pads
    token rounding's pairs to a bound (its sync-free layout), so EP does not use it. The router is a
    small part of the layer; the experts (step 4) are where the fast kernels matter."""
    return reference_moe.route(x, router_w, k, **route_kw)


def _local_experts(x_recv, s_recv, recv_counts, w1, w2, *, backend, backward, tile_m):
    """Step 4: the single-GPU experts on the received rows, each row its own token with one pair.
    Returns the rows s * SwiGLU(x W1) W2, (P_recv, d), in received order."""
    R = x_recv.shape[0]
    E_local = w1.shape[0]
    # Received order is (source rank, local expert, row); the local expert of each received row:
    expert_of_row = torch.arange(E_local, device=x_recv.device).repeat(recv_counts.shape[0])  # (W*E_local,)
    expert_idx = torch.repeat_interleave(expert_of_row, recv_counts.reshape(-1).long(), output_size=R)  # (R,)
    token_idx = torch.arange(R, device=x_recv.device, dtype=torch.int32)  # row j is "token" j
    if backend == "fast":
        from sonic_learn.fast import moe as fast_moe

        meta, token_offsets = fast_moe.device_metadata(token_idx, expert_idx, R, E_local, pairs_per_token=1)
        return fast_moe.run_experts(x_recv, w1, w2, fast_moe.DeviceRouting(meta, s_recv, token_offsets), backward)
    meta = build_metadata(Routing(token_idx, expert_idx.to(torch.int32), s_recv, R, E_local))
    experts = reference_moe.ReducedMemoryExperts if backward == "reduced_memory" else reference_moe.StandardExperts
    return experts.apply(x_recv, w1, w2, s_recv, meta, tile_m)


def expert_parallel_forward(
    x: torch.Tensor,
    router_w: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    k: int,
    *,
    group=None,
    routing: str = "topk",
    tile_m: int = 128,
    backward: str = "reduced_memory",
    scoring: str = "softmax_topk",
    rounding_mode: str = "nearest",
    generator: torch.Generator | None = None,
    backend: str = "reference",
    chunks: int = 1,
    times: StepTimes | None = None,
) -> torch.Tensor:
    """The expert-parallel MoE layer on this rank: x (T_r, d) -> out (T_r, d).

    ``router_w`` (d, E) is the replicated router; ``w1`` (E_local, d, 2n) and ``w2`` (E_local, n, d)
    are this rank's experts, E = E_local * W. Other arguments as ``sonic_learn.reference.moe.moe_forward``.
    Every rank of ``group`` must call it (collectives inside). Pass a ``StepTimes`` to have each step
    timed (it synchronises between steps, so use it for measurements only). ``chunks`` > 1 splits
    steps 3-5 into that many groups of local experts (at most E_local) whose communication overlaps
    the experts (see the module docstring); every rank must pass the same ``chunks``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert_parallel_forward needs torch.distributed initialised "
                           "(dist.init_process_group('gloo' on CPU, 'nccl' on GPUs))")
    _checks.check_choice("backend", backend, BACKENDS)
    _checks.check_int_range("chunks", chunks, 1, what="the number of groups of local experts to overlap")
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    _checks.check_tensor("w1", w1)
    _checks.check_tensor("router_w", router_w)
    if w1.dim() != 3:
        raise ValueError(f"w1 must be this rank's experts (E_local, d, 2n), got shape {tuple(w1.shape)}")
    E_local, E = w1.shape[0], router_w.shape[1] if router_w.dim() == 2 else -1
    if E != E_local * W:
        raise ValueError(f"router_w.shape[1] (E = {E}) must equal w1.shape[0] (E_local = {E_local}) times the "
                         f"group's world size ({W}): each rank owns E / world_size experts")
    # The single-GPU checks, on the global shapes (w1/w2 stand for all experts).
    global_w1 = w1[:1].expand(E, *w1.shape[1:])  # zero-stride views with the global shapes, no copy
    global_w2 = w2[:1].expand(E, *w2.shape[1:])
    contracts.check_layer_inputs(x, router_w, global_w1, global_w2, k, tile_m, routing, backward)
    _checks.check_choice("scoring", scoring, contracts.SCORINGS)
    _checks.check_choice("rounding_mode", rounding_mode, contracts.ROUNDING_MODES)
    contracts.check_generator(generator, x.device)
    lap = _Laps(times, x.device)

    # Step 1: route locally; group the pairs by expert (so also by destination rank).
    r = _route(x, router_w, k, routing=routing, tile_m=tile_m, scoring=scoring,
               rounding_mode=rounding_mode, generator=generator)
    home = build_metadata(r)  # grouped row g holds pair home.pair_of_row[g], token home.gather_idx[g]
    lap("route")

    # Step 2: exchange counts. send_counts[q, e] = my pairs for expert e of rank q.
    send_counts = home.expert_counts.to(torch.int64).view(W, E_local)  # (W, E_local)
    recv_counts = exchange_counts(send_counts, group)  # (W, E_local)
    send_splits = send_counts.sum(1).tolist()  # host lists: the collective sizes its messages with them
    recv_splits = recv_counts.sum(1).tolist()
    if times is not None:
        times.rows_sent = sum(send_splits) - send_splits[rank]
        times.rows_received = sum(recv_splits) - recv_splits[rank]

    gather = home.gather_idx.long()  # (P_r,) token of each grouped row
    scores = r.scores[home.pair_of_row.long()]  # (P_r,) score of each grouped row
    kw = dict(backend=backend, backward=backward, tile_m=tile_m)
    if min(chunks, E_local) > 1:
        y_home = _overlapped_steps_3_to_5(x, gather, scores, send_counts, recv_counts, w1, w2, chunks, group,
                                          lap, kw)  # (P_r, d)
    else:
        # Step 3: dispatch the rows of X and the scores to the experts' ranks.
        x_recv = AllToAll.apply(x[gather], recv_splits, send_splits, group)  # (P_recv, d)
        s_recv = AllToAll.apply(scores, recv_splits, send_splits, group)  # (P_recv,)
        lap("dispatch")

        # Step 4: the local experts (the received X rows are resent in the backward, not cached).
        y_recv = _experts_without_caching_rows(x, gather, x_recv, s_recv, recv_counts, recv_splits, send_splits,
                                               w1, w2, group, kw)  # (P_recv, d)
        del x_recv
        lap("experts")

        # Step 5: combine: each weighted row goes back to its token's rank (grouped order there).
        y_home = AllToAll.apply(y_recv, send_splits, recv_splits, group)  # (P_r, d)
        del y_recv
    # Step 6: sum at home: out[t] = sum of token t's returned rows (scores are already applied).
    out = reference_moe.aggregate(y_home, None, home)  # (T_r, d)
    lap("combine")
    return out


def _experts_without_caching_rows(x, gather, x_recv, s_recv, recv_counts, recv_splits, send_splits, w1, w2,
                                  group, kw):
    """Step 4 for the rows ``x_recv`` that arrived with splits ``recv_splits`` (sent from the grouped
    rows ``gather`` of X with ``send_splits``). Reduced memory: the hook sends those rows again in the
    backward instead of caching them, so no (P, d) tensor is kept on this rank."""
    if kw["backward"] != "reduced_memory":
        return _local_experts(x_recv, s_recv, recv_counts, w1, w2, **kw)

    def resend():
        return all_to_all_rows(x.detach()[gather], recv_splits, send_splits, group)

    with _resend_instead_of_saving(x_recv, resend):
        return _local_experts(x_recv, s_recv, recv_counts, w1, w2, **kw)


def _chunk_bounds(E_local: int, chunks: int) -> list[tuple[int, int]]:
    """The local experts [lo, hi) of each chunk: min(chunks, E_local) contiguous, near-equal groups."""
    C = min(chunks, E_local)
    return [(c * E_local // C, (c + 1) * E_local // C) for c in range(C)]


def _overlapped_steps_3_to_5(x, gather, scores, send_counts, recv_counts, w1, w2, chunks, group, lap, kw):
    """Steps 3-5 in C chunks of local experts, communication overlapped with the experts.
    Returns the weighted rows back home, (P_r, d) in grouped order, as the plain steps 3-5 do."""
    W, E_local = send_counts.shape
    bounds = _chunk_bounds(E_local, chunks)
    sizes = torch.tensor([hi - lo for lo, hi in bounds], device=gather.device)
    send_host, recv_host = send_counts.tolist(), recv_counts.tolist()  # (W, E_local) each, on the host

    # 3a. Each grouped row's chunk. Rows are grouped by (rank q, local expert e); chunk c holds local
    # experts [lo_c, hi_c) of every rank. A stable sort by chunk gives (chunk, q, e, row) order, so
    # chunk c's rows for rank q are contiguous, as all_to_all_single needs.
    chunk_of_expert = torch.repeat_interleave(torch.arange(len(bounds), device=gather.device), sizes)  # (E_local,)
    chunk_of_row = torch.repeat_interleave(chunk_of_expert.repeat(W), send_counts.reshape(-1),
                                           output_size=gather.shape[0])  # (P_r,)
    order = torch.argsort(chunk_of_row, stable=True)  # (P_r,) grouped rows, chunk by chunk

    # 3b. Launch every chunk's dispatch (rows of X and scores) now; none is waited for yet.
    chunk = []  # per chunk: its grouped rows, splits, and the pending received rows and scores
    start = 0
    for lo, hi in bounds:
        send_c = [sum(row[lo:hi]) for row in send_host]  # (W,) rows for experts [lo, hi) of each rank
        recv_c = [sum(row[lo:hi]) for row in recv_host]  # (W,) rows each rank sends to my experts [lo, hi)
        rows_c = order[start:start + sum(send_c)]  # (P_c,) grouped rows of this chunk
        start += sum(send_c)
        gather_c = gather[rows_c]  # (P_c,) their tokens
        x_recv, x_pending = all_to_all_start(x[gather_c], recv_c, send_c, group)  # (P_recv_c, d) in flight
        s_recv, s_pending = all_to_all_start(scores[rows_c], recv_c, send_c, group)  # (P_recv_c,) in flight
        chunk.append(dict(lo=lo, hi=hi, rows=rows_c, gather=gather_c, send=send_c, recv=recv_c,
                          x=(x_recv, x_pending), s=(s_recv, s_pending)))
    lap("dispatch")

    # 4. Chunk by chunk: wait for its rows, run its experts (later chunks still in flight), and
    # launch its combine at once.
    combines = []
    for c in chunk:
        lo, hi = c["lo"], c["hi"]
        x_recv, s_recv = all_to_all_wait(*c.pop("x")), all_to_all_wait(*c.pop("s"))
        y_recv = _experts_without_caching_rows(x, c["gather"], x_recv, s_recv, recv_counts[:, lo:hi], c["recv"],
                                               c["send"], w1[lo:hi], w2[lo:hi], group, kw)  # (P_recv_c, d)
        del x_recv
        combines.append(all_to_all_start(y_recv, c["send"], c["recv"], group))  # (P_c, d) in flight
        del y_recv
    lap("experts")

    # 5. Wait for the combines and put the returned rows back in grouped order.
    y_sorted = torch.cat([all_to_all_wait(y, pending) for y, pending in combines])  # (P_r, d), chunk order
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=order.device)
    return y_sorted[inverse]  # (P_r, d), grouped order


class ExpertParallelMoE(nn.Module):
    """``sonic_learn.MoE`` with its experts split over the ranks of a process group.

    Args: as ``sonic_learn.MoE``, plus ``group`` (the EP process group; None = the default group)
    and ``chunks`` (overlap communication with the experts in that many chunks, capped at E/W; see
    ``expert_parallel_forward``; the default 1 is the plain, non-overlapped layer).
    This rank holds ``router_w`` (d, E), replicated, and its experts ``w1`` (E/W, d, 2n),
    ``w2`` (E/W, n, d): experts ``rank*E/W ... (rank+1)*E/W - 1``. Build it with the same seed on
    every rank, or with ``ExpertParallelMoE.from_module(moe, group)`` from a single-GPU layer.
    After ``loss.backward()``, call ``all_reduce_router_grad()`` (see the module docstring).
    """

    def __init__(self, d_model: int, d_expert: int, num_experts: int, top_k: int, *, group=None,
                 routing: str = "topk", tile_m: int = 128, backward: str = "reduced_memory",
                 backend: str = "reference", chunks: int = 1, device=None, dtype=None):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs torch.distributed initialised first")
        W = dist.get_world_size(group)
        for name, v in (("d_model", d_model), ("d_expert", d_expert), ("num_experts", num_experts)):
            _checks.check_int_range(name, v, 1)
        _checks.check_int_range("top_k", top_k, 1, num_experts, "the number of experts num_experts")
        if num_experts % W:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the process group's world size "
                             f"({W}): each rank owns num_experts / world_size experts")
        _checks.check_choice("routing", routing, contracts.ROUTINGS)
        _checks.check_choice("backward", backward, contracts.BACKWARD_MODES)
        _checks.check_choice("backend", backend, BACKENDS)
        _checks.check_int_range("chunks", chunks, 1, what="the number of groups of local experts to overlap")
        self.chunks = chunks
        self.group, self.world_size, self.rank = group, W, dist.get_rank(group)
        self.d_model, self.d_expert, self.num_experts, self.top_k = d_model, d_expert, num_experts, top_k
        self.routing, self.tile_m, self.backward, self.backend = routing, tile_m, backward, backend
        self.experts_per_rank = num_experts // W
        kw = {"device": device, "dtype": dtype}
        self.router_w = nn.Parameter(torch.empty(d_model, num_experts, **kw))
        self.w1 = nn.Parameter(torch.empty(self.experts_per_rank, d_model, 2 * d_expert, **kw))
        self.w2 = nn.Parameter(torch.empty(self.experts_per_rank, d_expert, d_model, **kw))
        with torch.no_grad():
            self.router_w.normal_(std=1 / math.sqrt(d_model))
            self.w1.normal_(std=1 / math.sqrt(d_model))
            self.w2.normal_(std=1 / math.sqrt(d_expert))
        self.check_router_replicated()
        self.last_times: StepTimes | None = None

    @classmethod
    def from_module(cls, moe: nn.Module, group=None, *, chunks: int = 1) -> ExpertParallelMoE:
        """This rank's share of a single-GPU ``sonic_learn.MoE`` (same config, same weights)."""
        p = moe.router_w
        ep = cls(moe.d_model, moe.d_expert, moe.num_experts, moe.top_k, group=group, routing=moe.routing,
                 tile_m=moe.tile_m, backward=moe.backward, backend=moe.backend, chunks=chunks,
                 device=p.device, dtype=p.dtype)
        lo = ep.rank * ep.experts_per_rank
        with torch.no_grad():
            ep.router_w.copy_(moe.router_w)
            ep.w1.copy_(moe.w1[lo:lo + ep.experts_per_rank])
            ep.w2.copy_(moe.w2[lo:lo + ep.experts_per_rank])
        ep.check_router_replicated()
        return ep

    def check_router_replicated(self) -> None:
        """Raise if ``router_w`` differs across the group (a cheap checksum, one all-gather)."""
        local = torch.stack([self.router_w.detach().double().sum(), self.router_w.detach().double().square().sum()])
        everyone = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(everyone, local, group=self.group)
        if not all(torch.equal(e, local) for e in everyone):
            raise ValueError("router_w differs across the ranks of the expert-parallel group: it must be "
                             "replicated (same seed on every rank, or ExpertParallelMoE.from_module)")

    def all_reduce_router_grad(self) -> None:
        """Sum ``router_w.grad`` over the group (each rank saw only its own tokens)."""
        if self.router_w.grad is not None:
            dist.all_reduce(self.router_w.grad, op=dist.ReduceOp.SUM, group=self.group)

    def forward(self, x: torch.Tensor, *, time_steps: bool = False) -> torch.Tensor:
        """x (..., d) -> (..., d), this rank's tokens."""
        _checks.check_tensor("x", x)
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dim d_model={self.d_model}, got shape {tuple(x.shape)}")
        times = StepTimes() if time_steps else None
        out = expert_parallel_forward(x.reshape(-1, self.d_model), self.router_w, self.w1, self.w2, self.top_k,
                                      group=self.group, routing=self.routing, tile_m=self.tile_m,
                                      backward=self.backward, backend=self.backend, chunks=self.chunks,
                                      times=times)
        self.last_times = times
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_expert={self.d_expert}, num_experts={self.num_experts} "
                f"({self.experts_per_rank} on rank {self.rank} of {self.world_size}), top_k={self.top_k}, "
                f"routing={self.routing!r}, backward={self.backward!r}, backend={self.backend!r}, chunks={self.chunks}")


def time_steps(layer: ExpertParallelMoE, x: torch.Tensor, *, reps: int = 5, warmup: int = 2) -> dict:
    """Median seconds of each forward step and of forward+backward over ``reps`` runs (after
    ``warmup``), on this rank. Steps are separated by device synchronisation, so the sum is a little
    slower than an unsynchronised forward: use it to see where the time goes, not as the layer's time."""
    runs = []
    for i in range(warmup + reps):
        xi = x.detach().requires_grad_(True)
        t0 = time.perf_counter()
        out = layer(xi, time_steps=True)
        out.float().square().mean().backward()
        _sync(x.device)
        total = time.perf_counter() - t0
        if i >= warmup:
            s = layer.last_times
            runs.append({"route": s.route, "dispatch": s.dispatch, "experts": s.experts, "combine": s.combine,
                         "fwd_bwd": total, "rows_sent": s.rows_sent, "rows_received": s.rows_received})
    return {key: sorted(r[key] for r in runs)[len(runs) // 2] for key in runs[0]}
