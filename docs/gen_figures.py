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
  ``sonic_learn.reference.grouped_gemm.io_cost``;
- the Hopper primer's pictures: ``memory_hierarchy.png`` (capacity of each level, from the vendor
  numbers in ``HOPPER``), ``roofline.png`` (attainable TFLOP/s of an H100 and an H200 against
  arithmetic intensity, with the MoE layer's kernels placed by ``io_cost``), ``gemm_tiling.png``
  (one CTA's tile, mainloop and epilogue) and ``warp_specialization.png`` (a producer warp and two
  consumer warpgroups taking turns: the ping-pong schedule).

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
MEMORY_SHAPE = {"T": 32768, "d": 4096, "nK": 8192, "experts_per_k": 16}  # the paper's 120B family (nK = 8192), bf16


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


# ---------------------------------------------------------------------------------------------
# 5. The Hopper primer
# ---------------------------------------------------------------------------------------------
# Vendor numbers (SXM boards). Sources: NVIDIA H100 Tensor Core GPU datasheet, NVIDIA H200 Tensor
# Core GPU datasheet (dense BF16 = half the "with sparsity" figure they print), NVIDIA H100 Tensor
# Core GPU Architecture whitepaper (SMs, L2), CUDA Hopper Tuning Guide (shared memory per SM),
# CUDA C++ Programming Guide, compute capability 9.0 (registers per SM).
HOPPER = {
    "H100 SXM": {"hbm_bytes": 80e9, "hbm_tb_s": 3.35, "bf16_dense_tflops": 989.5},
    "H200 SXM": {"hbm_bytes": 141e9, "hbm_tb_s": 4.8, "bf16_dense_tflops": 989.5},
    "sms": 132,
    "l2_bytes": 50 * 2**20,
    "smem_per_sm_bytes": 228 * 2**10,
    "registers_per_sm_bytes": 64 * 2**10 * 4,
}


def ridge_point(gpu: str) -> float:
    """Arithmetic intensity (FLOP per byte of HBM traffic) where a kernel stops being memory-bound."""
    g = HOPPER[gpu]
    return g["bf16_dense_tflops"] / g["hbm_tb_s"]


def draw_memory_hierarchy(path: Path) -> None:
    h = HOPPER
    levels = [  # (name, bytes on the whole chip, what it is)
        ("registers", h["registers_per_sm_bytes"] * h["sms"], f"{h['registers_per_sm_bytes'] // 2**10} KiB per SM, private to each thread"),
        ("shared memory", h["smem_per_sm_bytes"] * h["sms"], f"up to {h['smem_per_sm_bytes'] // 2**10} KiB per SM, shared by one CTA (or a cluster)"),
        ("L2 cache", h["l2_bytes"], f"{h['l2_bytes'] // 2**20} MiB, shared by all {h['sms']} SMs"),
        ("HBM (H100)", h["H100 SXM"]["hbm_bytes"], f"{h['H100 SXM']['hbm_bytes'] / 1e9:.0f} GB at {h['H100 SXM']['hbm_tb_s']} TB/s"),
        ("HBM (H200)", h["H200 SXM"]["hbm_bytes"], f"{h['H200 SXM']['hbm_bytes'] / 1e9:.0f} GB at {h['H200 SXM']['hbm_tb_s']} TB/s"),
    ]
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    colors = ["tab:green", "tab:olive", "tab:orange", "tab:red", "tab:red"]
    for i, (name, size, note) in enumerate(levels):
        ax.barh(i, size, color=colors[i], alpha=0.8)
        ax.text(size * 1.3, i, note, va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(1e6, 1e13)
    ax.set_yticks(range(len(levels)), [name for name, _, _ in levels])
    ax.invert_yaxis()
    ax.set_xlabel("capacity on the whole chip (bytes, log scale)")
    ax.set_title(f"Hopper memory hierarchy ({h['sms']} SMs): the closer to the tensor cores, the smaller and faster",
                 fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.savefig(path, **_SAVE)
    plt.close(fig)


def roofline_points() -> list[dict]:
    """Arithmetic intensity (FLOP/byte, bf16) of a few kernels of the layer, from ``io_cost`` for
    the GEMMs (each expert receiving T*K/E rows) and by counting for the element-wise SwiGLU."""
    points = []
    for name, (T, d, n, E, K) in (("7B", (24576, 1536, 256, 128, 8)), ("30B", (32768, 4096, 1024, 128, 8))):
        counts = [T * K // E] * E
        for what, (k_dim, n_dim) in (("up-proj", (d, 2 * n)), ("down-proj", (n, d))):
            c = io_cost(T, k_dim, n_dim, counts, tile_m=128, variant="gather_fused")
            points.append({"name": f"{name} {what} GEMM", "intensity": c.flops_useful / c.bytes_moved})
    # SwiGLU on one row: read 2n bf16, write n bf16 (6n bytes); about 4 FLOPs per output (sigmoid, 2 mul, add).
    points.append({"name": "SwiGLU (element-wise)", "intensity": 4 / 6})
    return points


def draw_roofline(path: Path) -> None:
    import numpy as np  # noqa: PLC0415

    x = np.logspace(-1, 4, 400)
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    for gpu, style in (("H100 SXM", "-"), ("H200 SXM", "--")):
        g = HOPPER[gpu]
        ax.plot(x, np.minimum(g["bf16_dense_tflops"], g["hbm_tb_s"] * x), style, color="black", lw=1.5,
                label=f"{gpu}: {g['hbm_tb_s']} TB/s, {g['bf16_dense_tflops']:.0f} TFLOP/s bf16 (ridge {ridge_point(gpu):.0f} FLOP/B)")
    for p in roofline_points():
        ax.axvline(p["intensity"], color="tab:blue", lw=0.8, alpha=0.6)
        ax.text(p["intensity"] * 1.06, 1.15, p["name"], rotation=90, fontsize=7, color="tab:blue", va="bottom")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(1, 2000)
    ax.set_xlabel("arithmetic intensity (FLOPs per byte of HBM traffic)")
    ax.set_ylabel("attainable TFLOP/s")
    ax.set_title("Roofline: left of the ridge a kernel waits on memory, right of it on the tensor cores", fontsize=9)
    ax.text(2.0, 20, "memory-bound", fontsize=9, rotation=33)
    ax.text(1500, 1100, "compute-bound", fontsize=9, ha="right")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    fig.savefig(path, **_SAVE)
    plt.close(fig)


def draw_gemm_tiling(path: Path) -> None:
    """C (M x N) = A (M x K) @ B (K x N): one CTA owns a tile of C, walks K in steps (the mainloop),
    then writes the tile once (the epilogue)."""
    from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    M, N, K, bm, bn, bk = 6.0, 6.0, 6.0, 1.5, 1.5, 1.0
    ox_a, ox_c, oy = 0.0, 8.0, 0.0  # A at left, C at right, B above C
    ax.add_patch(Rectangle((ox_a, oy), K, M, fill=False, lw=1.2))
    ax.add_patch(Rectangle((ox_c, oy), N, M, fill=False, lw=1.2))
    ax.add_patch(Rectangle((ox_c, M + 0.8), N, K * 0.45, fill=False, lw=1.2))
    row, col = 2, 3  # the CTA's tile of C
    ty, tx = oy + M - (row + 1) * bm, ox_c + col * bn
    ax.add_patch(Rectangle((tx, ty), bn, bm, color="tab:red", alpha=0.7))
    for k in range(int(K / bk)):  # the K steps of the mainloop: a slab of A and a slab of B per step
        shade = 0.25 + 0.1 * k
        ax.add_patch(Rectangle((ox_a + k * bk, ty), bk, bm, color="tab:blue", alpha=min(shade, 0.85), ec="white"))
        ax.add_patch(Rectangle((tx, M + 0.8 + k * bk * 0.45), bn, bk * 0.45, color="tab:green", alpha=min(shade, 0.85), ec="white"))
    ax.text(ox_a + K / 2, oy - 0.5, "A (M x K): rows of tokens", ha="center", fontsize=8)
    ax.text(ox_c + N / 2, oy - 0.5, "C (M x N)", ha="center", fontsize=8)
    ax.text(ox_c + N / 2, oy - 1.1, "epilogue: convert, apply e.g. SwiGLU, store the tile once",
            ha="center", fontsize=7, color="tab:red")
    ax.text(ox_c + N + 0.2, M + 0.8 + K * 0.22, "B (K x N)\nweights", va="center", fontsize=8)
    ax.text(ox_a + K / 2, M + 0.2, "mainloop: k = 0, 1, ...\n(one slab of A and of B per step)", ha="center",
            va="bottom", fontsize=8, color="tab:blue")
    ax.text(ox_c + N + 0.2, ty + bm / 2, "one CTA's tile,\naccumulated\nin registers", va="center", fontsize=8,
            color="tab:red")
    ax.add_patch(FancyArrowPatch((ox_a + K + 0.1, ty + bm / 2), (tx - 0.1, ty + bm / 2), arrowstyle="-|>", mutation_scale=12))
    ax.text((ox_a + K + tx) / 2, ty - 0.2, "TMA → shared memory\n→ WGMMA", ha="center", va="top", fontsize=7)
    ax.set_xlim(-0.5, ox_c + N + 2.4)
    ax.set_ylim(-1.5, M + 0.8 + K * 0.45 + 0.3)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("A tiled GEMM: tiles of C spread over CTAs; each CTA loops over K, then runs its epilogue", fontsize=9)
    fig.savefig(path, **_SAVE)
    plt.close(fig)


def pingpong_schedule(tiles: int = 4, load: float = 1.0, mma: float = 2.0, epilogue: float = 1.0) -> list[tuple[str, str, float, float]]:
    """(lane, what, start, duration) of a warp-specialized ping-pong GEMM: a producer warp issues
    the loads of tile t while consumer warpgroup t % 2 runs the tile's MMAs then its epilogue; the
    tensor cores are handed from one consumer to the other, so one's epilogue overlaps the other's
    MMAs. Each consumer waits for its tile's loads and for the tensor cores to be free."""
    events = []
    load_done = 0.0
    mma_free = 0.0
    consumer_free = [0.0, 0.0]
    for t in range(tiles):
        load_start = load_done
        load_done = load_start + load
        events.append(("producer warp (TMA loads)", f"load {t}", load_start, load))
        c = t % 2
        start = max(load_done, mma_free, consumer_free[c])
        events.append((f"consumer warpgroup {c + 1}", f"MMA {t}", start, mma))
        mma_free = start + mma
        events.append((f"consumer warpgroup {c + 1}", f"epilogue {t}", mma_free, epilogue))
        consumer_free[c] = mma_free + epilogue
    return events


def draw_warp_specialization(path: Path) -> None:
    events = pingpong_schedule()
    lanes = ["producer warp (TMA loads)", "consumer warpgroup 1", "consumer warpgroup 2"]
    color = {"load": "tab:green", "MMA": "tab:blue", "epilogue": "tab:red"}
    fig, ax = plt.subplots(figsize=(7.5, 2.4))
    for lane, what, start, dur in events:
        y = lanes.index(lane)
        ax.barh(y, dur, left=start, color=color[what.split()[0]], edgecolor="white")
        ax.text(start + dur / 2, y, what.replace("epilogue", "epi."), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(lanes)), lanes, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time (arbitrary units)")
    ax.set_title("Warp specialization with ping-pong: while one warpgroup runs its epilogue, the other uses the tensor cores",
                 fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.savefig(path, **_SAVE)
    plt.close(fig)


FIGURES = {
    "bitonic_network.png": draw_bitonic_network,
    "padding_waste.png": draw_padding_waste,
    "backward_memory.png": draw_backward_memory,
    "gemm_io.png": draw_gemm_io,
    "memory_hierarchy.png": draw_memory_hierarchy,
    "roofline.png": draw_roofline,
    "gemm_tiling.png": draw_gemm_tiling,
    "warp_specialization.png": draw_warp_specialization,
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
