"""Offline-to-online fine-tuning: online data in the offline buffer's terms, mixed batches, one update
step across both phases, exact resume mid-online, and end-to-end runs on a tiny dataset."""
import json
import math
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torchrl.collectors import Collector

from iql_torchrl.runs.checkpoint import CHECKPOINT_NAME, load_checkpoint
from iql_torchrl.data import TRANSITION_KEYS, buffer_transitions, load_minari_dataset
from iql_torchrl.jobs.cli import run_job
from iql_torchrl.jobs.finetune import FinetuneConfig, finetune
from iql_torchrl.jobs.online import (
    OfflineDataTransform,
    episode_states,
    make_exploration_policy,
    make_offline_online_buffer,
    make_online_env,
)
from iql_torchrl.runs.builders import build_loss, load_actor
from conftest import TINY_PENDULUM
from iql_offline import train
from iql_torchrl.runs.config import OfflineConfig, flag
from iql_torchrl.runs.run import NonFiniteLossError
from iql_torchrl.step.update import IQLUpdate

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    offline_steps=20, online_steps=96, num_envs=2, frames_per_batch=16, batch_size=32, eval_every=40,
    eval_episodes=2, log_every=16, checkpoint_every=32, hidden_sizes=(16, 16), device="cpu", progress=False,
)


def _constant_policy(value: float, action_dim: int = 1):
    return TensorDictModule(lambda obs: torch.full((*obs.shape[:-1], action_dim), value),
                            in_keys=["observation"], out_keys=["action"])


# ------------------------------------------------------------------ online data == offline data's terms
def test_online_transitions_have_the_offline_keys_dtypes_and_transforms(tiny_datasets):
    buffer = load_minari_dataset(tiny_datasets.pendulum, reward_transform="locomotion", normalize_observations=True)
    meta = buffer.metadata
    assert meta.reward_scale != 1.0 and meta.actions_scaled  # the transforms under test are active
    env = make_online_env(meta, num_envs=1, seed=0)
    collector = Collector(env, make_exploration_policy(_constant_policy(0.5), meta), frames_per_batch=20, total_frames=40, auto_register_policy_transforms=False)
    rollout = next(iter(collector)).reshape(-1)
    recorded_env_actions = np.stack(episode_states(env)[0]["actions"])
    collector.shutdown()

    offline = buffer_transitions(buffer)
    for key in TRANSITION_KEYS:
        assert rollout.get(key).dtype == offline.get(key).dtype, key
        assert rollout.get(key).shape[1:] == offline.get(key).shape[1:], key
    # the buffer keeps the policy's action; the env got it mapped to Pendulum's ±2 bounds
    assert torch.equal(rollout["action"], torch.full((20, 1), 0.5))
    np.testing.assert_allclose(recorded_env_actions, 1.0)
    # Pendulum's reward from the raw observation: -(θ² + 0.1·θ̇² + 0.001·u²), then the dataset's scale
    raw = meta.unnormalize_observation(rollout["observation"])
    theta, theta_dot = torch.atan2(raw[:, 1], raw[:, 0]), raw[:, 2]
    expected = -(theta**2 + 0.1 * theta_dot**2 + 0.001 * 1.0**2) * meta.reward_scale + meta.reward_shift
    torch.testing.assert_close(rollout["next", "reward"].squeeze(-1), expected, rtol=1e-4, atol=1e-4)
    # consecutive steps chain: next observation t == observation t + 1
    assert torch.equal(rollout["next", "observation"][:-1], rollout["observation"][1:])


def test_terminated_and_truncated_stay_distinct_online(tiny_datasets):
    pendulum = load_minari_dataset(tiny_datasets.pendulum).metadata
    env = make_online_env(pendulum, num_envs=1, seed=0)
    collector = Collector(env, make_exploration_policy(_constant_policy(0.0), pendulum), frames_per_batch=200, total_frames=400, auto_register_policy_transforms=False)
    rollout = next(iter(collector)).reshape(-1)
    collector.shutdown()
    assert rollout["next", "truncated"][-1].item() and not rollout["next", "terminated"].any()  # time limit

    hopper = load_minari_dataset(tiny_datasets.inverted_pendulum).metadata
    env = make_online_env(hopper, num_envs=1, seed=0)
    collector = Collector(env, make_exploration_policy(_constant_policy(1.0), hopper), frames_per_batch=50, total_frames=100, auto_register_policy_transforms=False)
    rollout = next(iter(collector)).reshape(-1)
    collector.shutdown()
    assert rollout["next", "terminated"].any() and not rollout["next", "truncated"].any()  # the pole fell
    assert torch.equal(rollout["next", "done"], rollout["next", "terminated"] | rollout["next", "truncated"])


@pytest.mark.parametrize("online_fraction", [0.25, 0.5])
def test_batches_mix_offline_and_online_transitions_in_the_configured_proportion(online_fraction):
    def transitions(n, marker):
        return TensorDict({"observation": torch.full((n, 3), marker), "action": torch.zeros(n, 1),
                           ("next", "observation"): torch.zeros(n, 3), ("next", "reward"): torch.zeros(n, 1),
                           **{("next", f): torch.zeros(n, 1, dtype=torch.bool) for f in ("done", "terminated", "truncated")},
                           "episode": torch.zeros(n, dtype=torch.int64)}, [n])

    mixed = make_offline_online_buffer(transitions(500, 0.0), online_capacity=100, online_fraction=online_fraction,
                                       batch_size=64)
    assert (mixed.sample()["observation"][:, 0] == 0).all()  # no online data yet: all offline
    mixed.extend(transitions(40, 1.0).select(*TRANSITION_KEYS))
    for _ in range(5):
        from_online = (mixed.sample()["observation"][:, 0] == 1).sum().item()
        assert from_online == round(online_fraction * 64)


def test_the_exploration_policy_acts_with_the_current_weights(tiny_datasets):
    buffer = load_minari_dataset(tiny_datasets.pendulum)
    loss = build_loss(OfflineConfig(hidden_sizes=(16, 16), device="cpu").resolved(), buffer.metadata)
    policy = make_exploration_policy(loss.get_stateful_net("actor_network", copy=True).eval(), buffer.metadata)
    obs = TensorDict({"observation": torch.randn(8, 3)}, [8])
    before = policy(obs.clone())["loc"].clone()
    update = IQLUpdate(loss, data=buffer_transitions(buffer))
    for _ in range(3):
        update(torch.arange(32))
    after = policy(obs.clone())["loc"]
    assert not torch.equal(before, after)
    reference = loss.get_stateful_net("actor_network", copy=True).eval()(obs.clone())["loc"]
    assert torch.equal(after, reference)


# ------------------------------------------------------------------ the fine-tuning loop
def test_the_same_update_step_runs_both_phases(tiny_datasets, tmp_path, monkeypatch):
    calls = []
    real_call = IQLUpdate.__call__

    def recording_call(self, batch_or_indices):
        calls.append((id(self), "indices" if isinstance(batch_or_indices, torch.Tensor) else "batch"))
        return real_call(self, batch_or_indices)

    monkeypatch.setattr(IQLUpdate, "__call__", recording_call)
    summary = finetune(FinetuneConfig(dataset=tiny_datasets.pendulum, output_dir=tmp_path / "run", logger="none", **TINY))
    assert len({step_id for step_id, _ in calls}) == 1
    kinds = [kind for _, kind in calls]
    assert kinds == ["indices"] * 20 + ["batch"] * 96  # offline indices, then mixed batches, utd 1
    assert summary["updates"] == 116 and summary["env_steps"] == 96


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_updates_per_second_leaves_out_each_phase_s_compiling_first_update(tiny_datasets, tmp_path, monkeypatch, mode):
    # a compiled step compiles on its first offline call (indices) and again on its first online call
    # (sampled batches: a new call signature); neither belongs in updates/s. The step runs eager here,
    # only reporting the mode, so the test checks the bookkeeping without compiling.
    from iql_torchrl import IQLUpdate

    monkeypatch.setattr(IQLUpdate, "mode", property(lambda self: mode))
    out = tmp_path / "run"
    summary = finetune(FinetuneConfig(dataset=tiny_datasets.pendulum, output_dir=out, logger="none", **TINY))
    timing = load_checkpoint(out / CHECKPOINT_NAME)["timing"]
    assert summary["updates"] == 116
    assert timing["timed_updates"] == (116 if mode == "eager" else 114)  # 115: the online compile counted


def test_a_short_run_writes_a_finite_summary_over_both_phases(tiny_datasets, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "iql_finetune.py"), "--dataset", tiny_datasets.pendulum,
         "--offline-steps", "20", "--online-steps", "96", "--num-envs", "2", "--frames-per-batch", "16",
         "--utd-ratio", "0.5", "--batch-size", "32", "--eval-every", "40", "--eval-episodes", "2",
         "--log-every", "8", "--checkpoint-every", "32", "--hidden-sizes", "16", "16", "--device", "cpu",
         "--no-progress", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("offline_normalized_score", "normalized_score", "return_mean", "return_std", "wall_seconds",
                "updates_per_second"):
        assert math.isfinite(summary[key]), key
    assert summary["env_steps"] == 96 and summary["updates"] == 20 + 48  # utd 0.5: 8 updates per 16 env steps
    curve = summary["curve"]
    assert curve[0] == {**curve[0], "step": 20, "env_steps": 0, "phase": "offline"}
    assert curve[0]["normalized_score"] == summary["offline_normalized_score"]
    assert {p["phase"] for p in curve} == {"offline", "online"} and curve[-1]["step"] == 68
    assert all(math.isfinite(p["normalized_score"]) for p in curve)
    assert (out / "learning_curve.png").stat().st_size > 1000
    assert list((out / "logs").rglob("env_steps.csv")) and list((out / "logs").rglob("loss_qvalue.csv"))
    actor, metadata = load_actor(out)  # the fine-tuned policy loads like an offline one
    assert actor(TensorDict({"observation": torch.zeros(2, metadata.observation_dim)}, [2]))["action"].shape == (2, 1)


def test_a_run_resumed_mid_online_phase_ends_like_an_uninterrupted_one(tiny_datasets, tmp_path, stop_after_checkpoint):
    straight = finetune(FinetuneConfig(dataset=tiny_datasets.pendulum, output_dir=tmp_path / "straight", logger="none", **TINY))

    def first_online_checkpoint(run) -> bool:
        job_state = run.extra_state()
        return job_state["phase"] == "online" and job_state["env_steps"] > 0

    stop_after_checkpoint(first_online_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        finetune(FinetuneConfig(dataset=tiny_datasets.pendulum, output_dir=tmp_path / "crashed", logger="none", **TINY))
    stop_after_checkpoint(None)
    interrupted = load_checkpoint(tmp_path / "crashed" / CHECKPOINT_NAME)
    assert interrupted["phase"] == "online" and 0 < interrupted["env_steps"] < 96
    assert any(len(e["actions"]) > 0 for e in interrupted["online"]["episodes"])  # episodes were mid-way

    resumed = finetune(FinetuneConfig(output_dir=tmp_path / "crashed", resume=True, progress=False))
    a = load_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)
    b = load_checkpoint(tmp_path / "crashed" / CHECKPOINT_NAME)
    for key in a["loss"]:
        assert torch.equal(a["loss"][key], b["loss"][key]), key
    stored_a, stored_b = a["online"]["buffer"]["_storage"]["_storage"], b["online"]["buffer"]["_storage"]["_storage"]
    assert len(stored_a) == len(TRANSITION_KEYS) and stored_a.keys() == stored_b.keys()
    for key in stored_a:  # the same online transitions, bit for bit
        assert torch.equal(stored_a[key], stored_b[key]), key
    assert resumed["env_steps"] == straight["env_steps"] == 96 and resumed["updates"] == straight["updates"] == 116
    assert resumed["curve"] == straight["curve"]
    assert resumed["normalized_score"] == straight["normalized_score"]


FROM_CHECKPOINT = {name: value for name, value in TINY.items() if name != "offline_steps"}  # the offline run's


@pytest.fixture(scope="module")
def offline_run(tiny_datasets_root, tmp_path_factory):
    """A finished offline run (30 updates, τ 0.6 where its preset says 0.7) and its summary."""
    folder = tmp_path_factory.mktemp("offline") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(tiny_datasets_root))
        summary = train(OfflineConfig(dataset=TINY_PENDULUM, output_dir=folder, steps=30, batch_size=32, eval_every=30,
                                      eval_episodes=2, expectile=0.6, hidden_sizes=(16, 16), device="cpu",
                                      progress=False, logger="none"))
    return SimpleNamespace(dir=folder, summary=summary)


def test_fine_tuning_starts_from_an_offline_run(offline_run, tiny_datasets, tmp_path, capsys):
    offline, offline_dir = offline_run.summary, offline_run.dir
    config = FinetuneConfig(checkpoint=offline_dir, output_dir=tmp_path / "finetuned", logger="none", **FROM_CHECKPOINT)
    summary = finetune(config)
    # the console's preset line names where τ came from: no --expectile was given here
    assert "expectile 0.6 (the offline run's; the preset's 0.7)" in capsys.readouterr().err
    assert summary["offline_steps"] == 30 and summary["updates"] == 30 + 96  # the offline run's steps
    assert summary["started_from"] == str(offline_dir)
    assert summary["expectile"] == 0.6  # the offline run's τ, not the preset's 0.7
    # the preset is the offline run's, and the reason says so (not "--preset mujoco given")
    assert summary["preset"] == offline["preset"] == "mujoco"
    assert summary["preset_reason"] == f"the offline run {offline_dir} trained with it ({offline['preset_reason']})"
    # the same policy, the same evaluation episodes: the offline run's final score, before any online step
    assert summary["offline_normalized_score"] == offline["normalized_score"]
    state = load_checkpoint(tmp_path / "finetuned" / CHECKPOINT_NAME)
    assert float(state["update"]["actor_lr"]) == pytest.approx(3e-4)  # the offline cosine decay is undone


def test_flags_that_conflict_with_the_offline_run_are_refused_before_any_work(offline_run, tiny_datasets, tmp_path,
                                                                               capsys):
    out = tmp_path / "finetuned"
    argv = ["--checkpoint", str(offline_run.dir), "--output-dir", str(out), "--dataset", tiny_datasets.inverted_pendulum,
            "--hidden-sizes", "8", "--gamma", "0.9", "--optimizer", "adamw",
            "--offline-steps", "30", "--preset", "auto", "--expectile", "0.9"]  # the same, auto and an override: not refused
    assert run_job(FinetuneConfig, finetune, argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"error: --checkpoint {offline_run.dir} fine-tunes the offline run with the settings it trained with; "
        "these flags differ from them:",
        f"  --dataset: the offline run's {tiny_datasets.pendulum}, given {tiny_datasets.inverted_pendulum}",
        "  --gamma: the offline run's 0.99, given 0.9",
        "  --hidden-sizes: the offline run's 16 16, given 8",
        "  --optimizer: the offline run's adam, given adamw",
        "Drop them to fine-tune that run, or train a new offline run with them (examples/iql_offline.py).",
    ]
    assert not out.exists()
    assert run_job(FinetuneConfig, finetune, ["--checkpoint", str(offline_run.dir), "--offline-steps", "999",
                                              "--output-dir", str(out)]) == 2
    assert "  --offline-steps: the offline run's 30, given 999" in capsys.readouterr().err
    assert not out.exists()


def test_device_cuda_without_a_gpu_is_refused_before_the_offline_run_is_read(offline_run, tiny_datasets, tmp_path,
                                                                              monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loads = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args))
    argv = ["--checkpoint", str(offline_run.dir), "--device", "cuda", "--output-dir", str(tmp_path / "finetuned")]
    assert run_job(FinetuneConfig, finetune, argv) == 2
    assert capsys.readouterr().err == "error: --device cuda: no CUDA device is available here; use --device cpu (or auto).\n"
    assert loads == []


def test_the_given_temperature_expectile_and_learning_rates_apply_from_an_offline_run(offline_run, tiny_datasets, tmp_path,
                                                                                    capsys):
    config = FinetuneConfig(checkpoint=offline_run.dir, output_dir=tmp_path / "finetuned", logger="none",
                            expectile=0.9, temperature=1.0, lr=1e-4, value_lr=2e-4, **FROM_CHECKPOINT)
    summary = finetune(config)
    assert summary["expectile"] == 0.9 and summary["temperature"] == 1.0
    assert "expectile 0.9 (--expectile; the preset's 0.7), temperature 1.0 (--temperature; the preset's 3.0)" \
        in capsys.readouterr().err
    state = load_checkpoint(tmp_path / "finetuned" / CHECKPOINT_NAME)
    rates = {name: [float(group["lr"]) for group in optimizer["param_groups"]]
             for name, optimizer in state["update"]["optimizers"].items()}
    assert rates == {"actor": [pytest.approx(1e-4)], "qvalue": [pytest.approx(1e-4)], "value": [pytest.approx(2e-4)]}


def test_an_unfinished_offline_run_is_fine_tuned_from_its_latest_checkpoint_and_the_console_says_so(
        tiny_datasets, tmp_path, stop_after_checkpoint, capsys):
    offline_dir = tmp_path / "offline"
    stop_after_checkpoint(lambda run: run.step == 20)
    with pytest.raises(KeyboardInterrupt):
        train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=offline_dir, steps=30, batch_size=32,
                            eval_every=30, checkpoint_every=10, hidden_sizes=(16, 16), device="cpu", progress=False,
                            logger="none"))
    stop_after_checkpoint(None)
    capsys.readouterr()
    summary = finetune(FinetuneConfig(checkpoint=offline_dir, output_dir=tmp_path / "finetuned", logger="none",
                                      **FROM_CHECKPOINT))
    assert (f"iql_torchrl: the offline run {offline_dir} stopped at update 20 of 30 (no summary.json): "
            "fine-tuning starts from that checkpoint.") in capsys.readouterr().err.splitlines()
    assert summary["offline_steps"] == 20 and summary["updates"] == 20 + 96


def test_the_fine_tuning_page_lists_every_flag_that_differs_from_the_offline_example():
    page = (ROOT / "docs" / "finetuning.md").read_text()
    offline = {f.name: f.default for f in fields(OfflineConfig)}
    for field in fields(FinetuneConfig):
        if field.name not in offline or field.default != offline[field.name]:
            assert f"`{flag(field.name)}" in page, flag(field.name)
    for name in set(offline) - {f.name for f in fields(FinetuneConfig)}:  # --steps, --num-seeds and --sweep: said so
        assert f"`{flag(name)}`" in page, flag(name)


def test_a_non_finite_online_loss_stops_the_run_with_the_last_checkpoint_intact(tiny_datasets, tmp_path, monkeypatch):
    real_call = OfflineDataTransform._call

    def nan_rewards(self, next_tensordict):
        out = real_call(self, next_tensordict)
        return out.set("reward", torch.full_like(out.get("reward"), float("nan")))

    monkeypatch.setattr(OfflineDataTransform, "_call", nan_rewards)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite .*loss_qvalue.* at update step 20"):
        finetune(FinetuneConfig(dataset=tiny_datasets.pendulum, output_dir=out, logger="none", **TINY))
    state = load_checkpoint(out / CHECKPOINT_NAME)
    assert state["step"] == 20 and state["phase"] == "online" and state["env_steps"] == 0  # the phase boundary
    assert all(torch.isfinite(v).all() for v in state["loss"].values())
    assert not (out / "summary.json").exists()


def test_both_configs_extend_one_run_config_and_write_no_field_twice():
    from iql_torchrl.runs.config import RunConfig

    shared = {f.name for f in fields(RunConfig)}
    offline_only = {f.name for f in fields(OfflineConfig)} - shared
    finetune_only = {f.name for f in fields(FinetuneConfig)} - shared
    assert offline_only == {"steps", "num_seeds", "sweep"}
    assert not offline_only & finetune_only
    # a subclass may override a default (the fine-tuning dataset, its evaluation interval), not restate a field
    restated = {name for name in FinetuneConfig.__annotations__ if name in shared}
    assert restated == {"dataset", "eval_every"}
    assert FinetuneConfig().dataset != OfflineConfig().dataset
