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

import torch  # noqa: E402

from iql_torchrl.config import parse_cli  # noqa: E402
from iql_torchrl.report import console_summary  # noqa: E402
from iql_torchrl.run import USER_ERRORS, quiet_library_logs  # noqa: E402
from iql_torchrl.trainer import Config, train  # noqa: E402


def main() -> int:
    quiet_library_logs()
    config, given = parse_cli(Config)
    try:
        summary = train(config, given)
    except USER_ERRORS as err:  # bad settings, a folder in use, a refused resume …
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if summary:  # under torchrun only rank 0 returns one
        print(console_summary(summary, summary["run_dir"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
