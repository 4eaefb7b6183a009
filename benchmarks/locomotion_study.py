"""Where the locomotion study's runs stand: each run's evaluations so far, read from its checkpoint.

    python benchmarks/locomotion_study.py benchmarks/locomotion/hopper-medium-expert-paper \\
        benchmarks/locomotion/hopper-medium-expert-corl --title hopper-medium-expert \\
        --png benchmarks/figures/locomotion_hopper-medium-expert.png \\
        --json benchmarks/results/locomotion_hopper-medium-expert.json

A run of the study is the main job with ``--sweep`` and ``--num-seeds 3`` (docs/locomotion.md has the commands);
it writes its checkpoint every 5,000 updates and evaluates every 25,000, so this reads a run while it trains, or
after it stopped. For each run and each of its settings, the mean ± std over seeds of the last and of each seed's
best evaluation, their gap and the range of the seeds' mean over every evaluation; where a run holds behaviour
cloning (β 0), how far each other setting ends above it; every run's settings on one plot (``--png``) and the
numbers in ``--json``. The checkpoint is read as weights only (nothing in it runs as code); a finished run kept
without it is read from its ``summary.json``. A folder of
``plain_iql.py`` (the one-file reference, one seed a folder) is read from its ``curve.json`` and shown beside the runs;
folders of one setting and several seeds make one row, over the evaluations every seed has reached, and so do runs of
the main job that differ only in their seeds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from iql_torchrl.runs.config import PRESETS, OfflineConfig, config_from_dict
from iql_torchrl.runs.sweep import SWEEPABLE, mean_std, sweep_results

PAPER_TAU = PRESETS["mujoco"].tau  # the paper's target rate, 0.005


def run_rows(run_dir: Path, state: dict | None = None) -> dict:
    """The run's settings: each one's seeds' curves and the sweep results' last and best evaluations (``state``: its
    checkpoint when the caller has already read it)."""
    state = state if state is not None else _saved_state(run_dir)
    config = config_from_dict(OfflineConfig, state["config"])
    curve = state["curve"]
    summary = run_dir / "summary.json"  # a finished run's: its whole curve, the final evaluation included
    if summary.exists() and len(finished := json.loads(summary.read_text())["curve"]) > len(curve):
        curve = finished
    if not curve:  # started, not evaluated yet: nothing to show
        return {"run": run_dir.name, "dataset": config.dataset, "updates_done": state["step"], "updates": config.steps,
                "rows": [], "setting": _setting_key(state["config"])}
    results = sweep_results(curve, config)  # per setting: final and best, mean ± std over its seeds
    reward = config.reward_transform if config.reward_transform != "auto" else f"auto ({config.preset} preset)"
    # settings outside the sweep's that a run may change from the paper's, as trained (the preset's where unset)
    trained = config.resolved()
    extra = "".join([", deterministic actor" if trained.actor == "deterministic" else "",
                     f", target rate {trained.tau:g}" if trained.tau != PAPER_TAU else ""])
    rows = []
    for setting in results["settings"]:
        own = [m["member"] for m in results["members"] if all(m[name] == setting[name] for name in SWEEPABLE)]
        rows.append({**setting, "run": run_dir.name, "label": f"{run_dir.name}: {setting['label']}{extra}", "members": own,
                     "reward_transform": reward, "normalize_observations": config.normalize_observations,
                     "steps": [point["step"] for point in curve],
                     "scores": [[point["per_seed"][m][results["score"]] for point in curve] for m in own]})
        rows[-1]["curve_mean"] = [sum(seed[i] for seed in rows[-1]["scores"]) / len(own) for i in range(len(curve))]
    return {"run": run_dir.name, "dataset": config.dataset, "updates_done": state["step"], "updates": config.steps,
            "rows": rows, "setting": _setting_key(state["config"])}


# what a run's seeds and mechanics are, not its setting: runs that differ only in these are seeds of one setting
NOT_SETTING = ("seed", "num_seeds", "output_dir", "threads", "resume", "checkpoint_every", "progress", "logger")


def _setting_key(config: dict) -> str:
    return json.dumps({k: v for k, v in config.items() if k in OfflineConfig.__dataclass_fields__
                       and k not in NOT_SETTING}, sort_keys=True, default=str)


def merged_runs(runs: list[dict]) -> list[dict]:
    """Runs of the main job of one setting but for their seeds, each setting's seeds joined into one row over the
    evaluations every run has reached; other runs as they are, in their order."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["setting"], []).append(run)
    merged = []
    for group in groups.values():
        if len(group) == 1:
            merged.append(group[0])
            continue
        length = min(len(run["rows"][0]["steps"]) for run in group)
        name = f"{group[0]['run']} (+{len(group) - 1})"
        rows = []
        for settings in zip(*(run["rows"] for run in group)):  # the same settings, in the same order, in each run
            scores = [seed[:length] for row in settings for seed in row["scores"]]
            first = {key: value for key, value in settings[0].items() if key != "members"}  # members are per run
            rows.append({**first, "run": name, "label": f"{name}: {settings[0]['label'].split(': ', 1)[1]}",
                         "seeds": [seed for row in settings for seed in row["seeds"]], "scores": scores,
                         "steps": settings[0]["steps"][:length], **seeds_summary(scores)})
        merged.append({**group[0], "run": name, "updates_done": min(run["updates_done"] for run in group),
                       "rows": rows})
    return merged


def seeds_summary(scores: list[list[float]]) -> dict:
    """One setting's seeds (each a curve of equal length): mean ± std of the last and of each seed's best
    evaluation, and the seeds' mean at every evaluation."""
    return {**mean_std("final", [seed[-1] for seed in scores]), **mean_std("best", [max(seed) for seed in scores]),
            "curve_mean": [statistics.fmean(column) for column in zip(*scores)]}


def best_minus_last(scores, window: int = 1):
    """The seeds' mean of their best minus their mean of their last ``window``-evaluation mean: ``scores`` holds
    each seed's curve on its last axis, seeds on the one before (more axes in front: one result each). With
    ``window`` 1 it is the table's best − last; a longer window reads the curve's level, not one evaluation."""
    import numpy as np

    scores = np.asarray(scores, dtype=float)
    kernel = np.ones(window) / window
    means = np.apply_along_axis(lambda curve: np.convolve(curve, kernel, mode="valid"), -1, scores)
    return means.max(axis=-1).mean(axis=-1) - means[..., -1].mean(axis=-1)


def _saved_state(run_dir: Path) -> dict:
    """The run's checkpoint (weights only), or for a finished run whose checkpoint was not kept, what its
    ``summary.json`` holds of it: the settings, the whole curve and the updates done."""
    if (run_dir / "checkpoint.pt").exists():
        return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    grid = (summary.get("sweep") or {}).get("grid", {})  # the summary holds the sweep's results; the grid is its setting
    sweep = [f"{name}={','.join(f'{value:g}' for value in values)}" for name, values in grid.items()] or None
    return {"config": {**summary, "sweep": sweep}, "curve": summary["curve"], "step": summary["steps"]}


def plain_rows(run_dirs: list[Path]) -> dict:
    """``plain_iql.py`` runs of one setting (one seed each, in its own folder): their ``curve.json`` as one
    setting's seeds."""
    saved = [json.loads((run_dir / "curve.json").read_text()) for run_dir in run_dirs]
    settings = saved[0]["settings"]
    seeds = [int(run["settings"]["seed"]) for run in saved]
    length = min(len(run["curve"]) for run in saved)  # the evaluations every seed has reached
    scores = [[point["score"] for point in run["curve"][:length]] for run in saved]
    beta, expectile = float(settings["beta"]), float(settings["iql_tau"])
    name = run_dirs[0].name if len(run_dirs) == 1 else f"{run_dirs[0].name} (+{len(run_dirs) - 1})"
    row = {"temperature": beta, "expectile": expectile, "seeds": seeds, "run": name,
           "label": f"{name}: plain_iql.py, β {beta:g}, τ {expectile:g}, seed{'s' * (len(seeds) > 1)} "
                    f"{', '.join(map(str, seeds))}",
           "reward_transform": "locomotion" if settings["normalize_reward"] == "True" else "none",
           "normalize_observations": "yes" if settings["normalize"] == "True" else "no",
           "steps": [point["step"] for point in saved[0]["curve"][:length]], "scores": scores, **seeds_summary(scores)}
    return {"run": name, "dataset": settings["dataset"], "updates_done": saved[0]["curve"][length - 1]["step"],
            "updates": int(settings["steps"]), "rows": [row]}


def _plain_groups(run_dirs: list[Path]) -> list[list[Path]]:
    """``plain_iql.py`` folders grouped by setting: the same settings but for the seed and the folder."""
    groups: dict[str, list[Path]] = {}
    for run_dir in run_dirs:
        settings = json.loads((run_dir / "curve.json").read_text())["settings"]
        key = json.dumps({k: v for k, v in settings.items() if k not in ("seed", "out")}, sort_keys=True)
        groups.setdefault(key, []).append(run_dir)
    return list(groups.values())


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for run in runs:
        for row in run["rows"]:
            scores = np.array(row["scores"])
            mean, std = scores.mean(axis=0), scores.std(axis=0)
            line, = ax.plot(row["steps"], mean, marker="o", ms=3, label=row["label"])
            ax.fill_between(row["steps"], mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.axhline(100, color="gray", ls="--", lw=1)
    ax.set_xlabel("updates")
    ax.set_ylabel("D4RL-normalized score (mean ± std over seeds)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of one dataset (the main job's or plain_iql.py's)")
    parser.add_argument("--title", default=None, help="the figure's title (default: the dataset)")
    parser.add_argument("--png", type=Path, help="the plot of every run's settings")
    parser.add_argument("--json", type=Path, help="the numbers: each setting's curve, last and best")
    parser.add_argument("--window", type=int, default=4,
                        help="evaluations in the moving mean of the last column (default 4: 100k updates at 25k apart)")
    args = parser.parse_args()
    if args.window < 1:
        parser.error(f"--window {args.window}: must be an integer >= 1.")
    missing = [str(run) for run in args.runs
               if not any((run / name).exists() for name in ("checkpoint.pt", "summary.json", "curve.json"))]
    if missing:
        print(f"locomotion_study: no checkpoint.pt, summary.json or curve.json in {', '.join(missing)}", file=sys.stderr)
        return 2
    plain = [run for run in args.runs if (run / "curve.json").exists()]
    evaluated = []
    for run in (run_rows(run) for run in args.runs if run not in plain):
        if run["rows"]:
            evaluated.append(run)
        else:  # a run just started is left out, said so
            print(f"locomotion_study: {run['run']} has no evaluation yet (update {run['updates_done']})", file=sys.stderr)
    runs = merged_runs(evaluated) + [plain_rows(group) for group in _plain_groups(plain)]
    for run in runs:
        for row in run["rows"]:
            if len(row["steps"]) >= args.window:
                row[f"best_minus_last_window_{args.window}"] = float(best_minus_last(row["scores"], args.window))
    windowed = lambda row: (f"{row[key]:.1f}" if (key := f"best_minus_last_window_{args.window}") in row  # noqa: E731
                            else f"fewer than {args.window} evaluations")
    print("| run: setting | reward | seeds | updates trained | last evaluation at | last | best | best − last "
          f"| mean of seeds, every evaluation | best − last, means of {args.window} evaluations |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        for row in run["rows"]:
            print(f"| {row['label']} | {row['reward_transform']} | {len(row['seeds'])} | {run['updates_done']:,} of "
                  f"{run['updates']:,} | {row['steps'][-1]:,} | {row['final_mean']:.1f} ± {row['final_std']:.1f} | "
                  f"{row['best_mean']:.1f} ± {row['best_std']:.1f} | {row['best_mean'] - row['final_mean']:.1f} | "
                  f"{min(row['curve_mean']):.1f}–{max(row['curve_mean']):.1f} | {windowed(row)} |")
    for run in runs:  # the study's target on medium-replay: IQL >= 10 above behaviour cloning at the last evaluation
        cloning = next((row for row in run["rows"] if row["temperature"] == 0), None)
        if cloning is None:
            continue
        for row in run["rows"]:
            if row["temperature"] > 0:
                print(f"{row['label']}: {row['final_mean'] - cloning['final_mean']:+.1f} over behaviour cloning at "
                      "the last evaluation")
    if args.png:
        plot(runs, args.png, args.title or runs[0]["dataset"])
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
