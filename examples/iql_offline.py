"""Offline IQL on a Minari dataset: the main job.

    python examples/iql_offline.py                      # the embedded default: a mixed Pendulum dataset
    python examples/iql_offline.py --temperature 0      # behaviour cloning on the same data
    python examples/iql_offline.py --dataset mujoco/hopper/medium-v0 --steps 1000000
    python examples/iql_offline.py --num-seeds 4       # 4 seeds at once, vmapped in one process
    torchrun --nproc_per_node 2 examples/iql_offline.py  # data-parallel: 2 processes, batch 256 each
    python examples/iql_offline.py --help

Reads like the algorithm: configuration (iql_torchrl.trainer.Config) → Minari data in a TorchRL
replay buffer → the paper's networks → IQLLoss → the fused update step → evaluation → summary.
"""
import json

import torch
import tyro

from iql_torchrl.trainer import Config, train


def main() -> None:
    config = tyro.cli(Config)
    summary = train(config)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if summary:  # under torchrun only rank 0 returns one
        keys = ("dataset", "steps", "seed", "temperature", "expectile", "normalized_score", "return_mean",
                "return_std", "per_seed", "updates_per_second", "wall_seconds")
        print(json.dumps({k: summary[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
