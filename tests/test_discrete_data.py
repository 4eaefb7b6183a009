"""Discrete actions in the data layer: indices, one-hot, range checks, metadata; Box actions
outside the environment's bounds are refused, never clipped silently."""

from __future__ import annotations

import json
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Categorical, OneHot

from iql_torchrl.data import (
    ACTION_CLIP_EPS,
    BufferOptions,
    DatasetError,
    OfflineDataMetadata,
    buffer_transitions,
    load_minari_dataset,
    make_offline_buffer,
    read_minari_transitions,
)

OBSERVATION_SPACE = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)


def _discrete_episodes(actions_per_episode, seed=0):
    """Episodes with hand-given integer actions; the last step of each is terminal."""
    rng = np.random.default_rng(seed)
    episodes = []
    for actions in actions_per_episode:
        length = len(actions)
        episodes.append(
            dict(
                observations=rng.normal(size=(length + 1, 4)).astype(np.float32),
                actions=np.asarray(actions, dtype=np.int64),
                rewards=np.ones(length),
                terminations=np.arange(length) == length - 1,
                truncations=np.zeros(length, dtype=bool),
            )
        )
    return episodes


ACTIONS = [[0, 2, 1, 1], [2, 0, 0]]


@pytest.fixture
def discrete_dataset(write_minari_dataset):
    write_minari_dataset("test/discrete/three-v0", _discrete_episodes(ACTIONS), OBSERVATION_SPACE, gym.spaces.Discrete(3))
    return "test/discrete/three-v0"


def test_discrete_actions_load_as_int64_indices_equal_to_the_source(discrete_dataset):
    buffer = load_minari_dataset(discrete_dataset, batch_size=None)
    stored = buffer_transitions(buffer)
    assert stored["action"].dtype == torch.int64
    assert stored["action"].shape == (7,)
    assert stored["action"].tolist() == [0, 2, 1, 1, 2, 0, 0]
    assert buffer.sample(5)["action"].shape == (5,)
    assert read_minari_transitions(discrete_dataset)["action"].tolist() == [0, 2, 1, 1, 2, 0, 0]


def test_one_hot_actions_on_request_are_float32_rows_of_the_identity(discrete_dataset):
    buffer = load_minari_dataset(discrete_dataset, one_hot_actions=True)
    stored = buffer_transitions(buffer)["action"]
    expected = torch.tensor(
        [[1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [1, 0, 0]], dtype=torch.float32
    )
    assert stored.dtype == torch.float32 and torch.equal(stored, expected)
    metadata = buffer.metadata
    assert metadata.one_hot_actions
    assert metadata.action_to_env(expected).tolist() == [0, 2, 1, 1, 2, 0, 0]
    assert torch.equal(metadata.action_from_env(torch.tensor([0, 2, 1, 1, 2, 0, 0])), expected)
    assert isinstance(metadata.action_spec(), OneHot)


def test_discrete_metadata_records_the_space_and_the_number_of_actions(discrete_dataset):
    metadata = load_minari_dataset(discrete_dataset).metadata
    assert (metadata.action_space, metadata.num_actions, metadata.action_dim) == ("discrete", 3, 3)
    assert metadata.discrete and not metadata.actions_scaled and metadata.action_clip_eps == 0.0
    assert metadata.action_low == [] and metadata.action_high == []
    assert metadata.stored_action_box() is None
    spec = metadata.action_spec()
    assert isinstance(spec, Categorical) and spec.space.n == 3 and spec.dtype == torch.int64
    # indices go to the environment unchanged
    assert metadata.action_to_env(torch.tensor([2, 0])).tolist() == [2, 0]
    restored = OfflineDataMetadata.from_state_dict(json.loads(json.dumps(metadata.state_dict())))
    assert restored == metadata


def test_metadata_saved_before_discrete_actions_existed_still_loads(tiny_datasets):
    state = load_minari_dataset(tiny_datasets.pendulum).metadata.state_dict()
    for key in ("action_space", "num_actions", "one_hot_actions"):
        del state[key]  # what older checkpoints hold
    restored = OfflineDataMetadata.from_state_dict(state)
    assert (restored.action_space, restored.num_actions, restored.one_hot_actions) == ("box", None, False)
    with pytest.raises(KeyError, match="missing keys \\['action_dim'\\]"):
        OfflineDataMetadata.from_state_dict({k: v for k, v in state.items() if k != "action_dim"})


def test_out_of_range_indices_are_refused_naming_the_episode(write_minari_dataset):
    episodes = _discrete_episodes([[0, 1], [1, 3, 0]])  # 3 is not an index of Discrete(3)
    write_minari_dataset("test/discrete/bad-v0", episodes, OBSERVATION_SPACE, gym.spaces.Discrete(3))
    with pytest.raises(DatasetError, match=r"index 3 in episode 1 .*3 actions \(valid indices 0\.\.2\); 1 of"):
        load_minari_dataset("test/discrete/bad-v0")


def test_user_indices_out_of_range_are_refused():
    transitions = _user_transitions(torch.tensor([0, 1, -1, 1]))
    with pytest.raises(DatasetError, match="index -1 in episode 0"):
        make_offline_buffer(transitions, num_actions=2)


def test_multidiscrete_actions_are_refused_with_the_reason(write_minari_dataset):
    rng = np.random.default_rng(0)
    episode = dict(
        observations=rng.normal(size=(3, 4)).astype(np.float32),
        actions=np.array([[0, 1], [1, 2]], dtype=np.int64),
        rewards=np.zeros(2),
        terminations=np.array([False, True]),
        truncations=np.zeros(2, dtype=bool),
    )
    write_minari_dataset("test/discrete/multi-v0", [episode], OBSERVATION_SPACE, gym.spaces.MultiDiscrete([2, 3]))
    with pytest.raises(DatasetError, match="MultiDiscrete action space.*only Box and Discrete"):
        load_minari_dataset("test/discrete/multi-v0")


def test_a_dataset_with_another_number_of_actions_than_its_env_is_refused(write_minari_dataset):
    episodes = _discrete_episodes([[0, 2, 1]])
    write_minari_dataset("test/discrete/env-v0", episodes, OBSERVATION_SPACE, gym.spaces.Discrete(3), env="CartPole-v1")
    with pytest.raises(DatasetError, match=r"Discrete\(3\).*'CartPole-v1' takes Discrete\(2\)"):
        load_minari_dataset("test/discrete/env-v0")


def _user_transitions(action, observation_dim=4):
    num = action.shape[0]
    done = torch.zeros(num, 1, dtype=torch.bool)
    done[-1] = True
    return TensorDict(
        {
            "observation": torch.arange(num * observation_dim, dtype=torch.float32).reshape(num, observation_dim),
            "action": action,
            "next": {
                "observation": torch.ones(num, observation_dim),
                "reward": torch.ones(num, 1),
                "done": done,
                "terminated": done.clone(),
                "truncated": torch.zeros(num, 1, dtype=torch.bool),
            },
        },
        batch_size=[num],
    )


def test_user_discrete_transitions_take_their_space_from_the_env_or_num_actions():
    from_env = make_offline_buffer(_user_transitions(torch.tensor([[1], [0], [1]])), env_id="CartPole-v1")
    assert from_env.metadata.num_actions == 2 and from_env.metadata.env_id == "CartPole-v1"
    assert buffer_transitions(from_env)["action"].tolist() == [1, 0, 1]
    from_count = make_offline_buffer(_user_transitions(torch.tensor([4, 0, 1])), num_actions=5, one_hot_actions=True)
    assert buffer_transitions(from_count)["action"].tolist() == [[0, 0, 0, 0, 1], [1, 0, 0, 0, 0], [0, 1, 0, 0, 0]]


def test_float_actions_for_a_discrete_space_are_refused():
    with pytest.raises(DatasetError, match="integer action indices"):
        make_offline_buffer(_user_transitions(torch.tensor([0.0, 1.0, 1.0])), num_actions=2)


def test_integer_actions_without_a_discrete_space_are_refused():
    with pytest.raises(DatasetError, match="num_actions"):
        make_offline_buffer(_user_transitions(torch.tensor([0, 1, 1])))


# --------------------------------------------------------------------------------------
# Box actions outside the environment's bounds
# --------------------------------------------------------------------------------------


def _pendulum_transitions(actions, episode):
    num = len(actions)
    transitions = _user_transitions(torch.tensor(actions, dtype=torch.float32).unsqueeze(-1), observation_dim=3)
    transitions["episode"] = torch.tensor(episode)
    return transitions


# Pendulum's torque bounds are ±2: 3.0 and -10.0 lie outside; 2 + 2e-7 is float32 rounding of 2.
OUT_OF_BOUNDS = dict(actions=[0.5, 3.0, -2.0, 2.0000002, 1.0, -10.0, 0.0, 1.5], episode=[0, 0, 0, 1, 1, 2, 2, 2])


def test_actions_outside_the_bounds_are_refused_with_count_and_fraction_per_episode_range():
    transitions = _pendulum_transitions(**OUT_OF_BOUNDS)
    with pytest.raises(DatasetError) as error:
        make_offline_buffer(transitions, env_id="Pendulum-v1")
    message = str(error.value)
    # 2 of 8 actions: one in episode 0 (of 3 steps), one in episode 2 (of 3); episode 1 is within rounding
    assert "2 of 8 actions (25.0%)" in message
    assert "episode 0: 1 of 3 (33.3%)" in message and "episode 2: 1 of 3 (33.3%)" in message
    assert "episode 1" not in message
    assert "by up to 8" in message and "--clip-actions" in message and "'action'" in message


def test_consecutive_episodes_with_bad_actions_are_reported_as_one_range():
    transitions = _pendulum_transitions(actions=[5.0, 1.0, 5.0, 5.0, 0.0], episode=[3, 3, 4, 5, 6])
    with pytest.raises(DatasetError, match=r"episodes 3-5: 3 of 4 \(75\.0%\)"):
        make_offline_buffer(transitions, env_id="Pendulum-v1")


def test_clip_actions_clips_them_into_the_bounds_with_a_warning():
    transitions = _pendulum_transitions(**OUT_OF_BOUNDS)
    with pytest.warns(UserWarning, match=r"2 of 8 actions \(25\.0%\).*clipped"):
        buffer = make_offline_buffer(transitions, env_id="Pendulum-v1", clip_actions=True)
    stored = buffer_transitions(buffer)["action"].squeeze(-1).double()
    edge = 1 - ACTION_CLIP_EPS
    expected = torch.tensor([0.25, edge, -edge, edge, 0.5, -edge, 0.0, 0.75], dtype=torch.float64)
    torch.testing.assert_close(stored, expected, atol=1e-7, rtol=0)


def test_in_bound_actions_load_without_a_warning():
    transitions = _pendulum_transitions(actions=[2.0, -2.0, 0.3], episode=[0, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_offline_buffer(transitions, env_id="Pendulum-v1")


def test_raw_data_keeps_out_of_bounds_actions_unchanged():
    transitions = _pendulum_transitions(**OUT_OF_BOUNDS)
    stored = buffer_transitions(make_offline_buffer(transitions, env_id="Pendulum-v1", raw=True))["action"]
    assert torch.equal(stored, transitions["action"])


def test_minari_data_five_times_the_bounds_is_refused(write_minari_dataset, synthetic_episode):
    rng = np.random.default_rng(0)
    episodes = [synthetic_episode(rng, 20, 3, 1, action_scale=10.0) for _ in range(3)]
    write_minari_dataset(
        "test/bad/scaled-v0", episodes, gym.spaces.Box(-np.inf, np.inf, (3,), np.float32),
        gym.spaces.Box(-2, 2, (1,), np.float32), env="Pendulum-v1",
    )
    actions = np.concatenate([e["actions"] for e in episodes]).reshape(-1)
    expected = int((np.abs(actions) > 2).sum())
    with pytest.raises(DatasetError, match=rf"{expected} of 60 actions \({100 * expected / 60:.1f}%\)"):
        load_minari_dataset("test/bad/scaled-v0")
    with pytest.warns(UserWarning):
        load_minari_dataset("test/bad/scaled-v0", options=BufferOptions(clip_actions=True))


def test_unknown_buffer_option_is_refused_naming_the_options():
    with pytest.raises(TypeError, match="clip_action'.*clip_actions"):
        make_offline_buffer(_pendulum_transitions([0.0], [0]), env_id="Pendulum-v1", clip_action=True)
