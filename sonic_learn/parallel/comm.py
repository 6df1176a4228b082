"""The two collectives of expert parallelism, written so that autograd flows through them.

Expert parallelism moves rows between ranks with ``all_to_all_single``: rank r sends
``send_splits[q]`` rows to rank q and receives ``recv_splits[q]`` rows from it. The transpose of
that exchange is the same exchange with the splits swapped, so the backward of a dispatch is a
combine and the backward of a combine is a dispatch. ``AllToAll`` is that one autograd Function.

Everything here runs on any ``torch.distributed`` backend that implements ``all_to_all_single``:
NCCL on GPUs, gloo on CPUs (gloo's all-to-all needs torch >= 2.3).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_to_all_rows", "AllToAll", "exchange_counts"]


def all_to_all_rows(rows: torch.Tensor, recv_splits: list[int], send_splits: list[int], group=None) -> torch.Tensor:
    """Send ``rows[sum(send_splits[:q]) : sum(send_splits[:q+1])]`` to rank q; return what the
    ranks sent here, concatenated in rank order: a (sum(recv_splits), *rows.shape[1:]) tensor.

    No autograd: ``AllToAll`` wraps this for that. The splits are host lists (the collective
    needs them on the host to size its messages).
    """
    rows = rows.contiguous()
    out = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
    dist.all_to_all_single(out, rows, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """``all_to_all_rows`` with a backward: the gradient goes back the way the rows came."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, recv_splits: list[int], send_splits: list[int], group):
        ctx.splits = (recv_splits, send_splits)
        ctx.group = group
        return all_to_all_rows(rows, recv_splits, send_splits, group)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        recv_splits, send_splits = ctx.splits
        # The transpose of "send send_splits, receive recv_splits" is "send recv_splits, receive send_splits".
        return all_to_all_rows(grad_out, send_splits, recv_splits, ctx.group), None, None, None


def exchange_counts(send_counts: torch.Tensor, group=None) -> torch.Tensor:
    """The small all-to-all before the big one: ``send_counts`` (W, E_local) holds how many pairs
    this rank sends to each local expert of each rank; the result (W, E_local) holds, for each
    source rank, how many pairs it sends to each of *this* rank's experts."""
    world = send_counts.shape[0]
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv.view(-1), send_counts.contiguous().view(-1),
                           output_split_sizes=[send_counts.shape[1]] * world,
                           input_split_sizes=[send_counts.shape[1]] * world, group=group)
    return recv
