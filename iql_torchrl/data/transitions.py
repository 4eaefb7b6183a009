"""Your own transitions (a TensorDict in TorchRL's layout) as an offline buffer, with the same
checks and transforms as Minari data."""

from __future__ import annotations

import math
from typing import Sequence

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import ReplayBuffer

from iql_torchrl.data.buffer import CHUNK_SIZE, BufferOptions, DataSource, action_space_fields, build_buffer
from iql_torchrl.data.checks import DatasetError, check_finite

__all__ = ["TRANSITION_KEYS", "make_offline_buffer", "standardise_transitions"]

TRANSITION_KEYS = (
    "observation",
    "action",
    ("next", "observation"),
    ("next", "reward"),
    ("next", "done"),
    ("next", "terminated"),
    ("next", "truncated"),
)


def standardise_transitions(transitions: TensorDictBase, discrete: bool) -> TensorDict:
    """TorchRL's layout: float32 floats, ``[N, 1]`` rewards/flags, an ``episode`` index.

    Box actions become float32 ``[N, act_dim]``; discrete ones int64 ``[N]`` (from ``[N]`` or
    ``[N, 1]`` integer indices).
    """
    num = transitions.batch_size[0]
    out = TensorDict(batch_size=[num])
    for key in ("observation", ("next", "observation")):
        out.set(key, transitions.get(key).to(torch.float32).reshape(num, -1))
    action = transitions.get("action")
    if discrete:
        if action.is_floating_point() or action.dtype == torch.bool or action.numel() != num:
            raise DatasetError(
                f"'action' has dtype {action.dtype} and shape {list(action.shape)}, but the action space is "
                f"discrete: pass integer action indices of shape [{num}] (or [{num}, 1]); for one-hot actions "
                "pass their argmax (the buffer one-hot encodes them again with one_hot_actions=True)."
            )
        out.set("action", action.to(torch.int64).reshape(num))
    else:
        out.set("action", action.to(torch.float32).reshape(num, -1))
    out.set(("next", "reward"), transitions.get(("next", "reward")).to(torch.float32).reshape(num, 1))
    for flag in ("done", "terminated", "truncated"):
        out.set(("next", flag), transitions.get(("next", flag)).to(torch.bool).reshape(num, 1))
    if "episode" in transitions.keys():
        episode = transitions.get("episode").to(torch.int64).reshape(num)
    else:  # a new episode starts after every done
        done = out.get(("next", "done")).reshape(num).to(torch.int64)
        episode = torch.cumsum(done, 0) - done
    out.set("episode", episode)
    return out


def _action_fields(transitions, env_id, action_low, action_high, num_actions) -> dict:
    """The action space from ``num_actions``, the bounds, or ``env_id`` (in that order)."""
    if num_actions is not None:
        if action_low is not None or action_high is not None:
            raise ValueError("Pass either num_actions (discrete actions) or action_low/action_high (Box), not both.")
        if int(num_actions) < 1:
            raise ValueError(f"num_actions must be >= 1, got {num_actions}.")
        fields = dict(action_space="discrete", action_low=[], action_high=[], num_actions=int(num_actions))
        if env_id is not None:
            env_fields = _env_action_fields(env_id)
            if env_fields != fields:
                raise DatasetError(
                    f"num_actions={num_actions} but environment {env_id!r} has the action space "
                    f"{env_fields['action_space']} with {env_fields['num_actions']} actions."
                )
        return fields
    if action_low is None and action_high is None and env_id is not None:
        return _env_action_fields(env_id)
    action = transitions.get("action")
    if not action.is_floating_point():
        raise DatasetError(
            f"'action' holds {action.dtype} values but nothing says the actions are discrete: pass "
            "num_actions=n (or the env_id of an environment with a Discrete action space)."
        )
    action_dim = int(np.prod(action.shape[1:])) if action.ndim > 1 else 1
    if action_low is None or action_high is None:
        action_low, action_high = -math.inf, math.inf
    low = np.broadcast_to(np.asarray(action_low, dtype=np.float64), np.shape(action_low) or (action_dim,))
    high = np.broadcast_to(np.asarray(action_high, dtype=np.float64), np.shape(action_high) or (action_dim,))
    return dict(action_space="box", action_low=low.reshape(-1).tolist(), action_high=high.reshape(-1).tolist(), num_actions=None)


def _env_action_fields(env_id: str) -> dict:
    env = gym.make(env_id)
    try:
        return action_space_fields(env.action_space, f"Environment {env_id!r}")
    finally:
        env.close()


def make_offline_buffer(
    transitions: TensorDictBase,
    options: BufferOptions | None = None,
    *,
    env_id: str | None = None,
    action_low: Sequence[float] | float | None = None,
    action_high: Sequence[float] | float | None = None,
    num_actions: int | None = None,
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
    dataset_id: str | None = None,
    **option_overrides,
) -> ReplayBuffer:
    """Turn a TensorDict of transitions into an offline buffer, with the Minari path's checks and transforms.

    ``transitions`` has batch size ``[N]`` and the keys of :data:`TRANSITION_KEYS` in raw
    env units (``observation`` already flat). An ``episode`` entry (int) is optional; without
    it episodes are delimited by ``("next", "done")``.

    The action space: ``num_actions=n`` for discrete actions (integer indices ``[N]`` or
    ``[N, 1]``); else Box bounds from ``action_low``/``action_high``; else ``env_id``'s action
    space (Box or Discrete); else the Box actions are treated as unbounded (not scaled, not
    clipped). ``options`` and the keyword arguments named after :class:`~iql_torchrl.data.BufferOptions`
    fields are as in :func:`~iql_torchrl.data.load_minari_dataset`.
    """
    options = BufferOptions.merge(options, **option_overrides)
    if not isinstance(transitions, TensorDictBase):
        raise TypeError(f"transitions must be a TensorDict, got {type(transitions).__name__}.")
    if transitions.batch_dims != 1:
        raise DatasetError(f"transitions must have a 1-D batch size [N], got {list(transitions.batch_size)}.")
    if transitions.batch_size[0] == 0:
        raise DatasetError("The transitions are empty: there is nothing to learn from.")
    keys = set(transitions.keys(include_nested=True, leaves_only=True))
    missing = [key for key in TRANSITION_KEYS if key not in keys]
    if missing:
        raise DatasetError(f"transitions lack the entries {missing}; expected {list(TRANSITION_KEYS)}.")
    action_fields = _action_fields(transitions, env_id, action_low, action_high, num_actions)
    transitions = standardise_transitions(transitions, discrete=action_fields["action_space"] == "discrete")
    if action_fields["action_space"] == "box" and transitions["action"].shape[-1] != len(action_fields["action_low"]):
        source = f"environment {env_id!r}" if env_id is not None else "action_low/action_high"
        raise DatasetError(
            f"'action' has dimension {transitions['action'].shape[-1]} but {source} has "
            f"{len(action_fields['action_low'])}-dimensional actions. The transitions do not belong to this environment."
        )
    check_finite(transitions, episode_label=None)
    source = DataSource(
        dataset_id=dataset_id,
        env_id=env_id,
        env_spec_json=gym.spec(env_id).to_json() if env_id is not None else None,
        ref_min_score=None if ref_min_score is None else float(ref_min_score),
        ref_max_score=None if ref_max_score is None else float(ref_max_score),
        observation_keys=None,
        observation_key_shapes=[[transitions["observation"].shape[-1]]],
        **action_fields,
    )
    num_transitions = transitions.batch_size[0]
    chunks = (transitions[start : start + CHUNK_SIZE] for start in range(0, num_transitions, CHUNK_SIZE))
    return build_buffer(chunks, num_transitions=num_transitions, source=source, options=options)
