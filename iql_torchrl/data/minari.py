"""Minari datasets read episode by episode into TorchRL transitions, and into offline buffers.

``minari.load_dataset(...).iterate_episodes()`` is read directly: TorchRL's
``MinariExperienceReplay`` is not used because, for local datasets, version 0.14.1 has been seen
filling correctly shaped tensors with zeros. A missing remote dataset is downloaded when Minari's
server answers; a missing builder dataset is never downloaded (build it locally).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Iterable, Iterator

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict
from torchrl.data import ReplayBuffer

from iql_torchrl.data.buffer import BufferOptions, DataSource, action_space_fields, build_buffer
from iql_torchrl.data.checks import DatasetError, check_finite
from iql_torchrl.datasets.environments import env_action_space
from iql_torchrl.data.goals import ACHIEVED_KEY, GOAL_KEY, check_same_maze, fixed_goal, relabelled_rewards
from iql_torchrl.data.metadata import flatten_observation

__all__ = ["load_minari_dataset", "read_minari_transitions", "is_fixed_goal_data"]


# --------------------------------------------------------------------------------------
# Opening (and downloading) a dataset
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
        "(Minari's remote needs this package's [remote] extra: `pip install 'iql_torchrl[remote]'`, which "
        "installs minari[hf]), then copy its folder "
        f"to {data_path.parent} or point MINARI_DATASETS_PATH at the datasets root that holds it. "
        "Datasets this package can build offline are listed by `python -m iql_torchrl.datasets list`."
    )


def _open_minari_dataset(dataset_id: str, download: bool):
    """Open a local Minari dataset, downloading it when allowed and possible."""
    import minari
    from minari.storage.datasets_root_dir import get_dataset_path

    from iql_torchrl.datasets import BUILDERS, dataset_id_problem

    problem = dataset_id_problem(dataset_id)
    if problem is not None:
        raise ValueError(f"Dataset {dataset_id!r}: {problem}.")
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


# --------------------------------------------------------------------------------------
# Episodes to transitions
# --------------------------------------------------------------------------------------


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


def _episode_actions(episode, num_steps: int, discrete: bool) -> torch.Tensor:
    """Box actions as float32 ``[T, act_dim]``; discrete ones as int64 indices ``[T]``."""
    if not isinstance(episode.actions, np.ndarray):
        raise DatasetError(
            f"Episode {episode.id}: actions are a {type(episode.actions).__name__}; only Box and Discrete "
            "action spaces are supported."
        )
    if not discrete:
        return torch.from_numpy(np.asarray(episode.actions, dtype=np.float32).reshape(num_steps, -1))
    actions = np.asarray(episode.actions)
    if not np.issubdtype(actions.dtype, np.integer):
        raise DatasetError(
            f"Episode {episode.id}: the action space is Discrete but 'action' holds {actions.dtype} values; "
            "a discrete dataset stores integer action indices."
        )
    return torch.from_numpy(actions.astype(np.int64).reshape(num_steps))


def _episode_to_transitions(episode, layout: tuple[list[str] | None, list[list[int]]], discrete: bool,
                            reward_goal: list[float] | None = None, success_terminal: bool = False) -> TensorDict:
    """One Minari episode -> TorchRL transitions (raw values; floats as float32); with ``reward_goal``, the
    rewards relabelled to that fixed goal, and with ``success_terminal`` the successes among them terminated."""
    observations = flatten_observation(episode.observations, *layout)
    num_steps = len(episode.rewards)
    rewards = episode.rewards
    if reward_goal is not None:
        rewards = relabelled_rewards(episode.observations[ACHIEVED_KEY][1:], reward_goal, f"Episode {episode.id}")
    if observations.shape[0] != num_steps + 1:
        raise DatasetError(
            f"Episode {episode.id}: {observations.shape[0]} observations for {num_steps} steps "
            "(Minari stores one more observation than steps)."
        )
    terminations = np.asarray(episode.terminations, dtype=bool)
    if success_terminal:
        terminations = terminations | (np.asarray(rewards) > 0)
    terminated = torch.as_tensor(terminations).reshape(num_steps, 1)
    truncated = torch.as_tensor(np.asarray(episode.truncations, dtype=bool)).reshape(num_steps, 1)
    observations = torch.from_numpy(observations)
    return TensorDict(
        {
            "observation": observations[:-1],
            "action": _episode_actions(episode, num_steps, discrete),
            "episode": torch.full((num_steps,), int(episode.id), dtype=torch.int64),
            "next": {
                "observation": observations[1:],
                "reward": torch.as_tensor(np.asarray(rewards, dtype=np.float32)).reshape(num_steps, 1),
                "done": terminated | truncated,
                "terminated": terminated,
                "truncated": truncated,
            },
        },
        batch_size=[num_steps],
    )


def _iterate_minari_transitions(dataset, layout, discrete: bool, reward_goal=None,
                                success_terminal: bool = False) -> Iterator[TensorDict]:
    """Transitions of each episode, checked; errors name the episode and the field."""
    path = dataset.storage.data_path
    try:
        for episode in dataset.iterate_episodes():
            if len(episode.rewards) == 0:
                continue
            transitions = _episode_to_transitions(episode, layout, discrete, reward_goal, success_terminal)
            check_finite(transitions, episode_label=f"episode {episode.id}")
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


def _is_discrete(space: gym.Space) -> bool:
    return isinstance(space, gym.spaces.Discrete)


def read_minari_transitions(dataset_id: str, *, download: bool = True) -> TensorDict:
    """All transitions of a Minari dataset, untransformed (Dict observations flattened).

    Values equal the Minari source: floats cast to float32, discrete actions as int64 indices
    ``[N]``. Useful to inspect data or to feed :func:`~iql_torchrl.data.make_offline_buffer`
    after your own edits.
    """
    dataset = _open_minari_dataset(dataset_id, download)
    layout = _observation_layout(dataset.observation_space)
    episodes = list(_iterate_minari_transitions(dataset, layout, _is_discrete(dataset.action_space)))
    if not episodes:
        raise DatasetError(f"Minari dataset {dataset_id!r} has no transitions.")
    return torch.cat(episodes, 0)


# --------------------------------------------------------------------------------------
# Loading into a buffer
# --------------------------------------------------------------------------------------


def _env_spec_of(dataset):
    """The evaluation env spec recorded with the dataset, else the collection env spec."""
    return getattr(dataset, "_eval_env_spec", None) or dataset.env_spec


def is_fixed_goal_data(dataset_id: str) -> bool | None:
    """Whether a dataset on disk is goal-reaching data with one fixed evaluation goal: Dict observations
    with ``achieved_goal`` and ``desired_goal``, and an evaluation env whose maze has a single goal cell
    (the shape of D4RL's maze2d and AntMaze). Reads the dataset's spaces and specs only, never downloads:
    ``None`` when the dataset is not on disk, ``False`` when it cannot be read."""
    try:
        dataset = _open_minari_dataset(dataset_id, download=False)
    except FileNotFoundError:  # not on disk (nothing is downloaded here)
        return None
    except (OSError, ValueError):  # a malformed id, an unreadable dataset (DatasetError is a ValueError)
        return False
    keys = _observation_layout(dataset.observation_space)[0] or []
    return GOAL_KEY in keys and ACHIEVED_KEY in keys and fixed_goal(_env_spec_of(dataset)) is not None


def unmet_requirements(dataset_id: str) -> list[str]:
    """The package versions a dataset on disk records as its requirements (Minari's ``requirements``: those
    that made it, e.g. ``mujoco==3.17.0``) that the installed packages do not meet, each with what is installed."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import InvalidRequirement, Requirement

    unmet = []
    for text in _open_minari_dataset(dataset_id, download=False).storage.metadata.get("requirements") or []:
        try:
            requirement = Requirement(text)
            installed = version(requirement.name)
        except InvalidRequirement:
            continue
        except PackageNotFoundError:
            installed = None
        if installed is None or not requirement.specifier.contains(installed, prereleases=True):
            unmet.append(f"{text} (installed: {installed or 'none'})")
    return unmet


def _goal_input(dataset_id: str, layout, env_spec, wanted: bool | None):
    """``(layout, reward_goal)``: the flattening without ``desired_goal`` and the fixed goal to relabel the
    rewards to, when the goal stays out of the policy's input; the layout unchanged and ``None`` otherwise."""
    from iql_torchrl.datasets import BUILDERS

    keys, shapes = layout
    goal_entries = [key for key in keys or () if key.startswith(f"{GOAL_KEY}/")]
    if goal_entries:  # a dict of goals (D4RL/kitchen's tasks): in the input, flattened like the rest
        if wanted is False:
            raise DatasetError(
                f"Dataset {dataset_id!r}: goal_in_observation=False (--goal-input no) relabels the rewards to one "
                f"fixed '{GOAL_KEY}' array, but its '{GOAL_KEY}' is a dict of entries ({', '.join(goal_entries)}). "
                "Keep the goal in the input (--goal-input yes, or auto)."
            )
        return layout, None
    if keys is None or GOAL_KEY not in keys:
        if wanted is not None:
            raise DatasetError(
                f"Dataset {dataset_id!r}: goal_in_observation={wanted} (--goal-input {'yes' if wanted else 'no'}) "
                f"chooses where goal data's '{GOAL_KEY}' goes, but its observations have no such entry "
                f"(they are {'one array' if keys is None else keys}). Leave the option at its default (auto)."
            )
        return layout, None
    goal = fixed_goal(env_spec)
    if wanted is None:
        wanted = getattr(BUILDERS.get(dataset_id), "goal_in_observation", goal is None)
    if wanted:
        return layout, None
    if goal is None:
        raise DatasetError(
            f"Dataset {dataset_id!r}: leaving '{GOAL_KEY}' out of the observation relabels the rewards to the "
            f"evaluation env's fixed goal, but its env ({getattr(env_spec, 'id', None)}) has no single goal cell "
            "('g' in its maze_map). Keep the goal in the input (--goal-input yes)."
        )
    if ACHIEVED_KEY not in keys:
        raise DatasetError(
            f"Dataset {dataset_id!r}: leaving '{GOAL_KEY}' out relabels the rewards from '{ACHIEVED_KEY}', "
            f"which its observations lack (they have {keys})."
        )
    kept = [(key, shape) for key, shape in zip(keys, shapes) if key != GOAL_KEY]
    return ([key for key, _ in kept], [shape for _, shape in kept]), goal


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def _evaluation_action_space(dataset_id: str, action_space: gym.Space, env_spec) -> gym.Space:
    """The environment's action space (its bounds are what evaluation acts in), checked against the
    dataset's; the dataset's own when the environment cannot be created here."""
    env_space = env_action_space(env_spec)
    if env_space is None:
        return action_space
    if type(env_space) is not type(action_space) or (
        _is_discrete(action_space) and env_space.n != action_space.n
    ):
        raise DatasetError(
            f"Dataset {dataset_id!r}: 'action' lives in {action_space} but environment {env_spec.id!r} "
            f"takes {env_space}. The dataset does not belong to this environment."
        )
    if env_space.shape != action_space.shape:
        raise DatasetError(
            f"Dataset {dataset_id!r}: 'action' has shape {action_space.shape} but environment "
            f"{env_spec.id!r} expects {env_space.shape}. The dataset does not belong to this environment."
        )
    return env_space


def load_minari_dataset(
    dataset_id: str, options: BufferOptions | None = None, *, download: bool = True, **option_overrides
) -> ReplayBuffer:
    """Load a Minari dataset into a TorchRL replay buffer (transforms applied once, here).

    Local datasets under ``MINARI_DATASETS_PATH`` (default ``~/.minari/datasets``) load
    without network. A missing remote id is downloaded with ``minari.download_dataset``
    when the remote server answers; otherwise a ``FileNotFoundError`` says where it looked
    and how to get the data. Missing ids of this package's builders (``iql_torchrl/...``)
    are not downloaded: build them with ``python -m iql_torchrl.datasets build ID``.

    Box and ``Discrete(n)`` action spaces are supported (discrete actions become int64 indices
    ``[N]``, each checked to lie in ``[0, n)``, or float32 one-hot ``[N, n]`` with
    ``one_hot_actions=True``); other spaces are refused with the reason.

    Goal-reaching data (``desired_goal`` among the Dict observation's entries): see
    :mod:`iql_torchrl.data.goals` for ``goal_in_observation``; an evaluation env whose maze walls differ
    from the data's is refused.

    Args:
        dataset_id: Minari id, e.g. ``"iql_torchrl/pendulum/mixed-v0"`` or ``"mujoco/hopper/medium-v0"``.
        options: a :class:`~iql_torchrl.data.BufferOptions`; keyword arguments named after its
            fields (``batch_size``, ``device``, ``storage``, ``scratch_dir``, ``reward_transform``,
            ``normalize_observations``, ``scale_actions``, ``action_clip_eps``, ``raw``,
            ``clip_actions``, ``one_hot_actions``, ``goal_in_observation``, ``success_terminal``) replace single fields.
        download: allow downloading a missing non-builder dataset.

    Returns:
        A ``ReplayBuffer`` (``RandomSampler``, read-only writer) with a ``metadata``
        attribute of type :class:`~iql_torchrl.data.OfflineDataMetadata`.
    """
    options = BufferOptions.merge(options, **option_overrides)
    dataset = _open_minari_dataset(dataset_id, download)
    action_space_fields(dataset.action_space, f"Dataset {dataset_id!r}")  # refuses unsupported spaces first
    env_spec = _env_spec_of(dataset)
    action_space = _evaluation_action_space(dataset_id, dataset.action_space, env_spec)
    action_fields = action_space_fields(action_space, f"Dataset {dataset_id!r}")
    check_same_maze(dataset_id, dataset.env_spec, env_spec)
    layout, reward_goal = _goal_input(
        dataset_id, _observation_layout(dataset.observation_space), env_spec, options.goal_in_observation)
    success_terminal = reward_goal is not None if options.success_terminal is None else options.success_terminal
    if success_terminal and reward_goal is None:
        raise DatasetError(
            f"Dataset {dataset_id!r}: success_terminal (--success-terminal) marks the transitions that reach the "
            "evaluation env's fixed goal terminated, which needs goal data with the goal out of the input and "
            f"rewards relabelled to that goal; here the rewards are the dataset's own ("
            + ("the goal stays in the input: use --goal-input no" if layout[0] and GOAL_KEY in layout[0]
               else f"no '{GOAL_KEY}' in the observations, or no single fixed goal") + ")."
        )
    source = DataSource(
        dataset_id=dataset_id,
        env_id=env_spec.id if env_spec is not None else None,
        env_spec_json=env_spec.to_json() if env_spec is not None else None,
        ref_min_score=_optional_float(dataset.storage.metadata.get("ref_min_score")),
        ref_max_score=_optional_float(dataset.storage.metadata.get("ref_max_score")),
        observation_keys=layout[0],
        observation_key_shapes=layout[1],
        reward_goal=reward_goal,
        success_terminal=success_terminal,
        **action_fields,
    )
    episodes = _iterate_minari_transitions(dataset, layout, _is_discrete(dataset.action_space), reward_goal,
                                           success_terminal)
    return build_buffer(
        _concatenate_in_chunks(episodes), num_transitions=dataset.total_steps, source=source, options=options
    )
