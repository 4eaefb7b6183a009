"""How the update step's layers multiply: bfloat16 GEMMs for the wide layers, float32 for the rest; the bias apart.

Under ``precision="bf16"`` the matrix products of layers whose weight is at least ``min_features`` (64) in both
dimensions (the 2×256 MLPs' hidden layers, most of the step's FLOPs) take bfloat16 copies of weight and input,
accumulate in float32 and hand on float32 (about 0.4% rounding per element). Everything else stays float32: the
thin layers (where bf16 is slower on every CPU measured), parameters, gradients, Adam, targets and losses.
:class:`BF16Layers` does it for any network the loss evaluates, the user's own too, as a torch function mode the
compiler traces; whether bf16 pays here is :mod:`iql_torchrl.precision_choice`'s question.

A compiled step on the CPU also adds ``nn.Linear``'s bias after the product (:class:`BiasApart`): inductor keeps
``addmm`` there, whose kernel first copies the bias into every row of its output; apart, the bias fuses into the
next pointwise kernel (the ReLU), as inductor arranges by itself on a GPU (benchmarks/README.md has the gain).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from iql_torchrl.precision_choice import MIN_FEATURES

__all__ = ["BF16Layers", "BiasApart"]


class BF16Layers(TorchFunctionMode):
    """Inside it, the float32 products of layers at least ``min_features`` wide run in bfloat16 with float32
    accumulation: ``F.linear`` (every ``nn.Linear``), ``torch.bmm(weight, h)`` and ``torch.baddbmm(bias, weight,
    h)`` (the plain-MLP path's stacked critics); any other call runs as it is."""

    def __init__(self, min_features: int = MIN_FEATURES):
        super().__init__()
        self.min_features = min_features

    def _wide(self, weight: Tensor, other: Tensor) -> bool:
        return (weight.dtype == other.dtype == torch.float32 and weight.ndim >= 2
                and min(weight.shape[-2:]) >= self.min_features)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is nn.functional.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if self._wide(weight, x):
                out = _in_bf16(nn.functional.linear, x, weight)
                return out if bias is None else out + bias
        elif func is torch.bmm and not kwargs:
            weight, h = args
            if self._wide(weight, h):
                return _in_bf16(torch.bmm, weight, h)
        elif func is torch.baddbmm and len(args) == 3 and not kwargs:  # beta = alpha = 1
            bias, weight, h = args
            if self._wide(weight, h):
                return bias + _in_bf16(torch.bmm, weight, h)
        return func(*args, **kwargs)


class BiasApart(TorchFunctionMode):
    """Inside it, ``F.linear(x, weight, bias)`` is ``F.linear(x, weight) - (-bias)``: the same sum, written so that
    inductor's pass folding ``mm + bias`` into ``addmm`` leaves it apart; any other call runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is nn.functional.linear:
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if bias is not None:
                return nn.functional.linear(args[0], args[1]) - (-bias)
        return func(*args, **kwargs)


def _in_bf16(product, a: Tensor, b: Tensor) -> Tensor:
    """``product(a, b)`` from bfloat16 copies (the GEMM accumulates in float32), handed on as float32."""
    return product(a.to(torch.bfloat16), b.to(torch.bfloat16)).to(torch.float32)
