"""Online interaction in the offline data's terms: environments, exploration policy, mixed replay.

Everything a policy trained on an offline buffer needs to keep learning from its own experience:

* :class:`OfflineDataTransform` -- a TorchRL ``Transform`` that makes the dataset's environment
  speak the buffer's language: observations flattened and cast to float32 (then standardised by the
  offline data's ``ObservationNorm``, its statistics, where the data were), rewards scaled and shifted by
  the same ``reward_scale`` / ``reward_shift``,
  and actions taken in the buffer's space (``[-1, 1]`` when the loader scaled them) mapped to the
  env's bounds with ``metadata.action_to_env``. Every mapping is the metadata's own method, the
  code that transformed the offline data.
* :func:`make_online_env` -- ``num_envs`` copies of the dataset's environment in a TorchRL
  ``SerialEnv`` behind that transform and the data's ``ObservationNorm``, each wrapped in :class:`EpisodeReplay` so a checkpoint can
  rebuild episodes that were running when it was written (:func:`episode_states` /
  :func:`restore_episodes`), and in :class:`SuccessTerminal` where the offline data's successes
  are terminal.
* :func:`make_exploration_policy` -- the actor, sampling (the collector's default exploration
  type), with its actions clipped to the box the offline actions were clipped to, so the action
  stored is the action executed.
* :func:`make_offline_online_buffer` -- TorchRL's ``OfflineToOnlineReplayBuffer``: the offline
  transitions, never modified, and a growing online buffer, every batch drawing exactly
  ``round(online_fraction * batch_size)`` transitions from the online one.

Terminated and truncated stay distinct (gymnasium reports both; TorchRL keeps both), so a
transition cut by the time limit still bootstraps, online as offline.
"""
from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictSequential
from torchrl.data import Bounded, LazyTensorStorage, RandomSampler, ReplayBuffer, TensorStorage, Unbounded
from torchrl.data.replay_buffers.offline_to_online import OfflineToOnlineReplayBuffer
from torchrl.data.replay_buffers.writers import ImmutableDatasetWriter
from torchrl.envs import Compose, GymWrapper, SerialEnv, TransformedEnv
from torchrl.envs.transforms import Transform

from iql_torchrl.data import TRANSITION_KEYS, OfflineDataMetadata

__all__ = [
    "EpisodeReplay",
    "OfflineDataTransform",
    "SuccessTerminal",
    "episode_states",
    "make_exploration_policy",
    "make_offline_online_buffer",
    "make_online_env",
    "restore_episodes",
]


# ------------------------------------------------------------------------------ the environment
class OfflineDataTransform(Transform):
    """Makes the dataset's environment produce transitions shaped and scaled like the offline buffer.

    Observation entries of the env (``"observation"``, or a Dict space's keys in
    ``metadata.observation_keys`` order) become one float32 ``"observation"`` (standardising it, where the
    data were, is the next transform's: :meth:`~iql_torchrl.data.OfflineDataMetadata.observation_norm`); ``"reward"`` becomes ``reward * reward_scale + reward_shift`` in float32; the
    incoming ``"action"`` (the buffer's space) is mapped to the env's bounds. The rollout keeps the
    buffer-space action, so stored online actions live where the offline ones do.
    """

    def __init__(self, metadata: OfflineDataMetadata):
        if metadata.observation_keys:
            keys = [tuple(k.split("/")) if "/" in k else k for k in metadata.observation_keys]
        else:
            keys = ["observation"]
        super().__init__(in_keys=[*keys, "reward"], out_keys=["observation", "reward"],
                         in_keys_inv=["action"], out_keys_inv=["action"])
        self.metadata = metadata
        self.env_observation_keys = keys

    # -- data
    def _observation(self, tensordict: TensorDictBase) -> torch.Tensor:
        source = tensordict if self.metadata.observation_keys else tensordict.get("observation")
        return self.metadata.flatten_observation(source)

    def _call(self, next_tensordict: TensorDictBase) -> TensorDictBase:
        next_tensordict.set("observation", self._observation(next_tensordict))
        reward = next_tensordict.get("reward", None)
        if reward is not None:
            next_tensordict.set("reward", reward.to(torch.float32) * self.metadata.reward_scale + self.metadata.reward_shift)
        return next_tensordict

    forward = _call

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        tensordict_reset.set("observation", self._observation(tensordict_reset))
        return tensordict_reset

    def _inv_call(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get("action", None)
        if action is not None:
            tensordict.set("action", self.metadata.action_to_env(action))
        return tensordict

    # -- specs
    def transform_observation_spec(self, observation_spec):
        batch = observation_spec.shape
        observation_spec["observation"] = Unbounded(
            shape=(*batch, self.metadata.observation_dim), dtype=torch.float32, device=observation_spec.device
        )
        return observation_spec

    def transform_reward_spec(self, reward_spec):
        reward = reward_spec["reward"]
        reward_spec["reward"] = Unbounded(shape=reward.shape, dtype=torch.float32, device=reward.device)
        return reward_spec

    def transform_action_spec(self, action_spec):
        if self.metadata.actions_scaled:
            action = action_spec["action"]
            action_spec["action"] = Bounded(-1.0, 1.0, shape=action.shape, dtype=torch.float32, device=action.device)
        return action_spec


class EpisodeReplay(gym.Wrapper):
    """Remembers how the current episode started and every action since, to rebuild it exactly.

    The environments of the builder datasets (and gymnasium's classic-control and MuJoCo ones)
    are deterministic given their reset and actions; their own randomness is ``np_random``. The
    record is the reset's seed (or the ``np_random`` state before an unseeded reset) and the
    actions; :meth:`replay` re-runs them in a fresh copy, giving the same physics state, step
    count and random state. A checkpoint holds one record per environment (at most one episode of
    actions each).
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self._reset_record: dict | None = None
        self._actions: list[np.ndarray] = []

    def reset(self, *, seed=None, options=None):
        rng_state = None if seed is not None else copy.deepcopy(self.env.unwrapped.np_random.bit_generator.state)
        self._reset_record = {"seed": seed, "options": options, "np_random": rng_state}
        self._actions = []
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        self._actions.append(np.array(action, copy=True))
        return self.env.step(action)

    def record(self) -> dict:
        """The current episode: how it was reset and the actions taken since."""
        return {"reset": copy.deepcopy(self._reset_record), "actions": [a.copy() for a in self._actions]}

    def replay(self, record: dict) -> None:
        """Put the environment back where the recorded episode was."""
        reset = record["reset"]
        if reset["np_random"] is not None:
            self.env.unwrapped.np_random.bit_generator.state = reset["np_random"]
        self.reset(seed=reset["seed"], options=reset["options"])
        for action in record["actions"]:
            self.step(action)


class SuccessTerminal(gym.Wrapper):
    """Ends an episode, terminated, at the first step whose ``info["success"]`` is true: the goal
    absorbing, as in D4RL AntMaze's environments and in offline data loaded with ``success_terminal``."""

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        if "success" not in info:
            raise KeyError(f"{self.env.spec.id if self.env.spec else self.env}: the offline data's successes are terminal, "
                           "but the environment's info has no 'success' to end its episodes at.")
        return observation, reward, bool(terminated or info["success"]), truncated, info


def make_online_env(metadata: OfflineDataMetadata, num_envs: int, seed: int) -> TransformedEnv:
    """``num_envs`` copies of the dataset's environment (seeds ``seed .. seed + num_envs - 1``), as a
    TorchRL env whose transitions have the offline buffer's keys, dtypes and transforms (observations
    standardised with the offline data's statistics, where they were); where the data's successes are
    terminal (``metadata.success_terminal``), so are the environments'."""
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}.")

    def make_one():
        env = metadata.make_env()
        return GymWrapper(EpisodeReplay(SuccessTerminal(env) if metadata.success_terminal else env))

    norm = metadata.observation_norm()
    transform = OfflineDataTransform(metadata) if norm is None else Compose(OfflineDataTransform(metadata), norm)
    env = TransformedEnv(SerialEnv(num_envs, make_one), transform)
    env.set_seed(seed)
    return env


def _episode_replays(env: TransformedEnv) -> list[EpisodeReplay]:
    if env.is_closed:
        raise RuntimeError("the environments are closed (the collector closes them after its last frame).")
    workers = getattr(env.base_env, "_envs", None)  # SerialEnv's in-process workers
    replays = [getattr(w, "_env", None) for w in workers or []]
    if not replays or not all(isinstance(r, EpisodeReplay) for r in replays):
        raise TypeError("expected the env built by make_online_env (a SerialEnv of GymWrapper(EpisodeReplay(...))).")
    return replays


def episode_states(env: TransformedEnv) -> list[dict]:
    """One :meth:`EpisodeReplay.record` per environment: what rebuilds the running episodes."""
    return [replay.record() for replay in _episode_replays(env)]


def restore_episodes(env: TransformedEnv, states: list[dict]) -> None:
    """Replays :func:`episode_states` into the env's (fresh) environments."""
    replays = _episode_replays(env)
    if len(states) != len(replays):
        raise ValueError(f"the checkpoint has {len(states)} environments, this run {len(replays)}.")
    for replay, state in zip(replays, states):
        replay.replay(state)


# ------------------------------------------------------------------------------ the policy
class _ClipAction(torch.nn.Module):
    def __init__(self, low: torch.Tensor, high: torch.Tensor):
        super().__init__()
        self.register_buffer("low", low)
        self.register_buffer("high", high)

    def forward(self, action: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(action, self.high), self.low)


def make_exploration_policy(actor, metadata: OfflineDataMetadata) -> TensorDictSequential:
    """The actor followed by a clip of ``"action"`` to the box stored offline actions were clipped to
    (:meth:`~iql_torchrl.data.OfflineDataMetadata.stored_action_box`; no clip when unbounded).

    The actor keeps its parameters (pass one that shares the trained tensors and the collector
    acts with the current weights after every update, with no copy).
    """
    bounds = metadata.stored_action_box()
    if bounds is None:
        return TensorDictSequential(actor)
    device = next((p.device for p in actor.parameters()), torch.device("cpu"))
    clip = TensorDictModule(_ClipAction(bounds[0].to(device), bounds[1].to(device)), in_keys=["action"], out_keys=["action"])
    return TensorDictSequential(actor, clip)


# ------------------------------------------------------------------------------ the replay buffer
def make_offline_online_buffer(
    offline_data: TensorDictBase,
    *,
    online_capacity: int,
    online_fraction: float,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> OfflineToOnlineReplayBuffer:
    """TorchRL's ``OfflineToOnlineReplayBuffer`` over the offline transitions (not copied) and an
    online ``LazyTensorStorage`` of ``online_capacity`` on ``device``.

    ``sample()`` returns ``batch_size`` transitions (the keys of :data:`~iql_torchrl.data.TRANSITION_KEYS`):
    the first ``batch_size - round(online_fraction * batch_size)`` offline, the rest online
    (all offline while the online buffer is empty). Draws use torch's global generator.
    """
    if not 0.0 < online_fraction < 1.0:
        raise ValueError(f"online_fraction must be in (0, 1), got {online_fraction}.")
    offline = ReplayBuffer(
        storage=TensorStorage(offline_data.select(*TRANSITION_KEYS)),  # same tensors, no copy
        sampler=RandomSampler(),
        writer=ImmutableDatasetWriter(),
    )
    return OfflineToOnlineReplayBuffer(
        offline,
        online_storage=LazyTensorStorage(online_capacity, device=device),
        offline_fraction=1.0 - online_fraction,
        batch_size=batch_size,
    )
