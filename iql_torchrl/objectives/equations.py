"""The paper's three equations (Kostrikov, Nair & Levine, ICLR 2022, section 4), as tensor functions.

* :func:`expectile_loss`  -- eq. (5): V(s) is the τ-expectile of min_i Q_target_i(s, a_dataset);
* :func:`bellman_target`  -- eq. (6): Q(s, a) regresses to r + γ·(1 − terminated)·V(s');
* :func:`awr_weight`      -- eq. (7): the actor maximises exp(β·(Q − V)), clamped at 100, · log π(a|s).

and each whole objective, per sample, as the loss computes it from its networks' outputs:

* :func:`value_objective`  -- L_V  = L₂^τ(min_i Q̄_i(s, a) − V(s));
* :func:`critic_objective` -- L_Q  = Σ_i ℓ(Q_i(s, a), r + γ·(1 − terminated)·V(s'));
* :func:`actor_objective`  -- L_π  = −min(exp(β·(min_i Q̄_i(s, a) − V(s))), 100) · log π(a|s).

:class:`~iql_torchrl.IQLLoss` wires them to TorchRL networks and TensorDicts; nothing else restates them.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchrl.objectives.utils import distance_loss

__all__ = ["expectile_loss", "bellman_target", "awr_weight", "MAX_AWR_WEIGHT", "value_objective",
           "critic_objective", "actor_objective"]

MAX_AWR_WEIGHT = 100.0


def expectile_loss(diff: Tensor, expectile: float | Tensor, complement: float | Tensor | None = None) -> Tensor:
    """Eq. (5): asymmetric squared loss |τ − 1(diff < 0)|·diff², with ``diff = Q − V``.

    With τ > 0.5, V is pushed up more by Q above it than down by Q below it, so V approaches
    the upper expectile of Q over the dataset's actions. ``complement`` is 1 − τ when τ is a float32
    tensor (1 − τ computed in float64 first, as for a Python τ); ``None``: computed here.
    """
    weight = torch.where(diff > 0, expectile, 1.0 - expectile if complement is None else complement)
    return weight * diff.pow(2)


def bellman_target(reward: Tensor, terminated: Tensor, next_value: Tensor, gamma) -> Tensor:
    """Eq. (6): r + γ·(1 − terminated)·V(s').  Truncated (not terminated) transitions bootstrap."""
    return reward + gamma * (~terminated).to(next_value.dtype) * next_value


def awr_weight(advantage: Tensor, temperature: float) -> Tensor:
    """Eq. (7): the advantage-weighted-regression weight exp(β·A), clamped at 100."""
    return torch.exp(advantage * temperature).clamp(max=MAX_AWR_WEIGHT)


def value_objective(target_min_q: Tensor, value: Tensor, expectile: float | Tensor,
                    complement: float | Tensor | None = None) -> Tensor:
    """V's loss per sample: the expectile loss (eq. 5) of min_i Q̄_i(s, a) − V(s), the min over the
    TARGET critics on the dataset's action (no gradient), V(s) with gradient."""
    return expectile_loss(target_min_q - value, expectile, complement)


def critic_objective(q: Tensor, target: Tensor, loss_function: str = "l2") -> Tensor:
    """The critics' loss per sample: every online critic ``q`` ([N, *B]) regresses onto the Bellman
    target (eq. 6, [*B], no gradient); summed over the N critics. ``"l2"`` is the paper's."""
    return distance_loss(q, target.expand_as(q), loss_function=loss_function).sum(0)


def actor_objective(target_min_q: Tensor, value: Tensor, objective: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """The actor's loss per sample: the AWR weight (eq. 7) of A = min_i Q̄_i(s, a) − V(s), without
    gradient, times ``objective`` (−log π(a|s); a deterministic actor's ‖π(s) − a‖²).

    Returns (loss, weight, advantage).
    """
    advantage = (target_min_q - value).detach()
    weight = awr_weight(advantage, temperature)
    return weight * objective, weight, advantage
