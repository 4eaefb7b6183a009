"""Sparse-reward navigation: the local PointMaze datasets, goal-reaching data, the success rate and
the preset that follows the dataset."""
from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium_robotics")

from iql_torchrl.runs.config import PRESETS, RunConfig, auto_preset
from iql_torchrl.data import DatasetError, OfflineDataMetadata, load_minari_dataset
from iql_torchrl.datasets import build_dataset, check_recipe
from iql_torchrl.datasets.maze import (
    MAZE_BUILDERS,
    check_no_start_to_goal_episode,
    collect_maze_episodes,
    collection_env_spec,
    episode_visits,
    eval_env_spec,
    maze_reference_returns,
)
from iql_torchrl.datasets.maze_geometry import MAZES, WaypointController, cell_center, cell_distances, cell_of
from iql_torchrl.runs.evaluation import check_evaluation_env, evaluate_policy, summarize_seeds

UMAZE, MEDIUM, STITCH = ("iql_torchrl/pointmaze/umaze-v0", "iql_torchrl/pointmaze/medium-v0",
                         "iql_torchrl/pointmaze/medium-stitch-v0")
MEDIUM_GOAL_XY = [2.5, -2.5]  # cell (6, 6) of the 8 x 8 medium maze: x = 6.5 - 4, y = 4 - 6.5


@pytest.fixture(scope="module")
def maze_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("maze_datasets")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(root))
        for dataset_id, episodes in ((UMAZE, 12), (MEDIUM, 12), (STITCH, 40)):
            build_dataset(dataset_id, episodes=episodes, seed=3, reference_episodes=2, progress=False)
    return root


@pytest.fixture
def mazes(maze_root, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(maze_root))
    return maze_root


def minari_episodes(dataset_id):
    import minari

    return list(minari.load_dataset(dataset_id).iterate_episodes())


# ------------------------------------------------------------------ the controller
def test_value_iteration_counts_the_moves_around_the_umaze_wall():
    # U maze: the goal (1, 1) at the top left; the path runs right, down the right arm, then left
    distance = cell_distances(MAZES["umaze"].walls, (1, 1))
    assert distance == {(1, 1): 0, (1, 2): 1, (1, 3): 2, (2, 3): 3, (3, 3): 4, (3, 2): 5, (3, 1): 6}


def test_the_waypoint_goes_around_the_wall_not_through_it():
    walls = MAZES["umaze"].walls
    controller = WaypointController(walls)
    start, goal = cell_center(walls, (3, 1)), cell_center(walls, (1, 1))
    waypoint = controller.waypoint(start, goal)
    assert cell_of(walls, waypoint) == (3, 2)  # along the corridor, away from the goal as the crow flies
    assert cell_of(walls, start + (goal - start) / 2) == (2, 1) and walls[2][1] == 1  # straight ahead: a wall
    assert np.allclose(controller.waypoint(goal + 0.1, goal), goal)  # in the goal's cell: the goal itself


def test_noise_free_controller_scores_far_above_random_on_the_evaluation_goal():
    random_return, expert_return = maze_reference_returns("umaze", 2, 7)
    assert random_return < 5 and expert_return > 100  # 300 steps; the controller sits at the goal for most


# ------------------------------------------------------------------ the datasets
def test_navigation_episodes_end_truncated_at_their_first_success(mazes):
    for episode in minari_episodes(UMAZE):
        assert not episode.terminations.any() and episode.truncations[-1] and not episode.truncations[:-1].any()
        goal = episode.observations["desired_goal"]
        assert np.all(goal == goal[0])  # one goal per episode
        reached = np.linalg.norm(episode.observations["achieved_goal"][1:] - goal[0], axis=-1) <= 0.45
        assert np.array_equal(episode.rewards, reached.astype(float))
        assert reached[-1] and not reached[:-1].any()  # the reward comes once, at the last step


def test_each_new_goal_starts_where_the_last_episode_ended(mazes):
    episodes = minari_episodes(MEDIUM)
    for before, after in zip(episodes, episodes[1:]):
        assert np.array_equal(before.observations["observation"][-1], after.observations["observation"][0])
        assert not np.array_equal(before.observations["desired_goal"][-1], after.observations["desired_goal"][0])


def test_maze_datasets_are_reproducible_from_their_seed():
    recipe = MAZE_BUILDERS[STITCH]
    first, again, other = (collect_maze_episodes(recipe, 5, seed) for seed in (11, 11, 12))
    assert all(np.array_equal(a["actions"], b["actions"]) for a, b in zip(first, again))
    assert not all(np.array_equal(a["actions"][:3], b["actions"][:3]) for a, b in zip(first, other))


def test_no_stitching_episode_goes_from_the_evaluation_start_to_its_goal(mazes):
    maze = MAZES["medium"]
    distance_to_goal = cell_distances(maze.walls, maze.eval_goal)
    for episode in minari_episodes(STITCH):
        visits = episode_visits("medium", {"observations": episode.observations})
        assert not (maze.eval_start in visits and maze.eval_goal in visits)
        assert len(episode.rewards) <= 60
        start, goal = (cell_of(maze.walls, xy) for xy in (episode.observations["achieved_goal"][0],
                                                           episode.observations["desired_goal"][0]))
        assert 1 <= cell_distances(maze.walls, start)[goal] <= 2
    assert distance_to_goal[maze.eval_start] > 4  # so stitching is needed


def test_the_stitching_check_refuses_an_episode_from_start_to_goal():
    maze = MAZES["medium"]
    path = np.stack([cell_center(maze.walls, maze.eval_start), cell_center(maze.walls, maze.eval_goal)])
    with pytest.raises(RuntimeError, match=r"episode 0 goes from the evaluation's start cell \(1, 1\)"):
        check_no_start_to_goal_episode("medium", [{"observations": {"achieved_goal": path}}])


def test_maze_datasets_record_the_fixed_goal_evaluation_env_and_the_simulator_versions(mazes):
    import minari

    dataset = minari.load_dataset(MEDIUM)
    eval_map = dataset._eval_env_spec.kwargs["maze_map"]
    assert eval_map[1][1] == "r" and eval_map[6][6] == "g"
    assert dataset._eval_env_spec.kwargs["reset_target"] is False and dataset._eval_env_spec.max_episode_steps == 600
    assert dataset.storage.metadata["ref_max_score"] > 100 > dataset.storage.metadata["ref_min_score"]
    check_recipe(MEDIUM)  # the description matches this recipe
    from importlib.metadata import version

    # the simulator that stepped the episodes: another MuJoCo or maze package would step them elsewhere
    assert dataset.storage.metadata["requirements"] == [f"mujoco=={version('mujoco')}",
                                                        f"gymnasium-robotics=={version('gymnasium-robotics')}"]


# ------------------------------------------------------------------ goal in or out of the input
def test_goal_out_drops_desired_goal_and_relabels_rewards_to_the_evaluation_goal(mazes):
    buffer = load_minari_dataset(MEDIUM)  # the builder's choice: out
    assert buffer.metadata.observation_keys == ["achieved_goal", "observation"]
    assert buffer.metadata.reward_goal == MEDIUM_GOAL_XY
    expected = np.concatenate([
        (np.linalg.norm(e.observations["achieved_goal"][1:] - MEDIUM_GOAL_XY, axis=-1) <= 0.45) for e in minari_episodes(MEDIUM)
    ]).astype(np.float32)
    stored = np.concatenate([e.rewards for e in minari_episodes(MEDIUM)])
    rewards = buffer[:]["next", "reward"].squeeze(-1).numpy()
    np.testing.assert_array_equal(rewards, expected)
    assert not np.array_equal(rewards, stored)  # the rewards for the moving goals would be another dataset


def test_goal_in_keeps_desired_goal_and_the_stored_rewards(mazes):
    buffer = load_minari_dataset(MEDIUM, goal_in_observation=True)
    assert buffer.metadata.observation_keys == ["achieved_goal", "desired_goal", "observation"]
    assert buffer.metadata.reward_goal is None
    stored = np.concatenate([e.rewards for e in minari_episodes(MEDIUM)])
    np.testing.assert_array_equal(buffer[:]["next", "reward"].squeeze(-1).numpy(), stored)


# ------------------------------------------------------------------ success as a terminal (D4RL AntMaze's convention)
def test_success_terminal_marks_exactly_the_relabelled_successes_terminated(mazes):
    buffer = load_minari_dataset(MEDIUM, success_terminal=True)
    data = buffer[:]
    success = data["next", "reward"].squeeze(-1) == 1
    stored = torch.as_tensor(np.concatenate([e.terminations for e in minari_episodes(MEDIUM)]))
    assert int(success.sum()) > 0
    assert torch.equal(data["next", "terminated"].squeeze(-1), success | stored)
    assert torch.equal(data["next", "done"], data["next", "terminated"] | data["next", "truncated"])
    # the wrong variant: the continuing data (the default) has no terminal at the goal
    assert not load_minari_dataset(MEDIUM)[:]["next", "terminated"].any()


def test_success_terminal_is_refused_with_the_goal_in_the_input(mazes):
    with pytest.raises(DatasetError, match=r"success_terminal \(--success-terminal\).*--goal-input no"):
        load_minari_dataset(MEDIUM, goal_in_observation=True, success_terminal=True)


def test_success_terminal_is_refused_on_data_without_goals(tiny_datasets):
    with pytest.raises(DatasetError, match="success_terminal.*no 'desired_goal' in the observations"):
        load_minari_dataset("iql_torchrl/pendulum/mixed-v0", success_terminal=True)


def test_the_maze_preset_makes_the_goal_terminal_where_the_goal_is_out_of_the_input(mazes):
    # the loader's None (the maze preset's rule): terminal at the relabelled successes, goal-in data left as stored
    out = load_minari_dataset(MEDIUM, success_terminal=None)[:]
    assert torch.equal(out["next", "terminated"].squeeze(-1), out["next", "reward"].squeeze(-1) == 1)
    kept = load_minari_dataset(MEDIUM, goal_in_observation=True, success_terminal=None)[:]
    assert not kept["next", "terminated"].any()  # no fixed goal relabelled: nothing to make terminal, nothing refused
    # the run's settings: the maze and antmaze presets ask for it, --success-terminal / --no-success-terminal decide
    assert RunConfig(dataset=MEDIUM).success_terminal_option() is None
    assert RunConfig(dataset="D4RL/antmaze/umaze-v1").success_terminal_option() is None
    assert RunConfig(dataset=MEDIUM, success_terminal=False).success_terminal_option() is False
    assert RunConfig(dataset=MEDIUM, preset="mujoco").success_terminal_option() is False
    assert RunConfig(dataset=MEDIUM, preset="maze-continuing").success_terminal_option() is False
    assert PRESETS["maze-continuing"].reward_transform == "none"  # the goal data as stored
    assert RunConfig(dataset="iql_torchrl/pendulum/mixed-v0").success_terminal_option() is False


def test_the_preset_line_says_whether_the_goal_is_terminal():
    from iql_torchrl.runs.config import describe_preset

    assert "goal terminal where the goal is out of the input" in describe_preset("maze", "r", RunConfig(dataset=MEDIUM))
    assert ", goal continuing" in describe_preset("maze", "r", RunConfig(dataset=MEDIUM, success_terminal=False))
    assert "goal" not in describe_preset("mujoco", "r", RunConfig(dataset="iql_torchrl/pendulum/mixed-v0"))


def test_the_goal_rule_is_auto_unless_a_flag_forces_it():
    from iql_torchrl.runs.config import ConfigError, OfflineConfig, parse_cli

    assert parse_cli(OfflineConfig, [])[0].success_terminal == "auto"
    assert parse_cli(OfflineConfig, ["--success-terminal"])[0].success_terminal is True
    config, given = parse_cli(OfflineConfig, ["--no-success-terminal"])
    assert config.success_terminal is False and "success_terminal" in given
    with pytest.raises(ConfigError, match="--success-terminal 1: must be True, False or auto"):
        RunConfig(success_terminal=1).check()


def test_fine_tuning_keeps_the_goal_rule_of_its_preset():
    from iql_torchrl.jobs.finetune import FinetuneConfig
    from iql_torchrl.runs.config import describe_preset

    assert FinetuneConfig(dataset=MEDIUM).success_terminal_option() is None  # the maze preset's: terminal where relabelled
    assert "goal terminal where the goal is out of the input" in describe_preset("maze", "r", FinetuneConfig(dataset=MEDIUM))
    FinetuneConfig(dataset=MEDIUM, success_terminal=True).check()  # the environments end their episodes at the goal too
    assert FinetuneConfig(dataset=MEDIUM, success_terminal=False).success_terminal_option() is False


@pytest.mark.parametrize("terminal", [True, False])
def test_online_maze_episodes_end_at_the_goal_exactly_where_the_data_does(mazes, terminal):
    # the point driven to umaze's goal by the data's own controller: with the rule, the first step that reaches it
    # (reward 1 − 1 = 0) is terminated and the episode ends there, as D4RL AntMaze's do; continuing, it goes on
    from tensordict import TensorDict

    from iql_torchrl.jobs.online import make_online_env

    metadata = load_minari_dataset(UMAZE, success_terminal=None if terminal else False, reward_transform="antmaze").metadata
    assert metadata.success_terminal is terminal
    env = make_online_env(metadata, num_envs=1, seed=0)
    maze = env.base_env._envs[0]._env.unwrapped  # the PointMaze inside the SerialEnv's GymWrapper(EpisodeReplay(...))
    controller = WaypointController(MAZES["umaze"].walls)
    env.reset()
    rewards, terminated = [], []
    for _ in range(300):
        point = maze.point_env.data
        observation = {"observation": np.concatenate([point.qpos[:2], point.qvel[:2]]), "desired_goal": maze.goal}
        action = torch.as_tensor(controller(observation), dtype=torch.float32).reshape(1, 2)
        step = env.step(TensorDict({"action": action}, batch_size=[1]))["next"]
        rewards.append(step["reward"].item())
        terminated.append(step["terminated"].item())
        if step["done"].item():
            break
    first_success = rewards.index(0.0)  # r − 1 at the goal
    assert all(r == -1.0 for r in rewards[:first_success])
    if terminal:
        assert terminated == [False] * first_success + [True]
    else:
        assert not any(terminated) and len(rewards) > first_success + 1 and rewards[first_success + 1] == 0.0
    env.close()


def test_bootstrapping_stops_at_the_goal_of_a_three_state_chain(minari_root, write_minari_dataset):
    # s0 -> s1 -> s2 -> s3, s2 at the goal: the transition s1 -> s2 is the success (r = 1). With V ≡ 5, γ 0.99
    # and both critics ≡ 0, each critic's squared error is (γ·5)² where the chain goes on, and 1 at the goal:
    # loss_qvalue = 2 · mean(4.95², 1², 4.95²) = 33.336…; continuing data bootstraps there too: 2 · mean(4.95², 5.95², 4.95²)
    from tensordict.nn import TensorDictModule

    from iql_torchrl import IQLLoss, make_iql_networks

    far = [-2.5, 2.5]
    achieved = np.array([far, far, MEDIUM_GOAL_XY, far], dtype=np.float64)
    episode = dict(observations={"achieved_goal": achieved, "desired_goal": np.zeros((4, 2)), "observation": np.zeros((4, 4))},
                   actions=np.zeros((3, 2), np.float32), rewards=np.zeros(3), terminations=np.zeros(3, bool),
                   truncations=np.array([False, False, True]))
    write_minari_dataset("D4RL/pointmaze/medium-v2", [episode], *maze_spaces(4, 2), env=collection_env_spec("medium"),
                         eval_env=eval_env_spec("medium"))

    class Constant(torch.nn.Module):  # a network whose output is its bias, whatever its inputs
        def __init__(self, value):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor([value]))

        def forward(self, *inputs):
            return self.bias.expand(*inputs[0].shape[:-1], 1)

    def constant(in_keys, out_key, value):
        return TensorDictModule(Constant(value), in_keys=in_keys, out_keys=[out_key])

    losses = {}
    for success_terminal in (True, False):
        data = load_minari_dataset("D4RL/pointmaze/medium-v2", download=False, success_terminal=success_terminal)[:]
        obs_dim = data["observation"].shape[-1]
        actor, _, _ = make_iql_networks(obs_dim, 2, hidden_sizes=(8,))
        critics = [constant(["observation", "action"], "state_action_value", 0.0) for _ in range(2)]
        loss = IQLLoss(actor, critics, constant(["observation"], "state_value", 5.0))
        loss.make_value_estimator(gamma=0.99)
        assert data["next", "reward"].squeeze(-1).tolist() == [0.0, 1.0, 0.0]
        losses[success_terminal] = loss.qvalue_loss(data)[0].item()
    assert losses[True] == pytest.approx(2 * (4.95**2 + 1.0 + 4.95**2) / 3, rel=1e-5)
    assert losses[False] == pytest.approx(2 * (4.95**2 + 5.95**2 + 4.95**2) / 3, rel=1e-5)


def maze_data(rng, episodes, length, observation_dim, action_dim, near=None):
    result = []
    for _ in range(episodes):
        achieved = rng.normal(size=(length + 1, 2))
        if near is not None:
            achieved[length // 2] = np.asarray(near) + 0.1
        result.append(dict(
            observations={"achieved_goal": achieved, "desired_goal": rng.normal(size=(length + 1, 2)),
                          "observation": rng.normal(size=(length + 1, observation_dim))},
            actions=rng.uniform(-1, 1, size=(length, action_dim)).astype(np.float32),
            rewards=np.zeros(length), terminations=np.zeros(length, bool),
            truncations=np.eye(1, length, length - 1, dtype=bool)[0]))
    return result


def maze_spaces(observation_dim, action_dim):
    box = lambda n: gym.spaces.Box(-np.inf, np.inf, (n,), np.float64)  # noqa: E731
    return (gym.spaces.Dict({"achieved_goal": box(2), "desired_goal": box(2), "observation": box(observation_dim)}),
            gym.spaces.Box(-1, 1, (action_dim,), np.float32))


D4RL_ANTMAZE_EVAL = gym.envs.registration.EnvSpec(
    "AntMaze_UMaze-v4", entry_point="gymnasium_robotics.envs.maze.ant_maze_v4:AntMazeEnv", max_episode_steps=700,
    kwargs=dict(maze_map=[[1, 1, 1, 1, 1], [1, "r", 0, 0, 1], [1, 1, 1, 0, 1], [1, "g", 0, 0, 1], [1, 1, 1, 1, 1]],
                continuing_task=True, reset_target=False))


@pytest.mark.parametrize("dataset_id", ["D4RL/pointmaze/medium-v2", "D4RL/antmaze/umaze-v1"])
def test_d4rl_maze_ids_load_the_same_format(minari_root, write_minari_dataset, dataset_id):
    rng = np.random.default_rng(0)
    if "pointmaze" in dataset_id:
        env, eval_env, dims, goal = collection_env_spec("medium"), eval_env_spec("medium"), (4, 2), MEDIUM_GOAL_XY
    else:  # cells of 4: the 'g' cell (3, 1) of the 5 x 5 U maze is centred at x = 1.5 * 4 - 10, y = 10 - 3.5 * 4
        eval_env, dims, goal = D4RL_ANTMAZE_EVAL, (27, 8), [-4.0, -4.0]
        env = gym.envs.registration.EnvSpec(D4RL_ANTMAZE_EVAL.id, entry_point=D4RL_ANTMAZE_EVAL.entry_point,
                                            kwargs=dict(D4RL_ANTMAZE_EVAL.kwargs, maze_map=[[1 if c == 1 else 0 for c in row]
                                                                                       for row in D4RL_ANTMAZE_EVAL.kwargs["maze_map"]]))
    episodes = maze_data(rng, 3, 6, *dims, near=goal)
    write_minari_dataset(dataset_id, episodes, *maze_spaces(*dims), env=env, eval_env=eval_env)
    buffer = load_minari_dataset(dataset_id, download=False)
    assert buffer.metadata.observation_keys == ["achieved_goal", "observation"]  # D4RL's: no goal in the input
    assert buffer.metadata.reward_goal == pytest.approx(goal)
    assert float(buffer[:]["next", "reward"].sum()) == 3  # each episode passes the goal once (step 3 -> next obs)
    assert auto_preset(dataset_id)[0] == ("maze" if "pointmaze" in dataset_id else "antmaze")
    check_evaluation_env(buffer.metadata)


def test_an_evaluation_maze_with_other_walls_is_refused(minari_root, write_minari_dataset):
    rng = np.random.default_rng(0)
    other = eval_env_spec("medium")
    other.kwargs["maze_map"][2][1] = 1  # one more wall
    write_minari_dataset("D4RL/pointmaze/medium-v2", maze_data(rng, 2, 5, 4, 2), *maze_spaces(4, 2),
                         env=collection_env_spec("medium"), eval_env=other)
    with pytest.raises(DatasetError, match="'maze_map'"):
        load_minari_dataset("D4RL/pointmaze/medium-v2", download=False)


def test_an_offline_d4rl_maze_id_names_the_remote_extra(minari_root, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"\[remote\]"):
        load_minari_dataset("D4RL/antmaze/umaze-v1", download=False)


def metadata_of(dataset_id, **changes) -> OfflineDataMetadata:
    state = load_minari_dataset(dataset_id).metadata.state_dict()
    return OfflineDataMetadata.from_state_dict({**state, **changes})


def test_an_evaluation_env_without_an_entry_the_data_has_is_refused_naming_it(mazes):
    metadata = metadata_of(MEDIUM, observation_keys=["achieved_goal", "goal_image", "observation"],
                           observation_key_shapes=[[2], [2], [4]])
    with pytest.raises(DatasetError, match="no entry 'goal_image'"):
        check_evaluation_env(metadata)


def test_goal_shapes_that_differ_between_data_and_evaluation_env_are_refused_naming_the_key(mazes):
    metadata = metadata_of(MEDIUM, observation_keys=["achieved_goal", "desired_goal", "observation"],
                           observation_key_shapes=[[2], [3], [4]], observation_dim=9)
    with pytest.raises(DatasetError, match=r"'desired_goal' has shape \[2\] but the data's has \[3\]"):
        check_evaluation_env(metadata)
    check_evaluation_env(metadata_of(MEDIUM))  # the data's own layout passes


# ------------------------------------------------------------------ success rate
class ControllerActor:
    """The noise-free controller as a policy on flattened goal-in observations (achieved, desired, observation)."""

    def __init__(self, walls, moving=True):
        self.controller, self.moving = WaypointController(walls), moving

    def __call__(self, td):
        obs = td["observation"].numpy()
        actions = [self.controller({"observation": o[4:], "desired_goal": o[2:4]}) if self.moving else np.zeros(2, np.float32)
                   for o in obs]
        return td.set("action", torch.as_tensor(np.stack(actions)))


def test_success_rate_counts_episodes_that_reach_the_goal(mazes):
    metadata = load_minari_dataset(UMAZE, goal_in_observation=True).metadata
    reaching = evaluate_policy(ControllerActor(MAZES["umaze"].walls), metadata, episodes=3)
    standing = evaluate_policy(ControllerActor(MAZES["umaze"].walls, moving=False), metadata, episodes=3)
    assert reaching["successes"] == [True] * 3 and reaching["success_rate"] == 1.0
    assert standing["success_rate"] == 0.0 and standing["return_mean"] == 0.0
    # the rate is about reaching the goal, not the return: one step at the goal counts as much as 200
    summary = summarize_seeds([{"seed": 0, **reaching}, {"seed": 1, **standing}])
    assert summary["success_rate"] == 0.5 and summary["per_seed"][1]["success_rate"] == 0.0
    # the step each episode first reached the goal, as one env stepped by hand counts it (from 1); none standing
    controller, first = WaypointController(MAZES["umaze"].walls), []
    for i in range(3):
        env = metadata.make_env()
        observation, _ = env.reset(seed=i)
        for step in range(1, 1000):
            observation, _, _, _, info = env.step(controller(observation))
            if info["success"]:
                break
        first.append(step)
        env.close()
    assert reaching["steps_to_goal"] == first and standing["steps_to_goal"] == [None] * 3
    assert all(1 < n < 300 for n in first)


def test_environments_without_success_report_no_rate(tiny_datasets):
    metadata = load_minari_dataset(tiny_datasets.pendulum).metadata
    actor = lambda td: td.set("action", torch.zeros(td.batch_size[0], 1))  # noqa: E731
    result = evaluate_policy(actor, metadata, episodes=2)
    assert "success_rate" not in result and summarize_seeds([{"seed": 0, **result}])["success_rate"] is None


# ------------------------------------------------------------------ --preset auto
@pytest.mark.parametrize("dataset_id, preset", [
    ("D4RL/antmaze/umaze-v1", "antmaze"), ("D4RL/antmaze/large-diverse-v1", "antmaze"),
    ("D4RL/pointmaze/medium-v2", "maze"), (STITCH, "maze"), (UMAZE, "maze"),
    ("mujoco/hopper/medium-v0", "hopper"), ("D4RL/hopper/medium-v2", "hopper"), ("D4RL/walker2d/expert-v2", "walker2d"),
    ("mujoco/walker2d/medium-v0", "walker2d"), ("iql_torchrl/walker2d/medium-expert-v1", "walker2d"), ("iql_torchrl/hopper/medium-replay-v1", "hopper"),
    ("iql_torchrl/halfcheetah/medium-v1", "mujoco"),
    ("D4RL/halfcheetah/medium-replay-v2", "mujoco"), ("D4RL/kitchen/mixed-v2", "kitchen"),
    ("D4RL/door/human-v2", "adroit"), ("D4RL/hammer/expert-v2", "adroit"), ("D4RL/pen/cloned-v2", "adroit"),
    ("D4RL/relocate/human-v2", "adroit"), ("iql_torchrl/pendulum/mixed-v0", "mujoco"),
])
def test_auto_preset_follows_the_dataset_id(dataset_id, preset):
    chosen, reason = auto_preset(dataset_id)
    assert chosen == preset and reason.startswith("auto:")
    resolved = RunConfig(dataset=dataset_id).resolved()
    assert resolved.preset == preset
    assert (resolved.expectile, resolved.temperature) == (PRESETS[preset].expectile, PRESETS[preset].temperature)
    assert (resolved.tau, resolved.actor) == (PRESETS[preset].tau, PRESETS[preset].actor)


def test_an_unknown_dataset_gets_mujoco_with_a_reason_saying_so():
    preset, reason = auto_preset("someone/sparse-task/v0-v1")
    assert preset == "mujoco" and "no preset is known for someone/sparse-task/v0-v1" in reason


def test_goal_data_with_one_fixed_goal_gets_the_maze_preset_whatever_its_id(minari_root, write_minari_dataset):
    rng = np.random.default_rng(0)
    observation_space, action_space = maze_spaces(4, 2)
    write_minari_dataset("someone/maze2d-like/medium-v0", maze_data(rng, 2, 5, 4, 2), observation_space, action_space,
                         env=collection_env_spec("medium"), eval_env=eval_env_spec("medium"))
    preset, reason = auto_preset("someone/maze2d-like/medium-v0")
    assert preset == "maze" and "goal data" in reason and "one fixed evaluation goal" in reason
    assert RunConfig(dataset="someone/maze2d-like/medium-v0").resolved().temperature == PRESETS["maze"].temperature
    # the same observations whose evaluation maze holds two goal cells: no fixed goal, no goal preset
    two_goals = eval_env_spec("medium")
    two_goals.kwargs["maze_map"][1][1] = "g"
    write_minari_dataset("someone/maze2d-like/two-goals-v0", maze_data(rng, 2, 5, 4, 2), observation_space, action_space,
                         env=collection_env_spec("medium"), eval_env=two_goals)
    assert auto_preset("someone/maze2d-like/two-goals-v0")[0] == "mujoco"
    # a fixed goal but no achieved_goal to relabel from: not goal data
    episodes = [dict(episode, observations={key: value for key, value in episode["observations"].items()
                                            if key != "achieved_goal"}) for episode in maze_data(rng, 2, 5, 4, 2)]
    no_achieved = gym.spaces.Dict({key: space for key, space in observation_space.spaces.items() if key != "achieved_goal"})
    write_minari_dataset("someone/maze2d-like/no-achieved-v0", episodes, no_achieved, action_space,
                         env=collection_env_spec("medium"), eval_env=eval_env_spec("medium"))
    assert auto_preset("someone/maze2d-like/no-achieved-v0")[0] == "mujoco"


def test_an_unknown_dataset_not_on_disk_says_its_data_was_not_inspected(minari_root):
    preset, reason = auto_preset("someone/maze2d-like/large-v0")
    assert preset == "mujoco" and "not on disk yet" in reason


def test_an_explicit_preset_wins_over_the_dataset_id():
    resolved = RunConfig(dataset="D4RL/antmaze/umaze-v1", preset="mujoco").resolved()
    assert (resolved.preset, resolved.expectile, resolved.temperature, resolved.eval_episodes) == ("mujoco", 0.7, 3.0, 10)
    assert RunConfig(dataset="D4RL/antmaze/umaze-v1", expectile=0.8).resolved().expectile == 0.8


def test_maze_presets_evaluate_100_episodes_unless_told_otherwise():
    assert RunConfig(dataset=STITCH).resolved().eval_episodes == 100
    assert RunConfig(dataset=STITCH, eval_episodes=20).resolved().eval_episodes == 20
    assert PRESETS["maze"].reward_transform == "antmaze"  # r − 1, never the locomotion scaling on goal-reaching data


def test_resume_keeps_the_preset_the_run_started_with():
    from iql_torchrl.runs.config import config_to_dict
    from iql_torchrl.runs.resume import ResumeError, resumed_config
    from iql_torchrl.runs.config import OfflineConfig

    started = OfflineConfig(dataset="iql_torchrl/pendulum/mixed-v0", preset="antmaze", output_dir="/tmp/x").resolved()
    saved = config_to_dict(started)
    again = OfflineConfig(dataset="iql_torchrl/pendulum/mixed-v0", output_dir="/tmp/x", resume=True)  # preset: auto
    assert resumed_config(OfflineConfig, saved, again, {"preset"}).preset == "antmaze"  # auto would pick mujoco
    with pytest.raises(ResumeError, match="--preset: checkpoint antmaze, given mujoco"):
        resumed_config(OfflineConfig, saved, OfflineConfig(preset="mujoco", output_dir="/tmp/x", resume=True), {"preset"})


def test_fine_tuning_a_maze_run_keeps_its_goal_rule_and_a_run_of_another_rule_is_refused(mazes, tmp_path,
                                                                                        stop_after_checkpoint):
    from iql_offline import train
    from iql_torchrl.jobs.finetune import FinetuneConfig, finetune
    from iql_torchrl.runs.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
    from iql_torchrl.runs.config import OfflineConfig
    from iql_torchrl.runs.resume import ResumeError

    small = dict(batch_size=32, eval_episodes=1, hidden_sizes=(8,), device="cpu", progress=False, logger="none")
    offline = train(OfflineConfig(dataset=UMAZE, steps=4, eval_every=4, output_dir=tmp_path / "offline", **small))
    assert offline["preset"] == "maze" and offline["success_terminal"] is True
    tuned = finetune(FinetuneConfig(checkpoint=tmp_path / "offline", output_dir=tmp_path / "tuned", online_steps=16,
                                    num_envs=1, frames_per_batch=16, eval_every=8, **small))
    assert tuned["success_terminal"] is True  # the offline phase's data, not the environment's continuing goal
    # a run whose data were read continuing (a checkpoint from before the rule was recorded) goes on under no other rule
    stop_after_checkpoint(lambda run: run.step == 4)
    with pytest.raises(KeyboardInterrupt):
        train(OfflineConfig(dataset=UMAZE, steps=8, eval_every=8, checkpoint_every=4, output_dir=tmp_path / "stopped", **small))
    stop_after_checkpoint(None)
    for folder in ("offline", "stopped"):
        state = load_checkpoint(tmp_path / folder / CHECKPOINT_NAME)
        del state["data"]["success_terminal"]
        save_checkpoint(tmp_path / folder / CHECKPOINT_NAME, state)
    refused = r"with the goal continuing \(success_terminal\) and would now read it with the goal terminal"
    with pytest.raises(ResumeError, match=refused):
        train(OfflineConfig(dataset=UMAZE, steps=8, eval_every=8, checkpoint_every=4, output_dir=tmp_path / "stopped",
                            resume=True, **small))
    with pytest.raises(ResumeError, match=refused):
        finetune(FinetuneConfig(checkpoint=tmp_path / "offline", output_dir=tmp_path / "again", online_steps=16,
                                num_envs=1, frames_per_batch=16, **small))


def test_data_read_with_another_reward_transform_is_refused_by_name():
    from iql_torchrl.runs.resume import ResumeError, check_same_data

    saved = dict(dataset=UMAZE, num_transitions=10, files_sha256="f", observation_mean=[0.0], observation_std=[1.0],
                 reward_scale=1.0, reward_shift=0.0)  # no goal rule recorded: read continuing
    check_same_data(saved, {**saved, "success_terminal": False})
    with pytest.raises(ResumeError, match=r"rewards would now be transformed otherwise \(reward_shift differ"):
        check_same_data(saved, {**saved, "reward_shift": -1.0, "success_terminal": False})
    with pytest.raises(ResumeError, match=r"not the data this run trained on \(files_sha256 differ"):
        check_same_data(saved, {**saved, "files_sha256": "g", "reward_shift": -1.0, "success_terminal": True})


def test_a_run_names_its_preset_and_the_reason(tiny_datasets, tmp_path, capsys):
    from iql_offline import train
    from iql_torchrl.runs.config import OfflineConfig

    summary = train(OfflineConfig(dataset=tiny_datasets.pendulum, steps=4, eval_every=4, eval_episodes=1, log_every=2,
                           output_dir=tmp_path / "run", progress=False, logger="none", device="cpu", hidden_sizes=(8,)))
    assert summary["preset"] == "mujoco" and "declares the mujoco preset" in summary["preset_reason"]
    assert "preset mujoco (expectile 0.7, temperature 3.0" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["preset_reason"] == summary["preset_reason"]


def test_the_preset_line_shows_the_values_the_run_overrides(tiny_datasets, tmp_path, capsys):
    from iql_offline import train
    from iql_torchrl.runs.config import OfflineConfig

    train(OfflineConfig(dataset=tiny_datasets.pendulum, steps=2, eval_every=2, eval_episodes=1, log_every=2, expectile=0.5,
                 output_dir=tmp_path / "run", progress=False, logger="none", device="cpu", hidden_sizes=(8,)))
    line = next(l for l in capsys.readouterr().err.splitlines() if l.startswith("preset mujoco"))
    # the run's τ and the preset's, not the preset's alone; β as the preset has it
    assert line.startswith("preset mujoco (expectile 0.5 (--expectile; the preset's 0.7), temperature 3.0, ")


def _stderr_of(code: str, path: str = "") -> str:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stderr


def test_a_maze_environment_leaves_out_gymnasium_robotics_adroit_notice_and_nothing_else(tmp_path):
    from iql_torchrl.datasets.environments import ADROIT_NOTICE

    maze = ("from iql_torchrl.datasets.maze import eval_env_spec\n"
            "from iql_torchrl.datasets.environments import make_env\n"
            "make_env(eval_env_spec('umaze')).reset(seed=0)\n")
    assert ADROIT_NOTICE not in _stderr_of(maze)
    # a stand-in gymnasium_robotics that prints the notice and one more line: only the notice goes
    fake = tmp_path / "gymnasium_robotics"
    fake.mkdir()
    (fake / "__init__.py").write_text(f"import sys\nprint({ADROIT_NOTICE + ' functions …'!r}, file=sys.stderr)\n"
                                      "print('another line', file=sys.stderr)\n")
    quiet = "from iql_torchrl.datasets.environments import import_gymnasium_robotics_for_mazes as f\nf()\n"
    assert _stderr_of(quiet, str(tmp_path)) == "another line\n"
    assert ADROIT_NOTICE in _stderr_of("import gymnasium_robotics\n", str(tmp_path))  # imported plainly, it says it
