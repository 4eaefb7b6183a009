"""Offline-to-online IQL: train offline on a Minari dataset, then keep training with interaction.

    python examples/iql_finetune.py                                    # inverted-pendulum medium data
    python examples/iql_finetune.py --dataset iql_torchrl/pendulum/medium-v0 --offline-steps 5000
    python examples/iql_finetune.py --checkpoint runs/my-offline-run    # fine-tune an iql_offline.py run
    python examples/iql_finetune.py --help

Reads like the algorithm: configuration (iql_torchrl.finetune.FinetuneConfig) → Minari data in a
TorchRL replay buffer → the paper's networks → IQLLoss → the fused update step, offline →
a TorchRL Collector in the dataset's environment → offline + online replay → the same update
step, online → evaluation before and after → summary.json and learning_curve.png.
"""
import json

import tyro

from iql_torchrl.finetune import FinetuneConfig, finetune


def main() -> None:
    config = tyro.cli(FinetuneConfig)
    summary = finetune(config)
    keys = ("dataset", "seed", "offline_steps", "env_steps", "updates", "offline_normalized_score",
            "normalized_score", "return_mean", "wall_seconds")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
