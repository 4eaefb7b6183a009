"""Local dataset builders: controllers, recipes, recorded returns, safe writes, CLI."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from minari.dataset.minari_dataset import parse_dataset_id

from iql_torchrl import datasets
from iql_torchrl.data import load_minari_dataset
from iql_torchrl.datasets import (
    BUILDERS,
    DEFAULT_DATASET,
    build_dataset,
    ensure_dataset,
    make_expert,
    make_policy,
    rollout_episode,
)
from iql_torchrl.datasets.__main__ import main as cli_main



def _mean_return(env_id, policy_name, episodes, seed=500):
    env = gym.make(env_id)
    returns = [
        rollout_episode(env, make_policy(env_id, policy_name, env.action_space, seed + i), seed + i)["episode_return"]
        for i in range(episodes)
    ]
    env.close()
    return float(np.mean(returns))


# --------------------------------------------------------------------------------------
# Controllers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env_id, episodes, expert_at_least, random_at_most",
    [
        ("Pendulum-v1", 10, -300.0, -900.0),  # measured over 100 episodes: expert -159, random -1268
        ("InvertedPendulum-v5", 3, 1000.0, 30.0),  # expert 1000 (never falls), random about 5
        ("Reacher-v5", 20, -6.0, -35.0),  # expert -3.9, random -42.5
        ("CartPole-v1", 10, 500.0, 40.0),  # over 50 episodes: expert 500 (never falls), random 23.3
        ("MountainCar-v0", 10, -130.0, -200.0),  # over 50 episodes: expert -119.8, random -200 (never arrives)
    ],
)
def test_scripted_expert_beats_random_by_a_wide_margin(env_id, episodes, expert_at_least, random_at_most):
    expert = _mean_return(env_id, "expert", episodes)
    random = _mean_return(env_id, "random", episodes)
    assert expert >= expert_at_least
    assert random <= random_at_most


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "InvertedPendulum-v5", "Reacher-v5", "CartPole-v1", "MountainCar-v0"])
def test_medium_policy_scores_between_random_and_expert(env_id):
    episodes = 3 if env_id == "InvertedPendulum-v5" else 10
    random, medium, expert = (_mean_return(env_id, name, episodes) for name in ("random", "medium", "expert"))
    assert random < medium < expert


def test_expert_actions_stay_within_the_action_bounds():
    for env_id in ("Pendulum-v1", "InvertedPendulum-v5", "Reacher-v5", "CartPole-v1", "MountainCar-v0"):
        env = gym.make(env_id)
        expert = make_expert(env_id)
        observation, _ = env.reset(seed=0)
        for _ in range(20):
            action = expert(observation)
            assert env.action_space.contains(action)
            observation, *_ = env.step(action)


# --------------------------------------------------------------------------------------
# Recipes and ids
# --------------------------------------------------------------------------------------


def test_builder_ids_are_valid_minari_ids_for_each_env_and_kind():
    from iql_torchrl.datasets.maze import MazeRecipe

    from iql_torchrl.datasets.locomotion import LocomotionRecipe

    # 5 envs x 4 kinds, the PointMaze umaze, medium, large, medium-stitch, 3 locomotion tasks x 4 kinds x 2 versions
    assert len(BUILDERS) == 20 + 4 + 12 * 2
    for dataset_id, recipe in BUILDERS.items():
        namespace, name, version = parse_dataset_id(dataset_id)
        # a locomotion set's policies compute in float32 in -v0, in float64 in -v1
        expected = {torch.float32: 0, torch.float64: 1}[recipe.policy_dtype] if isinstance(recipe, LocomotionRecipe) else 0
        assert namespace.startswith("iql_torchrl/") and version == expected
        assert name.startswith(recipe.maze) if isinstance(recipe, MazeRecipe) else name == recipe.kind
    assert {"iql_torchrl/pendulum/mixed-v0", "iql_torchrl/inverted-pendulum/expert-v0", "iql_torchrl/reacher/medium-v0"} <= set(BUILDERS)


def test_default_dataset_recipe_is_a_fifth_expert_and_the_rest_random():
    recipe = BUILDERS[DEFAULT_DATASET]
    assert DEFAULT_DATASET == "iql_torchrl/pendulum/mixed-v0"
    assert (recipe.env_id, recipe.episodes, recipe.expert_episodes(recipe.episodes)) == ("Pendulum-v1", 200, 40)
    names = [recipe.policy_name(i, recipe.episodes) for i in range(recipe.episodes)]
    assert names.count("expert") == 40 and names.count("random") == 160


# --------------------------------------------------------------------------------------
# Built datasets
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pendulum", "inverted_pendulum"])
def test_recorded_episodes_replay_exactly_from_their_seed_and_policy(tiny_datasets, name):
    dataset_id = getattr(tiny_datasets, name)
    dataset = minari.load_dataset(dataset_id)
    recipe = BUILDERS[dataset_id]
    env = gym.make(recipe.env_id)
    episode_info = list(dataset.storage.get_episode_metadata(range(dataset.total_episodes)))
    for episode, info in zip(dataset.iterate_episodes(), episode_info):
        policy = make_policy(recipe.env_id, info["policy"], env.action_space, info["seed"])
        replay = rollout_episode(env, policy, info["seed"])
        assert replay["episode_return"] == pytest.approx(float(np.sum(episode.rewards)), rel=1e-9, abs=1e-9)
        np.testing.assert_allclose(replay["actions"], episode.actions)
    assert [info["policy"] for info in episode_info] == ["expert"] + ["random"] * (tiny_datasets.episodes - 1)


def test_tiny_datasets_record_expert_and_random_episodes_as_expected(tiny_datasets):
    returns = [float(np.sum(e.rewards)) for e in minari.load_dataset(tiny_datasets.inverted_pendulum).iterate_episodes()]
    assert returns[0] == 1000.0 and max(returns[1:]) < 100
    pendulum = [float(np.sum(e.rewards)) for e in minari.load_dataset(tiny_datasets.pendulum).iterate_episodes()]
    assert pendulum[0] > max(pendulum[1:]) + 300


def test_reference_scores_are_random_and_expert_means(tiny_datasets):
    dataset = minari.load_dataset(tiny_datasets.pendulum)
    ref_min, ref_max = dataset.storage.metadata["ref_min_score"], dataset.storage.metadata["ref_max_score"]
    assert (ref_min, ref_max) == datasets.reference_returns("Pendulum-v1", tiny_datasets.reference_episodes)
    assert ref_max > ref_min + 500
    np.testing.assert_allclose(minari.get_normalized_score(dataset, np.array([ref_min, ref_max])), [0.0, 1.0])


def test_build_refuses_to_overwrite_unless_asked(minari_root):
    dataset_id = "iql_torchrl/reacher/random-v0"
    build_dataset(dataset_id, episodes=2, reference_episodes=2, progress=False)
    data_file = minari_root / dataset_id / "data" / "main_data.hdf5"
    before = data_file.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_dataset(dataset_id, episodes=3, reference_episodes=2, progress=False)
    assert data_file.read_bytes() == before

    rebuilt = build_dataset(dataset_id, episodes=3, reference_episodes=2, progress=False, overwrite=True)
    assert rebuilt.total_episodes == 3
    # no staging folders left behind (the lock files stay, empty)
    assert sorted(p.name for p in minari_root.iterdir()) == [".locks", "iql_torchrl"]


def test_failed_build_leaves_no_dataset_behind(minari_root, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(minari, "create_dataset_from_buffers", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        build_dataset("iql_torchrl/reacher/random-v0", episodes=2, reference_episodes=2, progress=False)
    assert not (minari_root / "iql_torchrl/reacher/random-v0").exists()
    assert [p.name for p in minari_root.iterdir()] == [".locks"]


def test_built_datasets_are_listed_by_minari(minari_root):
    build_dataset("iql_torchrl/reacher/expert-v0", episodes=2, reference_episodes=2, progress=False)
    assert "iql_torchrl/reacher/expert-v0" in minari.list_local_datasets()


def test_ensure_dataset_builds_the_default_once_in_seconds(minari_root, monkeypatch):
    assert ensure_dataset(progress=False) == DEFAULT_DATASET
    dataset = minari.load_dataset(DEFAULT_DATASET)
    assert (dataset.total_episodes, dataset.total_steps) == (200, 40_000)
    buffer = load_minari_dataset(DEFAULT_DATASET)
    assert len(buffer) == 40_000 and not buffer_has_terminations(buffer)

    monkeypatch.setattr(datasets.builders, "build_dataset", lambda *a, **k: pytest.fail("must not rebuild"))
    assert ensure_dataset() == DEFAULT_DATASET


def buffer_has_terminations(buffer):
    return bool(buffer[:]["next", "terminated"].any())


def test_ensure_dataset_refuses_a_dataset_an_earlier_recipe_built(minari_root, monkeypatch):
    import dataclasses

    dataset_id = "iql_torchrl/cartpole/mixed-v0"
    build_dataset(dataset_id, episodes=4, seed=7, reference_episodes=2, progress=False)
    assert ensure_dataset(dataset_id) == dataset_id  # same recipe (any seed, any episode count): used
    earlier = dataclasses.replace(datasets.builders.BUILDERS[dataset_id], other_policy="mirrored")
    monkeypatch.setitem(datasets.builders.BUILDERS, dataset_id, earlier)  # as if the data were older than the recipe
    with pytest.raises(ValueError, match=r"another version of its recipe.*drifting.*mirrored.*--overwrite"):
        ensure_dataset(dataset_id)


def test_ensure_dataset_refuses_unknown_missing_ids(minari_root):
    with pytest.raises(FileNotFoundError, match="minari download somebody/else-v0"):
        ensure_dataset("somebody/else-v0")


# --------------------------------------------------------------------------------------
# Discrete datasets
# --------------------------------------------------------------------------------------


def test_discrete_mixed_recipes_are_few_expert_episodes_and_many_wrong_ones():
    cartpole = BUILDERS["iql_torchrl/cartpole/mixed-v0"]
    names = [cartpole.policy_name(i, cartpole.episodes) for i in range(cartpole.episodes)]
    assert (cartpole.env_id, names.count("expert"), names.count("drifting")) == ("CartPole-v1", 5, 195)
    assert "drifting-balancer" in cartpole.describe()
    mountain_car = BUILDERS["iql_torchrl/mountain-car/mixed-v0"]
    names = [mountain_car.policy_name(i, mountain_car.episodes) for i in range(mountain_car.episodes)]
    assert (mountain_car.env_id, names.count("expert"), names.count("mirrored")) == ("MountainCar-v0", 10, 90)
    assert "mirrored-expert (wrong-way)" in mountain_car.describe()


def test_mirrored_policy_pushes_the_other_way_in_every_state():
    for env_id, num_actions in (("CartPole-v1", 2), ("MountainCar-v0", 3)):
        env = gym.make(env_id)
        expert, mirrored = make_expert(env_id), make_policy(env_id, "mirrored", env.action_space, 0)
        for observation in (env.observation_space.sample() for _ in range(50)):
            assert int(mirrored(observation)) == num_actions - 1 - int(expert(observation))
            assert int(expert(observation)) in (0, num_actions - 1)  # MountainCar's expert never idles
        env.close()


@pytest.mark.parametrize("seed, bias", [(2, 0.2), (3, -0.2)])
def test_drifting_policy_is_the_shifted_expert_with_random_actions(seed, bias):
    # push right when w·s + bias > 0 (the expert: w·s > 0; even episode seeds +0.2, odd −0.2),
    # a uniform random action with probability 0.3
    weights = np.array([0.01, 0.1, 1.0, 0.3])
    env = gym.make("CartPole-v1")
    drifting = make_policy("CartPole-v1", "drifting", env.action_space, seed=seed)
    rng = np.random.default_rng(seed)  # the policy's own stream, replayed
    observations = np.random.default_rng(0).uniform(-0.3, 0.3, size=(400, 4))
    shifted = 0
    for observation in observations:
        score = float(weights @ observation)
        if rng.random() < 0.3:
            expected = int(rng.integers(2))
        else:
            expected = int(score + bias > 0)
            shifted += int(score > 0) != expected
        assert int(drifting(observation)) == expected
    assert shifted > 50  # the bias changes the decision in many of these states
    with pytest.raises(ValueError, match="No drifting policy"):
        make_policy("MountainCar-v0", "drifting", gym.make("MountainCar-v0").action_space, 0)


def test_cartpole_mixed_builds_long_expert_and_shorter_drifting_episodes_that_replay(minari_root):
    dataset_id = "iql_torchrl/cartpole/mixed-v0"
    build_dataset(dataset_id, episodes=40, reference_episodes=2, progress=False)  # 1 expert, 39 drifting
    dataset = minari.load_dataset(dataset_id)
    infos = list(dataset.storage.get_episode_metadata(range(dataset.total_episodes)))
    assert [info["policy"] for info in infos] == ["expert"] + ["drifting"] * 39
    episodes = list(dataset.iterate_episodes())
    lengths = [len(episode.rewards) for episode in episodes]
    assert lengths[0] == 500 and max(lengths[1:]) < 300
    # the drifting balancer: many of its episodes end with the cart off the track, the pole still up,
    # off the left end for even seeds and off the right end for odd ones
    ends = [(e.observations[-1][0], abs(e.observations[-1][2]) < 0.2095, info["seed"] % 2)
            for e, info in zip(episodes[1:], infos[1:])]
    off_left = sum(x < -2.4 and up for x, up, odd in ends if not odd)
    off_right = sum(x > 2.4 and up for x, up, odd in ends if odd)
    assert off_left >= 5 and off_right >= 5
    assert not any(x > 2.4 for x, _, odd in ends if not odd) and not any(x < -2.4 for x, _, odd in ends if odd)
    # together its episodes hold more transitions than the expert's: cloning follows them
    assert sum(lengths[1:]) > 2 * lengths[0]
    env = gym.make("CartPole-v1")
    for episode, info in list(zip(episodes, infos))[:4]:
        replay = rollout_episode(env, make_policy("CartPole-v1", info["policy"], env.action_space, info["seed"]), info["seed"])
        np.testing.assert_array_equal(replay["actions"], episode.actions)
    metadata = load_minari_dataset(dataset_id).metadata
    assert (metadata.action_space, metadata.num_actions, metadata.env_id) == ("discrete", 2, "CartPole-v1")
    assert metadata.ref_max_score == 500.0 and metadata.ref_min_score < 50


# --------------------------------------------------------------------------------------
# Concurrent builds
# --------------------------------------------------------------------------------------


def test_concurrent_builds_of_one_id_build_it_once(minari_root):
    dataset_id = "iql_torchrl/cartpole/expert-v0"
    outcomes = []

    def build():
        try:
            build_dataset(dataset_id, episodes=2, reference_episodes=2, progress=False)
            outcomes.append("built")
        except FileExistsError:
            outcomes.append("exists")

    with datasets.build_lock(dataset_id):  # both builds start while the lock is held
        threads = [threading.Thread(target=build) for _ in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        assert outcomes == [] and not (minari_root / dataset_id).exists()  # both wait
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(outcomes) == ["built", "exists"]
    assert minari.load_dataset(dataset_id).total_episodes == 2


def test_ensure_dataset_waits_for_a_build_in_progress_and_returns_its_dataset(minari_root, monkeypatch):
    dataset_id = "iql_torchrl/cartpole/expert-v0"
    building, results = threading.Event(), []
    real_reference_returns = datasets.builders.reference_returns

    def slow_reference_returns(*args, **kwargs):  # runs inside the first build, under its lock
        building.set()
        time.sleep(0.5)
        return real_reference_returns(*args, **kwargs)

    monkeypatch.setattr(datasets.builders, "reference_returns", slow_reference_returns)
    first = threading.Thread(target=build_dataset, args=(dataset_id,), kwargs=dict(episodes=2, reference_episodes=2, progress=False))
    first.start()
    assert building.wait(timeout=60)
    ensure_dataset(dataset_id, episodes=3, reference_episodes=2, progress=False)
    first.join(timeout=60)
    assert minari.load_dataset(dataset_id).total_episodes == 2  # the first build's, not rebuilt


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def test_cli_lists_every_builder_id(minari_root, capsys):
    assert cli_main(["list"]) == 0
    output = capsys.readouterr().out
    for dataset_id in BUILDERS:
        assert dataset_id in output
    assert "(default)" in output


def test_cli_builds_what_is_missing_keeps_what_is_built_and_rebuilds_it_when_asked(minari_root, capsys):
    expert, medium = "iql_torchrl/pendulum/expert-v0", "iql_torchrl/pendulum/medium-v0"
    options = ["--episodes", "2", "--reference-episodes", "2"]
    assert cli_main(["build", expert, *options]) == 0
    assert "2 episodes, 400 steps" in capsys.readouterr().out
    data_file = minari_root / expert / "data" / "main_data.hdf5"
    before = data_file.read_bytes()
    assert cli_main(["build", expert, medium, *options]) == 0  # the built one kept, the missing one built after it
    out, err = capsys.readouterr()
    assert f"{expert}: already built, kept (--overwrite rebuilds it)" in err
    assert f"{medium}: 2 episodes" in out and data_file.read_bytes() == before
    assert cli_main(["build", expert, *options, "--overwrite", "--seed", "5"]) == 0
    assert data_file.read_bytes() != before


@pytest.mark.parametrize("option, value, says", [
    ("--episodes", "0", "0: must be at least 1"), ("--reference-episodes", "0", "0: must be at least 1"),
    ("--seed", "-1", "-1: must be at least 0"),
    ("--episodes", "ten", "'ten' is not an integer"),
])
def test_cli_refuses_counts_out_of_range_before_building(minari_root, capsys, option, value, says):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["build", "iql_torchrl/pendulum/expert-v0", option, value])
    assert exit_.value.code == 2 and f"argument {option}: {says}" in capsys.readouterr().err
    assert not (minari_root / "iql_torchrl").exists()
    with pytest.raises(ValueError, match=option[2:].replace("-", "_")):  # and from Python
        build_dataset("iql_torchrl/pendulum/expert-v0", **{option[2:].replace("-", "_"): int(value) if value != "ten" else -5})


def test_a_build_killed_before_its_cleanup_leaves_nothing_after_the_next_build(minari_root):
    stale = minari_root / ".building-iql_torchrl--reacher--random-v0-k1ll3d"  # as a SIGKILLed build leaves it
    (stale / "iql_torchrl").mkdir(parents=True)
    other = minari_root / ".building-iql_torchrl--reacher--expert-v0-running"  # another id's build: not this one's
    other.mkdir()
    build_dataset("iql_torchrl/reacher/random-v0", episodes=2, reference_episodes=2, progress=False)
    assert not stale.exists() and other.exists()


def test_cli_rejects_unknown_ids(minari_root, capsys):
    assert cli_main(["build", "iql_torchrl/acrobot/expert-v0"]) == 2
    assert "unknown dataset ids" in capsys.readouterr().err


def test_cli_runs_as_a_module(minari_root):
    result = subprocess.run(
        [sys.executable, "-m", "iql_torchrl.datasets", "list"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert DEFAULT_DATASET in result.stdout
