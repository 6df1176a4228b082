"""Every benchmark script imports and parses its options on a machine without a GPU.

The scripts under benchmarks/ run only on the GPU machine, where a broken import costs a lease's
minutes; ``--help`` imports everything a script needs at module level, so it is checked here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from script_modules import load_script

REPO = Path(__file__).resolve().parent.parent


def env_with_repo() -> dict:
    """The environment of a script run from this checkout (its folder first on PYTHONPATH)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))


def test_there_are_scripts():
    assert len(SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_imports_and_parses(script: Path):
    env = env_with_repo()
    done = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower()


# ----------------------------------------------------------------------------------------------
# The --gemm syntax (grouped_gemm_tiles.parse / parse_layer, shared by benchmarks/moe.py)
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def tiles(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import grouped_gemm_tiles

    return grouped_gemm_tiles


def test_parse_layer_one_config_is_every_gemms(tiles):
    from sonic_learn.fast.grouped_gemm import GemmConfig, LayerGemms

    assert tiles.parse_layer("ws:128x256x64:auto") == GemmConfig()
    assert tiles.parse_layer("ws:128x256x64:4:c2:sub64") == GemmConfig(stages=4, cluster_m=2, epi_subtile=64)
    assert tiles.parse_layer("ws:128x256x32:auto:notma") == GemmConfig(tile=(128, 256, 32), tma_store=False)
    assert tiles.parse_layer("pingpong:128x128x64:3") == GemmConfig(kernel="pingpong", stages=3)
    assert tiles.parse_layer("pingpong:128x128x64:auto:c2") == GemmConfig(kernel="pingpong", cluster_m=2)
    assert tiles.parse_layer("ws:128x256x64:auto:pf") == GemmConfig(epi_prefetch=8)
    assert tiles.parse_layer("ws:128x256x64:auto:pf16") == GemmConfig(epi_prefetch=16)
    assert tiles.parse_layer("dh=pingpong:128x128x64:auto:c2:pf4") == LayerGemms(
        dh=GemmConfig(kernel="pingpong", cluster_m=2, epi_prefetch=4))


def test_parse_layer_by_role(tiles):
    from sonic_learn.fast.grouped_gemm import DEFAULT_CONFIG, GEMM_ROLES, GemmConfig, LayerGemms

    pp, sub = GemmConfig(kernel="pingpong"), GemmConfig(epi_subtile=32)
    got = tiles.parse_layer("up/dh=pingpong:128x128x64:auto")
    assert got == LayerGemms(up=pp, dh=pp) and got.down is DEFAULT_CONFIG
    assert tiles.parse_layer("up/dh=pingpong:128x128x64:auto+down/dx=ws:128x256x64:auto:sub32") == LayerGemms(
        up=pp, dh=pp, down=sub, dx=sub)
    # a bare part is the config of every role not named
    assert tiles.parse_layer("ws:128x256x64:auto:sub32+dw=ws:128x256x64:auto") == LayerGemms(
        **{role: sub for role in GEMM_ROLES if role != "dw"})
    assert tiles.parse_layer("dw=ws:128x128x64:auto:c1") == LayerGemms(dw=GemmConfig(tile=(128, 128, 64), cluster_m=1))
    # upstream SonicMoE's dH GEMM: ping-pong, 128 x 128 x 64, clusters of 2 along M
    assert tiles.parse_layer("dh=pingpong:128x128x64:auto:c2") == LayerGemms(
        dh=GemmConfig(kernel="pingpong", cluster_m=2))
    # ... and its short-K down-projection and dX~: ping-pong 128 x 192 x 64 (plain store only)
    pp192 = GemmConfig(kernel="pingpong", tile=(128, 192, 64))
    assert tiles.parse_layer("down/dx=pingpong:128x192x64:auto") == LayerGemms(down=pp192, dx=pp192)
    pp192_c2 = GemmConfig(kernel="pingpong", tile=(128, 192, 64), cluster_m=2)
    assert tiles.parse_layer("down/dx=pingpong:128x192x64:auto:c2+dh=pingpong:128x128x64:auto:c2") == LayerGemms(
        down=pp192_c2, dx=pp192_c2, dh=GemmConfig(kernel="pingpong", cluster_m=2))


def test_tile_sweep_parses_the_192_tiles(tiles):
    """``grouped_gemm_tiles.py --configs pingpong:128x192x64:auto`` (and the cooperative 192): each
    config is one GemmConfig; the plain-store-only ping-pong tile says so (no SwiGLU row)."""
    from sonic_learn.fast.grouped_gemm import GemmConfig

    pp = GemmConfig(**tiles.parse("pingpong:128x192x64:auto"))
    assert pp == GemmConfig(kernel="pingpong", tile=(128, 192, 64)) and not pp.fused_epilogues
    assert GemmConfig(**tiles.parse("pingpong:128x192x64:auto:c2:notma")) == GemmConfig(
        kernel="pingpong", tile=(128, 192, 64), cluster_m=2, tma_store=False)
    assert GemmConfig(**tiles.parse("ws:128x192x64:auto:sub32")).fused_epilogues


def test_tile_sweep_rejects_unknown_shapes_before_needing_a_gpu():
    """``--shapes`` takes <config>-<projection> with the projections up, down and dx (the dX~ GEMM,
    K-major weights); anything else stops the script before any GPU work."""
    env = env_with_repo()
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "grouped_gemm_tiles.py"), "--shapes",
                           "7b-down,7b-side,70b-dx"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: --shapes: unknown ['7b-side', '70b-dx']" in done.stderr, done.stderr[-2000:]


def test_vs_upstream_parses_the_pingpong_192_entry():
    """``benchmarks/vs_upstream.py --gemm "down/dx=pingpong:128x192x64:auto"``: one extra row, our layer
    with its down-projection and dX~ GEMMs on the ping-pong 128 x 192 tile."""
    from sonic_learn.fast.grouped_gemm import DEFAULT_CONFIG, GemmConfig

    vs = load_script("benchmarks/vs_upstream.py", "vs_upstream_for_parse")
    entry = "down/dx=pingpong:128x192x64:auto"
    layer = vs.parse_args(["--gemm", entry]).gemm_variants[entry]
    pp192 = GemmConfig(kernel="pingpong", tile=(128, 192, 64))
    assert layer.down == layer.dx == pp192 and layer.up == layer.dh == layer.dw == DEFAULT_CONFIG


@pytest.mark.parametrize("entry,message", [
    ("gate=ws:128x256x64:auto", r"unknown role 'gate', choose from up, down, dh, dx, dw"),
    ("up/=ws:128x256x64:auto", r"unknown role ''"),
    ("up=ws:128x256x64:auto+up/dh=ws:128x256x64:3", r"role 'up' assigned twice"),
    ("ws:128x256x64:auto+ws:128x256x64:3", r"more than one config without a role"),
    ("up=", r"config '': not enough values"),
    ("up=pingpong:128x256x64:auto", r"config 'pingpong:128x256x64:auto': the ping-pong kernel .* tile_n in "
                                    r"\(64, 128, 192\)"),
    # the ping-pong 128 x 192 tile runs the plain store only: down / dx, not the fused roles
    ("pingpong:128x192x64:auto", r"LayerGemms.up: .* runs the plain store only"),
    ("up/down=pingpong:128x192x64:auto", r"LayerGemms.up: .* the fused SwiGLU epilogue"),
    ("ws:128x256x64:auto+dw=pingpong:128x192x64:auto:c2", r"LayerGemms.dw: .* the transposed varlen-K store"),
    ("down=v1:128x192x64:auto", r"kernel 'v1' takes tile_n in \(64, 128, 256\)"),
    ("ws:128x256x64:auto:nottma", r"unknown flags \['nottma'\]"),
    ("up=ws:128x256x64:auto:c2+dh", r"config 'dh': not enough values"),
    ("ws:128x256x64:auto:sub", r"unknown flags \['sub'\]"),
    ("dh=sm90:128x128x64:auto:c2", r"cluster_m=2 needs a persistent kernel \('ws', 'pingpong'\)"),
])
def test_parse_layer_rejects_bad_entries(tiles, entry, message):
    import re

    with pytest.raises(ValueError, match=re.escape(f"--gemm entry {entry!r}") + ".*" + message):
        tiles.parse_layer(entry)


@pytest.mark.parametrize("script", ["moe.py", "token_rounding.py", "vs_upstream.py"])
@pytest.mark.parametrize("gemm,message", [
    ("ws:128x256x64:auto,up/dx=pingpong:128x256x64:auto",
     "error: --gemm entry 'up/dx=pingpong:128x256x64:auto': config 'pingpong:128x256x64:auto': the ping-pong"),
    ("ws:128x256x64:auto,up=ws:128x256x64:auto,ws:128x256x64:auto",
     "error: --gemm: entries given twice: ['ws:128x256x64:auto']"),
    ("pingpong:128x192x64:auto", "error: --gemm entry 'pingpong:128x192x64:auto': LayerGemms.up:"),
    ("dh=ws:128x256x64:auto:pf-1", "error: --gemm entry 'dh=ws:128x256x64:auto:pf-1': config"),
])
def test_gemm_options_reject_bad_entries_before_needing_a_gpu(script, gemm, message):
    """``--gemm`` of the layer benchmarks (grouped_gemm_tiles.parse_gemm_option): a bad or repeated
    entry exits with status 2 naming it, before any GPU work."""
    env = env_with_repo()
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--gemm", gemm], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr, done.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# The GPU probe scripts: benchmarks/layer_kernels.py (the Nsight Compute driver) and
# benchmarks/dh_layout.py (the dH GEMM under routings that differ in one thing at a time). Their
# --shape is sonic_learn.bench.parse_layer_shape (tests/test_bench.py has its cases).
# ----------------------------------------------------------------------------------------------
PROBES = ("layer_kernels", "dh_layout")


@pytest.fixture(scope="module")
def probes():
    return {name: load_script(f"benchmarks/{name}.py", name) for name in PROBES}


def test_layer_kernels_parses_shape_and_routings(probes):
    layer_kernels = probes["layer_kernels"]
    args = layer_kernels.parse_args(["--shape", "64,32,16,8,2", "--routings", "token_rounding", "--steps", "3"])
    assert args.shape == (64, 32, 16, 8, 2) and args.routings == ["token_rounding"] and args.steps == 3
    assert layer_kernels.parse_args([]).routings == ["topk", "token_rounding"]


def test_layer_kernels_runs_upstream_top_k_only(probes):
    layer_kernels = probes["layer_kernels"]
    args = layer_kernels.parse_args(["--impl", "upstream", "--profile-last"])
    assert args.impl == "upstream" and args.routings == ["topk"] and args.profile_last
    assert not layer_kernels.parse_args([]).profile_last


def test_layer_kernels_upstream_step_needs_only_sonicmoe():
    """The upstream step runs in upstream's process, beside another CuTe-DSL: it loads
    ``compare/upstream.py`` as a file, so in a fresh interpreter without upstream the one missing
    module is ``sonicmoe``, and neither CuTe-DSL nor ``sonic_learn.fast`` has been imported."""
    code = (
        "import runpy, sys, torch\n"
        "m = runpy.run_path('benchmarks/layer_kernels.py')\n"
        "inputs = tuple(torch.zeros(s) for s in ((4, 8), (8, 2), (2, 8, 6), (2, 3, 8), (4, 8)))\n"
        "try:\n"
        "    m['layer_step']('upstream', 'topk', inputs, 1)\n"
        "except ModuleNotFoundError as e:\n"
        "    print('missing', e.name)\n"
        "print('cutlass' in sys.modules, 'sonic_learn.fast' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env_with_repo(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["missing sonicmoe", "False False"], done.stdout


def test_dh_layout_parses_its_options(probes):
    dh_layout = probes["dh_layout"]
    args = dh_layout.parse_args(["--shape", "64,32,16,8,2", "--reps", "3", "--shifts", "8",
                                 "--dh-configs", "pingpong:128x128x64:auto,ws:128x256x64:auto:c2"])
    assert args.shape == (64, 32, 16, 8, 2) and args.reps == 3 and args.shifts == (8,) and args.out is None
    assert args.dh_configs["pingpong:128x128x64:auto"].dh.kernel == "pingpong"
    assert args.dh_configs["ws:128x256x64:auto:c2"].dh.cluster_m == 2
    defaults = dh_layout.parse_args([])
    assert defaults.shifts == (8, 64) and defaults.dh_configs == {}


@pytest.mark.parametrize("script,argv,message", [
    ("layer_kernels", ["--shape", "64,32,16,8"], "--shape: five positive integers"),
    ("layer_kernels", ["--routings", "expert_choice"], "--routings: choose from"),
    ("layer_kernels", ["--steps", "0"], "--steps must be >= 1"),
    ("layer_kernels", ["--impl", "quack"], "--impl: choose from ('sonic_learn', 'upstream')"),
    ("layer_kernels", ["--impl", "upstream", "--routings", "token_rounding"],
     "--routings: choose from ('topk',) for --impl upstream"),
    ("dh_layout", ["--shape", "64,32,x,8,2"], "--shape: five integers"),
    ("dh_layout", ["--shifts", "8,x"], "--shifts takes integers"),
    ("dh_layout", ["--shifts", "0"], "--shifts must be between 1 and T = 16384"),
    ("dh_layout", ["--shape", "64,32,16,8,2", "--shifts", "65"], "--shifts must be between 1 and T = 64"),
    ("dh_layout", ["--reps", "0"], "--reps must be >= 1"),
    ("dh_layout", ["--dh-configs", "ws:128x256x64:auto:fast"],
     "--dh-configs: config 'ws:128x256x64:auto:fast': unknown flags"),
    ("dh_layout", ["--dh-configs", "pingpong:128x128x64:auto,ws:128x256x64:auto,pingpong:128x128x64:auto"],
     "--dh-configs: configs given twice: ['pingpong:128x128x64:auto']"),
])
def test_probe_scripts_reject_bad_options(probes, script, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        probes[script].parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU exit")
@pytest.mark.parametrize("script,argv", [("layer_kernels", ["--steps", "1"]), ("dh_layout", [])])
def test_probe_scripts_need_a_gpu(probes, script, argv, capsys):
    assert probes[script].main(argv) == 2
    assert f"{script} needs a CUDA GPU" in capsys.readouterr().err
