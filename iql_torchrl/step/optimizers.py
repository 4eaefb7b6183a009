"""The step's optimizers: ``torch.optim.Adam`` objects holding the state and settings, stepped through torch's
functional ``adam`` so that the whole update stays one function (and, compiled, one graph).

The objects keep checkpoints in torch's format and let torch's LR schedulers change a learning rate; the
functional call is torch's own Adam, in its fused form eager and its foreach, capturable form compiled.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adam import adam

__all__ = ["BETAS", "EPS", "make_adam", "adam_step", "load_in_place"]

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, as in the paper's code


def make_adam(params: list[Tensor], lr: float, name: str, weight_decay: float, device) -> torch.optim.Adam:
    """A ``torch.optim.Adam`` holding ``params``' state, with a tensor learning rate and its state built now.

    A tensor learning rate lets the step change it (the actor's cosine) without recompiling; the state exists
    before the first step, so a compiled step never sees a lazy initialisation. ``name`` ``"adamw"``: decoupled
    weight decay.
    """
    optimizer = torch.optim.Adam(params, lr=torch.tensor(lr, device=device), betas=BETAS, eps=EPS,
                                 weight_decay=weight_decay, decoupled_weight_decay=name == "adamw")
    for p in params:
        optimizer.state[p] = {
            "step": torch.zeros((), dtype=torch.float32, device=device),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
    return optimizer


def adam_step(optimizer: torch.optim.Adam, params: list[Tensor], grads: list[Tensor]) -> None:
    """One Adam step of ``params`` with the settings and state ``optimizer`` holds: eager, torch's fused kernel;
    compiled, its capturable foreach form, traced into the graph (step count and learning rate stay tensors: no
    sync, no recompile)."""
    settings = optimizer.param_groups[0]
    states = [optimizer.state[p] for p in params]
    beta1, beta2 = settings["betas"]
    adam(
        params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
        [s["step"] for s in states], lr=settings["lr"], beta1=beta1, beta2=beta2, eps=settings["eps"],
        weight_decay=settings["weight_decay"], decoupled_weight_decay=settings["decoupled_weight_decay"],
        amsgrad=False, maximize=False,
        **(dict(foreach=True, capturable=True) if torch.compiler.is_compiling() else dict(fused=True)),
    )


def load_in_place(optimizer: torch.optim.Adam, params: list[Tensor], state: dict) -> None:
    """``optimizer.load_state_dict(state)`` into the tensors it holds (learning rates and state): a compiled step
    and a captured CUDA graph keep reading them. A 0-d ``step`` saved on another device (older checkpoints) is
    copied across."""
    learning_rates = [group["lr"] for group in optimizer.param_groups]
    held = {p: dict(optimizer.state[p]) for p in params}
    optimizer.load_state_dict(state)
    for group, lr in zip(optimizer.param_groups, learning_rates):
        lr.copy_(group["lr"])
        group["lr"] = lr
    for param, tensors in held.items():
        loaded = optimizer.state[param]
        for key, tensor in tensors.items():
            loaded[key] = tensor.copy_(loaded[key])
