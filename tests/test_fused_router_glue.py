"""``fused_glue=True`` (the layer's default) of the token-rounding router step: its kernels compile, and on a GPU
it gives the default path's routing bit for bit.

``fused_glue=True`` (``fast.moe.route`` / ``route_layer``, ``fast.routing.token_rounding`` and
``build_metadata``) moves the torch glue between the CuTe launches into the kernels: the padded
triples, the rounding counts and the token offsets (``PaddedTriplesKernel``, in the token-rounding
compiled call) and the padded metadata's initialization (``RoutingMetadataKernel(fill_padding=True)``).
The glue and the launch count are checked on the CPU with torch stand-ins for the kernels
(``tests/test_router_launches.py``); the kernels themselves only here:

* compile tests (CPU, marker ``compile``): the five kernels of the token-rounding triples call and
  the metadata kernels with the padding fill compile for sm_90a, with no register spills; the
  triples kernels read the keep mask with 16-byte loads, and the select kernel with a staged row
  reads its passes from shared memory;
* GPU tests (marker ``gpu``): the fused step equals the default step exactly (metadata, the scores'
  bits, token offsets, rounding counts, the gradients), stays free of host syncs, and replays from
  a CUDA graph. Run on a Hopper GPU: ``python3 -m pytest -q -p no:cacheprovider tests/test_fused_router_glue.py``.
"""

from __future__ import annotations

import re

import pytest
import torch

from sonic_learn.fast._cute import cutlass_available, fast_available  # pins sm_90a before cutlass loads

_ok, _why = cutlass_available()
if not _ok:
    pytest.skip(_why, allow_module_level=True)

from sonic_learn.fast import moe as fast_moe  # noqa: E402
from sonic_learn.fast import routing as fast  # noqa: E402
from sonic_learn.reference import routing as ref  # noqa: E402

FAST_OK, FAST_WHY = fast_available()
needs_hopper = pytest.mark.skipif(not FAST_OK, reason=f"fast path unavailable: {FAST_WHY}")


def _entries(ptx: str) -> list[str]:
    return re.findall(r"^\.visible \.entry (\w+)\(", ptx, re.MULTILINE)


# ---------------------------------------------------------------------------------------------
# Compile (CPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.compile
def test_token_rounding_triples_kernels_compile_for_sm90a(tmp_path):
    ptx = fast.compile_token_rounding_triples_kernels(extra_options=f"--keep-ptx --dump-dir={tmp_path}").__ptx__
    assert re.search(r"^\.target sm_90a\b", ptx, re.MULTILINE), "PTX must target sm_90a"
    assert ".local" not in ptx, "a kernel spills registers to local memory"
    entries = _entries(ptx)
    names = ("BoundaryKeysKernel", "BoundarySelectKernel", "count_kernel", "scan_kernel", "write_kernel")
    assert len(entries) == len(names), entries
    for name in names:
        assert any(name in entry for entry in entries), f"missing kernel {name} in {entries}"
    assert "vote.sync.ballot" in ptx, "the select kernel ranks tied keys with warp ballots"
    assert "shfl.sync.up" in ptx, "the tile scan uses warp shuffles"
    kernels = dict(zip(entries, re.split(r"^\.visible \.entry \w+\(", ptx, flags=re.MULTILINE)[1:]))
    for name in ("count_kernel", "write_kernel"):  # they stream the keep mask in 16-byte words
        body = next(body for entry, body in kernels.items() if name in entry)
        loads = re.findall(r"ld\.global(?:\.nc)?\.v4\.b32", body)
        assert len(loads) == fast.WORDS_IN_FLIGHT, f"{name}: {len(loads)} 16-byte keep loads"


@pytest.mark.compile
def test_the_select_kernel_with_a_staged_row_reads_shared_memory(tmp_path):
    """``stage_keys``: the select kernel copies its row's selection keys into shared memory once
    (one global load per key of a sub-block, counting the first radix pass on the way), then the
    other radix passes and the collect read shared memory."""
    def select_body(stage_keys):
        (tmp_path / str(stage_keys)).mkdir()
        ptx = fast.compile_token_rounding_triples_kernels(
            stage_keys, extra_options=f"--keep-ptx --dump-dir={tmp_path / str(stage_keys)}").__ptx__
        assert re.search(r"^\.target sm_90a\b", ptx, re.MULTILINE) and ".local" not in ptx
        entries = _entries(ptx)
        assert len(entries) == 5, entries
        bodies = dict(zip(entries, re.split(r"^\.visible \.entry \w+\(", ptx, flags=re.MULTILINE)[1:]))
        return next(body for entry, body in bodies.items() if "BoundarySelectKernel" in entry)

    plain, staged = select_body(0), select_body(max(fast.SELECT_STAGE_KEYS))
    row_reads = (32 // fast.RADIX_BITS + 2) * fast.SELECT_UNROLL  # key loads of four radix passes and two collects
    global_loads = [len(re.findall(r"ld\.global", body)) for body in (plain, staged)]
    shared_loads = [body.count("ld.shared") for body in (plain, staged)]
    assert global_loads[0] - global_loads[1] == row_reads - fast.SELECT_UNROLL, global_loads  # the staging pass left
    assert shared_loads[1] - shared_loads[0] == row_reads - fast.SELECT_UNROLL, shared_loads  # pass 0 while staging
    with pytest.raises(ValueError, match="stage_keys"):
        fast.compile_token_rounding_triples_kernels(1000)


def test_the_select_stage_is_the_smallest_that_holds_the_row():
    stages = fast.SELECT_STAGE_KEYS
    assert [fast._select_stage_keys(T) for T in (1, stages[0], stages[0] + 1, stages[-1], stages[-1] + 1, 70_000)] == [
        stages[0], stages[0], stages[1], stages[-1], 0, 0]
    assert fast._select_stage_keys(24576) == 24576  # the 7B router's T: 96 KiB, shared memory for two CTAs per SM
    assert stages[-1] * 4 <= 200 * 1024, "a staged row must leave room in the 227 KiB of shared memory of a Hopper CTA"


@pytest.mark.compile
def test_metadata_kernels_with_the_padding_fill_compile_for_sm90a(tmp_path):
    ptx = fast.compile_metadata_kernel(128, True, True, extra_options=f"--keep-ptx --dump-dir={tmp_path}").__ptx__
    assert re.search(r"^\.target sm_90a\b", ptx, re.MULTILINE) and ".local" not in ptx
    assert len(_entries(ptx)) == 4, _entries(ptx)
    with pytest.raises(ValueError, match="fill_padding=True needs scatter=True"):
        fast.compile_metadata_kernel(128, False, True)


def test_fused_glue_must_be_a_bool():
    with pytest.raises(TypeError, match="fused_glue"):
        fast.token_rounding(torch.zeros(4, 8), 2, fused_glue=1)


def test_the_layer_checks_fused_glue_before_any_launch(monkeypatch):
    """``moe_forward(fused_glue=...)`` names the argument; the check runs before the router."""
    monkeypatch.setattr(fast_moe, "check_inputs", lambda *a, **k: None)  # CPU tensors pass the device check
    monkeypatch.setattr(fast_moe, "route_layer", lambda *a, **k: pytest.fail("routed before checking fused_glue"))
    x, w = torch.zeros(4, 8), torch.zeros(8, 4)
    with pytest.raises(TypeError, match="fused_glue"):
        fast_moe.moe_forward(x, w, torch.zeros(4, 8, 16), torch.zeros(4, 8, 8), 2, routing="token_rounding",
                             fused_glue="yes")


# ---------------------------------------------------------------------------------------------
# GPU: the fused step is the default step, bit for bit
# ---------------------------------------------------------------------------------------------
CASES = [  # T, d, E, K, tile_m, mode, scoring, normalize
    (24576, 256, 128, 8, 128, "nearest", "softmax_topk", False),  # the 7B router's shape (d smaller)
    (16384, 128, 128, 2, 128, "up", "topk_softmax", False),
    (4096, 64, 2048, 8, 128, "down", "softmax_topk", False),  # E = MAX_EXPERTS: many empty experts, dropped tokens
    (3000, 64, 64, 4, 64, "stochastic", "topk_softmax", True),
    (1, 64, 8, 2, 16, "nearest", "softmax_topk", False),  # one token: rounds to nothing
    (70_000, 64, 16, 1, 64, "up", "softmax_topk", False),  # long token tiles
    (300, 64, 24, 3, 1, "nearest", "softmax_topk", False),  # tile 1: no rounding, no padding
    # several tokens per tile, rows of 40 bytes (16-byte words straddle tokens and tiles), and a
    # keep mask of T * E = 200040 bytes (its last 16-byte word is partial: byte loads)
    (5001, 64, 40, 3, 32, "stochastic", "softmax_topk", False),
    (45_000, 64, 32, 2, 128, "down", "topk_softmax", False),  # the largest staged select row (192 KiB of smem)
]


def _route(x, w, K, fused_glue, tile_m, mode, scoring, normalize, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed) if mode == "stochastic" else None
    return fast_moe.route_layer(x, w, K, routing="token_rounding", tile_m=tile_m, rounding_mode=mode, scoring=scoring,
                                normalize=normalize, generator=gen, fused_glue=fused_glue)[0]


def assert_same_step(got: fast_moe.DeviceRouting, want: fast_moe.DeviceRouting) -> None:
    for name in ("expert_counts", "expert_offsets", "gather_idx", "pair_of_row", "row_of_pair"):
        a, b = getattr(got.meta, name), getattr(want.meta, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(got.scores.view(torch.int32), want.scores.view(torch.int32)), "scores differ in their bits"
    assert got.token_offsets.dtype == want.token_offsets.dtype and torch.equal(got.token_offsets, want.token_offsets)
    for name in ("kept_pairs", "dropped_pairs", "added_pairs", "dropped_tokens"):
        a, b = getattr(got.rounding, name), getattr(want.rounding, name)
        assert a.shape == b.shape == () and a.dtype == b.dtype and int(a) == int(b), name
    assert got.padded and want.padded


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("T, d, E, K, tile_m, mode, scoring, normalize", CASES)
def test_fused_glue_equals_the_default_step(T, d, E, K, tile_m, mode, scoring, normalize):
    g = torch.Generator(device="cuda").manual_seed(T + E)
    x = torch.randn(T, d, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(d, E, device="cuda", generator=g) / d**0.5).to(torch.bfloat16)
    runs = []
    for fused_glue in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (x, w)]
        r = _route(*leaves, K, fused_glue, tile_m, mode, scoring, normalize, seed=5)
        gout = torch.rand(r.scores.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        (r.scores * gout).sum().backward()
        runs.append((r, leaves))
    (want, want_leaves), (got, got_leaves) = runs
    assert_same_step(got, want)
    for a, b in zip(got_leaves, want_leaves):
        assert torch.equal(a.grad, b.grad), "the gradients through the scores differ"


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("fused_glue", [True, False])
@pytest.mark.parametrize("T, d, E, K, tile_m, mode, scoring, normalize", CASES)
def test_the_scores_backward_kernel_is_as_close_to_float64_as_the_reference(monkeypatch, T, d, E, K, tile_m, mode,
                                                                           scoring, normalize, fused_glue):
    """``ScoresBackwardKernel`` (the weights' backward of both glues, where it fits): the logits'
    gradient against the float64 oracle at the same pairs, at most twice as far as the reference's
    own (torch's softmax backwards on the reference's graph), entry-wise at worst and in norm."""
    from test_router_launches import _oracle_logits_grad, assert_within_twice_the_references_error

    calls = []
    real = fast._scores_backward_kernel
    monkeypatch.setattr(fast, "_scores_backward_kernel", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator(device="cuda").manual_seed(T + E + 7)
    x = torch.randn(T, d, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(d, E, device="cuda", generator=g) / d**0.5).to(torch.bfloat16)
    r = _route(x, w.requires_grad_(True), K, fused_glue, tile_m, mode, scoring, normalize, seed=5)
    r.logits.retain_grad()
    gout = torch.randn(r.scores.shape, device="cuda", generator=g)
    (r.scores * gout).sum().backward()
    assert len(calls) == (0 if normalize else 1), "the kernel runs exactly where it fits"
    logits = r.logits.detach().clone().requires_grad_(True)
    gen = torch.Generator(device="cuda").manual_seed(5) if mode == "stochastic" else None
    want = ref.token_rounding(logits, K, tile_m=tile_m, mode=mode, generator=gen, scoring=scoring, normalize=normalize,
                              pad_to_bound=True)
    assert torch.equal(want.scores.view(torch.int32), r.scores.view(torch.int32)), "not the same routing"
    (want.scores * gout).sum().backward()
    exact = _oracle_logits_grad(logits.detach(), want, K, scoring, normalize, gout)
    assert_within_twice_the_references_error(r.logits.grad, logits.grad, exact)


@pytest.mark.compile
def test_the_scores_backward_kernel_compiles_for_sm90a(tmp_path):
    for separate_picks in (True, False):
        ptx = fast.compile_scores_backward_kernel(
            separate_picks, extra_options=f"--keep-ptx --dump-dir={tmp_path}").__ptx__
        assert re.search(r"^\.target sm_90a\b", ptx, re.MULTILINE) and ".local" not in ptx
        assert len(_entries(ptx)) == 1, _entries(ptx)
        # softmax_topk finds each pair's pick with ballots; topk_softmax has no picks to find
        assert ("vote.sync.ballot" in ptx) == separate_picks


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("backward", ["reduced_memory", "standard"])
def test_the_layer_with_fused_glue_equals_the_default_layer(backward):
    """``moe_forward(fused_glue=True)``: the same routing, so the same output and gradients, bit for bit."""
    T, d, n, E, K = 2048, 256, 128, 32, 4
    g = torch.Generator(device="cuda").manual_seed(3)
    base = [torch.randn(T, d, device="cuda", generator=g), torch.randn(d, E, device="cuda", generator=g) / d**0.5,
            torch.randn(E, d, 2 * n, device="cuda", generator=g) / d**0.5,
            torch.randn(E, n, d, device="cuda", generator=g) / n**0.5]
    gout = torch.randn(T, d, device="cuda", generator=g).to(torch.bfloat16)
    results = []
    for fused_glue in (False, True):
        leaves = [t.to(torch.bfloat16).requires_grad_(True) for t in base]
        out = fast_moe.moe_forward(*leaves, K, routing="token_rounding", tile_m=128, backward=backward,
                                   fused_glue=fused_glue)
        out.backward(gout)
        results.append([out.detach()] + [t.grad for t in leaves])
    for name, a, b in zip(("out", "dx", "drouter_w", "dw1", "dw2"), *results):
        assert torch.isfinite(a).all() and torch.equal(a, b), name


@pytest.mark.gpu
@needs_hopper
def test_fused_glue_has_no_host_sync_and_replays_from_a_cuda_graph():
    T, d, E, K = 4096, 128, 64, 8
    x = torch.randn(T, d, device="cuda").to(torch.bfloat16)
    w = (torch.randn(d, E, device="cuda") / d**0.5).to(torch.bfloat16)
    _route(x, w, K, True, 128, "nearest", "softmax_topk", False, 0)  # warm up (JIT compiles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _route(x, w, K, True, 128, "nearest", "softmax_topk", False, 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _route(static_x, w, K, True, 128, "nearest", "softmax_topk", False, 0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _route(static_x, w, K, True, 128, "nearest", "softmax_topk", False, 0)
    new_x = torch.randn(T, d, device="cuda").to(torch.bfloat16)  # another routing, another P
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    assert_same_step(captured, _route(new_x, w, K, False, 128, "nearest", "softmax_topk", False, 0))
