"""PointMaze datasets built locally, the way D4RL's maze2d and Minari's D4RL/pointmaze sets are.

``iql_torchrl/pointmaze/{umaze,medium,large}-v0`` (gymnasium-robotics' ``PointMaze``: a MuJoCo point
mass, actions = forces in ``[-1, 1]²``): one long rollout seeded by the build seed. Value iteration
over the maze's cells picks the next waypoint toward the current goal (the centre of the next cell on
a shortest path, the goal itself inside the goal's cell); a PD controller
(:class:`~iql_torchrl.datasets.maze_geometry.WaypointController`) follows it with Gaussian action noise. When the point comes within
0.45 of the goal (reward 1, ``info["success"]``) the episode is cut there (truncated, not
terminated: the task goes on) and a new random goal is drawn; a goal not reached in
``max_goal_steps`` steps is replaced the same way. Observations are the environment's dicts
(``observation`` = position and velocity, ``achieved_goal`` = position, ``desired_goal`` = the
current goal), stored as Minari stores them; the reward is the environment's sparse reward for
the current goal.

``iql_torchrl/pointmaze/medium-stitch-v0``: only short episodes, each from a random cell to a goal cell
at most :data:`STITCH_MAX_CELLS` cells away (by the maze's shortest path), cut at success or after
``max_goal_steps``. No episode visits both the evaluation's start cell and its goal cell (checked at
build time): reaching the far goal needs pieces of many episodes, which is what the expectile's
stitching claims to do.

Evaluation (every set): the same maze, the start cell and the far goal cell fixed (:data:`MAZES`),
the goal kept after success (``continuing_task=True, reset_target=False``), so the sparse reward
accumulates while the point stays at the goal, for D4RL's episode lengths (300 / 600 / 800 steps).
``ref_min_score`` is the mean return of uniform random actions there, ``ref_max_score`` that of the
noise-free controller.

Goal in the policy's input: each recipe declares ``goal_in_observation``; every set here says
``False`` (D4RL's maze2d convention: the policy sees position and velocity, and the loader relabels
the rewards to the evaluation's fixed goal, see :mod:`iql_torchrl.data.goals`). ``--goal-input yes``
keeps ``desired_goal`` and the stored rewards (goal-conditioned learning).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from iql_torchrl.datasets.environments import make_env
from iql_torchrl.datasets.maze_geometry import (
    MAZES,
    Maze,
    WaypointController,
    cell_center,
    cell_distances,
    cell_of,
    open_cells,
)

__all__ = [
    "MAZE_BUILDERS",
    "MazeRecipe",
    "STITCH_MAX_CELLS",
    "collect_maze_episodes",
    "collection_env_spec",
    "eval_env_spec",
    "maze_reference_returns",
]

SUCCESS_RADIUS = 0.45  # PointMaze's sparse reward and info["success"]
STITCH_MAX_CELLS = 2
POINT_MAZE_ENTRY_POINT = "gymnasium_robotics.envs.maze.point_maze:PointMazeEnv"


# --------------------------------------------------------------------------------------
# Environments
# --------------------------------------------------------------------------------------


def _spec(maze: Maze, maze_map, max_episode_steps: int | None) -> gym.envs.registration.EnvSpec:
    return gym.envs.registration.EnvSpec(
        id=f"{maze.env_name}-v3",
        entry_point=POINT_MAZE_ENTRY_POINT,
        max_episode_steps=max_episode_steps,
        kwargs=dict(maze_map=[list(row) for row in maze_map], reward_type="sparse", continuing_task=True,
                    reset_target=False),
    )


def collection_env_spec(maze_name: str) -> gym.envs.registration.EnvSpec:
    """The environment the data is collected in: the plain maze, goals set by the builder, no time limit."""
    maze = MAZES[maze_name]
    return _spec(maze, maze.walls, None)


def eval_env_spec(maze_name: str) -> gym.envs.registration.EnvSpec:
    """The evaluation environment: start cell ``"r"``, goal cell ``"g"``, the goal kept after success."""
    maze = MAZES[maze_name]
    maze_map = [list(row) for row in maze.walls]
    maze_map[maze.eval_start[0]][maze.eval_start[1]] = "r"
    maze_map[maze.eval_goal[0]][maze.eval_goal[1]] = "g"
    return _spec(maze, maze_map, maze.eval_steps)


# --------------------------------------------------------------------------------------
# Recipes and rollouts
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MazeRecipe:
    """How a maze dataset is made.

    Attributes:
        dataset_id: ``iql_torchrl/pointmaze/<name>-v0``.
        maze: a key of :data:`MAZES`.
        kind: ``"navigate"`` (one long rollout, a new random goal after each success) or ``"stitch"``
            (short episodes between cells at most :data:`STITCH_MAX_CELLS` apart).
        episodes: default number of episodes.
        noise_std: the controller's Gaussian action noise.
        max_goal_steps: steps before an unreached goal is given up (the episode is cut there).
        goal_in_observation: whether ``desired_goal`` is part of the policy's input by default.
        preset: the run preset these data ask for (``--preset auto``).
    """

    dataset_id: str
    maze: str
    kind: str
    episodes: int
    noise_std: float = 0.5
    max_goal_steps: int = 300
    goal_in_observation: bool = False
    preset: str = "maze"

    @property
    def env_id(self) -> str:
        return f"{MAZES[self.maze].env_name}-v3"

    def describe(self, episodes: int | None = None) -> str:
        episodes = self.episodes if episodes is None else episodes
        maze = MAZES[self.maze]
        if self.kind == "stitch":
            how = (f"short episodes from a random cell to a goal cell at most {STITCH_MAX_CELLS} cells away, "
                   f"none visiting both the evaluation's start cell {maze.eval_start} and goal cell {maze.eval_goal}")
        else:
            how = "one rollout, a new random goal cell after each success"
        return (f"{episodes} {self.env_id} episodes: {how}; waypoints from value iteration over the cells, a PD "
                f"controller with Gaussian action noise (std {self.noise_std}); each episode cut (truncated) at "
                f"success or after {self.max_goal_steps} steps; sparse reward (1 within {SUCCESS_RADIUS} of the goal). "
                f"Evaluation: start {maze.eval_start}, fixed goal {maze.eval_goal}, {maze.eval_steps} steps.")


MAZE_BUILDERS: dict[str, MazeRecipe] = {
    recipe.dataset_id: recipe
    for recipe in (
        MazeRecipe("iql_torchrl/pointmaze/umaze-v0", "umaze", "navigate", episodes=3000, max_goal_steps=200),
        MazeRecipe("iql_torchrl/pointmaze/medium-v0", "medium", "navigate", episodes=3000),
        MazeRecipe("iql_torchrl/pointmaze/large-v0", "large", "navigate", episodes=3000, max_goal_steps=400),
        MazeRecipe("iql_torchrl/pointmaze/medium-stitch-v0", "medium", "stitch", episodes=8000, max_goal_steps=60),
    )
}


def _set_goal(env, goal: np.ndarray, observation: dict) -> dict:
    maze_env = env.unwrapped
    maze_env.goal = goal.copy()
    maze_env.update_target_site_pos()
    return {**observation, "desired_goal": goal.copy()}


def _noisy_center(walls, cell, rng: np.random.Generator) -> np.ndarray:
    return cell_center(walls, cell) + rng.uniform(-0.25, 0.25, size=2)  # PointMaze's goal noise


def _stack(observations: list[dict]) -> dict:
    return {key: np.stack([o[key] for o in observations]) for key in observations[0]}


def _episode(observations, actions, rewards, truncated_last: bool) -> dict:
    steps = len(rewards)
    truncations = np.zeros(steps, dtype=bool)
    truncations[-1] = truncated_last
    return dict(observations=_stack(observations), actions=np.stack(actions),
                rewards=np.asarray(rewards, dtype=np.float64), terminations=np.zeros(steps, dtype=bool),
                truncations=truncations)


def _navigate(recipe: MazeRecipe, episodes: int, seed: int, progress) -> list[dict]:
    """One rollout from ``env.reset(seed=seed)``; noise and goals drawn from ``default_rng(seed)``."""
    maze = MAZES[recipe.maze]
    rng = np.random.default_rng(seed)
    cells = open_cells(maze.walls)
    controller = WaypointController(maze.walls, noise_std=recipe.noise_std, rng=rng)
    env = make_env(collection_env_spec(recipe.maze))
    observation, _ = env.reset(seed=seed)
    result = []
    try:
        while len(result) < episodes:
            here = cell_of(maze.walls, observation["achieved_goal"])
            goal_cell = cells[rng.choice([k for k, cell in enumerate(cells) if cell != here])]
            observation = _set_goal(env, _noisy_center(maze.walls, goal_cell, rng), observation)
            episode, observation = _drive_to_goal(env, controller, observation, recipe.max_goal_steps)
            result.append(episode)
            progress(1)
    finally:
        env.close()
    return result


def _drive_to_goal(env, controller, observation, max_steps: int) -> tuple[dict, dict]:
    """The controller drives from ``observation`` until the goal is reached (or ``max_steps``): the
    episode, cut there as truncated, and the last observation."""
    observations, actions, rewards = [observation], [], []
    for _ in range(max_steps):
        action = controller(observation)
        observation, reward, _, _, info = env.step(action)
        observations.append(observation)
        actions.append(action)
        rewards.append(float(reward))
        if info["success"]:
            break
    return _episode(observations, actions, rewards, truncated_last=True), observation


def _stitch(recipe: MazeRecipe, episodes: int, seed: int, progress) -> list[dict]:
    """Episode ``i`` resets with seed ``seed + i``; its cells and noise come from ``default_rng(seed + i)``."""
    maze = MAZES[recipe.maze]
    cells = open_cells(maze.walls)
    far = {maze.eval_start, maze.eval_goal}
    env = make_env(collection_env_spec(recipe.maze))
    result = []
    try:
        for i in range(episodes):
            rng = np.random.default_rng(seed + i)
            start = cells[rng.integers(len(cells))]
            distance = cell_distances(maze.walls, start)
            goals = [cell for cell in cells if 1 <= distance[cell] <= STITCH_MAX_CELLS and {start, cell} != far]
            goal = goals[rng.integers(len(goals))]
            controller = WaypointController(maze.walls, noise_std=recipe.noise_std, rng=rng)
            observation, _ = env.reset(seed=seed + i, options={"reset_cell": np.array(start), "goal_cell": np.array(goal)})
            result.append(_drive_to_goal(env, controller, observation, recipe.max_goal_steps)[0])
            progress(1)
    finally:
        env.close()
    check_no_start_to_goal_episode(recipe.maze, result)
    return result


def episode_visits(maze_name: str, episode: dict) -> set[tuple[int, int]]:
    """The cells an episode's positions pass through."""
    walls = MAZES[maze_name].walls
    return {cell_of(walls, xy) for xy in episode["observations"]["achieved_goal"]}


def check_no_start_to_goal_episode(maze_name: str, episodes: list[dict]) -> None:
    """Refuse stitching data in which one episode visits both the evaluation's start and goal cells."""
    maze = MAZES[maze_name]
    for index, episode in enumerate(episodes):
        visits = episode_visits(maze_name, episode)
        if maze.eval_start in visits and maze.eval_goal in visits:
            raise RuntimeError(f"Stitching data: episode {index} goes from the evaluation's start cell "
                               f"{maze.eval_start} to its goal cell {maze.eval_goal}; no episode may.")


def collect_maze_episodes(recipe: MazeRecipe, episodes: int, seed: int, progress=lambda n: None) -> list[dict]:
    """The episodes of a maze dataset: dicts of Minari's episode fields (observations as dicts of arrays)."""
    if recipe.kind == "stitch":
        return _stitch(recipe, episodes, seed, progress)
    return _navigate(recipe, episodes, seed, progress)


def _evaluation_return(env, policy, seed: int) -> float:
    observation, _ = env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        observation, reward, terminated, truncated, _ = env.step(policy(observation))
        total += float(reward)
        done = terminated or truncated
    return total


@functools.lru_cache(maxsize=None)
def maze_reference_returns(maze_name: str, episodes: int, seed: int) -> tuple[float, float]:
    """Mean evaluation returns ``(uniform random actions, noise-free controller)`` over ``episodes``
    episodes with seeds ``seed + j``."""
    env = make_env(eval_env_spec(maze_name))
    walls = MAZES[maze_name].walls
    try:
        random_returns = []
        for j in range(episodes):
            rng = np.random.default_rng(seed + j)
            random_returns.append(_evaluation_return(env, lambda _: rng.uniform(-1, 1, size=2).astype(np.float32), seed + j))
        controller = WaypointController(walls)
        expert_returns = [_evaluation_return(env, controller, seed + j) for j in range(episodes)]
    finally:
        env.close()
    return float(np.mean(random_returns)), float(np.mean(expert_returns))
