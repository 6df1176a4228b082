"""The shared contract (``sonic_learn.contracts``): inputs that used to be accepted silently are now
clear errors naming the argument, on the reference path (CPU) and in the checks the fast path shares.

Each test below failed on the version before the contract module: a negative expert count with
consistent offsets, duplicate (token, expert) pairs, unsorted token ids, options the chosen routing
does not use, NaN/inf in x reported as a problem of the logits, an integer layer dtype, a huge
GEMM tile and negative sizes in the memory formula. The value checks (they read tensor values)
are skipped under torch.compile, in one place: ``contracts.value_checks_enabled``.
"""

from __future__ import annotations

import pytest
import torch

import sonic_learn
from sonic_learn import contracts
from sonic_learn.contracts import Routing, RoutingMetadata
from sonic_learn.fast import moe as fast_moe  # imports without CuTe-DSL: the kernels load on first use
from sonic_learn.reference import grouped_gemm as gg
from sonic_learn.reference import moe
from sonic_learn.reference.routing import build_metadata


def _layer(T=6, d=8, n=4, E=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, dtype=dtype, generator=g)
    router_w = torch.randn(d, E, dtype=dtype, generator=g)
    w1 = torch.randn(E, d, 2 * n, dtype=dtype, generator=g)
    w2 = torch.randn(E, n, d, dtype=dtype, generator=g)
    return x, router_w, w1, w2


def _routing(tokens, experts, T, E):
    idx = torch.tensor
    return Routing(idx(tokens, dtype=torch.int32), idx(experts, dtype=torch.int32),
                   torch.ones(len(tokens), dtype=torch.float32), T, E)


# ---------------------------------------------------------------------------------------------
# Metadata and routings that are not what they claim
# ---------------------------------------------------------------------------------------------
def test_metadata_with_a_negative_count_is_rejected_even_if_offsets_agree():
    # counts (2, -1, 3) are the differences of offsets (0, 2, 1, 4): consistent, and still wrong
    i32 = torch.int32
    meta = RoutingMetadata(
        expert_counts=torch.tensor([2, -1, 3], dtype=i32), expert_offsets=torch.tensor([0, 2, 1, 4], dtype=i32),
        gather_idx=torch.tensor([0, 1, 2, 3], dtype=i32), pair_of_row=torch.arange(4, dtype=i32),
        row_of_pair=torch.arange(4, dtype=i32), num_tokens=4, num_experts=3)
    x, w = torch.randn(4, 5), torch.randn(3, 5, 2)
    for gemm in (gg.naive_grouped_gemm, gg.gather_fused_grouped_gemm):
        with pytest.raises(ValueError, match=r"meta.expert_counts must be >= 0 .*expert_counts\[1\] = -1"):
            gemm(x, w, meta, tile_m=2)
    with pytest.raises(ValueError, match="meta.expert_counts must be >= 0"):
        gg.grouped_gemm_varlen_k(x, torch.randn(4, 2), meta, gather_a=True)


def test_build_metadata_rejects_a_pair_given_twice():
    r = _routing([0, 1, 1, 2], [3, 0, 0, 1], T=3, E=4)  # token 1 -> expert 0 twice
    with pytest.raises(ValueError, match=r"\(token, expert\) pair twice, got token 1 -> expert 0"):
        build_metadata(r)


def test_build_metadata_rejects_unsorted_token_ids():
    r = _routing([0, 2, 1], [0, 1, 2], T=3, E=4)
    with pytest.raises(ValueError, match=r"routing.token_idx must be ascending .* pair 2 has token 1 after token 2"):
        build_metadata(r)


def test_build_metadata_still_accepts_a_valid_routing():
    r = _routing([0, 0, 1, 3], [2, 0, 2, 1], T=4, E=3)  # within a token the experts need no order
    meta = build_metadata(r)
    assert meta.expert_counts.tolist() == [1, 1, 2]


# ---------------------------------------------------------------------------------------------
# The layer validates every option, even those the chosen routing does not use
# ---------------------------------------------------------------------------------------------
LAYER_FUNCTIONS = [moe.moe_forward, moe.naive_moe_forward, moe.saved_tensors]


@pytest.mark.parametrize("fn", LAYER_FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("routing", ["topk", "token_rounding"])
def test_unused_options_are_still_validated(fn, routing):
    args = (*_layer(), 2)
    with pytest.raises(ValueError, match="rounding_mode must be one of"):
        fn(*args, routing=routing, rounding_mode="banker")
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got str"):
        fn(*args, routing=routing, generator="seed")
    with pytest.raises(ValueError, match="scoring must be one of"):
        fn(*args, routing=routing, scoring="sigmoid")


def test_fast_layer_checks_the_same_options_before_anything_else():
    # the fast layer's checks run on CPU tensors too (they raise before any CUDA check or launch)
    args = (*_layer(dtype=torch.bfloat16), 2)
    with pytest.raises(ValueError, match="rounding_mode must be one of"):
        fast_moe.check_inputs(*args, routing="topk", rounding_mode="banker")
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None"):
        fast_moe.check_inputs(*args, routing="topk", generator="seed")


# ---------------------------------------------------------------------------------------------
# Bad values in x are reported as bad values in x
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [moe.moe_forward, moe.naive_moe_forward], ids=lambda f: f.__name__)
def test_nan_and_inf_in_x_are_named_and_told_apart(fn):
    x, router_w, w1, w2 = _layer()
    x_nan, x_inf, x_neg_inf = x.clone(), x.clone(), x.clone()
    x_nan[2, 3] = float("nan")
    x_inf[1, 0] = float("inf")
    x_neg_inf[0, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"^x must not contain NaN$"):
        fn(x_nan, router_w, w1, w2, 2)
    for bad in (x_inf, x_neg_inf):
        with pytest.raises(ValueError, match=r"^x must be finite, got \+-inf values$"):
            fn(bad, router_w, w1, w2, 2)


def test_the_layer_module_names_x_too():
    layer = sonic_learn.MoE(8, 4, 4, 2, dtype=torch.float64)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    x[1, 1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"^x must be finite"):
        layer(x)


# ---------------------------------------------------------------------------------------------
# Sizes and dtypes that cannot be meant
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_moe_module_rejects_a_non_float_dtype_clearly(dtype):
    with pytest.raises(TypeError, match=r"^dtype must be None or a float dtype .* got torch\." + str(dtype)[6:]):
        sonic_learn.MoE(8, 4, 4, 2, dtype=dtype)


def test_a_huge_gemm_tile_is_an_error_not_an_allocation():
    meta = build_metadata(_routing([0, 1, 2], [0, 1, 1], T=3, E=2))
    x, w = torch.randn(3, 4), torch.randn(2, 4, 5)
    for gemm in (gg.gather_fused_grouped_gemm, gg.naive_grouped_gemm):  # (naive last: it is the one that allocates)
        with pytest.raises(ValueError, match=r"tile_m must satisfy 1 <= tile_m <= 65536 .* got 1000000000"):
            gemm(x, w, meta, tile_m=10**9)
    assert gg.naive_grouped_gemm(x, w, meta, tile_m=contracts.MAX_TILE_M).shape == (3, 5)  # the bound is allowed
    with pytest.raises(ValueError, match="tile_m must satisfy"):
        moe.moe_forward(*_layer(), 2, tile_m=10**9)


@pytest.mark.parametrize("fn", [moe.expected_saved_bytes, fast_moe.expected_saved_bytes],
                         ids=["reference", "fast"])
@pytest.mark.parametrize("name", ["T", "d", "n", "E", "P"])
def test_expected_saved_bytes_rejects_negative_sizes(fn, name):
    sizes = {"T": 4, "d": 8, "n": 2, "E": 3, "P": 8}
    sizes[name] = -5
    with pytest.raises(ValueError, match=rf"^{name} must satisfy"):
        fn(**sizes)
    assert fn(4, 8, 2, 3, 8)["total"] > 0


# ---------------------------------------------------------------------------------------------
# The one switch for value checks: skipped under torch.compile
# ---------------------------------------------------------------------------------------------
def test_value_checks_run_eagerly_and_skip_while_compiling(monkeypatch):
    bad = _routing([1, 0], [0, 0], T=2, E=1)  # unsorted
    nan = torch.tensor([1.0, float("nan")])
    assert contracts.value_checks_enabled()
    with pytest.raises(ValueError):
        contracts.check_routing_values(bad)
    with pytest.raises(ValueError):
        contracts.check_finite_values("x", nan)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not contracts.value_checks_enabled()
    contracts.check_routing_values(bad)  # skipped: it would read the device
    contracts.check_finite_values("x", nan)


def test_fullgraph_compile_of_a_value_check_does_not_break_the_graph():
    def scaled(x):
        contracts.check_finite_values("x", x)  # a graph break here would fail fullgraph=True
        return x * 2

    compiled = torch.compile(scaled, backend="eager", fullgraph=True)
    x = torch.tensor([1.0, float("nan")])
    torch.testing.assert_close(compiled(x), x * 2, equal_nan=True)
    with pytest.raises(ValueError, match="NaN"):
        scaled(x)  # eagerly the check runs
