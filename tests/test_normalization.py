"""Observation normalisation (``--normalize-observations``): the dataset's per-feature mean and std + 1e-3, as
CORL's IQL, applied to the data the loss sees, to the evaluation, the saved and exported policy, kept across a
resume and by fine-tuning; ``auto`` standardises MuJoCo locomotion data only. Expected values are computed by
numpy in float64 from the raw Minari data, each beside a plausible wrong variant that the check tells apart."""
import json
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensordict import TensorDict

import iql_offline
import iql_torchrl.jobs.finetune as finetune_module
import iql_torchrl.runs.builders as builders
from iql_offline import train
from iql_torchrl.data import (
    DatasetError,
    buffer_transitions,
    load_minari_dataset,
    make_offline_buffer,
    normalize_stored_observations,
    read_minari_transitions,
)
from iql_torchrl.datasets import BUILDERS
from iql_torchrl.jobs import evaluate, export
from iql_torchrl.jobs.finetune import FinetuneConfig, finetune
from iql_torchrl.runs.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from iql_torchrl.runs.config import ConfigError, OfflineConfig, normalization_choice, parse_cli
from iql_torchrl.runs.evaluation import evaluation_seed
from iql_torchrl.runs.resume import ResumeError

from conftest import TINY_PENDULUM

EPS = 1e-3  # CORL's compute_mean_std: std = states.std(0) + eps
TINY = dict(steps=40, batch_size=32, eval_every=40, eval_episodes=3, log_every=10, checkpoint_every=20,
            hidden_sizes=(16, 16), device="cpu", progress=False, logger="none", compile=False)
FINETUNE = dict(online_steps=96, num_envs=2, frames_per_batch=16, batch_size=32, eval_every=200, eval_episodes=2,
                log_every=16, checkpoint_every=32, hidden_sizes=(16, 16), device="cpu", progress=False, logger="none",
                compile=False)


def standardised(values, mean, std) -> np.ndarray:
    return (np.asarray(values, dtype=np.float64) - mean) / std


def raw_observations(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """The stored observations and next observations of a dataset, untransformed, in float64."""
    raw = read_minari_transitions(dataset)
    return raw["observation"].double().numpy(), raw["next", "observation"].double().numpy()


def record_update_data(monkeypatch, module) -> list:
    """Records the transitions each update step built by ``module`` draws its batches from."""
    seen, real = [], module.IQLUpdate

    class Recording(real):
        def __init__(self, *args, data=None, **kwargs):
            seen.append(data)
            super().__init__(*args, data=data, **kwargs)

    monkeypatch.setattr(module, "IQLUpdate", Recording)
    return seen


def shifted_statistics(state: dict) -> tuple[list[float], list[float]]:
    """Statistics unlike the data's own (mean + 0.25, std × 1.5), written into a checkpoint's metadata."""
    metadata = state["metadata"]
    metadata["observation_mean"] = [m + 0.25 for m in metadata["observation_mean"]]
    metadata["observation_std"] = [s * 1.5 for s in metadata["observation_std"]]
    return metadata["observation_mean"], metadata["observation_std"]


# ------------------------------------------------------------------ the data the loss sees
def test_the_loss_sees_observations_standardised_by_the_dataset_mean_and_std_plus_1e_3(tiny_datasets, tmp_path,
                                                                                         monkeypatch):
    seen = record_update_data(monkeypatch, iql_offline)
    train(OfflineConfig(dataset=TINY_PENDULUM, output_dir=tmp_path / "run", normalize_observations="yes",
                        **{**TINY, "steps": 2, "eval_every": 2, "eval_episodes": 1}))
    observation, next_observation = raw_observations(TINY_PENDULUM)
    mean, std = observation.mean(0), observation.std(0) + EPS  # numpy's (population) std, as CORL
    data = seen[0]
    got, got_next = data["observation"].double().numpy(), data["next", "observation"].double().numpy()
    np.testing.assert_allclose(got, standardised(observation, mean, std), atol=1e-5)
    np.testing.assert_allclose(got_next, standardised(next_observation, mean, std), atol=1e-5)  # the same statistics
    # the check tells apart the plausible wrong variants
    batch = observation[np.random.default_rng(0).choice(len(observation), 256)]
    wrong = {"std without its 1e-3": standardised(observation, mean, observation.std(0)),
             "a batch's own statistics": standardised(observation, batch.mean(0), batch.std(0) + EPS),
             "the sample std (ddof 1)": standardised(observation, mean, observation.std(0, ddof=1) + EPS)}
    for name, values in wrong.items():
        assert np.abs(got - values).max() > 1e-4, name
    assert np.abs(got_next - standardised(next_observation, next_observation.mean(0),
                                          next_observation.std(0) + EPS)).max() > 1e-4  # next's own statistics


def test_a_constant_feature_gets_std_1e_3_and_stays_finite():
    n = 40
    rng = np.random.default_rng(3)
    observations = np.concatenate([rng.normal(2.0, 3.0, (n + 1, 2)), np.full((n + 1, 1), 0.3)], axis=1).astype(np.float32)
    transitions = TensorDict({
        "observation": torch.from_numpy(observations[:-1]), "action": torch.zeros(n, 1),
        "episode": torch.zeros(n, dtype=torch.int64), ("next", "observation"): torch.from_numpy(observations[1:]),
        ("next", "reward"): torch.zeros(n, 1), **{("next", key): torch.zeros(n, 1, dtype=torch.bool)
                                                  for key in ("done", "terminated", "truncated")},
    }, [n])
    buffer = make_offline_buffer(transitions, env_id="Pendulum-v1", normalize_observations=True)
    raw = observations[:-1].astype(np.float64)
    assert buffer.metadata.observation_std[2] == EPS  # numpy's std of a constant is 0
    np.testing.assert_allclose(buffer.metadata.observation_std, raw.std(0) + EPS, rtol=1e-12)
    stored = buffer_transitions(buffer)["observation"].double().numpy()
    np.testing.assert_allclose(stored, standardised(raw, raw.mean(0), raw.std(0) + EPS), atol=1e-5)
    assert (stored[:, 2] == 0).all()
    with pytest.raises(DatasetError, match="normalised already"):
        normalize_stored_observations(buffer)


def test_goal_data_with_the_goal_in_the_input_is_standardised_over_its_flattened_entries(write_minari_dataset):
    rng = np.random.default_rng(2)
    space = gym.spaces.Dict({key: gym.spaces.Box(-np.inf, np.inf, (size,), np.float64)
                             for key, size in (("observation", 3), ("desired_goal", 2), ("achieved_goal", 2))})
    episodes = [dict(observations={key: rng.normal(5.0, 2.0, (length + 1, box.shape[0])) for key, box in space.spaces.items()},
                     actions=rng.uniform(-1, 1, (length, 1)).astype(np.float32), rewards=rng.normal(size=length),
                     terminations=[False] * length, truncations=[False] * (length - 1) + [True]) for length in (6, 5)]
    write_minari_dataset("test/goal/in-input-v0", episodes, space, gym.spaces.Box(-1, 1, (1,), np.float32))
    buffer = load_minari_dataset("test/goal/in-input-v0", normalize_observations=True)
    metadata = buffer.metadata
    assert metadata.observation_keys == ["achieved_goal", "desired_goal", "observation"]  # the goal is in the input
    flat = np.concatenate([np.concatenate([e["observations"][key][:-1] for key in metadata.observation_keys], axis=1)
                           for e in episodes]).astype(np.float32).astype(np.float64)
    stored = buffer_transitions(buffer)["observation"].double().numpy()
    np.testing.assert_allclose(stored, standardised(flat, flat.mean(0), flat.std(0) + EPS), atol=1e-5)
    # an environment's Dict observation goes through the same flattening and the same ObservationNorm
    first = {key: value[0] for key, value in episodes[0]["observations"].items()}
    np.testing.assert_allclose(metadata.observation_from_env(first).numpy(), stored[0], atol=1e-6)


def test_given_statistics_that_do_not_fit_the_data_are_refused(tiny_datasets):
    buffer = load_minari_dataset(TINY_PENDULUM)
    with pytest.raises(DatasetError, match=r"observation_mean has shape \[2\].*3 features"):
        normalize_stored_observations(buffer, [0.0, 0.0], [1.0, 1.0])
    with pytest.raises(DatasetError, match="observation_std holds NaN or inf at feature 1"):
        normalize_stored_observations(buffer, [0.0, 0.0, 0.0], [1.0, float("nan"), 1.0])
    with pytest.raises(DatasetError, match="observation_std is not positive at feature 2"):
        normalize_stored_observations(buffer, [0.0, 0.0, 0.0], [1.0, 1.0, 0.0])
    assert not buffer.metadata.observations_normalized


def test_a_nan_observation_is_refused_before_training_naming_the_field(write_minari_dataset, synthetic_episode, tmp_path):
    rng = np.random.default_rng(1)
    episodes = [synthetic_episode(rng, 6, 3, 1) for _ in range(3)]
    episodes[1]["observations"][4, 2] = np.nan
    write_minari_dataset("test/nan/observations-v0", episodes, gym.spaces.Box(-np.inf, np.inf, (3,), np.float32),
                         gym.spaces.Box(-1, 1, (1,), np.float32))
    with pytest.raises(DatasetError, match="Field 'observation' holds NaN in episode 1"):
        train(OfflineConfig(dataset="test/nan/observations-v0", output_dir=tmp_path / "run", normalize_observations="yes",
                            **TINY))
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


# ------------------------------------------------------------------ the flag and auto
def test_the_flag_takes_auto_yes_or_no_and_auto_standardises_locomotion_data_only(monkeypatch):
    for argv, value in [(["--normalize-observations", "yes"], "yes"), (["--normalize-observations", "auto"], "auto"),
                        (["--normalize-observations"], "yes"), (["--no-normalize-observations"], "no")]:
        config, given = parse_cli(OfflineConfig, argv)
        assert config.normalize_observations == value and "normalize_observations" in given, argv
    assert OfflineConfig().normalize_observations == "auto"
    assert OfflineConfig(normalize_observations=True).normalize_observations == "yes"  # a Python bool reads as yes/no
    with pytest.raises(ConfigError, match="^--normalize-observations maybe: must be auto, yes or no.$"):
        OfflineConfig(normalize_observations="maybe").check()
    monkeypatch.setitem(BUILDERS, "iql_torchrl/test/made-up-v0", SimpleNamespace(env_id="HalfCheetah-v5", preset="mujoco"))
    for dataset, normalize in [("mujoco/hopper/medium-v0", True), ("mujoco/halfcheetah/expert-v0", True),
                               ("D4RL/walker2d-medium-v2", True), ("iql_torchrl/test/made-up-v0", True),
                               (TINY_PENDULUM, False), ("mujoco/pusher/expert-v0", False),
                               ("D4RL/antmaze/umaze-v1", False), ("iql_torchrl/pointmaze/umaze-v0", False)]:
        config = OfflineConfig(dataset=dataset)
        chosen, reason = normalization_choice(config)
        assert chosen is normalize and reason.startswith("auto: "), dataset
        assert config.resolved().normalize_observations == ("yes" if normalize else "no")
        assert normalization_choice(OfflineConfig(dataset=dataset, normalize_observations="no"))[0] is False


# ------------------------------------------------------------------ evaluation, the saved and exported policy
@pytest.fixture(scope="module")
def normalized_run(tiny_datasets_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("normalized") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(tiny_datasets_root))
        summary = train(OfflineConfig(dataset=TINY_PENDULUM, output_dir=folder, normalize_observations="yes", **TINY))
    return SimpleNamespace(dir=folder, summary=summary)


def exported_returns(path, seeds) -> list[float]:
    """Episode returns of an exported policy file, stepped as a user without the library would."""
    if str(path).endswith(".onnx"):
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path))
        policy = lambda obs: session.run(["action"], {"observation": obs})[0]  # noqa: E731
    else:
        module = torch.export.load(path).module()
        policy = lambda obs: module(torch.from_numpy(obs)).numpy()  # noqa: E731
    spec = json.loads(open(f"{path}.json").read())["env_spec"]
    returns = []
    for seed in seeds:
        env = gym.make(gym.envs.registration.EnvSpec.from_json(spec))
        obs, _ = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(np.asarray(obs, np.float32).reshape(1, -1))[0])
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    return returns


def test_a_normalized_runs_evaluate_and_exported_policies_score_what_the_run_scored(normalized_run, tiny_datasets,
                                                                                     capsys):
    summary = normalized_run.summary
    assert summary["normalize_observations"] == "yes"
    assert summary["normalization_reason"] == "--normalize-observations yes given"
    report = evaluate.main([str(normalized_run.dir)])
    assert report["normalized_score"] == summary["normalized_score"] and report["returns"] is not None
    state = load_checkpoint(normalized_run.dir / CHECKPOINT_NAME)
    metadata = state["metadata"]
    assert metadata["observations_normalized"]
    observation, _ = raw_observations(TINY_PENDULUM)
    np.testing.assert_allclose(metadata["observation_mean"], observation.mean(0), rtol=1e-9)
    np.testing.assert_allclose(metadata["observation_std"], observation.std(0) + EPS, rtol=1e-9)

    seeds = [evaluation_seed(0) + i for i in range(TINY["eval_episodes"])]  # the run's own evaluation episodes
    for fmt in ("exported-program", "onnx"):
        path = export.export_policy(normalized_run.dir, format=fmt)
        returns = exported_returns(path, seeds)
        np.testing.assert_allclose(returns, report["returns"], rtol=1e-5, err_msg=fmt)
    # the check can fail: the same policy evaluated on raw observations scores otherwise
    without = dict(state, metadata={**metadata, "observations_normalized": False})
    save_checkpoint(normalized_run.dir.parent / "raw" / CHECKPOINT_NAME, without)
    raw = evaluate.main([str(normalized_run.dir.parent / "raw")])
    assert abs(raw["normalized_score"] - summary["normalized_score"]) > 0.1


def test_the_preset_line_says_whether_observations_are_standardised_and_why(tiny_datasets, tmp_path, capsys):
    train(OfflineConfig(dataset=TINY_PENDULUM, output_dir=tmp_path / "auto", **{**TINY, "steps": 2, "eval_every": 2}))
    line = next(l for l in capsys.readouterr().err.splitlines() if l.startswith("preset mujoco"))
    assert line.endswith(f"; observations as stored (auto: {TINY_PENDULUM} is not MuJoCo locomotion data, "
                         "the only data auto standardises)")
    train(OfflineConfig(dataset=TINY_PENDULUM, output_dir=tmp_path / "yes", normalize_observations="yes",
                        **{**TINY, "steps": 2, "eval_every": 2}))
    line = next(l for l in capsys.readouterr().err.splitlines() if l.startswith("preset mujoco"))
    assert line.endswith("; observations standardised by the dataset's mean and std + 1e-3 "
                         "(--normalize-observations yes given)")


# ------------------------------------------------------------------ resume and fine-tuning
def test_a_resumed_run_normalises_with_its_checkpoints_statistics_never_recomputed(tiny_datasets, tmp_path, monkeypatch,
                                                                                    stop_after_checkpoint):
    out = tmp_path / "run"
    stop_after_checkpoint(lambda run: run.step == 20)
    with pytest.raises(KeyboardInterrupt):
        train(OfflineConfig(dataset=TINY_PENDULUM, output_dir=out, normalize_observations="yes", **TINY))
    stop_after_checkpoint(None)
    state = load_checkpoint(out / CHECKPOINT_NAME)
    mean, std = shifted_statistics(state)
    save_checkpoint(out / CHECKPOINT_NAME, state)

    with pytest.raises(ResumeError, match="--normalize-observations: checkpoint yes, given no"):
        train(OfflineConfig(output_dir=out, resume=True, normalize_observations="no", progress=False))
    seen = record_update_data(monkeypatch, iql_offline)
    train(OfflineConfig(output_dir=out, resume=True, normalize_observations="auto", progress=False))  # auto: the checkpoint's
    observation, next_observation = raw_observations(TINY_PENDULUM)
    got = seen[0]["observation"].double().numpy()
    np.testing.assert_allclose(got, standardised(observation, mean, std), atol=1e-5)
    np.testing.assert_allclose(seen[0]["next", "observation"].double().numpy(),
                               standardised(next_observation, mean, std), atol=1e-5)
    assert np.abs(got - standardised(observation, observation.mean(0), observation.std(0) + EPS)).max() > 0.1  # recomputed
    final = load_checkpoint(out / CHECKPOINT_NAME)
    assert final["step"] == TINY["steps"]
    assert (final["metadata"]["observation_mean"], final["metadata"]["observation_std"]) == (mean, std)


def test_fine_tuning_standardises_offline_and_online_data_with_the_offline_runs_statistics(tiny_datasets, tmp_path,
                                                                                            monkeypatch, capsys):
    offline = tmp_path / "offline"
    train(OfflineConfig(dataset=TINY_PENDULUM, output_dir=offline, normalize_observations="yes",
                        **{**TINY, "steps": 20, "eval_every": 20}))
    state = load_checkpoint(offline / CHECKPOINT_NAME)
    mean, std = shifted_statistics(state)
    save_checkpoint(offline / CHECKPOINT_NAME, state)
    capsys.readouterr()

    seen = record_update_data(monkeypatch, builders)
    replays, make_buffer = [], finetune_module.make_offline_online_buffer
    monkeypatch.setattr(finetune_module, "make_offline_online_buffer",
                        lambda *args, **kwargs: replays.append(make_buffer(*args, **kwargs)) or replays[-1])
    finetune(FinetuneConfig(checkpoint=offline, output_dir=tmp_path / "finetuned", **FINETUNE))
    assert ("observations standardised by the dataset's mean and std + 1e-3 (the offline run's: "
            "--normalize-observations yes given)") in capsys.readouterr().err

    observation, _ = raw_observations(TINY_PENDULUM)
    np.testing.assert_allclose(seen[0]["observation"].double().numpy(), standardised(observation, mean, std), atol=1e-5)
    # online: Pendulum observes (cos θ, sin θ, θ̇), so undone with the statistics it was standardised with, cos² + sin² = 1
    online = replays[0].online_buffer[:]
    assert len(online) == FINETUNE["online_steps"]
    for key in ("observation", ("next", "observation")):
        raw = online[key].double().numpy() * std + mean
        np.testing.assert_allclose(raw[:, 0] ** 2 + raw[:, 1] ** 2, 1.0, atol=1e-5)
        own_mean, own_std = observation.mean(0), observation.std(0) + EPS  # the data's own, recomputed: not these
        undone = online[key].double().numpy() * own_std + own_mean
        assert np.abs(undone[:, 0] ** 2 + undone[:, 1] ** 2 - 1.0).max() > 0.1
    final = load_checkpoint(tmp_path / "finetuned" / CHECKPOINT_NAME)["metadata"]  # what evaluation and export read
    assert (final["observation_mean"], final["observation_std"]) == (mean, std)
