"""Discrete datasets through the offline trainer: DiscreteIQLLoss with a categorical actor chosen
from the data, greedy evaluation, seeds, resume; fine-tuning refused; --clip-actions."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensordict import TensorDict

from iql_torchrl.runs.checkpoint import CHECKPOINT_NAME, load_checkpoint
from iql_torchrl.data import DatasetError, load_minari_dataset
from iql_torchrl.runs.evaluation import evaluate_policy
from iql_torchrl.objectives.discrete import DiscreteIQLLoss
from iql_torchrl.runs.builders import build_loss, load_actor
from iql_offline import train
from iql_torchrl.runs.config import OfflineConfig

CARTPOLE = "iql_torchrl/cartpole/mixed-v0"
TINY = dict(
    steps=20, batch_size=32, eval_every=10, eval_episodes=2, log_every=5, checkpoint_every=10,
    hidden_sizes=(16, 16), device="cpu", progress=False, logger="none",
)


@pytest.fixture(scope="module")
def cartpole_root(tmp_path_factory):
    """A datasets root with a 5-episode CartPole mixed set (drifting-balancer episodes)."""
    from iql_torchrl.datasets import build_dataset

    root = tmp_path_factory.mktemp("discrete_minari_datasets")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(root))
        build_dataset(CARTPOLE, episodes=5, reference_episodes=2, progress=False)
    return root


@pytest.fixture
def cartpole(cartpole_root, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(cartpole_root))
    return CARTPOLE


def test_the_loss_and_actor_follow_the_dataset_action_space(cartpole):
    metadata = load_minari_dataset(cartpole).metadata
    loss = build_loss(OfflineConfig(dataset=cartpole, hidden_sizes=(16,), device="cpu").resolved(), metadata)
    assert isinstance(loss, DiscreteIQLLoss) and loss.action_space == "categorical"
    one_hot = load_minari_dataset(cartpole, one_hot_actions=True).metadata
    assert build_loss(OfflineConfig(dataset=cartpole, hidden_sizes=(16,), device="cpu").resolved(), one_hot).action_space == "one_hot"


def test_a_discrete_run_trains_evaluates_greedily_and_checkpoints(cartpole, tmp_path):
    out = tmp_path / "run"
    summary = train(OfflineConfig(dataset=cartpole, output_dir=out, **TINY))
    assert summary["steps"] == 20 and math.isfinite(summary["normalized_score"])
    actor, metadata = load_actor(out)
    assert metadata.action_space == "discrete" and metadata.num_actions == 2
    observation = metadata.observation_from_env(np.zeros((3, 4), dtype=np.float32))
    action = actor(TensorDict({"observation": observation}, [3])).get("action")
    assert action.dtype == torch.int64 and action.shape == (3,)
    # greedy: the evaluation's return equals one computed with the argmax of the logits by hand
    result = evaluate_policy(actor, metadata, episodes=2, seed=7)
    env = gym.make("CartPole-v1")
    returns = []
    for i in range(2):
        obs, _ = env.reset(seed=7 + i)
        total, done = 0.0, False
        while not done:
            logits = actor.module[0](TensorDict({"observation": metadata.observation_from_env(obs)}, []))["logits"]
            obs, reward, terminated, truncated, _ = env.step(int(logits.argmax()))
            total, done = total + reward, terminated or truncated
        returns.append(total)
    assert result["returns"] == returns


def test_discrete_seeds_train_together_and_resume_exactly(cartpole, tmp_path, stop_after_checkpoint):
    whole = train(OfflineConfig(dataset=cartpole, output_dir=tmp_path / "whole", num_seeds=2, **TINY))
    assert len(whole["per_seed"]) == 2
    stop_after_checkpoint(lambda run: run.step == 10)
    with pytest.raises(KeyboardInterrupt):
        train(OfflineConfig(dataset=cartpole, output_dir=tmp_path / "split", num_seeds=2, **TINY))
    stop_after_checkpoint(None)
    resumed = train(OfflineConfig(output_dir=tmp_path / "split", resume=True, progress=False))
    assert resumed["normalized_score"] == whole["normalized_score"]
    a = load_checkpoint(tmp_path / "whole" / CHECKPOINT_NAME)["loss"]
    b = load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)["loss"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fine_tuning_on_discrete_data_is_refused_before_the_data_is_built_or_read(cartpole, tmp_path, monkeypatch):
    from iql_torchrl.jobs.finetune import FinetuneConfig, finetune
    from iql_torchrl.runs.config import ConfigError

    with pytest.raises(ConfigError, match="discrete.*not supported"):  # on disk: its action space
        finetune(FinetuneConfig(dataset=cartpole, output_dir=tmp_path / "ft", device="cpu", progress=False, logger="none"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="mountain-car/medium-v0 has discrete actions"):  # a builder's: its env's
        finetune(FinetuneConfig(dataset="iql_torchrl/mountain-car/medium-v0", output_dir=tmp_path / "ft", device="cpu",
                                progress=False, logger="none"))
    assert not (tmp_path / "empty" / "iql_torchrl").exists() and not (tmp_path / "ft").exists()


def test_fine_tuning_under_torchrun_is_refused_before_any_work(tmp_path, monkeypatch):
    from iql_torchrl.jobs.finetune import FinetuneConfig, finetune
    from iql_torchrl.runs.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="Fine-tuning runs in one process: start it without torchrun"):
        finetune(FinetuneConfig(output_dir=tmp_path / "ft", device="cpu", progress=False, logger="none"))
    assert not (tmp_path / "ft").exists()


def test_clip_actions_lets_out_of_bounds_data_train(write_minari_dataset, synthetic_episode, tmp_path):
    rng = np.random.default_rng(0)
    episodes = [synthetic_episode(rng, 30, 3, 1, action_scale=10.0) for _ in range(3)]
    write_minari_dataset(
        "test/bad/scaled-v0", episodes, gym.spaces.Box(-np.inf, np.inf, (3,), np.float32),
        gym.spaces.Box(-2, 2, (1,), np.float32), env="Pendulum-v1", ref_min_score=-1200.0, ref_max_score=-150.0,
    )
    with pytest.raises(DatasetError, match="--clip-actions"):
        train(OfflineConfig(dataset="test/bad/scaled-v0", output_dir=tmp_path / "refused", **TINY))
    with pytest.warns(UserWarning, match="clipped"):
        summary = train(OfflineConfig(dataset="test/bad/scaled-v0", output_dir=tmp_path / "clipped", clip_actions=True,
                               **{**TINY, "steps": 5, "eval_every": 5, "checkpoint_every": 5}))
    assert summary["steps"] == 5
