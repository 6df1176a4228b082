"""Expert parallelism (EP): the MoE layer with its experts split over the ranks of a process group.

``ExpertParallelMoE`` / ``expert_parallel_forward`` in ``sonic_learn.parallel.moe``; the autograd
all-to-all in ``sonic_learn.parallel.comm``. ``python -m sonic_learn.parallel`` runs a CPU (gloo)
demonstration that checks the EP layer against the single-process one and times its steps.
"""

from sonic_learn.parallel.comm import AllToAll, all_to_all_rows, exchange_counts
from sonic_learn.parallel.launch import launch
from sonic_learn.parallel.moe import ExpertParallelMoE, StepTimes, alltoall_bytes, expert_parallel_forward, time_steps

__all__ = ["launch", "AllToAll", "all_to_all_rows", "exchange_counts", "ExpertParallelMoE", "expert_parallel_forward",
           "StepTimes", "alltoall_bytes", "time_steps"]
