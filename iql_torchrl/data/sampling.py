"""Batches drawn on the device the data lives on, with no host round trip.

For training loops that keep the whole dataset on the accelerator: :func:`buffer_transitions`
returns the stored TensorDict and :func:`sample_indices` / :func:`gather_batch` (or
:class:`DeviceSampler`) draw batches on its device.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torchrl.data import ReplayBuffer

__all__ = ["DeviceSampler", "buffer_transitions", "gather_batch", "sample_batch", "sample_indices"]


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


def gather_batch(data: TensorDictBase, indices: torch.Tensor) -> TensorDictBase:
    """The transitions at ``indices`` (a plain index; works inside ``torch.compile``)."""
    return data[indices]


def sample_batch(data: TensorDictBase, batch_size: int, generator: torch.Generator | None = None) -> TensorDictBase:
    """``gather_batch(data, sample_indices(len(data), batch_size, generator, data.device))``."""
    return gather_batch(data, sample_indices(data.batch_size[0], batch_size, generator, data.device))


class DeviceSampler:
    """Uniform minibatches from a TensorDict that lives on the training device.

    Indices come from ``torch.randint`` on the data's device with the sampler's own
    generator (seeded by ``seed``), so sampling never touches the host.

    Example::

        data = buffer_transitions(load_minari_dataset(DEFAULT_DATASET, device="cuda"))
        sampler = DeviceSampler(data, batch_size=256, seed=0)
        batch = sampler.sample()               # or: idx = sampler.indices(); batch = gather_batch(data, idx)
    """

    def __init__(self, data: TensorDictBase, batch_size: int, seed: int | None = None):
        self.data = data
        self.batch_size = batch_size
        device = data.device if data.device is not None else torch.device("cpu")
        self.generator = torch.Generator(device=device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self.device = device

    def __len__(self) -> int:
        return self.data.batch_size[0]

    def indices(self) -> torch.Tensor:
        """Draw one batch of indices on the data's device."""
        return sample_indices(len(self), self.batch_size, self.generator, self.device)

    def sample(self) -> TensorDictBase:
        """Draw one batch of transitions."""
        return gather_batch(self.data, self.indices())

    __call__ = sample
