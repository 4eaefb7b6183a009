"""The update step's number format, layer by layer: bfloat16 GEMMs for the wide layers, float32 for the rest.

Under ``precision="bf16"`` the step computes the matrix products of its wide layers -- a ``Linear``, or the
plain-MLP path's batched product, whose weight has both dimensions at least ``min_features`` (64): the 2×256
MLPs' 256×256 hidden layers, most of the step's FLOPs -- from bfloat16 copies of the weight and the input,
accumulated in float32 by the GEMM and handed on as float32. Everything else stays float32: the thin input
and output layers (where bf16 GEMMs are slower than float32 ones on every CPU measured), the parameters, the
gradients Adam reads, its state, the targets, the losses, the expectile and the AWR weights. A bf16 product
keeps 8 significant bits, so a wide layer's output carries a relative rounding of about 2⁻⁸ ≈ 0.4% per
element (averaging out over its 256-term sums to far less in the losses).

:class:`BF16Layers` does it for any network the loss evaluates -- the user's own modules too -- as a torch
function mode around the loss, which the compiler traces like any other code. Whether bf16 pays on this host
(``precision="auto"``) is :mod:`iql_torchrl.precision_choice`'s question.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from iql_torchrl.precision_choice import MIN_FEATURES

__all__ = ["BF16Layers"]


class BF16Layers(TorchFunctionMode):
    """Inside it, the float32 matrix products of layers whose weight is at least ``min_features`` in both
    dimensions run in bfloat16 with float32 accumulation, their outputs (and gradients) float32.

    Covers ``F.linear`` (every ``nn.Linear``), ``torch.bmm(weight, h)`` and ``torch.baddbmm(bias, weight, h)``
    (the plain-MLP path's stacked critics), reading the weight's ``[..., out, in]`` dims; any other call
    runs as it is.
    """

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


def _in_bf16(product, a: Tensor, b: Tensor) -> Tensor:
    """``product(a, b)`` from bfloat16 copies (the GEMM accumulates in float32), handed on as float32."""
    return product(a.to(torch.bfloat16), b.to(torch.bfloat16)).to(torch.float32)
