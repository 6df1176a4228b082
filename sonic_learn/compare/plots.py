"""``--plot PATH.png``: the picture that fits each pair (matplotlib, the optional ``plot`` extra).

- top-k: time vs E for every implementation that passed (a small sweep, re-measured);
- routing: tile-padding waste of token-choice top-k vs the M tile, at several tokens-per-expert
  (token rounding's waste is zero by construction);
- grouped GEMM: bytes moved by the naive (gather + pad + GEMM) and gather-fused variants, per kernel,
  from the cost model;
- backward: activation memory vs expert granularity at fixed FLOPs (K*n fixed), closed form, the
  shape of the paper's Figure 1;
- moe: median time of every implementation that passed;
- memory: measured saved bytes per backward mode.
"""

from __future__ import annotations

import dataclasses

import torch

from sonic_learn.compare.configs import Problem
from sonic_learn.compare.pairs import topk as topk_pair
from sonic_learn.compare.pairs.common import padded_rows, spread_logits
from sonic_learn.compare.registry import Setup
from sonic_learn.reference.grouped_gemm import io_cost
from sonic_learn.reference.moe import expected_saved_bytes
from sonic_learn.compare.runner import PairResult, Settings, run_pair

MIB = 2**20


def _topk_sweep(ax, result: PairResult, setup: Setup) -> None:
    p = result.problem
    names = [r.impl for r in result.rows if r.status == "PASS"]
    impls = [i for i in topk_pair.ROWS if i.name in names]
    Es = sorted({e for e in (8, 16, 32, 64, 128, 256) if e >= p.K} | {p.E})
    times: dict[str, list[float]] = {i.name: [] for i in impls}
    for E in Es:
        sub = run_pair(topk_pair.SPEC, impls, dataclasses.replace(p, E=E, name=f"E={E}"), setup, Settings(reps=3, warmup=1))
        for r in sub.rows:
            times[r.impl].append(r.timing["median_ms"] if r.timing else float("nan"))
    for name, ts in times.items():
        ax.plot(Es, ts, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("E (experts = row length)")
    ax.set_ylabel("median ms")
    ax.set_title(f"top-k: time vs E (T={p.T}, K={p.K}, {result.dtype})")
    ax.legend(fontsize=7)


def _topk_counts(T: int, E: int, K: int, seed: int) -> torch.Tensor:
    """(E,) f_e of token-choice top-K routing of T tokens with tie-free random logits."""
    logits = spread_logits(T, E, torch.float32, torch.Generator().manual_seed(seed))  # (T, E)
    return torch.bincount(torch.topk(logits, K, dim=-1).indices.reshape(-1), minlength=E)  # (E,)


def _routing_waste(ax, result: PairResult) -> None:
    p = result.problem
    tiles = [16, 32, 64, 128, 256]
    for scale in (0.25, 1, 4):
        T = max(int(p.T * scale), 1)
        counts = _topk_counts(T, p.E, p.K, seed=0)
        waste = []
        for tm in tiles:
            padded = padded_rows(counts, tm)
            waste.append(100.0 * (padded - T * p.K) / padded)
        ax.plot(tiles, waste, marker="o", label=f"top-k, T/E*K = {T * p.K / p.E:.0f} tokens/expert")
    ax.axhline(0.0, color="k", linestyle="--", label="token rounding (multiples of the tile)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M tile (rows)")
    ax.set_ylabel("padded rows / all rows (%)")
    ax.set_title(f"routing: tile-padding waste (E={p.E}, K={p.K})")
    ax.legend(fontsize=7)


def _gemm_bytes(ax, result: PairResult) -> None:
    p = result.problem
    counts = _topk_counts(p.T, p.E, p.K, seed=p.T)
    b = torch.empty((), dtype=getattr(torch, result.dtype)).element_size()
    for i, variant in enumerate(("naive", "gather_fused")):
        c = io_cost(p.T, p.d, 2 * p.n, counts, tile_m=p.tile_m, dtype_bytes=b, variant=variant)
        bottom = 0.0
        for k in c.kernels:
            for what, nbytes in (("read", k.bytes_read), ("written", k.bytes_written)):
                ax.bar(i, nbytes / MIB, bottom=bottom, label=f"{variant}: {k.name} {what}")
                bottom += nbytes / MIB
    ax.set_xticks([0, 1], ["naive\n(gather + pad + GEMM)", "gather-fused"])
    ax.set_ylabel("MiB moved (cost model)")
    ax.set_title(f"grouped GEMM: bytes moved (T={p.T}, d={p.d}, 2n={2 * p.n}, tile {p.tile_m})")
    ax.legend(fontsize=6)


def _backward_granularity(ax, problem: Problem, dtype: torch.dtype) -> None:
    p = problem
    budget = p.K * p.n  # iso-FLOPs: K * n fixed
    ratio = p.K / p.E  # activation ratio fixed
    Gs, std, red = [], [], []
    for K in (1, 2, 4, 8, 16, 32, 64):
        if budget % K or budget // K < 1:
            continue
        n = budget // K
        E = max(K, round(K / ratio))
        P = p.T * K
        Gs.append(p.d / n)
        std.append(expected_saved_bytes(p.T, p.d, n, E, P, dtype=dtype, backward="standard")["total"] / MIB)
        red.append(expected_saved_bytes(p.T, p.d, n, E, P, dtype=dtype, backward="reduced_memory")["total"] / MIB)
    ax.plot(Gs, std, marker="o", label="standard (caches gathered X and Y)")
    ax.plot(Gs, red, marker="o", label="reduced-memory (SonicMoE)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("granularity G = d / n  (K * n fixed)")
    ax.set_ylabel("cached activations, MiB (closed form)")
    ax.set_title(f"backward: activation memory vs granularity (T={p.T}, d={p.d})")
    ax.legend(fontsize=7)


def _times(ax, result: PairResult) -> None:
    rows = [r for r in result.rows if r.timing]
    ax.barh([r.impl for r in rows], [r.timing["median_ms"] for r in rows])
    ax.set_xlabel("median ms")
    ax.set_title(f"{result.title} ({result.device}, {result.dtype})")


def _memory(ax, memory: dict) -> None:
    modes = memory["modes"]
    ax.bar([m["backward"] for m in modes], [m["measured_total"] / MIB for m in modes])
    ax.set_ylabel("saved MiB (hooks)")
    ax.set_title(f"saved activations per backward mode ({memory['problem']})", fontsize=8)


def plot_results(results: list[PairResult], problem: Problem, setup: Setup, path: str, *, memory: dict | None = None) -> None:
    """Draw one panel per pair in ``results`` (plus the memory report) and save to ``path``."""
    import matplotlib  # noqa: PLC0415 - optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    panels = []
    for res in results:
        if res.pair == "topk":
            panels.append(lambda ax, r=res: _topk_sweep(ax, r, setup))
        elif res.pair == "routing":
            panels.append(lambda ax, r=res: _routing_waste(ax, r))
        elif res.pair == "grouped-gemm":
            panels.append(lambda ax, r=res: _gemm_bytes(ax, r))
        elif res.pair == "backward":
            panels.append(lambda ax, r=res: _backward_granularity(ax, r.problem, setup.dtype))
        elif res.pair == "moe":
            panels.append(lambda ax, r=res: _times(ax, r))
    if memory is not None:
        panels.append(lambda ax: _memory(ax, memory))
        panels.append(lambda ax: _backward_granularity(ax, problem, setup.dtype))
    if not panels:
        raise ValueError("nothing to plot: no results")
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.5 * rows), squeeze=False)
    for ax, draw in zip(axes.flat, panels):
        draw(ax)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
