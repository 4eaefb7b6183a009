"""What an :class:`~iql_torchrl.IQLUpdate` hands its :class:`~iql_torchrl.step.modes.StepRunner`: the step, and what
the runner reads from the update to compile it and check it against the eager step.
"""
from __future__ import annotations

import torch
from torch import Tensor

from iql_torchrl.step.eager_check import EagerCheck, tolerance
from iql_torchrl.step.modes import StepRunner, call_structure

__all__ = ["build_runner"]

STATE_TENSORS = ("step", "actor_lr", "first_nonfinite_step", "nonfinite_losses")  # the update's own, besides Adam's


def build_runner(update, *, mode: str, grad_hook, eager_checks: int, fall_back_to_eager: bool) -> StepRunner:
    """The runner of ``update``'s step in ``mode``. A gradient hook (torchrun's all-reduce) is a graph break: the
    step then compiles without ``fullgraph`` and every call evaluates dynamo's guards. Dropout layers make compiled
    random ops draw from eager's generator."""
    dropouts = [m for m in _modules(update.loss) if isinstance(m, torch.nn.Dropout)]
    device_type = update.step.device.type  # the update's counters live where it trains
    return StepRunner(
        update._paper_step if update.order == "paper" else update._summed_step, mode=mode,
        fullgraph=grad_hook is None, skip_guards=grad_hook is None, eager_random=bool(dropouts),
        specialisation=lambda: (call_structure(update.data), tuple(m.training for m in dropouts),
                                torch.is_autocast_enabled(device_type)),
        device_type=device_type,
        check=EagerCheck(lambda: checked_networks(update), lambda: written_tensors(update), random=bool(dropouts),
                         tolerance=tolerance(update.precision)),
        check_calls=eager_checks, fall_back=fall_back_to_eager,
    )


def checked_networks(update) -> dict[str, tuple[dict[str, Tensor], Tensor]]:
    """What the eager check compares: each network's trainable parameters and the target critics, by name, with
    the learning rate that bounds their difference (the critics' for the targets)."""
    lrs = {group: opt.param_groups[0]["lr"] for group, opt in update.optimizers.items()}
    named = {group: {_dotted(key): update.leaves[group][key] for key in keys}
             for group, keys in update.trainable_keys.items()}
    named["target_qvalue"] = {_dotted(key): t for key, t in update.target_leaves.items()}
    return {name: (tensors, lrs.get(name, lrs["qvalue"])) for name, tensors in named.items()}


def written_tensors(update) -> list[Tensor]:
    """Every tensor a call of the step may write: the networks' parameters and buffers, the target critics, the
    optimizers' state and the update's own counters."""
    tensors = [t for td in update.param_tds.values() for t in td.values(True, True)] + update.target_params
    for group, params in update.params.items():
        tensors += [t for p in params for t in update.optimizers[group].state[p].values()]
    return tensors + [getattr(update, name) for name in STATE_TENSORS]


def _dotted(key) -> str:
    return ".".join(key) if isinstance(key, tuple) else key


def _modules(loss):
    for name in ("value", "actor", "qvalue"):
        yield from getattr(loss, f"{name}_network").modules()
