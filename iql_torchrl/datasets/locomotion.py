"""D4RL-style locomotion datasets from the SAC behaviour policies kept in the package.

Ids ``iql_torchrl/<task>/<kind>-v1`` (and ``-v0``) for the tasks of :data:`~iql_torchrl.datasets.behaviour.ENVIRONMENTS`
(``hopper``, ``walker2d``, ``halfcheetah``) and the kinds of D4RL:

* ``medium``: about 1M transitions of the policy stopped at about a third of the expert's return;
* ``expert``: about 1M transitions of the fully trained policy;
* ``medium-expert``: both sets, medium episodes first;
* ``medium-replay``: what the agent's replay buffer held when it reached medium, in the order it came:
  the first ``warmup_frames`` frames of uniform random actions, then each training snapshot's policy
  for the frames that came after it, up to the medium snapshot.

Every action is sampled from the policy (the stochastic SAC policy, as D4RL recorded its data); episode
``i`` resets with seed ``seed + i``. A ``-v1`` set's policies compute in float64 and its actions are rounded to
float32, so the set is the same on every CPU; a ``-v0`` set's policies compute in float32, whose products round
differently with the CPU's vector instructions (AVX-512, AVX2, none): its episodes diverge from one CPU to another.
A set is written only when its task's policies are kept in ``policies/<task>/`` (``policies.json`` says which
snapshot is medium and which expert, and what each returned: :func:`keep_policies` writes them from a training
folder). Scores read on D4RL's scale:
``ref_min_score`` and ``ref_max_score`` are D4RL's random and expert returns (:data:`D4RL_REFERENCE`).
"""
from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gymnasium as gym
import numpy as np
import torch

from iql_torchrl.datasets.behaviour import ENVIRONMENTS, Snapshot, load_snapshot, snapshot_policy

__all__ = ["D4RL_REFERENCE", "LOCOMOTION_BUILDERS", "LOCOMOTION_KINDS", "LocomotionRecipe", "POLICIES",
           "collect_locomotion_episodes", "evaluate_snapshots", "keep_policies", "kept_policies"]

LOCOMOTION_KINDS = ("medium", "medium-replay", "expert", "medium-expert")
POLICIES = Path(__file__).parent / "policies"
# D4RL's reference returns (its infos.py): the random policy's and the expert's, per task
D4RL_REFERENCE = {"hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3), "halfcheetah": (-280.178953, 12135.0)}
FRAMES = 1_000_000  # transitions in a medium or expert set (each half of medium-expert)
NUM_ENVS = 32  # environments stepped side by side, their observations batched through the policy
EVALUATION_SEED = 10_000_000  # first reset seed of keep-policies' re-evaluation, far from any set's episodes


@dataclass(frozen=True)
class LocomotionRecipe:
    """A locomotion dataset: the task, the kind, and the transitions it holds (``None``: as the kind gives)."""

    dataset_id: str
    task: str
    kind: str
    episodes: int | None = None  # a set made of whole episodes is cut by frames, not episodes
    preset: str = "mujoco"
    policy_dtype: torch.dtype = torch.float64  # what the policies compute in: float32 in -v0 sets

    @property
    def env_id(self) -> str:
        return ENVIRONMENTS[self.task]

    def describe(self, episodes: int | None = None) -> str:
        kept = kept_policies(self.task) if policies_kept(self.task) else None
        if kept is None:
            policies = "SAC behaviour policies not kept in this copy of the package"
        elif self.kind == "medium-replay":
            policies = (f"SAC's first {kept['medium']['frames']} training frames, up to the medium policy: "
                        f"{kept['warmup_frames']} uniform-random frames, then {len(kept['replay'])} training snapshots, "
                        "each for the frames that followed it")
        else:
            named = [name for name in ("medium", "expert") if name in self.kind]
            policies = " then ".join(f"the {name} SAC policy (frame {kept[name]['frames']}, return "
                                     f"{kept[name]['mean_return']:.1f})" for name in named)
        computed = ", computed in float64 and rounded to float32" if self.policy_dtype == torch.float64 else ""
        return f"{self.env_id}, {self.kind}: actions sampled from {policies}{computed}."


def _make_builders() -> dict[str, LocomotionRecipe]:
    versions = {1: torch.float64, 0: torch.float32}
    return {f"iql_torchrl/{task}/{kind}-v{version}": LocomotionRecipe(f"iql_torchrl/{task}/{kind}-v{version}", task, kind,
                                                                    preset=task if task in ("hopper", "walker2d") else "mujoco",
                                                                    policy_dtype=dtype)
            for version, dtype in versions.items() for task in ENVIRONMENTS for kind in LOCOMOTION_KINDS}


LOCOMOTION_BUILDERS = _make_builders()


def policies_kept(task: str) -> bool:
    return (POLICIES / task / "policies.json").exists()


def kept_policies(task: str, root: Path | None = None) -> dict:
    """The task's ``policies.json``: ``medium`` and ``expert`` ({file, frames, mean_return}), ``replay`` (a list
    of them, the medium-replay stages before medium) and ``warmup_frames`` (the training's random frames); ``FileNotFoundError`` names the command that writes them."""
    path = (POLICIES if root is None else root) / task / "policies.json"
    if not path.exists():
        raise FileNotFoundError(
            f"No behaviour policies are kept for {task!r} ({path} is missing): train them with "
            f"`python -m iql_torchrl.datasets train-behaviour {task} FOLDER`, then keep them with "
            f"`python -m iql_torchrl.datasets keep-policies {task} FOLDER`.")
    return json.loads(path.read_text())


def _stages(recipe: LocomotionRecipe, episodes: int | None) -> list[tuple[str, Snapshot | None, int | None, int | None]]:
    """``(policy name, snapshot or None for uniform random, frames, episodes)`` per stage, in the data's order."""
    kept = kept_policies(recipe.task)
    load = lambda entry: load_snapshot(POLICIES / recipe.task / entry["file"])  # noqa: E731
    if recipe.kind in ("medium", "expert"):
        return [(recipe.kind, load(kept[recipe.kind]), None if episodes else FRAMES, episodes)]
    if recipe.kind == "medium-expert":
        if episodes is None:
            return [("medium", load(kept["medium"]), FRAMES, None), ("expert", load(kept["expert"]), FRAMES, None)]
        half = (episodes + 1) // 2
        return [("medium", load(kept["medium"]), None, half), ("expert", load(kept["expert"]), None, episodes - half)]
    # each frame of the training came from the latest snapshot at or before it (uniform random before warm-up ended)
    warmup = kept["warmup_frames"]
    starts = {0: ("random", None)}
    for entry in kept["replay"]:
        starts[max(entry["frames"], warmup)] = (f"frame {entry['frames']}", entry)
    bounds = sorted(starts) + [kept["medium"]["frames"]]
    stages = [(starts[a][0], None if starts[a][1] is None else load(starts[a][1]), b - a, None)
              for a, b in zip(bounds, bounds[1:])]
    stages = [stage for stage in stages if stage[2] > 0]
    if episodes is not None:  # the first ``episodes`` episodes: one stage after another, one episode each at most
        stages = [(name, snap, None, 1) for name, snap, _, _ in stages][:episodes]
        stages += [stages[-1]] * (episodes - len(stages))
    return stages


def _action_space(env_id: str) -> gym.spaces.Box:
    env = gym.make(env_id)
    env.close()
    return env.action_space


def _sampler(snapshot: Snapshot | None, env_id: str, action_space: gym.spaces.Box, dtype: torch.dtype):
    """Batched observations → float32 actions: the snapshot's stochastic policy (TorchRL's actor, sampling, computing
    in ``dtype``), or uniform random actions; both draw from torch's global generator."""
    from tensordict import TensorDict
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    low = torch.as_tensor(action_space.low, dtype=torch.float32)
    high = torch.as_tensor(action_space.high, dtype=torch.float32)
    if snapshot is None:
        return lambda obs: (low + (high - low) * torch.rand(len(obs), len(low))).numpy()
    actor = snapshot_policy(snapshot, env_id).to(dtype)

    def sample(obs: np.ndarray) -> np.ndarray:
        batch = TensorDict(observation=torch.as_tensor(obs, dtype=dtype), batch_size=[len(obs)])
        with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
            return actor(batch)["action"].to(torch.float32).numpy()

    return sample


def collect_locomotion_episodes(
    env_id: str, sampler: Callable[[np.ndarray], np.ndarray], first_seed: int, *, frames: int | None = None,
    episodes: int | None = None, progress: Callable[[int], None] = lambda n: None,
) -> list[dict]:
    """Whole episodes from ``env.reset(seed=first_seed + i)``, :data:`NUM_ENVS` stepped side by side, until they
    hold ``frames`` transitions (no episode starts once that many are reached or under way) or number ``episodes``.

    Returns Minari's episode fields in episode order, each with its ``seed``."""
    if (frames is None) == (episodes is None):
        raise ValueError("give frames or episodes")
    envs = [gym.make(env_id) for _ in range(NUM_ENVS if episodes is None else min(NUM_ENVS, episodes))]
    running: dict[int, dict] = {}  # env slot → the episode it plays
    done: list[dict] = []
    started, under_way = 0, 0

    def start(slot: int) -> None:
        nonlocal started
        seed = first_seed + started
        observation, _ = envs[slot].reset(seed=seed)
        running[slot] = dict(seed=seed, observations=[observation], actions=[], rewards=[], terminations=[], truncations=[])
        started += 1

    def may_start() -> bool:
        return started < episodes if frames is None else under_way < frames

    for slot in range(len(envs)):
        if may_start():
            start(slot)
    while running:
        slots = sorted(running)
        actions = sampler(np.stack([running[s]["observations"][-1] for s in slots]))
        for slot, action in zip(slots, actions):
            episode = running[slot]
            observation, reward, terminated, truncated, _ = envs[slot].step(action)
            for key, value in (("observations", observation), ("actions", action), ("rewards", float(reward)),
                               ("terminations", bool(terminated)), ("truncations", bool(truncated))):
                episode[key].append(value)
            under_way += 1
            if terminated or truncated:
                progress(len(episode["actions"]))
                done.append(running.pop(slot))
                if may_start():
                    start(slot)
    for env in envs:
        env.close()
    done.sort(key=lambda e: e["seed"])
    return [dict(seed=e["seed"], observations=np.stack(e["observations"]), actions=np.stack(e["actions"]).astype(np.float32),
                 rewards=np.asarray(e["rewards"]), terminations=np.asarray(e["terminations"]),
                 truncations=np.asarray(e["truncations"])) for e in done]


def locomotion_episodes(recipe: LocomotionRecipe, episodes: int | None, seed: int, progress: Callable[[int], None]):
    """The recipe's episodes (Minari's fields, each with its seed) and, per episode, the policy that played it.

    The policies run on one thread (torch's count given back after): a product split over threads may round
    otherwise (seen on an AVX2 CPU), the episodes diverge from there, and a set would depend on the machine's cores."""
    action_space = _action_space(recipe.env_id)
    collected, names = [], []
    with torch.random.fork_rng(devices=[]), _threads(1):  # the actions' draws: one stream from the build's seed
        torch.manual_seed(seed)
        for name, snapshot, frames, count in _stages(recipe, episodes):
            if count == 0:
                continue
            sampler = _sampler(snapshot, recipe.env_id, action_space, recipe.policy_dtype)
            part = collect_locomotion_episodes(recipe.env_id, sampler, seed + len(collected), frames=frames,
                                               episodes=count, progress=progress)
            collected += part
            names += [name] * len(part)
    return collected, names


@contextlib.contextmanager
def _threads(count: int):
    """torch's CPU threads set to ``count`` inside, given back after."""
    own = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(own)


def evaluate_snapshots(task: str, files: list[Path], episodes: int, progress: bool = True) -> dict[Path, float]:
    """Each snapshot's mean return over ``episodes`` fresh episodes of its stochastic policy (resets seeded from
    :data:`EVALUATION_SEED`, actions from one stream seeded 0), the episodes of all snapshots under one bar."""
    from tqdm import tqdm

    env_id = ENVIRONMENTS[task]
    action_space = _action_space(env_id)
    returns = {}
    with torch.random.fork_rng(devices=[]), tqdm(total=len(files) * episodes, unit="episode", disable=not progress,
                                                  desc=f"re-evaluating {task}'s snapshots") as bar:
        torch.manual_seed(0)
        for path in files:
            # in float32, as policies.json's returns were measured
            sampler = _sampler(load_snapshot(path), env_id, action_space, torch.float32)
            played = collect_locomotion_episodes(env_id, sampler, EVALUATION_SEED, episodes=episodes,
                                                 progress=lambda n: bar.update())
            returns[path] = float(np.mean([episode["rewards"].sum() for episode in played]))
    return returns


def keep_policies(task: str, folder: str | Path, *, medium_frames: int | None = None,
                  expert_frames: int | None = None, episodes: int = 10, root: Path | None = None,
                  progress: bool = True) -> dict:
    """Copy a training folder's snapshots into the package: the expert, the medium, and every snapshot before the
    medium one (medium-replay's stages). Returns what it wrote to ``policies.json``.

    A snapshot's return is re-measured over ``episodes`` episodes (0: the training log's, 5 episodes, which swing
    by thousands on hopper). The expert (``expert_frames``) defaults to the highest return; the medium
    (``medium_frames``) to the first snapshot within 25% of a third of the expert's return (a spike far above a
    third is not medium data), else the one closest to a third."""
    folder = Path(folder)
    files = sorted((folder / "snapshots").glob("frames-*.pt"))
    if not files:
        raise FileNotFoundError(f"{folder / 'snapshots'} holds no snapshots: train first with "
                                f"`python -m iql_torchrl.datasets train-behaviour {task} {folder}`.")
    entries = {path: load_snapshot(path) for path in files}
    by_frames = {snap.frames: path for path, snap in entries.items()}

    for frames, what in ((expert_frames, "expert"), (medium_frames, "medium")):  # before minutes of measuring
        if frames is not None and frames not in by_frames:
            raise ValueError(f"--{what}-frames {frames}: no snapshot at that frame; there are {sorted(by_frames)}.")
    logged = {path: snap.mean_return for path, snap in entries.items()}
    measured = evaluate_snapshots(task, files, episodes, progress) if episodes else logged
    expert = by_frames[expert_frames] if expert_frames is not None else max(files, key=measured.get)
    third = measured[expert] / 3

    def default_medium() -> Path:
        near = [path for path in files if abs(measured[path] - third) <= 0.25 * abs(third)]
        return near[0] if near else min(files, key=lambda path: abs(measured[path] - third))

    medium = by_frames[medium_frames] if medium_frames is not None else default_medium()
    target = (POLICIES if root is None else root) / task
    shutil.rmtree(target, ignore_errors=True)
    (target / "replay").mkdir(parents=True)
    describe = lambda path, name: dict(file=name, frames=entries[path].frames,  # noqa: E731
                                       mean_return=round(measured[path], 2), logged_return=round(logged[path], 2))
    warmup = json.loads((folder / "settings.json").read_text())["warmup_frames"]
    kept = {"medium": describe(medium, "medium.pt"), "expert": describe(expert, "expert.pt"), "replay": [],
            "warmup_frames": warmup, "evaluation_episodes": episodes}
    shutil.copyfile(medium, target / "medium.pt")
    shutil.copyfile(expert, target / "expert.pt")
    for path in files:
        if entries[path].frames < entries[medium].frames:
            shutil.copyfile(path, target / "replay" / path.name)
            kept["replay"].append(describe(path, f"replay/{path.name}"))
    (target / "policies.json").write_text(json.dumps(kept, indent=1) + "\n")
    return kept
