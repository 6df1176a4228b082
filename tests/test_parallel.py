"""Expert parallelism agrees with the single-process layer: output and every gradient.

Each test launches W gloo processes on this CPU (``sonic_learn.parallel.launch``, with a time limit
so a hang fails). Every rank builds the same global weights and inputs from one seed, runs its share
through ``ExpertParallelMoE`` and compares with the single-process layer
(``sonic_learn.reference.moe.moe_forward``) applied to its shard with *all* experts, in float64.

Token rounding rounds on the home rank (each rank rounds its own count per expert), so the
single-process oracle is the layer applied shard by shard; for top-k that equals one call on all
tokens, which the top-k case checks too.
"""

from __future__ import annotations

import contextlib
import gc
import time
import weakref

import pytest
import torch
import torch.distributed as dist

from sonic_learn.parallel import ExpertParallelMoE, launch
from sonic_learn.parallel import moe as ep_moe
from sonic_learn.reference.moe import moe_forward

T_PER_RANK, D, N, K, TILE = 24, 16, 8, 2, 4
TOL = 1e-10  # float64 on both sides: only the summation order differs


def _problem(world: int, E: int, case: str, seed: int = 0):
    """Global weights and per-rank inputs, the same on every rank (one seed)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    router_w = torch.randn(D, E, generator=g, dtype=f64) / D**0.5
    w1 = torch.randn(E, D, 2 * N, generator=g, dtype=f64) / D**0.5
    w2 = torch.randn(E, N, D, generator=g, dtype=f64) / N**0.5
    tokens = [T_PER_RANK] * world
    if case == "empty_rank_tokens":
        tokens[0] = 0  # rank 0 has no tokens at all: it only serves its experts
    xs = [torch.randn(t, D, generator=g, dtype=f64) for t in tokens]
    grads = [torch.randn(t, D, generator=g, dtype=f64) for t in tokens]
    E_local = E // world
    if case == "idle_rank":  # no token picks the last rank's experts: that rank receives nothing
        xs = [x.abs() + 0.1 for x in xs]
        router_w = router_w.abs()
        router_w[:, E - E_local:] = -router_w[:, E - E_local:] - 1.0
    if case == "idle_expert":  # expert 1 is never picked
        xs = [x.abs() + 0.1 for x in xs]
        router_w = router_w.abs()
        router_w[:, 1] = -1.0
    return router_w, w1, w2, xs, grads


def _oracle(router_w, w1, w2, xs, grads, routing, backward_unused=None):
    """The single-process layer, shard by shard, all experts; float64 autograd."""
    rw, W1, W2 = (t.clone().requires_grad_(True) for t in (router_w, w1, w2))
    xs = [x.clone().requires_grad_(True) for x in xs]
    loss = 0.0
    outs = []
    for x, g in zip(xs, grads):
        out = moe_forward(x, rw, W1, W2, K, routing=routing, tile_m=TILE, backward="standard")
        outs.append(out.detach())
        loss = loss + (out * g).sum()
    loss.backward()
    return outs, [x.grad for x in xs], rw.grad, W1.grad, W2.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item() if b.numel() else 0.0
    return (a - b).abs().max().item() / max(scale, 1e-30) if a.numel() else 0.0


def _agreement(rank: int, world: int, cases: list[tuple], E: int) -> list[tuple]:
    """Runs on every rank: for each (case, routing, backward, chunks) the worst relative error of out,
    dx, d router_w, dw1, dw2 against the oracle, plus how many rows this rank received."""
    report = []
    for case, routing, backward, chunks in cases:
        router_w, w1, w2, xs, grads = _problem(world, E, case)
        ref_out, ref_dx, ref_drw, ref_dw1, ref_dw2 = _oracle(router_w, w1, w2, xs, grads, routing)
        E_local = E // world
        lo = rank * E_local
        torch.manual_seed(0)  # the constructor checks that the router starts replicated
        layer = ExpertParallelMoE(D, N, E, K, routing=routing, tile_m=TILE, backward=backward, chunks=chunks,
                                  dtype=torch.float64)
        with torch.no_grad():
            layer.router_w.copy_(router_w)
            layer.w1.copy_(w1[lo:lo + E_local])
            layer.w2.copy_(w2[lo:lo + E_local])
        x = xs[rank].clone().requires_grad_(True)
        out = layer(x, time_steps=True)
        (out * grads[rank]).sum().backward()
        layer.all_reduce_router_grad()
        errs = (
            _rel(out.detach(), ref_out[rank]),
            _rel(x.grad, ref_dx[rank]) if x.numel() else 0.0,
            _rel(layer.router_w.grad, ref_drw),
            _rel(layer.w1.grad, ref_dw1[lo:lo + E_local]),
            _rel(layer.w2.grad, ref_dw2[lo:lo + E_local]),
        )
        report.append((case, routing, backward, chunks, errs, layer.last_times.rows_received))
    return report


PLAIN_CASES = [
    ("random", "topk", "reduced_memory"),
    ("random", "topk", "standard"),
    ("random", "token_rounding", "reduced_memory"),
    ("random", "token_rounding", "standard"),
    ("idle_rank", "topk", "reduced_memory"),
    ("idle_expert", "topk", "reduced_memory"),
    ("idle_expert", "token_rounding", "standard"),
    ("empty_rank_tokens", "topk", "reduced_memory"),
]
# The overlapped layer (chunks > 1): each (E_local = 3) is split into 2 uneven chunks, into E_local
# chunks of one expert, and asked for more chunks than experts (capped at E_local). "idle_expert"
# never picks expert 1: with chunks=3 rank 0's chunk 1 receives nothing, with chunks=2 it shares
# chunk 1 with expert 2; "idle_rank" leaves the last rank with no rows in any chunk.
CHUNKED_CASES = [
    ("random", "topk", "reduced_memory", 2),
    ("random", "token_rounding", "standard", 2),
    ("random", "topk", "standard", 3),
    ("random", "token_rounding", "reduced_memory", 3),
    ("idle_rank", "topk", "reduced_memory", 3),
    ("idle_expert", "token_rounding", "reduced_memory", 2),
    ("idle_expert", "topk", "standard", 3),
    ("empty_rank_tokens", "topk", "reduced_memory", 7),
]
EXPERTS_PER_RANK = 3  # odd, so that two chunks are uneven


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_single_process(world: int) -> None:
    """chunks=1 (the plain layer) and chunks > 1 (the overlapped one) both equal the oracle."""
    E = EXPERTS_PER_RANK * world
    cases = [(*c, 1) for c in PLAIN_CASES] + CHUNKED_CASES
    reports = launch(_agreement, world, cases, E, timeout_s=240)
    for rank, report in enumerate(reports):
        assert [r[:4] for r in report] == cases  # every case ran on every rank
        for case, routing, backward, chunks, errs, rows_received in report:
            names = ("out", "dx", "d router_w", "dw1", "dw2")
            for name, err in zip(names, errs):
                assert err <= TOL, (f"W={world} rank {rank} {case}/{routing}/{backward}/chunks={chunks}: "
                                    f"{name} rel err {err:.2e}")
            if case == "idle_rank" and rank == world - 1:
                assert rows_received == 0, "the idle rank should have received no rows"
    # the uneven cases really were uneven: somebody received rows while the idle rank got none
    idle = [r[5] for rep in reports for r in rep if r[0] == "idle_rank"]
    assert max(idle) > 0 and min(idle) == 0


def test_topk_shards_equal_one_call_on_all_tokens() -> None:
    """For top-k, the shard-by-shard oracle is the single-process layer on all tokens at once."""
    router_w, w1, w2, xs, grads = _problem(2, 4, "random")
    outs, *_ = _oracle(router_w, w1, w2, xs, grads, "topk")
    whole = moe_forward(torch.cat(xs), router_w, w1, w2, K, tile_m=TILE)
    assert torch.allclose(torch.cat(outs), whole, rtol=0, atol=1e-12)


def _saved_rows(rank: int, world: int, backward: str, planted_bug: bool = False, chunks: int = 1) -> bool:
    """Whether any rows of X received in the dispatch are still alive after the forward.
    ``planted_bug``: run without the hook that resends them (so the experts cache them).
    With ``chunks`` = E_local = 2, each chunk's dispatch is watched."""
    E = 2 * world
    router_w, w1, w2, xs, grads = _problem(world, E, "random")
    received = []  # X's dispatches: the first 2-D all-to-all(s) of the forward, one per chunk
    pending = []  # every started all-to-all: each must have been waited for by the end of the forward
    original, original_start = ep_moe.AllToAll.apply, ep_moe.all_to_all_start

    def spy(rows, recv_splits, send_splits, group):
        out = original(rows, recv_splits, send_splits, group)
        if out.dim() == 2 and not received:
            received.append(weakref.ref(out))
        return out

    def spy_start(rows, recv_splits, send_splits, group):
        out, handle = original_start(rows, recv_splits, send_splits, group)
        if out.dim() == 2 and len(received) < chunks:  # every dispatch is launched before any combine
            received.append(weakref.ref(out))
        pending.append(handle)
        return out, handle

    ep_moe.AllToAll.apply, ep_moe.all_to_all_start = spy, spy_start
    hook = ep_moe._resend_instead_of_saving
    if planted_bug:
        ep_moe._resend_instead_of_saving = lambda rows, resend: contextlib.nullcontext()
    try:
        torch.manual_seed(0)
        layer = ExpertParallelMoE(D, N, E, K, backward=backward, tile_m=TILE, chunks=chunks, dtype=torch.float64)
        x = xs[rank].clone().requires_grad_(True)
        out = layer(x)
    finally:
        ep_moe.AllToAll.apply, ep_moe.all_to_all_start = original, original_start
        ep_moe._resend_instead_of_saving = hook
    gc.collect()
    assert len(received) == chunks
    # gloo's small transfers land before they are read even without a wait; NCCL's would not
    assert all(h.work is None for h in pending), "an all-to-all was started but never waited for"
    assert len(pending) == (0 if chunks == 1 else 3 * chunks)  # per chunk: X, scores, combine
    alive = any(ref() is not None for ref in received)
    out.sum().backward()  # the backward still works (it sends the rows again in reduced-memory mode)
    return alive


def _bad_inputs(rank: int, world: int) -> list[str]:
    messages = []
    try:
        ExpertParallelMoE(D, N, 3, 1)  # 3 experts over 2 ranks
    except ValueError as exc:
        messages.append(str(exc))
    torch.manual_seed(rank)  # a different seed on each rank: the router is not replicated
    try:
        ExpertParallelMoE(D, N, 4, 2)
    except ValueError as exc:
        messages.append(str(exc))
    torch.manual_seed(0)
    layer = ExpertParallelMoE(D, N, 4, 2)
    try:
        ep_moe.expert_parallel_forward(torch.randn(5, D), layer.router_w, layer.w1[:1], layer.w2[:1], 2)
    except ValueError as exc:
        messages.append(str(exc))
    for bad in (0, 1.5):
        try:
            ep_moe.expert_parallel_forward(torch.randn(5, D), layer.router_w, layer.w1, layer.w2, 2, chunks=bad)
        except (ValueError, TypeError) as exc:
            messages.append(str(exc))
    try:
        ExpertParallelMoE(D, N, 4, 2, chunks=-1)
    except ValueError as exc:
        messages.append(str(exc))
    return messages


def _memory_and_errors(rank: int, world: int) -> dict:
    """One launch for the checks that need a group but no oracle (process start-up is the cost)."""
    return {"alive": {"reduced_memory": _saved_rows(rank, world, "reduced_memory"),
                      "planted: no resend hook": _saved_rows(rank, world, "reduced_memory", planted_bug=True),
                      "chunks=2": _saved_rows(rank, world, "reduced_memory", chunks=2),
                      "chunks=2, planted: no resend hook": _saved_rows(rank, world, "reduced_memory",
                                                                        planted_bug=True, chunks=2)},
            "errors": _bad_inputs(rank, world)}


@pytest.fixture(scope="module")
def two_rank_checks() -> list[dict]:
    return launch(_memory_and_errors, 2, timeout_s=180)


def test_reduced_memory_caches_no_received_rows(two_rank_checks) -> None:
    """Reduced memory keeps no (P, d) tensor: the dispatched rows of X die with the forward. The
    control plants the bug (no resend hook: the experts cache the rows) and sees them alive."""
    for report in two_rank_checks:
        assert report["alive"] == {"reduced_memory": False, "planted: no resend hook": True,
                                   "chunks=2": False, "chunks=2, planted: no resend hook": True}


def test_bad_input_gets_clear_errors(two_rank_checks) -> None:
    for report in two_rank_checks:
        messages = report["errors"]
        assert len(messages) == 6, messages
        assert "num_experts (3) must be divisible" in messages[0]
        assert "router_w differs across the ranks" in messages[1]
        assert "E_local" in messages[2] and "world size (2)" in messages[2]
        assert "chunks must satisfy 1 <= chunks" in messages[3] and "got 0" in messages[3]
        assert "chunks must be an int, got float" in messages[4]
        assert "chunks must satisfy 1 <= chunks" in messages[5] and "got -1" in messages[5]


def test_needs_an_initialised_process_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        ExpertParallelMoE(D, N, 4, 2)


def _hang(rank: int, world: int) -> None:
    if rank == 0:
        dist.barrier()  # rank 1 never joins
    else:
        time.sleep(300)  # alive but elsewhere (had it exited, gloo would fail rank 0's barrier at once)


def test_a_hang_fails_instead_of_blocking() -> None:
    with pytest.raises(TimeoutError, match="did not finish"):
        launch(_hang, 2, timeout_s=10)


def test_alltoall_bytes_model() -> None:
    # 2*T*K*d elements, less the local share 1/W: T=1000, K=2, d=8, bf16, W=4 -> 2*1000*2*8*2*3/4
    assert ep_moe.alltoall_bytes(1000, 2, 8, 4, 2) == 48000
    assert ep_moe.alltoall_bytes(1000, 2, 8, 1, 2) == 0


def _fast_agreement(rank: int, world: int) -> float:
    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    T, d, n, E, k = 512, 256, 128, 8 * world, 4
    dev = torch.device("cuda", rank)
    g = torch.Generator(device="cpu").manual_seed(0)
    router_w = (torch.randn(d, E, generator=g) / d**0.5).to(dev, torch.bfloat16)
    w1 = (torch.randn(E, d, 2 * n, generator=g) / d**0.5).to(dev, torch.bfloat16)
    w2 = (torch.randn(E, n, d, generator=g) / n**0.5).to(dev, torch.bfloat16)
    xs = [torch.randn(T, d, generator=g).to(dev, torch.bfloat16) for _ in range(world)]
    E_local = E // world
    lo = rank * E_local
    out = ep_moe.expert_parallel_forward(xs[rank], router_w, w1[lo:lo + E_local].contiguous(),
                                         w2[lo:lo + E_local].contiguous(), k, backend="fast")
    ref = moe_forward(xs[rank].double(), router_w.double(), w1.double(), w2.double(), k)
    return _rel(out.double(), ref)


@pytest.mark.gpu
def test_fast_backend_one_gpu_nccl() -> None:
    """The fast experts under EP with NCCL on one GPU (world size 1), bf16 vs a float64 oracle."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    (err,) = launch(_fast_agreement, 1, backend="nccl", timeout_s=300)
    assert err < 2e-2, err


@pytest.mark.gpu
def test_fast_backend_several_gpus_nccl() -> None:
    """The same on every GPU of the machine (2+), NCCL, NVLink multicast off."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two or more CUDA GPUs")
    import os

    os.environ["NCCL_NVLS_ENABLE"] = "0"
    errs = launch(_fast_agreement, min(torch.cuda.device_count(), 8), backend="nccl", timeout_s=300)
    assert max(errs) < 2e-2, errs


def test_demo_cli_rejects_bad_arguments_before_launching(capsys) -> None:
    from sonic_learn.parallel.demo import main

    for argv, message in ((["-E", "3", "-W", "2"], "must be a multiple of --world-size"),
                          (["-K", "9", "-E", "8"], "--top-k (9) must be <= --experts (8)"),
                          (["-T", "0"], "--tokens must be >= 1"),
                          (["--chunks", "0"], "--chunks must be >= 1")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
