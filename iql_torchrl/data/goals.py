"""Goal-reaching data (Minari's maze sets: ``observation``, ``achieved_goal``, ``desired_goal``).

Whether the goal is part of the policy's input is a choice about the task, not the data:

* goal in the input: ``desired_goal`` is flattened into the observation with the other entries and
  the stored rewards are kept (goal-conditioned learning, as Minari's D4RL/pointmaze records it);
* goal out of the input (D4RL's maze2d and AntMaze convention): ``desired_goal`` is dropped and the
  rewards are relabelled to the evaluation environment's fixed goal -- 1 where the next
  ``achieved_goal`` lies within :data:`SUCCESS_RADIUS` of it -- because a reward for a goal the
  policy cannot see says nothing about the one it is evaluated on.

A maze's evaluation goal is the centre of the ``"g"`` cell of the evaluation env's ``maze_map``
(gymnasium-robotics adds up to a quarter cell of noise to it at each reset).
"""
from __future__ import annotations

import numpy as np

from iql_torchrl.data.checks import DatasetError

__all__ = ["GOAL_KEY", "ACHIEVED_KEY", "SUCCESS_RADIUS", "maze_map", "maze_walls", "fixed_goal", "check_same_maze",
           "relabelled_rewards"]

GOAL_KEY = "desired_goal"
ACHIEVED_KEY = "achieved_goal"
SUCCESS_RADIUS = 0.45  # gymnasium-robotics' PointMaze and AntMaze: reward and info["success"]


def maze_map(env_spec) -> list | None:
    """The ``maze_map`` an env spec builds (its kwargs, else its registered id's); ``None`` for other envs."""
    if env_spec is None:
        return None
    kwargs = dict(env_spec.kwargs or {})
    if "maze_map" not in kwargs:
        import gymnasium as gym

        try:
            kwargs = dict(gym.spec(env_spec.id).kwargs or {})
        except Exception:  # not registered here (e.g. gymnasium-robotics not imported)
            return None
    return kwargs.get("maze_map")


def maze_walls(layout) -> list[list[int]]:
    """1 for walls, 0 for every other cell (free, ``"r"``, ``"g"``, ``"c"``)."""
    return [[1 if cell == 1 else 0 for cell in row] for row in layout]


def _cell_size(env_spec) -> float:
    kwargs = env_spec.kwargs or {}
    return float(kwargs.get("maze_size_scaling", 4.0 if "AntMaze" in env_spec.id else 1.0))


def fixed_goal(env_spec) -> list[float] | None:
    """(x, y) of the evaluation env's one ``"g"`` cell centre; ``None`` when it has no single fixed goal."""
    layout = maze_map(env_spec)
    if layout is None:
        return None
    goals = [(i, j) for i, row in enumerate(layout) for j, cell in enumerate(row) if cell == "g"]
    if len(goals) != 1:
        return None
    (i, j), size = goals[0], _cell_size(env_spec)
    rows, columns = len(layout), len(layout[0])
    return [(j + 0.5) * size - columns * size / 2, rows * size / 2 - (i + 0.5) * size]


def check_same_maze(dataset_id: str, data_spec, eval_spec) -> None:
    """Refuse an evaluation env whose maze walls differ from those the data was collected in."""
    data_layout, eval_layout = maze_map(data_spec), maze_map(eval_spec)
    if data_layout is None or eval_layout is None:
        return
    if maze_walls(data_layout) != maze_walls(eval_layout):
        raise DatasetError(
            f"Dataset {dataset_id!r}: the evaluation env's 'maze_map' ({eval_spec.id}) has other walls than the maze "
            f"the data was collected in ({data_spec.id}): data {maze_walls(data_layout)}, evaluation "
            f"{maze_walls(eval_layout)}. A policy learnt in one maze says nothing about another; fix the dataset's eval env spec."
        )


def relabelled_rewards(next_achieved_goal: np.ndarray, goal, episode_label: str) -> np.ndarray:
    """Sparse rewards for the fixed ``goal``: 1 where ``next_achieved_goal`` is within the radius, else 0."""
    next_achieved_goal = np.asarray(next_achieved_goal, dtype=np.float64)
    if next_achieved_goal.ndim != 2 or next_achieved_goal.shape[-1] != len(goal):
        raise DatasetError(
            f"{episode_label}: '{ACHIEVED_KEY}' has shape {next_achieved_goal.shape[1:]} but the evaluation goal has "
            f"{len(goal)} coordinates; rewards cannot be relabelled to it."
        )
    distance = np.linalg.norm(next_achieved_goal - np.asarray(goal, dtype=np.float64), axis=-1)
    return (distance <= SUCCESS_RADIUS).astype(np.float32)
