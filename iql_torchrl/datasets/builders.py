"""Local Minari dataset builders: scripted experts, random and degraded policies.

Each builder id ``iql_torchrl/<env>/<kind>-v0`` names an environment and a kind:

* ``expert``: every episode from the scripted expert (:mod:`iql_torchrl.datasets.controllers`);
* ``random``: uniform random actions;
* ``medium``: the degraded expert (:class:`~iql_torchrl.datasets.controllers.DegradedPolicy`:
  Gaussian action noise, and a random action with some probability at each step);
* ``mixed``: the first ``round(expert_fraction * episodes)`` episodes from the expert,
  the rest random (continuous actions) or from a systematically wrong policy (discrete actions:
  CartPole's drifting balancer, MountainCar's mirrored expert; see below).

Episode ``i`` of a dataset built with ``seed=s`` resets the environment with seed ``s + i``
and draws its random/noisy actions from ``numpy.random.default_rng(s + i)``, so any
episode can be reproduced from its recorded seed and its ``policy`` episode attribute
(``dataset.storage.get_episode_metadata([i])``). ``ref_min_score`` and ``ref_max_score``
are the mean returns of the random policy and of the expert over
:data:`REFERENCE_EPISODES` episodes with seeds ``REFERENCE_SEED + j`` (disjoint from the
data), so ``minari.get_normalized_score`` works on every builder dataset.

The default dataset of the main example, :data:`DEFAULT_DATASET`
(``iql_torchrl/pendulum/mixed-v0``), is 200 Pendulum-v1 episodes of 200 steps
(40,000 transitions): 40 expert episodes (20%) and 160 uniform-random ones. Pendulum
episodes always end by truncation at 200 steps (never by termination). A
behaviour-cloning policy averages the expert's swing-up torques with the random ones and
cannot swing up; an offline RL method that weighs actions by their advantage can
recover the expert's behaviour. It builds in a few seconds.

The discrete datasets (``iql_torchrl/cartpole/...`` on ``CartPole-v1``,
``iql_torchrl/mountain-car/...`` on ``MountainCar-v0``) have a ``mixed`` recipe made to mislead
behaviour cloning: few expert episodes next to many episodes of a systematically wrong policy.

* CartPole: 5 expert episodes and 195 of the *drifting* balancer (the expert's rule shifted by a
  bias, :class:`~iql_torchrl.datasets.controllers.CartPoleExpert` with ``bias=±0.2``, replaced by
  a uniform random action with probability 0.3 at each step). It keeps the pole up but lets the
  cart run off the track, off the left end in episodes with even seeds and off the right end in
  odd ones: its episodes end after 77 steps on average (11–119), 62% of them off the track with
  the pole still up, and it acts unlike the expert in 44% of its steps. Its 15,036 transitions
  outnumber the expert's 2,500 six to one, and in the states a drifting cart passes through the
  drifting action is the most frequent one, so cloning keeps drifting. Its random actions put both
  actions in the same states, and the two drift directions cover both sides of the track, which
  is what lets IQL's in-sample values tell the actions apart: those that bring the cart back lead
  to longer episodes. (A drift to one side only, or a wrong policy without random actions, left
  IQL without the data to see the better action: it failed with cloning.)
* MountainCar: 10 expert episodes and 90 of the *mirrored* expert (pushing against the velocity:
  the car stays in the valley for 200 steps).

Uniform random episodes alone would not do: random actions spread over every action, so in the
expert's states the expert's action stays the most frequent one and a greedy cloned policy recovers
the expert. ``benchmarks/README.md`` reports what IQL and cloning score on these sets.

Builds of one dataset id are serialised by a lock file (``.locks/`` in the datasets root): a second
build started while one runs waits for it, then finds the dataset present and refuses (or, with
``overwrite``, replaces it); :func:`ensure_dataset` waits and returns the dataset the first built.

Builders write to a hidden staging folder inside the datasets root and rename the
finished dataset into place, so an interrupted build leaves nothing half-written, and
they refuse to replace an existing dataset unless ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import filelock
import gymnasium as gym
import numpy as np

from iql_torchrl.datasets.controllers import CartPoleExpert, DegradedPolicy, MirroredPolicy, RandomPolicy, make_expert
from iql_torchrl.datasets.locomotion import (
    D4RL_REFERENCE, FRAMES, LOCOMOTION_BUILDERS, LocomotionRecipe, kept_policies, locomotion_episodes,
)
from iql_torchrl.datasets.maze import MAZE_BUILDERS, MazeRecipe, collect_maze_episodes, collection_env_spec, eval_env_spec, maze_reference_returns

__all__ = [
    "BUILDERS",
    "dataset_id_problem",
    "DEFAULT_DATASET",
    "DatasetRecipe",
    "KINDS",
    "REFERENCE_EPISODES",
    "REFERENCE_SEED",
    "build_dataset",
    "build_lock",
    "check_recipe",
    "dataset_exists",
    "ensure_dataset",
    "make_policy",
    "reference_returns",
    "rollout_episode",
]

KINDS = ("expert", "random", "medium", "mixed")
REFERENCE_EPISODES = 50
REFERENCE_SEED = 1_000_000


@dataclass(frozen=True)
class DatasetRecipe:
    """How a builder dataset is made.

    Attributes:
        dataset_id: the Minari id, ``iql_torchrl/<env>/<kind>-v0``.
        env_id: the gymnasium environment.
        kind: ``expert``, ``random``, ``medium`` or ``mixed``.
        episodes: default number of episodes.
        expert_fraction: share of expert episodes (``mixed``; 1 for ``expert``, 0 otherwise).
        noise_std: ``medium`` only, Gaussian action noise (fraction of the half-range).
        random_action_prob: ``medium`` only, per-step probability of a uniform random action.
        other_policy: ``mixed`` only, who plays the non-expert episodes: ``"random"``,
            ``"mirrored"`` (the expert's action mirrored, for discrete actions) or ``"drifting"``
            (CartPole's balancer shifted to run off the track, with random actions).
        preset: the run preset these data ask for (``--preset auto``).
    """

    dataset_id: str
    env_id: str
    kind: str
    episodes: int
    expert_fraction: float = 0.0
    noise_std: float = 0.0
    random_action_prob: float = 0.0
    other_policy: str = "random"
    preset: str = "mujoco"

    def expert_episodes(self, episodes: int) -> int:
        """How many of ``episodes`` episodes come from the expert."""
        if self.kind == "expert":
            return episodes
        if self.kind == "mixed":
            return int(round(self.expert_fraction * episodes))
        return 0

    def policy_name(self, episode: int, episodes: int) -> str:
        """``"expert"``, ``"random"``, ``"medium"``, ``"mirrored"`` or ``"drifting"``: the policy that plays episode ``episode``."""
        if self.kind == "medium":
            return "medium"
        if episode < self.expert_episodes(episodes):
            return "expert"
        return self.other_policy if self.kind == "mixed" else "random"

    def describe(self, episodes: int | None = None) -> str:
        episodes = self.episodes if episodes is None else episodes
        if self.kind == "expert":
            policy = "the scripted expert"
        elif self.kind == "random":
            policy = "uniform random actions"
        elif self.kind == "medium" and self.noise_std == 0:
            policy = f"the scripted expert, replaced by a uniform random action with probability {self.random_action_prob} per step"
        elif self.kind == "medium":
            policy = (
                f"the scripted expert degraded by Gaussian action noise (std {self.noise_std} of the half-range) "
                f"and a uniform random action with probability {self.random_action_prob} per step"
            )
        else:
            expert = self.expert_episodes(episodes)
            other = {"random": "uniform-random", "mirrored": "mirrored-expert (wrong-way)",
                     "drifting": "drifting-balancer (cart runs off the track)"}[self.other_policy]
            policy = (
                f"{expert} scripted-expert episodes ({self.expert_fraction:.0%}) followed by "
                f"{episodes - expert} {other} episodes"
            )
        return f"{episodes} {self.env_id} episodes: {policy}."


# Degradation of the ``medium`` datasets, chosen to land between random and expert.
_MEDIUM = {
    "Pendulum-v1": dict(noise_std=0.3, random_action_prob=0.6),  # normalised score about 53
    "InvertedPendulum-v5": dict(noise_std=0.3, random_action_prob=0.05),  # about 36
    "Reacher-v5": dict(noise_std=0.3, random_action_prob=0.3),  # about 48
    "CartPole-v1": dict(noise_std=0.0, random_action_prob=0.5),  # about 42
    "MountainCar-v0": dict(noise_std=0.0, random_action_prob=0.3),  # about 45
}


def _drifting_cartpole(seed: int) -> CartPoleExpert:
    """Episodes with even seeds drift off the left end of the track (bias +0.2), odd ones off the right."""
    return CartPoleExpert(bias=0.2 if seed % 2 == 0 else -0.2)


# The drifting policies of the discrete ``mixed`` datasets: (the balancer of an episode seed, the
# probability of a uniform random action in its place at each step).
_DRIFTING = {"CartPole-v1": (_drifting_cartpole, 0.3)}
_ENVIRONMENTS = {
    # short name: (env id, {kind: default episodes}, mixed expert fraction, mixed non-expert policy)
    "pendulum": ("Pendulum-v1", dict(expert=50, random=50, medium=50, mixed=200), 0.2, "random"),
    "inverted-pendulum": ("InvertedPendulum-v5", dict(expert=25, random=2000, medium=100, mixed=100), 0.2, "random"),
    "reacher": ("Reacher-v5", dict(expert=400, random=400, medium=400, mixed=400), 0.2, "random"),
    "cartpole": ("CartPole-v1", dict(expert=20, random=500, medium=50, mixed=200), 0.025, "drifting"),
    "mountain-car": ("MountainCar-v0", dict(expert=50, random=50, medium=50, mixed=100), 0.1, "mirrored"),
}


def _make_builders() -> dict[str, DatasetRecipe]:
    builders = {}
    for short_name, (env_id, episodes, mixed_fraction, other_policy) in _ENVIRONMENTS.items():
        for kind in KINDS:
            dataset_id = f"iql_torchrl/{short_name}/{kind}-v0"
            extra = {}
            if kind == "expert":
                extra["expert_fraction"] = 1.0
            elif kind == "mixed":
                extra.update(expert_fraction=mixed_fraction, other_policy=other_policy)
            elif kind == "medium":
                extra.update(_MEDIUM[env_id])
            builders[dataset_id] = DatasetRecipe(dataset_id, env_id, kind, episodes[kind], **extra)
    return builders


BUILDERS: dict[str, DatasetRecipe | MazeRecipe | LocomotionRecipe] = {**_make_builders(), **MAZE_BUILDERS, **LOCOMOTION_BUILDERS}
DEFAULT_DATASET = "iql_torchrl/pendulum/mixed-v0"


# --------------------------------------------------------------------------------------
# Rollouts
# --------------------------------------------------------------------------------------


def make_policy(
    env_id: str, policy_name: str, action_space: gym.spaces.Space, seed: int, recipe: DatasetRecipe | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """The policy that plays one episode: ``"expert"``, ``"random"``, ``"medium"``, ``"mirrored"`` or ``"drifting"``.

    Random, medium and drifting policies draw from ``numpy.random.default_rng(seed)``; a drifting
    episode drifts left for an even ``seed``, right for an odd one.
    """
    rng = np.random.default_rng(seed)
    if policy_name == "expert":
        return make_expert(env_id)
    if policy_name == "random":
        return RandomPolicy(action_space, rng)
    if policy_name == "medium":
        params = _MEDIUM[env_id] if recipe is None else dict(
            noise_std=recipe.noise_std, random_action_prob=recipe.random_action_prob
        )
        return DegradedPolicy(make_expert(env_id), action_space, rng, **params)
    if policy_name == "drifting":
        if env_id not in _DRIFTING:
            raise ValueError(f"No drifting policy for {env_id!r}; available: {sorted(_DRIFTING)}.")
        make_drifting, random_action_prob = _DRIFTING[env_id]
        return DegradedPolicy(make_drifting(seed), action_space, rng, noise_std=0.0, random_action_prob=random_action_prob)
    if policy_name == "mirrored":
        if not isinstance(action_space, gym.spaces.Discrete):
            raise ValueError(f"The mirrored policy needs a Discrete action space; {env_id!r} has {action_space}.")
        return MirroredPolicy(make_expert(env_id), int(action_space.n))
    raise ValueError(f"Unknown policy {policy_name!r}; expected 'expert', 'random', 'medium', 'mirrored' or 'drifting'.")


def rollout_episode(env: gym.Env, policy: Callable, seed: int) -> dict:
    """Play one episode from ``env.reset(seed=seed)``; returns Minari's episode fields and the return."""
    observation, _ = env.reset(seed=seed)
    observations, actions, rewards, terminations, truncations = [observation], [], [], [], []
    while True:
        action = policy(observation)
        observation, reward, terminated, truncated, _ = env.step(action)
        observations.append(observation)
        actions.append(action)
        rewards.append(float(reward))
        terminations.append(bool(terminated))
        truncations.append(bool(truncated))
        if terminated or truncated:
            break
    return dict(
        observations=np.stack(observations),
        actions=np.stack(actions),
        rewards=np.asarray(rewards, dtype=np.float64),
        terminations=np.asarray(terminations),
        truncations=np.asarray(truncations),
        episode_return=float(np.sum(rewards)),
    )


@functools.lru_cache(maxsize=None)
def reference_returns(
    env_id: str, episodes: int = REFERENCE_EPISODES, seed: int = REFERENCE_SEED
) -> tuple[float, float]:
    """Mean returns ``(random policy, scripted expert)`` over ``episodes`` seeded episodes."""
    env = gym.make(env_id)
    means = []
    for policy_name in ("random", "expert"):
        returns = [
            rollout_episode(env, make_policy(env_id, policy_name, env.action_space, seed + j), seed + j)[
                "episode_return"
            ]
            for j in range(episodes)
        ]
        means.append(float(np.mean(returns)))
    env.close()
    return means[0], means[1]


# --------------------------------------------------------------------------------------
# Writing datasets
# --------------------------------------------------------------------------------------


def _datasets_root() -> Path:
    from minari.storage.datasets_root_dir import get_dataset_path

    return get_dataset_path()


def dataset_exists(dataset_id: str) -> bool:
    """Whether a Minari dataset with this id is present under the local datasets root."""
    return (_datasets_root() / dataset_id / "data").exists()


def discrete_actions(dataset_id: str) -> bool | None:
    """Whether a dataset's actions are discrete, read without building or downloading it: from the local
    dataset's action space, or a builder's environment (``None``: known only once the data is there)."""
    from iql_torchrl.datasets.environments import env_action_space

    if dataset_exists(dataset_id):
        import minari

        return isinstance(minari.load_dataset(dataset_id).action_space, gym.spaces.Discrete)
    space = env_action_space(getattr(BUILDERS.get(dataset_id), "env_id", None))
    return None if space is None else isinstance(space, gym.spaces.Discrete)


@contextlib.contextmanager
def _minari_root(path: Path):
    """Point Minari at another datasets root for the duration of the block."""
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous


def _ensure_namespace(dataset_id: str) -> None:
    from minari.dataset.minari_dataset import parse_dataset_id
    from minari.namespace import create_namespace, list_local_namespaces

    namespace = parse_dataset_id(dataset_id)[0]
    if namespace is not None and namespace not in list_local_namespaces():
        create_namespace(namespace)


@contextlib.contextmanager
def build_lock(dataset_id: str, timeout: float = -1):
    """Hold the build lock of ``dataset_id`` (a file under ``<datasets root>/.locks``; waits while
    another process holds it, up to ``timeout`` seconds, forever if negative)."""
    lock_dir = _datasets_root() / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(lock_dir / (dataset_id.replace("/", "--") + ".lock"), timeout=timeout):
        yield


def build_dataset(
    dataset_id: str,
    *,
    episodes: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    reference_episodes: int = REFERENCE_EPISODES,
    progress: bool = True,
):
    """Build a builder dataset (see :data:`BUILDERS`) under ``MINARI_DATASETS_PATH``.

    Args:
        dataset_id: a key of :data:`BUILDERS`, e.g. ``"iql_torchrl/pendulum/mixed-v0"``.
        episodes: number of episodes (default: the recipe's; a locomotion set's, about 1M transitions a policy).
        seed: episode ``i`` uses seed ``seed + i``.
        overwrite: replace an existing dataset with this id (otherwise ``FileExistsError``, also
            when another process finished building it while this one waited for the lock).
        reference_episodes: episodes per policy for ``ref_min_score``/``ref_max_score``.
        progress: show a tqdm progress bar.

    Returns:
        The new ``minari.MinariDataset``.
    """
    if dataset_id not in BUILDERS:
        raise KeyError(f"No builder for {dataset_id!r}; available: {sorted(BUILDERS)}.")
    recipe = BUILDERS[dataset_id]
    episodes = recipe.episodes if episodes is None else int(episodes)
    if episodes is not None and episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}.")
    if reference_episodes < 1:
        raise ValueError(f"reference_episodes must be at least 1 (the reference scores average them), got {reference_episodes}.")
    if seed < 0:
        raise ValueError(f"seed must be at least 0, got {seed}.")
    with build_lock(dataset_id):
        return _build_locked(recipe, episodes, seed, overwrite, reference_episodes, progress)


def _build_locked(recipe, episodes: int, seed: int, overwrite: bool, reference_episodes: int, progress: bool):
    import minari

    dataset_id = recipe.dataset_id
    root = _datasets_root()
    final_path = root / dataset_id
    if final_path.exists() and not overwrite:
        raise FileExistsError(
            f"Dataset {dataset_id!r} already exists at {final_path}; pass overwrite=True (CLI: --overwrite) to replace it."
        )

    algorithm = f"iql_torchrl scripted {recipe.kind} policy"
    requirements = None
    if isinstance(recipe, MazeRecipe):
        episode_buffers, policies = _maze_episodes(recipe, episodes, seed, progress)
        ref_min_score, ref_max_score = maze_reference_returns(recipe.maze, reference_episodes, REFERENCE_SEED)
        env, eval_env = collection_env_spec(recipe.maze), eval_env_spec(recipe.maze)
        requirements = _simulator_requirements("mujoco", "gymnasium-robotics")
    elif isinstance(recipe, LocomotionRecipe):
        episode_buffers, policies = _locomotion_buffers(recipe, episodes, seed, progress)
        ref_min_score, ref_max_score = D4RL_REFERENCE[recipe.task]
        env = eval_env = recipe.env_id
        algorithm = f"iql_torchrl SAC behaviour policies ({recipe.kind})"
        requirements = _simulator_requirements("mujoco")
    else:
        episode_buffers, policies = _scripted_episodes(recipe, episodes, seed, progress)
        ref_min_score, ref_max_score = reference_returns(recipe.env_id, reference_episodes)
        env = eval_env = recipe.env_id
        if str(gym.spec(recipe.env_id).entry_point).startswith("gymnasium.envs.mujoco"):
            requirements = _simulator_requirements("mujoco")

    # this id's staging folders: any left here (a build killed before its cleanup) is stale, the lock being ours
    prefix = f".building-{dataset_id.replace('/', '--')}-"
    for stale in root.glob(f"{prefix}*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging_root = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        with _minari_root(staging_root), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # minari's reminders about unset author fields
            dataset = minari.create_dataset_from_buffers(
                dataset_id,
                episode_buffers,
                env=env,
                eval_env=eval_env,
                algorithm_name=algorithm,
                author="iql_torchrl",
                ref_min_score=ref_min_score,
                ref_max_score=ref_max_score,
                num_episodes_average_score=reference_episodes,
                description=recipe.describe(episodes) + f" Episode i resets with seed {seed} + i.",
                requirements=requirements,
            )
            dataset.storage.update_episode_metadata([{"policy": name} for name in policies])
        _ensure_namespace(dataset_id)
        final_path.parent.mkdir(parents=True, exist_ok=True)
        if final_path.exists():  # overwrite: move the old copy aside, then swap in the new one
            os.rename(final_path, staging_root / ".previous")
        os.rename(staging_root / dataset_id, final_path)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    return minari.load_dataset(dataset_id)


def _simulator_requirements(*packages: str) -> list[str]:
    """The installed versions of the simulator packages, pinned (Minari's ``requirements``): a MuJoCo set's
    episodes differ from one MuJoCo version to the next, so the set records the one that built it."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in packages]


def _scripted_episodes(recipe: DatasetRecipe, episodes: int, seed: int, progress: bool):
    """Episode ``i`` from ``env.reset(seed=seed + i)`` with its recipe's policy: Minari buffers and policy names."""
    import minari
    from tqdm.auto import tqdm

    env = gym.make(recipe.env_id)
    episode_buffers, policies = [], []
    for i in tqdm(range(episodes), desc=f"building {recipe.dataset_id}", unit="episode", disable=not progress):
        policy_name = recipe.policy_name(i, episodes)
        policy = make_policy(recipe.env_id, policy_name, env.action_space, seed + i, recipe)
        episode = rollout_episode(env, policy, seed + i)
        episode.pop("episode_return")
        episode_buffers.append(minari.data_collector.EpisodeBuffer(id=i, seed=seed + i, **episode))
        policies.append(policy_name)
    env.close()
    return episode_buffers, policies


def _maze_episodes(recipe: MazeRecipe, episodes: int, seed: int, progress: bool):
    """The maze recipe's episodes as Minari buffers; a stitching episode records its seed, a long rollout's
    first episode the rollout's."""
    import minari
    from tqdm.auto import tqdm

    with tqdm(total=episodes, desc=f"building {recipe.dataset_id}", unit="episode", disable=not progress) as bar:
        collected = collect_maze_episodes(recipe, episodes, seed, bar.update)
    buffers = [
        minari.data_collector.EpisodeBuffer(
            id=i, seed=(seed + i) if recipe.kind == "stitch" else (seed if i == 0 else None), **episode)
        for i, episode in enumerate(collected)
    ]
    return buffers, ["noisy waypoint controller"] * len(buffers)


def _locomotion_buffers(recipe: LocomotionRecipe, episodes: int | None, seed: int, progress: bool):
    """The locomotion recipe's episodes as Minari buffers, episode ``i`` from seed ``seed + i``, and their policies."""
    import minari
    from tqdm.auto import tqdm

    frames = {"medium-expert": 2 * FRAMES, "medium-replay": kept_policies(recipe.task)["medium"]["frames"]}
    total = episodes * 1000 if episodes else frames.get(recipe.kind, FRAMES)
    with tqdm(total=total, desc=f"building {recipe.dataset_id}", unit="frame", disable=not progress) as bar:
        # episodes end past the frames asked for (or, given a count, before 1,000 steps): the bar stops at its total,
        # which becomes the frames collected when they are all in
        advance = lambda n: bar.update(min(n, bar.total - bar.n))  # noqa: E731
        collected, policies = locomotion_episodes(recipe, episodes, seed, advance)
        bar.total = bar.n = sum(len(episode["actions"]) for episode in collected)
    buffers = [minari.data_collector.EpisodeBuffer(id=i, **episode) for i, episode in enumerate(collected)]
    return buffers, policies


def check_recipe(dataset_id: str) -> None:
    """Refuse a builder dataset on disk that another version of its recipe built.

    A builder writes its recipe into the dataset's description; when the recipe of ``dataset_id``
    has changed since (e.g. other policies in the ``mixed`` set), training on the old data would
    silently not be what the documentation describes.
    """
    import minari

    dataset = minari.load_dataset(dataset_id)
    description = dataset.storage.metadata.get("description") or ""
    expected = BUILDERS[dataset_id].describe(dataset.total_episodes)
    if not description.startswith(expected):
        raise ValueError(
            f"Dataset {dataset_id!r} at {_datasets_root() / dataset_id} was built by another version of its recipe "
            f"({description!r}); this version builds {expected!r}. Rebuild it: "
            f"`python -m iql_torchrl.datasets build {dataset_id} --overwrite`."
        )


def dataset_id_problem(dataset_id: str) -> str | None:
    """Why ``dataset_id`` names no dataset, or ``None``: Minari's id syntax (``namespace/name-vN``), and
    this package's namespace, which only its local builders use (a close builder id is suggested)."""
    from minari.dataset.minari_dataset import parse_dataset_id

    try:
        parse_dataset_id(dataset_id)
    except Exception:  # Minari raises ValueError or TypeError for malformed ids
        return f"not a Minari dataset id: ids read namespace/name-vN, e.g. {DEFAULT_DATASET}"
    namespace = DEFAULT_DATASET.split("/")[0]
    recipe = BUILDERS.get(dataset_id)
    if isinstance(recipe, LocomotionRecipe) and not dataset_exists(dataset_id):
        try:
            kept_policies(recipe.task)
        except FileNotFoundError as missing:
            return f"it is built from behaviour policies this copy of the package does not keep. {missing}"
    if dataset_id.startswith(namespace + "/") and dataset_id not in BUILDERS:
        close = difflib.get_close_matches(dataset_id, BUILDERS, n=1, cutoff=0.8)
        guess = f"did you mean {close[0]}? " if close else ""
        return (f"no local builder has this id ({guess}`python -m iql_torchrl.datasets list` lists them; "
                f"the {namespace}/ namespace is built here, never downloaded)")
    return None


def ensure_dataset(dataset_id: str = DEFAULT_DATASET, **build_kwargs) -> str:
    """Return ``dataset_id``, building it first if it is a builder id that is not present.

    A builder dataset already present must have been built by the current recipe
    (:func:`check_recipe`), else ``ValueError`` says how to rebuild it.

    ``build_kwargs`` go to :func:`build_dataset` (e.g. ``progress=False``). A missing id
    that is not a builder id raises ``FileNotFoundError`` (use
    :func:`iql_torchrl.data.load_minari_dataset`, which can download it).
    """
    if dataset_exists(dataset_id):
        if dataset_id in BUILDERS:
            check_recipe(dataset_id)
        return dataset_id
    if dataset_id not in BUILDERS:
        raise FileNotFoundError(
            f"Dataset {dataset_id!r} is not under {_datasets_root()} and is not one of the builder ids "
            f"{sorted(BUILDERS)}; download it with `minari download {dataset_id}`."
        )
    try:
        build_dataset(dataset_id, **build_kwargs)
    except FileExistsError:  # another process built it while this one waited for the lock
        pass
    return dataset_id
