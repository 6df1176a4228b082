"""Per-role grouped-GEMM configs of the fast MoE layer (``grouped_gemm.LayerGemms``), on the CPU.

``fast.moe.fast_ops(gemm=LayerGemms(...))`` must hand each GEMM of the layer its own role's
``GemmConfig``. Here the grouped-GEMM entry points of ``sonic_learn.fast.grouped_gemm`` are replaced
by recorders that note the ``config=`` each call receives and then compute with the torch stand-ins
of ``test_fast_moe_compile`` (the reference formulas). The layer runs forward and backward in
float64, both backward modes and both routings; each recorded call's role is told from its
operands alone (which function, which weight, transposed or not), never from the label the layer
passes, and must have received that role's config. The result must still match the reference layer.
Last, every kernel that the layer A/B's per-role assignments launch is compiled for sm_90a, so
that the GPU session meets no compile error. The GPU run of such configs against the float64
oracle is in tests/test_fast_moe.py.
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from test_fast_moe_compile import (  # the kernels' torch stand-ins and the CPU layer's check
    TORCH_OPS, _params, _route, check_cpu_layer_against_reference)

from sonic_learn.fast import grouped_gemm as gg
from sonic_learn.fast import moe as fast_moe

pytestmark = pytest.mark.compile  # imports the CuTe-DSL kernels' modules (nothing is launched)

# A different config for every role: the cap on CTAs tells them apart.
ROLE_CONFIGS = gg.LayerGemms(**{role: gg.GemmConfig(max_ctas=i + 1) for i, role in enumerate(gg.GEMM_ROLES)})
CALLS_PER_ROLE = {"up": 1, "down": 1, "dh": 1, "dx": 1, "dw": 2}  # dW1 and dW2 are both "dw"
D, N = 24, 8  # d, n, 2n all distinct: a weight's shape says whether it is W1 (E, d, 2n) or W2 (E, n, d)


def _role_of(fn_name: str, args: tuple, kwargs: dict) -> str:
    """The role of one grouped-GEMM call, from what it computes."""
    if fn_name == "gather_fused_grouped_gemm_swiglu":
        return "up"
    if fn_name == "gather_fused_grouped_gemm_dswiglu":
        return "dh"
    if fn_name == "grouped_gemm_varlen_k":
        return "dw"
    w, transposed = args[1], kwargs.get("transpose_w", False)
    is_w1 = tuple(w.shape[1:]) == (D, 2 * N)
    assert is_w1 or tuple(w.shape[1:]) == (N, D), w.shape
    return {(True, False): "up", (False, False): "down", (False, True): "dh", (True, True): "dx"}[is_w1, transposed]


@pytest.fixture
def recorded(monkeypatch):
    """Replace the entry points the layer's ``fast_ops`` calls by recorders: (function name, args,
    keyword args without config, config) per call; each computes with the torch stand-in."""
    calls = []
    stand_ins = {
        "gather_fused_grouped_gemm": lambda x, w, meta, tile_m, transpose_w: TORCH_OPS.gather_gemm(
            x, w, meta, transpose_w),
        "contiguous_grouped_gemm": lambda a, w, meta, tile_m, transpose_w: TORCH_OPS.grouped_gemm(
            a, w, meta, transpose_w),
        "gather_fused_grouped_gemm_swiglu": lambda x, w, meta, tile_m, fused: TORCH_OPS.gather_gemm_swiglu(x, w, meta),
        "gather_fused_grouped_gemm_dswiglu": lambda dout, w2, meta, h, s, tile_m, fused: TORCH_OPS.dh_gemm(
            dout, w2, meta, h, s),
        "grouped_gemm_varlen_k": lambda a, b, meta, gather_a, transpose_out: TORCH_OPS.varlen_k_gemm(
            a, b, meta, gather_a, transpose_out),
    }
    for name, compute in stand_ins.items():
        def record(*args, config, name=name, compute=compute, **kwargs):
            calls.append((name, args, kwargs, config))
            return compute(*args, **kwargs)
        monkeypatch.setattr(gg, name, record)
    return calls


def _cpu_ops(gemm, **fuse) -> fast_moe.ExpertOps:
    """``fast_ops(gemm)``'s GEMMs (through the recorders) with the memory-bound kernels on torch."""
    ops = fast_moe.fast_ops(gemm, **fuse)
    return dataclasses.replace(ops, swiglu=TORCH_OPS.swiglu, swiglu_backward=TORCH_OPS.swiglu_backward,
                               gather_scale_dot=TORCH_OPS.gather_scale_dot, gather_sum=TORCH_OPS.gather_sum)


def _run_layer(ops, routing, backward, T=19, E=4, k=2, seed=0):
    """Forward + backward of the fast layer's autograd Functions on ``ops``, checked against the
    reference layer (float64)."""
    check_cpu_layer_against_reference(_params(T, D, N, E, seed), k, routing, backward, seed, ops)


@pytest.mark.parametrize("routing", ["topk", "token_rounding"])
@pytest.mark.parametrize("backward", ["reduced_memory", "standard"])
def test_every_gemm_gets_its_roles_config(recorded, backward, routing):
    _run_layer(_cpu_ops(ROLE_CONFIGS), routing, backward)
    roles = collections.Counter()
    for name, args, kwargs, config in recorded:
        role = _role_of(name, args, kwargs)
        roles[role] += 1
        assert config == ROLE_CONFIGS.config(role), f"{name} plays {role!r} but got {config}"
    assert roles == CALLS_PER_ROLE, roles


@pytest.mark.parametrize("fuse", [True, False])
def test_fusion_flags_reach_the_up_and_dh_gemms_on_their_configs(recorded, fuse):
    _run_layer(_cpu_ops(ROLE_CONFIGS, fuse_swiglu=fuse, fuse_dh=not fuse), "topk", "reduced_memory")
    fused = {name: kwargs["fused"] for name, _, kwargs, _ in recorded if "fused" in kwargs}
    assert fused == {"gather_fused_grouped_gemm_swiglu": fuse, "gather_fused_grouped_gemm_dswiglu": not fuse}


def test_one_gemm_config_serves_every_role(recorded):
    """``fast_ops(gemm=GemmConfig(...))`` keeps its meaning: that config for every GEMM."""
    one = gg.GemmConfig(kernel="pingpong")
    assert gg.LayerGemms.uniform(one) == gg.LayerGemms(**{role: one for role in gg.GEMM_ROLES})
    _run_layer(_cpu_ops(one), "topk", "standard")
    _run_layer(_cpu_ops(one), "token_rounding", "reduced_memory")
    assert len(recorded) == 2 * sum(CALLS_PER_ROLE.values())
    assert all(config == one for *_, config in recorded)


def test_the_gathered_gemm_takes_its_callers_role(recorded):
    """``gather_gemm`` (not called by the layer itself) runs the config of the role it is given."""
    ops = _cpu_ops(ROLE_CONFIGS)
    x, _, w1, w2 = (p.detach() for p in _params(6, D, N, 3, seed=2))
    _, meta, _ = _route(torch.randn(6, 3, dtype=torch.float64), 2, "topk", 4)
    ops.gather_gemm(x, w1, meta, role="up")
    ops.gather_gemm(torch.randn(6, D, dtype=torch.float64), w2, meta, True, role="dh")
    assert [(_role_of(name, args, kwargs), config) for name, args, kwargs, config in recorded] == [
        ("up", ROLE_CONFIGS.up), ("dh", ROLE_CONFIGS.dh)]


# ----------------------------------------------------------------------------------------------
# Validation: before any launch, naming the argument and the role
# ----------------------------------------------------------------------------------------------
def test_layer_gemms_defaults_and_roles():
    assert [f.name for f in dataclasses.fields(gg.LayerGemms)] == list(gg.GEMM_ROLES)
    default = gg.LayerGemms()
    assert all(default.config(role) is gg.DEFAULT_CONFIG for role in gg.GEMM_ROLES)
    assert gg.checked_layer_gemms(None) is gg.DEFAULT_LAYER_GEMMS == default
    assert gg.checked_layer_gemms(ROLE_CONFIGS) is ROLE_CONFIGS
    with pytest.raises(dataclasses.FrozenInstanceError):
        default.up = gg.GemmConfig()


@pytest.mark.parametrize("role", list(gg.GEMM_ROLES))
@pytest.mark.parametrize("bad", ["pingpong", None, {"kernel": "ws"}])
def test_a_role_that_is_not_a_gemm_config_is_rejected(role, bad):
    with pytest.raises(TypeError, match=rf"LayerGemms\.{role} \(the '{role}' GEMM's config\) must be a "
                                        rf"sonic_learn.fast.grouped_gemm.GemmConfig, got {type(bad).__name__}"):
        gg.LayerGemms(**{role: bad})


def test_fast_ops_rejects_a_gemm_of_the_wrong_type():
    for bad in ("pingpong:128x128x64:auto", {"up": gg.GemmConfig()}, 3):
        with pytest.raises(TypeError, match=rf"gemm must be a sonic_learn.fast.grouped_gemm.GemmConfig \(every "
                                            rf"GEMM\), a LayerGemms \(one config per role: up, down, dh, dx, dw\) "
                                            rf"or None, got {type(bad).__name__}"):
            fast_moe.fast_ops(bad)
    with pytest.raises(TypeError, match="config must be a sonic_learn.fast.grouped_gemm.GemmConfig or None, got str"):
        gg.LayerGemms.uniform("ws")


def test_unknown_role_is_rejected_before_any_launch(recorded):
    ops = _cpu_ops(ROLE_CONFIGS)
    with pytest.raises(ValueError, match=r"role must be one of \('up', 'down', 'dh', 'dx', 'dw'\), got 'gate'"):
        ops.grouped_gemm(None, None, None, role="gate")
    with pytest.raises(ValueError, match="role must be one of"):
        ROLE_CONFIGS.config("w1")
    with pytest.raises(TypeError, match="role"):  # the plain GEMMs serve several roles: the caller must say which
        ops.grouped_gemm(None, None, None)
    assert recorded == []


# ----------------------------------------------------------------------------------------------
# Ready for the GPU: every kernel the layer's A/B assignments launch compiles for sm_90a
# ----------------------------------------------------------------------------------------------
def _kernel_of(fn_name: str, kwargs: dict) -> tuple[str, bool, str]:
    """(variant, transposed, epilogue) that a call of a production-kernel entry point compiles."""
    if fn_name == "gather_fused_grouped_gemm_swiglu":
        return "varlen_m_gather", False, "swiglu" if kwargs["fused"] else "store"
    if fn_name == "gather_fused_grouped_gemm_dswiglu":
        return "varlen_m_gather", True, "dswiglu" if kwargs["fused"] else "store"
    if fn_name == "grouped_gemm_varlen_k":
        return "varlen_k_gather" if kwargs["gather_a"] else "varlen_k", kwargs["transpose_out"], "store"
    return "varlen_m_gather" if fn_name == "gather_fused_grouped_gemm" else "varlen_m", kwargs["transpose_w"], "store"


PINGPONG, SUB32 = gg.GemmConfig(kernel="pingpong"), gg.GemmConfig(epi_subtile=32)
PINGPONG_C2 = gg.GemmConfig(kernel="pingpong", cluster_m=2)  # upstream SonicMoE's dH configuration
AB_ASSIGNMENTS = {  # the per-role rows of the layer A/B (benchmarks/moe.py --gemm)
    "up/dh=pingpong": gg.LayerGemms(up=PINGPONG, dh=PINGPONG),
    "up/dh=pingpong:c2": gg.LayerGemms(up=PINGPONG_C2, dh=PINGPONG_C2),
    "up/dh/down/dx=pingpong": gg.LayerGemms(up=PINGPONG, dh=PINGPONG, down=PINGPONG, dx=PINGPONG),
    "down/dx=ws:sub32": gg.LayerGemms(down=SUB32, dx=SUB32),
}


@pytest.mark.parametrize("name", list(AB_ASSIGNMENTS))
def test_the_kernels_of_per_role_assignments_compile_for_sm90a(recorded, name):
    """The layer runs on the CPU (both backward modes) with the recorders; each call's kernel, on its
    role's config, is then compiled for Hopper (the default config's kernels are compiled elsewhere)."""
    from sonic_learn.fast._cute import cutlass_available

    ok, why = cutlass_available()
    if not ok:
        pytest.skip(f"CuTe-DSL not importable: {why}")
    for backward in ("reduced_memory", "standard"):
        _run_layer(_cpu_ops(AB_ASSIGNMENTS[name]), "topk", backward)
    kernels = {(config, *_kernel_of(fn, kwargs)) for fn, _, kwargs, config in recorded if config != gg.DEFAULT_CONFIG}
    assert kernels, "no call ran on the assignment's configs"
    # up, dh (fused and plain: both modes), down and dx on their configs; dw stays on the default
    assert {(c.kernel, c.epi_subtile, v, t, e) for c, v, t, e in kernels} <= {
        (c.kernel, c.epi_subtile, v, t, e) for c in (PINGPONG, SUB32) for v, t, e in (
            ("varlen_m_gather", False, "swiglu"), ("varlen_m_gather", True, "dswiglu"),
            ("varlen_m", False, "store"), ("varlen_m", True, "store"))}
    for config, variant, transposed, epilogue in sorted(kernels, key=repr):  # a compile error fails the test
        gg._compiled(config, variant, torch.bfloat16, torch.bfloat16, transposed, epilogue)
    # ... and each reached the compiler with its config's kernel and cluster size (c2: clusters of 2)
    from sonic_learn.fast._cute import compiled_variants

    built = {(kw["kernel"], kw["cluster_m"], args[0], kw["transposed"], kw["epilogue"])
             for name, args, kw in compiled_variants() if name == "compile_grouped_gemm"}
    for config, variant, transposed, epilogue in kernels:
        cluster_m = config.cluster_m or gg.cluster_size(variant.startswith("varlen_k"), config)  # asked, or the rule
        assert (config.kernel, cluster_m, variant, transposed, epilogue) in built
