"""Shared fixtures: tiny Minari datasets in temporary ``MINARI_DATASETS_PATH`` folders.

* ``minari_root``: an empty datasets root for one test (``MINARI_DATASETS_PATH`` points at it).
* ``tiny_datasets_root``: a session-wide root holding small builder datasets, built once:
  ``TINY_PENDULUM`` (5 Pendulum-v1 episodes: 1 expert, 4 random, all truncated) and
  ``TINY_INVERTED_PENDULUM`` (5 InvertedPendulum-v5 episodes: 1 expert that is truncated
  at 1000 steps, 4 random that terminate early).
* ``tiny_datasets``: points ``MINARI_DATASETS_PATH`` at that shared root for one test and
  returns ``TinyDatasets(root, pendulum=TINY_PENDULUM, inverted_pendulum=TINY_INVERTED_PENDULUM,
  episodes=TINY_EPISODES, reference_episodes=TINY_REFERENCE_EPISODES)``.
* ``write_minari_dataset``: writes a hand-made Minari dataset from episode arrays.
* ``synthetic_episode``: makes the arrays of one random episode.
* ``stop_after_checkpoint``: makes runs stop (``KeyboardInterrupt``) right after a chosen checkpoint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

# two test processes share the cores (pytest -n 2): OpenMP threads that spin while waiting would starve each other
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

# the main job is examples/iql_offline.py: tests import its train() as `from iql_offline import train`
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

TINY_PENDULUM = "iql_torchrl/pendulum/mixed-v0"
TINY_INVERTED_PENDULUM = "iql_torchrl/inverted-pendulum/mixed-v0"
TINY_EPISODES = 5
TINY_REFERENCE_EPISODES = 3


class TinyDatasets(NamedTuple):
    root: Path
    pendulum: str = TINY_PENDULUM
    inverted_pendulum: str = TINY_INVERTED_PENDULUM
    episodes: int = TINY_EPISODES
    reference_episodes: int = TINY_REFERENCE_EPISODES


@pytest.fixture(autouse=True)
def fp32_host_and_own_threads(monkeypatch):
    """``--precision auto`` takes fp32 in every host's tests (a CPU with native bf16 would measure its way to
    bf16, and maybe one thread, by host and by load): tests of auto pretend a host of their own
    (``test_precision.py``). A test that changes torch's thread count leaves the next the one it found."""
    import torch

    import iql_torchrl.precision_choice as precision

    monkeypatch.setattr(precision, "native_bf16", lambda: None)
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_compiler_caches():
    """Each test compiles from scratch: no test depends on what earlier tests left in dynamo's caches
    (e.g. compiled loss calls counting against torch._dynamo's recompile limit)."""
    import torch

    torch._dynamo.reset()
    yield


@pytest.fixture
def guarded_compile(monkeypatch):
    """Compiled steps evaluate dynamo's guards on every call, as a torchrun step and a CUDA graph's warm-up calls
    do, instead of on the calls that meet a new variant only."""
    from iql_torchrl.step.modes import StepRunner

    monkeypatch.setattr(StepRunner, "_skipping_guards", lambda self, batch_or_indices: self.guarded(batch_or_indices))


@pytest.fixture
def stop_after_checkpoint(monkeypatch):
    """``stop_after_checkpoint(when)``: from then on a run raises ``KeyboardInterrupt`` right after a
    checkpoint for which ``when(run)`` is true, as if killed there; ``stop_after_checkpoint(None)``
    lets runs finish again."""
    from iql_torchrl.runs.run import Run

    real = Run.checkpoint

    def stop(when) -> None:
        if when is None:
            monkeypatch.setattr(Run, "checkpoint", real)
            return

        def checkpoint_then_stop(self, evaluate_pending=False):
            real(self, evaluate_pending)
            if when(self):
                raise KeyboardInterrupt("stopped after a checkpoint")

        monkeypatch.setattr(Run, "checkpoint", checkpoint_then_stop)

    return stop


@pytest.fixture
def minari_root(tmp_path, monkeypatch):
    """An empty Minari datasets root for this test."""
    root = tmp_path / "minari_datasets"
    root.mkdir()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


@pytest.fixture(scope="session")
def tiny_datasets_root(tmp_path_factory):
    """A datasets root with the tiny builder datasets (built once per test session)."""
    from iql_torchrl.datasets import build_dataset

    root = tmp_path_factory.mktemp("tiny_minari_datasets")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(root))
        for dataset_id in (TINY_PENDULUM, TINY_INVERTED_PENDULUM):
            build_dataset(
                dataset_id,
                episodes=TINY_EPISODES,
                seed=0,
                reference_episodes=TINY_REFERENCE_EPISODES,
                progress=False,
            )
    return root


@pytest.fixture
def tiny_datasets(tiny_datasets_root, monkeypatch):
    """Point ``MINARI_DATASETS_PATH`` at the shared tiny datasets for this test."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tiny_datasets_root))
    return TinyDatasets(tiny_datasets_root)


@pytest.fixture
def write_minari_dataset(minari_root):
    """``write(dataset_id, episodes, observation_space, action_space, env=None, **kwargs)``.

    Each episode is a dict with ``observations`` (``T + 1`` rows, or a dict of such arrays),
    ``actions`` (``T`` rows), ``rewards``, ``terminations`` and ``truncations``; extra
    keyword arguments go to ``minari.create_dataset_from_buffers``.
    """
    import warnings

    import minari
    from minari.data_collector import EpisodeBuffer

    def write(dataset_id, episodes, observation_space=None, action_space=None, env=None, **kwargs):
        buffers = [
            EpisodeBuffer(
                id=i,
                observations=episode["observations"],
                actions=episode["actions"],
                rewards=np.asarray(episode["rewards"], dtype=np.float64),
                terminations=np.asarray(episode["terminations"], dtype=bool),
                truncations=np.asarray(episode["truncations"], dtype=bool),
            )
            for i, episode in enumerate(episodes)
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return minari.create_dataset_from_buffers(
                dataset_id,
                buffers,
                env=env,
                observation_space=observation_space,
                action_space=action_space,
                **kwargs,
            )

    return write


@pytest.fixture
def synthetic_episode():
    """``make(rng, length, observation_dim, action_dim, terminated=False, action_scale=1.0)``:
    arrays of one random episode that ends by termination or by truncation."""
    return _synthetic_episode


def _synthetic_episode(rng, length, observation_dim, action_dim, terminated=False, action_scale=1.0):
    return dict(
        observations=rng.normal(size=(length + 1, observation_dim)).astype(np.float32),
        actions=rng.uniform(-action_scale, action_scale, size=(length, action_dim)).astype(np.float32),
        rewards=rng.normal(size=length),
        terminations=np.eye(1, length, length - 1, dtype=bool)[0] & terminated,
        truncations=np.eye(1, length, length - 1, dtype=bool)[0] & (not terminated),
    )
