"""Changes an update step cannot follow, refused before each call, the same in every mode.

The step holds tensors: the trainable parameters (their Adam state is keyed by them), the target critics, the
optimizers' tensor learning rates. A parameter replaced by a new tensor, a learning rate replaced by a number,
or the loss moved to another dtype or device after the update was built would leave the step training what the
loss no longer uses: :class:`HeldTensors` refuses the next call, saying what to do instead.
"""
from __future__ import annotations

import torch
from tensordict import TensorDictBase

__all__ = ["HeldTensors"]


class HeldTensors:
    """What an update holds of its loss and optimizers, to check before each call.

    Args:
        loss: the loss trained (its ``conversions`` counts its ``.to()`` / ``.double()`` calls, where it has one).
        param_tds: each network's parameter TensorDict, as the loss holds it.
        optimizers: each network's optimizer, with a tensor learning rate.
        held: the parameters the step trains and the target critics it updates.
    """

    def __init__(self, loss, param_tds: dict[str, TensorDictBase], optimizers: dict[str, torch.optim.Optimizer],
                 held: list[torch.Tensor]):
        self.loss = loss
        self.param_tds = param_tds
        self.optimizers = optimizers
        self.learning_rates = {group: opt.param_groups[0]["lr"] for group, opt in optimizers.items()}
        self.leaves = {group: _leaves(td) for group, td in param_tds.items()}
        self.held = held
        self.layout = _layout(held)
        self.conversions = getattr(loss, "conversions", None)

    def check(self) -> None:
        """Raises ``RuntimeError`` naming the first change the step cannot follow and what to do instead."""
        for group, opt in self.optimizers.items():
            if opt.param_groups[0]["lr"] is not self.learning_rates[group]:
                raise RuntimeError(
                    f"IQLUpdate: the {group} optimizer's learning rate was replaced ({opt.param_groups[0]['lr']!r}); "
                    f"change it in place instead: update.set_learning_rate({group!r}, lr) (torch's LR schedulers "
                    "change it in place too).")
        if getattr(self.loss, "conversions", None) != self.conversions:  # .to() / .double() since the last check
            if _layout(self.held) != self.layout:
                raise RuntimeError(
                    "IQLUpdate: the loss's parameters moved to another dtype or device after the update was built "
                    "(their optimizer state did not): move the loss first, then build the IQLUpdate.")
            self.conversions = getattr(self.loss, "conversions", None)
        for group, td in self.param_tds.items():
            leaves = _leaves(td)
            if len(leaves) != len(self.leaves[group]) or any(a is not b for a, b in zip(leaves, self.leaves[group])):
                raise RuntimeError(
                    f"IQLUpdate: a parameter of the loss's {group} network was replaced by a new tensor after the "
                    "update was built (its optimizer trains the old one): load new values in place "
                    "(loss.load_state_dict(...), or param.data.copy_(...)), or build a new IQLUpdate.")


def _leaves(td: TensorDictBase) -> list[torch.Tensor]:
    """The tensors ``td`` holds now (a loss's ``TensorDictParams`` listed as a module, faster than its keys)."""
    if isinstance(td, torch.nn.Module):
        return [*td.parameters(), *td.buffers()]
    return list(td.values(True, True))


def _layout(tensors: list[torch.Tensor]) -> list[tuple]:
    return [(t.dtype, t.device) for t in tensors]
