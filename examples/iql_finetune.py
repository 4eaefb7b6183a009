"""Offline-to-online IQL: train offline on a Minari dataset, then keep training with interaction.

    python examples/iql_finetune.py                                    # inverted-pendulum medium data
    python examples/iql_finetune.py --dataset iql_torchrl/pendulum/medium-v0 --offline-steps 5000
    python examples/iql_finetune.py --checkpoint runs/my-offline-run    # fine-tune an iql_offline.py run
    python examples/iql_finetune.py --resume --output-dir runs/<run>    # continue a stopped run
    python examples/iql_finetune.py --help

Reads like the algorithm: configuration (iql_torchrl.finetune.FinetuneConfig) → Minari data in a
TorchRL replay buffer → the paper's networks → IQLLoss → the fused update step, offline →
a TorchRL Collector in the dataset's environment → offline + online replay → the same update
step, online → evaluation before and after → summary.json and learning_curve.png.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads sleep (iql_torchrl.threads)

import sys  # noqa: E402

from iql_torchrl.cli import run_job  # noqa: E402
from iql_torchrl.finetune import FinetuneConfig, finetune  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_job(FinetuneConfig, finetune))
