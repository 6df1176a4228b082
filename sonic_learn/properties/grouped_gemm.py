"""Properties of the varlen-M grouped GEMMs and their IO cost model (pair 3: naive vs gather-fused).

Functions checked (signatures of ``sonic_learn.reference.grouped_gemm``):

* ``fn(x, w, meta, *, tile_m, out_dtype) -> y`` for both ``naive_grouped_gemm`` and
  ``gather_fused_grouped_gemm``: row r of y is ``x[gather_idx[r]] @ w[e]`` for the expert e that
  owns row r, accumulated in float32 (float64 for float64 inputs).
* ``io_cost(T, K, N, counts, *, tile_m, dtype_bytes, variant) -> GemmCost``: the first-order HBM
  bytes and FLOPs of both variants.

Uninitialized memory is filled with NaN while an implementation runs (``torch.empty`` returns NaN),
so a row that is never written (a wrong tile mask) shows up instead of hiding in stale memory.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from hypothesis import strategies as st

from sonic_learn.properties import BadInput, Property, expect, expect_raises, seeded
from sonic_learn.reference import grouped_gemm as ref
from sonic_learn.reference.routing import Routing, build_metadata

DTYPES = (torch.float32, torch.float64, torch.bfloat16)


class GemmCase(NamedTuple):
    T: int
    K: int  # the GEMM's reduction dim
    N: int
    counts: tuple  # rows per expert, f_e <= T
    tile_m: int
    dtype: torch.dtype
    out_f32: bool  # pass out_dtype=torch.float32
    seed: int


@st.composite
def gemm_cases(draw, edge_only: bool = False) -> GemmCase:
    tile = draw(st.sampled_from((1, 2, 4, 8, 16)))
    T = draw(st.integers(0, 40))
    edge = st.sampled_from(sorted({c for c in (0, 1, tile - 1, tile, tile + 1, 2 * tile + 1) if 0 <= c <= T}))
    any_count = edge if edge_only else (edge | st.integers(0, T))
    counts = tuple(draw(st.lists(any_count, min_size=1, max_size=6)))
    return GemmCase(T, draw(st.integers(1, 24)), draw(st.integers(1, 24)), counts, tile,
                    draw(st.sampled_from(DTYPES)), draw(st.booleans()), draw(st.integers(0, 2**31 - 1)))


def metadata_for_counts(counts, T: int, g: torch.Generator):
    """The metadata of a routing of T tokens where expert e takes counts[e] distinct random tokens."""
    E = len(counts)
    chosen = torch.zeros(T, E, dtype=torch.bool)  # (T, E)
    for e, f in enumerate(counts):
        chosen[torch.randperm(T, generator=g)[:f], e] = True
    tokens, experts = chosen.nonzero(as_tuple=True)  # token-sorted pairs
    routing = Routing(tokens.int(), experts.int(), torch.ones(tokens.numel()), num_tokens=T, num_experts=E)
    return build_metadata(routing)


def make_problem(case: GemmCase):
    """x (T, K), w (E, K, N) and the metadata of a routing where expert e takes counts[e] distinct tokens."""
    g = seeded(case.seed)
    E = len(case.counts)
    x = torch.randn(case.T, case.K, generator=g, dtype=torch.float64).to(case.dtype)  # (T, K)
    w = (torch.randn(E, case.K, case.N, generator=g, dtype=torch.float64) / case.K**0.5).to(case.dtype)  # (E, K, N)
    return x, w, metadata_for_counts(case.counts, case.T, g)


def oracle(x: torch.Tensor, w: torch.Tensor, meta) -> torch.Tensor:
    """Row by row in float64: y[r] = x[gather_idx[r]] @ w[expert of r]."""
    offsets = meta.expert_offsets.tolist()
    y = torch.zeros(meta.num_rows, w.shape[2], dtype=torch.float64)
    for e in range(w.shape[0]):
        rows = slice(offsets[e], offsets[e + 1])
        y[rows] = x.double()[meta.gather_idx[rows].long()] @ w[e].double()
    return y  # (M, N)


@contextlib.contextmanager
def nan_filled_empty():
    """While active, torch.empty & co. return NaN-filled memory (so unwritten rows are visible)."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


def _tolerance(dtype: torch.dtype) -> float:
    # Accumulation in float32 (float64), one rounding to the output dtype at the end.
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]


def _locate(meta, tile_m: int, r: int) -> str:
    offsets = meta.expert_offsets.tolist()
    e = max(i for i in range(len(offsets) - 1) if offsets[i] <= r)
    i, f = r - offsets[e], offsets[e + 1] - offsets[e]
    tiles = -(-f // tile_m)
    where = f"row {r} = row {i} of expert {e} (f_e = {f}), in m-tile {i // tile_m} of {tiles} at position {i % tile_m}"
    if i // tile_m == tiles - 1:
        where += "; it is in the expert's LAST tile: check the mask (rows offsets[e] + m0 .. offsets[e] + min(m0 + tile_m, f_e) - 1)"
    return where


def check_gemm_agrees(fn, case: GemmCase) -> None:
    """y equals the float64 row-by-row oracle within the dtype's tolerance, in the requested dtype."""
    x, w, meta = make_problem(case)
    out_dtype = torch.float32 if case.out_f32 else None
    with nan_filled_empty():
        y = fn(x, w, meta, tile_m=case.tile_m, out_dtype=out_dtype)
    want_dtype = out_dtype or x.dtype
    M = meta.num_rows
    expect(isinstance(y, torch.Tensor) and tuple(y.shape) == (M, case.N),
           f"[agrees_with_oracle] must return (M, N) = ({M}, {case.N}), got {tuple(getattr(y, 'shape', ()))}")
    expect(y.dtype == want_dtype, f"[agrees_with_oracle] must return out_dtype (default x.dtype) = {want_dtype}, got {y.dtype}")
    want = oracle(x, w, meta)
    # Relative to the row's scale: |y - want| <= tol * (1 + |x_row| * |w_e| bound), here the oracle's magnitude + 1.
    tol = _tolerance(x.dtype if out_dtype is None else max((x.dtype, out_dtype), key=_tolerance))
    err = (y.double() - want).abs()
    bad = ~(err <= tol * (1 + want.abs()))  # also catches NaN (an unwritten row)
    if bad.any():
        r, c = (int(v) for v in bad.nonzero()[0])
        got = y[r, c].item()
        kind = "was never written (NaN from uninitialized memory)" if got != got else f"is {got}, expected {want[r, c].item():.6g}"
        raise AssertionError(f"[agrees_with_oracle] y[{r}, {c}] {kind}: {_locate(meta, case.tile_m, r)}; "
                             f"{int(bad.any(1).sum())} of {M} rows are wrong")


def bad_gemm_inputs() -> list[BadInput]:
    x, w = torch.randn(6, 4), torch.randn(3, 4, 5)
    r = Routing(torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 2, 1], dtype=torch.int32), torch.ones(3),
                num_tokens=6, num_experts=3)
    meta = build_metadata(r)
    meta4 = build_metadata(Routing(r.token_idx, r.expert_idx, r.scores, num_tokens=6, num_experts=4))
    return [
        BadInput("x is 1-D", (torch.randn(4), w, meta), match="x"),
        BadInput("w has the wrong reduction dim", (x, torch.randn(3, 5, 5), meta), match="w"),
        BadInput("x and w of different dtypes", (x, w.double(), meta), error=TypeError, match="dtype"),
        BadInput("meta is not a RoutingMetadata", (x, w, {"gather_idx": None}), error=TypeError, match="meta"),
        BadInput("meta for 4 experts with 3 weight matrices", (x, w, meta4), match="num_experts|E"),
        BadInput("tile_m = 0", (x, w, meta), {"tile_m": 0}, match="tile_m"),
    ]


def check_gemm_rejects(fn, case) -> None:
    for bad in bad_gemm_inputs():
        expect_raises(fn, bad)


def check_no_gathered_copy(fn, case: GemmCase) -> None:
    """The fused GEMM never materializes the gathered (M, K) (or padded) copy of x.

    Every tensor created while it runs is recorded (a TorchDispatchMode); none may have M or M_pad
    rows of K columns. Tiles of at most tile_m gathered rows are fine.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    x, w, meta = make_problem(case)
    M = meta.num_rows
    M_pad = sum(-(-f // case.tile_m) * case.tile_m for f in case.counts)
    banned = {(M, case.K), (M_pad, case.K)}
    seen: list[tuple] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and tuple(t.shape) in banned:
                    seen.append((str(func), tuple(t.shape)))
            return out

    with Recorder():
        fn(x, w, meta, tile_m=case.tile_m)
    if seen:
        op, shape = seen[0]
        raise AssertionError(f"[no_gathered_copy] {op} built a {shape} tensor: the gathered copy of x (M = {M} rows, "
                             f"padded M_pad = {M_pad}). Gather each tile's rows (at most tile_m = {case.tile_m}) inside the loop")


def gemm_properties(fused: bool) -> list[Property]:
    bf16, f32 = torch.bfloat16, torch.float32
    examples = (GemmCase(40, 16, 8, (0, 1, 3, 4, 5, 9), 4, f32, False, 0),  # 0, 1, tile-1, tile, tile+1, 2tile+1
                GemmCase(32, 24, 16, (17, 0, 32), 16, bf16, True, 1),
                GemmCase(0, 4, 3, (0, 0), 8, f32, False, 2),
                GemmCase(12, 5, 7, (12, 1), 1, torch.float64, False, 3))
    props = [
        Property("agrees_with_oracle", "row r = x[gather_idx[r]] @ w[e] (float64 oracle), any counts, out_dtype honoured",
                 gemm_cases(), check_gemm_agrees, examples=examples),
        Property("tile_edges", "experts with 0, 1, tile-1, tile, tile+1 rows (the masked last tile)",
                 gemm_cases(edge_only=True), check_gemm_agrees, examples=examples[:1]),
        Property("rejects_bad_input", "bad x, w, meta and tile_m raise ValueError/TypeError naming the argument",
                 st.just(None), check_gemm_rejects, max_examples=1),
    ]
    if fused:
        props.append(Property("no_gathered_copy", "never materializes the gathered (M, K) copy of x",
                              st.integers(0, 2**31 - 1).map(lambda s: GemmCase(30, 12, 10, (13, 0, 9, 7), 4, f32, False, s)),
                              check_no_gathered_copy, max_examples=3))
    return props


# ----------------------------------------------------------------------------------------------
# io_cost
# ----------------------------------------------------------------------------------------------

COST_FIELDS = ("bytes_read", "bytes_written", "flops_useful", "flops_padded", "source_bytes", "rows", "padded_rows")


class CostCase(NamedTuple):
    T: int
    K: int
    N: int
    counts: tuple
    tile_m: int
    dtype_bytes: int


@st.composite
def cost_cases(draw) -> CostCase:
    T = draw(st.integers(0, 4096))
    tile = draw(st.sampled_from((1, 64, 128, 256)))
    counts = tuple(draw(st.lists(st.integers(0, T) | st.sampled_from([0, min(T, tile), min(T, tile + 1)]), min_size=1, max_size=8)))
    return CostCase(T, draw(st.integers(1, 8192)), draw(st.integers(1, 8192)), counts, tile, draw(st.sampled_from((1, 2, 4))))


def check_cost_agrees(fn, case: CostCase) -> None:
    for variant in ("naive", "gather_fused"):
        got = fn(case.T, case.K, case.N, list(case.counts), tile_m=case.tile_m, dtype_bytes=case.dtype_bytes, variant=variant)
        want = ref.io_cost(case.T, case.K, case.N, list(case.counts), tile_m=case.tile_m, dtype_bytes=case.dtype_bytes, variant=variant)
        for name in COST_FIELDS:
            g, w_ = getattr(got, name, None), getattr(want, name)
            if g != w_:
                raise AssertionError(f"[agrees_with_model] variant {variant!r}: {name} must be {w_}, got {g} "
                                     f"(M = {want.rows}, M_pad = {want.padded_rows}; see the IO model in the assignment)")


def check_cost_invariants(fn, case: CostCase) -> None:
    kw = dict(tile_m=case.tile_m, dtype_bytes=case.dtype_bytes)
    naive = fn(case.T, case.K, case.N, list(case.counts), variant="naive", **kw)
    fused = fn(case.T, case.K, case.N, list(case.counts), variant="gather_fused", **kw)
    expect(fused.bytes_read + fused.bytes_written <= naive.bytes_read + naive.bytes_written,
           "[invariants] gather fusion can only remove traffic: fused bytes must be <= naive bytes")
    expect(fused.flops_useful == naive.flops_useful and fused.flops_padded == naive.flops_padded,
           "[invariants] both variants run the same MMA tiles: equal flops_useful and flops_padded")
    aligned = all(c % case.tile_m == 0 for c in case.counts)
    expect((naive.flops_padded == 0) == aligned, "[invariants] flops_padded is 0 exactly when every count is a multiple of tile_m")


def check_cost_rejects(fn, case) -> None:
    for bad in (BadInput("a count above T", (10, 4, 4, [3, 11]), match="counts"),
                BadInput("a negative count", (10, 4, 4, [3, -1]), match="counts"),
                BadInput("an unknown variant", (10, 4, 4, [3]), {"variant": "fast"}, match="variant"),
                BadInput("tile_m = 0", (10, 4, 4, [3]), {"tile_m": 0}, match="tile_m"),
                BadInput("no experts", (10, 4, 4, []), match="counts")):
        expect_raises(fn, bad)


def io_cost_properties() -> list[Property]:
    return [
        Property("agrees_with_model", "bytes read/written and FLOPs of both variants as in the IO model", cost_cases(),
                 check_cost_agrees, examples=(CostCase(4096, 4096, 1024, (512, 0, 130, 1000), 128, 2),
                                              CostCase(0, 8, 8, (0,), 128, 2))),
        Property("invariants", "fused never moves more bytes; padding FLOPs vanish iff counts are tile multiples",
                 cost_cases(), check_cost_invariants, examples=(CostCase(1024, 64, 64, (128, 256, 0), 128, 2),)),
        Property("rejects_bad_input", "bad counts, variant and tile_m raise ValueError/TypeError naming the argument",
                 st.just(None), check_cost_rejects, max_examples=1),
    ]
