"""What the main job tells a user about its inputs: dataset ids, optional packages, options that do not apply
to the data, the reward transform, and the final summary's wording."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from iql_offline import train
from iql_torchrl.data import DatasetError, load_minari_dataset
from iql_torchrl.runs.config import ConfigError, OfflineConfig, describe_preset, parse_cli
from iql_torchrl.runs.evaluation import EvaluationEnvError
from iql_torchrl.runs.report import console_summary

TINY = dict(steps=20, batch_size=32, eval_every=10, eval_episodes=1, log_every=5, checkpoint_every=10,
            hidden_sizes=(16, 16), device="cpu", progress=False, logger="none")


@pytest.mark.parametrize("dataset, says", [
    ("foo", "not a Minari dataset id: ids read namespace/name-vN"),
    ("iql_torchrl/pendulum/mixed", "not a Minari dataset id"),  # no version
    ("iql_torchrl/pendulum/mixd-v0", r"no local builder has this id \(did you mean iql_torchrl/pendulum/mixed-v0\?"),
    ("iql_torchrl/walker/mixed-v0", "no local builder has this id .*never downloaded"),
])
def test_a_dataset_id_that_names_no_dataset_is_refused_before_anything_is_written(tmp_path, dataset, says):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"^--dataset {dataset}: {says}"):
        train(OfflineConfig(dataset=dataset, output_dir=out, **TINY))
    assert not out.exists()
    with pytest.raises(ValueError, match=says):  # from Python too, never Minari's TypeError
        load_minari_dataset(dataset)


def test_a_logger_whose_package_is_missing_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "tensorboard" else find_spec(name, *args))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^--logger tensorboard: needs the tensorboard package: pip install"):
        train(OfflineConfig(output_dir=out, **{**TINY, "logger": "tensorboard"}))
    assert not out.exists()


@pytest.mark.parametrize("wanted", [True, False])
def test_goal_input_on_data_without_a_goal_is_refused(tiny_datasets, wanted):
    flag = "yes" if wanted else "no"
    with pytest.raises(DatasetError, match=rf"--goal-input {flag}\) chooses where goal data's 'desired_goal' goes"):
        load_minari_dataset(tiny_datasets.pendulum, goal_in_observation=wanted)
    assert load_minari_dataset(tiny_datasets.pendulum)[:4]["observation"].shape == (4, 3)  # auto: as it was


def test_a_dict_of_goals_stays_in_the_input_and_goal_input_no_names_its_entries(write_minari_dataset):
    import gymnasium as gym

    rng = np.random.default_rng(0)
    space = gym.spaces.Dict({"observation": gym.spaces.Box(-1, 1, (2,)), "desired_goal": gym.spaces.Dict(
        {"kettle": gym.spaces.Box(-1, 1, (2,)), "microwave": gym.spaces.Box(-1, 1, (1,))})})

    def observations(steps):
        return {"observation": rng.uniform(-1, 1, (steps, 2)), "desired_goal": {
            "kettle": rng.uniform(-1, 1, (steps, 2)), "microwave": rng.uniform(-1, 1, (steps, 1))}}

    episodes = [dict(observations=observations(4), actions=rng.uniform(-1, 1, (3, 1)).astype(np.float32),
                     rewards=[0.0, 1.0, 0.0], terminations=[False] * 3, truncations=[False, False, True])
                for _ in range(2)]
    write_minari_dataset("test/goals-v0", episodes, space, gym.spaces.Box(-1, 1, (1,)))
    with pytest.raises(DatasetError, match=r"its 'desired_goal' is a dict of entries \(desired_goal/kettle, "
                                           r"desired_goal/microwave\)\. Keep the goal in the input"):
        load_minari_dataset("test/goals-v0", goal_in_observation=False)
    for wanted in (None, True):
        assert load_minari_dataset("test/goals-v0", goal_in_observation=wanted)[:2]["observation"].shape == (2, 5)


def _equal_returns_dataset(write_minari_dataset):
    """Two Pendulum episodes that both return 3.0 (rewards 1, 2 and 0.5, 2.5)."""
    import gymnasium as gym

    rng = np.random.default_rng(0)
    episodes = [dict(observations=rng.uniform(-1, 1, (3, 3)).astype(np.float32),
                     actions=rng.uniform(-2, 2, (2, 1)).astype(np.float32), rewards=rewards,
                     terminations=[False, False], truncations=[False, True]) for rewards in ([1.0, 2.0], [0.5, 2.5])]
    env = gym.make("Pendulum-v1")
    write_minari_dataset("test/equal-returns-v0", episodes, env.observation_space, env.action_space, env=env)
    return "test/equal-returns-v0"


def test_the_reward_transform_is_a_flag_and_the_locomotion_scale_on_equal_returns_names_it(write_minari_dataset):
    dataset = _equal_returns_dataset(write_minari_dataset)
    with pytest.raises(DatasetError, match=r"all 2 episodes return 3\..*--reward-transform none"):
        load_minari_dataset(dataset, reward_transform="locomotion")
    stored = load_minari_dataset(dataset, reward_transform="none")
    assert stored.metadata.reward_scale == 1.0
    config = OfflineConfig(dataset=dataset, preset="mujoco", reward_transform="none").resolved()
    assert config.reward_transform == "none"
    assert OfflineConfig(dataset=dataset, preset="mujoco").resolved().reward_transform == "locomotion"
    assert OfflineConfig(dataset=dataset, preset="maze").resolved().reward_transform == "antmaze"
    line = describe_preset("mujoco", "--preset mujoco given", config)
    assert "reward transform none (--reward-transform; the preset's locomotion)" in line


SUMMARY = dict(dataset="d", steps=10, seed=0, num_seeds=3, normalized_score=90.0, normalized_score_std=2.0,
               return_mean=-150.0, return_std=40.0, eval_episodes=10, updates_per_second=100.0, wall_seconds=12.0,
               success_rate=0.5)


def test_the_summary_counts_every_seeds_evaluation_episodes():
    text = console_summary(SUMMARY, Path("run"))
    assert "over 3 seeds × 10 evaluation episodes" in text and "50% of 3 seeds × 10 evaluation episodes" in text
    one = console_summary({**SUMMARY, "num_seeds": 1, "eval_episodes": 1}, Path("run"))
    assert "over 1 evaluation episode\n" in one and "seeds ×" not in one


def test_the_summary_says_when_the_step_compiled_again_inside_the_timed_updates():
    assert "compiled 2 times" in console_summary({**SUMMARY, "compilations": 2}, Path("run"))
    assert "compiled" not in console_summary({**SUMMARY, "compilations": 1}, Path("run"))


@pytest.mark.parametrize("argv, episodes", [
    ([], 10),
    (["--preset", "maze"], 100),  # the paper's 100 on the mazes when the flag is not given
    (["--preset", "walker2d"], 50),  # walker2d's evaluations spread: 50 episodes
    (["--preset", "hopper"], 10),
    (["--preset", "maze", "--eval-episodes", "10"], 10),  # a value given is kept, the default's value included
    (["--preset", "antmaze", "--eval-episodes", "3"], 3),
])
def test_eval_episodes_are_the_presets_unless_given(argv, episodes):
    config, given = parse_cli(OfflineConfig, argv)
    assert config.resolved().eval_episodes == episodes
    assert ("eval_episodes" in given) == ("--eval-episodes" in argv)


def test_a_batch_larger_than_the_dataset_and_more_threads_than_cpus_are_said(tiny_datasets, tmp_path, capsys):
    from iql_torchrl.runs.threads import available_cpus

    size = load_minari_dataset(tiny_datasets.pendulum).metadata.num_transitions
    train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=tmp_path / "big",
                        **{**TINY, "steps": 2, "eval_every": 2, "batch_size": size + 1, "threads": available_cpus() + 1}))
    err = capsys.readouterr().err
    assert f"--batch-size {size + 1} is more than the {size:,} transitions of {tiny_datasets.pendulum}" in err
    assert f"--threads {available_cpus() + 1} is more than the {available_cpus()} CPUs" in err
    train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=tmp_path / "fits",
                        **{**TINY, "steps": 2, "eval_every": 2, "batch_size": size, "threads": 1}))
    err = capsys.readouterr().err
    assert "is more than the" not in err


@pytest.mark.parametrize("config_cls", ["OfflineConfig", "FinetuneConfig"])
def test_help_shows_each_flags_docstring_whole_on_a_wide_terminal(config_cls, monkeypatch, capsys):
    import inspect

    import docstring_parser

    from iql_torchrl.jobs.finetune import FinetuneConfig

    cls = {"OfflineConfig": OfflineConfig, "FinetuneConfig": FinetuneConfig}[config_cls]
    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit):
        parse_cli(cls, ["--help"])
    shown = [" ".join(line.strip("│ ").split()) for line in capsys.readouterr().out.splitlines()]
    docs = {}
    for base in reversed(cls.__mro__[:-1]):  # a subclass's docstring wins
        docs.update({p.arg_name: p.description for p in docstring_parser.parse_from_object(base).params})
    assert len(docs) >= 30
    for name, doc in docs.items():
        text = " ".join(inspect.cleandoc(doc).replace("``", "").split())
        assert any(text in line for line in shown), f"--{name.replace('_', '-')}: {text!r} is not one line of --help"


def _pendulum_episodes(rng, count=2, steps=3):
    return [dict(observations=rng.uniform(-1, 1, (steps + 1, 3)).astype(np.float32),
                 actions=rng.uniform(-2, 2, (steps, 1)).astype(np.float32), rewards=rng.uniform(-2, 0, steps),
                 terminations=[False] * steps, truncations=[False] * (steps - 1) + [True]) for _ in range(count)]


def test_data_whose_environment_has_no_time_limit_or_none_is_refused_before_training(write_minari_dataset, tmp_path):
    import gymnasium as gym
    from gymnasium.envs.registration import EnvSpec

    rng = np.random.default_rng(0)
    endless = EnvSpec(id="EndlessPendulum-v0", entry_point="gymnasium.envs.classic_control.pendulum:PendulumEnv",
                      max_episode_steps=None)
    write_minari_dataset("test/endless-v0", _pendulum_episodes(rng), env=endless, ref_min_score=-1200.0,
                         ref_max_score=-150.0)
    space = gym.make("Pendulum-v1")
    write_minari_dataset("test/no-env-v0", _pendulum_episodes(rng), space.observation_space, space.action_space)
    for dataset, says in (("test/endless-v0", r"EndlessPendulum-v0 of dataset test/endless-v0 has no time limit"),
                          ("test/no-env-v0", r"Dataset test/no-env-v0 records no environment")):
        out = tmp_path / dataset.replace("/", "-")
        with pytest.raises(EvaluationEnvError, match=says):
            train(OfflineConfig(dataset=dataset, output_dir=out, preset="mujoco", **TINY))
        assert not out.exists()
