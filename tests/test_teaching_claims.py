"""The numbers the docs and tutorials teach, pinned to the library functions that compute them.

Each claim a page states in prose (how many passes a radix select makes, how many bytes gather
fusion saves and in which GEMMs, how the pairs are numbered) is computed here from the library,
so a page and the code cannot drift apart silently.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sonic_learn.reference import grouped_gemm as gg
from sonic_learn.reference import topk as ref_topk
from sonic_learn.reference.routing import build_metadata, topk_routing

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------------
# Top-k: the passes of the two radix designs
# ----------------------------------------------------------------------------------------------


def test_radix_pass_counts_of_both_designs() -> None:
    # Ours: 8-bit digits, bits / 8 passes (plus the collect pass).
    assert ref_topk.RADIX_BITS == 8
    assert [ref_topk.radix_select_passes(b) for b in (16, 32, 64)] == [2, 4, 8]
    # torch.topk's single-block CUDA kernel: 2-bit digits, bits / 2 passes (at most).
    assert ref_topk.TORCH_SINGLE_BLOCK_RADIX_BITS == 2
    torch_passes = [ref_topk.radix_select_passes(b, ref_topk.TORCH_SINGLE_BLOCK_RADIX_BITS) for b in (16, 32)]
    assert torch_passes == [8, 16]
    # Its multi-block path is where 8-bit digits appear.
    assert ref_topk.TORCH_MULTI_BLOCK_RADIX_BITS == 8


def test_radix_select_passes_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="radix_bits"):
        ref_topk.radix_select_passes(16, 0)
    with pytest.raises(TypeError, match="bits"):
        ref_topk.radix_select_passes(16.0)


class _CountHistograms(TorchFunctionMode):
    """Counts the digit histograms (``scatter_add_`` calls) the reference radix select builds."""

    def __init__(self) -> None:
        super().__init__()
        self.histograms = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "scatter_add_":
            self.histograms += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_reference_radix_select_makes_the_passes_the_docs_state(dtype: torch.dtype) -> None:
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
    counter = _CountHistograms()
    with counter:
        ref_topk.radix_topk(x, 5)
    bits = torch.finfo(dtype).bits
    assert counter.histograms == ref_topk.radix_select_passes(bits)  # one histogram per digit pass


# ----------------------------------------------------------------------------------------------
# Grouped GEMM: what gather fusion saves, GEMM by GEMM
# ----------------------------------------------------------------------------------------------

GATHERING = ("up-projection", "dH", "dW2", "dW1")
NOT_GATHERING = ("down-projection", "dX~")


def test_gather_fusion_saves_a_write_and_a_read_of_the_copy_in_the_four_gathering_gemms() -> None:
    T, d, n, E, K = 24576, 1536, 256, 128, 8  # the paper's 7B configuration
    balanced = [T * K // E] * E  # 1536 rows each, a multiple of the tile: no padding
    savings = gg.gather_fusion_savings(T, d, n, balanced)
    assert set(savings) == set(GATHERING) | set(NOT_GATHERING)
    copy = 2 * T * K * d  # the gathered (TK, d) bf16 copy, "2TKd bytes"
    for gemm in GATHERING:
        assert savings[gemm] == 2 * copy, gemm  # written once, read back once
    for gemm in NOT_GATHERING:
        assert savings[gemm] == 0, gemm
    assert sum(savings.values()) == 16 * T * K * d  # per training step, bf16
    # The forward's share is the up-projection alone: 4TKd.
    assert savings["up-projection"] == 4 * T * K * d


def test_gather_fusion_savings_come_from_the_cost_model() -> None:
    T, d, n, E, K = 512, 64, 32, 16, 2
    counts = build_metadata(topk_routing(torch.randn(T, E, generator=torch.Generator().manual_seed(1)), K)).expert_counts
    savings = gg.gather_fusion_savings(T, d, n, counts, tile_m=64, tile_k=32, dtype_bytes=4)
    naive = gg.io_cost(T, d, 2 * n, counts, tile_m=64, dtype_bytes=4, variant="naive")
    fused = gg.io_cost(T, d, 2 * n, counts, tile_m=64, dtype_bytes=4, variant="gather_fused")
    assert savings["up-projection"] == naive.bytes_moved - fused.bytes_moved
    M, M_pad = int(counts.sum()), naive.padded_rows
    assert M_pad > M  # uneven counts: the naive varlen-M GEMMs also move padding rows
    b = 4
    assert savings["up-projection"] == 2 * M_pad * d * b + (M_pad - M) * 2 * n * b
    assert savings["dH"] == 2 * M_pad * d * b + (M_pad - M) * n * b
    # The varlen-K gather needs no padding: exactly the copy, written and read back.
    assert savings["dW1"] == savings["dW2"] == 2 * M * d * b


# ----------------------------------------------------------------------------------------------
# One numbering of the pairs: 1 top-k, 2 routing, 3 grouped GEMM, 4 backward
# ----------------------------------------------------------------------------------------------

# Words that name each pair; a "pair N" mention must have one of them nearby or in its file's path.
PAIR_WORDS = {1: ("top-k", "topk"), 2: ("routing", "rounding"), 3: ("gemm", "gather"), 4: ("backward",)}


def _text_files(root: Path):
    for sub in ("sonic_learn", "docs", "tutorials", "benchmarks"):
        for path in sorted((root / sub).rglob("*")):
            if path.suffix in (".py", ".md") and "__pycache__" not in path.parts:
                yield path
    yield root / "README.md"


def wrong_pair_mentions(root: Path) -> tuple[int, list[str]]:
    """(number of "pair N" mentions, those whose context and path name no word of pair N)."""
    mention = re.compile(r"\bpair (\d)\b[^\n]{0,80}", re.IGNORECASE)
    checked, wrong = 0, []
    for path in _text_files(root):
        where = str(path.relative_to(root)).lower()
        for m in mention.finditer(path.read_text(encoding="utf-8")):
            checked += 1
            words = PAIR_WORDS.get(int(m.group(1)), ())
            if not any(w in m.group(0).lower() or w in where for w in words):
                wrong.append(f"{path.relative_to(root)}: {m.group(0)!r}")
    return checked, wrong


def test_every_pair_number_names_the_same_pair() -> None:
    checked, wrong = wrong_pair_mentions(REPO)
    assert checked >= 8, "few pair numbers found: has the wording changed?"
    assert not wrong, "pair numbers that name another pair:\n" + "\n".join(wrong)


def test_readme_pair_table_uses_the_project_numbering() -> None:
    rows = re.findall(r"^\| (\d) \| ([^|]+) \|", (REPO / "README.md").read_text(), re.MULTILINE)
    assert [(int(k), v.strip()) for k, v in rows] == [
        (1, "router top-k"), (2, "routing"), (3, "expert GEMMs"), (4, "backward")]


# ----------------------------------------------------------------------------------------------
# One notation: every chapter links the notation table, and the pages use f_e (not T_e)
# ----------------------------------------------------------------------------------------------

CHAPTERS = sorted((REPO / "docs" / "tutorials").glob("*.md")) + sorted((REPO / "docs" / "course").glob("*.md"))


@pytest.mark.parametrize("page", CHAPTERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_chapter_links_the_notation_table(page: Path) -> None:
    assert "(../notation.md)" in page.read_text(), f"{page.name} does not link the notation table"


def test_pages_write_the_expert_count_as_f_e() -> None:
    offenders = [str(p.relative_to(REPO)) for p in [*(REPO / "docs").rglob("*.md"), *(REPO / "tutorials").glob("*.py")]
                 if p.name != "notation.md" and re.search(r"\bT_e\b", p.read_text())]
    assert not offenders, f"T_e used instead of f_e in {offenders}"
