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

from iql_torchrl.config import parse_cli  # noqa: E402
from iql_torchrl.finetune import FinetuneConfig, finetune  # noqa: E402
from iql_torchrl.report import console_summary  # noqa: E402
from iql_torchrl.run import USER_ERRORS, quiet_library_logs  # noqa: E402


def main() -> int:
    quiet_library_logs()
    config, given = parse_cli(FinetuneConfig)
    try:
        summary = finetune(config, given)
    except USER_ERRORS as err:  # bad settings, a folder in use, a refused resume …
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(console_summary(summary, summary["run_dir"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
