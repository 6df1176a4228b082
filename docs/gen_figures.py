"""Draw the pictures of the docs from the library's own code: ``python docs/gen_figures.py``.

Every figure is computed, not drawn by hand:

- ``bitonic_network.png``: the compare-exchange schedule of the bitonic sort in
  ``sonic_learn.reference.topk`` (the same (block size, stride) rule, checked to sort);
- ``padding_waste.png``: the fraction of a tile-based grouped GEMM's rows that are padding, versus
  the tokens an expert receives (the ceil-to-tile rule of ``naive_grouped_gemm``/``io_cost``);
- ``backward_memory.png``: activations cached by each backward mode versus expert granularity at
  fixed FLOPs, from ``sonic_learn.reference.moe.expected_saved_bytes`` (the shape of the paper's
  Figure 1);
- ``gemm_io.png``: bytes moved by the naive and the gather-fused grouped GEMM, from
  ``sonic_learn.reference.grouped_gemm.io_cost``.

The PNGs are committed under ``docs/assets/figures/``; ``tests/test_docs_figures.py`` regenerates
them into a temporary folder and checks the data behind them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from sonic_learn.reference.grouped_gemm import io_cost  # noqa: E402
from sonic_learn.reference.moe import expected_saved_bytes  # noqa: E402

FIGURES_DIR = Path(__file__).resolve().parent / "assets" / "figures"
_SAVE = {"dpi": 110, "bbox_inches": "tight", "metadata": {"Software": None}}


# ---------------------------------------------------------------------------------------------
# 1. The bitonic network
# ---------------------------------------------------------------------------------------------
def bitonic_schedule(n: int) -> list[list[tuple[int, int]]]:
    """Stages of a bitonic sort (descending) on n wires: each stage lists (max wire, min wire) pairs.

    The rule of ``sonic_learn.reference.topk._bitonic_sort_descending``: for block sizes 2, 4, ..., n
    and strides size/2, ..., 1, wire i meets wire i ^ stride; in blocks with ``i & size == 0`` the
    lower wire keeps the max, in the others the higher wire does.
    """
    if n < 2 or n & (n - 1):
        raise ValueError(f"n must be a power of two >= 2, got {n}")
    stages = []
    size = 2
    while size <= n:
        stride = size // 2
        while stride >= 1:
            stage = []
            for i in range(n):
                j = i ^ stride
                if i < j:
                    descending = (i & size) == 0
                    stage.append((i, j) if descending else (j, i))
            stages.append(stage)
            stride //= 2
        size *= 2
    return stages


def apply_schedule(values: list[float], stages: list[list[tuple[int, int]]]) -> list[float]:
    """Run the network on a list: after each compare-exchange the max sits on the first wire."""
    v = list(values)
    for stage in stages:
        for hi, lo in stage:
            if v[hi] < v[lo]:
                v[hi], v[lo] = v[lo], v[hi]
    return v


def draw_bitonic_network(path: Path, n: int = 8) -> None:
    stages = bitonic_schedule(n)
    fig, ax = plt.subplots(figsize=(1.0 + 1.1 * len(stages), 0.45 * n + 1.0))
    for w in range(n):
        ax.plot([0, len(stages) + 1], [w, w], color="0.3", lw=1)
        ax.text(-0.2, w, f"{w}", ha="right", va="center", fontsize=9)
    for s, stage in enumerate(stages, start=1):
        for hi, lo in stage:
            stride = abs(hi - lo)  # pairs of a stage overlap in groups of `stride`: spread them
            xpos = s + (min(hi, lo) % stride - (stride - 1) / 2) * 0.16
            color = "tab:blue" if hi < lo else "tab:orange"
            ax.annotate("", xy=(xpos, hi), xytext=(xpos, lo),
                        arrowprops={"arrowstyle": "-|>", "color": color, "lw": 1.5})
            ax.plot([xpos], [lo], "o", color=color, ms=3)
    ax.set_xlim(-0.6, len(stages) + 1)
    ax.set_ylim(n - 0.5, -0.8)
    ax.set_xticks(range(1, len(stages) + 1))
    ax.set_xlabel("stage (one warp-shuffle compare-exchange per wire)")
    ax.set_yticks([])
    ax.set_title(f"Bitonic sort of {n} keys, descending: arrows point to the wire that keeps the max",
                 fontsize=10)
    for spine in ("left", "right", "top"):
        ax.spines[spine].set_visible(False)
    fig.savefig(path, **_SAVE)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# 2. Padding waste of a tile-based grouped GEMM
# ---------------------------------------------------------------------------------------------
def padding_fraction(f: int, tile_m: int) -> float:
    """Fraction of the rows an expert with f tokens computes that are padding (0 for f = 0)."""
    padded = -(-f // tile_m) * tile_m
    return 0.0 if padded == 0 else (padded - f) / padded


def draw_padding_waste(path: Path) -> None:
    fs = list(range(1, 1025))
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for tile_m in (64, 128, 256):
        ax.plot(fs, [100 * padding_fraction(f, tile_m) for f in fs], lw=1.2, label=f"token choice, tile_m = {tile_m}")
    ax.axhline(0, color="black", lw=2, label="token rounding (every f_e a multiple of tile_m)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens routed to one expert, f_e")
    ax.set_ylabel("padded rows / computed rows (%)")
    ax.set_title("Padding waste of a tile-based grouped GEMM, per expert", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.savefig(path, **_SAVE)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# 3. Activation memory of each backward mode vs expert granularity
# ---------------------------------------------------------------------------------------------
MEMORY_SHAPE = {"T": 32768, "d": 4096, "nK": 8192, "experts_per_k": 16}  # a 30B-like layer, bf16


def memory_vs_granularity(T: int = 32768, d: int = 4096, nK: int = 8192, experts_per_k: int = 16,
                          ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> list[dict]:
    """Rows (K, n, E, standard bytes, reduced bytes) at fixed nK (fixed FLOPs), bf16, top-k routing."""
    rows = []
    for K in ks:
        n, E = nK // K, experts_per_k * K
        std = expected_saved_bytes(T, d, n, E, T * K, backward="standard")["total"]
        red = expected_saved_bytes(T, d, n, E, T * K, backward="reduced_memory")["total"]
        rows.append({"K": K, "n": n, "E": E, "standard": std, "reduced_memory": red})
    return rows


def draw_backward_memory(path: Path) -> None:
    rows = memory_vs_granularity(**MEMORY_SHAPE)
    labels = [f"n={r['n']}\nK={r['K']}, E={r['E']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    ax.plot(x, [r["standard"] / 2**30 for r in rows], "o-", label="standard: gathered X, H, Y (+ routing)")
    ax.plot(x, [r["reduced_memory"] / 2**30 for r in rows], "s-", label="reduced memory (SonicMoE): X, H (+ routing)")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_xlabel("expert granularity at fixed nK (fixed FLOPs): finer to the right")
    ax.set_ylabel("activations cached per layer (GiB)")
    s = MEMORY_SHAPE
    ax.set_title(f"Closed forms of expected_saved_bytes, bf16, T={s['T']}, d={s['d']}, nK={s['nK']}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, **_SAVE)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# 4. IO of the naive vs the gather-fused grouped GEMM
# ---------------------------------------------------------------------------------------------
IO_SHAPE = {"T": 24576, "d": 1536, "nK": 2048, "experts_per_k": 16}  # the paper's 7B family, bf16


def io_vs_granularity(T: int = 24576, d: int = 1536, nK: int = 2048, experts_per_k: int = 16,
                      ks: tuple[int, ...] = (2, 4, 8, 16), tile_m: int = 128, seed: int = 0) -> list[dict]:
    """Bytes moved by the up-projection (x (T, d) @ w1 (E, d, 2n)) for both variants.

    The counts f_e come from token-choice top-k on random logits (seeded), so they are uneven and
    include the padding of each expert's last tile.
    """
    from sonic_learn.reference.routing import topk_routing  # noqa: PLC0415

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for K in ks:
        n, E = nK // K, experts_per_k * K
        logits = torch.randn(T, E, generator=gen)
        counts = torch.bincount(topk_routing(logits, K).expert_idx.long(), minlength=E)
        naive = io_cost(T, d, 2 * n, counts, tile_m=tile_m, variant="naive")
        fused = io_cost(T, d, 2 * n, counts, tile_m=tile_m, variant="gather_fused")
        rows.append({"K": K, "n": n, "E": E, "naive": naive, "gather_fused": fused})
    return rows


def draw_gemm_io(path: Path) -> None:
    rows = io_vs_granularity(**IO_SHAPE)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.38
    for i, r in enumerate(rows):
        for j, variant in enumerate(("naive", "gather_fused")):
            bottom = 0.0
            for k, kernel in enumerate(r[variant].kernels):
                for part, hatch in (("bytes_read", ""), ("bytes_written", "//")):
                    v = getattr(kernel, part) / 2**30
                    color = ("tab:red", "tab:gray", "tab:green")[k if variant == "naive" else 2]
                    ax.bar(i + (j - 0.5) * width, v, width, bottom=bottom, color=color, hatch=hatch,
                           edgecolor="white", lw=0.5)
                    bottom += v
    ax.set_xticks(range(len(rows)), [f"n={r['n']}\nK={r['K']}, E={r['E']}" for r in rows], fontsize=8)
    ax.set_ylabel("GiB through HBM (io_cost)")
    s = IO_SHAPE
    ax.set_title(f"Up-projection, T={s['T']}, d={s['d']}, bf16: naive (left) vs gather-fused (right)", fontsize=10)
    from matplotlib.patches import Patch  # noqa: PLC0415

    ax.legend(handles=[Patch(color="tab:red", label="naive: gather + pad kernel"),
                       Patch(color="tab:gray", label="naive: GEMM on the padded copy"),
                       Patch(color="tab:green", label="gather-fused GEMM"),
                       Patch(facecolor="white", edgecolor="black", hatch="//", label="hatched: bytes written")],
              fontsize=8, loc="upper left")
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, **_SAVE)
    plt.close(fig)


FIGURES = {
    "bitonic_network.png": draw_bitonic_network,
    "padding_waste.png": draw_padding_waste,
    "backward_memory.png": draw_backward_memory,
    "gemm_io.png": draw_gemm_io,
}


def generate(out_dir: Path = FIGURES_DIR) -> list[Path]:
    """Draw every figure into ``out_dir``; return the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in FIGURES.items():
        draw(out_dir / name)
        written.append(out_dir / name)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIGURES_DIR, help="output folder (default: docs/assets/figures)")
    for p in generate(parser.parse_args().out):
        print(p)
