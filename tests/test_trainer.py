"""The offline trainer end to end on a tiny dataset: summary, plot, logs, checkpoints, resume."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from iql_torchrl.runs.checkpoint import CHECKPOINT_NAME, load_checkpoint
from iql_torchrl.runs.builders import load_actor
from iql_offline import train
from iql_torchrl.runs.config import OfflineConfig
from iql_torchrl.runs.run import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    steps=20, batch_size=32, eval_every=10, eval_episodes=2, log_every=5, checkpoint_every=10,
    hidden_sizes=(16, 16), device="cpu", progress=False,
)


def test_a_short_run_writes_a_finite_summary_a_plot_and_csv_logs(tiny_datasets, tmp_path):
    out = tmp_path / "run"
    summary = train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, **TINY))
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("dataset", "steps", "seed", "temperature", "expectile", "normalized_score", "return_mean",
                "return_std", "updates_per_second", "wall_seconds", "curve", "version"):
        assert key in on_disk, key
    assert on_disk["steps"] == 20 and on_disk["temperature"] == 3.0 and on_disk["expectile"] == 0.7
    for key in ("normalized_score", "return_mean", "return_std", "updates_per_second", "wall_seconds"):
        assert math.isfinite(on_disk[key]), key
    assert [p["step"] for p in on_disk["curve"]] == [10, 20]
    assert (out / "learning_curve.png").stat().st_size > 1000
    assert list((out / "logs").rglob("loss_qvalue.csv"))


@pytest.mark.slow
def test_the_main_job_compiled_trains_like_eager_and_resumes_where_it_stopped(tiny_datasets, tmp_path, stop_after_checkpoint):
    runs = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=tmp_path / name, compile=compiled, **TINY))
        runs[name] = load_checkpoint(tmp_path / name / CHECKPOINT_NAME)
    eager, compiled = runs["eager"]["loss"], runs["compiled"]["loss"]
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5, msg=key)
    assert runs["compiled"]["timing"]["timed_updates"] == 19  # the compiling first update is left out
    assert runs["eager"]["timing"]["timed_updates"] == 20

    # a compiled run stopped after its step-10 checkpoint and resumed compiles again and ends where
    # the uninterrupted compiled run ended
    stop_after_checkpoint(lambda run: run.step == 10)
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, compile=True, **TINY))
    halfway = load_checkpoint(out / CHECKPOINT_NAME)["loss"]
    stop_after_checkpoint(None)
    train(OfflineConfig(output_dir=out, resume=True, progress=False))
    resumed = load_checkpoint(out / CHECKPOINT_NAME)
    assert resumed["step"] == 20 and resumed["config"]["compile"] is True
    assert resumed["timing"]["timed_updates"] == 9 + 9  # ten updates a session, each session's first compiling
    for key in compiled:
        torch.testing.assert_close(resumed["loss"][key], compiled[key], rtol=1e-6, atol=1e-7, msg=key)
    # the wrong variant: the run as it stood at step 10
    assert any(not torch.allclose(halfway[key], compiled[key], rtol=1e-4, atol=1e-5) for key in compiled)


def test_an_existing_output_dir_is_not_overwritten(tiny_datasets, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("results")
    with pytest.raises(FileExistsError, match="--resume"):
        train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, **TINY))
    assert (out / "keep.txt").read_text() == "results"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors raised without CUDA")
def test_cuda_only_flags_fail_clearly_without_cuda(tmp_path):
    with pytest.raises(ValueError, match="--cudagraphs needs CUDA"):
        train(OfflineConfig(output_dir=tmp_path / "a", cudagraphs=True, device="auto"))
    with pytest.raises(ValueError, match="no CUDA device"):
        train(OfflineConfig(output_dir=tmp_path / "b", device="cuda"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_compile_without_a_cpp_compiler_fails_before_any_work(tiny_datasets, tmp_path):
    # inductor builds CPU kernels with a C++ compiler: a machine without one is told so at the start
    from iql_torchrl import IQLLoss, IQLUpdate, make_iql_networks

    with torch._inductor.config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        with pytest.raises(ValueError, match="--compile: .*needs a C\\+\\+ compiler.*CXX"):
            train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=tmp_path / "run", compile=True, **TINY))
        loss = IQLLoss(*make_iql_networks(3, 1, hidden_sizes=(8,)))
        with pytest.raises(RuntimeError, match="mode='compile'.*needs a C\\+\\+ compiler"):
            IQLUpdate(loss, mode="compile")
        IQLUpdate(loss)  # eager needs none
    assert not (tmp_path / "run").exists()
    # with the compiler found, the same settings pass the check
    IQLUpdate(IQLLoss(*make_iql_networks(3, 1, hidden_sizes=(8,))), mode="compile")


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_datasets, tmp_path, monkeypatch):
    # transition 0 gets a NaN reward and is the whole batch from update step 14 on
    import iql_torchrl.runs.builders as build
    import iql_offline as trainer

    real_transitions, real_indices, calls = trainer.buffer_transitions, build.sample_indices, []

    def poisoned_transitions(buffer):
        data = real_transitions(buffer)
        data["next", "reward"][0] = float("nan")
        return data

    def indices(num, batch, generator, device):
        calls.append(1)
        drawn = real_indices(num - 1, batch, generator, device) + 1
        return drawn if len(calls) <= 14 else torch.zeros_like(drawn)

    monkeypatch.setattr(trainer, "buffer_transitions", poisoned_transitions)
    monkeypatch.setattr(build, "sample_indices", indices)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"loss_qvalue at update step 14"):
        train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, **TINY))
    state = load_checkpoint(out / CHECKPOINT_NAME)
    assert state["step"] == 10
    assert all(torch.isfinite(v).all() for v in state["loss"].values())
    assert not (out / "summary.json").exists()


def test_the_saved_policy_loads_as_a_plain_torchrl_module(tiny_datasets, tmp_path):
    from tensordict import TensorDict

    out = tmp_path / "run"
    train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, **TINY))
    actor, metadata = load_actor(out)
    action = actor(TensorDict({"observation": torch.zeros(4, metadata.observation_dim)}, [4]))["action"]
    assert action.shape == (4, metadata.action_dim)
    result = subprocess.run([sys.executable, "-m", "iql_torchrl.jobs.evaluate", str(out), "--episodes", "2"],
                            capture_output=True, text=True, timeout=300, env={**os.environ})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "normalized_score" in result.stdout


def test_wandb_without_an_api_key_runs_offline_and_writes_its_files(tiny_datasets, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, logger="wandb", **TINY))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and any(f.suffix == ".wandb" for f in runs[0].iterdir())
    assert "WANDB_MODE" not in os.environ  # the offline mode was this run's, not the process's from then on


def test_wandb_mode_set_by_the_user_decides(tiny_datasets, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, logger="wandb", **TINY))
    assert not list(out.glob("wandb/*run-*")) and os.environ["WANDB_MODE"] == "disabled"


def test_a_resumed_wandb_run_goes_on_in_the_same_wandb_run(tiny_datasets, tmp_path, monkeypatch, stop_after_checkpoint):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    stop_after_checkpoint(lambda run: run.step == 10)
    with pytest.raises(KeyboardInterrupt):
        train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=out, logger="wandb", **TINY))
    stop_after_checkpoint(None)
    train(OfflineConfig(output_dir=out, resume=True, progress=False))
    sessions = sorted((out / "wandb").glob("offline-run-*"))
    ids = {path.name.split("-")[3] for path in sessions}  # offline-run-<time>-<run id>[-<n>, in the same second]
    assert sessions and len(ids) == 1, [path.name for path in sessions]  # both sessions in one W&B run
    other = tmp_path / "other"
    train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=other, logger="wandb", **TINY))
    assert {path.name.split("-")[3] for path in (other / "wandb").glob("offline-run-*")} != ids  # a new run: its own


def _example(*args, **kwargs):
    return subprocess.Popen([sys.executable, str(ROOT / "examples" / "iql_offline.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_a_run_saved_on_a_gpu_resumes_on_the_cpu_repeatably_in_the_way_this_machine_can_and_says_so(
        tiny_datasets, tmp_path, stop_after_checkpoint, capsys):
    stop_after_checkpoint(lambda run: run.step == 10)
    first = tmp_path / "first"
    with pytest.raises(KeyboardInterrupt):
        train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=first, **TINY))
    stop_after_checkpoint(None)
    # as a run on a GPU saves it: a compiled step replayed as a CUDA graph, and a batch generator's state that is a
    # CUDA generator's (a 16-byte seed and offset), which a CPU generator refuses
    state = load_checkpoint(first / CHECKPOINT_NAME)
    saved_on_cpu = state["rng"][0]["generators"][0]
    state["rng"][0]["generators"] = [torch.arange(16, dtype=torch.uint8)]
    state["config"].update(device="cuda", compile=True, cudagraphs=True)
    torch.save(state, first / CHECKPOINT_NAME)
    with pytest.raises(RuntimeError, match="size"):  # the wrong variant: the state put back as it was saved
        torch.Generator().set_state(state["rng"][0]["generators"][0])
    second = tmp_path / "second"
    shutil.copytree(first, second)
    ends = []
    # on a machine without a C++ compiler too: the compiled step goes on eager
    with torch._inductor.config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        for out in (first, second):
            capsys.readouterr()
            train(OfflineConfig(output_dir=out, resume=True, device="cpu", progress=False))
            said = capsys.readouterr().err
            for line in ("the run's step ran on cuda; on cpu it goes on without a CUDA graph",
                         "it goes on eager here: compiling the update step on the CPU needs a C++ compiler",
                         "from update 10 on they are drawn anew"):
                assert line in said, line
            ends.append(load_checkpoint(out / CHECKPOINT_NAME))
    assert ends[0]["step"] == ends[1]["step"] == 20
    for key, value in ends[0]["loss"].items():  # the fresh stream is seeded by the run: resuming is repeatable
        assert torch.equal(value, ends[1]["loss"][key]), key
    assert not torch.equal(ends[0]["rng"][0]["generators"][0], saved_on_cpu)


def test_random_states_saved_with_more_gpus_than_here_restore_the_gpus_here(monkeypatch):
    from iql_torchrl.runs.checkpoint import capture_rng, restore_rng

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append(device))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8)] * 2)
    state = capture_rng([torch.Generator()])  # as a machine with two GPUs saves it
    assert restore_rng(state, [torch.Generator()]) == []
    assert restored == [0]


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_final_parameters(tiny_datasets, tmp_path):
    flags = ["--dataset", tiny_datasets.pendulum, "--steps", "600", "--batch-size", "32", "--eval-every", "600",
             "--eval-episodes", "1", "--checkpoint-every", "50", "--log-every", "50", "--hidden-sizes", "16", "16",
             "--device", "cpu", "--no-progress", "--logger", "none"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = _example(*flags, "--output-dir", str(straight))
    victim = _example(*flags, "--output-dir", str(killed))
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for a mid-run checkpoint, then kill -9
        path = killed / CHECKPOINT_NAME
        if path.exists() and load_checkpoint(path)["step"] >= 100:
            break
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    interrupted_at = load_checkpoint(killed / CHECKPOINT_NAME)["step"]
    assert 100 <= interrupted_at < 600
    resumed = _example("--resume", "--output-dir", str(killed), "--no-progress")
    for proc in (reference, resumed):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    a = load_checkpoint(straight / CHECKPOINT_NAME)
    b = load_checkpoint(killed / CHECKPOINT_NAME)
    assert a["step"] == b["step"] == 600
    for key in a["loss"]:
        assert torch.equal(a["loss"][key], b["loss"][key]), key


def test_values_beyond_the_largest_return_the_data_allows_are_reported_once(tiny_datasets, tmp_path, monkeypatch):
    # the trainer's copy of the data gets rewards 1000 times the loaded ones: the critics learn returns no
    # policy on the loaded data earns, and the run says so (max |r| / (1 - γ) from the loaded data)
    import warnings

    import iql_offline as trainer
    from iql_torchrl.data import buffer_transitions, load_minari_dataset

    loaded = buffer_transitions(load_minari_dataset(tiny_datasets.pendulum, reward_transform="locomotion"))
    gamma = 0.5
    bound = float(loaded["next", "reward"].abs().max()) / (1 - gamma)
    real_transitions = trainer.buffer_transitions

    def inflated(buffer):
        data = real_transitions(buffer)
        data["next", "reward"] *= 1000
        return data

    settings = dict(TINY, steps=60, log_every=10, eval_every=60, gamma=gamma, tau=1.0, lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=tmp_path / "plain", **settings))
    assert plain["value_bound"] == pytest.approx(bound, rel=1e-6)
    assert plain["values_beyond_bound_at"] is None
    assert not [w for w in caught if "diverging" in str(w.message)]

    monkeypatch.setattr(trainer, "buffer_transitions", inflated)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train(OfflineConfig(dataset=tiny_datasets.pendulum, output_dir=tmp_path / "inflated", **settings))
    said = [str(w.message) for w in caught if "diverging" in str(w.message)]
    assert len(said) == 1 and f"beyond {bound:.4g}" in said[0]  # once, with the data's bound
    assert summary["values_beyond_bound_at"] in range(10, 61, 10)
    csv = next((tmp_path / "inflated").glob("logs/*/scalars/value_mean.csv"))
    logged = {int(step): float(v) for step, v in (line.split(",") for line in csv.read_text().split())}
    first = min(step for step, v in logged.items() if abs(v) > bound)
    assert summary["values_beyond_bound_at"] == first  # the first logged step beyond the bound, not a later one
