"""The step's optimizers: ``torch.optim.Adam`` objects (torch's checkpoints, LR schedulers) stepped through
torch's own Adam inside the step: eager, the fused kernel; compiled, the functional foreach, capturable form.

Stacked seeds in bf16 on the CPU (:func:`fused_in_graph`) call the fused kernel from the graph, through an
operator of the package's namespace (torch has no fake kernel for ``_fused_adam_`` with a tensor learning rate):
there inductor's foreach loops, which recompute the bias corrections per vectorised loop, cost more than the
kernel (benchmarks/README.md, "Many settings in one run").
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adam import adam

__all__ = ["BETAS", "EPS", "make_adam", "adam_step", "fused_in_graph", "load_in_place"]

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, as in the paper's code

FUSED_MIN_SEEDS = 3  # stacked seeds from which a compiled bf16 step on the CPU calls the fused kernel

# torch's fused CPU Adam as an operator a compiled graph holds as one call (its kernel: _fused_adam below)
_OPS = torch.library.Library("iql_torchrl", "FRAGMENT")
_OPS.define("fused_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
            "Tensor(d!)[] steps, Tensor lr, float beta1, float beta2, float eps, float weight_decay, "
            "bool decoupled_weight_decay) -> ()")


def _fused_adam(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
                decoupled_weight_decay) -> None:
    """torch's functional ``adam`` with ``fused=True``: the eager step's Adam, and the operator's kernel."""
    adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
         weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay, amsgrad=False, maximize=False,
         fused=True)


_OPS.impl("fused_adam_", _fused_adam, "CPU")
torch.library.register_fake("iql_torchrl::fused_adam_", lambda *args: None, lib=_OPS)


def _laid_out_like(grads: list[Tensor], params: list[Tensor]) -> list[Tensor]:
    """``grads`` with their parameters' strides: the fused kernel walks a parameter, its gradient and its state in
    memory order, so a gradient laid out otherwise (a transposed view from autograd, a contiguous one for a
    transposed or channels-last parameter) would step the wrong elements."""
    return [g if g.stride() == p.stride() else torch.empty_like(p).copy_(g) for g, p in zip(grads, params)]


def fused_in_graph(device_type: str, precision: str, seeds: int) -> bool:
    """Whether a compiled step calls the fused kernel rather than tracing the foreach form (measured faster)."""
    return device_type == "cpu" and precision == "bf16" and seeds >= FUSED_MIN_SEEDS


def make_adam(params: list[Tensor], lr: float, name: str, weight_decay: float, device) -> torch.optim.Adam:
    """A ``torch.optim.Adam`` (``name`` ``"adamw"``: decoupled weight decay) with a tensor learning rate, which the
    step changes without recompiling, and its state built now, not lazily inside a compiled step."""
    optimizer = torch.optim.Adam(params, lr=torch.tensor(lr, device=device), betas=BETAS, eps=EPS,
                                 weight_decay=weight_decay, decoupled_weight_decay=name == "adamw")
    for p in params:
        optimizer.state[p] = {
            "step": torch.zeros((), dtype=torch.float32, device=device),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
    return optimizer


def adam_step(optimizer: torch.optim.Adam, params: list[Tensor], grads: list[Tensor], fused: bool = False) -> None:
    """One Adam step of ``params`` with the settings and state ``optimizer`` holds (see the module docstring)."""
    group = optimizer.param_groups[0]
    states = [optimizer.state[p] for p in params]
    exp_avgs, exp_avg_sqs, steps = ([s[key] for s in states] for key in ("exp_avg", "exp_avg_sq", "step"))
    beta1, beta2 = group["betas"]
    settings = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    decoupled_weight_decay=group["decoupled_weight_decay"])
    if not torch.compiler.is_compiling():
        _fused_adam(params, _laid_out_like(grads, params), exp_avgs, exp_avg_sqs, steps, **settings)
    elif fused:
        torch.ops.iql_torchrl.fused_adam_(params, _laid_out_like(grads, params), exp_avgs, exp_avg_sqs, steps,
                                          **settings)
    else:
        adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, **settings, amsgrad=False, maximize=False,
             foreach=True, capturable=True)


def load_in_place(optimizer: torch.optim.Adam, params: list[Tensor], state: dict) -> None:
    """``optimizer.load_state_dict(state)`` into the tensors it holds (learning rates and state), which a compiled
    step and a CUDA graph keep reading."""
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
