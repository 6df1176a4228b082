"""Properties of top-k over the last dim (pair 1: radix select vs bitonic top-k).

Contract checked (``fn(x, k) -> (values, indices)``, like ``torch.topk(x, k, sorted=True)``):
values descending and equal to ``x.gather(-1, indices)`` bit for bit, in x's dtype; indices int64,
shape ``(..., k)``; ties (also ``-0.0`` vs ``0.0``) go to the LOWER column first. The oracle is a
stable ascending sort of ``-x`` in float64, which has exactly that tie rule.

The graded properties draw inputs on which SonicMoE's float32 index packing (what the course's
``bitonic_topk`` builds) is *exact* too: small integers times a power of two (their low mantissa
bits are zero) and a tiny set of tie values. ``full_range_values`` draws from a dtype's whole
range instead (subnormals, the largest finite values, +-inf, +-0.0, ties, values one ulp apart):
the library's exact implementations are tested on it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from hypothesis import strategies as st

from sonic_learn.properties import BadInput, Property, expect, expect_raises, seeded, short

DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
TIE_VALUES = (float("-inf"), -1.0, -0.0, 0.0, 0.5, float("inf"))


class TopkCase(NamedTuple):
    lead: tuple  # leading dims, e.g. (rows,) or (2, 3); a 0 gives an empty batch
    n: int  # the last dim, N
    k: int
    dtype: torch.dtype
    seed: int


def distinct_values(case: TopkCase) -> torch.Tensor:
    """(*lead, N) with distinct values per row: a random permutation of small integers, times 2**s.

    Integers up to 256 in magnitude are exact in bfloat16, so every dtype holds them exactly.
    """
    g = seeded(case.seed)
    rows = 1
    for s in case.lead:
        rows *= s
    perm = torch.argsort(torch.rand(rows, case.n, generator=g), dim=-1)  # (R, N) a permutation per row
    scale = 2.0 ** torch.randint(-3, 4, (rows, 1), generator=g).double()  # (R, 1)
    x = (perm.double() - case.n // 2) * scale  # (R, N), distinct within a row
    return x.reshape(*case.lead, case.n).to(case.dtype)


def tie_values(case: TopkCase) -> torch.Tensor:
    """(*lead, N) drawn from {-inf, -1, -0.0, 0.0, 0.5, +inf}: ties everywhere."""
    g = seeded(case.seed)
    pick = torch.randint(len(TIE_VALUES), (*case.lead, case.n), generator=g)
    return torch.tensor(TIE_VALUES, dtype=torch.float64)[pick].to(case.dtype)


_SAME_WIDTH_INT = {16: torch.int16, 32: torch.int32, 64: torch.int64}


def full_range_values(shape: tuple, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A seeded tensor of ``shape`` (>= 1 dim) and ``dtype`` from the dtype's WHOLE range, no NaN.

    Each element is one of: a random bit pattern (every exponent equally likely: subnormals and
    the largest finite values are common), a copy of another element of its row (a tie), that
    element's bit pattern +-1 (a neighbour one ulp away, the pairs a lossy packing confuses), or a
    special value (+-0.0, +-inf, +-the smallest subnormal, +-the largest finite value). Bit
    patterns that are NaN become an infinity of the same sign.
    """
    g = seeded(seed)
    B = torch.finfo(dtype).bits
    raw = torch.randint(-(2 ** (B - 1)), 2 ** (B - 1) - 1, shape, generator=g, dtype=torch.int64)  # the bits
    other = raw.gather(-1, torch.randint(max(shape[-1], 1), shape, generator=g))  # another element of the row
    finfo = torch.finfo(dtype)
    special_values = torch.tensor([0.0, finfo.max, float("inf")], dtype=dtype)
    special = special_values.view(_SAME_WIDTH_INT[B]).to(torch.int64)  # (3,) bits of +0, max, +inf
    special = torch.cat([special, torch.tensor([1])])  # + the smallest subnormal
    special = torch.cat([special, special | -(2 ** (B - 1))])  # and their negatives (sign bit set)
    pick = torch.randint(len(special), shape, generator=g)
    kind = torch.randint(8, shape, generator=g)  # 0-3: random bits, 4: tie, 5/6: neighbour, 7: special
    bits = torch.where(kind == 4, other, raw)
    bits = torch.where(kind == 5, other + 1, bits)
    bits = torch.where(kind == 6, other - 1, bits)
    bits = torch.where(kind == 7, special[pick], bits)
    bits = bits.clamp(-(2 ** (B - 1)), 2 ** (B - 1) - 1)  # a neighbour of an extreme pattern stays in range
    x = bits.to(_SAME_WIDTH_INT[B]).view(dtype)
    return torch.where(x.isnan(), torch.where(x.signbit(), float("-inf"), float("inf")).to(dtype), x)


def oracle_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k columns by a stable ascending sort of -x in float64: ties go to the lower column."""
    return torch.sort(-x.double(), dim=-1, stable=True).indices[..., :k]


@st.composite
def topk_cases(draw, max_n: int = 256, max_rows: int = 12) -> TopkCase:
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, n))
    lead = draw(st.sampled_from([(), (1,), (0,)]) | st.tuples(st.integers(1, max_rows)) | st.tuples(st.integers(1, 3), st.integers(1, 3)))
    return TopkCase(lead, n, k, draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**31 - 1)))


def _check_shapes(x: torch.Tensor, k: int, out: object, prop: str) -> tuple[torch.Tensor, torch.Tensor]:
    expect(isinstance(out, tuple) and len(out) == 2, f"[{prop}] must return a tuple (values, indices), got {type(out).__name__}")
    values, indices = out
    want = (*x.shape[:-1], k)
    expect(isinstance(values, torch.Tensor) and isinstance(indices, torch.Tensor), f"[{prop}] values and indices must be tensors")
    expect(tuple(values.shape) == want and tuple(indices.shape) == want,
           f"[{prop}] values and indices must have shape (..., k) = {want}, got {tuple(values.shape)} and {tuple(indices.shape)}")
    expect(indices.dtype == torch.int64, f"[{prop}] indices must be int64, got {indices.dtype}")
    expect(values.dtype == x.dtype, f"[{prop}] values must keep x's dtype {x.dtype}, got {values.dtype}")
    return values, indices


def check_topk_result(x: torch.Tensor, k: int, out: object, prop: str = "agrees_with_oracle", tie_hint: bool = True) -> None:
    """``out = (values, indices)`` is exactly the oracle's top-k of ``x`` (any x, any implementation)."""
    values, indices = _check_shapes(x, k, out, prop)
    expected = oracle_indices(x, k)
    if not torch.equal(indices, expected):
        rows_x, rows_e, rows_i = x.reshape(-1, x.shape[-1]), expected.reshape(-1, k), indices.reshape(-1, k)
        r = int((rows_e != rows_i).any(-1).nonzero()[0])
        j = int((rows_e[r] != rows_i[r]).nonzero()[0])
        e_col, g_col = int(rows_e[r, j]), int(rows_i[r, j])
        msg = (f"[{prop}] row {r}: position {j} of the top-{k} must be column {e_col} (value {rows_x[r, e_col].item()}), "
               f"got column {g_col}")
        if 0 <= g_col < x.shape[-1]:
            msg += f" (value {rows_x[r, g_col].item()})"
            if rows_x[r, g_col].double() == rows_x[r, e_col].double() and tie_hint:
                msg += ("; the two values are equal, so this is the tie rule: equal values (also -0.0 == 0.0) "
                        "go to the LOWER column first")
        msg += f"\n    expected indices {short(rows_e[r])}\n    got      indices {short(rows_i[r])}"
        raise AssertionError(msg)
    gathered = x.gather(-1, indices)
    same_bits = torch.equal(values, gathered) and torch.equal(values.signbit(), gathered.signbit())
    expect(same_bits, f"[{prop}] values must equal x.gather(-1, indices) exactly (same bits, also the sign of zero)")


# ----------------------------------------------------------------------------------------------
# The properties of fn(x, k) -> (values, indices)
# ----------------------------------------------------------------------------------------------


def check_agrees_with_oracle(fn, case: TopkCase) -> None:
    """Distinct values: the same indices as the float64 oracle, values gathered exactly."""
    x = distinct_values(case)
    check_topk_result(x, case.k, fn(x, case.k), "agrees_with_oracle", tie_hint=False)


def check_tie_rule(fn, case: TopkCase) -> None:
    """Values from a tiny set with +-inf and +-0.0: ties go to the lower column first."""
    x = tie_values(case)
    check_topk_result(x, case.k, fn(x, case.k), "tie_rule", tie_hint=True)


def bad_topk_inputs() -> list[BadInput]:
    x = torch.randn(3, 8)
    return [
        BadInput("k = 0", (x, 0), match="k"),
        BadInput("k larger than the last dim", (x, 9), match="k"),
        BadInput("k given as a float", (x, 2.0), error=TypeError, match="k"),
        BadInput("x is a list, not a tensor", ([[1.0, 2.0]], 1), error=TypeError, match="x"),
        BadInput("x is 0-d", (torch.tensor(1.0), 1), match="x"),
        BadInput("x has an integer dtype", (torch.arange(8).reshape(2, 4), 1), error=TypeError, match="x"),
        BadInput("x contains NaN", (torch.tensor([[0.0, float("nan"), 1.0]]), 1), match="NaN|x"),
    ]


def check_rejects_bad_input(fn, case) -> None:
    """Every class of bad input raises ValueError/TypeError naming the argument, before any work."""
    for bad in bad_topk_inputs():
        expect_raises(fn, bad)


def topk_properties() -> list[Property]:
    """The properties every top-k implementation (radix or bitonic, reference or student) must have."""
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    return [
        Property(
            "agrees_with_oracle",
            "distinct values: same indices as a float64 stable sort, values == x.gather(-1, indices)",
            topk_cases(),
            check_agrees_with_oracle,
            examples=(TopkCase((128,), 128, 8, bf16, 0), TopkCase((0,), 5, 3, f32, 1), TopkCase((), 1, 1, f16, 2),
                      TopkCase((4,), 200, 200, f32, 3), TopkCase((2, 3), 64, 1, torch.float64, 4)),
        ),
        Property(
            "tie_rule",
            "ties (also -0.0 vs 0.0, +-inf) go to the lower column first",
            topk_cases(),
            check_tie_rule,
            examples=(TopkCase((16,), 64, 16, bf16, 5), TopkCase((8,), 7, 3, f32, 6), TopkCase((3,), 256, 100, f16, 7)),
        ),
        Property(
            "rejects_bad_input",
            "bad k, non-tensor, 0-d, integer dtype and NaN raise ValueError/TypeError naming the argument",
            st.just(None),
            check_rejects_bad_input,
            max_examples=1,
        ),
    ]


# ----------------------------------------------------------------------------------------------
# ordered_int_keys(x) -> (keys, bits): the order-preserving integer keys both algorithms build on
# ----------------------------------------------------------------------------------------------

KEY_VALUES = (float("-inf"), -3.5, -1.0, -2.0**-130, -0.0, 0.0, 2.0**-130, 1e-3, 1.0, 2.5, 1e30, float("inf"))


class KeysCase(NamedTuple):
    n: int
    dtype: torch.dtype
    seed: int


@st.composite
def keys_cases(draw) -> KeysCase:
    return KeysCase(draw(st.integers(1, 48)), draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**31 - 1)))


def check_keys_preserve_order(fn, case: KeysCase) -> None:
    """sign(key_i - key_j) == sign(x_i - x_j) for every pair (so -0.0 and 0.0 get the same key)."""
    g = seeded(case.seed)
    special = torch.tensor(KEY_VALUES, dtype=torch.float64)[torch.randint(len(KEY_VALUES), (case.n,), generator=g)]
    normal = torch.randn(case.n, generator=g, dtype=torch.float64) * 10
    x = torch.where(torch.rand(case.n, generator=g) < 0.5, special, normal).to(case.dtype)  # (N,)
    out = fn(x)
    expect(isinstance(out, tuple) and len(out) == 2, "[keys_preserve_order] must return a tuple (keys, bits)")
    keys, bits = out
    expect(bits == x.element_size() * 8, f"[keys_preserve_order] bits must be the float's width {x.element_size() * 8}, got {bits}")
    expect(isinstance(keys, torch.Tensor) and tuple(keys.shape) == tuple(x.shape),
           f"[keys_preserve_order] keys must be a tensor of x's shape {tuple(x.shape)}")
    expect(not keys.dtype.is_floating_point, f"[keys_preserve_order] keys must be integers, got {keys.dtype}")
    xd, kl = x.double(), keys.long()
    kx = (xd[:, None] > xd[None, :]).long() - (xd[:, None] < xd[None, :]).long()  # (N, N) in {-1, 0, 1}
    kk = (kl[:, None] > kl[None, :]).long() - (kl[:, None] < kl[None, :]).long()  # (N, N), no overflow
    bad = (kx != kk).nonzero()
    if bad.numel():
        i, j = (int(v) for v in bad[0])
        raise AssertionError(
            f"[keys_preserve_order] x[{i}] = {x[i].item()} vs x[{j}] = {x[j].item()} ({x.dtype}) compare as "
            f"{int(kx[i, j])} but their keys {int(keys[i])} and {int(keys[j])} compare as {int(kk[i, j])} "
            "(negative floats need their magnitude bits flipped; -0.0 and 0.0 must get the same key)"
        )


def keys_properties() -> list[Property]:
    return [
        Property(
            "keys_preserve_order",
            "integer keys compare exactly like the floats (all dtypes, +-inf, +-0.0, subnormals)",
            keys_cases(),
            check_keys_preserve_order,
            examples=(KeysCase(12, torch.float32, 0), KeysCase(48, torch.bfloat16, 1), KeysCase(48, torch.float16, 2),
                      KeysCase(48, torch.float64, 3)),
        ),
    ]
