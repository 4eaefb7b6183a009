"""Evaluate a saved run without training: ``python -m iql_torchrl.jobs.evaluate RUN_DIR``.

Loads the checkpoint's policy (a plain TorchRL module, see :func:`iql_torchrl.runs.builders.load_actor`),
runs deterministic episodes in the dataset's environment and prints the normalized score.
"""
from __future__ import annotations

import argparse
import json

from iql_torchrl.runs.checkpoint import CheckpointError
from iql_torchrl.runs.evaluation import evaluate_policy
from iql_torchrl.runs.builders import load_actor


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m iql_torchrl.jobs.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder holding checkpoint.pt")
    parser.add_argument("--episodes", type=int, default=10, help="episodes to run (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first episode (default 0)")
    parser.add_argument("--device", default="cpu", help="device for the policy (default cpu)")
    parser.add_argument("--seed-index", type=int, default=0, help="which seed of a --num-seeds run (default 0)")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error(f"--episodes {args.episodes}: must be an integer >= 1.")
    try:
        actor, metadata = load_actor(args.run_dir, device=args.device, seed_index=args.seed_index)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    result = evaluate_policy(actor, metadata, episodes=args.episodes, seed=args.seed, device=args.device)
    report = {"run_dir": args.run_dir, "dataset": metadata.dataset_id, "episodes": args.episodes, **result}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
