"""The paper's three equations (Kostrikov, Nair & Levine, ICLR 2022, section 4), as tensor functions.

* :func:`expectile_loss`  -- eq. (5): V(s) is the τ-expectile of min_i Q_target_i(s, a_dataset);
* :func:`bellman_target`  -- eq. (6): Q(s, a) regresses to r + γ·(1 − terminated)·V(s');
* :func:`awr_weight`      -- eq. (7): the actor maximises exp(β·(Q − V)), clamped at 100, · log π(a|s).

:class:`~iql_torchrl.IQLLoss` wires them to TorchRL networks and TensorDicts; nothing else restates them.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["expectile_loss", "bellman_target", "awr_weight", "MAX_AWR_WEIGHT"]

MAX_AWR_WEIGHT = 100.0


def expectile_loss(diff: Tensor, expectile: float) -> Tensor:
    """Eq. (5): asymmetric squared loss |τ − 1(diff < 0)|·diff², with ``diff = Q − V``.

    With τ > 0.5, V is pushed up more by Q above it than down by Q below it, so V approaches
    the upper expectile of Q over the dataset's actions.
    """
    weight = torch.where(diff > 0, expectile, 1.0 - expectile)
    return weight * diff.pow(2)


def bellman_target(reward: Tensor, terminated: Tensor, next_value: Tensor, gamma) -> Tensor:
    """Eq. (6): r + γ·(1 − terminated)·V(s').  Truncated (not terminated) transitions bootstrap."""
    return reward + gamma * (~terminated).to(next_value.dtype) * next_value


def awr_weight(advantage: Tensor, temperature: float) -> Tensor:
    """Eq. (7): the advantage-weighted-regression weight exp(β·A), clamped at 100."""
    return torch.exp(advantage * temperature).clamp(max=MAX_AWR_WEIGHT)
