"""How much of a run's best − last gap its evaluations' noise makes: the final policies run for many episodes.

    python benchmarks/evaluation_noise.py benchmarks/locomotion/walker2d-medium-replay-v1-default \\
        --episodes 200 --json benchmarks/results/evaluation_noise_walker2d-medium-replay-v1.json

A run evaluates each seed's policy over a few episodes (``--eval-episodes``, 10 by default) every so many updates,
and the study's table compares the seeds' mean of their last evaluation with their mean of their best one. A best
of 40 noisy evaluations reads high even when the policy never changes. This runs each member's final policy (from
the run's checkpoint, weights only) for ``--episodes`` episodes on environment seeds the run never evaluated on,
and then draws, from those episodes' scores, what the run's evaluations would have read had every one of them
been that final policy: as many evaluations as the run made, as many episodes each. Per setting it prints the
final policies' score over the many episodes, one evaluation's spread, and the best − last gap such a frozen
policy shows (mean and 90th percentile over the draws) beside the run's own, for single evaluations and for the
moving mean of ``--window`` evaluations that ``locomotion_study.py`` also prints. ``--per-evaluation N`` draws
evaluations of N episodes instead of the run's own number: what a frozen policy would show had the run evaluated
over N.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from iql_torchrl.runs.builders import actor_from_checkpoint
from iql_torchrl.runs.checkpoint import load_run_checkpoint
from iql_torchrl.runs.evaluation import evaluate_policy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from locomotion_study import best_minus_last, run_rows  # noqa: E402


def frozen_gaps(episode_scores: list[np.ndarray], evaluations: int, episodes: int, window: int = 1,
                draws: int = 10_000, seed: int = 0) -> np.ndarray:
    """``draws`` values of the seeds' best − last gap (``best_minus_last``) had each seed's every one of
    ``evaluations`` evaluations been ``episodes`` episodes drawn (with replacement) from its ``episode_scores``."""
    rng = np.random.default_rng(seed)
    curves = np.stack([rng.choice(scores, (draws, evaluations, episodes)).mean(axis=-1) for scores in episode_scores],
                      axis=1)  # draws × seeds × evaluations
    return best_minus_last(curves, window)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a run folder of the main job, with its checkpoint.pt")
    parser.add_argument("--episodes", type=int, default=200, help="episodes per final policy (default 200)")
    parser.add_argument("--seed", type=int, default=50_000,
                        help="environment seed of the first episode (default 50000, apart from the run's evaluations)")
    parser.add_argument("--window", type=int, default=4, help="evaluations in the moving mean (default 4)")
    parser.add_argument("--draws", type=int, default=10_000, help="frozen-policy runs drawn (default 10000)")
    parser.add_argument("--per-evaluation", type=int,
                        help="episodes per evaluation in the frozen-policy draws (default: the run's --eval-episodes)")
    parser.add_argument("--json", type=Path, help="the numbers, every episode's score included")
    args = parser.parse_args()
    for name in ("episodes", "window", "draws", "per_evaluation"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be an integer >= 1.")
    if not (args.run / "checkpoint.pt").exists():
        parser.error(f"{args.run}: no checkpoint.pt; the final policies are read from it.")
    from tqdm.auto import tqdm

    state = load_run_checkpoint(args.run, map_location="cpu")
    run = run_rows(args.run, state)
    run_episodes = state["config"]["eval_episodes"]
    per_evaluation = args.per_evaluation or run_episodes
    if run["updates_done"] > run["rows"][0]["steps"][-1]:
        print(f"evaluation_noise: {args.run} trained {run['updates_done']:,} updates, its last evaluation was at "
              f"{run['rows'][0]['steps'][-1]:,}: the policies run here are the checkpoint's, not the last evaluated",
              file=sys.stderr)
    members = sum(len(row["members"]) for row in run["rows"])
    bar = tqdm(total=members, desc=f"final policies, {args.episodes} episodes each", unit="policy")
    frozen = f"a frozen policy, {per_evaluation} episodes an evaluation: mean [90%]"
    print(f"| setting | seeds | final policies over {args.episodes} episodes | one evaluation of {per_evaluation} "
          f"episodes: std | best − last: the run ({run_episodes} episodes an evaluation) | {frozen} | means of "
          f"{args.window} evaluations: the run | {frozen} |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for row in run["rows"]:
        scores = []
        for member in row["members"]:
            actor, metadata = actor_from_checkpoint(state, "cpu", member)
            scores.append(np.asarray(evaluate_policy(actor, metadata, episodes=args.episodes,
                                                     seed=args.seed)["normalized_scores"]))
            bar.update()
        evaluations = len(row["steps"])
        finals = [float(s.mean()) for s in scores]
        single_std = float(np.mean([s.std() / np.sqrt(per_evaluation) for s in scores]))
        result = {"label": row["label"], "seeds": row["seeds"], "evaluations": evaluations,
                  "final_policy_scores": finals, "one_evaluation_std": single_std,
                  "episode_scores": [s.tolist() for s in scores]}
        for window in sorted({1, args.window} & set(range(1, evaluations + 1))):
            gaps = frozen_gaps(scores, evaluations, per_evaluation, window, args.draws)
            result[f"window_{window}"] = {"run": float(best_minus_last(row["scores"], window)),
                                          "frozen_mean": float(gaps.mean()),
                                          "frozen_p90": float(np.percentile(gaps, 90)),
                                          "frozen_above_10": float(np.mean(gaps > 10))}
        results.append(result)
        gap = lambda w: (f"{g['run']:.1f} | {g['frozen_mean']:.1f} [{g['frozen_p90']:.1f}]"  # noqa: E731
                         if (g := result.get(f"window_{w}")) else f"fewer than {w} evaluations | –")
        bar.write(f"| {row['label']} | {len(scores)} | {np.mean(finals):.1f} ± {np.std(finals):.1f} | {single_std:.1f} "
                  f"| {gap(1)} | {gap(args.window)} |")
    bar.close()
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "dataset": run["dataset"],
                                         "updates_done": run["updates_done"], "episodes": args.episodes,
                                         "seed": args.seed, "window": args.window, "draws": args.draws,
                                         "run_eval_episodes": run_episodes, "per_evaluation": per_evaluation,
                                         "settings": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
