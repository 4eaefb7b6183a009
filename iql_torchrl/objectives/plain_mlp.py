"""Plain MLPs evaluated straight from their parameters: the critic ensemble as batched matmuls.

IQLLoss evaluates its networks through their TensorDictModules, swapping the loss's parameters
in (``TensorDict.to_module``) and, for the critic ensemble, vmapping over the stacked critics.
That is what lets any TorchRL module serve as actor, critic or value network, and it costs Python
work on every call. For the common case, a network that is only ``Linear`` layers and elementwise
activations in an ``nn.Sequential`` (our ``mlp``, TorchRL's ``MLP``), :class:`PlainMLP` computes
the same function from the parameter TensorDict directly:

* one network (parameters without a leading dim): ``F.linear`` per layer;
* a stacked ensemble (parameters ``[K, ...]``, e.g. the twin critics): one batched matmul per
  layer, the K networks at once on the shared input (what ``vmap`` makes of the modules, without
  its per-call work): ``baddbmm`` eager, ``bmm`` + bias compiled (see :meth:`PlainMLP.__call__`). Activations are kept feature-major, ``[K, features, N]``
  (``h ← W·h + b``), so each weight's gradient comes out laid out like the weight, which the
  optimizer's elementwise update then reads contiguously.

Anything else (LayerNorm, dropout, custom modules) is not recognised and keeps the general path,
as does a network with hooks registered on it (:meth:`PlainMLP.hooked`, checked at every call).
The result is the module's own output, to float rounding.
"""
from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule
from torch import Tensor, nn
from torchrl.modules import MLP, ValueOperator

from iql_torchrl.objectives.networks import ConcatInputs

__all__ = ["PlainMLP", "ELEMENTWISE_ACTIVATIONS"]

# parameter-free modules that act on each element alone, so they apply to a stacked [K, N, H] tensor as is
ELEMENTWISE_ACTIVATIONS = (
    nn.ReLU, nn.Tanh, nn.ELU, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Softplus, nn.Mish, nn.Identity,
)


class PlainMLP:
    """Evaluates a TensorDictModule wrapping a plain MLP from a parameter TensorDict.

    Build it with :meth:`from_module`, which returns ``None`` for any network it does not
    recognise. ``plain(params, tensordict)`` reads the module's ``in_keys`` (concatenated along
    the last dim, as TorchRL's ``MLP`` and our critics do) and returns its single output:
    ``[*B, out]`` for unstacked parameters, ``[K, *B, out]`` for parameters stacked ``[K, ...]``.
    """

    def __init__(self, network: TensorDictModule, layers: list[tuple[tuple[str, ...], nn.Module | None]]):
        self.in_keys = list(network.in_keys)
        self.out_keys = list(network.out_keys)
        self.layers = layers  # (parameter key prefix, None) for a Linear, ((), activation) for an activation
        self._modules = list(network.modules())

    def hooked(self) -> bool:
        """Whether a hook is registered on the network (then only the module's own call runs it)."""
        for module in self._modules:
            if _has_hooks(module):
                return True
        return False

    @classmethod
    def from_module(cls, network: nn.Module) -> PlainMLP | None:
        if type(network) not in (TensorDictModule, ValueOperator) or len(network.out_keys) != 1:
            return None
        if getattr(network, "method", None) is not None:  # calls a method other than forward
            return None
        module, prefix = network.module, ("module",)
        if not isinstance(module, MLP) and len(network.in_keys) > 1:
            # our critics wrap the Sequential in a module that concatenates its inputs
            inner = getattr(module, "net", None)
            if type(module) is not ConcatInputs or not isinstance(inner, nn.Sequential):
                return None
            module, prefix = inner, ("module", "net")
        if type(module) not in (nn.Sequential, MLP) or (isinstance(module, MLP) and not isinstance(module.out_features, int)):
            return None
        layers = []
        for name, layer in module.named_children():
            if type(layer) is nn.Linear:
                if layer.bias is None:
                    return None
                layers.append(((*prefix, name), None))
            elif type(layer) in ELEMENTWISE_ACTIVATIONS:
                layers.append(((), layer))
            else:
                return None
        if not layers or layers[0][1] is not None:
            return None
        return cls(network, layers)

    def __call__(self, params: TensorDictBase, tensordict: TensorDictBase) -> Tensor:
        inputs = [tensordict.get(key) for key in self.in_keys]
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, -1)
        batch_shape = x.shape[:-1]
        h = x.reshape(-1, x.shape[-1])
        stacked = None  # K, for parameters stacked [K, ...]
        # eager, the bias joins the GEMM (baddbmm) and a ReLU overwrites the GEMM's fresh output: one
        # op and one [K, H, N] buffer less a layer. Compiled, inductor fuses a plain bmm's bias add
        # with the activation into one kernel, which is faster than baddbmm there.
        eager = not torch.compiler.is_compiling()
        fresh = False  # h is a GEMM output nothing else holds (its backward needs its inputs only)
        for prefix, activation in self.layers:
            if activation is not None:
                h = torch.relu_(h) if fresh and type(activation) is nn.ReLU else activation(h)
                fresh = False
                continue
            weight, bias = params.get((*prefix, "weight")), params.get((*prefix, "bias"))
            fresh = eager
            if weight.ndim == 2:  # one network
                h = nn.functional.linear(h, weight, bias)
                continue
            if stacked is None:  # the input is shared by the K networks
                stacked = weight.shape[0]
                h = h.T.expand(stacked, *h.T.shape)
            if eager:
                h = torch.baddbmm(bias.unsqueeze(2), weight, h)
            else:  # the bias in the product's dtype, as baddbmm and Linear have it under autocast
                h = torch.bmm(weight, h)
                h = h + bias.unsqueeze(2).to(h.dtype)
        if stacked is None:
            return h.reshape(*batch_shape, h.shape[-1])
        return h.transpose(1, 2).reshape(stacked, *batch_shape, h.shape[1])


def _has_hooks(module: nn.Module) -> bool:
    # plain attribute reads and ``or``: a compiled step traces them in a few steps (``any`` over a generator: many)
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)
