"""Atomic checkpoints that resume a run exactly.

A checkpoint holds the loss's parameters and target parameters, the update step's state
(optimizers, step counter, actor learning rate, non-finite record), the random states (torch,
the batch-index generator, numpy, python), the data metadata (normalisation statistics, action
scaling) and the run configuration. It is written to a temporary file in the same folder,
flushed to disk, then renamed over the old one: a crash at any moment leaves either the old
checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "capture_rng", "restore_rng", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"


def capture_rng(generators: list[torch.Generator] = ()) -> dict:
    """The random states a resumed run needs to draw the same numbers."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["generators"] = [g.get_state() for g in generators]
    return state


def restore_rng(state: dict, generators: list[torch.Generator] = ()) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for generator, saved in zip(generators, state["generators"], strict=True):
        generator.set_state(saved)


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Writes ``state`` with ``torch.save`` to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | Path, map_location=None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}: nothing to resume from.")
    return torch.load(path, map_location=map_location, weights_only=False)
