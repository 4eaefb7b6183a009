"""Offline data: Minari datasets (or your own transitions) as TorchRL replay buffers.

:func:`load_minari_dataset` reads a Minari dataset episode by episode (``minari.load_dataset(...)
.iterate_episodes()``; TorchRL's ``MinariExperienceReplay`` is not used because, for local
datasets, version 0.14.1 has been seen filling correctly shaped tensors with zeros) and returns a
:class:`torchrl.data.ReplayBuffer` over offline storage (a :class:`~torchrl.data.LazyTensorStorage`
in memory or on the training device, or a :class:`~torchrl.data.LazyMemmapStorage` on disk
for datasets larger than memory). :func:`make_offline_buffer` does the same for a
:class:`~tensordict.TensorDict` of transitions you already have, with the same checks and
transforms.

Every transition carries TorchRL's keys, floats as ``float32``::

    observation                 [N, obs_dim]
    action                      [N, act_dim]
    ("next", "observation")     [N, obs_dim]
    ("next", "reward")          [N, 1]
    ("next", "done")            [N, 1]  bool, terminated | truncated
    ("next", "terminated")      [N, 1]  bool
    ("next", "truncated")       [N, 1]  bool
    episode                     [N]     int64, the source episode id

The last transition of an episode has the episode's final observation as its next
observation, whether the episode ended by termination or by truncation.

Dict observations (e.g. Minari's maze datasets: ``achieved_goal``, ``desired_goal``,
``observation``) are flattened into ``observation`` by concatenating the flattened
entries in the order of the observation space's keys (gymnasium sorts them
alphabetically); the order is kept in ``metadata.observation_keys`` and
:meth:`OfflineDataMetadata.observation_from_env` flattens environment observations the
same way at evaluation.

Transforms are applied once, when the buffer is built, never at sampling time.
Defaults:

* actions scaled from the environment's bounds to ``[-1, 1]`` (``scale_actions=True``;
  boxes already at ``±1`` are left untouched), then clipped to ``±(1 - 1e-5)``
  (``action_clip_eps=1e-5``) so that ``atanh``/tanh-Gaussian log-probabilities stay finite;
  evaluation maps policy actions back with :meth:`OfflineDataMetadata.action_to_env`;
* rewards unchanged (``reward_transform="none"``); ``"locomotion"`` multiplies them by
  ``1000 / (max episode return - min episode return)`` (the IQL paper's MuJoCo setting) and
  ``"antmaze"`` subtracts 1 (the paper's AntMaze setting);
* observations not normalised (``normalize_observations=False``); the statistics
  (mean, and standard deviation + 1e-3) are always computed and stored in the metadata,
  and with ``normalize_observations=True`` they are applied to ``observation`` and
  ``("next", "observation")`` here and to environment observations by
  :meth:`OfflineDataMetadata.observation_from_env`.

``raw=True`` turns every transform off (observations are still flattened and cast to
``float32``). The buffer's ``metadata`` attribute (an :class:`OfflineDataMetadata`) holds
what evaluation and checkpoints need; ``metadata.state_dict()`` is a plain, JSON-friendly
dict and :meth:`OfflineDataMetadata.from_state_dict` restores it.

For training loops that keep the whole dataset on the accelerator, :func:`buffer_transitions`
returns the stored TensorDict and :func:`sample_indices` / :func:`gather_batch` (or
:class:`DeviceSampler`) draw batches on its device with no host round trip.
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import (
    Bounded,
    LazyMemmapStorage,
    LazyTensorStorage,
    RandomSampler,
    ReplayBuffer,
    Unbounded,
)
from torchrl.data.replay_buffers.writers import ImmutableDatasetWriter

__all__ = [
    "ACTION_CLIP_EPS",
    "DatasetError",
    "DeviceSampler",
    "OBSERVATION_STD_EPS",
    "OfflineDataMetadata",
    "REWARD_TRANSFORMS",
    "TRANSITION_KEYS",
    "buffer_transitions",
    "gather_batch",
    "load_minari_dataset",
    "make_offline_buffer",
    "read_minari_transitions",
    "sample_batch",
    "sample_indices",
]

TRANSITION_KEYS = (
    "observation",
    "action",
    ("next", "observation"),
    ("next", "reward"),
    ("next", "done"),
    ("next", "terminated"),
    ("next", "truncated"),
)
REWARD_TRANSFORMS = ("none", "locomotion", "antmaze")
ACTION_CLIP_EPS = 1e-5
OBSERVATION_STD_EPS = 1e-3
_CHUNK_SIZE = 1 << 20  # transitions per in-place transform step (bounds memory use)


class DatasetError(ValueError):
    """A dataset that cannot be used: empty, non-finite values, wrong shapes, unreadable files."""


# --------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------


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
        action_dim: size of the action.
        action_low / action_high: the environment's action bounds.
        actions_scaled: whether stored actions are mapped from the bounds to ``[-1, 1]``.
        action_clip_eps: stored actions are clipped to ``±(1 - action_clip_eps)`` of the
            (scaled) half-range; ``0.0`` means no clipping.
        reward_transform: ``"none"``, ``"locomotion"`` or ``"antmaze"``.
        reward_scale / reward_shift: stored reward = raw reward * scale + shift.
        observation_mean / observation_std: statistics of the raw flattened observations
            (``std`` includes the ``+1e-3`` guard).
        observations_normalized: whether stored observations are ``(raw - mean) / std``.
        num_transitions / num_episodes: dataset size.
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

    # -- serialisation ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-serialisable) to save with checkpoints."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> OfflineDataMetadata:
        """Rebuild the metadata saved by :meth:`state_dict`."""
        names = {f.name for f in fields(cls)}
        unknown = set(state) - names
        missing = names - set(state)
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
            return gym.make(gym.envs.registration.EnvSpec.from_json(self.env_spec_json), **kwargs)
        if self.env_id is None:
            raise ValueError(
                "This dataset records no environment; create the evaluation environment yourself."
            )
        return gym.make(self.env_id, **kwargs)

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

    def action_to_env(self, action):
        """Map an action in the buffer's space (``[-1, 1]`` when scaled) to the env's bounds.

        Accepts a torch tensor (stays on its device) or a numpy array.
        """
        if not self.actions_scaled:
            return action
        low, high = self._bounds_like(action)
        return low + (action + 1.0) * (high - low) / 2.0

    def action_from_env(self, action):
        """Inverse of :meth:`action_to_env`: env-bounded action to the buffer's space."""
        if not self.actions_scaled:
            return action
        low, high = self._bounds_like(action)
        return 2.0 * (action - low) / (high - low) - 1.0

    def _bounds_like(self, value):
        if isinstance(value, torch.Tensor):
            kwargs = dict(dtype=value.dtype if value.is_floating_point() else torch.float32, device=value.device)
            return torch.tensor(self.action_low, **kwargs), torch.tensor(self.action_high, **kwargs)
        dtype = np.result_type(np.asarray(value).dtype, np.float32)
        return np.asarray(self.action_low, dtype=dtype), np.asarray(self.action_high, dtype=dtype)

    # -- observations -----------------------------------------------------------------------

    def flatten_observation(self, observation) -> np.ndarray:
        """Flatten an env observation the way the dataset was flattened (float32 numpy).

        Dict observations are concatenated in ``observation_keys`` order and Box observations
        are flattened; leading batch dimensions (vectorised environments) are kept.
        """
        keys = self.observation_keys or [None]
        parts = []
        for key, shape in zip(keys, self.observation_key_shapes):
            value = observation
            for part in key.split("/") if key is not None else ():
                value = value[part]
            value = np.asarray(value, dtype=np.float32)
            batch_shape = value.shape[: value.ndim - len(shape)]
            parts.append(value.reshape(*batch_shape, -1))
        return np.concatenate(parts, axis=-1)

    def normalize_observation(self, observation: torch.Tensor) -> torch.Tensor:
        """Apply the stored normalisation (identity when observations are not normalised)."""
        if not self.observations_normalized:
            return observation
        mean = torch.tensor(self.observation_mean, dtype=observation.dtype, device=observation.device)
        std = torch.tensor(self.observation_std, dtype=observation.dtype, device=observation.device)
        return (observation - mean) / std

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
        """TorchRL spec of the stored action: ``[-1, 1]`` when scaled, else the env's bounds."""
        if self.actions_scaled:
            return Bounded(-1.0, 1.0, shape=(self.action_dim,), dtype=torch.float32, device=device)
        low = torch.tensor(self.action_low, dtype=torch.float32)
        high = torch.tensor(self.action_high, dtype=torch.float32)
        if torch.isfinite(low).all() and torch.isfinite(high).all():
            return Bounded(low, high, shape=(self.action_dim,), dtype=torch.float32, device=device)
        return Unbounded(shape=(self.action_dim,), dtype=torch.float32, device=device)


# --------------------------------------------------------------------------------------
# Reading Minari datasets
# --------------------------------------------------------------------------------------


def _minari_remote() -> str:
    return os.environ.get("MINARI_REMOTE", "hf://farama-minari")


def _remote_unreachable_reason(timeout: float = 3.0) -> str | None:
    """``None`` if Minari's remote server accepts a TCP connection, else why not."""
    remote = _minari_remote()
    host = {"hf": "huggingface.co", "gcp": "storage.googleapis.com"}.get(remote.split("://")[0])
    if host is None:
        return None  # unknown remote: let minari try
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return None
    except OSError as error:
        return f"cannot reach {host} ({remote}): {error}"


def _not_found_message(dataset_id: str, data_path: Path, reason: str) -> str:
    root = os.environ.get("MINARI_DATASETS_PATH")
    root_note = f"MINARI_DATASETS_PATH={root}" if root else "MINARI_DATASETS_PATH unset, default ~/.minari/datasets"
    return (
        f"Minari dataset {dataset_id!r} is not available: looked in {data_path} ({root_note}); {reason}.\n"
        f"To get it: on a machine with network run `minari download {dataset_id}` "
        "(Minari's remote needs `pip install 'minari[hf]'`), then copy its folder "
        f"to {data_path.parent} or point MINARI_DATASETS_PATH at the datasets root that holds it. "
        "Datasets this package can build offline are listed by `python -m iql_torchrl.datasets list`."
    )


def _open_minari_dataset(dataset_id: str, download: bool):
    """Open a local Minari dataset, downloading it when allowed and possible."""
    import minari
    from minari.dataset.minari_dataset import parse_dataset_id
    from minari.storage.datasets_root_dir import get_dataset_path

    from iql_torchrl.datasets import BUILDERS

    parse_dataset_id(dataset_id)  # raises a clear ValueError for malformed ids
    data_path = get_dataset_path(dataset_id) / "data"
    if not data_path.exists():
        if dataset_id in BUILDERS:
            raise FileNotFoundError(
                f"Dataset {dataset_id!r} is not built yet (looked in {data_path}). Build it with "
                f"`python -m iql_torchrl.datasets build {dataset_id}` or "
                f"`iql_torchrl.datasets.ensure_dataset({dataset_id!r})`."
            )
        if not download:
            raise FileNotFoundError(_not_found_message(dataset_id, data_path, "download=False"))
        reason = _remote_unreachable_reason()
        if reason is not None:
            raise FileNotFoundError(_not_found_message(dataset_id, data_path, reason))
        try:
            minari.download_dataset(dataset_id)
        except Exception as error:  # network, missing client library, unknown id
            raise FileNotFoundError(
                _not_found_message(dataset_id, data_path, f"download failed: {type(error).__name__}: {error}")
            ) from error
    try:
        return minari.load_dataset(dataset_id)
    except Exception as error:
        raise DatasetError(
            f"Minari dataset {dataset_id!r} at {data_path} is unreadable ({type(error).__name__}: {error}). "
            "Rebuild it (`python -m iql_torchrl.datasets build ID --overwrite`) or download it again "
            f"(`minari download {dataset_id} --force`)."
        ) from error


def _observation_layout(space: gym.Space) -> tuple[list[str] | None, list[list[int]]]:
    """Flattening order for Dict spaces: (keys joined by "/", their shapes); (None, [shape]) for Box."""
    if isinstance(space, gym.spaces.Box):
        return None, [list(space.shape)]
    if not isinstance(space, gym.spaces.Dict):
        raise DatasetError(
            f"The observation space is a {type(space).__name__}; only Box and Dict-of-Box observations are supported."
        )
    keys, shapes = [], []

    def visit(sub_space: gym.Space, prefix: str):
        for name, child in sub_space.spaces.items():
            key = f"{prefix}{name}"
            if isinstance(child, gym.spaces.Dict):
                visit(child, key + "/")
            elif isinstance(child, gym.spaces.Box):
                keys.append(key)
                shapes.append(list(child.shape))
            else:
                raise DatasetError(
                    f"Observation entry {key!r} is a {type(child).__name__} space; only Box entries "
                    "(possibly nested in Dicts) can be flattened into 'observation'."
                )

    visit(space, "")
    return keys, shapes


def _flatten_episode_observations(observations, keys: list[str] | None) -> np.ndarray:
    """Episode observations ``[T + 1, ...]`` (array or dict) -> ``[T + 1, obs_dim]`` float32."""
    if keys is None:
        array = np.asarray(observations, dtype=np.float32)
        return array.reshape(array.shape[0], -1) if array.ndim != 2 else array
    parts = []
    for key in keys:
        value = observations
        for part in key.split("/"):
            value = value[part]
        value = np.asarray(value, dtype=np.float32)
        parts.append(value.reshape(value.shape[0], -1))
    return np.concatenate(parts, axis=-1)


def _episode_to_transitions(episode, observation_keys: list[str] | None) -> TensorDict:
    """One Minari episode -> TorchRL transitions (raw values, float32)."""
    observations = _flatten_episode_observations(episode.observations, observation_keys)
    num_steps = len(episode.rewards)
    if not isinstance(episode.actions, np.ndarray):
        raise DatasetError(
            f"Episode {episode.id}: actions are a {type(episode.actions).__name__}; only Box action spaces are supported."
        )
    actions = np.asarray(episode.actions, dtype=np.float32).reshape(num_steps, -1)
    if observations.shape[0] != num_steps + 1:
        raise DatasetError(
            f"Episode {episode.id}: {observations.shape[0]} observations for {num_steps} steps "
            "(Minari stores one more observation than steps)."
        )
    terminated = torch.as_tensor(np.asarray(episode.terminations, dtype=bool)).reshape(num_steps, 1)
    truncated = torch.as_tensor(np.asarray(episode.truncations, dtype=bool)).reshape(num_steps, 1)
    observations = torch.from_numpy(observations)
    return TensorDict(
        {
            "observation": observations[:-1],
            "action": torch.from_numpy(actions),
            "episode": torch.full((num_steps,), int(episode.id), dtype=torch.int64),
            "next": {
                "observation": observations[1:],
                "reward": torch.as_tensor(np.asarray(episode.rewards, dtype=np.float32)).reshape(num_steps, 1),
                "done": terminated | truncated,
                "terminated": terminated,
                "truncated": truncated,
            },
        },
        batch_size=[num_steps],
    )


def _iterate_minari_transitions(dataset, observation_keys) -> Iterator[TensorDict]:
    """Transitions of each episode, checked; errors name the episode and the field."""
    path = dataset.storage.data_path
    try:
        for episode in dataset.iterate_episodes():
            if len(episode.rewards) == 0:
                continue
            transitions = _episode_to_transitions(episode, observation_keys)
            _check_finite(transitions, episode_label=f"episode {episode.id}")
            yield transitions
    except (OSError, KeyError, RuntimeError) as error:
        raise DatasetError(
            f"Could not read the episodes of Minari dataset {dataset.spec.dataset_id!r} at {path} "
            f"({type(error).__name__}: {error}); the file is truncated or corrupt. Rebuild or re-download it."
        ) from error


def _concatenate_in_chunks(episodes: Iterable[TensorDict], rows: int = 1 << 16) -> Iterator[TensorDict]:
    """Group consecutive episodes into chunks of about ``rows`` transitions (fewer storage writes)."""
    pending, count = [], 0
    for episode in episodes:
        pending.append(episode)
        count += episode.batch_size[0]
        if count >= rows:
            yield torch.cat(pending, 0)
            pending, count = [], 0
    if pending:
        yield torch.cat(pending, 0)


def read_minari_transitions(dataset_id: str, *, download: bool = True) -> TensorDict:
    """All transitions of a Minari dataset, untransformed (float32, Dict observations flattened).

    Values equal the Minari source (cast to float32). Useful to inspect data or to feed
    :func:`make_offline_buffer` after your own edits.
    """
    dataset = _open_minari_dataset(dataset_id, download)
    observation_keys, _ = _observation_layout(dataset.observation_space)
    episodes = list(_iterate_minari_transitions(dataset, observation_keys))
    if not episodes:
        raise DatasetError(f"Minari dataset {dataset_id!r} has no transitions.")
    return torch.cat(episodes, 0)


def _env_spec_of(dataset):
    """The evaluation env spec recorded with the dataset, else the collection env spec."""
    return getattr(dataset, "_eval_env_spec", None) or dataset.env_spec


def load_minari_dataset(
    dataset_id: str,
    *,
    batch_size: int | None = 256,
    device: torch.device | str = "cpu",
    storage: str = "memory",
    scratch_dir: str | os.PathLike | None = None,
    reward_transform: str = "none",
    normalize_observations: bool = False,
    scale_actions: bool = True,
    action_clip_eps: float = ACTION_CLIP_EPS,
    raw: bool = False,
    download: bool = True,
) -> ReplayBuffer:
    """Load a Minari dataset into a TorchRL replay buffer (transforms applied once, here).

    Local datasets under ``MINARI_DATASETS_PATH`` (default ``~/.minari/datasets``) load
    without network. A missing remote id is downloaded with ``minari.download_dataset``
    when the remote server answers; otherwise a ``FileNotFoundError`` says where it looked
    and how to get the data. Missing ids of this package's builders (``iql_torchrl/...``)
    are not downloaded: build them with ``python -m iql_torchrl.datasets build ID``.

    Args:
        dataset_id: Minari id, e.g. ``"iql_torchrl/pendulum/mixed-v0"`` or ``"mujoco/hopper/medium-v0"``.
        batch_size: default batch size of ``buffer.sample()``.
        device: where the data lives and batches are returned (``"memory"`` storage only).
        storage: ``"memory"`` (a ``LazyTensorStorage`` on ``device``) or ``"memmap"``
            (a ``LazyMemmapStorage`` under ``scratch_dir``, for datasets larger than memory).
        scratch_dir: directory for the memory-mapped files (a temporary one if ``None``).
        reward_transform: ``"none"`` (default), ``"locomotion"`` or ``"antmaze"``.
        normalize_observations: store ``(obs - mean) / std`` (statistics kept in the metadata).
        scale_actions: map actions from the env's bounds to ``[-1, 1]``.
        action_clip_eps: clip stored actions to ``±(1 - action_clip_eps)``; 0 disables.
        raw: turn every transform off (overrides the four arguments above).
        download: allow downloading a missing non-builder dataset.

    Returns:
        A ``ReplayBuffer`` (``RandomSampler``, read-only writer) with a ``metadata``
        attribute of type :class:`OfflineDataMetadata`.
    """
    dataset = _open_minari_dataset(dataset_id, download)
    action_space = dataset.action_space
    if not isinstance(action_space, gym.spaces.Box):
        raise DatasetError(
            f"Dataset {dataset_id!r} has a {type(action_space).__name__} action space; only Box actions are supported."
        )
    env_spec = _env_spec_of(dataset)
    env_action_space = _env_action_space(env_spec)
    if env_action_space is not None and env_action_space.shape != action_space.shape:
        raise DatasetError(
            f"Dataset {dataset_id!r}: 'action' has shape {action_space.shape} but environment "
            f"{env_spec.id!r} expects {env_action_space.shape}. The dataset does not belong to this environment."
        )
    observation_keys, observation_key_shapes = _observation_layout(dataset.observation_space)
    info = dict(
        dataset_id=dataset_id,
        env_id=env_spec.id if env_spec is not None else None,
        env_spec_json=env_spec.to_json() if env_spec is not None else None,
        ref_min_score=_optional_float(dataset.storage.metadata.get("ref_min_score")),
        ref_max_score=_optional_float(dataset.storage.metadata.get("ref_max_score")),
        observation_keys=observation_keys,
        observation_key_shapes=observation_key_shapes,
        action_low=np.broadcast_to(action_space.low, action_space.shape).reshape(-1).tolist(),
        action_high=np.broadcast_to(action_space.high, action_space.shape).reshape(-1).tolist(),
    )
    return _build_buffer(
        _concatenate_in_chunks(_iterate_minari_transitions(dataset, observation_keys)),
        num_transitions=dataset.total_steps,
        info=info,
        batch_size=batch_size,
        device=device,
        storage=storage,
        scratch_dir=scratch_dir,
        reward_transform=reward_transform,
        normalize_observations=normalize_observations,
        scale_actions=scale_actions,
        action_clip_eps=action_clip_eps,
        raw=raw,
    )


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def _env_action_space(env_spec) -> gym.spaces.Space | None:
    """The environment's action space, or ``None`` when it cannot be created here."""
    if env_spec is None:
        return None
    try:
        env = gym.make(env_spec)
    except Exception:  # environment not installed (e.g. gymnasium-robotics): trust the dataset
        return None
    try:
        return env.action_space
    finally:
        env.close()


# --------------------------------------------------------------------------------------
# User transitions
# --------------------------------------------------------------------------------------


def make_offline_buffer(
    transitions: TensorDictBase,
    *,
    env_id: str | None = None,
    action_low: Sequence[float] | float | None = None,
    action_high: Sequence[float] | float | None = None,
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
    dataset_id: str | None = None,
    batch_size: int | None = 256,
    device: torch.device | str = "cpu",
    storage: str = "memory",
    scratch_dir: str | os.PathLike | None = None,
    reward_transform: str = "none",
    normalize_observations: bool = False,
    scale_actions: bool = True,
    action_clip_eps: float = ACTION_CLIP_EPS,
    raw: bool = False,
) -> ReplayBuffer:
    """Turn a TensorDict of transitions into an offline buffer, with the Minari path's checks and transforms.

    ``transitions`` has batch size ``[N]`` and the keys of :data:`TRANSITION_KEYS` in raw
    env units (``observation`` already flat). An ``episode`` entry (int) is optional; without
    it episodes are delimited by ``("next", "done")``. The action bounds come from
    ``action_low``/``action_high``, else from ``env_id``'s action space, else the actions
    are treated as unbounded (not scaled, not clipped). Other arguments as in
    :func:`load_minari_dataset`.
    """
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
    num_transitions = transitions.batch_size[0]
    transitions = _standardise_transitions(transitions)
    action_dim = transitions["action"].shape[-1]

    if action_low is None and action_high is None and env_id is not None:
        env = gym.make(env_id)
        action_low, action_high = env.action_space.low, env.action_space.high
        env.close()
    if action_low is None or action_high is None:
        action_low, action_high = -math.inf, math.inf
    action_low = np.broadcast_to(np.asarray(action_low, dtype=np.float64), np.shape(action_low) or (action_dim,))
    action_high = np.broadcast_to(np.asarray(action_high, dtype=np.float64), np.shape(action_high) or (action_dim,))
    if action_low.reshape(-1).shape[0] != action_dim or action_high.reshape(-1).shape[0] != action_dim:
        source = f"environment {env_id!r}" if env_id is not None else "action_low/action_high"
        raise DatasetError(
            f"'action' has dimension {action_dim} but {source} has {action_low.reshape(-1).shape[0]}-dimensional "
            "actions. The transitions do not belong to this environment."
        )
    _check_finite(transitions, episode_label=None)
    env_spec_json = gym.spec(env_id).to_json() if env_id is not None else None
    info = dict(
        dataset_id=dataset_id,
        env_id=env_id,
        env_spec_json=env_spec_json,
        ref_min_score=_optional_float(ref_min_score),
        ref_max_score=_optional_float(ref_max_score),
        observation_keys=None,
        observation_key_shapes=[[transitions["observation"].shape[-1]]],
        action_low=action_low.reshape(-1).tolist(),
        action_high=action_high.reshape(-1).tolist(),
    )
    chunks = (transitions[start : start + _CHUNK_SIZE] for start in range(0, num_transitions, _CHUNK_SIZE))
    return _build_buffer(
        chunks,
        num_transitions=num_transitions,
        info=info,
        batch_size=batch_size,
        device=device,
        storage=storage,
        scratch_dir=scratch_dir,
        reward_transform=reward_transform,
        normalize_observations=normalize_observations,
        scale_actions=scale_actions,
        action_clip_eps=action_clip_eps,
        raw=raw,
    )


def _standardise_transitions(transitions: TensorDictBase) -> TensorDict:
    """Cast to TorchRL's layout: float32 floats, ``[N, 1]`` rewards/flags, an ``episode`` index."""
    num = transitions.batch_size[0]
    out = TensorDict(batch_size=[num])
    for key in ("observation", "action", ("next", "observation")):
        value = transitions.get(key)
        out.set(key, value.to(torch.float32).reshape(num, -1))
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


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------

_FLOAT_FIELDS = ("observation", "action", ("next", "observation"), ("next", "reward"))


def _field_name(key) -> str:
    return key if isinstance(key, str) else "/".join(key)


def _check_finite(transitions: TensorDictBase, episode_label: str | None) -> None:
    """Raise a DatasetError naming the field and episode of the first NaN/inf."""
    for key in _FLOAT_FIELDS:
        value = transitions.get(key)
        bad = ~torch.isfinite(value).reshape(value.shape[0], -1).all(dim=-1)
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            label = episode_label or f"episode {int(transitions.get('episode')[row])}"
            kind = "NaN" if torch.isnan(value[row]).any() else "inf"
            raise DatasetError(
                f"Field {_field_name(key)!r} holds {kind} in {label} (transition {row} of the "
                f"{'episode' if episode_label else 'data'}): "
                "fix or drop that episode before training."
            )


# --------------------------------------------------------------------------------------
# Building the buffer: write raw, then transform in place
# --------------------------------------------------------------------------------------


def _build_buffer(
    chunks: Iterable[TensorDict],
    *,
    num_transitions: int,
    info: dict,
    batch_size: int | None,
    device,
    storage: str,
    scratch_dir,
    reward_transform: str,
    normalize_observations: bool,
    scale_actions: bool,
    action_clip_eps: float,
    raw: bool,
) -> ReplayBuffer:
    if raw:
        reward_transform, normalize_observations, scale_actions, action_clip_eps = "none", False, False, 0.0
    if reward_transform not in REWARD_TRANSFORMS:
        raise ValueError(f"reward_transform must be one of {REWARD_TRANSFORMS}, got {reward_transform!r}.")
    if not 0.0 <= action_clip_eps < 1.0:
        raise ValueError(f"action_clip_eps must be in [0, 1), got {action_clip_eps}.")
    if num_transitions <= 0:
        raise DatasetError(f"Dataset {info['dataset_id']!r} has no transitions: there is nothing to learn from.")

    device = torch.device(device)
    if storage == "memory":
        data_storage = LazyTensorStorage(num_transitions, device=device)
    elif storage == "memmap":
        if device.type != "cpu":
            raise ValueError("storage='memmap' keeps the data on disk; use device='cpu' (batches can be moved later).")
        data_storage = LazyMemmapStorage(num_transitions, scratch_dir=scratch_dir)
    else:
        raise ValueError(f"storage must be 'memory' or 'memmap', got {storage!r}.")

    cursor = 0
    for chunk in chunks:
        count = chunk.batch_size[0]
        if cursor + count > num_transitions:
            raise DatasetError(
                f"Dataset {info['dataset_id']!r} holds more steps than its metadata's total_steps "
                f"({num_transitions}); its metadata is corrupt."
            )
        data_storage.set(torch.arange(cursor, cursor + count), chunk.to(device))
        cursor += count
    if cursor == 0:
        raise DatasetError(f"Dataset {info['dataset_id']!r} has no transitions: there is nothing to learn from.")
    if cursor != num_transitions:
        raise DatasetError(
            f"Dataset {info['dataset_id']!r} holds {cursor} steps but its metadata says {num_transitions}; "
            "the file is truncated or its metadata is corrupt."
        )
    data = data_storage.get(slice(None))

    # statistics of the raw data
    episodes = data.get("episode")
    episode_ids, episode_index = torch.unique(episodes, return_inverse=True)
    observation_dim = data.get("observation").shape[-1]
    action_dim = data.get("action").shape[-1]
    obs_sum = torch.zeros(observation_dim, dtype=torch.float64, device=device)
    obs_sq_sum = torch.zeros(observation_dim, dtype=torch.float64, device=device)
    episode_returns = torch.zeros(episode_ids.numel(), dtype=torch.float64, device=device)
    for start in range(0, cursor, _CHUNK_SIZE):
        block = slice(start, start + _CHUNK_SIZE)
        observation = data.get("observation")[block].to(torch.float64)
        obs_sum += observation.sum(0)
        obs_sq_sum += observation.square().sum(0)
        reward = data.get(("next", "reward"))[block].reshape(-1).to(torch.float64)
        episode_returns.index_add_(0, episode_index[block], reward)
    mean = obs_sum / cursor
    std = (obs_sq_sum / cursor - mean.square()).clamp_min(0.0).sqrt() + OBSERVATION_STD_EPS

    # transforms
    action_low = torch.tensor(info["action_low"], dtype=torch.float64)
    action_high = torch.tensor(info["action_high"], dtype=torch.float64)
    if action_low.numel() != action_dim:
        raise DatasetError(
            f"Dataset {info['dataset_id']!r}: 'action' has dimension {action_dim} but the action space has "
            f"{action_low.numel()}."
        )
    bounded = bool(torch.isfinite(action_low).all() and torch.isfinite(action_high).all())
    already_unit = bool((action_low == -1).all() and (action_high == 1).all())
    actions_scaled = scale_actions and bounded and not already_unit
    if not bounded:
        action_clip_eps = 0.0

    reward_scale, reward_shift = 1.0, 0.0
    if reward_transform == "locomotion":
        spread = float(episode_returns.max() - episode_returns.min())
        if spread <= 0:
            raise DatasetError(
                f"reward_transform='locomotion' needs episodes with different returns; all "
                f"{episode_ids.numel()} episodes return {float(episode_returns[0]):.6g}."
            )
        reward_scale = 1000.0 / spread
    elif reward_transform == "antmaze":
        reward_shift = -1.0

    metadata = OfflineDataMetadata(
        dataset_id=info["dataset_id"],
        env_id=info["env_id"],
        env_spec_json=info["env_spec_json"],
        ref_min_score=info["ref_min_score"],
        ref_max_score=info["ref_max_score"],
        observation_dim=int(observation_dim),
        observation_keys=info["observation_keys"],
        observation_key_shapes=info["observation_key_shapes"],
        action_dim=int(action_dim),
        action_low=[float(x) for x in info["action_low"]],
        action_high=[float(x) for x in info["action_high"]],
        actions_scaled=bool(actions_scaled),
        action_clip_eps=float(action_clip_eps),
        reward_transform=reward_transform,
        reward_scale=float(reward_scale),
        reward_shift=float(reward_shift),
        observation_mean=mean.cpu().tolist(),
        observation_std=std.cpu().tolist(),
        observations_normalized=bool(normalize_observations),
        num_transitions=int(cursor),
        num_episodes=int(episode_ids.numel()),
    )
    _transform_in_place(data, metadata)

    buffer = ReplayBuffer(
        storage=data_storage,
        sampler=RandomSampler(),
        writer=ImmutableDatasetWriter(),
        batch_size=batch_size,
    )
    buffer.metadata = metadata
    return buffer


def _transform_in_place(data: TensorDictBase, metadata: OfflineDataMetadata) -> None:
    """Apply the metadata's transforms to the stored data, chunk by chunk."""
    clip_eps = metadata.action_clip_eps
    if metadata.actions_scaled:
        clip_low = torch.full((metadata.action_dim,), -1.0 + clip_eps)
        clip_high = torch.full((metadata.action_dim,), 1.0 - clip_eps)
    else:
        low = torch.tensor(metadata.action_low)
        high = torch.tensor(metadata.action_high)
        center, half = (low + high) / 2, (high - low) / 2
        clip_low, clip_high = center - half * (1 - clip_eps), center + half * (1 - clip_eps)
    transforms_actions = metadata.actions_scaled or clip_eps > 0
    transforms_rewards = metadata.reward_scale != 1.0 or metadata.reward_shift != 0.0
    if not (transforms_actions or transforms_rewards or metadata.observations_normalized):
        return
    for start in range(0, metadata.num_transitions, _CHUNK_SIZE):
        block = slice(start, start + _CHUNK_SIZE)
        if transforms_actions:
            action = data.get("action")[block]
            action = metadata.action_from_env(action)
            if clip_eps > 0:
                action = torch.maximum(torch.minimum(action, clip_high.to(action)), clip_low.to(action))
            data.get("action")[block] = action
        if transforms_rewards:
            reward = data.get(("next", "reward"))[block]
            data.get(("next", "reward"))[block] = reward * metadata.reward_scale + metadata.reward_shift
        if metadata.observations_normalized:
            for key in ("observation", ("next", "observation")):
                data.get(key)[block] = metadata.normalize_observation(data.get(key)[block])


# --------------------------------------------------------------------------------------
# Device-resident sampling
# --------------------------------------------------------------------------------------


def buffer_transitions(buffer: ReplayBuffer) -> TensorDictBase:
    """The buffer's stored transitions as one TensorDict (no copy), on the storage's device."""
    return buffer.storage.get(slice(None))


def sample_indices(
    num_transitions: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform transition indices ``[batch_size]`` (int64), drawn on ``device`` with ``generator``.

    Draw indices outside a compiled step and pass them in, so eager and compiled
    runs see the same batches; the generator must live on ``device``.
    """
    return torch.randint(num_transitions, (batch_size,), generator=generator, device=device)


def gather_batch(data: TensorDictBase, indices: torch.Tensor) -> TensorDictBase:
    """The transitions at ``indices`` (a plain index; works inside ``torch.compile``)."""
    return data[indices]


def sample_batch(data: TensorDictBase, batch_size: int, generator: torch.Generator | None = None) -> TensorDictBase:
    """``gather_batch(data, sample_indices(len(data), batch_size, generator, data.device))``."""
    return gather_batch(data, sample_indices(data.batch_size[0], batch_size, generator, data.device))


class DeviceSampler:
    """Uniform minibatches from a TensorDict that lives on the training device.

    Indices come from ``torch.randint`` on the data's device with the sampler's own
    generator (seeded by ``seed``), so sampling never touches the host.

    Example::

        data = buffer_transitions(load_minari_dataset(DEFAULT_DATASET, device="cuda"))
        sampler = DeviceSampler(data, batch_size=256, seed=0)
        batch = sampler.sample()               # or: idx = sampler.indices(); batch = gather_batch(data, idx)
    """

    def __init__(self, data: TensorDictBase, batch_size: int, seed: int | None = None):
        self.data = data
        self.batch_size = batch_size
        device = data.device if data.device is not None else torch.device("cpu")
        self.generator = torch.Generator(device=device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self.device = device

    def __len__(self) -> int:
        return self.data.batch_size[0]

    def indices(self) -> torch.Tensor:
        """Draw one batch of indices on the data's device."""
        return sample_indices(len(self), self.batch_size, self.generator, self.device)

    def sample(self) -> TensorDictBase:
        """Draw one batch of transitions."""
        return gather_batch(self.data, self.indices())

    __call__ = sample
