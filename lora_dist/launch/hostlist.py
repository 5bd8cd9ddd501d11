"""Slurm hostlist expressions (``n[1-3,7],gpu-a[01-02]``) expanded into host names."""

from __future__ import annotations

import re

from lora_dist.launch.env import LaunchError

__all__ = ["expand_hostlist"]


def expand_hostlist(hostlist: str) -> list[str]:
    """Expands a Slurm hostlist expression into host names.

    Supports comma-separated items, bracketed ranges and lists with zero
    padding, and several bracket groups per item, e.g.
    ``n[1-3,7],gpu-a[01-02]`` or ``rack[1-2]-n[1-2]``.

    Args:
        hostlist: The expression, as in ``SLURM_JOB_NODELIST``.

    Returns:
        The host names in order.

    Raises:
        LaunchError: The expression is malformed.
    """
    hosts: list[str] = []
    for item in _split_top_level(hostlist.strip()):
        hosts.extend(_expand_hostlist_item(item, hostlist))
    if not hosts:
        raise LaunchError(f"empty Slurm nodelist {hostlist!r}; run inside an allocation (srun/sbatch)")
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                break
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise LaunchError(f"unbalanced brackets in Slurm nodelist {text!r}; set MASTER_ADDR explicitly")
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_hostlist_item(item: str, whole: str) -> list[str]:
    match = re.search(r"\[([^\[\]]*)\]", item)
    if match is None:
        if "[" in item or "]" in item:
            raise LaunchError(f"cannot parse Slurm nodelist {whole!r}; set MASTER_ADDR explicitly")
        return [item]
    prefix = item[: match.start()]
    if "[" in prefix or "]" in prefix:
        raise LaunchError(f"cannot parse Slurm nodelist {whole!r}; set MASTER_ADDR explicitly")
    tails = _expand_hostlist_item(item[match.end():], whole)
    hosts = []
    for part in match.group(1).split(","):
        bounds = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if bounds is None or (bounds.group(2) is not None and int(bounds.group(2)) < int(bounds.group(1))):
            raise LaunchError(f"cannot parse range {part!r} in Slurm nodelist {whole!r}; set MASTER_ADDR explicitly")
        low, high = bounds.group(1), bounds.group(2) or bounds.group(1)
        for number in range(int(low), int(high) + 1):
            hosts.extend(prefix + str(number).zfill(len(low)) + tail for tail in tails)
    return hosts
