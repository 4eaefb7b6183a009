"""A run folder owned by one process at a time.

The owner holds an OS-level lock on ``DIR/.lock`` (``filelock``: ``flock`` on POSIX), taken
before anything else is written and released by the kernel when the process ends, so a run
killed with ``kill -9`` leaves no stale lock. A second run, or a resume, on a folder in use exits
at once with :class:`FolderInUseError`. The lock file itself does not make a folder "not empty".

A run that fails before it writes anything leaves no folder behind: ``release(failed=True)`` removes
the folders :meth:`RunFolder.create` made when nothing but the lock is in them (never a folder that
was there before, never one holding anything else).
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

    def __init__(self, path: Path, lock: FileLock, created: list[Path] | None = None):
        self.path, self._lock = path, lock
        self._created = created or []  # the folders this run made, deepest first

    @classmethod
    def create(cls, path: str | Path) -> RunFolder:
        """Creates (or takes an empty) folder and locks it; an existing run's folder is refused."""
        path = Path(path)
        created = _missing_folders(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PermissionError(f"Cannot create the run folder {path} ({err.strerror}): choose a writable --output-dir.") from err
        folder = cls._locked(path, created)
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
    def _locked(cls, path: Path, created: list[Path] | None = None) -> RunFolder:
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
        return cls(path, lock, created)

    def release(self, failed: bool = False) -> None:
        """Unlocks the folder; after a ``failed`` start, first removes the folders this run created if they hold nothing."""
        if failed:
            self._remove_if_unused()
        self._lock.release(force=True)

    def _remove_if_unused(self) -> None:
        if not self._created or any(p.name != LOCK_NAME for p in self.path.iterdir()):
            return
        (self.path / LOCK_NAME).unlink(missing_ok=True)  # still locked: no other run is using it
        for folder in self._created:
            try:
                folder.rmdir()  # refuses a folder that is not empty
            except OSError:
                return

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def write_text_atomic(self, name: str | Path, text: str) -> Path:
        """Writes ``name`` (a path inside the folder) via a temporary file beside it and a rename (never a torn
        file)."""
        target = self.path / name
        staged = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        staged.write_text(text)
        os.replace(staged, target)
        return target


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing
