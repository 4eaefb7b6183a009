"""Offline data loading: values, episode ends, transforms, metadata, bad input, sampling."""

from __future__ import annotations

import json
import time

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from tensordict import TensorDict

from iql_torchrl.data import minari as minari_io
from iql_torchrl.data import (
    ACTION_CLIP_EPS,
    OBSERVATION_STD_EPS,
    DatasetError,
    OfflineDataMetadata,
    buffer_transitions,
    load_minari_dataset,
    make_offline_buffer,
    read_minari_transitions,
    sample_indices,
)



def _source_transitions(dataset_id):
    """Every transition of a Minari dataset as float32/bool numpy arrays, straight from minari."""
    rows = {key: [] for key in ("obs", "action", "next_obs", "reward", "terminated", "truncated", "episode")}
    for episode in minari.load_dataset(dataset_id).iterate_episodes():
        steps = len(episode.rewards)
        rows["obs"].append(np.asarray(episode.observations[:-1], dtype=np.float32))
        rows["next_obs"].append(np.asarray(episode.observations[1:], dtype=np.float32))
        rows["action"].append(np.asarray(episode.actions, dtype=np.float32).reshape(steps, -1))
        rows["reward"].append(np.asarray(episode.rewards, dtype=np.float32).reshape(steps, 1))
        rows["terminated"].append(np.asarray(episode.terminations, dtype=bool).reshape(steps, 1))
        rows["truncated"].append(np.asarray(episode.truncations, dtype=bool).reshape(steps, 1))
        rows["episode"].append(np.full(steps, episode.id))
    return {key: np.concatenate(value) for key, value in rows.items()}


# --------------------------------------------------------------------------------------
# Round trip against the Minari source
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pendulum", "inverted_pendulum"])
def test_raw_buffer_equals_minari_source_in_every_field(tiny_datasets, name):
    dataset_id = getattr(tiny_datasets, name)
    buffer = load_minari_dataset(dataset_id, raw=True)
    stored = buffer_transitions(buffer)
    source = _source_transitions(dataset_id)

    assert len(buffer) == len(source["reward"]) == buffer.metadata.num_transitions
    np.testing.assert_array_equal(stored["observation"].numpy(), source["obs"])
    np.testing.assert_array_equal(stored["action"].numpy(), source["action"])
    np.testing.assert_array_equal(stored["next", "observation"].numpy(), source["next_obs"])
    np.testing.assert_array_equal(stored["next", "reward"].numpy(), source["reward"])
    np.testing.assert_array_equal(stored["next", "terminated"].numpy(), source["terminated"])
    np.testing.assert_array_equal(stored["next", "truncated"].numpy(), source["truncated"])
    np.testing.assert_array_equal(stored["next", "done"].numpy(), source["terminated"] | source["truncated"])
    np.testing.assert_array_equal(stored["episode"].numpy(), source["episode"])
    for key in ("observation", "action", ("next", "observation"), ("next", "reward")):
        assert stored[key].dtype == torch.float32


def test_transformed_buffer_undoes_to_minari_source(tiny_datasets):
    buffer = load_minari_dataset(tiny_datasets.pendulum, reward_transform="locomotion", normalize_observations=True)
    metadata, stored = buffer.metadata, buffer_transitions(buffer)
    source = _source_transitions(tiny_datasets.pendulum)

    obs = metadata.unnormalize_observation(stored["observation"]).numpy()
    next_obs = metadata.unnormalize_observation(stored["next", "observation"]).numpy()
    np.testing.assert_allclose(obs, source["obs"], atol=1e-5)
    np.testing.assert_allclose(next_obs, source["next_obs"], atol=1e-5)
    np.testing.assert_allclose(metadata.untransform_reward(stored["next", "reward"]).numpy(), source["reward"], rtol=1e-5, atol=1e-4)
    # actions come back up to the 1e-5 clipping of the bounds
    np.testing.assert_allclose(metadata.action_to_env(stored["action"]).numpy(), source["action"], atol=2 * ACTION_CLIP_EPS * 2)


def test_read_minari_transitions_returns_the_raw_values(tiny_datasets):
    transitions = read_minari_transitions(tiny_datasets.pendulum)
    raw = buffer_transitions(load_minari_dataset(tiny_datasets.pendulum, raw=True))
    assert (transitions == raw).all()


def test_memmap_storage_holds_the_same_values_as_memory(tiny_datasets, tmp_path):
    in_memory = buffer_transitions(load_minari_dataset(tiny_datasets.pendulum))
    memmap_buffer = load_minari_dataset(tiny_datasets.pendulum, storage="memmap", scratch_dir=tmp_path / "memmap", batch_size=8)
    on_disk = buffer_transitions(memmap_buffer)
    assert on_disk.is_memmap()
    assert (on_disk == in_memory).all()
    assert memmap_buffer.sample().batch_size == torch.Size([8])
    # a second buffer in the same scratch_dir (a second run, a reload) has files of its own
    again = load_minari_dataset(tiny_datasets.pendulum, storage="memmap", scratch_dir=tmp_path / "memmap")
    assert (buffer_transitions(again) == in_memory).all()
    assert len(list((tmp_path / "memmap").iterdir())) == 2
    del memmap_buffer, on_disk, again
    import gc

    gc.collect()
    assert list((tmp_path / "memmap").iterdir()) == []  # freed with the buffers: nothing left on disk


# --------------------------------------------------------------------------------------
# Episode ends
# --------------------------------------------------------------------------------------


def test_done_is_terminated_or_truncated_and_ends_every_episode(tiny_datasets):
    stored = buffer_transitions(load_minari_dataset(tiny_datasets.inverted_pendulum))
    done, terminated, truncated = (stored["next", key].squeeze(-1) for key in ("done", "terminated", "truncated"))
    assert torch.equal(done, terminated | truncated)
    episode = stored["episode"]
    last_steps = torch.cat([episode[1:] != episode[:-1], torch.tensor([True])])
    assert torch.equal(done, last_steps)
    assert terminated.any() and truncated.any()  # random episodes fall, the expert is cut at 1000 steps


def test_truncated_and_terminated_transitions_keep_their_final_next_observation(tiny_datasets):
    stored = buffer_transitions(load_minari_dataset(tiny_datasets.inverted_pendulum, raw=True))
    for episode in minari.load_dataset(tiny_datasets.inverted_pendulum).iterate_episodes():
        rows = (stored["episode"] == episode.id).nonzero().squeeze(-1)
        last = rows[-1]
        np.testing.assert_array_equal(
            stored["next", "observation"][last].numpy(), episode.observations[-1].astype(np.float32)
        )
        assert bool(stored["next", "terminated"][last]) == bool(episode.terminations[-1])
        assert bool(stored["next", "truncated"][last]) == bool(episode.truncations[-1])


def test_pendulum_episodes_are_truncated_never_terminated(tiny_datasets):
    stored = buffer_transitions(load_minari_dataset(tiny_datasets.pendulum))
    assert not stored["next", "terminated"].any()
    assert int(stored["next", "truncated"].sum()) == stored["episode"].unique().numel()


# --------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------


def test_an_action_dimension_with_equal_bounds_is_stored_as_its_one_value_not_nan():
    transitions = _hand_transitions([[0.0, 1.0, 2.0]])
    transitions["action"] = torch.tensor([[-1.0, 3.0], [0.0, 3.0], [0.5, 3.0]])  # dimension 1: always its bound 3
    buffer = make_offline_buffer(transitions, action_low=[-2.0, 3.0], action_high=[2.0, 3.0])
    stored = buffer_transitions(buffer)["action"]
    # by hand: 2 (a - low) / (high - low) - 1 on dimension 0 (clipped to ±(1 - eps)); dimension 1 is 0, never 0/0
    assert torch.equal(stored, torch.tensor([[-0.5, 0.0], [0.0, 0.0], [0.25, 0.0]]))
    back = buffer.metadata.action_to_env(stored)
    assert torch.equal(back, torch.tensor([[-1.0, 3.0], [0.0, 3.0], [0.5, 3.0]]))
    assert np.array_equal(buffer.metadata.action_from_env(np.array([[2.0, 3.0]])), [[1.0, 0.0]])


def _hand_transitions(rewards_per_episode, observations=None):
    """Transitions with 1-D observations/actions; episode k's rewards given by hand."""
    rewards = torch.tensor([r for episode in rewards_per_episode for r in episode], dtype=torch.float32)
    num = rewards.numel()
    done = torch.zeros(num, 1, dtype=torch.bool)
    ends = np.cumsum([len(episode) for episode in rewards_per_episode]) - 1
    done[ends] = True
    if observations is None:
        observations = torch.arange(num + 1, dtype=torch.float32).unsqueeze(-1)
    return TensorDict(
        {
            "observation": observations[:-1],
            "action": torch.zeros(num, 1),
            "next": {
                "observation": observations[1:].clone(),
                "reward": rewards.unsqueeze(-1),
                "done": done,
                "terminated": done.clone(),
                "truncated": torch.zeros(num, 1, dtype=torch.bool),
            },
        },
        batch_size=[num],
    )


def test_locomotion_reward_scale_is_1000_over_the_return_range():
    # episode returns: 1 + 2 + 3 = 6 and 10 + 6 = 16, so the scale is 1000 / (16 - 6) = 100
    transitions = _hand_transitions([[1.0, 2.0, 3.0], [10.0, 6.0]])
    buffer = make_offline_buffer(transitions, reward_transform="locomotion")
    assert buffer.metadata.reward_scale == pytest.approx(100.0)
    rewards = buffer_transitions(buffer)["next", "reward"].squeeze(-1)
    torch.testing.assert_close(rewards, torch.tensor([100.0, 200.0, 300.0, 1000.0, 600.0]))


def test_antmaze_reward_transform_subtracts_one():
    buffer = make_offline_buffer(_hand_transitions([[0.0, 1.0], [0.0]]), reward_transform="antmaze")
    rewards = buffer_transitions(buffer)["next", "reward"].squeeze(-1)
    torch.testing.assert_close(rewards, torch.tensor([-1.0, 0.0, -1.0]))
    torch.testing.assert_close(buffer.metadata.untransform_reward(rewards), torch.tensor([0.0, 1.0, 0.0]))


def test_rewards_are_unchanged_by_default():
    transitions = _hand_transitions([[1.5, -2.0], [3.0]])
    rewards = buffer_transitions(make_offline_buffer(transitions))["next", "reward"]
    assert torch.equal(rewards, transitions["next", "reward"])


def test_observation_statistics_are_the_dataset_mean_and_std():
    generator = torch.Generator().manual_seed(0)
    observations = torch.randn(101, 3, generator=generator) * torch.tensor([1.0, 5.0, 0.0]) + torch.tensor([2.0, -1.0, 7.0])
    transitions = _hand_transitions([[0.0] * 60, [0.0] * 40], observations=observations)
    buffer = make_offline_buffer(transitions, normalize_observations=True)
    metadata = buffer.metadata

    raw = observations[:-1].double().numpy()
    np.testing.assert_allclose(metadata.observation_mean, raw.mean(0), rtol=1e-6)
    np.testing.assert_allclose(metadata.observation_std, raw.std(0) + OBSERVATION_STD_EPS, rtol=1e-5)
    mean, std = torch.tensor(metadata.observation_mean), torch.tensor(metadata.observation_std)
    stored = buffer_transitions(buffer)
    torch.testing.assert_close(stored["observation"], ((observations[:-1] - mean) / std).float())
    torch.testing.assert_close(stored["next", "observation"], ((observations[1:] - mean) / std).float())
    # evaluation applies the same normalisation to env observations
    env_observation = observations[5].numpy()
    torch.testing.assert_close(metadata.observation_from_env(env_observation), stored["observation"][5])


def test_observation_statistics_are_recorded_but_not_applied_by_default():
    observations = torch.arange(11, dtype=torch.float32).unsqueeze(-1) * 3
    buffer = make_offline_buffer(_hand_transitions([[0.0] * 10], observations=observations))
    assert not buffer.metadata.observations_normalized
    assert buffer.metadata.observation_mean == pytest.approx([13.5])
    assert torch.equal(buffer_transitions(buffer)["observation"], observations[:-1])


def test_pendulum_torque_is_scaled_from_2_to_1_and_back(tiny_datasets):
    buffer = load_minari_dataset(tiny_datasets.pendulum)
    metadata = buffer.metadata
    assert metadata.actions_scaled and metadata.action_low == [-2.0] and metadata.action_high == [2.0]
    raw = buffer_transitions(load_minari_dataset(tiny_datasets.pendulum, raw=True))["action"]
    stored = buffer_transitions(buffer)["action"]
    assert raw.abs().max() == 2.0  # the expert saturates the torque
    assert stored.abs().max() <= 1 - ACTION_CLIP_EPS
    assert buffer.sample()["action"].abs().max() <= 1 - ACTION_CLIP_EPS  # sampling reads the transformed data
    torch.testing.assert_close(stored, (raw / 2).clamp(-1 + ACTION_CLIP_EPS, 1 - ACTION_CLIP_EPS))
    torch.testing.assert_close(metadata.action_to_env(torch.tensor([[-1.0], [0.0], [0.5], [1.0]])), torch.tensor([[-2.0], [0.0], [1.0], [2.0]]))
    np.testing.assert_allclose(metadata.action_to_env(np.array([0.25], dtype=np.float32)), [0.5])
    torch.testing.assert_close(metadata.action_from_env(metadata.action_to_env(stored)), stored)


def test_inverted_pendulum_force_bounds_of_3_are_scaled(tiny_datasets):
    metadata = load_minari_dataset(tiny_datasets.inverted_pendulum).metadata
    assert metadata.actions_scaled and metadata.action_high == [3.0]
    torch.testing.assert_close(metadata.action_to_env(torch.tensor([0.5])), torch.tensor([1.5]))


def test_unit_action_bounds_are_left_unchanged():
    transitions = _hand_transitions([[0.0, 0.0, 0.0]])
    transitions["action"] = torch.tensor([[-0.75, 0.5], [0.25, 1.0], [-1.0, 0.0]])
    buffer = make_offline_buffer(transitions, env_id="Reacher-v5", action_clip_eps=0.0)
    assert not buffer.metadata.actions_scaled
    assert torch.equal(buffer_transitions(buffer)["action"], transitions["action"])
    clipped = buffer_transitions(make_offline_buffer(transitions, env_id="Reacher-v5"))["action"]
    assert clipped.abs().max() == pytest.approx(1 - ACTION_CLIP_EPS)


def test_raw_turns_every_transform_off():
    transitions = _hand_transitions([[1.0, 2.0], [5.0]])
    transitions["action"] = torch.tensor([[-2.0], [2.0], [0.5]])
    buffer = make_offline_buffer(
        transitions, env_id="Pendulum-v1", reward_transform="locomotion", normalize_observations=True, raw=True
    )
    metadata = buffer.metadata
    assert (metadata.actions_scaled, metadata.action_clip_eps, metadata.reward_transform, metadata.observations_normalized) == (
        False, 0.0, "none", False,
    )
    stored = buffer_transitions(buffer)
    for key in ("observation", "action", ("next", "observation"), ("next", "reward")):
        assert torch.equal(stored[key], transitions[key])


def test_user_transitions_get_the_same_transforms_as_minari_data(tiny_datasets):
    options = dict(reward_transform="locomotion", normalize_observations=True)
    from_minari = load_minari_dataset(tiny_datasets.pendulum, **options)
    from_user = make_offline_buffer(read_minari_transitions(tiny_datasets.pendulum), env_id="Pendulum-v1", **options)
    assert (buffer_transitions(from_user) == buffer_transitions(from_minari)).all()
    assert from_user.metadata.reward_scale == from_minari.metadata.reward_scale


# --------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------


def test_metadata_carries_what_evaluation_needs(tiny_datasets):
    buffer = load_minari_dataset(tiny_datasets.pendulum, batch_size=32)
    metadata = buffer.metadata
    source = minari.load_dataset(tiny_datasets.pendulum)
    assert metadata.dataset_id == tiny_datasets.pendulum and metadata.env_id == "Pendulum-v1"
    assert metadata.ref_min_score == source.storage.metadata["ref_min_score"]
    assert metadata.ref_max_score == source.storage.metadata["ref_max_score"]
    assert (metadata.observation_dim, metadata.action_dim) == (3, 1)
    assert metadata.observation_spec().shape == torch.Size([3])
    assert metadata.action_spec().space.high.tolist() == [1.0]
    assert metadata.make_env().spec.id == "Pendulum-v1"
    returns = np.array([metadata.ref_min_score, metadata.ref_max_score])
    np.testing.assert_allclose(metadata.normalized_score(returns), 100 * minari.get_normalized_score(source, returns))
    assert buffer.sample().batch_size == torch.Size([32])
    assert load_minari_dataset(tiny_datasets.pendulum, batch_size=None).sample(5).batch_size == torch.Size([5])


def test_metadata_survives_a_json_round_trip(tiny_datasets):
    metadata = load_minari_dataset(tiny_datasets.pendulum, normalize_observations=True, reward_transform="locomotion").metadata
    restored = OfflineDataMetadata.from_state_dict(json.loads(json.dumps(metadata.state_dict())))
    assert restored == metadata
    observation = np.array([0.5, -0.5, 1.0], dtype=np.float32)
    torch.testing.assert_close(restored.observation_from_env(observation), metadata.observation_from_env(observation))
    batched = restored.observation_from_env(np.stack([observation, observation]))  # a vectorised env
    assert batched.shape == (2, 3)
    torch.testing.assert_close(batched[1], metadata.observation_from_env(observation))


def test_metadata_from_a_foreign_state_dict_is_refused():
    with pytest.raises(KeyError, match="unknown keys"):
        OfflineDataMetadata.from_state_dict({"dataset_id": "x", "surprise": 1})


def test_buffer_is_read_only(tiny_datasets):
    buffer = load_minari_dataset(tiny_datasets.pendulum)
    with pytest.raises(RuntimeError):
        buffer.extend(buffer[:2])


# --------------------------------------------------------------------------------------
# Dict observations
# --------------------------------------------------------------------------------------


def test_dict_observations_are_flattened_in_sorted_key_order(write_minari_dataset):
    rng = np.random.default_rng(0)
    observation_space = gym.spaces.Dict(
        {
            "observation": gym.spaces.Box(-np.inf, np.inf, (4,), np.float64),
            "desired_goal": gym.spaces.Box(-np.inf, np.inf, (2,), np.float64),
            "achieved_goal": gym.spaces.Box(-np.inf, np.inf, (2,), np.float64),
        }
    )
    action_space = gym.spaces.Box(-1, 1, (2,), np.float32)
    episodes = []
    for length in (4, 3):
        episodes.append(
            dict(
                observations={key: rng.normal(size=(length + 1,) + space.shape) for key, space in observation_space.spaces.items()},
                actions=rng.uniform(-1, 1, size=(length, 2)).astype(np.float32),
                rewards=rng.normal(size=length),
                terminations=[False] * (length - 1) + [True],
                truncations=[False] * length,
            )
        )
    write_minari_dataset("test/maze/dict-v0", episodes, observation_space, action_space)

    buffer = load_minari_dataset("test/maze/dict-v0", raw=True)
    metadata = buffer.metadata
    assert metadata.observation_keys == ["achieved_goal", "desired_goal", "observation"]
    assert metadata.observation_dim == 8
    first = episodes[0]["observations"]
    expected = np.concatenate([first["achieved_goal"][0], first["desired_goal"][0], first["observation"][0]]).astype(np.float32)
    stored = buffer_transitions(buffer)
    np.testing.assert_array_equal(stored["observation"][0].numpy(), expected)
    # the same flattening for an env observation, single or batched
    env_observation = {key: value[0] for key, value in first.items()}
    np.testing.assert_array_equal(metadata.flatten_observation(env_observation), expected)
    batched = {key: value[:2] for key, value in first.items()}
    np.testing.assert_array_equal(metadata.flatten_observation(batched), stored["observation"][:2].numpy())
    np.testing.assert_array_equal(
        stored["next", "observation"][3].numpy(),
        np.concatenate([first[key][4] for key in metadata.observation_keys]).astype(np.float32),
    )


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, bad_value",
    [("observations", np.nan), ("actions", np.inf), ("rewards", np.nan)],
)
def test_non_finite_values_are_reported_with_field_and_episode(write_minari_dataset, synthetic_episode, field, bad_value):
    rng = np.random.default_rng(1)
    episodes = [synthetic_episode(rng, 5, 3, 1) for _ in range(3)]
    episodes[2][field] = np.array(episodes[2][field], dtype=np.float64 if field == "rewards" else np.float32)
    episodes[2][field][3] = bad_value
    write_minari_dataset(
        "test/bad/values-v0", episodes, gym.spaces.Box(-np.inf, np.inf, (3,), np.float32), gym.spaces.Box(-1, 1, (1,), np.float32)
    )
    expected_field = {"observations": "observation", "actions": "action", "rewards": "next/reward"}[field]
    with pytest.raises(DatasetError, match=rf"'{expected_field}'.*episode 2"):
        load_minari_dataset("test/bad/values-v0")


def test_non_finite_user_transitions_are_reported_with_field_and_episode():
    transitions = _hand_transitions([[0.0, 0.0], [0.0, 0.0, 0.0]])
    transitions["next", "observation"][3] = float("nan")
    with pytest.raises(DatasetError, match=r"'next/observation'.*episode 1"):
        make_offline_buffer(transitions)


def test_empty_minari_dataset_is_refused(write_minari_dataset):
    write_minari_dataset("test/empty/none-v0", [], gym.spaces.Box(-1, 1, (3,), np.float32), gym.spaces.Box(-1, 1, (1,), np.float32))
    with pytest.raises(DatasetError, match="no transitions"):
        load_minari_dataset("test/empty/none-v0")


def test_empty_user_transitions_are_refused():
    with pytest.raises(DatasetError, match="empty"):
        make_offline_buffer(_hand_transitions([[0.0]])[:0])


def test_user_transitions_missing_a_key_are_refused():
    transitions = _hand_transitions([[0.0]])
    del transitions["next", "terminated"]
    with pytest.raises(DatasetError, match="terminated"):
        make_offline_buffer(transitions)


def test_action_dimension_not_matching_the_env_is_refused(write_minari_dataset, synthetic_episode):
    rng = np.random.default_rng(2)
    episodes = [synthetic_episode(rng, 4, 3, 2)]
    write_minari_dataset(
        "test/bad/actions-v0", episodes, action_space=gym.spaces.Box(-2, 2, (2,), np.float32), env="Pendulum-v1"
    )
    with pytest.raises(DatasetError, match=r"'action' has shape \(2,\).*Pendulum-v1"):
        load_minari_dataset("test/bad/actions-v0")


def test_user_actions_not_matching_the_env_are_refused():
    transitions = _hand_transitions([[0.0, 0.0]])
    transitions["action"] = torch.zeros(2, 3)
    with pytest.raises(DatasetError, match="dimension 3.*Pendulum-v1"):
        make_offline_buffer(transitions, env_id="Pendulum-v1")


def test_truncated_hdf5_file_gives_a_clear_error_and_is_left_untouched(write_minari_dataset, synthetic_episode, minari_root):
    rng = np.random.default_rng(3)
    episodes = [synthetic_episode(rng, 50, 3, 1) for _ in range(4)]
    write_minari_dataset(
        "test/bad/truncated-v0", episodes, gym.spaces.Box(-np.inf, np.inf, (3,), np.float32), gym.spaces.Box(-1, 1, (1,), np.float32)
    )
    hdf5_file = minari_root / "test/bad/truncated-v0/data/main_data.hdf5"
    contents = hdf5_file.read_bytes()
    hdf5_file.write_bytes(contents[: len(contents) // 2])
    with pytest.raises(DatasetError, match="truncated-v0.*(truncated or corrupt|unreadable)"):
        load_minari_dataset("test/bad/truncated-v0")
    assert hdf5_file.read_bytes() == contents[: len(contents) // 2]


def test_unknown_reward_transform_is_refused():
    with pytest.raises(ValueError, match="reward_transform"):
        make_offline_buffer(_hand_transitions([[0.0]]), reward_transform="sparse")


# --------------------------------------------------------------------------------------
# Missing datasets
# --------------------------------------------------------------------------------------


def test_missing_remote_dataset_fails_fast_without_network(minari_root, monkeypatch):
    monkeypatch.setattr(minari_io, "_remote_unreachable_reason", lambda timeout=3.0: "cannot reach huggingface.co (test)")
    monkeypatch.setattr(minari, "download_dataset", lambda *a, **k: pytest.fail("download must not be attempted"))
    with pytest.raises(FileNotFoundError) as error:
        load_minari_dataset("mujoco/pendulum/nowhere-v0")
    message = str(error.value)
    assert str(minari_root / "mujoco/pendulum/nowhere-v0" / "data") in message
    assert "cannot reach huggingface.co" in message
    assert "minari download mujoco/pendulum/nowhere-v0" in message


def test_failed_download_is_reported_with_how_to_get_the_data(minari_root, monkeypatch):
    def refuse(*args, **kwargs):
        raise ConnectionError("connection reset")

    monkeypatch.setattr(minari_io, "_remote_unreachable_reason", lambda timeout=3.0: None)
    monkeypatch.setattr(minari, "download_dataset", refuse)
    with pytest.raises(FileNotFoundError, match=r"(?s)download failed: ConnectionError: connection reset.*minari download"):
        load_minari_dataset("mujoco/pendulum/nowhere-v0")


def test_missing_remote_dataset_fails_within_seconds(minari_root):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="minari download"):
        load_minari_dataset("mujoco/pendulum/nowhere-v0")
    assert time.monotonic() - start < 30


def test_missing_builder_dataset_says_how_to_build_it(minari_root):
    with pytest.raises(FileNotFoundError, match="python -m iql_torchrl.datasets build iql_torchrl/reacher/expert-v0"):
        load_minari_dataset("iql_torchrl/reacher/expert-v0")


# --------------------------------------------------------------------------------------
# Device-resident sampling
# --------------------------------------------------------------------------------------


def test_sample_indices_are_reproducible_from_the_generator():
    first = sample_indices(1000, 64, torch.Generator().manual_seed(7))
    second = sample_indices(1000, 64, torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    assert first.dtype == torch.int64 and 0 <= int(first.min()) and int(first.max()) < 1000


def test_compiled_step_sees_the_same_batch_as_eager(tiny_datasets):
    data = buffer_transitions(load_minari_dataset(tiny_datasets.pendulum))

    def step(data, indices):
        batch = data[indices]
        return (batch["next", "reward"] + batch["action"].sum(-1, keepdim=True)).mean()

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    indices = sample_indices(len(data), 64, torch.Generator().manual_seed(0), data.device)
    torch.testing.assert_close(compiled(data, indices), step(data, indices))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_whole_dataset_lives_on_the_training_device(tiny_datasets):
    buffer = load_minari_dataset(tiny_datasets.pendulum, device="cuda")
    data = buffer_transitions(buffer)
    assert data["observation"].is_cuda
    indices = sample_indices(len(data), 64, torch.Generator(device="cuda").manual_seed(0), data.device)
    assert indices.is_cuda and data[indices]["action"].is_cuda


def test_loading_from_python_prints_no_library_info_line_and_leaves_the_logger_as_it_was(tiny_datasets, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="torchrl"):  # TorchRL's own level: its INFO lines go out
        load_minari_dataset(tiny_datasets.pendulum, batch_size=8)
        assert logging.getLogger("torchrl").level == logging.INFO  # restored after the write
    assert not [r for r in caplog.records if "Initialized LazyTensorStorage" in r.getMessage()]
