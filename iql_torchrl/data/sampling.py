"""Batches drawn on the device the data lives on, with no host round trip.

For training loops that keep the whole dataset on the accelerator: :func:`buffer_transitions`
returns the stored TensorDict, :func:`sample_indices` draws uniform indices on its device, and
``data[indices]`` is the batch (inside a compiled step too).
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torchrl.data import ReplayBuffer

__all__ = ["buffer_transitions", "sample_indices"]


def buffer_transitions(buffer: ReplayBuffer) -> TensorDictBase:
    """The buffer's stored transitions as one TensorDict (no copy), on the storage's device."""
    return buffer.storage.get(slice(None))


def sample_indices(
    num_transitions: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform transition indices ``[batch_size]`` (int64), drawn on ``device`` with ``generator``.

    Draw indices outside a compiled step and pass them in, so eager and compiled
    runs see the same batches; the generator must live on ``device``.
    """
    return torch.randint(num_transitions, (batch_size,), generator=generator, device=device)
