"""What evaluation, checkpoints and exported policies need to know about an offline buffer.

:class:`OfflineDataMetadata` records the dataset's environment, its reference scores, how
observations are flattened and normalised, the action space and how stored actions map to the
environment's, and the reward transform. It is plain data: :meth:`~OfflineDataMetadata.state_dict`
is JSON, :meth:`~OfflineDataMetadata.from_state_dict` restores it (also from checkpoints written
before the discrete fields existed).

The action space, for a reader of a checkpoint's metadata:

* ``action_space == "box"``: stored actions are float32 ``[N, action_dim]``; when
  ``actions_scaled`` they live in ``[-1, 1]`` and :meth:`~OfflineDataMetadata.action_to_env`
  maps them to ``[action_low, action_high]``; they were clipped to
  :meth:`~OfflineDataMetadata.stored_action_box`.
* ``action_space == "discrete"``: the environment takes an integer in ``[0, num_actions)``;
  ``action_dim == num_actions`` (the width of a categorical actor's logits and of a discrete
  critic's output). Stored actions are int64 indices ``[N]``, or float32 one-hot ``[N, num_actions]``
  when ``one_hot_actions``; :meth:`~OfflineDataMetadata.action_to_env` turns either into the index.
  ``action_low``/``action_high`` are empty, ``actions_scaled`` is false, ``action_clip_eps`` is 0.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict
from torchrl.data import Bounded, Categorical, OneHot, Unbounded
from torchrl.envs.transforms import ObservationNorm

from iql_torchrl.data.checks import DatasetError
from iql_torchrl.datasets.environments import make_env

__all__ = [
    "ACTION_CLIP_EPS",
    "ACTION_SPACES",
    "OBSERVATION_STD_EPS",
    "OfflineDataMetadata",
    "check_observation_layout",
    "flatten_observation",
]

ACTION_CLIP_EPS = 1e-5
OBSERVATION_STD_EPS = 1e-3
ACTION_SPACES = ("box", "discrete")


def flatten_observation(observation, keys: list[str] | None, key_shapes: list[list[int]]):
    """One flat observation from an env observation (array, tensor, dict or TensorDict).

    Dict entries are taken in ``keys`` order (nested keys joined by ``"/"``) and concatenated;
    leading batch dimensions (time, vectorised environments) are kept. Tensors stay tensors
    (float32, same device); anything else becomes a float32 numpy array.
    """
    parts = []
    for key, shape in zip(keys or [None], key_shapes):
        value = _entry(observation, key)
        if isinstance(value, torch.Tensor):
            value = value.to(torch.float32)
        else:
            value = np.asarray(value, dtype=np.float32)
        batch_shape = value.shape[: value.ndim - len(shape)]
        parts.append(value.reshape(*batch_shape, -1))
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts, dim=-1)
    return np.concatenate(parts, axis=-1)


def _entry(observation, key: str | None):
    """The entry ``key`` (nested keys joined by "/") of a dict observation; the observation itself for ``None``."""
    value = observation
    for part in key.split("/") if key is not None else ():
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            present = sorted(value.keys()) if hasattr(value, "keys") else type(value).__name__
            raise DatasetError(
                f"The observation has no entry {key!r} (it has {present}); the data was flattened from "
                f"the entries {key!r} and the others of its observation space, so every observation needs them."
            ) from None
    return value


def check_observation_layout(observation, keys: list[str] | None, key_shapes: list[list[int]], owner: str) -> None:
    """Refuse an observation (one, unbatched) that lacks an entry the flattening expects, or whose entry has
    another shape than the data's: the error names the key and both shapes."""
    for key, shape in zip(keys or [None], key_shapes):
        value = _entry(observation, key)
        actual = list(np.shape(value))
        if actual != list(shape):
            name = repr(key) if key is not None else "the observation"
            raise DatasetError(
                f"{owner}: {name} has shape {actual} but the data's has {list(shape)}; the policy's input would not "
                "line up with what it learnt from. Use the environment the data was collected in."
            )


@dataclass
class OfflineDataMetadata:
    """What evaluation and checkpoints need to know about an offline buffer.

    All fields are plain Python values, so :meth:`state_dict` is JSON-serialisable.

    Attributes:
        dataset_id: the Minari dataset id, or ``None`` for user transitions.
        env_id: gymnasium id of the evaluation environment (``None`` if unknown).
        env_spec_json: the evaluation environment's full ``EnvSpec`` as JSON, when known.
        ref_min_score / ref_max_score: reference returns (random / expert) for normalised scores.
        observation_dim: size of the flattened observation.
        observation_keys: for Dict observation spaces, the flattening order (nested keys
            joined by ``"/"``); ``None`` for Box observations.
        observation_key_shapes: the shape of each entry of ``observation_keys``; for Box
            observations, a one-element list with the Box's shape.
        action_dim: size of a Box action; for discrete actions, the number of actions.
        action_low / action_high: the environment's Box bounds (empty for discrete actions).
        actions_scaled: whether stored actions are mapped from the bounds to ``[-1, 1]``.
        action_clip_eps: stored actions are clipped to ``±(1 - action_clip_eps)`` of the
            (scaled) half-range; ``0.0`` means no clipping.
        reward_transform: ``"none"``, ``"locomotion"`` or ``"antmaze"``.
        reward_scale / reward_shift: stored reward = raw reward * scale + shift.
        observation_mean / observation_std: per-feature statistics of the raw flattened observations, the
            data's own (``std`` includes the ``+1e-3`` guard) unless others were given to normalise with
            (:func:`~iql_torchrl.data.buffer.normalize_stored_observations`).
        observations_normalized: whether stored observations are ``(raw - mean) / std``.
        num_transitions / num_episodes: dataset size.
        action_space: ``"box"`` (continuous) or ``"discrete"`` (gymnasium ``Discrete(n)``).
        num_actions: ``n`` for discrete actions, ``None`` for Box actions.
        one_hot_actions: discrete actions stored as float32 one-hot ``[N, n]`` rather than
            int64 indices ``[N]``.
        reward_goal: goal-reaching data whose ``desired_goal`` was left out of the observation: the
            evaluation's fixed goal the rewards were relabelled to (``None`` otherwise).
        success_terminal: the transitions that reach ``reward_goal`` are terminated (the goal absorbing,
            D4RL AntMaze's convention); online transitions follow the same rule.
    """

    dataset_id: str | None
    env_id: str | None
    env_spec_json: str | None
    ref_min_score: float | None
    ref_max_score: float | None
    observation_dim: int
    observation_keys: list[str] | None
    observation_key_shapes: list[list[int]]
    action_dim: int
    action_low: list[float]
    action_high: list[float]
    actions_scaled: bool
    action_clip_eps: float
    reward_transform: str
    reward_scale: float
    reward_shift: float
    observation_mean: list[float]
    observation_std: list[float]
    observations_normalized: bool
    num_transitions: int
    num_episodes: int
    # added with discrete actions: metadata saved before them has none of these (Box actions)
    action_space: str = "box"
    num_actions: int | None = None
    one_hot_actions: bool = False
    # added with goal-reaching data
    reward_goal: list[float] | None = None
    success_terminal: bool = False

    def __post_init__(self):
        if self.action_space not in ACTION_SPACES:
            raise ValueError(f"action_space must be one of {ACTION_SPACES}, got {self.action_space!r}.")

    # -- serialisation ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-serialisable) to save with checkpoints."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> OfflineDataMetadata:
        """Rebuild the metadata saved by :meth:`state_dict` (fields added later take their defaults)."""
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        unknown = set(state) - names
        missing = required - set(state)
        if unknown or missing:
            raise KeyError(
                f"Offline data metadata state_dict does not match {cls.__name__}: "
                f"unknown keys {sorted(unknown)}, missing keys {sorted(missing)}."
            )
        return cls(**state)

    # -- environment ----------------------------------------------------------------------

    def make_env(self, **kwargs) -> gym.Env:
        """Create the evaluation environment (``gym.make`` on the recorded spec or id)."""
        if self.env_spec_json is not None:
            return make_env(gym.envs.registration.EnvSpec.from_json(self.env_spec_json), **kwargs)
        if self.env_id is None:
            raise ValueError(
                "This dataset records no environment; create the evaluation environment yourself."
            )
        return make_env(self.env_id, **kwargs)

    def normalized_score(self, episode_return):
        """``100 * (return - ref_min_score) / (ref_max_score - ref_min_score)``.

        This is :func:`minari.get_normalized_score` times 100 (D4RL's convention: 0 is
        the random policy, 100 the expert).
        """
        if self.ref_min_score is None or self.ref_max_score is None:
            raise ValueError(
                f"Dataset {self.dataset_id!r} has no ref_min_score/ref_max_score; "
                "a normalised score cannot be computed."
            )
        return 100.0 * (episode_return - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)

    # -- actions --------------------------------------------------------------------------

    @property
    def discrete(self) -> bool:
        """Whether the environment's actions are ``Discrete(num_actions)`` indices."""
        return self.action_space == "discrete"

    @property
    def actor_kind(self) -> str:
        """The actor these actions need (:func:`~iql_torchrl.make_actor`'s ``kind``): ``"gaussian"`` for Box
        actions, ``"categorical"`` for discrete indices, ``"one_hot"`` for one-hot rows."""
        if not self.discrete:
            return "gaussian"
        return "one_hot" if self.one_hot_actions else "categorical"

    def action_to_env(self, action):
        """Map an action in the buffer's space to the environment's.

        Box: ``[-1, 1]`` to the env's bounds when scaled (unchanged otherwise). Discrete: the
        index itself, or the argmax of a one-hot action. Accepts a torch tensor (stays on its
        device) or a numpy array.
        """
        if self.discrete:
            return action.argmax(-1) if self.one_hot_actions else action
        if not self.actions_scaled:
            return action
        low, high = self._bounds_like(action)
        return low + (action + 1.0) * (high - low) / 2.0

    def action_from_env(self, action):
        """Inverse of :meth:`action_to_env`: an env action in the buffer's space (0 on a dimension whose
        bounds are equal, the one value it has)."""
        if self.discrete:
            if not self.one_hot_actions:
                return action
            if isinstance(action, torch.Tensor):
                return torch.nn.functional.one_hot(action.long(), self.num_actions).to(torch.float32)
            return np.eye(self.num_actions, dtype=np.float32)[np.asarray(action, dtype=np.int64)]
        if not self.actions_scaled:
            return action
        low, high = self._bounds_like(action)
        width = high - low
        where = torch.where if isinstance(width, torch.Tensor) else np.where
        return where(width > 0, 2.0 * (action - low) / where(width > 0, width, 1.0) - 1.0, 0.0)

    def stored_action_box(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The box stored Box actions were clipped to, in the buffer's space (float32 ``low, high``).

        ``±(1 - action_clip_eps)`` when scaled, else the env's bounds shrunk about their centre by
        the same fraction; ``None`` for unbounded or discrete actions.
        """
        if self.discrete:
            return None
        eps = self.action_clip_eps
        if self.actions_scaled:
            return torch.full((self.action_dim,), -1.0 + eps), torch.full((self.action_dim,), 1.0 - eps)
        low = torch.tensor(self.action_low, dtype=torch.float64)
        high = torch.tensor(self.action_high, dtype=torch.float64)
        if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
            return None
        center, half = (low + high) / 2, (high - low) / 2
        return (center - half * (1 - eps)).float(), (center + half * (1 - eps)).float()

    def _bounds_like(self, value):
        if isinstance(value, torch.Tensor):
            kwargs = dict(dtype=value.dtype if value.is_floating_point() else torch.float32, device=value.device)
            return torch.tensor(self.action_low, **kwargs), torch.tensor(self.action_high, **kwargs)
        dtype = np.result_type(np.asarray(value).dtype, np.float32)
        return np.asarray(self.action_low, dtype=dtype), np.asarray(self.action_high, dtype=dtype)

    # -- observations -----------------------------------------------------------------------

    def flatten_observation(self, observation):
        """Flatten an env observation the way the dataset was flattened (:func:`flatten_observation`).

        Numpy in, float32 numpy out; tensors (or a TensorDict of Dict entries) stay tensors.
        """
        return flatten_observation(observation, self.observation_keys, self.observation_key_shapes)

    def observation_norm(self, in_keys=("observation",)) -> ObservationNorm | None:
        """TorchRL's ``ObservationNorm`` that standardises the entries ``in_keys`` as the stored observations were:
        ``(obs - observation_mean) / observation_std`` in float32 (``None`` when observations are not normalised).
        The one normalisation of the library: the data, the evaluation, the online environments and the
        exported policy all apply it."""
        if not self.observations_normalized:
            return None
        return ObservationNorm(loc=torch.tensor(self.observation_mean, dtype=torch.float32),
                               scale=torch.tensor(self.observation_std, dtype=torch.float32),
                               in_keys=list(in_keys), standard_normal=True)

    def normalize_observation(self, observation: torch.Tensor) -> torch.Tensor:
        """Apply the stored normalisation (:meth:`observation_norm`; identity when observations are not normalised)."""
        norm = self.observation_norm()
        if norm is None:
            return observation
        batch = TensorDict({"observation": observation}, batch_size=observation.shape[:-1], device=observation.device)
        return norm.to(observation.device)(batch).get("observation")

    def unnormalize_observation(self, observation: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize_observation`."""
        if not self.observations_normalized:
            return observation
        mean = torch.tensor(self.observation_mean, dtype=observation.dtype, device=observation.device)
        std = torch.tensor(self.observation_std, dtype=observation.dtype, device=observation.device)
        return observation * std + mean

    def observation_from_env(self, observation, device: torch.device | str | None = None) -> torch.Tensor:
        """Env observation -> policy input: flatten, float32 tensor, normalise if the data was."""
        flat = torch.as_tensor(self.flatten_observation(observation), device=device)
        return self.normalize_observation(flat)

    # -- rewards ------------------------------------------------------------------------------

    def untransform_reward(self, reward):
        """Recover raw rewards from stored ones: ``(reward - shift) / scale``."""
        return (reward - self.reward_shift) / self.reward_scale

    # -- TorchRL specs ------------------------------------------------------------------------

    def observation_spec(self, device: torch.device | str | None = None) -> Unbounded:
        """TorchRL spec of the stored (flattened) observation."""
        return Unbounded(shape=(self.observation_dim,), dtype=torch.float32, device=device)

    def action_spec(self, device: torch.device | str | None = None):
        """TorchRL spec of the stored action.

        Box: ``[-1, 1]`` when scaled, else the env's bounds (unbounded if they are infinite).
        Discrete: ``Categorical(num_actions)`` (int64 indices) or ``OneHot(num_actions)``.
        """
        if self.discrete:
            if self.one_hot_actions:
                return OneHot(self.num_actions, device=device)
            return Categorical(self.num_actions, shape=(), dtype=torch.int64, device=device)
        if self.actions_scaled:
            return Bounded(-1.0, 1.0, shape=(self.action_dim,), dtype=torch.float32, device=device)
        low = torch.tensor(self.action_low, dtype=torch.float32)
        high = torch.tensor(self.action_high, dtype=torch.float32)
        if torch.isfinite(low).all() and torch.isfinite(high).all():
            return Bounded(low, high, shape=(self.action_dim,), dtype=torch.float32, device=device)
        return Unbounded(shape=(self.action_dim,), dtype=torch.float32, device=device)
