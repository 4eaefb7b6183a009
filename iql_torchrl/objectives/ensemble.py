"""Many seeds (and settings) in one process: K independent IQL agents as one computation.

:class:`SeedEnsemble` stacks K losses' parameters along a leading member dimension and ``torch.vmap``-s
the loss over it. Adam and the soft target update are elementwise, so one optimizer over the stacked
parameters is exactly K independent optimizers. Each member keeps its own initialisation, batches,
optimizer state and its own β and τ (stacked like the parameters), so a grid of settings × seeds trains
as one run. Seeds answer "how reliable is this result" at the cost of one run (small networks
leave a GPU mostly idle, and K members fill it).
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
    """K :class:`~iql_torchrl.IQLLoss` copies (members) evaluated as one vmapped loss.

    Build each loss with its own seed (and its own ``temperature`` and ``expectile``), then stack them:
    ``SeedEnsemble([loss_0, ..., loss_k])``. The ensemble has the loss's interface (``forward``,
    ``value_phase``, ``actor_critic_phase``, ``*_network_params``), so :class:`~iql_torchrl.IQLUpdate`
    trains it unchanged, with batches of shape ``[K, B]`` (one batch per member). Its losses and
    diagnostics have shape ``[K]``. Every member reads its own β and τ (``temperatures``,
    ``expectiles``); setting ``ensemble.temperature`` or ``ensemble.expectile`` sets every member's.
    """

    def __init__(self, losses: list[IQLLoss]):
        super().__init__()
        if len(losses) < 1:
            raise ValueError("SeedEnsemble needs at least one loss.")
        self.__dict__["template"] = losses[0]  # its modules run every member; its own tensors are swapped out
        # the members' parameters and buffers; their hyperparameters (β, τ) are stacked apart, below
        stacked = torch.stack([TensorDict.from_module(loss).data.exclude(*_HYPERPARAMETERS) for loss in losses]).clone()
        for key, value in stacked.items(True, True):
            trainable = key[0] in _TRAINABLE  # the target critics follow by the soft update, not by gradients
            stacked.set(key, nn.Parameter(value, requires_grad=trainable) if trainable else value)
        self.params = TensorDictParams(stacked, no_convert=True)
        # β and τ of each member, [K] buffers the vmapped call swaps into the template: tensors the step reads, so
        # changing them compiles nothing (non-persistent, as the loss's own)
        for name in _HYPERPARAMETERS:
            self.register_buffer(name, torch.stack([getattr(loss, name) for loss in losses]).clone(), persistent=False)
        self._temperature_values = tuple(loss.temperature for loss in losses)  # as given, for reading back
        self._expectile_values = tuple(loss.expectile for loss in losses)
        self.num_seeds = len(losses)  # the members stacked (seeds, or settings × seeds)

    # ------------------------------------------------------------------ hyperparameters: each member's
    @property
    def temperatures(self) -> tuple[float, ...]:
        """Each member's β."""
        return self._temperature_values

    @property
    def expectiles(self) -> tuple[float, ...]:
        """Each member's τ."""
        return self._expectile_values

    @property
    def temperature(self) -> float:
        """β of every member; setting it sets every member's (a ``ValueError`` to read where members differ)."""
        return _shared("temperature", self._temperature_values)

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.template.temperature = value  # checked there
        self._temperature.fill_(self.template._temperature)
        self._temperature_values = (self.template.temperature,) * self.num_seeds

    @property
    def expectile(self) -> float:
        """τ of every member; setting it sets every member's (a ``ValueError`` to read where members differ)."""
        return _shared("expectile", self._expectile_values)

    @expectile.setter
    def expectile(self, value: float) -> None:
        self.template.expectile = value  # checked there; its complement rounded as the loss rounds it
        self._expectile.fill_(self.template._expectile)
        self._expectile_complement.fill_(self.template._expectile_complement)
        self._expectile_values = (self.template.expectile,) * self.num_seeds

    def train(self, mode: bool = True):
        """Training mode for every seed (the template's networks run them all)."""
        super().train(mode)
        self.template.train(mode)
        return self

    def _apply(self, *args, **kwargs):
        self.conversions = getattr(self, "conversions", 0) + 1  # IQLUpdate checks the layout again after one
        self.template._apply(*args, **kwargs)  # its own buffers follow the members
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

    # the loss, vmapped over members
    def _call(self, method: str, *args, params: dict | None = None):
        """``template.method(*args, params)`` for every member at once, each with its own β and τ; ``params``
        replaces the member's own parameters."""
        template = self.template

        def one_member(member_params, member_settings, *inputs):
            with member_settings.to_module(template):
                return getattr(template, method)(*inputs, member_params)

        # vmapped anew each call: a cache of vmapped functions filled on the first call would be state that a
        # compiled step's guards read, and the second call would compile the step again
        member_params = {name: self.params[f"{name}_network_params"] for name in _PARAMETER_NAMES}
        member_params.update(params or {})
        settings = TensorDict({name: getattr(self, name) for name in _HYPERPARAMETERS}, batch_size=[self.num_seeds])
        return torch.vmap(one_member, randomness="different")(member_params, settings, *args)

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
        """A stand-alone copy of member ``index``'s loss, its β and τ included (for evaluation, export, comparison)."""
        loss = copy.deepcopy(self.template)
        TensorDict.from_module(loss).data.update_(self.params[index].data)
        loss.temperature, loss.expectile = self._temperature_values[index], self._expectile_values[index]
        return loss


def _shared(name: str, values: tuple[float, ...]) -> float:
    if any(value != values[0] for value in values):
        raise ValueError(f"the members' {name}s differ ({', '.join(map(str, values))}): read each member's from "
                         f"ensemble.{name}s.")
    return values[0]
