"""Offline-to-online IQL: train offline on a Minari dataset, then keep training with interaction.

    python examples/iql_finetune.py                                    # the default: Pendulum medium data (iql_torchrl/pendulum/medium-v0)
    python examples/iql_finetune.py --offline-steps 5000                # a shorter offline phase
    python examples/iql_finetune.py --checkpoint runs/my-offline-run    # fine-tune an iql_offline.py run
    python examples/iql_finetune.py --resume --output-dir runs/<run>    # continue a stopped run
    python examples/iql_finetune.py --help

Reads like the algorithm: configuration (iql_torchrl.jobs.finetune.FinetuneConfig) → Minari data in a
TorchRL replay buffer → the paper's networks → IQLLoss → the fused update step, offline →
a TorchRL Collector in the dataset's environment → offline + online replay → the same update
step, online → evaluation before and after → summary.json and learning_curve.png.
"""
import os

# before torch loads: idle OpenMP threads spin briefly, then sleep -- as fast alone as threads that
# spin, and two runs side by side don't starve each other (iql_torchrl.runs.threads); a user's own setting wins
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import sys  # noqa: E402

import torch  # noqa: E402

from iql_torchrl.jobs.cli import run_job  # noqa: E402
from iql_torchrl.jobs.finetune import FinetuneConfig, finetune  # noqa: E402

if __name__ == "__main__":
    # Adam's moments of a unit whose gradient stays zero decay into subnormal floats and stay there (0.9 × the
    # smallest rounds back to it), and CPU arithmetic on subnormals is many times slower: flushed to zero, a
    # long run keeps its speed (docs/fused-step.md, "Long runs")
    torch.set_flush_denormal(True)
    sys.exit(run_job(FinetuneConfig, finetune))
