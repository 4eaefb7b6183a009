"""Atomic checkpoints that resume a run exactly, and load without running code.

A checkpoint holds the loss's parameters and target parameters, the update step's state
(optimizers, step counter, actor learning rate, non-finite record), the random states (torch,
the batch-index generators, numpy, python), the data metadata and fingerprint, and the run
configuration -- tensors and plain data only, so it loads with ``torch.load(weights_only=True)``:
a crafted file cannot run code.

Writing: the new checkpoint goes to a temporary file in the same folder, is flushed to disk and
renamed over the old one, which is kept as ``checkpoint.prev.pt``. A crash at any moment leaves a
readable checkpoint; a ``checkpoint.pt`` that cannot be read falls back, with a warning, to the
previous one. Temporary files left by a killed process are removed when a run starts.
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "save_checkpoint", "load_checkpoint", "load_run_checkpoint", "remove_stale_temporaries", "capture_rng",
    "restore_rng", "CheckpointError", "CHECKPOINT_NAME", "PREVIOUS_CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_CHECKPOINT_NAME = "checkpoint.prev.pt"
_TEMPORARY_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read: truncated, empty, foreign or unsafe."""


# ---------------------------------------------------------------------------------------- random states
def capture_rng(generators: list[torch.Generator] = ()) -> dict:
    """The random states a resumed run needs to draw the same numbers (tensors and plain data)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["generators"] = [g.get_state() for g in generators]
    return state


def restore_rng(state: dict, generators: list[torch.Generator] = ()) -> list[int]:
    """Puts the saved random states back; returns the indices of the ``generators`` it left as they are: those
    saved on another kind of device (a CPU generator and a CUDA one hold states of different kinds and sizes)."""
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state((saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["position"],
                         saved["has_gauss"], saved["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    if "cuda" in state and torch.cuda.is_available():  # each GPU this machine has (the saving one may have had more)
        for index, saved_cuda in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(saved_cuda, index)
    elsewhere = []
    for index, (generator, saved_generator) in enumerate(zip(generators, state["generators"], strict=True)):
        if saved_generator.numel() == generator.get_state().numel():
            generator.set_state(saved_generator)
        else:
            elsewhere.append(index)
    return elsewhere


# ---------------------------------------------------------------------------------------- writing
def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Writes ``state`` to ``path`` atomically (temp file, fsync, rename); the old file becomes ``*.prev.pt``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMPORARY_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            _keep_previous(path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the renames themselves survive a power cut
    finally:
        os.close(dir_fd)
    return path


def _keep_previous(path: Path) -> None:
    """``path`` → ``*.prev.pt`` without a moment where ``path`` is missing (a hard link, else a copy)."""
    previous = _previous_of(path)
    staged = path.parent / f".{previous.name}{_TEMPORARY_SUFFIX}"
    staged.unlink(missing_ok=True)
    try:
        os.link(path, staged)
    except OSError:  # a file system without hard links
        shutil.copyfile(path, staged)
    os.replace(staged, previous)


def _previous_of(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".pt") + ".prev.pt")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Deletes the temporary checkpoint files a killed process left in ``folder``; returns them.

    Call it only while holding the folder's lock (no other process can be writing them).
    """
    stale = [p for p in Path(folder).glob(f".*.pt*{_TEMPORARY_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# ---------------------------------------------------------------------------------------- reading
def load_checkpoint(path: str | Path, map_location=None) -> dict:
    """Reads one checkpoint file with ``weights_only=True``; :class:`CheckpointError` names the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}: nothing to resume from.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err):  # not a pickle this package wrote: garbage, not a forbidden object
            raise CheckpointError(_unreadable(path, err)) from err
        raise CheckpointError(
            f"{path} holds objects a checkpoint of this package never stores (refused, not executed: "
            f"{_unsafe_global(err)}). Use only checkpoints written by iql_torchrl."
        ) from err
    except Exception as err:  # damaged bytes fail anywhere in torch's reader (KeyError, struct.error, EOFError, ...)
        if "on a CUDA device" in str(err):  # a sound file whose tensors were saved on a GPU this machine lacks
            raise RuntimeError(f"{path} was saved on a CUDA device and this machine has none: read it with "
                               "map_location='cpu'.") from err
        raise CheckpointError(_unreadable(path, err)) from err
    if not isinstance(state, dict) or "loss" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not an iql_torchrl checkpoint (no loss and config in it).")
    return state


def _unreadable(path: Path, err: Exception) -> str:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return (f"{path} is not a readable checkpoint (truncated, empty or not written by torch.save: {reason}). "
            "Delete it to start over, or restore it from a copy.")


def _unsafe_global(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line]
    return lines[0].split(" was not")[0] if lines else type(err).__name__


def load_run_checkpoint(folder: str | Path, map_location=None) -> dict:
    """The checkpoint of the run in ``folder``, falling back (with a warning) to the previous one when the last is unreadable."""
    folder = Path(folder)
    path, previous = folder / CHECKPOINT_NAME, folder / PREVIOUS_CHECKPOINT_NAME
    if not path.exists() and not previous.exists():
        raise FileNotFoundError(f"No {CHECKPOINT_NAME} in {folder}: not a run folder, or the run wrote no checkpoint yet.")
    try:
        return load_checkpoint(path, map_location)
    except (CheckpointError, FileNotFoundError) as err:
        if not previous.is_file():
            raise
        state = load_checkpoint(previous, map_location)
        warnings.warn(f"{err} Using the previous checkpoint {previous.name} (update step {state.get('step')}).",
                      stacklevel=2)
        return state
