"""A run folder owned by one process at a time.

The owner holds an OS-level lock on ``DIR/.lock`` (``filelock``: ``flock`` on POSIX), taken
before anything else is written and released by the kernel when the process ends, so a run
killed with ``kill -9`` leaves no stale lock. A second run, or a resume, on a folder in use exits
at once with :class:`FolderInUseError`. The lock file itself does not make a folder "not empty".
"""
from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ["RunFolder", "FolderInUseError", "LOCK_NAME", "default_run_dir"]

LOCK_NAME = ".lock"


class FolderInUseError(RuntimeError):
    """Another live process holds the run folder's lock."""


def default_run_dir(dataset: str, seed: int, label: str = "") -> Path:
    """``runs/<dataset>[-label]-seed<seed>-<date>-<time>-<random>``: unique even for runs started in the same second."""
    name = dataset.replace("/", "_") + (f"-{label}" if label else "")
    return Path("runs") / f"{name}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


class RunFolder:
    """The locked run folder: ``RunFolder.create(path)`` for a new run, ``RunFolder.open(path)`` to resume one."""

    def __init__(self, path: Path, lock: FileLock):
        self.path, self._lock = path, lock

    @classmethod
    def create(cls, path: str | Path) -> RunFolder:
        """Creates (or takes an empty) folder and locks it; an existing run's folder is refused."""
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PermissionError(f"Cannot create the run folder {path} ({err.strerror}): choose a writable --output-dir.") from err
        folder = cls._locked(path)
        if any(p.name != LOCK_NAME for p in path.iterdir()):
            folder.release()
            raise FileExistsError(
                f"{path} already exists: pass --resume to continue that run, or choose another --output-dir."
            )
        return folder

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        """Locks an existing run folder to continue it."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume: {path} does not exist; --output-dir must name the run folder to continue.")
        return cls._locked(path)

    @classmethod
    def _locked(cls, path: Path) -> RunFolder:
        lock_path = path / LOCK_NAME
        try:
            with open(lock_path, "a"):  # also proves the folder is writable, before any work starts
                pass
        except OSError as err:
            raise PermissionError(f"Cannot write in the run folder {path} ({err.strerror}): choose a writable --output-dir.") from err
        lock = FileLock(lock_path, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise FolderInUseError(
                f"{path} is in use by another run (process holding {lock_path}); wait for it to end or choose another --output-dir."
            ) from None
        return cls(path, lock)

    def release(self) -> None:
        self._lock.release(force=True)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def write_text_atomic(self, name: str, text: str) -> Path:
        """Writes ``name`` in the folder via a temporary file and a rename (never a torn file)."""
        target = self.path / name
        staged = self.path / f".{name}.{os.getpid()}.tmp"
        staged.write_text(text)
        os.replace(staged, target)
        return target
