"""Building the offline replay buffer: write the raw transitions, check them, compute the
statistics, then apply the transforms in place, chunk by chunk.

:class:`BufferOptions` holds every choice about the buffer (where it lives, the transforms);
:class:`DataSource` what is known about the data's origin (environment, spaces, reference
scores); :func:`build_buffer` turns a stream of raw transition chunks into a read-only
``ReplayBuffer`` with an :class:`~iql_torchrl.data.metadata.OfflineDataMetadata`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, RandomSampler, ReplayBuffer
from torchrl.data.replay_buffers.writers import ImmutableDatasetWriter

from iql_torchrl.data.checks import DatasetError, OutOfBoundsActions, check_action_indices
from iql_torchrl.data.metadata import ACTION_CLIP_EPS, OBSERVATION_STD_EPS, OfflineDataMetadata

__all__ = [
    "BufferOptions",
    "CHUNK_SIZE",
    "DataSource",
    "REWARD_TRANSFORMS",
    "action_space_fields",
    "build_buffer",
    "normalize_stored_observations",
]

REWARD_TRANSFORMS = ("none", "locomotion", "antmaze")
CHUNK_SIZE = 1 << 20  # transitions per in-place transform step (bounds memory use)


@dataclass(frozen=True)
class BufferOptions:
    """Where the buffer lives and which transforms it applies (once, when it is built).

    The keyword arguments of :func:`~iql_torchrl.data.load_minari_dataset` and
    :func:`~iql_torchrl.data.make_offline_buffer` are these fields.
    """

    batch_size: int | None = 256
    """Default batch size of ``buffer.sample()``."""
    device: torch.device | str = "cpu"
    """Where the data lives and batches are returned (``"memory"`` storage only)."""
    storage: str = "memory"
    """``"memory"`` (a ``LazyTensorStorage`` on ``device``) or ``"memmap"`` (a ``LazyMemmapStorage``
    under ``scratch_dir``, for datasets larger than memory)."""
    scratch_dir: str | os.PathLike | None = None
    """Directory for the memory-mapped files (a temporary one if ``None``): each buffer writes into a new folder
    of its own there, removed when the buffer's storage is freed."""
    reward_transform: str = "none"
    """``"none"``, ``"locomotion"`` (× 1000 / return range) or ``"antmaze"`` (− 1)."""
    normalize_observations: bool = False
    """Store ``(obs - mean) / std``, the data's own per-feature statistics with ``std + 1e-3`` (kept in the metadata
    either way; :func:`normalize_stored_observations`)."""
    scale_actions: bool = True
    """Map Box actions from the env's bounds to ``[-1, 1]``."""
    action_clip_eps: float = ACTION_CLIP_EPS
    """Clip stored Box actions to ``±(1 - action_clip_eps)``; 0 disables."""
    raw: bool = False
    """Turn every transform off (overrides the four fields above; out-of-bounds actions are kept)."""
    clip_actions: bool = False
    """Clip Box actions outside the env's bounds into them (with a warning) instead of refusing the data."""
    one_hot_actions: bool = False
    """Store discrete actions as float32 one-hot ``[N, n]`` instead of int64 indices ``[N]``."""
    goal_in_observation: bool | None = None
    """Dict observations with ``desired_goal``: keep it in the policy's input (True), or drop it and relabel
    the rewards to the evaluation env's fixed goal (False; see :mod:`iql_torchrl.data.goals`). ``None``: the
    dataset's choice (a builder's recipe; else dropped when the evaluation env has a fixed goal)."""
    success_terminal: bool | None = False
    """Goal data with the goal out of the input: mark the transitions whose relabelled reward is a success
    (the next ``achieved_goal`` within reach of the fixed goal) terminated, D4RL AntMaze's convention: the
    goal is absorbing and no value bootstraps past it (with the ``antmaze`` transform r − 1 every value lies in
    [−1/(1−γ), 0]). ``True`` is refused where no reward was relabelled (goal in the input, or no fixed goal);
    ``None`` marks them wherever the rewards were relabelled and leaves other data as it is."""

    def __post_init__(self):
        if self.reward_transform not in REWARD_TRANSFORMS:
            raise ValueError(f"reward_transform must be one of {REWARD_TRANSFORMS}, got {self.reward_transform!r}.")
        if not 0.0 <= self.action_clip_eps < 1.0:
            raise ValueError(f"action_clip_eps must be in [0, 1), got {self.action_clip_eps}.")
        if self.storage not in ("memory", "memmap"):
            raise ValueError(f"storage must be 'memory' or 'memmap', got {self.storage!r}.")
        if self.storage == "memmap" and torch.device(self.device).type != "cpu":
            raise ValueError("storage='memmap' keeps the data on disk; use device='cpu' (batches can be moved later).")

    @classmethod
    def merge(cls, options: BufferOptions | None, **overrides) -> BufferOptions:
        """``options`` (or the defaults) with keyword arguments replacing fields; unknown names refused."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(f"Unknown buffer option(s) {unknown}; the options are {names}.")
        return dataclasses.replace(options if options is not None else cls(), **overrides)

    def effective(self) -> BufferOptions:
        """The options actually applied: ``raw`` turns every transform off."""
        if not self.raw:
            return self
        return dataclasses.replace(
            self, reward_transform="none", normalize_observations=False, scale_actions=False, action_clip_eps=0.0
        )


@dataclass(frozen=True)
class DataSource:
    """Where transitions come from: ids, reference scores, observation layout, action space."""

    dataset_id: str | None
    env_id: str | None
    env_spec_json: str | None
    ref_min_score: float | None
    ref_max_score: float | None
    observation_keys: list[str] | None
    observation_key_shapes: list[list[int]]
    action_space: str
    """``"box"`` or ``"discrete"``."""
    action_low: list[float]
    action_high: list[float]
    num_actions: int | None
    reward_goal: list[float] | None = None
    """The fixed goal the rewards were relabelled to (goal out of the input), else ``None``."""
    success_terminal: bool = False
    """Whether the transitions that reach ``reward_goal`` were marked terminated (the goal absorbing)."""

    def describe(self) -> str:
        if self.env_id is not None:
            return f"environment {self.env_id!r}"
        return f"dataset {self.dataset_id!r}" if self.dataset_id is not None else "the action space"


def action_space_fields(space: gym.Space, owner: str) -> dict:
    """``action_space``, ``action_low``, ``action_high``, ``num_actions`` of a gymnasium action space.

    Box and ``Discrete(n)`` (starting at 0) are supported; anything else is refused, naming
    ``owner`` (the dataset or environment) and the space.
    """
    if isinstance(space, gym.spaces.Box):
        return dict(
            action_space="box",
            action_low=np.broadcast_to(space.low, space.shape).reshape(-1).astype(np.float64).tolist(),
            action_high=np.broadcast_to(space.high, space.shape).reshape(-1).astype(np.float64).tolist(),
            num_actions=None,
        )
    if isinstance(space, gym.spaces.Discrete):
        if int(space.start) != 0:
            raise DatasetError(
                f"{owner} has the action space {space}, whose indices start at {int(space.start)}; only "
                "Discrete spaces starting at 0 are supported. Shift the actions to start at 0 and pass "
                "the transitions to make_offline_buffer(..., num_actions=n)."
            )
        return dict(action_space="discrete", action_low=[], action_high=[], num_actions=int(space.n))
    raise DatasetError(
        f"{owner} has a {type(space).__name__} action space ({space}); only Box and Discrete action spaces "
        "are supported. A MultiDiscrete or Tuple space can be flattened into one Discrete space (one index "
        "per combination) and passed to make_offline_buffer(..., num_actions=n)."
    )


def _memmap_storage(num_transitions: int, scratch_dir) -> LazyMemmapStorage:
    """A ``LazyMemmapStorage`` in a new folder under ``scratch_dir`` (tensordict refuses to write over an
    earlier buffer's files), removed with the storage."""
    if scratch_dir is None:
        return LazyMemmapStorage(num_transitions)
    Path(scratch_dir).mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="buffer-", dir=scratch_dir)
    storage = LazyMemmapStorage(num_transitions, scratch_dir=folder)
    weakref.finalize(storage, shutil.rmtree, folder, ignore_errors=True)
    return storage


def build_buffer(
    chunks: Iterable[TensorDict], *, num_transitions: int, source: DataSource, options: BufferOptions
) -> ReplayBuffer:
    """Write ``chunks`` (raw transitions) into storage, check them, transform them in place."""
    options = options.effective()
    if num_transitions <= 0:
        raise DatasetError(f"Dataset {source.dataset_id!r} has no transitions: there is nothing to learn from.")
    device = torch.device(options.device)
    if options.storage == "memory":
        data_storage = LazyTensorStorage(num_transitions, device=device)
    else:
        data_storage = _memmap_storage(num_transitions, options.scratch_dir)
    with _storage_logs_muted():  # TorchRL logs "Initialized LazyTensorStorage ..." at INFO on the first write
        count = _write(chunks, data_storage, num_transitions, source, options.one_hot_actions, device)
    data = data_storage.get(slice(None))

    episode_ids, episode_index = torch.unique(data.get("episode"), return_inverse=True)
    mean, std, episode_returns, out_of_bounds = _statistics(data, episode_index, episode_ids.numel(), source, options)
    if out_of_bounds is not None and out_of_bounds.count:
        _refuse_or_warn(out_of_bounds, episode_ids, source, options)

    discrete = source.action_space == "discrete"
    bounded = not discrete and bool(np.isfinite(source.action_low).all() and np.isfinite(source.action_high).all())
    already_unit = bounded and bool(np.all(np.asarray(source.action_low) == -1) and np.all(np.asarray(source.action_high) == 1))
    reward_scale, reward_shift = _reward_transform(options.reward_transform, episode_returns)
    metadata = OfflineDataMetadata(
        dataset_id=source.dataset_id,
        env_id=source.env_id,
        env_spec_json=source.env_spec_json,
        ref_min_score=source.ref_min_score,
        ref_max_score=source.ref_max_score,
        observation_dim=int(data.get("observation").shape[-1]),
        observation_keys=source.observation_keys,
        observation_key_shapes=source.observation_key_shapes,
        action_dim=int(source.num_actions) if discrete else len(source.action_low),
        action_low=[float(x) for x in source.action_low],
        action_high=[float(x) for x in source.action_high],
        actions_scaled=bool(options.scale_actions and bounded and not already_unit),
        action_clip_eps=float(options.action_clip_eps) if bounded else 0.0,
        reward_transform=options.reward_transform,
        reward_scale=float(reward_scale),
        reward_shift=float(reward_shift),
        observation_mean=mean.cpu().tolist(),
        observation_std=std.cpu().tolist(),
        observations_normalized=False,
        num_transitions=int(count),
        num_episodes=int(episode_ids.numel()),
        action_space=source.action_space,
        num_actions=source.num_actions,
        one_hot_actions=bool(discrete and options.one_hot_actions),
        reward_goal=source.reward_goal,
        success_terminal=source.success_terminal,
    )
    _transform_in_place(data, metadata, clip_to_box=not options.raw)

    buffer = ReplayBuffer(
        storage=data_storage,
        sampler=RandomSampler(),
        writer=ImmutableDatasetWriter(),
        batch_size=options.batch_size,
    )
    buffer.metadata = metadata
    if options.normalize_observations:
        normalize_stored_observations(buffer)
    return buffer


def normalize_stored_observations(buffer: ReplayBuffer, mean=None, std=None) -> None:
    """Standardises the buffer's ``observation`` and ``("next", "observation")`` in place with
    :meth:`~iql_torchrl.data.OfflineDataMetadata.observation_norm` (TorchRL's ``ObservationNorm``):
    ``(obs - mean) / std``, by default the data's own statistics (the std with its ``+1e-3``), else the
    ``mean`` and ``std`` given (per feature: those another run normalised these data with); the metadata records them.

    Raises :class:`~iql_torchrl.data.DatasetError` for observations normalised already, and for given
    statistics of another size than the observation, non-finite, or with a std that is not positive.
    """
    metadata = buffer.metadata
    if metadata.observations_normalized:
        raise DatasetError(f"The observations of {metadata.dataset_id!r} are normalised already: normalising them "
                           "again would standardise standardised values.")
    if (mean is None) != (std is None):
        raise ValueError("normalize_stored_observations takes both mean and std, or neither (the data's own).")
    if mean is not None:
        _check_statistics(mean, std, metadata)
        metadata = dataclasses.replace(metadata, observation_mean=[float(x) for x in mean],
                                       observation_std=[float(x) for x in std])
    metadata = dataclasses.replace(metadata, observations_normalized=True)
    keys = ["observation", ("next", "observation")]
    data = buffer.storage.get(slice(None))
    norm = metadata.observation_norm(in_keys=keys).to(data.device if data.device is not None else "cpu")
    for start in range(0, metadata.num_transitions, CHUNK_SIZE):
        block = slice(start, start + CHUNK_SIZE)
        normalized = norm(data[block].select(*keys))
        for key in keys:
            data.get(key)[block] = normalized.get(key)
    buffer.metadata = metadata


def _check_statistics(mean, std, metadata: OfflineDataMetadata) -> None:
    for name, values in (("observation_mean", mean), ("observation_std", std)):
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (metadata.observation_dim,):
            raise DatasetError(f"The given {name} has shape {list(values.shape)}, but the observations of "
                               f"{metadata.dataset_id!r} have {metadata.observation_dim} features: these statistics "
                               "belong to other data.")
        if not np.isfinite(values).all():
            raise DatasetError(f"The given {name} holds NaN or inf at feature {int(np.argmin(np.isfinite(values)))}: "
                               "observations cannot be normalised with it.")
    if not (np.asarray(std, dtype=np.float64) > 0).all():
        raise DatasetError(f"The given observation_std is not positive at feature "
                           f"{int(np.argmin(np.asarray(std, dtype=np.float64) > 0))}: observations cannot be divided by it.")


@contextlib.contextmanager
def _storage_logs_muted():
    """TorchRL's INFO lines off while the storage is written; the logger's level is restored after."""
    logger = logging.getLogger("torchrl")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _write(chunks, data_storage, num_transitions: int, source: DataSource, one_hot: bool, device) -> int:
    """Write the raw chunks; discrete indices are range-checked (and one-hot encoded on request)."""
    cursor = 0
    for chunk in chunks:
        count = chunk.batch_size[0]
        if cursor + count > num_transitions:
            raise DatasetError(
                f"Dataset {source.dataset_id!r} holds more steps than its metadata's total_steps "
                f"({num_transitions}); its metadata is corrupt."
            )
        action = chunk.get("action")
        if source.action_space == "discrete":
            check_action_indices(action, chunk.get("episode"), source.num_actions, source.describe())
            if one_hot:
                chunk = chunk.clone(False)
                chunk.set("action", torch.nn.functional.one_hot(action, source.num_actions).to(torch.float32))
        elif action.shape[-1] != len(source.action_low):
            raise DatasetError(
                f"Dataset {source.dataset_id!r}: 'action' has dimension {action.shape[-1]} but "
                f"{source.describe()} has {len(source.action_low)}-dimensional actions."
            )
        data_storage.set(torch.arange(cursor, cursor + count), chunk.to(device))
        cursor += count
    if cursor == 0:
        raise DatasetError(f"Dataset {source.dataset_id!r} has no transitions: there is nothing to learn from.")
    if cursor != num_transitions:
        raise DatasetError(
            f"Dataset {source.dataset_id!r} holds {cursor} steps but its metadata says {num_transitions}; "
            "the file is truncated or its metadata is corrupt."
        )
    return cursor


def _statistics(data: TensorDictBase, episode_index, num_episodes: int, source: DataSource, options: BufferOptions):
    """Observation mean/std, episode returns and (Box, bounded, not raw) out-of-bounds actions."""
    device = data.device if data.device is not None else torch.device("cpu")
    observation_dim = data.get("observation").shape[-1]
    obs_sum = torch.zeros(observation_dim, dtype=torch.float64, device=device)
    episode_returns = torch.zeros(num_episodes, dtype=torch.float64, device=device)
    out_of_bounds = None
    low, high = np.asarray(source.action_low), np.asarray(source.action_high)
    if source.action_space == "box" and not options.raw and np.isfinite(low).all() and np.isfinite(high).all():
        out_of_bounds = OutOfBoundsActions(torch.from_numpy(low), torch.from_numpy(high), num_episodes)
    count = data.batch_size[0]
    for start in range(0, count, CHUNK_SIZE):
        block = slice(start, start + CHUNK_SIZE)
        observation = data.get("observation")[block].to(torch.float64)
        obs_sum += observation.sum(0)
        reward = data.get(("next", "reward"))[block].reshape(-1).to(torch.float64)
        episode_returns.index_add_(0, episode_index[block], reward)
        if out_of_bounds is not None:
            out_of_bounds.add(data.get("action")[block], episode_index[block])
    mean = obs_sum / count
    # a second pass over the deviations (numpy's std, as CORL's compute_mean_std): exactly 0 for a constant feature,
    # where E[x²] − mean² leaves rounding error
    squares = torch.zeros(observation_dim, dtype=torch.float64, device=device)
    for start in range(0, count, CHUNK_SIZE):
        squares += (data.get("observation")[start:start + CHUNK_SIZE].to(torch.float64) - mean).square().sum(0)
    std = (squares / count).sqrt() + OBSERVATION_STD_EPS
    return mean, std, episode_returns, out_of_bounds


def _refuse_or_warn(out_of_bounds: OutOfBoundsActions, episode_ids, source: DataSource, options: BufferOptions):
    bounds = f"[{source.action_low}, {source.action_high}]" if len(source.action_low) > 1 else (
        f"[{source.action_low[0]:g}, {source.action_high[0]:g}]"
    )
    report = f"Field 'action' of {source.describe()}: " + out_of_bounds.describe(episode_ids.cpu(), bounds)
    if not options.clip_actions:
        raise DatasetError(
            report + ". Such actions would be clipped to the bounds, changing the behaviour the data records. "
            "Check the data's action units (e.g. a forgotten rescaling), or pass clip_actions=True "
            "(command line: --clip-actions) to clip them on purpose."
        )
    warnings.warn(report + "; clipped to the bounds (clip_actions=True).", stacklevel=3)


def _reward_transform(name: str, episode_returns: torch.Tensor) -> tuple[float, float]:
    """(scale, shift) of the reward transform."""
    if name == "locomotion":
        spread = float(episode_returns.max() - episode_returns.min())
        if spread <= 0:
            raise DatasetError(
                f"reward_transform='locomotion' scales rewards by 1000 / (max − min episode return), which needs "
                f"episodes with different returns; all {episode_returns.numel()} episodes return "
                f"{float(episode_returns[0]):.6g}. Pass reward_transform='none' (command line: --reward-transform none) "
                "to train on the rewards as stored."
            )
        return 1000.0 / spread, 0.0
    if name == "antmaze":
        return 1.0, -1.0
    return 1.0, 0.0


def _transform_in_place(data: TensorDictBase, metadata: OfflineDataMetadata, clip_to_box: bool) -> None:
    """Apply the metadata's action and reward transforms to the stored data, chunk by chunk."""
    box = metadata.stored_action_box() if clip_to_box else None
    transforms_actions = metadata.actions_scaled or box is not None
    transforms_rewards = metadata.reward_scale != 1.0 or metadata.reward_shift != 0.0
    if not (transforms_actions or transforms_rewards):
        return
    for start in range(0, metadata.num_transitions, CHUNK_SIZE):
        block = slice(start, start + CHUNK_SIZE)
        if transforms_actions:
            action = metadata.action_from_env(data.get("action")[block])
            if box is not None:
                action = torch.maximum(torch.minimum(action, box[1].to(action)), box[0].to(action))
            data.get("action")[block] = action
        if transforms_rewards:
            reward = data.get(("next", "reward"))[block]
            data.get(("next", "reward"))[block] = reward * metadata.reward_scale + metadata.reward_shift
