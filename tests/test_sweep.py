"""--sweep: a grid of settings × seeds trained in one run, each member as its own run would, reported per
setting and per member, resumable, and refused before any work when it cannot run."""
import json
import statistics

import pytest
import torch

from iql_offline import train
from iql_torchrl.jobs.cli import run_job
from iql_torchrl.jobs.finetune import FinetuneConfig, finetune
from iql_torchrl.runs.builders import load_actor
from iql_torchrl.runs.checkpoint import CHECKPOINT_NAME, load_checkpoint
from iql_torchrl.runs.config import ConfigError, OfflineConfig
from iql_torchrl.runs.report import console_summary
from iql_torchrl.runs.resume import ResumeError

TINY = dict(steps=12, batch_size=16, eval_every=6, eval_episodes=1, log_every=6, checkpoint_every=6,
            hidden_sizes=(16, 16), device="cpu", progress=False, logger="none")
GRID = ("temperature=0,6", "expectile=0.6,0.8")
# setting-major: member m has setting m // 2 and seed m % 2
SETTINGS = [(0.0, 0.6), (0.0, 0.8), (6.0, 0.6), (6.0, 0.8)]


@pytest.fixture(scope="module")
def sweep_run(tiny_datasets_root, tmp_path_factory):
    """A sweep of 4 settings × 2 seeds, trained whole."""
    out = tmp_path_factory.mktemp("sweep") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(tiny_datasets_root))
        summary = train(OfflineConfig(sweep=GRID, num_seeds=2, output_dir=out, **TINY))
    return summary, out


def actor_parameters(run_dir, index=0):
    actor, _ = load_actor(run_dir, seed_index=index)
    return [p.detach() for p in actor.parameters()]


def test_each_member_trains_as_a_run_of_its_setting_and_seed_would(sweep_run, tiny_datasets, tmp_path):
    _, out = sweep_run
    for temperature, expectile, member in ((6.0, 0.6, 5), (0.0, 0.6, 1)):  # seed 1 at two settings
        alone = tmp_path / f"beta{temperature:g}"
        train(OfflineConfig(temperature=temperature, expectile=expectile, seed=1, output_dir=alone, **TINY))
        for a, b in zip(actor_parameters(alone), actor_parameters(out, member)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (temperature, expectile)
    # the plausible wrong variant: a member trained with the first setting's β and τ is not the β 6 member
    assert not all(torch.allclose(a, b, rtol=1e-5, atol=1e-6)
                   for a, b in zip(actor_parameters(tmp_path / "beta0"), actor_parameters(out, 5)))


@pytest.mark.slow
def test_a_compiled_sweep_under_dynamo_s_guards_compiles_its_step_once(tiny_datasets, tmp_path, guarded_compile):
    # the guarded step, as a CUDA graph captures it: a second compilation would fall inside the timed updates
    # (the step itself, members of two settings, compiles once and trains as eager: test_ensemble.py, fast tier)
    summary = train(OfflineConfig(sweep=("temperature=0,6",), output_dir=tmp_path / "run", compile=True,
                                  **{**TINY, "steps": 6, "eval_every": 6}))
    assert summary["mode"] == "compile" and summary["compilations"] == 1


def test_the_summary_reports_each_setting_over_its_seeds_and_each_member(sweep_run):
    summary, out = sweep_run
    assert summary == json.loads((out / "summary.json").read_text())
    sweep = summary["sweep"]
    assert sweep["grid"] == {"temperature": [0.0, 6.0], "expectile": [0.6, 0.8]}
    assert [(m["temperature"], m["expectile"], m["seed"]) for m in sweep["members"]] == [
        (*setting, seed) for setting in SETTINGS for seed in (0, 1)]
    # from the learning curve: each evaluation lists every member's score under its setting
    assert [p["step"] for p in summary["curve"]] == [6, 12]
    for row, setting in zip(sweep["settings"], SETTINGS):
        assert (row["temperature"], row["expectile"]) == setting
        assert row["label"] == f"β {setting[0]:g}, τ {setting[1]:g}" and row["seeds"] == [0, 1]
        curves = [[e["normalized_score"] for e in point["per_seed"]
                   if (e["temperature"], e["expectile"]) == setting] for point in summary["curve"]]
        finals, bests = curves[-1], [max(scores) for scores in zip(*curves)]
        assert len(finals) == 2
        assert row["final_mean"] == pytest.approx(statistics.fmean(finals))
        assert row["final_std"] == pytest.approx(statistics.pstdev(finals))
        assert row["best_mean"] == pytest.approx(statistics.fmean(bests))
        assert row["best_std"] == pytest.approx(statistics.pstdev(bests))
    # behaviour cloning's actor never reads V: its two expectiles' members act alike; β 6 acts otherwise
    assert sweep["settings"][0]["final_mean"] == sweep["settings"][1]["final_mean"]
    assert sweep["settings"][0]["final_mean"] != sweep["settings"][2]["final_mean"]
    lines = console_summary(summary, out).splitlines()
    assert lines[0] == "IQL on iql_torchrl/pendulum/mixed-v0, 4 settings × seeds 0–1, 12 updates"
    for row in sweep["settings"]:
        row_line = f"{row['label']} {row['final_mean']:.1f} ± {row['final_std']:.1f} {row['best_mean']:.1f} ± {row['best_std']:.1f}"
        assert any(line.split() == row_line.split() for line in lines), row_line
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resumed_sweep_keeps_its_grid_and_continues_exactly(sweep_run, tiny_datasets, tmp_path, stop_after_checkpoint):
    whole, whole_dir = sweep_run
    split = tmp_path / "split"
    stop_after_checkpoint(lambda run: run.step == 6)
    with pytest.raises(KeyboardInterrupt):
        train(OfflineConfig(sweep=GRID, num_seeds=2, output_dir=split, **TINY))
    stop_after_checkpoint(None)
    with pytest.raises(ResumeError, match=r"--sweep: checkpoint temperature=0,6 expectile=0.6,0.8, given temperature=0,3"):
        train(OfflineConfig(output_dir=split, resume=True, progress=False, sweep=("temperature=0,3",)))
    # the same grid, written otherwise, is the run's own
    resumed = train(OfflineConfig(output_dir=split, resume=True, progress=False,
                                  sweep=("temperature=0.0,6.0", "expectile=.6,.8")))
    assert resumed["sweep"] == whole["sweep"]
    a = load_checkpoint(whole_dir / CHECKPOINT_NAME)["loss"]
    b = load_checkpoint(split / CHECKPOINT_NAME)["loss"]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_a_sweep_of_one_setting_keeps_the_others_given_and_is_not_fine_tuned(tiny_datasets, tmp_path):
    summary = train(OfflineConfig(sweep=("temperature=0,3",), expectile=0.6, output_dir=tmp_path / "run",
                                  **{**TINY, "steps": 6}))
    assert [(m["temperature"], m["expectile"], m["seed"]) for m in summary["sweep"]["members"]] == [
        (0.0, 0.6, 0), (3.0, 0.6, 0)]
    assert summary["temperature"] is None and summary["expectile"] == 0.6
    with pytest.raises(ConfigError, match="trained a --sweep of settings at once; fine-tuning takes a run of one"):
        finetune(FinetuneConfig(checkpoint=tmp_path / "run", output_dir=tmp_path / "finetuned", device="cpu",
                                progress=False, logger="none"))
    assert not (tmp_path / "finetuned").exists()


@pytest.mark.parametrize("sweep, message", [
    ((), r"--sweep: needs one or more NAME=V1,V2,\.\.\. entries"),
    (("temperature=",), r"--sweep temperature=: needs one or more values"),
    (("temperature",), r"--sweep temperature: must be NAME=V1,V2,\.\.\."),
    (("tau=0.01,0.005",), r"--sweep tau=0.01,0.005: tau cannot be swept; the settings a sweep varies are temperature, expectile"),
    (("temperature=0,-1",), r"--sweep temperature=0,-1: -1 is out of range; temperature must be a finite number >= 0"),
    (("temperature=0,nan",), r"--sweep temperature=0,nan: nan is out of range"),
    (("expectile=0.5,1",), r"--sweep expectile=0.5,1: 1 is out of range; expectile must be in \(0, 1\)"),
    (("expectile=0.5,x",), r"--sweep expectile=0.5,x: x is not a number"),
    (("expectile=0.5,0.5",), r"--sweep expectile=0.5,0.5: a value repeats"),
    (("expectile=0.5", "expectile=0.7"), r"--sweep expectile=0.7: expectile is swept twice"),
])
def test_a_bad_sweep_is_refused_before_any_work(sweep, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(OfflineConfig(sweep=sweep, output_dir=tmp_path / "run", **TINY))
    assert not (tmp_path / "run").exists()


def test_a_sweep_that_overlaps_a_flag_or_runs_under_torchrun_is_refused(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match=r"--temperature 3.0 and --sweep temperature=\.\.\. both set temperature: drop"):
        train(OfflineConfig(sweep=("temperature=0,3",), temperature=3.0, output_dir=tmp_path / "run", **TINY))
    # on the command line: one error line, exit status 2, nothing written
    assert run_job(OfflineConfig, train, ["--sweep", "expectile=0.5,1.5", "--output-dir", str(tmp_path / "run")]) == 2
    assert "error: --sweep expectile=0.5,1.5: 1.5 is out of range" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--sweep cannot be combined with torchrun"):
        train(OfflineConfig(sweep=("temperature=0,3",), output_dir=tmp_path / "run", **TINY))
    assert not (tmp_path / "run").exists()



def test_evaluate_and_export_read_every_member_on_its_own_seeds(sweep_run, tiny_datasets, tmp_path):
    from iql_torchrl.jobs.evaluate import main as evaluate_main
    from iql_torchrl.jobs.export import policy_sidecar, environment_policy

    summary, out = sweep_run
    member = 5  # β 6, τ 0.6, seed 1: evaluated by the run on seed 1's episodes (10_001), not 10_005
    report = evaluate_main([str(out), "--seed-index", str(member)])
    assert report["seed"] == 10_001
    assert (report["seed_index"], report["training_seed"], report["temperature"], report["expectile"]) == (5, 1, 6.0, 0.6)
    assert report["return_mean"] == pytest.approx(summary["per_seed"][member]["return_mean"], rel=1e-6)
    policy, _ = environment_policy(out, member)  # members past --num-seeds are exported too
    sidecar = policy_sidecar(policy, summary, format="onnx", file="x", seed_index=member)
    assert (sidecar["seed"], sidecar["temperature"], sidecar["expectile"]) == (1, 6.0, 0.6)  # not the run's first setting
