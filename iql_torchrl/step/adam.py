"""Adam for the compiled step: ``torch.optim.Adam``'s update rule as foreach ops on one group.

The eager step uses torch's fused Adam kernel. Compiled, torch's capturable foreach Adam computes
each tensor's bias corrections (``β^step``, a square root, divisions) from its own step count,
and inductor inlines those scalar computations into every vectorised loop over the parameters
(two ``pow`` calls per 8 floats). Here a group's parameters share one step count (they always step
together), the group's two factors are computed once, and ``torch.stack`` puts them in a buffer of
their own, so the loops read them instead of recomputing them (measured: benchmarks/README.md).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["adam_step"]


def adam_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: Tensor | float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
) -> None:
    """One Adam (or AdamW) step of ``params`` in place, as ``torch.optim.Adam`` with ``amsgrad=False``.

    ``steps`` are the parameters' step counts (0-d float tensors, all equal), incremented here.
    ``weight_decay`` is L2 added to the gradient, or decoupled (``param *= 1 - lr·weight_decay``).
    """
    beta1, beta2 = betas
    torch._foreach_add_(steps, 1)
    step = steps[0]
    if weight_decay != 0:
        if decoupled_weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    # the bias corrections: θ ← θ − lr/(1−β1^t) · m / (√v / √(1−β2^t) + ε)
    factors = torch.stack([(1 - beta2**step).sqrt(), lr / (1 - beta1**step)])
    denominators = torch._foreach_div(torch._foreach_sqrt(exp_avg_sqs), factors[0])
    torch._foreach_add_(denominators, eps)
    updates = torch._foreach_div(exp_avgs, denominators)
    torch._foreach_mul_(updates, -factors[1])
    torch._foreach_add_(params, updates)
