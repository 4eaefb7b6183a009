"""How the value estimates of IQL grow on a maze, beside its score: one run per expectile.

Each run is the main job (one seed, the dataset's auto preset unless ``--expectiles`` / ``--temperature``
override τ / β)
with the logger on, so the mean V(s) of the logged batches is read back from the run's CSV logs
and drawn against ``value_bound`` (max |r| / (1 − γ) of the data: no return exceeds it), with the
normalized score and the success rate of each evaluation::

    python benchmarks/bench_maze_values.py --dataset iql_torchrl/pointmaze/medium-stitch-v0 --preset maze-continuing \\
        --expectiles 0.9 0.7 0.5 --temperature 10 --steps 50000 --json benchmarks/results/results_maze_values.json \\
        --png benchmarks/figures/maze_values.png
    python benchmarks/bench_maze_values.py --runs RUN_DIR [RUN_DIR ...] --png maze_values.png   # plot only
    python benchmarks/bench_maze_values.py --dataset iql_torchrl/pointmaze/medium-stitch-v0 --expectiles 0.9 \
        --preset antmaze --success-terminal --eval-episodes 20 --steps 100000 \
        --json benchmarks/results/results_maze_values_terminal.json --png benchmarks/figures/maze_values_terminal.png \
        --with benchmarks/results/results_maze_values.json

The maze presets (``maze``, ``antmaze``) run the absorbing-goal variant (D4RL AntMaze's convention, r − 1, the
relabelled successes terminal): its values lie in [−1/(1 − γ), 0], and the plot draws the ceiling 0 beside the
bound; ``--preset maze-continuing`` (or ``--no-success-terminal``) keeps the goal data continuing.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the main job: iql_offline.train


def run_one(dataset: str, expectile: float | None, temperature: float | None, steps: int, seed: int, out: Path,
            **settings) -> Path:
    """One main-job run; ``settings`` are further ``Config`` fields (preset, success_terminal, eval_episodes)."""
    from iql_offline import train
    from iql_torchrl.runs.config import OfflineConfig

    overrides = {"expectile": expectile} if expectile is not None else {}
    if temperature is not None:
        overrides["temperature"] = temperature
    overrides.update(settings)
    train(OfflineConfig(dataset=dataset, steps=steps, seed=seed, eval_every=max(1, steps // 10), log_every=max(1, steps // 50),
                 checkpoint_every=steps, output_dir=out, logger="csv", progress=False, **overrides))
    return out


def logged_values(run_dir: Path) -> list[list] | None:
    """``[update, mean V(s) of the logged batch]`` from a run's CSV logs (over its seeds); None without them."""
    csv = next(run_dir.glob("logs/*/scalars/value_mean.csv"), None)
    if csv is None:
        return None
    return [[int(step), float(v)] for step, v in (line.split(",") for line in csv.read_text().split())]


def read_run(run_dir: Path) -> dict:
    """A finished run's summary fields and its logged mean V per update."""
    summary = json.loads((run_dir / "summary.json").read_text())
    values = logged_values(run_dir)
    if values is None:
        raise SystemExit(f"{run_dir}: no logs/*/scalars/value_mean.csv (the run needs --logger csv)")
    return {"run_dir": str(run_dir), "dataset": summary["dataset"], "expectile": summary["expectile"],
            "temperature": summary["temperature"], "value_bound": summary.get("value_bound"),
            "preset": summary.get("preset"),
            "success_terminal": summary.get("success_terminal", _config(run_dir).get("success_terminal") is True),
            "values_beyond_bound_at": summary.get("values_beyond_bound_at"), "value_mean": values,
            "curve": [{"step": p["step"], "normalized_score": p["normalized_score"], "success_rate": p.get("success_rate")}
                      for p in summary["curve"]]}


def _config(run_dir: Path) -> dict:
    """The run's settings as its checkpoint holds them (tensors and plain data only)."""
    import torch

    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True, map_location="cpu")
    return checkpoint.get("config", {})


def _label(r: dict) -> str:
    goal = ", goal terminal, r − 1" if r.get("success_terminal") else ", continuing"
    return f"τ {r['expectile']:g}, β {r['temperature']:g}{goal}"


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_v, ax_s) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120)
    for r in results:
        label = _label(r)
        line, = ax_v.plot(*zip(*r["value_mean"]), label=label)
        steps = [p["step"] for p in r["curve"]]
        ax_s.plot(steps, [p["normalized_score"] for p in r["curve"]], marker="o", ms=3, color=line.get_color(),
                  label=f"{label}: score")
        ax_s.plot(steps, [100 * (p["success_rate"] or 0.0) for p in r["curve"]], ls="--", color=line.get_color(),
                  label=f"{label}: success %")
    bound = next((r["value_bound"] for r in results if r["value_bound"] is not None), None)
    if bound is not None:
        ax_v.axhline(bound, color="gray", ls="--", lw=1, label=f"max |r| / (1 − γ) = {bound:g}")
    if any(r.get("success_terminal") for r in results):
        ax_v.axhline(0, color="black", ls=":", lw=1, label="ceiling with the goal absorbing and r − 1: 0")
    ax_v.set(xlabel="updates", ylabel="mean V(s) of the logged batch", title="value estimates")
    ax_s.set(xlabel="updates", ylabel="normalized score / success %", title=results[0]["dataset"].split("/")[-1])
    for ax in (ax_v, ax_s):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="iql_torchrl/pointmaze/medium-stitch-v0")
    parser.add_argument("--expectiles", type=float, nargs="+", default=[None],
                        help="one run per value (default: one run with the preset's τ)")
    parser.add_argument("--temperature", type=float, default=None, help="β of every run (default: the preset's)")
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default=None, help="the runs' preset (default: the dataset's)")
    parser.add_argument("--success-terminal", action=argparse.BooleanOptionalAction, default="auto",
                        help="the relabelled successes are terminal (default: the preset's choice)")
    parser.add_argument("--eval-episodes", type=int, default=None)
    parser.add_argument("--runs", nargs="+", default=None, help="plot these finished run folders instead of training")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--with", dest="earlier", nargs="+", default=[], metavar="JSON",
                        help="earlier results of this script drawn beside (e.g. the continuing runs)")
    parser.add_argument("--json", default="results_maze_values.json")
    parser.add_argument("--png", default="maze_values.png")
    args = parser.parse_args(argv)
    if args.runs:
        run_dirs = [Path(r) for r in args.runs]
    else:
        out = Path(args.out or tempfile.mkdtemp(prefix="bench_maze_values_"))
        settings = {"success_terminal": args.success_terminal}
        if args.preset is not None:
            settings["preset"] = args.preset
        if args.eval_episodes is not None:
            settings["eval_episodes"] = args.eval_episodes
        run_dirs = [run_one(args.dataset, tau, args.temperature, args.steps, args.seed, out / f"tau-{tau}", **settings)
                    for tau in args.expectiles]
    results = [read_run(d) for d in run_dirs]
    for r in results:
        peak = max(r["curve"], key=lambda p: p["normalized_score"])
        print(f"{_label(r)}: max mean V {max(v for _, v in r['value_mean']):.1f}, final mean V {r['value_mean'][-1][1]:.1f} (bound "
              f"{r['value_bound']}, passed at {r['values_beyond_bound_at']}), score peak {peak['normalized_score']:.1f} "
              f"at {peak['step']}, final {r['curve'][-1]['normalized_score']:.1f}")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    earlier = [r for path in args.earlier for r in json.loads(Path(path).read_text())]
    plot(results + earlier, args.png)


if __name__ == "__main__":
    sys.exit(main())
