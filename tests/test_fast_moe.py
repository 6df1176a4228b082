"""GPU tests of the fast MoE layer (marker ``gpu``): kernels and the whole layer against float64 oracles.

Tolerance rule (teaching-anchors / grouped-GEMM issue): on O(1)-scaled inputs, the fast result's
error against a float64 oracle, *relative to the oracle's largest magnitude*, must be at most 2x
the relative error of the naive PyTorch loop run in the same 16-bit dtype (plus a small slack).

Same routing for everyone: the router's top-k decision is discontinuous, so a float64 oracle that
recomputed the logits could pick a different expert where two logits are within rounding. The
oracle and the 16-bit loop therefore take the *decision* (which pairs exist) from the 16-bit logits
the fast layer sees, and recompute the *scores* from their own logits (differentiably, so the router
gradient is compared too). See ``_pinned_route``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sonic_learn.fast._cute import fast_available
from sonic_learn.reference import moe as ref_moe
from sonic_learn.reference.routing import Routing, build_metadata, token_rounding, topk_routing

pytestmark = pytest.mark.gpu

FAST_OK, FAST_WHY = fast_available() if torch.cuda.is_available() else (False, "no CUDA device")
needs_hopper = pytest.mark.skipif(not FAST_OK, reason=f"fast path unavailable: {FAST_WHY}")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SLACK = 2e-3  # relative slack on top of 2x the 16-bit loop's error


def rel_err(got: torch.Tensor, oracle: torch.Tensor) -> float:
    if oracle.numel() == 0:
        return 0.0
    got = got.double()
    assert not torch.isnan(got).any(), "NaN in a fast result"
    scale = oracle.abs().max().item() or 1.0
    return (got - oracle).abs().max().item() / scale


def params(T, d, n, E, seed, dtype, device="cuda"):
    """O(1)-scaled activations and weights scaled like an initialized layer (outputs stay O(1))."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    router_w = torch.randn(d, E, generator=g) / d**0.5
    w1 = torch.randn(E, d, 2 * n, generator=g) / d**0.5
    w2 = torch.randn(E, n, d, generator=g) / n**0.5
    return [t.to(device=device, dtype=dtype) for t in (x, router_w, w1, w2)]


# ----------------------------------------------------------------------------------------------
# Pinned routing for the oracle and the 16-bit loop
# ----------------------------------------------------------------------------------------------
def _pinned_route(decision_logits: torch.Tensor):
    """A stand-in for ``reference.moe.route`` that keeps the pairs decided on ``decision_logits``
    (float32 logits of the 16-bit layer) and recomputes the scores from the caller's own logits."""

    def route(x, router_w, k, *, routing="topk", tile_m=128, scoring="softmax_topk", normalize=False,
              rounding_mode="nearest", generator=None):
        assert not normalize, "the pinned router covers the unnormalized scorings only"
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        logits = (x @ router_w).to(dtype)  # (T, E) differentiable
        tc = topk_routing(decision_logits, k, scoring=scoring)  # the token-choice picks
        if routing == "topk":
            pairs = tc
        else:
            pairs = token_rounding(decision_logits, k, tile_m=tile_m, mode=rounding_mode, scoring=scoring)
        t, e = pairs.token_idx.long(), pairs.expert_idx.long()
        log_z_all = torch.logsumexp(logits, dim=1)  # (T,) softmax over all E
        if scoring == "topk_softmax":
            log_z = log_z_all  # (T,)
        else:
            log_z = torch.logsumexp(logits.gather(1, tc.expert_idx.long().view(-1, k)), dim=1)  # (T,)
        picked = torch.zeros(decision_logits.shape, dtype=torch.bool, device=logits.device)
        picked[tc.token_idx.long(), tc.expert_idx.long()] = True  # (T, E) token-choice picks
        # A pick keeps its token-choice score; a token added by rounding up gets p = softmax over all E.
        scores = torch.exp(logits[t, e] - torch.where(picked[t, e], log_z[t], log_z_all[t]))  # (P,)
        return Routing(pairs.token_idx, pairs.expert_idx, scores, x.shape[0], router_w.shape[1])

    return route


def run_layer(fn, inputs, k, gout, **kw):
    """Output and the four gradients of fn(*inputs, k, **kw) for the upstream gradient gout."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves, k, **kw)
    (out.to(gout.dtype) * gout).sum().backward()
    return [out.detach()] + [leaf.grad for leaf in leaves]


NAMES = ("out", "dx", "drouter_w", "dw1", "dw2")


def compare_layer(inputs, k, *, routing, backward, scoring="softmax_topk", tile_m=128, ops=None):
    """The fast layer (on ``ops``, None = production) vs the float64 oracle, within 2x the 16-bit loop."""
    from sonic_learn.fast import moe as fast_moe

    x, router_w = inputs[0], inputs[1]
    decision = (x @ router_w).float()  # exactly the fast layer's router GEMM
    gen = torch.Generator().manual_seed(7)
    gout = torch.randn(x.shape, generator=gen).to("cuda", x.dtype).double()  # exact in the 16-bit dtype
    kw = dict(routing=routing, scoring=scoring, tile_m=tile_m)
    with pytest.MonkeyPatch.context() as mp:  # (a context, not the fixture: Hypothesis reruns the body)
        mp.setattr(ref_moe, "route", _pinned_route(decision))
        oracle = run_layer(ref_moe.naive_moe_forward, [t.double() for t in inputs], k, gout, **kw)
        loop16 = run_layer(ref_moe.naive_moe_forward, inputs, k, gout.to(x.dtype), **kw)
    fast = run_layer(fast_moe.moe_forward, inputs, k, gout.to(x.dtype), backward=backward, ops=ops, **kw)
    for name, f, l16, o in zip(NAMES, fast, loop16, oracle):
        ef, el = rel_err(f, o), rel_err(l16, o)
        assert ef <= 2 * el + SLACK, f"{name}: fast rel err {ef:.2e} > 2 x 16-bit loop {el:.2e} + {SLACK}"
    return fast


# ----------------------------------------------------------------------------------------------
# The whole layer: output and all gradients, both backward modes, both routings
# ----------------------------------------------------------------------------------------------
@needs_hopper
@settings(max_examples=8)
@given(T=st.integers(1, 300), d=st.sampled_from([8, 64, 136, 256]), n=st.sampled_from([8, 32, 72, 256]),
       E=st.integers(1, 40), k_frac=st.floats(0, 1), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(sorted(DTYPES)), backward=st.sampled_from(["reduced_memory", "standard"]),
       scoring=st.sampled_from(["softmax_topk", "topk_softmax"]))
@example(T=257, d=256, n=128, E=16, k_frac=0.3, seed=0, dtype="bf16", backward="reduced_memory", scoring="softmax_topk")
@example(T=64, d=64, n=32, E=8, k_frac=1.0, seed=1, dtype="fp16", backward="standard", scoring="topk_softmax")
def test_layer_topk_matches_oracle(T, d, n, E, k_frac, seed, dtype, backward, scoring):
    k = 1 + int(k_frac * (min(E, 8) - 1))
    inputs = params(T, d, n, E, seed, DTYPES[dtype])
    compare_layer(inputs, k, routing="topk", backward=backward, scoring=scoring)


@needs_hopper
@settings(max_examples=5)
@given(T=st.integers(1, 400), E=st.integers(2, 16), k_frac=st.floats(0, 1), seed=st.integers(0, 2**31 - 1),
       tile_m=st.sampled_from([1, 16, 128]), backward=st.sampled_from(["reduced_memory", "standard"]))
@example(T=300, E=8, k_frac=0.5, seed=3, tile_m=16, backward="reduced_memory")
def test_layer_token_rounding_matches_oracle(T, E, k_frac, seed, tile_m, backward):
    k = 1 + int(k_frac * (E - 1))
    inputs = params(T, 64, 32, E, seed, torch.bfloat16)
    compare_layer(inputs, k, routing="token_rounding", backward=backward, tile_m=tile_m)


@needs_hopper
@settings(max_examples=6)
@given(T=st.integers(1, 400), d=st.sampled_from([64, 136, 256]), n=st.sampled_from([32, 72, 136]),
       E=st.integers(2, 16), k_frac=st.floats(0, 1), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(sorted(DTYPES)), backward=st.sampled_from(["reduced_memory", "standard"]),
       routing=st.sampled_from(["topk", "token_rounding"]), tile_m=st.sampled_from([16, 128]))
@example(T=257, d=256, n=136, E=16, k_frac=0.3, seed=0, dtype="bf16", backward="reduced_memory", routing="topk",
         tile_m=128)
@example(T=300, d=64, n=72, E=8, k_frac=0.5, seed=3, dtype="bf16", backward="reduced_memory",
         routing="token_rounding", tile_m=16)
@example(T=129, d=136, n=32, E=5, k_frac=1.0, seed=1, dtype="fp16", backward="standard", routing="topk", tile_m=128)
@example(T=200, d=64, n=136, E=6, k_frac=0.4, seed=2, dtype="bf16", backward="standard", routing="token_rounding",
         tile_m=16)
@pytest.mark.parametrize("cluster_m", [None, 2], ids=["pingpong", "pingpong-cluster2"])
def test_layer_with_per_role_gemm_configs_matches_oracle(T, d, n, E, k_frac, seed, dtype, backward, routing, tile_m,
                                                         cluster_m):
    """The up-projection (fused SwiGLU epilogue) and the dH GEMM (fused dSwiGLU epilogue) on the
    ping-pong kernel, alone or in clusters of 2 CTAs sharing B (upstream SonicMoE's dH
    configuration), the other GEMMs on the default one (``LayerGemms``): same oracle, same bound."""
    from sonic_learn.fast import grouped_gemm as gg
    from sonic_learn.fast import moe as fast_moe

    pingpong = gg.GemmConfig(kernel="pingpong", cluster_m=cluster_m)
    ops = fast_moe.fast_ops(gg.LayerGemms(up=pingpong, dh=pingpong))
    k = 1 + int(k_frac * (min(E, 8) - 1))
    inputs = params(T, d, n, E, seed, DTYPES[dtype])
    compare_layer(inputs, k, routing=routing, backward=backward, tile_m=tile_m, ops=ops)


@needs_hopper
def test_backward_modes_agree_and_forward_is_deterministic():
    from sonic_learn.fast import moe as fast_moe

    inputs = params(512, 256, 128, 16, 5, torch.bfloat16)
    gout = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    red = run_layer(fast_moe.moe_forward, inputs, 4, gout, backward="reduced_memory")
    std = run_layer(fast_moe.moe_forward, inputs, 4, gout, backward="standard")
    again = run_layer(fast_moe.moe_forward, inputs, 4, gout, backward="reduced_memory")
    assert torch.equal(red[0], std[0]), "the two modes share the forward"
    assert torch.equal(red[0], again[0]) and torch.equal(red[1], again[1]), "gather-and-sum must be deterministic"
    for name, a, b in zip(NAMES[1:], red[1:], std[1:]):
        scale = b.abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 2e-2 * scale, name


@needs_hopper
def test_fast_router_gives_the_reference_routing_and_metadata():
    """route(): the pairs, scores and metadata of the reference topk_routing + build_metadata, exactly
    (bf16 logits have many exact ties: both break them toward the lower expert)."""
    from sonic_learn.fast import moe as fast_moe

    g = torch.Generator().manual_seed(0)
    for E, k in ((16, 4), (128, 8), (40, 3), (6, 2)):  # fast bitonic kernel and the stable-sort fallback
        x = torch.randn(333, 64, generator=g).to("cuda", torch.bfloat16)
        router_w = torch.randn(64, E, generator=g).to("cuda", torch.bfloat16)
        got = fast_moe.route(x, router_w, k)
        want = topk_routing((x @ router_w).float(), k)
        want_meta = build_metadata(want)
        assert torch.equal(got.scores, want.scores), (E, k)
        for field in ("expert_counts", "expert_offsets", "gather_idx", "pair_of_row", "row_of_pair"):
            assert torch.equal(getattr(got.meta, field).long(), getattr(want_meta, field).long()), (E, k, field)
        assert torch.equal(got.token_offsets.long(), torch.arange(334, device="cuda") * k), (E, k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generator_of_another_device_is_rejected_before_any_work():
    from sonic_learn.fast import moe as fast_moe

    x, router_w, w1, w2 = params(16, 16, 16, 4, 0, torch.bfloat16)
    with pytest.raises(ValueError, match=r"generator must live on the device of the logits \(cuda\)"):
        fast_moe.check_inputs(x, router_w, w1, w2, 2, routing="token_rounding", generator=torch.Generator())


@needs_hopper
def test_empty_batch():
    from sonic_learn.fast import moe as fast_moe

    out, dx, drw, dw1, dw2 = run_layer(fast_moe.moe_forward, params(0, 64, 32, 8, 0, torch.bfloat16), 2,
                                       torch.zeros(0, 64, device="cuda", dtype=torch.bfloat16))
    assert out.shape == (0, 64) and dx.shape == (0, 64)
    assert not dw1.any() and not dw2.any() and not drw.any()


# ----------------------------------------------------------------------------------------------
# Kernels on their own (edge counts: tokens with 0 pairs, rows of one warp chunk)
# ----------------------------------------------------------------------------------------------
@needs_hopper
@settings(max_examples=10)
@given(M=st.integers(0, 600), n=st.sampled_from([8, 16, 128, 264]), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(sorted(DTYPES)))
def test_swiglu_kernels(M, n, seed, dtype):
    from sonic_learn.fast import moe_kernels as mk

    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    h = (2 * torch.randn(M, 2 * n, generator=g)).to("cuda", dt)
    dap = torch.randn(M, n, generator=g).to("cuda", dt)
    P = M + 3  # a few pairs with no row: their dS must stay 0
    scores = torch.rand(P, generator=g).cuda()
    pair_of_row = torch.randperm(P, generator=g)[:M].to("cuda", torch.int32)
    h64, dap64, s64 = h.double(), dap.double(), scores.double()[pair_of_row.long()][:, None]
    a64 = ref_moe.swiglu(h64)
    a16 = ref_moe.swiglu(h)  # torch in the same dtype (fp32 math, rounded once)
    assert rel_err(mk.swiglu(h), a64) <= 2 * rel_err(a16, a64) + 1e-3
    dh, a_scaled, ds = mk.swiglu_backward_scaled(h, dap, scores, pair_of_row)
    dh64 = ref_moe.swiglu_backward(h64, dap64 * s64)
    dh16 = ref_moe.swiglu_backward(h, (dap.float() * s64.float()).to(dt))
    assert rel_err(dh, dh64) <= 2 * rel_err(dh16, dh64) + 1e-3
    assert rel_err(a_scaled, a64 * s64) <= 2 * rel_err((a16.float() * s64.float()).to(dt), a64 * s64) + 1e-3
    ds64 = torch.zeros(P, dtype=torch.float64, device="cuda")
    ds64[pair_of_row.long()] = (dap64 * a64).sum(1)
    assert (ds.double() - ds64).abs().max().item() <= 1e-4 * (1 + ds64.abs().max().item())
    dh_plain, a_plain = mk.swiglu_backward(h, dap)
    assert rel_err(dh_plain, ref_moe.swiglu_backward(h64, dap64)) <= 2 * rel_err(
        ref_moe.swiglu_backward(h, dap), ref_moe.swiglu_backward(h64, dap64)) + 1e-3
    assert torch.equal(a_plain, mk.swiglu(h))


@needs_hopper
@settings(max_examples=10)
@given(T=st.integers(0, 300), d=st.sampled_from([8, 24, 512, 1032]), max_pairs=st.integers(0, 5),
       seed=st.integers(0, 2**31 - 1), weighted=st.booleans())
def test_gather_sum_kernel(T, d, max_pairs, seed, weighted):
    from sonic_learn.fast import moe_kernels as mk

    g = torch.Generator().manual_seed(seed)
    per_token = torch.randint(0, max_pairs + 1, (T,), generator=g)  # includes tokens with 0 pairs
    P = int(per_token.sum())
    offsets = torch.zeros(T + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(per_token, 0)
    rows = torch.randn(P, d, generator=g).to("cuda", torch.bfloat16)
    row_of_pair = torch.randperm(P, generator=g).to("cuda", torch.int32)
    w = torch.rand(P, generator=g).cuda() if weighted else None
    got = mk.gather_sum(rows, w, row_of_pair, offsets.cuda())
    token = torch.repeat_interleave(torch.arange(T), per_token).cuda()
    contrib = rows.double()[row_of_pair.long()] * (w.double()[:, None] if weighted else 1.0)
    want = torch.zeros(T, d, dtype=torch.float64, device="cuda").index_add_(0, token, contrib)
    # fp32 accumulation of at most 5 terms, then one bf16 rounding: within 1 bf16 ulp of the sum
    assert ((got.double() - want).abs() <= 2**-8 * want.abs() + 1e-5).all()


@needs_hopper
def test_gather_scale_dot_kernel():
    from sonic_learn.fast import moe_kernels as mk

    T, P, d = 50, 120, 136
    dout = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(P, d, device="cuda", dtype=torch.bfloat16)
    scores = torch.rand(P, device="cuda")
    gather_idx = torch.randint(0, T, (P,), device="cuda", dtype=torch.int32)
    pair_of_row = torch.randperm(P, device="cuda").to(torch.int32)
    dy, ds = mk.gather_scale_dot(dout, y, scores, gather_idx, pair_of_row)
    g64 = dout.double()[gather_idx.long()]
    s64 = scores.double()[pair_of_row.long()][:, None]
    assert ((dy.double() - g64 * s64).abs() <= 2**-8 * (g64 * s64).abs() + 1e-6).all()
    ds64 = torch.zeros(P, dtype=torch.float64, device="cuda")
    ds64[pair_of_row.long()] = (g64 * y.double()).sum(1)
    assert (ds.double() - ds64).abs().max().item() <= 1e-4 * ds64.abs().max().item()


@needs_hopper
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("M, end, widths", [
    (300, 0, (8, 272)),  # every row from the first on (widths 8 and 2n, n = 136)
    (300, 300, (272, 8)),  # end = M: no padding, nothing changes
    (300, 299, (272, 136)),  # only the last row
    (300, 100, (8, 8)),  # a full tail of K_TAIL_ROWS rows inside the tensor, garbage after it kept
    (300, 200, (136, 4096)),  # the tail cut by M (100 rows), a row longer than one pass of the CTA's threads
    (50, 0, (8, 272)), (50, 30, (272, 136)),  # M < K_TAIL_ROWS
    (1, 0, (8, 8)), (0, 0, (8, 8)),
])
def test_zero_rows_past_end_kernel(M, end, widths, dtype):
    """The tail kernel (one launch, end = offsets[E] read on the device) leaves two tensors exactly
    as the torch version does, bit for bit: rows end .. end + K_TAIL_ROWS - 1 (those below M) zero,
    every other row untouched. The tensors hold random bit patterns (NaN and inf among them) and
    NaN rows, as the padding rows of token rounding's buffers do."""
    from sonic_learn.fast import moe as fast_moe
    from sonic_learn.fast import moe_kernels as mk

    g = torch.Generator().manual_seed(M * 1000 + end)

    def garbage(width):  # (M, width) random 16-bit patterns, every 7th row NaN
        bits = torch.randint(-2**15, 2**15, (M, width), generator=g, dtype=torch.int32).to(torch.int16)
        t = bits.view(DTYPES[dtype]).cuda()
        t[::7] = float("nan")
        return t

    a, b = garbage(widths[0]), garbage(widths[1])
    E = 5
    inner = torch.sort(torch.randint(0, end + 1, (E - 1,), generator=g)).values  # offsets[E-1] != end, mostly
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), inner, torch.tensor([end])]).to("cuda", torch.int32)
    want_a, want_b = fast_moe.zero_rows_past_end(a.clone(), b.clone(), end=offsets[-1])
    assert mk.zero_rows_past_end(a, b, offsets) is None
    torch.cuda.synchronize()
    for name, got, want in (("a", a, want_a), ("b", b, want_b)):
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"{name}: rows differ from the torch version"
    tail = slice(end, end + fast_moe.K_TAIL_ROWS)
    assert not a[tail].view(torch.int16).any() and not b[tail].view(torch.int16).any()  # +0.0 everywhere


# ----------------------------------------------------------------------------------------------
# No host synchronization; CUDA-graph capture
# ----------------------------------------------------------------------------------------------
ROUTING_KW = {"topk": {"routing": "topk"},
              "token_rounding": {"routing": "token_rounding", "tile_m": 16}}  # T*K/(E*16) = 6: a mix of up/down


@needs_hopper
@pytest.mark.parametrize("routing", sorted(ROUTING_KW))
@pytest.mark.parametrize("backward", ["reduced_memory", "standard"])
def test_no_host_sync(backward, routing):
    from sonic_learn.fast import moe as fast_moe

    inputs = params(384, 128, 64, 16, 2, torch.bfloat16)
    gout = torch.randn(384, 128, device="cuda", dtype=torch.bfloat16)
    kw = dict(backward=backward, **ROUTING_KW[routing])
    run_layer(fast_moe.moe_forward, inputs, 4, gout, **kw)  # warm up (JIT compiles)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fast_moe.moe_forward(*leaves, 4, **kw)
        (out * gout).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(leaf.grad is not None for leaf in leaves)


@needs_hopper
@pytest.mark.parametrize("routing", sorted(ROUTING_KW))
@pytest.mark.parametrize("backward", ["reduced_memory", "standard"])
def test_cuda_graph_capture_and_replay(backward, routing):
    """A training step (forward + backward) captured once and replayed on new inputs; with token
    rounding the new inputs route differently (another P), which only works sync-free and bound-sized."""
    from sonic_learn.fast import moe as fast_moe

    T, d, n, E, k = 256, 128, 64, 16, 4
    kw = dict(backward=backward, **ROUTING_KW[routing])
    leaves = [t.requires_grad_(True) for t in params(T, d, n, E, 11, torch.bfloat16)]
    gout = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)

    def step():
        for leaf in leaves:
            leaf.grad = None
        out = fast_moe.moe_forward(*leaves, k, **kw)
        (out * gout).sum().backward()
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    # New inputs, copied into the captured tensors; replay; compare with an eager step.
    fresh = params(T, d, n, E, 12, torch.bfloat16)
    with torch.no_grad():
        for leaf, new in zip(leaves, fresh):
            leaf.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    replayed = [static_out.clone()] + [leaf.grad.clone() for leaf in leaves]
    eager = run_layer(fast_moe.moe_forward, fresh, k, gout, **kw)
    for name, a, b in zip(NAMES, replayed, eager):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: graph replay differs from eager: {m}")


def _poison_allocator_cache() -> None:
    """Fill the caching allocator's free blocks with NaN bits (as int32: a huge index), so any kernel
    that reads an uninitialized row or index entry of a later ``torch.empty`` sees poison."""
    torch.cuda.synchronize()
    blocks = [torch.full((1 << 16,), float("nan"), device="cuda") for _ in range(64)]  # small pool
    blocks += [torch.full((1 << 22,), float("nan"), device="cuda") for _ in range(4)]  # large pool
    torch.cuda.synchronize()
    del blocks  # back to the cache, still holding NaN


@needs_hopper
@pytest.mark.parametrize("tile_m", [128, 16])
@pytest.mark.parametrize("backward", ["reduced_memory", "standard"])
def test_token_rounding_padding_rows_are_never_read(backward, tile_m):
    """Sync-free token rounding sizes its buffers by max_pairs (far above P here, E 16): with the
    allocator's memory poisoned (NaN), output and every gradient still match the oracle. tile_m=16
    ends the last expert off a 64-row k-tile, so the weight-gradient GEMM's last k-tile reaches into
    the padding rows (they must have been zeroed: ``ExpertOps.zero_rows_past_end``, the
    ``moe_kernels.ZeroRowsPastEnd`` kernel on this default path)."""
    inputs = params(700, 64, 32, 16, 5, torch.bfloat16)
    _poison_allocator_cache()
    compare_layer(inputs, 4, routing="token_rounding", backward=backward, tile_m=tile_m)


# ----------------------------------------------------------------------------------------------
# Activation memory, measured with the CUDA caching allocator
# ----------------------------------------------------------------------------------------------
def resident_after_forward(fast_moe, x0, router_w, w1, w2, k, backward):
    """Bytes still allocated after the forward (x created inside the window), minus the output."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    x = x0.clone().requires_grad_(True)
    out = fast_moe.moe_forward(x, router_w, w1, w2, k, backward=backward)
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
    del out, x
    return resident


@needs_hopper
def test_activation_memory():
    from sonic_learn.fast import moe as fast_moe

    T, d, n, E, k = 4096, 512, 256, 16, 4
    P = T * k
    x0, router_w, w1, w2 = params(T, d, n, E, 4, torch.bfloat16)
    for weight in (router_w, w1, w2):
        weight.requires_grad_(True)
    resident_after_forward(fast_moe, x0, router_w, w1, w2, k, "reduced_memory")  # warm up
    red = resident_after_forward(fast_moe, x0, router_w, w1, w2, k, "reduced_memory")
    std = resident_after_forward(fast_moe, x0, router_w, w1, w2, k, "standard")
    # 2Td + 4Pn, plus the routing metadata: the experts' closed form, and what the router's autograd
    # keeps: the fp32 logits (T, E) and the top-k indices (T, K) int64 that its gather saves (the
    # softmax output it saves is the scores tensor, counted once).
    expected = fast_moe.expected_saved_bytes(T, d, n, E, P)["total"] + T * E * 4 + T * k * 8
    assert abs(red - expected) <= 0.05 * expected, (red, expected)
    assert std - red >= 2 * P * d, (std, red)  # standard holds at least Y (P, d) bf16 on top


@needs_hopper
def test_module_backend_fast_matches_reference_backend():
    import sonic_learn

    torch.manual_seed(0)
    fast = sonic_learn.MoE(128, 64, 16, 4, backend="fast", device="cuda", dtype=torch.bfloat16)
    ref = sonic_learn.MoE(128, 64, 16, 4, backend="reference", device="cuda", dtype=torch.bfloat16)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 100, 128, device="cuda", dtype=torch.bfloat16)
    a, b = fast(x), ref(x)
    assert a.shape == x.shape
    assert (a.float() - b.float()).abs().max().item() <= 2e-2 * b.float().abs().max().item()
