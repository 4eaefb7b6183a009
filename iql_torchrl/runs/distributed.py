"""Data-parallel training across processes under ``torchrun``.

:func:`setup_distributed` joins the process group; :func:`all_reduce_gradients` is the update
step's gradient hook: every process samples its own batches, gradients are averaged across
processes inside the step (one all-reduce per optimizer phase), so parameters stay identical on
every rank. It answers "train on a bigger global batch, or the same batch in less time" when one
process is compute-bound; many seeds in one process are :mod:`iql_torchrl.objectives.ensemble`'s.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tensordict import TensorDict
from torch import Tensor, nn

from iql_torchrl.objectives.ensemble import SeedEnsemble  # its former home: scripts import it from here

__all__ = ["SeedEnsemble", "DistributedContext", "setup_distributed", "all_reduce_gradients", "broadcast_parameters"]


# ------------------------------------------------------------------------------ data parallel
@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size`` (1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup_distributed(device: str) -> DistributedContext:
    """Joins the process group when launched by ``torchrun`` (gloo on CPU, nccl on CUDA).

    Outside torchrun it returns a single-process context and does nothing. (The run harness
    splits the machine's cores between the local processes: ``iql_torchrl.runs.threads``.)
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistributedContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank)


def all_reduce_gradients(grads: list[Tensor]) -> list[Tensor]:
    """The gradients averaged over all processes, in one flat all-reduce (an ``IQLUpdate`` grad_hook)."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    return [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]


def broadcast_parameters(module: nn.Module) -> None:
    """Copies rank 0's parameters and buffers to every process."""
    for tensor in TensorDict.from_module(module).values(True, True):
        dist.broadcast(tensor.data, src=0)
