"""Evaluate a saved run without training: ``python -m iql_torchrl.jobs.evaluate RUN_DIR``.

Loads the checkpoint's policy (a plain TorchRL module, see :func:`iql_torchrl.runs.builders.load_actor`),
runs deterministic episodes in the dataset's environment and prints the normalized score with the member it
evaluated (``seed_index``, its training seed, its β and τ). By default
the episodes are the run's own evaluation episodes (its ``--eval-episodes``, on the environment seeds
its evaluations use), so a finished run's folder gives the score in its ``summary.json``.
"""
from __future__ import annotations

import argparse
import json

from iql_torchrl.jobs.cli import quiet_library_logs
from iql_torchrl.runs.builders import loss_from_checkpoint
from iql_torchrl.runs.settings import resolved_device
from iql_torchrl.runs.checkpoint import CheckpointError, load_run_checkpoint
from iql_torchrl.runs.evaluation import evaluate_policy, evaluation_seed
from iql_torchrl.runs.sweep import saved_member_seeds


def main(argv: list[str] | None = None) -> dict:
    quiet_library_logs()
    parser = argparse.ArgumentParser(prog="python -m iql_torchrl.jobs.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder holding checkpoint.pt")
    parser.add_argument("--episodes", type=int, default=None,
                        help="episodes to run (default: the run's --eval-episodes)")
    parser.add_argument("--seed", type=int, default=None,
                        help="environment seed of the first episode, the next one seed+1 and so on "
                             "(default: the run's own evaluation seeds, --seed of the run + 10000)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="device for the policy (default cpu)")
    parser.add_argument("--seed-index", type=int, default=0,
                        help="which member of a --num-seeds or --sweep run (default 0; setting-major, as its summary lists them)")
    args = parser.parse_args(argv)
    if args.episodes is not None and args.episodes < 1:
        parser.error(f"--episodes {args.episodes}: must be an integer >= 1.")
    try:
        device = resolved_device(args.device)
        state = load_run_checkpoint(args.run_dir, map_location="cpu")
        loss, metadata = loss_from_checkpoint(state, device, args.seed_index)
    except (CheckpointError, FileNotFoundError, ValueError) as err:  # ValueError: a ConfigError too
        parser.exit(2, f"error: {err}\n")
    run = state["config"]
    episodes = args.episodes or run["eval_episodes"]
    member_seed = saved_member_seeds(run)[args.seed_index]
    seed = evaluation_seed(member_seed) if args.seed is None else args.seed
    actor = loss.get_stateful_net("actor_network", copy=True).eval()
    result = evaluate_policy(actor, metadata, episodes=episodes, seed=seed, device=device)
    member = {"seed_index": args.seed_index, "training_seed": member_seed,
              "temperature": loss.temperature, "expectile": loss.expectile}
    report = {"run_dir": args.run_dir, "dataset": metadata.dataset_id, **member,
              "episodes": episodes, "seed": seed, **result}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
