"""What a launcher tells a process about its place in the job: :class:`LaunchEnv`, and :class:`LaunchError`."""

from __future__ import annotations

from dataclasses import dataclass

from lora_dist.errors import UserError

__all__ = ["UNKNOWN", "LaunchEnv", "LaunchError"]

UNKNOWN = -1
"""Value of a ``LaunchEnv`` count the launcher does not provide; filled in by
``init_distributed`` (MPI without local-rank variables)."""


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher describes it.

    ``master_addr``/``master_port`` are the rendezvous (TCP store) endpoint.
    Counts the launcher leaves open are ``UNKNOWN`` (-1) in the result of
    ``detect_launch_env`` and always filled in by ``init_distributed``; an
    empty ``master_addr`` / zero ``master_port`` likewise mean "chosen at
    init".
    """

    launcher: str
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


class LaunchError(UserError, RuntimeError):
    """The launch environment is inconsistent or a rank cannot rendezvous.

    The message is one line naming the cause and the fix.
    """
