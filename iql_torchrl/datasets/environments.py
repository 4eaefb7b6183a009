"""A dataset's environments: ``gym.make`` on a recorded spec or id.

gymnasium-robotics prints a notice on stderr whenever it is imported (1.2.1 … 1.4.2): its Adroit
environments' rewards changed without a version bump. A maze (PointMaze, AntMaze) is no Adroit
environment: its runs import gymnasium-robotics with that one line left out, and everything else it
prints kept. An Adroit environment imports it as usual, notice included.
"""
from __future__ import annotations

import contextlib
import io
import sys

import gymnasium as gym

__all__ = ["make_env", "env_action_space", "import_gymnasium_robotics_for_mazes"]

MAZE_ENTRY_POINTS = "gymnasium_robotics.envs.maze"
ADROIT_NOTICE = "AdroitHandRelocateDense-v1, AdroitHandHammerDense-v1, AdroitHandDoorDense-v1 environment's reward"


def make_env(spec: gym.envs.registration.EnvSpec | str, **kwargs) -> gym.Env:
    """``gym.make(spec, **kwargs)``; for a maze, gymnasium-robotics imported without its Adroit notice."""
    registered = spec if isinstance(spec, gym.envs.registration.EnvSpec) else gym.envs.registry.get(spec)
    entry_point = getattr(registered, "entry_point", None)
    if isinstance(entry_point, str) and entry_point.startswith(MAZE_ENTRY_POINTS):
        import_gymnasium_robotics_for_mazes()
    return gym.make(spec, **kwargs)


def env_action_space(spec: gym.envs.registration.EnvSpec | str | None) -> gym.spaces.Space | None:
    """The environment's action space, or ``None`` when it cannot be created here (no spec, or its package
    not installed or not imported, e.g. gymnasium-robotics for a maze id)."""
    if spec is None:
        return None
    try:
        env = make_env(spec)
    except Exception:
        return None
    try:
        return env.action_space
    finally:
        env.close()


def import_gymnasium_robotics_for_mazes() -> None:
    """Imports gymnasium-robotics (a no-op when it is imported), leaving out its Adroit notice only."""
    if "gymnasium_robotics" in sys.modules:
        return
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            import gymnasium_robotics  # noqa: F401
    finally:
        sys.stderr.write("".join(line for line in said.getvalue().splitlines(keepends=True)
                                 if not line.startswith(ADROIT_NOTICE)))
