"""GPU property tests: the CuTe-DSL grouped GEMMs agree with the reference / a float64 oracle.

Tolerance rule (teaching-anchors): the kernel's max error against a float64 oracle must be at most
2x the max error of torch's own same-dtype computation (cuBLAS, fp32 accumulate, output rounded to
the input dtype) against the same oracle, plus a tiny absolute slack.

"Poisoned outputs": the functions allocate their output with ``torch.empty``. Before each call we
allocate a block of exactly that size filled with NaN and free it, so the caching allocator hands
the NaN-filled block to the kernel; an element the kernel forgets to write stays NaN and fails.
"""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sonic_learn.fast._cute import fast_available
from sonic_learn.reference import grouped_gemm as ref
from sonic_learn.reference import moe as ref_moe
from sonic_learn.reference.routing import RoutingMetadata

pytestmark = pytest.mark.gpu

FAST_OK, FAST_WHY = fast_available() if torch.cuda.is_available() else (False, "no CUDA device")
needs_hopper = pytest.mark.skipif(not FAST_OK, reason=f"fast path unavailable: {FAST_WHY}")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
EDGE_COUNTS = (0, 1, 127, 128, 129)  # 0, 1, tile-1, tile, tile+1 for tile_m = 128


def make_meta(counts: list[int], T: int, gen: torch.Generator) -> RoutingMetadata:
    """Routing metadata with the given per-expert row counts; row tokens drawn at random from [0, T)."""
    E = len(counts)
    M = sum(counts)
    dev = "cuda"
    counts_t = torch.tensor(counts, dtype=torch.int32)
    offsets = torch.zeros(E + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts_t, 0)
    gather = torch.randint(0, max(T, 1), (M,), generator=gen, dtype=torch.int32)
    ar = torch.arange(M, dtype=torch.int32)
    return RoutingMetadata(
        expert_counts=counts_t.to(dev), expert_offsets=offsets.to(dev), gather_idx=gather.to(dev),
        pair_of_row=ar.to(dev), row_of_pair=ar.to(dev), num_tokens=T, num_experts=E,
    )


def poison(shape, dtype):
    """Leave a NaN-filled block of this size in the caching allocator (see module docstring)."""
    torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def check_close(name, got, oracle, torch_same_dtype, atol=1e-3):
    got64 = got.double()
    assert not torch.isnan(got64).any(), f"{name}: NaN in output (unwritten element or bad load)"
    kernel_err = (got64 - oracle).abs().max().item() if got.numel() else 0.0
    torch_err = (torch_same_dtype.double() - oracle).abs().max().item() if got.numel() else 0.0
    assert kernel_err <= 2 * torch_err + atol, f"{name}: kernel err {kernel_err:.3e} > 2 x torch err {torch_err:.3e} + {atol}"


@st.composite
def problems(draw):
    E = draw(st.integers(1, 6))
    style = draw(st.sampled_from(["edges", "random", "one_expert"]))
    if style == "edges":
        counts = [draw(st.sampled_from(EDGE_COUNTS)) for _ in range(E)]
    elif style == "random":
        counts = [draw(st.integers(0, 300)) for _ in range(E)]
    else:
        hot = draw(st.integers(0, E - 1))
        counts = [0] * E
        counts[hot] = draw(st.integers(1, 400))
    K = 8 * draw(st.integers(1, 40))
    N = 8 * draw(st.integers(1, 40))
    T = draw(st.integers(1, 300))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    out = draw(st.sampled_from([None, torch.float32]))
    seed = draw(st.integers(0, 2**31 - 1))
    return counts, T, K, N, dtype, out, seed


def varlen_m_oracle(x, w, meta):
    """float64 oracle and torch's same-dtype result for out[r] = x[g[r]] @ w[e(r)]."""
    offs = meta.expert_offsets.tolist()
    g = meta.gather_idx.long()
    N = w.shape[2]
    oracle = torch.zeros(len(g), N, dtype=torch.float64, device="cuda")
    same = torch.zeros(len(g), N, dtype=x.dtype, device="cuda")
    for e in range(len(offs) - 1):
        rows = slice(offs[e], offs[e + 1])
        if offs[e + 1] > offs[e]:
            xe = x[g[rows]]
            oracle[rows] = xe.double() @ w[e].double()
            same[rows] = xe @ w[e]
    return oracle, same


# The ladder: 2 teaching steps, the production kernel cooperative and ping-pong; the persistent
# kernels also with their grid capped at 2-3 CTAs, so that every CTA walks many tiles (the
# pipeline across tiles, ping-pong's turn taking between its two MMA warpgroups, and a TMA store
# buffer refilled while its previous bulk store may still be reading it); the cooperative kernel
# with its plain store done by the shared-memory copy-out instead of TMA (tma_store=False); and in
# clusters of 2 CTAs sharing B by multicast (one cluster only: many units per cluster), both the
# cooperative and the ping-pong kernel (where a slot is freed by one warpgroup's 4 warps in each CTA).
# The opt-in 128 x 192 tile (three 64-column swizzle atoms; N = 200, 136, 8 ... leave ragged
# n-tiles): the ping-pong kernel's lean plain store alone, with many tiles per CTA, in clusters of 2
# and with the copy-out store (its fused epilogues and transposed varlen-K store must refuse with
# a ValueError), and the cooperative kernel with every epilogue.
# (kernel, tile, max_ctas, tma_store, cluster_m); cluster_m None = the library's per-problem choice
# (varlen-K in pairs, varlen-M alone, ping-pong alone), so "ws" is the production default.
PP192 = (128, 192, 64)
KERNELS = [("v1", (128, 128, 64), None, True, None), ("sm90", (128, 128, 64), None, True, None),
           ("ws", (128, 256, 64), None, True, None), ("pingpong", (128, 128, 64), None, True, None),
           ("ws", (128, 256, 64), 3, True, 1), ("pingpong", (128, 128, 64), 2, True, None),
           ("ws", (128, 256, 64), None, False, None), ("ws", (128, 256, 64), None, True, 2),
           ("ws", (128, 256, 64), 3, True, 2), ("pingpong", (128, 128, 64), None, True, 2),
           ("pingpong", (128, 128, 64), 2, True, 2),
           ("pingpong", PP192, None, True, None), ("pingpong", PP192, 2, True, None),
           ("pingpong", PP192, 2, True, 2), ("pingpong", PP192, 3, False, None), ("ws", PP192, 3, True, None)]
DEFAULT_TILE_N = {"v1": 128, "sm90": 128, "ws": 256, "pingpong": 128}


def _kernel_id(kernel, tile, max_ctas, tma_store, cluster_m):
    return (kernel + (str(tile[1]) if tile[1] != DEFAULT_TILE_N[kernel] else "")
            + (f"-{max_ctas}ctas" if max_ctas else "") + ("" if tma_store else "-notma")
            + (f"-cluster{cluster_m}" if cluster_m else ""))


@pytest.fixture(params=KERNELS, ids=[_kernel_id(*k) for k in KERNELS])
def kernel_config(request):
    """The step of the ladder under test, as the immutable config the tests pass explicitly."""
    from sonic_learn.fast import grouped_gemm as fast

    kernel, tile, max_ctas, tma_store, cluster_m = request.param
    return fast.GemmConfig(kernel=kernel, tile=tile, max_ctas=max_ctas, tma_store=tma_store, cluster_m=cluster_m)


def configured(cfg):
    """The public grouped-GEMM functions with ``config=cfg`` passed on every call."""
    from sonic_learn.fast import grouped_gemm as gg

    names = ("naive_grouped_gemm", "gather_fused_grouped_gemm", "contiguous_grouped_gemm", "grouped_gemm_varlen_k",
             "gather_fused_grouped_gemm_swiglu", "gather_fused_grouped_gemm_dswiglu")
    return SimpleNamespace(config=cfg, **{n: functools.partial(getattr(gg, n), config=cfg) for n in names})


@needs_hopper
@settings(max_examples=10, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems())
@example(problem=([129, 0, 128, 1, 127], 200, 64, 72, "bf16", None, 0))
@example(problem=([0, 0, 300], 100, 1536, 512, "bf16", None, 1))  # all rows on one expert, d = 1536
@example(problem=([129, 0, 257, 1], 200, 256, 200, "bf16", None, 2))  # N = 192 + 8: a ragged second n-tile
@example(problem=([0, 300, 5, 0], 80, 128, 136, "fp16", None, 3))  # N = 136: one tile, its third atom empty
@example(problem=([64, 0, 130], 90, 64, 8, "bf16", None, 4))  # N = 8: one 16-byte column chunk
@example(problem=([200, 1, 0, 127], 150, 512, 392, "bf16", None, 5))  # N = 2 x 192 + 8, K = 512 (dX~-like)
def test_varlen_m_matches_oracle(kernel_config, problem):
    fast = configured(kernel_config)  # every call gets config=kernel_config

    counts, T, K, N, dtype_name, out_dtype, seed = problem
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(seed)
    E = len(counts)
    meta = make_meta(counts, T, gen)
    x = torch.randn(T, K, generator=gen).to("cuda", dtype)
    w = (torch.randn(E, K, N, generator=gen) / K**0.5).to("cuda", dtype)
    oracle, same = varlen_m_oracle(x, w, meta)
    M, odt = sum(counts), out_dtype or dtype

    poison((M, N), odt)
    fused = fast.gather_fused_grouped_gemm(x, w, meta, out_dtype=out_dtype)
    assert fused.shape == (M, N) and fused.dtype == odt
    check_close("gather_fused", fused, oracle, same)
    # ... and within the same rule of the reference implementation (fp32 accumulate, rounded store).
    check_close("gather_fused vs reference", fused, oracle, ref.gather_fused_grouped_gemm(x, w, meta, out_dtype=out_dtype))

    poison((M, N), odt)
    naive = fast.naive_grouped_gemm(x, w, meta, out_dtype=out_dtype)
    check_close("naive", naive, oracle, same)
    # Same rows, same kernel math, same k order: the two must agree bit for bit.
    assert torch.equal(naive, fused)

    a = x[meta.gather_idx.long()].contiguous()
    poison((M, N), odt)
    contig = fast.contiguous_grouped_gemm(a, w, meta, out_dtype=out_dtype)
    assert torch.equal(contig, fused)

    again = fast.gather_fused_grouped_gemm(x, w, meta, out_dtype=out_dtype)
    assert torch.equal(again, fused), "two runs on the same inputs must be bitwise identical"

    # The same products with the weights stored transposed, (E, N, K), read K-major (transpose_w).
    w_t = w.transpose(1, 2).contiguous()  # (E, N, K)
    poison((M, N), odt)
    fused_t = fast.gather_fused_grouped_gemm(x, w_t, meta, out_dtype=out_dtype, transpose_w=True)
    assert fused_t.shape == (M, N) and fused_t.dtype == odt
    check_close("gather_fused transpose_w", fused_t, oracle, same)
    poison((M, N), odt)
    check_close("contiguous transpose_w", fast.contiguous_grouped_gemm(a, w_t, meta, out_dtype=out_dtype,
                                                                       transpose_w=True), oracle, same)


@needs_hopper
@settings(max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems(), gather_a=st.booleans())
@example(problem=([129, 0, 128, 1, 127], 200, 64, 72, "bf16", None, 0), gather_a=True)
def test_varlen_k_matches_oracle(kernel_config, problem, gather_a):
    fast = configured(kernel_config)  # every call gets config=kernel_config

    counts, T, K, N, dtype_name, out_dtype, seed = problem
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(seed)
    E, M = len(counts), sum(counts)
    meta = make_meta(counts, T, gen)
    rows_a = T if gather_a else M
    a = torch.randn(rows_a, K, generator=gen).to("cuda", dtype)
    b = torch.randn(M, N, generator=gen).to("cuda", dtype)
    g = meta.gather_idx.long()
    offs = meta.expert_offsets.tolist()
    oracle = torch.zeros(E, K, N, dtype=torch.float64, device="cuda")
    same = torch.zeros(E, K, N, dtype=dtype, device="cuda")
    for e in range(E):
        rows = slice(offs[e], offs[e + 1])
        ae = a[g[rows]] if gather_a else a[rows]
        oracle[e] = ae.double().T @ b[rows].double()
        same[e] = ae.T @ b[rows]
    odt = out_dtype or dtype
    poison((E, K, N), odt)
    got = fast.grouped_gemm_varlen_k(a, b, meta, gather_a=gather_a, out_dtype=out_dtype)
    assert got.shape == (E, K, N) and got.dtype == odt
    check_close("varlen_k", got, oracle, same, atol=1e-3 * max(1, M) ** 0.5)
    reference = ref.grouped_gemm_varlen_k(a, b, meta, gather_a=gather_a, out_dtype=out_dtype)
    check_close("varlen_k vs reference", got, oracle, reference, atol=1e-3 * max(1, M) ** 0.5)
    for e in range(E):
        if counts[e] == 0:
            assert torch.count_nonzero(got[e]) == 0, "an expert with no rows must get a zero gradient"
    again = fast.grouped_gemm_varlen_k(a, b, meta, gather_a=gather_a, out_dtype=out_dtype)
    assert torch.equal(again, got)
    # transpose_out: the same tiles stored as out[e]^T (E, N, K) by the epilogue: bit for bit (refused
    # by the lean ping-pong 128 x 192 tile, which runs the plain store only).
    if not fast.config.fused_epilogues:
        with pytest.raises(ValueError, match=r"the transposed varlen-K store \(transpose_out=True\)"):
            fast.grouped_gemm_varlen_k(a, b, meta, gather_a=gather_a, out_dtype=out_dtype, transpose_out=True)
        return
    poison((E, N, K), odt)
    got_t = fast.grouped_gemm_varlen_k(a, b, meta, gather_a=gather_a, out_dtype=out_dtype, transpose_out=True)
    assert got_t.shape == (E, N, K) and got_t.is_contiguous()
    assert torch.equal(got_t, got.transpose(1, 2))


@needs_hopper
@settings(max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems())
@example(problem=([129, 0, 128, 1, 127], 200, 64, 272, "bf16", None, 0))  # 2n = 272: a partial N tile
def test_swiglu_epilogue_matches_unfused(kernel_config, problem):
    """The up-projection with SwiGLU in its epilogue stores the same H as the plain GEMM and the same A
    as the standalone SwiGLU kernel on that H (bit for bit), every element written."""
    fast = configured(kernel_config)  # every call gets config=kernel_config
    from sonic_learn.fast import moe_kernels as mk

    counts, T, K, N, dtype_name, _, seed = problem
    N = 16 * max(1, N // 16)  # 2n with n a multiple of 8
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(seed)
    meta = make_meta(counts, T, gen)
    x = (2 * torch.randn(T, K, generator=gen)).to("cuda", dtype)  # O(1) gate values: silu not ~linear
    w = (torch.randn(len(counts), K, N, generator=gen) / K**0.5).to("cuda", dtype)
    M = sum(counts)
    fused = fast.config.fused_epilogues  # the lean ping-pong 128 x 192 tile: the plain store + the SwiGLU kernel
    if not fused:
        with pytest.raises(ValueError, match=r"the fused epilogue='swiglu' \(fused=True\)"):
            fast.gather_fused_grouped_gemm_swiglu(x, w, meta)
    poison((M, N // 2), dtype)
    poison((M, N), dtype)
    h, a = fast.gather_fused_grouped_gemm_swiglu(x, w, meta, fused=fused)
    assert h.shape == (M, N) and a.shape == (M, N // 2) and a.dtype == dtype
    assert not torch.isnan(h).any() and not torch.isnan(a).any(), "an element of H or A was not written"
    assert torch.equal(h, fast.gather_fused_grouped_gemm(x, w, meta))
    assert torch.equal(a, mk.swiglu(h))


def _ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of the last place between two same-sign 16-bit float tensors."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    return int((ia - ib).abs().max().item()) if a.numel() else 0


def dh_inputs(problem):
    """The dH kernel's inputs for a drawn problem (counts per expert, T, d = the GEMM's K, n, dtype,
    _, seed): routing metadata, dO (T, d), W2 (E, n, d), H (M, 2n) and the rows' scores (M,)."""
    counts, T, d, n, dtype_name, _, seed = problem
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(seed)
    meta = make_meta(counts, T, gen)
    M, E = sum(counts), len(counts)
    dout = torch.randn(T, d, generator=gen).to("cuda", dtype)
    w2 = (torch.randn(E, n, d, generator=gen) / d**0.5).to("cuda", dtype)  # (E, n, d)
    h = (2 * torch.randn(M, 2 * n, generator=gen)).to("cuda", dtype)
    row_scores = torch.rand(M, generator=gen).to("cuda")
    return meta, dout, w2, h, row_scores


@needs_hopper
@settings(max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems())
@example(problem=([129, 0, 128, 1, 127], 200, 64, 272, "bf16", None, 0))  # n = 272: a partial N tile
@example(problem=([300, 5], 50, 128, 520, "bf16", None, 1))  # n = 520: 3 n-tiles of 256 -> 3 dS partials
def test_dswiglu_epilogue_matches_unfused(kernel_config, problem):
    """The backward's dH kernel (dA' GEMM + dSwiGLU + dS + A' in the epilogue) against the unfused pair:
    the dA' GEMM, then moe_kernels.swiglu_backward_scaled. dH and A' are the same arithmetic on the
    same rounded inputs (at most 1 ulp apart, where the compiler contracts differently, and almost
    all equal); dS differs only in the order of its fp32 sum."""
    fast = configured(kernel_config)  # every call gets config=kernel_config
    from sonic_learn.fast import moe_kernels as mk

    meta, dout, w2, h, row_scores = dh_inputs(problem)
    M, n, dtype = h.shape[0], w2.shape[1], h.dtype
    poison((M, 2 * n), dtype)
    poison((M, n), dtype)
    poison((M, -(-n // fast.config.tile[1])), torch.float32)  # the dS partials, one per n-tile
    fused = fast.config.fused_epilogues  # the lean ping-pong 128 x 192 tile: the unfused pair
    if not fused:
        with pytest.raises(ValueError, match=r"the fused epilogue='dswiglu' \(fused=True\)"):
            fast.gather_fused_grouped_gemm_dswiglu(dout, w2, meta, h, row_scores)
    dh, a_scaled, ds = fast.gather_fused_grouped_gemm_dswiglu(dout, w2, meta, h, row_scores, fused=fused)
    assert dh.shape == (M, 2 * n) and a_scaled.shape == (M, n) and ds.shape == (M,) and ds.dtype == torch.float32
    assert not torch.isnan(dh).any() and not torch.isnan(a_scaled).any(), "unwritten element"
    assert not torch.isnan(ds).any(), "an unwritten dS partial"

    da_prime = fast.gather_fused_grouped_gemm(dout, w2, meta, transpose_w=True)  # (M, n)
    rows = torch.arange(M, dtype=torch.int32, device="cuda")
    dh_u, a_u, ds_u = mk.swiglu_backward_scaled(h, da_prime, row_scores, rows)
    for name, got, want in (("dH", dh, dh_u), ("A'", a_scaled, a_u)):
        assert _ulp_diff(got, want) <= 1, name
        assert (got == want).float().mean().item() >= 0.99 if got.numel() else True, name
    # dS against a float64 oracle from the same rounded dA' and H (fp32 sums: relative 1e-4 of the scale)
    g, u = h[:, 0::2].double(), h[:, 1::2].double()
    ds64 = (da_prime.double() * u * g * torch.sigmoid(g)).sum(1)
    scale = (da_prime.double() * u * g * torch.sigmoid(g)).abs().sum(1).max().item() if M else 0.0
    assert (ds.double() - ds64).abs().max().item() <= 1e-4 * scale + 1e-6 if M else True


@needs_hopper
@pytest.mark.parametrize("base", [dict(), dict(max_ctas=3), dict(kernel="pingpong", cluster_m=2),
                                  dict(kernel="pingpong", cluster_m=2, max_ctas=2)],
                         ids=["ws", "ws-3ctas", "pingpong-cluster2", "pingpong-2ctas-cluster2"])
@settings(max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems())
@example(problem=([129, 0, 128, 1, 127], 200, 64, 272, "bf16", None, 0))  # ragged rows, a partial n-tile
@example(problem=([300, 5], 50, 1536, 520, "bf16", None, 1))  # K = 1536: the prefetch well before the end
@example(problem=([0, 7, 0], 20, 64, 8, "fp16", None, 2))  # n = 8: 32 bytes of H per row, one k-tile
def test_epi_prefetch_changes_no_bit_of_the_dh_kernel(base, problem):
    """GemmConfig(epi_prefetch=N) only asks L2 to fetch H early: dH, A' and the dS partials are
    the kernel's without it, bit for bit (and the pipeline, whose producer loop issues it, still
    completes on ragged experts, short k-loops and many tiles per CTA)."""
    from sonic_learn.fast import grouped_gemm as gg

    meta, dout, w2, h, row_scores = dh_inputs(problem)
    M, n, dtype = h.shape[0], w2.shape[1], h.dtype
    outs = []
    for prefetch in (0, 8):
        poison((M, 2 * n), dtype)
        poison((M, n), dtype)
        cfg = gg.GemmConfig(**base, epi_prefetch=prefetch)
        outs.append(gg.gather_fused_grouped_gemm_dswiglu(dout, w2, meta, h, row_scores, config=cfg))
    for name, without, with_pf in zip(("dH", "A'", "dS"), *outs):
        assert without.shape == with_pf.shape and not torch.isnan(with_pf).any(), name
        assert torch.equal(without, with_pf), f"{name} changed with epi_prefetch"


@needs_hopper
def test_realistic_shape_7b_up_proj_slice(kernel_config):
    """A slice of the 7B up-projection (d = 1536, 2n = 512) with uniform routing over 16 experts."""
    fast = configured(kernel_config)  # every call gets config=kernel_config

    gen = torch.Generator().manual_seed(7)
    T, K, N, E, topk = 2048, 1536, 512, 16, 4
    experts = torch.rand(T, E, generator=gen).topk(topk, dim=1).indices.flatten()
    counts = torch.bincount(experts, minlength=E).tolist()
    meta = make_meta(counts, T, gen)
    x = torch.randn(T, K, generator=gen).to("cuda", torch.bfloat16)
    w = (torch.randn(E, K, N, generator=gen) / K**0.5).to("cuda", torch.bfloat16)
    oracle, same = varlen_m_oracle(x, w, meta)
    check_close("7b-slice", fast.gather_fused_grouped_gemm(x, w, meta), oracle, same)


@needs_hopper
@pytest.mark.parametrize("cluster_m", [None, 2], ids=["alone", "cluster2"])
@pytest.mark.parametrize("role", ["down", "dx"])
def test_pingpong_192_layer_gemm_shapes(role, cluster_m):
    """The GEMMs the 128 x 192 ping-pong tile is for, on slices of the 7B layer (d = 1536 = 8 x 192,
    n = 256): the down-projection Y = A W2 (K = n: four k-tiles per tile) and dX~ = dH W1^T (K = 2n,
    W1 (E, d, 2n) read K-major, transpose_w=True), A contiguous in grouped order, 16 experts with
    two empty and ragged counts; against the float64 oracle, every element written, two runs bitwise
    equal; with cluster_m=2 each pair of m-tiles shares its B tiles by multicast."""
    from sonic_learn.fast import grouped_gemm as fast

    cfg = fast.GemmConfig(kernel="pingpong", tile=PP192, cluster_m=cluster_m)
    gen = torch.Generator().manual_seed(192 + (cluster_m or 1))
    T, d, n, E, topk = 1024, 1536, 256, 16, 4
    experts = torch.rand(T, E, generator=gen).topk(topk, dim=1).indices.flatten()
    experts[experts == 3] = 4  # two empty experts
    experts[experts == 11] = 12
    counts = torch.bincount(experts, minlength=E).tolist()
    assert counts[3] == counts[11] == 0
    M = sum(counts)
    # A is already in grouped row order: row r is "token" r (the oracle then multiplies a[r] itself)
    meta = dataclasses.replace(make_meta(counts, M, gen), gather_idx=torch.arange(M, dtype=torch.int32, device="cuda"))
    K = n if role == "down" else 2 * n
    a = torch.randn(M, K, generator=gen).to("cuda", torch.bfloat16)  # A (down) or dH (dX~), grouped rows
    w = (torch.randn(E, K, d, generator=gen) / K**0.5).to("cuda", torch.bfloat16)  # (E, K, N)
    stored = w if role == "down" else w.transpose(1, 2).contiguous()  # dX~: W1 as stored, (E, d, 2n)
    oracle, same = varlen_m_oracle(a, w, meta)
    poison((M, d), torch.bfloat16)
    got = fast.contiguous_grouped_gemm(a, stored, meta, transpose_w=role == "dx", config=cfg)
    check_close(f"pingpong 128x192 {role}", got, oracle, same)
    assert torch.equal(got, fast.contiguous_grouped_gemm(a, stored, meta, transpose_w=role == "dx", config=cfg))


@needs_hopper
@pytest.mark.parametrize("max_ctas", [None, 3], ids=["grid", "3ctas"])
@pytest.mark.parametrize("epi_subtile", [32, 64])
@settings(max_examples=10, deadline=None)
@given(problem=problems())
@example(problem=([129, 0, 128, 1, 127], 200, 64, 72, "bf16", None, 0))  # N = 72: subtiles past N clipped
@example(problem=([300, 0, 257, 64], 300, 256, 520, "fp16", None, 3))  # M = 621, a partial last subtile
@example(problem=([200, 0, 129], 100, 128, 264, "bf16", torch.float32, 5))  # fp32 output (tile 128 x 128)
@example(problem=([0, 1, 63, 64, 65, 127, 128, 129], 300, 64, 272, "bf16", None, 11))  # a warpgroup's edges
@example(problem=([129, 65, 0, 63], 150, 96, 528, "fp16", None, 13))  # 2n = 528: SwiGLU's 3rd n-tile clipped
def test_subtiled_epilogue_matches_oracle(epi_subtile, max_ctas, problem):
    """GemmConfig(epi_subtile=S): the plain store leaves in (64, S) subtiles through two staging
    buffers. Against the float64 oracle on ragged, empty and one-row experts (full warpgroup tiles
    by bulk stores, the expert's last rows by the masked subtile copy-out; 63 / 64 / 65 rows put
    one warpgroup of a tile on each path), and bit for bit equal to the whole-tile epilogue (same
    accumulators, only the store path differs); with 3 CTAs every CTA walks many tiles, so the
    buffers are refilled while earlier bulk stores may still read them. varlen-K (clusters of 2 by
    default) runs with the same config, and so does the fused SwiGLU epilogue, whose H and A
    subtiles leave by two TMA stores (H against the oracle, A against SwiGLU of the oracle's H,
    both equal to the whole-tile SwiGLU epilogue's)."""
    from sonic_learn.fast import grouped_gemm as gg

    cfg = gg.GemmConfig(epi_subtile=epi_subtile, max_ctas=max_ctas)
    whole = gg.GemmConfig(max_ctas=max_ctas)
    counts, T, K, N, dtype_name, out_dtype, seed = problem
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(seed)
    E, M = len(counts), sum(counts)
    meta = make_meta(counts, T, gen)
    x = torch.randn(T, K, generator=gen).to("cuda", dtype)
    w = (torch.randn(E, K, N, generator=gen) / K**0.5).to("cuda", dtype)
    oracle, same = varlen_m_oracle(x, w, meta)
    poison((M, N), out_dtype or dtype)
    got = gg.gather_fused_grouped_gemm(x, w, meta, out_dtype=out_dtype, config=cfg)
    check_close(f"subtiled S={epi_subtile}", got, oracle, same)
    assert torch.equal(got, gg.gather_fused_grouped_gemm(x, w, meta, out_dtype=out_dtype, config=whole))
    a = x[meta.gather_idx.long()].contiguous()
    poison((M, N), out_dtype or dtype)
    assert torch.equal(gg.contiguous_grouped_gemm(a, w, meta, out_dtype=out_dtype, config=cfg), got)
    # varlen-K (the weight gradient's GEMM) through the same subtiled store, transposed store untouched
    b = torch.randn(M, N, generator=gen).to("cuda", dtype)
    poison((E, K, N), out_dtype or dtype)
    dw = gg.grouped_gemm_varlen_k(x, b, meta, out_dtype=out_dtype, config=cfg)
    assert torch.equal(dw, gg.grouped_gemm_varlen_k(x, b, meta, out_dtype=out_dtype, config=whole))
    assert torch.equal(gg.grouped_gemm_varlen_k(x, b, meta, out_dtype=out_dtype, transpose_out=True, config=cfg),
                       dw.transpose(1, 2))
    # The up-projection with SwiGLU fused (2n = N rounded down to a multiple of 16, at least 16; 16-bit
    # output). Its own weights: for N < 16, w has too few columns (a slice would keep N of them).
    n2 = 16 * max(1, N // 16)
    w_up = (torch.randn(E, K, n2, generator=gen) / K**0.5).to("cuda", dtype)  # (E, K, 2n), gate / up interleaved
    oracle_h, same_h = varlen_m_oracle(x, w_up, meta)
    poison((M, n2 // 2), dtype)
    poison((M, n2), dtype)
    h, act = gg.gather_fused_grouped_gemm_swiglu(x, w_up, meta, config=cfg)
    check_close(f"subtiled SwiGLU H S={epi_subtile}", h, oracle_h, same_h)
    check_close(f"subtiled SwiGLU A S={epi_subtile}", act, ref_moe.swiglu(oracle_h), ref_moe.swiglu(same_h))
    h0, act0 = gg.gather_fused_grouped_gemm_swiglu(x, w_up, meta, config=whole)
    assert torch.equal(h, h0) and torch.equal(act, act0)


@needs_hopper
@pytest.mark.parametrize("cluster_m", [1, 2])
@pytest.mark.parametrize("E", [31, 33, 100, 2048])
def test_many_experts_tile_table(E, cluster_m):
    """The production kernel builds its expert table in shared memory with one warp (a chunk of
    experts per lane, then a warp scan): E around 32 (one or two experts per lane) and the 2048 cap
    (64 per lane), with empty experts and ragged counts, against the float64 oracle."""
    from sonic_learn.fast import grouped_gemm as fast

    gen = torch.Generator().manual_seed(E + cluster_m)
    pick = torch.randint(0, len(EDGE_COUNTS) + 1, (E,), generator=gen).tolist()
    counts = [EDGE_COUNTS[i] if i < len(EDGE_COUNTS) else 300 for i in pick]
    T, K, N = 64, 64, 136
    meta = make_meta(counts, T, gen)
    x = torch.randn(T, K, generator=gen).to("cuda", torch.bfloat16)
    w = (torch.randn(E, K, N, generator=gen) / K**0.5).to("cuda", torch.bfloat16)
    oracle, same = varlen_m_oracle(x, w, meta)
    poison((sum(counts), N), torch.bfloat16)
    got = fast.gather_fused_grouped_gemm(x, w, meta, config=fast.GemmConfig(cluster_m=cluster_m))
    check_close(f"E={E}", got, oracle, same)


@needs_hopper
def test_weights_of_exactly_2_31_elements():
    """The largest weights the kernels take: E * d * 2n = 2^31 (the paper's E = 512, d = 4096, n = 512
    shape). Its last index, 2^31 - 1, still fits the kernels' int32 arithmetic; the last expert's
    rows and weight gradient are checked against torch, where an overflow would show."""
    from sonic_learn.fast import grouped_gemm as fast

    E, d, N = 512, 4096, 1024
    assert E * d * N == 2**31
    gen = torch.Generator(device="cuda").manual_seed(3)
    w = torch.randn(E, d, N, device="cuda", dtype=torch.bfloat16, generator=gen)  # 4 GiB
    counts = [0] * E
    counts[0], counts[E - 1] = 64, 200
    meta = make_meta(counts, 256, torch.Generator().manual_seed(3))
    x = torch.randn(256, d, device="cuda", dtype=torch.bfloat16, generator=gen) / d**0.5
    last = slice(64, 264)  # the last expert's grouped rows
    xg = x[meta.gather_idx.long()]
    y = fast.gather_fused_grouped_gemm(x, w, meta)  # (264, N)
    check_close("last expert, varlen-M", y[last], xg[last].double() @ w[E - 1].double(), xg[last] @ w[E - 1])
    # the same storage seen as (E, N, K) = (512, 1024, 4096) by the K-major path: out = a @ w[e]^T
    w_nk = w.view(E, N, d)
    z = fast.contiguous_grouped_gemm(xg.contiguous(), w_nk, meta, transpose_w=True)  # (264, N)
    check_close("last expert, K-major", z[last], xg[last].double() @ w_nk[E - 1].double().T, xg[last] @ w_nk[E - 1].T)
    del w, w_nk, y, z
    b = torch.randn(264, N, device="cuda", dtype=torch.bfloat16, generator=gen) / N**0.5
    # the weight gradient of that size: (E, d, N) = 2^31 elements
    dw = fast.grouped_gemm_varlen_k(x, b, meta, gather_a=True)
    check_close("last expert, varlen-K", dw[E - 1], xg[last].double().T @ b[last].double(), xg[last].T @ b[last],
                atol=1e-2)
    assert torch.count_nonzero(dw[1:E - 1]) == 0


# ------------------------------------------------------------------------------------------------
# Bad inputs: clear errors before any launch
# ------------------------------------------------------------------------------------------------
def _good(dtype=torch.bfloat16, dev="cuda"):
    gen = torch.Generator().manual_seed(0)
    meta = make_meta([3, 5], 6, gen) if dev == "cuda" else None
    x = torch.randn(6, 16, dtype=dtype, device=dev)
    w = torch.randn(2, 16, 24, dtype=dtype, device=dev)
    return x, w, meta


@needs_hopper
def test_bad_inputs_raise_clear_errors():
    from sonic_learn.fast import grouped_gemm as fast

    x, w, meta = _good()
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        fast.gather_fused_grouped_gemm(x.cpu(), w, meta)
    with pytest.raises(TypeError, match="x must have dtype"):
        fast.gather_fused_grouped_gemm(x.float(), w.float(), meta)
    with pytest.raises(TypeError, match="w must have the same dtype"):
        fast.gather_fused_grouped_gemm(x, w.half(), meta)
    with pytest.raises(ValueError, match="K = w.shape"):
        fast.gather_fused_grouped_gemm(x[:, :8], w, meta)
    with pytest.raises(ValueError, match="multiple of 8"):
        fast.gather_fused_grouped_gemm(x[:, :12], w[:, :12], meta)
    with pytest.raises(ValueError, match="multiple of 8"):
        fast.gather_fused_grouped_gemm(x, w[:, :, :20], meta)
    with pytest.raises(ValueError, match="E = meta.num_experts"):
        fast.gather_fused_grouped_gemm(x, w[:1], meta)
    with pytest.raises(TypeError, match="meta must be"):
        fast.gather_fused_grouped_gemm(x, w, {"offsets": 0})
    big = make_meta([0] * 2049, 4, torch.Generator().manual_seed(0))  # one expert past the table
    with pytest.raises(ValueError, match=r"1 <= E <= 2048 \(the production kernel's expert table"):
        fast.gather_fused_grouped_gemm(x, w[:1].expand(2049, -1, -1), big)
    with pytest.raises(ValueError, match="tile_m must be 128"):
        fast.gather_fused_grouped_gemm(x, w, meta, tile_m=64)
    with pytest.raises(TypeError, match="out_dtype"):
        fast.gather_fused_grouped_gemm(x, w, meta, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="M = 8 rows"):
        fast.contiguous_grouped_gemm(x, w, meta)
    huge = torch.empty(1, 16, dtype=torch.bfloat16, device="cuda").expand(2**27 + 1, 16)
    with pytest.raises(ValueError, match="2\\^31"):
        fast.gather_fused_grouped_gemm(huge, w, meta)
    b = torch.randn(8, 24, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="b must have M = 8 rows"):
        fast.grouped_gemm_varlen_k(x, b[:7], meta)
    with pytest.raises(ValueError, match="a must have M = 8 rows"):
        fast.grouped_gemm_varlen_k(x, b, meta, gather_a=False)
    with pytest.raises(ValueError, match="multiple of 8"):
        fast.grouped_gemm_varlen_k(x[:, :12], b, meta)
    with pytest.raises(ValueError, match="x must have T = meta.num_tokens = 6 rows"):
        fast.gather_fused_grouped_gemm(x[:5], w, meta)
    with pytest.raises(ValueError, match="a must have T = meta.num_tokens = 6 rows"):
        fast.grouped_gemm_varlen_k(x[:5], b, meta)
    # transpose_w: w is (E, N, K); the K check reads w.shape[2] and names the layout
    with pytest.raises(ValueError, match=r"K = w.shape\[2\] = 8 \(w is \(E, N, K\)"):
        fast.gather_fused_grouped_gemm(x, w.transpose(1, 2)[..., :8].contiguous(), meta, transpose_w=True)
    with pytest.raises(TypeError, match="transpose_w must be a bool"):
        fast.gather_fused_grouped_gemm(x, w, meta, transpose_w=1)
    # one expert's (K, N) block of 2^31 elements: its TMA stride would not fit 32 bits
    one = make_meta([6], 6, torch.Generator().manual_seed(1))
    wide_w = torch.empty(1, 1, 1, dtype=torch.bfloat16, device="cuda").expand(1, 32768, 65536)
    wide_x = torch.empty(1, 1, dtype=torch.bfloat16, device="cuda").expand(6, 32768)
    with pytest.raises(ValueError, match="fewer than 2\\^31 elements"):
        fast.gather_fused_grouped_gemm(wide_x, wide_w, one)
    h = torch.randn(8, 48, dtype=torch.bfloat16, device="cuda")
    w2 = torch.randn(2, 24, 16, dtype=torch.bfloat16, device="cuda")  # (E, n, d)
    scores = torch.rand(8, device="cuda")
    with pytest.raises(TypeError, match="fused must be a bool"):
        fast.gather_fused_grouped_gemm_dswiglu(x, w2, meta, h, scores, fused="no")
    with pytest.raises(ValueError, match="row_scores must have shape"):
        fast.gather_fused_grouped_gemm_dswiglu(x, w2, meta, h, scores[:7])
    with pytest.raises(TypeError, match="h must have dout's dtype"):
        fast.gather_fused_grouped_gemm_dswiglu(x, w2, meta, h.half(), scores)
    with pytest.raises(TypeError, match="transpose_out must be a bool"):
        fast.grouped_gemm_varlen_k(x, b, meta, transpose_out="yes")


@needs_hopper
def test_ladder_main_validates_and_times_every_step(capsys):
    """``python -m sonic_learn.fast.grouped_gemm``: every step passes its check and gets a time."""
    from sonic_learn.fast import grouped_gemm as fast
    from sonic_learn.fast.grouped_gemm.__main__ import main

    assert main(["--T", "512", "--d", "256", "--n", "128", "--E", "8", "--K", "2", "--reps", "3"]) == 0
    out = capsys.readouterr().out
    for step in fast.STEPS:
        line = next(ln for ln in out.splitlines() if ln.startswith(step + " "))
        assert "FAILED" not in line, line
