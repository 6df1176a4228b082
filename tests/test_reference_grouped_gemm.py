"""Property tests for sonic_learn.reference.grouped_gemm (naive vs gather-fused, varlen-K, cost model).

Problems are drawn as small specs (per-expert counts, tile, dims, dtype, seed); tensors are built
from the seed. Per-expert counts mix the edge cases 0, 1, tile-1, tile, tile+1 with random values.
Tolerance rule (teaching-anchors §3.3): the error of our result against a float64 oracle must be at
most 2x the error of torch's own same-dtype matmul, plus K * eps(accumulation dtype) * scale, where
scale = max(|x_e| @ |w_e|) bounds every partial sum (the classic dot-product rounding bound).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from sonic_learn.properties.grouped_gemm import metadata_for_counts, oracle
from sonic_learn.reference.grouped_gemm import (
    GemmCost,
    gather_fused_grouped_gemm,
    grouped_gemm_varlen_k,
    io_cost,
    naive_grouped_gemm,
    varlen_k_cost,
)
from sonic_learn.reference.routing import RoutingMetadata

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
GEMMS = (naive_grouped_gemm, gather_fused_grouped_gemm)


# --------------------------------------------------------------------------------------------------
# Problem specs and builders
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    counts: tuple[int, ...]  # f_e, rows per expert
    extra_tokens: int  # T = max(counts) + extra_tokens (tokens routed to no expert exist too)
    tile_m: int
    K: int
    N: int
    dtype: torch.dtype
    seed: int
    out_f32: bool = False  # ask for a float32 result (out_dtype=torch.float32)

    @property
    def T(self) -> int:
        return max(self.counts, default=0) + self.extra_tokens


@st.composite
def problems(draw, max_count: int = 300) -> Problem:
    tile_m = draw(st.sampled_from([1, 4, 16, 128]))
    edge = st.sampled_from(sorted({0, 1, max(tile_m - 1, 0), tile_m, tile_m + 1}))
    rand = st.integers(0, min(2 * tile_m + 3, max_count))
    E = draw(st.integers(1, 12))
    counts = tuple(draw(st.lists(st.one_of(edge, rand), min_size=E, max_size=E)))
    dtype = draw(st.sampled_from(DTYPES))
    return Problem(
        counts=counts,
        extra_tokens=draw(st.integers(0, 5)),
        tile_m=tile_m,
        K=draw(st.integers(1, 48)),
        N=draw(st.integers(1, 48)),
        dtype=dtype,
        seed=draw(st.integers(0, 2**31 - 1)),
        out_f32=dtype in (torch.bfloat16, torch.float16) and draw(st.booleans()),
    )


def build(p: Problem):
    gen = torch.Generator().manual_seed(p.seed)
    meta = metadata_for_counts(p.counts, p.T, gen)  # expert e takes counts[e] distinct random tokens
    x = torch.randn(p.T, p.K, generator=gen).to(p.dtype)  # (T, K)
    w = torch.randn(len(p.counts), p.K, p.N, generator=gen).to(p.dtype)  # (E, K, N)
    return x, w, meta


def expert_rows(meta: RoutingMetadata):
    off = meta.expert_offsets.tolist()
    return [slice(off[e], off[e + 1]) for e in range(meta.num_experts)]


def acc_eps(dtype: torch.dtype) -> float:
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def oracle_varlen_m(x, w, meta):
    """The shared float64 oracle, plus the magnitude scale max(|x_e| @ |w_e|)."""
    mag = oracle(x.abs(), w.abs(), meta)  # (M, N) bounds every partial sum of its row
    return oracle(x, w, meta), (mag.max().item() if mag.numel() else 0.0)


def torch_same_dtype_varlen_m(x, w, meta):
    idx = meta.gather_idx.long()
    out = torch.zeros(meta.num_rows, w.shape[2], dtype=x.dtype)
    for e, rows in enumerate(expert_rows(meta)):
        out[rows] = x[idx[rows]] @ w[e]
    return out


def max_err(y: torch.Tensor, ref64: torch.Tensor) -> float:
    return (y.double() - ref64).abs().max().item() if y.numel() else 0.0


# --------------------------------------------------------------------------------------------------
# naive == gather-fused == float64 oracle
# --------------------------------------------------------------------------------------------------

EDGE_COUNTS_128 = (0, 1, 127, 128, 129, 256, 5, 300)


@given(problems())
@example(Problem(counts=(0, 0, 0), extra_tokens=0, tile_m=128, K=8, N=4, dtype=torch.float32, seed=0))  # T = 0
@example(Problem(counts=(0, 0, 300, 0), extra_tokens=0, tile_m=128, K=32, N=16, dtype=torch.bfloat16, seed=1))
@example(Problem(counts=EDGE_COUNTS_128, extra_tokens=3, tile_m=128, K=128, N=64, dtype=torch.bfloat16, seed=2))
@example(Problem(counts=EDGE_COUNTS_128, extra_tokens=0, tile_m=128, K=64, N=96, dtype=torch.float16, seed=3))
@example(Problem(counts=(3, 4, 5), extra_tokens=1, tile_m=4, K=1, N=1, dtype=torch.float64, seed=4))
def test_naive_and_fused_match_float64_oracle(p: Problem):
    x, w, meta = build(p)
    out_dtype = torch.float32 if p.out_f32 else None
    ref, scale = oracle_varlen_m(x, w, meta)
    if p.out_f32:
        # bf16/fp16 products are exact in fp32: the only error is the fp32 accumulation.
        tol = p.K * acc_eps(torch.float32) * scale
    else:
        tol = 2 * max_err(torch_same_dtype_varlen_m(x, w, meta), ref) + p.K * acc_eps(p.dtype) * scale

    # naive and gather-fused are each held to the oracle with the same bound (so to each other too).
    for gemm in GEMMS:
        y = gemm(x, w, meta, tile_m=p.tile_m, out_dtype=out_dtype)
        assert y.shape == (meta.num_rows, p.N)
        assert y.dtype == (out_dtype or p.dtype)
        err = max_err(y, ref)
        assert err <= tol, f"{gemm.__name__}: max error {err} > tolerance {tol}"


@given(problems(max_count=40), st.data())
def test_rows_of_an_expert_depend_only_on_its_rows(p: Problem, data):
    """Permuting the rows inside each expert permutes the outputs; other tokens never leak in."""
    x, w, meta = build(p)
    assume(meta.num_rows > 0)
    _, scale = oracle_varlen_m(x, w, meta)
    # Two valid fp32/fp64 computations of the same row differ by at most 2 accumulation bounds,
    # plus one rounding step of the output dtype if they straddle a rounding boundary.
    tol = (2 * p.K * acc_eps(p.dtype) + torch.finfo(p.dtype).eps) * scale

    # A random permutation inside every expert's segment of grouped rows.
    gen = torch.Generator().manual_seed(p.seed + 1)
    perm = torch.arange(meta.num_rows)
    for rows in expert_rows(meta):
        n = rows.stop - rows.start
        perm[rows] = rows.start + torch.randperm(n, generator=gen)
    pair_of_row = meta.pair_of_row[perm]
    row_of_pair = torch.empty_like(pair_of_row)
    row_of_pair[pair_of_row.long()] = torch.arange(meta.num_rows, dtype=row_of_pair.dtype)
    permuted = dataclasses.replace(
        meta, gather_idx=meta.gather_idx[perm], pair_of_row=pair_of_row, row_of_pair=row_of_pair
    )

    # Overwrite every token that expert j does not read: expert j's rows must not change at all.
    j = data.draw(st.integers(0, meta.num_experts - 1), label="expert j")
    rows_j = expert_rows(meta)[j]
    others = torch.ones(p.T, dtype=torch.bool)
    others[meta.gather_idx[rows_j].long()] = False
    x_other = x.clone()
    x_other[others] = torch.randn(int(others.sum()), p.K, generator=gen).to(p.dtype)

    for gemm in GEMMS:
        y = gemm(x, w, meta, tile_m=p.tile_m)
        y_perm = gemm(x, w, permuted, tile_m=p.tile_m)
        assert max_err(y_perm, y[perm].double()) <= tol, gemm.__name__
        y_other = gemm(x_other, w, meta, tile_m=p.tile_m)
        assert torch.equal(y_other[rows_j], y[rows_j]), gemm.__name__


class _RecordShapes(TorchFunctionMode):
    """Records the row counts of every matmul's left operand and of every row-gather from x."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x, self.matmul_rows, self.gathered_rows = x, [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.Tensor.matmul, torch.Tensor.__matmul__, torch.matmul):
            self.matmul_rows.append(args[0].shape[0])
        if func is torch.Tensor.__getitem__ and args[0] is self.x and isinstance(args[1], torch.Tensor):
            self.gathered_rows.append(out.shape[0])
        return out


def test_fused_gathers_tile_by_tile_and_naive_pads():
    """The teaching claims, observed: the naive GEMM gathers all M rows at once and multiplies whole
    padded blocks; the fused GEMM gathers at most tile_m rows at a time and masks the last tile."""
    p = Problem(counts=(5, 0, 9), extra_tokens=0, tile_m=4, K=3, N=2, dtype=torch.float32, seed=7)
    x, w, meta = build(p)
    with _RecordShapes(x) as naive:
        naive_grouped_gemm(x, w, meta, tile_m=p.tile_m)
    with _RecordShapes(x) as fused:
        gather_fused_grouped_gemm(x, w, meta, tile_m=p.tile_m)
    assert naive.gathered_rows == [14]  # the whole (M, K) gathered copy
    assert naive.matmul_rows == [8, 12]  # ceil(5/4)*4 and ceil(9/4)*4; the empty expert runs nothing
    assert fused.gathered_rows == fused.matmul_rows == [4, 1, 4, 4, 1]  # tiles; last ones masked


@st.composite
def counts_with_exact_multiples(draw):
    """(counts, tile_m): every count is 0, an exact multiple of tile_m, or near one (tile-1, tile+1)."""
    tile_m = draw(st.sampled_from([1, 2, 4, 16, 128]))
    multiple = st.integers(1, 3).map(lambda q: q * tile_m)
    near = st.sampled_from(sorted({0, 1, max(tile_m - 1, 0), tile_m + 1, 2 * tile_m + 1}))
    counts = draw(st.lists(multiple | near | st.integers(0, 3 * tile_m), min_size=1, max_size=8))
    return tuple(counts), tile_m


@given(case=counts_with_exact_multiples(), seed=st.integers(0, 2**31 - 1))
@example(case=(EDGE_COUNTS_128, 128), seed=0)
@example(case=((4, 8, 0, 12), 4), seed=1)
def test_rows_multiplied_are_the_cost_models_padded_rows(case, seed):
    """The rows the GEMMs really multiply, observed, are what io_cost charges for: the naive GEMM
    multiplies padded_rows = sum ceil(f_e / tile_m) * tile_m (an exact multiple gets no extra tile,
    an empty expert none); the fused GEMM runs padded_rows / tile_m tiles of only the real rows."""
    counts, tile_m = case
    p = Problem(counts=counts, extra_tokens=1, tile_m=tile_m, K=3, N=2, dtype=torch.float32, seed=seed)
    x, w, meta = build(p)
    cost = io_cost(p.T, p.K, p.N, list(counts), tile_m=tile_m, variant="naive")
    with _RecordShapes(x) as naive:
        naive_grouped_gemm(x, w, meta, tile_m=tile_m)
    assert naive.matmul_rows == [-(-f // tile_m) * tile_m for f in counts if f > 0]
    assert sum(naive.matmul_rows) == cost.padded_rows
    assert naive.gathered_rows == [cost.rows]
    with _RecordShapes(x) as fused:
        gather_fused_grouped_gemm(x, w, meta, tile_m=tile_m)
    assert len(fused.matmul_rows) * tile_m == cost.padded_rows  # one matmul per tile
    assert sum(fused.matmul_rows) == cost.rows and max(fused.matmul_rows, default=0) <= tile_m


# --------------------------------------------------------------------------------------------------
# varlen-K (weight gradient)
# --------------------------------------------------------------------------------------------------


@given(problems(max_count=200), st.booleans())
@example(Problem(counts=EDGE_COUNTS_128, extra_tokens=2, tile_m=128, K=48, N=40, dtype=torch.bfloat16, seed=5), True)
@example(Problem(counts=(0, 0), extra_tokens=0, tile_m=1, K=3, N=2, dtype=torch.float32, seed=6), False)
def test_varlen_k_matches_float64_oracle(p: Problem, gather_a: bool):
    gen = torch.Generator().manual_seed(p.seed)
    meta = metadata_for_counts(p.counts, p.T, gen)
    a = torch.randn(p.T, p.K, generator=gen).to(p.dtype)  # (T, K), e.g. X
    b = torch.randn(meta.num_rows, p.N, generator=gen).to(p.dtype)  # (M, N), e.g. dH, grouped rows
    idx = meta.gather_idx.long()

    E = meta.num_experts
    ref = torch.zeros(E, p.K, p.N, dtype=torch.float64)
    mag = torch.zeros_like(ref)
    same = torch.zeros(E, p.K, p.N, dtype=p.dtype)
    for e, rows in enumerate(expert_rows(meta)):
        a_e = a[idx[rows]]
        ref[e] = torch.einsum("mk,mn->kn", a_e.double(), b[rows].double())
        mag[e] = torch.einsum("mk,mn->kn", a_e.double().abs(), b[rows].double().abs())
        same[e] = a_e.T @ b[rows]
    scale = mag.max().item() if mag.numel() else 0.0
    reduction = max(p.counts)
    tol = 2 * max_err(same, ref) + reduction * acc_eps(p.dtype) * scale

    a_in = a if gather_a else a[idx]  # (T, K) read through the index, or (M, K) already grouped
    out = grouped_gemm_varlen_k(a_in, b, meta, gather_a=gather_a)
    assert out.shape == (E, p.K, p.N) and out.dtype == p.dtype
    assert max_err(out, ref) <= tol
    for e, c in enumerate(p.counts):
        if c == 0:
            assert torch.count_nonzero(out[e]) == 0
    # transpose_out: dW2 in W2's orientation, (E, N, K), the same numbers
    out_t = grouped_gemm_varlen_k(a_in, b, meta, gather_a=gather_a, transpose_out=True)
    assert out_t.shape == (E, p.N, p.K) and out_t.is_contiguous()
    assert torch.equal(out_t, out.transpose(1, 2))


@given(problems(max_count=60))
def test_transpose_w_reads_weights_stored_n_by_k(p: Problem):
    """transpose_w=True takes w stored (E, N, K) and multiplies by w[e]^T: held to the same oracle."""
    x, w, meta = build(p)
    ref, scale = oracle_varlen_m(x, w, meta)
    tol = 2 * max_err(torch_same_dtype_varlen_m(x, w, meta), ref) + p.K * acc_eps(p.dtype) * scale
    w_nk = w.transpose(1, 2).contiguous()  # (E, N, K)
    for gemm in GEMMS:
        y = gemm(x, w_nk, meta, tile_m=p.tile_m, transpose_w=True)
        assert y.shape == (meta.num_rows, p.N)
        assert max_err(y, ref) <= tol


# --------------------------------------------------------------------------------------------------
# The cost model
# --------------------------------------------------------------------------------------------------


def test_io_cost_hand_worked_example():
    # T = 6 tokens, K = 8, N = 16, counts = [3, 0, 5], tile_m = 4, bf16 (2 bytes).
    # M = 8 rows, M_pad = 4 + 0 + 8 = 12, active experts = 2, weights = 2*8*16*2 = 512 bytes.
    naive = io_cost(6, 8, 16, [3, 0, 5], tile_m=4, dtype_bytes=2, variant="naive")
    # gather+pad: read 8*8*2 = 128, write 12*8*2 = 192; GEMM: read 192 + 512 = 704, write 12*16*2 = 384
    assert [(k.bytes_read, k.bytes_written) for k in naive.kernels] == [(128, 192), (704, 384)]
    assert (naive.bytes_read, naive.bytes_written, naive.bytes_moved) == (832, 576, 1408)
    # useful 2*8*8*16 = 2048; padding (12 - 8) rows: 2*4*8*16 = 1024
    assert (naive.flops_useful, naive.flops_padded, naive.flops_executed) == (2048, 1024, 3072)
    assert (naive.rows, naive.padded_rows, naive.source_bytes) == (8, 12, 6 * 8 * 2)

    fused = io_cost(6, 8, 16, [3, 0, 5], tile_m=4, dtype_bytes=2, variant="gather_fused")
    # one kernel: read 128 + 512 = 640, write 8*16*2 = 256; same FLOPs (the masked tile still runs)
    assert [(k.bytes_read, k.bytes_written) for k in fused.kernels] == [(640, 256)]
    assert (fused.bytes_read, fused.bytes_written) == (640, 256)
    assert (fused.flops_useful, fused.flops_padded) == (2048, 1024)

    # varlen-K, tile_k = 4: a gathered 8*8*2 = 128, b 8*16*2 = 256, out 3*8*16*2 = 768 bytes.
    vk_fused = varlen_k_cost(6, 8, 16, [3, 0, 5], tile_k=4, variant="gather_fused")
    assert (vk_fused.bytes_read, vk_fused.bytes_written) == (384, 768)
    vk_naive = varlen_k_cost(6, 8, 16, [3, 0, 5], tile_k=4, variant="naive")
    assert (vk_naive.bytes_read, vk_naive.bytes_written) == (128 + 384, 128 + 768)
    assert (vk_naive.flops_useful, vk_naive.flops_padded) == (2048, 1024)


@given(problems())
@example(Problem(counts=(0, 128, 256), extra_tokens=0, tile_m=128, K=16, N=8, dtype=torch.bfloat16, seed=0))
@example(Problem(counts=(0, 0), extra_tokens=0, tile_m=4, K=2, N=3, dtype=torch.float32, seed=0))  # T = 0
def test_io_cost_properties(p: Problem):
    x, w, meta = build(p)
    args = (p.T, p.K, p.N)
    naive = io_cost(*args, meta.expert_counts, tile_m=p.tile_m, variant="naive")
    fused = io_cost(*args, list(p.counts), tile_m=p.tile_m, variant="gather_fused")
    assert isinstance(naive, GemmCost) and naive.rows == fused.rows == meta.num_rows
    assert naive == io_cost(*args, list(p.counts), tile_m=p.tile_m)  # tensor and list counts agree
    if meta.num_rows > 0:
        assert fused.bytes_read < naive.bytes_read and fused.bytes_written < naive.bytes_written
    else:
        assert fused.bytes_moved == naive.bytes_moved == 0
    # Fusion saves bytes, not FLOPs; the padding waste is below one tile per expert.
    assert fused.flops_useful == naive.flops_useful == 2 * meta.num_rows * p.K * p.N
    assert fused.flops_padded == naive.flops_padded
    assert 0 <= naive.flops_padded < 2 * len(p.counts) * p.tile_m * p.K * p.N
    assert (naive.flops_padded == 0) == all(c % p.tile_m == 0 for c in p.counts)
    assert naive.padded_rows % p.tile_m == 0 and naive.rows <= naive.padded_rows < naive.rows + len(p.counts) * p.tile_m


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def _small():
    p = Problem(counts=(2, 0, 3), extra_tokens=1, tile_m=4, K=5, N=3, dtype=torch.float32, seed=0)
    return build(p)


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda x, w, m: ([1.0], w, m, {}), TypeError, "x must be a torch.Tensor"),
        (lambda x, w, m: (x[0], w, m, {}), ValueError, r"x must be 2-D"),
        (lambda x, w, m: (x, w[0], m, {}), ValueError, r"w must be 3-D"),
        (lambda x, w, m: (x, w[:, :4], m, {}), ValueError, r"w must have shape \(E, K, N\) with K = 5"),
        # transpose_w=True: w is stored (E, N, K); the stored shape is checked and named
        (lambda x, w, m: (x, w, m, {"transpose_w": True}), ValueError,
         r"w must have shape \(E, N, K\) with K = 5 \(x.shape\[1\]\) in dim 2 \(transpose_w=True\), got \(3, 5, 3\)"),
        (lambda x, w, m: (x, w, m, {"transpose_w": 1}), TypeError, r"transpose_w must be a bool"),
        (lambda x, w, m: (x, w[:2], m, {}), ValueError, r"meta.num_experts must equal .* E = 2"),
        (lambda x, w, m: (x[:3], w, m, {}), ValueError, r"meta.num_tokens must equal .* T = 3 \(x.shape\[0\]\)"),
        (lambda x, w, m: (x.int(), w.int(), m, {}), TypeError, r"x must have dtype in"),
        (lambda x, w, m: (x, w.double(), m, {}), TypeError, r"x and w must have the same dtype"),
        (lambda x, w, m: (x, w, m, {"tile_m": 0}), ValueError, r"tile_m must satisfy 1 <= tile_m"),
        (lambda x, w, m: (x, w, m, {"tile_m": 4.0}), TypeError, r"tile_m must be an int"),
        (lambda x, w, m: (x, w, "meta", {}), TypeError, r"meta must be a .*RoutingMetadata"),
        (lambda x, w, m: (x, w, m, {"out_dtype": torch.int32}), TypeError, r"out_dtype must be one of"),
        (lambda x, w, m: (x, w, m, {"out_dtype": "bf16"}), TypeError, r"out_dtype must be None or a torch.dtype"),
        (lambda x, w, m: (x.to("meta"), w.to("meta"), m, {}), ValueError, r"same device"),
        (lambda x, w, m: (x, w, dataclasses.replace(m, gather_idx=m.gather_idx + 100), {}), ValueError,
         r"meta.gather_idx must hold token indices in \[0, 4\)"),
        (lambda x, w, m: (x, w, dataclasses.replace(m, gather_idx=m.gather_idx[:-1]), {}), ValueError,
         r"meta.expert_offsets must start at 0 and end at .* M = 4"),
    ],
)
def test_varlen_m_bad_input(gemm, mutate, exc, match):
    x, w, meta = _small()
    args = mutate(x, w, meta)
    with pytest.raises(exc, match=match):
        gemm(*args[:3], **args[3])


@pytest.mark.parametrize(
    "kwargs_of, exc, match",
    [
        (lambda a, b, m: dict(a=a, b=b[:-1], meta=m), ValueError, r"b must have shape \(M, N\) with M = 5"),
        (lambda a, b, m: dict(a=a, b=b, meta=m, gather_a=False), ValueError, r"a must have shape \(M, K\) with M = 5"),
        (lambda a, b, m: dict(a=a[:3], b=b, meta=m), ValueError, r"meta.num_tokens must equal .* T = 3 \(a.shape\[0\]\)"),
        (lambda a, b, m: dict(a=a, b=b.half(), meta=m), TypeError, r"a and b must have the same dtype"),
        (lambda a, b, m: dict(a=a, b=b, meta=m, gather_a=1), TypeError, r"gather_a must be a bool"),
        (lambda a, b, m: dict(a=a, b=b[0], meta=m), ValueError, r"b must be 2-D"),
        (lambda a, b, m: dict(a=a, b=b, meta=None), TypeError, r"meta must be a"),
    ],
)
def test_varlen_k_bad_input(kwargs_of, exc, match):
    x, _, meta = _small()
    b = torch.randn(meta.num_rows, 3)
    kw = kwargs_of(x, b, meta)
    with pytest.raises(exc, match=match):
        grouped_gemm_varlen_k(kw.pop("a"), kw.pop("b"), kw.pop("meta"), **kw)


@pytest.mark.parametrize("fn", [io_cost, varlen_k_cost])
@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((4, 8, 8, [1, -1]), {}, ValueError, r"counts\[1\] must satisfy 0 <= counts\[1\] <= T = 4"),
        ((4, 8, 8, [5]), {}, ValueError, r"counts\[0\] must satisfy .* T = 4"),
        ((4, 8, 8, []), {}, ValueError, r"counts must have one entry per expert"),
        ((4, 8, 8, [1.5]), {}, TypeError, r"counts must hold ints"),
        ((4, 8, 8, torch.tensor([1.0])), {}, TypeError, r"counts must be an integer tensor"),
        ((4, 8, 8, torch.tensor([[1]])), {}, ValueError, r"counts must be 1-D"),
        ((4, 8, 8, "12"), {}, TypeError, r"counts must be a 1-D integer tensor or a list"),
        ((4, 0, 8, [1]), {}, ValueError, r"K must satisfy 1 <= K"),
        ((4, 8, 0, [1]), {}, ValueError, r"N must satisfy 1 <= N"),
        ((-1, 8, 8, [0]), {}, ValueError, r"T must satisfy 0 <= T"),
        ((4, 8, 8, [1]), {"dtype_bytes": 0}, ValueError, r"dtype_bytes must satisfy"),
        ((4, 8, 8, [1]), {"variant": "fast"}, ValueError, r"variant must be one of \('naive', 'gather_fused'\)"),
    ],
)
def test_cost_bad_input(fn, args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_cost_bad_tile():
    with pytest.raises(ValueError, match=r"tile_m must satisfy 1 <= tile_m"):
        io_cost(4, 8, 8, [1], tile_m=0)
    with pytest.raises(ValueError, match=r"tile_k must satisfy 1 <= tile_k"):
        varlen_k_cost(4, 8, 8, [1], tile_k=0)
