"""Scale out: many seeds in one process, and data-parallel training across processes.

* :class:`SeedEnsemble` -- K independent IQL agents as one computation: their parameters are
  stacked along a leading seed dimension and the loss is ``torch.vmap``-ed over it. Adam and the
  soft target update are elementwise, so one optimizer over the stacked parameters is exactly K
  independent optimizers. Each seed keeps its own initialisation, batches and optimizer state.
* :func:`setup_distributed` / :func:`all_reduce_gradients` -- data parallelism under ``torchrun``:
  every process samples its own batches, gradients are averaged across processes inside the
  update step (one all-reduce per optimizer phase), so parameters stay identical on every rank.

When to use which: seeds answer "how reliable is this result" at the cost of one run (small
networks leave a GPU mostly idle, and K seeds fill it); data parallelism answers "train on a
bigger global batch, or the same batch in less time" when one process is compute-bound.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from torch import Tensor, nn

from iql_torchrl.loss import IQLLoss

__all__ = ["SeedEnsemble", "DistributedContext", "setup_distributed", "all_reduce_gradients"]

_TRAINABLE = ("actor_network_params", "qvalue_network_params", "value_network_params")


class SeedEnsemble(nn.Module):
    """K :class:`~iql_torchrl.IQLLoss` copies evaluated as one vmapped loss.

    Build each loss with its own seed, then stack them: ``SeedEnsemble([loss_0, ..., loss_k])``.
    The ensemble has the loss's interface (``forward``, ``value_phase``, ``actor_critic_phase``,
    ``*_network_params``), so :class:`~iql_torchrl.IQLUpdate` trains it unchanged, with batches of
    shape ``[K, B]`` (one batch per seed). Its losses and diagnostics have shape ``[K]``.
    """

    def __init__(self, losses: list[IQLLoss]):
        super().__init__()
        if len(losses) < 1:
            raise ValueError("SeedEnsemble needs at least one loss.")
        self.__dict__["template"] = losses[0]  # its modules run every seed; its own tensors are swapped out
        stacked = torch.stack([TensorDict.from_module(loss).data for loss in losses]).clone()
        for key, value in stacked.items(True, True):
            trainable = key[0] in _TRAINABLE
            stacked.set(key, nn.Parameter(value, requires_grad=trainable) if trainable else value)
        self.params = TensorDictParams(stacked, no_convert=True)
        self.num_seeds = len(losses)
        self._vmapped = {}

    # the attributes IQLUpdate reads
    @property
    def actor_network_params(self) -> TensorDictBase:
        return self.params["actor_network_params"]

    @property
    def qvalue_network_params(self) -> TensorDictBase:
        return self.params["qvalue_network_params"]

    @property
    def value_network_params(self) -> TensorDictBase:
        return self.params["value_network_params"]

    @property
    def target_qvalue_network_params(self) -> TensorDictBase:
        return self.params["target_qvalue_network_params"]

    @property
    def _has_update_associated(self) -> dict:
        return self.template._has_update_associated

    @property
    def actor_network(self):
        return self.template.actor_network

    @property
    def qvalue_network(self):
        return self.template.qvalue_network

    @property
    def value_network(self):
        return self.template.value_network

    # the loss, vmapped over seeds
    def _call(self, method: str, *args, params: dict | None = None):
        """``template.method(*args, params)`` for every seed at once; ``params`` replaces the seed's own."""
        if method not in self._vmapped:
            template = self.template

            def one_seed(seed_params, *inputs):
                return getattr(template, method)(*inputs, seed_params)

            self._vmapped[method] = torch.vmap(one_seed, randomness="different")
        seed_params = {
            "actor": self.actor_network_params,
            "value": self.value_network_params,
            "qvalue": self.qvalue_network_params,
            "target_qvalue": self.target_qvalue_network_params,
            **(params or {}),
        }
        return self._vmapped[method](seed_params, *args)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        return self._call("evaluate", tensordict)

    def evaluate(self, tensordict: TensorDictBase, params: dict | None = None) -> TensorDictBase:
        return self._call("evaluate", tensordict, params=params)

    def value_phase(self, tensordict: TensorDictBase, params: dict | None = None) -> tuple[TensorDictBase, Tensor]:
        return self._call("value_phase", tensordict, params=params)

    def actor_critic_phase(
        self, tensordict: TensorDictBase, target_min_q: Tensor, params: dict | None = None
    ) -> TensorDictBase:
        return self._call("actor_critic_phase", tensordict, target_min_q, params=params)

    def seed_loss(self, index: int) -> IQLLoss:
        """A stand-alone copy of seed ``index``'s loss (for evaluation, export, comparison)."""
        loss = copy.deepcopy(self.template)
        TensorDict.from_module(loss).data.update_(self.params[index].data)
        return loss


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
    splits the machine's cores between the local processes: ``iql_torchrl.threads``.)
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
