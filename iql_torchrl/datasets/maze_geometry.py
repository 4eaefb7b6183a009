"""The PointMaze maps and how to move through them: the cell geometry, value iteration over the cells,
and the waypoint-following PD controller that drives the point mass (gymnasium-robotics' ``PointMaze``:
cells of size 1, the map centred on the origin, row 0 at the top).

:mod:`iql_torchrl.datasets.maze` builds the datasets with them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = ["MAZES", "Maze", "WaypointController", "cell_center", "cell_distances", "cell_of", "open_cells"]


@dataclass(frozen=True)
class Maze:
    """A PointMaze map (1 = wall) and its evaluation task."""

    env_name: str  # gymnasium-robotics' id prefix, e.g. "PointMaze_Medium"
    walls: tuple[tuple[int, ...], ...]
    eval_start: tuple[int, int]  # (row, column) of the evaluation's start cell
    eval_goal: tuple[int, int]  # (row, column) of the evaluation's fixed goal cell
    eval_steps: int  # evaluation episode length (D4RL's)


# The maps of gymnasium_robotics.envs.maze.maps (U_MAZE, MEDIUM_MAZE, LARGE_MAZE); the evaluation cells
# are D4RL maze2d's start and far goal.
MAZES = {
    "umaze": Maze("PointMaze_UMaze", (
        (1, 1, 1, 1, 1),
        (1, 0, 0, 0, 1),
        (1, 1, 1, 0, 1),
        (1, 0, 0, 0, 1),
        (1, 1, 1, 1, 1),
    ), eval_start=(3, 1), eval_goal=(1, 1), eval_steps=300),
    "medium": Maze("PointMaze_Medium", (
        (1, 1, 1, 1, 1, 1, 1, 1),
        (1, 0, 0, 1, 1, 0, 0, 1),
        (1, 0, 0, 1, 0, 0, 0, 1),
        (1, 1, 0, 0, 0, 1, 1, 1),
        (1, 0, 0, 1, 0, 0, 0, 1),
        (1, 0, 1, 0, 0, 1, 0, 1),
        (1, 0, 0, 0, 1, 0, 0, 1),
        (1, 1, 1, 1, 1, 1, 1, 1),
    ), eval_start=(1, 1), eval_goal=(6, 6), eval_steps=600),
    "large": Maze("PointMaze_Large", (
        (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1),
        (1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1),
        (1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1),
        (1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1),
        (1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1),
        (1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1),
        (1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1),
        (1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1),
        (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    ), eval_start=(1, 1), eval_goal=(7, 10), eval_steps=800),
}


# --------------------------------------------------------------------------------------
# Maze geometry (PointMaze: cells of size 1, the map centred on the origin, row 0 at the top)
# --------------------------------------------------------------------------------------


def open_cells(walls) -> list[tuple[int, int]]:
    return [(i, j) for i, row in enumerate(walls) for j, wall in enumerate(row) if wall != 1]


def cell_center(walls, cell) -> np.ndarray:
    """(x, y) of a cell's centre, as ``Maze.cell_rowcol_to_xy`` of gymnasium-robotics computes it."""
    rows, columns = len(walls), len(walls[0])
    return np.array([cell[1] + 0.5 - columns / 2, rows / 2 - cell[0] - 0.5])


def cell_of(walls, xy) -> tuple[int, int]:
    rows, columns = len(walls), len(walls[0])
    return int(np.floor(rows / 2 - xy[1])), int(np.floor(xy[0] + columns / 2))


def cell_distances(walls, goal) -> dict[tuple[int, int], int]:
    """Value iteration on the cell graph: the number of moves from every open cell to ``goal``."""
    cells = open_cells(walls)
    distance = {cell: (0 if cell == goal else np.inf) for cell in cells}
    changed = True
    while changed:  # Bellman backups until the fixed point: V(c) = min over neighbours 1 + V(n)
        changed = False
        for i, j in cells:
            best = min((distance.get(n, np.inf) for n in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1))))
            if best + 1 < distance[(i, j)]:
                distance[(i, j)] = best + 1
                changed = True
    return distance


class WaypointController:
    """Goal reaching in a PointMaze: the next waypoint from value iteration, followed by a PD controller.

    ``action = clip(kp · (waypoint − position) − kd · velocity, −1, 1)`` plus, when ``noise_std > 0``,
    Gaussian noise of that standard deviation drawn from ``rng`` (clipped again). The waypoint is the
    centre of the neighbouring cell closest to the goal's cell, or the goal itself inside that cell.
    """

    def __init__(self, walls, kp: float = 10.0, kd: float = 1.0, noise_std: float = 0.0,
                 rng: np.random.Generator | None = None):
        self.walls = walls
        self.kp, self.kd, self.noise_std = kp, kd, noise_std
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self._distances = functools.lru_cache(maxsize=None)(lambda goal: cell_distances(walls, goal))

    def waypoint(self, position: np.ndarray, goal: np.ndarray) -> np.ndarray:
        here, target = cell_of(self.walls, position), cell_of(self.walls, goal)
        if here == target:
            return goal
        distance = self._distances(target)
        i, j = here
        neighbours = [n for n in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)) if n in distance]
        if here not in distance or not neighbours:  # numerically inside a wall: head for the cell's centre
            return cell_center(self.walls, here)
        return cell_center(self.walls, min(neighbours, key=distance.__getitem__))

    def __call__(self, observation: dict) -> np.ndarray:
        position, velocity = observation["observation"][:2], observation["observation"][2:4]
        action = self.kp * (self.waypoint(position, observation["desired_goal"]) - position) - self.kd * velocity
        action = np.clip(action, -1.0, 1.0)
        if self.noise_std > 0:
            action = np.clip(action + self.rng.normal(size=2) * self.noise_std, -1.0, 1.0)
        return action.astype(np.float32)
