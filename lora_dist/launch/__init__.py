"""Launching: where this process sits in the job, and joining the other ranks.

* :mod:`~lora_dist.launch.env`: :class:`LaunchEnv` and :class:`LaunchError`.
* :mod:`~lora_dist.launch.detect`: pure detection from environment variables
  (torchrun, Slurm ``srun``, MPI, single process).
* :mod:`~lora_dist.launch.hostlist`: Slurm hostlist expressions.
* :mod:`~lora_dist.launch.distributed`: ``init_distributed`` and its side
  effects (rendezvous, ports, MPI bootstrap, the device).
"""

from lora_dist.launch.detect import detect_launch_env
from lora_dist.launch.distributed import (
    destroy_distributed,
    exit_distributed,
    init_distributed,
    patient_group,
    run_device,
    say_stopped,
    select_device,
    stopped_rank,
)
from lora_dist.launch.env import UNKNOWN, LaunchEnv, LaunchError
from lora_dist.launch.hostlist import expand_hostlist

__all__ = [
    "UNKNOWN",
    "LaunchEnv",
    "LaunchError",
    "destroy_distributed",
    "exit_distributed",
    "detect_launch_env",
    "expand_hostlist",
    "init_distributed",
    "patient_group",
    "run_device",
    "say_stopped",
    "select_device",
    "stopped_rank",
]
