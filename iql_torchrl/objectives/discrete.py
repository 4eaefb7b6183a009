"""DiscreteIQLLoss: IQL for discrete actions, the critics scoring every action, Q(s, a) read at the dataset's."""
from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torch import Tensor
from torch.distributions import Categorical
from torchrl.data.tensor_specs import TensorSpec
from torchrl.data.utils import _find_action_space
from torchrl.modules.distributions import MaskedOneHotCategorical, OneHotCategorical

from iql_torchrl.objectives.loss import IQLLoss

__all__ = ["DiscreteIQLLoss"]

# distributions over one-hot rows (TorchRL's subclass torch's Categorical, which scores indices)
ONE_HOT_DISTRIBUTIONS = (torch.distributions.OneHotCategorical, OneHotCategorical, MaskedOneHotCategorical)


class DiscreteIQLLoss(IQLLoss):
    """IQL for discrete actions: the critic outputs one Q value per action.

    Keyword Args:
        action_space (str or TensorSpec): ``"categorical"`` (actions are indices, shaped ``[*B]``
            or ``[*B, 1]``) or ``"one-hot"`` (actions shaped ``[*B, n]``). Required.
        Other arguments as :class:`IQLLoss`. The actor must be probabilistic (a Categorical or
        OneHotCategorical ``ProbabilisticActor``).
    """

    def __init__(self, actor_network, qvalue_network, value_network, *, action_space: str | TensorSpec = None, **kwargs):
        if action_space is None:
            raise ValueError("DiscreteIQLLoss needs action_space: 'categorical' or 'one-hot' (or a spec).")
        super().__init__(actor_network, qvalue_network, value_network, **kwargs)
        if not self.is_probabilistic_actor:
            raise TypeError("DiscreteIQLLoss needs a probabilistic actor (Categorical or OneHotCategorical).")
        self.action_space = _find_action_space(action_space)
        if self.action_space not in ("categorical", "one_hot"):
            raise ValueError(f"action_space must be 'categorical' or 'one-hot', got {action_space!r}.")
        if self.action_space == "categorical":
            self._expected_action_size = None  # indices: the number of actions is a value, not a shape

    def _check_action(self, tensordict: TensorDictBase) -> None:
        action = tensordict.get(self.tensor_keys.action)
        if self.action_space == "categorical" and (action.is_floating_point() or action.dtype == torch.bool):
            raise TypeError(
                f"DiscreteIQLLoss: {self.tensor_keys.action!r} is {action.dtype}, but categorical actions "
                "are integer indices (torch.long). Cast them where the data enters the buffer, or use "
                "action_space='one-hot' for one-hot actions."
            )
        expected = self._expected_action_size
        if self.action_space == "one_hot" and expected is not None and action.shape[-1:] != (expected,):
            raise ValueError(
                f"DiscreteIQLLoss: one-hot {self.tensor_keys.action!r} has shape {tuple(action.shape)} but "
                f"the actor's spec has {expected} actions: expected [*batch, {expected}]."
            )

    def _index(self, action: Tensor, batch_ndim: int) -> Tensor:
        """Action as a long index of shape [*B]."""
        if self.action_space == "one_hot":
            return (action.to(torch.uint8) if action.dtype == torch.bool else action).argmax(-1)
        return action.squeeze(-1).long() if action.ndim > batch_ndim else action.long()

    def _q_of_dataset_action(self, q_all: Tensor, action: Tensor) -> Tensor:
        # q_all: [num_critics, *B, n_actions]: Q(s, a_dataset), never max_a Q(s, a)
        if self.action_space == "one_hot" and action.shape[-1] != q_all.shape[-1]:
            raise ValueError(
                f"DiscreteIQLLoss: one-hot {self.tensor_keys.action!r} has {action.shape[-1]} entries but "
                f"the critic scores {q_all.shape[-1]} actions: expected [*batch, {q_all.shape[-1]}]."
            )
        index = self._index(action, q_all.ndim - 2)
        return q_all.gather(-1, index.unsqueeze(-1).expand(*q_all.shape[:-1], 1)).squeeze(-1)

    def _log_prob(self, dist, action: Tensor) -> Tensor:
        # a Categorical scores indices, a OneHotCategorical one-hot rows: given the other kind, log_prob
        # broadcasts or reads the wrong entries (TorchRL's one-hot distributions subclass Categorical)
        one_hot_actor = isinstance(dist, ONE_HOT_DISTRIBUTIONS)
        if (one_hot_actor or isinstance(dist, Categorical)) and one_hot_actor != (self.action_space == "one_hot"):
            actor = "one-hot" if one_hot_actor else "categorical"
            other = "Categorical" if one_hot_actor else "OneHotCategorical"
            raise TypeError(
                f"DiscreteIQLLoss: the actor's distribution {type(dist).__name__} is {actor} but "
                f"action_space={self.action_space.replace('_', '-')!r}: build the actor with {other} "
                f"or pass action_space={'one-hot' if one_hot_actor else 'categorical'!r}."
            )
        if self.action_space == "categorical":
            # (B, 1)-shaped indices would broadcast in Categorical.log_prob
            batch_ndim = len(dist.batch_shape)
            return dist.log_prob(self._index(action, batch_ndim))
        return dist.log_prob(action if action.is_floating_point() else action.to(dist.logits.dtype))

    def _check_action_shape(self, action: Tensor, batch_shape: torch.Size) -> None:
        ok = action.shape[:-1] == batch_shape if self.action_space == "one_hot" else (
            action.shape == batch_shape or action.shape == (*batch_shape, 1)
        )
        if not ok:
            expected = "[*batch, n_actions]" if self.action_space == "one_hot" else "[*batch] or [*batch, 1]"
            raise ValueError(
                f"{self.tensor_keys.action!r} has shape {tuple(action.shape)} but the observations give a "
                f"batch of {tuple(batch_shape)}: expected {expected} for action_space={self.action_space!r}."
            )
