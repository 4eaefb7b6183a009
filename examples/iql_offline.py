"""Offline IQL on a Minari dataset: the main job.

    python examples/iql_offline.py                      # the embedded default: a mixed Pendulum dataset
    python examples/iql_offline.py --temperature 0      # behaviour cloning on the same data
    python examples/iql_offline.py --dataset mujoco/hopper/medium-v0 --steps 1000000
    python examples/iql_offline.py --help

Reads like the algorithm: configuration (iql_torchrl.trainer.Config) → Minari data in a TorchRL
replay buffer → the paper's networks → IQLLoss → the fused update step → evaluation → summary.
"""
import json

import tyro

from iql_torchrl.trainer import Config, train


def main() -> None:
    config = tyro.cli(Config)
    summary = train(config)
    keys = ("dataset", "steps", "seed", "temperature", "expectile", "normalized_score", "return_mean",
            "return_std", "updates_per_second", "wall_seconds")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
