"""IQLLoss's input checks: keys, dtypes and shapes, each failure a named error before any network runs;
and the one test of its outputs, :func:`nonfinite` (device-side, read when logging).

Shapes, dtypes and keys only (free on the hot path: no host sync). Value checks -- an index in
range, a row that is truly one-hot -- belong where data enters the buffer (:mod:`iql_torchrl.data.checks`).
"""
from __future__ import annotations

import math

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey
from torch import Tensor, nn

__all__ = [
    "is_finite_number",
    "NETWORKS",
    "check_input",
    "named_dtype_error",
    "check_action_size",
    "check_action_batch",
    "batch_shaped",
    "floating_dtype",
    "spec_last_dim",
    "flat_key",
    "nonfinite",
]

# the loss's trained networks, ``<name>_network`` and ``<name>_network_params``, in the paper's update order
NETWORKS = ("value", "actor", "qvalue")


def check_input(loss, tensordict: TensorDictBase, dtypes: dict, direct: frozenset = frozenset()) -> str | None:
    """The keys the loss reads and its networks' inputs: present, and floating inputs in ``dtypes[network]``.

    A missing key fails here, named, with the call that fixes it; so does a floating input of another
    dtype than a ``direct`` network's parameters (one the loss evaluates from its parameters, which
    would fail on it). A network called as a module may cast its inputs itself: for it a dtype
    difference is returned as the message to raise if the call then fails (:func:`named_dtype_error`).
    """
    doubt = None
    keys = loss.tensor_keys
    for key, name in ((keys.action, "action"), (("next", keys.reward), "reward"),
                      (("next", keys.terminated), "terminated")):
        if tensordict.get(key, None) is None:
            raise KeyError(
                f"IQLLoss: the input has no {key!r}. If your data stores it under another key, "
                f"call loss.set_keys({name}=<your key>)"
                + (" (the loss reads it under 'next')." if name != "action" else ".")
            )
    for key in loss._loss_mask_keys():
        mask = tensordict.get(key, None)
        if mask is not None and mask.dtype != torch.bool:
            raise TypeError(
                f"IQLLoss: the validity mask {key!r} is {mask.dtype}, but a mask is bool (True: the position "
                "counts in the losses). Cast it to bool, name another entry with loss.loss_mask_key = <key>, "
                "or set loss.loss_mask_key = None to train on every position."
            )
    for network, key, name in ((loss.value_network, keys.value, "value"),
                               (loss.qvalue_network, keys.state_action_value, "state_action_value")):
        if key not in network.out_keys:
            raise KeyError(
                f"IQLLoss reads {key!r} but the {_network_name(loss, network)} writes "
                f"out_keys={network.out_keys}: call loss.set_keys({name}=<its output key>)."
            )
    for network, name, under_next in ((loss.actor_network, "actor", False), (loss.qvalue_network, "qvalue", False),
                                      (loss.value_network, "value", False), (loss.value_network, "value", True)):
        dtype = dtypes[name]
        for key in network.in_keys:
            full_key = flat_key(("next", key)) if under_next else key
            value = tensordict.get(full_key, None)
            if value is None:
                raise KeyError(
                    f"IQLLoss: the input has no {full_key!r}, which the {_network_name(loss, network)} reads "
                    f"(in_keys={network.in_keys}). Rename the key in your data or build the network with "
                    "matching in_keys."
                )
            if dtype is not None and value.is_floating_point() and value.dtype != dtype:
                message = (
                    f"IQLLoss: {full_key!r} is {value.dtype} but the {_network_name(loss, network)}'s "
                    f"parameters are {dtype}: cast the data (or the loss, e.g. loss.to({value.dtype})) "
                    "so that both match."
                )
                if name in direct:
                    raise TypeError(message)
                doubt = doubt or message
    return doubt


def named_dtype_error(doubt: str | None, body, *args):
    """``body(*args)``; where ``doubt`` (from :func:`check_input`) names an input of another dtype than
    its network, a dtype error the call raises is raised again as a ``TypeError`` with that message."""
    if doubt is None:
        return body(*args)
    try:
        return body(*args)
    except RuntimeError as error:
        if "dtype" not in str(error) and "scalar type" not in str(error):
            raise
        raise TypeError(f"{doubt} ({error})") from error


def check_action_size(tensordict: TensorDictBase, action_key: NestedKey, expected: int | None,
                      critic_in_features: int | None, critic_in_keys) -> None:
    """A continuous action's last dim is what the actor's spec declares (``expected``) or, without one,
    what the critic's input layer takes (``critic_in_features`` less its other inputs)."""
    action = tensordict.get(action_key)
    source = "the actor's spec"
    if expected is None and isinstance(critic_in_features, int):
        other = [k for k in critic_in_keys if k != action_key]
        expected = critic_in_features - sum(tensordict.get(k).shape[-1] for k in other)
        source = f"the critic's input layer ({critic_in_features} features, less {other})"
    if expected is not None and (action.ndim == 0 or action.shape[-1] != expected):
        raise ValueError(
            f"IQLLoss: {action_key!r} has shape {tuple(action.shape)} but {source} "
            f"expects action_dim = {expected}: expected [*batch, {expected}]."
        )


def check_action_batch(action: Tensor, action_key: NestedKey, batch_shape: torch.Size) -> None:
    """A continuous action is [*batch, action_dim] for V(s)'s batch (no silent broadcasting)."""
    if action.shape[:-1] != batch_shape:
        raise ValueError(
            f"{action_key!r} has shape {tuple(action.shape)} but the observations give "
            f"a batch of {tuple(batch_shape)}: expected [*batch, action_dim]."
        )


def batch_shaped(td: TensorDictBase, key: NestedKey, batch_shape: torch.Size, prefix: str | None = "next") -> Tensor:
    """``td[key]`` as shape [*B], accepting TorchRL's [*B, 1]; anything else is a named error (the key
    named under ``prefix``, the sub-TensorDict ``td`` is)."""
    value = td.get(key)
    if value.shape == (*batch_shape, 1):
        return value.squeeze(-1)
    if value.shape == batch_shape:
        return value
    name = repr(key) if prefix is None else f"({prefix!r}, {key!r})"
    raise ValueError(
        f"{name} has shape {tuple(value.shape)} but the observations give a batch of "
        f"{tuple(batch_shape)}: expected [*batch, 1] (or [*batch])."
    )


def floating_dtype(params: TensorDictBase):
    """The dtype of the first floating tensor in ``params`` (``None`` when there is none)."""
    for value in params.values(True, True):
        if value.is_floating_point():
            return value.dtype
    return None


def spec_last_dim(actor: nn.Module):
    """The action size the actor's spec declares (``None`` when it declares none)."""
    spec = getattr(actor, "spec", None)
    if spec is None:
        return None
    if hasattr(spec, "keys"):  # a Composite: the action entry, if any
        keys = list(spec.keys(True, True))
        spec = spec.get(keys[0]) if len(keys) == 1 else spec.get("action", None)
    if spec is None or len(spec.shape) == 0:
        return None
    return int(spec.shape[-1])


def flat_key(key) -> tuple:
    """Flattens ('next', ('a', 'b')) to ('next', 'a', 'b')."""
    out = []
    for part in key if isinstance(key, tuple) else (key,):
        out.extend(flat_key(part) if isinstance(part, tuple) else (part,))
    return tuple(out)


def nonfinite(losses) -> Tensor:
    """Which of ``losses`` hold a NaN or an infinity: a bool tensor, one entry a loss (no host sync)."""
    return torch.stack([~torch.isfinite(loss.detach()).all() for loss in losses])


def _network_name(loss, network: nn.Module) -> str:
    for name in NETWORKS:
        if loss.__dict__.get(f"{name}_network") is network:
            return f"{name} network"
    return "network"


def is_finite_number(value) -> bool:
    """A finite int or float (not a bool): what a numeric setting must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
