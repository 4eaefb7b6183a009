"""Many seeds in one process: K independent IQL agents as one computation.

:class:`SeedEnsemble` stacks K losses' parameters along a leading seed dimension and ``torch.vmap``-s
the loss over it. Adam and the soft target update are elementwise, so one optimizer over the stacked
parameters is exactly K independent optimizers. Each seed keeps its own initialisation, batches and
optimizer state. Seeds answer "how reliable is this result" at the cost of one run (small networks
leave a GPU mostly idle, and K seeds fill it).
"""
from __future__ import annotations

import copy

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from torch import Tensor, nn

from iql_torchrl.objectives.loss import TRAINED_NETWORKS, IQLLoss

__all__ = ["SeedEnsemble"]

_PARAMETER_NAMES = (*TRAINED_NETWORKS, "target_qvalue")  # the loss's "<name>_network_params"
_HYPERPARAMETERS = ("_temperature", "_expectile", "_expectile_complement")  # IQLLoss's 0-d buffers behind its properties
_TRAINABLE = tuple(f"{name}_network_params" for name in TRAINED_NETWORKS)


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
        # the seeds' parameters and buffers; the hyperparameters (β, τ) stay the template's, shared by every seed
        stacked = torch.stack([TensorDict.from_module(loss).data.exclude(*_HYPERPARAMETERS) for loss in losses]).clone()
        for key, value in stacked.items(True, True):
            trainable = key[0] in _TRAINABLE  # the target critics follow by the soft update, not by gradients
            stacked.set(key, nn.Parameter(value, requires_grad=trainable) if trainable else value)
        self.params = TensorDictParams(stacked, no_convert=True)
        self.num_seeds = len(losses)
        self._vmapped = {}

    # ------------------------------------------------------------------ hyperparameters: every seed's
    @property
    def expectile(self) -> float:
        return self.template.expectile

    @expectile.setter
    def expectile(self, value: float) -> None:
        self.template.expectile = value

    @property
    def temperature(self) -> float:
        return self.template.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.template.temperature = value

    def train(self, mode: bool = True):
        """Training mode for every seed (the template's networks run them all)."""
        super().train(mode)
        self.template.train(mode)
        return self

    def _apply(self, *args, **kwargs):
        self.conversions = getattr(self, "conversions", 0) + 1  # IQLUpdate checks the layout again after one
        self.template._apply(*args, **kwargs)  # its hyperparameter buffers follow the seeds
        return super()._apply(*args, **kwargs)

    # ------------------------------------------------------------------ the surface IQLUpdate reads
    # (see IQLUpdate's docstring): the stacked seeds' parameters, the template's modules, the claim
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
    def actor_network(self):
        return self.template.actor_network

    @property
    def qvalue_network(self):
        return self.template.qvalue_network

    @property
    def value_network(self):
        return self.template.value_network

    def claim_target_update(self) -> None:
        """The update step owns the seeds' target update."""
        self.template.claim_target_update()

    # the loss, vmapped over seeds
    def _call(self, method: str, *args, params: dict | None = None):
        """``template.method(*args, params)`` for every seed at once; ``params`` replaces the seed's own."""
        if method not in self._vmapped:
            template = self.template

            def one_seed(seed_params, *inputs):
                return getattr(template, method)(*inputs, seed_params)

            self._vmapped[method] = torch.vmap(one_seed, randomness="different")
        seed_params = {name: self.params[f"{name}_network_params"] for name in _PARAMETER_NAMES}
        seed_params.update(params or {})
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
