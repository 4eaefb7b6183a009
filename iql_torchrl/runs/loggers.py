"""The TorchRL logger a run writes its metrics to (``--logger csv|wandb|tensorboard|none``)."""
from __future__ import annotations

import os
from pathlib import Path

from iql_torchrl.runs.config import config_to_dict

__all__ = ["make_logger", "log_values"]


def make_logger(config, output_dir: Path):
    """The TorchRL logger ``--logger`` names, writing under the run folder (``None`` for ``none``)."""
    if config.logger == "none":
        return None
    from torchrl.record.loggers import CSVLogger, TensorboardLogger, WandbLogger

    name = output_dir.name
    if config.logger == "csv":
        return CSVLogger(exp_name=name, log_dir=str(output_dir / "logs"))
    if config.logger == "tensorboard":
        return TensorboardLogger(exp_name=name, log_dir=str(output_dir / "logs"))
    offline = not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") != "online"
    return WandbLogger(exp_name=name, save_dir=str(output_dir), project="iql_torchrl", offline=offline,
                       config=config_to_dict(config))


def log_values(logger, values: dict, step: int) -> None:
    if logger is None:
        return
    for key, value in values.items():
        logger.log_scalar(key, value, step=step)
