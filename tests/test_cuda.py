"""The GPU tier: eager, compiled and CUDA-graph steps on CUDA at the job's shapes, and the main job learning there.

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
import pytest
import torch

from synthetic import random_transitions

from iql_torchrl import IQLLoss, make_iql_networks
from iql_torchrl.step.update import IQLUpdate

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

N, B, OBS, ACT = 20_000, 256, 3, 1  # the default dataset's shapes (Pendulum: 3 observations, 1 action)
ONE_UPDATE = 1e-4  # 7.5× the largest calibrated difference after one update (1.3e-5); a step behind: >= 3e-4
AFTER_300 = {"actor": 5e-2, "qvalue": 6e-2, "value": 2e-2}  # about three times the calibrated drift


def make(mode, seed=1):
    torch.manual_seed(seed)
    loss = IQLLoss(*make_iql_networks(OBS, ACT, hidden_sizes=(256, 256))).to("cuda")
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


@pytest.mark.parametrize("mode", ["compile", "cudagraphs"])
def test_eager_and_compiled_steps_agree_on_cuda_at_the_job_s_shapes_over_300_updates(mode):
    (loss_e, eager), (loss_c, compiled) = make("eager"), make(mode)
    indices = stream(300)
    eager(indices[0])
    compiled(indices[0])
    one = largest_gaps(loss_e, loss_c)
    assert max(one.values()) <= ONE_UPDATE, one
    for idx in indices[1:]:
        eager(idx)
        compiled(idx)
    after = largest_gaps(loss_e, loss_c)
    assert all(after[name] <= AFTER_300[name] for name in after), after
    assert compiled.mode == mode  # its checks passed: it never fell back to eager
    # the wrong variant: a step behind differs by more than the bound
    eager(indices[0])
    assert max(largest_gaps(loss_e, loss_c).values()) > ONE_UPDATE


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
