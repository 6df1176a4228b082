"""Property tests for sonic_learn.reference.topk: radix select vs bitonic top-k vs a stable-sort oracle.

The oracle is a stable ascending sort of ``-x`` in float64: equal values keep their column order,
so ties go to the lower column, and ``-0.0 == 0.0`` is a tie, exactly the contract of both
algorithms, which are exact for every dtype and value. Hypothesis draws shapes, k, dtype, a value
mode and a seed; tensors are materialized with a seeded ``torch.Generator``. The "ties" mode draws
every value from a tiny set including +-inf and +-0.0 so that ties dominate; the "full_range" mode
draws from the dtype's whole range (subnormals, the largest finite values, +-inf, +-0.0, ties and
neighbours one ulp apart). NaN is outside the contract: both functions reject it.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from sonic_learn.properties.topk import TIE_VALUES, check_topk_result, full_range_values, oracle_indices
from sonic_learn.reference.topk import (
    bitonic_topk,
    ordered_int_keys,
    radix_topk,
    softmax_topk,
    topk_softmax,
)

INF = float("inf")
FINITE_TIE_VALUES = [-1.0, -0.0, 0.0, 0.5, 2.0]
ALL_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
TOPK_FUNCTIONS = [radix_topk, bitonic_topk]
ALL_FUNCTIONS = [radix_topk, bitonic_topk, softmax_topk, topk_softmax]


# ----------------------------------------------------------------------------------------------
# Helpers: inputs and the oracle
# ----------------------------------------------------------------------------------------------


def make_values(shape: tuple, dtype: torch.dtype, mode: str, seed: int) -> torch.Tensor:
    """A seeded tensor of ``shape``/``dtype``; ``mode`` picks the value distribution."""
    g = torch.Generator().manual_seed(seed)
    if mode == "normal":  # mostly distinct values (a few ties after rounding to 16 bits)
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    elif mode == "ties":  # everything from a tiny set with +-inf and +-0.0
        x = torch.tensor(TIE_VALUES, dtype=torch.float64)[torch.randint(len(TIE_VALUES), shape, generator=g)]
    elif mode == "finite_ties":
        x = torch.tensor(FINITE_TIE_VALUES, dtype=torch.float64)[
            torch.randint(len(FINITE_TIE_VALUES), shape, generator=g)
        ]
    elif mode == "bf16_grid":  # bfloat16 values stored in a wider dtype
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(torch.bfloat16)
    elif mode == "full_range":  # the dtype's whole range, ties and one-ulp neighbours
        return full_range_values(shape, dtype, seed)
    else:
        raise AssertionError(mode)
    return x.to(dtype)


@st.composite
def topk_cases(draw, dtypes=ALL_DTYPES, modes=("normal", "ties", "bf16_grid", "full_range")):
    rows = draw(st.integers(0, 64))
    n = draw(st.integers(1, 300))
    k = draw(st.integers(1, n))
    dtype = draw(st.sampled_from(dtypes))
    mode = draw(st.sampled_from(modes))
    seed = draw(st.integers(0, 2**31 - 1))
    return rows, n, k, dtype, mode, seed


def assert_exact_topk(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> None:
    """(values, indices) is exactly the oracle's answer: shapes, dtypes, indices, value bits (also -0.0)."""
    check_topk_result(x, k, (values, indices))


# ----------------------------------------------------------------------------------------------
# The main agreement property
# ----------------------------------------------------------------------------------------------


@given(case=topk_cases())
@example(case=(128, 128, 8, torch.bfloat16, "normal", 0))
@example(case=(64, 256, 16, torch.bfloat16, "ties", 1))
@example(case=(64, 256, 16, torch.float16, "normal", 2))
@example(case=(32, 128, 8, torch.float32, "normal", 3))
@example(case=(0, 5, 3, torch.bfloat16, "normal", 4))
@example(case=(3, 1, 1, torch.float16, "ties", 5))
@example(case=(4, 300, 300, torch.bfloat16, "ties", 6))
@example(case=(16, 64, 8, torch.float64, "full_range", 7))
@example(case=(16, 300, 33, torch.float32, "full_range", 8))
def test_radix_bitonic_and_oracle_agree(case):
    rows, n, k, dtype, mode, seed = case
    x = make_values((rows, n), dtype, mode, seed)  # (R, N)

    values, indices = radix_topk(x, k)
    assert_exact_topk(x, k, values, indices)
    assert torch.equal(values, torch.topk(x, k, dim=-1, sorted=True).values)  # torch agrees on values

    b_values, b_indices = bitonic_topk(x, k)  # exact for every dtype: identical to radix, ties included
    assert_exact_topk(x, k, b_values, b_indices)
    assert torch.equal(b_indices, indices)


@given(
    lead=st.tuples(st.integers(0, 4), st.integers(0, 4)),
    n=st.integers(1, 40),
    data=st.data(),
    dtype=st.sampled_from(ALL_DTYPES),
    mode=st.sampled_from(["normal", "ties"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_leading_dims(lead, n, data, dtype, mode, seed):
    k = data.draw(st.integers(1, n))
    x = make_values((*lead, n), dtype, mode, seed)  # (A, B, N)
    for fn in TOPK_FUNCTIONS:
        values, indices = fn(x, k)
        assert values.shape == indices.shape == (*lead, k)
        flat_values, flat_indices = fn(x.reshape(-1, n), k)
        assert torch.equal(indices, flat_indices.reshape(*lead, k))
        assert torch.equal(values, x.gather(-1, indices))
    assert_exact_topk(x, k, *radix_topk(x, k))


@given(case=topk_cases(modes=("normal", "ties", "full_range")))
@example(case=(41, 62, 1, torch.float32, "normal", 63818791))  # 7.4355564 once beat 7.4355574 (lossy packing)
def test_k1_is_argmax_with_lowest_index(case):
    rows, n, _, dtype, mode, seed = case
    x = make_values((rows, n), dtype, mode, seed)
    first_max = (x == x.amax(-1, keepdim=True)).to(torch.int8).argmax(-1, keepdim=True)  # first True
    for fn in TOPK_FUNCTIONS:  # exact for every dtype, so k = 1 is exactly the first argmax
        assert torch.equal(fn(x, 1)[1], first_max), fn.__name__


@pytest.mark.parametrize("fn", TOPK_FUNCTIONS, ids=lambda f: f.__name__)
def test_values_a_float32_packing_would_merge(fn):
    # float64 outside float32's range (both round to inf / 0 in float32), float64 and float32 values
    # one ulp apart (a float32 packing overwrites those low bits): all must keep their order.
    f32_neighbours = torch.tensor([1.0, 1.0 + 2.0**-23], dtype=torch.float32)
    for x, col in [
        (torch.tensor([1e300, 1e301], dtype=torch.float64), 1),
        (torch.tensor([-1e301, -1e300], dtype=torch.float64), 1),
        (torch.tensor([2e-320, 1e-320], dtype=torch.float64), 0),
        (torch.tensor([1.0, math.nextafter(1.0, 2.0)], dtype=torch.float64), 1),
        (torch.tensor([5e-324, 0.0], dtype=torch.float64), 0),
        (f32_neighbours, 1),
        (f32_neighbours.flip(0), 0),
    ]:
        values, indices = fn(x[None], 1)
        assert int(indices) == col, (x, indices)
        assert torch.equal(values[0], x[col:col + 1])


def test_oracle_stable_descending_sort_keeps_lower_index_first():
    # The oracle (stable ascending sort of -x) and torch's stable descending sort agree on ties.
    x = make_values((16, 64), torch.float32, "ties", 7)
    assert torch.equal(oracle_indices(x, 64), torch.sort(x.double(), dim=-1, descending=True, stable=True).indices)


def test_handpicked_ties_inf_and_signed_zero():
    x = torch.tensor([[0.0, -0.0, INF, -INF, 0.5, INF, -0.0, -INF]], dtype=torch.bfloat16)
    expected = torch.tensor([[2, 5, 4, 0, 1, 6, 3, 7]])  # +inf, +inf, 0.5, then 0.0/-0.0 by column
    for fn in TOPK_FUNCTIONS:
        values, indices = fn(x, 8)
        assert torch.equal(indices, expected)
        assert values.signbit().tolist() == [[False, False, False, False, True, True, True, True]]


@given(dtype=st.sampled_from(ALL_DTYPES), mode=st.sampled_from(["normal", "ties", "full_range"]),
       seed=st.integers(0, 2**31 - 1))
def test_ordered_int_keys_preserve_float_order(dtype, mode, seed):
    x = make_values((64,), dtype, mode, seed)
    keys, bits = ordered_int_keys(x)
    assert bits == x.element_size() * 8
    a, b = x[:, None].double(), x[None, :].double()
    ka, kb = keys[:, None], keys[None, :]
    assert torch.equal(ka < kb, a < b) and torch.equal(ka == kb, a == b)


def test_values_are_differentiable_like_torch_topk():
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    for fn in TOPK_FUNCTIONS:
        (grad,) = torch.autograd.grad(fn(x, 4)[0].sum(), x)
        expected = torch.zeros_like(x).scatter_(-1, torch.topk(x.detach(), 4).indices, 1.0)
        assert torch.equal(grad, expected)


# ----------------------------------------------------------------------------------------------
# Router scores
# ----------------------------------------------------------------------------------------------


def score_tolerance(score_dtype: torch.dtype) -> dict:
    return dict(rtol=0, atol=1e-12) if score_dtype == torch.float64 else dict(rtol=2e-6, atol=2e-7)


@given(case=topk_cases(modes=("normal", "finite_ties")))
@example(case=(128, 128, 8, torch.bfloat16, "normal", 0))
@example(case=(64, 256, 16, torch.bfloat16, "normal", 1))
def test_softmax_topk_matches_float64_oracle(case):
    rows, n, k, dtype, mode, seed = case
    logits = make_values((rows, n), dtype, mode, seed)  # (T, E)
    scores, indices = softmax_topk(logits, k)
    score_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert scores.dtype == score_dtype and indices.dtype == torch.int64
    assert torch.equal(indices, radix_topk(logits, k)[1])

    oracle = torch.softmax(logits.double().gather(-1, oracle_indices(logits, k)), dim=-1)  # (T, K)
    torch.testing.assert_close(scores.double(), oracle, **score_tolerance(score_dtype))
    torch.testing.assert_close(scores.double().sum(-1), torch.ones(rows, dtype=torch.float64), rtol=0, atol=1e-5)


@given(case=topk_cases(modes=("normal", "finite_ties")), normalize=st.booleans())
@example(case=(128, 128, 8, torch.bfloat16, "normal", 0), normalize=True)
@example(case=(64, 256, 16, torch.bfloat16, "normal", 1), normalize=False)
def test_topk_softmax_matches_float64_oracle(case, normalize):
    rows, n, k, dtype, mode, seed = case
    logits = make_values((rows, n), dtype, mode, seed)  # (T, E)
    scores, indices = topk_softmax(logits, k, normalize=normalize)
    score_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert scores.dtype == score_dtype and indices.dtype == torch.int64
    assert torch.equal(indices, radix_topk(logits, k)[1])

    oracle = torch.softmax(logits.double(), dim=-1).gather(-1, oracle_indices(logits, k))  # (T, K)
    if normalize:
        oracle = oracle / oracle.sum(-1, keepdim=True)
        torch.testing.assert_close(scores.double().sum(-1), torch.ones(rows, dtype=torch.float64), rtol=0, atol=1e-5)
    else:
        assert (scores.double().sum(-1) <= 1 + 1e-5).all()
    torch.testing.assert_close(scores.double(), oracle, **score_tolerance(score_dtype))


@pytest.mark.parametrize(
    "scoring",
    [
        lambda t: softmax_topk(t, 2)[0],
        lambda t: topk_softmax(t, 2)[0],
        lambda t: topk_softmax(t, 2, normalize=True)[0],
    ],
    ids=["softmax_topk", "topk_softmax", "topk_softmax_normalized"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_scores_gradcheck_float64(scoring, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)  # (T, E)
    assert torch.autograd.gradcheck(scoring, (logits,))


def test_softmax_topk_gradient_only_reaches_selected_columns():
    logits = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    scores, indices = softmax_topk(logits, 3)
    (grad,) = torch.autograd.grad((scores * torch.arange(3.0, dtype=torch.float64)).sum(), logits)
    selected = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, indices, True)
    assert (grad[~selected] == 0).all() and (grad[selected] != 0).any()
    # topk_softmax, by contrast, sends gradient to every column through the denominator.
    scores, _ = topk_softmax(logits, 3)
    (grad,) = torch.autograd.grad(scores.sum(), logits)
    assert (grad != 0).all()


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ALL_FUNCTIONS, ids=lambda f: f.__name__)
def test_bad_inputs_raise_clear_errors(fn):
    name = "logits" if fn in (softmax_topk, topk_softmax) else "x"
    good = torch.randn(2, 5)
    with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor, got list"):
        fn([[1.0, 2.0]], 1)
    with pytest.raises(ValueError, match=f"{name} must have at least 1 dim"):
        fn(torch.tensor(1.0), 1)
    with pytest.raises(TypeError, match=f"{name} must have dtype in .*got int64"):
        fn(torch.arange(5), 1)
    with pytest.raises(ValueError, match=rf"k must satisfy 1 <= k <= 5 \(the size of the last dim of {name}\), got 0"):
        fn(good, 0)
    with pytest.raises(ValueError, match=r"k must satisfy 1 <= k <= 5 .*got 6"):
        fn(good, 6)
    with pytest.raises(ValueError, match=r"k must satisfy 1 <= k <= 0 .*got 1"):
        fn(torch.zeros(3, 0), 1)
    with pytest.raises(TypeError, match="k must be an int, got float"):
        fn(good, 2.0)
    with pytest.raises(TypeError, match="k must be an int, got bool"):
        fn(good, True)
    with pytest.raises(ValueError, match=f"{name} must not contain NaN"):
        fn(torch.tensor([[1.0, math.nan, 0.0]]), 1)


@pytest.mark.parametrize("fn", [softmax_topk, topk_softmax], ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [INF, -INF])
def test_scores_reject_infinite_logits(fn, bad):
    with pytest.raises(ValueError, match=r"logits must be finite, got \+-inf values"):
        fn(torch.tensor([[1.0, bad, 0.0]]), 1)


def test_topk_softmax_normalize_must_be_bool():
    with pytest.raises(TypeError, match="normalize must be a bool, got int"):
        topk_softmax(torch.randn(2, 4), 2, normalize=1)


def test_bitonic_rejects_nan_anywhere_in_the_full_range():
    # NaN has no place in the float order (torch.topk puts it first): both functions reject it.
    x = full_range_values((3, 40), torch.float64, 0)
    x[1, 17] = math.nan
    for fn in TOPK_FUNCTIONS:
        with pytest.raises(ValueError, match="x must not contain NaN"):
            fn(x, 3)


def test_bitonic_handles_rows_wider_than_a_16_bit_column_field():
    # The column field grows with the row (b = log2(N_pad) bits): 8193 float16 columns need 14 bits.
    x = full_range_values((2, 8193), torch.float16, 0)
    assert torch.equal(bitonic_topk(x, 4)[1], radix_topk(x, 4)[1])
