"""Locomotion data without network: SAC behaviour policies (TorchRL's SACLoss) and the D4RL-style sets built from them."""
import json
import re
import shutil

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch

from iql_torchrl.datasets import behaviour, locomotion
from iql_torchrl.datasets.behaviour import SACSettings, load_snapshot, make_sac_actor, train_behaviour
from iql_torchrl.datasets.builders import BUILDERS, build_dataset

TINY = SACSettings(frames=300, warmup_frames=100, frames_per_batch=50, batch_size=32, snapshot_every=100,
                   checkpoint_every=200, eval_episodes=1)


def _write_snapshots(folder, returns, step=10_000, warmup=10_000):
    """A training folder whose snapshots are random actors with the given returns."""
    (folder / "snapshots").mkdir(parents=True)
    env = gym.make("Hopper-v5")
    low, high = (torch.as_tensor(b, dtype=torch.float32) for b in (env.action_space.low, env.action_space.high))
    for i, mean_return in enumerate(returns):
        torch.manual_seed(i)
        weights = make_sac_actor(11, 3, low, high).module[0].module.state_dict()
        torch.save({"frames": (i + 1) * step, "mean_return": mean_return, "weights": weights},
                   folder / "snapshots" / f"frames-{(i + 1) * step:07d}.pt")
    (folder / "settings.json").write_text(json.dumps({"warmup_frames": warmup}))


@pytest.fixture
def kept(tmp_path, monkeypatch):
    """Hopper policies kept from snapshots logged as returning 10, 90, 140, 400, 300 at frames 10k … 50k."""
    monkeypatch.setattr(locomotion, "POLICIES", tmp_path / "policies")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))
    _write_snapshots(tmp_path / "training", [10.0, 90.0, 140.0, 400.0, 300.0])
    return locomotion.keep_policies("hopper", tmp_path / "training", episodes=0, progress=False)


def test_the_expert_is_the_best_snapshot_and_medium_the_first_at_a_third_of_it(kept):
    assert kept["expert"]["frames"] == 40_000  # the highest return (400), not the last snapshot (300)
    # a third of 400 is 133.3; within 25% of it (100-166.7): 140, at frame 30k
    assert kept["medium"]["frames"] == 30_000
    assert [entry["frames"] for entry in kept["replay"]] == [10_000, 20_000]  # medium-replay's stages before medium
    assert kept["warmup_frames"] == 10_000


def test_a_spike_far_above_a_third_is_not_the_medium_policy(tmp_path, monkeypatch):
    monkeypatch.setattr(locomotion, "POLICIES", tmp_path / "policies")
    _write_snapshots(tmp_path / "training", [10.0, 390.0, 140.0, 400.0, 300.0])
    kept = locomotion.keep_policies("hopper", tmp_path / "training", episodes=0, progress=False)
    # the first snapshot reaching a third (133.3) is the spike at 20k (390, the expert's level); about a third is 30k
    assert kept["medium"]["frames"] == 30_000
    # none within 25% of a third: the closest to it (10 and 390 against 133.3 → 390 is 256.7 away, 10 is 123.3)
    monkeypatch.setattr(locomotion, "POLICIES", tmp_path / "other")
    shutil.rmtree(tmp_path / "training")
    _write_snapshots(tmp_path / "training", [10.0, 390.0, 400.0])
    assert locomotion.keep_policies("hopper", tmp_path / "training", episodes=0, progress=False)["medium"]["frames"] == 10_000


def test_keeping_re_measures_each_snapshot_instead_of_trusting_the_log(tmp_path, monkeypatch):
    """Random actors logged as returning 5000 and 9: re-measured over 3 episodes, both return what random actors do."""
    monkeypatch.setattr(locomotion, "POLICIES", tmp_path / "policies")
    _write_snapshots(tmp_path / "training", [9.0, 5000.0])
    kept = locomotion.keep_policies("hopper", tmp_path / "training", episodes=3, progress=False)
    assert kept["evaluation_episodes"] == 3
    chosen = kept["expert"]
    assert chosen["logged_return"] in (9.0, 5000.0) and chosen["mean_return"] < 500  # no random actor hops to 5000
    # the measured mean lies among the returns of the same actor's episodes played here by hand
    env = gym.make("Hopper-v5")
    actor = behaviour.snapshot_policy(load_snapshot(locomotion.POLICIES / "hopper" / "expert.pt"), "Hopper-v5")
    from tensordict import TensorDict
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    returns = []
    for seed in range(30):
        observation, _ = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
                action = actor(TensorDict(observation=torch.as_tensor(observation, dtype=torch.float32)))["action"]
            observation, reward, terminated, truncated, _ = env.step(action.numpy())
            total, done = total + reward, terminated or truncated
        returns.append(total)
    assert min(returns) <= chosen["mean_return"] <= max(returns)


def test_keeping_an_absent_snapshot_names_the_frames_there_are(tmp_path, monkeypatch):
    monkeypatch.setattr(locomotion, "POLICIES", tmp_path / "policies")
    _write_snapshots(tmp_path / "training", [1.0, 2.0])
    with pytest.raises(ValueError, match=r"--medium-frames 15000: no snapshot.*\[10000, 20000\]"):
        locomotion.keep_policies("hopper", tmp_path / "training", medium_frames=15_000)


def test_a_task_without_kept_policies_names_the_commands_that_make_them(tmp_path, monkeypatch):
    monkeypatch.setattr(locomotion, "POLICIES", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="train-behaviour walker2d.*keep-policies walker2d"):
        locomotion.kept_policies("walker2d")


def test_medium_expert_replays_from_its_seeds_and_reads_on_d4rl_scale(kept):
    dataset = build_dataset("iql_torchrl/hopper/medium-expert-v1", episodes=4, seed=7, progress=False)
    assert dataset.total_episodes == 4
    assert [m["policy"] for m in dataset.storage.get_episode_metadata(range(4))] == ["medium"] * 2 + ["expert"] * 2
    # D4RL's hopper references: (x + 20.272305) / (3234.3 + 20.272305); 1607.0136 is half way
    assert minari.get_normalized_score(dataset, np.array([1607.0138475])) == pytest.approx(0.5, abs=1e-7)
    assert minari.get_normalized_score(dataset, np.array([0.0])) == pytest.approx(20.272305 / 3254.572305)
    env = gym.make("Hopper-v5")
    medium = locomotion._sampler(load_snapshot(locomotion.POLICIES / "hopper" / "medium.pt"), "Hopper-v5", env.action_space,
                                 torch.float64)
    for i, episode in enumerate(dataset.iterate_episodes()):
        # the recorded actions, replayed from the episode's seed, give the recorded transitions
        observation, _ = env.reset(seed=7 + i)
        np.testing.assert_allclose(observation, episode.observations[0], rtol=0, atol=1e-12)
        for t, action in enumerate(episode.actions):
            observation, reward, terminated, _, _ = env.step(action)
            np.testing.assert_allclose(observation, episode.observations[t + 1], rtol=1e-6, atol=1e-6)
            assert reward == pytest.approx(episode.rewards[t], rel=1e-6)
        assert np.all(np.abs(episode.actions) <= 1)
    # the actions are the policy's samples, not its mean: sampling at the same observation gives other actions
    first = next(dataset.iterate_episodes())
    assert not np.allclose(medium(first.observations[:-1]), first.actions)


def test_a_mujoco_set_records_the_mujoco_that_built_it_and_a_run_on_it_says_when_another_is_installed(
        kept, tmp_path):
    # MuJoCo's versions step the same actions to other states (walker2d medium-v1's first 64 episodes: 25,090
    # transitions under 3.1.6, 25,846 under 3.17.0, 25,602 under 4.0.0): the set names the one that made it
    from importlib.metadata import version

    from iql_torchrl.data import unmet_requirements

    dataset = build_dataset("iql_torchrl/hopper/medium-v1", episodes=1, progress=False)
    assert dataset.storage.metadata["requirements"] == [f"mujoco=={version('mujoco')}"]
    assert unmet_requirements("iql_torchrl/hopper/medium-v1") == []
    assert "requirements" not in build_dataset("iql_torchrl/pendulum/mixed-v0", episodes=1, reference_episodes=1,
                                               progress=False).storage.metadata
    assert build_dataset("iql_torchrl/inverted-pendulum/expert-v0", episodes=1, reference_episodes=1,
                         progress=False).storage.metadata["requirements"] == [f"mujoco=={version('mujoco')}"]

    metadata = tmp_path / "datasets" / "iql_torchrl" / "hopper" / "medium-v1" / "data" / "metadata.json"
    recorded = json.loads(metadata.read_text())
    metadata.write_text(json.dumps({**recorded, "requirements": ["mujoco==3.1.6"]}))
    assert unmet_requirements("iql_torchrl/hopper/medium-v1") == [f"mujoco==3.1.6 (installed: {version('mujoco')})"]

    from iql_offline import train
    from iql_torchrl.runs.config import OfflineConfig

    with pytest.warns(UserWarning, match=r"iql_torchrl/hopper/medium-v1 was made with other package versions than "
                      rf"these: mujoco==3\.1\.6 \(installed: {re.escape(version('mujoco'))}\)"):
        train(OfflineConfig(dataset="iql_torchrl/hopper/medium-v1", steps=2, batch_size=8, eval_every=2,
                            eval_episodes=1, hidden_sizes=(8, 8), device="cpu", progress=False, logger="none",
                            reward_transform="none", output_dir=tmp_path / "run"))


def test_medium_replay_starts_random_then_follows_the_training_stages(kept):
    dataset = build_dataset("iql_torchrl/hopper/medium-replay-v1", episodes=5, progress=False)
    names = [m["policy"] for m in dataset.storage.get_episode_metadata(range(5))]
    # random actions until warm-up ends (10k), then the snapshot at 10k for frames 10k-20k, the one at 20k up to
    # medium (30k); the medium snapshot's own data is not medium-replay's (the agent had just reached it)
    assert names == ["random", "frame 10000", "frame 20000", "frame 20000", "frame 20000"]
    stages = locomotion._stages(locomotion.LOCOMOTION_BUILDERS["iql_torchrl/hopper/medium-replay-v1"], None)
    assert [(name, frames) for name, _, frames, _ in stages] == [
        ("random", 10_000), ("frame 10000", 10_000), ("frame 20000", 10_000)]
    assert ("first 30000 training frames, up to the medium policy: 10000 uniform-random frames, then 2 training "
            "snapshots") in dataset.storage.metadata["description"]


def test_a_build_s_progress_bar_ends_at_the_frames_it_collected(kept, capsys):
    # hopper's medium-replay episodes end long before 1,000 steps: the bar's first total (5 × 1,000) is not reached,
    # and a set built by frames ends its last episodes past the frames asked for
    dataset = build_dataset("iql_torchrl/hopper/medium-replay-v1", episodes=5, progress=True)
    last = re.split(r"[\r\n]", capsys.readouterr().err.strip())[-1]
    assert f"{dataset.total_steps}/{dataset.total_steps} " in last and "100%" in last, last


def test_frames_stop_new_episodes_once_reached():
    env = gym.make("Hopper-v5")
    random = locomotion._sampler(None, "Hopper-v5", env.action_space, torch.float32)
    episodes = locomotion.collect_locomotion_episodes("Hopper-v5", random, 3, frames=300)
    lengths = [len(e["actions"]) for e in episodes]
    assert sum(lengths) >= 300  # whole episodes, as many as were under way when 300 frames were reached
    assert [e["seed"] for e in episodes] == list(range(3, 3 + len(episodes)))
    assert all(e["terminations"][-1] or e["truncations"][-1] for e in episodes)


def test_sac_trains_with_snapshots_and_resumes_from_its_checkpoint(tmp_path):
    folder = tmp_path / "hopper"
    train_behaviour("hopper", folder, TINY, progress=False)
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [entry["frames"] for entry in log] == [100, 200, 300]
    assert all(np.isfinite(entry["loss_qvalue"]) for entry in log)
    assert sorted(p.name for p in (folder / "snapshots").iterdir()) == [
        "frames-0000100.pt", "frames-0000200.pt", "frames-0000300.pt"]
    before = load_snapshot(folder / "snapshots" / "frames-0000300.pt")
    # a checkout without the buffer: the run refills it with the current policy and goes on from frame 300
    shutil.rmtree(folder / "buffer")
    train_behaviour("hopper", folder, SACSettings(**{**TINY.__dict__, "frames": 400}), progress=False)
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [entry["frames"] for entry in log] == [100, 200, 300, 400]
    after = load_snapshot(folder / "snapshots" / "frames-0000400.pt")
    assert any(not torch.equal(before.weights[k], after.weights[k]) for k in before.weights)  # it trained on
    with pytest.raises(ValueError, match="other settings.*batch_size=32"):
        train_behaviour("hopper", folder, SACSettings(**{**TINY.__dict__, "batch_size": 64}), progress=False)


def test_a_set_without_kept_policies_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from iql_torchrl.datasets.__main__ import main as cli_main
    from iql_torchrl.runs.config import OfflineConfig

    monkeypatch.setattr(locomotion, "POLICIES", tmp_path / "none")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))
    assert cli_main(["build", "iql_torchrl/walker2d/medium-v1"]) == 2
    assert "does not keep" in capsys.readouterr().err and not (tmp_path / "datasets" / "iql_torchrl").exists()
    with pytest.raises(ValueError, match="--dataset iql_torchrl/walker2d/medium-v1.*train-behaviour walker2d"):
        OfflineConfig(dataset="iql_torchrl/walker2d/medium-v1").check()


def test_a_stopped_training_keeps_a_checkpoint_to_go_on_from(tmp_path):
    rounds = []

    def stop_after_the_third_batch():
        rounds.append(1)
        return len(rounds) == 3

    train_behaviour("hopper", tmp_path, TINY, progress=False, stop=stop_after_the_third_batch)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["frames"] == 150  # batches of 50 frames: warm-up to 100, its first updates, a round at 150, stop
    assert (tmp_path / "buffer-frames").read_text().strip() == "150"  # the checkpoint every 200 frames is not due


@pytest.mark.slow
def test_the_command_stops_on_sigterm_with_a_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "iql_torchrl.datasets", "train-behaviour", "hopper", str(tmp_path), "--frames",
               "100000", "--warmup-frames", "100", "--snapshot-every", "100", "--frames-per-batch", "100"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "log.jsonl").exists() or not (tmp_path / "log.jsonl").read_text():
        time.sleep(0.5)  # the first snapshot: training is under way
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130 and "keeps a checkpoint: run the same command to go on" in err
    frames = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["frames"]
    assert frames >= 100 and (tmp_path / "buffer-frames").read_text().strip() == str(frames)


def test_snapshots_between_batches_only_a_snapshot_interval_across_a_batch_is_refused_before_any_work(tmp_path,
                                                                                                      capsys):
    from iql_torchrl.datasets.__main__ import main

    with pytest.raises(SystemExit) as stopped:
        main(["train-behaviour", "hopper", str(tmp_path / "sac"), "--snapshot-every", "150", "--frames-per-batch", "100"])
    assert stopped.value.code == 2 and not (tmp_path / "sac").exists()
    assert "snapshot_every=150 (--snapshot-every) is not a multiple of frames_per_batch=100" in capsys.readouterr().err
    with pytest.raises(ValueError, match="checkpoint_every=250 is not a multiple of frames_per_batch=100"):
        SACSettings(frames_per_batch=100, snapshot_every=200, checkpoint_every=250)
    SACSettings(frames_per_batch=100, snapshot_every=200, checkpoint_every=300)  # multiples: taken


@pytest.mark.parametrize("task, expert_mean, expert_episode", [("hopper", 3000, 2500), ("walker2d", 4000, 3500),
                                                                 ("halfcheetah", 7000, 6000)])
def test_the_package_s_policies_play_as_policies_json_says(task, expert_mean, expert_episode, tmp_path, monkeypatch):
    """The kept expert scores near its measured return in every episode; the medium policy about a third of it."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))
    kept = locomotion.kept_policies(task)
    dataset = build_dataset(f"iql_torchrl/{task}/medium-expert-v0", episodes=4, progress=False)
    returns = {"medium": [], "expert": []}
    for episode, metadata in zip(dataset.iterate_episodes(), dataset.storage.get_episode_metadata(range(4))):
        returns[metadata["policy"]].append(float(episode.rewards.sum()))
    assert kept["expert"]["mean_return"] > expert_mean and min(returns["expert"]) > expert_episode, returns
    assert max(returns["medium"]) < 0.5 * kept["expert"]["mean_return"]
    assert kept["medium"]["mean_return"] == pytest.approx(kept["expert"]["mean_return"] / 3, rel=0.25)


@pytest.mark.slow
def test_a_set_is_the_same_whatever_torch_s_thread_count_and_the_count_is_given_back(tmp_path, monkeypatch):
    # a product split over two threads rounds otherwise on some CPUs (an AVX2 EPYC: a 64-episode hopper set
    # differed), and the episodes diverge from there: the policies sample on one thread
    seen = []
    sampler = locomotion._sampler

    def recording(*args):
        sample = sampler(*args)
        return lambda obs: seen.append(torch.get_num_threads()) or sample(obs)

    monkeypatch.setattr(locomotion, "_sampler", recording)
    own = torch.get_num_threads()
    sets = []
    try:
        for threads in (1, 2):
            monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / f"threads-{threads}"))
            torch.set_num_threads(threads)
            dataset = build_dataset("iql_torchrl/hopper/medium-expert-v0", episodes=8, progress=False)
            assert torch.get_num_threads() == threads  # the caller's count, given back
            sets.append([episode.actions for episode in dataset.iterate_episodes()])
    finally:
        torch.set_num_threads(own)
    assert set(seen) == {1}
    for one, two in zip(*sets):
        np.testing.assert_array_equal(one, two)


_BUILD_EVERY_KIND = """
import sys
import numpy as np
from iql_torchrl.datasets import BUILDERS
from iql_torchrl.datasets.builders import build_dataset
from iql_torchrl.datasets.locomotion import LocomotionRecipe
arrays = {}
for dataset_id, recipe in BUILDERS.items():
    if isinstance(recipe, LocomotionRecipe):
        if recipe.task != "hopper" or recipe.kind != "medium-expert":
            continue
        dataset = build_dataset(dataset_id, episodes=16, progress=False)
    else:
        dataset = build_dataset(dataset_id, episodes=6, reference_episodes=2, progress=False)
    for i, episode in enumerate(dataset.iterate_episodes()):
        observations = episode.observations if isinstance(episode.observations, dict) else {"": episode.observations}
        for name, value in [("actions", episode.actions), *observations.items()]:
            arrays[f"{dataset_id}|{i}|{name}"] = np.asarray(value)
np.savez(sys.argv[1], **arrays)
"""


@pytest.mark.slow
def test_a_builder_set_is_the_same_whatever_the_cpu_s_vector_instructions(tmp_path):
    # torch's kernels for this CPU's widest vectors against its scalar ones (ATEN_CPU_CAPABILITY=default): the float32
    # policies of a -v0 locomotion set round apart and its episodes diverge; the -v1 policies' float64 rounds to the
    # same actions, and the scripted sets compute nothing in torch that would part them
    import os
    import subprocess
    import sys

    native = torch.backends.cpu.get_cpu_capability()
    if native == "DEFAULT":
        pytest.skip("this CPU has no vector instructions for torch to choose between")
    sets = {}
    for capability in (native.lower(), "default"):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, MINARI_DATASETS_PATH=str(tmp_path / capability))
        subprocess.run([sys.executable, "-c", _BUILD_EVERY_KIND, str(tmp_path / f"{capability}.npz")], env=env,
                       check=True)
        sets[capability] = np.load(tmp_path / f"{capability}.npz")
    wide, scalar = sets.values()
    assert sorted(wide.files) == sorted(scalar.files)
    v0 = [name for name in wide.files if name.startswith("iql_torchrl/hopper/medium-expert-v0|")]
    same = [name for name in wide.files if name not in v0]
    scripted = {dataset_id for dataset_id, recipe in BUILDERS.items() if not isinstance(recipe, locomotion.LocomotionRecipe)}
    assert len(v0) == 32 and {name.split("|")[0] for name in same} == scripted | {"iql_torchrl/hopper/medium-expert-v1"}
    for name in same:
        np.testing.assert_array_equal(wide[name], scalar[name], err_msg=name)
    assert any(not np.array_equal(wide[name], scalar[name]) for name in v0)  # the set computed in float32 differs
