"""The fast (CuTe-DSL) top-k kernels agree exactly with the reference and a stable-sort oracle.

* GPU tests (marker ``gpu``): Hypothesis draws the row count (0..100k), N from the supported
  set, k, the dtype and a seed; the data forces ties (a small value set), -0.0 next to +0.0 and
  +-inf, or spans the dtype's whole range (subnormals, the largest values, one-ulp neighbours). Indices must match exactly, values bit-for-bit (``x.gather``), softmax scores to float32
  accuracy against a float64 oracle.
* Bad-input tests run on the CPU (they must fail before any launch, so they need no GPU).

Run on a Hopper GPU with ``HYPOTHESIS_PROFILE=gpu pytest -q tests/test_fast_topk.py``: the first call
of each (kernel, dtype, N, k) JIT-compiles for about a second, so the drawn sizes come from small
sets and compiled kernels are reused across examples.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from sonic_learn.fast._cute import cutlass_available  # pins sm_90a before cutlass loads

_ok, _why = cutlass_available()
if not _ok:
    pytest.skip(_why, allow_module_level=True)

from sonic_learn.fast import topk as fast  # noqa: E402
from sonic_learn.properties.topk import full_range_values  # noqa: E402
from sonic_learn.reference import topk as ref  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
N_CHOICES = [8, 24, 64, 128, 200, 512]  # powers of two and padded sizes; 4096 pinned by @example
K_CHOICES = [1, 2, 3, 8, 10, 16]
MAX_ELEMENTS = 1 << 22  # keeps one example under ~16 MB so a run stays quick


# ---------------------------------------------------------------------------------------------
# Data and oracles
# ---------------------------------------------------------------------------------------------
def make_rows(rows: int, n: int, dtype: torch.dtype, seed: int, style: str) -> torch.Tensor:
    """(rows, n) CUDA tensor. "ties": values from a 9-value set with -0.0/+0.0 and +-inf mixed in;
    "normal": Gaussian logits (ties only where the dtype rounds them together); "full_range": the
    dtype's whole range (``full_range_values``)."""
    g = torch.Generator().manual_seed(seed)
    if style == "full_range":
        return full_range_values((rows, n), dtype, seed).cuda()
    if style == "ties":
        x = torch.randint(-4, 5, (rows, n), generator=g).to(torch.float32) * 0.5  # (rows, n)
        u = torch.rand((rows, n), generator=g)  # (rows, n)
        x = torch.where((x == 0) & (u < 0.5), torch.tensor(-0.0), x)  # -0.0 next to +0.0
        x = torch.where(u > 0.995, torch.tensor(float("inf")), x)
        x = torch.where(u < 0.005, torch.tensor(float("-inf")), x)
    else:
        x = torch.randn((rows, n), generator=g) * 3
    return x.to(dtype).cuda()


def oracle_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort on a copy where -0.0 is +0.0 (they tie, as torch compares them)."""
    canonical = torch.where(x == 0, torch.zeros_like(x), x)  # (rows, n)
    order = torch.sort(canonical, dim=-1, descending=True, stable=True).indices[:, :k]  # (rows, k)
    return x.gather(-1, order), order


def assert_same_topk(values, indices, x, k):
    want_values, want_indices = oracle_topk(x, k)
    assert indices.dtype == torch.int64 and values.dtype == x.dtype
    assert values.shape == indices.shape == (x.shape[0], k)
    assert torch.equal(indices, want_indices), _first_mismatch(indices, want_indices, x)
    bits = torch.int16 if x.element_size() == 2 else torch.int32
    # bit-for-bit, so a -0.0 must come back as -0.0
    assert torch.equal(values.view(bits), x.gather(-1, indices).view(bits))
    assert torch.equal(values, want_values)


def _first_mismatch(got, want, x):
    bad = (got != want).any(-1).nonzero()
    if bad.numel() == 0:
        return "no mismatch"
    r = int(bad[0])
    return f"{bad.numel()} rows differ; first row {r}: got {got[r].tolist()}, want {want[r].tolist()}, x = {x[r].tolist()}"


@st.composite
def problems(draw, max_k=fast.MAX_K_BITONIC):
    n = draw(st.sampled_from(N_CHOICES))
    k = draw(st.sampled_from([k for k in K_CHOICES if k <= min(n, max_k)]))
    rows = draw(st.integers(0, min(100_000, MAX_ELEMENTS // n)))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    style = draw(st.sampled_from(["ties", "normal", "full_range"]))
    return rows, n, k, dtype, seed, style


# ---------------------------------------------------------------------------------------------
# GPU: top-k values and indices
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@given(problem=problems(), kind=st.sampled_from(["bitonic", "radix"]))
@example(problem=(32768, 128, 8, torch.bfloat16, 0, "normal"), kind="bitonic")
@example(problem=(32768, 512, 10, torch.bfloat16, 1, "ties"), kind="bitonic")
@example(problem=(1000, 4096, 16, torch.bfloat16, 2, "ties"), kind="bitonic")
@example(problem=(32768, 256, 16, torch.bfloat16, 3, "normal"), kind="radix")
@example(problem=(0, 64, 8, torch.float16, 4, "ties"), kind="radix")
@example(problem=(1, 8, 8, torch.float32, 5, "ties"), kind="bitonic")
@example(problem=(4096, 128, 8, torch.float32, 6, "full_range"), kind="bitonic")
def test_topk_matches_stable_sort_oracle(problem, kind):
    rows, n, k, dtype, seed, style = problem
    x = make_rows(rows, n, dtype, seed, style)
    fn = fast.bitonic_topk if kind == "bitonic" else fast.radix_topk
    values, indices = fn(x, k)
    assert_same_topk(values, indices, x, k)


@pytest.mark.gpu
@given(problem=problems(), kind=st.sampled_from(["bitonic", "radix"]))
@example(problem=(4096, 128, 8, torch.bfloat16, 7, "ties"), kind="bitonic")
@example(problem=(4096, 200, 16, torch.float32, 8, "full_range"), kind="bitonic")
def test_topk_matches_reference(problem, kind):
    """fast == sonic_learn.reference.topk, radix and bitonic (both exact for every dtype)."""
    rows, n, k, dtype, seed, style = problem
    x = make_rows(min(rows, 20_000), n, dtype, seed, style)
    fn = fast.bitonic_topk if kind == "bitonic" else fast.radix_topk
    values, indices = fn(x, k)
    ref_values, ref_indices = ref.radix_topk(x, k)
    assert torch.equal(indices, ref_indices), _first_mismatch(indices, ref_indices, x)
    assert torch.equal(values, ref_values)
    ref_values, ref_indices = ref.bitonic_topk(x, k)
    assert torch.equal(indices, ref_indices), _first_mismatch(indices, ref_indices, x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, k, kind", [(128, 8, "bitonic"), (64, 16, "bitonic"), (200, 3, "bitonic"), (128, 8, "radix")])
def test_every_16bit_value(dtype, n, k, kind):
    """Every non-NaN 16-bit pattern (subnormals, +-0.0, +-inf, the largest magnitudes), each twice,
    shuffled into rows: the kernels' key arithmetic must rank all of them as the oracle does."""
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)  # all 65536
    values = values[~torch.isnan(values)]
    values = torch.cat([values, values])  # every value twice: ties
    values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(n + k))]
    rows = values.numel() // n
    x = values[: rows * n].reshape(rows, n).cuda()  # (rows, n)
    fn = fast.bitonic_topk if kind == "bitonic" else fast.radix_topk
    got_values, got_indices = fn(x, k)
    assert_same_topk(got_values, got_indices, x, k)


@pytest.mark.gpu
@given(problem=problems(max_k=fast.MAX_K_RADIX), k_big=st.sampled_from([17, 32, 64, 128]))
def test_radix_topk_large_k(problem, k_big):
    rows, n, _, dtype, seed, style = problem
    k = min(k_big, n)
    x = make_rows(min(rows, 20_000), n, dtype, seed, style)
    values, indices = fast.radix_topk(x, k)
    assert_same_topk(values, indices, x, k)


# ---------------------------------------------------------------------------------------------
# GPU: fused softmax scores
# ---------------------------------------------------------------------------------------------
def oracle_scores(logits: torch.Tensor, k: int, epilogue: str):
    _, indices = oracle_topk(logits, k)
    x64 = logits.to(torch.float64)  # (rows, n)
    if epilogue == "softmax_topk":
        scores = torch.softmax(x64.gather(-1, indices), dim=-1)  # (rows, k)
    else:
        scores = torch.softmax(x64, dim=-1).gather(-1, indices)  # (rows, k)
        if epilogue == "topk_softmax_normalized":
            scores = scores / scores.sum(-1, keepdim=True)
    return scores, indices


@pytest.mark.gpu
@given(
    problem=problems(),
    epilogue=st.sampled_from(["softmax_topk", "topk_softmax", "topk_softmax_normalized"]),
)
@example(problem=(32768, 128, 8, torch.bfloat16, 0, "normal"), epilogue="softmax_topk")
@example(problem=(32768, 256, 16, torch.bfloat16, 1, "normal"), epilogue="topk_softmax")
def test_softmax_scores(problem, epilogue):
    rows, n, k, dtype, seed, style = problem
    logits = make_rows(rows, n, dtype, seed, "ties" if style == "ties" else "normal")
    logits = torch.nan_to_num(logits, posinf=7.0, neginf=-7.0)  # the scores need finite logits
    if epilogue == "softmax_topk":
        scores, indices = fast.softmax_topk(logits, k)
    else:
        scores, indices = fast.topk_softmax(logits, k, normalize=epilogue == "topk_softmax_normalized")
    want_scores, want_indices = oracle_scores(logits, k, epilogue)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64
    assert torch.equal(indices, want_indices), _first_mismatch(indices, want_indices, logits)
    # float32 accuracy: ex2.approx and one division, a few ulp (torch's own float32 softmax is ~1e-7)
    torch.testing.assert_close(scores.double(), want_scores, rtol=2e-6, atol=1e-7)

    if rows <= 20_000:  # and the reference agrees (same indices, scores to float32 accuracy)
        if epilogue == "softmax_topk":
            ref_scores, ref_indices = ref.softmax_topk(logits, k)
        else:
            ref_scores, ref_indices = ref.topk_softmax(logits, k, normalize=epilogue == "topk_softmax_normalized")
        assert torch.equal(indices, ref_indices)
        torch.testing.assert_close(scores, ref_scores, rtol=4e-6, atol=2e-7)


# ---------------------------------------------------------------------------------------------
# GPU: layouts the kernels do not read directly are copied, not misread
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["transposed", "column-slice", "misaligned"])
def test_strided_and_misaligned_inputs(layout):
    n, k, rows = 128, 8, 1000
    base = make_rows(rows, 2 * n, torch.bfloat16, 11, "ties")
    if layout == "transposed":
        x = base[:, :n].t().contiguous().t()  # (rows, n) with stride (1, rows)
    elif layout == "column-slice":
        x = base[:, ::2]  # (rows, n) with stride (2n, 2)
    else:
        flat = torch.empty(rows * n + 1, dtype=torch.bfloat16, device="cuda")
        x = flat[1:].view(rows, n)  # contiguous, but 2 bytes past a 16-byte boundary
        x.copy_(base[:, :n])
        assert x.is_contiguous() and x.data_ptr() % 16 != 0
    for fn in (fast.bitonic_topk, fast.radix_topk):
        values, indices = fn(x, k)
        assert_same_topk(values, indices, x, k)


# ---------------------------------------------------------------------------------------------
# CPU: bad input fails with a clear message before any kernel is compiled or launched
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def no_launch(monkeypatch):
    def _fail(*args, **kwargs):
        raise AssertionError("a kernel was compiled or launched for bad input")

    monkeypatch.setattr(fast, "compiled", _fail)


ALL_FUNCTIONS = [fast.bitonic_topk, fast.radix_topk, fast.softmax_topk, fast.topk_softmax]


@pytest.mark.parametrize("fn", ALL_FUNCTIONS, ids=lambda f: f.__name__)
def test_bad_inputs_raise_before_launch(fn, no_launch):
    x = torch.randn(4, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        fn(x, 8)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fn([[1.0, 2.0]], 1)
    with pytest.raises(ValueError, match="must be 2-D"):
        fn(torch.randn(64), 8)
    with pytest.raises(ValueError, match="must be 2-D"):
        fn(torch.randn(2, 3, 64), 8)
    with pytest.raises(TypeError, match=r"must have dtype in \(bfloat16, float16, float32\), got float64"):
        fn(torch.randn(4, 64, dtype=torch.float64), 8)
    with pytest.raises(TypeError, match="got int32"):
        fn(torch.zeros(4, 64, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match=r"k must satisfy 1 <= k <= 8"):
        fn(torch.randn(4, 8), 9)
    with pytest.raises(ValueError, match=r"k must satisfy 1 <= k"):
        fn(x, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        fn(x, 2.0)
    with pytest.raises(ValueError, match=r"multiple of 8 in \[8, 4096\].*got 10"):
        fn(torch.randn(4, 10), 2)
    with pytest.raises(ValueError, match=r"multiple of 8 in \[8, 4096\].*got 8192"):
        fn(torch.randn(2, 8192), 2)
    with pytest.raises(TypeError, match="check_finite must be a bool, got str"):
        fn(x, 8, check_finite="no")


@pytest.mark.parametrize("fn", [fast.bitonic_topk, fast.softmax_topk, fast.topk_softmax], ids=lambda f: f.__name__)
def test_bitonic_k_limit(fn, no_launch):
    with pytest.raises(ValueError, match=r"k must satisfy 1 <= k <= 16 .*bitonic kernel supports k <= 16"):
        fn(torch.randn(4, 64), 17)


def test_radix_k_limit(no_launch):
    with pytest.raises(ValueError, match=r"k must satisfy 1 <= k <= 128"):
        fast.radix_topk(torch.randn(4, 256), 129)


def test_topk_softmax_normalize_must_be_bool(no_launch):
    with pytest.raises(TypeError, match="normalize must be a bool"):
        fast.topk_softmax(torch.randn(4, 64), 2, normalize=1)


@pytest.mark.gpu
def test_value_checks_on_gpu():
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    x[1, 3] = float("nan")
    for fn in ALL_FUNCTIONS:
        with pytest.raises(ValueError, match="must not contain NaN"):
            fn(x, 4)
    x[1, 3] = float("inf")
    fast.bitonic_topk(x, 4)  # +-inf is a legal value for top-k ...
    fast.radix_topk(x, 4)
    for fn in (fast.softmax_topk, fast.topk_softmax):
        with pytest.raises(ValueError, match="must be finite"):  # ... but not for softmax scores
            fn(x, 4)
