"""Where a maze run's score goes: reaching the goal, how soon, and staying there.

PointMaze's evaluation is continuing: the reward is 1 at every step the point is at the goal, so the
return of an episode is its number of steps at the goal, and the normalized score mixes three things
this script separates, per run folder and seed (the trained policies, evaluated again on ``--episodes``
episodes):

* the success rate (the goal reached at least once);
* the steps to the goal (the first step at it, over the episodes that reach it);
* the share of the steps from then on spent at the goal (return / steps left), 1.0 for a policy that
  stays.

::

    python benchmarks/bench_maze_goal.py --runs RUN_DIR [RUN_DIR ...] --labels "maze preset" ... \\
        --json benchmarks/results/results_maze_goal.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def goal_rule(state: dict):
    """Whether the run's goal was terminal: its data's record, or, in a checkpoint older than that record,
    the ``--success-terminal`` option it was given (True, False or "auto")."""
    return state["data"].get("success_terminal", state["config"].get("success_terminal"))


def goal_profile(run_dir: str, episodes: int) -> dict:
    """The run's seeds evaluated again: score, success rate, steps to the goal and the share of the steps
    after it at the goal (means over the seeds; those two over the episodes that reach the goal)."""
    from iql_torchrl.runs.builders import load_actor
    from iql_torchrl.runs.checkpoint import load_run_checkpoint
    from iql_torchrl.runs.evaluation import evaluate_policy

    state = load_run_checkpoint(run_dir, map_location="cpu")
    seeds = []
    for index in range(state["config"].get("num_seeds", 1)):
        actor, metadata = load_actor(run_dir, seed_index=index)
        horizon = metadata.make_env().spec.max_episode_steps
        result = evaluate_policy(actor, metadata, episodes=episodes)
        reached = [(n, r) for n, r in zip(result["steps_to_goal"], result["returns"]) if n is not None]
        seeds.append({
            "normalized_score": result["normalized_score"], "success_rate": result["success_rate"],
            "steps_to_goal": statistics.fmean(n for n, _ in reached) if reached else None,
            "share_at_goal_after": statistics.fmean(r / (horizon - n + 1) for n, r in reached) if reached else None,
        })

    def mean(key):
        values = [s[key] for s in seeds if s[key] is not None]
        return statistics.fmean(values) if values else None

    return {"run": str(run_dir), "dataset": state["config"]["dataset"], "seeds": len(seeds), "horizon": horizon,
            "expectile": state["config"]["expectile"], "temperature": state["config"]["temperature"],
            "preset": state["config"]["preset"], "success_terminal": goal_rule(state),
            **{key: mean(key) for key in ("normalized_score", "success_rate", "steps_to_goal", "share_at_goal_after")},
            "per_seed": seeds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="run folders (iql_offline.py's --output-dir)")
    parser.add_argument("--labels", nargs="+", default=None, help="one a run (default: the folder's name)")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    labels = args.labels or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"--labels: {len(labels)} given for {len(args.runs)} runs")
    rows = [{"label": label, **goal_profile(run, args.episodes)} for label, run in zip(labels, args.runs)]

    def shown(value, form):
        return "–" if value is None else form.format(value)

    lines = ["| run | dataset | seeds | score | success | steps to the goal (of) | share of the steps after it at the goal |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | `{r['dataset'].split('/')[-1]}` | {r['seeds']} | {r['normalized_score']:.1f} | "
                     f"{100 * r['success_rate']:.0f}% | {shown(r['steps_to_goal'], '{:.0f}')} ({r['horizon']}) | "
                     f"{shown(r['share_at_goal_after'], '{:.2f}')} |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"episodes": args.episodes, "results": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
