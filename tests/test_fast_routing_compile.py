"""The fast routing-metadata kernels compile for Hopper (sm_90a) on a machine without a GPU.

CI has no GPU, so this is where a kernel that stops compiling is caught. Each case builds the
kernels from fake tensors (all lengths symbolic) exactly as ``sonic_learn.fast.routing`` does at
run time and checks the PTX: the target is sm_90a, nothing spills to local memory, the histogram
uses shared-memory atomics, the scans use warp shuffles, and the stable scatter is built on
``match.any.sync`` (the counts-only variant used by token rounding has no scatter kernel). The
two token-rounding kernels (key rows, boundary select) compile with all of T, E, K symbolic: the
keys kernel stages its tile in shared memory between two barriers, the select kernel builds its
radix histograms with shared-memory atomics, ranks ties with warp ballots and does the rounding
rule's integer division in 64 bits.
"""

from __future__ import annotations

import re

import pytest

from sonic_learn.fast._cute import cutlass_available  # noqa: E402  (pins sm_90a before cutlass loads)

_ok, _why = cutlass_available()
if not _ok:
    pytest.skip(_why, allow_module_level=True)
from sonic_learn.fast import routing  # noqa: E402

pytestmark = pytest.mark.compile

KERNEL_NAMES = ("histogram_kernel", "scan_tiles_kernel", "offsets_kernel", "scatter_kernel")


def _entries(ptx: str) -> list[str]:
    return re.findall(r"^\.visible \.entry (\w+)\(", ptx, re.MULTILINE)


@pytest.mark.parametrize("bucket,scatter", [(32, True), (512, True), (routing.MAX_EXPERTS, True), (128, False)])
def test_metadata_kernels_compile_for_sm90a(bucket, scatter, tmp_path):
    # --keep-ptx writes a .ptx file: keep it out of the working directory
    compiled = routing.compile_metadata_kernel(bucket, scatter, extra_options=f"--keep-ptx --dump-dir={tmp_path}")
    ptx = compiled.__ptx__
    assert re.search(r"^\.target sm_90a\b", ptx, re.MULTILINE), "PTX must target sm_90a"
    assert ".local" not in ptx, "a kernel spills registers to local memory"
    entries = _entries(ptx)
    expected = KERNEL_NAMES if scatter else KERNEL_NAMES[:3]
    assert len(entries) == len(expected), entries
    for name in expected:
        assert any(name in entry for entry in entries), f"missing kernel {name} in {entries}"
    assert re.search(r"atom\.shared[.\w]*\.add", ptx), "the histogram counts with shared-memory atomics"
    assert "shfl.sync.up" in ptx, "the tile and offset scans use warp shuffles"
    assert ("match.any.sync" in ptx) == scatter, "the stable scatter groups equal experts with match.any"


@pytest.mark.parametrize("bad", [0, 16, 48, 4096])
def test_bucket_must_be_a_supported_power_of_two(bad):
    with pytest.raises(ValueError, match="bucket must be a power of two"):
        routing.compile_metadata_kernel(bad)


def test_tiling_covers_every_pair_with_bounded_tiles():
    """Host bookkeeping: tiles * chunks * CHUNK_PAIRS >= P, at most TARGET_TILES tiles, no empty tile."""
    for P in (1, 255, 256, 257, 196_608, 800_000, 10**7):
        chunks_per_tile, num_tiles = routing._tiling(P)
        span = chunks_per_tile * routing.CHUNK_PAIRS
        assert num_tiles * span >= P > (num_tiles - 1) * span
        assert 1 <= num_tiles <= routing.TARGET_TILES


def test_expert_bucket():
    assert [routing._expert_bucket(e) for e in (1, 32, 33, 128, 129, 2048)] == [32, 32, 64, 128, 256, 2048]


def test_token_rounding_kernels_compile_for_sm90a(tmp_path):
    compiled = routing.compile_token_rounding_kernels(extra_options=f"--keep-ptx --dump-dir={tmp_path}")
    ptx = compiled.__ptx__
    assert re.search(r"^\.target sm_90a\b", ptx, re.MULTILINE), "PTX must target sm_90a"
    assert ".local" not in ptx, "a token-rounding kernel spills registers to local memory"
    entries = _entries(ptx)
    assert len(entries) == 2, entries
    keys_name, select_name = "BoundaryKeysKernel", "BoundarySelectKernel"
    assert any(keys_name in n for n in entries) and any(select_name in n for n in entries), entries
    bodies = re.split(r"^\.visible \.entry ", ptx, flags=re.MULTILINE)[1:]  # one text per kernel
    keys_ptx = next(b for b in bodies if b.split("(")[0].find(keys_name) >= 0)
    select_ptx = next(b for b in bodies if b.split("(")[0].find(select_name) >= 0)
    for body in (keys_ptx, select_ptx):
        assert re.search(r"\bbar(rier)?\.sync", body), "each kernel synchronizes its CTA"
    assert "ld.shared" in keys_ptx and "st.shared" in keys_ptx, "the keys kernel transposes through shared memory"
    assert re.search(r"st\.global(\.\w+)*\.[bu]8", keys_ptx), "the keys kernel writes the uint8 pick mask"
    assert re.search(r"atom\.shared[.\w]*\.add", select_ptx), "the radix histograms use shared-memory atomics"
    assert "vote.sync.ballot" in select_ptx, "tie ranks come from warp ballots"
    assert "match.any.sync" in select_ptx, "lanes with the same digit share one histogram atomic"
    assert "match.any.sync" in select_ptx, "lanes with the same digit share one histogram atomic"
    assert re.search(r"div\.s64", select_ptx), "the rounding rule divides in int64"
    assert re.search(r"st\.global(\.\w+)*\.[bu]8", select_ptx), "the select kernel flips uint8 keep entries"
    assert "f64" in select_ptx, "the stochastic rule compares u_e * tile_m in float64"
