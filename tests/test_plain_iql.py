"""benchmarks/plain_iql.py, the plain reference the locomotion study holds the package to, takes the update of
tests/reference.py's float64 IQL in CORL's order: V(s') and the advantage from V before its step (the reference's
``order="summed"``), the critics on the mean of their two squared errors, the actor's learning rate on the cosine,
the target critics soft-updated."""
import argparse
import importlib.util
from pathlib import Path

import torch

from reference import ReferenceIQL, max_abs_diff

OBS, ACT, B, STEPS, TOTAL = 3, 2, 64, 6, 20
# plain_iql run in float64 (its expectile weights |τ − 1(u < 0)| stay float32: 0.7 is 0.69999999, V 2e-8 off)
TOL = 1e-7


class CorlReference(ReferenceIQL):
    """The reference with CORL's critic loss: the mean of the two critics' squared errors, not their sum. Adam
    does not see a constant factor, except through its ε where a gradient is near 0: the sum ends 7e-4 away."""

    def critic_loss(self, critics, value_params, batch):
        return super().critic_loss(critics, value_params, batch) / 2


def load_benchmark(name: str = "plain_iql"):
    """``benchmarks/<name>.py`` as a module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def linear_params(net: torch.nn.Sequential, stacked=None) -> dict:
    """``{("<layer>", "weight"|"bias"): float64 tensor}`` of an MLP; ``stacked``: the same layers of twin MLPs, stacked."""
    nets = [net] if stacked is None else stacked
    params = {}
    for index, layer in enumerate(nets[0]):
        if isinstance(layer, torch.nn.Linear):
            for name in ("weight", "bias"):
                tensors = [getattr(n[index], name).detach().double() for n in nets]
                params[(str(index), name)] = tensors[0].clone() if stacked is None else torch.stack(tensors)
    return params


def as_reference(plain) -> dict:
    return {
        "actor": {**linear_params(plain.actor.mean), ("log_std",): plain.actor.log_std.detach().double().clone()},
        "critics": linear_params(None, stacked=list(plain.q)),
        "targets": linear_params(None, stacked=list(plain.q_target)),
        "value": linear_params(plain.v),
    }


def batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        yield {"observation": torch.randn(B, OBS, generator=g, dtype=torch.float64),
               "action": torch.rand(B, ACT, generator=g, dtype=torch.float64) * 1.8 - 0.9,
               "reward": torch.randn(B, generator=g, dtype=torch.float64),
               "next_observation": torch.randn(B, OBS, generator=g, dtype=torch.float64),
               "terminated": (torch.rand(B, generator=g) < 0.2).double()}


def run(order: str, reference_class=CorlReference):
    plain_iql = load_benchmark()
    torch.manual_seed(0)
    args = argparse.Namespace(steps=TOTAL, beta=3.0, iql_tau=0.7, discount=0.99)
    plain = plain_iql.PlainIQL(OBS, ACT, args)
    for module in (plain.actor, plain.v, plain.q, plain.q_target):
        module.double()
    start = as_reference(plain)
    reference = reference_class(start["actor"], start["critics"], start["targets"], start["value"], lr=3e-4, tau=0.005,
                             total_steps=TOTAL, gamma=0.99, expectile=0.7, temperature=3.0, order=order)
    for batch in batches():
        plain.update(batch["observation"], batch["action"], batch["reward"], batch["next_observation"],
                     batch["terminated"])
        reference.step(batch)
    end = as_reference(plain)
    return {name: max_abs_diff(getattr(reference, attr), end[name])
            for name, attr in (("actor", "actor"), ("critics", "critics"), ("targets", "targets"), ("value", "value"))}


def test_plain_iql_takes_the_reference_update_in_corl_s_order():
    gaps = run("summed")
    assert max(gaps.values()) < TOL, gaps
    # the wrong variant: the paper's order (the critics' target and the advantage from the stepped V) ends elsewhere
    paper = run("paper")
    assert paper["actor"] > 100 * TOL and paper["critics"] > 100 * TOL, paper
    # and the critics' summed errors (the reference's own loss) end elsewhere too
    summed_errors = run("summed", ReferenceIQL)
    assert summed_errors["critics"] > 100 * TOL, summed_errors


def test_the_study_reads_plain_seeds_of_one_setting_as_one_row_over_the_evaluations_all_reached(tmp_path):
    import json
    import statistics

    def write(name, seed, scores, beta="3.0"):
        folder = tmp_path / name
        folder.mkdir()
        settings = {"dataset": "d", "steps": "300", "beta": beta, "iql_tau": "0.7", "normalize": "True",
                    "normalize_reward": "True", "seed": str(seed), "out": str(folder)}
        curve = [{"step": 100 * (i + 1), "score": s, "return": 0.0} for i, s in enumerate(scores)]
        (folder / "curve.json").write_text(json.dumps({"settings": settings, "curve": curve}))
        (folder / "checkpoint.pt").write_bytes(b"")
        return folder

    study = load_benchmark("locomotion_study")
    seeds = [write("a", 0, [10.0, 40.0, 30.0]), write("b", 1, [20.0, 25.0]), write("c", 2, [5.0, 50.0, 1.0], beta="6.0")]
    groups = study._plain_groups(seeds)
    assert [[p.name for p in g] for g in groups] == [["a", "b"], ["c"]]  # β 6 is another setting
    row = study.plain_rows(groups[0])["rows"][0]
    # seed 1 has reached 200 updates: both seeds' last evaluation there is 40 and 25, their best 40 and 25
    assert row["seeds"] == [0, 1] and row["steps"] == [100, 200]
    assert row["final_mean"] == 32.5 and row["final_std"] == statistics.pstdev([40.0, 25.0]) == 7.5
    assert row["best_mean"] == 32.5 and row["curve_mean"] == [15.0, 32.5]
    assert row["final_mean"] != statistics.fmean([30.0, 25.0])  # not each seed's own latest evaluation


def test_the_study_reads_a_finished_run_kept_without_its_checkpoint_from_its_summary(tmp_path):
    import json

    study = load_benchmark("locomotion_study")
    folder = tmp_path / "run"
    folder.mkdir()
    curve = [{"step": 100 * (i + 1), "normalized_score": 0.0,
              "per_seed": [{"seed": 6, "normalized_score": a, "return_mean": 0.0},
                           {"seed": 7, "normalized_score": b, "return_mean": 0.0}]}
             for i, (a, b) in enumerate([(10.0, 30.0), (50.0, 20.0), (40.0, 10.0)])]
    summary = {"dataset": "d", "steps": 300, "seed": 6, "num_seeds": 2, "sweep": None, "temperature": 3.0,
               "expectile": 0.7, "preset": "mujoco", "curve": curve}
    (folder / "summary.json").write_text(json.dumps(summary))
    run = study.run_rows(folder)
    (row,) = run["rows"]
    # by hand: seed 6 ends at 40 (best 50), seed 7 at 10 (best 30)
    assert run["updates_done"] == 300 and row["seeds"] == [6, 7]
    assert (row["final_mean"], row["final_std"], row["best_mean"], row["best_std"]) == (25.0, 15.0, 40.0, 10.0)
    assert row["curve_mean"] == [20.0, 35.0, 25.0]

    # a sweep's summary holds its results under "sweep"; its grid is the setting each member trained
    sweep = {"grid": {"temperature": [0.0, 3.0]}, "settings": [], "members": []}
    (folder / "summary.json").write_text(json.dumps({**summary, "num_seeds": 1, "sweep": sweep}))
    cloning, iql = study.run_rows(folder)["rows"]
    assert (cloning["temperature"], cloning["final_mean"]) == (0.0, 40.0)
    assert (iql["temperature"], iql["final_mean"], iql["best_mean"]) == (3.0, 10.0, 30.0)


def test_the_study_leaves_out_a_run_not_evaluated_yet_and_says_so(tmp_path, monkeypatch, capsys):
    import json
    import sys

    study = load_benchmark("locomotion_study")
    summaries = {"new": [], "old": [{"step": 100, "normalized_score": 0.0,
                                     "per_seed": [{"seed": 0, "normalized_score": 12.0, "return_mean": 0.0}]}]}
    for name, curve in summaries.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(
            {"dataset": "d", "steps": 300, "seed": 0, "num_seeds": 1, "sweep": None, "temperature": 3.0,
             "expectile": 0.7, "output_dir": name, "curve": curve}))
    assert study.run_rows(tmp_path / "new")["rows"] == []
    monkeypatch.setattr(sys, "argv", ["locomotion_study.py", str(tmp_path / "new"), str(tmp_path / "old")])
    assert study.main() in (0, None)
    out, err = capsys.readouterr()
    assert "new has no evaluation yet" in err and "| old: " in out and "| new: " not in out


def test_the_study_joins_runs_of_one_setting_that_differ_in_their_seeds_into_one_row(tmp_path):
    import json
    import statistics

    study = load_benchmark("locomotion_study")

    def write(name, seed, per_seed_scores, temperature=3.0):
        folder = tmp_path / name
        folder.mkdir()
        curve = [{"step": 100 * (i + 1), "normalized_score": 0.0,
                  "per_seed": [{"seed": seed + k, "normalized_score": scores[i], "return_mean": 0.0}
                               for k, scores in enumerate(per_seed_scores)]}
                 for i in range(min(map(len, per_seed_scores)))]
        (folder / "summary.json").write_text(json.dumps(
            {"dataset": "d", "steps": 300, "seed": seed, "num_seeds": len(per_seed_scores), "sweep": None,
             "temperature": temperature, "expectile": 0.7, "threads": seed + 1, "output_dir": str(folder),
             "curve": curve}))
        return study.run_rows(folder)

    a = write("a", 0, [[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]])
    b = write("b", 2, [[5.0, 25.0]])  # seed 2, on another thread count, two evaluations so far
    c = write("c", 0, [[1.0, 2.0, 3.0]], temperature=6.0)
    joined, other = study.merged_runs([a, b, c])
    (row,) = joined["rows"]
    assert joined["run"] == "a (+1)" and row["seeds"] == [0, 1, 2] and row["steps"] == [100, 200]
    # over the evaluations all reached (two): finals 20, 50, 25; bests the same
    assert row["final_mean"] == statistics.fmean([20.0, 50.0, 25.0]) and row["best_mean"] == row["final_mean"]
    assert row["final_std"] == statistics.pstdev([20.0, 50.0, 25.0])
    assert row["curve_mean"] == [statistics.fmean([10.0, 40.0, 5.0]), statistics.fmean([20.0, 50.0, 25.0])]
    assert other is c  # β 6 is another setting


def test_the_study_s_best_minus_last_is_the_seeds_mean_of_each_seed_s_best_over_a_moving_mean():
    import numpy as np

    study = load_benchmark("locomotion_study")
    scores = [[10.0, 40.0, 30.0], [50.0, 20.0, 25.0]]
    # by hand: bests 40 and 50, lasts 30 and 25: 45 − 27.5
    assert study.best_minus_last(scores) == 17.5
    # not the best of the seeds' mean curve (30, 30, 27.5) minus its last
    assert 17.5 != max(np.mean(scores, axis=0)) - np.mean(scores, axis=0)[-1] == 2.5
    # two-evaluation means: seed 0 [25, 35], seed 1 [35, 22.5]: (35 + 35) / 2 − (35 + 22.5) / 2
    assert study.best_minus_last(scores, 2) == 6.25
    # more axes in front give one result each
    assert study.best_minus_last(np.stack([scores, scores]), 2).tolist() == [6.25, 6.25]


def test_a_frozen_policy_s_best_minus_last_gap_comes_from_drawing_its_episodes_again():
    import numpy as np

    noise = load_benchmark("evaluation_noise")
    # a policy whose every episode scores the same: every evaluation reads it, no gap
    assert not noise.frozen_gaps([np.full(50, 30.0), np.full(50, 70.0)], evaluations=40, episodes=10).any()
    # episodes of 0 or 100, one an evaluation: with two evaluations the gap is 100 when the first reads 100 and the
    # last 0 (probability 1/4): 25 on average; with three, the last reads 0 (1/2) and one of the two before 100 (3/4)
    two_points = [np.array([0.0, 100.0])]
    two = noise.frozen_gaps(two_points, evaluations=2, episodes=1, draws=40_000)
    three = noise.frozen_gaps(two_points, evaluations=3, episodes=1, draws=40_000)
    assert abs(two.mean() - 25) < 1.5 and abs(three.mean() - 37.5) < 1.5
    # ten episodes an evaluation: each reads 100 × a binomial(10, 1/2) / 10, std 100 × sqrt(1/40) = 15.8; the
    # best of three normals lies 3 / (2 sqrt(pi)) = 0.846 std above their mean: about 13.4, not 37.5 or 0
    ten = noise.frozen_gaps(two_points, evaluations=3, episodes=10, draws=40_000)
    assert abs(ten.mean() - 0.846 * 15.8) < 1.0


def test_evaluate_takes_each_kept_checkpoint_s_policy_again_on_the_seeds_asked_for(minari_root, tmp_path, monkeypatch):
    # the run's own evaluations seed their episodes from 10000: --evaluate with that seed must read each of its
    # checkpoints as the run did at that update, and its default seeds episodes the run never saw
    import json
    import shutil
    import sys

    from iql_torchrl.datasets import build_dataset

    build_dataset("iql_torchrl/reacher/mixed-v0", episodes=4, progress=False)
    plain_iql, out = load_benchmark(), tmp_path / "run"
    common = ["plain_iql.py", "--dataset", "iql_torchrl/reacher/mixed-v0", "--out", str(out)]

    def main(*args):
        monkeypatch.setattr(sys, "argv", [*common, *args])
        plain_iql.main()

    main("--steps", "2", "--eval-every", "2", "--eval-episodes", "3")
    shutil.copy(out / "checkpoint.pt", tmp_path / "at-2.pt")
    main("--steps", "6", "--eval-every", "2", "--eval-episodes", "3")  # goes on from update 2
    curve = {point["step"]: point["score"] for point in json.loads((out / "curve.json").read_text())["curve"]}
    assert sorted(curve) == [2, 4, 6] and "evaluate" not in json.loads((out / "curve.json").read_text())["settings"]

    main("--evaluate", "3", "--evaluate-seed", "10000", "--checkpoints", str(tmp_path / "at-2.pt"), str(out / "checkpoint.pt"))
    evaluations = json.loads((out / "evaluations.json").read_text())["evaluations"]
    assert [(e["step"], e["score"]) for e in evaluations] == [(2, curve[2]), (6, curve[6])]
    assert curve[2] != curve[6]  # the wrong variant: one checkpoint's policy read twice
    main("--evaluate", "3")  # --out's checkpoint, on seeds from 50000
    (fresh,) = json.loads((out / "evaluations.json").read_text())["evaluations"]
    assert fresh["step"] == 6 and len(fresh["episode_scores"]) == 3 and fresh["score"] != curve[6]
