"""Learning quality: IQL vs behaviour cloning on the local builders' mixed datasets, 3 seeds each.

    python benchmarks/bench_scores.py                       # default budget (CPU, under 30 minutes)
    python benchmarks/bench_scores.py --steps 1000000 --device cuda --eval-every 50000   # paper budget
    python benchmarks/bench_scores.py --sweep --no-compile --json benchmarks/results/results_sweep.json --png benchmarks/figures/sweep.png
    python benchmarks/bench_scores.py --discrete --datasets iql_torchrl/cartpole/mixed-v0 --steps 20000 \
        --eval-every 20000 --hidden-sizes 64 64 --no-compile --json benchmarks/results/results_scores_discrete.json \
        --png benchmarks/figures/scores_discrete.png

Each configuration trains its seeds together (``--num-seeds``, vmapped) through the trainer, so
every number comes from the same code path as ``examples/iql_offline.py``. Rows: IQL in the
paper's update order, IQL with one summed backward (TorchRL's order), and behaviour cloning
(``temperature=0``). Prints a markdown table (mean ± std of the normalized score over seeds),
writes JSON and a bar chart.

``--compile-vs-eager`` trains IQL (paper order) eager and compiled instead, same seeds: compiled training
must learn as eager does, not only agree over a few steps (the main job compiles by default). Both rows
run in float32 unless ``--precision`` says otherwise (the main job's ``auto`` may pick bf16 for a compiled
step, which would mix the two).

``--sweep`` trains IQL (paper order) on the first dataset for every expectile τ in
``--expectiles`` and temperature β in ``--temperatures`` instead, and prints a τ × β table
with a heat map.

``--suite maze``: sparse-reward navigation (the local PointMaze sets). On umaze, medium and
medium-stitch, with the goal out of and in the policy's input (``--goal-input no / yes``), 3 seeds
vmapped of IQL with the auto preset (``maze``: τ 0.9, β 10, r − 1, the goal terminal where it is out of the input),
the same at τ 0.5 (the data's own values: what the upper expectile adds) and behaviour cloning (β = 0); every final score,
success rate and the share of AWR weights at the clamp; a PNG of the learning curves; then the
τ ∈ {0.5, 0.7, 0.9} × β ∈ {3, 10} sweep on medium-stitch (``--no-maze-sweep`` leaves it out)::

    python benchmarks/bench_scores.py --suite maze                     # 50k updates a run
    python benchmarks/bench_scores.py --suite maze --datasets iql_torchrl/pointmaze/medium-stitch-v0 \
        --goal-inputs no --steps 5000 --eval-every 1000 --no-maze-sweep     # a small slice

``--suite maze --sweep`` runs the maze sweep alone; ``--expectiles`` / ``--temperatures`` pick its cells, so
parts can run side by side (one thread each) and ``--merge`` joins their JSON or ``--out`` folders (a cell
no part holds reads "–"). Each maze cell keeps its CSV log: the heat map comes with every cell's score curve
and one value curve per τ. The sweep's JSON is rewritten after every finished cell. ``--preset`` and
``--success-terminal`` go into every cell's run (the reward transform is the preset's), e.g. the goal
absorbing with AntMaze's r − 1, where every value lies in [−1/(1−γ), 0]::

    python benchmarks/bench_scores.py --suite maze --sweep --preset antmaze --success-terminal \
        --expectiles 0.9 --temperatures 10 --seeds 1 --eval-episodes 50 --out runs/terminal/tau0.9-beta10 \
        --json terminal-tau0.9-beta10.json --png terminal-tau0.9-beta10.png

``--suite maze --merge`` (no ``--sweep``) joins suite runs made in parts (say one dataset, goal input and
method a process) and the maze sweep's JSON into one table and one figure; a run is named by its τ and β::

    python benchmarks/bench_scores.py --suite maze --merge benchmarks/results/results_maze_sweep.json part1.json part2.json \
        --json benchmarks/results/results_maze.json --png benchmarks/figures/maze_curves.png
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the main job: iql_offline.train

from iql_offline import train  # noqa: E402
from iql_torchrl.runs.config import PRESETS, OfflineConfig  # noqa: E402

from bench_maze_values import logged_values  # noqa: E402

DATASETS = ("iql_torchrl/pendulum/mixed-v0", "iql_torchrl/inverted-pendulum/mixed-v0", "iql_torchrl/reacher/mixed-v0")
# Discrete actions (DiscreteIQLLoss, categorical actor, greedy evaluation): few expert episodes next to
# many of a systematically wrong policy, which misleads cloning. ``--discrete`` runs these, IQL (paper order) and BC.
DISCRETE_DATASETS = ("iql_torchrl/cartpole/mixed-v0", "iql_torchrl/mountain-car/mixed-v0")
METHODS = {
    "IQL (paper order)": dict(order="paper"),
    "IQL (summed backward)": dict(order="summed"),
    "BC (β = 0)": dict(order="paper", temperature=0.0),
}
COMPILE_METHODS = {
    "IQL eager": dict(order="paper", compile=False),
    "IQL compiled": dict(order="paper", compile=True),
}
MAZE_DATASETS = ("iql_torchrl/pointmaze/umaze-v0", "iql_torchrl/pointmaze/medium-v0", "iql_torchrl/pointmaze/medium-stitch-v0")
MAZE_METHODS = {
    "IQL (auto preset)": dict(),  # maze: τ 0.9, β 10, r − 1, the goal terminal where it is out of the input
    "IQL τ 0.5": dict(expectile=0.5),  # the same with the data's own values: what the upper expectile adds
    "BC (β = 0)": dict(temperature=0.0),
}
MAZE_SWEEP = dict(dataset="iql_torchrl/pointmaze/medium-stitch-v0", expectiles=(0.5, 0.7, 0.9), temperatures=(3.0, 10.0))
SWEEP_EXPECTILES = (0.5, 0.7, 0.9)
SWEEP_TEMPERATURES = (0.0, 1.0, 3.0, 10.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("mixed", "maze"), default="mixed",
                        help="mixed: the local mixed sets (default); maze: sparse-reward navigation, see above")
    parser.add_argument("--goal-inputs", nargs="+", choices=("no", "yes"), default=["no", "yes"],
                        help="--suite maze: goal out of / in the policy's input")
    parser.add_argument("--no-maze-sweep", action="store_true", help="--suite maze: leave out the τ × β sweep")
    parser.add_argument("--maze-methods", nargs="+", choices=list(MAZE_METHODS), default=list(MAZE_METHODS),
                        help="--suite maze: which methods to run (default: all)")
    parser.add_argument("--datasets", nargs="+", default=None, help="default: the continuous mixed sets")
    parser.add_argument("--discrete", action="store_true", help="the discrete mixed sets, IQL (paper order) vs BC")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="default 5000 (maze: 50000)")
    parser.add_argument("--eval-every", type=int, default=None, help="default 5000")
    parser.add_argument("--eval-episodes", type=int, default=None, help="default 10 (maze: the preset's 100)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default="auto",
                        help="force the compiled (--compile) or eager (--no-compile) step; default: the main job's auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                        help="the step's precision; default: the main job's auto, but fp32 with --compile-vs-eager "
                             "(so that its two rows differ in compilation alone)")
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=None,
                        help="hidden layer widths of every network (default: the trainer's, 256 256)")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--json", default="bench_scores.json")
    parser.add_argument("--png", default="bench_scores.png")
    parser.add_argument("--compile-vs-eager", action="store_true",
                        help="IQL (paper order) eager and compiled instead of the methods")
    parser.add_argument("--sweep", action="store_true", help="τ × β grid on the first dataset instead of the methods")
    parser.add_argument("--expectiles", type=float, nargs="+", default=None,
                        help=f"--sweep: default {SWEEP_EXPECTILES} (maze: {MAZE_SWEEP['expectiles']})")
    parser.add_argument("--temperatures", type=float, nargs="+", default=None,
                        help=f"--sweep: default {SWEEP_TEMPERATURES} (maze: {MAZE_SWEEP['temperatures']})")
    parser.add_argument("--preset", choices=[*PRESETS, "auto"], default="auto",
                        help="--sweep and --suite maze: the preset of every run (its reward transform and goal rule; τ "
                             "and β are the sweep's or the method's where they set them); default auto, the dataset's")
    parser.add_argument("--success-terminal", action=argparse.BooleanOptionalAction, default="auto",
                        help="--sweep and --suite maze, goal data with the goal out of the input: the relabelled "
                             "successes are terminal (D4RL AntMaze's convention); default: the preset's choice")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="train nothing: with --sweep, join the cells of sweeps run in parts (their JSON, "
                             "or their --out folders for parts stopped early) into one table; with --suite maze alone, "
                             "join maze suite runs made in parts (their JSON; the maze sweep's JSON gives its goal-out "
                             "medium-stitch cells) into one table and one figure")
    parser.add_argument("--cells", nargs="+", default=None, metavar="JSON",
                        help="train nothing: --suite maze, one table and one figure of maze sweep cells of any dataset, "
                             "preset, goal rule and seed count (the goal preset's pass), each cell named by all four")
    parser.add_argument("--curves-png", default=None, metavar="PNG",
                        help="--cells: also the learning curves, one panel a dataset, of its cells with the most seeds")
    parser.add_argument("--curves-of", nargs="+", default=None, metavar="JSON",
                        help="--curves-png: only the cells of these of the --cells files (default: all)")
    args = parser.parse_args(argv)
    if args.cells:
        return table_of_cells(args)
    args.precision = args.precision or ("fp32" if args.compile_vs_eager else "auto")
    args.steps = args.steps or (50_000 if args.suite == "maze" else 5000)
    args.eval_every = args.eval_every or 5000
    grid = MAZE_SWEEP if args.suite == "maze" else dict(expectiles=SWEEP_EXPECTILES, temperatures=SWEEP_TEMPERATURES)
    args.expectiles = args.expectiles or list(grid["expectiles"])
    args.temperatures = args.temperatures or list(grid["temperatures"])
    if args.suite == "maze" and args.sweep:  # the maze sweep alone, or its parts joined
        args.datasets = args.datasets or [MAZE_SWEEP["dataset"]]  # --datasets picks the maze
        args.eval_episodes = args.eval_episodes or 100
        return merge_sweeps(args) if args.merge else sweep(args)
    if args.suite == "maze":
        return merge_maze(args) if args.merge else maze_suite(args)
    args.eval_episodes = args.eval_episodes or 10
    if args.datasets is None:
        args.datasets = list(DISCRETE_DATASETS if args.discrete else DATASETS)
    if args.sweep and args.merge:
        return merge_sweeps(args)
    if args.sweep:
        return sweep(args)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_scores_"))
    results = []
    start = time.perf_counter()
    methods = COMPILE_METHODS if args.compile_vs_eager else METHODS
    for dataset in args.datasets:
        for method, overrides in methods.items():
            if args.discrete and overrides.get("order") == "summed":
                continue
            run_dir = out / f"{dataset.replace('/', '_')}-{method.replace(' ', '_')}-{overrides['order']}-{overrides.get('temperature', 'beta')}"
            config = OfflineConfig(dataset=dataset, steps=args.steps, eval_every=args.eval_every, eval_episodes=args.eval_episodes,
                            num_seeds=args.seeds, device=args.device, compile=args.compile, output_dir=run_dir,
                            precision=args.precision, logger="none", progress=False, checkpoint_every=args.steps, log_every=max(1, args.steps // 10))
            if args.hidden_sizes:
                config.hidden_sizes = tuple(args.hidden_sizes)
            for key, value in overrides.items():
                setattr(config, key, value)
            t0 = time.perf_counter()
            summary = train(config)
            scores = [s["normalized_score"] for s in summary["per_seed"]]
            results.append({"dataset": dataset, "method": method, "scores": scores,
                            "mean": statistics.fmean(scores), "std": statistics.pstdev(scores),
                            "seconds": time.perf_counter() - t0})
            print(f"{dataset:<42} {method:<24} {results[-1]['mean']:7.1f} ± {results[-1]['std']:5.1f}  "
                  f"({', '.join(f'{s:.1f}' for s in scores)})  {results[-1]['seconds']:.0f} s", flush=True)
    total = time.perf_counter() - start
    table = markdown_table(results, args)
    print("\n" + table)
    print(f"\ntotal {total / 60:.1f} min")
    with open(args.json, "w") as f:
        json.dump({"steps": args.steps, "seeds": args.seeds, "device": args.device, "precision": args.precision,
                   "total_seconds": total,
                   "hidden_sizes": args.hidden_sizes,
                   "results": results}, f, indent=2)
    plot(results, args.png, args)
    return results


def markdown_table(results, args) -> str:
    methods = list(dict.fromkeys(r["method"] for r in results))  # those that ran
    lines = [f"| dataset ({args.steps} updates, {args.seeds} seeds) | " + " | ".join(methods) + " |",
             "|---|" + "---|" * len(methods)]
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        cells = []
        for method in methods:
            r = next(r for r in results if r["dataset"] == dataset and r["method"] == method)
            cells.append(f"{r['mean']:.1f} ± {r['std']:.1f}")
        lines.append(f"| `{dataset}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))  # those that ran
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    for i, method in enumerate(methods):
        rs = [next(r for r in results if r["dataset"] == d and r["method"] == method) for d in datasets]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(datasets))]
        ax.bar(xs, [r["mean"] for r in rs], width, yerr=[r["std"] for r in rs], capsize=3, label=method)
    ax.axhline(100, color="gray", ls="--", lw=1)
    ax.set_xticks(range(len(datasets)), [d.split("/")[1] + "\n" + d.split("/")[2] for d in datasets])
    ax.set_ylabel("normalized score (mean ± std over seeds)")
    ax.set_title(f"IQL vs BC on mixed datasets ({args.steps} updates, {args.seeds} seeds)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- τ × β sweep
def sweep(args):
    """IQL (paper order) on ``args.datasets[0]`` for every (τ, β); table, JSON and heat map."""
    dataset = args.datasets[0]
    maze = args.suite == "maze"
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_sweep_"))
    results = []
    start = time.perf_counter()
    for expectile in args.expectiles:
        for temperature in args.temperatures:
            cloned = next((r for r in results if r["temperature"] == 0.0 == temperature), None)
            if cloned is not None:
                # β = 0 weighs every sample by exp(0) = 1: the actor never reads V or Q, so τ cannot
                # change the policy (same seeds, same batches, same scores); trained once
                results.append({**cloned, "expectile": expectile, "seconds": 0.0, "same_run_as_expectile": cloned["expectile"]})
                continue
            run_dir = out / f"tau{expectile}-beta{temperature}"
            # a maze cell keeps its CSV logs: the mean V(s) of the logged batches, beside the score
            config = OfflineConfig(dataset=dataset, steps=args.steps, eval_every=args.eval_every, eval_episodes=args.eval_episodes,
                            num_seeds=args.seeds, device=args.device, compile=args.compile, precision=args.precision,
                            logger="csv" if maze else "none", progress=False, checkpoint_every=args.steps,
                            log_every=max(1, args.steps // (50 if maze else 10)), output_dir=run_dir, order="paper",
                            expectile=expectile, temperature=temperature, preset=args.preset,
                            success_terminal=args.success_terminal)
            cell = maze_run(config, run_dir) if maze else seed_scores(config)
            results.append({"expectile": expectile, "temperature": temperature, **cell})
            r = results[-1]
            success = f"  success {100 * r['success_rate']:5.1f}%" if r.get("success_rate") is not None else ""
            print(f"τ={expectile:<4} β={temperature:<5} {r['mean']:7.1f} ± {r['std']:5.1f}  "
                  f"({', '.join(f'{s:.1f}' for s in r['scores'])}){success}  {r['seconds']:.0f} s", flush=True)
            # after every cell: an interrupted sweep keeps the cells it finished
            write_sweep_json(args, dataset, results, time.perf_counter() - start)
    total = time.perf_counter() - start
    print("\n" + sweep_table(results, args))
    print(f"\ntotal {total / 60:.1f} min")
    write_sweep_json(args, dataset, results, total)
    plot_sweep(results, args.png, args)
    return results


def write_sweep_json(args, dataset: str, results: list[dict], seconds: float) -> None:
    """The sweep's JSON: its settings, the cells finished so far (``cells`` of ``cells_planned``)."""
    with open(args.json, "w") as f:
        json.dump({"dataset": dataset, "steps": args.steps, "seeds": args.seeds, "device": args.device,
                   "preset": args.preset, "presets_run": sorted({r["preset"] for r in results if r.get("preset")}),
                   "success_terminal": goal_terminal(results, args), "eval_episodes": args.eval_episodes,
                   "cells": len(results), "cells_planned": len(args.expectiles) * len(args.temperatures),
                   "total_seconds": seconds, "results": results}, f, indent=2)


def goal_terminal(results, args) -> bool:
    """Whether the cells' goal was terminal: as their runs recorded it, else as the command forced it."""
    recorded = [r["success_terminal"] for r in results if "success_terminal" in r]
    return all(recorded) if recorded else getattr(args, "success_terminal", False) is True


def seed_scores(config: OfflineConfig) -> dict:
    """Trains ``config`` (its seeds vmapped); the final normalized score of each seed, mean, std, seconds."""
    t0 = time.perf_counter()
    summary = train(config)
    scores = [s["normalized_score"] for s in summary["per_seed"]]
    return {"scores": scores, "mean": statistics.fmean(scores), "std": statistics.pstdev(scores),
            "preset": summary["preset"], "seconds": time.perf_counter() - t0}


def merge_sweeps(args):
    """One table, JSON and heat map from sweeps run in parts (e.g. one τ row per process)."""
    parts = [_sweep_part(Path(path)) for path in args.merge]
    args.datasets, args.steps, args.seeds = [parts[0]["dataset"]], parts[0]["steps"], parts[0]["seeds"]
    cells = {}
    for part in parts:
        for r in part["results"]:
            cells.setdefault((r["expectile"], r["temperature"]), r)
    # one setting a heat map: the cells' preset (a cell saved before presets were recorded: the part's) and goal rule
    settings = {(r.get("preset", part.get("preset")), bool(r.get("success_terminal", part.get("success_terminal"))))
                for part in parts for r in part["results"]}
    if len(settings) > 1:
        raise SystemExit(f"{args.merge}: the parts' cells differ in preset or success terminal ({sorted(settings, key=str)}); "
                         "merge each setting on its own")
    (preset, success_terminal), = settings
    args.preset, args.success_terminal = preset or "auto", success_terminal
    behaviour_cloning = next((r for (_, t), r in cells.items() if t == 0.0), None)
    results = []
    for expectile in args.expectiles:
        for temperature in args.temperatures:
            cell = cells.get((expectile, temperature))
            if cell is None and temperature == 0.0 and behaviour_cloning is not None:  # τ-free, see sweep()
                cell = {**behaviour_cloning, "expectile": expectile, "seconds": 0.0,
                        "same_run_as_expectile": behaviour_cloning["expectile"]}
            if cell is None:
                print(f"not run: τ = {expectile}, β = {temperature} (in none of {args.merge})")
                continue
            results.append(cell)
    if not results:
        raise SystemExit(f"no cell of τ {args.expectiles} × β {args.temperatures} in {args.merge}")
    print(sweep_table(results, args))
    print("\n" + diagnostic_table(results, args, "awr_clamped_frac", "AWR weights at the clamp", lambda x: f"{100 * x:.1f}%"))
    print("\n" + diagnostic_table(results, args, "advantage_mean", "mean advantage", lambda x: f"{x:.2f}"))
    with open(args.json, "w") as f:
        json.dump({**{k: parts[0][k] for k in ("dataset", "steps", "seeds", "device")}, "parts": args.merge,
                   "preset": args.preset, "success_terminal": args.success_terminal,
                   "eval_episodes": sorted({r["eval_episodes"] for r in results if r.get("eval_episodes")}),
                   "cells": len(results), "cells_planned": len(args.expectiles) * len(args.temperatures),
                   "not_run": [[e, t] for e in args.expectiles for t in args.temperatures
                               if not any((r["expectile"], r["temperature"]) == (e, t) for r in results)],
                   "total_seconds": sum(r["seconds"] for r in results), "results": results}, f, indent=2)
    plot_sweep(results, args.png, args)
    return results


def _sweep_part(path: Path) -> dict:
    """A sweep's JSON, or the cells finished so far in its ``--out`` folder (one summary.json a run)."""
    if path.is_file():
        return json.loads(path.read_text())
    summaries = [json.loads(f.read_text()) for f in sorted(path.glob("*/summary.json"))]
    if not summaries:
        raise SystemExit(f"{path}: neither a sweep JSON nor a folder of finished runs")
    results = []
    for summary in summaries:
        run_dir = path / f"tau{summary['expectile']}-beta{summary['temperature']}"
        if summary.get("success_rate") is not None:  # a goal task: what the maze sweep records
            results.append(maze_result(summary, run_dir, seconds=summary["wall_seconds"]))
            continue
        scores = [s["normalized_score"] for s in summary["per_seed"]]
        results.append({"expectile": summary["expectile"], "temperature": summary["temperature"], "scores": scores,
                        "mean": statistics.fmean(scores), "std": statistics.pstdev(scores), "preset": summary["preset"],
                        "seconds": summary["wall_seconds"], **awr_diagnostics(run_dir)})
    first = summaries[0]
    return {"dataset": first["dataset"], "steps": first["steps"], "seeds": first["num_seeds"], "device": first["device"],
            "preset": first["preset"], "success_terminal": results[0].get("success_terminal", False), "results": results}


def awr_diagnostics(run_dir: Path) -> dict:
    """The trained losses of a run on every transition of its dataset: how many AWR weights sit at
    the clamp (100), and the mean advantage, averaged over seeds."""
    import warnings

    import torch

    from iql_torchrl.runs.builders import build_seed_losses
    from iql_torchrl.runs.checkpoint import load_run_checkpoint
    from iql_torchrl.runs.config import PRESETS, RunConfig, config_from_dict
    from iql_torchrl.data import OfflineDataMetadata, buffer_transitions, load_minari_dataset

    state = load_run_checkpoint(run_dir, map_location="cpu")
    config = config_from_dict(RunConfig, state["config"])
    config.device, config.output_dir = "cpu", None
    num_seeds = state["config"].get("num_seeds", 1)
    metadata = OfflineDataMetadata.from_state_dict(state["metadata"])
    loss = build_seed_losses(config, metadata, list(range(num_seeds)), "cpu")  # one seed: a plain IQLLoss, as trained
    loss.load_state_dict(state["loss"])
    data = buffer_transitions(load_minari_dataset(config.dataset, reward_transform=PRESETS[config.preset].reward_transform,
                                                  normalize_observations=config.normalize_observations,
                                                  goal_in_observation=config.goal_in_observation(),
                                                  success_terminal=config.success_terminal_option()))
    clamped, advantage, value = [], [], []
    warnings.filterwarnings("ignore", message="No target network updater")  # nothing is updated here
    with torch.no_grad():
        for i in range(num_seeds):
            out = (loss if num_seeds == 1 else loss.seed_loss(i))(data.clone())
            clamped.append(float(out["awr_weight_clamped_frac"]))
            advantage.append(float(out["advantage_mean"]))
            value.append(float(out["value_mean"]))
    return {"awr_clamped_frac": statistics.fmean(clamped), "advantage_mean": statistics.fmean(advantage),
            "value_mean": statistics.fmean(value)}


def diagnostic_table(results, args, key: str, title: str, fmt) -> str:
    """One diagnostic of :func:`awr_diagnostics` per cell ("–" where a cell has no checkpoint)."""
    lines = [f"| τ \\ β: {title} | " + " | ".join(f"β = {t:g}" for t in args.temperatures) + " |",
             "|---|" + "---|" * len(args.temperatures)]
    for expectile, row in zip(args.expectiles, _grid(results, args)):
        lines.append(f"| τ = {expectile:g} | " + " | ".join(fmt(r[key]) if r and key in r else "–" for r in row) + " |")
    return "\n".join(lines)


def _grid(results, args):
    """The cells by τ (rows) and β (columns); None where a cell was not run."""
    return [[next((r for r in results if r["expectile"] == e and r["temperature"] == t), None) for t in args.temperatures]
            for e in args.expectiles]


def sweep_setting(results, args) -> str:
    """The runs' preset (its reward transform) and goal rule, e.g. "preset antmaze (r − 1), goal terminal"."""
    presets = sorted({r["preset"] for r in results if r.get("preset")}) or [getattr(args, "preset", "auto")]
    transforms = {"antmaze": "r − 1", "none": "r", "locomotion": "locomotion scaling"}
    named = [f"{p} ({transforms.get(PRESETS[p].reward_transform, PRESETS[p].reward_transform)})" if p in PRESETS else p
             for p in presets]
    goal = "goal terminal" if goal_terminal(results, args) else "continuing"
    return f"preset {' / '.join(named)}, {goal}"


def sweep_table(results, args) -> str:
    lines = [f"| τ \\ β ({args.steps} updates, {args.seeds} seeds; {sweep_setting(results, args)}) | "
             + " | ".join(f"β = {t:g}" for t in args.temperatures) + " |",
             "|---|" + "---|" * len(args.temperatures)]
    for expectile, row in zip(args.expectiles, _grid(results, args)):
        lines.append(f"| τ = {expectile:g} | " + " | ".join(f"{r['mean']:.1f} ± {r['std']:.1f}" if r else "–" for r in row) + " |")
    return "\n".join(lines)


def plot_sweep(results, path, args):
    """The heat map of final scores; for the maze sweep, beside it each cell's score and mean V(s) over updates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = any(r.get("curve") for r in results)
    fig, axes = plt.subplots(1, 3 if curves else 1, figsize=(15 if curves else 6, 3.8), dpi=120, squeeze=False)
    ax = axes[0][0]
    grid = _grid(results, args)
    means = [[r["mean"] if r else float("nan") for r in row] for row in grid]
    image = ax.imshow(means, cmap="viridis", vmin=0, vmax=max(100.0, max(r["mean"] for r in results)), aspect="auto")
    for i, row in enumerate(grid):
        for j, r in enumerate(row):
            ax.text(j, i, f"{r['mean']:.0f}\n±{r['std']:.0f}" if r else "not run", ha="center", va="center", fontsize=8,
                    color="gray" if r is None else "white" if r["mean"] < 60 else "black")
    ax.set_xticks(range(len(args.temperatures)), [f"β = {t:g}" for t in args.temperatures])
    ax.set_yticks(range(len(args.expectiles)), [f"τ = {e:g}" for e in args.expectiles])
    ax.set_title(f"normalized score, {args.datasets[0]}\n({args.steps} updates, {args.seeds} seeds, mean ± std; "
                 f"{sweep_setting(results, args)})", fontsize=8)
    fig.colorbar(image, ax=ax)
    if curves:
        ax_s, ax_v = axes[0][1], axes[0][2]
        for r in results:
            ax_s.plot([p["step"] / 1000 for p in r["curve"]], [p["normalized_score"] for p in r["curve"]],
                      marker="o", ms=3, label=f"τ {r['expectile']:g}, β {r['temperature']:g}")
        # V and Q never read the actor: one value curve per τ, whatever β (same seeds, same batches)
        for expectile in args.expectiles:
            r = next((r for r in results if r["expectile"] == expectile and r.get("value_curve")), None)
            if r is not None:
                ax_v.plot([step / 1000 for step, _ in r["value_curve"]], [v for _, v in r["value_curve"]],
                          label=f"τ {expectile:g} (every β)")
        bound = next((r["value_bound"] for r in results if r.get("value_bound") is not None), None)
        values = [v for r in results for _, v in r.get("value_curve") or []]
        negative = bool(values) and statistics.median(values) < 0  # a continuing run's first values can dip below 0
        if bound is not None:  # on the side the values lie
            ax_v.axhline(-bound if negative else bound, color="gray", ls="--", lw=1,
                         label=f"{'−' if negative else ''}max |r| / (1 − γ) = {-bound if negative else bound:.4g}")
        if goal_terminal(results, args) and all(PRESETS[r["preset"]].reward_transform == "antmaze"
                                                            for r in results if r.get("preset") in PRESETS):
            ax_v.axhline(0, color="black", ls=":", lw=1, label="goal terminal, r − 1: V ≤ 0")
        ax_s.set(xlabel="updates (thousands)", ylabel=f"normalized score (mean of {args.seeds} seeds)",
                 title=f"evaluations ({sweep_setting(results, args)})")
        ax_v.set(xlabel="updates (thousands)", ylabel="mean V(s), logged batches", title="value estimates", yscale="symlog")
        if not negative:
            ax_v.set_ylim(bottom=0)
        for a in (ax_s, ax_v):
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- sparse-reward navigation
def maze_suite(args):
    """IQL (auto preset), IQL τ 0.5 and BC on the maze sets, goal out of and in the input; then the sweep."""
    datasets = args.datasets or list(MAZE_DATASETS)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_maze_"))
    json_path = args.json if args.json != "bench_scores.json" else "results_maze.json"
    png_path = args.png if args.png != "bench_scores.png" else "maze_curves.png"
    results, start = [], time.perf_counter()
    for dataset in datasets:
        for goal_input in args.goal_inputs:
            for method in args.maze_methods:
                overrides = MAZE_METHODS[method]
                name = f"{dataset.split('/')[-1]}-goal-{goal_input}-{method.split()[0]}-{'-'.join(map(str, overrides.values())) or 'auto'}"
                config = OfflineConfig(dataset=dataset, steps=args.steps, eval_every=args.eval_every, num_seeds=args.seeds,
                                device=args.device, compile=args.compile, precision=args.precision,
                                output_dir=out / name, logger="none",
                                progress=False, checkpoint_every=args.steps, log_every=max(1, args.steps // 10),
                                goal_input=goal_input, preset=args.preset, success_terminal=args.success_terminal, **overrides)
                if args.eval_episodes:
                    config.eval_episodes = args.eval_episodes
                if args.hidden_sizes:
                    config.hidden_sizes = tuple(args.hidden_sizes)
                results.append({"dataset": dataset, "goal_input": goal_input, "method": method, "steps": args.steps,
                                **maze_run(config, out / name)})
                r = results[-1]
                print(f"{dataset:<40} goal {goal_input:<3} {method:<18} {r['mean']:6.1f} ± {r['std']:4.1f}  success "
                      f"{100 * r['success_rate']:5.1f}%  clamp {100 * r['awr_clamped_frac']:.1f}%  "
                      f"mean V {r['value_mean']:.1f} (bound {r['value_bound']:.0f})  "
                      f"τ {r['expectile']} β {r['temperature']}  {r['seconds']:.0f} s", flush=True)
    print("\n" + maze_table(results, args))
    report = {"suite": "maze", "steps": args.steps, "seeds": args.seeds, "device": args.device,
              "seconds": time.perf_counter() - start, "results": results}
    plot_maze_curves(results, png_path, args)
    if not args.no_maze_sweep:
        sweep_args = argparse.Namespace(**{**vars(args), "datasets": [MAZE_SWEEP["dataset"]],
                                           "expectiles": list(MAZE_SWEEP["expectiles"]),
                                           "temperatures": list(MAZE_SWEEP["temperatures"]),
                                           "json": str(Path(json_path).with_name("results_maze_sweep.json")),
                                           "png": str(Path(png_path).with_name("maze_sweep.png")),
                                           "out": str(out / "sweep"), "eval_episodes": args.eval_episodes or 100})
        report["sweep"] = sweep(sweep_args)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    return results


def maze_run(config: OfflineConfig, run_dir: Path) -> dict:
    """One vmapped run: each seed's final score and success rate, the mean curve, the AWR clamp share."""
    t0 = time.perf_counter()
    summary = train(config)
    return maze_result(summary, run_dir, seconds=time.perf_counter() - t0)


def maze_result(summary: dict, run_dir: Path, seconds: float) -> dict:
    """A finished maze run's scores, success rates, curve, value bound, logged mean V(s) (with the CSV
    logger) and AWR diagnostics."""
    scores = [s["normalized_score"] for s in summary["per_seed"]]
    rates = [s.get("success_rate") or 0.0 for s in summary["per_seed"]]
    value_curve = logged_values(run_dir) or []
    return {"scores": scores, "mean": statistics.fmean(scores), "std": statistics.pstdev(scores),
            "success_rates": rates, "success_rate": statistics.fmean(rates),
            "expectile": summary["expectile"], "temperature": summary["temperature"], "preset": summary["preset"],
            "eval_episodes": summary["eval_episodes"], "updates_per_second": summary["updates_per_second"],
            "value_bound": summary["value_bound"],  # max |r| / (1 - γ) of the run's data: no return exceeds it
            "values_beyond_bound_at": summary.get("values_beyond_bound_at"),
            "success_terminal": summary.get("success_terminal", False),  # the data's successes were terminal
            "curve": [{"step": p["step"], "normalized_score": p["normalized_score"], "success_rate": p.get("success_rate")}
                      for p in summary["curve"]],
            "value_curve": value_curve,  # [update, mean V(s) of the logged batch, over seeds]
            "seconds": seconds, **awr_diagnostics(run_dir)}


def maze_method(expectile: float, temperature: float, goal_terminal: bool, goal_input: str) -> str | None:
    """The suite's name for a run with these τ and β under the maze preset's goal rule (cloning whatever τ and
    goal rule: β = 0 never reads V or Q), or None."""
    if temperature == 0.0:
        return "BC (β = 0)"
    preset = PRESETS["maze"]
    if goal_terminal != (preset.success_terminal and goal_input == "no"):
        return None
    for method, overrides in MAZE_METHODS.items():
        if (overrides.get("expectile", preset.expectile), overrides.get("temperature", preset.temperature)) == (expectile, temperature):
            return method
    return None


def table_of_cells(args):
    """Sweep cells of any maze, preset, goal rule and seed count in one table (rows sorted by dataset, then
    setting), with each run's mean V at its end against the bound; a figure of the final scores per dataset."""
    rows = []
    for path in args.cells:  # a sweep's JSON (its dataset and steps for every cell) or a suite's (each run its own)
        part = json.loads(Path(path).read_text())
        for r in part["results"]:
            if r.get("goal_input", "no") != "no":
                continue
            preset = r.get("preset", part.get("preset"))
            terminal = bool(r.get("success_terminal", part.get("success_terminal")))
            setting = "cloning" if r["temperature"] == 0 else cell_setting(preset, terminal)
            row = {**r, "dataset": r.get("dataset", part.get("dataset")), "steps": r.get("steps", part.get("steps")),
                   "seeds": len(r["scores"]), "part": str(path), "setting": setting}
            if not any((o["dataset"], o["setting"], o["steps"], o["scores"]) == (row["dataset"], setting, row["steps"], r["scores"])
                       for o in rows):  # a cell two parts hold (the suite's JSON repeats the sweep's)
                rows.append(row)
    order = {d: i for i, d in enumerate(MAZE_DATASETS)}
    rows.sort(key=lambda r: (order.get(r["dataset"], len(order)), r["setting"], r["expectile"], r["temperature"], r["seeds"]))
    lines = ["| dataset | setting | τ | β | updates | seeds | final score ± std / success | peak (mean over seeds) | "
             "mean V at the end (bound) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = max((p["normalized_score"] for p in r["curve"]), default=float("nan"))
        value = "–" if r.get("value_mean") is None else f"{r['value_mean']:.1f} ({r['value_bound']:.0f})"
        expectile = "–" if r["setting"] == "cloning" else f"{r['expectile']:g}"
        lines.append(f"| `{r['dataset'].split('/')[-1]}` | {r['setting']} | {expectile} | {r['temperature']:g} | "
                     f"{r['steps'] // 1000}k | {r['seeds']} | {r['mean']:.1f} ± {r['std']:.1f} / {100 * r['success_rate']:.0f}% | "
                     f"{peak:.1f} | {value} |")
    print("\n".join(lines))
    with open(args.json, "w") as f:
        json.dump({"suite": "maze", "cells": args.cells, "results": rows}, f, indent=2)
    plot_cells(rows, args.png)
    if args.curves_png:
        chosen = {str(path) for path in args.curves_of or args.cells}
        plot_cell_curves([r for r in rows if r["part"] in chosen], args.curves_png)
    return rows


def plot_cells(rows, path):
    """One panel a dataset: a bar a cell (final score, mean ± std over seeds), its success rate written beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    counts = [sum(r["dataset"] == d for r in rows) for d in datasets]
    fig, axes = plt.subplots(len(datasets), 1, figsize=(10, 0.28 * sum(counts) + 1.0 * len(datasets)), dpi=120,
                             squeeze=False, sharex=True, gridspec_kw=dict(height_ratios=counts))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    for ax, dataset in zip(axes[:, 0], datasets):
        mine = [r for r in rows if r["dataset"] == dataset]
        for i, r in enumerate(mine):
            ax.barh(i, r["mean"], xerr=r["std"], color=f"C{settings.index(r['setting'])}", alpha=0.8)
            ax.text(r["mean"] + r["std"] + 0.5, i, f"{100 * r['success_rate']:.0f}%", va="center", fontsize=7)
        ax.set_yticks(range(len(mine)), [cell_label(r) for r in mine], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{dataset.split('/')[-1]}, goal out", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[-1, 0].set_xlabel("final normalized score, mean ± std over seeds (success rate beside)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_cell_curves(rows, path):
    """One panel a dataset: the normalized score (mean over seeds) at each evaluation of the dataset's cells run
    with the most seeds (the longest run of each setting), each line named by :func:`cell_label`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    def kind_of(r):  # one colour a setting, τ and β (cloning: any τ)
        return r["setting"], None if r["setting"] == "cloning" else r["expectile"], r["temperature"]

    kinds = list(dict.fromkeys(map(kind_of, rows)))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 4.2), dpi=120, squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        mine = [r for r in rows if r["dataset"] == dataset and len(r["curve"]) > 1]
        most = max((r["seeds"] for r in mine), default=0)
        longest = {}  # a setting run to 20k and to 50k: the longer run
        for r in (r for r in mine if r["seeds"] == most):
            kind = kinds.index(kind_of(r))
            if kind not in longest or r["steps"] > longest[kind]["steps"]:
                longest[kind] = r
        for kind, r in longest.items():
            ax.plot([p["step"] / 1000 for p in r["curve"]], [p["normalized_score"] for p in r["curve"]], marker="o",
                    markersize=3, color=f"C{kind % 10}", linestyle=":" if r["temperature"] == 0 else "-",
                    label=cell_label(r))
        ax.set_title(f"{dataset.split('/')[-1]}, goal out", fontsize=9)
        ax.set_xlabel("updates (thousands)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0, 0].set_ylabel("normalized score (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def cell_setting(preset: str, terminal: bool) -> str:
    """A cell's rewards and goal rule, named by what they are rather than by a preset's name (the goal data's
    presets have been redefined: a continuing ``maze`` cell holds the rewards as stored)."""
    if terminal or preset == "antmaze":
        return f"r − 1, goal {'terminal' if terminal else 'continuing'}"
    return f"{'locomotion scaling' if preset == 'mujoco' else 'r'}, continuing"


def cell_label(r) -> str:
    """E.g. "r − 1, goal terminal, τ 0.9 β 10 (3 seeds, 50k)"."""
    what = "cloning" if r["setting"] == "cloning" else f"{r['setting']}, τ {r['expectile']:g} β {r['temperature']:g}"
    return f"{what} ({r['seeds']} seed{'s' * (r['seeds'] > 1)}, {r['steps'] // 1000}k)"


def merge_maze(args):
    """One table, JSON and figure from maze suite runs made in parts: each part's JSON (a suite's, or the
    maze sweep's, whose cells are medium-stitch with the goal out). A run is named by its τ and β, not
    by the label it was saved with, and must follow the maze preset's goal rule; runs of no suite method
    are left out, and where two parts hold the same cell the first given wins."""
    cells, seeds = {}, set()
    for path in args.merge:
        part = json.loads(Path(path).read_text())
        for r in part["results"]:
            r = {"dataset": part.get("dataset"), "goal_input": "no", "steps": part["steps"], **r}  # a sweep's cell
            terminal = bool(r.get("success_terminal", part.get("success_terminal")))
            method = maze_method(r["expectile"], r["temperature"], terminal, r["goal_input"])
            key = (r["dataset"], r["goal_input"], method)
            if method is None or key in cells:
                why = "no suite method" if method is None else f"{cells[key]['part']} gave it first"
                print(f"left out: {path}: {r['dataset'].split('/')[-1]}, goal {r['goal_input']}, "
                      f"τ {r['expectile']} β {r['temperature']} ({why})")
                continue
            cells[key] = {**r, "method": method, "part": path}
            seeds.add(part["seeds"])
    order = {d: i for i, d in enumerate(MAZE_DATASETS)}
    methods = list(MAZE_METHODS)
    results = [cells[key] for key in sorted(cells, key=lambda k: (k[1], order.get(k[0], len(order)), methods.index(k[2])))]
    args.seeds = "/".join(map(str, sorted(seeds)))
    print(maze_table(results, args))
    with open(args.json, "w") as f:
        json.dump({"suite": "maze", "parts": args.merge, "seeds": sorted(seeds), "results": results}, f, indent=2)
    plot_maze_curves(results, args.png, args)
    return results


def maze_table(results, args) -> str:
    """Rows: dataset and goal input (with the run's updates); columns: the methods; "–" where a method was not run."""
    methods = [m for m in MAZE_METHODS if any(r["method"] == m for r in results)]
    lines = [f"| dataset, goal in input | updates ({args.seeds} seeds) | "
             + " | ".join(f"{m}: score / success" for m in methods) + " |", "|---|---|" + "---|" * len(methods)]
    for dataset, goal_input in dict.fromkeys((r["dataset"], r["goal_input"]) for r in results):
        row = {r["method"]: r for r in results if (r["dataset"], r["goal_input"]) == (dataset, goal_input)}
        cells = [f"{row[m]['mean']:.1f} ± {row[m]['std']:.1f} / {100 * row[m]['success_rate']:.0f}%" if m in row else "–"
                 for m in methods]
        steps = "/".join(f"{s // 1000}k" for s in sorted({r.get("steps", args.steps) for r in row.values()}))
        lines.append(f"| `{dataset.split('/')[-1]}`, goal {goal_input} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_maze_curves(results, path, args):
    """One panel a dataset (columns) and goal input (rows): each method's mean score over seeds per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(dict.fromkeys(r["dataset"] for r in results), key=lambda d: MAZE_DATASETS.index(d) if d in MAZE_DATASETS else 99)
    goal_inputs = sorted(dict.fromkeys(r["goal_input"] for r in results))
    fig, axes = plt.subplots(len(goal_inputs), len(datasets), figsize=(4 * len(datasets), 3.2 * len(goal_inputs)),
                             dpi=120, squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(MAZE_METHODS)}
    for row, goal_input in enumerate(goal_inputs):
        for col, dataset in enumerate(datasets):
            ax = axes[row][col]
            for r in results:
                if (r["dataset"], r["goal_input"]) == (dataset, goal_input):
                    ax.plot([p["step"] for p in r["curve"]], [p["normalized_score"] for p in r["curve"]], marker="o",
                            ms=3, color=colors.get(r["method"]),
                            label=f"{r['method']}: {r['mean']:.1f} / {100 * r['success_rate']:.0f}%")
            ax.set_title(f"{dataset.split('/')[-1]}, goal {'in' if goal_input == 'yes' else 'out of'} the input", fontsize=9)
            ax.set_xlabel("updates")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.set_ylim(bottom=0)
                ax.legend(fontsize=6, title="final score / success", title_fontsize=6)
            else:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, color="gray")
            if col == 0:
                ax.set_ylabel(f"normalized score\n(mean of {args.seeds} seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main() and 0)
