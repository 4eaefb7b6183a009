"""Local Minari datasets built from scripted controllers, for machines without network and for tests.

See :mod:`iql_torchrl.datasets.builders` for the dataset ids and recipes,
:mod:`iql_torchrl.datasets.controllers` for the scripted experts and :mod:`iql_torchrl.datasets.maze`
for the sparse-reward PointMaze sets (``iql_torchrl/pointmaze/{umaze,medium,large,medium-stitch}-v0``;
:mod:`iql_torchrl.datasets.maze_geometry` for the maps and the waypoint controller);
:mod:`iql_torchrl.datasets.environments` makes every dataset's environments (the loader's and evaluation's too).
Command line::

    python -m iql_torchrl.datasets list
    python -m iql_torchrl.datasets build iql_torchrl/pendulum/mixed-v0 [--episodes N] [--seed S] [--overwrite]
"""

from iql_torchrl.datasets.builders import (
    BUILDERS,
    DEFAULT_DATASET,
    KINDS,
    REFERENCE_EPISODES,
    REFERENCE_SEED,
    DatasetRecipe,
    build_dataset,
    build_lock,
    check_recipe,
    dataset_exists,
    dataset_id_problem,
    discrete_actions,
    ensure_dataset,
    make_policy,
    reference_returns,
    rollout_episode,
)
from iql_torchrl.datasets.controllers import (
    CartPoleExpert,
    DegradedPolicy,
    InvertedPendulumExpert,
    MirroredPolicy,
    MountainCarExpert,
    PendulumExpert,
    RandomPolicy,
    ReacherExpert,
    make_expert,
)
from iql_torchrl.datasets.maze import MAZE_BUILDERS, MazeRecipe
from iql_torchrl.datasets.maze_geometry import MAZES, WaypointController

__all__ = [
    "BUILDERS",
    "CartPoleExpert",
    "DEFAULT_DATASET",
    "dataset_id_problem",
    "discrete_actions",
    "DatasetRecipe",
    "DegradedPolicy",
    "InvertedPendulumExpert",
    "MirroredPolicy",
    "MountainCarExpert",
    "KINDS",
    "MAZES",
    "MAZE_BUILDERS",
    "MazeRecipe",
    "WaypointController",
    "PendulumExpert",
    "REFERENCE_EPISODES",
    "REFERENCE_SEED",
    "RandomPolicy",
    "ReacherExpert",
    "build_dataset",
    "build_lock",
    "check_recipe",
    "dataset_exists",
    "ensure_dataset",
    "make_expert",
    "make_policy",
    "reference_returns",
    "rollout_episode",
]
