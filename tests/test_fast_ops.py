"""The fast layer's kernels as torch.library custom ops (``sonic_learn.fast.ops``).

On the CPU the CuTe kernels cannot run, so the ops get CPU kernels here made of the torch
stand-ins of ``test_fast_moe_compile`` (each the reference formula under the kernel's contract).
With them we check, without a GPU: every op is registered with a fake implementation whose shapes
and dtypes match the real outputs (``torch.library.opcheck``), the two ops with an autograd
formula differentiate correctly, and the fast layer's router + experts, calling only these ops,
compile as ONE graph (fullgraph=True, dynamic=True) and match eager and the reference layer.
The GPU tests at the end run the real kernels.
"""

from __future__ import annotations

import pytest
import torch
from test_fast_moe_compile import TORCH_OPS  # the kernels' torch stand-ins

from sonic_learn.fast import moe as fast_moe
from sonic_learn.fast import ops
from sonic_learn.reference import moe as ref_moe

OP_NAMES = ("gather_gemm", "gather_gemm_swiglu", "grouped_gemm", "dh_gemm", "varlen_k_gemm", "swiglu",
            "swiglu_backward", "gather_scale_dot", "gather_sum", "zero_rows_past_end", "topk_experts",
            "routing_metadata")


def _meta(offsets, gather_idx, num_tokens):
    """Metadata of the stand-ins from what an op receives (the permutations rebuilt on the host)."""
    return ops._meta(offsets, gather_idx, gather_idx, gather_idx, num_tokens)


def _cpu_metadata(token_idx, expert_idx, num_tokens, num_experts):
    meta, _ = fast_moe.device_metadata(token_idx, expert_idx, num_tokens, num_experts)
    return meta.expert_counts, meta.expert_offsets, meta.gather_idx, meta.pair_of_row, meta.row_of_pair


CPU_KERNELS = {
    "gather_gemm": lambda x, w, off, gi, tw: TORCH_OPS.gather_gemm(x, w, _meta(off, gi, x.shape[0]), tw),
    "gather_gemm_swiglu": lambda x, w, off, gi: TORCH_OPS.gather_gemm_swiglu(x, w, _meta(off, gi, x.shape[0])),
    "grouped_gemm": lambda a, w, off, gi, tw: TORCH_OPS.grouped_gemm(a, w, _meta(off, gi, a.shape[0]), tw),
    "dh_gemm": lambda dout, w2, off, gi, h, s: TORCH_OPS.dh_gemm(dout, w2, _meta(off, gi, dout.shape[0]), h, s),
    "varlen_k_gemm": lambda a, b, off, gi, ga, to: TORCH_OPS.varlen_k_gemm(a, b, _meta(off, gi, a.shape[0]), ga, to),
    "swiglu": lambda h: TORCH_OPS.swiglu(h),
    "swiglu_backward": lambda h, da: TORCH_OPS.swiglu_backward(h, da),
    "gather_scale_dot": lambda *args: TORCH_OPS.gather_scale_dot(*args),
    "gather_sum": lambda *args: TORCH_OPS.gather_sum(*args),
    "zero_rows_past_end": lambda a, b, off: TORCH_OPS.zero_rows_past_end(a, b, off),
    "topk_experts": lambda logits, k: torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k].contiguous(),
    "routing_metadata": _cpu_metadata,
}


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels():
    """CPU kernels for the ops, for this module only (a Library whose registrations end with it)."""
    lib = torch.library.Library("sonic_learn", "FRAGMENT")
    for name, fn in CPU_KERNELS.items():
        torch.library.register_kernel(f"sonic_learn::{name}", "cpu", lambda *a, fn=fn: fn(*a), lib=lib)
    yield
    lib._destroy()


def _problem(T=6, d=8, n=16, E=4, k=2, seed=0, dtype=torch.float64):  # d != n != 2n: shapes tell apart
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=dtype)
    router_w = torch.randn(d, E, generator=g, dtype=dtype)
    w1 = torch.randn(E, d, 2 * n, generator=g, dtype=dtype) / d**0.5
    w2 = torch.randn(E, n, d, generator=g, dtype=dtype) / n**0.5
    return x, router_w, w1, w2, k


def test_every_kernel_is_a_registered_op():
    for name in OP_NAMES:
        assert hasattr(torch.ops.sonic_learn, name), name
    expert = ops.expert_ops()
    for field in fast_moe.ExpertOps.__dataclass_fields__:
        assert callable(getattr(expert, field)), field
    assert fast_moe.fast_ops().swiglu is ops.swiglu  # production: the custom ops
    assert fast_moe.fast_ops(fuse_dh=False).swiglu is not ops.swiglu  # another configuration: direct calls


def test_ops_pass_opcheck():
    """Schema, fake implementation vs the real outputs (shapes, dtypes, strides), and AOT dispatch,
    in bf16 as the kernels run (the stand-ins keep the kernels' output dtypes: dS in float32)."""
    bf16 = torch.bfloat16
    x, router_w, w1, w2, k = (t.to(bf16) if torch.is_tensor(t) else t for t in _problem())
    T, d, E, n = x.shape[0], x.shape[1], w1.shape[0], w2.shape[1]
    logits = (x @ router_w).float()
    experts = ops.topk_experts(logits, k)  # (T, K)
    token_idx = torch.arange(T).repeat_interleave(k).to(torch.int32)
    counts, offsets, gather_idx, pair_of_row, row_of_pair = ops.routing_metadata(token_idx, experts.reshape(-1), T, E)
    P = T * k
    h, a = ops.gather_gemm_swiglu(x, w1, offsets, gather_idx)
    scores = torch.rand(P)
    token_offsets = torch.arange(T + 1, dtype=torch.int32) * k
    dout = torch.randn(T, d, dtype=bf16)
    cases = {
        "topk_experts": (logits, k),
        "routing_metadata": (token_idx, experts.reshape(-1), T, E),
        "gather_gemm": (x, w1, offsets, gather_idx, False),
        "gather_gemm_transposed": (dout, w2, offsets, gather_idx, True),
        "gather_gemm_swiglu": (x, w1, offsets, gather_idx),
        "grouped_gemm": (a, w2, offsets, gather_idx, False),
        "grouped_gemm_transposed": (h, w1, offsets, gather_idx, True),
        "dh_gemm": (dout, w2, offsets, gather_idx, h, scores[pair_of_row.long()]),
        "varlen_k_gemm": (x, h, offsets, gather_idx, True, False),
        "varlen_k_gemm_transposed": (dout, a, offsets, gather_idx, True, True),
        "swiglu_backward": (h, torch.randn(P, n, dtype=bf16)),
        "gather_scale_dot": (dout, torch.randn(P, d, dtype=bf16), scores, gather_idx, pair_of_row),
        # the two ops with an autograd formula get inputs that require grad (opcheck then runs backward)
        "swiglu": (h.clone().requires_grad_(True),),
        "gather_sum": (torch.randn(P, d, dtype=bf16, requires_grad=True), scores.clone().requires_grad_(True),
                       row_of_pair, token_offsets),
        # writes into its two inputs (declared: opcheck fails an undeclared mutation); end = 5 of P = 12 rows
        "zero_rows_past_end": (torch.randn(P, 2 * n, dtype=bf16), torch.randn(P, d, dtype=bf16),
                               torch.tensor([0, 2, 5], dtype=torch.int32)),
    }
    for name, args in cases.items():
        op = getattr(torch.ops.sonic_learn, name.removesuffix("_transposed")).default
        torch.library.opcheck(op, args, atol=1e-2, rtol=1e-2)
    assert counts.sum().item() == P


def test_op_autograd_formulas():
    x, router_w, w1, w2, k = _problem()
    T = x.shape[0]
    h = torch.randn(T * k, 2 * w2.shape[1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.swiglu, (h,))
    experts = ops.topk_experts((x @ router_w).float(), k)
    token_idx = torch.arange(T).repeat_interleave(k).to(torch.int32)
    _, _, _, _, row_of_pair = ops.routing_metadata(token_idx, experts.reshape(-1), T, w1.shape[0])
    token_offsets = torch.arange(T + 1, dtype=torch.int32) * k
    rows = torch.randn(T * k, 8, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(T * k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, w: ops.gather_sum(r, w, row_of_pair, token_offsets), (rows, weights))
    assert torch.autograd.gradcheck(lambda r: ops.gather_sum(r, None, row_of_pair, token_offsets), (rows,))


def _fast_layer(x, router_w, w1, w2, k, backward):
    """The fast layer past its CUDA checks: fast.moe.route_layer (router GEMM Function, top-k op +
    metadata op) and run_experts with the default (custom-op) kernels."""
    r, x_experts = fast_moe.route_layer(x, router_w, k)
    return fast_moe.run_experts(x_experts, w1, w2, r, backward), r.logits


@pytest.mark.parametrize("backward", ["reduced_memory", "standard"])
def test_fast_layer_on_the_ops_is_one_graph(backward):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_fast_layer, backend=counter, fullgraph=True, dynamic=True)
    for T in (6, 11):
        # float32: the ops' fake implementations promise the kernels' dtypes (dS in float32)
        x, router_w, w1, w2, k = _problem(T=T, seed=T, dtype=torch.float32)
        params = [t.requires_grad_(True) for t in (x, router_w, w1, w2)]
        out, logits = compiled(*params, k, backward)
        grads = torch.autograd.grad(out.square().sum(), params)
        want = ref_moe.moe_forward(*params, k, backward=backward)
        want_grads = torch.autograd.grad(want.square().sum(), params)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        for got, ref in zip(grads, want_grads):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits, (x @ router_w).float())
    assert counter.frame_count == 1


def test_tail_zeroing_op_keeps_its_writes_under_torch_compile():
    """``zero_rows_past_end`` writes into its inputs and returns nothing: called on intermediates (as
    dH and A' in token rounding's backward) inside a compiled function (one graph, dynamic sizes),
    its zeros reach what the function returns, for an end past the first row, past every row, and
    for fewer rows than the tail."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def step(a, b, offsets):
        a2, b2 = a * 2, b + 1  # (M, Na), (M, Nb) intermediates the op zeroes in place
        ops.zero_rows_past_end(a2, b2, offsets)
        return a2.sum(1), b2 * 3  # (M,), (M, Nb): both read after the write

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(0)
    for M, end in ((300, 7), (300, 300), (40, 3)):
        a, b = torch.randn(M, 16, generator=g), torch.randn(M, 8, generator=g)
        offsets = torch.tensor([0, end // 2, end], dtype=torch.int32)
        got_a, got_b = compiled(a, b, offsets)
        tail = slice(end, end + fast_moe.K_TAIL_ROWS)
        want_a, want_b = (a * 2).sum(1), (b + 1) * 3
        want_a[tail], want_b[tail] = 0, 0
        assert torch.equal(got_a, want_a) and torch.equal(got_b, want_b), (M, end)
    assert counter.frame_count == 1


@pytest.mark.parametrize("uses", ["both", "logits", "x"])
def test_router_gemm_sums_both_gradients_of_x(uses):
    """RouterGemm's backward = autograd's on the same graph (x used by the router and the experts):
    dX = dX_experts + dlogits @ router_w^T in one addmm, drouter_w = x^T dlogits; an output that does
    not reach the loss contributes nothing (its gradient arrives as None)."""
    x, router_w, *_ = _problem(T=7, d=5, E=3, seed=3)
    probe = torch.randn(7, 5, dtype=torch.float64)  # what "the experts" do with x: a weighted sum

    def loss(logits, x_experts):
        parts = {"logits": logits.sin().sum(), "x": (x_experts * probe).square().sum()}
        return sum(parts[u] for u in (("logits", "x") if uses == "both" else (uses,)))

    xs, ws = x.clone().requires_grad_(True), router_w.clone().requires_grad_(True)
    got = torch.autograd.grad(loss(*fast_moe.RouterGemm.apply(xs, ws)), (xs, ws), allow_unused=True)
    xr, wr = x.clone().requires_grad_(True), router_w.clone().requires_grad_(True)
    want = torch.autograd.grad(loss((xr @ wr).float(), xr), (xr, wr), allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    logits, x_alias = fast_moe.RouterGemm.apply(xs, ws)
    assert logits.dtype == torch.float32 and torch.equal(x_alias, xs)  # float32 logits, as the fast router


def test_router_gemm_computes_only_the_gradients_asked_for():
    """A frozen router (router_w without grad) or a frozen input (x without grad) skips that GEMM;
    the other gradient is unchanged."""
    x, router_w, *_ = _problem(T=4, d=3, E=2, seed=5)
    for x_grad, w_grad in ((True, False), (False, True)):
        xs, ws = x.clone().requires_grad_(x_grad), router_w.clone().requires_grad_(w_grad)
        logits, x_experts = fast_moe.RouterGemm.apply(xs, ws)
        (logits.sum() + x_experts.sum()).backward()
        assert (xs.grad is not None) == x_grad and (ws.grad is not None) == w_grad
        want = router_w.sum(1) + 1 if x_grad else x.sum(0)[:, None].expand(3, 2)  # d/dx, d/dW of the sums
        torch.testing.assert_close(xs.grad if x_grad else ws.grad, want.expand_as(xs if x_grad else ws))


def test_router_gemm_bf16_is_one_rounding():
    """In bf16 the fused dX rounds once (addmm accumulates in float32): at least as close to the
    float64 truth as autograd's two roundings (a GEMM in bf16, then a bf16 add)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g).bfloat16()
    router_w = torch.randn(32, 8, generator=g).bfloat16()
    dlogits = torch.randn(64, 8, generator=g)
    dx_experts = torch.randn(64, 32, generator=g).bfloat16()
    truth = dx_experts.double() + dlogits.bfloat16().double() @ router_w.double().t()
    xs = x.clone().requires_grad_(True)
    logits, x_alias = fast_moe.RouterGemm.apply(xs, router_w)
    (fused,) = torch.autograd.grad((logits, x_alias), (xs,), (dlogits, dx_experts))
    two_roundings = dx_experts + dlogits.bfloat16() @ router_w.t()
    err = lambda t: (t.double() - truth).abs().max().item()  # noqa: E731
    assert err(fused) <= err(two_roundings) and err(fused) <= 2 ** -7 * truth.abs().max().item()


def test_router_gemm_accumulates_into_the_experts_dx_in_place():
    """The router's dX is added into the experts' dX buffer itself (no (T, d) copy first): the
    gradient returned for x is that buffer, and it holds bit for bit what the out-of-place addmm
    gives. A gradient that is not a plain buffer (a broadcast) is not written: the out-of-place path."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 24, generator=g).bfloat16().requires_grad_(True)
    router_w = torch.randn(24, 8, generator=g).bfloat16()
    dlogits = torch.randn(48, 8, generator=g)
    dx_experts = torch.randn(48, 24, generator=g).bfloat16()
    want = torch.addmm(dx_experts, dlogits.bfloat16(), router_w.t())
    ptr = dx_experts.data_ptr()
    logits, x_alias = fast_moe.RouterGemm.apply(x, router_w)
    (got,) = torch.autograd.grad((logits, x_alias), (x,), (dlogits, dx_experts))
    assert got.data_ptr() == ptr and torch.equal(got, want)
    broadcast = torch.ones(1, 1, dtype=torch.bfloat16).expand(48, 24)
    logits, x_alias = fast_moe.RouterGemm.apply(x, router_w)
    (got,) = torch.autograd.grad((logits, x_alias), (x,), (dlogits, broadcast))
    assert torch.equal(got, torch.addmm(broadcast, dlogits.bfloat16(), router_w.t()))
    assert torch.equal(broadcast, torch.ones(48, 24, dtype=torch.bfloat16))  # not written


def test_fake_shapes_trace_the_whole_step():
    """With fake tensors only (no kernel runs), the forward + backward of the fast experts traces
    through the ops' fake implementations and gives every gradient its parameter's shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    T, d, n, E, k = 5, 16, 8, 4, 2
    with FakeTensorMode():
        x = torch.empty(T, d, dtype=torch.bfloat16, requires_grad=True)
        router_w = torch.empty(d, E, dtype=torch.bfloat16, requires_grad=True)
        w1 = torch.empty(E, d, 2 * n, dtype=torch.bfloat16, requires_grad=True)
        w2 = torch.empty(E, n, d, dtype=torch.bfloat16, requires_grad=True)
        for backward in ("reduced_memory", "standard"):
            out, logits = _fast_layer(x, router_w, w1, w2, k, backward)
            grads = torch.autograd.grad(out.float().sum(), (x, router_w, w1, w2))
            assert out.shape == (T, d) and out.dtype == torch.bfloat16 and logits.shape == (T, E)
            assert [tuple(g.shape) for g in grads] == [(T, d), (d, E), (E, d, 2 * n), (E, n, d)]


# ----------------------------------------------------------------------------------------------
# GPU: the real kernels under torch.compile and CUDA graphs
# ----------------------------------------------------------------------------------------------
def _gpu_layer(backward="reduced_memory"):
    import sonic_learn

    torch.manual_seed(0)
    return sonic_learn.MoE(128, 64, 8, 2, backward=backward, backend="fast", device="cuda", dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("backward", ["reduced_memory", "standard"])
def test_gpu_fast_layer_compiles_fullgraph_and_matches_eager(backward):
    torch._dynamo.reset()
    moe = _gpu_layer(backward)
    compiled = torch.compile(moe, fullgraph=True, dynamic=True)
    for T in (256, 384):
        x = torch.randn(T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = compiled(x)
        stats = moe.router_stats
        g = torch.autograd.grad(out.float().square().sum() + stats.load_balancing_loss, (x, moe.w1, moe.w2))
        want = moe(x)
        want_g = torch.autograd.grad(want.float().square().sum() + moe.router_stats.load_balancing_loss,
                                     (x, moe.w1, moe.w2))
        torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)  # same kernels; inductor may reorder the router softmax
        for got, ref in zip(g, want_g):
            torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_fast_layer_reduce_overhead_topk():
    """mode="reduce-overhead" captures the top-k layer in a CUDA graph (no host sync inside): the
    replays repeat the recorded run bit for bit, and match eager to bf16 rounding (Inductor fuses
    the router's elementwise ops around the kernels, which may round a score differently: an H100
    run saw 1 element of 32768 one bf16 ulp apart)."""
    torch._dynamo.reset()
    moe = _gpu_layer()
    compiled = torch.compile(moe, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = moe(x)
        outs = [compiled(x).clone() for _ in range(4)]  # warm-up, record, replay, replay
        assert torch.equal(outs[2], outs[1]) and torch.equal(outs[3], outs[1])
        torch.testing.assert_close(outs[-1], want)  # bf16's own tolerance
    with torch.cuda.graph(torch.cuda.CUDAGraph()):  # and plain capture of the eager forward works too
        moe(x)
