"""How many CPU threads torch uses, so that runs sharing a machine don't collapse.

``--threads auto`` keeps ``OMP_NUM_THREADS`` when it is set (torchrun sets it to 1 for
several processes); otherwise it takes this process's share of the CPUs it may run on: the CPU affinity
(what ``taskset``, cgroups-aware launchers and ``torchrun --cpus`` grant), divided by the
processes ``torchrun`` starts on this node. Idle OpenMP threads should also sleep instead of
spinning (``OMP_WAIT_POLICY=PASSIVE``): a spinning thread burns the core a neighbouring run
needs. OpenMP reads that variable once, when torch loads, so the example scripts set it in their
first lines, before anything imports torch.
"""
from __future__ import annotations

import os

__all__ = ["available_cpus", "auto_threads", "set_threads"]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def auto_threads() -> int:
    """``OMP_NUM_THREADS`` when set, else this process's share of its CPUs (affinity ÷ torchrun's processes on this node)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) >= 1:
        return int(os.environ["OMP_NUM_THREADS"])
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, available_cpus() // max(1, processes))


def set_threads(setting: int | str) -> int:
    """Sets torch's intra-op threads from ``--threads`` (a number or ``"auto"``); returns the count."""
    import torch

    count = auto_threads() if setting == "auto" else int(setting)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
