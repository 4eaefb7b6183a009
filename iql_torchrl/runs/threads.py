"""How many CPU threads torch uses, so that runs sharing a machine don't collapse.

``--threads auto`` keeps ``OMP_NUM_THREADS`` when it is set (torchrun sets it to 1 for several
processes); otherwise it takes this process's share of the CPUs it may run on: the CPU affinity
(what ``taskset``, cgroups-aware launchers and ``torchrun --cpus`` grant), divided by the
processes ``torchrun`` starts on this node. A compiled bf16 step may then take one thread, where its
GEMMs run faster there (:func:`iql_torchrl.runs.settings.resolve_precision`).

How idle OpenMP threads wait is the other half. An update is hundreds of short parallel regions: a
thread that sleeps at once between them (``OMP_WAIT_POLICY=PASSIVE``) pays a wake-up in each (a solo
run much slower), and one that spins without end (``ACTIVE``, or libgomp's default 300,000 rounds)
holds a core that a second run needs (two runs side by side collapse to a few updates/s). The example
scripts set ``GOMP_SPINCOUNT=1000`` (libgomp's own throttled count) before torch loads, unless the user
set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``: idle threads spin ~1,000 rounds, enough to catch the
next region, then sleep. Measured in ``benchmarks/README.md`` ("Two runs on one machine"). OpenMP
reads these variables once, when torch loads; this module changes none of them.
"""
from __future__ import annotations

import os

__all__ = ["available_cpus", "auto_threads", "threads_are_auto", "set_threads"]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _omp_num_threads() -> int | None:
    """``OMP_NUM_THREADS`` when it names a count, else ``None``."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) >= 1 else None


def auto_threads() -> int:
    """``OMP_NUM_THREADS`` when set, else this process's share of its CPUs (affinity ÷ torchrun's processes on this node)."""
    if (count := _omp_num_threads()) is not None:
        return count
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, available_cpus() // max(1, processes))


def threads_are_auto(setting: int | str) -> bool:
    """Whether the thread count is the run's own choice: ``--threads auto`` and no ``OMP_NUM_THREADS`` set."""
    return setting == "auto" and _omp_num_threads() is None


def set_threads(setting: int | str) -> int:
    """Sets torch's intra-op threads from ``--threads`` (a number or ``"auto"``); returns the count."""
    import torch

    count = auto_threads() if setting == "auto" else int(setting)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
