"""The settings of an update that may change between calls, as 0-d tensors the step reads on every call: a
setter writes into its tensor in place, so changing τ, the cosine's length or a learning rate compiles nothing.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from iql_torchrl.objectives.loss import TRAINED_NETWORKS
from iql_torchrl.step.arguments import check_setting, check_total_steps

__all__ = ["LiveSettings", "cosine_decay"]


def cosine_decay(step: Tensor, total_steps: int | Tensor) -> Tensor:
    """The paper's actor learning-rate factor: 0.5·(1 + cos(π·min(step, T)/T)), from 1 down to 0."""
    progress = torch.minimum(step, torch.as_tensor(total_steps, device=step.device)).to(torch.float32) / total_steps
    return 0.5 * (1.0 + torch.cos(math.pi * progress))


class LiveSettings:
    """τ, the length of the actor's cosine decay, and each network's learning rate (the tensor learning rates its
    optimizer holds; the actor's current one follows its cosine from a base rate)."""

    def __init__(self, *, tau: float, total_steps: int | None, actor_lr: float, optimizers: dict, device):
        self._tau, self._tau_value = torch.tensor(float(tau), device=device), tau
        self._total_steps = torch.zeros((), dtype=torch.int64, device=device)  # 0: no decay
        self.total_steps = total_steps
        self._actor_base_lr = torch.tensor(float(actor_lr), device=device)
        self._lr_tensors = {group: opt.param_groups[0]["lr"] for group, opt in optimizers.items()}
        self.actor_lr = self._lr_tensors["actor"]  # the actor's learning rate in force

    @property
    def tau(self) -> float:
        """The soft target update rate, in (0, 1]; may change between calls (``update.tau = 0.01``)."""
        return self._tau_value

    @tau.setter
    def tau(self, value: float) -> None:
        check_setting("tau", value)
        self._tau.fill_(value)
        self._tau_value = value

    @property
    def total_steps(self) -> int | None:
        """The length of the actor's cosine learning-rate decay (``None``: no decay); may change between calls."""
        total = int(self._total_steps)
        return total if total > 0 else None

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        check_total_steps(value)
        self._total_steps.fill_(0 if value is None else value)

    @property
    def learning_rates(self) -> dict[str, float]:
        """Each optimizer group's base learning rate (the actor's before its cosine decay)."""
        return {"value": float(self._lr_tensors["value"]), "actor": float(self._actor_base_lr),
                "qvalue": float(self._lr_tensors["qvalue"])}

    def set_learning_rate(self, group: str, lr: float) -> None:
        """Sets ``group``'s (``"value"``, ``"actor"``, ``"qvalue"``) learning rate, in place. The actor's is the base
        of its cosine decay (its current rate follows at the next step; at once with ``total_steps=None``).
        torch's LR schedulers, which change a tensor learning rate in place, work on ``value_optimizer`` and
        ``qvalue_optimizer``; the actor's rate is the cosine's."""
        if group not in TRAINED_NETWORKS:
            raise ValueError(f"group must be one of {tuple(TRAINED_NETWORKS)}, got {group!r}.")
        check_setting(f"{group}_lr", lr)
        if group == "actor":
            self._actor_base_lr.fill_(lr)
            if self.total_steps is None:
                self.actor_lr.fill_(lr)
        else:
            self._lr_tensors[group].fill_(lr)

    def set_actor_lr(self, lr: float | None = None) -> None:
        """Sets the actor's current learning rate (``None``: its base rate), in place; with ``total_steps=None`` it
        stays there."""
        if lr is None:
            self.actor_lr.copy_(self._actor_base_lr)
        else:
            check_setting("actor_lr", lr)
            self.actor_lr.fill_(lr)

    def _follow_cosine(self, step: Tensor) -> None:
        """The actor's learning rate at ``step`` of its cosine; length 0 (None) keeps the current rate (a select on
        tensors: changing the length never recompiles)."""
        decayed = self._actor_base_lr * cosine_decay(step, self._total_steps.clamp(min=1))
        self.actor_lr.copy_(torch.where(self._total_steps > 0, decayed, self.actor_lr))
