"""The two collectives of expert parallelism, written so that autograd flows through them.

Expert parallelism moves rows between ranks with ``all_to_all_single``: rank r sends
``send_splits[q]`` rows to rank q and receives ``recv_splits[q]`` rows from it. The transpose of
that exchange is the same exchange with the splits swapped, so the backward of a dispatch is a
combine and the backward of a combine is a dispatch. ``AllToAll`` is that one autograd Function.

To overlap communication with computation, an all-to-all can also be split in two:
``all_to_all_start`` launches it (``async_op=True``) and returns the destination tensor, whose rows
have not arrived yet, with a ``Pending`` handle; ``all_to_all_wait`` waits for them (on NCCL: makes
the current stream wait for NCCL's) and passes the tensor on. Between the two the caller can compute.
The overlap is a forward-only optimisation: the backward of a started all-to-all is the plain
synchronous reverse exchange.

Everything here runs on any ``torch.distributed`` backend that implements ``all_to_all_single``:
NCCL on GPUs, gloo on CPUs (gloo's all-to-all needs torch >= 2.3).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_to_all_rows", "AllToAll", "exchange_counts", "Pending", "all_to_all_start", "all_to_all_wait"]


def all_to_all_rows(rows: torch.Tensor, recv_splits: list[int], send_splits: list[int], group=None) -> torch.Tensor:
    """Send ``rows[sum(send_splits[:q]) : sum(send_splits[:q+1])]`` to rank q; return what the
    ranks sent here, concatenated in rank order: a (sum(recv_splits), *rows.shape[1:]) tensor.

    No autograd: ``AllToAll`` wraps this for that. The splits are host lists (the collective
    needs them on the host to size its messages).
    """
    return _launch(rows, recv_splits, send_splits, group, async_op=False)[0]


def _launch(rows, recv_splits, send_splits, group, *, async_op: bool):
    """The one call to ``all_to_all_single``: returns (destination tensor, work handle or None)."""
    rows = rows.contiguous()
    out = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
    work = dist.all_to_all_single(out, rows, output_split_sizes=recv_splits, input_split_sizes=send_splits,
                                  group=group, async_op=async_op)
    return out, work


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


class Pending:
    """An all-to-all in flight. It holds the collective's work handle and its send buffer (which must
    live until the rows have left); ``wait()`` releases both."""

    def __init__(self, work, send_rows: torch.Tensor):
        self.work, self.send_rows = work, send_rows

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
        self.work = self.send_rows = None


class _AllToAllStart(torch.autograd.Function):
    """Launch ``all_to_all_rows`` asynchronously. Forward returns the destination tensor (contents not
    yet valid) and appends the ``Pending`` handle to ``handles``; backward is the synchronous reverse
    exchange, as ``AllToAll``'s."""

    @staticmethod
    def forward(ctx, rows, recv_splits, send_splits, group, handles: list):
        ctx.splits = (recv_splits, send_splits)
        ctx.group = group
        rows = rows.contiguous()
        out, work = _launch(rows, recv_splits, send_splits, group, async_op=True)
        handles.append(Pending(work, rows))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        recv_splits, send_splits = ctx.splits
        return all_to_all_rows(grad_out, send_splits, recv_splits, ctx.group), None, None, None, None


class _AllToAllWait(torch.autograd.Function):
    """Identity on the destination tensor, after waiting for its rows; backward passes the gradient."""

    @staticmethod
    def forward(ctx, out, pending: Pending):
        pending.wait()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_to_all_start(rows: torch.Tensor, recv_splits: list[int], send_splits: list[int],
                     group=None) -> tuple[torch.Tensor, Pending]:
    """Launch the exchange of ``all_to_all_rows`` without waiting: returns (destination, pending).
    Do not read the destination before ``all_to_all_wait(destination, pending)``. Autograd flows."""
    handles: list[Pending] = []
    out = _AllToAllStart.apply(rows, recv_splits, send_splits, group, handles)
    return out, handles[0]


def all_to_all_wait(out: torch.Tensor, pending: Pending) -> torch.Tensor:
    """Wait for a started exchange; returns its rows (a view of ``out``), ready to read."""
    return _AllToAllWait.apply(out, pending)
