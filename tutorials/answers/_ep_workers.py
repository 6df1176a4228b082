"""Rank functions for the answer key of tutorial 7 (spawned ranks import them from this module)."""

import torch

from sonic_learn.parallel import ExpertParallelMoE


def remote_only(rank: int, world: int, T: int, d: int, n: int, E: int, K: int) -> int:
    """Every token of rank 0 (x > 0) prefers rank 1's experts and vice versa: all pairs leave."""
    torch.manual_seed(0)
    layer = ExpertParallelMoE(d, n, E, K, dtype=torch.float64)
    half = E // 2
    with torch.no_grad():
        layer.router_w.zero_()
        layer.router_w[:, half:] = 1.0  # positive x -> experts of rank 1
        layer.router_w[:, :half] = -1.0  # negative x -> experts of rank 0
    g = torch.Generator().manual_seed(rank)
    x = torch.rand(T, d, generator=g, dtype=torch.float64) + 0.1
    if rank == 1:
        x = -x
    layer(x, time_steps=True)
    return layer.last_times.rows_sent
