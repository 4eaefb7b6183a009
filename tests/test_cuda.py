"""The GPU tier: eager, compiled and CUDA-graph steps on CUDA at the job's shapes, a compiled step cached by one process
and loaded in another, the main job learning there, and a CPU run resumed there.

Run on a machine with a GPU: ``python -m pytest -q -m cuda tests`` (skipped without CUDA).

Calibration, on one H100 (torch 2.11.0+cu130), the default job's networks (2×256, batch 256, data on the
device); compiled and CUDA graph read the same:

| largest parameter difference | actor | critics | value |
|---|---|---|---|
| eager vs compiled, after 1 update | 3.0e-7 | 1.3e-5 | 6e-8 |
| eager vs compiled, after 300 | 1.7e-2 | 1.9e-2 | 5.6e-3 |
| eager on the CPU vs eager on CUDA, after 1 | 1.2e-7 | 4.5e-8 | 3.5e-8 |
| eager on the CPU vs eager on CUDA, after 300 | 7.6e-3 | 1.3e-2 | 3.4e-3 |

After 300 updates any two summation orders have drifted this far apart. After one update, Adam moves a weight by
lr·g/(|g| + 1e-8): ±lr wherever |g| ≫ 1e-8, whatever the order, but a gradient near 0 (|g| ≲ 1e-8) moves it by a
fraction of lr that its last bits decide, the likely source of the critics' 1.3e-5. A step behind differs by about
the learning rate (3e-4); a miscompiled foreach Adam left the actor's log-std 3.96e-4 off after one update.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from synthetic import random_transitions

from iql_torchrl import IQLLoss, make_iql_networks
from iql_torchrl.step.update import IQLUpdate

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

N, B, OBS, ACT = 20_000, 256, 3, 1  # the default dataset's shapes (Pendulum: 3 observations, 1 action)
ONE_UPDATE = 1e-4  # 7.5× the largest calibrated difference after one update (1.3e-5); a step behind: >= 3e-4
AFTER_300 = {"actor": 5e-2, "qvalue": 6e-2, "value": 2e-2}  # about three times the calibrated drift


def make(mode, seed=1, actor_kind="gaussian"):
    torch.manual_seed(seed)
    loss = IQLLoss(*make_iql_networks(OBS, ACT, hidden_sizes=(256, 256), actor_kind=actor_kind)).to("cuda")
    data = random_transitions(N, OBS, ACT).to("cuda")
    return loss, IQLUpdate(loss, data=data, total_steps=1_000, mode=mode)


def stream(steps):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, N, (B,), generator=g).to("cuda") for _ in range(steps)]


@torch.no_grad()
def largest_gaps(a, b):
    gaps = {}
    for name in ("actor", "qvalue", "value"):
        pa, pb = getattr(a, f"{name}_network_params"), getattr(b, f"{name}_network_params")
        gaps[name] = max(float((x - y).abs().max()) for x, y in zip(pa.values(True, True), pb.values(True, True)))
    return gaps


def assert_follows(twins, indices):
    """Eager and compiled twins, stepped on ``indices``, within one update's bound after the first and within the
    calibrated drift after the rest; the wrong variant: eager a step ahead differs by more than one update's bound."""
    (loss_e, eager), (loss_c, compiled) = twins
    eager(indices[0])
    compiled(indices[0])
    one = largest_gaps(loss_e, loss_c)
    assert max(one.values()) <= ONE_UPDATE, one
    for idx in indices[1:]:
        eager(idx)
        compiled(idx)
    after = largest_gaps(loss_e, loss_c)
    assert all(after[name] <= AFTER_300[name] for name in after), after
    eager(indices[0])
    assert max(largest_gaps(loss_e, loss_c).values()) > ONE_UPDATE


@pytest.mark.parametrize("mode", ["compile", "cudagraphs"])
def test_eager_and_compiled_steps_agree_on_cuda_at_the_job_s_shapes_over_300_updates(mode):
    twins = make("eager"), make(mode)
    assert_follows(twins, stream(300))
    assert twins[1][1].mode == mode  # its checks passed: it never fell back to eager


def test_a_cuda_graph_step_of_a_deterministic_actor_follows_the_eager_step():
    # the hopper and walker2d presets' actor (--actor deterministic): its loss is a weighted squared error
    twins = make("eager", actor_kind="deterministic"), make("cudagraphs", actor_kind="deterministic")
    assert_follows(twins, stream(20))
    assert twins[1][1].mode == "cudagraphs" and twins[1][1].compilations == 1


def test_a_compiled_run_trained_on_the_cpu_resumes_on_cuda_as_a_cuda_graph_and_ends_there(
        tiny_datasets, tmp_path, stop_after_checkpoint, capsys):
    # observations normalized: the run's normalization moves to the GPU with it
    from iql_offline import train

    from iql_torchrl.runs.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from iql_torchrl.runs.config import OfflineConfig

    settings = dict(dataset=tiny_datasets.pendulum, steps=20, batch_size=32, eval_every=10, eval_episodes=2,
                    checkpoint_every=10, hidden_sizes=(16, 16), progress=False, logger="none",
                    normalize_observations="yes")
    stop_after_checkpoint(lambda run: run.step == 10)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(OfflineConfig(output_dir=out, device="cpu", **settings))
    halfway = load_checkpoint(out / CHECKPOINT_NAME)
    halfway["config"]["compile"] = True  # as a compiled run saves it on the CPU (this one was eager: 20 updates)
    torch.save(halfway, out / CHECKPOINT_NAME)
    stop_after_checkpoint(None)
    capsys.readouterr()
    summary = train(OfflineConfig(output_dir=out, resume=True, device="cuda", progress=False))
    said = capsys.readouterr().err
    assert "drawn anew" in said  # a CPU generator's state cannot continue on CUDA
    assert "the run's step ran on cpu; on cuda it goes on replayed as a CUDA graph" in said
    end = load_checkpoint(out / CHECKPOINT_NAME)
    assert end["step"] == 20 and [point["step"] for point in summary["curve"]] == [10, 20]
    assert summary["mode"] == "cudagraphs"  # its checks passed: it never fell back to eager
    assert all(torch.isfinite(value).all() for value in end["loss"].values())
    assert any(not torch.equal(end["loss"][key].cpu(), value) for key, value in halfway["loss"].items())  # it trained


def test_a_cuda_graph_step_of_vmapped_seeds_compiles_once_and_follows_the_eager_step():
    # what a sweep or --num-seeds runs on a GPU: a second compilation (~8 s on an H100) would fall inside the
    # run's timed updates
    from iql_torchrl.objectives.ensemble import SeedEnsemble

    def ensemble():
        losses = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            losses.append(IQLLoss(*make_iql_networks(OBS, ACT, hidden_sizes=(256, 256))))
        return SeedEnsemble(losses).to("cuda")

    data = random_transitions(N, OBS, ACT).to("cuda")
    loss_e, loss_g = ensemble(), ensemble()
    eager = IQLUpdate(loss_e, data=data, total_steps=1_000)
    graphed = IQLUpdate(loss_g, data=data, total_steps=1_000, mode="cudagraphs")
    g = torch.Generator().manual_seed(0)
    for _ in range(8):  # three warm-up calls, the capture, replays
        indices = torch.randint(0, N, (2, B), generator=g).to("cuda")
        graphed(indices)
        eager(indices)
    assert graphed.compilations == 1 and graphed.mode == "cudagraphs"
    gaps = largest_gaps(loss_e, loss_g)
    assert all(gaps[name] <= AFTER_300[name] for name in gaps), gaps


def test_a_planted_wrong_step_is_caught_on_cuda_in_a_cuda_graph_s_replays_too():
    from test_eager_check import DoubledActorStep  # the actor's Adam step taken twice, compiled only

    from iql_torchrl import StepMismatch

    torch.manual_seed(1)
    loss = IQLLoss(*make_iql_networks(OBS, ACT, hidden_sizes=(256, 256))).to("cuda")
    update = DoubledActorStep(loss, data=random_transitions(N, OBS, ACT).to("cuda"), mode="cudagraphs")
    with pytest.raises(StepMismatch, match="actor parameters differ"):
        update(stream(1)[0])


def test_the_main_job_learns_the_default_dataset_on_cuda_with_its_default_step(tmp_path, monkeypatch):
    from iql_offline import train

    from iql_torchrl.runs.config import OfflineConfig

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))
    summary = train(OfflineConfig(device="cuda", output_dir=tmp_path / "run", progress=False, logger="none"))
    assert summary["mode"] == "cudagraphs"  # the default on CUDA, its checks passed
    assert summary["normalized_score"] >= 95, summary["normalized_score"]  # CPU: 101.4 on seed 0


@pytest.mark.parametrize("flags", [{"cudagraphs": False}, {"compile": False}])
def test_the_main_job_learns_on_cuda_compiled_only_and_eager(flags, tmp_path, monkeypatch):
    from iql_offline import train

    from iql_torchrl.runs.config import OfflineConfig

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))
    steps = {"steps": 4_000} if flags.get("compile") is False else {}  # eager: 77 updates/s on an H100
    summary = train(OfflineConfig(device="cuda", output_dir=tmp_path / "run", progress=False, logger="none",
                                  **flags, **steps))
    assert summary["normalized_score"] >= 95, summary["normalized_score"]
