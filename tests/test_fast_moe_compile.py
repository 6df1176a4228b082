"""CPU tests of the fast MoE layer (marker ``compile``): no GPU needed.

1. Every kernel of ``sonic_learn.fast.moe_kernels`` compiles for sm_90a from fake tensors, with
   16-byte vector loads and (for the dS reductions) warp shuffles in its PTX.
2. The layer's *autograd logic* (``ReducedMemoryExperts`` / ``StandardExperts``, the device-side
   routing metadata, dS routed back to pair order) runs on the CPU with torch stand-ins for the
   kernels (``TORCH_OPS`` below, each one the reference formula with the kernel's contract), in
   float64 against the reference layer: output and all four gradients must agree to float64
   round-off, for both backward modes and both routings.
3. Saved-tensor accounting (the reference's saved_tensors_hooks method): the reduced-memory mode
   caches no (P, d) tensor and exactly the closed-form bytes; the standard mode caches Y and the
   gathered X on top.
4. Bad inputs are rejected with clear messages before any work.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sonic_learn.fast import moe as fast_moe
from sonic_learn.properties.backward import tensors_alive_after
from sonic_learn.reference import grouped_gemm as ref_gg
from sonic_learn.reference import moe as ref_moe
from sonic_learn.reference.routing import build_metadata, token_rounding, topk_routing

pytestmark = pytest.mark.compile


# ----------------------------------------------------------------------------------------------
# 1. Kernels compile for Hopper
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_kernels_compile_for_sm90a(dtype):
    from sonic_learn.fast import moe_kernels as mk

    for name in mk.KERNELS:
        ptx = mk.compile_kernel(name, dtype, keep_ptx=True).__ptx__
        assert ".target sm_90a" in ptx, name
        if name == "zero_rows_past_end":  # stores only: 16-byte vectors of zeros, one per tensor's loop
            assert len(re.findall(r"st\.global[.\w]*\.v4", ptx)) == 2, f"{name}: not two 16-byte vector stores"
            assert len(re.findall(r"ld\.global", ptx)) == 1, f"{name}: reads more than offsets[E]"
            continue
        assert re.search(r"ld\.global[.\w]*\.v4", ptx), f"{name}: no 16-byte vector load"
        if name.startswith("gather_sum"):  # a group of pairs' chunks is loaded before any is added
            assert len(re.findall(r"ld\.global[.\w]*\.v4", ptx)) == mk.GATHER_GROUP, name
        if name in ("swiglu_bwd_scaled", "gather_scale_dot"):
            assert ptx.count("shfl.sync.bfly") >= 5, f"{name}: the dS warp reduction is missing"
        assert "atom." not in ptx and "red.global" not in ptx, f"{name}: uses atomics (must be deterministic)"


def test_compile_kernel_rejects_unknown_kernel_and_dtype():
    from sonic_learn.fast import moe_kernels as mk

    with pytest.raises(ValueError, match="name must be one of"):
        mk.compile_kernel("swiglu_forward", torch.bfloat16)
    with pytest.raises(ValueError, match=r"dtype must be torch.bfloat16 or torch.float16.*float32"):
        mk.compile_kernel("swiglu_fwd", torch.float32)


# ----------------------------------------------------------------------------------------------
# Torch stand-ins for the kernels (same contracts as moe_kernels / fast.grouped_gemm)
# ----------------------------------------------------------------------------------------------
def _acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _swiglu_bwd_scaled(h, da_prime, scores, pair_of_row):
    s = scores[pair_of_row.long()].to(_acc(h))[:, None]  # (P, 1)
    a = ref_moe.swiglu(h.to(_acc(h)))  # (P, n) fp32 like the kernel's registers
    dots = (da_prime.to(_acc(h)) * a).sum(1)  # (P,)
    dh = ref_moe.swiglu_backward(h.to(_acc(h)), da_prime.to(_acc(h)) * s).to(h.dtype)
    dscores = torch.zeros(scores.shape[0], dtype=torch.float32 if h.dtype != torch.float64 else h.dtype)
    dscores[pair_of_row.long()] = dots.to(dscores.dtype)
    return dh, (a * s).to(h.dtype), dscores


def _swiglu_bwd(h, da):
    return ref_moe.swiglu_backward(h, da), ref_moe.swiglu(h)


def _gather_scale_dot(dout, y, scores, gather_idx, pair_of_row):
    g = dout[gather_idx.long()].to(_acc(y))  # (P, d)
    s = scores[pair_of_row.long()].to(_acc(y))[:, None]
    dscores = torch.zeros(scores.shape[0], dtype=torch.float32 if y.dtype != torch.float64 else y.dtype)
    dscores[pair_of_row.long()] = (g * y.to(_acc(y))).sum(1).to(dscores.dtype)
    return (g * s).to(y.dtype), dscores


def _gather_sum(rows, weights, row_of_pair, token_offsets):
    T = token_offsets.numel() - 1
    per_token = (token_offsets[1:] - token_offsets[:-1]).long()
    token_of_pair = torch.repeat_interleave(torch.arange(T), per_token)  # (P,)
    contrib = rows[row_of_pair.long()].to(_acc(rows))  # (P, d) in pair order
    if weights is not None:
        contrib = contrib * weights.to(_acc(rows))[:, None]
    out = torch.zeros(T, rows.shape[1], dtype=_acc(rows)).index_add_(0, token_of_pair, contrib)
    return out.to(rows.dtype)


def _dh_gemm(dout, w2, meta, h, row_scores):
    """The fused dH kernel's contract: (dH, A', dS in grouped row order)."""
    da_prime = ref_gg.gather_fused_grouped_gemm(dout, w2, meta, transpose_w=True)  # (P, n)
    return _swiglu_bwd_scaled(h, da_prime, row_scores, torch.arange(h.shape[0]))


def _zero_rows_past_end(a, b, offsets):
    """The tail kernel's contract, on the torch version: in place, nothing returned."""
    fast_moe.zero_rows_past_end(a, b, end=offsets[-1])


TORCH_OPS = fast_moe.ExpertOps(
    gather_gemm=lambda x, w, meta, transpose_w=False, *, role=None: ref_gg.gather_fused_grouped_gemm(
        x, w, meta, transpose_w=transpose_w),
    gather_gemm_swiglu=lambda x, w, meta: (lambda h: (h, ref_moe.swiglu(h)))(ref_gg.gather_fused_grouped_gemm(x, w, meta)),
    dh_gemm=lambda dout, w2, meta, h, row_scores: _dh_gemm(dout, w2, meta, h, row_scores),
    grouped_gemm=lambda a, w, meta, transpose_w=False, *, role=None: ref_gg.gather_fused_grouped_gemm(
        a, w, ref_moe._contiguous_meta(meta), transpose_w=transpose_w),
    varlen_k_gemm=lambda a, b, meta, gather_a, transpose_out=False: ref_gg.grouped_gemm_varlen_k(
        a, b, meta if gather_a else ref_moe._contiguous_meta(meta), gather_a=gather_a, transpose_out=transpose_out),
    swiglu=ref_moe.swiglu,
    swiglu_backward=_swiglu_bwd,
    gather_scale_dot=_gather_scale_dot,
    gather_sum=_gather_sum,
    zero_rows_past_end=_zero_rows_past_end,
)


def _route(logits, k, routing, tile_m):
    """Reference routing of (T, E) logits + the fast layer's torch-ops metadata: (routing, meta, token_offsets)."""
    T, E = logits.shape
    if routing == "topk":
        r = topk_routing(logits, k)
        meta, token_offsets = fast_moe.device_metadata(r.token_idx, r.expert_idx, T, E, pairs_per_token=k)
    else:
        r = token_rounding(logits, k, tile_m=tile_m)
        meta, token_offsets = fast_moe.device_metadata(r.token_idx, r.expert_idx, T, E)
    return r, meta, token_offsets


def _cpu_layer(x, router_w, w1, w2, k, routing, backward, tile_m=4, ops=TORCH_OPS):
    """The fast layer's routing + autograd Functions on the CPU (reference router, ``ops`` kernels)."""
    r, meta, token_offsets = _route(x @ router_w, k, routing, tile_m)
    dr = fast_moe.DeviceRouting(meta, r.scores, token_offsets)
    return fast_moe.run_experts(x, w1, w2, dr, backward, ops), dr


def check_cpu_layer_against_reference(params, k, routing, backward, seed, ops=TORCH_OPS):
    """``_cpu_layer`` on ``ops`` vs the reference layer (float64): output and the four gradients."""
    out, _ = _cpu_layer(*params, k, routing, backward, ops=ops)
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    ref = ref_moe.moe_forward(*ref_params, k, routing=routing, tile_m=4, backward=backward)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=out.dtype)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for name, p, q in zip(("x", "router_w", "w1", "w2"), params, ref_params):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"d{name}: {m}")


def _params(T, d, n, E, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=dtype)
    router_w = torch.randn(d, E, generator=g, dtype=dtype) / d**0.5
    w1 = torch.randn(E, d, 2 * n, generator=g, dtype=dtype) / d**0.5
    w2 = torch.randn(E, n, d, generator=g, dtype=dtype) / n**0.5
    return [t.requires_grad_(True) for t in (x, router_w, w1, w2)]


# ----------------------------------------------------------------------------------------------
# 2. The autograd logic matches the reference (float64, CPU)
# ----------------------------------------------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(T=st.integers(0, 24), d=st.sampled_from([8, 16]), n=st.sampled_from([8, 16]), E=st.integers(1, 6),
       k_frac=st.floats(0, 1), seed=st.integers(0, 2**31 - 1),
       routing=st.sampled_from(["topk", "token_rounding"]), backward=st.sampled_from(["reduced_memory", "standard"]))
@example(T=17, d=16, n=8, E=4, k_frac=0.5, seed=1, routing="token_rounding", backward="reduced_memory")
@example(T=0, d=8, n=8, E=2, k_frac=1.0, seed=0, routing="topk", backward="standard")
def test_autograd_logic_matches_reference_float64(T, d, n, E, k_frac, seed, routing, backward):
    k = 1 + int(k_frac * (E - 1))
    check_cpu_layer_against_reference(_params(T, d, n, E, seed), k, routing, backward, seed)


# ----------------------------------------------------------------------------------------------
# 3. What each backward mode caches
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("routing", ["topk", "token_rounding"])
def test_reduced_memory_caches_no_pd_tensor(routing):
    T, d, n, E, k = 64, 48, 16, 8, 4  # d distinct from n, 2n and E so a (P, d) tensor is recognisable
    x, router_w, w1, w2 = (p.detach().to(torch.bfloat16) for p in _params(T, d, n, E, seed=3))
    with torch.no_grad():
        _, dr = _cpu_layer(x, router_w, w1, w2, k, routing, "reduced_memory", tile_m=8)
    P = dr.meta.gather_idx.numel()
    found = fast_moe.saved_tensors(x, w1, w2, dr, "reduced_memory", TORCH_OPS)
    shapes = [s.shape for s in found]
    assert (P, d) not in shapes and (T * k, d) not in shapes, shapes
    assert (T, d) in shapes and (P, 2 * n) in shapes  # X and H
    expected = fast_moe.expected_saved_bytes(T, d, n, E, P, backward="reduced_memory")
    assert sum(s.nbytes for s in found) == expected["total"], (found, expected)

    standard = fast_moe.saved_tensors(x, w1, w2, dr, "standard", TORCH_OPS)
    assert [s.shape for s in standard].count((P, d)) == 2  # gathered X and Y
    expected_std = fast_moe.expected_saved_bytes(T, d, n, E, P, backward="standard")
    assert sum(s.nbytes for s in standard) == expected_std["total"]
    assert expected_std["total"] - expected["total"] == 2 * P * d * 2 - T * d * 2  # + Xg + Y - X


@pytest.mark.parametrize("routing", ["topk", "token_rounding"])
def test_forward_frees_y_and_gathered_x(routing):
    """Weak references: after the reduced-memory forward only H and the output are alive, also where
    saved-tensor hooks cannot look (a tensor kept on ctx); standard keeps gathered X and Y."""
    T, d, n, E, k = 16, 24, 8, 4, 3
    x, router_w, w1, w2 = (p.detach().to(torch.bfloat16).requires_grad_(True) for p in _params(T, d, n, E, seed=4))
    with torch.no_grad():
        _, dr = _cpu_layer(x, router_w, w1, w2, k, routing, "reduced_memory", tile_m=4)
    P = dr.meta.gather_idx.numel()
    for backward, also_alive in (("reduced_memory", []), ("standard", [(P, d), (P, d)])):
        out, alive = tensors_alive_after(lambda: fast_moe.run_experts(x, w1, w2, dr, backward, TORCH_OPS))
        assert out.requires_grad  # the graph, and with it ctx, is alive while we look
        assert sorted(shape for shape, _ in alive) == sorted([(P, 2 * n), (T, d), *also_alive]), alive


def test_reduced_memory_backward_frees_h_and_a_scaled_before_the_dx_rows(monkeypatch):
    """The backward's peak (what the GPU's memory history showed): the (P, d) rows dX~ must not
    meet H or A' (freed by autograd once DownProjection's backward returns), and dW1 must not meet
    dX~ (freed right after the gather-and-sum); no zeros are made for the non-differentiable A.
    Checked by weak references to the storages."""
    from torch.multiprocessing.reductions import StorageWeakRef

    alive: dict[str, StorageWeakRef] = {}
    seen: dict[str, list[str]] = {}

    def still_alive() -> list[str]:
        return sorted(name for name, ref in alive.items() if not ref.expired())

    def swiglu_gemm(x, w, meta):
        h, a = TORCH_OPS.gather_gemm_swiglu(x, w, meta)
        alive["H"] = StorageWeakRef(h.untyped_storage())
        return h, a

    def dh_gemm(*args):
        dh, a_scaled, ds = TORCH_OPS.dh_gemm(*args)
        alive["A'"] = StorageWeakRef(a_scaled.untyped_storage())
        return dh, a_scaled, ds

    def grouped_gemm(a, w, meta, transpose_w=False, *, role):
        if transpose_w:  # the dX~ GEMM
            seen["at dX~"] = still_alive()
        out = TORCH_OPS.grouped_gemm(a, w, meta, transpose_w)
        if transpose_w:
            alive["dX~"] = StorageWeakRef(out.untyped_storage())
        return out

    def varlen_k_gemm(a, b, meta, gather_a, transpose_out=False):
        if not transpose_out:  # dW1
            seen["at dW1"] = still_alive()
        return TORCH_OPS.varlen_k_gemm(a, b, meta, gather_a, transpose_out)

    import dataclasses

    ops = dataclasses.replace(TORCH_OPS, gather_gemm_swiglu=swiglu_gemm, dh_gemm=dh_gemm, grouped_gemm=grouped_gemm,
                              varlen_k_gemm=varlen_k_gemm)
    up_backward = fast_moe.UpProjection.backward

    def spy(ctx, dh, da):  # A is not differentiable: its gradient must not be materialized as (P, n) zeros
        seen["dA"] = da
        return up_backward(ctx, dh, da)

    monkeypatch.setattr(fast_moe.UpProjection, "backward", staticmethod(spy))
    x, router_w, w1, w2 = _params(32, 16, 8, 4, seed=5)
    r, meta, token_offsets = _route(x.detach() @ router_w.detach(), 2, "topk", 4)
    out = fast_moe.run_experts(x, w1, w2, fast_moe.DeviceRouting(meta, r.scores, token_offsets), "reduced_memory", ops)
    out.backward(torch.ones_like(out))
    assert seen == {"at dX~": [], "at dW1": [], "dA": None}, seen
    assert w1.grad is not None and x.grad is not None


# ----------------------------------------------------------------------------------------------
# 4. Bad inputs (checked before any work; these checks need no GPU)
# ----------------------------------------------------------------------------------------------
def _bf16(T=16, d=16, n=16, E=4):
    return [p.detach().to(torch.bfloat16) for p in _params(T, d, n, E, seed=0)]


def test_rejects_bad_inputs():
    x, rw, w1, w2 = _bf16()
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        fast_moe.moe_forward(x, rw, w1, w2, 2)
    with pytest.raises(TypeError, match=r"x must have dtype in \(bfloat16, float16\)"):
        fast_moe.moe_forward(x.float(), rw.float(), w1.float(), w2.float(), 2)
    x12, rw12, w1_12, w2_12 = _bf16(d=12)
    with pytest.raises(ValueError, match=r"x.shape\[1\] \(d\) must be a multiple of 8"):
        fast_moe.moe_forward(x12, rw12, w1_12, w2_12, 2)
    xn, rwn, w1n, w2n = _bf16(n=12)
    with pytest.raises(ValueError, match=r"\(n\) must be a multiple of 8"):
        fast_moe.moe_forward(xn, rwn, w1n, w2n, 2)
    with pytest.raises(ValueError, match="k must satisfy 1 <= k <= 4"):
        fast_moe.moe_forward(x, rw, w1, w2, 5)
    with pytest.raises(ValueError, match="backward must be one of"):
        fast_moe.moe_forward(x, rw, w1, w2, 2, backward="fast")
    with pytest.raises(ValueError, match="routing must be one of"):
        fast_moe.moe_forward(x, rw, w1, w2, 2, routing="expert_choice")
    with pytest.raises(ValueError, match="scoring must be one of"):
        fast_moe.moe_forward(x, rw, w1, w2, 2, scoring="sigmoid")
    with pytest.raises(ValueError, match="rounding_mode must be one of"):
        fast_moe.moe_forward(x, rw, w1, w2, 2, rounding_mode="banker")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        fast_moe.moe_forward(x, rw, w1, w2, 2, generator=3)
    with pytest.raises(ValueError, match="w2 must have shape"):
        fast_moe.moe_forward(x, rw, w1, w2[:, :8], 2)
    with pytest.raises(TypeError, match="w1 must have the dtype of x"):
        fast_moe.moe_forward(x, rw, w1.half(), w2, 2)


def test_token_rounding_with_more_experts_than_the_fast_router_is_rejected():
    from sonic_learn.fast.routing import MAX_EXPERTS

    x, rw, w1, w2 = _bf16(d=8, n=8, E=MAX_EXPERTS + 1)
    with pytest.raises(ValueError, match=rf"router_w.shape\[1\] \(E\) must be <= {MAX_EXPERTS}"):
        fast_moe.moe_forward(x, rw, w1, w2, 2, routing="token_rounding")
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):  # top-k routing takes any E
        fast_moe.moe_forward(x, rw, w1, w2, 2, routing="topk")


# ----------------------------------------------------------------------------------------------
# 5. device_metadata (the torch-ops metadata for E > the CuTe routing kernels' MAX_EXPERTS) is the
#    reference build_metadata, exactly; its token offsets give every token its pairs
# ----------------------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(T=st.integers(0, 40), E=st.integers(1, 9), k_frac=st.floats(0, 1), tile_m=st.sampled_from([1, 2, 4, 16]),
       routing=st.sampled_from(["topk", "token_rounding"]), seed=st.integers(0, 2**31 - 1))
@example(T=17, E=5, k_frac=0.5, tile_m=4, routing="token_rounding", seed=0)  # tokens with 0 or > K pairs
@example(T=0, E=3, k_frac=1.0, tile_m=1, routing="topk", seed=0)
def test_device_metadata_equals_reference_build_metadata(T, E, k_frac, tile_m, routing, seed):
    k = 1 + int(k_frac * (E - 1))
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed))
    r, meta, token_offsets = _route(logits, k, routing, tile_m)
    want = build_metadata(r)
    for field in ("expert_counts", "expert_offsets", "gather_idx", "pair_of_row", "row_of_pair"):
        assert torch.equal(getattr(meta, field).long(), getattr(want, field).long()), field
    per_token = torch.bincount(r.token_idx.long(), minlength=T)  # (T,)
    assert token_offsets.dtype == torch.int32
    assert torch.equal(token_offsets.long(), torch.cat([torch.zeros(1, dtype=torch.long), per_token.cumsum(0)]))


# ----------------------------------------------------------------------------------------------
# 5. Token rounding's padded layout: the weight gradients never see the padding rows
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("M, end", [(300, 300), (300, 200), (300, 100), (300, 0), (50, 10), (50, 50), (1, 0), (0, 0)])
def test_zero_rows_past_end(M, end):
    """Rows end .. end+K_TAIL_ROWS-1 (those that exist) become 0; every other row keeps its bits, NaN
    included; ``end`` = M (top-k: no padding) changes nothing."""
    b = torch.randn(M, 3, dtype=torch.float64)
    b[::7] = float("nan")
    want = b.clone()
    want[end:end + fast_moe.K_TAIL_ROWS] = 0
    c = torch.randn(M, 2, 5, dtype=torch.bfloat16)  # a second tensor of M rows, zeroed by the same call
    want_c = c.clone()
    want_c[end:end + fast_moe.K_TAIL_ROWS] = 0
    got = fast_moe.zero_rows_past_end(b, c, end=torch.tensor(end, dtype=torch.int32))
    assert got[0] is b and got[1] is c and torch.equal(torch.nan_to_num(b, nan=7.0), torch.nan_to_num(want, nan=7.0))
    assert torch.equal(b.isnan(), want.isnan())
    assert torch.equal(c.view(torch.int16), want_c.view(torch.int16))


def test_zero_rows_past_end_rejects_tensors_of_different_row_counts():
    with pytest.raises(ValueError, match="same number of rows"):
        fast_moe.zero_rows_past_end(torch.zeros(4, 2), torch.zeros(5, 2), end=torch.tensor(1))


@pytest.mark.parametrize("b_shape, b_dtype", [((5, 8), torch.bfloat16), ((4, 8), torch.float16)], ids=["rows", "dtype"])
def test_zero_rows_past_end_kernel_launcher_rejects_mismatched_tensors(b_shape, b_dtype):
    """The kernel indexes b with a's row count and dtype: a mismatch is a ValueError before any launch
    (raised on the CPU too, since the check comes first)."""
    from sonic_learn.fast import moe_kernels as mk

    a, b = torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(*b_shape, dtype=b_dtype)
    with pytest.raises(ValueError, match="same number of rows and dtype"):
        mk.zero_rows_past_end(a, b, torch.zeros(2, dtype=torch.int32))


def _tile_faithful_varlen_k(a, b, meta, gather_a, transpose_out=False, bk=64):
    """The production varlen-K GEMM's reads: per expert, whole k-tiles of b's rows from the expert's
    first row (b past the tensor's end reads 0, as TMA), times a's rows zeroed past f_e."""
    off = meta.expert_offsets.tolist()
    E, d, N = len(off) - 1, a.shape[1], b.shape[1]
    out = torch.zeros(E, d, N, dtype=a.dtype)
    for e in range(E):
        f = off[e + 1] - off[e]
        if f == 0:
            continue
        rows = torch.arange(off[e], off[e] + -(-f // bk) * bk)  # whole k-tiles
        b_tile = torch.where((rows < b.shape[0])[:, None], b[rows.clamp(max=b.shape[0] - 1)], 0)
        a_rows = meta.gather_idx[rows.clamp(max=b.shape[0] - 1)].long() if gather_a else rows.clamp(max=a.shape[0] - 1)
        a_tile = torch.where((rows < off[e + 1])[:, None], a[a_rows], 0)  # zero past the expert's f_e rows
        out[e] = a_tile.t() @ b_tile
    return out.transpose(1, 2).contiguous() if transpose_out else out


def test_zeroed_tail_is_what_the_varlen_k_reads_need():
    """With padding rows holding NaN (never written), a varlen-K GEMM that reads whole k-tiles times
    zeros gives NaN for the last expert; after ``zero_rows_past_end`` it gives the product of the
    same metadata cut to its P real rows (what the kernel reads with no padding)."""
    import dataclasses

    from sonic_learn.reference.routing import build_padded_metadata

    x, router_w, *_ = _params(40, 16, 8, 4, seed=2)
    r = token_rounding(x @ router_w, 2, tile_m=4, pad_to_bound=True)
    meta = build_padded_metadata(r)
    P, bound = int(meta.expert_offsets[-1]), r.num_pairs
    assert bound > P and P % 64  # padding rows exist, and the last k-tile reads into them
    b = torch.randn(bound, 8, dtype=torch.float64)
    b[P:] = float("nan")
    exact = _tile_faithful_varlen_k(x, b[:P], dataclasses.replace(meta, gather_idx=meta.gather_idx[:P]), True)
    assert _tile_faithful_varlen_k(x, b, meta, True).isnan().any()
    fast_moe.zero_rows_past_end(b, end=meta.expert_offsets[-1])
    torch.testing.assert_close(_tile_faithful_varlen_k(x, b, meta, True), exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backward", ["reduced_memory", "standard"])
def test_padded_layers_zero_the_varlen_k_operands(backward):
    """``DeviceRouting(padded=True)`` makes the backward zero the rows after the last expert of the
    varlen-K GEMMs' b operands (dH and A' reduced-memory, dY and dH standard) before dW1 / dW2, in
    one call of ``ExpertOps.zero_rows_past_end``; unpadded, it does not; on a layout without padding
    rows the result is unchanged."""
    import dataclasses

    calls = []

    def recording(a, b, offsets):
        calls.append((tuple(a.shape), tuple(b.shape)))
        TORCH_OPS.zero_rows_past_end(a, b, offsets)

    ops = dataclasses.replace(TORCH_OPS, zero_rows_past_end=recording)
    x, router_w, w1, w2 = _params(24, 16, 8, 4, seed=3)
    r, meta, token_offsets = _route(x.detach() @ router_w.detach(), 2, "topk", 4)
    outs = {}
    for padded in (False, True):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w1, w2)]
        dr = fast_moe.DeviceRouting(meta, r.scores.detach(), token_offsets, padded=padded)
        fast_moe.run_experts(*leaves, dr, backward, ops).square().sum().backward()
        outs[padded] = [t.grad for t in leaves]
        if not padded:
            assert calls == []
    P = 24 * 2
    assert calls == [((P, 16), (P, 8)) if backward == "reduced_memory" else ((P, 16), (P, 16))], calls
    for a, b in zip(outs[False], outs[True]):
        assert torch.equal(a, b)
