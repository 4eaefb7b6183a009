"""Evaluating a saved run (``python -m iql_torchrl.jobs.evaluate``) and loading its policy (``load_actor``):
the run's own evaluation episodes by default, the device checked like the main job's, quiet loading."""
import json
import re
import warnings
from types import SimpleNamespace

import pytest
import torch

from iql_offline import train
from iql_torchrl.jobs.evaluate import main
from iql_torchrl.runs.builders import load_actor
from iql_torchrl.runs.checkpoint import CHECKPOINT_NAME, load_checkpoint
from iql_torchrl.runs.config import ConfigError, OfflineConfig

from conftest import TINY_PENDULUM

TINY = dict(steps=30, batch_size=32, eval_every=30, eval_episodes=3, log_every=10, checkpoint_every=10,
            hidden_sizes=(16, 16), device="cpu", progress=False, logger="none")


@pytest.fixture(scope="module")
def runs(tiny_datasets_root, tmp_path_factory):
    """A finished one-seed run and a finished run of two seeds (seeds 5 and 6)."""
    folder = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(tiny_datasets_root))
        train(OfflineConfig(dataset=TINY_PENDULUM, output_dir=folder / "one", **TINY))
        train(OfflineConfig(dataset=TINY_PENDULUM, output_dir=folder / "two", seed=5, num_seeds=2, **TINY))
    return SimpleNamespace(one=folder / "one", two=folder / "two")


def summary_of(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_by_default_evaluate_gives_the_runs_final_score(runs, tiny_datasets, capsys):
    summary = summary_of(runs.one)
    report = main([str(runs.one)])
    assert report["episodes"] == 3 and report["seed"] == 10_000  # the run's --eval-episodes, its seeds from seed + 10000
    assert report["normalized_score"] == summary["normalized_score"] and report["return_mean"] == summary["return_mean"]
    assert json.loads(capsys.readouterr().out) == report
    # the report names the member: the pendulum builder's preset (mujoco: β 3, τ 0.7), not the config's unset β/τ
    assert (report["seed_index"], report["training_seed"], report["temperature"], report["expectile"]) == (0, 0, 3.0, 0.7)
    # seed K of a --num-seeds run evaluates on seed K's own episodes
    second = main([str(runs.two), "--seed-index", "1"])
    assert second["seed"] == 6 + 10_000
    assert second["normalized_score"] == summary_of(runs.two)["per_seed"][1]["normalized_score"]
    assert (second["seed_index"], second["training_seed"]) == (1, 6)
    # an explicit --seed and --episodes choose other episodes
    chosen = main([str(runs.one), "--seed", "0", "--episodes", "2"])
    assert chosen["seed"] == 0 and chosen["episodes"] == 2 and len(chosen["returns"]) == 2
    assert chosen["returns"] != report["returns"][:2]


def test_device_cuda_without_a_gpu_is_refused_with_the_main_jobs_message_before_anything_loads(
        runs, tiny_datasets, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as main_job:
        train(OfflineConfig(dataset=TINY_PENDULUM, output_dir=tmp_path / "run", **{**TINY, "device": "cuda"}))
    message = str(main_job.value)
    assert message.startswith("--device cuda: no CUDA device is available here; use --device cpu")

    loads = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args))
    with pytest.raises(SystemExit) as exit:
        main([str(runs.one), "--device", "cuda"])
    assert exit.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_actor(runs.one, device="cuda")
    assert loads == []  # no checkpoint was read, so none was called unreadable


def test_a_run_saved_on_a_gpu_evaluates_on_a_machine_without_one(runs, tiny_datasets, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu_run = tmp_path / "gpu-run"
    gpu_run.mkdir()
    with monkeypatch.context() as patch:  # every tensor of the checkpoint recorded as on cuda:0
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(load_checkpoint(runs.one / CHECKPOINT_NAME), gpu_run / CHECKPOINT_NAME)
    with pytest.raises(RuntimeError, match="deserialize object on a CUDA device"):  # read where it was saved, it fails
        torch.load(gpu_run / CHECKPOINT_NAME, weights_only=True)
    with pytest.raises(RuntimeError, match="saved on a CUDA device and this machine has none: read it with map_location"):
        load_checkpoint(gpu_run / CHECKPOINT_NAME)  # a sound file: never called unreadable, never "delete it"
    on_cpu = main([str(runs.one)])
    for device in ("cpu", "auto"):  # auto: the CPU here
        report = main([str(gpu_run), "--device", device])
        assert report["returns"] == on_cpu["returns"]


def test_loading_a_policy_warns_nothing(runs, tiny_datasets, tmp_path):
    # not even TorchRL's "No target network updater has been associated" (nothing updates a loaded policy's targets)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_actor(runs.one)
        load_actor(runs.two, seed_index=1)
    assert [str(w.message) for w in caught] == []

