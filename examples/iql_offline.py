"""Offline IQL on a Minari dataset: the main job.

    python examples/iql_offline.py                      # the embedded default: a mixed Pendulum dataset
    python examples/iql_offline.py --temperature 0      # behaviour cloning on the same data
    python examples/iql_offline.py --dataset mujoco/hopper/medium-v0 --steps 1000000
    python examples/iql_offline.py --num-seeds 4       # 4 seeds at once, vmapped in one process
    python examples/iql_offline.py --resume --output-dir runs/<run>   # continue a stopped run
    torchrun --nproc_per_node 2 examples/iql_offline.py  # data-parallel: 2 processes, batch 256 each
    python examples/iql_offline.py --help

Reads like the algorithm: configuration (iql_torchrl.trainer.Config) → Minari data in a TorchRL
replay buffer → the paper's networks → IQLLoss → the fused update step → evaluation → summary.
The full summary is written to the run folder's summary.json; the console gets a short one.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads sleep (iql_torchrl.threads)

import sys  # noqa: E402

from iql_torchrl.cli import run_job  # noqa: E402
from iql_torchrl.trainer import Config, train  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_job(Config, train))
