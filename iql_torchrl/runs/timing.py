"""Updates per second and wall time of a run, summed over the sessions of a resumed run."""
from __future__ import annotations

import time

__all__ = ["RunTiming"]


class RunTiming:
    """Update time and wall time of a run, summed over its sessions (a resumed run continues the sums).

    Only the updates count towards ``updates_per_second``: logging, evaluation and checkpoints
    are paused out, and so is the compile warm-up of each session, whose time ``compile_seconds``
    sums (the first call of a compiled step: traced, its kernels compiled or found in torch's caches).
    """

    def __init__(self, saved: dict | None = None):
        saved = saved or {}
        self.train_seconds = saved.get("train_seconds", 0.0)
        self.timed_updates = saved.get("timed_updates", 0)
        self.wall_seconds_before = saved.get("wall_seconds", 0.0)
        self.compile_seconds = saved.get("compile_seconds", 0.0)
        self._session_start = time.perf_counter()
        self._since, self._count = None, 0

    def start(self) -> None:
        if self._since is None:
            self._since = time.perf_counter()

    def count(self, updates: int = 1) -> None:
        if self._since is not None:
            self._count += updates

    def pause(self) -> None:
        if self._since is not None:
            self.train_seconds += time.perf_counter() - self._since
            self.timed_updates += self._count
        self._since, self._count = None, 0

    @property
    def updates_per_second(self) -> float | None:
        return self.timed_updates / self.train_seconds if self.train_seconds > 0 and self.timed_updates else None

    @property
    def wall_seconds(self) -> float:
        return self.wall_seconds_before + time.perf_counter() - self._session_start

    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds, "timed_updates": self.timed_updates, "wall_seconds": self.wall_seconds,
                "compile_seconds": self.compile_seconds}
